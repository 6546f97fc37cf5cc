//! Issue 9, "do no harm": the host's own traffic stays untouched, and no hole opens
//! through the datapath. Each test shows one harm the datapath could do (or did): the
//! observer is the peer, a host process, an AF_PACKET capture, the bridge's FDB, the
//! host's addresses and sysctls, or the kernel's view of what is attached; `netns stats`
//! counters are only a second check. All traffic stays inside each test's private
//! topology (198.51.100.0/24, 203.0.113.0/24, 172.19.0.0/16, 2001:db8::/32).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use netns_tests::pkt::python;
use netns_tests::pkt::{Capture, Lines, has_tag, mac_of};
use netns_tests::topo::{GATEWAY, UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::{ChildGuard, UDP_WHO, netns_bin, run, tcp_ask, tcp_who_server, udp_ask};
use netns_tests::util::{both, grew, out};
use netns_tests::{Container, Topology};

const SHORT: Duration = Duration::from_secs(5);

/// UDP server on argv[1]: prints "ADDR:PORT PAYLOAD" for every datagram and echoes it.
const LOG_UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    print("%s:%d %s" % (a[0], a[1], d.decode(errors="replace")), flush=True)
    s.sendto(d, a)
"#;

/// UDP server on argv[1]: answers "ADDR:PORT PAYLOAD" (what it saw of the client).
const WHO_UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(("%s:%d %s" % (a[0], a[1], d.decode())).encode(), a)
"#;

/// UDP server on argv[1]: a request "N:..." gets an answer of N bytes (the request
/// repeated), so a large N makes a fragmented answer.
const SIZED_UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    n = int(d.split(b":")[0])
    s.sendto((d * (n // len(d) + 1))[:n], a)
"#;

/// Plain UDP echo server on argv[1].
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"#;

/// A python server (PY_LIB prepended) on `port`, in the namespace `cmd` picks.
fn server(cmd: Command, script: &str, port: u16) -> Lines {
    Lines::python(cmd, script, &[&port.to_string()])
}

fn wan_udp(t: &Topology, script: &str, port: u16) -> Lines {
    let s = server(t.wan.cmd("python3"), script, port);
    t.wan.wait_listen("udp", port);
    s
}

fn container_udp(c: &Container<'_>, script: &str, port: u16) -> Lines {
    let s = server(c.cmd("python3"), script, port);
    c.wait_listen("udp", port);
    s
}

// 1. Fragments addressed to the host itself are delivered.

#[test]
fn a_fragmented_ping_to_the_host_is_answered() {
    let t = Topology::new();
    let _c = Container::start(&t);
    let small = t.wan_sh(&format!("ping -c 1 -W 2 {UPLINK_IP}"));
    assert!(small.status.success(), "control: {}", both(&small));
    let before = t.stats();
    let big = t.wan_sh(&format!("ping -c 3 -i 0.2 -W 2 -s 3000 {UPLINK_IP}"));
    assert!(
        big.status.success() && out(&big).contains(" 3 received"),
        "ping -s 3000 to the host with the datapath loaded: {}",
        both(&big)
    );
    assert!(grew(&before, &t.stats(), "frag_host") >= 3);
}

// 2. A host process's fragmented answer is delivered, in order and reversed.

#[test]
fn a_host_udp_query_gets_its_large_fragmented_answer() {
    let t = Topology::new();
    let _c = Container::start(&t);
    let _srv = wan_udp(&t, SIZED_UDP, 7300);
    let ask = r#"
n = int(sys.argv[3]); q = ("%d:host-query" % n).encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (sys.argv[1], int(sys.argv[2])))
try:
    r = s.recv(65535); print(len(r), r == (q * (n // len(q) + 1))[:n])
except socket.timeout:
    print("timeout")
"#;
    let small = t.host_python(ask, &[WAN_IP, "7300", "1000"]);
    assert_eq!(out(&small), "1000 True", "control: {}", both(&small));
    let big = t.host_python(ask, &[WAN_IP, "7300", "3000"]);
    assert_eq!(
        out(&big),
        "3000 True",
        "3000-byte answer to a host socket: {}",
        both(&big)
    );
}

/// Sends argv[4] (one datagram, or a 3000-byte one in fragments in reverse order) from
/// argv[1]:7300 to argv[2]:argv[3] with a raw socket; prints the payload's sha256.
const SEND_CRAFTED_UDP: &str = r#"
import hashlib
src, dst, dport, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if how == "single":
    data = os.urandom(100)
    send_l3(ip4(src, dst, 17, udp(src, dst, 7300, dport, data)))
else:
    data = os.urandom(3000)
    fs = frags(src, dst, 17, udp(src, dst, 7300, dport, data), ident=0x5151)
    send_l3(*reversed(fs))
print(hashlib.sha256(data).hexdigest())
"#;

/// UDP sink on argv[1]: prints "LEN SHA256" of every datagram.
const SHA_SINK: &str = r#"
import socket, sys, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535); print(len(d), hashlib.sha256(d).hexdigest(), flush=True)
"#;

#[test]
fn a_host_socket_gets_a_datagram_whose_fragments_arrive_in_reverse_order() {
    let t = Topology::new();
    let _c = Container::start(&t);
    let sink = Lines::python(t.host.cmd("python3"), SHA_SINK, &["7301"]);
    t.host.wait_listen("udp", 7301);
    // Control: one crafted datagram (checks the packet builder and the path).
    let sent = out(&python(
        t.wan.cmd("python3"),
        SEND_CRAFTED_UDP,
        &[WAN_IP, UPLINK_IP, "7301", "single"],
    ));
    let want = format!("100 {sent}");
    assert!(
        sink.wait_line(SHORT, |l| l == want).is_some(),
        "control: a crafted datagram reaches the host socket: {:?} {}",
        sink.lines(),
        sink.stderr()
    );
    let sent = out(&python(
        t.wan.cmd("python3"),
        SEND_CRAFTED_UDP,
        &[WAN_IP, UPLINK_IP, "7301", "reversed"],
    ));
    let want = format!("3000 {sent}");
    assert!(
        sink.wait_line(SHORT, |l| l == want).is_some(),
        "reversed fragments to a host socket: got {:?}",
        sink.lines()
    );
}

// 3. Mapped ports and the host's ephemeral ports.

/// The ranges in `ip_local_reserved_ports` of the host namespace.
fn reserved(t: &Topology) -> Vec<(u16, u16)> {
    let s = run(t
        .host
        .cmd("cat")
        .arg("/proc/sys/net/ipv4/ip_local_reserved_ports"));
    s.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            (a.trim().parse().unwrap(), b.trim().parse().unwrap())
        })
        .collect()
}

fn is_reserved(r: &[(u16, u16)], p: u16) -> bool {
    r.iter().any(|(a, b)| (*a..=*b).contains(&p))
}

#[test]
fn mapped_host_ports_are_reserved_until_unmapped() {
    let t = Topology::new();
    // Someone else's reservation, made before netns came.
    run(t.host.cmd("sh").args([
        "-c",
        "echo 22222 > /proc/sys/net/ipv4/ip_local_reserved_ports",
    ]));
    let c = Container::start(&t);
    let r = reserved(&t);
    assert!(
        is_reserved(&r, 22222) && (61000..=65535).all(|p| is_reserved(&r, p)),
        "control: the NAT range is reserved, the other reservation kept: {r:?}"
    );
    t.netns(&[
        "port",
        "add",
        &c.id,
        "40000-40099:40000-40099/udp",
        "40050:80/tcp",
    ]);
    let r = reserved(&t);
    assert!(
        (40000..=40099).all(|p| is_reserved(&r, p)),
        "mapped ports reserved: {r:?}"
    );
    t.netns(&["port", "rm", &c.id, "40000-40099:40000-40099/udp"]);
    let r = reserved(&t);
    let still: Vec<u16> = (40000..=40099)
        .filter(|p| *p != 40050 && is_reserved(&r, *p))
        .collect();
    assert!(still.is_empty(), "unmapped ports released: {r:?}");
    assert!(
        is_reserved(&r, 40050),
        "40050/tcp is still mapped and stays reserved: {r:?}"
    );
    assert!(
        is_reserved(&r, 22222) && (61000..=65535).all(|p| is_reserved(&r, p)),
        "other reservations stay: {r:?}"
    );
    t.netns(&["port", "rm", &c.id, "40050:80/tcp"]);
    assert!(!is_reserved(&reserved(&t), 40050), "{:?}", reserved(&t));
}

/// Opens argv[3] unbound UDP sockets at once, each sends one query to argv[1]:argv[2]
/// (so the kernel picks an ephemeral port); prints the ports and those never answered.
const EPHEMERAL_QUERIES: &str = r#"
wan, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    s.sendto(b"q%d" % i, (wan, port)); socks.append(s)
ports = {s: s.getsockname()[1] for s in socks}
pending, end = set(socks), time.time() + 3
while pending and time.time() < end:
    r, _, _ = select.select(list(pending), [], [], 0.2)
    for s in r:
        try:
            s.recv(100); pending.discard(s)
        except (BlockingIOError, ConnectionRefusedError):
            pass
print(json.dumps({"ports": sorted(ports.values()), "lost": sorted(ports[s] for s in pending)}))
"#;

#[test]
fn host_queries_from_ephemeral_ports_inside_a_mapped_range_get_their_replies() {
    let t = Topology::new();
    // Per namespace: only the topology's host namespace gets this range.
    run(t.host.cmd("sh").args([
        "-c",
        "echo 40000 40199 > /proc/sys/net/ipv4/ip_local_port_range",
    ]));
    let c = Container::start(&t);
    let _echo = wan_udp(&t, UDP_ECHO, 7400);
    t.netns(&["port", "add", &c.id, "40000-40099:40000-40099/udp"]);
    let o = t.host_python(EPHEMERAL_QUERIES, &[WAN_IP, "7400", "40"]);
    let v: serde_json::Value =
        serde_json::from_str(&out(&o)).unwrap_or_else(|e| panic!("{e}: {}", both(&o)));
    let ports: Vec<u64> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(
        ports.len() == 40 && ports.iter().all(|p| (40000..=40199).contains(p)),
        "control: the host picks from ip_local_port_range: {v}"
    );
    assert_eq!(
        v["lost"].as_array().unwrap().len(),
        0,
        "host sockets lost their replies (to the container?): {v}"
    );
}

#[test]
fn a_container_flow_that_kept_its_port_does_not_steal_a_later_host_sockets_replies() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _who = wan_udp(&t, WHO_UDP, 7000);
    // The container talks from port 5000 and keeps listening there.
    let cont = Lines::python(
        c.cmd("python3"),
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", 5000))
s.sendto(b"C", (sys.argv[1], 7000))
while True:
    print(s.recv(1000).decode(), flush=True)
"#,
        &[WAN_IP],
    );
    let kept = format!("{UPLINK_IP}:5000 C");
    assert!(
        cont.wait_line(SHORT, |l| l == kept).is_some(),
        "control: the container's flow kept port 5000: {:?} {}",
        cont.lines(),
        cont.stderr()
    );
    // Now a host process opens port 5000 and asks the same peer.
    let host = t.host_python(
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", 5000)); s.settimeout(2)
s.sendto(b"H", (sys.argv[1], 7000))
try:
    print(s.recv(1000).decode())
except socket.timeout:
    print("timeout")
"#,
        &[WAN_IP],
    );
    assert_eq!(
        out(&host),
        format!("{UPLINK_IP}:5000 H"),
        "the host socket's reply: {}",
        both(&host)
    );
    assert!(
        !cont.lines().iter().any(|l| l.ends_with(" H")),
        "the container got the host's reply: {:?}",
        cont.lines()
    );
    assert!(t.stat("ct_host_reclaimed") >= 1);
}

// 4. Loopback-only and gateway-bound mappings are not reachable from outside.

#[test]
fn a_loopback_only_mapping_is_reachable_from_host_processes_only() {
    let t = Topology::new();
    let c = Container::start(&t);
    let srv = container_udp(&c, LOG_UDP, 53);
    t.netns(&["port", "add", &c.id, "127.0.0.1:5353:53/udp", "5354:53/udp"]);
    // A host process reaches it through 127.0.0.1.
    let o = t.host_sh(&udp_ask("127.0.0.1", 5353));
    assert_eq!(out(&o), "hi", "host -> 127.0.0.1:5353: {}", both(&o));
    // From the wan: a frame to up0's MAC with destination 127.0.0.1:5353, then (the
    // control, same builder and path) one to the wildcard mapping.
    let up0 = mac_of(t.host.cmd("ip"), UPLINK);
    let wan0 = mac_of(t.wan.cmd("ip"), "wan0");
    let o = python(
        t.wan.cmd("python3"),
        r#"
up0, wan0, wan, uplink = sys.argv[1:5]
bad = eth(up0, wan0, 0x0800, ip4(wan, "127.0.0.1", 17, udp(wan, "127.0.0.1", 40000, 5353, b"wan-to-loopback")))
good = eth(up0, wan0, 0x0800, ip4(wan, uplink, 17, udp(wan, uplink, 40000, 5354, b"wan-marker")))
send_l2("wan0", bad, bad, bad, good)
"#,
        &[&up0, &wan0, WAN_IP, UPLINK_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        srv.wait_line(SHORT, |l| l.ends_with(" wan-marker"))
            .is_some(),
        "control: the crafted frame to the wildcard mapping arrives: {:?}",
        srv.lines()
    );
    assert!(
        !srv.lines().iter().any(|l| l.contains("wan-to-loopback")),
        "a frame from the wan to 127.0.0.1 reached the container: {:?}",
        srv.lines()
    );
}

#[test]
fn a_gateway_bound_mapping_is_not_reachable_from_the_wan() {
    let t = Topology::new();
    let c = Container::start(&t);
    let srv = container_udp(&c, LOG_UDP, 53);
    t.netns(&[
        "port",
        "add",
        &c.id,
        &format!("{GATEWAY}:5355:53/udp"),
        "5356:53/udp",
    ]);
    // Control: the mapping works where it belongs (the bridge side).
    let o = c.sh(&udp_ask(GATEWAY, 5355));
    assert_eq!(out(&o), "hi", "container -> gateway:5355: {}", both(&o));
    // The wan routes the gateway address via the host, as any LAN neighbour can.
    t.wan
        .ip(&["route", "add", &format!("{GATEWAY}/32"), "via", UPLINK_IP]);
    let o = python(
        t.wan.cmd("python3"),
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3):
    s.sendto(b"wan-to-gateway", (sys.argv[1], 5355))
s.sendto(b"wan-marker", (sys.argv[2], 5356))
"#,
        &[GATEWAY, UPLINK_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        srv.wait_line(SHORT, |l| l.ends_with(" wan-marker"))
            .is_some(),
        "control: the wildcard mapping is reachable from the wan: {:?}",
        srv.lines()
    );
    assert!(
        !srv.lines().iter().any(|l| l.contains("wan-to-gateway")),
        "the wan reached a mapping bound to the gateway address: {:?}",
        srv.lines()
    );
}

// 5. No unsolicited inbound traffic.

#[test]
fn direct_routed_and_spoofed_traffic_from_outside_never_reaches_a_container() {
    let t = Topology::new();
    let c = Container::start(&t);
    let cip = c.ip();
    let cap = Capture::start(c.cmd("python3"), "eth0");
    let _udp = container_udp(&c, LOG_UDP, 9000);
    let _tcp = c.spawn(&tcp_who_server(9001));
    c.wait_listen("tcp", 9001);
    let host_sink = Lines::python(t.host.cmd("python3"), LOG_UDP, &["9002"]);
    t.host.wait_listen("udp", 9002);
    // The marker comes through a port forward, the one legitimate way in.
    t.netns(&["port", "add", &c.id, "9100:9000/udp"]);
    t.wan
        .ip(&["route", "add", "172.19.0.0/16", "via", UPLINK_IP]);
    let before = t.stats();
    let o = python(
        t.wan.cmd("python3"),
        r#"
cip, wan, uplink = sys.argv[1:4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3):
    s.sendto(b"direct-udp", (cip, 9000))
t = socket.socket(); t.settimeout(1.5)
try:
    t.connect((cip, 9001)); print("tcp connected")
except OSError as e:
    print("tcp", type(e).__name__)
spoof = "172.19.0.99"
send_l3(ip4(spoof, cip, 17, udp(spoof, cip, 40000, 9000, b"spoofed-to-container")),
        ip4(spoof, uplink, 17, udp(spoof, uplink, 40000, 9002, b"spoofed-to-host")))
s.sendto(b"host-marker", (uplink, 9002))
s.sendto(b"container-marker", (uplink, 9100))
"#,
        &[&cip, WAN_IP, UPLINK_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        cap.wait(SHORT, |f| has_tag(f, "container-marker"))
            .is_some(),
        "control: the port-forwarded marker reaches the container: {:?}",
        cap.frames()
    );
    assert!(
        host_sink
            .wait_line(SHORT, |l| l.ends_with(" host-marker"))
            .is_some(),
        "control: the host's UDP socket gets the marker: {:?}",
        host_sink.lines()
    );
    let inbound: Vec<serde_json::Value> = cap
        .frames()
        .into_iter()
        .filter(|f| {
            f["dst"] == cip.as_str()
                && (has_tag(f, "direct-udp")
                    || has_tag(f, "spoofed-to-container")
                    || (f["proto"] == 6 && f["dport"] == 9001))
        })
        .collect();
    assert!(
        inbound.is_empty(),
        "unsolicited packets from outside reached the container: {inbound:?}"
    );
    assert!(
        out(&o).starts_with("tcp ") && !out(&o).contains("connected"),
        "{}",
        out(&o)
    );
    assert!(
        !host_sink
            .lines()
            .iter()
            .any(|l| l.contains("spoofed-to-host")),
        "a bridge-subnet source from outside reached a host socket: {:?}",
        host_sink.lines()
    );
    let after = t.stats();
    assert!(grew(&before, &after, "drop_inbound") >= 4, "{after}");
    assert!(
        grew(&before, &after, "drop_inbound_spoofed") >= 2,
        "{after}"
    );
}

#[test]
fn allow_inbound_opens_direct_routing_for_its_cidr_only_without_masquerade() {
    let t = Topology::with_flags(&["--allow-inbound=198.51.100.0/24"]);
    let far = t.add_far(1500);
    let c = Container::start(&t);
    let cip = c.ip();
    let udp = ChildGuard::spawn(c.cmd("python3").args(["-c", UDP_WHO, "9000"]));
    let _tcp = c.spawn(&tcp_who_server(9001));
    c.wait_listen("udp", 9000);
    c.wait_listen("tcp", 9001);
    let cap = Capture::start(t.wan.cmd("python3"), "wan0");
    t.wan
        .ip(&["route", "add", "172.19.0.0/16", "via", UPLINK_IP]);
    // Connected sockets: an answer proves it came from the container's own address.
    let want = format!("peer={WAN_IP}");
    assert_eq!(out(&t.wan_sh(&udp_ask(&cip, 9000))), want);
    assert_eq!(out(&t.wan_sh(&tcp_ask(&cip, 9001))), want);
    let replies: Vec<serde_json::Value> = cap
        .frames()
        .into_iter()
        .filter(|f| f["dir"] == 0 && (f["sport"] == 9000 || f["sport"] == 9001))
        .collect();
    assert!(
        !replies.is_empty() && replies.iter().all(|f| f["src"] == cip.as_str()),
        "the container's replies arrive with its own address: {replies:?}"
    );
    // 203.0.113.0/24 is not in --allow-inbound: still dropped.
    let before = t.stats();
    let o = python(
        far.cmd("python3"),
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
for i in range(3):
    s.sendto(b"from-far", (sys.argv[1], 9000))
try:
    print(s.recv(100).decode())
except OSError:
    pass
"#,
        &[&cip],
    );
    assert_eq!(
        out(&o),
        "",
        "a source outside --allow-inbound got in: {}",
        both(&o)
    );
    assert!(grew(&before, &t.stats(), "drop_inbound") >= 1);
    drop(udp);
}

// 6. Protocols without ports are masqueraded by address, never leaked.

/// GRE endpoint driven by stdin: "send TAG" sends a GRE packet carrying TAG to argv[1];
/// "recv SECS" prints "got TAG" for the next GRE packet from argv[1], or "timeout".
const GRE_DRIVER: &str = r#"
peer = sys.argv[1]
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "send":
        r.sendto(b"\x00\x00\x88\xb5" + arg.encode(), (peer, 0)); print("sent", arg, flush=True)
    else:
        r.settimeout(float(arg)); got = "timeout"
        try:
            while True:
                d, a = r.recvfrom(65535)
                if a[0] == peer:
                    got = "got " + d[(d[0] & 15) * 4 + 4:].decode(errors="replace"); break
        except socket.timeout:
            pass
        print(got, flush=True)
"#;

fn gre_driver(cmd: Command, peer: &str) -> Lines {
    let l = Lines::python(cmd, GRE_DRIVER, &[peer]);
    assert!(
        l.wait_line(SHORT, |x| x == "ready").is_some(),
        "{}",
        l.stderr()
    );
    l
}

fn private(f: &serde_json::Value) -> bool {
    f["src"].as_str().is_some_and(|s| s.starts_with("172.19."))
}

#[test]
fn gre_from_containers_is_masqueraded_by_address_and_never_leaks_a_private_source() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let cap = Capture::start(t.wan.cmd("python3"), "wan0");
    let mut ga = gre_driver(a.cmd("python3"), WAN_IP);
    let mut gb = gre_driver(b.cmd("python3"), WAN_IP);
    let before = t.stats();
    assert_eq!(
        ga.ask("send from-a-1", SHORT).as_deref(),
        Some("sent from-a-1")
    );
    let f = cap
        .wait(SHORT, |f| f["proto"] == 47 && has_tag(f, "from-a-1"))
        .unwrap_or_else(|| panic!("the wan never saw A's GRE: {:?}", cap.frames()));
    assert_eq!(f["src"], UPLINK_IP, "A's GRE on the wire: {f}");
    // The peer answers the host's address: the answer reaches A.
    let o = python(
        t.wan.cmd("python3"),
        r#"
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
r.sendto(b"\x00\x00\x88\xb5" + b"back-to-a", (sys.argv[1], 0))
"#,
        &[UPLINK_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    assert_eq!(
        ga.ask("recv 3", SHORT).as_deref(),
        Some("got back-to-a"),
        "the wan's GRE answer reaches the container"
    );
    // B talks GRE to the same peer while A's flow exists: it cannot be told apart on
    // the way back, so it is dropped. A's next packet is the marker.
    assert_eq!(
        gb.ask("send from-b-1", SHORT).as_deref(),
        Some("sent from-b-1")
    );
    assert_eq!(
        ga.ask("send from-a-2", SHORT).as_deref(),
        Some("sent from-a-2")
    );
    assert!(
        cap.wait(SHORT, |f| f["proto"] == 47 && has_tag(f, "from-a-2"))
            .is_some(),
        "{:?}",
        cap.frames()
    );
    let frames = cap.frames();
    let leaked: Vec<&serde_json::Value> = frames.iter().filter(|f| private(f)).collect();
    assert!(leaked.is_empty(), "private sources on the wan: {leaked:?}");
    assert!(
        !frames.iter().any(|f| has_tag(f, "from-b-1")),
        "B's colliding GRE left the host: {frames:?}"
    );
    let after = t.stats();
    assert!(grew(&before, &after, "proto_addr_only") >= 2, "{after}");
    assert!(
        grew(&before, &after, "drop_proto_collision") >= 1,
        "{after}"
    );
}

// 7. The bridge's FDB cannot be poisoned from a container.

/// The bridge port `mac` is learnt on (not the ports' own permanent entries).
fn fdb_port(t: &Topology, mac: &str) -> Option<String> {
    let fdb = run(t.host.cmd("bridge").args(["fdb", "show", "br", "netns0"]));
    fdb.lines()
        .filter(|l| !l.contains("permanent"))
        .find(|l| l.starts_with(&format!("{mac} dev ")))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
}

fn host_veth(t: &Topology, c: &Container<'_>) -> String {
    t.containers()
        .into_iter()
        .find(|e| e["id"] == c.id.as_str())
        .and_then(|e| e["host_veth"].as_str().map(str::to_owned))
        .expect("container in ls --json")
}

/// The container pings the gateway: its earlier frames have been through the bridge.
fn ping_gateway(c: &Container<'_>) {
    let o = c.sh(&format!("ping -c 1 -W 2 {GATEWAY}"));
    assert!(o.status.success(), "{} -> gateway: {}", c.id, both(&o));
}

struct FdbCase<'t> {
    t: &'t Topology,
    a: Container<'t>,
    b: Container<'t>,
    a_mac: String,
    a_port: String,
}

impl<'t> FdbCase<'t> {
    fn new(t: &'t Topology) -> FdbCase<'t> {
        let a = Container::start(t);
        let b = Container::start(t);
        let a_mac = a.mac();
        let a_port = host_veth(t, &a);
        let case = FdbCase {
            t,
            a,
            b,
            a_mac,
            a_port,
        };
        case.relearn();
        case
    }

    /// A speaks; the bridge learns its MAC on its port (the control).
    fn relearn(&self) {
        ping_gateway(&self.a);
        assert_eq!(
            fdb_port(self.t, &self.a_mac).as_deref(),
            Some(self.a_port.as_str()),
            "control: A's MAC learnt on A's port"
        );
    }

    /// B sends `frame` (a python expression over a_mac, b_mac, b_ip, br_mac) on eth0.
    fn b_sends(&self, frame: &str) {
        let br = mac_of(self.t.host.cmd("ip"), "netns0");
        let o = python(
            self.b.cmd("python3"),
            &format!("a_mac, b_mac, b_ip, br_mac, gw = sys.argv[1:6]\nsend_l2(\"eth0\", {frame})"),
            &[&self.a_mac, &self.b.mac(), &self.b.ip(), &br, GATEWAY],
        );
        assert!(o.status.success(), "{}", both(&o));
        ping_gateway(&self.b);
    }

    fn assert_unpoisoned(&self, what: &str) {
        assert_eq!(
            fdb_port(self.t, &self.a_mac).as_deref(),
            Some(self.a_port.as_str()),
            "after B sent {what} with A's MAC, the bridge forwards A's traffic to: {}",
            run(self
                .t
                .host
                .cmd("bridge")
                .args(["fdb", "show", "br", "netns0"]))
        );
        let o = netns_tests::util::output(self.t.host.cmd("ping").args([
            "-c",
            "1",
            "-W",
            "2",
            &self.a.ip(),
        ]));
        assert!(o.status.success(), "host -> A after {what}: {}", both(&o));
    }
}

#[test]
fn a_forged_mac_non_ip_frame_does_not_move_the_victims_fdb_entry() {
    let t = Topology::new();
    let case = FdbCase::new(&t);
    // A sees what the bridge floods to it.
    let cap = Capture::start(case.a.cmd("python3"), "eth0");
    let before = t.stats();
    // B: an 0x88b5 broadcast with A's MAC, one with its own MAC, then (the marker, a
    // legitimate broadcast) an ARP request of its own.
    case.b_sends(
        "eth(\"ff:ff:ff:ff:ff:ff\", a_mac, 0x88b5, b\"poison\" * 10), \
         eth(\"ff:ff:ff:ff:ff:ff\", b_mac, 0x88b5, b\"unknown\" * 10), \
         eth(\"ff:ff:ff:ff:ff:ff\", b_mac, 0x0806, struct.pack(\"!HHBBH\", 1, 0x0800, 6, 4, 1) \
             + mac(b_mac) + socket.inet_aton(b_ip) + bytes(6) + socket.inet_aton(\"172.19.255.254\"))",
    );
    case.assert_unpoisoned("an 0x88b5 frame");
    let b_ip = case.b.ip();
    assert!(
        cap.wait(SHORT, |f| f["etype"] == 0x0806
            && f["arp_sip"] == b_ip.as_str())
            .is_some(),
        "control: B's ARP request is flooded to A: {:?}",
        cap.frames()
    );
    let foreign: Vec<serde_json::Value> = cap
        .frames()
        .into_iter()
        .filter(|f| f["etype"] == 0x88b5)
        .collect();
    assert!(
        foreign.is_empty(),
        "B's non-IP frames crossed the bridge: {foreign:?}"
    );
    let after = t.stats();
    assert!(grew(&before, &after, "drop_ethertype") >= 1, "{after}");
    assert!(
        grew(&before, &after, "drop_ethertype") + grew(&before, &after, "drop_spoofed_mac") >= 2,
        "{after}"
    );
}

#[test]
fn forged_mac_ipv4_and_arp_probe_frames_are_dropped() {
    let t = Topology::new();
    let case = FdbCase::new(&t);
    let before = t.stats();
    // IPv4 from B's own address, with A's MAC.
    case.b_sends(
        "eth(br_mac, a_mac, 0x0800, ip4(b_ip, gw, 17, udp(b_ip, gw, 40000, 9, b\"poison\")))",
    );
    case.assert_unpoisoned("an IPv4 frame");
    // An ARP probe (sender IP 0.0.0.0), sender hardware address A's.
    case.relearn();
    case.b_sends(
        "eth(\"ff:ff:ff:ff:ff:ff\", a_mac, 0x0806, struct.pack(\"!HHBBH\", 1, 0x0800, 6, 4, 1) \
         + mac(a_mac) + socket.inet_aton(\"0.0.0.0\") + bytes(6) + socket.inet_aton(b_ip))",
    );
    case.assert_unpoisoned("an ARP probe");
    assert!(grew(&before, &t.stats(), "drop_spoofed_mac") >= 2);
}

// 8. Nothing a container sends configures the host.

#[test]
fn a_router_advertisement_from_a_container_leaves_the_hosts_addresses_and_routes_alone() {
    let t = Topology::new();
    let c = Container::start(&t);
    let before = t.stats();
    let o = python(
        c.cmd("python3"),
        r#"
cmac = sys.argv[1]
src, dst = "fe80::bad:1", "ff02::1"
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
ra += struct.pack("!BB", 1, 1) + mac(cmac)
ra += struct.pack("!BBBBIII", 3, 4, 64, 0xc0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, "2001:db8:5::")
send_l2("eth0", eth("33:33:00:00:00:01", cmac, 0x86dd, ip6(src, dst, 58, icmp6(src, dst, ra))))
"#,
        &[&c.mac()],
    );
    assert!(o.status.success(), "{}", both(&o));
    ping_gateway(&c);
    let addrs = t.host.ip(&["-6", "addr", "show", "dev", "netns0"]);
    assert!(
        !addrs.contains("2001:db8:5:"),
        "the host took an address from the container's RA: {addrs}"
    );
    let routes = t.host.ip(&["-6", "route", "show"]);
    assert!(
        !routes.contains("default") && !routes.contains("2001:db8:5:"),
        "the host took routes from the container's RA: {routes}"
    );
    let accept_ra = run(t
        .host
        .cmd("cat")
        .arg("/proc/sys/net/ipv6/conf/netns0/accept_ra"));
    assert_eq!(accept_ra.trim(), "0", "accept_ra on the bridge");
    let after = t.stats();
    assert!(
        grew(&before, &after, "drop_icmp_type")
            + grew(&before, &after, "drop_ethertype")
            + grew(&before, &after, "drop_ipv6_off")
            >= 1,
        "{after}"
    );
}

// 9. Packets netns does not act on go on to what comes after it.

/// Packets the filter chain of `dir` on up0 counted (its mirred action's statistics).
fn tc_count(t: &Topology, dir: &str) -> u64 {
    let s = run(t
        .host
        .cmd("tc")
        .args(["-s", "filter", "show", "dev", UPLINK, dir]));
    let words: Vec<&str> = s.split_whitespace().collect();
    words
        .windows(5)
        .find(|w| w[0] == "Sent" && w[2] == "bytes" && w[4] == "pkt")
        .and_then(|w| w[3].parse().ok())
        .unwrap_or_else(|| panic!("no action statistics in: {s}"))
}

/// (ingress, egress) TCX program names on up0 (BPF_PROG_QUERY in the host namespace).
fn tcx_on_uplink(t: &Topology) -> (Vec<String>, Vec<String>) {
    let x = t.tcx(UPLINK);
    let own = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect();
    (own(x.ingress_names()), own(x.egress_names()))
}

/// How many programs each socket hook of the topology's cgroup has.
fn cgroup_counts(t: &Topology) -> std::collections::BTreeMap<String, usize> {
    netns_tests::bpf::cgroup_hooks(&t.host, &t.cgroup)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .map(|(hook, progs)| (hook, progs.len()))
        .collect()
}

#[test]
fn a_legacy_tc_filter_after_the_datapath_still_sees_the_packets_it_passes() {
    let t = Topology::new();
    // A legacy clsact chain on the uplink: match every IPv4 packet, mirror it to a sink
    // veth in the host namespace (the action's statistics count what the chain saw).
    t.host.ip(&[
        "link", "add", "tcs0", "type", "veth", "peer", "name", "tcs1",
    ]);
    t.host.ip(&["link", "set", "tcs0", "up"]);
    t.host.ip(&["link", "set", "tcs1", "up"]);
    run(t
        .host
        .cmd("tc")
        .args(["qdisc", "add", "dev", UPLINK, "clsact"]));
    for dir in ["ingress", "egress"] {
        run(t.host.cmd("tc").args([
            "filter", "add", "dev", UPLINK, dir, "protocol", "ip", "u32", "match", "u32", "0", "0",
            "action", "mirred", "egress", "mirror", "dev", "tcs0",
        ]));
    }
    let ping = || {
        let o = t.wan_sh(&format!("ping -c 3 -i 0.2 -W 2 {UPLINK_IP}"));
        assert!(o.status.success(), "wan -> host ping: {}", both(&o));
    };
    // Control: without the datapath the chain counts the pings both ways.
    let (i0, e0) = (tc_count(&t, "ingress"), tc_count(&t, "egress"));
    ping();
    let (i1, e1) = (tc_count(&t, "ingress"), tc_count(&t, "egress"));
    assert!(
        i1 - i0 >= 3 && e1 - e0 >= 3,
        "control: {i0}->{i1} {e0}->{e1}"
    );
    let _c = Container::start(&t);
    let (ing, eg) = tcx_on_uplink(&t);
    assert!(
        ing.len() == 1 && eg.len() == 1,
        "control: the datapath's TCX programs are on up0: {ing:?} {eg:?}"
    );
    ping();
    let (i2, e2) = (tc_count(&t, "ingress"), tc_count(&t, "egress"));
    assert!(
        i2 - i1 >= 3,
        "ingress chain after netns's TCX program saw {} of 3 pings",
        i2 - i1
    );
    assert!(
        e2 - e1 >= 3,
        "egress chain after netns's TCX program saw {} of 3 replies",
        e2 - e1
    );
}

// 10. A new layout version detaches the old version's links.

/// Removes a bpffs directory of this test on drop (unpinning detaches its links).
struct BpffsDir(PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `netns ARGS` with the topology's flags but `--bpffs-dir dir`.
fn netns_with_bpffs(t: &Topology, dir: &Path, args: &[&str]) -> String {
    let mut flags = t.flags();
    let i = flags
        .iter()
        .position(|f| f == "--bpffs-dir")
        .expect("--bpffs-dir in flags");
    flags[i + 1] = dir.display().to_string();
    run(t
        .host
        .cmd(netns_bin().to_str().unwrap())
        .args(flags)
        .args(args))
}

fn layout_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('v'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn loading_a_new_layout_detaches_the_old_layouts_links() {
    let t = Topology::new();
    t.netns(&["load"]);
    let dirs = layout_dirs(&t.bpffs_dir);
    assert_eq!(dirs.len(), 1, "one layout directory: {dirs:?}");
    let version: u32 = dirs[0][1..].parse().expect("v<N>");
    let (ing, eg) = tcx_on_uplink(&t);
    assert!(ing.len() == 1 && eg.len() == 1, "control: {ing:?} {eg:?}");
    let cg = cgroup_counts(&t);
    assert!(
        cg.len() == 5 && cg.values().all(|n| *n == 1),
        "control: {cg:?}"
    );
    // Make that datapath look like an older layout under another bpffs directory.
    let other = BpffsDir(PathBuf::from(format!("{}-old", t.bpffs_dir.display())));
    std::fs::create_dir_all(&other.0).expect("mkdir");
    let old = other.0.join(format!("v{}", version.saturating_sub(1)));
    std::fs::rename(t.bpffs_dir.join(&dirs[0]), &old).expect("mv within bpffs");
    let (ing, eg) = tcx_on_uplink(&t);
    assert!(
        ing.len() == 1 && eg.len() == 1,
        "control: the moved pins keep their links: {ing:?} {eg:?}"
    );
    netns_with_bpffs(&t, &other.0, &["load"]);
    let (ing, eg) = tcx_on_uplink(&t);
    assert!(
        ing.len() == 1 && eg.len() == 1,
        "exactly one netns program per direction on up0: ingress {ing:?} egress {eg:?}"
    );
    let cg = cgroup_counts(&t);
    for (hook, n) in &cg {
        assert_eq!(
            *n, 1,
            "exactly one netns program on the cgroup's {hook} hook: {cg:?}"
        );
    }
    assert!(
        !old.exists(),
        "the old layout's pins are gone: {:?}",
        layout_dirs(&other.0)
    );
    assert_eq!(layout_dirs(&other.0), vec![format!("v{version}")]);
    let o = t.wan_sh(&format!("ping -c 1 -W 2 {UPLINK_IP}"));
    assert!(o.status.success(), "{}", both(&o));
}

// 11. Two host clients of one UDP forward at once each see their own peer.

/// Two processes, each with a UDP socket, in lockstep: both send (to 127.0.0.1:8053
/// and to argv[1]:8053), then both receive; five rounds. Prints "WHO ROUND ADDR:PORT
/// PAYLOAD" for every answer.
const TWO_CLIENTS: &str = r#"
targets = [("127.0.0.1", 8053), (sys.argv[1], 8053)]
r1, w1 = os.pipe(); r2, w2 = os.pipe()
me = 1 if os.fork() == 0 else 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
def turn(first):
    if me == 0:
        first(); os.write(w1, b"x"); os.read(r2, 1)
    else:
        os.read(r1, 1); first(); os.write(w2, b"x")
def send(i):
    s.sendto(b"%d-%d" % (me, i), targets[me])
def recv(i):
    try:
        d, a = s.recvfrom(100); print(me, i, "%s:%d" % a, d.decode(), flush=True)
    except socket.timeout:
        print(me, i, "timeout", flush=True)
for i in range(5):
    turn(lambda: send(i))
    turn(lambda: recv(i))
if me == 1:
    os._exit(0)
os.wait()
"#;

#[test]
fn concurrent_localhost_and_uplink_clients_of_one_udp_forward_see_their_own_peers() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _echo = container_udp(&c, UDP_ECHO, 53);
    t.netns(&["port", "add", &c.id, "8053:53/udp"]);
    let o = t.host_python(TWO_CLIENTS, &[UPLINK_IP]);
    let o_text = out(&o);
    assert_eq!(o_text.lines().count(), 10, "{}", both(&o));
    for l in o_text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let want = if w[0] == "0" {
            "127.0.0.1:8053".to_owned()
        } else {
            format!("{UPLINK_IP}:8053")
        };
        assert_eq!(
            (w.get(2).copied(), w.get(3).copied()),
            (
                Some(want.as_str()),
                Some(format!("{}-{}", w[0], w[1]).as_str())
            ),
            "each socket sees the address it sent to: {o_text}"
        );
    }
}

// 12. Truncated L4 headers are malformed packets.

#[test]
fn truncated_l4_headers_are_counted_as_malformed_not_as_helper_failures() {
    let t = Topology::new();
    let c = Container::start(&t);
    let cip = c.ip();
    let _sink = wan_udp(&t, UDP_ECHO, 7001);
    let cap = Capture::start(t.wan.cmd("python3"), "wan0");
    let before = t.stats();
    let o = python(
        c.cmd("python3"),
        r#"
cip, wan = sys.argv[1:3]
send_l3(ip4(cip, wan, 6, tcp(cip, wan, 40001, 7000, 0x02)[:14]),
        ip4(cip, wan, 17, udp(cip, wan, 40002, 7000, b"")[:6]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"marker", (wan, 7001))
"#,
        &[&cip, WAN_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        cap.wait(SHORT, |f| has_tag(f, "marker") && f["src"] == UPLINK_IP)
            .is_some(),
        "control: the marker is masqueraded: {:?}",
        cap.frames()
    );
    let after = t.stats();
    assert_eq!(
        grew(&before, &after, "drop_csum_helper"),
        0,
        "a truncated header is no helper failure: {after}"
    );
    assert!(
        grew(&before, &after, "drop_malformed") >= 2,
        "both truncated packets are malformed: {after}"
    );
    let leaked: Vec<serde_json::Value> = cap.frames().into_iter().filter(private).collect();
    assert!(leaked.is_empty(), "private sources on the wan: {leaked:?}");
}
