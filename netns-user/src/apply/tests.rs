//! Unit tests of the pure part of apply: the desired state and the plan.

use super::*;
use crate::portmap::Proto;

fn lease(ip: Ipv4Addr, ifindex: u32, complete: bool) -> Lease {
    Lease {
        ip,
        prefix_len: 16,
        gateway: Ipv4Addr::new(172, 19, 0, 1),
        ip6: None,
        prefix6_len: None,
        gateway6: None,
        pid: 1,
        pid_start: None,
        netns_ino: None,
        host_veth: format!("netnsv0-{ifindex}"),
        host_ifindex: ifindex,
        mac: Some("02:00:00:00:00:0a".into()),
        bridge: "netns0".into(),
        created_unix: 0,
        complete,
        ifname: None,
        cni: None,
    }
}

fn mapping(id: &str, ip: Ipv4Addr, host_ip: Option<Ipv4Addr>, port: u16) -> Mapping {
    Mapping {
        container_id: id.into(),
        container_ip: ip,
        proto: Proto::Tcp,
        host_ip,
        host_port: port,
        container_port: 80,
        runtime_binds: false,
        family: if host_ip.is_some() {
            crate::portmap::Family::V4
        } else {
            crate::portmap::Family::Both
        },
        host_ip6: None,
        container_ip6: None,
    }
}

const A: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 3);
const ORPHAN: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 9);
const NOT_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// `a` complete with a wildcard forward and one on an address that is not local
/// now; `b` incomplete (its teardown failed) with a forward.
fn state() -> Desired {
    let leases = BTreeMap::from([
        ("a".into(), lease(A, 7, true)),
        ("b".into(), lease(B, 8, false)),
    ]);
    let table = [
        mapping("a", A, None, 8080),
        mapping("a", A, Some(NOT_LOCAL), 8081),
        mapping("b", B, None, 9090),
        mapping("gone", ORPHAN, None, 7000),
    ];
    desired(&leases, &table, &LocalAddrs::default())
}

#[test]
fn desired_state_of_leases_and_table() {
    let d = state();
    let ep = d.maps.endpoints[&A];
    assert_eq!(
        (d.maps.endpoints.len(), ep.ifindex, ep.mac),
        (1, 7, [2, 0, 0, 0, 0, 10])
    );
    assert_eq!(
        d.maps.bridge_ports[&7],
        BridgePort {
            ip: A,
            ip6: None,
            mac: ep.mac
        }
    );
    assert_eq!(d.port_links, BTreeMap::from([(7, "netnsv0-7".to_owned())]));
    assert_eq!(d.keep_ips, HashSet::from([B]));
    let f: Vec<_> = d.maps.forwards.values().collect();
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].host_port, f[0].ifindex, f[0].target),
        (8080, 0, "172.19.0.2:80".parse().unwrap())
    );
    assert_eq!(d.keep_forwards.len(), 2);
}

#[test]
fn plan_writes_what_differs_and_removes_what_nothing_owns() {
    let d = state();
    // Empty maps (a fresh load): everything desired is written, nothing removed.
    let fresh = plan(&d, &Maps::default());
    assert!(matches!(
        fresh.as_slice(),
        [
            Change::WriteEndpoint { ip: A, .. },
            Change::WriteBridgePort { ifindex: 7, .. },
            Change::WriteForward { .. }
        ]
    ));
    // Maps that already match: nothing to do (apply is idempotent).
    assert_eq!(plan(&d, &d.maps), []);
    // Drift: a stale MAC; an orphan endpoint, bridge port and forward; the kept
    // lease's entries and the kept mappings' forwards.
    let ep = |ifindex, mac| Endpoint {
        ifindex,
        mac,
        _pad: [0; 2],
        generation: 1,
    };
    let fwd = |m: &Mapping| {
        m.forward(&LocalAddrs::from_pairs([(4, NOT_LOCAL)]))
            .unwrap()
    };
    let mut drift = d.maps.clone();
    drift.endpoints.insert(A, ep(7, [9; 6]));
    for (ip, i) in [(ORPHAN, 11), (B, 8)] {
        drift.endpoints.insert(ip, ep(i, [1; 6]));
        drift.bridge_ports.insert(
            i,
            BridgePort {
                ip,
                ip6: None,
                mac: [1; 6],
            },
        );
    }
    for m in [
        mapping("gone", ORPHAN, None, 7000),
        mapping("a", A, Some(NOT_LOCAL), 8081),
        mapping("b", B, None, 9090),
    ] {
        drift.forwards.insert(m.key(), fwd(&m));
    }
    let orphan_key = mapping("gone", ORPHAN, None, 7000).key();
    assert_eq!(
        plan(&d, &drift),
        [
            Change::RemoveForward {
                forward: orphan_key
            },
            Change::RemoveEndpoint { ip: ORPHAN },
            Change::RemoveBridgePort { ifindex: 11 },
            Change::WriteEndpoint {
                ip: A,
                endpoint: d.maps.endpoints[&A]
            },
        ]
    );
}

#[test]
fn change_messages() {
    let c = Change::AttachPort { ifindex: 7 };
    assert_eq!(
        c.to_string(),
        "attach the port program to ifindex 7 (link missing or detached)"
    );
    let json = serde_json::to_value(Change::RemoveEndpoint { ip: A }).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"change": "remove_endpoint", "ip": "172.19.0.2"})
    );
}
