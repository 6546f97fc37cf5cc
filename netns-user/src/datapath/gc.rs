//! What the datapath treats as absent, and the sweep (`netns gc`) that deletes it.
//!
//! The datapath expires and retires entries itself, on lookup: a flow idle past its
//! timeout (both halves idle: idle = now - the later `last_seen` of the two), or whose
//! owner is gone or another container now (stale: no endpoint for `owner`, or another
//! generation), is treated as absent and deleted where a packet meets it. No process
//! has to run for that. The sweep deletes what no packet meets any more, so that
//! `netns conntrack ls` and the table sizes stay tidy: expired and stale flows, orphan
//! halves (the other half gone for good), copies in `NETNS_CTKEEP` whose halves are
//! both gone; and it recounts each container's `NETNS_CTCOUNT`.
//!
//! The decision ([`judge`]) reads the tables through a [`Source`]: the [`Snapshot`] of
//! one walk for `conntrack ls` and for the sweep's plan, the maps themselves for the
//! sweep's re-check of each flow just before it is deleted (a packet may have
//! refreshed it since the walk; then it stays).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use netns_common::{CtCount, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat, Timeouts};
use serde::Serialize;

use super::conntrack::OpenTables;
use super::{
    ConntrackEntry, ConntrackKeep, ConntrackKey, CtFlags, CtState, CtTable, Datapath, DatapathError,
};

/// A half without its partner younger than this may be a pair being created right now
/// (the datapath inserts the reverse half first): it is no orphan yet.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Halves read (both tables).
    pub entries: usize,
    /// Flows deleted because they were idle past their timeout.
    pub expired: usize,
    /// Flows deleted because their container is gone (or its address is another's).
    pub stale: usize,
    /// Halves deleted whose partner is gone and cannot be rebuilt.
    pub orphans: usize,
    /// Flows the walk found dead that a packet had revived by the re-check: kept.
    pub refreshed: usize,
    /// Entries deleted from `NETNS_CT` and `NETNS_CTNEW`.
    pub deleted: usize,
    /// Copies deleted from `NETNS_CTKEEP` (of the flows deleted, and dangling ones).
    pub copies: usize,
    /// `NETNS_CTCOUNT` entries rewritten (or removed: the container is gone).
    pub recounted: usize,
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the datapath's clock
/// (`bpf_ktime_get_coarse_ns`), which stamps the entries.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// A flow's state from both halves' states (the datapath keeps them equal; when they
/// differ for a moment, the further one).
pub fn flow_state(a: &ConntrackEntry, b: Option<&ConntrackEntry>) -> CtState {
    let states = [Some(a.state), b.map(|e| e.state)];
    if states.contains(&Some(CtState::Close)) {
        CtState::Close
    } else if states.contains(&Some(CtState::FinWait)) {
        CtState::FinWait
    } else if states.contains(&Some(CtState::Established)) {
        CtState::Established
    } else {
        CtState::New
    }
}

/// How long a flow may stay idle, by protocol, state and whether it is a UDP stream
/// (the `STREAM` flag: replied, and active more than 2 s after creation), as the
/// datapath judges it. None: never (a timeout set to 0).
pub fn timeout(t: &Timeouts, proto: u8, state: CtState, stream: bool) -> Option<Duration> {
    let secs = match proto {
        IPPROTO_TCP => match state {
            CtState::Established => t.tcp_established,
            CtState::FinWait => t.tcp_fin,
            CtState::Close => t.tcp_close,
            CtState::New => t.tcp_syn,
        },
        IPPROTO_UDP if stream => t.udp_stream,
        IPPROTO_UDP => t.udp,
        IPPROTO_ICMP => t.icmp,
        // Masqueraded by address only (GRE, ESP, SCTP...).
        _ => t.generic,
    };
    (secs != 0).then(|| Duration::from_secs(u64::from(secs)))
}

/// Where a judgement reads the tables from.
pub trait Source {
    /// The half at `k`, as the datapath finds it (the main table first).
    fn entry(&self, k: &ConntrackKey) -> Result<Option<ConntrackEntry>, DatapathError>;
    /// The copy of the half at `k`.
    fn keep(&self, k: &ConntrackKey) -> Result<Option<ConntrackKeep>, DatapathError>;
    /// The endpoint generation of the container at `owner` (None: no endpoint).
    fn generation(&self, owner: Ipv4Addr) -> Result<Option<u32>, DatapathError>;
}

/// A source the sweep can also delete from.
pub trait Tables: Source {
    /// Deletes halves (from the table each is in) and copies; returns how many of each
    /// were there.
    fn remove(
        &mut self,
        halves: &[(CtTable, ConntrackKey)],
        copies: &[ConntrackKey],
    ) -> Result<(usize, usize), DatapathError>;
}

impl Source for OpenTables {
    fn entry(&self, k: &ConntrackKey) -> Result<Option<ConntrackEntry>, DatapathError> {
        OpenTables::entry(self, k)
    }
    fn keep(&self, k: &ConntrackKey) -> Result<Option<ConntrackKeep>, DatapathError> {
        OpenTables::keep(self, k)
    }
    fn generation(&self, owner: Ipv4Addr) -> Result<Option<u32>, DatapathError> {
        OpenTables::generation(self, owner)
    }
}

impl Tables for OpenTables {
    fn remove(
        &mut self,
        halves: &[(CtTable, ConntrackKey)],
        copies: &[ConntrackKey],
    ) -> Result<(usize, usize), DatapathError> {
        OpenTables::remove(self, halves, copies)
    }
}

/// The conntrack maps as one walk found them, with the endpoint generations.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    entries: Vec<ConntrackEntry>,
    by_key: HashMap<ConntrackKey, usize>,
    keeps: HashMap<ConntrackKey, ConntrackKeep>,
    generations: HashMap<Ipv4Addr, u32>,
}

impl Snapshot {
    /// A key found in both tables is the main table's (as the datapath looks it up).
    pub fn new(
        entries: Vec<ConntrackEntry>,
        keeps: Vec<ConntrackKeep>,
        generations: HashMap<Ipv4Addr, u32>,
    ) -> Snapshot {
        let mut s = Snapshot {
            generations,
            keeps: keeps.into_iter().map(|c| (c.key, c)).collect(),
            ..Snapshot::default()
        };
        for e in entries {
            match s.by_key.get(&e.key) {
                Some(&i) if s.entries[i].table == CtTable::Main => {}
                Some(&i) => s.entries[i] = e,
                None => {
                    s.by_key.insert(e.key, s.entries.len());
                    s.entries.push(e);
                }
            }
        }
        s
    }

    /// Reads the maps: the copies first, then the tables (see
    /// [`Datapath::conntrack_entries`]), so that a pair promoted meanwhile, whose
    /// copies are written before its halves move, never looks as if its copies had
    /// no halves.
    pub fn read(dp: &Datapath) -> Result<Snapshot, DatapathError> {
        let keeps = dp.conntrack_keeps()?;
        let entries = dp.conntrack_entries()?;
        Ok(Snapshot::new(entries, keeps, dp.endpoint_generations()?))
    }

    pub fn entries(&self) -> &[ConntrackEntry] {
        &self.entries
    }
}

impl Source for Snapshot {
    fn entry(&self, k: &ConntrackKey) -> Result<Option<ConntrackEntry>, DatapathError> {
        Ok(self.by_key.get(k).map(|&i| self.entries[i]))
    }
    fn keep(&self, k: &ConntrackKey) -> Result<Option<ConntrackKeep>, DatapathError> {
        Ok(self.keeps.get(k).copied())
    }
    fn generation(&self, owner: Ipv4Addr) -> Result<Option<u32>, DatapathError> {
        Ok(self.generations.get(&owner).copied())
    }
}

impl Tables for Snapshot {
    fn remove(
        &mut self,
        halves: &[(CtTable, ConntrackKey)],
        copies: &[ConntrackKey],
    ) -> Result<(usize, usize), DatapathError> {
        let mut n = 0;
        for (t, k) in halves {
            if let Some(&i) = self.by_key.get(k)
                && self.entries[i].table == *t
            {
                self.by_key.remove(k);
                n += 1;
            }
        }
        let c = copies
            .iter()
            .filter(|k| self.keeps.remove(k).is_some())
            .count();
        Ok((n, c))
    }
}

/// What becomes of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The datapath uses it.
    Live,
    /// Idle past its timeout: the datapath treats it as absent.
    Expired,
    /// Its container is gone, or its address is another container's now: the datapath
    /// treats it as absent.
    Stale,
    /// A half whose partner is gone for good (no copy to rebuild it from), older than
    /// [`ORPHAN_GRACE`]: still used in its own direction, but its flow is broken; the
    /// sweep deletes it so that the next packet makes a whole pair again.
    Orphan,
}

impl Verdict {
    /// What `conntrack ls` hides unless `--all`: what the datapath treats as absent.
    pub fn absent(self) -> bool {
        matches!(self, Verdict::Expired | Verdict::Stale)
    }
}

/// A flow as the tables hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The key of the half of the packet that opened the flow, and of the other half.
    pub fwd_key: ConntrackKey,
    pub rev_key: ConntrackKey,
    /// The halves present (a half counts only if it pairs with the other key).
    pub fwd: Option<ConntrackEntry>,
    pub rev: Option<ConntrackEntry>,
    /// The missing half is rebuilt from its copy by the next packet that needs it.
    pub rebuildable: bool,
    /// Keys whose copy in `NETNS_CTKEEP` belongs to this flow.
    pub copies: Vec<ConntrackKey>,
    pub verdict: Verdict,
}

impl Pair {
    /// A half that is there (the opening one if both are).
    pub fn any(&self) -> &ConntrackEntry {
        self.fwd
            .as_ref()
            .or(self.rev.as_ref())
            .expect("a pair has a half")
    }

    fn halves(&self) -> impl Iterator<Item = &ConntrackEntry> {
        self.fwd.iter().chain(self.rev.iter())
    }

    /// The last packet in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.halves().map(|h| h.last_seen_ns).max().unwrap_or(0)
    }

    /// Both halves' flags.
    pub fn flags(&self) -> CtFlags {
        self.halves()
            .fold(CtFlags::default(), |f, h| f.union(h.flags))
    }

    /// One half is missing and nothing rebuilds it.
    pub fn orphan(&self) -> bool {
        (self.fwd.is_none() || self.rev.is_none()) && !self.rebuildable
    }

    /// An assured pair (in the main table).
    pub fn assured(&self) -> bool {
        self.halves().any(|h| h.table == CtTable::Main)
    }
}

/// The keys of the flow `e` is a half of: (the opening half's, the other's).
fn keys_of(
    src: &impl Source,
    e: &ConntrackEntry,
) -> Result<(ConntrackKey, ConntrackKey), DatapathError> {
    let pk = e.partner_key();
    let p = src.entry(&pk)?.filter(|p| p.partner_key() == e.key);
    let e_opens = match &p {
        Some(p) => e.flags.fwd || !p.flags.fwd,
        None => e.flags.fwd,
    };
    Ok(if e_opens { (e.key, pk) } else { (pk, e.key) })
}

/// Reads the flow whose halves are at `fwd_key` and `rev_key` from `src` and judges it
/// at `now_ns` as the datapath would; None if neither half is there.
pub fn judge(
    src: &impl Source,
    fwd_key: ConntrackKey,
    rev_key: ConntrackKey,
    t: &Timeouts,
    now_ns: u64,
) -> Result<Option<Pair>, DatapathError> {
    let fwd = src.entry(&fwd_key)?.filter(|e| e.partner_key() == rev_key);
    let rev = src.entry(&rev_key)?.filter(|e| e.partner_key() == fwd_key);
    if fwd.is_none() && rev.is_none() {
        return Ok(None);
    }
    let mut copies = Vec::new();
    let mut rebuildable = false;
    for (k, other_k, here, other) in [
        (fwd_key, rev_key, &fwd, &rev),
        (rev_key, fwd_key, &rev, &fwd),
    ] {
        let Some(c) = src.keep(&k)?.filter(|c| c.partner_key() == other_k) else {
            continue;
        };
        copies.push(k);
        // The datapath rebuilds a lost half from its copy while its partner is in the
        // main table with the same generation.
        if here.is_none()
            && other
                .as_ref()
                .is_some_and(|o| o.table == CtTable::Main && o.generation == c.generation)
        {
            rebuildable = true;
        }
    }
    let mut p = Pair {
        fwd_key,
        rev_key,
        fwd,
        rev,
        rebuildable,
        copies,
        verdict: Verdict::Live,
    };
    p.verdict = verdict(src, &p, t, now_ns)?;
    Ok(Some(p))
}

fn verdict(
    src: &impl Source,
    p: &Pair,
    t: &Timeouts,
    now_ns: u64,
) -> Result<Verdict, DatapathError> {
    let mut owners: Vec<(Ipv4Addr, u32)> = p.halves().map(|h| (h.owner, h.generation)).collect();
    owners.dedup();
    for (owner, generation) in owners {
        if src.generation(owner)? != Some(generation) {
            return Ok(Verdict::Stale);
        }
    }
    // Both halves carry the same state; should they differ for a moment, the longer
    // timeout: the sweep never deletes what the datapath may still take as live.
    let stream = p.flags().stream;
    let mut limit = Some(Duration::ZERO);
    for h in p.halves() {
        limit = match (limit, timeout(t, h.key.proto, h.state, stream)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let idle = Duration::from_nanos(now_ns.saturating_sub(p.last_seen_ns()));
    if limit.is_some_and(|l| idle > l) {
        return Ok(Verdict::Expired);
    }
    let age = Duration::from_nanos(now_ns.saturating_sub(p.any().created_ns));
    if p.orphan() && age > ORPHAN_GRACE {
        return Ok(Verdict::Orphan);
    }
    Ok(Verdict::Live)
}

/// Every flow of a snapshot, judged at `now_ns`.
pub fn pairs(snap: &Snapshot, t: &Timeouts, now_ns: u64) -> Vec<Pair> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for e in snap.entries() {
        if seen.contains(&e.key) {
            continue;
        }
        // A snapshot answers without failing.
        let Ok((f, r)) = keys_of(snap, e) else {
            continue;
        };
        let Ok(Some(p)) = judge(snap, f, r, t, now_ns) else {
            continue;
        };
        seen.extend(p.halves().map(|h| h.key));
        out.push(p);
    }
    out
}

/// What a sweep found in its walk.
#[derive(Debug, Default)]
struct Plan {
    /// Flows to delete, once re-checked.
    doomed: Vec<Pair>,
    /// Copies whose half and partner were both missing.
    dangling: Vec<ConntrackKeep>,
    /// Live flows per owner (by the generation they belong to).
    live: HashMap<Ipv4Addr, (u32, u32)>,
}

fn count(live: &mut HashMap<Ipv4Addr, (u32, u32)>, p: &Pair) {
    let h = p.any();
    let c = live.entry(h.owner).or_insert((h.generation, 0));
    if c.0 == h.generation {
        c.1 += 1;
    }
}

fn plan(snap: &Snapshot, t: &Timeouts, now_ns: u64) -> Plan {
    let mut plan = Plan::default();
    for p in pairs(snap, t, now_ns) {
        if p.verdict == Verdict::Live {
            count(&mut plan.live, &p);
        } else {
            plan.doomed.push(p);
        }
    }
    for c in snap.keeps.values() {
        if !snap.by_key.contains_key(&c.key) && !snap.by_key.contains_key(&c.partner_key()) {
            plan.dangling.push(*c);
        }
    }
    plan
}

/// Re-checks and deletes what the plan doomed: each flow is read again just before its
/// delete, and kept if it is live now (a packet refreshed it, or its container came
/// back with the same generation) or is another flow now (its keys were reused).
fn carry_out(
    live: &mut impl Tables,
    plan: &mut Plan,
    t: &Timeouts,
    now_ns: u64,
) -> Result<GcReport, DatapathError> {
    let mut r = GcReport::default();
    for p in &plan.doomed {
        let Some(q) = judge(live, p.fwd_key, p.rev_key, t, now_ns)? else {
            // The datapath met it meanwhile and deleted it.
            continue;
        };
        if q.verdict == Verdict::Live {
            r.refreshed += 1;
            count(&mut plan.live, &q);
            continue;
        }
        let halves: Vec<(CtTable, ConntrackKey)> = q.halves().map(|h| (h.table, h.key)).collect();
        let (n, c) = live.remove(&halves, &q.copies)?;
        r.deleted += n;
        r.copies += c;
        match q.verdict {
            Verdict::Expired => r.expired += 1,
            Verdict::Stale => r.stale += 1,
            Verdict::Orphan => r.orphans += 1,
            Verdict::Live => {}
        }
    }
    for c in &plan.dangling {
        if live.entry(&c.key)?.is_none() && live.entry(&c.partner_key())?.is_none() {
            r.copies += live.remove(&[], &[c.key])?.1;
        }
    }
    Ok(r)
}

/// The `NETNS_CTCOUNT` writes that make each container's count its live flows: the
/// count of a container that is gone is removed (None), one of a container whose
/// generation changed since the walk is left alone (its flows were not walked).
fn recounts(
    existing: &[(Ipv4Addr, CtCount)],
    walked: &HashMap<Ipv4Addr, u32>,
    live: &HashMap<Ipv4Addr, (u32, u32)>,
    current: impl Fn(Ipv4Addr) -> Result<Option<u32>, DatapathError>,
) -> Result<Vec<(Ipv4Addr, Option<CtCount>)>, DatapathError> {
    let mut out = Vec::new();
    for (ip, c) in existing {
        let Some(g) = current(*ip)? else {
            out.push((*ip, None));
            continue;
        };
        if walked.get(ip) != Some(&g) {
            continue;
        }
        let n = live.get(ip).filter(|(lg, _)| *lg == g).map_or(0, |l| l.1);
        if c.count != n || c.generation != g {
            out.push((
                *ip,
                Some(CtCount {
                    count: n,
                    generation: g,
                    recount_ns: c.recount_ns,
                }),
            ));
        }
    }
    Ok(out)
}

/// One sweep at time `now_ns` (monotonic): one batch walk of each map, then a re-check
/// and delete of each flow found dead, then the recount.
pub fn sweep(dp: &Datapath, now_ns: u64) -> Result<GcReport, DatapathError> {
    let t = dp.config()?.timeouts;
    let snap = Snapshot::read(dp)?;
    let mut plan = plan(&snap, &t, now_ns);
    let mut live = dp.open_tables()?;
    let mut r = carry_out(&mut live, &mut plan, &t, now_ns)?;
    r.entries = snap.entries().len();
    let writes = recounts(&dp.ct_counts()?, &snap.generations, &plan.live, |ip| {
        live.generation(ip)
    })?;
    for (ip, c) in &writes {
        match c {
            Some(c) => dp.set_ct_count(*ip, *c)?,
            None => {
                dp.remove_ct_count(*ip)?;
            }
        }
    }
    r.recounted = writes.len();
    dp.add_stat(Stat::CtUserRemoved, r.deleted as u64)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Dir, FlowKind, Tuple};

    const S: u64 = 1_000_000_000;

    #[test]
    fn timeouts_by_protocol_state_and_stream() {
        let t = Timeouts::default();
        let secs = |proto, state, stream| timeout(&t, proto, state, stream).map(|d| d.as_secs());
        assert_eq!(secs(IPPROTO_TCP, CtState::Established, true), Some(432_000));
        assert_eq!(secs(IPPROTO_TCP, CtState::New, false), Some(120));
        assert_eq!(secs(IPPROTO_TCP, CtState::Close, false), Some(10));
        // UDP: 30 s, 120 s once a stream (the flag, not packet counts).
        assert_eq!(secs(IPPROTO_UDP, CtState::New, false), Some(30));
        assert_eq!(secs(IPPROTO_UDP, CtState::New, true), Some(120));
        assert_eq!(secs(IPPROTO_ICMP, CtState::New, true), Some(30));
        // GRE, ESP: nf_conntrack_generic_timeout.
        assert_eq!(secs(47, CtState::New, true), Some(600));
        assert_eq!(secs(50, CtState::Established, false), Some(600));
        // 0: never.
        let none = Timeouts { udp: 0, ..t };
        assert_eq!(timeout(&none, IPPROTO_UDP, CtState::New, false), None);
    }

    const A: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 2);
    const GEN: u32 = 7;

    fn tuple(s: &str, d: &str) -> Tuple {
        Tuple {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
        }
    }

    fn flags(fwd: bool, replied: bool, stream: bool) -> CtFlags {
        CtFlags {
            fwd,
            replied,
            stream,
            seq_known: false,
        }
    }

    /// A masqueraded flow of container A from source port `sport`: its egress (opening)
    /// half and its ingress half, last seen at `fwd_s` and `rev_s`.
    fn udp_pair(sport: u16, table: CtTable, fwd_s: u64, rev_s: u64) -> [ConntrackEntry; 2] {
        let peer = "198.51.100.1:53";
        let nat = format!("198.51.100.3:{sport}");
        let fwd = ConntrackEntry {
            key: ConntrackKey {
                tuple: tuple(&format!("{A}:{sport}"), peer),
                proto: IPPROTO_UDP,
                dir: Dir::UplinkEgress,
            },
            table,
            xlat: tuple(&nat, peer),
            state: CtState::New,
            kind: FlowKind::Snat,
            flags: flags(true, true, false),
            owner: A,
            generation: GEN,
            created_ns: 0,
            last_seen_ns: fwd_s * S,
            packets: 1,
            bytes: 10,
        };
        let rev = ConntrackEntry {
            key: ConntrackKey {
                tuple: tuple(peer, &nat),
                proto: IPPROTO_UDP,
                dir: Dir::UplinkIngress,
            },
            xlat: tuple(peer, &format!("{A}:{sport}")),
            flags: flags(false, true, false),
            last_seen_ns: rev_s * S,
            ..fwd
        };
        assert_eq!(fwd.partner_key(), rev.key);
        assert_eq!(rev.partner_key(), fwd.key);
        [fwd, rev]
    }

    fn keep_of(e: &ConntrackEntry) -> ConntrackKeep {
        ConntrackKeep {
            key: e.key,
            xlat: e.xlat,
            kind: e.kind,
            fwd: e.flags.fwd,
            owner: e.owner,
            generation: e.generation,
        }
    }

    fn snap(entries: &[ConntrackEntry], keeps: &[ConntrackKeep]) -> Snapshot {
        Snapshot::new(entries.to_vec(), keeps.to_vec(), HashMap::from([(A, GEN)]))
    }

    fn verdicts(s: &Snapshot, now_s: u64) -> Vec<(u16, Verdict)> {
        let mut v: Vec<_> = pairs(s, &Timeouts::default(), now_s * S)
            .into_iter()
            .map(|p| (p.fwd_key.tuple.src.port(), p.verdict))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_pair_expires_when_both_halves_are_idle_past_its_timeout() {
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 90);
        let s = snap(&[f, r], &[]);
        let p = &pairs(&s, &Timeouts::default(), 0)[0];
        assert_eq!((p.fwd, p.rev), (Some(f), Some(r)), "halves paired");
        // udp (30 s) from the later half, 100 s.
        assert_eq!(verdicts(&s, 130), [(4000, Verdict::Live)]);
        assert_eq!(verdicts(&s, 131), [(4000, Verdict::Expired)]);
        // A stream (either half's flag): udp_stream, 120 s.
        let r = ConntrackEntry {
            flags: flags(false, true, true),
            ..r
        };
        let s = snap(&[f, r], &[]);
        assert_eq!(verdicts(&s, 200), [(4000, Verdict::Live)]);
        assert_eq!(verdicts(&s, 221), [(4000, Verdict::Expired)]);
        // A timeout of 0 never expires.
        let t = Timeouts {
            udp_stream: 0,
            ..Timeouts::default()
        };
        assert_eq!(pairs(&s, &t, 10_000 * S)[0].verdict, Verdict::Live);
        // TCP by the longer state should the halves differ for a moment.
        let tcp = |e: ConntrackEntry, state| ConntrackEntry {
            key: ConntrackKey {
                proto: IPPROTO_TCP,
                ..e.key
            },
            state,
            ..e
        };
        let s = snap(
            &[tcp(f, CtState::Established), tcp(r, CtState::FinWait)],
            &[],
        );
        assert_eq!(verdicts(&s, 100 + 121), [(4000, Verdict::Live)]);
    }

    #[test]
    fn entries_of_a_gone_or_replaced_container_are_stale() {
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        let gone = Snapshot::new(vec![f, r], vec![], HashMap::new());
        assert_eq!(verdicts(&gone, 101), [(4000, Verdict::Stale)]);
        // Another container has the address now: another generation.
        let other = Snapshot::new(vec![f, r], vec![], HashMap::from([(A, GEN + 1)]));
        assert_eq!(verdicts(&other, 101), [(4000, Verdict::Stale)]);
        assert!(Verdict::Stale.absent() && Verdict::Expired.absent());
        assert!(!Verdict::Orphan.absent() && !Verdict::Live.absent());
    }

    #[test]
    fn orphans_after_the_grace_unless_their_half_can_be_rebuilt() {
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        // The reverse half lost, no copy: an orphan once past the grace.
        let s = snap(&[f], &[]);
        assert_eq!(verdicts(&s, 4), [(4000, Verdict::Live)]);
        assert_eq!(verdicts(&s, 101), [(4000, Verdict::Orphan)]);
        assert!(pairs(&s, &Timeouts::default(), 101 * S)[0].orphan());
        // With a copy of the lost half and its partner in the main table, the datapath
        // rebuilds it: live.
        let s = snap(&[f], &[keep_of(&r), keep_of(&f)]);
        let p = &pairs(&s, &Timeouts::default(), 101 * S)[0];
        assert!(p.rebuildable && !p.orphan(), "{p:?}");
        assert_eq!(p.verdict, Verdict::Live);
        assert_eq!(p.copies, [f.key, r.key]);
        // Not from the unreplied table, nor from a copy of another generation.
        let [nf, nr] = udp_pair(4001, CtTable::New, 100, 100);
        let s = snap(&[nf], &[keep_of(&nr)]);
        assert_eq!(verdicts(&s, 101), [(4001, Verdict::Orphan)]);
        let old = ConntrackKeep {
            generation: GEN - 1,
            ..keep_of(&r)
        };
        let s = snap(&[f], &[old]);
        assert_eq!(verdicts(&s, 101), [(4000, Verdict::Orphan)]);
        // A lone reverse half is shown as its flow, from the opening side.
        let s = snap(&[r], &[]);
        let p = &pairs(&s, &Timeouts::default(), 101 * S)[0];
        assert_eq!((p.fwd_key, p.rev_key), (f.key, r.key));
        assert_eq!((p.fwd, p.rev), (None, Some(r)));
    }

    #[test]
    fn a_key_taken_by_another_flow_is_not_a_partner() {
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        // The reverse key now belongs to another flow (it translates elsewhere).
        let other = ConntrackEntry {
            xlat: tuple("198.51.100.1:53", "172.19.0.9:4000"),
            ..r
        };
        let s = snap(&[f, other], &[]);
        let ps = pairs(&s, &Timeouts::default(), 101 * S);
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(ps.iter().all(|p| p.orphan()), "{ps:?}");
    }

    #[test]
    fn a_key_in_both_tables_is_the_main_tables() {
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        let stale_new = ConntrackEntry {
            table: CtTable::New,
            last_seen_ns: 0,
            ..f
        };
        let s = snap(&[stale_new, f, r], &[]);
        assert_eq!(s.entries().len(), 2);
        assert_eq!(s.entry(&f.key).unwrap(), Some(f));
    }

    #[test]
    fn the_sweep_rechecks_each_flow_before_deleting_it() {
        let t = Timeouts::default();
        let [f1, r1] = udp_pair(4001, CtTable::Main, 100, 100);
        let [f2, r2] = udp_pair(4002, CtTable::New, 100, 100);
        let [f3, r3] = udp_pair(4003, CtTable::Main, 200, 200);
        let walked = snap(
            &[f1, r1, f2, r2, f3, r3],
            &[keep_of(&f1), keep_of(&r1), keep_of(&f3), keep_of(&r3)],
        );
        // At 140 s the walk finds 4001 and 4002 expired (udp, 30 s), 4003 live.
        let mut p = plan(&walked, &t, 140 * S);
        assert_eq!(p.doomed.len(), 2);
        assert_eq!(p.live.get(&A), Some(&(GEN, 1)));
        // Meanwhile a packet refreshed 4001's reply half.
        let r1_now = ConntrackEntry {
            last_seen_ns: 139 * S,
            ..r1
        };
        let mut now = snap(
            &[f1, r1_now, f2, r2, f3, r3],
            &[keep_of(&f1), keep_of(&r1), keep_of(&f3), keep_of(&r3)],
        );
        let rep = carry_out(&mut now, &mut p, &t, 140 * S).unwrap();
        assert_eq!((rep.expired, rep.refreshed), (1, 1), "{rep:?}");
        assert_eq!((rep.deleted, rep.copies), (2, 0), "{rep:?}");
        assert!(now.entry(&f2.key).unwrap().is_none() && now.entry(&r2.key).unwrap().is_none());
        assert!(
            now.entry(&f1.key).unwrap().is_some(),
            "the refreshed flow stays"
        );
        assert_eq!(p.live.get(&A), Some(&(GEN, 2)), "and counts as live");
    }

    #[test]
    fn the_sweep_deletes_stale_flows_with_their_copies_but_not_a_new_flow_on_their_keys() {
        let t = Timeouts::default();
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        let keeps = [keep_of(&f), keep_of(&r)];
        // A is gone.
        let walked = Snapshot::new(vec![f, r], keeps.to_vec(), HashMap::new());
        let mut p = plan(&walked, &t, 101 * S);
        let mut now = walked.clone();
        let rep = carry_out(&mut now, &mut p, &t, 101 * S).unwrap();
        assert_eq!((rep.stale, rep.deleted, rep.copies), (1, 2, 2), "{rep:?}");
        assert!(
            now.entries
                .iter()
                .all(|e| now.entry(&e.key).unwrap().is_none())
        );
        // A new container took the address and opened the same tuple between the walk
        // and the delete: its flow has the new generation and stays.
        let mut p = plan(&walked, &t, 101 * S);
        let fresh = |e: ConntrackEntry| ConntrackEntry {
            generation: GEN + 1,
            table: CtTable::New,
            ..e
        };
        let mut now = Snapshot::new(
            vec![fresh(f), fresh(r)],
            vec![],
            HashMap::from([(A, GEN + 1)]),
        );
        let rep = carry_out(&mut now, &mut p, &t, 101 * S).unwrap();
        assert_eq!(
            (rep.stale, rep.refreshed, rep.deleted),
            (0, 1, 0),
            "{rep:?}"
        );
        assert!(now.entry(&f.key).unwrap().is_some());
    }

    #[test]
    fn the_sweep_purges_copies_whose_halves_are_both_gone() {
        let t = Timeouts::default();
        let [f, r] = udp_pair(4000, CtTable::Main, 100, 100);
        let [f2, r2] = udp_pair(4001, CtTable::Main, 100, 100);
        // 4000's halves both gone; 4001 whole.
        let walked = snap(&[f2, r2], &[keep_of(&f), keep_of(&r), keep_of(&f2)]);
        let mut p = plan(&walked, &t, 101 * S);
        assert_eq!(p.dangling.len(), 2);
        let mut now = walked.clone();
        let rep = carry_out(&mut now, &mut p, &t, 101 * S).unwrap();
        assert_eq!((rep.copies, rep.deleted), (2, 0), "{rep:?}");
        assert!(
            now.keep(&f2.key).unwrap().is_some(),
            "a live flow's copy stays"
        );
    }

    #[test]
    fn counts_become_each_containers_live_flows() {
        let b = Ipv4Addr::new(172, 19, 0, 3);
        let c = Ipv4Addr::new(172, 19, 0, 4);
        let d = Ipv4Addr::new(172, 19, 0, 5);
        let cnt = |count, generation| CtCount {
            count,
            generation,
            recount_ns: 9,
        };
        let existing = [
            (A, cnt(50, GEN)), // A: 3 live flows
            (b, cnt(4, 1)),    // gone
            (c, cnt(2, 2)),    // right already
            (d, cnt(8, 3)),    // replaced since the walk
        ];
        let walked = HashMap::from([(A, GEN), (c, 2), (d, 3)]);
        let live = HashMap::from([(A, (GEN, 3)), (c, (2, 2)), (d, (3, 1))]);
        let current = HashMap::from([(A, GEN), (c, 2), (d, 4)]);
        let w = recounts(&existing, &walked, &live, |ip| {
            Ok(current.get(&ip).copied())
        })
        .unwrap();
        let w: Vec<_> = w
            .iter()
            .map(|(ip, c)| (*ip, c.map(|c| (c.count, c.generation, c.recount_ns))))
            .collect();
        assert_eq!(w, [(A, Some((3, GEN, 9))), (b, None)]);
    }
}
