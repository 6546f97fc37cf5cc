//! The three private topologies (and a fourth host namespace for the CNI plugin):
//!
//! ```text
//!  [ctr a 172.19.0.2]--veth--+
//!                            br0 172.19.0.1/16 [host] up0 198.51.100.2/24 ==veth== wan0 198.51.100.1/24 [wan]
//!  [ctr b 172.19.0.3]--veth--+
//! ```
//! no NAT: routed, wan has a route to 172.19.0.0/16 via 198.51.100.2 (the ceiling);
//! iptables: MASQUERADE + DNAT rules in the host namespace;
//! eBPF: the product's own topology, made by the real `netns` hook for two
//! `unshare -n sleep` "containers".
//! Everything is named `nb<pid>…` and removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::sys::{self, Bg, Ns, in_ns, run, run_raw, run_to};

pub const WAN_IP: &str = "198.51.100.1";
pub const UPLINK_IP: &str = "198.51.100.2";
pub const GW: &str = "172.19.0.1";
pub const SUBNET: &str = "172.19.0.0/16";
pub const BRIDGE: &str = "br0";
pub const UPLINK: &str = "up0";
/// Host port forwarded (TCP) to container a's CTR_TCP, and (UDP) FWD_UDP to CTR_UDP.
pub const FWD_TCP: u16 = 8080;
pub const CTR_TCP: u16 = 5001;
pub const FWD_UDP: u16 = 8081;
pub const CTR_UDP: u16 = 5002;
/// Servers in the wan namespace.
pub const WAN_UDP: u16 = 11111;
pub const WAN_IPERF: u16 = 5201;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    NoNat,
    Iptables,
    Ebpf,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::NoNat, Kind::Iptables, Kind::Ebpf];
    pub fn label(self) -> &'static str {
        match self {
            Kind::NoNat => "no NAT",
            Kind::Iptables => "iptables",
            Kind::Ebpf => "eBPF",
        }
    }
    fn letter(self) -> char {
        match self {
            Kind::NoNat => 'n',
            Kind::Iptables => 'i',
            Kind::Ebpf => 'e',
        }
    }
}

pub struct Container {
    pub id: String,
    pub ip: String,
    /// /run/netns/NAME or /proc/PID/ns/net.
    pub ns_path: String,
    _ns: Option<Ns>,
    sleeper: Option<Bg>,
}

impl Container {
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.ns_path, program)
    }
}

/// What the eBPF topology needs to call `netns`.
pub struct NetnsCli {
    pub bin: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub cgroup: PathBuf,
    pub host_path: String,
}

impl NetnsCli {
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--bridge".into(),
            BRIDGE.into(),
            "--ip".into(),
            format!("{GW}/16"),
            "--uplink".into(),
            UPLINK.into(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
        ]
    }

    /// `nsenter --net=HOST netns FLAGS ARGS`.
    pub fn cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = in_ns(&self.host_path, &self.bin);
        c.args(self.flags()).args(args);
        c
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
        run(&mut self.cmd(args))
    }

    fn state_json(id: &str, pid: u32, status: &str, bundle: &Path) -> String {
        serde_json::json!({"ociVersion": "1.0.2", "id": id, "status": status, "pid": pid, "bundle": bundle})
            .to_string()
    }

    /// Runs the hook (prestart with "creating", poststop with "stopped"); returns its wall time.
    pub fn hook(
        &self,
        id: &str,
        pid: u32,
        status: &str,
        bundle: &Path,
    ) -> anyhow::Result<Duration> {
        let json = Self::state_json(id, pid, status, bundle);
        let no_args: [&str; 0] = [];
        let out = run_raw(
            &mut self.cmd(&no_args),
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
}

pub struct Topo {
    pub kind: Kind,
    pub host: Ns,
    pub wan: Ns,
    pub ctrs: Vec<Container>,
    pub netns: Option<NetnsCli>,
    /// Long-lived servers; killed first on drop.
    pub servers: Vec<Bg>,
    pub tmp: PathBuf,
}

fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mi = fs::read_to_string("/proc/self/mountinfo")?;
    for l in mi.lines() {
        if let Some((pre, post)) = l.split_once(" - ")
            && post.split_whitespace().next() == Some("cgroup2")
            && let Some(m) = pre.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(m));
        }
    }
    bail!("no cgroup2 mount")
}

pub fn cgroup_dir(tag: &str) -> Option<PathBuf> {
    cgroup2_root()
        .ok()
        .map(|r| r.join(format!("netns-bench-{tag}")))
}

pub fn bpffs_dir(tag: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("netns-bench-{tag}"))
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if !mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _ = f.next();
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        run(sys::cmd("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// An `unshare -n sleep` process started in `host`: a container's own network
/// namespace (`/proc/PID/ns/net`), ready once the process has become `sleep`
/// (nsenter and unshare exec in place, so the pid stays the same).
fn spawn_sleeper(host: &Ns, tmp: &Path, id: &str) -> anyhow::Result<Bg> {
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

impl Topo {
    /// Host + wan + uplink, common to the three.
    fn base(kind: Kind, tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let p = format!("{tag}{}", kind.letter());
        let host = Ns::new(&format!("{p}h"))?;
        let wan = Ns::new(&format!("{p}w"))?;
        let t = Topo {
            kind,
            host,
            wan,
            ctrs: Vec::new(),
            netns: None,
            servers: Vec::new(),
            tmp: tmp.join(kind.letter().to_string()),
        };
        fs::create_dir_all(&t.tmp)?;
        t.host.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "wan0",
            "netns",
            &t.wan.name,
        ])?;
        t.host
            .ip(&["addr", "add", &format!("{UPLINK_IP}/24"), "dev", UPLINK])?;
        t.host.ip(&["link", "set", UPLINK, "up"])?;
        t.wan
            .ip(&["addr", "add", &format!("{WAN_IP}/24"), "dev", "wan0"])?;
        t.wan.ip(&["link", "set", "wan0", "up"])?;
        t.host.ip(&["route", "add", "default", "via", WAN_IP])?;
        t.host.sysctl("net.ipv4.ip_forward=1")?;
        // The connection-rate client opens many short connections from wan.
        t.wan.sysctl("net.ipv4.ip_local_port_range=1024 60999")?;
        t.wan.sysctl("net.ipv4.tcp_tw_reuse=1")?;
        Ok(t)
    }

    /// Bridge and two containers made by hand (no NAT, iptables).
    fn manual_containers(&mut self, tag: &str) -> anyhow::Result<()> {
        let p = format!("{tag}{}", self.kind.letter());
        self.host.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        self.host
            .ip(&["addr", "add", &format!("{GW}/16"), "dev", BRIDGE])?;
        self.host.ip(&["link", "set", BRIDGE, "up"])?;
        for (i, id) in ["a", "b"].iter().enumerate() {
            let ns = Ns::new(&format!("{p}{id}"))?;
            let ip = format!("172.19.0.{}", i + 2);
            let hv = format!("veth{id}");
            self.host.ip(&[
                "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            self.host
                .ip(&["link", "set", &hv, "master", BRIDGE, "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", GW])?;
            self.ctrs.push(Container {
                id: id.to_string(),
                ip,
                ns_path: ns.path(),
                _ns: Some(ns),
                sleeper: None,
            });
        }
        Ok(())
    }

    pub fn no_nat(tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let mut t = Topo::base(Kind::NoNat, tag, tmp)?;
        t.manual_containers(tag)?;
        t.wan.ip(&["route", "add", SUBNET, "via", UPLINK_IP])?;
        Ok(t)
    }

    pub fn iptables(tag: &str, tmp: &Path) -> anyhow::Result<Topo> {
        let mut t = Topo::base(Kind::Iptables, tag, tmp)?;
        t.manual_containers(tag)?;
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
        ]
    }

    pub fn ipt(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.host.cmd("iptables").arg("-w").args(args))
    }

    pub fn ebpf(tag: &str, tmp: &Path, bin: &Path) -> anyhow::Result<Topo> {
        ensure_bpffs()?;
        let mut t = Topo::base(Kind::Ebpf, tag, tmp)?;
        let cgroup = cgroup_dir(tag).context("the eBPF topology needs a cgroup2 mount")?;
        fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        t.netns = Some(NetnsCli {
            bin: bin.to_owned(),
            state_dir: t.tmp.join("state"),
            bpffs_dir: bpffs_dir(tag),
            cgroup,
            host_path: t.host.path(),
        });
        for id in ["a", "b"] {
            let c = t.start_container(id)?;
            t.ctrs.push(c);
        }
        let ip = t.ctrs[0].ip.clone();
        if ip != "172.19.0.2" {
            eprintln!("note: the eBPF hook gave container a {ip}");
        }
        t.netns()?.run(&[
            "port",
            "add",
            "a",
            &format!("{FWD_TCP}:{CTR_TCP}/tcp"),
            &format!("{FWD_UDP}:{CTR_UDP}/udp"),
        ])?;
        Ok(t)
    }

    pub fn netns(&self) -> anyhow::Result<&NetnsCli> {
        self.netns.as_ref().context("not the eBPF topology")
    }

    /// An `unshare -n sleep` process in the host namespace: a container's network namespace.
    pub fn spawn_sleeper(&self, id: &str) -> anyhow::Result<Bg> {
        spawn_sleeper(&self.host, &self.tmp, id)
    }

    /// Prestart hook for a fresh sleeper; returns the container with its leased address.
    fn start_container(&self, id: &str) -> anyhow::Result<Container> {
        let sl = self.spawn_sleeper(id)?;
        let n = self.netns()?;
        n.hook(id, sl.pid(), "creating", &self.tmp)?;
        let ls: serde_json::Value =
            serde_json::from_str(&n.run(&["ls", "--json"])?).context("netns ls --json")?;
        let ip = ls
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .and_then(|c| c["ip"].as_str())
            .with_context(|| format!("container {id} not in `netns ls --json`: {ls}"))?
            .to_owned();
        Ok(Container {
            id: id.to_owned(),
            ip,
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
        if let Some(n) = &self.netns {
            for c in &self.ctrs {
                if let Some(sl) = &c.sleeper {
                    let _ = n.hook(&c.id, sl.pid(), "stopped", &self.tmp);
                }
            }
            self.ctrs.clear();
            let _ = run_to(&mut n.cmd(&["datapath", "unload"]), Duration::from_secs(20));
            let _ = fs::remove_dir_all(&n.bpffs_dir);
            // The collector the hook started (it mentions our unique state dir).
            for pid in sys::pids_mentioning(&n.state_dir.display().to_string()) {
                sys::terminate_pid(pid);
            }
            let _ = fs::remove_dir(&n.cgroup);
        }
        self.ctrs.clear();
    }
}

/// The reference CNI bridge plugin in its own host namespace (start-cost comparison).
pub struct Cni {
    pub host: Ns,
    pub conf: String,
    pub tmp: PathBuf,
}

impl Cni {
    pub fn new(tag: &str, tmp: &Path) -> anyhow::Result<Cni> {
        let host = Ns::new(&format!("{tag}ch"))?;
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
