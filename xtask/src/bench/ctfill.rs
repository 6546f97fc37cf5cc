//! A conntrack table of a known size for workload 6: assured TCP pairs of container a,
//! written into the eBPF topology's pinned maps as the datapath makes them (both halves
//! in `NETNS_CT`, their copies in `NETNS_CTKEEP`, the count in `NETNS_CTCOUNT`).
//! Established and just seen, so that nothing expires during the measurement; no
//! traffic runs meanwhile, so the table holds exactly what was written.

use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, Map, MapData};
use netns_common::{
    CtCount, CtEntry, CtKeep, CtKey, Endpoint, IPPROTO_TCP, Tuple, ct_flags, ct_kind, ct_state,
    dir, maps,
};
use netns_tests::Topology;

/// The bytes of a netns-common map type (`#[repr(C)]`, explicit padding, size
/// asserted there): xtask opens the maps untyped, as byte arrays.
fn bytes<T: Copy, const N: usize>(v: &T) -> [u8; N] {
    assert_eq!(size_of::<T>(), N, "size of {}", std::any::type_name::<T>());
    let mut b = [0u8; N];
    // SAFETY: `v` is N readable bytes (asserted), with no uninitialised padding (the
    // netns-common types spell theirs out as fields).
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), b.as_mut_ptr(), N) };
    b
}

fn open<const K: usize, const V: usize>(
    t: &Topology,
    name: &str,
    lru: bool,
) -> anyhow::Result<HashMap<MapData, [u8; K], [u8; V]>> {
    let pin = t.map_pin(name);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let m = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    HashMap::try_from(m).with_context(|| format!("{name} as a hash map"))
}

/// The datapath's clock (`bpf_ktime_get_coarse_ns`).
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// Entries (halves) in the pinned conntrack tables, main and unreplied.
pub fn entries(t: &Topology) -> anyhow::Result<usize> {
    let mut n = 0;
    for (name, lru) in [(maps::CONNTRACK, true), (maps::CT_NEW, true)] {
        let m = open::<16, 64>(t, name, lru)?;
        n += m.keys().filter(Result::is_ok).count();
    }
    Ok(n)
}

/// Writes `pairs` assured pairs (2 × `pairs` entries) of the container at `owner`,
/// masqueraded to `uplink`, towards 203.0.113.1-… port 443.
pub fn fill(t: &Topology, owner: Ipv4Addr, uplink: Ipv4Addr, pairs: u32) -> anyhow::Result<()> {
    let eps = open::<4, 16>(t, maps::ENDPOINTS, false)?;
    let ep = eps
        .get(&be(owner).to_ne_bytes(), 0)
        .with_context(|| format!("no endpoint for {owner}"))?;
    // SAFETY: 16 bytes read from the endpoint map, whose value is an Endpoint.
    let ep: Endpoint = unsafe { std::ptr::read_unaligned(ep.as_ptr().cast()) };
    let mut ct = open::<16, 64>(t, maps::CONNTRACK, true)?;
    let mut keep = open::<16, 24>(t, maps::CT_KEEP, false)?;
    let mut count = open::<4, 16>(t, maps::CT_COUNT, false)?;
    let now = monotonic_ns();
    for i in 0..pairs {
        let peer = Ipv4Addr::new(203, 0, 113, 1 + (i / 20_000) as u8);
        let sport = (20_000 + i % 20_000) as u16;
        let orig = Tuple {
            saddr: be(owner),
            daddr: be(peer),
            sport: sport.to_be(),
            dport: 443u16.to_be(),
        };
        let xlat = Tuple {
            saddr: be(uplink),
            ..orig
        };
        let half = |xlat: Tuple, fwd: bool| CtEntry {
            xlat,
            state: ct_state::ESTABLISHED,
            kind: ct_kind::SNAT,
            flags: ct_flags::REPLIED | ct_flags::SEQ_KNOWN | if fwd { ct_flags::FWD } else { 0 },
            created_ns: now,
            last_seen_ns: now,
            packets: 10,
            bytes: 1000,
            owner: be(owner),
            generation: ep.generation,
            ..CtEntry::default()
        };
        let fk = CtKey::new(orig, IPPROTO_TCP, dir::UPLINK_EGRESS);
        let rk = CtKey::new(xlat.reversed(), IPPROTO_TCP, dir::UPLINK_INGRESS);
        for (k, e) in [(fk, half(xlat, true)), (rk, half(orig.reversed(), false))] {
            let c = CtKeep {
                xlat: e.xlat,
                kind: e.kind,
                flags: e.flags & ct_flags::FWD,
                owner: e.owner,
                generation: e.generation,
                ..CtKeep::default()
            };
            keep.insert(bytes(&k), bytes(&c), 0)
                .context("writing NETNS_CTKEEP")?;
            ct.insert(bytes(&k), bytes(&e), 0)
                .context("writing NETNS_CT")?;
        }
    }
    let c = CtCount {
        count: pairs,
        generation: ep.generation,
        recount_ns: 0,
    };
    count
        .insert(be(owner).to_ne_bytes(), bytes(&c), 0)
        .context("writing NETNS_CTCOUNT")?;
    let n = entries(t)?;
    if n < 2 * pairs as usize {
        bail!(
            "the conntrack tables hold {n} entries after writing {}",
            2 * pairs
        );
    }
    Ok(())
}
