//! Conntrack garbage collection. The datapath only refreshes `last_seen`; LRU eviction
//! reclaims memory under pressure but is not expiry. The collector pairs the two halves
//! of every flow, derives the flow's state and idle time from both, and deletes flows
//! idle past their state's timeout, and orphans whose other half is gone.

use std::time::Duration;

use netns_common::{
    CtEntry, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Timeouts, ct_state, dir,
};

use super::{Datapath, DatapathError};

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

/// The key of the other half of the flow `k` belongs to.
pub fn partner_key(k: &CtKey, v: &CtEntry) -> CtKey {
    let d = match k.dir {
        dir::UPLINK_EGRESS => dir::UPLINK_INGRESS,
        dir::UPLINK_INGRESS => dir::UPLINK_EGRESS,
        other => other,
    };
    CtKey {
        tuple: v.xlat.reversed(),
        proto: k.proto,
        dir: d,
        _pad: [0; 2],
    }
}

/// A flow's state from both halves' per-direction states.
pub fn flow_state(a: &CtEntry, b: Option<&CtEntry>) -> u8 {
    let states = [Some(a.state), b.map(|e| e.state)];
    if states.contains(&Some(ct_state::CLOSE)) {
        ct_state::CLOSE
    } else if states.contains(&Some(ct_state::FIN_WAIT)) {
        ct_state::FIN_WAIT
    } else if b
        .is_some_and(|b| b.state == ct_state::ESTABLISHED && a.state == ct_state::ESTABLISHED)
    {
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    }
}

/// How long a flow may stay idle in its state.
pub fn timeout(t: &Timeouts, proto: u8, state: u8, replied: bool) -> Duration {
    let secs = match proto {
        IPPROTO_TCP => match state {
            ct_state::ESTABLISHED => t.tcp_established,
            ct_state::FIN_WAIT => t.tcp_fin,
            ct_state::CLOSE => t.tcp_close,
            _ => t.tcp_syn,
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
    let map: std::collections::HashMap<CtKey, CtEntry> = entries.iter().copied().collect();
    let mut doomed = std::collections::HashSet::new();
    let mut report = GcReport {
        entries: entries.len(),
        ..Default::default()
    };
    for (k, v) in &entries {
        if doomed.contains(k) {
            continue;
        }
        let pk = partner_key(k, v);
        let partner = map.get(&pk);
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
                if idle > timeout(&t, k.proto, flow_state(v, Some(p)), replied) {
                    doomed.insert(*k);
                    doomed.insert(pk);
                    report.expired += 1;
                }
            }
        }
    }
    dp.delete_conntrack(&doomed)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_by_protocol() {
        let t = Timeouts::default();
        let secs = |proto, state, replied| timeout(&t, proto, state, replied).as_secs();
        assert_eq!(secs(IPPROTO_TCP, ct_state::ESTABLISHED, true), 432_000);
        assert_eq!(secs(IPPROTO_TCP, ct_state::NEW, false), 120);
        assert_eq!(secs(IPPROTO_UDP, ct_state::NEW, false), 30);
        assert_eq!(secs(IPPROTO_UDP, ct_state::NEW, true), 120);
        assert_eq!(secs(IPPROTO_ICMP, ct_state::NEW, true), 30);
        // GRE, ESP: nf_conntrack_generic_timeout.
        assert_eq!(secs(47, ct_state::NEW, true), 600);
        assert_eq!(secs(50, ct_state::ESTABLISHED, false), 600);
    }
}
