//! Real runc containers (busybox-static rootfs) with the netns hooks in config.json.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::topo::Topology;
use crate::util::{busybox_rootfs, output, run, unique};

/// A bundle directory: rootfs + config.json.
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    /// Builds a bundle whose hooks run `netns` with the topology's flags (through
    /// `args`, as a user would in config.json) plus `hook_env`.
    pub fn new(
        topo: &Topology,
        id: &str,
        annotations: &BTreeMap<String, String>,
        hook_env: &[(&str, &str)],
    ) -> Bundle {
        let hook = Self::netns_hook(topo, hook_env);
        let hooks = serde_json::json!({ "prestart": [hook.clone()], "poststop": [hook] });
        Self::with_hooks(topo, id, annotations, hooks)
    }

    /// One OCI hook entry running `netns` with the topology's flags plus `hook_env`.
    pub fn netns_hook(topo: &Topology, hook_env: &[(&str, &str)]) -> serde_json::Value {
        let mut args = vec!["netns".to_owned()];
        args.extend(topo.flags());
        let env: Vec<String> = hook_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        serde_json::json!({
            "path": topo.bin(),
            "args": args,
            "env": env,
            "timeout": 60,
        })
    }

    /// Builds a bundle with these OCI `hooks` (any program: the harness's self-test
    /// uses a shell script).
    pub fn with_hooks(
        topo: &Topology,
        id: &str,
        annotations: &BTreeMap<String, String>,
        hooks: serde_json::Value,
    ) -> Bundle {
        let dir = topo.path(&format!("bundle-{id}"));
        busybox_rootfs(&dir.join("rootfs"));
        run(Command::new("runc").arg("spec").current_dir(&dir));
        let path = dir.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("config.json")).expect("json");
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(["sleep", "100000"]);
        spec["root"]["readonly"] = false.into();
        // busybox ping needs a raw socket.
        for set in ["bounding", "effective", "permitted"] {
            if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
                caps.push("CAP_NET_RAW".into());
            }
        }
        // `runc spec` gives the container a new network namespace: keep it (the hook
        // fills it), and check rather than assume.
        let namespaces = spec["linux"]["namespaces"]
            .as_array()
            .expect("linux.namespaces");
        assert!(
            namespaces
                .iter()
                .any(|n| n["type"] == "network" && n.get("path").is_none()),
            "runc spec must give a new network namespace: {namespaces:?}"
        );
        spec["hooks"] = hooks;
        spec["annotations"] = serde_json::to_value(annotations).expect("annotations");
        fs::write(&path, serde_json::to_vec_pretty(&spec).expect("json"))
            .expect("write config.json");
        Bundle { dir }
    }
}

/// A running container; killed and deleted (which runs poststop) on drop.
pub struct Container<'t> {
    pub topo: &'t Topology,
    pub id: String,
    pub pid: u32,
}

impl<'t> Container<'t> {
    /// Starts a container; panics with runc's output if it fails.
    pub fn start(topo: &'t Topology) -> Container<'t> {
        Self::start_with(topo, &BTreeMap::new(), &[]).expect("container start")
    }

    /// Starts a container with annotations and hook environment; Err(runc output) if
    /// runc (and so the prestart hook) fails.
    pub fn start_with(
        topo: &'t Topology,
        annotations: &BTreeMap<String, String>,
        hook_env: &[(&str, &str)],
    ) -> Result<Container<'t>, Output> {
        let id = unique("c");
        let bundle = Bundle::new(topo, &id, annotations, hook_env);
        Self::start_bundle(topo, id, &bundle)
    }

    /// Starts container `id` from `bundle` (`runc run -d` in the host namespace);
    /// Err(runc output) if runc or a prestart hook fails (the container is then deleted).
    pub fn start_bundle(
        topo: &'t Topology,
        id: String,
        bundle: &Bundle,
    ) -> Result<Container<'t>, Output> {
        let root = topo.runc_root.display().to_string();
        // The detached container inherits runc's stdio: pipes would never see EOF, so
        // runc's (and the hook's) messages go to a file.
        let log = topo.path(&format!("runc-{id}.log"));
        let f = fs::File::create(&log).expect("runc log");
        let status = topo
            .host
            .cmd("runc")
            .args(["--root", &root, "run", "-d", "--bundle"])
            .arg(&bundle.dir)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .status()
            .expect("spawn runc");
        let out = Output {
            status,
            stdout: Vec::new(),
            stderr: fs::read(&log).unwrap_or_default(),
        };
        if !out.status.success() {
            let _ = topo
                .host
                .cmd("runc")
                .args(["--root", &root, "delete", "-f", &id])
                .output();
            return Err(out);
        }
        let state: serde_json::Value = serde_json::from_str(&run(
            Command::new("runc").args(["--root", &root, "state", &id])
        ))
        .expect("state json");
        let pid = state["pid"].as_u64().expect("pid") as u32;
        Ok(Container { topo, id, pid })
    }

    /// A host tool run inside the container's network namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-n", program]);
        c
    }

    /// Waits until something listens on `proto` ("tcp"/"udp") `port` in the container.
    pub fn wait_listen(&self, proto: &str, port: u16) {
        crate::util::wait_listen(&["-t", &self.pid.to_string(), "-n"], proto, port);
    }

    /// Waits until `ss ARGS` (with -H) lists a socket in the container's namespace.
    pub fn wait_ss(&self, ss_args: &[&str]) {
        crate::util::wait_ss(&["-t", &self.pid.to_string(), "-n"], ss_args);
    }

    /// The host end of the container's veth (`netnsv0-<pid>`).
    pub fn host_veth(&self) -> String {
        format!("netnsv0-{}", self.pid)
    }

    /// `sh -c script` (host shell) inside the container's network namespace.
    pub fn sh(&self, script: &str) -> Output {
        output(self.cmd("sh").arg("-c").arg(script))
    }

    /// A background process (host shell `script`, exec'ed so that killing it kills the
    /// server itself) inside the container's network namespace, killed on drop.
    pub fn spawn(&self, script: &str) -> crate::util::ChildGuard {
        crate::util::ChildGuard::spawn(
            self.cmd("sh")
                .arg("-c")
                .arg(format!("exec {script}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    }

    /// `runc exec` of a busybox command inside the container itself.
    pub fn exec(&self, args: &[&str]) -> Output {
        let root = self.topo.runc_root.display().to_string();
        output(
            self.topo
                .host
                .cmd("runc")
                .args(["--root", &root, "exec", &self.id])
                .args(args),
        )
    }

    /// The container's eth0 IPv4 address.
    pub fn ip(&self) -> String {
        let out =
            String::from_utf8_lossy(&self.sh("ip -4 -o addr show dev eth0").stdout).into_owned();
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no IPv4 on eth0: {out}"))
            .to_owned()
    }

    /// The container's eth0 MAC address.
    pub fn mac(&self) -> String {
        let mut ip = self.cmd("ip");
        ip.args(["-o", "link", "show", "dev", "eth0"]);
        let out = String::from_utf8_lossy(&output(&mut ip).stdout).into_owned();
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC on eth0: {out}"))
            .to_owned()
    }

    /// Stops and deletes the container now (poststop runs); returns runc's output.
    pub fn delete(self) -> Output {
        let root = self.topo.runc_root.display().to_string();
        let _ = self
            .topo
            .host
            .cmd("runc")
            .args(["--root", &root, "kill", &self.id, "KILL"])
            .output();
        let out = output(
            self.topo
                .host
                .cmd("runc")
                .args(["--root", &root, "delete", "-f", &self.id]),
        );
        std::mem::forget(self);
        out
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let root = self.topo.runc_root.display().to_string();
        let _ = self
            .topo
            .host
            .cmd("runc")
            .args(["--root", &root, "delete", "-f", &self.id])
            .output();
    }
}
