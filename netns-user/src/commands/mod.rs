//! One module per verb (netavark style). Add a verb: a `cli::Command` variant, a
//! module here with a `run`, a match arm in [`run`], and an error variant if needed.

pub mod hook;
pub mod ls;
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
}

/// Runs the parsed command line; no command means `hook`.
pub fn run(cli: Cli) -> Result<(), CommandError> {
    match cli.command.unwrap_or(Command::Hook) {
        Command::Hook => hook::run(&cli.global),
        Command::Ls { json } => ls::run(&cli.global, json),
        Command::Version => version::run(),
    }
}
