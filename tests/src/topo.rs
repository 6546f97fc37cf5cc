//! A private topology: a "host" namespace (where runc and the hooks run) with an uplink
//! veth to a "wan" namespace that stands for the internet.
//!
//! ```text
//!   containers --(veth)-- [host: bridge netns0 172.19.0.1/16, up0 198.51.100.2/24]
//!                                                 |
//!                                  [wan: wan0 198.51.100.1/24] (+ 203.0.113.0/24 beyond)
//! ```
//! With [`Topology::enable_ipv6`] the uplink also has 2001:db8:100::2/64 (wan
//! 2001:db8:100::1/64) and the host an IPv6 default route via wan.
//!
//! Each topology has its own state directory, bpffs directory and cgroup, passed to the
//! hooks through config.json, so any number of topologies run at once.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Context as _;
use netns_common::LAYOUT_VERSION;

use crate::bpf;
use crate::ns::{NamedNetns, Spawner, plain};
use crate::util::{ChildGuard, kill_with_arg, netns_bin, output, run, unique};

pub const UPLINK: &str = "up0";
pub const UPLINK_IP: &str = "198.51.100.2";
pub const WAN_IP: &str = "198.51.100.1";
pub const GATEWAY: &str = "172.19.0.1";
/// IPv6 on the uplink ([`Topology::enable_ipv6`]): wan's and the host's addresses.
pub const WAN_IP6: &str = "2001:db8:100::1";
pub const UPLINK_IP6: &str = "2001:db8:100::2";
/// IPv6 behind wan ([`Topology::add_far6`]): wan's side and the far host.
pub const FAR_GW6: &str = "2001:db8:200::1";
pub const FAR_IP6: &str = "2001:db8:200::2";

const BPFFS: &str = "/sys/fs/bpf";

/// Where the cgroup2 hierarchy is mounted.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mi = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    netns_common::cgroup2_mount(&mi)
        .map(PathBuf::from)
        .context("no cgroup2 mount: the socket-level programs need one")
}

/// Mounts bpffs on /sys/fs/bpf unless it is there.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let is_bpffs =
        nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type().0 == 0xcafe_4a11);
    if !is_bpffs {
        crate::util::try_run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}

/// The two namespaces every topology has: `<prefix>h`, the "host", and `<prefix>w`,
/// the "wan", joined by the uplink veth (`up0` 198.51.100.2/24 in the host, `wan0`
/// 198.51.100.1/24 in wan), with the host's default route via wan. On error nothing is
/// left behind.
pub fn host_and_wan(prefix: &str, spawner: Spawner) -> anyhow::Result<(NamedNetns, NamedNetns)> {
    let host = NamedNetns::create(&format!("{prefix}h"), spawner)?;
    let wan = NamedNetns::create(&format!("{prefix}w"), spawner)?;
    host.try_ip(&[
        "link", "add", UPLINK, "type", "veth", "peer", "name", "wan0", "netns", &wan.name,
    ])?;
    host.try_ip(&["addr", "add", &format!("{UPLINK_IP}/24"), "dev", UPLINK])?;
    host.try_ip(&["link", "set", UPLINK, "up"])?;
    wan.try_ip(&["addr", "add", &format!("{WAN_IP}/24"), "dev", "wan0"])?;
    wan.try_ip(&["link", "set", "wan0", "up"])?;
    host.try_ip(&["route", "add", "default", "via", WAN_IP])?;
    Ok((host, wan))
}

/// IPv6 not disabled in `ns`, on `dev` and for interfaces made later.
fn ipv6_on(ns: &NamedNetns, dev: &str) -> anyhow::Result<()> {
    for kv in [
        "net.ipv6.conf.all.disable_ipv6=0".to_owned(),
        "net.ipv6.conf.default.disable_ipv6=0".to_owned(),
        format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
    ] {
        ns.sysctl(&kv).with_context(|| kv.clone())?;
    }
    Ok(())
}

/// IPv6 on the uplink of [`host_and_wan`]'s namespaces: `up0` 2001:db8:100::2/64,
/// `wan0` 2001:db8:100::1/64 (both nodad), the host's IPv6 default route via wan.
pub fn ipv6_uplink(host: &NamedNetns, wan: &NamedNetns) -> anyhow::Result<()> {
    ipv6_on(host, UPLINK)?;
    ipv6_on(wan, "wan0")?;
    host.try_ip(&[
        "-6",
        "addr",
        "add",
        &format!("{UPLINK_IP6}/64"),
        "dev",
        UPLINK,
        "nodad",
    ])?;
    wan.try_ip(&[
        "-6",
        "addr",
        "add",
        &format!("{WAN_IP6}/64"),
        "dev",
        "wan0",
        "nodad",
    ])?;
    host.try_ip(&["-6", "route", "add", "default", "via", WAN_IP6])?;
    Ok(())
}

/// What a [`Topology`] is made of: names, directories and flags.
pub struct Config {
    /// Namespace prefix: the host is `<tag>h`, wan `<tag>w` (a far one `<tag>f`).
    pub tag: String,
    /// Scratch directory (created; removed on drop): state dir and runc root live in it.
    pub tmp: PathBuf,
    /// The `--bpffs-dir` (removed on drop).
    pub bpffs_dir: PathBuf,
    /// The `--cgroup` (created; removed on drop).
    pub cgroup: PathBuf,
    /// Extra global flags for every netns call (hooks included).
    pub extra: Vec<String>,
    /// How the namespaces make their commands.
    pub spawner: Spawner,
    /// The `netns` binary (None: [`netns_bin`], looked up when first needed).
    pub bin: Option<PathBuf>,
}

impl Config {
    /// A test's: unique names under `netns-test-<tag>` everywhere.
    pub fn test(extra: &[&str]) -> anyhow::Result<Config> {
        let tag = unique("nt");
        Ok(Config {
            tmp: std::env::temp_dir().join(format!("netns-test-{tag}")),
            bpffs_dir: PathBuf::from(BPFFS).join(format!("netns-test-{tag}")),
            cgroup: cgroup2_root()?.join(format!("netns-test-{tag}")),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            spawner: plain,
            bin: None,
            tag,
        })
    }
}

pub struct Topology {
    /// Containers live in the runc root; removed first on drop.
    pub runc_root: PathBuf,
    pub host: NamedNetns,
    pub wan: NamedNetns,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub cgroup: PathBuf,
    pub tmp: PathBuf,
    pub tag: String,
    /// Extra global flags for every netns call (hooks included).
    pub extra: Vec<String>,
    bin: Option<PathBuf>,
}

impl Default for Topology {
    fn default() -> Topology {
        Topology::new()
    }
}

impl Topology {
    /// A test topology (panics if it cannot be built).
    pub fn new() -> Topology {
        Self::with_flags(&[])
    }

    /// A test topology whose netns calls (hooks included) all get `extra` flags.
    pub fn with_flags(extra: &[&str]) -> Topology {
        Config::test(extra)
            .and_then(Topology::build)
            .unwrap_or_else(|e| panic!("building the test topology: {e:#}"))
    }

    /// Builds the topology `cfg` describes; on error whatever was made is removed.
    pub fn build(cfg: Config) -> anyhow::Result<Topology> {
        ensure_bpffs()?;
        let (host, wan) = host_and_wan(&cfg.tag, cfg.spawner)?;
        Self::build_on(cfg, host, wan)
    }

    /// A topology on namespaces the caller made: `host` must have its uplink named
    /// [`UPLINK`]; `wan` is whatever lies behind it (a [`NamedNetns::shared`] handle
    /// when several topologies share it). On error `host` and `wan` are dropped.
    pub fn build_on(cfg: Config, host: NamedNetns, wan: NamedNetns) -> anyhow::Result<Topology> {
        ensure_bpffs()?;
        let t = Topology {
            runc_root: cfg.tmp.join("runc"),
            state_dir: cfg.tmp.join("state"),
            bpffs_dir: cfg.bpffs_dir,
            cgroup: cfg.cgroup,
            host,
            wan,
            tmp: cfg.tmp,
            tag: cfg.tag,
            extra: cfg.extra,
            bin: cfg.bin,
        };
        fs::create_dir_all(&t.tmp).with_context(|| format!("creating {}", t.tmp.display()))?;
        fs::create_dir_all(&t.cgroup)
            .with_context(|| format!("creating cgroup {}", t.cgroup.display()))?;
        Ok(t)
    }

    /// The global flags every `netns` call of this topology takes (hooks included).
    /// A `--cgroup` among the extra flags (e.g. `--cgroup=none`) replaces the
    /// topology's own.
    pub fn flags(&self) -> Vec<String> {
        let own_cgroup = !self.extra.iter().any(|f| f.starts_with("--cgroup"));
        vec![
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
            "--uplink".into(),
            UPLINK.into(),
        ]
        .into_iter()
        .chain(
            own_cgroup
                .then(|| ["--cgroup".to_owned(), self.cgroup.display().to_string()])
                .into_iter()
                .flatten(),
        )
        // NETNS_TEST_FAST_PATH=on|off runs a suite in the other datapath mode
        // (`cargo xtask test` runs the NAT suites in both).
        .chain(
            std::env::var("NETNS_TEST_FAST_PATH")
                .ok()
                .filter(|_| !self.extra.iter().any(|f| f.starts_with("--fast-path")))
                .map(|v| format!("--fast-path={v}")),
        )
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// The `netns` binary this topology runs.
    pub fn bin(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(netns_bin)
    }

    /// `netns <flags> ARGS` in the host namespace.
    pub fn netns_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.host.cmd(self.bin());
        c.args(self.flags()).args(args);
        c
    }

    /// `netns ARGS`, must succeed; returns stdout.
    pub fn netns(&self, args: &[&str]) -> String {
        run(&mut self.netns_cmd(args))
    }

    /// `netns ARGS` with `stdin`, any outcome.
    pub fn netns_stdin(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        use std::io::Write as _;
        let mut c = self.netns_cmd(args);
        c.envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("spawn netns");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait netns")
    }

    /// The datapath's pin directory, `<bpffs-dir>/v<layout>`.
    pub fn pins(&self) -> PathBuf {
        self.bpffs_dir.join(format!("v{LAYOUT_VERSION}"))
    }

    /// The pin of map `name` (e.g. `NETNS_EPS`).
    pub fn map_pin(&self, name: &str) -> PathBuf {
        self.pins().join("maps").join(name)
    }

    /// Every entry of the pinned map `name`, as the kernel holds it (bpftool).
    pub fn map_dump(&self, name: &str) -> Vec<bpf::Entry> {
        bpf::map_dump(&self.host, &self.map_pin(name)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// How many entries the pinned map `name` holds (bpftool, not the product).
    pub fn map_entries(&self, name: &str) -> u64 {
        self.map_dump(name).len() as u64
    }

    /// The container addresses the datapath has endpoints for: the keys of the pinned
    /// endpoint map (IPv4 in network order), sorted.
    pub fn endpoints(&self) -> Vec<Ipv4Addr> {
        self.endpoint_keys::<4, Ipv4Addr>(netns_common::maps::ENDPOINTS)
    }

    /// The same for IPv6 (`NETNS_EPS6`, the address's 16 bytes).
    pub fn endpoints6(&self) -> Vec<std::net::Ipv6Addr> {
        self.endpoint_keys::<16, std::net::Ipv6Addr>(netns_common::maps::ENDPOINTS6)
    }

    fn endpoint_keys<const N: usize, A: From<[u8; N]> + Ord>(&self, map: &str) -> Vec<A> {
        let mut v: Vec<A> = self
            .map_dump(map)
            .iter()
            .map(|e| {
                let k: [u8; N] = e.key.as_slice().try_into().expect("an address-sized key");
                A::from(k)
            })
            .collect();
        v.sort();
        v
    }

    /// The TCX programs on interface `ifname` of the host namespace (BPF_PROG_QUERY).
    pub fn tcx(&self, ifname: &str) -> bpf::Tcx {
        bpf::tcx(&self.host, ifname).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The entry count `netns datapath status --json` gives for map `name` (the
    /// product's own count, e.g. the marks of `NETNS_PORTUSE`).
    pub fn status_entries(&self, name: &str) -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&self.netns(&["datapath", "status", "--json"])).expect("JSON");
        status["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or_else(|| panic!("{name} in datapath status: {status}"))
    }

    /// `stats --json` parsed: counter name -> value.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.netns(&["stats", "--json"])).expect("stats --json is JSON")
    }

    /// One counter of `stats --json`; panics (naming it) if there is no such counter.
    pub fn stat(&self, name: &str) -> u64 {
        let s = self.stats();
        s[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in netns stats: {s}"))
    }

    /// `ls --json` parsed.
    pub fn containers(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.netns(&["ls", "--json"])).expect("ls --json is JSON")
    }

    /// Runs `script` with sh in the host namespace, inside this topology's cgroup (the
    /// socket programs act on it).
    pub fn host_sh(&self, script: &str) -> Output {
        let procs = self.cgroup.join("cgroup.procs");
        let full = format!("echo $$ > {}; {script}", procs.display());
        output(self.host.cmd("sh").arg("-c").arg(full))
    }

    /// Python (PY_LIB prepended) in the host namespace, inside this topology's cgroup,
    /// so the socket programs see it as they see any host process.
    pub fn host_python(&self, body: &str, args: &[&str]) -> Output {
        let script = self.path(&unique("py"));
        std::fs::write(&script, crate::pkt::py(body)).expect("write script");
        let mut line = format!("exec python3 {}", script.display());
        for a in args {
            line.push_str(&format!(" '{a}'"));
        }
        self.host_sh(&line)
    }

    /// Runs `script` with sh in the wan namespace.
    pub fn wan_sh(&self, script: &str) -> Output {
        output(self.wan.cmd("sh").arg("-c").arg(script))
    }

    /// A background process in the wan namespace, killed on drop.
    pub fn wan_spawn(&self, script: &str) -> ChildGuard {
        ChildGuard::spawn(
            self.wan
                .cmd("sh")
                .arg("-c")
                .arg(format!("exec {script}"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
    }

    /// Adds a second hop behind wan: 203.0.113.0/24 on a far namespace, reached through
    /// wan (which routes), with `mtu` on wan's side of that link.
    pub fn add_far(&self, mtu: u32) -> NamedNetns {
        let far = self.far_link("f", "far0", mtu);
        self.wan
            .ip(&["addr", "add", "203.0.113.254/24", "dev", "far0"]);
        self.wan.ip(&["link", "set", "far0", "up"]);
        far.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth0"]);
        far.ip(&["link", "set", "eth0", "up"]);
        far.ip(&["route", "add", "default", "via", "203.0.113.254"]);
        run(self
            .wan
            .cmd("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]));
        far
    }

    /// A far namespace `<tag><suffix>` joined to wan by a veth: `wan_dev` (with `mtu`)
    /// in wan, `eth0` in the far namespace.
    fn far_link(&self, suffix: &str, wan_dev: &str, mtu: u32) -> NamedNetns {
        let far = NamedNetns::new(&format!("{}{suffix}", self.tag));
        self.wan.ip(&[
            "link",
            "add",
            wan_dev,
            "mtu",
            &mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &far.name,
        ]);
        far
    }

    /// IPv6 on the uplink (see [`ipv6_uplink`]). Call it before the first container
    /// starts: the hook reads the uplink's global IPv6 address (NAT66 source).
    pub fn enable_ipv6(&self) {
        ipv6_uplink(&self.host, &self.wan).unwrap_or_else(|e| panic!("IPv6 on the uplink: {e:#}"));
    }

    /// The IPv6 analogue of [`Topology::add_far`]: a far namespace (`<tag>f6`) behind
    /// wan on 2001:db8:200::/64 (wan `far6` 2001:db8:200::1 with `mtu`, far `eth0`
    /// 2001:db8:200::2, default route via wan), wan forwarding IPv6. The host reaches
    /// it through its default route (needs [`Topology::enable_ipv6`] first).
    pub fn add_far6(&self, mtu: u32) -> NamedNetns {
        let far = self.far_link("f6", "far6", mtu);
        let on = |ns: &NamedNetns, dev: &str| {
            ipv6_on(ns, dev).unwrap_or_else(|e| panic!("IPv6 in {}: {e:#}", ns.name));
        };
        on(&far, "eth0");
        on(&self.wan, "far6");
        self.wan
            .sysctl("net.ipv6.conf.all.forwarding=1")
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.wan.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{FAR_GW6}/64"),
            "dev",
            "far6",
            "nodad",
        ]);
        self.wan.ip(&["link", "set", "far6", "up"]);
        far.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{FAR_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        far.ip(&["link", "set", "eth0", "up"]);
        far.ip(&["-6", "route", "add", "default", "via", FAR_GW6]);
        far
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Containers first: their poststop hooks need the namespaces and pins.
        if self.runc_root.exists() {
            let root = self.runc_root.display().to_string();
            if let Ok(out) = Command::new("runc")
                .args(["--root", &root, "list", "-q"])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = self
                        .host
                        .cmd("runc")
                        .args(["--root", &root, "delete", "-f", id])
                        .output();
                }
            }
        }
        // The collector the hook started exits once the pins are gone; don't wait.
        kill_with_arg(&self.state_dir.display().to_string());
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        if let Ok(procs) = fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            let parent = self
                .cgroup
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            for pid in procs.lines() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_dir_all(&self.tmp);
    }
}
