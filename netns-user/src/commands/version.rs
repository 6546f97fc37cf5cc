//! `netns version [--json]`.

use std::io::Write as _;

use super::CommandError;

pub fn run(json: bool) -> Result<(), CommandError> {
    let (version, layout) = (env!("CARGO_PKG_VERSION"), crate::datapath::layout_version());
    let out = &mut std::io::stdout().lock();
    if json {
        return super::print_json(
            out,
            &serde_json::json!({ "version": version, "layout_version": layout }),
        );
    }
    writeln!(out, "netns {version} (datapath layout v{layout})").map_err(CommandError::Output)
}
