//! One module per verb (netavark style). Add a verb: a `cli::Command` variant, a
//! module here with a `run`, a match arm in [`run`], and an error variant if needed.

pub mod cni;
pub mod conntrack;
pub mod datapath;
pub mod gc;
pub mod hook;
pub mod load;
pub mod ls;
pub mod port;
pub mod stats;
pub mod version;

use crate::cli::{Cli, Command};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Hook(#[from] crate::hook::HookError),
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("writing output")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error(transparent)]
    PortMap(#[from] crate::portmap::PortMapError),
    #[error(transparent)]
    Spec(#[from] crate::portmap::SpecError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Netlink(#[from] crate::network::NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] crate::network::sysctl::SysctlError),
    #[error(transparent)]
    Reserve(#[from] crate::reserve::ReserveError),
    #[error("no container {0:?} (not an id or address of a container with a lease)")]
    UnknownContainer(String),
    #[error("--timeouts: {0}")]
    Timeouts(String),
    #[error(transparent)]
    Collector(#[from] crate::collector::CollectorError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Caps(#[from] crate::caps::CapError),
    #[error(transparent)]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    #[error(
        "reconcile left {0} item(s) it could not clean (see above); they are retried next time"
    )]
    ReconcileIncomplete(usize),
}

/// Exit codes (README "Exit codes"): what a script or a runtime can act on.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed; nothing half-done was left (a failed hook rolled back).
    pub const FAILURE: u8 = 1;
    /// Bad command line or input (clap uses 2 for its own usage errors too).
    pub const USAGE: u8 = 2;
    /// The datapath is not loaded under --bpffs-dir.
    pub const NOT_LOADED: u8 = 3;
    /// Partly done: some items could not be cleaned or repaired (listed on stderr);
    /// running the command again retries them.
    pub const PARTIAL: u8 = 4;
}

impl CommandError {
    /// The exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Spec(_)
            | CommandError::UnknownContainer(_)
            | CommandError::Timeouts(_)
            | CommandError::Oci(_) => return exit::USAGE,
            CommandError::ReconcileIncomplete(_) => return exit::PARTIAL,
            CommandError::Hook(crate::hook::HookError::Poststop { .. }) => return exit::PARTIAL,
            _ => {}
        }
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = src {
            match e.downcast_ref() {
                Some(crate::datapath::DatapathError::NotLoaded(_)) => return exit::NOT_LOADED,
                Some(crate::datapath::DatapathError::CheckIncomplete { .. }) => {
                    return exit::PARTIAL;
                }
                _ => {}
            }
            // A refused port forward is bad input too.
            use crate::portmap::PortMapError as P;
            if let Some(
                P::Collision { .. }
                | P::Duplicate(_)
                | P::InUse { .. }
                | P::NotMapped(_)
                | P::NotLocal(_),
            ) = e.downcast_ref()
            {
                return exit::USAGE;
            }
            src = e.source();
        }
        exit::FAILURE
    }
}

/// Prints `v` as one pretty JSON value and a newline (every verb's `--json`).
pub(crate) fn print_json(
    out: &mut impl std::io::Write,
    v: &impl serde::Serialize,
) -> Result<(), CommandError> {
    serde_json::to_writer_pretty(&mut *out, v).map_err(|e| CommandError::Output(e.into()))?;
    writeln!(out).map_err(CommandError::Output)
}

/// Runs the parsed command line; no command means `hook`.
pub fn run(cli: Cli) -> Result<(), CommandError> {
    let cmd = cli.command.unwrap_or(Command::Hook);
    if let Some(what) = needs_datapath_caps(&cmd) {
        crate::caps::require(what, crate::caps::Need::DATAPATH)?;
    }
    match cmd {
        Command::Hook => hook::run(&cli.global),
        Command::Ls => ls::run(&cli.global, cli.global.json),
        Command::Version => version::run(cli.global.json),
        Command::Load { follow } => load::run(&cli.global, follow),
        Command::Port(ref c) => port::run(&cli.global, c),
        Command::Conntrack(ref c) => conntrack::run(&cli.global, c),
        Command::Stats => stats::run(&cli.global, cli.global.json),
        Command::Gc(ref a) => gc::run(&cli.global, a),
        Command::Datapath(ref c) => datapath::run(&cli.global, c),
    }
}

/// The commands that touch the datapath or the network, by name; `ls` and `version`
/// read only the state directory. The hook checks per phase once it has read stdin.
fn needs_datapath_caps(cmd: &Command) -> Option<&'static str> {
    match cmd {
        Command::Hook | Command::Ls | Command::Version => None,
        Command::Load { .. } => Some("netns load"),
        Command::Port(_) => Some("netns port"),
        Command::Conntrack(_) => Some("netns conntrack"),
        Command::Stats => Some("netns stats"),
        Command::Gc(_) => Some("netns gc"),
        Command::Datapath(_) => Some("netns datapath"),
    }
}
