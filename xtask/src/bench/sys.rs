//! Processes for the benchmark: every child dies with us (PDEATHSIG) and runs in its
//! own process group (a Ctrl-C reaches only xtask, which then stops at the next step
//! and cleans up); every command has a timeout. The namespaces are the harness's
//! (`netns_tests::NamedNetns`), making their commands with [`spawner`].

use std::ffi::OsStr;
use std::fs;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use crate::signals::{check, interrupted};

/// A command whose process dies when xtask does and that ignores the terminal's Ctrl-C.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    c
}

/// [`cmd`] as the harness's [`netns_tests::ns::Spawner`]: the benchmark's namespaces
/// make every command this way.
pub fn spawner(program: &OsStr) -> Command {
    cmd(program)
}

/// `nsenter --net=PATH PROGRAM` (nsenter, not `ip netns exec`: that remounts /sys).
pub fn in_ns(ns_path: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = cmd("nsenter");
    c.arg(format!("--net={ns_path}")).arg(program);
    c
}

pub struct Out {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if s.len() > 300 {
        s.truncate(300);
        s.push_str(" ...");
    }
    s
}

/// Runs `c` (stdin from `input`), killing it after `timeout`; any exit status.
/// Wall time is measured around spawn..exit with sub-millisecond polling at first.
pub fn run_raw(c: &mut Command, input: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Out> {
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = c
        .spawn()
        .with_context(|| format!("spawning {}", describe(c)))?;
    if let Some(data) = input {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A program may exit without reading all its input (as Go's os/exec, not an
        // error: its exit status tells).
        match stdin.write_all(data) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).with_context(|| format!("stdin of {}", describe(c)));
            }
            _ => {}
        }
    }
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let mut status = None;
    let mut elapsed;
    loop {
        if let Some(s) = child.try_wait()? {
            elapsed = start.elapsed();
            status = Some(s);
            break;
        }
        elapsed = start.elapsed();
        if elapsed > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(if elapsed < Duration::from_millis(200) {
            Duration::from_micros(100)
        } else {
            Duration::from_millis(5)
        });
    }
    let stdout = String::from_utf8_lossy(&t1.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t2.join().unwrap_or_default()).into_owned();
    Ok(Out {
        status,
        stdout,
        stderr,
        elapsed,
    })
}

/// Runs `c`; it must succeed within `timeout`. Returns its output.
pub fn run_to(c: &mut Command, timeout: Duration) -> anyhow::Result<Out> {
    let what = describe(c);
    let out = run_raw(c, None, timeout)?;
    if !out.ok() {
        bail!(
            "{what}: {}\nstdout: {}\nstderr: {}",
            out.status.map_or("timed out".to_owned(), |s| s.to_string()),
            out.stdout.trim(),
            out.stderr.trim()
        );
    }
    Ok(out)
}

/// Runs `c`, which must succeed within 30 s; returns stdout.
pub fn run(c: &mut Command) -> anyhow::Result<String> {
    Ok(run_to(c, Duration::from_secs(30))?.stdout)
}

/// A background process killed (and reaped) on drop.
pub struct Bg {
    pub child: Child,
    pub what: String,
    pub log: PathBuf,
}

impl Bg {
    pub fn spawn(c: &mut Command, log: &Path) -> anyhow::Result<Bg> {
        let what = describe(c);
        let f = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = c.spawn().with_context(|| format!("spawning {what}"))?;
        Ok(Bg {
            child,
            what,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the log's tail) if the process exited.
    pub fn ensure_alive(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.child.try_wait()? {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{} exited ({s}):\n{tail}", self.what);
        }
        Ok(())
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM, then SIGKILL after a second, to a process we started indirectly
/// (e.g. the collector the hook spawns), found by its command line.
pub fn terminate_pid(pid: u32) {
    let pid = Pid::from_raw(pid as i32);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    for _ in 0..20 {
        if !pid_alive(pid.as_raw() as u32) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Median of a sample (None if empty).
pub fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

/// Nearest-rank-interpolated percentile.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = p / 100.0 * (s.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(s[lo] + (s[hi] - s[lo]) * (rank - lo as f64))
}

/// BPF_ENABLE_STATS: run_time_ns/run_cnt of every BPF program are counted while the
/// returned fd is open (closing it, also by exiting, switches counting off again).
pub fn enable_bpf_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")
}
