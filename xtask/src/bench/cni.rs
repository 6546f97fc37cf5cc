//! A small libcni: runs CNI plugins as libcni 1.2 (`AddNetworkList`/`DelNetworkList`)
//! does, so that what is timed is what a runtime would pay.
//!
//! - Each plugin is the binary named by its `type`, looked up in `CNI_PATH`, exec'd with
//!   the runtime's environment plus `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//!   `CNI_ARGS`, `CNI_IFNAME`, `CNI_PATH`, its network config JSON on stdin.
//! - The config a plugin gets is its entry of the conflist with the list's `name` and
//!   `cniVersion`, `prevResult` (ADD: the previous plugin's result; DEL: the chain's
//!   cached final result, as libcni's result cache gives it) and `runtimeConfig` holding
//!   those capability arguments the entry declares in `capabilities`.
//! - ADD runs the plugins in order, DEL in reverse order; a failure stops the chain and
//!   surfaces the plugin's error JSON (`code`, `msg`, `details`), or its stderr when
//!   stdout is not one.
//!
//! The runtime's own namespace is a parameter: each plugin process enters it (setns in
//! the child, before exec) instead of the caller's, so the plugins' host side (bridges,
//! iptables) stays in a private namespace. Results are cached in memory only (libcni's
//! machine-wide /var/lib/cni/cache is never touched).

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};
use serde_json::{Map, Value, json};

use super::sys::{self, run_raw};

/// A network configuration list (`.conflist`).
#[derive(Clone, Debug)]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    /// The plugin entries, each with at least `type`.
    pub plugins: Vec<Value>,
}

/// What the runtime knows about one attachment (libcni's `RuntimeConf`).
#[derive(Clone, Debug)]
pub struct RuntimeConf {
    pub container_id: String,
    /// `CNI_NETNS`: the container's network namespace (a path).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`), usually empty.
    pub args: String,
    /// Capability arguments (e.g. `portMappings`), injected as `runtimeConfig` into the
    /// entries that declare the capability.
    pub capability_args: Map<String, Value>,
}

impl RuntimeConf {
    pub fn new(container_id: &str, netns: &str) -> RuntimeConf {
        RuntimeConf {
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: "eth0".to_owned(),
            args: String::new(),
            capability_args: Map::new(),
        }
    }
}

/// A plugin that failed: its error JSON when it printed one.
#[derive(Debug)]
pub struct PluginError {
    pub plugin: String,
    pub command: String,
    pub status: String,
    pub code: Option<u64>,
    pub msg: Option<String>,
    pub details: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CNI plugin {} {} failed ({})",
            self.plugin, self.command, self.status
        )?;
        match &self.msg {
            Some(m) => {
                write!(f, ": {m}")?;
                if let Some(c) = self.code {
                    write!(f, " [code {c}]")?;
                }
                if let Some(d) = self.details.as_deref().filter(|d| !d.is_empty()) {
                    write!(f, " ({d})")?;
                }
            }
            // No error JSON: whatever it said.
            None => {
                let out = [self.stdout.trim(), self.stderr.trim()]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n");
                write!(
                    f,
                    ": {}",
                    if out.is_empty() {
                        "no output"
                    } else {
                        out.as_str()
                    }
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for PluginError {}

/// One plugin call and its wall time (spawn to exit).
#[derive(Clone, Debug)]
pub struct Call {
    pub plugin: String,
    pub elapsed: Duration,
    /// What it logged although it succeeded (warnings), trimmed.
    pub stderr: String,
}

/// The outcome of ADD on a list: the chain's final result (keep it for DEL) and the
/// calls made.
#[derive(Clone, Debug)]
pub struct Added {
    pub result: Value,
    pub calls: Vec<Call>,
    pub elapsed: Duration,
}

/// The runtime side: where plugins are found and which namespace they run in.
pub struct Runtime {
    /// `CNI_PATH` (one directory: the benchmark's private plugin directory).
    pub path: PathBuf,
    /// The runtime's network namespace (a file such as /run/netns/NAME).
    pub netns: PathBuf,
    pub timeout: Duration,
    /// Variables set for every plugin besides the runtime's environment.
    pub env: Vec<(String, String)>,
}

impl Runtime {
    pub fn new(path: &Path, netns: &Path) -> Runtime {
        Runtime {
            path: path.to_owned(),
            netns: netns.to_owned(),
            timeout: Duration::from_secs(60),
            env: Vec::new(),
        }
    }

    /// The plugin binary for `type` (libcni's `FindInPath`).
    pub fn find(&self, ty: &str) -> anyhow::Result<PathBuf> {
        if ty.is_empty() || ty.contains('/') {
            bail!("invalid plugin type {ty:?}");
        }
        let p = self.path.join(ty);
        if !p.exists() {
            bail!(
                "failed to find plugin {ty:?} in path [{}]",
                self.path.display()
            );
        }
        Ok(p)
    }

    /// The config one entry of `list` gets (libcni's `buildOneConfig` +
    /// `injectRuntimeConfig`).
    pub fn build_config(
        list: &ConfList,
        plugin: &Value,
        prev: Option<&Value>,
        rt: &RuntimeConf,
    ) -> anyhow::Result<Value> {
        let mut conf = plugin
            .as_object()
            .cloned()
            .context("a plugin entry is not a JSON object")?;
        conf.insert("name".into(), json!(list.name));
        conf.insert("cniVersion".into(), json!(list.cni_version));
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        let mut rc = Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = rt.capability_args.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Ok(Value::Object(conf))
    }

    /// Execs one plugin (`command` ADD/DEL/CHECK/...) with `conf` on stdin; returns its
    /// stdout parsed (None if empty) and the call.
    pub fn exec(
        &self,
        command: &str,
        conf: &Value,
        rt: &RuntimeConf,
    ) -> anyhow::Result<(Option<Value>, Call)> {
        let ty = conf["type"].as_str().unwrap_or_default().to_owned();
        let bin = self.find(&ty)?;
        let ns = File::open(&self.netns)
            .with_context(|| format!("opening the runtime namespace {}", self.netns.display()))?;
        let ns_fd = ns.as_raw_fd();
        let mut c: Command = sys::cmd(&bin);
        // The bench's own settings must not leak into a plugin (`netns` reads NETNS_*
        // variables as defaults): only what the config says counts.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("NETNS_") {
                c.env_remove(k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &rt.container_id)
            .env("CNI_NETNS", &rt.netns)
            .env("CNI_ARGS", &rt.args)
            .env("CNI_IFNAME", &rt.ifname)
            .env("CNI_PATH", &self.path);
        // SAFETY: setns(2) is a plain system call, async-signal-safe; `ns` outlives the
        // spawn (it is dropped at the end of this function).
        unsafe {
            c.pre_exec(move || {
                setns(BorrowedFd::borrow_raw(ns_fd), CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
        let input = serde_json::to_vec(conf)?;
        let out = run_raw(&mut c, Some(&input), self.timeout)?;
        drop(ns);
        if !out.ok() {
            let err: Option<Value> = serde_json::from_str(out.stdout.trim()).ok();
            let field = |k: &str| {
                err.as_ref()
                    .and_then(|e| e.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            return Err(PluginError {
                plugin: ty,
                command: command.to_owned(),
                status: out.status.map_or_else(
                    || format!("timed out after {:?}", self.timeout),
                    |s| s.to_string(),
                ),
                code: err.as_ref().and_then(|e| e["code"].as_u64()),
                msg: field("msg"),
                details: field("details"),
                stdout: out.stdout,
                stderr: out.stderr,
            }
            .into());
        }
        let v = if out.stdout.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(out.stdout.trim()).with_context(|| {
                format!(
                    "CNI plugin {ty} {command}: stdout is not JSON: {}",
                    out.stdout.trim()
                )
            })?)
        };
        Ok((
            v,
            Call {
                plugin: ty,
                elapsed: out.elapsed,
                stderr: out.stderr.trim().to_owned(),
            },
        ))
    }

    /// ADD: the plugins in order, each getting the previous one's result.
    pub fn add_list(&self, list: &ConfList, rt: &RuntimeConf) -> anyhow::Result<Added> {
        let start = Instant::now();
        let mut prev: Option<Value> = None;
        let mut calls = Vec::new();
        for p in &list.plugins {
            let conf = Self::build_config(list, p, prev.as_ref(), rt)?;
            let (res, call) = self.exec("ADD", &conf, rt)?;
            let res =
                res.with_context(|| format!("CNI plugin {} ADD printed no result", call.plugin))?;
            calls.push(call);
            prev = Some(res);
        }
        Ok(Added {
            result: prev.context("empty plugin list")?,
            calls,
            elapsed: start.elapsed(),
        })
    }

    /// DEL: the plugins in reverse order, each getting `cached` (the ADD result) as
    /// prevResult. All plugins are called even if one fails (as a runtime retrying DEL
    /// would need them to be); the first error is returned.
    pub fn del_list(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        cached: Option<&Value>,
    ) -> anyhow::Result<(Vec<Call>, Duration)> {
        let start = Instant::now();
        let mut calls = Vec::new();
        let mut first_err = None;
        for p in list.plugins.iter().rev() {
            let conf = Self::build_config(list, p, cached, rt)?;
            match self.exec("DEL", &conf, rt) {
                Ok((_, call)) => calls.push(call),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((calls, start.elapsed())),
        }
    }
}

/// The first IPv4 address (CIDR) of a CNI result.
pub fn result_ip(result: &Value) -> Option<String> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|i| i["address"].as_str())
        .find(|a| !a.contains(':'))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> ConfList {
        ConfList {
            cni_version: "1.1.0".into(),
            name: "n".into(),
            plugins: vec![
                json!({"type": "bridge"}),
                json!({"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}),
            ],
        }
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let mut rt = RuntimeConf::new("c1", "/run/netns/x");
        rt.capability_args
            .insert("portMappings".into(), json!([{"hostPort": 1}]));
        rt.capability_args.insert("bandwidth".into(), json!({}));
        let l = list();
        let prev = json!({"cniVersion": "1.1.0", "ips": []});
        let a = Runtime::build_config(&l, &l.plugins[0], None, &rt).unwrap();
        assert_eq!(a["name"], "n");
        assert_eq!(a["cniVersion"], "1.1.0");
        assert!(a.get("runtimeConfig").is_none() && a.get("prevResult").is_none());
        let b = Runtime::build_config(&l, &l.plugins[1], Some(&prev), &rt).unwrap();
        assert_eq!(
            b["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 1}]})
        );
        assert_eq!(b["prevResult"], prev);
    }

    #[test]
    fn error_shows_msg() {
        let e = PluginError {
            plugin: "netns".into(),
            command: "ADD".into(),
            status: "exit status: 1".into(),
            code: Some(7),
            msg: Some("bad config".into()),
            details: Some("field ip".into()),
            stdout: String::new(),
            stderr: "noise".into(),
        };
        assert_eq!(
            e.to_string(),
            "CNI plugin netns ADD failed (exit status: 1): bad config [code 7] (field ip)"
        );
    }

    /// A fake plugin directory: `first` prints a result, `second` prints its own config
    /// back (so its prevResult shows), `bad` fails with error JSON, `mute` fails
    /// silently on stdout; every call is logged as "<type> <command>".
    fn fake_plugins() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("xtask-cni-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let log = d.join("log");
        let scripts = [
            (
                "first",
                r#"echo '{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/24"}]}'"#,
            ),
            (
                "second",
                r#"cat > "$0.$CNI_COMMAND.in"; cat "$0.$CNI_COMMAND.in""#,
            ),
            (
                "bad",
                r#"echo '{"cniVersion":"1.1.0","code":11,"msg":"no such bridge","details":"br9"}'; echo noise >&2; exit 1"#,
            ),
            ("mute", "echo 'it broke' >&2; exit 3"),
        ];
        for (name, body) in scripts {
            let p = d.join(name);
            fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME\" >> '{}'\n{body}\n",
                    log.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        d
    }

    fn runtime(d: &Path) -> Runtime {
        // The plugins enter our own namespace: nothing changes, the setns path runs.
        Runtime::new(d, Path::new("/proc/self/ns/net"))
    }

    use std::fs;

    #[test]
    fn chain_threads_prev_result_and_dels_in_reverse() {
        if !nix::unistd::getuid().is_root() {
            return; // setns needs CAP_SYS_ADMIN
        }
        let d = fake_plugins();
        let l = ConfList {
            cni_version: "1.1.0".into(),
            name: "n".into(),
            plugins: vec![
                json!({"type": "first"}),
                json!({"type": "second", "capabilities": {"portMappings": true}}),
            ],
        };
        let mut rt = RuntimeConf::new("c1", "/run/netns/none");
        rt.capability_args
            .insert("portMappings".into(), json!([{"hostPort": 8080}]));
        let r = runtime(&d);
        let added = r.add_list(&l, &rt).unwrap();
        assert_eq!(added.calls.len(), 2);
        // second's result is its own config: prevResult from first, runtimeConfig.
        assert_eq!(
            added.result["prevResult"]["ips"][0]["address"],
            "10.0.0.2/24"
        );
        assert_eq!(
            added.result["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert_eq!(
            result_ip(&added.result["prevResult"]).as_deref(),
            Some("10.0.0.2/24")
        );
        r.del_list(&l, &rt, Some(&added.result)).unwrap();
        let del_in: Value =
            serde_json::from_str(&fs::read_to_string(d.join("second.DEL.in")).unwrap()).unwrap();
        assert_eq!(del_in["prevResult"], added.result);
        let log = fs::read_to_string(d.join("log")).unwrap();
        assert_eq!(
            log,
            "first ADD c1 eth0\nsecond ADD c1 eth0\nsecond DEL c1 eth0\nfirst DEL c1 eth0\n"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn failures_show_the_plugin_msg() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let d = fake_plugins();
        let r = runtime(&d);
        let rt = RuntimeConf::new("c1", "/run/netns/none");
        let l = |t: &str| ConfList {
            cni_version: "1.1.0".into(),
            name: "n".into(),
            plugins: vec![json!({"type": "first"}), json!({"type": t})],
        };
        let e = r.add_list(&l("bad"), &rt).unwrap_err();
        let pe = e.downcast_ref::<PluginError>().unwrap();
        assert_eq!(pe.msg.as_deref(), Some("no such bridge"));
        assert_eq!(
            e.to_string(),
            "CNI plugin bad ADD failed (exit status: 1): no such bridge [code 11] (br9)"
        );
        let e = r.add_list(&l("mute"), &rt).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI plugin mute ADD failed (exit status: 3): it broke"
        );
        // DEL calls every plugin despite a failure, and reports the first.
        let e = r.del_list(&l("bad"), &rt, None).unwrap_err();
        assert!(e.to_string().contains("no such bridge"), "{e}");
        assert!(
            fs::read_to_string(d.join("log"))
                .unwrap()
                .ends_with("bad DEL c1 eth0\nfirst DEL c1 eth0\n")
        );
        let e = r.add_list(&l("missing"), &rt).unwrap_err();
        assert!(
            e.to_string().contains("failed to find plugin \"missing\""),
            "{e}"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn first_ipv4() {
        let r = json!({"ips": [{"address": "fd00::2/64"}, {"address": "172.19.0.2/16"}]});
        assert_eq!(result_ip(&r).as_deref(), Some("172.19.0.2/16"));
    }
}
