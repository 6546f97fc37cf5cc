//! `netns version`.

use std::io::Write as _;

use super::CommandError;

pub fn run() -> Result<(), CommandError> {
    writeln!(
        std::io::stdout(),
        "netns {} (datapath layout v{})",
        env!("CARGO_PKG_VERSION"),
        crate::datapath::layout_version()
    )
    .map_err(CommandError::Output)
}
