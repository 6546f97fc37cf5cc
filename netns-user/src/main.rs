use std::process::ExitCode;

use clap::Parser as _;
use netns::cli::Cli;

fn main() -> ExitCode {
    // A CNI runtime passes everything in the environment and on stdin, no arguments.
    if netns::commands::cni::requested() {
        env_logger::Builder::new()
            .filter_level(if std::env::var_os("NETNS_DEBUG").is_some() {
                log::LevelFilter::Debug
            } else {
                log::LevelFilter::Warn
            })
            .target(env_logger::Target::Stderr)
            .init();
        return ExitCode::from(netns::commands::cni::run());
    }
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(if cli.global.debug {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Warn
        })
        .target(env_logger::Target::Stderr)
        .init();
    match netns::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netns: {}", netns::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
