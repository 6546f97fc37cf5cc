//! One module per verb (netavark style). Add a verb: a `cli::Command` variant, a
//! module here with a `run`, a match arm in [`run`], and an error variant if needed.

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
    #[error("starting the collector")]
    Daemon(#[source] std::io::Error),
    #[error(transparent)]
    Caps(#[from] crate::caps::CapError),
    #[error(transparent)]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    #[error(
        "reconcile left {0} item(s) it could not clean (see above); they are retried next time"
    )]
    ReconcileIncomplete(usize),
}

/// Runs the parsed command line; no command means `hook`.
pub fn run(cli: Cli) -> Result<(), CommandError> {
    let cmd = cli.command.unwrap_or(Command::Hook);
    if let Some(what) = needs_datapath_caps(&cmd) {
        crate::caps::require(what, crate::caps::Need::DATAPATH)?;
    }
    match cmd {
        Command::Hook => hook::run(&cli.global),
        Command::Ls { json } => ls::run(&cli.global, json),
        Command::Version => version::run(),
        Command::Load { follow } => load::run(&cli.global, follow),
        Command::Port(ref c) => port::run(&cli.global, c),
        Command::Conntrack(ref c) => conntrack::run(&cli.global, c),
        Command::Stats { json } => stats::run(&cli.global, json),
        Command::Gc(ref a) => gc::run(&cli.global, a),
        Command::Datapath(ref c) => datapath::run(&cli.global, c),
    }
}

/// The commands that touch the datapath or the network, by name; `ls` and `version`
/// read only the state directory. The hook checks per phase once it has read stdin.
fn needs_datapath_caps(cmd: &Command) -> Option<&'static str> {
    match cmd {
        Command::Hook | Command::Ls { .. } | Command::Version => None,
        Command::Load { .. } => Some("netns load"),
        Command::Port(_) => Some("netns port"),
        Command::Conntrack(_) => Some("netns conntrack"),
        Command::Stats { .. } => Some("netns stats"),
        Command::Gc(_) => Some("netns gc"),
        Command::Datapath(_) => Some("netns datapath"),
    }
}
