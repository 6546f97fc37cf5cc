//! Issue 12 (part 1): the fast path (`--fast-path on`). Translated traffic skips the
//! host stack: from the uplink into the container's namespace (`bpf_redirect_peer`,
//! `fast_in`), from a container to the uplink's next hop (`bpf_fib_lookup` +
//! `bpf_redirect`/`bpf_redirect_neigh`, `fast_out`), container to container straight
//! to the other veth peer (`fast_local`); what the stack must answer (TTL expiring,
//! too big for the route) still goes the stack's way.
//!
//! Every test builds its topology with `--fast-path on` (one with `off`, to compare).
//! The observers are the peers (data hashed on
//! both ends, what a socket's error queue says, the TTL a datagram arrives with),
//! AF_PACKET captures, the host namespace's own counters (`Ip: ForwDatagrams`: what the
//! stack forwarded; a bridge port's TX packets: what the bridge delivered), and the
//! datapath's `fast_*` counters, which prove which path ran. Everything stays inside
//! each test's private topology (198.51.100.0/24, 172.19.0.0/16).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use netns_tests::pkt::python;
use netns_tests::pkt::{Capture, Lines};
use netns_tests::topo::{GATEWAY, UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::{UDP_WHO, run, udp_ask};
use netns_tests::util::{both, grew, out};
use netns_tests::{Container, Topology};

/// The bridge the topology's hooks make (the default `--bridge`).
const BRIDGE: &str = "netns0";

/// A topology with `--fast-path MODE` (an explicit flag wins over
/// `NETNS_TEST_FAST_PATH`, which runs other suites in either mode).
fn topology(mode: &str) -> Topology {
    Topology::with_flags(&["--fast-path", mode])
}

/// `Ip: ForwDatagrams` of the namespace `cat` runs in: the packets its stack forwarded.
fn forwarded(mut cat: Command) -> u64 {
    let snmp = run(cat.arg("/proc/net/snmp"));
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip.next().expect("Ip: names"),
        ip.next().expect("Ip: values"),
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .expect("ForwDatagrams in /proc/net/snmp");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("ForwDatagrams value")
}

/// TX packets of `dev` in the host namespace: for a bridge port, the frames the bridge
/// (not the fast path) delivered to its container.
fn tx_packets(t: &Topology, dev: &str) -> u64 {
    let j: serde_json::Value =
        serde_json::from_str(&t.host.ip(&["-j", "-s", "link", "show", "dev", dev]))
            .expect("ip -j is JSON");
    j[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx packets for {dev}: {j}"))
}

fn annotated<'t>(t: &'t Topology, ports: &str) -> Container<'t> {
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), ports.to_owned());
    Container::start_with(t, &ann, &[])
        .unwrap_or_else(|o| panic!("start: {}", String::from_utf8_lossy(&o.stderr)))
}

// Servers and clients (python; PY_LIB is prepended).

/// Both ends of one TCP connection send N bytes (seeded pseudo-random) while
/// receiving; each prints `sent SHA LEN` and `got SHA LEN` (the listener first prints
/// `listening`, then `peer ADDR`). `listen PORT N SEED` or `connect ADDR PORT N SEED`.
const XFER: &str = r#"
import threading, hashlib, random
if sys.argv[1] == "listen":
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(sys.argv[2]))); l.listen(1)
    print("listening", flush=True)
    s, a = l.accept(); rest = sys.argv[3:]
    print("peer", a[0], flush=True)
else:
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10); rest = sys.argv[4:]
s.settimeout(30)
n, seed = int(rest[0]), int(rest[1])
res = []
def send():
    r, h, left = random.Random(seed), hashlib.sha256(), n
    try:
        while left:
            b = r.randbytes(min(left, 1 << 20)); s.sendall(b); h.update(b); left -= len(b)
        s.shutdown(socket.SHUT_WR)
        res.append("sent %s %d" % (h.hexdigest(), n))
    except OSError as e:
        res.append("sent-failed %r after %d" % (e, n - left))
th = threading.Thread(target=send); th.start()
h, m = hashlib.sha256(), 0
try:
    while True:
        b = s.recv(1 << 18)
        if not b: break
        h.update(b); m += len(b)
except OSError as e:
    print("recv-failed %r" % e, flush=True)
th.join()
print(res[0]); print("got %s %d" % (h.hexdigest(), m), flush=True)
"#;

/// UDP server on argv[1]: prints `ADDR PAYLOAD len=N ttl=T` for every datagram (T:
/// the TTL it arrived with) and echoes its first 64 bytes.
const UDP_LOG: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IP, 12, 1)  # IP_RECVTTL
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, anc, fl, a = s.recvmsg(65535, 64)
    ttl = [struct.unpack("i", c[2][:4])[0] for c in anc if c[0] == socket.IPPROTO_IP and c[1] == 2]
    print("%s %s len=%d ttl=%s" % (a[0], d[:24].decode(errors="replace"), len(d), ttl[0] if ttl else "?"), flush=True)
    s.sendto(d[:64], a)
"#;

/// UDP client: for each TTL in argv[3:], sends `ttlN` to argv[1]:argv[2] with that TTL
/// and prints `ttlN type=T code=C from=ADDR` for an ICMP error on the socket's error
/// queue (IP_RECVERR), `ttlN none` if none came.
const TTL_PROBE: &str = r#"
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
for ttl in map(int, sys.argv[3:]):
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    s.sendto(b"ttl%d" % ttl, (addr, port))
    end, res = time.time() + 2, "none"
    while time.time() < end:
        try:
            d, anc, fl, a = s.recvmsg(100, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            e = anc[0][2]
            res = "type=%d code=%d from=%s" % (e[5], e[6], socket.inet_ntoa(e[20:24]))
            break
        except BlockingIOError:
            time.sleep(0.05)
    print("ttl%d %s" % (ttl, res), flush=True)
"#;

/// UDP client with path MTU discovery on (IP_PMTUDISC_DO, so DF and never fragmented
/// locally) to argv[1]:argv[2]: sends a 1400-byte datagram, waits for an ICMP error
/// on the error queue (`icmp type=T code=C mtu=M from=ADDR` or `icmp none`), sends it
/// again (`again ok` or `again errno=E`), prints the socket's `ip_mtu M`, then sends a
/// small datagram.
const PMTU_PROBE: &str = r#"
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.connect((addr, port))
big = b"big-" + b"x" * 1396
s.send(big)
end, res = time.time() + 3, "none"
while time.time() < end:
    try:
        d, anc, fl, a = s.recvmsg(2000, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        e = anc[0][2]
        res = "type=%d code=%d mtu=%d from=%s" % (e[5], e[6], struct.unpack("I", e[8:12])[0], socket.inet_ntoa(e[20:24]))
        break
    except BlockingIOError:
        time.sleep(0.05)
print("icmp", res, flush=True)
try:
    s.send(big); print("again ok", flush=True)
except OSError as e:
    print("again errno=%d" % e.errno, flush=True)
print("ip_mtu", s.getsockopt(socket.IPPROTO_IP, 14), flush=True)
s.send(b"small")
"#;

/// UDP client: sends one datagram argv[3] to argv[1]:argv[2] and waits 5 s for the
/// answer, no retry: prints `answer TEXT` or `no answer`.
const UDP_ONCE: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2]))); s.settimeout(5)
s.send(sys.argv[3].encode())
try:
    print("answer", s.recv(100).decode(), flush=True)
except (socket.timeout, ConnectionRefusedError):
    print("no answer", flush=True)
"#;

/// A TCP transfer of `n` bytes each way between a listener `srv` (running [`XFER`]
/// `listen`, already listening) and a client `cmd` connecting to addr:port; asserts
/// that both ends got exactly what the other sent. Returns the listener's `peer`.
fn xfer(srv: &Lines, cmd: Command, addr: &str, port: u16, n: usize, what: &str) -> String {
    let n = n.to_string();
    let cl = python(cmd, XFER, &["connect", addr, &port.to_string(), &n, "2"]);
    let line = |l: &[String], p: &str| -> Option<String> {
        l.iter()
            .find(|x| x.starts_with(p))
            .map(|x| x[p.len()..].trim().to_owned())
    };
    let done = srv.wait_line(Duration::from_secs(30), |l| l.starts_with("got "));
    let sl = srv.lines();
    let cll: Vec<String> = out(&cl).lines().map(str::to_owned).collect();
    assert!(
        done.is_some() && cl.status.success(),
        "{what}: transfer did not finish: server {sl:?} {}; client {}",
        srv.stderr(),
        both(&cl)
    );
    let full = |s: &Option<String>| s.as_deref().is_some_and(|s| s.ends_with(&format!(" {n}")));
    let (c_sent, c_got) = (line(&cll, "sent "), line(&cll, "got "));
    let (s_sent, s_got) = (line(&sl, "sent "), line(&sl, "got "));
    assert!(
        full(&c_sent) && c_sent == s_got,
        "{what}: client -> server data differs: client {cll:?}, server {sl:?}"
    );
    assert!(
        full(&s_sent) && s_sent == c_got,
        "{what}: server -> client data differs: client {cll:?}, server {sl:?}"
    );
    line(&sl, "peer ").unwrap_or_default()
}

fn xfer_server(cmd: Command, port: u16, n: usize) -> Lines {
    let srv = Lines::python(
        cmd,
        XFER,
        &["listen", &port.to_string(), &n.to_string(), "1"],
    );
    assert!(
        srv.wait_line(Duration::from_secs(10), |l| l == "listening")
            .is_some(),
        "xfer server: {}",
        srv.stderr()
    );
    srv
}

fn udp_log(cmd: Command, port: u16) -> Lines {
    let srv = Lines::python(cmd, UDP_LOG, &[&port.to_string()]);
    assert!(
        srv.wait_line(Duration::from_secs(10), |l| l == "ready")
            .is_some(),
        "udp server: {}",
        srv.stderr()
    );
    srv
}

/// The fewest packets that can carry `bytes` of TCP payload: 64 KiB GSO segments.
fn min_packets(bytes: usize) -> u64 {
    (bytes / 65536) as u64
}

#[test]
fn bulk_tcp_both_ways_through_masquerade_and_a_port_forward_takes_the_fast_path() {
    const N: usize = 100 << 20;
    let t = topology("on");
    let c = Container::start(&t);
    t.netns(&["port", "add", &c.id, "8300:7300/tcp"]);
    let s0 = t.stats();
    let f0 = forwarded(t.host.cmd("cat"));
    // Masquerade: the container connects out; 100 MB each way on one connection.
    let srv = xfer_server(t.wan.cmd("python3"), 7301, N);
    let peer = xfer(&srv, c.cmd("python3"), WAN_IP, 7301, N, "masquerade");
    assert_eq!(peer, UPLINK_IP, "masqueraded");
    // Port forward: wan connects in; 100 MB each way.
    let srv = xfer_server(c.cmd("python3"), 7300, N);
    let peer = xfer(
        &srv,
        t.wan.cmd("python3"),
        UPLINK_IP,
        8300,
        N,
        "port forward",
    );
    assert_eq!(peer, WAN_IP, "the container sees the real peer");
    let s1 = t.stats();
    let fwd = forwarded(t.host.cmd("cat")) - f0;
    let (fin, fout) = (grew(&s0, &s1, "fast_in"), grew(&s0, &s1, "fast_out"));
    let report = format!(
        "fast_in +{fin}, fast_out +{fout}, the host stack forwarded {fwd}, port_passed +{}, \
         snat_packets +{}, snat_reply_packets +{}, dnat_packets +{}, dnat_reply_packets +{}",
        grew(&s0, &s1, "port_passed"),
        grew(&s0, &s1, "snat_packets"),
        grew(&s0, &s1, "snat_reply_packets"),
        grew(&s0, &s1, "dnat_packets"),
        grew(&s0, &s1, "dnat_reply_packets"),
    );
    // 200 MB went each way: at least that many 64 KiB packets, and every one of them
    // took the fast path (the host stack forwarded next to nothing).
    let want = min_packets(2 * N);
    assert!(
        fin >= want && fout >= want,
        "both directions on the fast path, at least {want} packets each: {report}"
    );
    assert!(
        fwd <= 16,
        "the host stack forwarded packets the fast path should have sent: {report}"
    );
}

#[test]
fn too_big_for_the_uplink_mtu_gets_frag_needed_and_tcp_still_works() {
    let t = topology("on");
    // Both containers start with the uplink's MTU (1500); then the wan link shrinks to
    // 1280 on both ends. wan advertises a 1460-byte MSS all the same (advmss on its
    // route), so the container's TCP sends segments too big for the link.
    let udp_c = Container::start(&t);
    let tcp_c = Container::start(&t);
    t.host.ip(&["link", "set", UPLINK, "mtu", "1280"]);
    t.wan.ip(&["link", "set", "wan0", "mtu", "1280"]);
    t.wan.ip(&[
        "route",
        "replace",
        "198.51.100.0/24",
        "dev",
        "wan0",
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        WAN_IP,
        "advmss",
        "1460",
    ]);
    let is_frag_needed = |f: &serde_json::Value| {
        let d = f["data"].as_str().unwrap_or("");
        f["proto"] == 1
            && f["src"] == GATEWAY
            && d.starts_with("0304")
            && d.get(12..16) == Some("0500")
    };

    // UDP, DF: the first 1400-byte datagram is refused with "fragmentation needed,
    // MTU 1280" from the gateway; the socket learns it, the next send fails locally.
    let sink = udp_log(t.wan.cmd("python3"), 7310);
    let cap = Capture::start(udp_c.cmd("python3"), "eth0");
    let s0 = t.stats();
    let o = python(udp_c.cmd("python3"), PMTU_PROBE, &[WAN_IP, "7310"]);
    let o = out(&o);
    assert!(
        o.contains(&format!("icmp type=3 code=4 mtu=1280 from={GATEWAY}")),
        "UDP with DF: frag needed from the gateway on the socket: {o}"
    );
    assert!(o.contains("again errno=90"), "then EMSGSIZE: {o}");
    assert!(o.contains("ip_mtu 1280"), "the socket's path MTU: {o}");
    assert!(
        cap.wait(Duration::from_secs(3), is_frag_needed).is_some(),
        "ICMP 3/4 (mtu 1280) from {GATEWAY} on the container's eth0: {:?}",
        cap.frames()
    );
    assert!(
        sink.wait_line(Duration::from_secs(3), |l| l
            .starts_with(&format!("{UPLINK_IP} small")))
            .is_some(),
        "the small datagram after it arrives: {:?}",
        sink.lines()
    );
    assert!(
        !sink.lines().iter().any(|l| l.contains(" big-")),
        "the 1400-byte DF datagram never reached wan (not pushed through, not \
         fragmented): {:?}",
        sink.lines()
    );
    let s1 = t.stats();
    assert!(
        grew(&s0, &s1, "fast_out") >= 1,
        "the small one took the fast path: {s1}"
    );
    drop(cap);

    // TCP: 1460-byte segments are refused the same way; the container's TCP learns
    // the path MTU and the data arrives intact.
    let cap = Capture::start(tcp_c.cmd("python3"), "eth0");
    let srv = xfer_server(t.wan.cmd("python3"), 7311, 4 << 20);
    xfer(
        &srv,
        tcp_c.cmd("python3"),
        WAN_IP,
        7311,
        4 << 20,
        "TCP across 1280",
    );
    assert!(
        cap.wait(Duration::from_secs(3), is_frag_needed).is_some(),
        "ICMP 3/4 (mtu 1280) from {GATEWAY} on the TCP container's eth0: {:?}",
        cap.frames()
            .iter()
            .filter(|f| f["proto"] == 1)
            .collect::<Vec<_>>()
    );
    let route = out(&tcp_c.sh(&format!("ip route get {WAN_IP}")));
    assert!(route.contains("mtu 1280"), "path MTU learnt: {route}");
}

#[test]
fn ttl_one_gets_time_exceeded_from_the_gateway_and_ttls_drop_by_one() {
    let t = topology("on");
    let c = annotated(&t, "8320:7320/udp");
    let sink = udp_log(t.wan.cmd("python3"), 7321);
    let s0 = t.stats();
    // Container -> wan (UDP): TTL 1 expires at the gateway, 2 and 64 arrive one less.
    let o = out(&python(
        c.cmd("python3"),
        TTL_PROBE,
        &[WAN_IP, "7321", "1", "2", "64"],
    ));
    assert!(
        o.contains(&format!("ttl1 type=11 code=0 from={GATEWAY}")),
        "time exceeded from the gateway: {o}"
    );
    assert!(o.contains("ttl2 none") && o.contains("ttl64 none"), "{o}");
    let got = |want: &str| {
        sink.wait_line(Duration::from_secs(2), |l| l.starts_with(want))
            .is_some()
    };
    assert!(
        got(&format!("{UPLINK_IP} ttl2 len=4 ttl=1"))
            && got(&format!("{UPLINK_IP} ttl64 len=5 ttl=63")),
        "TTL 2 and 64 arrive decremented once: {:?}",
        sink.lines()
    );
    assert!(
        !sink.lines().iter().any(|l| l.contains(" ttl1 ")),
        "TTL 1 never left: {:?}",
        sink.lines()
    );
    // ICMP echo the same.
    let ping1 = c.sh(&format!("ping -n -c 1 -W 2 -t 1 {WAN_IP}"));
    assert!(
        out(&ping1).contains(&format!("From {GATEWAY} icmp_seq=1 Time to live exceeded")),
        "ping -t 1: {}",
        both(&ping1)
    );
    let ping2 = c.sh(&format!("ping -n -c 1 -W 2 -t 2 {WAN_IP}"));
    assert!(
        ping2.status.success(),
        "ping -t 2 is answered: {}",
        both(&ping2)
    );
    let s1 = t.stats();
    assert!(
        grew(&s0, &s1, "fast_out") >= 3,
        "TTL 2 and 64 took the fast path: {s1}"
    );

    // wan -> the port forward: TTL 1 expires at the host (the error translated back to
    // the mapped address), 2 and 64 arrive in the container one less.
    let csink = udp_log(c.cmd("python3"), 7320);
    let o = out(&python(
        t.wan.cmd("python3"),
        TTL_PROBE,
        &[UPLINK_IP, "8320", "1", "2", "64"],
    ));
    assert!(
        o.contains(&format!("ttl1 type=11 code=0 from={UPLINK_IP}")),
        "time exceeded from the uplink address: {o}"
    );
    let cgot = |want: &str| {
        csink
            .wait_line(Duration::from_secs(2), |l| l.starts_with(want))
            .is_some()
    };
    assert!(
        cgot(&format!("{WAN_IP} ttl2 len=4 ttl=1"))
            && cgot(&format!("{WAN_IP} ttl64 len=5 ttl=63")),
        "TTL 2 and 64 arrive in the container decremented once: {:?}",
        csink.lines()
    );
    assert!(
        !csink.lines().iter().any(|l| l.contains(" ttl1 ")),
        "TTL 1 never reached the container: {:?}",
        csink.lines()
    );
    let s2 = t.stats();
    assert!(
        grew(&s1, &s2, "fast_in") >= 2,
        "TTL 2 and 64 took the fast path in: {s2}"
    );
}

/// Whether `ip neigh show ADDR dev DEV` in the host has a resolved entry.
fn neighbour(t: &Topology, addr: &str, dev: &str) -> String {
    t.host.ip(&["neigh", "show", addr, "dev", dev])
}

#[test]
fn the_first_packet_needs_no_neighbour_entry_either_way() {
    let t = topology("on");
    // Right after the container starts: a port forward from the annotation, no
    // neighbour entry for the container on the bridge, none for wan on the uplink.
    let c = annotated(&t, "8330:7330/udp");
    let csrv = udp_log(c.cmd("python3"), 7330);
    let cip = c.ip();
    t.host.ip(&["neigh", "flush", "dev", BRIDGE]);
    t.host.ip(&["neigh", "flush", "dev", UPLINK]);
    for (a, d) in [(cip.as_str(), BRIDGE), (WAN_IP, UPLINK)] {
        let n = neighbour(&t, a, d);
        assert!(!n.contains("lladdr"), "no entry for {a} on {d}: {n}");
    }
    let s0 = t.stats();
    // One datagram in, no retry: it reaches the container and its answer comes back.
    let o = out(&python(
        t.wan.cmd("python3"),
        UDP_ONCE,
        &[UPLINK_IP, "8330", "first-in"],
    ));
    assert_eq!(o, "answer first-in", "server saw {:?}", csrv.lines());
    // The server logs before it answers, but our reader may not have its line yet.
    csrv.wait_line(Duration::from_secs(5), |l| l.contains(" first-in "));
    assert_eq!(
        csrv.lines()
            .iter()
            .filter(|l| l.starts_with(&format!("{WAN_IP} first-in ")))
            .count(),
        1,
        "{:?}",
        csrv.lines()
    );
    let s1 = t.stats();
    assert!(
        grew(&s0, &s1, "fast_in") >= 1 && grew(&s0, &s1, "fast_out") >= 1,
        "both ways on the fast path: {s1}"
    );

    // One datagram out after the uplink's neighbour entry for wan is flushed again:
    // bpf_redirect_neigh resolves it, the datagram arrives, the answer comes back.
    let wsrv = udp_log(t.wan.cmd("python3"), 7331);
    t.host.ip(&["neigh", "flush", "dev", UPLINK]);
    t.host.ip(&["neigh", "flush", "dev", BRIDGE]);
    let n = neighbour(&t, WAN_IP, UPLINK);
    assert!(!n.contains("lladdr"), "no entry for wan: {n}");
    let o = out(&python(
        c.cmd("python3"),
        UDP_ONCE,
        &[WAN_IP, "7331", "first-out"],
    ));
    assert_eq!(o, "answer first-out", "wan saw {:?}", wsrv.lines());
    wsrv.wait_line(Duration::from_secs(5), |l| l.contains(" first-out "));
    assert_eq!(
        wsrv.lines()
            .iter()
            .filter(|l| l.starts_with(&format!("{UPLINK_IP} first-out ")))
            .count(),
        1,
        "{:?}",
        wsrv.lines()
    );
    let s2 = t.stats();
    assert!(
        grew(&s1, &s2, "fast_out") >= 1 && grew(&s1, &s2, "fast_in") >= 1,
        "both ways on the fast path: {s2}"
    );
    let n = neighbour(&t, WAN_IP, UPLINK);
    assert!(n.contains("lladdr"), "the kernel resolved wan: {n}");
}

/// Two containers exchange `n` bytes each way over TCP and a UDP datagram; returns
/// (fast_local growth, frames the bridge delivered to the two ports).
fn container_to_container(t: &Topology, n: usize) -> (u64, u64) {
    let a = Container::start(t);
    let b = Container::start(t);
    let bip = b.ip();
    let usrv = udp_log(b.cmd("python3"), 7341);
    let srv = xfer_server(b.cmd("python3"), 7340, n);
    let s0 = t.stats();
    let tx0 = tx_packets(t, &a.host_veth()) + tx_packets(t, &b.host_veth());
    let peer = xfer(
        &srv,
        a.cmd("python3"),
        &bip,
        7340,
        n,
        "container to container",
    );
    assert_eq!(peer, a.ip(), "not translated");
    let o = out(&a.sh(&udp_ask(&bip, 7341)));
    assert!(o.starts_with("hi"), "UDP echo between containers: {o:?}");
    // On one L2 segment: the TTL is untouched.
    assert!(
        usrv.lines()
            .iter()
            .any(|l| l.starts_with(&format!("{} hi len=2 ttl=64", a.ip()))),
        "{:?}",
        usrv.lines()
    );
    let s1 = t.stats();
    let tx = tx_packets(t, &a.host_veth()) + tx_packets(t, &b.host_veth()) - tx0;
    (grew(&s0, &s1, "fast_local"), tx)
}

#[test]
fn container_to_container_goes_port_to_port_on_the_fast_path() {
    const N: usize = 20 << 20;
    let t = topology("on");
    let (local, bridged) = container_to_container(&t, N);
    let want = min_packets(2 * N);
    assert!(
        local >= want,
        "fast_local +{local}, want at least {want} (the bridge delivered {bridged})"
    );
    assert!(
        bridged < local / 20,
        "the bridge delivered {bridged} frames, fast_local +{local}"
    );
}

#[test]
fn container_to_container_with_the_fast_path_off_goes_through_the_bridge() {
    const N: usize = 20 << 20;
    let t = topology("off");
    let (local, bridged) = container_to_container(&t, N);
    assert_eq!(local, 0, "fast_local stays 0 with --fast-path off");
    let want = min_packets(2 * N);
    assert!(
        bridged >= want,
        "the bridge delivered {bridged} frames, want at least {want}"
    );
}

#[test]
fn hairpin_through_the_uplink_address_still_works() {
    const N: usize = 10 << 20;
    let t = topology("on");
    let target = annotated(&t, "8350:7350/tcp, 8350:7350/udp");
    let other = Container::start(&t);
    let _who =
        netns_tests::util::ChildGuard::spawn(target.cmd("python3").args(["-c", UDP_WHO, "7350"]));
    target.wait_listen("udp", 7350);
    let s0 = t.stats();
    for (name, client) in [
        ("another container", &other),
        ("the target itself", &target),
    ] {
        let srv = xfer_server(target.cmd("python3"), 7350, N);
        let peer = xfer(&srv, client.cmd("python3"), UPLINK_IP, 8350, N, name);
        assert_eq!(peer, GATEWAY, "{name}: hairpin source");
        let o = out(&client.sh(&udp_ask(UPLINK_IP, 8350)));
        assert_eq!(o, format!("peer={GATEWAY}"), "{name}: UDP hairpin");
    }
    let s1 = t.stats();
    let want = min_packets(4 * N);
    assert!(
        grew(&s0, &s1, "hairpin_packets") >= want,
        "hairpinned port to port: {s1}"
    );
}

/// The fast path bypasses netfilter's FORWARD chain: loading it says so, once, when
/// rules there name the bridge; with no such rule, or with the fast path off, nothing.
#[test]
fn loading_the_fast_path_warns_about_forward_rules_it_bypasses() {
    let load = |t: &Topology| {
        let o = t.netns_cmd(&["load"]).output().unwrap();
        assert!(o.status.success(), "{}", both(&o));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let on = topology("on");
    assert!(!load(&on).contains("bypasses netfilter FORWARD"));
    // A rule in this test's own host namespace only.
    let o = on.host_sh(&format!("iptables -A FORWARD -i {BRIDGE} -j ACCEPT"));
    assert!(o.status.success(), "{}", both(&o));
    let msg = load(&on);
    assert!(
        msg.contains("bypasses netfilter FORWARD") && msg.contains(BRIDGE),
        "{msg}"
    );
    let off = topology("off");
    let o = off.host_sh(&format!("iptables -A FORWARD -i {BRIDGE} -j ACCEPT"));
    assert!(o.status.success(), "{}", both(&o));
    assert!(!load(&off).contains("bypasses netfilter FORWARD"));
    // `datapath status` says which path is active.
    let mode = |t: &Topology| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&t.netns(&["--json", "datapath", "status"])).unwrap();
        v["fast_path"].clone()
    };
    assert_eq!(mode(&on), true);
    assert_eq!(mode(&off), false);
    assert!(on.netns(&["datapath", "status"]).contains("fast path: on"));
}

/// Traffic the datapath does not touch does not pay for it: TCP and UDP between wan
/// and a host port that is neither in the NAT range nor used by a port forward or by a
/// container flow that kept its port pass the uplink, both ways, before any table
/// lookup (`host_port_passed`). A forward and a kept port outside the NAT range are
/// marked (`NETNS_PORTUSE`) and still translate.
#[test]
fn the_hosts_own_ports_pass_before_any_lookup_and_used_ports_still_translate() {
    use netns_tests::util::{ChildGuard, tcp_ask};
    let run_sh = |mut sh: Command, script: &str| sh.arg("-c").arg(script).output().expect("sh");
    let t = topology("on");
    let c = Container::start(&t);
    t.netns(&["port", "add", &c.id, "7400:7401/tcp"]);
    let who = |port: u16| {
        format!(
            "socat -t 10 TCP-LISTEN:{port},reuseaddr,fork \
             SYSTEM:'echo peer=$SOCAT_PEERADDR port=$SOCAT_PEERPORT'"
        )
    };
    let _host_tcp = ChildGuard::spawn(t.host.cmd("sh").arg("-c").arg(who(7402)));
    t.host.wait_listen("tcp", 7402);
    let _host_udp = ChildGuard::spawn(t.host.cmd("python3").args(["-c", UDP_WHO, "7403"]));
    t.host.wait_listen("udp", 7403);
    let s0 = t.stats();
    let o = out(&run_sh(t.wan.cmd("sh"), &tcp_ask(UPLINK_IP, 7402)));
    assert!(
        o.starts_with(&format!("peer={WAN_IP} port=")),
        "host TCP: {o}"
    );
    let o = out(&run_sh(t.wan.cmd("sh"), &udp_ask(UPLINK_IP, 7403)));
    assert_eq!(o, format!("peer={WAN_IP}"), "host UDP");
    let s1 = t.stats();
    // TCP: SYN, ACK, data, FIN... each way; UDP: one datagram each way.
    let passed = grew(&s0, &s1, "host_port_passed");
    assert!(
        passed >= 6,
        "the host's packets skipped the tables: +{passed}"
    );
    for s in [
        "dnat_packets",
        "snat_reply_packets",
        "snat_packets",
        "ct_created",
    ] {
        assert_eq!(
            grew(&s0, &s1, s),
            0,
            "the host's traffic was not translated: {s}"
        );
    }

    // The forward on 7400 and a container flow keeping port 40002 translate as before.
    let _ctr = c.spawn(&who(7401));
    c.wait_listen("tcp", 7401);
    let o = out(&run_sh(t.wan.cmd("sh"), &tcp_ask(UPLINK_IP, 7400)));
    assert!(
        o.starts_with(&format!("peer={WAN_IP} port=")),
        "forward: {o}"
    );
    let _wan = ChildGuard::spawn(t.wan.cmd("sh").arg("-c").arg(who(7404)));
    t.wan.wait_listen("tcp", 7404);
    let o = out(&c.sh(&format!(
        "timeout 20 socat -u TCP:{WAN_IP}:7404,sourceport=40002 STDOUT"
    )));
    assert_eq!(
        o,
        format!("peer={UPLINK_IP} port=40002"),
        "kept port, masqueraded"
    );
    let s2 = t.stats();
    assert!(grew(&s1, &s2, "dnat_packets") >= 3, "forward translated");
    assert!(
        grew(&s1, &s2, "snat_reply_packets") >= 3,
        "replies translated"
    );
    let marked = t.status_entries("NETNS_PORTUSE");
    assert_eq!(marked, 2, "7400 (forward) and 40002 (kept port) are marked");
}
