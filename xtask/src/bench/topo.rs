//! The five private topologies (and one more host namespace for the CNI plugin):
//!
//! ```text
//!  [ctr a 172.19.0.2]--veth--+
//!                            br0 172.19.0.1/16 [host] up0 198.51.100.2/24 ==veth== wan0 198.51.100.1/24 [wan]
//!  [ctr b 172.19.0.3]--veth--+
//! ```
//! The host, wan and uplink are the test harness's (`netns_tests::topo::host_and_wan`);
//! on top of them:
//! no NAT: routed, wan has a route to 172.19.0.0/16 via 198.51.100.2 (the ceiling);
//! iptables: MASQUERADE + DNAT rules in the host namespace;
//! eBPF: the integration tests' own `Topology` (state dir, pins, cgroup, the netns
//! flags), the network made by the real `netns` hook for two `unshare -n sleep`
//! "containers" (`--fast-path off`); eBPF fast: the same with `--fast-path on`;
//! floor: no host in the path, container a's veth peer is in wan:
//!
//! ```text
//!  [ctr a 172.19.0.2 eth0]==veth==fl0 172.19.0.1/16 [wan] (also wan0 198.51.100.1/24)
//! ```
//! All but the floor are dual stack: uplink 2001:db8:100::2/64, wan 2001:db8:100::1/64,
//! bridge fd00:19::1/64, containers fd00:19::2 and ::3 (no NAT: wan routes
//! fd00:19::/64 via the uplink; iptables: ip6tables MASQUERADE; eBPF: `--ip6`, NAT66).
//! Everything is named `nb<pid>…` and removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use netns_tests::NamedNetns;
use netns_tests::topo::{self as harness, Topology};

use super::sys::{self, Bg, in_ns, run, run_raw, run_to};

pub use netns_tests::topo::{UPLINK_IP, UPLINK_IP6, WAN_IP, WAN_IP6};
pub const GW: &str = netns_tests::topo::GATEWAY;
pub const SUBNET: &str = "172.19.0.0/16";
pub const BRIDGE: &str = "br0";
pub const GW6: &str = "fd00:19::1";
pub const SUBNET6: &str = "fd00:19::/64";
/// Host port forwarded (TCP) to container a's CTR_TCP, and (UDP) FWD_UDP to CTR_UDP.
pub const FWD_TCP: u16 = 8080;
pub const CTR_TCP: u16 = 5001;
pub const FWD_UDP: u16 = 8081;
pub const CTR_UDP: u16 = 5002;
/// Host port forwarded (TCP) to container a's CTR_TCP_PP: the TCP request/response
/// server (the connection-rate server has CTR_TCP).
pub const FWD_TCP_PP: u16 = 8082;
pub const CTR_TCP_PP: u16 = 5003;
/// Host port forwarded over IPv6 only (TCP, `[::]:8083` -> container a's CTR_TCP6:
/// the IPv6 connection-rate server), made when workload 8 first runs.
pub const FWD_TCP6: u16 = 8083;
pub const CTR_TCP6: u16 = 5004;
/// Port mappings every topology with NAT has (8080/tcp, 8081/udp, 8082/tcp).
pub const BASE_MAPPINGS: usize = 3;
/// Address of the wan side of the floor topology's container veth (the container's
/// gateway there).
pub const FLOOR_WAN_IP: &str = "172.19.0.1";
/// Servers in the wan namespace.
pub const WAN_UDP: u16 = 11111;
pub const WAN_IPERF: u16 = 5201;
/// The wan's iperf3 server on its IPv6 address.
pub const WAN_IPERF6: u16 = 5202;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    NoNat,
    Iptables,
    Ebpf,
    /// eBPF with `--fast-path on` (translated packets bypass the host stack).
    EbpfFast,
    /// The physical floor: container a's veth plugged straight into wan (no host).
    Floor,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::NoNat,
        Kind::Iptables,
        Kind::Ebpf,
        Kind::EbpfFast,
        Kind::Floor,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Kind::NoNat => "no NAT",
            Kind::Iptables => "iptables",
            Kind::Ebpf => "eBPF",
            Kind::EbpfFast => "eBPF fast",
            Kind::Floor => "floor",
        }
    }
    pub fn letter(self) -> char {
        match self {
            Kind::NoNat => 'n',
            Kind::Iptables => 'i',
            Kind::Ebpf => 'e',
            Kind::EbpfFast => 'f',
            Kind::Floor => 'p',
        }
    }
    /// Wan reaches the container's own address (no port forward).
    pub fn direct(self) -> bool {
        matches!(self, Kind::NoNat | Kind::Floor)
    }
}

pub struct Container {
    pub id: String,
    pub ip: String,
    /// Its IPv6 address (None: the floor's container is IPv4 only).
    pub ip6: Option<String>,
    /// /run/netns/NAME or /proc/PID/ns/net.
    pub ns_path: String,
    _ns: Option<NamedNetns>,
    sleeper: Option<Bg>,
}

impl Container {
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.ns_path, program)
    }
}

/// The namespaces of a topology: made by hand (no NAT, iptables), or the harness's
/// `Topology` that `netns` runs in (eBPF).
enum Net {
    Manual { host: NamedNetns, wan: NamedNetns },
    Netns(Box<Topology>),
}

pub struct Topo {
    pub kind: Kind,
    /// Long-lived servers; killed first on drop.
    pub servers: Vec<Bg>,
    pub ctrs: Vec<Container>,
    net: Net,
    pub tmp: PathBuf,
}

pub fn cgroup_dir(tag: &str) -> Option<PathBuf> {
    harness::cgroup2_root()
        .ok()
        .map(|r| r.join(format!("netns-bench-{tag}")))
}

pub fn bpffs_dir(tag: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("netns-bench-{tag}"))
}

/// An `unshare -n sleep` process started in `host`: a container's own network
/// namespace (`/proc/PID/ns/net`), ready once the process has become `sleep`
/// (nsenter and unshare exec in place, so the pid stays the same).
fn spawn_sleeper(host: &NamedNetns, tmp: &Path, id: &str) -> anyhow::Result<Bg> {
    let mut sl = Bg::spawn(
        host.cmd("unshare").args(["-n", "sleep", "3600"]),
        &tmp.join(format!("sleep-{id}.log")),
    )?;
    let start = Instant::now();
    while fs::read_to_string(format!("/proc/{}/comm", sl.pid()))
        .unwrap_or_default()
        .trim()
        != "sleep"
    {
        sl.ensure_alive()?;
        if start.elapsed() > Duration::from_secs(5) {
            bail!("`unshare -n sleep` did not start");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(sl)
}

/// The OCI state JSON the hook reads on stdin.
fn state_json(id: &str, pid: u32, status: &str, bundle: &Path) -> String {
    serde_json::json!({"ociVersion": "1.0.2", "id": id, "status": status, "pid": pid, "bundle": bundle})
        .to_string()
}

impl Topo {
    pub fn host(&self) -> &NamedNetns {
        match &self.net {
            Net::Manual { host, .. } => host,
            Net::Netns(t) => &t.host,
        }
    }

    pub fn wan(&self) -> &NamedNetns {
        match &self.net {
            Net::Manual { wan, .. } => wan,
            Net::Netns(t) => &t.wan,
        }
    }

    /// The harness topology `netns` runs in (eBPF only).
    pub fn netns(&self) -> anyhow::Result<&Topology> {
        match &self.net {
            Net::Netns(t) => Ok(t),
            Net::Manual { .. } => bail!("not the eBPF topology"),
        }
    }

    /// `netns <flags> ARGS` in the host namespace; must succeed within 30 s.
    pub fn netns_run(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.netns()?.netns_cmd(args))
    }

    /// Runs the hook (prestart with "creating", poststop with "stopped"); returns its
    /// wall time.
    pub fn hook(&self, id: &str, pid: u32, status: &str) -> anyhow::Result<Duration> {
        let json = state_json(id, pid, status, &self.tmp);
        let out = run_raw(
            &mut self.netns()?.netns_cmd(&[]),
            Some(json.as_bytes()),
            Duration::from_secs(60),
        )?;
        if !out.ok() {
            bail!(
                "netns hook ({status}) for {id}: {:?}\n{}{}",
                out.status,
                out.stdout,
                out.stderr
            );
        }
        Ok(out.elapsed)
    }

    /// Host + wan + uplink (the harness's), common to the five, with the sysctls the
    /// benchmark needs.
    fn setup(kind: Kind, net: Net, tmp: PathBuf) -> anyhow::Result<Topo> {
        fs::create_dir_all(&tmp)?;
        let t = Topo {
            kind,
            servers: Vec::new(),
            ctrs: Vec::new(),
            net,
            tmp,
        };
        t.host().sysctl("net.ipv4.ip_forward=1")?;
        // IPv6 on the uplink (the eBPF hook reads its NAT66 source at each start).
        t.host().sysctl("net.ipv6.conf.all.forwarding=1")?;
        harness::ipv6_uplink(t.host(), t.wan())?;
        // The connection-rate client opens many short connections from wan.
        t.wan().sysctl("net.ipv4.ip_local_port_range=1024 60999")?;
        t.wan().sysctl("net.ipv4.tcp_tw_reuse=1")?;
        Ok(t)
    }

    fn manual(kind: Kind, tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let prefix = format!("{tag}{}", kind.letter());
        let (host, wan) = harness::host_and_wan(&prefix, sys::spawner)?;
        let mut t = Topo::setup(
            kind,
            Net::Manual { host, wan },
            tmp.join(kind.letter().to_string()),
        )?;
        t.manual_containers(&prefix)?;
        Ok(t)
    }

    /// Bridge and two containers made by hand (no NAT, iptables).
    fn manual_containers(&mut self, prefix: &str) -> anyhow::Result<()> {
        let host = self.host();
        host.try_ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        host.try_ip(&["addr", "add", &format!("{GW}/16"), "dev", BRIDGE])?;
        host.try_ip(&[
            "-6",
            "addr",
            "add",
            &format!("{GW6}/64"),
            "dev",
            BRIDGE,
            "nodad",
        ])?;
        host.try_ip(&["link", "set", BRIDGE, "up"])?;
        let mut ctrs = Vec::new();
        for (i, id) in ["a", "b"].iter().enumerate() {
            let ns = NamedNetns::create(&format!("{prefix}{id}"), sys::spawner)?;
            let ip = format!("172.19.0.{}", i + 2);
            let ip6 = format!("fd00:19::{}", i + 2);
            let hv = format!("veth{id}");
            host.try_ip(&[
                "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            host.try_ip(&["link", "set", &hv, "master", BRIDGE, "up"])?;
            ns.try_ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
            ns.try_ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.try_ip(&["link", "set", "eth0", "up"])?;
            ns.try_ip(&["route", "add", "default", "via", GW])?;
            ns.try_ip(&["-6", "route", "add", "default", "via", GW6])?;
            ctrs.push(Container {
                id: id.to_string(),
                ip,
                ip6: Some(ip6),
                ns_path: ns.path(),
                _ns: Some(ns),
                sleeper: None,
            });
        }
        self.ctrs = ctrs;
        Ok(())
    }

    pub fn no_nat(tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let t = Topo::manual(Kind::NoNat, tag, tmp)?;
        t.wan()
            .try_ip(&["route", "add", SUBNET, "via", UPLINK_IP])?;
        t.wan()
            .try_ip(&["-6", "route", "add", SUBNET6, "via", UPLINK_IP6])?;
        Ok(t)
    }

    /// The floor: host and wan as for the others (the host is left unused), and
    /// container a's veth with its peer in wan (FLOOR_WAN_IP/16 there): the
    /// container reaches wan's address in one veth hop, no bridge, no forwarding.
    pub fn floor(tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let kind = Kind::Floor;
        let prefix = format!("{tag}{}", kind.letter());
        let (host, wan) = harness::host_and_wan(&prefix, sys::spawner)?;
        let mut t = Topo::setup(
            kind,
            Net::Manual { host, wan },
            tmp.join(kind.letter().to_string()),
        )?;
        let ns = NamedNetns::create(&format!("{prefix}a"), sys::spawner)?;
        let ip = "172.19.0.2".to_owned();
        let wan = t.wan();
        wan.try_ip(&[
            "link", "add", "fl0", "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        wan.try_ip(&["addr", "add", &format!("{FLOOR_WAN_IP}/16"), "dev", "fl0"])?;
        wan.try_ip(&["link", "set", "fl0", "up"])?;
        ns.try_ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        ns.try_ip(&["link", "set", "eth0", "up"])?;
        ns.try_ip(&["route", "add", "default", "via", FLOOR_WAN_IP])?;
        t.ctrs.push(Container {
            id: "a".into(),
            ip,
            ip6: None,
            ns_path: ns.path(),
            _ns: Some(ns),
            sleeper: None,
        });
        Ok(t)
    }

    pub fn iptables(tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let t = Topo::manual(Kind::Iptables, tag, tmp)?;
        let ip = t.ctrs[0].ip.clone();
        t.ipt(&[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            SUBNET,
            "!",
            "-o",
            BRIDGE,
            "-j",
            "MASQUERADE",
        ])?;
        for r in Topo::base_dnat_rules(&ip) {
            let args: Vec<&str> = r.split_whitespace().collect();
            t.ipt(&args)?;
        }
        run(t.host().cmd("ip6tables").args([
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            SUBNET6,
            "!",
            "-o",
            BRIDGE,
            "-j",
            "MASQUERADE",
        ]))?;
        Ok(t)
    }

    /// The two DNAT rules every run has (as iptables arguments after `-t nat`).
    pub fn base_dnat_rules(ctr_ip: &str) -> Vec<String> {
        vec![
            format!(
                "-t nat -A PREROUTING -d {UPLINK_IP} -p tcp --dport {FWD_TCP} -j DNAT --to-destination {ctr_ip}:{CTR_TCP}"
            ),
            format!(
                "-t nat -A PREROUTING -d {UPLINK_IP} -p udp --dport {FWD_UDP} -j DNAT --to-destination {ctr_ip}:{CTR_UDP}"
            ),
            format!(
                "-t nat -A PREROUTING -d {UPLINK_IP} -p tcp --dport {FWD_TCP_PP} -j DNAT --to-destination {ctr_ip}:{CTR_TCP_PP}"
            ),
        ]
    }

    pub fn ipt(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.host().cmd("iptables").arg("-w").args(args))
    }

    /// The bpffs/cgroup tag of a netns topology: the run's tag for eBPF (as before),
    /// with the kind's letter for the others.
    pub fn netns_tag(tag: &str, kind: Kind) -> String {
        if kind == Kind::Ebpf {
            tag.to_owned()
        } else {
            format!("{tag}{}", kind.letter())
        }
    }

    /// `fast`: the datapath with `--fast-path on` (Kind::EbpfFast).
    pub fn ebpf(tag: &str, tmp: &Path, bin: &Path, fast: bool) -> anyhow::Result<Topo> {
        let kind = if fast { Kind::EbpfFast } else { Kind::Ebpf };
        let ntag = Topo::netns_tag(tag, kind);
        let cfg = harness::Config {
            tag: format!("{tag}{}", kind.letter()),
            // Its state dir, tmp/<letter>/state, is how `cleanup_stale` finds a killed
            // run's collector.
            tmp: tmp.join(kind.letter().to_string()),
            bpffs_dir: bpffs_dir(&ntag),
            cgroup: cgroup_dir(&ntag).context("the eBPF topology needs a cgroup2 mount")?,
            extra: vec![
                "--bridge".into(),
                BRIDGE.into(),
                "--ip".into(),
                format!("{GW}/16"),
                "--ip6".into(),
                format!("{GW6}/64"),
                "--fast-path".into(),
                if fast { "on" } else { "off" }.into(),
            ],
            spawner: sys::spawner,
            bin: Some(bin.to_owned()),
        };
        let tmp = cfg.tmp.clone();
        let mut t = Topo::setup(kind, Net::Netns(Box::new(Topology::build(cfg)?)), tmp)?;
        for id in ["a", "b"] {
            let c = t.start_container(id)?;
            t.ctrs.push(c);
        }
        let ip = t.ctrs[0].ip.clone();
        if ip != "172.19.0.2" {
            eprintln!("note: the eBPF hook gave container a {ip}");
        }
        t.netns_run(&[
            "port",
            "add",
            "a",
            &format!("{FWD_TCP}:{CTR_TCP}/tcp"),
            &format!("{FWD_UDP}:{CTR_UDP}/udp"),
            &format!("{FWD_TCP_PP}:{CTR_TCP_PP}/tcp"),
        ])?;
        Ok(t)
    }

    /// An `unshare -n sleep` process in the host namespace: a container's network namespace.
    pub fn spawn_sleeper(&self, id: &str) -> anyhow::Result<Bg> {
        spawn_sleeper(self.host(), &self.tmp, id)
    }

    /// Prestart hook for a fresh sleeper; returns the container with its leased address.
    fn start_container(&self, id: &str) -> anyhow::Result<Container> {
        let sl = self.spawn_sleeper(id)?;
        self.hook(id, sl.pid(), "creating")?;
        let ls: serde_json::Value =
            serde_json::from_str(&self.netns_run(&["ls", "--json"])?).context("netns ls --json")?;
        let entry = ls
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .with_context(|| format!("container {id} not in `netns ls --json`: {ls}"))?;
        let ip = entry["ip"]
            .as_str()
            .with_context(|| format!("container {id} has no ip: {entry}"))?
            .to_owned();
        let ip6 = entry["ip6"].as_str().map(str::to_owned);
        Ok(Container {
            id: id.to_owned(),
            ip,
            ip6,
            ns_path: format!("/proc/{}/ns/net", sl.pid()),
            _ns: None,
            sleeper: Some(sl),
        })
    }

    pub fn spawn_server(&mut self, c: &mut Command, name: &str) -> anyhow::Result<u32> {
        let bg = Bg::spawn(c, &self.tmp.join(format!("{name}.log")))?;
        let pid = bg.pid();
        self.servers.push(bg);
        Ok(pid)
    }

    pub fn check_servers(&mut self) -> anyhow::Result<()> {
        for s in &mut self.servers {
            s.ensure_alive()?;
        }
        Ok(())
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.servers.clear();
        if let Ok(t) = self.netns() {
            for c in &self.ctrs {
                if let Some(sl) = &c.sleeper {
                    let _ = self.hook(&c.id, sl.pid(), "stopped");
                }
            }
            let _ = run_to(
                &mut t.netns_cmd(&["datapath", "unload"]),
                Duration::from_secs(20),
            );
            // The collector the hook started (it has our unique state dir as an
            // argument): asked to stop first; the harness's drop SIGKILLs what is left
            // and removes pins, cgroup and state.
            for pid in netns_tests::util::pids_with_arg(&t.state_dir.display().to_string()) {
                sys::terminate_pid(pid);
            }
        }
        // Containers (their namespaces, sleepers) before the host namespace.
        self.ctrs.clear();
    }
}

/// The reference CNI bridge plugin in its own host namespace (start-cost comparison).
pub struct Cni {
    pub host: NamedNetns,
    pub conf: String,
    pub tmp: PathBuf,
}

impl Cni {
    pub fn new(tag: &str, tmp: &Path) -> anyhow::Result<Cni> {
        let host = NamedNetns::create(&format!("{tag}ch"), sys::spawner)?;
        let tmp = tmp.join("cni");
        fs::create_dir_all(&tmp)?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("{tag}cni"),
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "subnet": SUBNET,
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": tmp.join("ipam"),
            }
        })
        .to_string();
        Ok(Cni { host, conf, tmp })
    }

    /// One plugin call (ADD or DEL) for the container `id` whose netns is `pid`'s.
    pub fn call(&self, command: &str, id: &str, pid: u32) -> anyhow::Result<Duration> {
        let mut c = self.host.cmd("/usr/lib/cni/bridge");
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/proc/{pid}/ns/net"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni");
        let out = run_raw(&mut c, Some(self.conf.as_bytes()), Duration::from_secs(60))?;
        if !out.ok() {
            bail!(
                "CNI bridge {command} {id}: {:?}\n{}{}",
                out.status,
                out.stdout,
                out.stderr
            );
        }
        Ok(out.elapsed)
    }

    pub fn spawn_sleeper(&self, id: &str) -> anyhow::Result<Bg> {
        spawn_sleeper(&self.host, &self.tmp, id)
    }
}
