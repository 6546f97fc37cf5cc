//! `cargo xtask bench`: eBPF vs iptables vs no NAT, side by side (issue 6, issue 12).
//!
//! Five private topologies (see `topo`), each workload run against the five in turn
//! (no NAT, iptables, eBPF, eBPF fast path, floor, no NAT, ...) for several rounds;
//! medians and ratios to no NAT and to the floor are printed and written to
//! docs/BENCHMARKS.md.
//! Workload 7 (CNI ADD + DEL, `cnistart`) has private host namespaces of its own and
//! runs first, before the topologies are built.
//! Nothing runs in the root network namespace: every namespace is `nb<pid>…`, made
//! here and deleted at the end, also on error or Ctrl-C (and, should xtask be killed,
//! by the next run: see `cleanup_stale`). No timing assertions: this is a report.

mod cni;
mod cnistart;
mod connrate;
mod ctfill;
mod report;
mod sys;
mod topo;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;

use report::{Metric, Results, fmt_secs};
use sys::run as sh_run;
use sys::{Bg, check, run_raw, run_to};
use topo::{
    BASE_MAPPINGS, CTR_TCP, CTR_TCP_PP, CTR_TCP6, CTR_UDP, Cni, FWD_TCP, FWD_TCP_PP, FWD_TCP6,
    FWD_UDP, Kind, Topo, UPLINK_IP, UPLINK_IP6, WAN_IP, WAN_IP6, WAN_IPERF, WAN_IPERF6, WAN_UDP,
};

#[derive(Parser, Debug)]
#[command(
    name = "xtask bench",
    about = "eBPF vs iptables vs no NAT, side by side (writes docs/BENCHMARKS.md)"
)]
struct Opts {
    /// Interleaved rounds per workload (medians over these).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measurement (sockperf, iperf3, connection rate).
    #[arg(long, default_value_t = 2)]
    duration: u64,
    /// Container starts for workload 6 (each: netns prestart+poststop, CNI ADD+DEL),
    /// with an empty conntrack table and again with 60,000 entries (`--only start`
    /// runs workload 6 alone).
    #[arg(long, default_value_t = 50)]
    starts: usize,
    /// Containers per row of workload 7 (CNI ADD + DEL: netns's plugin vs bridge +
    /// host-local + portmap, 1 and 32 port mappings each), all kept until the last is
    /// added (`--only cni` runs workload 7 alone).
    #[arg(long, default_value_t = 30)]
    cni_containers: usize,
    /// Repetitions of each batch install in workload 5.
    #[arg(long, default_value_t = 3)]
    install_reps: usize,
    /// Cap on single `iptables` calls timed in workload 5 (the rest is extrapolated).
    #[arg(long, default_value_t = 1000)]
    one_by_one: usize,
    /// sockperf ping-pong with blocking sockets (default: --nonblocked on both ends, so
    /// that idle-CPU wake-ups, tens of µs in a VM, do not swamp the path's cost).
    #[arg(long)]
    blocking_latency: bool,
    /// Client threads of the connection-rate tool (2 keeps both CPUs of a small VM busy,
    /// so idle wake-ups do not dominate).
    #[arg(long, default_value_t = 2)]
    conn_threads: usize,
    /// 1 round of 1 s, 10 starts, 200 single iptables calls: a smoke run (~1.5 min).
    #[arg(long)]
    quick: bool,
    /// Use target/release/netns as it is (no `cargo build --release -p netns-user`).
    #[arg(long)]
    no_build: bool,
    /// The netns binary to benchmark [default: target/release/netns].
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where to write the report [default: docs/BENCHMARKS.md].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print only; leave docs/BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// Skip measuring the eBPF programs' run time per packet (BPF_ENABLE_STATS, on
    /// only while measuring) during extra 64 B UDP runs of both eBPF topologies.
    #[arg(long)]
    no_profile: bool,
    /// With the profile: a system-wide `perf record -a -g` beside each profiled run,
    /// written to DIR/<topology letter>-<out|in|c2c>.data (`perf report -i ...`).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Comma-separated subset of: latency,tcprr,udp,c2c,tcp,conn,ipv6,install,start,cni [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl Opts {
    fn wants(&self, w: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == w)
    }
}

/// A topology with its long-running servers (the UDP servers are started per
/// measurement: see `udp_server`).
struct Bed {
    t: Topo,
    /// The IPv6 port forward of workload 8 is in place.
    fwd6: bool,
}

impl Bed {
    fn kind(&self) -> Kind {
        self.t.kind
    }
    fn ctr_ip(&self) -> &str {
        &self.t.ctrs[0].ip
    }
    /// Where wan reaches container a's `ctr_port`: the port forward, or (no NAT) directly.
    fn inbound(&self, fwd_port: u16, ctr_port: u16) -> (String, u16) {
        if self.kind().direct() {
            (self.ctr_ip().to_owned(), ctr_port)
        } else {
            (UPLINK_IP.to_owned(), fwd_port)
        }
    }
}

/// The run's temporary directory (`/tmp/netns-bench-<pid>`), also the marker by which a
/// later run recognises leftovers of a killed one.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const RUN_DIR_PREFIX: &str = "netns-bench-";

/// Removes what a killed earlier run (its pid is gone) left: its namespaces
/// `nb<pid><letter>…`, pins, cgroup and temporary directory.
fn cleanup_stale() {
    let Ok(rd) = fs::read_dir("/tmp") else { return };
    let netns_list = fs::read_dir("/run/netns")
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(RUN_DIR_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if sys::pid_alive(pid) {
            continue;
        }
        let tag = format!("nb{pid}");
        eprintln!("removing leftovers of an earlier benchmark run ({tag})");
        cnistart::stale(&tag);
        for ns in &netns_list {
            if ns
                .strip_prefix(&tag)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()))
            {
                let _ = sh_run(sys::cmd("ip").args(["netns", "del", ns]));
            }
        }
        for k in [Kind::Ebpf, Kind::EbpfFast] {
            let ntag = Topo::netns_tag(&tag, k);
            let _ = fs::remove_dir_all(topo::bpffs_dir(&ntag));
            let state = e.path().join(k.letter().to_string()).join("state");
            for p in netns_tests::util::pids_with_arg(&state.display().to_string()) {
                sys::terminate_pid(p);
            }
            if let Some(cg) = topo::cgroup_dir(&ntag) {
                let _ = fs::remove_dir(cg);
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    // Helper modes, run by the benchmark itself inside its namespaces.
    match args.first().map(String::as_str) {
        Some("__conn-server") => {
            let addr = args.get(2).map_or("0.0.0.0", String::as_str);
            return connrate::server(addr, args.get(1).context("port")?.parse()?);
        }
        Some("__conn-client") => {
            let addr = args.get(1).context("addr")?;
            let secs: f64 = args.get(2).context("secs")?.parse()?;
            let threads: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
            return connrate::client(addr, secs, threads);
        }
        _ => {}
    }
    let mut o =
        Opts::parse_from(std::iter::once("xtask bench".to_owned()).chain(args.iter().cloned()));
    if o.quick {
        o.rounds = 1;
        o.duration = 1;
        o.starts = 10;
        o.cni_containers = 8;
        o.install_reps = 1;
        o.one_by_one = 200;
    }
    o.duration = o.duration.max(1);
    o.rounds = o.rounds.max(1);
    o.one_by_one = o.one_by_one.clamp(10, 5000);
    preflight()?;
    crate::signals::install()?;
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => {
            if !o.no_build {
                crate::cargo(&["build", "--release", "-p", "netns-user", "--bins"])?;
            }
            crate::binary(true)
        }
    };
    cleanup_stale();
    let pid = std::process::id();
    let tag = format!("nb{pid}");
    let dir = RunDir(std::env::temp_dir().join(format!("{RUN_DIR_PREFIX}{pid}")));
    fs::create_dir_all(&dir.0)?;
    let started = Instant::now();
    let load_before = loadavg();
    let mut res = Results::default();
    let outcome = bench(&o, &bin, &tag, &dir.0, &mut res);
    let elapsed = started.elapsed();
    if let Err(e) = &outcome {
        if sys::interrupted() {
            eprintln!("\ninterrupted: cleaning up (namespaces {tag}*)");
            return Err(anyhow::anyhow!("interrupted"));
        }
        eprintln!("\nbenchmark stopped early: {e:#}");
        res.notes.push(format!("The run stopped early: {e:#}"));
    }
    let load = format!("{} at the start, {} at the end", load_before, loadavg());
    let doc = document(&o, &bin, &res, elapsed, &load);
    println!("\n{doc}");
    if !o.no_write && outcome.is_ok() {
        let path = o
            .output
            .clone()
            .unwrap_or_else(|| crate::root().join("docs/BENCHMARKS.md"));
        let kept = fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i..].to_owned()));
        let full = match kept {
            Some(k) => format!("{doc}\n{k}"),
            None => format!("{doc}\n{KEEP_MARKER}\n"),
        };
        fs::write(&path, full).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    outcome
}

const KEEP_MARKER: &str = "<!-- Everything below this line is hand-written and kept when `cargo xtask bench` rewrites the file. -->";

fn preflight() -> anyhow::Result<()> {
    if !nix::unistd::getuid().is_root() {
        bail!("the benchmark needs root (network namespaces, bpffs)");
    }
    let mut missing = Vec::new();
    for t in [
        "ip",
        "nsenter",
        "unshare",
        "sockperf",
        "iperf3",
        "iptables",
        "iptables-restore",
    ] {
        if sh_run(sys::cmd("sh").args(["-c", &format!("command -v {t}")])).is_err() {
            missing.push(t);
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (`cargo xtask setup` installs them)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn step(s: &str) {
    println!("\x1b[1;34m== {s}\x1b[0m");
}

/// Workloads that need the five topologies (workload 7 has beds of its own).
const TOPOLOGY_WORKLOADS: [&str; 9] = [
    "latency", "tcprr", "udp", "c2c", "tcp", "conn", "ipv6", "install", "start",
];

fn bench(o: &Opts, bin: &Path, tag: &str, tmp: &Path, res: &mut Results) -> anyhow::Result<()> {
    let self_exe = std::env::current_exe()?;
    // First, while nothing else of ours runs.
    if o.wants("cni") {
        step(&format!(
            "workload 7: CNI ADD + DEL, {} containers per row",
            o.cni_containers
        ));
        let r = cnistart::run(o.cni_containers.max(1), bin, &self_exe, tag, tmp, res);
        if let Err(e) = r {
            if sys::interrupted() {
                return Err(e);
            }
            eprintln!("  workload 7: {e:#}");
            res.notes
                .push(format!("7. CNI workload failed: {}", first_line(&e)));
        }
    }
    if !TOPOLOGY_WORKLOADS.iter().any(|w| o.wants(w)) {
        return Ok(());
    }
    step(&format!("building five topologies ({tag}*)"));
    let mut beds: Vec<Bed> = Vec::new();
    for k in Kind::ALL {
        check()?;
        let t = match k {
            Kind::NoNat => Topo::no_nat(tag, tmp),
            Kind::Iptables => Topo::iptables(tag, tmp),
            Kind::Floor => Topo::floor(tag, tmp),
            Kind::Ebpf | Kind::EbpfFast => {
                if bin.exists() {
                    Topo::ebpf(tag, tmp, bin, k == Kind::EbpfFast)
                } else {
                    Err(anyhow::anyhow!("{} does not exist", bin.display()))
                }
            }
        };
        let optional = !matches!(k, Kind::NoNat | Kind::Iptables);
        let t = match t {
            Ok(t) => t,
            Err(e) if optional => {
                eprintln!("{} topology unavailable: {e:#}", k.label());
                let why = format!("{} topology failed: {}", k.label(), first_line(&e));
                for m in Metric::ALL {
                    res.na(m, k, "topology failed");
                }
                res.notes.push(why);
                continue;
            }
            Err(e) => return Err(e),
        };
        match start_servers(t, &self_exe) {
            Ok(b) => beds.push(b),
            Err(e) if optional => {
                eprintln!("{} servers failed: {e:#}", k.label());
                res.notes
                    .push(format!("{}: servers failed: {}", k.label(), first_line(&e)));
            }
            Err(e) => return Err(e),
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    // Connectivity check (also warms ARP/neighbour entries): a bed that does not pass
    // traffic is reported n/a instead of measured as zero.
    step("connectivity check");
    let mut i = 0;
    while i < beds.len() {
        check()?;
        match smoke(&mut beds[i], &self_exe) {
            Ok(()) => {
                println!("  {}: ok", beds[i].kind().label());
                i += 1;
            }
            Err(e) if !matches!(beds[i].kind(), Kind::NoNat | Kind::Iptables) => {
                let k = beds[i].kind();
                eprintln!("  {}: {e:#}", k.label());
                for m in Metric::ALL {
                    res.na(m, k, "no connectivity");
                }
                res.notes.push(format!(
                    "{}: connectivity check failed: {}",
                    k.label(),
                    first_line(&e)
                ));
                beds.remove(i);
            }
            Err(e) => return Err(e.context(format!("{} topology", beds[i].kind().label()))),
        }
    }

    // Control-plane costs first, on a datapath whose conntrack table is still empty;
    // measured again (briefly) after the traffic, when the table is full.
    let cni = if o.wants("start") && Path::new("/usr/lib/cni/bridge").exists() {
        Some(Cni::new(tag, tmp)?)
    } else {
        None
    };
    if o.wants("start") {
        step(&format!(
            "workload 6: container network start, {} times each",
            o.starts
        ));
        // The connectivity check left flows: an empty table means flushed.
        if let Some(b) = beds.iter().find(|b| b.kind() == Kind::Ebpf) {
            let r = b.t.netns_run(&["conntrack", "flush"]).and_then(|_| {
                let n = ctfill::entries(b.t.netns()?)?;
                if n != 0 {
                    bail!("{n} entries left");
                }
                Ok(())
            });
            if let Err(e) = r {
                res.notes.push(format!(
                    "6. flushing conntrack before the starts failed: {}",
                    first_line(&e)
                ));
            }
        }
        let empty = starts(o.starts, "", cni.as_ref(), tag, &beds, res)?;
        if let Some(b) = beds.iter().find(|b| b.kind() == Kind::Ebpf) {
            step(&format!(
                "workload 6: the same with {} conntrack entries",
                report::thousands(FULL_TABLE_PAIRS as u64 * 2)
            ));
            if let Err(e) = full_table_starts(o.starts, &empty, cni.as_ref(), tag, b, &beds, res) {
                eprintln!("  full-table starts: {e:#}");
                res.notes.push(format!(
                    "6. starts with a full conntrack table failed: {}",
                    first_line(&e)
                ));
            }
        }
    }
    if o.wants("install") {
        step("workload 5: installing 10,000 port mappings");
        install(o, &mut beds, res)?;
    }

    let d = o.duration;
    if o.wants("latency")
        || o.wants("tcprr")
        || o.wants("udp")
        || o.wants("c2c")
        || o.wants("tcp")
        || o.wants("conn")
        || o.wants("ipv6")
    {
        for r in 1..=o.rounds {
            step(&format!(
                "round {r}/{}: workloads 1-4 (1 mapping)",
                o.rounds
            ));
            for b in beds.iter_mut() {
                check()?;
                b.t.check_servers()?;
                let k = b.kind();
                let mut line = format!("  {:8}", k.label());
                if o.wants("latency") {
                    let (p50, p99) = latency(b, false, d, o.blocking_latency)?;
                    res.push(Metric::LatOutP50, k, p50);
                    res.push(Metric::LatOutP99, k, p99);
                    let (i50, i99) = latency(b, true, d, o.blocking_latency)?;
                    res.push(Metric::LatInP50, k, i50);
                    res.push(Metric::LatInP99, k, i99);
                    let _ = write!(line, " lat out {p50:.1}/{p99:.1} in {i50:.1}/{i99:.1} µs;");
                }
                if o.wants("tcprr") {
                    let (p50, p99) = tcp_rr(b, false, d, o.blocking_latency)?;
                    res.push(Metric::TcpRrOutP50, k, p50);
                    res.push(Metric::TcpRrOutP99, k, p99);
                    let (i50, i99) = tcp_rr(b, true, d, o.blocking_latency)?;
                    res.push(Metric::TcpRrInP50, k, i50);
                    res.push(Metric::TcpRrInP99, k, i99);
                    let _ = write!(
                        line,
                        " tcp rr out {p50:.1}/{p99:.1} in {i50:.1}/{i99:.1} µs;"
                    );
                }
                if o.wants("udp") {
                    let out = udp_rate(b, false, d)?;
                    let inb = udp_rate(b, true, d)?;
                    res.push(Metric::UdpOut, k, out);
                    res.push(Metric::UdpIn, k, inb);
                    let _ = write!(line, " udp {:.0}k/{:.0}k msg/s;", out / 1e3, inb / 1e3);
                }
                if o.wants("c2c") {
                    if b.t.ctrs.len() < 2 {
                        res.na(Metric::UdpC2c, k, "one container");
                    } else {
                        let r = c2c_rate(b, d)?;
                        res.push(Metric::UdpC2c, k, r);
                        let _ = write!(line, " c2c {:.0}k msg/s;", r / 1e3);
                    }
                }
                if o.wants("tcp") {
                    let up = iperf(b, false, d)?;
                    let down = iperf(b, true, d)?;
                    res.push(Metric::TcpUp, k, up);
                    res.push(Metric::TcpDown, k, down);
                    let _ = write!(line, " tcp {up:.2}/{down:.2} Gbit/s;");
                }
                if o.wants("conn") {
                    let c = conn_rate(b, &self_exe, d, o.conn_threads)?;
                    res.push(Metric::Conn1, k, c);
                    let _ = write!(line, " conn {c:.0}/s");
                }
                if o.wants("ipv6") {
                    if b.t.ctrs[0].ip6.is_none() {
                        for m in [
                            Metric::Udp6Out,
                            Metric::Tcp6Up,
                            Metric::Tcp6Down,
                            Metric::Conn6,
                        ] {
                            res.na(m, k, "IPv4 only");
                        }
                    } else {
                        let udp = iperf6(b, false, true, d)?;
                        let up = iperf6(b, false, false, d)?;
                        let down = iperf6(b, true, false, d)?;
                        let conn = conn6_rate(b, &self_exe, d, o.conn_threads)?;
                        res.push(Metric::Udp6Out, k, udp);
                        res.push(Metric::Tcp6Up, k, up);
                        res.push(Metric::Tcp6Down, k, down);
                        res.push(Metric::Conn6, k, conn);
                        let _ = write!(
                            line,
                            " ipv6 udp {:.0}k msg/s tcp {up:.2}/{down:.2} Gbit/s conn {conn:.0}/s",
                            udp / 1e3
                        );
                    }
                }
                println!("{line}");
            }
        }
    }

    if (!o.no_profile && (o.wants("udp") || o.wants("c2c"))) || o.perf.is_some() {
        step("profiling the eBPF programs (BPF run-time statistics) during UDP rate runs");
        if let Some(dir) = &o.perf {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // With --perf, also the topologies without programs, to compare profiles.
        for b in beds
            .iter_mut()
            .filter(|b| matches!(b.kind(), Kind::Ebpf | Kind::EbpfFast) || o.perf.is_some())
        {
            match profile(b, d.max(3), o.perf.as_deref()) {
                Ok(n) => res.notes.extend(n),
                Err(e) => res.notes.push(format!(
                    "profile of {} failed: {}",
                    b.kind().label(),
                    first_line(&e)
                )),
            }
        }
    }

    if o.wants("conn") {
        step(
            "installing 10,000 mappings for workload 4 (the measured one is the 10,000th iptables rule)",
        );
        for b in beds.iter_mut() {
            if let Err(e) = install_10k(b) {
                eprintln!("  {}: {e:#}", b.kind().label());
                res.na(Metric::Conn10k, b.kind(), "10,000 mappings not installed");
                res.notes.push(format!(
                    "{}: 10,000 mappings not installed: {}",
                    b.kind().label(),
                    first_line(&e)
                ));
            }
        }
        for r in 1..=o.rounds {
            step(&format!(
                "round {r}/{}: workload 4 with 10,000 mappings",
                o.rounds
            ));
            for b in beds.iter_mut() {
                check()?;
                if res.na.contains_key(&(Metric::Conn10k, b.kind())) {
                    continue;
                }
                let c = conn_rate(b, &self_exe, d, o.conn_threads)?;
                res.push(Metric::Conn10k, b.kind(), c);
                println!("  {:8} conn {c:.0}/s", b.kind().label());
            }
        }
    }

    // Port add/rm again with the conntrack table the traffic left (the starts were
    // measured with a table of a known size, in workload 6).
    if let Some(b) = beds.iter().find(|b| b.kind() == Kind::Ebpf)
        && o.wants("install")
        && (o.wants("conn") || o.wants("udp") || o.wants("latency") || o.wants("tcp"))
    {
        let ct = match conntrack_entries(b) {
            Ok(n) => report::thousands(n),
            Err(e) => format!("? ({})", first_line(&e)),
        };
        let when = format!("after the traffic ({ct} conntrack entries)");
        step(&format!("control plane again, {when}"));
        {
            let r = (|| -> anyhow::Result<()> {
                let a = |cmd: &str| {
                    vec![
                        "port".to_owned(),
                        cmd.into(),
                        "a".into(),
                        "10000-19998:10000-19998/tcp".into(),
                    ]
                };
                let had = netns_port_count(b)? > 1000;
                let (first, second) = if had { ("rm", "add") } else { ("add", "rm") };
                let t1 = timed(b, &a(first))?;
                let t2 = timed(b, &a(second))?;
                res.install.push((
                    format!("netns port {first}, one call, 9,999-port range, {when}"),
                    Some(t1.as_secs_f64()),
                    "once".into(),
                ));
                res.install.push((
                    format!("netns port {second}, one call, 9,999-port range, {when}"),
                    Some(t2.as_secs_f64()),
                    "once".into(),
                ));
                if had {
                    // Leave only the base mappings, so the starts below differ from the
                    // first ones by the conntrack table alone.
                    timed(b, &a("rm"))?;
                }
                Ok(())
            })();
            if let Err(e) = r {
                res.notes.push(format!(
                    "port add/rm after traffic failed: {}",
                    first_line(&e)
                ));
            }
        }
    }
    step("cleaning up");
    drop(beds);
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

fn start_servers(mut t: Topo, self_exe: &Path) -> anyhow::Result<Bed> {
    let mut c = t.wan().cmd("iperf3");
    c.args(["-s", "-B", WAN_IP, "-p", &WAN_IPERF.to_string()]);
    t.spawn_server(&mut c, "wan-iperf3")?;
    let mut c = t.wan().cmd("iperf3");
    c.args(["-s", "-B", WAN_IP6, "-p", &WAN_IPERF6.to_string()]);
    t.spawn_server(&mut c, "wan-iperf3-v6")?;
    let mut c = t.ctrs[0].cmd(self_exe);
    c.args(["bench", "__conn-server", &CTR_TCP.to_string()]);
    t.spawn_server(&mut c, "ctr-conn")?;
    if t.ctrs[0].ip6.is_some() {
        let mut c = t.ctrs[0].cmd(self_exe);
        c.args(["bench", "__conn-server", &CTR_TCP6.to_string(), "::"]);
        t.spawn_server(&mut c, "ctr-conn6")?;
    }
    std::thread::sleep(Duration::from_millis(200));
    t.check_servers()?;
    Ok(Bed { t, fwd6: false })
}

/// A sockperf server for one measurement: in wan (WAN_IP:WAN_UDP) or, `inbound`, in
/// container a (its address, CTR_UDP). `nonblocked` makes it spin (so it must not
/// outlive the measurement).
fn udp_server(b: &Bed, inbound: bool, nonblocked: bool) -> anyhow::Result<Bg> {
    sock_server(b, inbound, nonblocked, false)
}

/// `udp_server`, or with `tcp` a sockperf --tcp server (container a: CTR_TCP_PP, wan:
/// WAN_IP:WAN_UDP), ready once it listens.
fn sock_server(b: &Bed, inbound: bool, nonblocked: bool, tcp: bool) -> anyhow::Result<Bg> {
    let (mut c, ip, port) = match (inbound, tcp) {
        (true, false) => (b.t.ctrs[0].cmd("sockperf"), b.ctr_ip().to_owned(), CTR_UDP),
        (true, true) => (
            b.t.ctrs[0].cmd("sockperf"),
            b.ctr_ip().to_owned(),
            CTR_TCP_PP,
        ),
        (false, _) => (b.t.wan().cmd("sockperf"), WAN_IP.to_owned(), WAN_UDP),
    };
    c.args(["server", "-i", &ip, "-p", &port.to_string()]);
    if tcp {
        c.arg("--tcp");
    }
    if nonblocked {
        c.arg("--nonblocked");
    }
    let mut s = Bg::spawn(
        &mut c,
        &b.t.tmp.join(format!(
            "sockperf-{}{}.log",
            if tcp { "tcp-" } else { "" },
            if inbound { "in" } else { "out" }
        )),
    )?;
    // Ready once it has bound its socket (bounded wait).
    let start = Instant::now();
    let octets: std::net::Ipv4Addr = ip.parse()?;
    let needle = format!("{:08X}:{port:04X}", u32::from_le_bytes(octets.octets()));
    loop {
        s.ensure_alive()?;
        let table = if tcp { "tcp" } else { "udp" };
        let socks =
            fs::read_to_string(format!("/proc/{}/net/{table}", s.pid())).unwrap_or_default();
        if socks.lines().skip(1).any(|l| {
            let mut w = l.split_whitespace();
            // TCP: in the LISTEN state (0A).
            w.nth(1).is_some_and(|a| a == needle) && (!tcp || w.nth(1) == Some("0A"))
        }) {
            break;
        }
        if start.elapsed() > Duration::from_secs(5) {
            bail!("sockperf server did not bind port {port}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(s)
}

/// Every path once, briefly: container → wan (UDP, TCP) and wan → container (UDP, TCP).
fn smoke(b: &mut Bed, self_exe: &Path) -> anyhow::Result<()> {
    let _s1 = udp_server(b, false, false)?;
    let _s2 = udp_server(b, true, false)?;
    let mut c = b.t.ctrs[0].cmd("sockperf");
    c.args([
        "ping-pong",
        "-i",
        WAN_IP,
        "-p",
        &WAN_UDP.to_string(),
        "-m",
        "64",
        "-t",
        "1",
    ]);
    parse_sockperf_pp(&run_to(&mut c, Duration::from_secs(10))?.stdout)
        .context("container → wan UDP")?;
    let (ip, port) = b.inbound(FWD_UDP, CTR_UDP);
    let mut c = b.t.wan().cmd("sockperf");
    c.args([
        "ping-pong",
        "-i",
        &ip,
        "-p",
        &port.to_string(),
        "-m",
        "64",
        "-t",
        "1",
    ]);
    parse_sockperf_pp(&run_to(&mut c, Duration::from_secs(10))?.stdout)
        .context("wan → container UDP (port forward)")?;
    let (ip, port) = b.inbound(FWD_TCP, CTR_TCP);
    let mut c = b.t.wan().cmd(self_exe);
    c.args([
        "bench",
        "__conn-client",
        &format!("{ip}:{port}"),
        "0.3",
        "1",
    ]);
    let out = run_to(&mut c, Duration::from_secs(10))?.stdout;
    if parse_kv(&out, "conns").unwrap_or(0.0) < 1.0 {
        bail!(
            "wan → container TCP (port forward): no connection completed: {}",
            out.trim()
        );
    }
    let mut c = b.t.ctrs[0].cmd("iperf3");
    c.args(["-c", WAN_IP, "-p", &WAN_IPERF.to_string(), "-t", "1", "-J"]);
    parse_iperf(&run_to(&mut c, Duration::from_secs(15))?.stdout).context("container → wan TCP")?;
    tcp_rr(b, false, 1, true).context("container → wan TCP request/response")?;
    tcp_rr(b, true, 1, true).context("wan → container TCP request/response (port forward)")?;
    Ok(())
}

fn parse_kv(s: &str, key: &str) -> Option<f64> {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// sockperf ping-pong output → (p50, p99) in µs.
fn parse_sockperf_pp(out: &str) -> anyhow::Result<(f64, f64)> {
    let pct = |p: &str| -> Option<f64> {
        out.lines().find_map(|l| {
            let rest = l.split("---> percentile ").nth(1)?;
            let (k, v) = rest.split_once('=')?;
            (k.trim() == p).then(|| v.trim().parse().ok()).flatten()
        })
    };
    match (pct("50.000"), pct("99.000")) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!(
            "no percentiles in sockperf output: {}",
            out.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
        ),
    }
}

/// A 64-byte sockperf client for `d` s: in the wan namespace towards the port forward
/// (`inbound`), or in container a towards the wan server.
fn sockperf_client(
    b: &Bed,
    inbound: bool,
    mode: &str,
    ip: &str,
    port: u16,
    d: u64,
) -> std::process::Command {
    let mut c = if inbound {
        b.t.wan().cmd("sockperf")
    } else {
        b.t.ctrs[0].cmd("sockperf")
    };
    c.args([
        mode,
        "-i",
        ip,
        "-p",
        &port.to_string(),
        "-m",
        "64",
        "-t",
        &d.to_string(),
    ]);
    c
}

/// TCP request/response (sockperf ping-pong --tcp, 64 B), a server per measurement
/// like the UDP one: container a → wan, or wan → the port forward 8082 (no NAT, floor: the
/// container directly). (p50, p99) in µs, half the round trip.
fn tcp_rr(b: &mut Bed, inbound: bool, d: u64, blocking: bool) -> anyhow::Result<(f64, f64)> {
    let (ip, port) = if inbound {
        b.inbound(FWD_TCP_PP, CTR_TCP_PP)
    } else {
        (WAN_IP.to_owned(), WAN_UDP)
    };
    let _server = sock_server(b, inbound, !blocking, true)?;
    let mut c = sockperf_client(b, inbound, "ping-pong", &ip, port, d);
    c.arg("--tcp");
    if !blocking {
        c.arg("--nonblocked");
    }
    let out = run_to(&mut c, Duration::from_secs(d + 15))?;
    parse_sockperf_pp(&out.stdout).with_context(|| {
        format!(
            "{} TCP request/response {}",
            b.kind().label(),
            if inbound { "in" } else { "out" }
        )
    })
}

fn latency(b: &mut Bed, inbound: bool, d: u64, blocking: bool) -> anyhow::Result<(f64, f64)> {
    let (ip, port) = if inbound {
        b.inbound(FWD_UDP, CTR_UDP)
    } else {
        (WAN_IP.to_owned(), WAN_UDP)
    };
    let _server = udp_server(b, inbound, !blocking)?;
    let mut c = sockperf_client(b, inbound, "ping-pong", &ip, port, d);
    if !blocking {
        c.arg("--nonblocked");
    }
    let out = run_to(&mut c, Duration::from_secs(d + 15))?;
    parse_sockperf_pp(&out.stdout).with_context(|| {
        format!(
            "{} latency {}",
            b.kind().label(),
            if inbound { "in" } else { "out" }
        )
    })
}

/// UdpInDatagrams of the network namespace `pid` is in.
fn udp_in_datagrams(pid: u32) -> anyhow::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let mut lines = s.lines().filter(|l| l.starts_with("Udp:"));
    let (h, v) = (
        lines.next().context("Udp header")?,
        lines.next().context("Udp values")?,
    );
    let i = h
        .split_whitespace()
        .position(|x| x == "InDatagrams")
        .context("InDatagrams")?;
    Ok(v.split_whitespace().nth(i).context("value")?.parse()?)
}

/// 64-byte UDP for `d` s (sockperf throughput); returns datagrams delivered to the
/// receiving socket per second of sending.
fn udp_rate(b: &mut Bed, inbound: bool, d: u64) -> anyhow::Result<f64> {
    let (ip, port) = if inbound {
        b.inbound(FWD_UDP, CTR_UDP)
    } else {
        (WAN_IP.to_owned(), WAN_UDP)
    };
    let server = udp_server(b, inbound, false)?;
    let rx_pid = server.pid();
    let mut c = sockperf_client(b, inbound, "throughput", &ip, port, d);
    let before = udp_in_datagrams(rx_pid)?;
    let out = run_to(&mut c, Duration::from_secs(d + 15))?.stdout;
    std::thread::sleep(Duration::from_millis(50));
    let after = udp_in_datagrams(rx_pid)?;
    let (sent, secs) = sockperf_total(&out)?;
    let delivered = (after - before) as f64;
    Ok(delivered.min(sent) / secs)
}

/// 64-byte UDP from container a to container b over the bridge for `d` s (sockperf
/// throughput; server in b on CTR_UDP); datagrams delivered per second of sending.
fn c2c_rate(b: &mut Bed, d: u64) -> anyhow::Result<f64> {
    let dst = b.t.ctrs[1].ip.clone();
    let mut c = b.t.ctrs[1].cmd("sockperf");
    c.args(["server", "-i", &dst, "-p", &CTR_UDP.to_string()]);
    let mut server = Bg::spawn(&mut c, &b.t.tmp.join("sockperf-c2c.log"))?;
    let octets: std::net::Ipv4Addr = dst.parse()?;
    let needle = format!("{:08X}:{CTR_UDP:04X}", u32::from_le_bytes(octets.octets()));
    let start = Instant::now();
    loop {
        server.ensure_alive()?;
        let udp = fs::read_to_string(format!("/proc/{}/net/udp", server.pid())).unwrap_or_default();
        if udp
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1).is_some_and(|a| a == needle))
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(5) {
            bail!("sockperf server in container b did not bind");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rx_pid = server.pid();
    let mut c = b.t.ctrs[0].cmd("sockperf");
    c.args([
        "throughput",
        "-i",
        &dst,
        "-p",
        &CTR_UDP.to_string(),
        "-m",
        "64",
        "-t",
        &d.to_string(),
    ]);
    let before = udp_in_datagrams(rx_pid)?;
    let out = run_to(&mut c, Duration::from_secs(d + 15))?.stdout;
    std::thread::sleep(Duration::from_millis(50));
    let after = udp_in_datagrams(rx_pid)?;
    let (sent, secs) = sockperf_total(&out)?;
    Ok(((after - before) as f64).min(sent) / secs)
}

/// "Total of 150096 messages sent in 2.001 sec" → (messages, seconds).
fn sockperf_total(out: &str) -> anyhow::Result<(f64, f64)> {
    out.lines()
        .find_map(|l| {
            let r = l.split("Total of ").nth(1)?;
            let mut w = r.split_whitespace();
            let n: f64 = w.next()?.parse().ok()?;
            let s: f64 = w.nth(3)?.parse().ok()?;
            Some((n, s))
        })
        .with_context(|| format!("no total in sockperf throughput output: {out}"))
}

fn parse_iperf(out: &str) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(out).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no end.sum_received in iperf3 output")
}

/// iperf3 from container a to the wan server (reverse: wan sends); Gbit/s received.
fn iperf(b: &mut Bed, reverse: bool, d: u64) -> anyhow::Result<f64> {
    iperf3(b, false, reverse, false, d)
}

/// iperf3 over IPv6 from container a to the wan's IPv6 server: TCP bulk (Gbit/s
/// received; `reverse`: wan sends), or with `udp64` 64-byte UDP datagrams delivered
/// per second (sent as fast as iperf3 can, minus those the receiver lost).
fn iperf6(b: &mut Bed, reverse: bool, udp64: bool, d: u64) -> anyhow::Result<f64> {
    iperf3(b, true, reverse, udp64, d)
}

fn iperf3(b: &mut Bed, v6: bool, reverse: bool, udp64: bool, d: u64) -> anyhow::Result<f64> {
    let (server, port) = if v6 {
        (WAN_IP6, WAN_IPERF6)
    } else {
        (WAN_IP, WAN_IPERF)
    };
    let mut c = b.t.ctrs[0].cmd("iperf3");
    if v6 {
        c.arg("-6");
    }
    c.args([
        "-c",
        server,
        "-p",
        &port.to_string(),
        "-t",
        &d.to_string(),
        "-J",
    ]);
    if reverse {
        c.arg("-R");
    }
    if udp64 {
        c.args(["-u", "-l", "64", "-b", "0"]);
    }
    let parse = |out: &str| -> anyhow::Result<f64> {
        if !udp64 {
            return parse_iperf(out);
        }
        let v: serde_json::Value = serde_json::from_str(out).context("iperf3 -J output")?;
        if let Some(e) = v["error"].as_str() {
            bail!("iperf3: {e}");
        }
        let sum = &v["end"]["sum"];
        let (Some(p), Some(lost), Some(secs)) = (
            sum["packets"].as_f64(),
            sum["lost_packets"].as_f64(),
            sum["seconds"].as_f64(),
        ) else {
            bail!("no end.sum packets in iperf3 output");
        };
        Ok((p - lost).max(0.0) / secs.max(1e-9))
    };
    // iperf3 sometimes finds its server busy right after the previous test: retry once.
    let out = run_raw(&mut c, None, Duration::from_secs(d + 20))?;
    match parse(&out.stdout) {
        Ok(v) => Ok(v),
        Err(_) => {
            std::thread::sleep(Duration::from_millis(500));
            let out = run_to(&mut c, Duration::from_secs(d + 20))?;
            parse(&out.stdout)
        }
    }
}

/// The IPv6 port forward of workload 8, made the first time: `[::]:FWD_TCP6` to
/// container a's CTR_TCP6 (netns `port add`, or an ip6tables DNAT rule).
fn ensure_fwd6(b: &mut Bed) -> anyhow::Result<()> {
    if b.fwd6 || b.kind().direct() {
        return Ok(());
    }
    let ip6 = b.t.ctrs[0]
        .ip6
        .clone()
        .context("container a has no IPv6 address")?;
    if b.kind() == Kind::Iptables {
        sh_run(b.t.host().cmd("ip6tables").args([
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            UPLINK_IP6,
            "-p",
            "tcp",
            "--dport",
            &FWD_TCP6.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &format!("[{ip6}]:{CTR_TCP6}"),
        ]))?;
    } else {
        b.t.netns_run(&[
            "port",
            "add",
            "a",
            &format!("[::]:{FWD_TCP6}:{CTR_TCP6}/tcp"),
        ])?;
    }
    b.fwd6 = true;
    Ok(())
}

/// Connections per second from wan to container a over IPv6: through the uplink's
/// IPv6 address and the IPv6 port forward, or (no NAT) to its address directly.
fn conn6_rate(b: &mut Bed, self_exe: &Path, d: u64, threads: usize) -> anyhow::Result<f64> {
    ensure_fwd6(b)?;
    let addr = if b.kind().direct() {
        let ip6 = b.t.ctrs[0]
            .ip6
            .clone()
            .context("container a has no IPv6 address")?;
        format!("[{ip6}]:{CTR_TCP6}")
    } else {
        format!("[{UPLINK_IP6}]:{FWD_TCP6}")
    };
    conn_client(b, self_exe, &addr, d, threads)
}

fn conn_rate(b: &mut Bed, self_exe: &Path, d: u64, threads: usize) -> anyhow::Result<f64> {
    let (ip, port) = b.inbound(FWD_TCP, CTR_TCP);
    conn_client(b, self_exe, &format!("{ip}:{port}"), d, threads)
}

/// The connection-rate client in wan against `addr` for `d` s.
fn conn_client(
    b: &mut Bed,
    self_exe: &Path,
    addr: &str,
    d: u64,
    threads: usize,
) -> anyhow::Result<f64> {
    let mut c = b.t.wan().cmd(self_exe);
    c.args([
        "bench",
        "__conn-client",
        addr,
        &d.to_string(),
        &threads.to_string(),
    ]);
    let out = run_to(&mut c, Duration::from_secs(d + 15))?.stdout;
    let rate = parse_kv(&out, "rate").with_context(|| format!("conn client output: {out}"))?;
    let errors = parse_kv(&out, "errors").unwrap_or(0.0);
    if errors > 0.0 {
        eprintln!(
            "  note: {} connection errors in {}: {}",
            errors,
            b.kind().label(),
            out.trim()
        );
    }
    Ok(rate)
}

/// `iptables-restore --noflush` input: flush PREROUTING, then `extra` DNAT rules for
/// host ports 10000.. (each to the same container port), then the two base rules.
fn nat_restore(ctr_ip: &str, extra: usize, base: bool) -> String {
    let mut s = String::from("*nat\n-F PREROUTING\n");
    for p in 10000..10000 + extra {
        let _ = writeln!(
            s,
            "-A PREROUTING -d {UPLINK_IP}/32 -p tcp --dport {p} -j DNAT --to-destination {ctr_ip}:{p}"
        );
    }
    if base {
        for r in Topo::base_dnat_rules(ctr_ip) {
            let _ = writeln!(s, "{}", r.trim_start_matches("-t nat "));
        }
    }
    s.push_str("COMMIT\n");
    s
}

fn iptables_restore(b: &Bed, input: &str) -> anyhow::Result<Duration> {
    let mut c = b.t.host().cmd("iptables-restore");
    c.args(["--noflush", "-w"]);
    let out = run_raw(&mut c, Some(input.as_bytes()), Duration::from_secs(120))?;
    if !out.ok() {
        bail!("iptables-restore: {:?} {}", out.status, out.stderr.trim());
    }
    Ok(out.elapsed)
}

fn nat_rule_count(b: &Bed) -> anyhow::Result<usize> {
    let s = sh_run(
        b.t.host()
            .cmd("iptables")
            .args(["-w", "-t", "nat", "-S", "PREROUTING"]),
    )?;
    Ok(s.lines().filter(|l| l.starts_with("-A PREROUTING")).count())
}

fn netns_port_count(b: &Bed) -> anyhow::Result<usize> {
    let v: serde_json::Value = serde_json::from_str(&b.t.netns_run(&["port", "ls", "--json"])?)?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Entries in the datapath's conntrack map, as the kernel holds it (bpftool on the pin).
fn conntrack_entries(b: &Bed) -> anyhow::Result<u64> {
    let t = b.t.netns()?;
    netns_tests::bpf::map_entries(&t.host, &t.map_pin(netns_common::maps::CONNTRACK))
}

fn timed(b: &Bed, args: &[String]) -> anyhow::Result<Duration> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_raw(
        &mut b.t.netns()?.netns_cmd(&args),
        None,
        Duration::from_secs(120),
    )?;
    if !out.ok() {
        bail!(
            "netns {}: {:?} {}",
            args.iter().take(3).cloned().collect::<Vec<_>>().join(" "),
            out.status,
            out.stderr.trim()
        );
    }
    Ok(out.elapsed)
}

fn med_secs(v: &[Duration]) -> Option<f64> {
    sys::median(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())
}

/// Workload 5: 10,000 mappings by the netns CLI (one call: a range spec, and 10,000
/// single specs), by iptables-restore, and by one iptables call each (capped, extrapolated).
fn install(o: &Opts, beds: &mut [Bed], res: &mut Results) -> anyhow::Result<()> {
    let reps = o.install_reps.max(1);
    if let Some(b) = beds.iter().find(|b| b.kind() == Kind::Ebpf) {
        let r = (|| -> anyhow::Result<()> {
            let base = netns_port_count(b)?;
            let range = "10000-19999:10000-19999/tcp".to_owned();
            let singles: Vec<String> = (10000..20000).map(|p| format!("{p}:{p}/tcp")).collect();
            let (mut add_r, mut rm_r, mut add_s, mut rm_s) = (vec![], vec![], vec![], vec![]);
            for _ in 0..reps {
                check()?;
                add_r.push(timed(
                    b,
                    &["port".into(), "add".into(), "a".into(), range.clone()],
                )?);
                let n = netns_port_count(b)? - base;
                if n != 10000 {
                    bail!("netns port ls shows {n} new mappings after adding 10,000");
                }
                rm_r.push(timed(
                    b,
                    &["port".into(), "rm".into(), "a".into(), range.clone()],
                )?);
                let mut a = vec!["port".to_owned(), "add".into(), "a".into()];
                a.extend(singles.iter().cloned());
                add_s.push(timed(b, &a)?);
                a[1] = "rm".into();
                rm_s.push(timed(b, &a)?);
            }
            if netns_port_count(b)? != base {
                bail!("mappings left over after removal");
            }
            let how = format!("median of {reps}; eBPF topology, port ls checked");
            res.install.push((
                "netns port add, one call, one range spec 10000-19999:10000-19999/tcp".into(),
                med_secs(&add_r),
                how.clone(),
            ));
            res.install.push((
                "netns port add, one call, 10,000 single specs".into(),
                med_secs(&add_s),
                how.clone(),
            ));
            res.install.push((
                "netns port rm, one call, the range spec".into(),
                med_secs(&rm_r),
                how.clone(),
            ));
            res.install.push((
                "netns port rm, one call, 10,000 single specs".into(),
                med_secs(&rm_s),
                how,
            ));
            println!(
                "  netns: add range {}, add singles {}",
                fmt_secs(med_secs(&add_r).unwrap_or(0.0)),
                fmt_secs(med_secs(&add_s).unwrap_or(0.0))
            );
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("  netns: {e:#}");
            res.install.push((
                "netns port add (10,000)".into(),
                None,
                format!("failed: {}", first_line(&e)),
            ));
        }
    } else {
        res.install.push((
            "netns port add (10,000)".into(),
            None,
            "eBPF topology unavailable".into(),
        ));
    }

    let Some(b) = beds.iter().find(|b| b.kind() == Kind::Iptables) else {
        return Ok(());
    };
    let ip = b.ctr_ip().to_owned();
    let full = nat_restore(&ip, 10000, true);
    let reset = nat_restore(&ip, 0, true);
    let mut t = vec![];
    for _ in 0..reps {
        check()?;
        t.push(iptables_restore(b, &full)?);
        let n = nat_rule_count(b)?;
        if n != 10000 + BASE_MAPPINGS {
            bail!(
                "iptables shows {n} PREROUTING rules, expected {}",
                10000 + BASE_MAPPINGS
            );
        }
        iptables_restore(b, &reset)?;
    }
    res.install.push((
        "iptables-restore --noflush, 10,000 DNAT rules".into(),
        med_secs(&t),
        format!(
            "median of {reps}; `iptables -S` checked; {}",
            iptables_version()
        ),
    ));
    println!(
        "  iptables-restore: {}",
        fmt_secs(med_secs(&t).unwrap_or(0.0))
    );

    // One call each: n calls onto an empty chain, then n calls onto a chain of 10,000 - n.
    let n = o.one_by_one.min(10000);
    let script = |from: usize| -> String {
        (from..from + n)
            .map(|p| format!("iptables -w -t nat -A PREROUTING -d {UPLINK_IP} -p tcp --dport {p} -j DNAT --to-destination {ip}:{p}\n"))
            .collect()
    };
    let run_script = |s: String| -> anyhow::Result<Duration> {
        let mut c = b.t.host().cmd("sh");
        let out = run_raw(&mut c, Some(s.as_bytes()), Duration::from_secs(600))?;
        if !out.ok() {
            bail!("iptables calls failed: {}", out.stderr.trim());
        }
        Ok(out.elapsed)
    };
    check()?;
    iptables_restore(b, &nat_restore(&ip, 0, false))?;
    let first = run_script(script(10000))?;
    iptables_restore(b, &nat_restore(&ip, 10000 - n, false))?;
    let last = run_script(script(20000 - n))?;
    let count = nat_rule_count(b)?;
    iptables_restore(b, &reset)?;
    let est = (first.as_secs_f64() + last.as_secs_f64()) / 2.0 * (10000.0 / n as f64);
    res.install.push((
        "one `iptables -A` call each, 10,000 rules (extrapolated)".into(),
        Some(est),
        format!(
            "{n} calls timed onto an empty chain ({}) and {n} onto {} rules ({}, {count} after); total = 10,000/{n} × mean of the two (assumes linear growth)",
            fmt_secs(first.as_secs_f64()),
            10000 - n,
            fmt_secs(last.as_secs_f64())
        ),
    ));
    println!(
        "  iptables one by one: {n} calls {} (empty) / {} (full), ~{} for 10,000",
        fmt_secs(first.as_secs_f64()),
        fmt_secs(last.as_secs_f64()),
        fmt_secs(est)
    );
    Ok(())
}

fn iptables_version() -> String {
    sh_run(sys::cmd("iptables").arg("--version"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// 9,999 extra mappings (host ports 10000-19998) besides the measured 8080 one; in
/// iptables they come first, so the measured rule is the 10,000th.
fn install_10k(b: &mut Bed) -> anyhow::Result<()> {
    match b.kind() {
        Kind::NoNat | Kind::Floor => Ok(()),
        Kind::Iptables => {
            let ip = b.ctr_ip().to_owned();
            iptables_restore(b, &nat_restore(&ip, 9999, true))?;
            let n = nat_rule_count(b)?;
            if n != 9999 + BASE_MAPPINGS {
                bail!(
                    "{n} PREROUTING rules, expected {} (9,999 + the base ones)",
                    9999 + BASE_MAPPINGS
                );
            }
            Ok(())
        }
        Kind::Ebpf | Kind::EbpfFast => {
            b.t.netns_run(&["port", "add", "a", "10000-19998:10000-19998/tcp"])?;
            let n = netns_port_count(b)?;
            // The IPv6 forward of workload 8 is listed too (it is in NETNS_PORTS6, not in
            // the IPv4 map the measured flows use).
            let want = 9999 + BASE_MAPPINGS + usize::from(b.fwd6);
            if n != want {
                bail!("netns port ls shows {n} mappings, expected {want} (9,999 + the base ones)");
            }
            Ok(())
        }
    }
}

/// Conntrack pairs of container a written for the second half of workload 6: 60,000
/// entries, the table size at which a stop used to cost 250 ms (a user-space walk).
const FULL_TABLE_PAIRS: u32 = 30_000;

/// Poststop with a full conntrack table may take at most this many times its time with
/// an empty one (it must not walk the table).
pub const POSTSTOP_GOAL: f64 = 1.5;

/// Workload 6 again with 60,000 conntrack entries (container a's assured flows, written
/// into the maps: see `ctfill`): prestart and poststop of as many fresh containers,
/// then the ratio of the poststop medians to `empty` (the poststops with an empty
/// table) against [`POSTSTOP_GOAL`]. The entries are flushed afterwards (timed), so
/// the later workloads start from an empty table as before.
fn full_table_starts(
    count: usize,
    empty: &[f64],
    cni: Option<&Cni>,
    tag: &str,
    b: &Bed,
    beds: &[Bed],
    res: &mut Results,
) -> anyhow::Result<()> {
    let t = b.t.netns()?;
    let before = ctfill::entries(t)?;
    if before != 0 {
        bail!("the conntrack tables hold {before} entries before the fill, not 0");
    }
    let owner: std::net::Ipv4Addr = b.ctr_ip().parse()?;
    ctfill::fill(t, owner, UPLINK_IP.parse()?, FULL_TABLE_PAIRS)?;
    let entries = ctfill::entries(t)?;
    let when = format!(", {} conntrack entries", report::thousands(entries as u64));
    // CNI calls alternate with the hooks as in the first run (same conditions), but
    // are not reported again.
    let full = starts(count, &when, cni, tag, beds, res)?;
    let after = ctfill::entries(t)?;
    if after != entries {
        bail!("the table changed during the starts: {entries} entries, then {after}");
    }
    if let (Some(e), Some(f)) = (sys::median(empty), sys::median(&full)) {
        let ratio = f / e;
        res.poststop = Some(report::PoststopGoal {
            empty_p50: e,
            full_p50: f,
            entries,
            ratio,
        });
        println!(
            "  poststop p50: {} with 0 entries, {} with {}: {ratio:.2}x (goal <= {POSTSTOP_GOAL}x: {})",
            fmt_secs(e),
            fmt_secs(f),
            report::thousands(entries as u64),
            if ratio <= POSTSTOP_GOAL {
                "PASS"
            } else {
                "FAIL"
            }
        );
    }
    let flush = timed(b, &["conntrack".into(), "flush".into()])?;
    res.starts.push((
        format!(
            "netns conntrack flush, {} entries and their copies",
            report::thousands(entries as u64)
        ),
        vec![flush.as_secs_f64()],
        "once".into(),
    ));
    let left = ctfill::entries(t)?;
    if left != 0 {
        bail!("{left} conntrack entries left after `netns conntrack flush`");
    }
    Ok(())
}

/// Workload 6: the netns hook (prestart, poststop) vs the CNI bridge plugin (ADD, DEL),
/// alternating, each on a fresh `unshare -n sleep` namespace. Returns the poststop
/// samples (seconds).
fn starts(
    count: usize,
    when: &str,
    cni: Option<&Cni>,
    tag: &str,
    beds: &[Bed],
    res: &mut Results,
) -> anyhow::Result<Vec<f64>> {
    let eb = beds.iter().find(|b| b.kind() == Kind::Ebpf);
    let (mut pre, mut post, mut add, mut del) = (vec![], vec![], vec![], vec![]);
    let mut ebpf_err = None;
    let mut cni_err = None;
    for i in 0..count {
        check()?;
        if let (Some(b), None) = (eb, &ebpf_err) {
            let r = (|| -> anyhow::Result<()> {
                let id = format!("s{i}{}", if when.is_empty() { "" } else { "x" });
                let sl: Bg = b.t.spawn_sleeper(&id)?;
                pre.push(b.t.hook(&id, sl.pid(), "creating")?.as_secs_f64());
                post.push(b.t.hook(&id, sl.pid(), "stopped")?.as_secs_f64());
                Ok(())
            })();
            if let Err(e) = r {
                eprintln!("  netns hook: {e:#}");
                ebpf_err = Some(first_line(&e));
            }
        }
        if let (Some(c), None) = (cni, &cni_err) {
            let r = (|| -> anyhow::Result<()> {
                let id = format!("{tag}s{i}{}", if when.is_empty() { "" } else { "x" });
                let sl = c.spawn_sleeper(&id)?;
                add.push(c.call("ADD", &id, sl.pid())?.as_secs_f64());
                del.push(c.call("DEL", &id, sl.pid())?.as_secs_f64());
                Ok(())
            })();
            if let Err(e) = r {
                eprintln!("  CNI bridge: {e:#}");
                cni_err = Some(first_line(&e));
            }
        }
    }
    let sum = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<_>>();
    let note = |e: &Option<String>, what: &str| {
        e.as_ref()
            .map_or(what.to_owned(), |e| format!("{what}; stopped: {e}"))
    };
    if eb.is_some() {
        let what = if when.is_empty() {
            "datapath already loaded, conntrack table empty"
        } else {
            ""
        };
        res.starts.push((
            format!("netns hook prestart{when}"),
            pre.clone(),
            note(&ebpf_err, what),
        ));
        res.starts.push((
            format!("netns hook poststop{when}"),
            post.clone(),
            note(&ebpf_err, ""),
        ));
        res.starts.push((
            format!("netns prestart + poststop{when}"),
            sum(&pre, &post),
            String::new(),
        ));
    } else {
        res.starts.push((
            "netns hook".into(),
            vec![],
            "eBPF topology unavailable".into(),
        ));
    }
    if !when.is_empty() {
        return Ok(post);
    }
    if cni.is_some() {
        res.starts.push((
            "CNI bridge ADD (host-local IPAM, ipMasq)".into(),
            add.clone(),
            note(
                &cni_err,
                "/usr/lib/cni/bridge; ipMasq adds iptables rules per container",
            ),
        ));
        res.starts
            .push(("CNI bridge DEL".into(), del.clone(), note(&cni_err, "")));
        res.starts
            .push(("CNI ADD + DEL".into(), sum(&add, &del), String::new()));
    } else {
        res.starts.push((
            "CNI bridge".into(),
            vec![],
            "/usr/lib/cni/bridge not installed".into(),
        ));
    }
    println!(
        "  netns prestart p50 {}, CNI ADD p50 {}",
        sys::median(&pre).map_or("n/a".into(), fmt_secs),
        sys::median(&add).map_or("n/a".into(), fmt_secs)
    );
    Ok(post)
}

/// Per-packet cost of the datapath's programs: BPF run-time statistics (switched on
/// through a BPF_ENABLE_STATS fd for the measurement only) during 64-byte UDP load in
/// each direction and between the containers, for the eBPF topology with the fast path
/// off and on. (`bpftool prog profile` is not built into Debian's bpftool.) With
/// `--perf DIR`, a system-wide `perf record` runs beside each measurement.
fn profile(b: &mut Bed, d: u64, perf: Option<&Path>) -> anyhow::Result<Vec<String>> {
    // Programs pinned under our own bpffs directory only (none without netns).
    let pinned = match b.t.netns() {
        Ok(n) => sh_run(sys::cmd("find").arg(&n.bpffs_dir).args(["-type", "f"]))?,
        Err(_) => String::new(),
    };
    let mut progs = vec![];
    for p in pinned.lines() {
        if let Ok(s) = sh_run(sys::cmd("bpftool").args(["-j", "prog", "show", "pinned", p]))
            && let Ok(j) = serde_json::from_str::<serde_json::Value>(&s)
            && let (Some(id), Some(name)) = (j["id"].as_u64(), j["name"].as_str())
        {
            progs.push((id, name.to_owned()));
        }
    }
    progs.sort();
    progs.dedup();
    let stats = |id: u64| -> (u64, u64) {
        sh_run(sys::cmd("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .map(|j| {
                (
                    j["run_time_ns"].as_u64().unwrap_or(0),
                    j["run_cnt"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0))
    };
    let mut notes = vec![];
    let _fd = sys::enable_bpf_stats()?;
    for (what, tag) in [
        ("container → wan", "out"),
        ("wan → container", "in"),
        ("container a → container b", "c2c"),
    ] {
        let before: Vec<_> = progs.iter().map(|(id, _)| stats(*id)).collect();
        let mut rec = match perf {
            Some(dir) => Some(perf_record(
                &dir.join(format!("{}-{tag}.data", b.kind().letter())),
                d,
            )?),
            None => None,
        };
        let rate = match tag {
            "out" => udp_rate(b, false, d),
            "in" => udp_rate(b, true, d),
            _ if b.t.ctrs.len() > 1 => c2c_rate(b, d),
            _ => Ok(0.0),
        };
        if let Some(r) = rec.as_mut() {
            let _ = r.child.wait();
        }
        let rate = rate?;
        let after: Vec<_> = progs.iter().map(|(id, _)| stats(*id)).collect();
        let mut parts = vec![];
        let mut total_ns = 0.0;
        for (i, (_, name)) in progs.iter().enumerate() {
            let (t, c) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
            // A program that ran for a handful of packets (an ARP, a log poll) is not
            // part of the path measured.
            if c > 1000 {
                parts.push(format!(
                    "{name} {:.0} ns × {}",
                    t as f64 / c as f64,
                    report::thousands(c)
                ));
                total_ns += t as f64;
            }
        }
        if progs.is_empty() {
            continue;
        }
        let delivered = rate * d as f64;
        notes.push(format!(
            "BPF run time, {}, during 64 B UDP {what} ({:.0} msg/s delivered): {}; ≈ {:.0} ns of BPF per delivered datagram",
            b.kind().label(),
            rate,
            parts.join(", "),
            if delivered > 0.0 { total_ns / delivered } else { 0.0 }
        ));
    }
    Ok(notes)
}

/// `perf record -a -g` for `d` seconds into `out` (the caller waits for it).
fn perf_record(out: &Path, d: u64) -> anyhow::Result<Bg> {
    let mut c = sys::cmd("perf");
    c.args(["record", "-a", "-g", "-F", "2999", "-o"])
        .arg(out)
        .args(["--", "sleep", &d.to_string()]);
    Bg::spawn(&mut c, &out.with_extension("log"))
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn document(o: &Opts, bin: &Path, res: &Results, elapsed: Duration, load: &str) -> String {
    let sh = |c: &str| {
        sh_run(sys::cmd("sh").args(["-c", c]))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: eBPF vs iptables vs no NAT\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench` (issue 6); do not edit above the marker at the end.\n"
    );
    let _ = writeln!(
        s,
        "- date: {}",
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now())
    );
    let _ = writeln!(s, "- kernel: {}", sh("uname -r"));
    let _ = writeln!(s, "- CPU: {cpu}, {} online", sh("nproc"));
    let _ = writeln!(
        s,
        "- netns: {} (commit {})",
        sh(&format!("{} --version", bin.display())),
        sh(&format!(
            "git -C {} describe --always --dirty 2>/dev/null",
            crate::root().display()
        ))
    );
    let _ = writeln!(
        s,
        "- machine load average: {load} (other work on the machine shows up as noise)"
    );
    let _ = writeln!(
        s,
        "- tools: {}; {}; {}",
        iptables_version(),
        sh("sockperf --version 2>&1 | head -1"),
        sh("iperf3 --version | head -1")
    );
    let _ = writeln!(
        s,
        "- settings: {} rounds, {} s per measurement, {} starts, {} single iptables calls, {} CNI containers per row; total run time {:.0} s",
        o.rounds,
        o.duration,
        o.starts,
        o.one_by_one,
        o.cni_containers,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "- reproduce: `cargo xtask bench` (as root; `cargo xtask setup` installs the tools; `--quick` for a smoke run, `--help` for options)\n"
    );
    if TOPOLOGY_WORKLOADS.iter().any(|w| o.wants(w)) {
        let _ = writeln!(
            s,
            "Five private topologies. Four are a \"host\" namespace with bridge br0 172.19.0.1/16, \
         containers a (172.19.0.2) and b, and an uplink veth 198.51.100.2/24 to a \"wan\" namespace \
         198.51.100.1/24: **no NAT** (routed; wan routes 172.19.0.0/16 back; its bridge is the plain \
         bridge of workload 2b), **iptables** (`MASQUERADE` for 172.19.0.0/16 not leaving by br0, `DNAT` \
         in PREROUTING), **eBPF** (made by the real `netns` hook for two `unshare -n sleep` containers, \
         port forwards by `netns port add`, `--fast-path off`), **eBPF fast** (the same with \
         `--fast-path on`: translated packets bypass the host stack). The fifth, **floor**, is the \
         physical floor: container a's veth plugged straight into wan (172.19.0.1/16 there), no host \
         in between, no NAT; it has no container b. \
         Each measurement runs against the five in turn, several rounds, so drift hits all alike. \
         Port forward: uplink 8080/tcp → container a 5001, 8081/udp → 5002, 8082/tcp → 5003 (TCP \
         request/response). The four with a host are dual stack for workload 8: uplink \
         2001:db8:100::2/64, wan 2001:db8:100::1/64, bridge fd00:19::1/64, containers fd00:19::2 \
         and ::3; no NAT routes fd00:19::/64 back, iptables has an `ip6tables` `MASQUERADE` for \
         fd00:19::/64, eBPF runs with `--ip6` (NAT66; eBPF fast takes the IPv6 fast path too). sockperf 3.7 has no IPv6, so workload 8 uses iperf3 (64-byte UDP sent as \
         fast as one iperf3 thread can, TCP bulk both ways) and the connection-rate tool through an \
         IPv6-only forward `[::]:8083` → container a 5004 (netns `port add`, an `ip6tables` DNAT; \
         no NAT connects to the container directly); the floor is IPv4 only. \
         Nothing runs in the root network namespace.\n"
        );
    }
    s.push_str(&res.markdown(o.rounds));
    s
}
