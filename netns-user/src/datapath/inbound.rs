//! `NETNS_INBOUND`: the `--allow-inbound` CIDRs, an LPM trie.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use aya::maps::MapData;
use aya::maps::lpm_trie::{Key, LpmTrie};
use netns_common::maps;

use super::{Cidr, Datapath, DatapathError, absent_ok, map_err};

fn key(c: &Cidr) -> Key<u32> {
    Key::new(u32::from(c.prefix_len), u32::from(c.network).to_be())
}

fn cidr(k: &Key<u32>) -> Cidr {
    Cidr {
        network: Ipv4Addr::from(u32::from_be(k.data())),
        prefix_len: k.prefix_len() as u8,
    }
}

impl Datapath {
    fn inbound(&self) -> Result<LpmTrie<MapData, u32, u8>, DatapathError> {
        LpmTrie::try_from(aya::maps::Map::LpmTrie(self.map_data(maps::INBOUND)?))
            .map_err(map_err("opening the inbound map"))
    }

    /// The `--allow-inbound` CIDRs in the trie.
    pub fn inbound_entries(&self) -> Result<Vec<Cidr>, DatapathError> {
        let m = self.inbound()?;
        let mut out = Vec::new();
        for k in m.keys() {
            out.extend(absent_ok(k, "reading the inbound map")?.as_ref().map(cidr));
        }
        Ok(out)
    }

    /// Makes the inbound trie hold exactly `want`; returns (added, removed).
    pub fn sync_inbound(&self, want: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>), DatapathError> {
        let have: HashSet<Cidr> = self.inbound_entries()?.into_iter().collect();
        let want: HashSet<Cidr> = want.iter().copied().collect();
        let mut m = self.inbound()?;
        let mut removed: Vec<Cidr> = have.difference(&want).copied().collect();
        let mut added: Vec<Cidr> = want.difference(&have).copied().collect();
        removed.sort_by_key(|c| (c.network, c.prefix_len));
        added.sort_by_key(|c| (c.network, c.prefix_len));
        // Removals first: a full trie must still take the new set.
        for c in &removed {
            absent_ok(
                m.remove(&key(c)),
                format!("removing {c} from the inbound map"),
            )?;
        }
        for c in &added {
            m.insert(&key(c), 1, 0)
                .map_err(map_err(format!("adding {c} to the inbound map")))?;
        }
        Ok((added, removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_keys_are_network_order() {
        let c = Cidr {
            network: Ipv4Addr::new(10, 1, 0, 0),
            prefix_len: 16,
        };
        let k = key(&c);
        assert_eq!(k.prefix_len(), 16);
        assert_eq!(k.data().to_ne_bytes(), [10, 1, 0, 0]);
        assert_eq!(cidr(&k), c);
    }
}
