//! Conntrack garbage collection. The datapath only refreshes `last_seen`; LRU eviction
//! reclaims memory under pressure but is not expiry. The collector pairs the two halves
//! of every flow, derives the flow's state and idle time from both, and deletes flows
//! idle past their state's timeout, and orphans whose other half is gone.

use std::time::Duration;

use std::collections::{HashMap, HashSet};

use netns_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Timeouts};

use super::{ConntrackEntry, ConntrackKey, CtState, Datapath, DatapathError};

/// An orphan younger than this may be a pair being created right now (the datapath
/// inserts the reverse half first): leave it.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct GcReport {
    pub entries: usize,
    pub expired: usize,
    pub orphans: usize,
}

/// CLOCK_MONOTONIC in nanoseconds: what `bpf_ktime_get_ns` returns.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// A flow's state from both halves' per-direction states.
pub fn flow_state(a: &ConntrackEntry, b: Option<&ConntrackEntry>) -> CtState {
    let states = [Some(a.state), b.map(|e| e.state)];
    if states.contains(&Some(CtState::Close)) {
        CtState::Close
    } else if states.contains(&Some(CtState::FinWait)) {
        CtState::FinWait
    } else if b.is_some_and(|b| b.state == CtState::Established && a.state == CtState::Established)
    {
        CtState::Established
    } else {
        CtState::New
    }
}

/// How long a flow may stay idle in its state.
pub fn timeout(t: &Timeouts, proto: u8, state: CtState, replied: bool) -> Duration {
    let secs = match proto {
        IPPROTO_TCP => match state {
            CtState::Established => t.tcp_established,
            CtState::FinWait => t.tcp_fin,
            CtState::Close => t.tcp_close,
            CtState::New => t.tcp_syn,
        },
        IPPROTO_UDP if replied => t.udp_stream,
        IPPROTO_UDP => t.udp,
        IPPROTO_ICMP => t.icmp,
        // Masqueraded by address only (GRE, ESP, SCTP...).
        _ => t.generic,
    };
    Duration::from_secs(u64::from(secs))
}

/// One sweep at time `now_ns` (monotonic).
pub fn sweep(dp: &Datapath, now_ns: u64) -> Result<GcReport, DatapathError> {
    let t = dp.config()?.timeouts;
    let entries = dp.conntrack_entries()?;
    let report = expire(&entries, &t, now_ns, |doomed| dp.delete_conntrack(doomed))?;
    Ok(report)
}

/// The sweep's decision, separate from the map: what expired at `now_ns`, deleted
/// through `delete`.
fn expire(
    entries: &[ConntrackEntry],
    t: &Timeouts,
    now_ns: u64,
    delete: impl FnOnce(&HashSet<ConntrackKey>) -> Result<usize, DatapathError>,
) -> Result<GcReport, DatapathError> {
    let map: HashMap<ConntrackKey, &ConntrackEntry> = entries.iter().map(|e| (e.key, e)).collect();
    let mut doomed = HashSet::new();
    let mut report = GcReport {
        entries: entries.len(),
        ..Default::default()
    };
    for v in entries {
        let k = &v.key;
        if doomed.contains(k) {
            continue;
        }
        let pk = v.partner_key();
        let partner = map.get(&pk).copied();
        let last = partner.map_or(v.last_seen_ns, |p| p.last_seen_ns.max(v.last_seen_ns));
        let idle = Duration::from_nanos(now_ns.saturating_sub(last));
        match partner {
            None => {
                if Duration::from_nanos(now_ns.saturating_sub(v.created_ns)) > ORPHAN_GRACE {
                    doomed.insert(*k);
                    report.orphans += 1;
                }
            }
            Some(p) => {
                let replied = v.packets > 0 && p.packets > 0;
                if idle > timeout(t, k.proto, flow_state(v, Some(p)), replied) {
                    doomed.insert(*k);
                    doomed.insert(pk);
                    report.expired += 1;
                }
            }
        }
    }
    delete(&doomed)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Dir, FlowKind, Tuple};

    #[test]
    fn timeouts_by_protocol() {
        let t = Timeouts::default();
        let secs = |proto, state, replied| timeout(&t, proto, state, replied).as_secs();
        assert_eq!(secs(IPPROTO_TCP, CtState::Established, true), 432_000);
        assert_eq!(secs(IPPROTO_TCP, CtState::New, false), 120);
        assert_eq!(secs(IPPROTO_UDP, CtState::New, false), 30);
        assert_eq!(secs(IPPROTO_UDP, CtState::New, true), 120);
        assert_eq!(secs(IPPROTO_ICMP, CtState::New, true), 30);
        // GRE, ESP: nf_conntrack_generic_timeout.
        assert_eq!(secs(47, CtState::New, true), 600);
        assert_eq!(secs(50, CtState::Established, false), 600);
    }

    fn half(src: &str, dst: &str, xsrc: &str, dir: Dir, last_seen_s: u64) -> ConntrackEntry {
        let t = |s: &str, d: &str| Tuple {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
        };
        ConntrackEntry {
            key: ConntrackKey {
                tuple: t(src, dst),
                proto: IPPROTO_UDP,
                dir,
            },
            xlat: t(xsrc, dst),
            state: CtState::New,
            kind: FlowKind::Snat,
            created_ns: 0,
            last_seen_ns: last_seen_s * 1_000_000_000,
            packets: 1,
            bytes: 10,
        }
    }

    #[test]
    fn expiry_pairs_halves_and_purges_orphans() {
        let t = Timeouts::default();
        // A UDP flow and its reply half (replied: udp_stream, 120 s), seen at 100 s.
        let fwd = half(
            "172.19.0.2:4000",
            "198.51.100.1:53",
            "198.51.100.3:4000",
            Dir::UplinkEgress,
            100,
        );
        let rev = half(
            "198.51.100.1:53",
            "198.51.100.3:4000",
            "198.51.100.1:53",
            Dir::UplinkIngress,
            90,
        );
        let rev = ConntrackEntry {
            xlat: Tuple {
                src: "198.51.100.1:53".parse().unwrap(),
                dst: "172.19.0.2:4000".parse().unwrap(),
            },
            ..rev
        };
        assert_eq!(fwd.partner_key(), rev.key);
        // An orphan (its other half evicted).
        let orphan = half(
            "172.19.0.9:5000",
            "198.51.100.1:53",
            "198.51.100.3:5000",
            Dir::UplinkEgress,
            100,
        );
        let entries = [fwd, rev, orphan];
        let run = |now_s: u64| {
            let mut got = HashSet::new();
            let r = expire(&entries, &t, now_s * 1_000_000_000, |d| {
                got.clone_from(d);
                Ok(d.len())
            })
            .unwrap();
            (r.expired, r.orphans, got)
        };
        let (expired, orphans, got) = run(200);
        assert_eq!((expired, orphans), (0, 1));
        assert_eq!(got, HashSet::from([orphan.key]));
        let (expired, _, got) = run(221);
        assert_eq!(expired, 1);
        assert!(got.contains(&fwd.key) && got.contains(&rev.key));
    }
}
