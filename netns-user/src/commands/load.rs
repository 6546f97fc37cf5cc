//! `netns load [--follow]`: the loader `cargo xtask run` starts. Makes sure the bridge
//! exists, loads and attaches the datapath, and with --follow prints the datapath's
//! log and runs the conntrack collector until the datapath is unloaded or a signal.

use std::io::Write as _;
use std::time::Duration;

use super::CommandError;
use crate::cli::GlobalArgs;
use crate::collector;
use crate::config::NetConfig;
use crate::datapath::Datapath;
use crate::host;
use crate::network::{self, Netlink};

/// The host side and the datapath, as every datapath user needs them: bridge (created
/// if missing), uplink, forwarding, the datapath with its socket programs, reserved NAT
/// ports.
pub fn prepare(cfg: &NetConfig) -> Result<Datapath, CommandError> {
    let rt = network::runtime()?;
    let host = rt.block_on(async {
        let nl = Netlink::current()?;
        Ok::<_, CommandError>(host::prepare(cfg, &nl).await?)
    })?;
    // Under the state lock when there is a state directory: the reservation record
    // of mapped ports lives there.
    let store = crate::store::Store::open_existing(&cfg.state_dir)?;
    let lock = store.as_ref().map(crate::store::Store::lock).transpose()?;
    Ok(host::load_datapath(
        cfg,
        &host.uplink,
        &host.bridge,
        lock.as_ref(),
    )?)
}

pub fn run(g: &GlobalArgs, follow: bool) -> Result<(), CommandError> {
    let cfg = g.net_config();
    let dp = prepare(&cfg)?;
    if g.json && !follow {
        let links = dp.link_status()?;
        return super::print_json(
            &mut std::io::stdout().lock(),
            &serde_json::json!({ "pins": dp.pins().root(), "links": links }),
        );
    }
    {
        let out = &mut std::io::stdout().lock();
        writeln!(out, "datapath loaded under {}", dp.pins().root().display())
            .map_err(CommandError::Output)?;
        for l in dp.link_status()? {
            writeln!(
                out,
                "  {:<22} {:<12} ifindex {:<4} {}",
                l.program,
                l.attach,
                l.ifindex.map_or_else(|| "-".to_owned(), |i| i.to_string()),
                l.pin.display()
            )
            .map_err(CommandError::Output)?;
        }
    }
    if !follow {
        return Ok(());
    }
    let prog_id = dp.program_id(netns_common::progs::UPLINK_EGRESS)?;
    drop(dp);
    std::thread::spawn(move || match aya_log::EbpfLogger::init_from_id(prog_id) {
        Ok(mut logger) => loop {
            logger.flush();
            std::thread::sleep(Duration::from_millis(200));
        },
        Err(e) => log::warn!("no datapath log: {e}"),
    });
    // Collect too, unless a collector (`netns gc --daemon`) already does: one per
    // state directory.
    match collector::lock(&cfg) {
        Ok(_held) => {
            log::warn!(
                "following the datapath log; collecting conntrack every {} s",
                g.gc_interval
            );
            Ok(collector::collect(
                &cfg,
                Duration::from_secs(u64::from(g.gc_interval)),
            )?)
        }
        Err(collector::CollectorError::AlreadyRunning { .. }) => {
            log::warn!("following the datapath log (a collector already runs)");
            while crate::datapath::Datapath::open(&cfg.bpffs_dir)?.is_some() {
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
