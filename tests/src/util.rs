//! Small helpers: unique names, running commands with useful failure messages.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (`<prefix><pid>x<n>`, hex; the `x`
/// keeps pid and counter apart, so two processes never make the same name): at most
/// 15 bytes for a short prefix, so it also fits an interface name.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n:x}", std::process::id())
}

/// The `netns` binary under test: `$NETNS_BIN`, or `target/<profile>/netns` next to
/// this test executable (`target/<profile>/deps/<test>`).
pub fn netns_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETNS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("netns");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo xtask test` does), or set NETNS_BIN",
        bin.display()
    );
    bin
}

/// Runs a command, returning its output (no status check).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout, or an error naming the command
/// with its status and both outputs.
pub fn try_run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("spawning {cmd:?}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that must succeed; returns stdout (panics otherwise).
pub fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `sh -c script`, must succeed.
pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed, with everything it started (a shell's pipeline), and reaped
/// on drop, also when a test fails: nothing is left holding a port or a pipe.
pub struct ChildGuard(pub std::process::Child);

/// The pids of `pid`'s descendants (from /proc), children before grandchildren.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Field 4 of stat, after the parenthesised command name.
            let ppid = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                });
            if let Some(pp) = ppid {
                parent_of.push((p, pp));
            }
        }
    }
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (c, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*c);
            frontier.push(*c);
        }
    }
    out
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        )
    }

    /// SIGKILL to the child and its descendants (stopped first, so none forks or is
    /// reparented away while we look).
    fn kill_tree(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let me = self.0.id();
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(Pid::from_raw(me as i32), Signal::SIGSTOP);
        let tree = descendants(me);
        for p in &tree {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGSTOP);
        }
        for p in descendants(me).iter().chain(&tree) {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
        let _ = self.0.kill();
    }

    /// Waits for the process to exit by itself (bounded), returning its output.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        while self.0.try_wait().expect("try_wait").is_none() {
            if start.elapsed() > timeout {
                self.kill_tree();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("true"));
        child.wait_with_output().expect("wait_with_output")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_tree();
        let _ = self.0.wait();
    }
}

/// Pids of processes with `arg` as one of their arguments (or as the value of a
/// `--flag=arg`), read from /proc: exact, unlike `pgrep -f`, and never this process.
pub fn pids_with_arg(arg: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let hit = cmdline.split(|b| *b == 0).any(|a| {
            a == arg.as_bytes()
                || a.split(|b| *b == b'=')
                    .nth(1)
                    .is_some_and(|v| v == arg.as_bytes() && a.starts_with(b"--"))
        });
        if hit {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs the processes `pids_with_arg(arg)` finds (e.g. a collector started by a
/// hook with this topology's unique state directory).
pub fn kill_with_arg(arg: &str) {
    for pid in pids_with_arg(arg) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits until something listens on `proto` ("tcp" or "udp") `port` in the network
/// namespace `nsenter_args` selects (e.g. `["--net=/run/netns/X"]` or `["-t", PID, "-n"]`);
/// panics after 15 s. Servers started in the background are ready after this, without
/// guessing a sleep (CI machines are slow and busy).
pub fn wait_listen(nsenter_args: &[&str], proto: &str, port: u16) {
    let flag = match proto {
        "tcp" => "-Hltn",
        "udp" => "-Hlun",
        other => panic!("wait_listen: unknown protocol {other}"),
    };
    wait_ss(nsenter_args, &[flag, &format!("sport = :{port}")]);
}

/// Waits until `ss ARGS` (which should include -H) lists a socket in the network
/// namespace `nsenter_args` selects; panics after 15 s.
pub fn wait_ss(nsenter_args: &[&str], ss_args: &[&str]) {
    let ok = wait_for(Duration::from_secs(15), || {
        let o = Command::new("nsenter")
            .args(nsenter_args)
            .arg("ss")
            .args(ss_args)
            .output()
            .ok()?;
        (o.status.success() && !o.stdout.is_empty()).then_some(())
    });
    assert!(
        ok.is_some(),
        "no socket for `ss {}` (nsenter {nsenter_args:?}) after 15 s",
        ss_args.join(" ")
    );
}

/// Shell command: a TCP server on `port` answering every connection with
/// `peer=<client address>` (socat; `-t 10` so that under load a slow fork + sh still
/// gets its answer out after the client's half-close).
pub fn tcp_who_server(port: u16) -> String {
    format!("socat -t 10 TCP-LISTEN:{port},reuseaddr,fork SYSTEM:'echo peer=$SOCAT_PEERADDR'")
}

/// Shell command: connects to `addr:port` and prints what the server sends until it
/// closes (`-u`: sends nothing, so no half-close race); gives up after 20 s.
pub fn tcp_ask(addr: &str, port: u16) -> String {
    format!("timeout 20 socat -u TCP:{addr}:{port} STDOUT")
}

/// Python: a UDP server on argv[1] answering every datagram with `peer=<address>`
/// (one socket: socat's forking UDP server loses datagrams that arrive while it forks).
pub const UDP_WHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(("peer=%s\n" % a[0]).encode(), a)
"#;

/// Shell command: sends a datagram to `addr:port` and prints the first answer; retries
/// five times, one second apart (UDP may be lost; an empty output means no answer).
pub fn udp_ask(addr: &str, port: u16) -> String {
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n\
         s.connect((\"{addr}\",{port}))\nfor i in range(5):\n  s.send(b\"hi\")\n  try:\n    \
         print(s.recv(1000).decode().strip()); break\n  except (socket.timeout, ConnectionRefusedError): pass"
    );
    format!("python3 -c '{py}'")
}

/// Bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The IPv4 address in `ip -4 -o addr` output (the first `inet`).
pub fn inet(out: &str) -> std::net::Ipv4Addr {
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {out:?}"))
}

/// In the test bridge's subnet (172.19.0.0/16) and not its gateway.
pub fn assert_bridge_address(ip: std::net::Ipv4Addr) {
    let gw: std::net::Ipv4Addr = crate::topo::GATEWAY.parse().unwrap();
    assert!(
        ip.octets()[..2] == gw.octets()[..2] && ip != gw,
        "{ip} is not a container address in 172.19.0.0/16"
    );
}

/// The busybox applets every test rootfs has.
const APPLETS: &[&str] = &[
    "sh",
    "sleep",
    "cat",
    "echo",
    "ping",
    "nc",
    "wget",
    "ip",
    "sha256sum",
    "true",
    "httpd",
];

/// Makes `rootfs` a busybox-static root: the mount points a runtime needs and
/// `/bin/<applet>` links. Tolerates a rootfs made before (same links).
pub fn busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).expect("rootfs");
    for d in ["proc", "sys", "dev", "tmp", "etc", "run"] {
        fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static (apt-get install busybox-static)");
    for a in APPLETS {
        match symlink("busybox", bin.join(a)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                panic!("applet link {a}: {e}")
            }
            _ => {}
        }
    }
}

/// A command's stdout, trimmed.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// A command's stdout and stderr, for an assertion's message.
pub fn both(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// How much counter `name` grew between two `stats --json` snapshots; panics naming
/// the counter if the datapath has no such counter.
pub fn grew(before: &serde_json::Value, after: &serde_json::Value, name: &str) -> u64 {
    let get = |s: &serde_json::Value| {
        s[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in netns stats: {s}"))
    };
    get(after).saturating_sub(get(before))
}
