//! The bridge every container's host-side veth is enslaved to.

use rtnetlink::LinkBridge;

use super::netlink::{Link, Netlink};
use super::{NetworkError, sysctl};
use crate::config::{Gateway, Gateway6};

/// Creates the bridge if it is missing, hardens its sysctls (no RA, no redirect a
/// container sends configures the host), sets the gateway address and MTU and brings
/// it up; with `gw6` also the IPv6 gateway (nodad). Never rolled back: other
/// containers share it.
pub async fn ensure(
    nl: &Netlink,
    name: &str,
    gw: Gateway,
    gw6: Option<Gateway6>,
    mtu: u32,
) -> Result<Link, NetworkError> {
    let link = match nl.link_by_name(name).await? {
        Some(l) if !l.is_bridge() => {
            return Err(NetworkError::NotABridge {
                name: name.to_owned(),
                kind: l
                    .kind
                    .unwrap_or_else(|| "a device without link kind".to_owned()),
            });
        }
        Some(l) => l,
        None => {
            log::debug!("creating bridge {name}");
            nl.add_link(
                LinkBridge::new(name).mtu(mtu).build(),
                &format!("creating bridge {name}"),
            )
            .await?;
            nl.link_by_name(name)
                .await?
                .ok_or_else(|| NetworkError::Vanished(name.to_owned()))?
        }
    };
    // Before the bridge goes up and before any container port joins it.
    for f in sysctl::harden_bridge(name)? {
        log::info!("set {} to 0", f.display());
    }
    let mtu_change = (link.mtu != Some(mtu)).then_some(mtu);
    if !link.up || mtu_change.is_some() {
        nl.set_link(link.index, true, mtu_change, None).await?;
    }
    nl.ensure_ipv4_addr(link.index, gw.addr, gw.prefix_len)
        .await?;
    if let Some(g) = gw6 {
        nl.ensure_ipv6_addr(link.index, g.addr, g.prefix_len)
            .await?;
    }
    Ok(link)
}
