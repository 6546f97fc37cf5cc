//! IPv6 (`--ip6`) end to end with real runc containers: addresses from the prefix
//! (the IPv4 host offset), leases, refused prefixes, NAT66 masquerade to the uplink's
//! address (ICMPv6, TCP, UDP, bulk, fragments, Packet Too Big), bridge traffic
//! untranslated, port forwards in docker's bracketed syntax (from the wan, hairpin,
//! from host processes through the socket programs), and do no harm: forged sources
//! and neighbour adverts are dropped, the host's own IPv6 is untouched, and nothing
//! unsolicited from outside reaches a container. The observers are the peers (python
//! servers that report the address they saw), AF_PACKET captures, and the kernel's
//! addresses, routes and neighbour tables; `netns stats` counters are a second check.
//! Everything stays inside each test's private topology: 2001:db8::/32 on the wan
//! side, fd00:19::/64 on the bridge, 198.51.100.0/24 and 172.19.0.0/16 for IPv4.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use netns_tests::pkt::python;
use netns_tests::pkt::{Capture, Lines, mac_of};
use netns_tests::topo::{FAR_IP6, GATEWAY, UPLINK_IP, UPLINK_IP6, WAN_IP, WAN_IP6};
use netns_tests::util::{ChildGuard, assert_bridge_address, output, run, sh, wait_for};
use netns_tests::util::{both, grew, out};
use netns_tests::{Container, Topology};

/// The `--ip6` every test passes: the bridge gets the gateway address, containers the
/// prefix's network plus their IPv4 host offset.
const PREFIX6: &str = "fd00:19::1/64";
const GATEWAY6: &str = "fd00:19::1";
const NETWORK6: &str = "fd00:19::";
const BRIDGE: &str = "netns0";

const SHORT: Duration = Duration::from_secs(5);

/// A topology with `--ip6 fd00:19::1/64` (hooks included) and IPv6 on the uplink,
/// set up before any container starts.
fn topology() -> Topology {
    let t = Topology::with_flags(&["--ip6", PREFIX6]);
    t.enable_ipv6();
    t
}

/// The container's global IPv6 address on eth0.
fn ip6(c: &Container<'_>) -> Ipv6Addr {
    let o = run(c
        .cmd("ip")
        .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]));
    o.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no global IPv6 address on {}'s eth0: {o:?}", c.id))
}

/// What the interface promises for a container with IPv4 address `ip4`: the
/// prefix's network plus the IPv4 host offset in 172.19.0.0/16 (172.19.0.2 ->
/// fd00:19::2, 172.19.1.5 -> fd00:19::105).
fn expected_ip6(ip4: &str) -> Ipv6Addr {
    let ip: Ipv4Addr = ip4.parse().expect("IPv4 address");
    let gw: Ipv4Addr = GATEWAY.parse().unwrap();
    let offset = u32::from(ip) - (u32::from(gw) & 0xffff_0000);
    let net: Ipv6Addr = NETWORK6.parse().unwrap();
    Ipv6Addr::from(u128::from(net) + u128::from(offset))
}

/// The container's `ls --json` object.
fn ls_entry(t: &Topology, c: &Container<'_>) -> serde_json::Value {
    let ls = t.containers();
    ls.iter()
        .find(|e| e["id"] == c.id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{} not in ls --json: {ls:?}", c.id))
}

/// `ping -6` (iputils, run by `ping_cmd`: a `ping` in some namespace) to `addr`.
fn ping6(mut ping_cmd: Command, addr: &str) -> Output {
    output(ping_cmd.args(["-6", "-c", "3", "-i", "0.2", "-W", "2", addr]))
}

/// Servers on argv[1] for TCP and UDP in the families argv[3] names ("4", "6", "46";
/// IPv6 sockets are v6-only): a TCP connection gets "TAG peer=ADDR" and is closed, a
/// datagram is answered with the same. Prints "ready" once bound, then "tcp ADDR"
/// and "udp ADDR PAYLOAD" for what it served.
const WHO: &str = r#"
port, tag, fams = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ls = []
for f in fams:
    fam, host = (socket.AF_INET, "0.0.0.0") if f == "4" else (socket.AF_INET6, "::")
    for ty in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(fam, ty)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if ty == socket.SOCK_STREAM:
            s.listen(64)
        ls.append(s)
print("ready", flush=True)
while True:
    r, _, _ = select.select(ls, [], [])
    for s in r:
        if s.type == socket.SOCK_STREAM:
            c, a = s.accept()
            try:
                c.sendall(("%s peer=%s\n" % (tag, a[0])).encode())
            except OSError:
                pass
            c.close()
            print("tcp", a[0], flush=True)
        else:
            d, a = s.recvfrom(65535)
            s.sendto(("%s peer=%s\n" % (tag, a[0])).encode(), a)
            print("udp", a[0], d.decode(errors="replace"), flush=True)
"#;

/// A [`WHO`] server on `port` in the namespace `cmd` (a `python3`) picks; returns
/// once its sockets are bound.
fn who(cmd: Command, port: u16, tag: &str, fams: &str) -> Lines {
    let l = Lines::python(cmd, WHO, &[&port.to_string(), tag, fams]);
    assert!(
        l.wait_line(Duration::from_secs(15), |x| x == "ready")
            .is_some(),
        "who server on {port} did not start: {}",
        l.stderr()
    );
    l
}

/// Client: argv[1] "tcp" (connect, print what the server sends until it closes) or
/// "udp" (connected socket, "hi" up to 8 times, print the first answer) to
/// argv[2]:argv[3]; "error NAME" or "timeout" when nothing comes.
const ASK: &str = r#"
proto, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
if proto == "tcp":
    try:
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(5)
        s.connect((addr, port)); buf = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        print(buf.decode(errors="replace").strip())
    except OSError as e:
        print("error", type(e).__name__)
else:
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(0.5)
    try:
        s.connect((addr, port))
        for i in range(8):
            s.send(b"hi")
            try:
                print(s.recv(1000).decode(errors="replace").strip()); break
            except socket.timeout:
                pass
        else:
            print("timeout")
    except OSError as e:
        print("error", type(e).__name__)
"#;

fn answer(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
    if err.is_empty() {
        out(o)
    } else {
        format!("{} [stderr: {err}]", out(o))
    }
}

/// An [`ASK`] from the namespace `cmd` (a `python3`) picks.
fn ask(cmd: Command, proto: &str, addr: &str, port: u16) -> String {
    answer(&python(cmd, ASK, &[proto, addr, &port.to_string()]))
}

/// An [`ASK`] from a host process in the topology's cgroup.
fn host_ask(t: &Topology, proto: &str, addr: &str, port: u16) -> String {
    answer(&t.host_python(ASK, &[proto, addr, &port.to_string()]))
}

/// Retries `f` for a while (the first packets to a new neighbour may wait for
/// neighbour discovery) until it returns `want` (or, with `prefix`, starts with it).
fn expect_answer(what: &str, mut f: impl FnMut() -> String, want: &str, prefix: bool) {
    let mut last = String::new();
    let ok = wait_for(Duration::from_secs(8), || {
        last = f();
        let hit = if prefix {
            last.starts_with(want)
        } else {
            last == want
        };
        hit.then_some(())
    });
    assert!(ok.is_some(), "{what}: expected {want:?}, last got {last:?}");
}

fn expect(what: &str, f: impl FnMut() -> String, want: &str) {
    expect_answer(what, f, want, false);
}

/// `netns ARGS` with the topology's flags minus `--ip6 VALUE`: works whatever the
/// CLI does with a bad `--ip6` outside the hook.
fn netns_without_ip6(t: &Topology, args: &[&str]) -> Output {
    let flags = t.flags();
    let mut kept = Vec::new();
    let mut skip = false;
    for f in flags {
        if skip {
            skip = false;
            continue;
        }
        if f == "--ip6" {
            skip = true;
            continue;
        }
        if f.starts_with("--ip6=") {
            continue;
        }
        kept.push(f);
    }
    output(t.host.cmd(t.bin()).args(kept).args(args))
}

// 1. Addresses, routes, leases.

#[test]
fn address_route_and_ls() {
    let t = topology();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let br = t.host.ip(&["-6", "addr", "show", "dev", BRIDGE]);
    assert!(
        br.contains(&format!("inet6 {PREFIX6} ")),
        "the bridge has {PREFIX6}: {br}"
    );
    let mut seen = Vec::new();
    for c in [&a, &b] {
        let ip4 = c.ip();
        assert_bridge_address(ip4.parse().unwrap());
        let want = expected_ip6(&ip4);
        let addrs = run(c.cmd("ip").args(["-6", "addr", "show", "dev", "eth0"]));
        let line = addrs
            .lines()
            .find(|l| l.contains(&format!("inet6 {want}/64 ")))
            .unwrap_or_else(|| {
                panic!(
                    "{} (IPv4 {ip4}) should have {want}/64 on eth0: {addrs}",
                    c.id
                )
            });
        assert!(
            !line.contains("tentative") && !line.contains("dadfailed"),
            "{}: the address is usable at once (nodad): {line}",
            c.id
        );
        assert_eq!(ip6(c), want, "{}: its only global address", c.id);
        let routes = run(c.cmd("ip").args(["-6", "route", "show", "default"]));
        assert!(
            routes.contains(&format!("default via {GATEWAY6} dev eth0")),
            "{}: IPv6 default route: {routes}",
            c.id
        );
        let e = ls_entry(&t, c);
        assert_eq!(
            e["ip6"].as_str(),
            Some(want.to_string().as_str()),
            "ls --json ip6 of {}: {e}",
            c.id
        );
        assert_eq!(e["ip"].as_str(), Some(ip4.as_str()), "ls --json ip: {e}");
        let p = ping6(c.cmd("ping"), GATEWAY6);
        assert!(p.status.success(), "{} -> {GATEWAY6}: {}", c.id, both(&p));
        let p = c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP]);
        assert!(
            p.status.success(),
            "{}: IPv4 to the wan still works: {}",
            c.id,
            both(&p)
        );
        seen.push(want);
    }
    assert_ne!(seen[0], seen[1], "two containers, two IPv6 addresses");
    // And they reach each other's IPv6 address over the bridge.
    let p = ping6(a.cmd("ping"), &seen[1].to_string());
    assert!(p.status.success(), "A -> B over IPv6: {}", both(&p));
    // `datapath status` says IPv6 is on, with which gateway and NAT66 source.
    let st: serde_json::Value =
        serde_json::from_str(&t.netns(&["datapath", "status", "--json"])).expect("status JSON");
    assert_eq!(st["ipv6"]["enabled"], true, "{st}");
    assert_eq!(st["ipv6"]["gateway"], PREFIX6, "{st}");
    assert_eq!(st["ipv6"]["uplink_addr"], UPLINK_IP6, "{st}");
    let text = t.netns(&["datapath", "status"]);
    assert!(
        text.contains(&format!(
            "IPv6: on, gateway {PREFIX6}, NAT66 source {UPLINK_IP6}"
        )),
        "{text}"
    );
}

#[test]
fn a_deleted_containers_ipv6_lease_is_released_and_a_new_container_gets_its_offset() {
    let t = topology();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let a6 = ip6(&a);
    let (b_id, b4, b6) = (b.id.clone(), b.ip(), ip6(&b));
    assert_eq!(b6, expected_ip6(&b4), "control");
    let o = b.delete();
    assert!(o.status.success(), "runc delete: {}", both(&o));
    let ls = t.containers();
    assert!(
        !ls.iter().any(|e| e["id"] == b_id.as_str()),
        "B's lease is gone: {ls:?}"
    );
    assert!(
        !ls.iter().any(|e| e["ip6"] == b6.to_string().as_str()),
        "B's IPv6 is no longer leased: {ls:?}"
    );
    for round in 0..2 {
        let c = Container::start(&t);
        let (c4, c6) = (c.ip(), ip6(&c));
        assert_eq!(
            c6,
            expected_ip6(&c4),
            "round {round}: the new container's IPv6 follows its IPv4 offset ({c4})"
        );
        if c4 == b4 {
            assert_eq!(c6, b6, "the reused IPv4 address brings the same IPv6 one");
        }
        assert_ne!(c6, a6, "round {round}: not A's address");
        let e = ls_entry(&t, &c);
        assert_eq!(e["ip6"].as_str(), Some(c6.to_string().as_str()), "{e}");
        // Its bridge port knows the new address: both ways work.
        let p = ping6(c.cmd("ping"), GATEWAY6);
        assert!(
            p.status.success(),
            "round {round}: C -> gateway: {}",
            both(&p)
        );
        let p = ping6(t.host.cmd("ping"), &c6.to_string());
        assert!(p.status.success(), "round {round}: host -> C: {}", both(&p));
        let o = c.delete();
        assert!(o.status.success(), "runc delete: {}", both(&o));
    }
    let ls = t.containers();
    assert_eq!(ls.len(), 1, "only A is left: {ls:?}");
    assert_eq!(ls[0]["ip6"].as_str(), Some(a6.to_string().as_str()));
    // The datapath forgot the stopped containers' IPv6 endpoints too.
    assert_eq!(t.endpoints6(), vec![a6], "NETNS_EPS6 holds A only");
}

#[test]
fn bad_ip6_is_refused_and_leaves_nothing() {
    for bad in [
        "fd00:19::1/130",
        "fd00:19::1",
        "10.0.0.1/24",
        // 256 addresses for the default IPv4 /16's hosts.
        "fd00:19::1/120",
    ] {
        let t = Topology::with_flags(&["--ip6", bad]);
        t.enable_ipv6();
        let links_before = t.host.ip(&["-o", "link"]);
        let err = Container::start_with(&t, &BTreeMap::new(), &[])
            .err()
            .unwrap_or_else(|| panic!("a container started with --ip6 {bad}"));
        let msg = String::from_utf8_lossy(&err.stderr).into_owned()
            + &String::from_utf8_lossy(&err.stdout);
        assert!(
            msg.contains(bad),
            "the hook's error names the bad --ip6 {bad:?}: {msg}"
        );
        let links = t.host.ip(&["-o", "link"]);
        assert!(
            !links.contains("netnsv0-"),
            "veth left behind after --ip6 {bad}: {links}"
        );
        assert!(
            links.lines().count() <= links_before.lines().count() + 1,
            "at most the bridge is new after --ip6 {bad}: before {links_before}\nafter {links}"
        );
        let ls = netns_without_ip6(&t, &["ls", "--json"]);
        assert!(ls.status.success(), "ls: {}", both(&ls));
        let v: serde_json::Value = serde_json::from_str(&out(&ls)).expect("ls --json is JSON");
        assert_eq!(v, serde_json::json!([]), "no lease after --ip6 {bad}: {v}");
        let root = t.runc_root.display().to_string();
        let listed = run(Command::new("runc").args(["--root", &root, "list", "-q"]));
        assert_eq!(
            listed.trim(),
            "",
            "runc keeps no container after --ip6 {bad}"
        );
    }
}

#[test]
fn the_prefix_can_come_from_the_environment() {
    let t = Topology::new();
    t.enable_ipv6();
    let c = Container::start_with(&t, &BTreeMap::new(), &[("NETNS_IP6", PREFIX6)])
        .unwrap_or_else(|o| panic!("start with NETNS_IP6: {}", both(&o)));
    let want = expected_ip6(&c.ip());
    assert_eq!(ip6(&c), want, "NETNS_IP6 gives the same address as --ip6");
    let e = ls_entry(&t, &c);
    assert_eq!(e["ip6"].as_str(), Some(want.to_string().as_str()), "{e}");
}

#[test]
fn ipv6_is_off_by_default() {
    let t = Topology::new();
    t.enable_ipv6();
    let c = Container::start(&t);
    let addrs = run(c
        .cmd("ip")
        .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]));
    assert!(
        addrs.trim().is_empty(),
        "no global IPv6 address without --ip6: {addrs}"
    );
    let e = ls_entry(&t, &c);
    assert!(
        e["ip6"].is_null(),
        "ls --json has no ip6 without --ip6: {e}"
    );
    let br = t.host.ip(&["-6", "addr", "show", "dev", BRIDGE]);
    assert!(!br.contains("fd00:"), "no bridge IPv6 address: {br}");
    // IPv6 from the container is dropped at its bridge port.
    let br_mac = mac_of(t.host.cmd("ip"), BRIDGE);
    let before = t.stats();
    let o = python(
        c.cmd("python3"),
        r#"
cmac, br, wan = sys.argv[1:4]
src = "fe80::1"
body = struct.pack("!BBHHH", 128, 0, 0, 0x4242, 1) + b"v6-while-off"
f = eth(br, cmac, 0x86dd, ip6(src, wan, 58, icmp6(src, wan, body), hlim=64))
send_l2("eth0", f, f)
"#,
        &[&c.mac(), &br_mac, WAN_IP6],
    );
    assert!(o.status.success(), "{}", both(&o));
    let p = c.exec(&["ping", "-c", "1", "-W", "2", GATEWAY]);
    assert!(p.status.success(), "IPv4 works: {}", both(&p));
    assert!(
        grew(&before, &t.stats(), "drop_ipv6_off") >= 2,
        "{}",
        t.stats()
    );
    // The host's own IPv6 on the uplink is untouched by the loaded datapath.
    let p = ping6(t.wan.cmd("ping"), UPLINK_IP6);
    assert!(p.status.success(), "wan -> host over IPv6: {}", both(&p));
}

// 2. NAT66 to the wan.

#[test]
fn ping6_tcp_udp_reach_the_wan_peer_which_sees_the_uplink_address() {
    let t = topology();
    let c = Container::start(&t);
    let c6 = ip6(&c).to_string();
    let cap = Capture::start(t.wan.cmd("python3"), "wan0");
    let _srv = who(t.wan.cmd("python3"), 7000, "wan", "6");
    let before = t.stats();
    let p = ping6(c.cmd("ping"), WAN_IP6);
    assert!(p.status.success(), "ping -6 {WAN_IP6}: {}", both(&p));
    let want = format!("wan peer={UPLINK_IP6}");
    expect(
        "TCP over NAT66",
        || ask(c.cmd("python3"), "tcp", WAN_IP6, 7000),
        &want,
    );
    expect(
        "UDP over NAT66",
        || ask(c.cmd("python3"), "udp", WAN_IP6, 7000),
        &want,
    );
    let after = t.stats();
    assert!(grew(&before, &after, "snat6_packets") >= 5, "{after}");
    assert!(grew(&before, &after, "snat6_reply_packets") >= 5, "{after}");
    assert!(
        grew(&before, &after, "ct6_created") >= 3,
        "ICMP, TCP and UDP flows: {after}"
    );
    let frames = cap.frames();
    assert!(
        frames
            .iter()
            .any(|f| f["nh"] == 58 && f["src6"] == UPLINK_IP6 && f["dst6"] == WAN_IP6),
        "the wan saw the echo requests from the uplink's address: {frames:?}"
    );
    let leaked: Vec<&serde_json::Value> = frames
        .iter()
        .filter(|f| {
            f["src6"]
                .as_str()
                .is_some_and(|s| s.starts_with("fd00:") || s == c6)
        })
        .collect();
    assert!(leaked.is_empty(), "private sources on the wan: {leaked:?}");
    // `conntrack ls` shows the NAT66 flows, owned by the container, translated to the
    // uplink's address.
    let ct = t.netns(&["conntrack", "ls", "--json"]);
    let flows: Vec<serde_json::Value> = serde_json::from_str(&ct).expect("conntrack ls --json");
    for proto in ["tcp", "udp", "icmpv6"] {
        assert!(
            flows.iter().any(|f| f["proto"] == proto
                && f["kind"] == "snat"
                && f["original"]["src"] == c6.as_str()
                && f["translated"]["src"] == UPLINK_IP6
                && f["owner"] == c6.as_str()),
            "no {proto} NAT66 flow in conntrack ls: {ct}"
        );
    }
    let text = t.netns(&["conntrack", "ls"]);
    assert!(
        text.contains(&format!("src=[{c6}]:")) && text.contains(&format!("src=[{UPLINK_IP6}]:")),
        "{text}"
    );
}

#[test]
fn a_100_mb_transfer_both_ways_is_intact_over_nat66() {
    let t = topology();
    let a = Container::start(&t);
    let file = t.path("blob");
    sh(&format!(
        "head -c 104857600 /dev/urandom > {}",
        file.display()
    ));
    let want = sh(&format!("sha256sum < {}", file.display()));
    // Download: wan -> container.
    let _srv = t.wan_spawn(&format!(
        "socat -u OPEN:{} TCP6-LISTEN:7010,reuseaddr",
        file.display()
    ));
    t.wan.wait_listen("tcp", 7010);
    let down = a.sh(&format!(
        "timeout 90 socat -u TCP6:[{WAN_IP6}]:7010 STDOUT | sha256sum"
    ));
    assert_eq!(
        String::from_utf8_lossy(&down.stdout),
        want,
        "download through reverse NAT66 corrupted: {}",
        both(&down)
    );
    // Upload: container -> wan.
    let got_file = t.path("uploaded");
    let srv = t.wan_spawn(&format!(
        "socat -u TCP6-LISTEN:7011,reuseaddr CREATE:{}",
        got_file.display()
    ));
    t.wan.wait_listen("tcp", 7011);
    let up = a.sh(&format!(
        "timeout 90 socat -u OPEN:{} TCP6:[{WAN_IP6}]:7011",
        file.display()
    ));
    assert!(up.status.success(), "upload: {}", both(&up));
    let _ = srv.wait_output(Duration::from_secs(30));
    let got = sh(&format!("sha256sum < {}", got_file.display()));
    assert_eq!(got, want, "upload through NAT66 corrupted");
}

#[test]
fn containers_talk_over_the_bridge_untranslated_v6() {
    let t = topology();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let (a6, b6) = (ip6(&a).to_string(), ip6(&b).to_string());
    let _srv = who(a.cmd("python3"), 7020, "a", "6");
    let want = format!("a peer={b6}");
    expect(
        "TCP B -> A",
        || ask(b.cmd("python3"), "tcp", &a6, 7020),
        &want,
    );
    expect(
        "UDP B -> A",
        || ask(b.cmd("python3"), "udp", &a6, 7020),
        &want,
    );
}

/// Echo server on [::]:argv[1]: prints "ADDR LEN" for every datagram, echoes it.
const ECHO6: &str = r#"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    print(a[0], len(d), flush=True)
    s.sendto(d, a)
"#;

/// Sends argv[4] datagrams of argv[3] random bytes to [argv[1]]:argv[2], each until
/// its echo comes back intact (three tries, 2 s each); prints "ok N of M".
const BIG_ROUNDTRIPS: &str = r#"
addr, port, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.connect((addr, port))
def roundtrip(d):
    for attempt in range(3):
        s.send(d)
        end = time.time() + 2
        while time.time() < end:
            s.settimeout(max(0.05, end - time.time()))
            try:
                if s.recv(65535) == d:
                    return True
            except socket.timeout:
                break
    return False
ok = sum(1 for i in range(n) if roundtrip(os.urandom(size)))
print("ok %d of %d" % (ok, n))
"#;

#[test]
fn fragmented_udp_both_ways() {
    let t = topology();
    let c = Container::start(&t);
    let srv = Lines::python(t.wan.cmd("python3"), ECHO6, &["7300"]);
    assert!(
        srv.wait_line(SHORT, |l| l == "ready").is_some(),
        "{}",
        srv.stderr()
    );
    // Control: one that needs no fragments.
    let o = python(
        c.cmd("python3"),
        BIG_ROUNDTRIPS,
        &[WAN_IP6, "7300", "1000", "1"],
    );
    assert_eq!(out(&o), "ok 1 of 1", "control: {}", both(&o));
    let o = python(
        c.cmd("python3"),
        BIG_ROUNDTRIPS,
        &[WAN_IP6, "7300", "4000", "3"],
    );
    assert_eq!(
        out(&o),
        "ok 3 of 3",
        "4000-byte datagrams, fragmented both ways: {}",
        both(&o)
    );
    let want = format!("{UPLINK_IP6} 4000");
    assert!(
        srv.wait_line(SHORT, |l| l == want).is_some(),
        "the wan got whole 4000-byte datagrams from the uplink's address: {:?}",
        srv.lines()
    );
}

#[test]
fn packet_too_big_through_nat66() {
    let t = topology();
    // far's link is 1280 bytes on wan's side; far itself says 1500 (its MSS invites
    // full-size segments), so the container's segments need wan's Packet Too Big.
    let far = t.add_far6(1280);
    far.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let c = Container::start(&t);
    let p = ping6(c.cmd("ping"), FAR_IP6);
    assert!(
        p.status.success(),
        "control: far is reachable: {}",
        both(&p)
    );
    let file = t.path("blob");
    sh(&format!(
        "head -c 1000000 /dev/urandom > {}",
        file.display()
    ));
    let want = sh(&format!("sha256sum < {}", file.display()));
    let sink = ChildGuard::spawn(
        far.cmd("sh")
            .arg("-c")
            .arg("timeout 60 socat -u TCP6-LISTEN:7200,reuseaddr STDOUT | sha256sum")
            .stdout(Stdio::piped()),
    );
    far.wait_listen("tcp", 7200);
    let before = t.stats();
    let up = c.sh(&format!(
        "timeout 30 socat -u OPEN:{} TCP6:[{FAR_IP6}]:7200",
        file.display()
    ));
    assert!(
        up.status.success(),
        "1 MB upload across the 1280-byte link (path MTU discovery needs the translated \
         Packet Too Big): {}",
        both(&up)
    );
    let got = sink.wait_output(Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        want,
        "far got the upload intact"
    );
    let route = run(c.cmd("ip").args(["-6", "route", "get", FAR_IP6]));
    assert!(
        route.contains("mtu 1280"),
        "the container learnt the path MTU from the translated Packet Too Big: {route}"
    );
    let after = t.stats();
    assert!(grew(&before, &after, "icmp6_errors") >= 1, "{after}");
}

// 3. Port forwards.

#[test]
fn port_forward_from_the_wan_keeps_the_peer_address() {
    let t = topology();
    let c = Container::start(&t);
    let _tcp = who(c.cmd("python3"), 80, "c", "6");
    let _udp = who(c.cmd("python3"), 81, "c", "6");
    t.netns(&["port", "add", &c.id, "[::]:8080:80"]);
    t.netns(&["port", "add", &c.id, &format!("[{UPLINK_IP6}]:8081:81/udp")]);
    let ls = t.netns(&["port", "ls"]);
    let line = |needle: &str| ls.lines().find(|l| l.contains(needle)).map(str::to_owned);
    let wild =
        line("[::]:8080").unwrap_or_else(|| panic!("port ls shows [::]:8080 bracketed: {ls}"));
    assert!(wild.contains("tcp") && wild.contains(&c.id), "{wild}\n{ls}");
    let bound = line(&format!("[{UPLINK_IP6}]:8081"))
        .unwrap_or_else(|| panic!("port ls shows [{UPLINK_IP6}]:8081 bracketed: {ls}"));
    assert!(
        bound.contains("udp") && bound.contains(&c.id),
        "{bound}\n{ls}"
    );
    let before = t.stats();
    let want = format!("c peer={WAN_IP6}");
    expect(
        "TCP wan -> [uplink]:8080",
        || ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8080),
        &want,
    );
    // A connected UDP socket only takes answers from [uplink]:8081: an answer also
    // proves the reply's source was translated back.
    expect(
        "UDP wan -> [uplink]:8081",
        || ask(t.wan.cmd("python3"), "udp", UPLINK_IP6, 8081),
        &want,
    );
    let after = t.stats();
    assert!(grew(&before, &after, "dnat6_packets") >= 2, "{after}");
    assert!(grew(&before, &after, "dnat6_reply_packets") >= 2, "{after}");
    // [::] is IPv6 only: the IPv4 uplink address has no such forward.
    let v4 = ask(t.wan.cmd("python3"), "tcp", UPLINK_IP, 8080);
    assert!(
        !v4.contains("peer="),
        "an IPv6-only forward answered over IPv4: {v4}"
    );
    // Removed, it is gone.
    t.netns(&["port", "rm", &c.id, "[::]:8080:80"]);
    assert!(
        !t.netns(&["port", "ls"]).contains("]:8080"),
        "{}",
        t.netns(&["port", "ls"])
    );
    let gone = ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8080);
    assert!(
        !gone.contains("peer="),
        "removed forward still answers: {gone}"
    );
    assert_eq!(
        t.map_entries(netns_common::maps::PORTS6),
        1,
        "the UDP one is left"
    );
    // The container's stop removes its remaining IPv6 forward from the datapath.
    let o = c.delete();
    assert!(o.status.success(), "runc delete: {}", both(&o));
    assert_eq!(
        t.map_entries(netns_common::maps::PORTS6),
        0,
        "NETNS_PORTS6 after the stop"
    );
    assert!(!t.netns(&["port", "ls"]).contains("]:8081"));
}

/// The host's own IPv6 TCP and UDP to the uplink's address pass before any table
/// lookup (`host_port_passed`), as IPv4's do; an IPv6 forward's port is marked in the
/// shared port-use table (else its packets would pass as the host's) and a NAT66
/// flow's port too.
#[test]
fn the_hosts_own_ipv6_ports_pass_before_any_lookup_and_forwards_still_translate() {
    let t = topology();
    let c = Container::start(&t);
    let _host = who(t.host.cmd("python3"), 8091, "h", "6");
    let s0 = t.stats();
    let want = format!("h peer={WAN_IP6}");
    for proto in ["tcp", "udp"] {
        expect(
            &format!("{proto} wan -> the host's [{UPLINK_IP6}]:8091"),
            || ask(t.wan.cmd("python3"), proto, UPLINK_IP6, 8091),
            &want,
        );
    }
    let s1 = t.stats();
    // TCP: SYN, ACK, FIN... in; UDP: at least one datagram.
    let passed = grew(&s0, &s1, "host_port_passed");
    assert!(
        passed >= 4,
        "the host's packets skipped the tables: +{passed}"
    );
    for s in ["dnat6_packets", "snat6_reply_packets", "ct6_created"] {
        assert_eq!(
            grew(&s0, &s1, s),
            0,
            "the host's traffic was not translated: {s}"
        );
    }

    let _ctr = who(c.cmd("python3"), 80, "c", "6");
    t.netns(&["port", "add", &c.id, "[::]:8090:80"]);
    expect(
        "TCP wan -> [uplink]:8090 (forward)",
        || ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8090),
        &format!("c peer={WAN_IP6}"),
    );
    let _wan = who(t.wan.cmd("python3"), 8092, "w", "6");
    expect(
        "TCP container -> wan (NAT66)",
        || ask(c.cmd("python3"), "tcp", WAN_IP6, 8092),
        &format!("w peer={UPLINK_IP6}"),
    );
    let s2 = t.stats();
    assert!(
        grew(&s1, &s2, "dnat6_packets") >= 3,
        "forward translated: {s2}"
    );
    assert!(
        grew(&s1, &s2, "snat6_reply_packets") >= 2,
        "NAT66 replies translated: {s2}"
    );
    let marked = t.status_entries("NETNS_PORTUSE");
    // 8090 (the forward) and the port of each NAT66 flow (one, unless a try was
    // repeated); 1 would mean one of the two kinds is not marked.
    assert!(
        marked >= 2,
        "8090 and the NAT66 flow's port are marked: {marked}"
    );

    // A forward written by a build that did not mark IPv6 ports: its mark is gone, so
    // the bail-out takes its packets for the host's (nothing listens there)...
    let (row, _) = netns_common::port_use_slot(8090);
    let pin = t.map_pin(netns_common::maps::PORT_USE);
    let mut cmd = t.host.cmd("bpftool");
    cmd.args([
        "map",
        "update",
        "pinned",
        pin.to_str().expect("utf-8 pin"),
        "key",
    ]);
    cmd.args(row.to_le_bytes().map(|b| b.to_string()));
    cmd.arg("value")
        .args(std::iter::repeat_n("0", netns_common::PORT_USE_ROW));
    run(&mut cmd);
    let lost = ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8090);
    assert!(
        !lost.contains("c peer="),
        "unmarked, the forward still answered: {lost}"
    );
    // ... until a reload, which marks every forward's port before the new programs run.
    let reload = t.netns(&["datapath", "reload"]);
    expect(
        &format!("TCP wan -> [uplink]:8090 after the reload ({reload})"),
        || ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8090),
        &format!("c peer={WAN_IP6}"),
    );
}

#[test]
fn spec_without_host_ip_forwards_both_families() {
    let t = topology();
    let c = Container::start(&t);
    let _srv = who(c.cmd("python3"), 82, "c", "46");
    t.netns(&["port", "add", &c.id, "8082:82", "8082:82/udp"]);
    let want4 = format!("c peer={WAN_IP}");
    let want6 = format!("c peer={WAN_IP6}");
    for proto in ["tcp", "udp"] {
        expect(
            &format!("{proto} wan -> {UPLINK_IP}:8082"),
            || ask(t.wan.cmd("python3"), proto, UPLINK_IP, 8082),
            &want4,
        );
        expect(
            &format!("{proto} wan -> [{UPLINK_IP6}]:8082"),
            || ask(t.wan.cmd("python3"), proto, UPLINK_IP6, 8082),
            &want6,
        );
    }
}

#[test]
fn hairpin_v6() {
    let t = topology();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _srv = who(a.cmd("python3"), 80, "a", "6");
    t.netns(&["port", "add", &a.id, "[::]:8080:80", "[::]:8080:80/udp"]);
    let before = t.stats();
    // As for IPv4, hairpin traffic reaches the target from the gateway's address.
    let want = format!("a peer={GATEWAY6}");
    for (who_, client) in [("B", &b), ("A itself", &a)] {
        for proto in ["tcp", "udp"] {
            expect(
                &format!("{proto} {who_} -> [{UPLINK_IP6}]:8080"),
                || ask(client.cmd("python3"), proto, UPLINK_IP6, 8080),
                &want,
            );
        }
    }
    let after = t.stats();
    assert!(grew(&before, &after, "hairpin6_packets") >= 8, "{after}");
}

#[test]
fn loopback_and_uplink_from_host_processes() {
    let t = topology();
    let c = Container::start(&t);
    let _lo = who(c.cmd("python3"), 83, "c83", "6");
    let _up = who(c.cmd("python3"), 84, "c84", "6");
    t.netns(&[
        "port",
        "add",
        &c.id,
        "[::1]:8083:83",
        "[::1]:8083:83/udp",
        "8084:84",
        "8084:84/udp",
    ]);
    for proto in ["tcp", "udp"] {
        expect_answer(
            &format!("{proto} host process -> [::1]:8083"),
            || host_ask(&t, proto, "::1", 8083),
            "c83 peer=",
            true,
        );
        expect_answer(
            &format!("{proto} host process -> [{UPLINK_IP6}]:8084"),
            || host_ask(&t, proto, UPLINK_IP6, 8084),
            "c84 peer=",
            true,
        );
    }
    // Loopback-only: the wan does not get it through the uplink's address.
    let o = ask(t.wan.cmd("python3"), "tcp", UPLINK_IP6, 8083);
    assert!(
        !o.contains("peer="),
        "a [::1] forward answered the wan: {o}"
    );
}

// 4. Do no harm.

/// Sent from container A on eth0 (AF_PACKET): UDP to the wan's sink with forged
/// sources, forged neighbour adverts (B's and the gateway's address with A's MAC, A's
/// own address with B's MAC, all "override"), then the marker: UDP from A's own
/// address, same builder.
const FORGE: &str = r#"
a_mac, br_mac, a6, b6, b_mac, gw6, wan6, uplink6 = sys.argv[1:9]
def udp6(src, dst, sport, dport, data):
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    c = csum(s6 + d6 + struct.pack("!IxxxB", len(u), 17) + u) or 0xffff
    return u[:6] + struct.pack("!H", c) + u[8:]
def udp_frame(src, data):
    return eth(br_mac, a_mac, 0x86dd, ip6(src, wan6, 17, udp6(src, wan6, 40000, 7400, data), hlim=64))
def na(target, lladdr):
    body = (struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target)
            + struct.pack("!BB", 2, 1) + mac(lladdr))
    return eth("33:33:00:00:00:01", a_mac, 0x86dd, ip6(a6, "ff02::1", 58, icmp6(a6, "ff02::1", body)))
frames = []
for src in ("fd00:19::99", b6, uplink6):
    frames += [udp_frame(src, b"spoofed-src")] * 2
frames += [na(b6, a_mac), na(gw6, a_mac), na(a6, b_mac)]
# A's own link-local address passes its port (NDP needs it) but is never forwarded.
m = mac(a_mac)
ll = "fe80::%02x%02x:%02xff:fe%02x:%02x%02x" % (m[0] ^ 2, m[1], m[2], m[3], m[4], m[5])
frames += [udp_frame(ll, b"link-local-src")] * 2
frames.append(udp_frame(a6, b"own-marker"))
send_l2("eth0", *frames)
"#;

/// The lladdr `ip -6 neigh show ADDR dev DEV` (run by `ip_cmd`) has for `addr`, if any.
fn neigh(mut ip_cmd: Command, addr: &str, dev: &str) -> String {
    run(ip_cmd.args(["-6", "neigh", "show", addr, "dev", dev]))
}

#[test]
fn spoofed_source_and_forged_na_are_dropped_and_counted() {
    let t = topology();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let (a6, b6) = (ip6(&a).to_string(), ip6(&b).to_string());
    let (a_mac, b_mac) = (a.mac(), b.mac());
    let br_mac = mac_of(t.host.cmd("ip"), BRIDGE);
    let sink = Lines::python(
        t.wan.cmd("python3"),
        r#"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", 7400))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535); print(a[0], d.decode(errors="replace"), flush=True)
"#,
        &[],
    );
    assert!(
        sink.wait_line(SHORT, |l| l == "ready").is_some(),
        "{}",
        sink.stderr()
    );
    // Controls: the host has B's MAC for B's address, B the bridge's for the gateway.
    let p = ping6(t.host.cmd("ping"), &b6);
    assert!(p.status.success(), "host -> B: {}", both(&p));
    let p = ping6(b.cmd("ping"), GATEWAY6);
    assert!(p.status.success(), "B -> gateway: {}", both(&p));
    let n = neigh(t.host.cmd("ip"), &b6, BRIDGE);
    assert!(n.contains(&b_mac), "control: host's entry for B: {n}");
    let n = neigh(b.cmd("ip"), GATEWAY6, "eth0");
    assert!(
        n.contains(&br_mac),
        "control: B's entry for the gateway: {n}"
    );
    let before = t.stats();
    let o = python(
        a.cmd("python3"),
        FORGE,
        &[
            &a_mac, &br_mac, &a6, &b6, &b_mac, GATEWAY6, WAN_IP6, UPLINK_IP6,
        ],
    );
    assert!(o.status.success(), "{}", both(&o));
    let marker = format!("{UPLINK_IP6} own-marker");
    assert!(
        sink.wait_line(SHORT, |l| l == marker).is_some(),
        "control: A's crafted datagram from its own address is masqueraded to the wan: {:?}",
        sink.lines()
    );
    let spoofed: Vec<String> = sink
        .lines()
        .into_iter()
        .filter(|l| l.contains("spoofed-src") || l.contains("link-local-src"))
        .collect();
    assert!(
        spoofed.is_empty(),
        "datagrams with forged or link-local sources left the host: {spoofed:?}"
    );
    // The host's and B's neighbour tables kept the right MACs.
    let n = neigh(t.host.cmd("ip"), &b6, BRIDGE);
    assert!(
        !n.contains(&a_mac),
        "the host took A's MAC for B's address: {n}"
    );
    let n = neigh(t.host.cmd("ip"), &a6, BRIDGE);
    assert!(
        !n.contains(&b_mac),
        "the host took B's MAC for A's address: {n}"
    );
    let n = neigh(b.cmd("ip"), GATEWAY6, "eth0");
    assert!(!n.contains(&a_mac), "B took A's MAC for the gateway: {n}");
    let p = ping6(t.host.cmd("ping"), &b6);
    assert!(
        p.status.success(),
        "host -> B after the forgeries: {}",
        both(&p)
    );
    let p = ping6(b.cmd("ping"), GATEWAY6);
    assert!(
        p.status.success(),
        "B -> gateway after the forgeries: {}",
        both(&p)
    );
    let after = t.stats();
    assert!(
        grew(&before, &after, "drop_spoofed_ip") >= 6,
        "three forged sources, twice each: {after}"
    );
    assert!(
        grew(&before, &after, "drop_spoofed_nd") >= 3,
        "three forged neighbour adverts: {after}"
    );
}

#[test]
fn host_ipv6_unaffected() {
    let t = topology();
    let c = Container::start(&t);
    let c6 = ip6(&c).to_string();
    // The host's own IPv6, with the datapath loaded: both ways.
    let p = ping6(t.wan.cmd("ping"), UPLINK_IP6);
    assert!(p.status.success(), "wan -> host: {}", both(&p));
    let p = ping6(t.host.cmd("ping"), WAN_IP6);
    assert!(p.status.success(), "host -> wan: {}", both(&p));
    // A host listener (not in the cgroup, no mapping).
    let _host_srv = who(t.host.cmd("python3"), 9000, "host", "6");
    let want = format!("host peer={WAN_IP6}");
    for proto in ["tcp", "udp"] {
        expect(
            &format!("{proto} wan -> host listener [{UPLINK_IP6}]:9000"),
            || ask(t.wan.cmd("python3"), proto, UPLINK_IP6, 9000),
            &want,
        );
    }
    // Unsolicited inbound to the container's address.
    let srv = who(c.cmd("python3"), 9001, "c", "6");
    t.netns(&["port", "add", &c.id, "[::]:9100:9001/udp"]);
    t.wan.ip(&[
        "-6",
        "route",
        "add",
        &format!("{NETWORK6}/64"),
        "via",
        UPLINK_IP6,
    ]);
    let before = t.stats();
    let o = python(
        t.wan.cmd("python3"),
        r#"
c6, uplink6 = sys.argv[1:3]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(3):
    s.sendto(b"direct-udp", (c6, 9001))
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); t.settimeout(1.5)
try:
    t.connect((c6, 9001)); print("tcp connected")
except OSError as e:
    print("tcp", type(e).__name__)
s.sendto(b"container-marker", (uplink6, 9100))
"#,
        &[&c6, UPLINK_IP6],
    );
    assert!(o.status.success(), "{}", both(&o));
    let marker = format!("udp {WAN_IP6} container-marker");
    assert!(
        srv.wait_line(SHORT, |l| l == marker).is_some(),
        "control: the port-forwarded marker reaches the container: {:?} {}",
        srv.lines(),
        srv.stderr()
    );
    let inbound: Vec<String> = srv
        .lines()
        .into_iter()
        .filter(|l| l.contains("direct-udp") || l.starts_with("tcp "))
        .collect();
    assert!(
        inbound.is_empty(),
        "unsolicited traffic from the wan reached the container: {inbound:?}"
    );
    assert!(
        out(&o).starts_with("tcp ") && !out(&o).contains("connected"),
        "{}",
        both(&o)
    );
    let after = t.stats();
    assert!(grew(&before, &after, "drop_inbound") >= 4, "{after}");
}

// 6. The CNI plugin with `"ip6"` in its configuration.

#[test]
fn a_cni_attachment_gets_both_addresses_routes_and_nat66() {
    let t = topology();
    let cni = netns_tests::cni::Cni::new(&t);
    for v in ["0.4.0", "1.0.0"] {
        let p = netns_tests::cni::pod();
        let id = netns_tests::util::unique("ctr");
        let mut conf = cni.conf(v);
        conf["ip6"] = PREFIX6.into();
        let r = cni.call("ADD", &id, Some(&p), "eth0", &conf).ok();
        let ips = r["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "{v}: both families in the result: {r}");
        let a4 = ips[0]["address"].as_str().expect("IPv4 address");
        let a6 = ips[1]["address"].as_str().expect("IPv6 address");
        let ip4 = a4.split('/').next().unwrap();
        let want6 = format!("{}/64", expected_ip6(ip4));
        assert_eq!(a6, want6, "{v}: {r}");
        assert_eq!(ips[1]["gateway"], GATEWAY6, "{v}: {r}");
        assert_eq!(
            ips[1].get("version").and_then(|x| x.as_str()),
            v.starts_with("0.").then_some("6"),
            "{v}: {r}"
        );
        let routes = r["routes"].as_array().expect("routes");
        assert!(
            routes
                .iter()
                .any(|x| x["dst"] == "::/0" && x["gw"] == GATEWAY6),
            "{v}: {r}"
        );
        let shown = p.ip(&["-6", "addr", "show", "dev", "eth0"]);
        assert!(shown.contains(&want6), "{v}: {shown}");
        assert!(
            p.ip(&["-6", "route"])
                .contains(&format!("default via {GATEWAY6}"))
        );
        let ping = ping6(p.cmd("ping"), WAN_IP6);
        assert!(
            ping.status.success(),
            "{v}: pod -> wan over NAT66: {}",
            both(&ping)
        );
        let mut c = conf.clone();
        c["prevResult"] = r.clone();
        cni.call("CHECK", &id, Some(&p), "eth0", &c).ok();
        cni.call("DEL", &id, Some(&p), "eth0", &conf).ok();
        assert_eq!(
            t.map_entries(netns_common::maps::ENDPOINTS6),
            0,
            "{v}: IPv6 endpoint left after DEL"
        );
    }
}

// 7. Nothing a container sends configures the host, and the host's own fragments pass.

#[test]
fn a_router_advert_or_redirect_from_a_container_is_dropped_with_ipv6_on() {
    let t = topology();
    let c = Container::start(&t);
    let before = t.stats();
    let o = python(
        c.cmd("python3"),
        r#"
cmac, src = sys.argv[1], sys.argv[2]
ll = "fe80::bad:1"
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
ra += struct.pack("!BB", 1, 1) + mac(cmac)
ra += struct.pack("!BBBBIII", 3, 4, 64, 0xc0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, "2001:db8:5::")
# From its own address (not a spoofed one): dropped for what it is.
for s in (ll, src):
    send_l2("eth0", eth("33:33:00:00:00:01", cmac, 0x86dd, ip6(s, "ff02::1", 58, icmp6(s, "ff02::1", ra))))
# A redirect to the gateway: "reach 2001:db8:100::1 via me".
rd = struct.pack("!BBHI", 137, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "2001:db8:100::1")
send_l2("eth0", eth("33:33:00:00:00:01", cmac, 0x86dd, ip6(src, "fd00:19::1", 58, icmp6(src, "fd00:19::1", rd))))
"#,
        &[&c.mac(), &ip6(&c).to_string()],
    );
    assert!(o.status.success(), "{}", both(&o));
    let p = ping6(c.cmd("ping"), GATEWAY6);
    assert!(
        p.status.success(),
        "the container still reaches the gateway: {}",
        both(&p)
    );
    let addrs = t.host.ip(&["-6", "addr", "show", "dev", BRIDGE]);
    assert!(
        !addrs.contains("2001:db8:5:"),
        "the host took an address from the RA: {addrs}"
    );
    let routes = t.host.ip(&["-6", "route", "show"]);
    assert!(
        !routes.contains("2001:db8:5:"),
        "the host took a route from the RA: {routes}"
    );
    let r = t.host.ip(&["-6", "route", "get", WAN_IP6]);
    assert!(
        r.contains(&format!("dev {}", netns_tests::topo::UPLINK)),
        "redirect followed: {r}"
    );
    let after = t.stats();
    // The RA and the redirect from its own address for what they are; the RA from a
    // link-local address that is not its own already for its source.
    assert!(grew(&before, &after, "drop_icmp_type") >= 2, "{after}");
    assert!(grew(&before, &after, "drop_spoofed_ip") >= 1, "{after}");
}

#[test]
fn the_hosts_own_fragmented_ipv6_datagrams_arrive_intact() {
    let t = topology();
    let _c = Container::start(&t);
    // A host listener (not a mapped port), answering with the length it got.
    let ready = t.path("frag-ready");
    let srv = ChildGuard::spawn(
        t.host
            .cmd("python3")
            .arg("-c")
            .arg(
                r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 9300)); open(sys.argv[1], "w").close()
s.settimeout(20)
for _ in range(3):
    d, a = s.recvfrom(65535)
    s.sendto(b"x" * len(d), a)
"#,
            )
            .arg(&ready),
    );
    assert!(
        wait_for(SHORT, || ready.exists().then_some(())).is_some(),
        "host listener did not start"
    );
    let o = python(
        t.wan.cmd("python3"),
        r#"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3)
ok = 0
for n in (4000, 6000, 9000):
    s.sendto(b"y" * n, (sys.argv[1], 9300))
    d, _ = s.recvfrom(65535)
    ok += len(d) == n
print("ok", ok)
"#,
        &[UPLINK_IP6],
    );
    assert_eq!(
        out(&o),
        "ok 3",
        "fragmented datagrams to and from the host: {}",
        both(&o)
    );
    drop(srv);
}

/// UDP over IPv6 on argv[1]: answers each datagram with the hop limit it arrived
/// with and the peer address (`hl=H peer=A`).
const HOP_WHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
s.bind(("::", int(sys.argv[1])))
while True:
    d, anc, fl, a = s.recvmsg(2048, socket.CMSG_SPACE(4))
    hl = [int.from_bytes(c[2][:4], "little") for c in anc if c[1] == socket.IPV6_HOPLIMIT]
    s.sendto(("hl=%d peer=%s" % (hl[0] if hl else -1, a[0])).encode(), a)
"#;

/// Sends argv[3] datagrams (hop limit 64) to [argv[1]]:argv[2] one by one, each
/// answered; prints the last answer and the hop limit that answer arrived with.
const HOP_ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 64)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
got = 0
for i in range(int(sys.argv[3])):
    s.send(b"hi")
    try:
        d, anc, fl, a = s.recvmsg(2048, socket.CMSG_SPACE(4))
    except socket.timeout:
        continue
    got += 1
    hl = [int.from_bytes(c[2][:4], "little") for c in anc if c[1] == socket.IPV6_HOPLIMIT]
    last = "%s back_hl=%d" % (d.decode(), hl[0] if hl else -1)
print("%d %s" % (got, last))
"#;

/// `Ip6OutForwDatagrams` of the host namespace: what its stack forwarded.
fn forwarded6(t: &Topology) -> u64 {
    let snmp = run(t.host.cmd("cat").arg("/proc/net/snmp6"));
    snmp.lines()
        .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Ip6OutForwDatagrams: {snmp}"))
}

/// Issue 12 for IPv6: with the fast path on (the default), NAT66 traffic bypasses the
/// host stack both ways (`fast_out` at the bridge port, `fast_in` from the uplink; the
/// host forwards next to nothing), and the hop limit drops by one each way, as a
/// router's would. A hop limit of 1 still gets "time exceeded" from the gateway (the
/// stack's answer). With `--fast-path off` the same traffic is forwarded by the stack.
#[test]
fn nat66_takes_the_fast_path_and_hop_limits_drop_by_one() {
    const N: u64 = 200;
    for mode in ["on", "off"] {
        let t = Topology::with_flags(&["--ip6", PREFIX6, "--fast-path", mode]);
        t.enable_ipv6();
        let c = Container::start(&t);
        let _srv = ChildGuard::spawn(t.wan.cmd("python3").args(["-c", HOP_WHO, "7500"]));
        t.wan.wait_listen("udp", 7500);
        let (s0, f0) = (t.stats(), forwarded6(&t));
        let o = out(&output(c.cmd("python3").args([
            "-c",
            HOP_ASK,
            WAN_IP6,
            "7500",
            &N.to_string(),
        ])));
        let (s1, fwd) = (t.stats(), forwarded6(&t) - f0);
        let (got, last) = o.split_once(' ').unwrap_or_else(|| panic!("{mode}: {o:?}"));
        let got: u64 = got.parse().unwrap_or_else(|_| panic!("{mode}: {o:?}"));
        assert!(got >= N - 5, "{mode}: answers {got} of {N}: {o}");
        assert_eq!(
            last,
            format!("hl=63 peer={UPLINK_IP6} back_hl=63"),
            "{mode}: masqueraded, one hop each way"
        );
        let (fin, fout) = (grew(&s0, &s1, "fast_in"), grew(&s0, &s1, "fast_out"));
        let report = format!("{mode}: fast_in +{fin}, fast_out +{fout}, forwarded {fwd}");
        if mode == "on" {
            assert!(fin >= got && fout >= got, "both ways fast: {report}");
            assert!(fwd <= 8, "the stack forwarded next to nothing: {report}");
        } else {
            assert!(fin == 0 && fout == 0, "no fast path: {report}");
            assert!(fwd >= 2 * got, "the stack forwarded both ways: {report}");
        }
        let p = output(
            c.cmd("ping")
                .args(["-6", "-c", "1", "-t", "1", "-W", "2", WAN_IP6]),
        );
        let text = both(&p);
        assert!(
            text.contains(&format!("From {GATEWAY6}")) && text.contains("Time exceeded"),
            "{mode}: hop limit 1 gets time exceeded from the gateway: {text}"
        );
    }
}
