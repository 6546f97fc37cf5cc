//! The conntrack-like maps: lookup with lazy expiry, staleness and repair; coarse TCP
//! state with RST validation; creation of a forward/reverse pair with source-port
//! allocation; the per-container budget.
//!
//! A pair starts in `CT_NEW` (unreplied: a flood of those evicts only its own kind),
//! moves to `CONNTRACK` once assured (TCP handshake done, a reply for the rest) with a
//! copy of each half in `CT_KEEP`, from which a half the LRU lost is rebuilt on the
//! packet that misses it. No process has to run for any of this: an entry idle past
//! its timeout, or of a container that is gone, is treated as absent where it is met.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST, BPF_TCP_CLOSE, BPF_TCP_LISTEN, bpf_sock_tuple,
    },
    helpers::{bpf_ktime_get_coarse_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    maps::LruHashMap,
    programs::TcContext,
};
use netns_common::{
    Config, CtCount, CtEntry, CtKeep, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple,
    ct_flags, ct_kind, ct_state, dir,
};

use crate::{
    maps::{CONNTRACK, CT_COUNT, CT_KEEP, CT_NEW, CT_SCRATCH, ENDPOINTS, config, mark_port_used},
    packet::{L4, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, icmp_query},
    stats, sweep,
};

/// Probes after the original port is taken. Bounded for the verifier; with a range of
/// ~28k ports and a sparse table the chance that 16 probes all collide is nil, and
/// when the table is dense the drop is counted rather than a wrong translation made.
const PORT_PROBES: u32 = 16;

const NS: u64 = 1_000_000_000;
/// UDP becomes a stream (longer timeout) when replied and active this long after
/// creation (Linux: nf_conntrack_proto_udp.c, stream_ts).
const UDP_STREAM_AFTER_NS: u64 = 2 * NS;
/// `last_seen_ns` is written only when it moved by this much: timeouts are seconds
/// long, and a hit that writes nothing keeps the entry's cache line clean (shared by
/// every CPU handling the flow).
const LAST_SEEN_GRANULE_NS: u64 = NS;
/// A RST is taken when its sequence number is this close to where its sender is,
/// beyond the receiver's advertised (unscaled) window: a blind RST must guess a
/// 2^17-wide slot of 2^32.
const RST_SLACK: u32 = 65_535;

#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> CtKey {
    CtKey::new(pkt.tuple, pkt.proto, dir)
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // The coarse clock (CLOCK_MONOTONIC_COARSE, a tick's resolution): a few ns instead
    // of a clocksource read per packet; timeouts are in seconds.
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// What a lookup found.
pub enum Lookup {
    /// Rewrite to the tuple written out; the pair's [`ct_kind`].
    Hit(u8),
    /// No live flow: the caller may create one.
    Miss,
    /// A TCP RST outside the window: it must not pass (`tcp_blind_rst`).
    BlindRst,
}

/// Which table a half lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Main,
    New,
}

#[inline(always)]
fn table(t: Table) -> &'static LruHashMap<CtKey, CtEntry> {
    match t {
        Table::Main => &CONNTRACK,
        Table::New => &CT_NEW,
    }
}

/// How long a flow may stay idle, by protocol, state and flags (Linux's defaults,
/// settable with `netns gc --timeouts`). 0: no timeouts configured, never expires.
#[inline(always)]
pub fn timeout_ns(cfg: &Config, proto: u8, state: u8, flags: u8) -> u64 {
    // Each field loaded on its own (volatile): otherwise LLVM indexes the struct by
    // `state`, a variable offset into a map value the verifier refuses.
    let t = &cfg.timeouts;
    // SAFETY: reads of fields of a valid reference.
    let v = |f: &u32| unsafe { core::ptr::read_volatile(f) };
    let secs = match proto {
        IPPROTO_TCP => {
            let (syn, est, fin, close) = (
                v(&t.tcp_syn),
                v(&t.tcp_established),
                v(&t.tcp_fin),
                v(&t.tcp_close),
            );
            if state == ct_state::ESTABLISHED {
                est
            } else if state == ct_state::FIN_WAIT {
                fin
            } else if state == ct_state::CLOSE {
                close
            } else {
                syn
            }
        }
        IPPROTO_UDP if flags & ct_flags::STREAM != 0 => v(&t.udp_stream),
        IPPROTO_UDP => v(&t.udp),
        IPPROTO_ICMP => v(&t.icmp),
        _ => v(&t.generic),
    };
    secs as u64 * NS
}

/// Is this half idle past its own timeout? (Both halves carry the same state; the
/// flags only add time, so a live pair is never judged dead from one half: the caller
/// confirms with the partner.)
#[inline(always)]
pub fn idle_expired(cfg: &Config, proto: u8, e: &CtEntry, now: u64) -> bool {
    let t = timeout_ns(cfg, proto, e.state, e.flags);
    t != 0 && now.saturating_sub(e.last_seen_ns) > t
}

/// Is the pair expired, given one half and its partner (if any)?
#[inline(always)]
pub fn pair_expired(cfg: &Config, proto: u8, e: &CtEntry, p: Option<&CtEntry>, now: u64) -> bool {
    match p {
        None => idle_expired(cfg, proto, e, now),
        Some(p) => {
            let last = if p.last_seen_ns > e.last_seen_ns {
                p.last_seen_ns
            } else {
                e.last_seen_ns
            };
            let t = timeout_ns(cfg, proto, e.state, e.flags | p.flags);
            t != 0 && now.saturating_sub(last) > t
        }
    }
}

/// Is the owner of `e` gone (or its address now another container's)?
#[inline(always)]
pub fn stale(e: &CtEntry) -> bool {
    stale_owner(e.owner, e.generation)
}

#[inline(always)]
fn stale_owner(owner: u32, generation: u32) -> bool {
    match unsafe { ENDPOINTS.get(&owner) } {
        Some(ep) => ep.generation != generation,
        None => true,
    }
}

/// Removes a pair (either half may already be gone) and its copies, and gives the
/// owner back its budget.
#[inline(never)]
fn remove_pair(t: Table, k: &CtKey, pk: &CtKey, owner: u32, generation: u32) {
    let _ = table(t).remove(k);
    let _ = table(t).remove(pk);
    if t == Table::Main {
        let _ = CT_KEEP.remove(k);
        let _ = CT_KEEP.remove(pk);
    }
    uncount(owner, generation);
}

#[inline(always)]
fn uncount(owner: u32, generation: u32) {
    if let Some(c) = CT_COUNT.get_ptr_mut(&owner) {
        // SAFETY: a valid map value; a lost update only skews the count, which a
        // recount corrects.
        unsafe {
            if (*c).generation == generation && (*c).count > 0 {
                (*c).count -= 1;
            }
        }
    }
}

/// Finds the live flow of `pkt` at hook point `d` and accounts the packet to it:
/// expired and stale entries are removed and reported as a miss, a half the LRU lost
/// is rebuilt from its copy, a pair becomes assured (and moves to the main table)
/// on the packet that completes it.
#[inline(always)]
pub fn lookup(pkt: &Packet, d: u8, len: u32, xlat: &mut Tuple) -> Lookup {
    let r = netns_ct_lookup(pkt, d as u32, len, xlat as *mut Tuple);
    match r >> 16 {
        0 if r & 0x100 != 0 => Lookup::Hit(r as u8),
        1 => Lookup::BlindRst,
        _ => Lookup::Miss,
    }
}

/// The lookup as a global BPF function: the verifier checks it once, on its own,
/// instead of once per call site and caller state (and its stack is its own).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn netns_ct_lookup(pkt: *const Packet, d: u32, len: u32, xlat: *mut Tuple) -> u32 {
    // The verifier takes a global function's pointers as possibly null.
    if pkt.is_null() || xlat.is_null() {
        return 0;
    }
    // SAFETY: checked non-null; the caller passes its own stack objects.
    let (pkt, xlat) = unsafe { (&*pkt, &mut *xlat) };
    match lookup_inner(pkt, d as u8, len, xlat) {
        Lookup::Miss => 0,
        Lookup::Hit(kind) => 0x100 | kind as u32,
        Lookup::BlindRst => 1 << 16,
    }
}

#[inline(always)]
fn lookup_inner(pkt: &Packet, d: u8, len: u32, xlat: &mut Tuple) -> Lookup {
    let Some(cfg) = config() else {
        return Lookup::Miss;
    };
    let k = key(pkt, d);
    let now = now_ns();
    let (e, t) = if let Some(e) = CONNTRACK.get_ptr_mut(&k) {
        (e, Table::Main)
    } else if let Some(e) = CT_NEW.get_ptr_mut(&k) {
        (e, Table::New)
    } else if repair(&k, now) {
        match CONNTRACK.get_ptr_mut(&k) {
            Some(e) => (e, Table::Main),
            None => return Lookup::Miss,
        }
    } else {
        return Lookup::Miss;
    };
    found(cfg, pkt, &k, e, t, now, len, xlat)
}

/// Rebuilds the half `k` of an assured pair from its copy, if its partner is still in
/// the main table and agrees. A copy whose partner is gone is garbage: removed.
#[inline(never)]
fn repair(k: &CtKey, now: u64) -> bool {
    let Some(c) = (unsafe { CT_KEEP.get(k) }) else {
        return false;
    };
    let pk = CtKey::new(c.xlat.reversed(), k.proto, netns_common::partner_dir(k.dir));
    let Some(p) = (unsafe { CONNTRACK.get(&pk) }) else {
        let _ = CT_KEEP.remove(k);
        return false;
    };
    if p.xlat != k.tuple.reversed() || p.generation != c.generation {
        let _ = CT_KEEP.remove(k);
        return false;
    }
    // Built in scratch (slot 0 is free: no pair is being made during a lookup).
    let Some(e) = CT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, ours while the program runs; `c` and `p` are valid map
    // values.
    unsafe {
        (*e).xlat = c.xlat;
        (*e).state = p.state;
        (*e).kind = c.kind;
        (*e).flags = c.flags | (p.flags & (ct_flags::REPLIED | ct_flags::STREAM));
        (*e)._pad = 0;
        (*e).created_ns = p.created_ns;
        (*e).last_seen_ns = now;
        (*e).packets = 0;
        (*e).bytes = 0;
        (*e).owner = c.owner;
        (*e).generation = c.generation;
        (*e).seq_end = 0;
        (*e).win = 0;
        (*e)._pad2 = 0;
        if CONNTRACK.insert(k, &*e, BPF_NOEXIST as u64).is_ok() {
            stats::inc(Stat::CtRebuilt);
        }
    }
    true
}

#[inline(always)]
fn found(
    cfg: &Config,
    pkt: &Packet,
    k: &CtKey,
    e: *mut CtEntry,
    t: Table,
    now: u64,
    len: u32,
    xlat: &mut Tuple,
) -> Lookup {
    // SAFETY: a valid map value pointer; concurrent writers touch counters and
    // single-word fields, where a lost update is harmless. Fields are read one by one:
    // a copy of the whole entry would not fit the BPF stack.
    let (owner, generation, cur_state, cur_flags, created, kind, xl) = unsafe {
        (
            (*e).owner,
            (*e).generation,
            (*e).state,
            (*e).flags,
            (*e).created_ns,
            (*e).kind,
            (*e).xlat,
        )
    };
    let pk = CtKey::new(xl.reversed(), k.proto, netns_common::partner_dir(k.dir));
    if stale_owner(owner, generation) {
        remove_pair(t, k, &pk, owner, generation);
        stats::inc(Stat::CtStale);
        return Lookup::Miss;
    }
    // SAFETY: as above.
    if idle_expired(cfg, pkt.proto, unsafe { &*e }, now) {
        let p = unsafe { table(t).get(&pk) };
        if pair_expired(cfg, pkt.proto, unsafe { &*e }, p, now) {
            remove_pair(t, k, &pk, owner, generation);
            stats::inc(Stat::CtExpired);
            return Lookup::Miss;
        }
    }
    let tcp = pkt.proto == IPPROTO_TCP && !pkt.later_fragment;
    let flags = pkt.l4_flags;
    if tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN && cur_state >= ct_state::FIN_WAIT {
        // A new connection on a closed flow's tuple: start fresh in both directions.
        remove_pair(t, k, &pk, owner, generation);
        stats::inc(Stat::CtReopened);
        return Lookup::Miss;
    }
    if tcp && flags & TCP_RST != 0 && !rst_in_window(pkt, unsafe { &*e }, t, &pk) {
        return Lookup::BlindRst;
    }
    // SAFETY: as above.
    unsafe {
        if now.wrapping_sub((*e).last_seen_ns) >= LAST_SEEN_GRANULE_NS {
            (*e).last_seen_ns = now;
        }
        // Plain adds: a flow's packets in one direction are almost always handled on
        // one CPU (one veth queue). Only with `--ct-counters on`.
        if cfg.ct_counters != 0 {
            (*e).packets += 1;
            (*e).bytes += len as u64;
        }
        if tcp {
            let end = pkt.tcp_seq.wrapping_add(pkt.tcp_seg_len);
            if (*e).flags & ct_flags::SEQ_KNOWN == 0 || (end.wrapping_sub((*e).seq_end) as i32) > 0
            {
                (*e).seq_end = end;
            }
            (*e).win = pkt.tcp_win;
            (*e).flags |= ct_flags::SEQ_KNOWN;
        }
    }
    let mut fl = cur_flags | if tcp { ct_flags::SEQ_KNOWN } else { 0 };
    let mut state = cur_state;
    let mut partner_flags = 0u8;
    let mut partner_state = None;
    if fl & ct_flags::FWD == 0 && fl & ct_flags::REPLIED == 0 {
        // The first packet of the reply direction.
        fl |= ct_flags::REPLIED;
        partner_flags |= ct_flags::REPLIED;
    }
    if pkt.proto == IPPROTO_UDP
        && fl & (ct_flags::REPLIED | ct_flags::STREAM) == ct_flags::REPLIED
        && now.saturating_sub(created) > UDP_STREAM_AFTER_NS
    {
        fl |= ct_flags::STREAM;
        partner_flags |= ct_flags::STREAM;
    }
    if tcp {
        let s = next_tcp_state(state, flags);
        if s != state {
            state = s;
            partner_state = Some(s);
        }
    }
    if fl != cur_flags || state != cur_state {
        // SAFETY: as above.
        unsafe {
            (*e).flags |= fl;
            (*e).state = state;
        }
    }
    if partner_flags != 0 || partner_state.is_some() {
        if let Some(p) = table(t).get_ptr_mut(&pk) {
            // SAFETY: as above.
            unsafe {
                (*p).flags |= partner_flags;
                if let Some(s) = partner_state {
                    (*p).state = s;
                }
            }
        } else if t == Table::New {
            // The unreplied table lost the other half: rebuild it from this one.
            rebuild_partner(t, k, unsafe { &*e }, now);
        }
    }
    if t == Table::New && assured(pkt, fl, flags) {
        promote(k, &pk);
    }
    *xlat = xl;
    Lookup::Hit(kind)
}

/// TCP: the handshake's last ACK (the opener's ACK after a reply); others: a reply.
#[inline(always)]
fn assured(pkt: &Packet, fl: u8, tcp_flags: u8) -> bool {
    if fl & ct_flags::REPLIED == 0 {
        return false;
    }
    if pkt.proto != IPPROTO_TCP {
        return true;
    }
    fl & ct_flags::FWD != 0 && tcp_flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
}

/// Moves a pair from the unreplied table to the main one, with a copy of each half.
/// Without room for the copies it stays where it is (a main-table pair can always be
/// repaired).
#[inline(never)]
fn promote(k: &CtKey, pk: &CtKey) {
    let Some(a) = (unsafe { CT_NEW.get(k) }) else {
        return;
    };
    let Some(b) = (unsafe { CT_NEW.get(pk) }) else {
        return;
    };
    if CT_KEEP.insert(k, &keep_of(a), BPF_ANY as u64).is_err() {
        stats::inc(Stat::CtUnkept);
        sweep::request();
        return;
    }
    if CT_KEEP.insert(pk, &keep_of(b), BPF_ANY as u64).is_err() {
        let _ = CT_KEEP.remove(k);
        stats::inc(Stat::CtUnkept);
        sweep::request();
        return;
    }
    // Another CPU may have promoted it already: its entries stand. (The values are
    // read from CT_NEW's memory, still valid until removed below.)
    let _ = CONNTRACK.insert(k, a, BPF_NOEXIST as u64);
    let _ = CONNTRACK.insert(pk, b, BPF_NOEXIST as u64);
    let _ = CT_NEW.remove(k);
    let _ = CT_NEW.remove(pk);
    stats::inc(Stat::CtPromoted);
}

#[inline(always)]
fn keep_of(e: &CtEntry) -> CtKeep {
    CtKeep {
        xlat: e.xlat,
        kind: e.kind,
        flags: e.flags & ct_flags::FWD,
        _pad: [0; 2],
        owner: e.owner,
        generation: e.generation,
    }
}

/// Re-inserts the partner of half `k` (value `e`), which translates back to `k`.
#[inline(never)]
fn rebuild_partner(t: Table, k: &CtKey, e: &CtEntry, now: u64) {
    let p = CtEntry {
        xlat: k.tuple.reversed(),
        flags: e.flags & !(ct_flags::FWD | ct_flags::SEQ_KNOWN) | (!e.flags & ct_flags::FWD),
        created_ns: e.created_ns,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        seq_end: 0,
        win: 0,
        ..*e
    };
    if table(t)
        .insert(&e.partner_key(k), &p, BPF_NOEXIST as u64)
        .is_ok()
    {
        stats::inc(Stat::CtRebuilt);
    }
}

/// Is a RST from this half's sender plausible: its sequence number near where that
/// sender is, within the receiver's window? Otherwise it is blind (RFC 5961): a
/// spoofer who does not see the flow cannot close it.
#[inline(never)]
fn rst_in_window(pkt: &Packet, e: &CtEntry, t: Table, pk: &CtKey) -> bool {
    if e.flags & ct_flags::SEQ_KNOWN == 0 {
        // Nothing sent this way yet (a RST answering a SYN): nothing to check against.
        return true;
    }
    let win = match unsafe { table(t).get(pk) } {
        Some(p) => p.win as u32,
        None => 0,
    };
    let off = pkt.tcp_seq.wrapping_sub(e.seq_end) as i32;
    let lim = (RST_SLACK + win) as i32;
    off >= -lim && off <= lim
}

/// A coarse TCP state, the same on both halves: SYN -> NEW, SYN|ACK -> ESTABLISHED,
/// FIN -> FIN_WAIT, RST -> CLOSE.
#[inline(always)]
pub fn next_tcp_state(cur: u8, flags: u8) -> u8 {
    if flags & TCP_RST != 0 {
        ct_state::CLOSE
    } else if flags & TCP_FIN != 0 {
        if cur == ct_state::CLOSE {
            cur
        } else {
            ct_state::FIN_WAIT
        }
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        if cur == ct_state::NEW {
            ct_state::ESTABLISHED
        } else {
            cur
        }
    } else if cur == ct_state::NEW && flags & TCP_ACK != 0 && flags & TCP_SYN == 0 {
        ct_state::ESTABLISHED
    } else {
        cur
    }
}

#[inline(always)]
fn initial_state(pkt: &Packet) -> u8 {
    if pkt.proto == IPPROTO_TCP && pkt.l4_flags & TCP_SYN == 0 {
        // Picked up mid-stream (a container's flow after its state was lost).
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    }
}

/// A new half, built in per-CPU scratch slot `slot`. `fwd`: the half of the creating
/// packet (counted, FWD flag).
#[inline(always)]
fn entry(
    slot: u32,
    xlat: Tuple,
    pkt: &Packet,
    kind: u8,
    owner: (u32, u32),
    now: u64,
    len: u32,
    fwd: bool,
) -> Result<&'static CtEntry, Stat> {
    let e = CT_SCRATCH.get_ptr_mut(slot).ok_or(Stat::DropCtInsert)?;
    let tcp = pkt.proto == IPPROTO_TCP && fwd;
    // SAFETY: a per-CPU slot, no other user on this CPU while we run.
    unsafe {
        (*e).xlat = xlat;
        (*e).state = initial_state(pkt);
        (*e).kind = kind;
        (*e).flags =
            if fwd { ct_flags::FWD } else { 0 } | if tcp { ct_flags::SEQ_KNOWN } else { 0 };
        (*e)._pad = 0;
        (*e).created_ns = now;
        (*e).last_seen_ns = now;
        (*e).packets = fwd as u64;
        (*e).bytes = if fwd { len as u64 } else { 0 };
        (*e).owner = owner.0;
        (*e).generation = owner.1;
        (*e).seq_end = if tcp {
            pkt.tcp_seq.wrapping_add(pkt.tcp_seg_len)
        } else {
            0
        };
        (*e).win = if tcp { pkt.tcp_win } else { 0 };
        (*e)._pad2 = 0;
        Ok(&*e)
    }
}

/// The owner of a new flow and its endpoint generation; a container not (or no
/// longer) attached owns nothing.
#[inline(always)]
fn owner_of(addr: u32) -> Result<(u32, u32), Stat> {
    match unsafe { ENDPOINTS.get(&addr) } {
        Some(ep) => Ok((addr, ep.generation)),
        None => Err(Stat::DropNoEndpoint),
    }
}

/// Takes one pair from `owner`'s budget (`--ct-max-per-container`). At the limit the
/// count is first recounted (LRU evictions are not seen, so it may be too high), at
/// most once a second per container.
#[inline(always)]
fn charge(cfg: &Config, owner: (u32, u32), now: u64) -> Result<(), Stat> {
    let limit = cfg.ct_per_container;
    if limit == 0 {
        return Ok(());
    }
    let c = match CT_COUNT.get_ptr_mut(&owner.0) {
        Some(c) => c,
        None => {
            let fresh = CtCount {
                count: 0,
                generation: owner.1,
                recount_ns: 0,
            };
            let _ = CT_COUNT.insert(&owner.0, &fresh, BPF_NOEXIST as u64);
            match CT_COUNT.get_ptr_mut(&owner.0) {
                Some(c) => c,
                // No room to count: do not block the container for it.
                None => return Ok(()),
            }
        }
    };
    // SAFETY: a valid map value; racing updates only skew the count (recounted).
    unsafe {
        if (*c).generation != owner.1 {
            (*c).generation = owner.1;
            (*c).count = 0;
            (*c).recount_ns = 0;
        }
        if (*c).count >= limit && now.saturating_sub((*c).recount_ns) > NS {
            (*c).recount_ns = now;
            (*c).count = sweep::count_owner(owner.0, owner.1, now);
        }
        if (*c).count >= limit {
            return Err(Stat::DropCtBudget);
        }
        (*c).count += 1;
    }
    Ok(())
}

/// Does a socket of the host itself own `local` (source: the host's address and
/// port, destination: the peer's)? With `listeners`, a socket that merely listens on
/// (TCP) or is bound to (unconnected UDP) the port counts too: a masquerade port is
/// then avoided, as a reply to it could be the host's. Without, only a connected
/// socket of exactly this flow counts: a port forward beats a listener opened on its
/// port later, as an iptables DNAT does (podman's conmon holds such placeholder
/// sockets on every published port; `port add` refuses a port already in use).
#[inline(never)]
pub fn host_socket_owns(ctx: &TcContext, proto: u8, local: &Tuple, listeners: bool) -> bool {
    let (local, port, peer, peer_port) = (local.saddr, local.sport, local.daddr, local.dport);
    // SAFETY: zeroed is a valid bpf_sock_tuple; we fill the IPv4 member.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    t.__bindgen_anon_1.ipv4.saddr = peer;
    t.__bindgen_anon_1.ipv4.daddr = local;
    t.__bindgen_anon_1.ipv4.sport = peer_port;
    t.__bindgen_anon_1.ipv4.dport = port;
    let size = 12; // sizeof(tuple.ipv4)
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helper calls with a valid tuple; a non-null socket is released at once.
    unsafe {
        let sk = match proto {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx.skb.skb.cast(), &mut t, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.skb.skb.cast(), &mut t, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        // A listening TCP socket is in LISTEN, an unconnected UDP one in CLOSE; a
        // connected one of either is ESTABLISHED (or a later TCP state).
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        listeners || (state != BPF_TCP_LISTEN && state != BPF_TCP_CLOSE)
    }
}

/// Where a new source-translated pair lives, whose it is and how its port is chosen.
struct PairSpec {
    owner: u32,
    generation: u32,
    /// Hook point of the packet that creates the pair (the forward half's key).
    fwd_dir: u8,
    /// Hook point where the reverse half is looked up.
    rev_dir: u8,
    kind: u8,
    /// Try the packet's own source port first.
    try_orig: bool,
    min: u16,
    max: u16,
}

/// Who holds reverse key `rk` now, if anyone: in which table, and whether it is the
/// reverse half of the very flow `orig` (then it is adopted, not a collision: the
/// forward half was lost, or another CPU is creating the same flow).
#[inline(always)]
fn holder(rk: &CtKey, orig: &Tuple) -> Option<(Option<Table>, bool)> {
    let ours = |x: &Tuple| *x == orig.reversed();
    if let Some(r) = unsafe { CONNTRACK.get(rk) } {
        return Some((Some(Table::Main), ours(&r.xlat) && !stale(r)));
    }
    if let Some(r) = unsafe { CT_NEW.get(rk) } {
        return Some((Some(Table::New), ours(&r.xlat) && !stale(r)));
    }
    // A copy alone: its half was lost but may be rebuilt; the port stays taken unless
    // it is this flow's own.
    if let Some(c) = unsafe { CT_KEEP.get(rk) } {
        if ours(&c.xlat) {
            let _ = CT_KEEP.remove(rk);
            return None;
        }
        return Some((None, false));
    }
    None
}

/// The `i`-th port to try for `t` in [min, max]: a keyed hash, so that it is not
/// guessable from outside and the same flow probes the same ports again (its lost
/// forward half finds its reverse half).
#[inline(always)]
fn probe_port(seed: u32, t: &Tuple, i: u32, min: u16, span: u32) -> u16 {
    let mut h = seed ^ i.wrapping_mul(0x9e37_79b9);
    for w in [t.saddr, t.daddr, ((t.sport as u32) << 16) | t.dport as u32] {
        h ^= w;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
    }
    (min as u32 + h % span) as u16
}

/// Creates a pair that rewrites the packet to `xlat` (whose source port is chosen
/// here): claims a port by inserting the reverse half with BPF_NOEXIST after a lookup
/// (a failed NOEXIST insert into an LRU map still evicts an entry first), then the
/// forward half. A reverse half of this very flow found on the way is adopted.
#[inline(always)]
fn create_pair(pkt: &Packet, xlat: &mut Tuple, spec: &PairSpec, len: u32) -> Result<(), Stat> {
    let owner = (spec.owner, spec.generation);
    let Some(cfg) = config() else {
        return Err(Stat::DropCtInsert);
    };
    let now = now_ns();
    let orig = pkt.tuple;
    let mut rk = CtKey::new(xlat.reversed(), pkt.proto, spec.rev_dir);
    let rev = entry(0, orig.reversed(), pkt, spec.kind, owner, now, len, false)?;
    let span = (spec.max as u32).saturating_sub(spec.min as u32) + 1;
    let mut claimed: Option<Table> = None;
    let mut adopted = false;
    let mut i = 0;
    while claimed.is_none() && i <= PORT_PROBES {
        let port = if i == 0 {
            if !spec.try_orig {
                i += 1;
                continue;
            }
            orig.sport
        } else {
            probe_port(cfg.port_seed, &orig, i, spec.min, span).to_be()
        };
        rk.tuple.dport = port;
        match holder(&rk, &orig) {
            Some((Some(t), true)) => {
                claimed = Some(t);
                adopted = true;
            }
            Some(_) => {}
            None => {
                if CT_NEW.insert(&rk, rev, BPF_NOEXIST as u64).is_ok() {
                    claimed = Some(Table::New);
                } else if let Some((Some(t), true)) = holder(&rk, &orig) {
                    claimed = Some(t);
                    adopted = true;
                }
            }
        }
        if claimed.is_none() {
            i += 1;
        }
    }
    let Some(t) = claimed else {
        stats::inc(Stat::PortRetries8To16);
        return Err(Stat::DropPortExhausted);
    };
    let probes = if spec.try_orig { i } else { i - 1 };
    if probes > 0 {
        stats::inc(match probes {
            1 => Stat::PortRetries1,
            2..=3 => Stat::PortRetries2To3,
            4..=7 => Stat::PortRetries4To7,
            _ => Stat::PortRetries8To16,
        });
    }
    xlat.sport = rk.tuple.dport;
    // Replies will come to this port: the uplink must not pass them as the host's
    // before the lookup. Marked also inside the NAT range, which `--nat-ports` may
    // move while the flow lives.
    if spec.rev_dir == dir::UPLINK_INGRESS && (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP)
    {
        mark_port_used(xlat.sport);
    }
    let fwd = entry(1, *xlat, pkt, spec.kind, owner, now, len, true)?;
    let fk = key(pkt, spec.fwd_dir);
    if adopted {
        // The pair exists (or is being made by another CPU): restore the lost half,
        // keep the winner's if it is there.
        if table(t).insert(&fk, fwd, BPF_NOEXIST as u64).is_ok() {
            stats::inc(Stat::CtRebuilt);
        }
        return Ok(());
    }
    if let Err(s) = charge(cfg, owner, now) {
        let _ = CT_NEW.remove(&rk);
        return Err(s);
    }
    if CT_NEW.insert(&fk, fwd, BPF_NOEXIST as u64).is_err() {
        let _ = CT_NEW.remove(&rk);
        uncount(owner.0, owner.1);
        return Err(Stat::DropCtInsert);
    }
    stats::inc(Stat::CtCreated);
    Ok(())
}

/// Masquerade a new flow leaving through the uplink: the source becomes the uplink's
/// address and a port no other flow to the same peer uses (the original port if
/// neither a flow nor a host socket has it: `host_owned` says whether one has, asked
/// by the caller so that the socket lookup's frame is not stacked on this one).
#[inline(never)]
pub fn create_snat(
    pkt: &Packet,
    cfg: &Config,
    len: u32,
    host_owned: bool,
    out: &mut Tuple,
) -> Result<(), Stat> {
    let (nat_addr, min, max) = (cfg.uplink_addr, cfg.nat_port_min, cfg.nat_port_max);
    let orig = pkt.tuple;
    let owner = owner_of(orig.saddr)?;
    let mut xlat = Tuple {
        saddr: nat_addr,
        ..orig
    };
    let spec = PairSpec {
        owner: owner.0,
        generation: owner.1,
        fwd_dir: dir::UPLINK_EGRESS,
        rev_dir: dir::UPLINK_INGRESS,
        kind: ct_kind::SNAT,
        try_orig: !host_owned,
        min,
        max,
    };
    create_pair(pkt, &mut xlat, &spec, len)?;
    if xlat.sport == orig.sport {
        stats::inc(Stat::PortKept);
    }
    *out = xlat;
    Ok(())
}

/// Hairpin a container's flow to a port forward: the target sees the gateway as peer.
#[inline(never)]
pub fn create_hairpin(
    pkt: &Packet,
    cfg: &Config,
    target: &netns_common::PortTarget,
    len: u32,
    out: &mut Tuple,
) -> Result<(), Stat> {
    let (target_addr, target_port) = (target.addr, target.port);
    let owner = owner_of(pkt.tuple.saddr)?;
    let mut xlat = Tuple {
        saddr: cfg.gateway,
        daddr: target_addr,
        sport: pkt.tuple.sport,
        dport: target_port,
    };
    let spec = PairSpec {
        owner: owner.0,
        generation: owner.1,
        fwd_dir: dir::BRIDGE,
        rev_dir: dir::BRIDGE,
        kind: ct_kind::HAIRPIN,
        try_orig: true,
        min: cfg.nat_port_min,
        max: cfg.nat_port_max,
    };
    create_pair(pkt, &mut xlat, &spec, len)?;
    *out = xlat;
    Ok(())
}

/// Port-forward a new flow arriving on the uplink to `target` (address, port): only
/// for a TCP SYN (any UDP packet), so stray segments make no state. The container
/// sees the real peer; its replies are translated back on uplink egress.
#[inline(never)]
pub fn create_dnat(
    pkt: &Packet,
    target_addr: u32,
    target_port: u16,
    len: u32,
    out: &mut Tuple,
) -> Result<(), Stat> {
    if pkt.proto == IPPROTO_TCP && pkt.l4_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Err(Stat::DropTcpNoState);
    }
    let Some(cfg) = config() else {
        return Err(Stat::DropCtInsert);
    };
    let owner = owner_of(target_addr)?;
    let now = now_ns();
    let orig = pkt.tuple;
    let xlat = Tuple {
        saddr: orig.saddr,
        daddr: target_addr,
        sport: orig.sport,
        dport: target_port,
    };
    let rk = CtKey::new(xlat.reversed(), pkt.proto, dir::UPLINK_EGRESS);
    let fk = key(pkt, dir::UPLINK_INGRESS);
    // A holder of the reverse key that is not this flow is the container's own flow
    // on that very tuple (it opened it to the peer): never overwritten.
    let pair = FixedPair {
        kind: ct_kind::DNAT,
        owner,
        collision: Stat::DropCtInsert,
        now,
        len,
    };
    insert_fixed_pair(cfg, pkt, &rk, &fk, xlat, &pair)?;
    *out = xlat;
    Ok(())
}

/// A pair whose ports are given (port forward, address-only masquerade): nothing to
/// choose, only to claim.
struct FixedPair {
    kind: u8,
    owner: (u32, u32),
    /// The drop when another flow holds the reverse key.
    collision: Stat,
    now: u64,
    /// The creating packet's length (accounted to the forward half).
    len: u32,
}

/// Makes the pair of reverse key `rk` and forward key `fk` (translating to `xlat`) in
/// the unreplied table, charged to the owner's budget. A reverse half of this very flow
/// (its forward half lost: a retransmitted SYN, a later packet) is adopted and the
/// forward half restored, nothing counted twice; another holder is a collision, and so
/// is a reverse insert that another CPU won.
#[inline(always)]
fn insert_fixed_pair(
    cfg: &Config,
    pkt: &Packet,
    rk: &CtKey,
    fk: &CtKey,
    xlat: Tuple,
    pair: &FixedPair,
) -> Result<(), Stat> {
    let (kind, owner, now, len) = (pair.kind, pair.owner, pair.now, pair.len);
    match holder(rk, &pkt.tuple) {
        Some((Some(t), true)) => {
            let fwd = entry(1, xlat, pkt, kind, owner, now, len, true)?;
            if table(t).insert(fk, fwd, BPF_NOEXIST as u64).is_ok() {
                stats::inc(Stat::CtRebuilt);
            }
            return Ok(());
        }
        Some(_) => return Err(pair.collision),
        None => {}
    }
    charge(cfg, owner, now)?;
    let rev = entry(0, pkt.tuple.reversed(), pkt, kind, owner, now, len, false)?;
    if CT_NEW.insert(rk, rev, BPF_NOEXIST as u64).is_err() {
        uncount(owner.0, owner.1);
        return Err(pair.collision);
    }
    let fwd = entry(1, xlat, pkt, kind, owner, now, len, true)?;
    if CT_NEW.insert(fk, fwd, BPF_NOEXIST as u64).is_err() {
        // Another CPU made this flow first: its pair stands.
        let _ = CT_NEW.remove(rk);
        uncount(owner.0, owner.1);
        return Err(Stat::DropCtInsert);
    }
    stats::inc(Stat::CtCreated);
    Ok(())
}

/// Masquerade by address alone, for protocols without ports (GRE, ESP, SCTP...), as
/// netfilter's generic NAT does: one flow per container, protocol and peer. A second
/// container talking the same protocol to the same peer collides: its packets are
/// dropped and counted, never sent with a private source.
#[inline(never)]
pub fn create_addr_only(
    pkt: &Packet,
    nat_addr: u32,
    len: u32,
    out: &mut Tuple,
) -> Result<(), Stat> {
    let Some(cfg) = config() else {
        return Err(Stat::DropCtInsert);
    };
    let orig = pkt.tuple;
    let owner = owner_of(orig.saddr)?;
    let now = now_ns();
    let xlat = Tuple {
        saddr: nat_addr,
        ..orig
    };
    let rk = CtKey::new(xlat.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    let fk = key(pkt, dir::UPLINK_EGRESS);
    let pair = FixedPair {
        kind: ct_kind::SNAT,
        owner,
        collision: Stat::DropProtoCollision,
        now,
        len,
    };
    insert_fixed_pair(cfg, pkt, &rk, &fk, xlat, &pair)?;
    *out = xlat;
    Ok(())
}

/// A host socket opens a flow (its first packet leaves) whose replies a container's
/// masquerade entry would take: the container kept its own source port, and the host
/// picked or bound the same port towards the same peer later. The host wins: the
/// container's pair is retired, and its next packet claims a port no host socket
/// holds (the port allocator checks host sockets).
#[inline(always)]
pub fn reclaim_for_host(pkt: &Packet) {
    let opens = match pkt.l4 {
        L4::Ports if pkt.proto == IPPROTO_UDP => true,
        L4::Ports => pkt.l4_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        L4::IcmpQuery => icmp_query(pkt.l4_flags) == Some(true),
        _ => false,
    };
    if !opens || pkt.later_fragment {
        return;
    }
    let rk = CtKey::new(pkt.tuple.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    for t in [Table::Main, Table::New] {
        if let Some(r) = unsafe { table(t).get(&rk) } {
            if r.kind == ct_kind::SNAT {
                let pk = r.partner_key(&rk);
                remove_pair(t, &rk, &pk, r.owner, r.generation);
                stats::inc(Stat::CtHostReclaimed);
            }
            return;
        }
    }
    // Only a copy left (its half lost): the host takes the port all the same.
    if let Some(c) = unsafe { CT_KEEP.get(&rk) } {
        if c.kind == ct_kind::SNAT {
            let fk = CtKey::new(c.xlat.reversed(), pkt.proto, dir::UPLINK_EGRESS);
            let _ = CONNTRACK.remove(&fk);
            let _ = CT_KEEP.remove(&fk);
            let _ = CT_KEEP.remove(&rk);
            stats::inc(Stat::CtHostReclaimed);
        }
    }
}

/// The live entry for `k` in either table, without accounting a packet to it (ICMP
/// errors about a flow).
#[inline(always)]
pub fn peek(k: &CtKey) -> Option<CtEntry> {
    let e = match unsafe { CONNTRACK.get(k) } {
        Some(e) => *e,
        None => *unsafe { CT_NEW.get(k) }?,
    };
    if stale(&e) { None } else { Some(e) }
}
