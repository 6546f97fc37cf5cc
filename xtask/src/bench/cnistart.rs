//! Workload 7: what a CNI runtime pays per container, ADD and DEL, netns's CNI mode
//! against the reference chain bridge + host-local + portmap, each with 1 and with 32
//! port mappings per container (four beds, side by side in one run).
//!
//! Each bed is its own private host namespace with an uplink to its own wan (the
//! harness's `host_and_wan`); the plugins run in it (see `cni::Runtime`), each
//! container is a fresh `ip netns add` namespace. Containers are added one after the
//! other and kept, so the bridge, the iptables rules or the maps grow as in real use;
//! then deleted in the order they were added. The four beds take turns at every step,
//! so drift hits all alike. Container 0 of each bed is a warm-up: its ADD (bridge,
//! datapath, iptables chains made) and its DEL (the last) are reported apart, and it is
//! checked for a working port forward (wan → uplink:hostPort → container:80).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use netns_tests::NamedNetns;
use netns_tests::topo::{UPLINK, host_and_wan};
use serde_json::{Value, json};

use super::cni::{ConfList, Runtime, RuntimeConf, result_ip};
use super::report::{CniRow, Results, fmt_secs};
use super::sys::{self, Bg, check, in_ns, run_to};
use super::topo::{GW, SUBNET, UPLINK_IP};

/// The reference plugins.
const REF_DIR: &str = "/usr/lib/cni";
/// Mappings per container in the two series.
pub const MAPPINGS: [usize; 2] = [1, 32];
/// First host port; container i, mapping j gets FIRST_PORT + i × mappings + j (below
/// netns's default masquerade range 61000-65535).
const FIRST_PORT: u16 = 20000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Netns,
    Reference,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Netns => "netns CNI",
            Side::Reference => "bridge + host-local + portmap",
        }
    }
    fn letter(self) -> char {
        match self {
            Side::Netns => 'k',
            Side::Reference => 'r',
        }
    }
}

/// The bpffs directory of a netns bed (removed at the end; by `stale` after a kill).
fn bpffs_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("netns-bench-{prefix}"))
}

/// Removes the bpffs directories a killed run `tag` left (its namespaces and temporary
/// directory are removed by the caller).
pub fn stale(tag: &str) {
    let p = format!("netns-bench-{tag}{}", Side::Netns.letter());
    if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&p) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

struct Ctr {
    rt: RuntimeConf,
    /// The ADD result (libcni's cache), given to DEL as prevResult.
    cached: Option<Value>,
    ns: NamedNetns,
}

/// Samples of one bed (seconds).
#[derive(Default)]
struct Samples {
    add: Vec<f64>,
    del: Vec<f64>,
    first_add: Option<f64>,
    last_del: Option<f64>,
    /// Per plugin type: ADD and DEL samples of the measured containers.
    plugins: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
    /// The first thing a plugin logged on a successful call (and which call).
    stderr: Option<String>,
}

struct Bed {
    side: Side,
    mappings: usize,
    prefix: String,
    list: ConfList,
    runtime: Runtime,
    /// Attached (or being attached) containers, DEL'd on drop.
    ctrs: Vec<Option<Ctr>>,
    /// The first failure; the bed is skipped from then on.
    err: Option<String>,
    s: Samples,
    bpffs: Option<PathBuf>,
    /// netns only: the NETNS_* fallback directories (state, bpffs) of `Runtime::env`.
    decoy: Option<(PathBuf, PathBuf)>,
    state: PathBuf,
    bin: PathBuf,
    wan: NamedNetns,
    host: NamedNetns,
}

impl Bed {
    fn new(
        side: Side,
        mappings: usize,
        tag: &str,
        tmp: &Path,
        plugin_dir: &Path,
        bin: &Path,
    ) -> anyhow::Result<Bed> {
        let prefix = format!("{tag}{}{mappings}", side.letter());
        let (host, wan) = host_and_wan(&prefix, sys::spawner)?;
        // A host with containers forwards (both plugins would turn it on too).
        host.sysctl("net.ipv4.ip_forward=1")?;
        let dir = tmp.join(&prefix);
        fs::create_dir_all(&dir)?;
        let state = dir.join("state");
        let (list, bpffs) = match side {
            Side::Netns => {
                let bpffs = bpffs_dir(&prefix);
                let list = ConfList {
                    cni_version: "1.1.0".into(),
                    name: format!("{prefix}net"),
                    plugins: vec![json!({
                        "type": "netns",
                        "bridge": "nsbr0",
                        "ip": format!("{GW}/16"),
                        "uplink": UPLINK,
                        "stateDir": state,
                        "bpffsDir": bpffs,
                        "cgroup": "none",
                        "capabilities": {"portMappings": true},
                    })],
                };
                (list, Some(bpffs))
            }
            Side::Reference => {
                let list = ConfList {
                    // The newest version Debian's plugins (1.1.1) speak.
                    cni_version: "1.0.0".into(),
                    name: format!("{prefix}net"),
                    plugins: vec![
                        json!({
                            "type": "bridge",
                            "bridge": "refbr0",
                            "isGateway": true,
                            "ipMasq": true,
                            "ipam": {
                                "type": "host-local",
                                "subnet": SUBNET,
                                "routes": [{"dst": "0.0.0.0/0"}],
                                // host-local's default (/var/lib/cni/networks) is
                                // machine-wide.
                                "dataDir": dir.join("ipam"),
                            },
                        }),
                        json!({
                            "type": "portmap",
                            "capabilities": {"portMappings": true},
                            "snat": true,
                        }),
                    ],
                };
                (list, None)
            }
        };
        let mut runtime = Runtime::new(plugin_dir, Path::new(&host.path()));
        let decoy = (side == Side::Netns)
            .then(|| (dir.join("env-state"), bpffs_dir(&format!("{prefix}env"))));
        if let Some((state, bpffs)) = &decoy {
            // A safety net: should `netns` ignore the config's directories (or not be a
            // CNI plugin at all and run as a hook), it falls back to these NETNS_*
            // defaults, private too. Being other directories than the config's, they
            // also tell (`check_decoy`) when that happened.
            runtime.env = vec![
                ("NETNS_STATE_DIR".into(), state.display().to_string()),
                ("NETNS_BPFFS_DIR".into(), bpffs.display().to_string()),
                ("NETNS_CGROUP".into(), "none".into()),
                ("NETNS_UPLINK".into(), UPLINK.into()),
            ];
        }
        Ok(Bed {
            side,
            mappings,
            prefix,
            list,
            runtime,
            ctrs: Vec::new(),
            err: None,
            s: Samples::default(),
            bpffs,
            decoy,
            state,
            bin: bin.to_owned(),
            wan,
            host,
        })
    }

    fn label(&self) -> String {
        format!(
            "{}, {} mapping{}",
            self.side.label(),
            self.mappings,
            if self.mappings == 1 { "" } else { "s" }
        )
    }

    fn host_port(&self, i: usize, j: usize) -> u16 {
        FIRST_PORT + (i * self.mappings + j) as u16
    }

    fn port_mappings(&self, i: usize) -> Value {
        (0..self.mappings)
            .map(|j| {
                json!({
                    "hostPort": self.host_port(i, j),
                    "containerPort": 80 + j,
                    "protocol": "tcp",
                    "hostIP": "",
                })
            })
            .collect()
    }

    /// ADD container `i` (a fresh namespace); checks the result's address is on eth0.
    fn add(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = NamedNetns::create(&format!("{}c{i}", self.prefix), sys::spawner)?;
        let mut rt = RuntimeConf::new(&format!("{}c{i}", self.prefix), &ns.path());
        rt.capability_args
            .insert("portMappings".into(), self.port_mappings(i));
        // Registered before ADD: a half-done ADD is DEL'd on drop too.
        self.ctrs.push(Some(Ctr {
            rt: rt.clone(),
            cached: None,
            ns,
        }));
        let added = self.runtime.add_list(&self.list, &rt)?;
        self.note_stderr("ADD", i, &added.calls);
        let secs = added.elapsed.as_secs_f64();
        if i == 0 {
            self.s.first_add = Some(secs);
        } else {
            self.s.add.push(secs);
            for c in &added.calls {
                let e = self.s.plugins.entry(c.plugin.clone()).or_default();
                e.0.push(c.elapsed.as_secs_f64());
            }
        }
        let ip = result_ip(&added.result)
            .with_context(|| format!("ADD result without an IPv4 address: {}", added.result))?;
        let c = self
            .ctrs
            .last_mut()
            .and_then(Option::as_mut)
            .expect("pushed");
        c.cached = Some(added.result);
        let shown = c.ns.try_ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        let addr = ip.split('/').next().unwrap_or_default();
        if !shown.contains(&format!("inet {addr}/")) {
            bail!(
                "container {i}: the result says {ip}, eth0 has: {}",
                shown.trim()
            );
        }
        Ok(())
    }

    /// DEL container `i`; checks its eth0 is gone.
    fn del(&mut self, i: usize) -> anyhow::Result<()> {
        let c = self.ctrs[i].take().context("container not attached")?;
        let (calls, el) = self
            .runtime
            .del_list(&self.list, &c.rt, c.cached.as_ref())?;
        self.note_stderr("DEL", i, &calls);
        let secs = el.as_secs_f64();
        if i == 0 {
            self.s.last_del = Some(secs);
        } else {
            self.s.del.push(secs);
            for call in &calls {
                let e = self.s.plugins.entry(call.plugin.clone()).or_default();
                e.1.push(call.elapsed.as_secs_f64());
            }
        }
        if c.ns.try_ip(&["link", "show", "dev", "eth0"]).is_ok() {
            bail!("container {i}: eth0 still there after DEL");
        }
        Ok(())
    }

    /// wan → uplink:hostPort(i, j) reaches a server on container i's port 80 + j, for
    /// the first and the last mapping.
    fn check_forward(&self, i: usize, self_exe: &Path) -> anyhow::Result<()> {
        let c = self.ctrs[i].as_ref().context("container not attached")?;
        let mut js = vec![0, self.mappings - 1];
        js.dedup();
        for j in js {
            let (hp, cp) = (self.host_port(i, j), 80 + j);
            let log = self.state.with_file_name(format!("server-{i}-{cp}.log"));
            let mut srv = Bg::spawn(
                in_ns(&c.ns.path(), self_exe).args(["bench", "__conn-server", &cp.to_string()]),
                &log,
            )?;
            std::thread::sleep(Duration::from_millis(150));
            srv.ensure_alive()?;
            let out = sys::run(self.wan.cmd(self_exe).args([
                "bench",
                "__conn-client",
                &format!("{UPLINK_IP}:{hp}"),
                "0.3",
                "1",
            ]))?;
            let conns: u64 = out
                .split_whitespace()
                .find_map(|w| w.strip_prefix("conns="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if conns == 0 {
                bail!(
                    "no connection through the port forward {UPLINK_IP}:{hp} → container {i}:{cp} ({})",
                    out.trim()
                );
            }
        }
        Ok(())
    }

    /// `netns <this bed's directories and network> ARGS` in the host namespace.
    fn netns_cmd(&self, state: &Path, bpffs: &Path, args: &[&str]) -> std::process::Command {
        let mut c = self.host.cmd(&self.bin);
        c.arg("--state-dir")
            .arg(state)
            .arg("--bpffs-dir")
            .arg(bpffs)
            .args(["--uplink", UPLINK, "--bridge", "nsbr0", "--cgroup", "none"])
            .args(["--ip", &format!("{GW}/16")])
            .args(args);
        c
    }

    /// Leftovers after every DEL: host-local leases, DNAT rules; containers netns
    /// still lists.
    fn check_clean(&self) -> anyhow::Result<()> {
        self.check_decoy()?;
        if let Some(b) = &self.bpffs {
            // Only a listing that works counts (the CLI may not read what CNI mode keeps).
            if let Ok(out) = run_to(
                &mut self.netns_cmd(&self.state, b, &["ls", "--json"]),
                Duration::from_secs(20),
            ) && let Ok(Value::Array(a)) = serde_json::from_str::<Value>(&out.stdout)
                && !a.is_empty()
            {
                bail!(
                    "`netns ls` still lists {} containers after every DEL",
                    a.len()
                );
            }
        }
        if self.side == Side::Reference {
            let nat = sys::run(self.host.cmd("iptables").args(["-w", "-t", "nat", "-S"]))?;
            let dnat = nat.lines().filter(|l| l.contains("-j DNAT")).count();
            if dnat != 0 {
                bail!("{dnat} DNAT rules left after every DEL");
            }
            let ipam = self.state.with_file_name("ipam").join(&self.list.name);
            let leases = fs::read_dir(&ipam)
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("172."))
                        .count()
                })
                .unwrap_or(0);
            if leases != 0 {
                bail!("{leases} host-local leases left in {}", ipam.display());
            }
        }
        Ok(())
    }

    /// The plugin must have used the config's directories, not the NETNS_* fallbacks.
    fn check_decoy(&self) -> anyhow::Result<()> {
        if let Some((state, bpffs)) = &self.decoy {
            for d in [state, bpffs] {
                if fs::read_dir(d).is_ok_and(|mut r| r.next().is_some()) {
                    bail!(
                        "the plugin wrote to {} (a NETNS_* variable), not to the config's stateDir/bpffsDir",
                        d.display()
                    );
                }
            }
        }
        Ok(())
    }

    fn note_stderr(&mut self, cmd: &str, i: usize, calls: &[super::cni::Call]) {
        if self.s.stderr.is_none()
            && let Some(c) = calls.iter().find(|c| !c.stderr.is_empty())
        {
            let first = c.stderr.lines().next().unwrap_or_default();
            self.s.stderr = Some(format!(
                "{} {cmd} of container {i} logged: {first}",
                c.plugin
            ));
        }
    }

    fn fail(&mut self, what: &str, e: &anyhow::Error) {
        let msg = format!("{what}: {e:#}");
        eprintln!("  {}: {msg}", self.label());
        self.err.get_or_insert(msg);
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Whatever is still attached, newest first; errors are moot now.
        for c in self.ctrs.iter_mut().rev().filter_map(Option::take) {
            let _ = self.runtime.del_list(&self.list, &c.rt, c.cached.as_ref());
        }
        let dirs = self
            .bpffs
            .iter()
            .map(|b| (&self.state, b))
            .chain(self.decoy.iter().map(|(s, b)| (s, b)));
        for (state, b) in dirs {
            if b.exists() {
                let _ = run_to(
                    &mut self.netns_cmd(state, b, &["datapath", "unload"]),
                    Duration::from_secs(20),
                );
            }
            let _ = fs::remove_dir_all(b);
        }
    }
}

/// The private `CNI_PATH`: the reference plugins and `netns` under its CNI type name.
fn plugin_dir(tmp: &Path, bin: &Path) -> anyhow::Result<PathBuf> {
    let d = tmp.join("cni-bin");
    fs::create_dir_all(&d)?;
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        std::os::unix::fs::symlink(Path::new(REF_DIR).join(p), d.join(p))?;
    }
    if bin.exists() {
        std::os::unix::fs::symlink(bin, d.join("netns"))?;
    }
    Ok(d)
}

/// Runs workload 7 with `count` measured containers per bed (plus the warm-up one).
pub fn run(
    count: usize,
    bin: &Path,
    self_exe: &Path,
    tag: &str,
    tmp: &Path,
    res: &mut Results,
) -> anyhow::Result<()> {
    for p in ["bridge", "host-local", "portmap"] {
        if !Path::new(REF_DIR).join(p).exists() {
            bail!(
                "{REF_DIR}/{p} is missing (`cargo xtask setup` installs containernetworking-plugins)"
            );
        }
    }
    netns_tests::topo::ensure_bpffs()?;
    // Absolute: the plugin directory links to it.
    let bin = &fs::canonicalize(bin).unwrap_or_else(|_| bin.to_owned());
    let dir = plugin_dir(tmp, bin)?;
    let mut beds = Vec::new();
    for m in MAPPINGS {
        for side in [Side::Netns, Side::Reference] {
            check()?;
            let mut b = Bed::new(side, m, tag, tmp, &dir, bin)?;
            if side == Side::Netns && !bin.exists() {
                b.err = Some(format!("{} does not exist", bin.display()));
            }
            beds.push(b);
        }
    }
    for i in 0..=count {
        for b in beds.iter_mut().filter(|b| b.err.is_none()) {
            check()?;
            if let Err(e) = b.add(i) {
                b.fail(&format!("ADD of container {i}"), &e);
                continue;
            }
            if i == 0
                && let Err(e) = b.check_decoy().and_then(|_| b.check_forward(0, self_exe))
            {
                b.fail("after the first ADD", &e);
            }
        }
        if i == 0 || i == count || i % 10 == 0 {
            let line: Vec<String> = beds
                .iter()
                .map(|b| {
                    let last = if i == 0 {
                        b.s.first_add
                    } else {
                        b.s.add.last().copied()
                    };
                    match (&b.err, last) {
                        (Some(_), _) => format!("{}: failed", b.label()),
                        (None, Some(v)) => format!("{}: {}", b.label(), fmt_secs(v)),
                        (None, None) => format!("{}: –", b.label()),
                    }
                })
                .collect();
            println!("  ADD {i}/{count}: {}", line.join("; "));
        }
    }
    // Oldest first; the warm-up container last (its DEL is the bed's last).
    for i in (1..=count).chain([0]) {
        // A failed bed is left to its drop (DEL of what is attached, unmeasured).
        for b in beds.iter_mut().filter(|b| b.err.is_none()) {
            check()?;
            if b.ctrs.get(i).is_none_or(Option::is_none) {
                continue;
            }
            if let Err(e) = b.del(i) {
                b.fail(&format!("DEL of container {i}"), &e);
            }
        }
    }
    for b in beds.iter_mut().filter(|b| b.err.is_none()) {
        if let Err(e) = b.check_clean() {
            b.fail("after the DELs", &e);
        }
    }
    for b in &beds {
        let plugins = if b.list.plugins.len() > 1 {
            b.s.plugins
                .iter()
                .map(|(k, (a, d))| (k.clone(), a.clone(), d.clone()))
                .collect()
        } else {
            vec![]
        };
        res.cni.push(CniRow {
            label: b.side.label().to_owned(),
            netns: b.side == Side::Netns,
            mappings: b.mappings,
            add: b.s.add.clone(),
            del: b.s.del.clone(),
            first_add: b.s.first_add,
            last_del: b.s.last_del,
            plugins,
            err: b.err.clone(),
            note: [match b.side {
                Side::Netns => "one plugin; first ADD loads the datapath",
                Side::Reference => "first ADD makes the bridge and iptables chains",
            }
            .to_owned()]
            .into_iter()
            .chain(b.s.stderr.clone())
            .collect::<Vec<_>>()
            .join("; "),
        });
        println!(
            "  {}: ADD p50 {}, DEL p50 {}{}",
            b.label(),
            sys::median(&b.s.add).map_or("n/a".into(), fmt_secs),
            sys::median(&b.s.del).map_or("n/a".into(), fmt_secs),
            b.err
                .as_ref()
                .map_or(String::new(), |e| format!(" (stopped: {e})"))
        );
    }
    Ok(())
}
