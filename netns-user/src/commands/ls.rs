//! `netns ls [--json]`: containers with a lease in the state directory.
//!
//! `--json` prints an array sorted by id; each object has
//! `id, pid, ip, prefix_len, gateway` (and with `--ip6` `ip6, prefix6_len, gateway6`),
//! `host_veth, host_ifindex, mac, bridge,
//! created` (RFC 3339, UTC), `created_unix` (seconds) and `complete` (false while a
//! prestart is in progress or died half-way), `ifname` (the interface in the
//! container) and, for CNI attachments (pid 0), `cni` (`container_id`, `ifname`,
//! `network`, `netns`, `ipam`).

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::CommandError;
use crate::cli::GlobalArgs;
use crate::ipam;
use crate::store::Store;

#[derive(Debug, Serialize)]
pub struct Entry {
    pub id: String,
    pub pid: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix6_len: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub mac: Option<String>,
    pub bridge: String,
    pub created: String,
    pub created_unix: u64,
    pub complete: bool,
    pub ifname: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<ipam::CniAttachment>,
}

/// The listing `ls` prints; empty if the state directory does not exist.
pub fn entries(g: &GlobalArgs) -> Result<Vec<Entry>, CommandError> {
    let Some(store) = Store::open_existing(&g.state_dir)? else {
        return Ok(Vec::new());
    };
    let lock = store.lock_shared()?;
    Ok(ipam::list(&lock)?
        .into_iter()
        .map(|(id, l)| Entry {
            id,
            ifname: l.ifname().to_owned(),
            cni: l.cni.clone(),
            pid: l.pid,
            ip: l.ip,
            prefix_len: l.prefix_len,
            gateway: l.gateway,
            ip6: l.ip6,
            prefix6_len: l.prefix6_len,
            gateway6: l.gateway6,
            host_veth: l.host_veth,
            host_ifindex: l.host_ifindex,
            mac: l.mac,
            bridge: l.bridge,
            created: rfc3339(l.created_unix),
            created_unix: l.created_unix,
            complete: l.complete,
        })
        .collect())
}

pub fn run(g: &GlobalArgs, json: bool) -> Result<(), CommandError> {
    let list = entries(g)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &list)
            .map_err(|e| CommandError::Output(e.into()))?;
        writeln!(out).map_err(CommandError::Output)?;
        return Ok(());
    }
    let w = list.iter().map(|e| e.id.len()).max().unwrap_or(0).max(2);
    let mut text = format!(
        "{:<w$}  {:>7}  {:<18}  {:<15}  CREATED\n",
        "ID", "PID/CNI", "IP", "HOST VETH"
    );
    for e in &list {
        let mut ip = format!("{}/{}", e.ip, e.prefix_len);
        if let (Some(a), Some(len)) = (e.ip6, e.prefix6_len) {
            ip.push_str(&format!(" {a}/{len}"));
        }
        let created = if e.complete {
            e.created.clone()
        } else {
            format!("{} (incomplete)", e.created)
        };
        let owner = if e.cni.is_some() {
            "cni".to_owned()
        } else {
            e.pid.to_string()
        };
        text.push_str(&format!(
            "{:<w$}  {owner:>7}  {ip:<18}  {:<15}  {created}\n",
            e.id, e.host_veth
        ));
    }
    out.write_all(text.as_bytes()).map_err(CommandError::Output)
}

/// Unix seconds as RFC 3339 (`YYYY-MM-DDTHH:MM:SSZ`, UTC).
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("@{unix}"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
