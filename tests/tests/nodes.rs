//! Two nodes, Kubernetes host-gw style: each node runs netns for its own pod subnet,
//! routes the other node's pod subnet via that node's LAN address, and lists the whole
//! pod range in `--no-masquerade` and `--allow-inbound`. Pods talk to each other by
//! their own addresses; everything else is masqueraded; the LAN cannot reach pods.
//!
//! ```text
//!  pods A 172.19.1.0/24 -- [node A: up0 198.51.100.10] --\
//!                                                         [lan: br0 198.51.100.1/24, wan0 203.0.113.254/24] -- [wan 203.0.113.1]
//!  pods B 172.19.2.0/24 -- [node B: up0 198.51.100.11] --/      |
//!                                              [lan host 198.51.100.50, 172.19.0.0/16 via node A]
//! ```
//! The lan namespace routes between the LAN and the wan but knows no pod route, so a
//! pod reaches the wan only masqueraded.

use std::process::Output;

use netns_tests::ns::{NamedNetns, plain};
use netns_tests::topo::{Config, UPLINK};
use netns_tests::util::{ChildGuard, UDP_WHO, tcp_ask, tcp_who_server, udp_ask};
use netns_tests::{Container, Topology, unique};

const LAN_GW: &str = "198.51.100.1";
const NODE_A: &str = "198.51.100.10";
const NODE_B: &str = "198.51.100.11";
const LAN_HOST: &str = "198.51.100.50";
const WAN_GW: &str = "203.0.113.254";
const WAN: &str = "203.0.113.1";
const PODS: &str = "172.19.0.0/16";

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn counter(t: &Topology, name: &str) -> u64 {
    t.stat(name)
}

/// The namespaces of the scenario. Field order is drop order: the nodes (their
/// containers, poststop hooks and node namespaces) go before the LAN they sit on.
struct Nodes {
    a: Topology,
    b: Topology,
    lan_host: NamedNetns,
    wan: NamedNetns,
    /// Owned here, deleted last; the nodes hold shared handles to it.
    _lan: NamedNetns,
}

/// A veth from `ns` (named `inner`, address `addr`/24) to the lan namespace (named
/// `outer`, enslaved to br0 when `bridged`).
fn wire(lan: &NamedNetns, ns: &NamedNetns, inner: &str, outer: &str, addr: &str, bridged: bool) {
    ns.ip(&[
        "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", &lan.name,
    ]);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", inner]);
    ns.ip(&["link", "set", inner, "up"]);
    if bridged {
        lan.ip(&["link", "set", outer, "master", "br0"]);
    }
    lan.ip(&["link", "set", outer, "up"]);
}

/// A node on the LAN: its own namespace with `up0` at `lan_ip`, netns for pods in
/// `pod_gw`/24 with private state, bpffs and no cgroup, and a route to the other
/// node's pods.
fn node(lan: &NamedNetns, outer: &str, lan_ip: &str, pod_gw: &str, peer: (&str, &str)) -> Topology {
    let ip = format!("--ip={pod_gw}/24");
    let cfg = Config::test(&[
        &ip,
        "--cgroup=none",
        "--no-masquerade=172.19.0.0/16",
        "--allow-inbound=172.19.0.0/16",
    ])
    .expect("node config");
    let host = NamedNetns::new(&format!("{}h", cfg.tag));
    wire(lan, &host, UPLINK, outer, lan_ip, true);
    host.ip(&["route", "add", "default", "via", LAN_GW]);
    let (peer_pods, peer_ip) = peer;
    host.ip(&["route", "add", peer_pods, "via", peer_ip]);
    Topology::build_on(cfg, host, lan.shared()).unwrap_or_else(|e| panic!("node: {e:#}"))
}

impl Nodes {
    fn new() -> Nodes {
        let tag = unique("nn");
        let lan = NamedNetns::create(&format!("{tag}l"), plain).expect("lan namespace");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["addr", "add", &format!("{LAN_GW}/24"), "dev", "br0"]);
        lan.ip(&["link", "set", "br0", "up"]);
        lan.sysctl("net.ipv4.ip_forward=1").expect("lan forwarding");
        let wan = NamedNetns::new(&format!("{tag}w"));
        wire(&lan, &wan, "eth0", "wan0", WAN, false);
        lan.ip(&["addr", "add", &format!("{WAN_GW}/24"), "dev", "wan0"]);
        wan.ip(&["route", "add", "default", "via", WAN_GW]);
        let lan_host = NamedNetns::new(&format!("{tag}x"));
        wire(&lan, &lan_host, "eth0", "lx", LAN_HOST, true);
        // A LAN host that tries to reach the pods directly, through node A.
        lan_host.ip(&["route", "add", PODS, "via", NODE_A]);
        let a = node(&lan, "na", NODE_A, "172.19.1.1", ("172.19.2.0/24", NODE_B));
        let b = node(&lan, "nb", NODE_B, "172.19.2.1", ("172.19.1.0/24", NODE_A));
        Nodes {
            a,
            b,
            lan_host,
            wan,
            _lan: lan,
        }
    }
}

#[test]
fn host_gw_pods_talk_directly_masquerade_to_the_wan_and_the_lan_stays_out() {
    let n = Nodes::new();
    let pa = Container::start(&n.a);
    let pb = Container::start(&n.b);
    let (ipa, ipb) = (pa.ip(), pb.ip());
    assert!(
        ipa.starts_with("172.19.1.") && ipb.starts_with("172.19.2."),
        "{ipa} {ipb}"
    );
    let _b_tcp = pb.spawn(&tcp_who_server(7301));
    let _b_udp = ChildGuard::spawn(pb.cmd("python3").args(["-c", UDP_WHO, "7302"]));
    let _a_tcp = pa.spawn(&tcp_who_server(7303));
    pb.wait_listen("tcp", 7301);
    pb.wait_listen("udp", 7302);
    pa.wait_listen("tcp", 7303);

    // Pod to pod, both ways, TCP and UDP: the server sees the other pod's own address.
    let routed_before = counter(&n.a, "nomasq_out");
    assert_eq!(out(&pa.sh(&tcp_ask(&ipb, 7301))), format!("peer={ipa}"));
    assert_eq!(out(&pa.sh(&udp_ask(&ipb, 7302))), format!("peer={ipa}"));
    assert_eq!(out(&pb.sh(&tcp_ask(&ipa, 7303))), format!("peer={ipb}"));
    assert!(counter(&n.a, "nomasq_out") > routed_before);
    for (t, peer) in [(&n.a, &ipb), (&n.b, &ipa)] {
        let fl: Vec<serde_json::Value> =
            serde_json::from_str(&t.netns(&["conntrack", "ls", "--json"])).expect("conntrack");
        assert!(
            !fl.iter().any(|f| f.to_string().contains(peer.as_str())),
            "pod-to-pod traffic is not tracked: {fl:?}"
        );
    }

    // To the wan: masqueraded to each node's LAN address.
    let _w_tcp = ChildGuard::spawn(
        n.wan
            .cmd("sh")
            .arg("-c")
            .arg(format!("exec {}", tcp_who_server(7304))),
    );
    n.wan.wait_listen("tcp", 7304);
    assert_eq!(out(&pa.sh(&tcp_ask(WAN, 7304))), format!("peer={NODE_A}"));
    assert_eq!(out(&pb.sh(&tcp_ask(WAN, 7304))), format!("peer={NODE_B}"));

    // A port forward on node B, from the wan: pod B sees the wan host itself.
    let _b_fwd = pb.spawn(&tcp_who_server(80));
    pb.wait_listen("tcp", 80);
    n.b.netns(&["port", "add", &pb.id, "8080:80/tcp"]);
    let o = n
        .wan
        .cmd("sh")
        .arg("-c")
        .arg(tcp_ask(NODE_B, 8080))
        .output()
        .expect("wan");
    assert_eq!(out(&o), format!("peer={WAN}"));

    // The LAN host routes the pod range via node A: neither pod is reachable.
    let (drop_a, drop_b) = (counter(&n.a, "drop_inbound"), counter(&n.b, "drop_inbound"));
    for (ip, port) in [(&ipa, 7303), (&ipb, 7301)] {
        let o = n
            .lan_host
            .cmd("sh")
            .arg("-c")
            .arg(format!(
                "timeout 5 socat -u TCP:{ip}:{port},connect-timeout=2 STDOUT"
            ))
            .output()
            .expect("lan host");
        assert_eq!(out(&o), "", "the LAN host reached pod {ip}");
    }
    let o = n
        .lan_host
        .cmd("sh")
        .arg("-c")
        .arg(udp_ask(&ipb, 7302))
        .output()
        .expect("lan host");
    assert_eq!(out(&o), "", "the LAN host reached pod B over UDP");
    assert!(
        counter(&n.a, "drop_inbound") > drop_a,
        "node A drops what is for its pods"
    );
    assert!(
        counter(&n.b, "drop_inbound") > drop_b,
        "node B drops what node A forwarded"
    );
}
