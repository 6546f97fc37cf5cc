//! `netns load [--follow]`: the loader `cargo xtask run` starts. Makes sure the bridge
//! exists, loads and attaches the datapath, and with --follow prints the datapath's
//! log and runs the conntrack collector until the datapath is unloaded or a signal.

use std::io::Write as _;
use std::time::Duration;

use super::CommandError;
use crate::cgroup;
use crate::cli::GlobalArgs;
use crate::datapath::{Datapath, DatapathConfig};
use crate::network::{self, Netlink, bridge, sysctl};

/// The host side every datapath user needs: bridge (created if missing, its sysctls
/// hardened), uplink, forwarding and reserved NAT ports.
pub fn prepare_host(g: &GlobalArgs) -> Result<DatapathConfig, CommandError> {
    let rt = network::runtime()?;
    let (uplink, br) = rt.block_on(async {
        let nl = Netlink::current()?;
        let uplink = network::uplink(&nl, g.uplink.as_deref()).await?;
        let mtu = g.mtu.or(uplink.mtu).unwrap_or(network::DEFAULT_MTU);
        let br = bridge::ensure(&nl, &g.bridge, g.ip, mtu).await?;
        Ok::<_, network::NetworkError>((uplink, br))
    })?;
    sysctl::enable_ip_forward()?;
    // Under the state lock when there is a state directory: the reservation record
    // of mapped ports lives there.
    let store = crate::store::Store::open_existing(&g.state_dir)?;
    let lock = store.as_ref().map(crate::store::Store::lock).transpose()?;
    crate::reserve::nat_range(lock.as_ref(), g.nat_ports.min, g.nat_ports.max)?;
    Ok(DatapathConfig {
        bpffs_dir: g.bpffs_dir.clone(),
        uplink_ifindex: uplink.index,
        uplink_addr: uplink.addr,
        bridge_ifindex: br.index,
        gateway: g.ip.addr,
        prefix_len: g.ip.prefix_len,
        nat_ports: (g.nat_ports.min, g.nat_ports.max),
        ct_max: g.ct_max,
        allow_inbound: g.inbound_cidrs(),
    })
}

pub fn run(g: &GlobalArgs, follow: bool) -> Result<(), CommandError> {
    let cfg = prepare_host(g)?;
    let dp = Datapath::ensure_loaded(&cfg)?;
    if let Some(cg) = cgroup::resolve(&g.cgroup)? {
        dp.attach_cgroup(&cg)?;
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
                l.ifindex,
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
    log::warn!(
        "following the datapath log; collecting conntrack every {} s",
        g.gc_interval
    );
    super::gc::collect(g, Duration::from_secs(u64::from(g.gc_interval)))
}
