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

    /// Least-recently-used entries the kernel evicted from the full conntrack tables:
    /// everything inserted minus everything deleted minus what is there now (`live`:
    /// the entries of both tables). An estimate: a removal of a pair one of whose halves
    /// was already gone counts two.
    pub fn ct_evictions(&self, live: u64) -> Result<u64, DatapathError> {
        let s: HashMap<Stat, u64> = self.stats()?.into_iter().collect();
        Ok(evictions(&s, live))
    }
}

fn evictions(s: &HashMap<Stat, u64>, live: u64) -> u64 {
    let inserted = 2 * s[&Stat::CtCreated] + s[&Stat::CtRebuilt];
    // Each of these removes both halves of a pair; a promotion moves a pair between
    // the tables (both counted in `live`).
    let pairs =
        s[&Stat::CtHostReclaimed] + s[&Stat::CtExpired] + s[&Stat::CtStale] + s[&Stat::CtReopened];
    let removed = s[&Stat::CtRetired] + s[&Stat::CtUserRemoved] + 2 * pairs;
    inserted.saturating_sub(removed).saturating_sub(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_from_counters() {
        let mut s: HashMap<Stat, u64> = Stat::ALL.iter().map(|s| (*s, 0)).collect();
        s.insert(Stat::CtCreated, 10);
        s.insert(Stat::CtRebuilt, 2);
        s.insert(Stat::CtUserRemoved, 4);
        s.insert(Stat::CtHostReclaimed, 1);
        s.insert(Stat::CtExpired, 1);
        s.insert(Stat::CtStale, 1);
        s.insert(Stat::CtPromoted, 5);
        // 22 inserted, 10 removed, 8 live: 4 evicted.
        assert_eq!(evictions(&s, 8), 4);
        assert_eq!(evictions(&s, 100), 0);
    }
}
