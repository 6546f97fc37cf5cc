//! Issue 2: the hook end to end with real runc containers: bridge, veth, IPAM, eBPF
//! masquerade, teardown. All in private namespaces.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use netns_common::maps;
use netns_tests::topo::{GATEWAY, UPLINK_IP, WAN_IP};
use netns_tests::util::{ChildGuard, UDP_WHO, run, sh, tcp_ask, tcp_who_server, udp_ask, wait_for};
use netns_tests::{Container, Topology};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn two_containers_get_distinct_addresses_eth0_and_default_route() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let (ia, ib) = (a.ip(), b.ip());
    assert_ne!(ia, ib);
    for ip in [&ia, &ib] {
        assert!(ip.starts_with("172.19."), "{ip} not in 172.19.0.0/16");
        assert_ne!(ip, GATEWAY);
    }
    for c in [&a, &b] {
        let routes = stdout(&c.exec(&["ip", "route", "show", "default"]));
        assert!(
            routes.contains(&format!("default via {GATEWAY} dev eth0")),
            "{}: {routes}",
            c.id
        );
        let addr = stdout(&c.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]));
        assert!(addr.contains(&format!("{}/16", c.ip())), "{}: {addr}", c.id);
    }
    // The container sees eth0 up, and the host end is on the bridge.
    let link = stdout(&a.exec(&["ip", "link", "show", "eth0"]));
    assert!(link.contains("UP"), "{link}");
    let host_veth = format!("netnsv0-{}", a.pid);
    let master = t.host.ip(&["-o", "link", "show", &host_veth]);
    assert!(master.contains("master netns0"), "{master}");
    let ls = t.containers();
    let ids: Vec<&str> = ls.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&a.id.as_str()) && ids.contains(&b.id.as_str()),
        "{ls:?}"
    );
}

/// Counts ICMP echo requests arriving in its namespace until it has argv[1] of them
/// (or 20 s pass), then prints "<count> <distinct sources>"; touches argv[2] when ready.
const ICMP_WITNESS: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(0.5)
open(sys.argv[2], "w").close()
want, seen, end = int(sys.argv[1]), [], time.time() + 20
while len(seen) < want and time.time() < end:
    try: d, a = s.recvfrom(65535)
    except socket.timeout: continue
    if d[(d[0] & 15) * 4] == 8: seen.append(a[0])
print(len(seen), " ".join(sorted(set(seen))))
"#;

#[test]
fn tcp_udp_icmp_reach_the_wan_peer_which_sees_the_uplink_address() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let tcp = t.wan_spawn(&tcp_who_server(7000));
    let udp = ChildGuard::spawn(t.wan.cmd("python3").args(["-c", UDP_WHO, "7001"]));
    t.wan.wait_listen("tcp", 7000);
    t.wan.wait_listen("udp", 7001);
    // The ICMP peer: a raw socket in wan that records the source of each echo request.
    let ready = t.path("icmp-ready");
    let icmp = ChildGuard::spawn(
        t.wan
            .cmd("python3")
            .args(["-c", ICMP_WITNESS, "4", &ready.display().to_string()])
            .stdout(std::process::Stdio::piped()),
    );
    assert!(
        wait_for(Duration::from_secs(15), || ready.exists().then_some(())).is_some(),
        "ICMP witness did not start"
    );
    for c in [&a, &b] {
        let got = wait_for(Duration::from_secs(5), || {
            let o = stdout(&c.sh(&tcp_ask(WAN_IP, 7000)));
            o.contains("peer=").then_some(o)
        })
        .expect("TCP through SNAT");
        assert_eq!(got.trim(), format!("peer={UPLINK_IP}"));
        let got = stdout(&c.sh(&udp_ask(WAN_IP, 7001)));
        assert_eq!(got.trim(), format!("peer={UPLINK_IP}"), "UDP through SNAT");
        // ICMP echo from busybox ping inside the container itself.
        let ping = c.exec(&["ping", "-c", "2", "-W", "2", WAN_IP]);
        assert!(ping.status.success(), "ping: {}", stdout(&ping));
    }
    // The ICMP peer saw the echo requests of both containers, all from the uplink address.
    let seen = stdout(&icmp.wait_output(Duration::from_secs(15)));
    assert_eq!(
        seen.trim(),
        format!("4 {UPLINK_IP}"),
        "echo requests seen by the wan peer (count, sources)"
    );
    // And the datapath's conntrack has the ICMP flow translated to the uplink address.
    let ct = t.netns(&["conntrack", "ls", "--json"]);
    let flows: Vec<serde_json::Value> = serde_json::from_str(&ct).unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["proto"] == "icmp" && f["translated"]["src"] == UPLINK_IP),
        "{ct}"
    );
    drop((tcp, udp));
}

#[test]
fn a_100_mb_tcp_transfer_arrives_intact_both_ways() {
    let t = Topology::new();
    let a = Container::start(&t);
    let file = t.path("blob");
    sh(&format!(
        "head -c 104857600 /dev/urandom > {}",
        file.display()
    ));
    let want = sh(&format!("sha256sum < {}", file.display()));
    // Download: wan -> container.
    let _srv = t.wan_spawn(&format!(
        "socat -u OPEN:{} TCP-LISTEN:7010,reuseaddr",
        file.display()
    ));
    t.wan.wait_listen("tcp", 7010);
    let down = stdout(&a.sh(&format!(
        "timeout 60 socat -u TCP:{WAN_IP}:7010 STDOUT | sha256sum"
    )));
    assert_eq!(down, want, "download through reverse NAT corrupted");
    // Upload: container -> wan.
    let out = t.path("uploaded");
    let srv = t.wan_spawn(&format!(
        "socat -u TCP-LISTEN:7011,reuseaddr CREATE:{}",
        out.display()
    ));
    t.wan.wait_listen("tcp", 7011);
    let up = a.sh(&format!(
        "timeout 60 socat -u OPEN:{} TCP:{WAN_IP}:7011",
        file.display()
    ));
    assert!(up.status.success());
    let _ = srv.wait_output(Duration::from_secs(30));
    let got = sh(&format!("sha256sum < {}", out.display()));
    assert_eq!(got, want, "upload through SNAT corrupted");
}

#[test]
fn containers_reach_each_other_over_the_bridge_untranslated() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _srv = ChildGuard::spawn(
        b.cmd("sh")
            .arg("-c")
            .arg(format!("exec {}", tcp_who_server(7020))),
    );
    b.wait_listen("tcp", 7020);
    let got = stdout(&a.sh(&tcp_ask(&b.ip(), 7020)));
    assert_eq!(got.trim(), format!("peer={}", a.ip()));
}

/// Conntrack entries (kernel's map, bpftool) with `ip` in the key's or the
/// translation's source or destination (`CtKey` and `CtEntry` both start with a
/// `Tuple`: saddr, daddr in network order).
fn ct_entries_of(t: &Topology, ip: Ipv4Addr) -> Vec<netns_tests::bpf::Entry> {
    let ip = ip.octets();
    let has = |b: &[u8]| b.len() >= 8 && (b[0..4] == ip || b[4..8] == ip);
    t.map_dump(maps::CONNTRACK)
        .into_iter()
        .filter(|e| has(&e.key) || has(&e.value))
        .collect()
}

#[test]
fn poststop_removes_veth_lease_and_map_entries() {
    let t = Topology::new();
    let keep = Container::start(&t);
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "18080:80/tcp".to_owned());
    let c = Container::start_with(&t, &ann, &[]).expect("start");
    let (id, pid, ip) = (c.id.clone(), c.pid, c.ip());
    assert!(
        c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    let (keep_ip, c_ip): (Ipv4Addr, Ipv4Addr) = (keep.ip().parse().unwrap(), ip.parse().unwrap());
    let mut both = vec![keep_ip, c_ip];
    both.sort();
    assert_eq!(
        t.endpoints(),
        both,
        "control: both containers have endpoints"
    );
    assert!(
        !ct_entries_of(&t, c_ip).is_empty(),
        "control: its ping left conntrack entries"
    );
    let out = c.delete();
    assert!(
        out.status.success(),
        "runc delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Veth gone, lease gone, endpoint and port map gone, its conntrack entries gone.
    let links = t.host.ip(&["-o", "link"]);
    assert!(!links.contains(&format!("netnsv0-{pid}")), "{links}");
    assert!(!t.containers().iter().any(|c| c["id"] == id.as_str()));
    assert_eq!(t.endpoints(), vec![keep_ip]);
    assert!(!t.netns(&["port", "ls"]).contains("18080"));
    assert_eq!(
        t.map_entries(maps::PORTS),
        0,
        "its port forward's entry is gone"
    );
    // Its entries are not walked out of the maps (a stop costs the same whatever the
    // table holds): they are stale, so no listing shows them and the datapath treats
    // them as absent.
    let flows_of = |all: bool| -> Vec<serde_json::Value> {
        let mut args = vec!["--json", "conntrack", "ls"];
        if all {
            args.push("--all");
        }
        let v: serde_json::Value = serde_json::from_str(&t.netns(&args)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|f| f["owner"] == c_ip.to_string().as_str())
            .cloned()
            .collect()
    };
    let left = flows_of(false);
    assert!(left.is_empty(), "flows of {c_ip} still listed: {left:?}");
    assert!(
        !flows_of(true).is_empty() || ct_entries_of(&t, c_ip).is_empty(),
        "--all lists the stale flows still in the maps"
    );
    // Poststop again is harmless.
    let again = t.netns_stdin(
        &[],
        &format!(r#"{{"ociVersion":"1.0.2","id":"{id}","status":"stopped","bundle":"/"}}"#),
        &[],
    );
    assert!(again.status.success());
    // The other container still works.
    assert!(
        keep.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
}

#[test]
fn no_netfilter_nat_rule_exists_after_setup() {
    let t = Topology::new();
    let a = Container::start(&t);
    assert!(
        a.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    let ipt = t.host.cmd("iptables-save").output().unwrap();
    let ipt = stdout(&ipt);
    assert!(
        !ipt.contains("MASQUERADE") && !ipt.contains("DNAT") && !ipt.contains("SNAT"),
        "{ipt}"
    );
    let nft = stdout(
        &t.host
            .cmd("nft")
            .arg("list")
            .arg("ruleset")
            .output()
            .unwrap(),
    );
    assert!(
        !nft.contains("masquerade") && !nft.contains("dnat") && !nft.contains("snat"),
        "{nft}"
    );
    // And the translation really happened in eBPF.
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(stats["snat_packets"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn failed_hook_rolls_back_everything() {
    let t = Topology::new();
    let keep = Container::start(&t);
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "18081:80/tcp".to_owned());
    let keep_ip: Ipv4Addr = keep.ip().parse().unwrap();
    let root = t.runc_root.display().to_string();
    let links_before = t.host.ip(&["-o", "link"]);
    // Every step of the prestart hook (netns-user's hook::Step names).
    for step in [
        "bridge",
        "ip-forward",
        "ipam",
        "veth",
        "container-net",
        "datapath-load",
        "attach-port",
        "add-endpoint",
        "port-map",
        "persist",
    ] {
        let err = Container::start_with(&t, &ann, &[("NETNS_FAIL_AT", step)])
            .err()
            .expect("hook must fail");
        let msg = String::from_utf8_lossy(&err.stderr).into_owned()
            + &String::from_utf8_lossy(&err.stdout);
        assert!(
            msg.contains(step),
            "runc output names the step {step}: {msg}"
        );
        let links = t.host.ip(&["-o", "link"]);
        assert_eq!(
            links.lines().count(),
            links_before.lines().count(),
            "veth left behind after {step}: {links}"
        );
        assert_eq!(t.containers().len(), 1, "lease left behind after {step}");
        assert!(
            !t.netns(&["port", "ls"]).contains("18081"),
            "port map left after {step}"
        );
        assert_eq!(
            t.endpoints(),
            vec![keep_ip],
            "endpoint left in the datapath after {step}"
        );
        assert_eq!(
            t.map_entries(maps::PORTS),
            0,
            "port forward entry left in the datapath after {step}"
        );
        let listed = run(std::process::Command::new("runc").args(["--root", &root, "list", "-q"]));
        assert_eq!(
            listed.trim(),
            keep.id,
            "runc keeps only the good container after {step}"
        );
    }
    assert!(
        keep.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    // And a start without the fault works after all those rollbacks.
    let ok = Container::start_with(&t, &ann, &[]).expect("start after rollbacks");
    assert!(
        ok.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    assert!(t.netns(&["port", "ls"]).contains("18081"));
}

#[test]
fn bad_state_json_gives_a_clear_error_and_leaves_nothing() {
    let t = Topology::new();
    let cases = [
        ("{not json", "JSON"),
        (
            r#"{"ociVersion":"1.0.2","id":"x","status":"creating""#,
            "truncated",
        ),
        (
            r#"{"ociVersion":"1.0.2","id":"x","status":"creating","bundle":"/"}"#,
            "pid",
        ),
        (
            r#"{"ociVersion":"1.0.2","id":"x","status":"creating","pid":999999999,"bundle":"/"}"#,
            "999999999",
        ),
        (
            r#"{"ociVersion":"1.0.2","id":"x","status":"creating","pid":-4,"bundle":"/"}"#,
            "-4",
        ),
        (
            r#"{"ociVersion":"1.0.2","id":"../x","status":"creating","pid":1,"bundle":"/"}"#,
            "id",
        ),
    ];
    for (input, needle) in cases {
        let out = t.netns_stdin(&[], input, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{input} must fail");
        assert!(err.starts_with("netns: "), "{err}");
        assert!(
            err.contains(needle),
            "error for {input} should mention {needle:?}: {err}"
        );
    }
    let links = t.host.ip(&["-o", "link"]);
    assert_eq!(
        links.lines().count(),
        2,
        "only lo and the uplink, no bridge or veth: {links}"
    );
    assert!(!t.bpffs_dir.exists(), "no datapath loaded");
    assert!(t.containers().is_empty(), "no lease");
}
