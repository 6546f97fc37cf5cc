//! Issue 11, part 2: conntrack that holds up under pressure and loss, with no process
//! running: unreplied flows kept apart from assured ones (a SYN flood evicts only its
//! own kind), a per-container budget, halves the LRU lost rebuilt on the packet that
//! misses them, TCP RST validation and tuple reuse, lazy expiry with Linux's UDP
//! timeouts, no DNAT state from a stray segment, and fragment tracking that ends with
//! the datagram (secondary addresses and hairpin included).
//!
//! The observers are the peers (data actually exchanged, in both directions), AF_PACKET
//! captures, `netns conntrack ls --json` and the kernel's maps (bpftool); `netns stats`
//! counters are a second check. Everything stays inside each test's private topology
//! (198.51.100.0/24, 203.0.113.0/24, 172.19.0.0/16); the SYN flood's sources are
//! spoofed 203.0.113.0/24 addresses sent from the wan namespace onto the uplink veth.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use netns_common::{IPPROTO_TCP, dir, maps};
use netns_tests::pkt::python;
use netns_tests::pkt::{Capture, Lines, mac_of};
use netns_tests::topo::{UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::{both, grew, out};
use netns_tests::{Container, Topology};

const SHORT: Duration = Duration::from_secs(5);

fn flows(t: &Topology) -> Vec<serde_json::Value> {
    serde_json::from_str(&t.netns(&["conntrack", "ls", "--json"])).expect("conntrack ls --json")
}

/// The flow `conntrack ls` lists with this protocol and original source port.
fn flow(t: &Topology, proto: &str, sport: u16) -> Option<serde_json::Value> {
    flows(t)
        .into_iter()
        .find(|f| f["proto"] == proto && f["original"]["sport"] == sport)
}

fn sport_of(f: &serde_json::Value, side: &str) -> u16 {
    f[side]["sport"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {side}.sport in {f}")) as u16
}

/// The raw key of a conntrack half (`CtKey`): the tuple as seen at hook point `d`,
/// addresses and ports in network order.
fn ct_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8, d: u8) -> Vec<u8> {
    let ip = |s: &str| s.parse::<Ipv4Addr>().expect("IPv4").octets();
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&ip(src));
    k.extend_from_slice(&ip(dst));
    k.extend_from_slice(&sport.to_be_bytes());
    k.extend_from_slice(&dport.to_be_bytes());
    k.extend_from_slice(&[proto, d, 0, 0]);
    k
}

/// A conntrack key, readable (for failure messages).
fn show_key(k: &[u8]) -> String {
    if k.len() < 14 {
        return format!("{k:02x?}");
    }
    format!(
        "{}:{} -> {}:{} proto {} dir {}",
        Ipv4Addr::new(k[0], k[1], k[2], k[3]),
        u16::from_be_bytes([k[8], k[9]]),
        Ipv4Addr::new(k[4], k[5], k[6], k[7]),
        u16::from_be_bytes([k[10], k[11]]),
        k[12],
        k[13]
    )
}

fn keys(t: &Topology, map: &str) -> Vec<Vec<u8>> {
    t.map_dump(map).into_iter().map(|e| e.key).collect()
}

fn has_key(t: &Topology, map: &str, key: &[u8]) -> bool {
    keys(t, map).iter().any(|k| k == key)
}

fn delete_key(t: &Topology, map: &str, key: &[u8]) {
    netns_tests::bpf::map_delete(&t.host, &t.map_pin(map), key)
        .unwrap_or_else(|e| panic!("deleting {} from {map}: {e:#}", show_key(key)));
}

// Servers and drivers (python; PY_LIB is prepended by `Lines::python`).

/// TCP line server on argv[1]: echoes every line; "delay SECS TEXT" answers TEXT after
/// SECS; "close" closes the connection (the server's FIN comes first).
const TCP_ECHO: &str = r#"
import threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(128)
def h(c):
    f = c.makefile("rb")
    try:
        for line in f:
            w = line.decode().strip().split(" ", 2)
            if w[0] == "close":
                break
            if w[0] == "delay":
                time.sleep(float(w[1])); c.sendall(w[2].encode() + b"\n")
            else:
                c.sendall(line)
    except OSError:
        pass
    try:
        f.close(); c.close()
    except OSError:
        pass
while True:
    c, a = l.accept()
    threading.Thread(target=h, args=(c,), daemon=True).start()
"#;

/// UDP echo server on argv[1].
const UDP_ECHO: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"#;

/// UDP echo servers on argv[2] ports from argv[1].
const UDP_ECHO_PORTS: &str = r#"
base, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", base + i)); socks.append(s)
while True:
    r, _, _ = select.select(socks, [], [])
    for s in r:
        d, a = s.recvfrom(65535); s.sendto(d, a)
"#;

/// TCP client connecting from port argv[3] to argv[1]:argv[2], driven by stdin:
/// "send TEXT" sends a line and prints the answer ("got LINE", "timeout", "eof",
/// "error E"); "sendonly TEXT"; "recv SECS"; "rst" closes with a RST (SO_LINGER 0);
/// "close" closes normally.
const TCP_CLIENT: &str = r#"
addr, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", sport))
s.settimeout(5)
try:
    s.connect((addr, port))
except OSError as e:
    print("connect-failed", type(e).__name__, flush=True)
    sys.exit(0)
print("connected", s.getsockname()[1], flush=True)
buf = b""
def readline(t):
    global buf
    s.settimeout(t)
    while b"\n" not in buf:
        try:
            d = s.recv(4096)
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return "error " + type(e).__name__
        if not d:
            return "eof"
        buf += d
    line, buf = buf.split(b"\n", 1)
    return "got " + line.decode()
for cmd in sys.stdin:
    op, _, arg = cmd.rstrip("\n").partition(" ")
    try:
        if op == "send":
            s.sendall(arg.encode() + b"\n"); print(readline(5), flush=True)
        elif op == "sendonly":
            s.sendall(arg.encode() + b"\n"); print("sent", flush=True)
        elif op == "recv":
            print(readline(float(arg)), flush=True)
        elif op == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close(); print("closed", flush=True)
        elif op == "close":
            s.close(); print("closed", flush=True)
    except OSError as e:
        print("error " + type(e).__name__, flush=True)
"#;

/// UDP socket on port argv[3] talking to argv[1]:argv[2], driven by stdin: "ask TEXT"
/// sends TEXT and prints the answer ("got TEXT" or "none"; two resends, 1 s apart);
/// "drain SECS" prints the next datagram that arrives within SECS ("got ...", "none").
const UDP_CLIENT: &str = r#"
addr, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", sport))
print("ready", flush=True)
def recv(t):
    s.settimeout(t)
    try:
        d, a = s.recvfrom(65535)
        return "got " + d.decode(errors="replace")
    except socket.timeout:
        return "none"
    except OSError as e:
        return "error " + type(e).__name__
for cmd in sys.stdin:
    op, _, arg = cmd.rstrip("\n").partition(" ")
    if op == "ask":
        r = "none"
        for i in range(3):
            s.sendto(arg.encode(), (addr, port))
            r = recv(1)
            if r != "none":
                break
        print(r, flush=True)
    elif op == "drain":
        print(recv(float(arg)), flush=True)
"#;

/// argv[3] UDP flows (one socket each) to argv[1] ports argv[2].., one datagram each;
/// then again on the flows that were answered. Prints {"first": [...], "again": [...]}
/// (the indexes answered in each round).
const MANY_UDP_FLOWS: &str = r#"
wan, base, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    s.connect((wan, base + i)); socks.append(s)
def rnd(targets, secs):
    got = set()
    for i in targets:
        socks[i].send(b"q%d" % i)
    end = time.time() + secs
    while time.time() < end and len(got) < len(targets):
        r, _, _ = select.select([socks[i] for i in targets if i not in got], [], [], 0.1)
        for s in r:
            i = socks.index(s)
            try:
                if s.recv(100) == b"q%d" % i:
                    got.add(i)
            except OSError:
                pass
    return sorted(got)
first = rnd(list(range(n)), 2)
again = rnd(first, 2)
print(json.dumps({"first": first, "again": again}))
"#;

/// Sends argv[3] random bytes to argv[1]:argv[2] in one datagram (fragmented when
/// large) and prints whether the echo matched, its length and where it came from.
const UDP_BIG: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
d = os.urandom(int(sys.argv[3]))
r = "timeout"
for i in range(2):
    s.sendto(d, (sys.argv[1], int(sys.argv[2])))
    try:
        got, a = s.recvfrom(65535)
        r = "%s %d %s" % (got == d, len(got), a[0]); break
    except socket.timeout:
        pass
print(r)
"#;

/// AF_PACKET on argv[1]: one JSON line per TCP segment: addresses, ports, seq, ack,
/// flags, payload length, packet type (`dir`: 0 to us, 4 outgoing).
const TCP_SNIFF: &str = r#"
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    f, a = s.recvfrom(65535)
    if struct.unpack("!H", f[12:14])[0] != 0x0800:
        continue
    p = f[14:]
    if p[9] != 6:
        continue
    ihl = (p[0] & 15) * 4
    tot = struct.unpack("!H", p[2:4])[0]
    t = p[ihl:tot]
    sport, dport, seq, ack = struct.unpack("!HHII", t[:12])
    print(json.dumps({"dir": a[2], "src": socket.inet_ntoa(p[12:16]), "dst": socket.inet_ntoa(p[16:20]),
                      "sport": sport, "dport": dport, "seq": seq, "ack": ack, "flags": t[13],
                      "len": len(t) - (t[12] >> 4) * 4}), flush=True)
"#;

/// One crafted TCP segment with a raw socket: argv = src dst sport dport flags seq ack
/// [payload].
const CRAFT_TCP: &str = r#"
src, dst = sys.argv[1], sys.argv[2]
sport, dport, flags, seq, ack = (int(x) for x in sys.argv[3:8])
data = sys.argv[8].encode() if len(sys.argv) > 8 else b""
send_l3(ip4(src, dst, 6, tcp(src, dst, sport, dport, flags, seq=seq, ack=ack, data=data)))
"#;

/// A SYN flood on the wire: argv[5] SYNs from random 203.0.113.0/24 sources and ports
/// to argv[3]:argv[4], as frames from wan0 (MAC argv[2]) to the uplink (MAC argv[1]), in
/// batches the receiving backlog can take. Prints how many were sent.
const SYN_FLOOD: &str = r#"
import random
up0, wan0, dst, dport, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("wan0", 0))
sent = 0
for b in range(0, n, 200):
    for i in range(b, min(n, b + 200)):
        src = "203.0.113.%d" % random.randint(1, 254)
        seg = tcp(src, dst, random.randint(1024, 65535), dport, 0x02, seq=random.getrandbits(32))
        s.send(eth(up0, wan0, 0x0800, ip4(src, dst, 6, seg, ident=random.getrandbits(16))))
        sent += 1
    time.sleep(0.01)
print(sent)
"#;

/// A python server (PY_LIB prepended) with `args`, in the namespace `cmd` picks.
fn server(cmd: Command, script: &str, args: &[&str]) -> Lines {
    Lines::python(cmd, script, args)
}

fn wan_tcp_echo(t: &Topology, port: u16) -> Lines {
    let s = server(t.wan.cmd("python3"), TCP_ECHO, &[&port.to_string()]);
    t.wan.wait_listen("tcp", port);
    s
}

fn wan_udp_echo(t: &Topology, port: u16) -> Lines {
    let s = server(t.wan.cmd("python3"), UDP_ECHO, &[&port.to_string()]);
    t.wan.wait_listen("udp", port);
    s
}

fn container_tcp_echo(c: &Container<'_>, port: u16) -> Lines {
    let s = server(c.cmd("python3"), TCP_ECHO, &[&port.to_string()]);
    c.wait_listen("tcp", port);
    s
}

fn container_udp_echo(c: &Container<'_>, port: u16) -> Lines {
    let s = server(c.cmd("python3"), UDP_ECHO, &[&port.to_string()]);
    c.wait_listen("udp", port);
    s
}

/// A TCP connection driven line by line ([`TCP_CLIENT`]).
struct Tcp {
    l: Lines,
    what: String,
}

impl Tcp {
    /// Connects from `sport` to `addr:port` in the namespace `cmd` (a `python3`) picks.
    fn connect(cmd: Command, addr: &str, port: u16, sport: u16) -> Tcp {
        let what = format!("tcp :{sport} -> {addr}:{port}");
        let l = Lines::python(
            cmd,
            TCP_CLIENT,
            &[addr, &port.to_string(), &sport.to_string()],
        );
        let r = l.wait_line(Duration::from_secs(8), |x| x.starts_with("connect"));
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("connected")),
            "{what}: {r:?} {}",
            l.stderr()
        );
        Tcp { l, what }
    }

    /// Runs one driver command; its output line (or "no answer").
    fn cmd(&mut self, line: &str) -> String {
        self.l
            .ask(line, Duration::from_secs(8))
            .unwrap_or_else(|| format!("no answer ({})", self.l.stderr()))
    }

    /// Sends a line and expects it echoed.
    fn echo(&mut self, text: &str) {
        let r = self.cmd(&format!("send {text}"));
        assert_eq!(r, format!("got {text}"), "{}: echo of {text:?}", self.what);
    }
}

/// A UDP socket driven by line ([`UDP_CLIENT`]).
struct Udp {
    l: Lines,
    what: String,
}

impl Udp {
    fn open(cmd: Command, addr: &str, port: u16, sport: u16) -> Udp {
        let what = format!("udp :{sport} -> {addr}:{port}");
        let l = Lines::python(
            cmd,
            UDP_CLIENT,
            &[addr, &port.to_string(), &sport.to_string()],
        );
        assert!(
            l.wait_line(SHORT, |x| x == "ready").is_some(),
            "{what}: {}",
            l.stderr()
        );
        Udp { l, what }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.l
            .ask(line, Duration::from_secs(8))
            .unwrap_or_else(|| format!("no answer ({})", self.l.stderr()))
    }

    fn echo(&mut self, text: &str) {
        let r = self.cmd(&format!("ask {text}"));
        assert_eq!(r, format!("got {text}"), "{}: echo of {text:?}", self.what);
    }
}

/// Starts a TCP sniffer on `iface` in the namespace `cmd` picks.
fn sniffer(cmd: Command, iface: &str) -> Lines {
    let l = Lines::python(cmd, TCP_SNIFF, &[iface]);
    assert!(
        l.wait_line(SHORT, |x| x == "ready").is_some(),
        "sniffer: {}",
        l.stderr()
    );
    l
}

/// Where the sender of `sport -> dport` segments is in its sequence space: the end
/// (seq + payload + SYN/FIN) of the last such segment the sniffer saw from `src`.
fn seq_end(sniff: &Lines, src: &str, sport: u16, dport: u16) -> u32 {
    let segs: Vec<serde_json::Value> = sniff
        .lines()
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("sniffer JSON"))
        .filter(|f: &serde_json::Value| {
            f["src"] == src && f["sport"] == sport && f["dport"] == dport
        })
        .collect();
    let f = segs
        .last()
        .unwrap_or_else(|| panic!("no segment {src}:{sport} -> :{dport} seen"));
    let flags = f["flags"].as_u64().unwrap();
    (f["seq"].as_u64().unwrap() as u32)
        .wrapping_add(f["len"].as_u64().unwrap() as u32)
        .wrapping_add((flags & 0x03 != 0) as u32)
}

/// A crafted TCP segment from the wan namespace.
fn wan_segment(t: &Topology, args: &[&str]) {
    let o = python(t.wan.cmd("python3"), CRAFT_TCP, args);
    assert!(o.status.success(), "crafted segment: {}", both(&o));
}

// 1. A SYN flood at a port forward evicts only unreplied flows.

#[test]
fn a_syn_flood_at_a_port_forward_leaves_other_containers_established_flows_alone() {
    // 256 entries (128 flows), an unreplied table of 64; no per-container budget, so
    // the flood really lands in the tables.
    let t = Topology::with_flags(&[
        "--ct-max",
        "256",
        "--ct-max-per-container",
        "0",
        "--ct-counters",
        "on",
    ]);
    let a = Container::start(&t);
    let b = Container::start(&t);
    let bip = b.ip();
    let _a_srv = container_tcp_echo(&a, 8000);
    t.netns(&["port", "add", &a.id, "8400:8000/tcp"]);
    let _tcp_srv = wan_tcp_echo(&t, 7000);
    let _udp_srv = wan_udp_echo(&t, 7001);
    let mut btcp = Tcp::connect(b.cmd("python3"), WAN_IP, 7000, 44000);
    let mut budp = Udp::open(b.cmd("python3"), WAN_IP, 7001, 44001);
    btcp.echo("before-1");
    budp.echo("before-1");
    btcp.echo("before-2");
    budp.echo("before-2");
    let find = |fl: &[serde_json::Value], proto: &str, sport: u16| {
        fl.iter()
            .find(|f| {
                f["proto"] == proto
                    && f["original"]["src"] == bip.as_str()
                    && f["original"]["sport"] == sport
            })
            .cloned()
    };
    let fl = flows(&t);
    let (Some(tcp0), Some(udp0)) = (find(&fl, "tcp", 44000), find(&fl, "udp", 44001)) else {
        panic!("control: B's flows are listed before the flood: {fl:?}");
    };
    assert_eq!(tcp0["state"], "established", "{tcp0}");

    let before = t.stats();
    let up0 = mac_of(t.host.cmd("ip"), UPLINK);
    let wan0 = mac_of(t.wan.cmd("ip"), "wan0");
    let o = python(
        t.wan.cmd("python3"),
        SYN_FLOOD,
        &[&up0, &wan0, UPLINK_IP, "8400", "12000"],
    );
    assert_eq!(out(&o), "12000", "the flood: {}", both(&o));
    // Right after the flood, and again once A's SYN|ACK retransmissions have gone out.
    btcp.echo("after-1");
    budp.echo("after-1");
    std::thread::sleep(Duration::from_secs(2));
    btcp.echo("after-2");
    budp.echo("after-2");
    let after = t.stats();
    assert!(
        grew(&before, &after, "ct_created") >= 500,
        "control: the flood made state (so it had to evict): {after}"
    );
    let fl = flows(&t);
    let tcp1 = find(&fl, "tcp", 44000).unwrap_or_else(|| {
        panic!("B's TCP flow is gone from conntrack ls after the flood: {fl:?}")
    });
    let udp1 = find(&fl, "udp", 44001).unwrap_or_else(|| {
        panic!("B's UDP flow is gone from conntrack ls after the flood: {fl:?}")
    });
    assert_eq!(
        (tcp1["translated"].clone(), udp1["translated"].clone()),
        (tcp0["translated"].clone(), udp0["translated"].clone()),
        "B's flows kept their translations (not re-created)"
    );
    assert_eq!(tcp1["state"], "established", "{tcp1}");
    assert!(
        tcp1["age_secs"].as_u64() >= tcp0["age_secs"].as_u64()
            && tcp1["packets"].as_u64() > tcp0["packets"].as_u64(),
        "the same pair, not a new one: before {tcp0} after {tcp1}"
    );
    let new_entries = t.map_entries(maps::CT_NEW);
    assert!(
        new_entries <= 64,
        "the unreplied table holds at most ct_max/4: {new_entries}"
    );
}

// 2. A per-container budget.

#[test]
fn a_container_at_its_conntrack_budget_gets_no_new_flows_and_others_are_unaffected() {
    let t = Topology::with_flags(&["--ct-max-per-container", "16"]);
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _srv = server(t.wan.cmd("python3"), UDP_ECHO_PORTS, &["7600", "40"]);
    t.wan.wait_listen("udp", 7600);
    t.wan.wait_listen("udp", 7639);
    let before = t.stats();
    let run_flows = |c: &Container<'_>, n: u32| -> (Vec<u64>, Vec<u64>) {
        let o = python(
            c.cmd("python3"),
            MANY_UDP_FLOWS,
            &[WAN_IP, "7600", &n.to_string()],
        );
        let v: serde_json::Value =
            serde_json::from_str(&out(&o)).unwrap_or_else(|e| panic!("{e}: {}", both(&o)));
        let ids = |k: &str| -> Vec<u64> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        (ids("first"), ids("again"))
    };
    let (a_first, a_again) = run_flows(&a, 40);
    // B, while A holds its budget's worth of flows.
    let (b_first, b_again) = run_flows(&b, 10);
    let after = t.stats();
    assert!(
        a_first.len() <= 16,
        "A got {} of 40 flows with a budget of 16: {a_first:?}",
        a_first.len()
    );
    assert!(
        a_first.len() >= 12,
        "A's first flows (up to the budget) are answered: {a_first:?} {after}"
    );
    assert_eq!(a_again, a_first, "A's admitted flows keep working");
    assert_eq!(
        (b_first.len(), b_again.len()),
        (10, 10),
        "B is not limited by A's budget: {b_first:?} {b_again:?} {after}"
    );
    let refused = 40 - a_first.len() as u64;
    assert!(
        grew(&before, &after, "drop_ct_budget") >= refused,
        "every refused flow counted ({refused}): {after}"
    );
    let aip = a.ip();
    let a_flows = flows(&t)
        .into_iter()
        .filter(|f| f["original"]["src"] == aip.as_str())
        .count();
    assert!(a_flows <= 16, "A holds {a_flows} flows in conntrack ls");
}

// 3. A half the LRU lost is rebuilt on the packet that misses it.

/// The half `key` of an assured pair: it is in the main table with a copy kept
/// (controls), is deleted, and the next packet must bring it back.
fn lose_half(t: &Topology, key: &[u8]) {
    let main = keys(t, maps::CONNTRACK);
    assert!(
        main.iter().any(|k| k == key),
        "control: {} is in {}: {:?}",
        show_key(key),
        maps::CONNTRACK,
        main.iter().map(|k| show_key(k)).collect::<Vec<_>>()
    );
    assert!(
        has_key(t, maps::CT_KEEP, key),
        "an assured half has a copy in {}: {}",
        maps::CT_KEEP,
        show_key(key)
    );
    delete_key(t, maps::CONNTRACK, key);
    assert!(
        !has_key(t, maps::CONNTRACK, key),
        "control: the half is gone"
    );
}

fn assert_rebuilt(t: &Topology, before: &serde_json::Value, key: &[u8], proto: &str, sport: u16) {
    let after = t.stats();
    assert!(
        grew(before, &after, "ct_rebuilt") >= 1,
        "ct_rebuilt counted the repair: {after}"
    );
    assert!(
        has_key(t, maps::CONNTRACK, key),
        "the half {} is back in {}",
        show_key(key),
        maps::CONNTRACK
    );
    let f = flow(t, proto, sport).unwrap_or_else(|| panic!("flow :{sport}: {:?}", flows(t)));
    assert_eq!(f["orphan"], false, "{f}");
    assert_eq!(f["state"], "established", "{f}");
}

#[test]
fn a_lost_dnat_reply_half_is_rebuilt_and_the_forwarded_connection_continues() {
    let t = Topology::new();
    let a = Container::start(&t);
    let aip = a.ip();
    let _srv = container_tcp_echo(&a, 8000);
    t.netns(&["port", "add", &a.id, "8100:8000/tcp"]);
    let mut w = Tcp::connect(t.wan.cmd("python3"), UPLINK_IP, 8100, 41001);
    w.echo("one");
    // The container's direction of the forwarded flow, as it leaves the uplink.
    let key = ct_key(&aip, 8000, WAN_IP, 41001, IPPROTO_TCP, dir::UPLINK_EGRESS);
    lose_half(&t, &key);
    let before = t.stats();
    // The peer's line goes in by the surviving half; the container's answer meets the
    // missing one.
    w.echo("two");
    w.echo("three");
    assert_rebuilt(&t, &before, &key, "tcp", 41001);
}

#[test]
fn a_lost_snat_forward_half_is_rebuilt_and_the_connection_continues() {
    let t = Topology::new();
    let a = Container::start(&t);
    let aip = a.ip();
    let _srv = wan_tcp_echo(&t, 7700);
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7700, 42001);
    c.echo("one");
    let key = ct_key(&aip, 42001, WAN_IP, 7700, IPPROTO_TCP, dir::UPLINK_EGRESS);
    lose_half(&t, &key);
    let before = t.stats();
    // The container's next segment meets the missing half.
    c.echo("two");
    c.echo("three");
    assert_rebuilt(&t, &before, &key, "tcp", 42001);
}

#[test]
fn a_lost_snat_reverse_half_is_rebuilt_by_the_peers_next_segment() {
    let t = Topology::new();
    let a = Container::start(&t);
    let _srv = wan_tcp_echo(&t, 7700);
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7700, 42002);
    c.echo("one");
    let f = flow(&t, "tcp", 42002).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    let nat_port = sport_of(&f, "translated");
    let key = ct_key(
        WAN_IP,
        7700,
        UPLINK_IP,
        nat_port,
        IPPROTO_TCP,
        dir::UPLINK_INGRESS,
    );
    // The server answers 1.5 s after the request: the request (and the server's ACK of
    // it) pass before the half is deleted, so the server's answer is the first packet
    // after it, arriving on the uplink.
    c.l.send("send delay 1.5 late");
    std::thread::sleep(Duration::from_millis(500));
    lose_half(&t, &key);
    let before = t.stats();
    assert!(
        c.l.wait_line(SHORT, |l| l == "got late").is_some(),
        "the peer's segment after the reverse half was lost: {:?}",
        c.l.lines()
    );
    c.echo("two");
    assert_rebuilt(&t, &before, &key, "tcp", 42002);
}

// 4. TCP: RST validation, closing, reuse.

#[test]
fn a_blind_rst_is_ignored_and_an_in_window_rst_closes_the_flow() {
    let t = Topology::new();
    let a = Container::start(&t);
    let _srv = wan_tcp_echo(&t, 7701);
    let sniff = sniffer(t.wan.cmd("python3"), "wan0");
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7701, 42101);
    c.echo("one");
    let f = flow(&t, "tcp", 42101).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert_eq!(f["state"], "established", "control: {f}");
    let np = sport_of(&f, "translated");
    let nat_port = np.to_string();
    // A RST that looks like the server's, but 2^31 off its sequence: a spoofer's guess.
    let end = seq_end(&sniff, WAN_IP, 7701, np);
    let blind = end.wrapping_add(1 << 31).to_string();
    let before = t.stats();
    wan_segment(
        &t,
        &[WAN_IP, UPLINK_IP, "7701", &nat_port, "4", &blind, "0"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = t.stats();
    assert!(
        grew(&before, &after, "tcp_blind_rst") >= 1,
        "the blind RST was counted: {after}"
    );
    let f = flow(&t, "tcp", 42101).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert_eq!(
        f["state"], "established",
        "a blind RST changed the flow: {f}"
    );
    c.echo("two");
    // The same RST at the server's exact sequence number is the real thing.
    let end = seq_end(&sniff, WAN_IP, 7701, np).to_string();
    wan_segment(&t, &[WAN_IP, UPLINK_IP, "7701", &nat_port, "4", &end, "0"]);
    std::thread::sleep(Duration::from_millis(300));
    let f = flow(&t, "tcp", 42101);
    assert!(
        f.as_ref().is_none_or(|f| f["state"] == "close"),
        "an in-window RST closes the flow: {f:?}"
    );
    let r = c.cmd("send three");
    assert!(
        r.starts_with("error") || r == "eof",
        "the in-window RST reached the container and reset its socket: {r}"
    );
}

#[test]
fn a_reused_tuple_after_rst_or_fin_starts_a_fresh_flow_in_both_directions() {
    let t = Topology::with_flags(&["--ct-counters", "on"]);
    let a = Container::start(&t);
    let _srv = wan_tcp_echo(&t, 7702);
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7702, 42201);
    for i in 0..8 {
        c.echo(&format!("old-{i}"));
    }
    let old = flow(&t, "tcp", 42201).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert_eq!(old["state"], "established", "control: {old}");
    // Closed by a RST (the container's own: SO_LINGER 0).
    assert_eq!(c.cmd("rst"), "closed");
    std::thread::sleep(Duration::from_millis(200));
    let f = flow(&t, "tcp", 42201);
    assert!(
        f.as_ref().is_none_or(|f| f["state"] == "close"),
        "the container's RST closed the flow: {f:?}"
    );
    let before = t.stats();
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7702, 42201);
    c.echo("new-after-rst");
    let after = t.stats();
    let fresh = flow(&t, "tcp", 42201).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert_eq!(fresh["state"], "established", "{fresh}");
    assert!(
        fresh["packets"].as_u64() < old["packets"].as_u64()
            && fresh["reply_packets"].as_u64() < old["reply_packets"].as_u64(),
        "a fresh pair, both directions: old {old} new {fresh}"
    );
    assert!(
        grew(&before, &after, "ct_reopened") >= 1 || f.is_none(),
        "the SYN on the closed tuple reopened it: {after}"
    );
    for i in 0..8 {
        c.echo(&format!("old-{i}"));
    }
    let old = flow(&t, "tcp", 42201).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    // Closed by FINs, the server's first (so the container's side has no TIME_WAIT).
    assert_eq!(c.cmd("send close"), "eof");
    assert_eq!(c.cmd("close"), "closed");
    std::thread::sleep(Duration::from_millis(200));
    let f = flow(&t, "tcp", 42201);
    assert!(
        f.as_ref().is_none_or(|f| f["state"] == "fin_wait"),
        "FINs both ways: {f:?}"
    );
    let before = t.stats();
    let mut c = Tcp::connect(a.cmd("python3"), WAN_IP, 7702, 42201);
    c.echo("new-after-fin");
    let after = t.stats();
    let fresh = flow(&t, "tcp", 42201).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert_eq!(fresh["state"], "established", "{fresh}");
    assert!(
        fresh["packets"].as_u64() < old["packets"].as_u64()
            && fresh["reply_packets"].as_u64() < old["reply_packets"].as_u64(),
        "a fresh pair after FIN, both directions: old {old} new {fresh}"
    );
    assert!(
        grew(&before, &after, "ct_reopened") >= 1 || f.is_none(),
        "the SYN on the finished tuple reopened it: {after}"
    );
}

// 5. UDP timeouts, expired on lookup (no collector sweeps).

#[test]
fn udp_flows_expire_on_lookup_with_linux_timeouts_and_no_collector() {
    // The hook's collector sweeps when it starts and then every hour: any expiry during
    // the test is the datapath's own.
    let t = Topology::with_flags(&["--gc-interval", "3600", "--ct-counters", "on"]);
    let a = Container::start(&t);
    let _srv = wan_udp_echo(&t, 7800);
    // Sets the timeouts (and sweeps once, before any flow exists).
    t.netns(&["gc", "--timeouts", "udp=3,udp_stream=9"]);
    let mut dns = Udp::open(a.cmd("python3"), WAN_IP, 7800, 43001);
    let mut stream = Udp::open(a.cmd("python3"), WAN_IP, 7800, 43002);
    // A query and its answer, then nothing.
    dns.echo("q1");
    // Traffic both ways for more than 2 s: a stream (120 s; 9 s here).
    for i in 0..7 {
        stream.echo(&format!("s{i}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let s0 = flow(&t, "udp", 43002).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    // 5 s idle: past udp (3 s), within udp_stream (9 s). The query flow is 8 s idle.
    std::thread::sleep(Duration::from_secs(5));
    let before = t.stats();
    // A late answer to the expired query flow: nobody asked for it any more.
    let o = python(
        t.wan.cmd("python3"),
        "send_l3(ip4(sys.argv[1], sys.argv[2], 17, udp(sys.argv[1], sys.argv[2], 7800, 43001, b\"late\")))",
        &[WAN_IP, UPLINK_IP],
    );
    assert!(o.status.success(), "{}", both(&o));
    let late = dns.cmd("drain 1");
    assert_eq!(
        late, "none",
        "a datagram reached the container through a flow idle past its timeout"
    );
    // The same tuple again: a new pair.
    dns.echo("q2");
    stream.echo("s-last");
    let after = t.stats();
    assert!(
        grew(&before, &after, "ct_expired") >= 1,
        "lazy expiry counted: {after}"
    );
    assert!(
        grew(&before, &after, "ct_created") >= 1,
        "the query tuple got a new pair: {after}"
    );
    let d = flow(&t, "udp", 43001).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert!(
        d["age_secs"].as_u64().unwrap() <= 2,
        "the query flow is a new one: {d}"
    );
    let s = flow(&t, "udp", 43002).unwrap_or_else(|| panic!("{:?}", flows(&t)));
    assert!(
        s["age_secs"].as_u64().unwrap() >= 7
            && s["packets"].as_u64() > s0["packets"].as_u64()
            && s["translated"] == s0["translated"],
        "the stream flow survived 5 s idle (udp_stream): before {s0} after {s}"
    );
}

// 6. No DNAT state from a segment that does not open a connection.

#[test]
fn a_non_syn_segment_to_a_mapped_port_is_dropped_counted_and_makes_no_state() {
    let t = Topology::new();
    let a = Container::start(&t);
    let _srv = container_tcp_echo(&a, 8000);
    t.netns(&["port", "add", &a.id, "8200:8000/tcp"]);
    let cap = Capture::start(a.cmd("python3"), "eth0");
    let before = t.stats();
    // ACK, PSH|ACK with data, FIN|ACK: mid-connection segments of no known flow.
    for (sport, flags, data) in [
        ("45001", "16", ""),
        ("45002", "24", "data"),
        ("45003", "17", ""),
    ] {
        let mut args = vec![WAN_IP, UPLINK_IP, sport, "8200", flags, "1000", "2000"];
        if !data.is_empty() {
            args.push(data);
        }
        wan_segment(&t, &args);
    }
    // Control: a real connection through the same forward works, and is captured.
    let mut w = Tcp::connect(t.wan.cmd("python3"), UPLINK_IP, 8200, 45010);
    w.echo("marker");
    assert!(
        cap.wait(SHORT, |f| f["proto"] == 6 && f["sport"] == 45010)
            .is_some(),
        "control: the capture sees the forwarded connection: {:?}",
        cap.frames()
    );
    let after = t.stats();
    let stray = |f: &serde_json::Value| {
        f["proto"] == 6 && (45001..=45003).any(|p| f["sport"] == p || f["dport"] == p)
    };
    let leaked: Vec<serde_json::Value> = cap.frames().into_iter().filter(stray).collect();
    assert!(
        leaked.is_empty(),
        "non-SYN segments without a flow reached the container: {leaked:?}"
    );
    assert!(
        grew(&before, &after, "drop_tcp_no_state") >= 3,
        "each counted: {after}"
    );
    let fl = flows(&t);
    assert!(
        !fl.iter()
            .any(|f| (45001..=45003).any(|p| f["original"]["sport"] == p)),
        "conntrack ls lists state for them: {fl:?}"
    );
    for m in [maps::CONNTRACK, maps::CT_NEW] {
        let made: Vec<String> = keys(&t, m)
            .iter()
            .filter(|k| {
                k.len() >= 12
                    && (45001..=45003)
                        .any(|p: u16| k[8..10] == p.to_be_bytes() || k[10..12] == p.to_be_bytes())
            })
            .map(|k| show_key(k))
            .collect();
        assert!(made.is_empty(), "entries in {m}: {made:?}");
    }
}

// 7. Fragments.

#[test]
fn fragment_tracking_entries_are_gone_once_the_last_fragment_passed() {
    let t = Topology::new();
    let a = Container::start(&t);
    let _echo = wan_udp_echo(&t, 7105);
    let _cecho = container_udp_echo(&a, 7106);
    t.netns(&["port", "add", &a.id, "8600:7106/udp"]);
    let before = t.stats();
    // Masquerade: 4000 bytes out (fragmented by the container), echoed back fragmented.
    let o = python(a.cmd("python3"), UDP_BIG, &[WAN_IP, "7105", "4000"]);
    assert_eq!(out(&o), format!("True 4000 {WAN_IP}"), "{}", both(&o));
    // Port forward: 4000 bytes in, echoed back out.
    let o = python(t.wan.cmd("python3"), UDP_BIG, &[UPLINK_IP, "8600", "4000"]);
    assert_eq!(out(&o), format!("True 4000 {UPLINK_IP}"), "{}", both(&o));
    let after = t.stats();
    assert!(
        grew(&before, &after, "frag_addr_only") >= 2,
        "control: later fragments went through the datapath: {after}"
    );
    let left: Vec<String> = keys(&t, maps::FRAGS)
        .iter()
        .map(|k| format!("{k:02x?}"))
        .collect();
    assert!(
        left.is_empty(),
        "fragment entries of finished datagrams are left in {}: {left:?}",
        maps::FRAGS
    );
}

#[test]
fn later_fragments_of_a_reply_through_a_secondary_address_forward_leave_from_that_address() {
    const SECONDARY: &str = "198.51.100.3";
    let t = Topology::new();
    t.host
        .ip(&["addr", "add", &format!("{SECONDARY}/24"), "dev", UPLINK]);
    let a = Container::start(&t);
    let _cecho = container_udp_echo(&a, 7106);
    t.netns(&["port", "add", &a.id, &format!("{SECONDARY}:8601:7106/udp")]);
    let cap = Capture::start(t.wan.cmd("python3"), "wan0");
    // Control: a small datagram through the forward.
    let o = python(t.wan.cmd("python3"), UDP_BIG, &[SECONDARY, "8601", "100"]);
    assert_eq!(
        out(&o),
        format!("True 100 {SECONDARY}"),
        "control: {}",
        both(&o)
    );
    let o = python(t.wan.cmd("python3"), UDP_BIG, &[SECONDARY, "8601", "4000"]);
    // The capture's reader may lag the exchange: wait (bounded) for the reply's later
    // fragments before judging them.
    let reply_later = |f: &serde_json::Value| {
        f["dir"] == 0
            && f["proto"] == 17
            && f["dst"] == WAN_IP
            && f["frag"].as_u64().unwrap_or(0) > 0
    };
    netns_tests::util::wait_for(Duration::from_secs(5), || {
        (cap.frames().iter().filter(|f| reply_later(f)).count() >= 2).then_some(())
    });
    let replies: Vec<serde_json::Value> = cap
        .frames()
        .into_iter()
        .filter(|f| f["dir"] == 0 && f["proto"] == 17 && f["dst"] == WAN_IP)
        .collect();
    assert_eq!(
        out(&o),
        format!("True 4000 {SECONDARY}"),
        "the fragmented echo through {SECONDARY}: {}\nframes to the wan: {replies:?}",
        both(&o)
    );
    let later: Vec<&serde_json::Value> = replies
        .iter()
        .filter(|f| f["frag"].as_u64().unwrap_or(0) > 0)
        .collect();
    assert!(
        later.len() >= 2,
        "control: the reply came in fragments: {replies:?}"
    );
    let wrong: Vec<&serde_json::Value> = replies.iter().filter(|f| f["src"] != SECONDARY).collect();
    assert!(
        wrong.is_empty(),
        "reply fragments left with another source than {SECONDARY}: {wrong:?}"
    );
    assert_eq!(t.map_entries(maps::FRAGS), 0, "fragment entries left");
}

#[test]
fn hairpin_translates_later_fragments_in_both_directions() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _cecho = container_udp_echo(&a, 7107);
    t.netns(&["port", "add", &a.id, "8602:7107/udp"]);
    // Control: B reaches A's forward through the host address (hairpin).
    let o = python(b.cmd("python3"), UDP_BIG, &[UPLINK_IP, "8602", "100"]);
    assert_eq!(
        out(&o),
        format!("True 100 {UPLINK_IP}"),
        "control: {}",
        both(&o)
    );
    let before = t.stats();
    let o = python(b.cmd("python3"), UDP_BIG, &[UPLINK_IP, "8602", "4000"]);
    let after = t.stats();
    assert_eq!(
        out(&o),
        format!("True 4000 {UPLINK_IP}"),
        "a fragmented datagram through the hairpin and its fragmented echo: {}\n{after}",
        both(&o)
    );
    assert!(
        grew(&before, &after, "hairpin_packets") >= 3,
        "every fragment both ways was hairpinned: {after}"
    );
    assert_eq!(t.map_entries(maps::FRAGS), 0, "fragment entries left");
}
