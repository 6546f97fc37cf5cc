//! `netns conntrack ls [--json] | flush`: the datapath's flows, one line per flow (both
//! halves joined), like `conntrack -L`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::Ipv4Addr;

use netns_common::{
    CtEntry, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Tuple, ct_kind, ct_state, dir,
};
use serde::Serialize;

use super::CommandError;
use crate::cli::{ConntrackCommand, GlobalArgs};
use crate::datapath::{Datapath, gc};

#[derive(Debug, Serialize)]
pub struct Endpoints {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

impl From<Tuple> for Endpoints {
    fn from(t: Tuple) -> Self {
        Endpoints {
            src: Ipv4Addr::from(u32::from_be(t.saddr)),
            sport: u16::from_be(t.sport),
            dst: Ipv4Addr::from(u32::from_be(t.daddr)),
            dport: u16::from_be(t.dport),
        }
    }
}

/// One flow: what its first packet looked like, and what it became.
#[derive(Debug, Serialize)]
pub struct Flow {
    pub proto: String,
    pub kind: &'static str,
    pub original: Endpoints,
    pub translated: Endpoints,
    pub state: &'static str,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// The other half is missing (evicted); the collector purges it.
    pub orphan: bool,
}

/// The protocol as `conntrack -L` names it; address-only flows of protocols without a
/// name here show their number.
fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        47 => "gre",
        50 => "esp",
        51 => "ah",
        132 => "sctp",
        n => return n.to_string(),
    }
    .to_owned()
}

fn state_name(proto: u8, s: u8) -> &'static str {
    if proto != IPPROTO_TCP {
        return if s == ct_state::NEW { "new" } else { "active" };
    }
    match s {
        ct_state::ESTABLISHED => "established",
        ct_state::FIN_WAIT => "fin_wait",
        ct_state::CLOSE => "close",
        _ => "syn_sent",
    }
}

/// Is this half the one the flow's first packet created?
fn is_original(k: &CtKey, v: &CtEntry, gateway: u32) -> bool {
    match v.kind {
        ct_kind::SNAT => k.dir == dir::UPLINK_EGRESS,
        ct_kind::DNAT => k.dir == dir::UPLINK_INGRESS,
        // Hairpin: the original half rewrites the source to the gateway.
        _ => v.xlat.saddr == gateway && k.tuple.saddr != gateway,
    }
}

pub fn flows(dp: &Datapath) -> Result<Vec<Flow>, CommandError> {
    let cfg = dp.config()?;
    let entries = dp.conntrack_entries()?;
    let map: HashMap<CtKey, CtEntry> = entries.iter().copied().collect();
    let now = gc::monotonic_ns();
    let mut out = Vec::new();
    for (k, v) in &entries {
        let partner = map.get(&gc::partner_key(k, v));
        if !is_original(k, v, cfg.gateway) && partner.is_some() {
            continue;
        }
        let last = partner.map_or(v.last_seen_ns, |p| p.last_seen_ns.max(v.last_seen_ns));
        out.push(Flow {
            proto: proto_name(k.proto),
            kind: match v.kind {
                ct_kind::SNAT => "snat",
                ct_kind::DNAT => "dnat",
                _ => "hairpin",
            },
            original: k.tuple.into(),
            translated: v.xlat.into(),
            state: state_name(k.proto, gc::flow_state(v, partner)),
            age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
            idle_secs: now.saturating_sub(last) / 1_000_000_000,
            packets: v.packets,
            bytes: v.bytes,
            reply_packets: partner.map_or(0, |p| p.packets),
            reply_bytes: partner.map_or(0, |p| p.bytes),
            orphan: partner.is_none(),
        });
    }
    out.sort_by(|a, b| {
        (&a.proto, a.original.src, a.original.sport).cmp(&(
            &b.proto,
            b.original.src,
            b.original.sport,
        ))
    });
    Ok(out)
}

pub fn run(g: &GlobalArgs, cmd: &ConntrackCommand) -> Result<(), CommandError> {
    let dp = Datapath::open_required(&g.bpffs_dir)?;
    let out = &mut std::io::stdout().lock();
    match cmd {
        ConntrackCommand::Ls { json } => {
            let flows = flows(&dp)?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &flows)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                for f in &flows {
                    let o = &f.original;
                    let t = &f.translated;
                    writeln!(
                        out,
                        "{:<4} {:<7} {:<11} src={}:{} dst={}:{} -> src={}:{} dst={}:{} age={}s idle={}s packets={}/{} bytes={}/{}{}",
                        f.proto, f.kind, f.state, o.src, o.sport, o.dst, o.dport, t.src, t.sport, t.dst, t.dport,
                        f.age_secs, f.idle_secs, f.packets, f.reply_packets, f.bytes, f.reply_bytes,
                        if f.orphan { " [orphan]" } else { "" }
                    )
                    .map_err(CommandError::Output)?;
                }
                writeln!(out, "{} flow(s)", flows.len()).map_err(CommandError::Output)?;
            }
        }
        ConntrackCommand::Flush => {
            let n = dp.purge_conntrack(|_, _| true)?;
            writeln!(out, "deleted {n} conntrack entries").map_err(CommandError::Output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names() {
        assert_eq!(proto_name(IPPROTO_TCP), "tcp");
        assert_eq!(proto_name(IPPROTO_ICMP), "icmp");
        assert_eq!(proto_name(47), "gre");
        assert_eq!(proto_name(50), "esp");
        assert_eq!(proto_name(51), "ah");
        assert_eq!(proto_name(132), "sctp");
        assert_eq!(proto_name(103), "103");
    }
}
