//! Small helpers: unique names, running commands with useful failure messages.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: interface and namespace names must
/// stay within 15 bytes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xfffff)
}

/// The `netns` binary under test: `$NETNS_BIN`, or `target/<profile>/netns` next to
/// this test executable (`target/<profile>/deps/<test>`).
pub fn netns_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETNS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps");
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
    cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")))
    }

    /// Waits for the process to exit by itself (bounded), returning its output.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        while self.0.try_wait().expect("try_wait").is_none() {
            if start.elapsed() > timeout {
                let _ = self.0.kill();
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
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
