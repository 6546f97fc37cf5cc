//! A set of the 65,536 port numbers, in the format of `ip_local_reserved_ports`:
//! comma-separated ports and inclusive ranges (`22,8000-8010`).

use std::fmt;
use std::str::FromStr;

const WORDS: usize = 65_536 / 64;

/// One bit per port; set arithmetic is a pass over 1,024 words whatever the contents.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; WORDS]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a port (0-65535) or a range of ports MIN-MAX")]
pub struct PortSetError(pub String);

impl Default for PortSet {
    fn default() -> Self {
        PortSet {
            bits: Box::new([0; WORDS]),
        }
    }
}

impl PortSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub fn insert_range(&mut self, min: u16, max: u16) {
        for p in min..=max {
            self.insert(p);
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn zip(&self, o: &PortSet, f: impl Fn(u64, u64) -> u64) -> PortSet {
        let mut out = PortSet::new();
        for (i, w) in out.bits.iter_mut().enumerate() {
            *w = f(self.bits[i], o.bits[i]);
        }
        out
    }

    pub fn union(&self, o: &PortSet) -> PortSet {
        self.zip(o, |a, b| a | b)
    }

    pub fn intersection(&self, o: &PortSet) -> PortSet {
        self.zip(o, |a, b| a & b)
    }

    /// The ports of `self` not in `o`.
    pub fn difference(&self, o: &PortSet) -> PortSet {
        self.zip(o, |a, b| a & !b)
    }

    /// Maximal runs of consecutive ports, ascending.
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let mut start: Option<u16> = None;
        for p in 0..=u16::MAX {
            match (self.contains(p), start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    out.push((s, p - 1));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, u16::MAX));
        }
        out
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

/// Compact ranges: `22,8000-8010` (empty for the empty set), as the kernel prints them.
impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b)) in self.ranges().into_iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for PortSet {
    type Err = PortSetError;
    fn from_str(s: &str) -> Result<Self, PortSetError> {
        let mut set = PortSet::new();
        for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || PortSetError(part.to_owned());
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a > b {
                return Err(bad());
            }
            set.insert_range(a, b);
        }
        Ok(set)
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(it: I) -> Self {
        let mut set = PortSet::new();
        for p in it {
            set.insert(p);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> PortSet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_compact_ranges() {
        assert_eq!(set("").to_string(), "");
        assert_eq!(set("\n").to_string(), "");
        assert_eq!(
            set("22, 8000-8002,8003,9000-9000\n").to_string(),
            "22,8000-8003,9000"
        );
        assert_eq!(set("0,65535").to_string(), "0,65535");
        assert_eq!(set("0-65535").len(), 65_536);
        assert_eq!(set("0-65535").to_string(), "0-65535");
        assert_eq!(set("5,3,4,1").ranges(), [(1, 1), (3, 5)]);
        for bad in ["x", "1-", "-1", "65536", "9-8", "1-2-3"] {
            assert_eq!(
                bad.parse::<PortSet>(),
                Err(PortSetError(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn set_arithmetic() {
        let a = set("1-10,100");
        let b = set("5-20");
        assert_eq!(a.union(&b).to_string(), "1-20,100");
        assert_eq!(a.intersection(&b).to_string(), "5-10");
        assert_eq!(a.difference(&b).to_string(), "1-4,100");
        assert_eq!(b.difference(&a).to_string(), "11-20");
        assert!(a.difference(&a).is_empty());
        assert!(!a.is_empty() && a.contains(100) && !a.contains(11));
        let c: PortSet = [65535u16, 0, 64, 63].into_iter().collect();
        assert_eq!(c.to_string(), "0,63-64,65535");
    }
}
