//! Map definitions. Every map is pinned by name so that the short-lived hook, the CLI
//! and a reloaded program all share one set of maps.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use netns_common::{
    CT_MAX_ENTRIES, Config, CtEntry, CtKey, ENDPOINTS_MAX_ENTRIES, Endpoint,
    FRAG_STASH_MAX_ENTRIES, FRAGS_MAX_ENTRIES, FragKey, FragPorts, PORTS_MAX_ENTRIES, PortKey,
    PortTarget, SOCK_REVNAT_MAX_ENTRIES, SockKey, StashKey, StashedFrame, Stat,
};

/// Both directions of every translated flow (see `CtEntry`). LRU: a full table evicts the
/// least recently used flow rather than refusing new ones.
#[map(name = "NETNS_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

#[map(name = "NETNS_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Container addresses (network order) -> bridge port and MAC.
#[map(name = "NETNS_EPS")]
pub static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

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

/// Socket-level port forwards: container end -> the host address the process used.
#[map(name = "NETNS_SKREV")]
pub static SOCK_REVNAT: LruHashMap<SockKey, PortTarget> =
    LruHashMap::pinned(SOCK_REVNAT_MAX_ENTRIES, 0);

/// Counters by `Stat`, per CPU so the fast path never contends.
#[map(name = "NETNS_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}
