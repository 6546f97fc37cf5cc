//! The network configuration a runtime hands the plugin on stdin, and what it becomes:
//! a [`NetConfig`] (keys mirror the hook's flags in camelCase and go through the very
//! same parsers, so the CNI plugin and the hook accept and refuse the same values),
//! the port mappings of `runtimeConfig`, and the GC's valid attachments.

use std::net::Ipv4Addr;

use clap::Parser as _;
use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, code};
use crate::cli::Cli;
use crate::config::NetConfig;
use crate::portmap::{Family, PortSpec, Proto};

/// The versions this plugin speaks (VERSION lists them).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version (for errors before a config is read).
pub const NEWEST: &str = "1.1.0";

/// The plugin's `type`.
pub const TYPE: &str = "netns";

/// The plugin configuration (one entry of a conflist, with `name` and `cniVersion`
/// injected by the runtime). Unknown keys are allowed (runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub bridge: Option<String>,
    pub ip: Option<String>,
    /// `--ip6`: IPv6 for the containers (e.g. `fd00:19::1/64`).
    pub ip6: Option<String>,
    pub mtu: Option<u32>,
    pub uplink: Option<String>,
    pub state_dir: Option<String>,
    pub bpffs_dir: Option<String>,
    pub nat_ports: Option<String>,
    pub cgroup: Option<String>,
    #[serde(default)]
    pub no_masquerade: Vec<String>,
    #[serde(default)]
    pub allow_inbound: Vec<String>,
    pub fast_path: Option<bool>,
    pub ct_counters: Option<bool>,
    pub ct_max: Option<u32>,
    pub ct_max_per_container: Option<u32>,
    /// Delegated to the IPAM plugin it names when present.
    pub ipam: Option<Value>,
    /// Passed through to the result, as the reference bridge plugin does.
    pub dns: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One `portMappings` entry (the capability's convention, as the portmap plugin reads it).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i64,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Parses stdin. Syntax errors are code 6, a config of another plugin or an
/// unsupported version code 7 and 1.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE, "decoding the network configuration")
            .with_details(e.to_string())
    })?;
    if conf.kind != TYPE {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "configuration is for plugin type {:?}, this is {TYPE:?}",
                conf.kind
            ),
        ));
    }
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CNI version {:?} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "the network configuration has no name",
        ));
    }
    Ok(conf)
}

/// Numeric order of `a.b.c` versions.
pub fn version_at_least(v: &str, min: &str) -> bool {
    let num = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    num(v) >= num(min)
}

impl NetConf {
    /// The hook flags this configuration stands for, as (key, flag, value).
    fn flags(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut f = Vec::new();
        let mut opt = |key, flag, v: Option<String>| {
            if let Some(v) = v {
                f.push((key, flag, v));
            }
        };
        opt("bridge", "--bridge", self.bridge.clone());
        opt("ip", "--ip", self.ip.clone());
        opt("ip6", "--ip6", self.ip6.clone());
        opt("mtu", "--mtu", self.mtu.map(|m| m.to_string()));
        opt("uplink", "--uplink", self.uplink.clone());
        opt("stateDir", "--state-dir", self.state_dir.clone());
        opt("bpffsDir", "--bpffs-dir", self.bpffs_dir.clone());
        opt("natPorts", "--nat-ports", self.nat_ports.clone());
        opt("cgroup", "--cgroup", self.cgroup.clone());
        opt("ctMax", "--ct-max", self.ct_max.map(|m| m.to_string()));
        opt(
            "ctMaxPerContainer",
            "--ct-max-per-container",
            self.ct_max_per_container.map(|m| m.to_string()),
        );
        opt(
            "fastPath",
            "--fast-path",
            self.fast_path
                .map(|on| if on { "on" } else { "off" }.to_owned()),
        );
        opt(
            "ctCounters",
            "--ct-counters",
            self.ct_counters
                .map(|on| if on { "on" } else { "off" }.to_owned()),
        );
        for c in &self.allow_inbound {
            f.push(("allowInbound", "--allow-inbound", c.clone()));
        }
        for c in &self.no_masquerade {
            f.push(("noMasquerade", "--no-masquerade", c.clone()));
        }
        f
    }

    /// The typed configuration; a bad value is code 7 naming the key.
    pub fn net_config(&self) -> Result<NetConfig, CniError> {
        let flags = self.flags();
        // Each key alone first, so an error names the key rather than a flag.
        for (key, flag, value) in &flags {
            if let Err(e) = Cli::try_parse_from(["netns", *flag, value.as_str()]) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("invalid value {value:?} for key {key:?}"),
                )
                .with_details(clap_reason(&e)));
            }
        }
        let mut args = vec!["netns".to_owned()];
        for (_, flag, value) in flags {
            args.push(flag.to_owned());
            args.push(value);
        }
        let cli = Cli::try_parse_from(&args).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "invalid network configuration")
                .with_details(clap_reason(&e))
        })?;
        Ok(cli.global.net_config())
    }

    /// `runtimeConfig.portMappings` as port specs; refuses what netns cannot forward.
    pub fn port_specs(&self) -> Result<Vec<PortSpec>, CniError> {
        self.runtime_config
            .port_mappings
            .iter()
            .filter_map(|m| port_spec(m).transpose())
            .collect()
    }

    /// The IPAM plugin's type, when the configuration delegates addressing.
    pub fn ipam_type(&self) -> Result<Option<String>, CniError> {
        let Some(ipam) = &self.ipam else {
            return Ok(None);
        };
        if ipam.as_object().is_some_and(|o| o.is_empty()) {
            return Ok(None);
        }
        match ipam.get("type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() && !t.contains('/') => Ok(Some(t.to_owned())),
            _ => Err(CniError::new(
                code::INVALID_CONFIG,
                "\"ipam\" needs a \"type\" naming an IPAM plugin (a file name in CNI_PATH)",
            )),
        }
    }
}

/// The first line of a clap error, without its "error: " prefix and styling.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or("").trim();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// One mapping; None for an IPv6 host address (not forwarded yet: IPv4 only).
fn port_spec(m: &PortMapping) -> Result<Option<PortSpec>, CniError> {
    let bad = |what: String| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("runtimeConfig.portMappings: {what}"),
        )
    };
    let port = |p: i64, which: &str| -> Result<u16, CniError> {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("{which} {p} is not in 1..65535")))
    };
    let host = port(m.host_port, "hostPort")?;
    let container = port(m.container_port, "containerPort")?;
    let proto = match m.protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => {
            return Err(bad(format!(
                "protocol {other:?} is not supported (tcp or udp)"
            )));
        }
    };
    // docker's rule: no host IP is both families, 0.0.0.0 and [::] each one.
    let (family, host_ip, host_ip6) = match m.host_ip.as_str() {
        "" => (Family::Both, None, None),
        s => match s.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => (
                Family::V4,
                Some(ip).filter(|ip: &Ipv4Addr| !ip.is_unspecified()),
                None,
            ),
            Ok(std::net::IpAddr::V6(ip)) => {
                (Family::V6, None, Some(ip).filter(|ip| !ip.is_unspecified()))
            }
            Err(_) => return Err(bad(format!("hostIP {s:?} is not an IP address"))),
        },
    };
    Ok(Some(PortSpec {
        family,
        host_ip,
        host_ip6,
        host: (host, host),
        container: (container, container),
        proto,
        runtime_binds: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        parse(format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"netns"{extra}}}"#).as_bytes())
    }

    #[test]
    fn versions_and_types() {
        assert!(conf("").is_ok());
        let e = parse(br#"{"cniVersion":"0.2.0","name":"n","type":"netns"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = parse(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert_eq!(parse(b"{nope").unwrap_err().code, code::DECODE);
        assert!(version_at_least("1.1.0", "1.0.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }

    #[test]
    fn keys_become_the_hook_flags() {
        let c = conf(
            r#","bridge":"br9","ip":"10.9.0.1/24","ip6":"fd00:9::1/64","stateDir":"/tmp/x","allowInbound":["10.0.0.0/8"],"noMasquerade":["10.0.0.0/8","192.0.2.0/24"],"fastPath":true,"mtu":1400"#,
        )
        .unwrap();
        let n = c.net_config().unwrap();
        assert_eq!(n.bridge, "br9");
        assert_eq!(n.gateway.to_string(), "10.9.0.1/24");
        assert_eq!(n.gateway6.unwrap().to_string(), "fd00:9::1/64");
        assert_eq!(n.state_dir, std::path::PathBuf::from("/tmp/x"));
        assert_eq!(n.mtu, Some(1400));
        assert!(n.fast_path);
        assert_eq!(n.allow_inbound.len(), 1);
        assert_eq!(n.no_masquerade.len(), 2);
        for (extra, key) in [
            (r#","ip":"10.9.0.0/24""#, "ip"),
            (r#","ip6":"fd00:9::1/130""#, "ip6"),
            (r#","bridge":"a/b""#, "bridge"),
            (r#","stateDir":"/run/netns/x""#, "stateDir"),
            (r#","allowInbound":["nope"]"#, "allowInbound"),
            (r#","noMasquerade":["10.0.0.0/40"]"#, "noMasquerade"),
            (r#","mtu":20"#, "mtu"),
        ] {
            let e = conf(extra).unwrap().net_config().unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{extra}");
            assert!(e.msg.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn port_mappings() {
        let c = conf(
            r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""},{"hostPort":53,"containerPort":53,"protocol":"udp","hostIP":"127.0.0.1"},{"hostPort":9,"containerPort":9,"hostIP":"::"}]}"#,
        )
        .unwrap();
        let s = c.port_specs().unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[2].family, s[2].host_ip6), (Family::V6, None));
        assert_eq!(s[1].family, Family::V4);
        assert_eq!(s[0].family, Family::Both);
        assert_eq!(
            (s[0].host, s[0].container, s[0].proto, s[0].host_ip),
            ((8080, 8080), (80, 80), Proto::Tcp, None)
        );
        assert_eq!(s[1].host_ip, Some(Ipv4Addr::LOCALHOST));
        for bad in [
            r#"{"hostPort":0,"containerPort":80}"#,
            r#"{"hostPort":70000,"containerPort":80}"#,
            r#"{"hostPort":80,"containerPort":80,"protocol":"sctp"}"#,
            r#"{"hostPort":80,"containerPort":80,"hostIP":"x"}"#,
        ] {
            let c = conf(&format!(r#","runtimeConfig":{{"portMappings":[{bad}]}}"#)).unwrap();
            assert_eq!(
                c.port_specs().unwrap_err().code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
    }
}
