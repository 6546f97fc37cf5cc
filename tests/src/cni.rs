//! Driving the `netns` CNI plugin the way libcni does: the plugin binary installed as
//! `<private plugin dir>/netns`, `CNI_*` in the environment, the network configuration
//! on stdin, stdout read to its end, run in a topology's host namespace. Pods are
//! `ip netns add` namespaces (what CRI runtimes make), removed on drop.

use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ns::NamedNetns;
use crate::topo::{Topology, UPLINK};
use crate::util::unique;

/// The versions the plugin must speak.
pub const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A private CNI installation for one topology.
pub struct Cni<'t> {
    pub topo: &'t Topology,
    /// CNI_PATH: `netns` and the reference IPAM plugins.
    pub plugin_dir: PathBuf,
    /// The network's `name`.
    pub network: String,
}

/// One plugin call's outcome.
#[derive(Debug)]
pub struct Call {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Call {
    /// stdout as JSON (panics with the whole output if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success; returns stdout as JSON, or Null when it is empty.
    pub fn ok(&self) -> Value {
        assert!(self.status.success(), "plugin call failed: {self:?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts a CNI error with `code`; returns the error JSON.
    pub fn err(&self, code: u64) -> Value {
        assert!(
            !self.status.success(),
            "expected error {code}, got success: {self:?}"
        );
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(code), "wrong error code: {self:?}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {self:?}"
        );
        assert!(
            v["cniVersion"].is_string(),
            "error without cniVersion: {self:?}"
        );
        v
    }
}

impl From<Output> for Call {
    fn from(o: Output) -> Call {
        Call {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            elapsed: Duration::ZERO,
        }
    }
}

impl<'t> Cni<'t> {
    pub fn new(topo: &'t Topology) -> Cni<'t> {
        let plugin_dir = topo.path(&unique("cnibin"));
        std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
        symlink(topo.bin(), plugin_dir.join("netns")).expect("plugin link");
        for p in ["host-local", "loopback"] {
            let src = PathBuf::from("/usr/lib/cni").join(p);
            assert!(
                src.exists(),
                "{} is missing: `bash scripts/setup.sh` installs containernetworking-plugins",
                src.display()
            );
            symlink(src, plugin_dir.join(p)).expect("reference plugin link");
        }
        Cni {
            topo,
            plugin_dir,
            network: unique("net"),
        }
    }

    /// The plugin configuration for `version`: the topology's private directories,
    /// uplink and cgroup (and its datapath mode, as the hook's flags have it).
    pub fn conf(&self, version: &str) -> Value {
        let t = self.topo;
        let mut c = json!({
            "cniVersion": version,
            "name": self.network,
            "type": "netns",
            "uplink": UPLINK,
            "stateDir": t.state_dir,
            "bpffsDir": t.bpffs_dir,
            "cgroup": t.cgroup,
        });
        if let Ok(v) = std::env::var("NETNS_TEST_FAST_PATH") {
            c["fastPath"] = (v == "on").into();
        }
        c
    }

    /// Runs the plugin: `command` with `env` (CNI_PATH is set unless given), `stdin`.
    pub fn call_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Call {
        let mut cmd = self.topo.host.cmd(self.plugin_dir.join("netns"));
        cmd.env_remove("NETNS_TEST_FAST_PATH")
            .env("CNI_PATH", &self.plugin_dir)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn the plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        // Reads both pipes to their end, as libcni does: returns only once nothing
        // holds them open any more.
        let out = child.wait_with_output().expect("wait for the plugin");
        let mut call = Call::from(out);
        call.elapsed = start.elapsed();
        call
    }

    /// `command` for container `id` / `ifname` in `pod` with configuration `conf`.
    pub fn call(
        &self,
        command: &str,
        id: &str,
        pod: Option<&NamedNetns>,
        ifname: &str,
        conf: &Value,
    ) -> Call {
        let netns = pod.map(NamedNetns::path).unwrap_or_default();
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", ifname),
        ];
        self.call_raw(&env, conf.to_string().as_bytes())
    }

    /// ADD, which must succeed; returns the result.
    pub fn add(&self, id: &str, pod: &NamedNetns, conf: &Value) -> Value {
        self.call("ADD", id, Some(pod), "eth0", conf).ok()
    }

    /// DEL, which must succeed.
    pub fn del(&self, id: &str, pod: Option<&NamedNetns>, conf: &Value) {
        self.call("DEL", id, pod, "eth0", conf).ok();
    }
}

/// `conf` with `runtimeConfig.portMappings` as a runtime injects it.
pub fn with_ports(conf: &Value, ports: &[(u16, u16, &str)]) -> Value {
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({
        "portMappings": ports
            .iter()
            .map(|(h, p, proto)| json!({"hostPort": h, "containerPort": p, "protocol": proto, "hostIP": ""}))
            .collect::<Vec<_>>()
    });
    c
}

/// A pod's namespace (`ip netns add`, removed on drop).
pub fn pod() -> NamedNetns {
    NamedNetns::new(&unique("pod"))
}
