//! A private topology: a "host" namespace (where runc and the hooks run) with an uplink
//! veth to a "wan" namespace that stands for the internet.
//!
//! ```text
//!   containers --(veth)-- [host: bridge netns0 172.19.0.1/16, up0 198.51.100.2/24]
//!                                                 |
//!                                  [wan: wan0 198.51.100.1/24] (+ 203.0.113.0/24 beyond)
//! ```
//! Each topology has its own state directory, bpffs directory and cgroup, passed to the
//! hooks through config.json, so any number of topologies run at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::ns::NamedNetns;
use crate::util::{ChildGuard, kill_with_arg, netns_bin, output, run, unique};

pub const UPLINK: &str = "up0";
pub const UPLINK_IP: &str = "198.51.100.2";
pub const WAN_IP: &str = "198.51.100.1";
pub const GATEWAY: &str = "172.19.0.1";

const BPFFS: &str = "/sys/fs/bpf";

fn cgroup2_root() -> PathBuf {
    let mi = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for l in mi.lines() {
        if let Some((pre, post)) = l.split_once(" - ")
            && post.split_whitespace().next() == Some("cgroup2")
            && let Some(m) = pre.split_whitespace().nth(4)
        {
            return PathBuf::from(m);
        }
    }
    panic!("no cgroup2 mount: the socket-level tests need one");
}

fn ensure_bpffs() {
    let is_bpffs =
        nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type().0 == 0xcafe_4a11);
    if !is_bpffs {
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]));
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
}

impl Default for Topology {
    fn default() -> Topology {
        Topology::new()
    }
}

impl Topology {
    pub fn new() -> Topology {
        Self::with_flags(&[])
    }

    /// A topology whose netns calls (hooks included) all get `extra` flags.
    pub fn with_flags(extra: &[&str]) -> Topology {
        ensure_bpffs();
        let tag = unique("nt");
        let tmp = std::env::temp_dir().join(format!("netns-test-{tag}"));
        fs::create_dir_all(&tmp).expect("tmp dir");
        let host = NamedNetns::new(&format!("{tag}h"));
        let wan = NamedNetns::new(&format!("{tag}w"));
        let t = Topology {
            runc_root: tmp.join("runc"),
            state_dir: tmp.join("state"),
            bpffs_dir: PathBuf::from(BPFFS).join(format!("netns-test-{tag}")),
            cgroup: cgroup2_root().join(format!("netns-test-{tag}")),
            host,
            wan,
            tmp,
            tag,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        fs::create_dir_all(&t.cgroup).expect("test cgroup");
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
        ]);
        t.host
            .ip(&["addr", "add", &format!("{UPLINK_IP}/24"), "dev", UPLINK]);
        t.host.ip(&["link", "set", UPLINK, "up"]);
        t.wan
            .ip(&["addr", "add", &format!("{WAN_IP}/24"), "dev", "wan0"]);
        t.wan.ip(&["link", "set", "wan0", "up"]);
        t.host.ip(&["route", "add", "default", "via", WAN_IP]);
        t
    }

    /// The global flags every `netns` call of this topology takes (hooks included).
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
            "--uplink".into(),
            UPLINK.into(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// `netns <flags> ARGS` in the host namespace.
    pub fn netns_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.host.cmd(netns_bin().to_str().expect("utf-8 path"));
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

    /// How many entries the pinned map `name` holds (`datapath status --json`).
    pub fn map_entries(&self, name: &str) -> u64 {
        let st: serde_json::Value =
            serde_json::from_str(&self.netns(&["datapath", "status", "--json"]))
                .expect("datapath status --json is JSON");
        st["maps"]
            .as_array()
            .expect("maps array")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no map {name} in datapath status"))["entries"]
            .as_u64()
            .expect("entries")
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
        let far = NamedNetns::new(&format!("{}f", self.tag));
        self.wan.ip(&[
            "link",
            "add",
            "far0",
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
