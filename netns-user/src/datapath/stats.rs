//! `NETNS_STATS`: per-CPU counters, by [`Stat`].

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use netns_common::{Stat, maps};

use super::{Datapath, DatapathError, io, map_err};

impl Datapath {
    fn stats_map(&self) -> Result<PerCpuArray<MapData, u64>, DatapathError> {
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(self.map_data(maps::STATS)?))
            .map_err(map_err("opening the stats map"))
    }

    /// Adds to a counter from user space (CPU 0's slot).
    pub(super) fn add_stat(&self, stat: Stat, n: u64) -> Result<(), DatapathError> {
        if n == 0 {
            return Ok(());
        }
        let mut m = self.stats_map()?;
        let v = m
            .get(&(stat as u32), 0)
            .map_err(map_err(format!("reading counter {}", stat.name())))?;
        let mut vals: Vec<u64> = v.iter().copied().collect();
        vals[0] += n;
        let v = PerCpuValues::try_from(vals)
            .map_err(io(format!("per-CPU values of counter {}", stat.name())))?;
        m.set(stat as u32, v, 0)
            .map_err(map_err(format!("writing counter {}", stat.name())))
    }

    /// Counters summed over CPUs, in `Stat::ALL` order.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        let m = self.stats_map()?;
        Stat::ALL
            .iter()
            .map(|s| {
                let v = m
                    .get(&(*s as u32), 0)
                    .map_err(map_err(format!("reading counter {}", s.name())))?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }

    /// Least-recently-used entries the kernel evicted from the full conntrack table:
    /// everything inserted minus everything deleted minus what is there now.
    pub fn ct_evictions(&self) -> Result<u64, DatapathError> {
        let s: HashMap<Stat, u64> = self.stats()?.into_iter().collect();
        let live = self.conntrack_entries()?.len() as u64;
        Ok(evictions(&s, live))
    }
}

fn evictions(s: &HashMap<Stat, u64>, live: u64) -> u64 {
    let inserted = 2 * s[&Stat::CtCreated] + s[&Stat::CtRebuilt];
    // A host reclaim deletes both halves of the container's pair.
    let removed = s[&Stat::CtRetired]
        + s[&Stat::DropCtInsert]
        + s[&Stat::CtUserRemoved]
        + 2 * s[&Stat::CtHostReclaimed];
    inserted.saturating_sub(removed).saturating_sub(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_from_counters() {
        let mut s: HashMap<Stat, u64> = Stat::ALL.iter().map(|s| (*s, 0)).collect();
        s.insert(Stat::CtCreated, 10);
        s.insert(Stat::CtUserRemoved, 4);
        s.insert(Stat::CtHostReclaimed, 1);
        // 20 inserted, 6 removed, 10 live: 4 evicted.
        assert_eq!(evictions(&s, 10), 4);
        assert_eq!(evictions(&s, 100), 0);
    }
}
