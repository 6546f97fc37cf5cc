//! Issue 3: port forwarding in eBPF with real runc containers: from outside, hairpin,
//! from the host itself, host-IP-bound mappings, ranges, annotations, live removal,
//! bad input, reservation, and isolation from other namespaces.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use netns_common::maps;
use netns_tests::topo::{GATEWAY, UPLINK_IP, WAN_IP};
use netns_tests::util::out;
use netns_tests::util::{ChildGuard, wait_for};
use netns_tests::{Container, NamedNetns, Topology};

/// A UDP server answering every datagram with "TAG peer=ADDR" (one socket, no fork:
/// socat's forking UDP server drops datagrams that arrive while it forks).
const UDP_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(("%s peer=%s\n" % (sys.argv[2], a[0])).encode(), a)
"#;

/// TCP and UDP servers on `port` in the container that answer with the peer address.
fn servers(c: &Container<'_>, port: u16, tag: &str) -> [ChildGuard; 2] {
    let reply = format!("SYSTEM:echo {tag} peer=$SOCAT_PEERADDR");
    let tcp = ChildGuard::spawn(c.cmd("socat").args([
        "-t",
        "10",
        &format!("TCP-LISTEN:{port},reuseaddr,fork"),
        reply.as_str(),
    ]));
    let udp = ChildGuard::spawn(
        c.cmd("python3")
            .args(["-c", UDP_SERVER, &port.to_string(), tag]),
    );
    c.wait_listen("tcp", port);
    c.wait_listen("udp", port);
    [tcp, udp]
}

fn tcp(addr: &str, port: u16) -> String {
    format!("echo hi | timeout 3 socat -t 2 - TCP:{addr}:{port}")
}

/// A UDP query that retries (UDP may lose the first datagram to ARP resolution).
fn udp(addr: &str, port: u16) -> String {
    udp_from(addr, port, 0)
}

fn udp_from(addr: &str, port: u16, sport: u16) -> String {
    format!(
        "python3 -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((\"\",{sport}))\n\
         s.connect((\"{addr}\",{port}))\ns.settimeout(0.3)\n\
         for i in range(8):\n  s.send(b\"hi\")\n  try:\n    print(s.recv(100).decode().strip()); break\n  except Exception: pass'"
    )
}

/// Retries briefly: the first packet to a new container may wait for ARP.
fn expect(mut f: impl FnMut() -> Output, want: &str) {
    let got = wait_for(Duration::from_secs(4), || {
        let s = out(&f());
        (s == want).then_some(s)
    });
    assert!(got.is_some(), "expected {want:?}, last got {:?}", out(&f()));
}

/// The pinned port-forward map as the kernel holds it (bpftool): (host address, host
/// port, protocol, container address, container port) per entry, sorted. `PortKey` is
/// host_addr, host_port (network order), proto; `PortTarget` starts addr, port.
fn port_entries(t: &Topology) -> Vec<(Ipv4Addr, u16, u8, Ipv4Addr, u16)> {
    let mut v: Vec<_> = t
        .map_dump(maps::PORTS)
        .into_iter()
        .map(|e| {
            let (k, v) = (e.key, e.value);
            let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            (
                addr(&k[0..4]),
                u16::from_be_bytes([k[4], k[5]]),
                k[6],
                addr(&v[0..4]),
                u16::from_be_bytes([v[4], v[5]]),
            )
        })
        .collect();
    v.sort();
    v
}

fn annotated<'t>(t: &'t Topology, ports: &str) -> Container<'t> {
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), ports.to_owned());
    Container::start_with(t, &ann, &[])
        .unwrap_or_else(|o| panic!("start: {}", String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn from_outside_tcp_and_udp_the_container_sees_the_real_peer() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _s = servers(&c, 80, "c");
    t.netns(&["port", "add", &c.id, "8080:80/tcp", "8080:80/udp"]);
    // A connected UDP socket only accepts replies from UPLINK_IP:8080, so an answer
    // also proves the reply's source was translated back.
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8080)),
        &format!("c peer={WAN_IP}"),
    );
    expect(
        || t.wan_sh(&udp(UPLINK_IP, 8080)),
        &format!("c peer={WAN_IP}"),
    );
}

#[test]
fn a_host_listener_opened_later_on_a_mapped_port_does_not_take_its_flows() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _s = servers(&c, 80, "c");
    t.netns(&["port", "add", &c.id, "8085:80/tcp", "8085:80/udp"]);
    // What podman's conmon does on every published port: a TCP listener that never
    // accepts and an unconnected UDP socket, opened after the mapping exists.
    let _holder = ChildGuard::spawn(t.host.cmd("python3").args([
        "-c",
        "import socket, time\n\
         t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         t.bind(('0.0.0.0', 8085)); t.listen(64)\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 8085))\n\
         time.sleep(60)",
    ]));
    t.host.wait_listen("tcp", 8085);
    t.host.wait_listen("udp", 8085);
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8085)),
        &format!("c peer={WAN_IP}"),
    );
    expect(
        || t.wan_sh(&udp(UPLINK_IP, 8085)),
        &format!("c peer={WAN_IP}"),
    );
}

#[test]
fn hairpin_from_another_container_and_from_itself() {
    let t = Topology::new();
    let target = Container::start(&t);
    let other = Container::start(&t);
    let _s = servers(&target, 80, "t");
    t.netns(&["port", "add", &target.id, "8080:80/tcp", "8080:80/udp"]);
    for client in [&other, &target] {
        expect(
            || client.sh(&tcp(UPLINK_IP, 8080)),
            &format!("t peer={GATEWAY}"),
        );
        expect(
            || client.sh(&udp(UPLINK_IP, 8080)),
            &format!("t peer={GATEWAY}"),
        );
    }
}

#[test]
fn from_the_host_via_localhost_and_the_uplink_address() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _s = servers(&c, 5555, "c");
    t.netns(&["port", "add", &c.id, "5555:5555/tcp", "5555:5555/udp"]);
    for addr in ["127.0.0.1", UPLINK_IP] {
        expect(|| t.host_sh(&tcp(addr, 5555)), &format!("c peer={GATEWAY}"));
        expect(|| t.host_sh(&udp(addr, 5555)), &format!("c peer={GATEWAY}"));
    }
    // The classic example.
    expect(
        || t.host_sh("echo the host says HI | timeout 3 socat -t 2 - TCP4:localhost:5555"),
        &format!("c peer={GATEWAY}"),
    );
}

#[test]
fn localhost_in_another_namespace_is_not_redirected() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _s = servers(&c, 80, "c");
    t.netns(&["port", "add", &c.id, "7777:80/tcp"]);
    expect(
        || t.host_sh(&tcp("127.0.0.1", 7777)),
        &format!("c peer={GATEWAY}"),
    );
    // Same cgroup (the programs are attached there), other namespace: untouched.
    let other = NamedNetns::new(&format!("{}x", t.tag));
    let procs = t.cgroup.join("cgroup.procs");
    let o = netns_tests::util::output(other.cmd("sh").arg("-c").arg(format!(
        "echo $$ > {}; {}",
        procs.display(),
        tcp("127.0.0.1", 7777)
    )));
    assert!(
        !o.status.success(),
        "connection must be refused there: {}",
        out(&o)
    );
    assert_eq!(out(&o), "");
}

#[test]
fn host_ip_limits_the_mapping_to_that_address() {
    let t = Topology::new();
    t.host.ip(&["addr", "add", "198.51.100.3/24", "dev", "up0"]);
    let c = Container::start(&t);
    let _s = servers(&c, 80, "c");
    t.netns(&["port", "add", &c.id, "198.51.100.3:8090:80/tcp"]);
    expect(
        || t.wan_sh(&tcp("198.51.100.3", 8090)),
        &format!("c peer={WAN_IP}"),
    );
    let o = t.wan_sh(&tcp(UPLINK_IP, 8090));
    assert_eq!(out(&o), "", "not forwarded on another address");
}

#[test]
fn ranges_map_one_to_one() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _a = servers(&c, 9100, "p9100");
    let _b = servers(&c, 9102, "p9102");
    t.netns(&["port", "add", &c.id, "8100-8102:9100-9102/tcp"]);
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8100)),
        &format!("p9100 peer={WAN_IP}"),
    );
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8102)),
        &format!("p9102 peer={WAN_IP}"),
    );
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&t.netns(&["port", "ls", "--json"])).unwrap();
    assert_eq!(ls.len(), 3);
    assert!(
        ls.iter()
            .any(|m| m["host_port"] == 8101 && m["container_port"] == 9101)
    );
}

#[test]
fn annotation_mappings_appear_at_start_and_vanish_at_stop() {
    let t = Topology::new();
    let c = annotated(&t, "8200:80/tcp, 8201:81/udp");
    let _s = servers(&c, 80, "c");
    let ls = t.netns(&["port", "ls"]);
    assert!(ls.contains("8200") && ls.contains("8201"), "{ls}");
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8200)),
        &format!("c peer={WAN_IP}"),
    );
    c.delete();
    let ls = t.netns(&["port", "ls", "--json"]);
    assert_eq!(ls.trim(), "[]");
    let o = t.wan_sh(&tcp(UPLINK_IP, 8200));
    assert_eq!(out(&o), "");
}

#[test]
fn removing_a_mapping_stops_new_connections_and_spares_other_flows() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _s = servers(&c, 80, "c");
    // A long flow through mapping 8301 (server in the container counts the bytes).
    let sink = ChildGuard::spawn(
        c.cmd("sh")
            .arg("-c")
            .arg("socat -u TCP-LISTEN:81,reuseaddr STDOUT | wc -c")
            .stdout(std::process::Stdio::piped()),
    );
    c.wait_listen("tcp", 81);
    t.netns(&["port", "add", &c.id, "8300:80/tcp", "8301:81/tcp"]);
    expect(
        || t.wan_sh(&tcp(UPLINK_IP, 8300)),
        &format!("c peer={WAN_IP}"),
    );
    let flow = t.wan_spawn(&format!(
        "sh -c 'for i in $(seq 1 30); do head -c 1000 /dev/zero; sleep 0.05; done | socat -u - TCP:{UPLINK_IP}:8301'"
    ));
    // The long flow is established (the container's sink has it) before the removal.
    c.wait_ss(&["-Htn", "state", "established", "sport = :81"]);
    t.netns(&["port", "rm", &c.id, "8300:80/tcp"]);
    assert_eq!(
        out(&t.wan_sh(&tcp(UPLINK_IP, 8300))),
        "",
        "removed mapping still forwards"
    );
    let f = flow.wait_output(Duration::from_secs(10));
    assert!(f.status.success(), "flow through the other mapping broke");
    let n = sink.wait_output(Duration::from_secs(5));
    assert_eq!(out(&n), "30000", "bytes through the untouched mapping");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let t = Topology::new();
    let c = Container::start(&t);
    t.netns(&["port", "add", &c.id, "8400:80/tcp"]);
    let before = t.netns(&["port", "ls", "--json"]);
    let cases: &[(&[&str], &str)] = &[
        (&["port", "add", &c.id, "8400:81/tcp"], "already mapped"),
        (
            &["port", "add", &c.id, "8401:81", "8400:82"],
            "already mapped",
        ),
        (&["port", "add", &c.id, "0:80"], "not in 1..65535"),
        (&["port", "add", &c.id, "70000:80"], "not in 1..65535"),
        (
            &["port", "add", "no-such-container", "8402:80"],
            "no container",
        ),
        (&["port", "add", &c.id, "80"], "expected"),
        (&["port", "add", &c.id, "8403:80/sctp"], "protocol"),
        (&["port", "add", &c.id, "8410-8415:80-81"], "range"),
        (&["port", "rm", &c.id, "8499:80"], "no mapping"),
    ];
    for (args, needle) in cases {
        let o = t.netns_cmd(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            t.netns(&["port", "ls", "--json"]),
            before,
            "{args:?} changed the table"
        );
    }
    // The datapath map too (the kernel's copy): still exactly the one forward.
    let ip: Ipv4Addr = c.ip().parse().unwrap();
    assert_eq!(
        port_entries(&t),
        vec![(Ipv4Addr::UNSPECIFIED, 8400, 6, ip, 80)]
    );
}

#[test]
fn mapped_ports_are_reserved_and_busy_ports_reported() {
    let t = Topology::new();
    let c = Container::start(&t);
    t.netns(&["port", "add", &c.id, "8500:80/tcp"]);
    let o = t.host_sh("timeout 1 socat TCP-LISTEN:8500 - ; echo rc=$?");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Operation not permitted"),
        "bind of a mapped port must fail: {err}"
    );
    // A port a host socket holds cannot be mapped.
    let _busy = ChildGuard::spawn(t.host.cmd("socat").args(["TCP-LISTEN:8501,reuseaddr", "-"]));
    t.host.wait_listen("tcp", 8501);
    let o = t
        .netns_cmd(&["port", "add", &c.id, "8501:80/tcp"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use on the host"));
}

/// Adding a mapping flushes the flows that used its host port: the new target gets
/// the peer's next datagram, not the old one.
#[test]
fn remapping_a_udp_port_flushes_stale_flows() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _sa = servers(&a, 53, "A");
    let _sb = servers(&b, 53, "B");
    t.netns(&["port", "add", &a.id, "5353:53/udp"]);
    // Same peer source port each time, like a DNS client that never changes port.
    let q = udp_from(UPLINK_IP, 5353, 40000);
    expect(|| t.wan_sh(&q), &format!("A peer={WAN_IP}"));
    t.netns(&["port", "rm", "-", "5353:53/udp"]);
    t.netns(&["port", "add", &b.id, "5353:53/udp"]);
    expect(|| t.wan_sh(&q), &format!("B peer={WAN_IP}"));
}

/// Removing a mapping forwards no new flow, and leaves the ones that came through it to
/// end or expire, as removing an iptables DNAT rule leaves its conntrack entries: no
/// conntrack walk on `port rm` (nor when a container stops).
#[test]
fn removing_a_mapping_forwards_no_new_flow_and_lets_existing_ones_end() {
    let t = Topology::new();
    let a = Container::start(&t);
    let _sa = servers(&a, 53, "A");
    t.netns(&["port", "add", &a.id, "5300:53/udp"]);
    let q = udp_from(UPLINK_IP, 5300, 40100);
    expect(|| t.wan_sh(&q), &format!("A peer={WAN_IP}"));
    t.netns(&["port", "rm", &a.id, "5300:53/udp"]);
    assert!(!t.netns(&["port", "ls"]).contains("5300"));
    // The peer's flow goes on...
    assert_eq!(out(&t.wan_sh(&q)), format!("A peer={WAN_IP}"));
    let fl: Vec<serde_json::Value> =
        serde_json::from_str(&t.netns(&["conntrack", "ls", "--json"])).unwrap();
    assert!(
        fl.iter().any(|f| f["kind"] == "dnat"
            && f["original"]["sport"] == 40100
            && f["original"]["dport"] == 5300
            && f["owner"] == a.ip().as_str()),
        "{fl:#?}"
    );
    // ...a new one is not forwarded.
    assert_eq!(out(&t.wan_sh(&udp_from(UPLINK_IP, 5300, 40101))), "");
    // And a flush ends it.
    t.netns(&["conntrack", "flush"]);
    assert_eq!(out(&t.wan_sh(&q)), "");
}

/// Every verb answers `--json`, the mutating ones included, with what it did.
#[test]
fn mutating_verbs_report_what_they_did_as_json() {
    let t = Topology::new();
    let c = Container::start(&t);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = t.netns(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let added = json(&["port", "add", &c.id, "8200-8201:9200-9201/udp", "--json"]);
    let added = added["added"].as_array().expect("added array");
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(
        added
            .iter()
            .any(|m| m["host_port"] == 8201 && m["container_port"] == 9201)
    );
    // The forwards are really in the port map (read with bpftool, not through netns).
    assert_eq!(t.map_entries("NETNS_PORTS"), 2);
    let removed = json(&["port", "rm", &c.id, "8200:9200/udp", "--json"]);
    assert_eq!(removed["removed"].as_array().map(Vec::len), Some(1));
    assert_eq!(t.map_entries("NETNS_PORTS"), 1);
    let flushed = json(&["conntrack", "flush", "--json"]);
    assert!(flushed["deleted"].is_u64(), "{flushed}");
    let v = json(&["version", "--json"]);
    assert_eq!(v["layout_version"], netns_common::LAYOUT_VERSION);
    let st = json(&["datapath", "status", "--json"]);
    assert!(
        st["programs"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["id"].is_u64())),
        "{st}"
    );
    let check = json(&["datapath", "check", "--json"]);
    assert_eq!(check["failed"].as_array().map(Vec::len), Some(0), "{check}");
}
