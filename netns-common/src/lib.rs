//! Types shared by the eBPF datapath (`netns-ebpf`) and user space (`netns-user`).
//!
//! Every type is `#[repr(C)]` with explicit padding (the verifier rejects reads of
//! uninitialised stack bytes, and user space must hash the same bytes as the kernel),
//! and has a size assertion. Addresses and ports are in network byte order unless a
//! field says otherwise.
#![no_std]

/// Bumped whenever a map key, value or map definition changes. It is part of the bpffs
/// pin directory name because aya reuses an existing pinned map without checking its
/// layout: a new layout must never open an old map.
pub const LAYOUT_VERSION: u32 = 6;

/// Map names; maps are pinned by these names (at most 15 bytes: `BPF_OBJ_NAME_LEN`).
pub mod maps {
    pub const CONNTRACK: &str = "NETNS_CT";
    pub const CONFIG: &str = "NETNS_CONFIG";
    pub const ENDPOINTS: &str = "NETNS_EPS";
    pub const PORTS: &str = "NETNS_PORTS";
    pub const STATS: &str = "NETNS_STATS";
    pub const FRAGS: &str = "NETNS_FRAGS";
    pub const SOCK_REVNAT: &str = "NETNS_SKREV";
    pub const FRAG_STASH: &str = "NETNS_FSTASH";
    pub const SCRATCH: &str = "NETNS_SCRATCH";
    pub const BRIDGE_PORTS: &str = "NETNS_BRPORTS";
    pub const INBOUND: &str = "NETNS_INBOUND";
    /// `--no-masquerade` destinations (an LPM trie like `INBOUND`).
    pub const NOMASQ: &str = "NETNS_NOMASQ";
    /// Pairs whose reply was not seen yet (TCP: handshake not complete).
    pub const CT_NEW: &str = "NETNS_CTNEW";
    /// A copy of every assured half's translation, to rebuild a half LRU lost.
    pub const CT_KEEP: &str = "NETNS_CTKEEP";
    /// Conntrack pairs per container (the `--ct-max-per-container` budget).
    pub const CT_COUNT: &str = "NETNS_CTCOUNT";
    /// IPv6 conntrack (NAT66): both halves of every masqueraded IPv6 flow.
    pub const CONNTRACK6: &str = "NETNS_CT6";
    /// IPv6 fragments: the translation of a datagram's first fragment, for the rest.
    pub const FRAGS6: &str = "NETNS_FRAGS6";
    /// IPv6 port forwards.
    pub const PORTS6: &str = "NETNS_PORTS6";
    /// IPv6 socket-level forwards (connect6/sendmsg6), for recvmsg6/getpeername6.
    pub const SOCK_REVNAT6: &str = "NETNS_SKREV6";
    /// Container IPv6 addresses -> bridge port and MAC (hairpin).
    pub const ENDPOINTS6: &str = "NETNS_EPS6";
    /// Host ports that a port forward or a masqueraded flow uses: the uplink passes
    /// other ports' packets (outside the NAT range) before any table lookup.
    pub const PORT_USE: &str = "NETNS_PORTUSE";
}

/// `NETNS_PORTUSE`: one byte per port (host order), nonzero once the port was used,
/// in rows of [`PORT_USE_ROW`] bytes (an array map's value). Two tables of
/// [`PORT_USE_TABLE`] rows: port forwards' host ports (written by user space, which
/// rewrites whole rows) and masqueraded flows' ports (written by the programs, a
/// byte at a time), so that neither writer can overwrite the other's marks.
pub const PORT_USE_ROW: usize = 64;
pub const PORT_USE_TABLE: u32 = (65536 / PORT_USE_ROW) as u32;
pub const PORT_USE_ROWS: u32 = 2 * PORT_USE_TABLE;

/// The row (in the port forwards' table; add [`PORT_USE_TABLE`] for the flows') and
/// the byte in it of `port` (host order) in `NETNS_PORTUSE`.
#[inline(always)]
pub const fn port_use_slot(port: u16) -> (u32, usize) {
    (
        (port as usize / PORT_USE_ROW) as u32,
        port as usize % PORT_USE_ROW,
    )
}

/// Program (function) names in the eBPF object.
pub mod progs {
    /// TC egress of the uplink: masquerade (SNAT) and reverse of port-forward DNAT.
    pub const UPLINK_EGRESS: &str = "netns_uplink_egress";
    /// TC ingress of the uplink: reverse SNAT of replies and port-forward DNAT.
    pub const UPLINK_INGRESS: &str = "netns_uplink_ingress";
    /// TC ingress of a bridge port (host end of a container's veth): source validation.
    pub const PORT_INGRESS: &str = "netns_port_ingress";
    /// cgroup connect4/sendmsg4: host processes reaching a port forward via loopback
    /// or a host address (the packets never cross a TC hook).
    pub const SOCK_CONNECT4: &str = "netns_connect4";
    pub const SOCK_SENDMSG4: &str = "netns_sendmsg4";
    /// cgroup recvmsg4/getpeername4: show the address the process asked for.
    pub const SOCK_RECVMSG4: &str = "netns_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "netns_getpeername4";
    /// cgroup bind4: a mapped host port is reserved, host processes cannot bind it.
    pub const SOCK_BIND4: &str = "netns_bind4";
    /// The same five for IPv6 (`[::1]:PORT` and the host's IPv6 addresses).
    pub const SOCK_CONNECT6: &str = "netns_connect6";
    pub const SOCK_SENDMSG6: &str = "netns_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "netns_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "netns_getpeername6";
    pub const SOCK_BIND6: &str = "netns_bind6";
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The one mapping of IP protocol numbers to names (`netns conntrack ls`, port specs).
pub const fn proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        IPPROTO_ICMP => "icmp",
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMPV6 => "icmpv6",
        47 => "gre",
        50 => "esp",
        51 => "ah",
        132 => "sctp",
        _ => return None,
    })
}

/// The protocol number of a name [`proto_name`] gives.
pub fn proto_number(name: &str) -> Option<u8> {
    (0..=u8::MAX).find(|p| proto_name(*p).is_some_and(|n| n.eq_ignore_ascii_case(name)))
}

/// The mount point of the first cgroup2 filesystem in a `/proc/self/mountinfo` text
/// (shared by the loader and the tests, which make private cgroups below it).
pub fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mount = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then_some(mount)
    })
}

/// Where in the datapath a conntrack key was seen.
pub mod dir {
    /// Leaving through the uplink (TC egress): the entry rewrites the source.
    pub const UPLINK_EGRESS: u8 = 0;
    /// Arriving on the uplink (TC ingress): the entry rewrites the destination.
    pub const UPLINK_INGRESS: u8 = 1;
    /// Arriving from a container on its bridge port (hairpin to a port forward): the
    /// entry rewrites both ends and the packet is redirected to the target's port.
    pub const BRIDGE: u8 = 2;
}

/// An L4 tuple. For ICMP echo the identifier stands in for the port: it is `sport` of
/// a request and `dport` of a reply, the other port being 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<Tuple>() == 12);

impl Tuple {
    /// The tuple a reply to this packet carries.
    #[inline(always)]
    pub const fn reversed(&self) -> Tuple {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// Conntrack key: the tuple as seen at one hook point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub tuple: Tuple,
    pub proto: u8,
    /// One of [`dir`].
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

impl CtKey {
    /// The key of `tuple` (protocol `proto`) at hook point `dir`, padding zeroed.
    #[inline(always)]
    pub const fn new(tuple: Tuple, proto: u8, dir: u8) -> CtKey {
        CtKey {
            tuple,
            proto,
            dir,
            _pad: [0; 2],
        }
    }
}

/// What created a conntrack entry.
pub mod ct_kind {
    /// Masquerade of a flow a container opened.
    pub const SNAT: u8 = 1;
    /// Port forward of a flow a peer opened.
    pub const DNAT: u8 = 2;
    /// A container reaching a port forward through the host's address (hairpin).
    pub const HAIRPIN: u8 = 3;
}

/// Connection states, a coarse version of Linux conntrack's.
pub mod ct_state {
    pub const NEW: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    pub const FIN_WAIT: u8 = 2;
    pub const CLOSE: u8 = 3;
}

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// The half of the packet that opened the flow (the pair is counted there).
    pub const FWD: u8 = 1;
    /// A packet of the other direction was seen (set on both halves).
    pub const REPLIED: u8 = 2;
    /// UDP: replied and still active more than 2 s after creation (Linux's stream
    /// state, 120 s instead of 30 s).
    pub const STREAM: u8 = 4;
    /// TCP: `seq_end` and `win` hold values seen on the wire.
    pub const SEQ_KNOWN: u8 = 8;
}

/// Conntrack value: what a packet matching the key is rewritten to. Each flow has two
/// entries, one per direction; the other entry's key is `xlat.reversed()` at the other
/// hook point (see `partner_dir`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtEntry {
    pub xlat: Tuple,
    /// One of [`ct_state`], kept the same on both halves.
    pub state: u8,
    /// One of [`ct_kind`].
    pub kind: u8,
    /// Bits of [`ct_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at a tick's resolution) at creation.
    pub created_ns: u64,
    /// The same clock at the last packet in this direction.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The container the flow belongs to (network order): the masqueraded source, the
    /// port forward's target, the hairpinning client.
    pub owner: u32,
    /// The owner's endpoint generation at creation: an entry whose owner has gone (or
    /// whose address a new container took) is stale and treated as absent.
    pub generation: u32,
    /// TCP: the sequence number after the last segment this direction's sender sent.
    pub seq_end: u32,
    /// TCP: the raw (unscaled) window this direction's sender last advertised.
    pub win: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 64);

/// The hook point of the other half of a pair whose half is at `dir`.
#[inline(always)]
pub const fn partner_dir(d: u8) -> u8 {
    match d {
        dir::UPLINK_EGRESS => dir::UPLINK_INGRESS,
        dir::UPLINK_INGRESS => dir::UPLINK_EGRESS,
        _ => dir::BRIDGE,
    }
}

impl CtEntry {
    /// The key of this half's partner, given this half's key.
    #[inline(always)]
    pub const fn partner_key(&self, key: &CtKey) -> CtKey {
        CtKey::new(self.xlat.reversed(), key.proto, partner_dir(key.dir))
    }
}

/// What `NETNS_CTKEEP` remembers of an assured half: enough to rebuild it while its
/// partner lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtKeep {
    pub xlat: Tuple,
    pub kind: u8,
    /// [`ct_flags::FWD`] or 0.
    pub flags: u8,
    pub _pad: [u8; 2],
    pub owner: u32,
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<CtKeep>() == 24);

/// A container's conntrack pairs (`NETNS_CTCOUNT`, keyed by its address). LRU evictions
/// are not seen, so `count` can only be too high; a sweep recounts it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtCount {
    pub count: u32,
    /// The endpoint generation the count belongs to (reset when it changes).
    pub generation: u32,
    /// When the last recount ran (`bpf_ktime_get_ns`).
    pub recount_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtCount>() == 16);

/// The datapath's settings: one entry of an array map, rewritten by user space when the
/// uplink address changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Container subnet and mask (network order): sources inside it are masqueraded.
    pub subnet: u32,
    pub subnet_mask: u32,
    /// The bridge's own address: traffic to it is never translated.
    pub gateway: u32,
    /// The uplink's IPv4 address, the masquerade source. 0 = not known: pass untouched.
    pub uplink_addr: u32,
    pub uplink_ifindex: u32,
    pub bridge_ifindex: u32,
    /// Range for masquerade source ports when the original is taken (host byte order).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The bridge's MAC: source of hairpinned frames redirected to a container.
    pub bridge_mac: [u8; 6],
    /// 1: translated packets bypass the host stack (`--fast-path on`).
    pub fast_path: u8,
    /// 1: conntrack entries count packets and bytes (`--ct-counters on`).
    pub ct_counters: u8,
    /// [`empty`] bits: tries known to be empty, whose lookups the programs skip. Zero
    /// (a fresh map, or one an older version wrote) means look them up.
    pub empty: u8,
    pub _pad: [u8; 3],
    /// Cookie of the network namespace netns manages: socket hooks act only there.
    pub netns_cookie: u64,
    /// Conntrack timeouts (seconds): the datapath expires entries by them on lookup,
    /// the collector and the in-kernel sweep too.
    pub timeouts: Timeouts,
    /// Most conntrack pairs one container may hold (0: no limit).
    pub ct_per_container: u32,
    /// Random salt of the NAT port probe sequence (set once at load).
    pub port_seed: u32,
    /// IPv6 (`--ip6`): the container prefix and its mask (all zero: IPv6 off, every
    /// IPv6 frame from a container is dropped, the host's own passes untouched).
    pub subnet6: In6,
    pub subnet6_mask: In6,
    /// The bridge's IPv6 gateway address: traffic to it is never translated.
    pub gateway6: In6,
    /// The uplink's global IPv6 address, the NAT66 source (zero: not known: container
    /// IPv6 to the outside is dropped, counted `drop_ipv6_off`, never sent with its
    /// private source).
    pub uplink_addr6: In6,
}
const _: () = assert!(core::mem::size_of::<Config>() == 152);

/// Bits of [`Config::empty`].
pub mod empty {
    /// `--no-masquerade` has no CIDR.
    pub const NOMASQ: u8 = 1;
    /// `--allow-inbound` has no CIDR.
    pub const INBOUND: u8 = 2;
}

/// An IPv6 address as four 32-bit words, each in network order (the bytes of the
/// address in order): compared and masked a word at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct In6(pub [u32; 4]);
const _: () = assert!(core::mem::size_of::<In6>() == 16);

impl In6 {
    pub const ZERO: In6 = In6([0; 4]);

    #[inline(always)]
    pub const fn is_zero(&self) -> bool {
        self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
    }

    /// `self & mask == net`.
    #[inline(always)]
    pub const fn in_prefix(&self, net: &In6, mask: &In6) -> bool {
        (self.0[0] & mask.0[0]) == net.0[0]
            && (self.0[1] & mask.0[1]) == net.0[1]
            && (self.0[2] & mask.0[2]) == net.0[2]
            && (self.0[3] & mask.0[3]) == net.0[3]
    }

    /// From the 16 bytes of an address (`Ipv6Addr::octets`).
    pub const fn from_octets(o: [u8; 16]) -> In6 {
        let mut w = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            w[i] = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            i += 1;
        }
        In6(w)
    }

    /// The 16 bytes of the address.
    pub const fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.0[i].to_ne_bytes();
            o[i * 4] = b[0];
            o[i * 4 + 1] = b[1];
            o[i * 4 + 2] = b[2];
            o[i * 4 + 3] = b[3];
            i += 1;
        }
        o
    }
}

/// An IPv6 L4 tuple; ICMPv6 echo as [`Tuple`] (identifier for the port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tuple6 {
    pub saddr: In6,
    pub daddr: In6,
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<Tuple6>() == 36);

impl Tuple6 {
    #[inline(always)]
    pub const fn reversed(&self) -> Tuple6 {
        Tuple6 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// IPv6 conntrack key (`NETNS_CT6`): as [`CtKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    pub tuple: Tuple6,
    pub proto: u8,
    /// [`dir::UPLINK_EGRESS`] or [`dir::UPLINK_INGRESS`].
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);

impl Ct6Key {
    #[inline(always)]
    pub const fn new(tuple: Tuple6, proto: u8, dir: u8) -> Ct6Key {
        Ct6Key {
            tuple,
            proto,
            dir,
            _pad: [0; 2],
        }
    }
}

/// IPv6 conntrack value: what a packet matching the key is rewritten to; the other
/// half's key is `xlat.reversed()` at the partner hook point, as for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Ct6Entry {
    pub xlat: Tuple6,
    /// [`ct_state`], [`ct_kind`], [`ct_flags`] as for IPv4.
    pub state: u8,
    pub kind: u8,
    pub flags: u8,
    pub _pad: u8,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The container the flow belongs to.
    pub owner: In6,
}
const _: () = assert!(core::mem::size_of::<Ct6Entry>() == 88);

impl Ct6Entry {
    #[inline(always)]
    pub const fn partner_key(&self, key: &Ct6Key) -> Ct6Key {
        Ct6Key::new(self.xlat.reversed(), key.proto, partner_dir(key.dir))
    }
}

/// IPv6 fragment key: (source, destination, identification of the Fragment header).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag6Key {
    pub saddr: In6,
    pub daddr: In6,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Frag6Key>() == 40);

/// What a first IPv6 fragment was translated to: the later fragments' new source
/// (egress) or destination (ingress).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag6Xlat {
    pub addr: In6,
}
const _: () = assert!(core::mem::size_of::<Frag6Xlat>() == 16);

/// IPv6 port-forward key. `host_addr` zero matches any local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Port6Key {
    pub host_addr: In6,
    pub host_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Port6Key>() == 20);

/// IPv6 port-forward target, as [`PortTarget`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Port6Target {
    pub addr: In6,
    pub port: u16,
    /// Bits of [`port_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// As [`PortTarget::ifindex`] ([`LOOPBACK_IFINDEX`]: a `[::1]` mapping).
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Port6Target>() == 24);

/// An IPv6 socket-level translation, as [`SockKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Sock6Key {
    pub cookie: u64,
    pub addr: In6,
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<Sock6Key>() == 32);

/// The host address an IPv6 socket-level forward replaced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sock6Orig {
    pub addr: In6,
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Sock6Orig>() == 20);

pub const CT6_MAX_ENTRIES: u32 = 65_536;
pub const PORTS6_MAX_ENTRIES: u32 = 65_536;
pub const SOCK_REVNAT6_MAX_ENTRIES: u32 = 65_536;
pub const FRAGS6_MAX_ENTRIES: u32 = 4_096;

/// Conntrack timeouts in seconds, by state; defaults are Linux conntrack's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flow whose SYN was not answered yet (nf_conntrack_tcp_timeout_syn_sent).
    pub tcp_syn: u32,
    pub tcp_established: u32,
    /// After a FIN (fin_wait / time_wait).
    pub tcp_fin: u32,
    /// After a RST (close).
    pub tcp_close: u32,
    /// UDP seen in one direction only, and once replies were seen (udp_stream).
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    /// Protocols without ports (GRE, ESP, SCTP...), masqueraded by address only
    /// (nf_conntrack_generic_timeout).
    pub generic: u32,
}
const _: () = assert!(core::mem::size_of::<Timeouts>() == 32);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: 120,
            tcp_established: 432_000,
            tcp_fin: 120,
            tcp_close: 10,
            udp: 30,
            udp_stream: 120,
            icmp: 30,
            generic: 600,
        }
    }
}

/// A container attached to the bridge, keyed by its IPv4 address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Ifindex of the host end of the container's veth (the bridge port).
    pub ifindex: u32,
    /// The container's `eth0` MAC address.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Nonzero, different for every container that held this address
    /// ([`endpoint_generation`] of its ID): conntrack entries of an earlier one are stale.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 16);

/// One's-complement checksum arithmetic for headers the datapath rewrites in place
/// (RFC 1624). Words are taken as they lie in memory (`from_ne_bytes` of the wire
/// bytes): the one's-complement sum does not depend on the byte order, so neither the
/// datapath nor these functions swap anything.
pub mod csum {
    /// Folds a 32-bit sum of 16-bit words to 16 bits with end-around carry.
    #[inline(always)]
    pub const fn fold(s: u32) -> u16 {
        let s = (s & 0xffff) + (s >> 16);
        ((s & 0xffff) + (s >> 16)) as u16
    }

    /// The checksum `check` after the 16-bit word `old` became `new`
    /// (HC' = ~(~HC + ~m + m')).
    #[inline(always)]
    pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
        !fold(!check as u32 + !old as u32 + new as u32)
    }

    /// The checksum `check` after the 32-bit field `old` (two words) became `new`.
    #[inline(always)]
    pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
        !fold(!check as u32 + (!old & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16))
    }
}

/// 32-bit FNV-1a of `bytes`: stable across builds and platforms, for names and
/// generations that must come out the same in every run.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// An endpoint's generation from its container ID (FNV-1a, never 0).
pub fn endpoint_generation(container_id: &str) -> u32 {
    match fnv1a(container_id.bytes()) {
        0 => 1,
        h => h,
    }
}

/// Port-forward key. `host_addr` 0 matches any local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub host_addr: u32,
    pub host_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);

/// Port-forward target: the container address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortTarget {
    pub addr: u32,
    pub port: u16,
    /// Bits of [`port_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// The interface the mapping's host address belongs to: a packet matches only when
    /// it arrives there (0: a wildcard mapping, any host address; [`LOOPBACK_IFINDEX`]:
    /// a 127/8 mapping, reachable from host processes only).
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<PortTarget>() == 12);

/// [`PortTarget::flags`].
pub mod port_flags {
    /// The container runtime holds the host port itself (podman's conmon opens a
    /// placeholder socket on every published port): a host bind of it is let through.
    pub const RUNTIME_BINDS: u8 = 1;
}

/// `lo` is ifindex 1 in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The host address a socket-level forward replaced, for one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockOrig {
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockOrig>() == 8);

/// A bridge port (host end of a container's veth), keyed by its ifindex: what may
/// leave the container through it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BridgePort {
    /// The container's IPv4 address (network order).
    pub addr: u32,
    /// The container's `eth0` MAC: the only source MAC accepted on the port.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The container's IPv6 address (zero: none, the port forwards no IPv6 but the
    /// container's link-local neighbour discovery).
    pub addr6: In6,
}
const _: () = assert!(core::mem::size_of::<BridgePort>() == 28);

/// Key of the `NETNS_INBOUND` and `NETNS_NOMASQ` LPM tries (`--allow-inbound`,
/// `--no-masquerade` CIDRs): the layout of
/// `bpf_lpm_trie_key` with an IPv4 address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundKey {
    pub prefix_len: u32,
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 8);

pub const INBOUND_MAX_ENTRIES: u32 = 1024;
pub const NOMASQ_MAX_ENTRIES: u32 = 1024;
pub const BRIDGE_PORTS_MAX_ENTRIES: u32 = 65_536;

/// A socket-level translation, keyed by the socket (its cookie) and the container end
/// (address, port, proto), so that recvmsg4/getpeername4 show each socket the host
/// address it used, even when two sockets reach one container port two ways.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 16);

/// IPv4 fragment key: later fragments carry no L4 header and take their ports from the
/// first fragment of the same datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// A held fragment: which datagram, and which of its held fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StashKey {
    pub frag: FragKey,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<StashKey>() == 16);

/// Largest frame (Ethernet header included) that can be held.
pub const STASH_FRAME_MAX: usize = 1536;
/// Fragments held per datagram before its first fragment arrives.
pub const STASH_SLOTS: u32 = 8;

/// A frame held until the first fragment of its datagram arrives.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StashedFrame {
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; STASH_FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<StashedFrame>() == 8 + STASH_FRAME_MAX);

/// What the first fragment of a datagram said, for its later fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    /// 1: the datagram is the host's own (its first fragment matched no flow): later
    /// fragments pass untouched, with no stash.
    pub host: u8,
    pub _pad: [u8; 3],
    /// The addresses the first fragment was translated to (egress and hairpin; 0: not
    /// recorded), and the bridge port a hairpinned datagram was redirected to.
    pub saddr: u32,
    pub daddr: u32,
    pub ifindex: u32,
    /// IP payload bytes of the fragments seen, and where the datagram ends (known once
    /// its last fragment passed): the entry goes when the two meet.
    pub seen: u32,
    pub total: u32,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 28);

/// Indexes into the per-CPU counter array. Every drop has its own reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Packets whose source was masqueraded on the way out.
    SnatPackets = 0,
    /// Replies translated back to a container on the way in.
    SnatReplyPackets,
    /// Packets of new flows that created a conntrack pair.
    CtCreated,
    /// Packets translated by port-forward DNAT on the way in.
    DnatPackets,
    /// Replies of port-forwarded flows translated on the way out.
    DnatReplyPackets,
    /// Reverse halves found missing (evicted) on the egress fast path and rebuilt.
    CtRebuilt,
    /// Forward halves retired because their port was claimed by another flow since.
    CtRetired,
    /// Entries user space deleted (GC, flush, container removal): with the counters
    /// above and `ct_created` it lets `netns stats` derive LRU evictions.
    CtUserRemoved,
    /// Packets that passed a bridge port's source check.
    PortPassed,
    /// Source port searches that needed retries, by how many: a histogram of NAT
    /// port pressure (1, 2-3, 4-7, 8-16 probes).
    PortRetries1,
    PortRetries2To3,
    PortRetries4To7,
    PortRetries8To16,
    /// The original source port was kept (free on the uplink).
    PortKept,
    /// The original source port was in use by a host socket: one from the NAT range
    /// was taken instead.
    PortHostSocket,
    DropPortExhausted,
    DropSpoofedIp,
    DropSpoofedMac,
    DropMalformed,
    DropCsumHelper,
    DropCtInsert,
    DropFragNoFirst,
    /// Hairpin: a container reached a port forward through a host address.
    HairpinPackets,
    /// Host sockets redirected to a container by connect4/sendmsg4.
    SockRedirects,
    /// bind() of a mapped host port refused.
    SockBindDenied,
    DropNoEndpoint,
    /// ICMP errors about tracked flows translated (outer and quoted headers).
    IcmpErrors,
    /// Later fragments of a container's datagram translated by address only.
    FragAddrOnly,
    /// Fragments that arrived before their first fragment, held in a map.
    FragStashed,
    /// Held fragments sent on once their first fragment arrived.
    FragReplayed,
    /// A fragment too large to hold, or no free slot for its datagram.
    DropFragStash,
    /// A packet from outside to a container address that belongs to no flow or port
    /// forward (and whose source is not in `--allow-inbound`).
    DropInbound,
    /// A packet from outside whose source is in the bridge subnet.
    DropInboundSpoofed,
    /// A frame from a container of an ethertype the datapath does not know.
    DropEthertype,
    /// ICMP a container may not send: redirects and router adverts to the host, and
    /// types with nothing to translate on the way out.
    DropIcmpType,
    /// Address-only masquerade (protocols without ports): another container already
    /// talks that protocol to that peer.
    DropProtoCollision,
    /// Packets of protocols without ports masqueraded by address only.
    ProtoAddrOnly,
    /// Later fragments of the host's own datagrams passed untouched.
    FragHost,
    /// Container flows retired because a host socket opened a flow on the same tuple.
    CtHostReclaimed,
    /// Datapath log lines dropped by the rate limit.
    LogSuppressed,
    /// Packets to a mapped port left to a host socket that owns the flow.
    HostSocketPassed,
    /// A new pair refused: its container holds `--ct-max-per-container` pairs.
    DropCtBudget,
    /// A TCP segment other than a SYN to a mapped port, with no flow: no state is made.
    DropTcpNoState,
    /// Entries found idle past their timeout on lookup and removed (lazy expiry).
    CtExpired,
    /// Entries of a container that is gone (or whose address a new one took) removed.
    CtStale,
    /// Pairs moved from the unreplied table to the main one (reply seen, handshake done).
    CtPromoted,
    /// A TCP RST outside the window: ignored, the flow stays.
    TcpBlindRst,
    /// A new SYN on a closed TCP flow's tuple: the old pair was replaced.
    CtReopened,
    /// In-kernel conntrack sweeps (budget recounts).
    CtSweeps,
    /// An assured pair without a copy in NETNS_CTKEEP (it was full): not repairable.
    CtUnkept,
    /// Fast path: packets from the uplink delivered into a container's namespace.
    FastIn,
    /// Fast path: container packets translated at their bridge port and sent out.
    FastOut,
    /// Fast path: container-to-container packets sent to the other veth peer.
    FastLocal,
    /// Container packets that left through the uplink untranslated because their
    /// destination is in `--no-masquerade` (or `--allow-inbound`): routed, no flow.
    NomasqOut,
    /// IPv6 packets masqueraded (NAT66) on the way out.
    Snat6Packets,
    /// IPv6 replies translated back to a container on the way in.
    Snat6ReplyPackets,
    /// IPv6 flows that created a conntrack pair.
    Ct6Created,
    /// ICMPv6 errors about NAT66 flows translated (outer and quoted headers).
    Icmp6Errors,
    /// IPv6 from a container while IPv6 is off (`--ip6` not given) or with no address.
    DropIpv6Off,
    /// A neighbour advertisement from a container for an address not its own.
    DropSpoofedNd,
    /// IPv6 with more extension headers than the datapath walks.
    DropIpv6ExtHdrs,
    /// IPv6 packets translated by port-forward DNAT on the way in.
    Dnat6Packets,
    /// Replies of IPv6 port-forwarded flows translated on the way out.
    Dnat6ReplyPackets,
    /// IPv6 hairpin: a container reached a port forward through a host address.
    Hairpin6Packets,
    /// TCP/UDP through the uplink to or from a host port no translated flow or port
    /// forward uses: passed before any table lookup (the host's own traffic).
    HostPortPassed,
}

impl Stat {
    pub const COUNT: u32 = Stat::HostPortPassed as u32 + 1;

    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::SnatPackets,
        Stat::SnatReplyPackets,
        Stat::CtCreated,
        Stat::DnatPackets,
        Stat::DnatReplyPackets,
        Stat::CtRebuilt,
        Stat::CtRetired,
        Stat::CtUserRemoved,
        Stat::PortPassed,
        Stat::PortRetries1,
        Stat::PortRetries2To3,
        Stat::PortRetries4To7,
        Stat::PortRetries8To16,
        Stat::PortKept,
        Stat::PortHostSocket,
        Stat::DropPortExhausted,
        Stat::DropSpoofedIp,
        Stat::DropSpoofedMac,
        Stat::DropMalformed,
        Stat::DropCsumHelper,
        Stat::DropCtInsert,
        Stat::DropFragNoFirst,
        Stat::HairpinPackets,
        Stat::SockRedirects,
        Stat::SockBindDenied,
        Stat::DropNoEndpoint,
        Stat::IcmpErrors,
        Stat::FragAddrOnly,
        Stat::FragStashed,
        Stat::FragReplayed,
        Stat::DropFragStash,
        Stat::DropInbound,
        Stat::DropInboundSpoofed,
        Stat::DropEthertype,
        Stat::DropIcmpType,
        Stat::DropProtoCollision,
        Stat::ProtoAddrOnly,
        Stat::FragHost,
        Stat::CtHostReclaimed,
        Stat::LogSuppressed,
        Stat::HostSocketPassed,
        Stat::DropCtBudget,
        Stat::DropTcpNoState,
        Stat::CtExpired,
        Stat::CtStale,
        Stat::CtPromoted,
        Stat::TcpBlindRst,
        Stat::CtReopened,
        Stat::CtSweeps,
        Stat::CtUnkept,
        Stat::FastIn,
        Stat::FastOut,
        Stat::FastLocal,
        Stat::NomasqOut,
        Stat::Snat6Packets,
        Stat::Snat6ReplyPackets,
        Stat::Ct6Created,
        Stat::Icmp6Errors,
        Stat::DropIpv6Off,
        Stat::DropSpoofedNd,
        Stat::DropIpv6ExtHdrs,
        Stat::Dnat6Packets,
        Stat::Dnat6ReplyPackets,
        Stat::Hairpin6Packets,
        Stat::HostPortPassed,
    ];

    /// Stable name used by `netns stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::SnatPackets => "snat_packets",
            Stat::SnatReplyPackets => "snat_reply_packets",
            Stat::CtCreated => "ct_created",
            Stat::DnatPackets => "dnat_packets",
            Stat::DnatReplyPackets => "dnat_reply_packets",
            Stat::CtRebuilt => "ct_rebuilt",
            Stat::CtRetired => "ct_retired",
            Stat::CtUserRemoved => "ct_user_removed",
            Stat::PortPassed => "port_passed",
            Stat::PortRetries1 => "port_retries_1",
            Stat::PortRetries2To3 => "port_retries_2_3",
            Stat::PortRetries4To7 => "port_retries_4_7",
            Stat::PortRetries8To16 => "port_retries_8_16",
            Stat::PortKept => "port_kept",
            Stat::PortHostSocket => "port_host_socket",
            Stat::DropPortExhausted => "drop_port_exhausted",
            Stat::DropSpoofedIp => "drop_spoofed_ip",
            Stat::DropSpoofedMac => "drop_spoofed_mac",
            Stat::DropMalformed => "drop_malformed",
            Stat::DropCsumHelper => "drop_csum_helper",
            Stat::DropCtInsert => "drop_ct_insert",
            Stat::DropFragNoFirst => "drop_frag_no_first",
            Stat::HairpinPackets => "hairpin_packets",
            Stat::SockRedirects => "sock_redirects",
            Stat::SockBindDenied => "sock_bind_denied",
            Stat::DropNoEndpoint => "drop_no_endpoint",
            Stat::IcmpErrors => "icmp_errors",
            Stat::FragAddrOnly => "frag_addr_only",
            Stat::FragStashed => "frag_stashed",
            Stat::FragReplayed => "frag_replayed",
            Stat::DropFragStash => "drop_frag_stash",
            Stat::DropInbound => "drop_inbound",
            Stat::DropInboundSpoofed => "drop_inbound_spoofed",
            Stat::DropEthertype => "drop_ethertype",
            Stat::DropIcmpType => "drop_icmp_type",
            Stat::DropProtoCollision => "drop_proto_collision",
            Stat::ProtoAddrOnly => "proto_addr_only",
            Stat::FragHost => "frag_host",
            Stat::CtHostReclaimed => "ct_host_reclaimed",
            Stat::LogSuppressed => "log_suppressed",
            Stat::HostSocketPassed => "host_socket_passed",
            Stat::DropCtBudget => "drop_ct_budget",
            Stat::DropTcpNoState => "drop_tcp_no_state",
            Stat::CtExpired => "ct_expired",
            Stat::CtStale => "ct_stale",
            Stat::CtPromoted => "ct_promoted",
            Stat::TcpBlindRst => "tcp_blind_rst",
            Stat::CtReopened => "ct_reopened",
            Stat::CtSweeps => "ct_sweeps",
            Stat::CtUnkept => "ct_unkept",
            Stat::FastIn => "fast_in",
            Stat::FastOut => "fast_out",
            Stat::FastLocal => "fast_local",
            Stat::NomasqOut => "nomasq_out",
            Stat::Snat6Packets => "snat6_packets",
            Stat::Snat6ReplyPackets => "snat6_reply_packets",
            Stat::Ct6Created => "ct6_created",
            Stat::Icmp6Errors => "icmp6_errors",
            Stat::DropIpv6Off => "drop_ipv6_off",
            Stat::DropSpoofedNd => "drop_spoofed_nd",
            Stat::DropIpv6ExtHdrs => "drop_ipv6_ext_hdrs",
            Stat::Dnat6Packets => "dnat6_packets",
            Stat::Dnat6ReplyPackets => "dnat6_reply_packets",
            Stat::Hairpin6Packets => "hairpin6_packets",
            Stat::HostPortPassed => "host_port_passed",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Stat::DropPortExhausted
                | Stat::DropSpoofedIp
                | Stat::DropSpoofedMac
                | Stat::DropMalformed
                | Stat::DropCsumHelper
                | Stat::DropCtInsert
                | Stat::DropFragNoFirst
                | Stat::DropNoEndpoint
                | Stat::DropFragStash
                | Stat::DropInbound
                | Stat::DropInboundSpoofed
                | Stat::DropEthertype
                | Stat::DropIcmpType
                | Stat::DropProtoCollision
                | Stat::DropCtBudget
                | Stat::DropTcpNoState
                | Stat::TcpBlindRst
                | Stat::DropIpv6Off
                | Stat::DropSpoofedNd
                | Stat::DropIpv6ExtHdrs
        )
    }
}

/// Map sizes (user space may override with `EbpfLoader::map_max_entries`).
pub const CT_MAX_ENTRIES: u32 = 262_144;
pub const ENDPOINTS_MAX_ENTRIES: u32 = 65_536;
pub const PORTS_MAX_ENTRIES: u32 = 131_072;
pub const FRAGS_MAX_ENTRIES: u32 = 8_192;
pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;
pub const FRAG_STASH_MAX_ENTRIES: u32 = 256;
/// The unreplied table is this fraction of the main one (never under 16 entries).
pub const CT_NEW_DIVISOR: u32 = 4;
pub const CT_NEW_MAX_ENTRIES: u32 = CT_MAX_ENTRIES / CT_NEW_DIVISOR;
pub const CT_COUNT_MAX_ENTRIES: u32 = 65_536;
/// Default `--ct-max-per-container`: a quarter of the default table.
pub const CT_PER_CONTAINER_DEFAULT: u32 = CT_MAX_ENTRIES / 4;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for Tuple {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortTarget {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockOrig {}
    unsafe impl aya::Pod for BridgePort {}
    unsafe impl aya::Pod for InboundKey {}
    unsafe impl aya::Pod for Timeouts {}
    unsafe impl aya::Pod for CtKeep {}
    unsafe impl aya::Pod for CtCount {}
    unsafe impl aya::Pod for In6 {}
    unsafe impl aya::Pod for Tuple6 {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Entry {}
    unsafe impl aya::Pod for Frag6Key {}
    unsafe impl aya::Pod for Frag6Xlat {}
    unsafe impl aya::Pod for Port6Key {}
    unsafe impl aya::Pod for Port6Target {}
    unsafe impl aya::Pod for Sock6Key {}
    unsafe impl aya::Pod for Sock6Orig {}
}

#[cfg(test)]
mod tests {
    /// The IPv4 header checksum from scratch, words as they lie in memory.
    fn ip_csum(h: &[u8; 20]) -> u16 {
        let mut s = 0u32;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                s += u16::from_ne_bytes([w[0], w[1]]) as u32;
            }
        }
        !csum::fold(s)
    }

    #[test]
    fn incremental_checksums_match_a_recompute() {
        let mut h: [u8; 20] = [
            0x45, 0, 0, 84, 0x1c, 0x46, 0x40, 0, 64, 17, 0, 0, 172, 19, 0, 2, 198, 51, 100, 1,
        ];
        let c = ip_csum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        // Source address rewritten (SNAT), then the TTL decremented, as the fast path does.
        for (new, ttl) in [
            ([198, 51, 100, 2], 63u8),
            ([255, 255, 255, 255], 1),
            ([0; 4], 0),
        ] {
            let old = u32::from_ne_bytes(h[12..16].try_into().unwrap());
            let n = u32::from_ne_bytes(new);
            let c = csum::replace4(u16::from_ne_bytes([h[10], h[11]]), old, n);
            h[12..16].copy_from_slice(&new);
            let w = u16::from_ne_bytes([h[8], h[9]]);
            h[8] = ttl;
            let c = csum::replace2(c, w, u16::from_ne_bytes([h[8], h[9]]));
            h[10..12].copy_from_slice(&c.to_ne_bytes());
            assert_eq!(c, ip_csum(&h), "after {new:?} ttl {ttl}");
        }
    }

    use super::*;

    #[test]
    fn protocol_names_round_trip() {
        assert_eq!(proto_name(IPPROTO_TCP), Some("tcp"));
        assert_eq!(proto_name(47), Some("gre"));
        assert_eq!(proto_name(200), None);
        for p in [IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, 47, 50, 51, 132] {
            assert_eq!(proto_number(proto_name(p).unwrap()), Some(p));
        }
        assert_eq!(proto_number("UDP"), Some(IPPROTO_UDP));
        assert_eq!(proto_number("quic"), None);
    }

    #[test]
    fn fnv1a_is_the_reference_hash() {
        // Reference values: FNV-1a 32 of "" and "a".
        assert_eq!(fnv1a([]), 0x811c_9dc5);
        assert_eq!(fnv1a(*b"a"), 0xe40c_292c);
        assert_eq!(endpoint_generation("abc"), 440_920_331);
    }

    #[test]
    fn in6_words_are_the_address_bytes() {
        let a = [0xfd, 0, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let w = In6::from_octets(a);
        assert_eq!(w.octets(), a);
        assert_eq!(u32::from_be(w.0[0]), 0xfd00_0019);
        let net = In6::from_octets([0xfd, 0, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mask = In6([u32::MAX, u32::MAX, 0, 0]);
        assert!(w.in_prefix(&net, &mask));
        assert!(
            !In6::from_octets([0xfd, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5])
                .in_prefix(&net, &mask)
        );
        assert!(In6::ZERO.is_zero() && !w.is_zero());
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let mi = "35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                  36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(mi), Some("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_mount("1 2 0:3 / / rw - ext4 /dev/vda rw\n"), None);
    }
}
