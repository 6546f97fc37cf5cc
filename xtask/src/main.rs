//! Build, run, test, demo and benchmark helpers: `cargo xtask <command>`.

mod bench;
mod demo;
mod signals;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netns development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh Debian machine lacks (packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object and the netns binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the loader (`netns load --follow`) with extra arguments, inside
    /// the named network namespace (`--netns`), or with `--host` in xtask's own.
    Run {
        #[arg(long)]
        release: bool,
        /// Network namespace (from `ip netns add`) to run the loader in.
        #[arg(long)]
        netns: Option<String>,
        /// Really attach to the interfaces of the namespace xtask runs in.
        #[arg(long, conflicts_with = "netns")]
        host: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build once, then run every test (unit and integration) against that build.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A self-contained demo in private namespaces with real runc containers.
    Demo,
    /// eBPF vs iptables vs no NAT, side by side (writes docs/BENCHMARKS.md).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

pub fn binary(release: bool) -> PathBuf {
    root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("netns")
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    build_with(release, &[])
}

/// The feature the integration tests need: NETNS_FAIL_AT / NETNS_KILL_AT, which the
/// release binary does not have.
const TEST_FEATURES: &str = "netns-user/fault-injection";

/// Integration suites `cargo xtask test` runs a second time with `--fast-path on`.
const FAST_PATH_SUITES: [&str; 6] = ["nat", "portmap", "safety", "conntrack", "hook", "cni"];

fn build_with(release: bool, extra: &[&str]) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "-p", "netns-user", "--bins"];
    args.extend_from_slice(extra);
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    Ok(binary(release))
}

/// Runs `cargo test`, echoing its output, and closes with one summary line over all
/// test binaries (the last binary cargo runs is often an empty doc-test one).
fn test_with_summary(args: &[&str], netns_bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        // The integration tests run this binary.
        .env("NETNS_BIN", netns_bin)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(key)
                            .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// What the tests need and `scripts/setup.sh` installs: fail early with one clear
/// message instead of forty confusing test failures.
fn preflight() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for tool in [
        "runc",
        "socat",
        "python3",
        "nsenter",
        "ip",
        "ss",
        "iptables-save",
        "nft",
        "bpftool",
        "bpf-linker",
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            missing.push(tool.to_owned());
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox (busybox-static)".to_owned());
    }
    if !missing.is_empty() {
        bail!(
            "missing: {}; run `bash scripts/setup.sh` (or `cargo xtask setup`) first",
            missing.join(", ")
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the tests create network namespaces, veths and runc containers: run them as root");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => {
            let status = Command::new("bash")
                .arg(root().join("scripts/setup.sh"))
                .status()?;
            if !status.success() {
                bail!("scripts/setup.sh failed: {status}");
            }
        }
        Cmd::Build { release } => {
            build(release)?;
        }
        Cmd::Run {
            release,
            netns,
            host,
            args,
        } => {
            // Fail safe: /proc/1/ns/net is not always readable, so no guessing whether
            // this is the machine's own namespace: say where, or say --host.
            if netns.is_none() && !host {
                bail!(
                    "refusing to attach the datapath without knowing where: pass --netns NAME \
                     (a namespace made with `ip netns add`), or --host to attach to the \
                     interfaces of the namespace xtask runs in"
                );
            }
            let bin = build(release)?;
            let mut cmd = match &netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/run/netns/{ns}")).arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            let status = cmd.args(&args).arg("load").arg("--follow").status()?;
            if !status.success() {
                bail!("netns load failed: {status}");
            }
        }
        Cmd::Test { args } => {
            preflight()?;
            // One build: the integration tests run this binary (target/debug/netns),
            // built with fault injection; the unit tests get the same features, so
            // cargo test does not rebuild it differently.
            let bin = build_with(false, &["--features", TEST_FEATURES])?;
            // --no-fail-fast: one failing test binary must not hide the others' results.
            let mut a = vec![
                "test",
                "--workspace",
                "--exclude",
                "netns-ebpf",
                "--exclude",
                "xtask",
                "--no-fail-fast",
                "--features",
                TEST_FEATURES,
            ];
            let full = args.is_empty();
            a.extend(args.iter().map(String::as_str));
            let first = test_with_summary(&a, &bin, &[]);
            // The NAT, port-forward, hairpin and conntrack suites again in the other
            // datapath mode (the fast path), on the same build.
            let second = if full {
                println!("again with the fast path on:");
                let mut b = vec!["test", "-p", "netns-tests", "--no-fail-fast"];
                for t in FAST_PATH_SUITES {
                    b.extend(["--test", t]);
                }
                test_with_summary(&b, &bin, &[("NETNS_TEST_FAST_PATH", "on")])
            } else {
                Ok(())
            };
            first?;
            second?;
        }
        Cmd::Demo => {
            preflight()?;
            let bin = build(false)?;
            demo::run(&bin)?;
        }
        Cmd::Bench { args } => {
            bench::run(&args)?;
        }
    }
    Ok(())
}
