//! Issue 4: NAT that holds up: port allocation, host sockets, connection state and
//! expiry, a full table, ICMP errors, fragments (also out of order), and the CLI.

use std::time::Duration;

use netns_tests::pkt::Lines;
use netns_tests::topo::{UPLINK_IP, WAN_IP};
use netns_tests::util::out;
use netns_tests::util::{ChildGuard, UDP_WHO, tcp_ask, tcp_who_server, udp_ask, wait_for};
use netns_tests::{Container, Topology};

fn py(script: &str) -> String {
    format!("python3 -c '{}'", script.replace('\'', "'\\''"))
}

/// TCP server: tells each client its address:port, then keeps the connection open and
/// says "again" after 0.5 s; closes argv[2] seconds later (default 3).
const TCP_WHO: &str = r#"
import socket, sys, threading, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(64)
def h(c, a):
    c.sendall(("%s:%d\n" % a).encode()); time.sleep(0.5)
    try: c.sendall(b"again\n"); time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 3)
    except OSError: pass
    c.close()
while True:
    c, a = l.accept(); threading.Thread(target=h, args=(c, a), daemon=True).start()
"#;

/// UDP echo server.
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535); s.sendto(d, a)
"#;

fn wan_server(t: &Topology, script: &str, port: u16) -> ChildGuard {
    let g = ChildGuard::spawn(t.wan.cmd("python3").args(["-c", script, &port.to_string()]));
    t.wan.wait_listen(
        if script.contains("SOCK_DGRAM") {
            "udp"
        } else {
            "tcp"
        },
        port,
    );
    g
}

/// Client: from source port `sport` (0 = any) to addr:port, prints both lines.
fn tcp_client(sport: u16, addr: &str, port: u16) -> String {
    py(&format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind((\"\",{sport}))\ns.settimeout(5)\ns.connect((\"{addr}\",{port}))\nf=s.makefile()\n\
         print(f.readline().strip(), f.readline().strip())"
    ))
}

/// Like `tcp_client`, then keeps the connection open until its stdin closes.
fn tcp_client_holding(sport: u16, addr: &str, port: u16) -> String {
    let cmd = tcp_client(sport, addr, port)
        .replace(".strip())'", ".strip())\nimport sys\nsys.stdin.read()'");
    assert!(cmd.contains("sys.stdin.read()"), "{cmd}");
    cmd
}

#[test]
fn same_source_port_from_two_containers_both_flows_work() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _srv = wan_server(&t, TCP_WHO, 7100);
    let ca = ChildGuard::spawn(
        a.cmd("sh")
            .arg("-c")
            .arg(tcp_client(40000, WAN_IP, 7100))
            .stdout(std::process::Stdio::piped()),
    );
    // A's flow exists first (its socket is connected), so A keeps its source port.
    a.wait_ss(&["-Htn", "state", "established", "dport = :7100"]);
    let ob = out(&b.sh(&tcp_client(40000, WAN_IP, 7100)));
    let oa = out(&ca.wait_output(Duration::from_secs(8)));
    let port = |s: &str| -> u16 {
        let (who, again) = s
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad reply {s:?}"));
        assert_eq!(again, "again", "{s}");
        let (ip, p) = who.split_once(':').unwrap();
        assert_eq!(ip, UPLINK_IP);
        p.parse().unwrap()
    };
    let (pa, pb) = (port(&oa), port(&ob));
    assert_eq!(pa, 40000, "the first keeps its port (B got {pb})");
    assert!(
        (61000..=65535).contains(&pb),
        "the second gets one from --nat-ports: {pb}"
    );
}

#[test]
fn a_host_socket_on_the_port_is_never_hijacked() {
    let t = Topology::new();
    let c = Container::start(&t);
    // The server holds every connection for 30 s: the host's must outlive the container's
    // attempt however slow this machine is.
    let _srv = ChildGuard::spawn(t.wan.cmd("python3").args(["-c", TCP_WHO, "7101", "30"]));
    t.wan.wait_listen("tcp", 7101);
    // The host itself talks to the peer from UPLINK_IP:40001, waits for "again" and
    // keeps the connection until its stdin closes.
    let mut host = ChildGuard::spawn(
        t.host
            .cmd("sh")
            .arg("-c")
            .arg(tcp_client_holding(40001, WAN_IP, 7101))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    // The host's connection must exist before the container's.
    t.host
        .wait_ss(&["-Htn", "state", "established", "sport = :40001"]);
    let oc = out(&c.sh(&tcp_client(40001, WAN_IP, 7101)));
    drop(host.0.stdin.take());
    let oh = out(&host.wait_output(Duration::from_secs(8)));
    assert_eq!(oh, format!("{UPLINK_IP}:40001 again"), "host flow intact");
    assert!(
        oc.ends_with(" again") && !oc.starts_with(&format!("{UPLINK_IP}:40001 ")),
        "container moved off 40001: {oc}"
    );
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(stats["port_host_socket"].as_u64().unwrap() >= 1, "{stats}");
}

fn flows(t: &Topology) -> Vec<serde_json::Value> {
    serde_json::from_str(&t.netns(&["conntrack", "ls", "--json"])).expect("conntrack ls --json")
}

fn state_of(t: &Topology, dport: u16) -> Option<String> {
    flows(t)
        .into_iter()
        .find(|f| f["original"]["dport"] == dport)
        .map(|f| f["state"].as_str().unwrap().to_owned())
}

/// One `netns gc` sweep; how many flows it expired (from its report).
/// One `gc` sweep `ahead` seconds ahead of the clock; how many flows it expired.
fn gc_expired(t: &Topology, ahead: u64) -> u64 {
    let ahead = ahead.to_string();
    let r: serde_json::Value =
        serde_json::from_str(&t.netns(&["gc", "--json", "--now-offset", &ahead]))
            .expect("gc --json is JSON");
    r["conntrack"]["expired"]
        .as_u64()
        .unwrap_or_else(|| panic!("no conntrack.expired in {r}"))
}

#[test]
fn tcp_states_and_expiry_with_short_timeouts() {
    let t = Topology::new();
    let c = Container::start(&t);
    t.netns(&[
        "gc",
        "--timeouts",
        "tcp_syn=2,tcp_established=6,tcp_fin=2,tcp_close=2,udp=2,udp_stream=2,icmp=2",
    ]);
    let _echo = wan_server(&t, UDP_ECHO, 7103);
    let _hold = t.wan_spawn("socat TCP-LISTEN:7109,reuseaddr,fork SYSTEM:'echo hi; sleep 60'");
    t.wan.wait_listen("tcp", 7109);
    // Established and idle: a connection held open by both ends. Its last packet is
    // the container's ACK of "hi": once the client has read it (the marker file), the
    // flow is idle, and its idle time is at least the time since then.
    let got_hi = t.path("got-hi");
    let held = ChildGuard::spawn(c.cmd("sh").arg("-c").arg(py(&format!(
        "import socket,time\ns=socket.create_connection((\"{WAN_IP}\",7109))\ns.recv(100)\n\
         open(\"{}\",\"w\").close()\ntime.sleep(30)",
        got_hi.display()
    ))));
    let est = wait_for(Duration::from_secs(5), || {
        (got_hi.exists() && state_of(&t, 7109).as_deref() == Some("established")).then_some(())
    });
    assert!(
        est.is_some(),
        "a held connection is established: {:?}",
        flows(&t)
    );
    // Closed: the server answers and closes at once.
    let _quick = t.wan_spawn("socat TCP-LISTEN:7110,reuseaddr,fork SYSTEM:'echo bye'");
    t.wan.wait_listen("tcp", 7110);
    c.sh(&format!("echo | timeout 3 socat -t 1 - TCP:{WAN_IP}:7110"));
    // UDP.
    c.sh(&format!(
        "echo x | timeout 2 socat -t 1 - UDP:{WAN_IP}:7103"
    ));
    let fl = flows(&t);
    assert!(
        fl.iter()
            .any(|f| f["original"]["dport"] == 7110 && f["state"] == "fin_wait"),
        "closed one in fin_wait: {fl:?}"
    );
    assert!(
        fl.iter()
            .any(|f| f["original"]["dport"] == 7103 && f["proto"] == "udp"),
        "{fl:?}"
    );
    // No waiting for the clock: `gc --now-offset S` sweeps as if S more seconds had
    // passed (test builds). 3 s on: the 2 s flows are past their timeout, the idle
    // established one (6 s) is not, and must survive.
    let expired = gc_expired(&t, 3);
    let fl = flows(&t);
    assert!(
        fl.iter()
            .any(|f| f["original"]["dport"] == 7109 && f["state"] == "established"),
        "the established flow (6 s) expired 3 s on: {fl:?}"
    );
    assert!(
        !fl.iter().any(|f| f["original"]["dport"] == 7103)
            && !fl.iter().any(|f| f["state"] == "fin_wait"),
        "udp and closed flows expire (2 s): {fl:?}"
    );
    assert!(expired >= 2, "gc counted the expiries: {expired}");
    // 10 s on, the idle established one is gone too.
    assert!(gc_expired(&t, 10) >= 1);
    assert!(flows(&t).is_empty(), "{:?}", flows(&t));
    // The kernel's map agrees: nothing left in conntrack.
    assert_eq!(t.map_entries(netns_common::maps::CONNTRACK), 0);
    drop(held);
}

#[test]
fn a_full_table_evicts_and_counts_without_wrong_translations() {
    // No per-container budget: this is about the table itself overflowing.
    let t = Topology::with_flags(&["--ct-max", "16", "--ct-max-per-container", "0"]);
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _echo = wan_server(&t, UDP_ECHO, 7104);
    // 12 flows from each container: 48 entries wanted, 16 fit. Every reply must come
    // back to the socket that asked, with the payload it sent.
    let client = py(&format!(
        "import socket,sys\nok=0\nfor i in range(12):\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n  s.settimeout(1)\n  \
         s.connect((\"{WAN_IP}\",7104))\n  m=(\"%s-%d\" % (sys.argv[1], i)).encode()\n  s.send(m)\n  ok += s.recv(100) == m\nprint(ok)"
    ));
    let ra = ChildGuard::spawn(
        a.cmd("sh")
            .arg("-c")
            .arg(format!("{client} A"))
            .stdout(std::process::Stdio::piped()),
    );
    let ob = out(&b.sh(&format!("{client} B")));
    let oa = out(&ra.wait_output(Duration::from_secs(20)));
    assert_eq!(
        (oa.as_str(), ob.as_str()),
        ("12", "12"),
        "every flow answered correctly"
    );
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(stats["ct_entries"].as_u64().unwrap() <= 16, "{stats}");
    assert!(
        stats["ct_evicted"].as_u64().unwrap() >= 8,
        "evictions counted: {stats}"
    );
}

const ICMP_CASES: &str = r#"
import socket, struct, sys, time
wan, far = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((wan, 9999))
s.send(b"x")
try:
    s.recv(100); print("unreachable: data")
except ConnectionRefusedError: print("unreachable: ECONNREFUSED")
except socket.timeout: print("unreachable: timeout")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2); s.setsockopt(socket.IPPROTO_IP, 11, 1)
s.sendto(b"x", (far, 33434)); time.sleep(0.5)
try:
    d, anc, fl, a = s.recvmsg(100, 512, socket.MSG_ERRQUEUE)
    for lvl, typ, e in anc:
        print("ttl: type %d offender %s" % (e[5], socket.inet_ntoa(e[20:24])))
except BlockingIOError: print("ttl: nothing")
"#;

#[test]
fn icmp_errors_reach_the_container() {
    let t = Topology::new();
    let far = t.add_far(1000);
    let c = Container::start(&t);
    let o = out(&c
        .cmd("python3")
        .args(["-c", ICMP_CASES, WAN_IP, "203.0.113.1"])
        .output()
        .unwrap());
    assert!(o.contains("unreachable: ECONNREFUSED"), "{o}");
    assert!(
        o.contains(&format!("ttl: type 11 offender {WAN_IP}")),
        "{o}"
    );
    // Path MTU: far's link is 1000 bytes behind wan; a 1500-byte segment from the
    // container gets "fragmentation needed" from wan, translated back.
    far.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let sink = ChildGuard::spawn(
        far.cmd("sh")
            .arg("-c")
            .arg("socat -u TCP-LISTEN:7200,reuseaddr STDOUT | wc -c")
            .stdout(std::process::Stdio::piped()),
    );
    far.wait_listen("tcp", 7200);
    let up = c.sh("head -c 300000 /dev/zero | timeout 20 socat -u - TCP:203.0.113.1:7200");
    assert!(up.status.success(), "upload across the smaller MTU");
    assert_eq!(out(&sink.wait_output(Duration::from_secs(10))), "300000");
    let route = out(&c.sh("ip route get 203.0.113.1"));
    assert!(
        route.contains("mtu 1000"),
        "PMTU learnt from the translated ICMP: {route}"
    );
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(stats["icmp_errors"].as_u64().unwrap() >= 3, "{stats}");
}

const UDP_BIG: &str = r#"
import socket, sys, os, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
d = os.urandom(4000); s.sendto(d, (sys.argv[1], int(sys.argv[2])))
r, a = s.recvfrom(65535); print(r == d, len(r))
"#;

/// Sends a 3000-byte UDP datagram as fragments in reverse order from a raw socket.
const FRAG_REVERSED: &str = r#"
import socket, struct, os, sys, hashlib
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16; return ~s & 0xffff
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]); payload = os.urandom(3000)
udp = struct.pack("!HHHH", 40002, dport, 8 + len(payload), 0) + payload
ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(udp))
udp = udp[:6] + struct.pack("!H", csum(ph + udp)) + udp[8:]
frags, off = [], 0
while off < len(udp):
    part = udp[off:off + 1480]; more = off + 1480 < len(udp)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), 4242, (off // 8) | (0x2000 if more else 0), 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    frags.append(h[:10] + struct.pack("!H", csum(h)) + h[12:] + part); off += 1480
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for f in reversed(frags): r.sendto(f, (dst, 0))
print(hashlib.sha256(payload).hexdigest())
"#;

const UDP_SINK: &str = r#"
import socket, sys, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(8)
d, a = s.recvfrom(65535); print(hashlib.sha256(d).hexdigest())
"#;

#[test]
fn fragmented_udp_through_snat_and_a_port_forward_also_out_of_order() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _echo = wan_server(&t, UDP_ECHO, 7105);
    // SNAT: 4000 bytes out (fragmented by the container), echoed back fragmented.
    assert_eq!(
        out(&c
            .cmd("python3")
            .args(["-c", UDP_BIG, WAN_IP, "7105"])
            .output()
            .unwrap()),
        "True 4000"
    );
    // Port forward, in order.
    let _cecho = ChildGuard::spawn(c.cmd("python3").args(["-c", UDP_ECHO, "7106"]));
    t.netns(&["port", "add", &c.id, "8600:7106/udp", "8601:7107/udp"]);
    c.wait_listen("udp", 7106);
    assert_eq!(
        out(&t.wan_sh(&format!(
            "python3 -c '{}' {UPLINK_IP} 8600",
            UDP_BIG.replace('\'', "\"")
        ))),
        "True 4000"
    );
    // Port forward, fragments in reverse order from a raw socket.
    let sink = ChildGuard::spawn(
        c.cmd("python3")
            .args(["-c", UDP_SINK, "7107"])
            .stdout(std::process::Stdio::piped()),
    );
    c.wait_listen("udp", 7107);
    let sent = out(&t
        .wan
        .cmd("python3")
        .args(["-c", FRAG_REVERSED, WAN_IP, UPLINK_IP, "8601"])
        .output()
        .unwrap());
    let got = out(&sink.wait_output(Duration::from_secs(10)));
    assert_eq!(got, sent, "reassembled datagram intact");
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(
        stats["frag_stashed"].as_u64().unwrap() >= 1
            && stats["frag_replayed"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

#[test]
fn conntrack_and_stats_cli_output() {
    let t = Topology::with_flags(&["--ct-counters", "on"]);
    let c = Container::start(&t);
    let _echo = wan_server(&t, UDP_ECHO, 7108);
    c.sh(&format!(
        "echo hello | timeout 2 socat -t 1 - UDP:{WAN_IP}:7108,sourceport=41000"
    ));
    let fl = flows(&t);
    let f = fl
        .iter()
        .find(|f| f["original"]["dport"] == 7108)
        .expect("the UDP flow is listed");
    assert_eq!(f["proto"], "udp");
    assert_eq!(f["kind"], "snat");
    assert_eq!(f["original"]["src"], c.ip());
    assert_eq!(f["original"]["sport"], 41000);
    assert_eq!(f["translated"]["src"], UPLINK_IP);
    assert_eq!(f["translated"]["dst"], WAN_IP);
    assert!(
        f["packets"].as_u64().unwrap() >= 1 && f["reply_packets"].as_u64().unwrap() >= 1,
        "{f}"
    );
    assert!(f["bytes"].as_u64().unwrap() > 0);
    assert!(f["age_secs"].is_u64() && f["idle_secs"].is_u64());
    let text = t.netns(&["conntrack", "ls"]);
    assert!(text.contains("src=") && text.contains("flow(s)"), "{text}");
    let stats: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    for k in [
        "snat_packets",
        "snat_reply_packets",
        "ct_created",
        "drop_port_exhausted",
        "drop_spoofed_ip",
        "ct_entries",
    ] {
        assert!(stats[k].is_u64(), "stats has {k}: {stats}");
    }
    assert!(t.netns(&["conntrack", "flush"]).contains("deleted"));
    assert!(flows(&t).is_empty());
}

#[test]
fn flow_counters_are_off_by_default_and_reloading_turns_them_on() {
    let t = Topology::new();
    let c = Container::start(&t);
    let _echo = wan_server(&t, UDP_ECHO, 7109);
    let burst = |n: u32| {
        c.sh(&format!(
            "for i in $(seq {n}); do echo hi; sleep 0.05; done | timeout 5 socat -t 1 - UDP:{WAN_IP}:7109,sourceport=41001"
        ))
    };
    burst(20);
    let flow = || {
        flows(&t)
            .into_iter()
            .find(|f| f["original"]["dport"] == 7109)
            .expect("the UDP flow is listed")
    };
    let f = flow();
    // Off: a hit writes no counter (only the creating packet is counted).
    assert!(f["packets"].as_u64().unwrap() <= 1, "{f}");
    assert_eq!(f["reply_packets"].as_u64(), Some(0), "{f}");
    assert!(
        t.netns(&["datapath", "status"])
            .contains("flow counters: off")
    );
    // `load` applies the flag to the running datapath; the same flow counts on.
    t.netns(&["--ct-counters", "on", "load"]);
    assert!(
        t.netns(&["datapath", "status"])
            .contains("flow counters: on")
    );
    burst(20);
    let g = flow();
    assert!(
        g["packets"].as_u64().unwrap() >= 15 && g["reply_packets"].as_u64().unwrap() >= 15,
        "{g}"
    );
}

#[test]
fn a_full_port_range_is_a_counted_drop_not_a_wrong_translation() {
    let t = Topology::with_flags(&["--nat-ports", "61000-61001"]);
    let cs: Vec<Container<'_>> = (0..4).map(|_| Container::start(&t)).collect();
    let _echo = wan_server(&t, UDP_ECHO, 7500);
    // All four use source port 40000 towards the same peer: the first keeps it, two
    // get the two ports of the range, the fourth has nowhere to go.
    let q = py(&format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((\"\",40000))\n\
         s.settimeout(0.5)\ns.connect((\"{WAN_IP}\",7500))\nm=sys.argv[1].encode()\nr=b\"\"\n\
         for i in range(3):\n  s.send(m)\n  try:\n    r=s.recv(100); break\n  except Exception: pass\nprint(r==m)"
    ));
    let answers: Vec<String> = cs
        .iter()
        .map(|c| out(&c.sh(&format!("{q} {}", c.id))))
        .collect();
    assert_eq!(
        answers.iter().filter(|a| *a == "True").count(),
        3,
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|a| *a == "False").count(),
        1,
        "{answers:?}"
    );
    let s: serde_json::Value = serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap();
    assert!(s["drop_port_exhausted"].as_u64().unwrap() >= 1, "{s}");
    let retries: u64 = [
        "port_retries_1",
        "port_retries_2_3",
        "port_retries_4_7",
        "port_retries_8_16",
    ]
    .iter()
    .map(|k| s[*k].as_u64().unwrap())
    .sum();
    assert!(retries >= 2, "retries histogram: {s}");
}

// --no-masquerade (ip-masq-agent's nonMasqueradeCIDRs): routed, untranslated flows.

/// UDP server on argv[1]: prints "peer=ADDR" for every datagram and answers the same.
const UDP_LOG_WHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    print("peer=%s" % a[0], flush=True)
    s.sendto(("peer=%s\n" % a[0]).encode(), a)
"#;

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in netns stats: {s}"))
}

fn status_nomasq(t: &Topology) -> serde_json::Value {
    let st: serde_json::Value =
        serde_json::from_str(&t.netns(&["datapath", "status", "--json"])).expect("status json");
    st["no_masquerade"].clone()
}

#[test]
fn no_masquerade_destinations_see_the_container_address_others_stay_masqueraded() {
    let t = Topology::with_flags(&[
        "--no-masquerade=198.51.100.0/24",
        "--allow-inbound=198.51.100.0/24",
    ]);
    let far = t.add_far(1500);
    let c = Container::start(&t);
    let cip = c.ip();
    // The wan side routes the container subnet back via the host (a routed network).
    t.wan
        .ip(&["route", "add", "172.19.0.0/16", "via", UPLINK_IP]);
    let _tcp = t.wan_spawn(&tcp_who_server(7201));
    let _udp = ChildGuard::spawn(t.wan.cmd("python3").args(["-c", UDP_WHO, "7202"]));
    t.wan.wait_listen("tcp", 7201);
    t.wan.wait_listen("udp", 7202);
    let _far_tcp = ChildGuard::spawn(
        far.cmd("sh")
            .arg("-c")
            .arg(format!("exec {}", tcp_who_server(7203))),
    );
    far.wait_listen("tcp", 7203);
    assert_eq!(status_nomasq(&t), serde_json::json!(["198.51.100.0/24"]));
    let before = t.stats();
    let want = format!("peer={cip}");
    assert_eq!(
        out(&c.sh(&tcp_ask(WAN_IP, 7201))),
        want,
        "TCP, untranslated"
    );
    assert_eq!(
        out(&c.sh(&udp_ask(WAN_IP, 7202))),
        want,
        "UDP, untranslated"
    );
    // Outside the CIDR: masqueraded as before.
    assert_eq!(
        out(&c.sh(&tcp_ask("203.0.113.1", 7203))),
        format!("peer={UPLINK_IP}")
    );
    let after = t.stats();
    assert!(
        counter(&after, "nomasq_out") >= counter(&before, "nomasq_out") + 4,
        "{after}"
    );
    // No state for the routed flows, a flow for the masqueraded one.
    let fl = flows(&t);
    let dports: Vec<u64> = fl
        .iter()
        .filter_map(|f| f["original"]["dport"].as_u64())
        .collect();
    assert!(
        !dports.contains(&7201) && !dports.contains(&7202),
        "routed flows have no conntrack entry: {fl:?}"
    );
    assert!(dports.contains(&7203), "{fl:?}");
}

#[test]
fn no_masquerade_without_allow_inbound_drops_the_replies() {
    let t = Topology::with_flags(&["--no-masquerade=198.51.100.0/24"]);
    let c = Container::start(&t);
    let cip = c.ip();
    t.wan
        .ip(&["route", "add", "172.19.0.0/16", "via", UPLINK_IP]);
    let log = Lines::python(t.wan.cmd("python3"), UDP_LOG_WHO, &["7204"]);
    t.wan.wait_listen("udp", 7204);
    let _tcp = t.wan_spawn(&tcp_who_server(7205));
    t.wan.wait_listen("tcp", 7205);
    let before = t.stats();
    // The datagrams leave with the container's address; the answers are dropped.
    assert_eq!(out(&c.sh(&udp_ask(WAN_IP, 7204))), "", "no answer gets in");
    let seen = log.wait_line(Duration::from_secs(5), |l| l.starts_with("peer="));
    assert_eq!(seen, Some(format!("peer={cip}")), "{}", log.stderr());
    // TCP: the SYN|ACK is dropped, the connection never opens.
    let o = c.sh(&format!(
        "timeout 5 socat -u TCP:{WAN_IP}:7205,connect-timeout=3 STDOUT"
    ));
    assert_eq!(out(&o), "");
    let after = t.stats();
    assert!(
        counter(&after, "drop_inbound") >= counter(&before, "drop_inbound") + 2,
        "{after}"
    );
    assert!(
        counter(&after, "nomasq_out") >= counter(&before, "nomasq_out") + 2,
        "{after}"
    );
}

#[test]
fn no_masquerade_list_follows_each_load() {
    let t = Topology::new();
    let c = Container::start(&t);
    let cip = c.ip();
    t.wan
        .ip(&["route", "add", "172.19.0.0/16", "via", UPLINK_IP]);
    let log = Lines::python(t.wan.cmd("python3"), UDP_LOG_WHO, &["7206"]);
    t.wan.wait_listen("udp", 7206);
    // Each send uses a new socket, so a new flow (a new source port).
    let send_and_see = |n: usize| {
        c.sh(&format!(
            "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"x\", (\"{WAN_IP}\", 7206))'"
        ));
        let ok = wait_for(Duration::from_secs(5), || {
            (log.lines().len() > n).then_some(())
        });
        assert!(ok.is_some(), "datagram {n} never arrived: {}", log.stderr());
        log.lines()[n].clone()
    };
    assert_eq!(send_and_see(0), format!("peer={UPLINK_IP}"));
    t.netns(&["--no-masquerade=198.51.100.1/32", "load"]);
    assert_eq!(status_nomasq(&t), serde_json::json!(["198.51.100.1/32"]));
    assert_eq!(send_and_see(1), format!("peer={cip}"));
    // Loaded again without the flag (the next hook would do the same): masqueraded.
    t.netns(&["load"]);
    assert_eq!(status_nomasq(&t), serde_json::json!([]));
    assert_eq!(send_and_see(2), format!("peer={UPLINK_IP}"));
}
