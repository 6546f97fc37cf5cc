//! The CIDR LPM tries: `NETNS_INBOUND` (`--allow-inbound`) and `NETNS_NOMASQ`
//! (`--no-masquerade`), both made to hold exactly the flag's list on every load.

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

/// One of the CIDR tries: its map name and what log and error lines call it.
#[derive(Clone, Copy)]
struct Trie {
    map: &'static str,
    what: &'static str,
}

const INBOUND: Trie = Trie {
    map: maps::INBOUND,
    what: "inbound map",
};

const NOMASQ: Trie = Trie {
    map: maps::NOMASQ,
    what: "no-masquerade map",
};

impl Datapath {
    fn trie(&self, t: Trie) -> Result<LpmTrie<MapData, u32, u8>, DatapathError> {
        LpmTrie::try_from(aya::maps::Map::LpmTrie(self.map_data(t.map)?))
            .map_err(map_err(format!("opening the {}", t.what)))
    }

    fn trie_entries(&self, t: Trie) -> Result<Vec<Cidr>, DatapathError> {
        let m = self.trie(t)?;
        let mut out = Vec::new();
        for k in m.keys() {
            out.extend(
                absent_ok(k, format!("reading the {}", t.what))?
                    .as_ref()
                    .map(cidr),
            );
        }
        out.sort_by_key(|c| (c.network, c.prefix_len));
        Ok(out)
    }

    /// Makes trie `t` hold exactly `want`; returns (added, removed).
    fn sync_trie(&self, t: Trie, want: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>), DatapathError> {
        let have: HashSet<Cidr> = self.trie_entries(t)?.into_iter().collect();
        let want: HashSet<Cidr> = want.iter().copied().collect();
        let mut m = self.trie(t)?;
        let mut removed: Vec<Cidr> = have.difference(&want).copied().collect();
        let mut added: Vec<Cidr> = want.difference(&have).copied().collect();
        removed.sort_by_key(|c| (c.network, c.prefix_len));
        added.sort_by_key(|c| (c.network, c.prefix_len));
        // Removals first: a full trie must still take the new set.
        for c in &removed {
            absent_ok(
                m.remove(&key(c)),
                format!("removing {c} from the {}", t.what),
            )?;
        }
        for c in &added {
            m.insert(&key(c), 1, 0)
                .map_err(map_err(format!("adding {c} to the {}", t.what)))?;
        }
        Ok((added, removed))
    }

    /// The `--allow-inbound` CIDRs in the trie.
    pub fn inbound_entries(&self) -> Result<Vec<Cidr>, DatapathError> {
        self.trie_entries(INBOUND)
    }

    /// Makes the inbound trie hold exactly `want`; returns (added, removed).
    pub fn sync_inbound(&self, want: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>), DatapathError> {
        self.sync_trie(INBOUND, want)
    }

    /// The `--no-masquerade` CIDRs in the trie.
    pub fn nomasq_entries(&self) -> Result<Vec<Cidr>, DatapathError> {
        self.trie_entries(NOMASQ)
    }

    /// Makes the no-masquerade trie hold exactly `want`; returns (added, removed).
    pub fn sync_nomasq(&self, want: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>), DatapathError> {
        self.sync_trie(NOMASQ, want)
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
