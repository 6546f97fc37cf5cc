//! `netns conntrack ls [--json] | flush`: the datapath's flows, one line per flow (both
//! halves joined), like `conntrack -L`, from both tables (`NETNS_CT`, assured, and
//! `NETNS_CTNEW`, unreplied) and the IPv6 one (`NETNS_CT6`). Flows the datapath treats
//! as absent (expired, or of a container that is gone: stale) are hidden unless `all`.

use std::io::Write as _;
use std::net::IpAddr;

use netns_common::IPPROTO_TCP;
use serde::Serialize;

use super::CommandError;
use crate::cli::{ConntrackCommand, GlobalArgs};
use crate::datapath::gc::{self, Pair, Snapshot, Verdict};
use crate::datapath::{CtState, Datapath, Flow6, FlowKind, Tuple, flows6};

#[derive(Debug, Serialize)]
pub struct Endpoints {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl From<Tuple> for Endpoints {
    fn from(t: Tuple) -> Self {
        Endpoints {
            src: (*t.src.ip()).into(),
            sport: t.src.port(),
            dst: (*t.dst.ip()).into(),
            dport: t.dst.port(),
        }
    }
}

impl From<crate::datapath::conntrack6::Tuple6Addrs> for Endpoints {
    fn from(t: crate::datapath::conntrack6::Tuple6Addrs) -> Self {
        Endpoints {
            src: (*t.src.ip()).into(),
            sport: t.src.port(),
            dst: (*t.dst.ip()).into(),
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
    /// The container the flow belongs to.
    pub owner: IpAddr,
    /// In the main table: TCP handshake done, or a reply seen (else unreplied).
    pub assured: bool,
    /// A packet of the reply direction was seen.
    pub replied: bool,
    /// UDP: a stream (replied, active after 2 s: the `udp_stream` timeout).
    pub stream: bool,
    /// "live", or (listed with `--all` only) "expired" or "stale" (its container is
    /// gone or its address is another's): what the datapath treats as absent.
    pub status: &'static str,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// One half is missing (evicted) and cannot be rebuilt; the collector purges it.
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

fn status_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Expired => "expired",
        Verdict::Stale => "stale",
        Verdict::Live | Verdict::Orphan => "live",
    }
}

/// A flow as `ls` shows it, from the side of the packet that opened it (a lone reverse
/// half shows the flow it belongs to).
fn flow(p: &Pair, now: u64) -> Flow {
    let any = p.any();
    let proto = p.fwd_key.proto;
    let flags = p.flags();
    Flow {
        proto: proto_name(proto),
        kind: kind_name(any.kind),
        original: p.fwd_key.tuple.into(),
        // The opening half rewrites to what its partner's key reverses.
        translated: p.rev_key.tuple.reversed().into(),
        state: state_name(proto, gc::flow_state(any, p.fwd.and(p.rev).as_ref())),
        owner: any.owner.into(),
        assured: p.assured(),
        replied: flags.replied,
        stream: flags.stream,
        status: status_name(p.verdict),
        age_secs: now.saturating_sub(any.created_ns) / 1_000_000_000,
        idle_secs: now.saturating_sub(p.last_seen_ns()) / 1_000_000_000,
        packets: p.fwd.map_or(0, |e| e.packets),
        bytes: p.fwd.map_or(0, |e| e.bytes),
        reply_packets: p.rev.map_or(0, |e| e.packets),
        reply_bytes: p.rev.map_or(0, |e| e.bytes),
        orphan: p.orphan(),
    }
}

fn kind_name(k: FlowKind) -> &'static str {
    match k {
        FlowKind::Snat => "snat",
        FlowKind::Dnat => "dnat",
        FlowKind::Hairpin => "hairpin",
    }
}

/// An IPv6 flow as `ls` shows it. Expiry is the programs' own (an expired pair is
/// removed when next met), judged here with the same timeouts.
fn flow6(f: &Flow6, t: &netns_common::Timeouts, now: u64) -> Flow {
    // ICMPv6 echo times out as ICMP does.
    let proto = if f.proto == netns_common::IPPROTO_ICMPV6 {
        netns_common::IPPROTO_ICMP
    } else {
        f.proto
    };
    let expired = gc::timeout(t, proto, f.state, f.stream)
        .is_some_and(|d| now.saturating_sub(f.last_seen_ns) > d.as_nanos() as u64);
    Flow {
        proto: proto_name(f.proto),
        kind: kind_name(f.kind),
        original: f.original.into(),
        translated: f.translated.into(),
        state: state_name(f.proto, f.state),
        owner: f.owner.into(),
        assured: f.replied,
        replied: f.replied,
        stream: f.stream,
        status: if expired { "expired" } else { "live" },
        age_secs: now.saturating_sub(f.created_ns) / 1_000_000_000,
        idle_secs: now.saturating_sub(f.last_seen_ns) / 1_000_000_000,
        packets: f.packets,
        bytes: f.bytes,
        reply_packets: f.reply_packets,
        reply_bytes: f.reply_bytes,
        orphan: f.orphan,
    }
}

/// The flows of all tables; with `all` also those the datapath treats as absent.
pub fn flows(dp: &Datapath, all: bool) -> Result<Vec<Flow>, CommandError> {
    let t = dp.config()?.timeouts;
    let snap = Snapshot::read(dp)?;
    let now = gc::monotonic_ns();
    let mut out: Vec<Flow> = gc::pairs(&snap, &t, now)
        .iter()
        .filter(|p| all || !p.verdict.absent())
        .map(|p| flow(p, now))
        .collect();
    out.extend(
        flows6(&dp.conntrack6_entries()?)
            .iter()
            .map(|f| flow6(f, &t, now))
            .filter(|f| all || f.status == "live"),
    );
    out.sort_by(|a, b| {
        (&a.proto, a.original.src, a.original.sport).cmp(&(
            &b.proto,
            b.original.src,
            b.original.sport,
        ))
    });
    Ok(out)
}

/// One flow per line; packets and bytes only when the datapath counts them.
fn write_flow(out: &mut impl std::io::Write, f: &Flow, counters: bool) -> std::io::Result<()> {
    let o = &f.original;
    let t = &f.translated;
    let mut marks: Vec<&str> = Vec::new();
    if f.assured {
        marks.push("assured");
    }
    if f.replied {
        marks.push("replied");
    }
    if f.stream {
        marks.push("stream");
    }
    if f.orphan {
        marks.push("orphan");
    }
    if f.status != "live" {
        marks.push(f.status);
    }
    // IPv6 in brackets, as in a socket address.
    let hp = |ip: IpAddr, port: u16| match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    writeln!(
        out,
        "{:<4} {:<7} {:<11} src={} dst={} -> src={} dst={} owner={} age={}s idle={}s{}{}",
        f.proto,
        f.kind,
        f.state,
        hp(o.src, o.sport),
        hp(o.dst, o.dport),
        hp(t.src, t.sport),
        hp(t.dst, t.dport),
        f.owner,
        f.age_secs,
        f.idle_secs,
        if counters {
            format!(
                " packets={}/{} bytes={}/{}",
                f.packets, f.reply_packets, f.bytes, f.reply_bytes
            )
        } else {
            String::new()
        },
        if marks.is_empty() {
            String::new()
        } else {
            format!(" [{}]", marks.join(","))
        }
    )
}

pub fn run(g: &GlobalArgs, cmd: &ConntrackCommand) -> Result<(), CommandError> {
    let dp = Datapath::open_required(&g.bpffs_dir)?;
    let out = &mut std::io::stdout().lock();
    match cmd {
        ConntrackCommand::Ls { all } => {
            let flows = flows(&dp, *all)?;
            if g.json {
                serde_json::to_writer_pretty(&mut *out, &flows)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                let counters = dp.config()?.ct_counters;
                for f in &flows {
                    write_flow(out, f, counters).map_err(CommandError::Output)?;
                }
                let note = if counters {
                    ""
                } else {
                    " (no packet/byte counts: --ct-counters is off)"
                };
                writeln!(out, "{} flow(s){note}", flows.len()).map_err(CommandError::Output)?;
            }
        }
        ConntrackCommand::Flush => {
            let n = dp.flush_conntrack()? + dp.flush_conntrack6()?;
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
    use crate::datapath::{ConntrackEntry, ConntrackKey, CtFlags, CtTable, Dir};
    use std::net::Ipv4Addr;

    fn t(s: &str, d: &str) -> Tuple {
        Tuple {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
        }
    }

    #[test]
    fn a_flow_is_shown_from_its_opening_side_with_owner_and_flags() {
        let owner = Ipv4Addr::new(172, 19, 0, 2);
        // A port forward's reply half alone (its opening half evicted, no copy).
        let rev = ConntrackEntry {
            key: ConntrackKey {
                tuple: t("172.19.0.2:80", "198.51.100.1:40000"),
                proto: IPPROTO_TCP,
                dir: Dir::UplinkEgress,
            },
            table: CtTable::Main,
            xlat: t("198.51.100.2:8080", "198.51.100.1:40000"),
            state: CtState::Established,
            kind: FlowKind::Dnat,
            flags: CtFlags {
                replied: true,
                ..CtFlags::default()
            },
            owner,
            generation: 3,
            created_ns: 0,
            last_seen_ns: 9_000_000_000,
            packets: 4,
            bytes: 400,
        };
        let snap = Snapshot::new(
            vec![rev],
            vec![],
            std::collections::HashMap::from([(owner, 3)]),
        );
        let t0 = netns_common::Timeouts::default();
        let pairs = gc::pairs(&snap, &t0, 10_000_000_000);
        let f = flow(&pairs[0], 10_000_000_000);
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            (&v["original"], &v["translated"]),
            (
                &serde_json::json!({"src": "198.51.100.1", "sport": 40000, "dst": "198.51.100.2", "dport": 8080}),
                &serde_json::json!({"src": "198.51.100.1", "sport": 40000, "dst": "172.19.0.2", "dport": 80}),
            )
        );
        assert_eq!(v["owner"], "172.19.0.2");
        assert_eq!(
            (&v["assured"], &v["replied"], &v["orphan"], &v["status"]),
            (&true.into(), &true.into(), &true.into(), &"live".into())
        );
        assert_eq!((f.packets, f.reply_packets, f.idle_secs), (0, 4, 1));
        let mut line = Vec::new();
        write_flow(&mut line, &f, true).unwrap();
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.contains("owner=172.19.0.2 ") && line.ends_with("[assured,replied,orphan]\n"),
            "{line}"
        );
        // Its container gone: stale, hidden unless --all.
        let gone = Snapshot::new(vec![rev], vec![], Default::default());
        let p = &gc::pairs(&gone, &t0, 10_000_000_000)[0];
        assert!(p.verdict.absent());
        assert_eq!(flow(p, 10_000_000_000).status, "stale");
    }

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
