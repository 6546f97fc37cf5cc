//! The ADD result, in the shape of the configuration's CNI version: 0.3.x and 0.4.0
//! give every IP a `"version"` ("4" or "6"), 1.0.0 and later do not.

use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The namespace path, for the interface inside the container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IpConfig {
    /// `a.b.c.d/prefix` or `x::y/prefix`.
    pub address: String,
    pub gateway: IpAddr,
    /// Index into `interfaces`.
    pub interface: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub dst: String,
    pub gw: IpAddr,
}

#[derive(Debug, Clone, Serialize)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Value,
}

impl CniResult {
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = serde_json::to_value(self).expect("plain struct");
        v["cniVersion"] = version.into();
        if !super::conf::version_at_least(version, "1.0.0")
            && let Some(ips) = v["ips"].as_array_mut()
        {
            for ip in ips {
                let v6 = ip["address"].as_str().is_some_and(|a| a.contains(':'));
                ip["version"] = if v6 { "6" } else { "4" }.into();
            }
        }
        v
    }
}

/// The IPv4 address (and gateway) an IPAM plugin's result gives, in any version's shape.
pub fn ipam_address(result: &Value) -> Option<(Ipv4Addr, u8, Option<Ipv4Addr>)> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let (a, p) = ip["address"].as_str()?.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
        let gw = ip["gateway"].as_str().and_then(|g| g.parse().ok());
        Some((addr, prefix, gw))
    })
}

/// The addresses a previous result (CHECK's prevResult) lists.
pub fn result_addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: Some("/var/run/netns/x".into()),
            }],
            ips: vec![
                IpConfig {
                    address: "172.19.0.2/16".into(),
                    gateway: Ipv4Addr::new(172, 19, 0, 1).into(),
                    interface: 0,
                },
                IpConfig {
                    address: "fd00:19::2/64".into(),
                    gateway: "fd00:19::1".parse().unwrap(),
                    interface: 0,
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".into(),
                    gw: Ipv4Addr::new(172, 19, 0, 1).into(),
                },
                Route {
                    dst: "::/0".into(),
                    gw: "fd00:19::1".parse().unwrap(),
                },
            ],
            dns: serde_json::json!({}),
        }
    }

    #[test]
    fn version_shapes() {
        let old = sample().to_json("0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][1]["gateway"], "fd00:19::1");
        assert_eq!(old["routes"][1]["dst"], "::/0");
        assert_eq!(old["cniVersion"], "0.4.0");
        let new = sample().to_json("1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["sandbox"], "/var/run/netns/x");
        assert_eq!(
            ipam_address(&new),
            Some((
                Ipv4Addr::new(172, 19, 0, 2),
                16,
                Some(Ipv4Addr::new(172, 19, 0, 1))
            ))
        );
        assert_eq!(
            result_addresses(&old),
            vec!["172.19.0.2/16".to_owned(), "fd00:19::2/64".to_owned()]
        );
    }
}
