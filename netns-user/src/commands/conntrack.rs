//! `netns conntrack ls [--json] | flush`: the datapath's flows, one line per flow (both
//! halves joined), like `conntrack -L`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::Ipv4Addr;

use netns_common::IPPROTO_TCP;
use serde::Serialize;

use super::CommandError;
use crate::cli::{ConntrackCommand, GlobalArgs};
use crate::datapath::{ConntrackEntry, ConntrackKey, CtState, Datapath, Dir, FlowKind, Tuple, gc};

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
            src: *t.src.ip(),
            sport: t.src.port(),
            dst: *t.dst.ip(),
            dport: t.dst.port(),
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
    netns_common::proto_name(p).map_or_else(|| p.to_string(), str::to_owned)
}

fn state_name(proto: u8, s: CtState) -> &'static str {
    if proto != IPPROTO_TCP {
        return if s == CtState::New { "new" } else { "active" };
    }
    match s {
        CtState::Established => "established",
        CtState::FinWait => "fin_wait",
        CtState::Close => "close",
        CtState::New => "syn_sent",
    }
}

/// Is this half the one the flow's first packet created?
fn is_original(e: &ConntrackEntry, gateway: Ipv4Addr) -> bool {
    match e.kind {
        FlowKind::Snat => e.key.dir == Dir::UplinkEgress,
        FlowKind::Dnat => e.key.dir == Dir::UplinkIngress,
        // Hairpin: the original half rewrites the source to the gateway.
        FlowKind::Hairpin => *e.xlat.src.ip() == gateway && *e.key.tuple.src.ip() != gateway,
    }
}

pub fn flows(dp: &Datapath) -> Result<Vec<Flow>, CommandError> {
    let cfg = dp.config()?;
    let entries = dp.conntrack_entries()?;
    let map: HashMap<ConntrackKey, &ConntrackEntry> = entries.iter().map(|e| (e.key, e)).collect();
    let now = gc::monotonic_ns();
    let mut out = Vec::new();
    for v in &entries {
        let k = &v.key;
        let partner = map.get(&v.partner_key()).copied();
        if !is_original(v, cfg.gateway) && partner.is_some() {
            continue;
        }
        let last = partner.map_or(v.last_seen_ns, |p| p.last_seen_ns.max(v.last_seen_ns));
        out.push(Flow {
            proto: proto_name(k.proto),
            kind: match v.kind {
                FlowKind::Snat => "snat",
                FlowKind::Dnat => "dnat",
                FlowKind::Hairpin => "hairpin",
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
        ConntrackCommand::Ls => {
            let flows = flows(&dp)?;
            if g.json {
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
            let n = dp.purge_conntrack(|_| true)?;
            if g.json {
                return super::print_json(out, &serde_json::json!({ "deleted": n }));
            }
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
        assert_eq!(proto_name(netns_common::IPPROTO_ICMP), "icmp");
        assert_eq!(proto_name(47), "gre");
        assert_eq!(proto_name(50), "esp");
        assert_eq!(proto_name(51), "ah");
        assert_eq!(proto_name(132), "sctp");
        assert_eq!(proto_name(103), "103");
    }
}
