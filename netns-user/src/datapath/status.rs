//! What `netns datapath status` reports: pinned programs, links and maps, as data (the
//! command renders it as text or JSON).

use std::fmt;
use std::path::PathBuf;

use aya::programs::ProgramInfo;
use netns_common::{
    Ct6Entry, Ct6Key, CtCount, CtEntry, CtKeep, CtKey, Frag6Key, Frag6Xlat, FragKey, FragPorts,
    LAYOUT_VERSION, Port6Key, Port6Target, Sock6Key, Sock6Orig, SockKey, SockOrig, maps,
};
use serde::Serialize;

use super::attach::{ifname, pinned_links};
use super::pins::Pins;
use super::{Datapath, DatapathError, key_count, map_err, prog_err, sys};

/// Where a link attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Attach {
    #[serde(rename = "tcx/ingress")]
    TcxIngress,
    #[serde(rename = "tcx/egress")]
    TcxEgress,
    #[serde(rename = "cgroup")]
    Cgroup,
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attach::TcxIngress => "tcx/ingress",
            Attach::TcxEgress => "tcx/egress",
            Attach::Cgroup => "cgroup",
        })
    }
}

/// Everything pinned, for `netns datapath status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pins: PathBuf,
    pub layout_version: u32,
    /// `--fast-path`: translated packets bypass the host stack.
    pub fast_path: bool,
    /// `--ct-max-per-container` (0: no limit).
    pub ct_max_per_container: u32,
    /// `--ct-counters`: conntrack entries count packets and bytes.
    pub ct_counters: bool,
    /// `--allow-inbound` CIDRs (the inbound trie).
    pub allow_inbound: Vec<String>,
    /// `--no-masquerade` CIDRs (the no-masquerade trie).
    pub no_masquerade: Vec<String>,
    pub ipv6: Ipv6Status,
    pub programs: Vec<ProgramStatus>,
    pub links: Vec<LinkStatus>,
    pub maps: Vec<MapStatus>,
}

/// IPv6 for containers (`--ip6`).
#[derive(Debug, Clone, Serialize)]
pub struct Ipv6Status {
    pub enabled: bool,
    /// The bridge's IPv6 gateway with the containers' prefix length.
    pub gateway: Option<String>,
    /// The NAT66 source (the uplink's global IPv6 address); None: none yet, container
    /// IPv6 to the outside is dropped.
    pub uplink_addr: Option<String>,
}

/// One pinned program; `id` and `type` are None when its pin is missing.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub pin: PathBuf,
    pub id: Option<u32>,
    /// The kernel's program type as bpftool names it (`sched_cls`, `cgroup_sock_addr`).
    #[serde(rename = "type")]
    pub prog_type: Option<String>,
}

/// One pinned link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub pin: PathBuf,
    /// The program the pin name stands for, and the id of the one the link runs.
    pub program: String,
    pub program_id: Option<u32>,
    pub attach: Attach,
    /// The device a TCX link is attached to; None for cgroup links and for a TCX link
    /// whose device is gone or that was detached.
    pub ifindex: Option<u32>,
    pub ifname: Option<String>,
    pub attached: bool,
}

impl fmt::Display for LinkStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = match (&self.ifname, self.ifindex) {
            (Some(n), Some(i)) => format!("{n} ({i})"),
            (None, Some(i)) => format!("ifindex {i}"),
            _ => "-".to_owned(),
        };
        let state = if self.attached {
            "attached"
        } else {
            "DETACHED"
        };
        write!(
            f,
            "{:<22} {:<12} {dev:<18} {state:<9} {}",
            self.program,
            self.attach,
            self.pin.display()
        )
    }
}

/// One pinned map.
#[derive(Debug, Clone, Serialize)]
pub struct MapStatus {
    pub name: String,
    pub pin: PathBuf,
    pub entries: usize,
    pub max_entries: u32,
}

fn cidr_strings(v: Vec<super::Cidr>) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

/// bpftool's name of a program type: `BPF_PROG_TYPE_SCHED_CLS` -> `sched_cls`.
fn prog_type_name(debug: &str) -> String {
    debug
        .strip_prefix("BPF_PROG_TYPE_")
        .unwrap_or(debug)
        .to_ascii_lowercase()
}

impl Datapath {
    pub fn status(&self) -> Result<Status, DatapathError> {
        let cfg = self.config()?;
        Ok(Status {
            pins: self.pins.root().to_owned(),
            layout_version: LAYOUT_VERSION,
            fast_path: cfg.fast_path,
            ct_max_per_container: cfg.ct_per_container,
            ct_counters: cfg.ct_counters,
            allow_inbound: cidr_strings(self.inbound_entries()?),
            no_masquerade: cidr_strings(self.nomasq_entries()?),
            ipv6: Ipv6Status {
                enabled: cfg.gateway6.is_some(),
                gateway: cfg.gateway6.map(|(g, len)| format!("{g}/{len}")),
                uplink_addr: cfg.uplink_addr6.map(|a| a.to_string()),
            },
            programs: self.program_status(),
            links: self.link_status()?,
            maps: self.map_status()?,
        })
    }

    /// Pinned programs (a missing pin has no id).
    pub fn program_status(&self) -> Vec<ProgramStatus> {
        Pins::TC_PROGS
            .iter()
            .chain(Pins::SOCK_PROGS.iter())
            .map(|name| {
                let pin = self.pins.prog(name);
                let info = ProgramInfo::from_pin(&pin).ok();
                ProgramStatus {
                    name: (*name).to_owned(),
                    id: info.as_ref().map(ProgramInfo::id),
                    prog_type: info
                        .as_ref()
                        .map(|i| prog_type_name(&format!("{:?}", i.program_type()))),
                    pin,
                }
            })
            .collect()
    }

    /// The kernel id of a pinned program (for aya-log's `init_from_id`).
    pub fn program_id(&self, name: &str) -> Result<u32, DatapathError> {
        let pin = self.pins.prog(name);
        ProgramInfo::from_pin(&pin)
            .map(|i| i.id())
            .map_err(prog_err(format!("program info of {}", pin.display())))
    }

    /// Pinned links with what they attach where.
    pub fn link_status(&self) -> Result<Vec<LinkStatus>, DatapathError> {
        Ok(pinned_links(&self.pins)?
            .into_iter()
            .map(|l| {
                let info = sys::link_info(&l.pin).ok();
                let (ifindex, attached) = match l.attach {
                    Attach::Cgroup => (None, info.as_ref().is_some_and(|i| i.cgroup_id != 0)),
                    _ => {
                        let i = info.as_ref().map(|i| i.ifindex).filter(|i| *i != 0);
                        (i, i.is_some())
                    }
                };
                LinkStatus {
                    program: l.program.to_owned(),
                    program_id: info.map(|i| i.prog_id).filter(|i| *i != 0),
                    attach: l.attach,
                    ifindex,
                    ifname: ifindex.and_then(|i| ifname(i).ok()),
                    attached,
                    pin: l.pin,
                }
            })
            .collect())
    }

    /// Maps with their pins and entry counts.
    pub fn map_status(&self) -> Result<Vec<MapStatus>, DatapathError> {
        let mut out = Vec::new();
        for name in [
            maps::CONNTRACK,
            maps::CT_NEW,
            maps::CT_KEEP,
            maps::CT_COUNT,
            maps::ENDPOINTS,
            maps::BRIDGE_PORTS,
            maps::PORTS,
            maps::INBOUND,
            maps::NOMASQ,
            maps::FRAGS,
            maps::SOCK_REVNAT,
            maps::CONFIG,
            maps::STATS,
            maps::CONNTRACK6,
            maps::ENDPOINTS6,
            maps::PORTS6,
            maps::FRAGS6,
            maps::SOCK_REVNAT6,
            maps::PORT_USE,
        ] {
            let data = self.map_data(name)?;
            let info = data
                .info()
                .map_err(map_err(format!("map info of {name}")))?;
            // Counted with one batch walk each (the conntrack tables can be large, and
            // a GET_NEXT_KEY walk starts over when an entry goes under it).
            let entries = match name {
                maps::CONNTRACK | maps::CT_NEW => {
                    key_count(&self.hash_map::<CtKey, CtEntry>(name, true, "conntrack map")?)
                }
                maps::CT_KEEP => {
                    key_count(&self.hash_map::<CtKey, CtKeep>(name, false, "conntrack copies")?)
                }
                maps::CT_COUNT => {
                    key_count(&self.hash_map::<u32, CtCount>(name, false, "conntrack counts")?)
                }
                maps::ENDPOINTS => self.endpoints()?.len(),
                maps::BRIDGE_PORTS => self.bridge_ports()?.len(),
                maps::PORTS => self.port_forwards()?.len(),
                maps::INBOUND => self.inbound_entries()?.len(),
                maps::NOMASQ => self.nomasq_entries()?.len(),
                maps::SOCK_REVNAT => key_count(&self.hash_map::<SockKey, SockOrig>(
                    name,
                    true,
                    "socket reverse map",
                )?),
                maps::FRAGS => {
                    key_count(&self.hash_map::<FragKey, FragPorts>(name, true, "fragment map")?)
                }
                maps::CONNTRACK6 => key_count(&self.hash_map::<Ct6Key, Ct6Entry>(
                    name,
                    true,
                    "IPv6 conntrack map",
                )?),
                maps::ENDPOINTS6 => self.endpoints6()?.len(),
                maps::PORTS6 => key_count(&self.hash_map::<Port6Key, Port6Target>(
                    name,
                    false,
                    "IPv6 port map",
                )?),
                maps::FRAGS6 => key_count(&self.hash_map::<Frag6Key, Frag6Xlat>(
                    name,
                    true,
                    "IPv6 fragment map",
                )?),
                maps::SOCK_REVNAT6 => key_count(&self.hash_map::<Sock6Key, Sock6Orig>(
                    name,
                    true,
                    "IPv6 socket reverse map",
                )?),
                // Marked ports (forwards' and flows' tables).
                maps::PORT_USE => self.port_forwards()?.port_use().count()?,
                // Arrays: every slot exists.
                _ => info.max_entries() as usize,
            };
            out.push(MapStatus {
                name: name.to_owned(),
                pin: self.pins.map(name),
                entries,
                max_entries: info.max_entries(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_type_names() {
        assert_eq!(prog_type_name("BPF_PROG_TYPE_SCHED_CLS"), "sched_cls");
        assert_eq!(
            prog_type_name("BPF_PROG_TYPE_CGROUP_SOCK_ADDR"),
            "cgroup_sock_addr"
        );
    }

    #[test]
    fn status_json_is_structured() {
        let st = Status {
            pins: "/sys/fs/bpf/netns/v2".into(),
            layout_version: 2,
            fast_path: true,
            ct_max_per_container: 100,
            ct_counters: false,
            allow_inbound: vec!["172.19.0.0/16".into()],
            no_masquerade: vec!["172.19.0.0/16".into(), "10.0.0.0/8".into()],
            ipv6: Ipv6Status {
                enabled: true,
                gateway: Some("fd00:19::1/64".into()),
                uplink_addr: None,
            },
            programs: vec![
                ProgramStatus {
                    name: "netns_uplink_egress".into(),
                    pin: "/p/progs/netns_uplink_egress".into(),
                    id: Some(7),
                    prog_type: Some("sched_cls".into()),
                },
                ProgramStatus {
                    name: "netns_bind4".into(),
                    pin: "/p/progs/netns_bind4".into(),
                    id: None,
                    prog_type: None,
                },
            ],
            links: vec![
                LinkStatus {
                    pin: "/p/links/uplink-egress".into(),
                    program: "netns_uplink_egress".into(),
                    program_id: Some(7),
                    attach: Attach::TcxEgress,
                    ifindex: Some(3),
                    ifname: Some("eth0".into()),
                    attached: true,
                },
                LinkStatus {
                    pin: "/p/links/port-9".into(),
                    program: "netns_port_ingress".into(),
                    program_id: Some(8),
                    attach: Attach::TcxIngress,
                    ifindex: None,
                    ifname: None,
                    attached: false,
                },
            ],
            maps: vec![MapStatus {
                name: "NETNS_CT".into(),
                pin: "/p/maps/NETNS_CT".into(),
                entries: 2,
                max_entries: 262_144,
            }],
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(
            v["no_masquerade"],
            serde_json::json!(["172.19.0.0/16", "10.0.0.0/8"])
        );
        assert_eq!(v["allow_inbound"], serde_json::json!(["172.19.0.0/16"]));
        assert_eq!(v["ipv6"]["gateway"], "fd00:19::1/64");
        assert_eq!(v["ipv6"]["uplink_addr"], serde_json::Value::Null);
        assert_eq!(
            v["programs"][0],
            serde_json::json!({"name": "netns_uplink_egress", "pin": "/p/progs/netns_uplink_egress",
                               "id": 7, "type": "sched_cls"})
        );
        assert_eq!(v["programs"][1]["id"], serde_json::Value::Null);
        assert_eq!(
            v["links"][0],
            serde_json::json!({"pin": "/p/links/uplink-egress", "program": "netns_uplink_egress",
                               "program_id": 7, "attach": "tcx/egress", "ifindex": 3,
                               "ifname": "eth0", "attached": true})
        );
        // A detached link has no ifindex, not 0.
        assert_eq!(v["links"][1]["ifindex"], serde_json::Value::Null);
        assert_eq!(
            v["maps"][0],
            serde_json::json!({"name": "NETNS_CT", "pin": "/p/maps/NETNS_CT", "entries": 2,
                               "max_entries": 262_144})
        );
        let line = st.links[1].to_string();
        assert!(
            line.contains("DETACHED") && line.contains("tcx/ingress"),
            "{line}"
        );
    }
}
