use std::process::ExitCode;

use clap::Parser as _;
use netns::cli::Cli;

fn main() -> ExitCode {
    // A CNI runtime passes everything in the environment and on stdin, no arguments.
    if netns::commands::cni::requested() {
        init_log(std::env::var_os("NETNS_DEBUG").is_some());
        return ExitCode::from(netns::commands::cni::run());
    }
    let cli = Cli::parse();
    init_log(cli.global.debug);
    match netns::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netns: {}", netns::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr (stdout carries results: JSON for CNI, tables for the CLI).
fn init_log(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(level)
        .target(env_logger::Target::Stderr)
        .init();
}
