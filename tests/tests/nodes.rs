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
//! pod reaches the wan only masqueraded. The same checks run with runc containers
//! (the OCI hook) and with `ip netns add` pods set up by the CNI plugin (ADD).

use std::process::{Command, Output};

use netns_tests::cni::{Cni, pod, with_ports};
use netns_tests::ns::{NamedNetns, plain};
use netns_tests::topo::{Config, UPLINK};
use netns_tests::util::out;
use netns_tests::util::{ChildGuard, UDP_WHO, output, tcp_ask, tcp_who_server, udp_ask};
use netns_tests::{Container, Topology, unique};

const LAN_GW: &str = "198.51.100.1";
const NODE_A: &str = "198.51.100.10";
const NODE_B: &str = "198.51.100.11";
const LAN_HOST: &str = "198.51.100.50";
const WAN_GW: &str = "203.0.113.254";
const WAN: &str = "203.0.113.1";
const PODS: &str = "172.19.0.0/16";

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

/// What the checks need of a pod, whichever way it was made.
trait Pod {
    fn addr(&self) -> String;
    /// A host tool in the pod's network namespace.
    fn tool(&self, program: &str) -> Command;
    fn wait_port(&self, proto: &str, port: u16);
    /// `sh -c script` in the pod's network namespace.
    fn run(&self, script: &str) -> Output {
        output(self.tool("sh").arg("-c").arg(script))
    }
    /// A background server (`script` exec'ed) in the pod, killed on drop.
    fn serve(&self, script: &str) -> ChildGuard {
        ChildGuard::spawn(
            self.tool("sh")
                .arg("-c")
                .arg(format!("exec {script}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    }
}

impl Pod for Container<'_> {
    fn addr(&self) -> String {
        self.ip()
    }
    fn tool(&self, program: &str) -> Command {
        self.cmd(program)
    }
    fn wait_port(&self, proto: &str, port: u16) {
        self.wait_listen(proto, port);
    }
}

/// A CNI pod: its namespace and the address ADD gave it.
struct CniPod {
    ns: NamedNetns,
    addr: String,
}

impl Pod for CniPod {
    fn addr(&self) -> String {
        self.addr.clone()
    }
    fn tool(&self, program: &str) -> Command {
        self.ns.cmd(program)
    }
    fn wait_port(&self, proto: &str, port: u16) {
        self.ns.wait_listen(proto, port);
    }
}

/// Pod to pod unmasqueraded and untracked, the wan masqueraded, a forward on node B
/// (`forward_b` installs 8080 -> pod B:80 unless the pod was made with it) reached from
/// the wan, the LAN host kept out.
fn check(n: &Nodes, pa: &dyn Pod, pb: &dyn Pod, forward_b: impl FnOnce()) {
    let (ipa, ipb) = (pa.addr(), pb.addr());
    assert!(
        ipa.starts_with("172.19.1.") && ipb.starts_with("172.19.2."),
        "{ipa} {ipb}"
    );
    let _b_tcp = pb.serve(&tcp_who_server(7301));
    let _b_udp = ChildGuard::spawn(pb.tool("python3").args(["-c", UDP_WHO, "7302"]));
    let _a_tcp = pa.serve(&tcp_who_server(7303));
    pb.wait_port("tcp", 7301);
    pb.wait_port("udp", 7302);
    pa.wait_port("tcp", 7303);

    // Pod to pod, both ways, TCP and UDP: the server sees the other pod's own address.
    let routed_before = counter(&n.a, "nomasq_out");
    assert_eq!(out(&pa.run(&tcp_ask(&ipb, 7301))), format!("peer={ipa}"));
    assert_eq!(out(&pa.run(&udp_ask(&ipb, 7302))), format!("peer={ipa}"));
    assert_eq!(out(&pb.run(&tcp_ask(&ipa, 7303))), format!("peer={ipb}"));
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
    assert_eq!(out(&pa.run(&tcp_ask(WAN, 7304))), format!("peer={NODE_A}"));
    assert_eq!(out(&pb.run(&tcp_ask(WAN, 7304))), format!("peer={NODE_B}"));

    // A port forward on node B, from the wan: pod B sees the wan host itself.
    let _b_fwd = pb.serve(&tcp_who_server(80));
    pb.wait_port("tcp", 80);
    forward_b();
    let o = output(n.wan.cmd("sh").arg("-c").arg(tcp_ask(NODE_B, 8080)));
    assert_eq!(out(&o), format!("peer={WAN}"));

    // The LAN host routes the pod range via node A: neither pod is reachable.
    let (drop_a, drop_b) = (counter(&n.a, "drop_inbound"), counter(&n.b, "drop_inbound"));
    for (ip, port) in [(&ipa, 7303), (&ipb, 7301)] {
        let o = output(n.lan_host.cmd("sh").arg("-c").arg(format!(
            "timeout 5 socat -u TCP:{ip}:{port},connect-timeout=2 STDOUT"
        )));
        assert_eq!(out(&o), "", "the LAN host reached pod {ip}");
    }
    let o = output(n.lan_host.cmd("sh").arg("-c").arg(udp_ask(&ipb, 7302)));
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

#[test]
fn host_gw_with_runc_containers() {
    let n = Nodes::new();
    let pa = Container::start(&n.a);
    let pb = Container::start(&n.b);
    check(&n, &pa, &pb, || {
        n.b.netns(&["port", "add", &pb.id, "8080:80/tcp"]);
    });
}

/// The node's CNI configuration: what its hook flags say, as config keys.
fn cni_conf(cni: &Cni<'_>, pod_gw: &str) -> serde_json::Value {
    let mut c = cni.conf("1.1.0");
    c["ip"] = format!("{pod_gw}/24").into();
    c["cgroup"] = "none".into();
    c["noMasquerade"] = serde_json::json!([PODS]);
    c["allowInbound"] = serde_json::json!([PODS]);
    c
}

fn cni_add(cni: &Cni<'_>, conf: &serde_json::Value) -> (String, CniPod) {
    let ns = pod();
    let id = unique("cid");
    let r = cni.add(&id, &ns, conf);
    let addr = r["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in the ADD result: {r}"))
        .to_owned();
    (id, CniPod { ns, addr })
}

#[test]
fn host_gw_with_cni_pods() {
    let n = Nodes::new();
    let (cni_a, cni_b) = (Cni::new(&n.a), Cni::new(&n.b));
    let conf_a = cni_conf(&cni_a, "172.19.1.1");
    let conf_b = with_ports(&cni_conf(&cni_b, "172.19.2.1"), &[(8080, 80, "tcp")]);
    let (id_a, pa) = cni_add(&cni_a, &conf_a);
    let (id_b, pb) = cni_add(&cni_b, &conf_b);
    // The mapping came with ADD (runtimeConfig.portMappings).
    check(&n, &pa, &pb, || {});
    cni_b.del(&id_b, Some(&pb.ns), &conf_b);
    cni_a.del(&id_a, Some(&pa.ns), &conf_a);
}
