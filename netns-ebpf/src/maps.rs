//! Map definitions. Every map is pinned by name so that the short-lived hook, the CLI
//! and a reloaded program all share one set of maps.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use netns_common::{
    BRIDGE_PORTS_MAX_ENTRIES, BridgePort, CT_COUNT_MAX_ENTRIES, CT_MAX_ENTRIES, CT_NEW_MAX_ENTRIES,
    CT6_MAX_ENTRIES, Config, Ct6Entry, Ct6Key, CtCount, CtEntry, CtKeep, CtKey,
    ENDPOINTS_MAX_ENTRIES, Endpoint, FRAG_STASH_MAX_ENTRIES, FRAGS_MAX_ENTRIES, FRAGS6_MAX_ENTRIES,
    Frag6Key, Frag6Xlat, FragKey, FragPorts, INBOUND_MAX_ENTRIES, In6, NOMASQ_MAX_ENTRIES,
    PORT_USE_ROW, PORT_USE_ROWS, PORT_USE_TABLE, PORTS_MAX_ENTRIES, PORTS6_MAX_ENTRIES, Port6Key,
    Port6Target, PortKey, PortTarget, SOCK_REVNAT_MAX_ENTRIES, SOCK_REVNAT6_MAX_ENTRIES, Sock6Key,
    Sock6Orig, SockKey, SockOrig, StashKey, StashedFrame, Stat, empty, port_use_slot,
};

/// Both directions of every translated flow (see `CtEntry`). LRU: a full table evicts the
/// least recently used flow rather than refusing new ones.
#[map(name = "NETNS_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

/// Pairs whose reply was not seen yet (TCP: handshake not complete): a flood of them
/// (spoofed SYNs, a container spraying UDP) evicts only its own kind, never an
/// established flow. A pair moves to `CONNTRACK` once assured.
#[map(name = "NETNS_CTNEW")]
pub static CT_NEW: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_NEW_MAX_ENTRIES, 0);

/// A copy of each assured half's translation (not LRU: never evicted), so that a half
/// the LRU dropped is rebuilt on the packet that misses it while its partner lives.
#[map(name = "NETNS_CTKEEP")]
pub static CT_KEEP: HashMap<CtKey, CtKeep> = HashMap::pinned(CT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Pairs per container, for `--ct-max-per-container`.
#[map(name = "NETNS_CTCOUNT")]
pub static CT_COUNT: HashMap<u32, CtCount> = HashMap::pinned(CT_COUNT_MAX_ENTRIES, 0);

/// Both halves of every NAT66 flow (see `conntrack6`).
#[map(name = "NETNS_CT6")]
pub static CONNTRACK6: LruHashMap<Ct6Key, Ct6Entry> = LruHashMap::pinned(CT6_MAX_ENTRIES, 0);

/// The container a NAT66 reply datagram's first fragment went to, for its later
/// fragments (they carry no ports).
#[map(name = "NETNS_FRAGS6")]
pub static FRAGS6: LruHashMap<Frag6Key, Frag6Xlat> = LruHashMap::pinned(FRAGS6_MAX_ENTRIES, 0);

/// IPv6 port forwards: (host address or zero, host port, proto) -> container.
#[map(name = "NETNS_PORTS6")]
pub static PORTS6: HashMap<Port6Key, Port6Target> = HashMap::pinned(PORTS6_MAX_ENTRIES, 0);

/// IPv6 socket-level port forwards: (socket, container end) -> the host address used.
#[map(name = "NETNS_SKREV6")]
pub static SOCK_REVNAT6: LruHashMap<Sock6Key, Sock6Orig> =
    LruHashMap::pinned(SOCK_REVNAT6_MAX_ENTRIES, 0);

/// Container IPv6 addresses -> bridge port and MAC (IPv6 hairpin).
#[map(name = "NETNS_EPS6")]
pub static ENDPOINTS6: HashMap<In6, Endpoint> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

/// Host ports that a port forward or a masqueraded flow uses, a byte per port: see
/// [`port_maybe_ours`].
#[map(name = "NETNS_PORTUSE")]
pub static PORT_USE: Array<[u8; PORT_USE_ROW]> = Array::pinned(PORT_USE_ROWS, 0);

#[map(name = "NETNS_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Container addresses (network order) -> bridge port and MAC.
#[map(name = "NETNS_EPS")]
pub static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

/// Bridge ports (host veth ifindex) -> the only source MAC and IPv4 address a
/// container may send from. A port without an entry forwards nothing.
#[map(name = "NETNS_BRPORTS")]
pub static BRIDGE_PORTS: HashMap<u32, BridgePort> = HashMap::pinned(BRIDGE_PORTS_MAX_ENTRIES, 0);

/// `--allow-inbound` CIDRs: sources that may reach container addresses directly (routed
/// setups), and destinations container flows reach without masquerade (the replies
/// to those direct flows must leave with the container's own address).
#[map(name = "NETNS_INBOUND")]
pub static INBOUND: LpmTrie<u32, u8> = LpmTrie::pinned(INBOUND_MAX_ENTRIES, 0);

/// `--no-masquerade` CIDRs: destinations container flows reach with their own
/// address (routed, untracked). Replies still need `--allow-inbound`.
#[map(name = "NETNS_NOMASQ")]
pub static NOMASQ: LpmTrie<u32, u8> = LpmTrie::pinned(NOMASQ_MAX_ENTRIES, 0);

/// Port forwards: (host address or 0, host port, proto) -> container address and port.
#[map(name = "NETNS_PORTS")]
pub static PORTS: HashMap<PortKey, PortTarget> = HashMap::pinned(PORTS_MAX_ENTRIES, 0);

/// Ports of fragmented datagrams, from their first fragment.
#[map(name = "NETNS_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAGS_MAX_ENTRIES, 0);

/// Fragments that overtook their first fragment, until it arrives (LRU: an orphan
/// is evicted eventually).
#[map(name = "NETNS_FSTASH")]
pub static FRAG_STASH: LruHashMap<StashKey, StashedFrame> =
    LruHashMap::pinned(FRAG_STASH_MAX_ENTRIES, 0);

/// Per-CPU room for one frame (larger than the BPF stack).
#[map(name = "NETNS_SCRATCH")]
pub static SCRATCH: PerCpuArray<StashedFrame> = PerCpuArray::with_max_entries(1, 0);

/// Socket-level port forwards: (socket, container end) -> the host address the
/// process used.
#[map(name = "NETNS_SKREV")]
pub static SOCK_REVNAT: LruHashMap<SockKey, SockOrig> =
    LruHashMap::pinned(SOCK_REVNAT_MAX_ENTRIES, 0);

/// Per-CPU room for the two halves of a pair being made (the BPF stack is small).
#[map(name = "NETNS_CTSCR")]
pub static CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU counter of the sweep in progress (a callback's count lives here, not on
/// the stack, where the verifier would follow every value it takes).
#[map(name = "NETNS_SWEEPN")]
pub static SWEEP_COUNT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Time of the last sweep of `CT_KEEP` (rate limit; a racy write only runs one more).
#[map(name = "NETNS_SWEEPT")]
pub static SWEEP_LAST: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU time of the last datapath log line (rate limit).
#[map(name = "NETNS_LOGRL")]
pub static LOG_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Counters by `Stat`, per CPU so the fast path never contends.
#[map(name = "NETNS_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

/// Is `addr` (network order) in an `--allow-inbound` CIDR?
#[inline(always)]
pub fn inbound_allowed(cfg: &Config, addr: u32) -> bool {
    cfg.empty & empty::INBOUND == 0
        && INBOUND
            .get(aya_ebpf::maps::lpm_trie::Key::new(32, addr))
            .is_some()
}

/// Do container packets to `addr` (network order) leave untranslated? Destinations in
/// `--no-masquerade`, and `--allow-inbound` peers. (Each trie is looked up only when
/// the config does not say it is empty: two helper calls saved on every packet.)
#[inline(always)]
pub fn routed_dest(cfg: &Config, addr: u32) -> bool {
    (cfg.empty & empty::NOMASQ == 0
        && NOMASQ
            .get(aya_ebpf::maps::lpm_trie::Key::new(32, addr))
            .is_some())
        || inbound_allowed(cfg, addr)
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Can a TCP or UDP packet through the uplink to or from this host port (network
/// order) belong to a translated flow or a port forward? Ports in the NAT range may;
/// others only once marked in [`PORT_USE`] (by user space for each forward, by
/// [`mark_port_used`] for each masqueraded flow's port). A mark is never
/// taken back while the datapath lives: a stale one costs a lookup, a missing one
/// would break a flow.
#[inline(always)]
pub fn port_maybe_ours(cfg: &Config, port: u16) -> bool {
    let p = u16::from_be(port);
    if p >= cfg.nat_port_min && p <= cfg.nat_port_max {
        return true;
    }
    let (row, i) = port_use_slot(p);
    PORT_USE.get(row).is_none_or(|r| r[i] != 0)
        || PORT_USE.get(row + PORT_USE_TABLE).is_none_or(|r| r[i] != 0)
}

/// Marks host port `port` (network order) as used by a flow (see [`port_maybe_ours`]).
#[inline(always)]
pub fn mark_port_used(port: u16) {
    let (row, i) = port_use_slot(u16::from_be(port));
    if let Some(r) = PORT_USE.get_ptr_mut(row + PORT_USE_TABLE) {
        // SAFETY: a valid map value; a byte store, so CPUs marking at once lose nothing.
        // Read first: a port marked already keeps its cache line clean.
        unsafe {
            if (*r)[i] == 0 {
                (*r)[i] = 1;
            }
        }
    }
}
