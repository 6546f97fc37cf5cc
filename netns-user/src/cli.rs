//! Command line. Every global flag can also come from an environment variable because
//! runc hands a hook both `args` and `env` from config.json.

use std::path::{Component, Path, PathBuf};

use clap::{Args, Parser, Subcommand};

pub use crate::config::{
    ArgError, Cidr, Gateway, Gateway6, IPROUTE2_NETNS_DIR, NetConfig, PortRange, parse_cidr,
    parse_cidr_list,
};

/// iproute2 keeps named network namespaces here; our state must never live there.

#[derive(Debug, Parser)]
#[command(
    name = "netns",
    version,
    about = "OCI prestart/poststop hook giving runc containers a bridge network with eBPF NAT",
    long_about = "OCI prestart/poststop hook giving runc containers a bridge network with eBPF NAT.\n\
                  Without a command, runs as an OCI hook: reads the container state JSON on stdin;\n\
                  status \"creating\"/\"created\" sets the network up, \"stopped\" tears it down."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Bridge the containers' host-side veths are enslaved to.
    #[arg(long, env = "NETNS_BRIDGE", default_value = "netns0", value_parser = parse_ifname, global = true)]
    pub bridge: String,

    /// Gateway address of the bridge with the subnet's prefix length.
    #[arg(long, env = "NETNS_IP", default_value = "172.19.0.1/16", global = true)]
    pub ip: Gateway,

    /// IPv6 for containers: the bridge's IPv6 gateway with the containers' prefix
    /// (e.g. fd00:19::1/64). A container's address is the prefix plus its IPv4 host
    /// offset. Masqueraded (NAT66) to the uplink's global IPv6 address.
    #[arg(long, env = "NETNS_IP6", global = true)]
    pub ip6: Option<Gateway6>,

    /// MTU of bridge and veths [default: the uplink's MTU, 1500 without uplink].
    #[arg(long, env = "NETNS_MTU", value_parser = clap::value_parser!(u32).range(68..=65535), global = true)]
    pub mtu: Option<u32>,

    /// Interface masqueraded traffic leaves through [default: device of the IPv4 default route].
    #[arg(long, env = "NETNS_UPLINK", value_parser = parse_ifname, global = true)]
    pub uplink: Option<String>,

    /// Directory of the lock and the lease/container records (not /run/netns).
    #[arg(long, env = "NETNS_STATE_DIR", default_value = "/run/netns-hook", value_parser = parse_state_dir, global = true)]
    pub state_dir: PathBuf,

    /// Directory on a bpffs where the datapath's maps, programs and links are pinned.
    #[arg(
        long,
        env = "NETNS_BPFFS_DIR",
        default_value = "/sys/fs/bpf/netns",
        global = true
    )]
    pub bpffs_dir: PathBuf,

    /// Source ports masquerade uses when a container's own port is taken on the
    /// uplink. The default lies above Linux's ephemeral range, and the range is added
    /// to net.ipv4.ip_local_reserved_ports, so host sockets never pick these ports.
    #[arg(
        long,
        env = "NETNS_NAT_PORTS",
        default_value = "61000-65535",
        global = true
    )]
    pub nat_ports: PortRange,

    /// cgroup v2 directory the socket programs attach to (host processes reaching
    /// port forwards via 127.0.0.1 or a host address; reservation of mapped ports):
    /// "auto" = the cgroup2 mount, "none" = off. They act only in this network
    /// namespace whatever the cgroup.
    #[arg(long, env = "NETNS_CGROUP", default_value = "auto", global = true)]
    pub cgroup: String,

    /// Conntrack table size (entries; two per flow) used when the datapath is first
    /// loaded [default: 262144].
    #[arg(long, env = "NETNS_CT_MAX", value_parser = clap::value_parser!(u32).range(2..), global = true)]
    pub ct_max: Option<u32>,

    /// Most conntrack flows one container may hold; its new flows past that are
    /// dropped and counted (`drop_ct_budget`), other containers' are unaffected. 0 = no
    /// limit. Set each time the datapath is loaded [default: a quarter of --ct-max, in
    /// flows (half the table)].
    #[arg(long, env = "NETNS_CT_MAX_PER_CONTAINER", global = true)]
    pub ct_max_per_container: Option<u32>,

    /// Fast path: translated packets skip the host's bridge, IP forwarding, netfilter
    /// (FORWARD chain, host conntrack) and backlog queue: delivered straight into the
    /// container's namespace from the uplink, sent straight to the uplink's next hop
    /// from a container (the default). "off" keeps the host stack's path, and with it
    /// the host's FORWARD rules. Set each time the datapath is loaded.
    #[arg(long, env = "NETNS_FAST_PATH", value_enum, default_value_t = OnOff::On, global = true)]
    pub fast_path: OnOff,

    /// Per-flow packet and byte counters in the conntrack table (`conntrack ls`). Off,
    /// a packet of a known flow writes nothing to its entry but TCP's sequence
    /// tracking and, once a second, the last-seen time. Set each time the datapath is
    /// loaded.
    #[arg(long, env = "NETNS_CT_COUNTERS", value_enum, default_value_t = OnOff::Off, global = true)]
    pub ct_counters: OnOff,

    /// Seconds between the rounds (reconcile + conntrack sweep) of the collector service,
    /// `netns gc --daemon` (unless it gets --interval), and of `netns load --follow`.
    /// Nothing else uses it: the hook starts no collector, flows expire in the datapath.
    #[arg(long, env = "NETNS_GC_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub gc_interval: u32,

    /// Sources allowed to reach container addresses directly from outside (routed
    /// setups, other nodes' pods): CIDR[,CIDR...], may be repeated. Container flows to
    /// them are not masqueraded. Without it, a packet from the uplink to a container
    /// address is dropped unless it belongs to a flow or a port forward. Set each
    /// time the datapath is loaded (hook, `netns load`) [default: none].
    #[arg(
        long,
        env = "NETNS_ALLOW_INBOUND",
        value_name = "CIDR[,CIDR...]",
        value_parser = parse_cidr_list,
        global = true
    )]
    pub allow_inbound: Vec<Vec<Cidr>>,

    /// Destinations container flows reach unmasqueraded, with the container's own
    /// address (ip-masq-agent's nonMasqueradeCIDRs: other nodes' pods, routed
    /// networks): CIDR[,CIDR...], may be repeated. Such packets are left to the host's
    /// routing, with no conntrack entry. Their replies come back to the container's
    /// address, so they are dropped unless the peer is in --allow-inbound. Set each
    /// time the datapath is loaded (hook, `netns load`) [default: none].
    #[arg(
        long,
        env = "NETNS_NO_MASQUERADE",
        value_name = "CIDR[,CIDR...]",
        value_parser = parse_cidr_list,
        global = true
    )]
    pub no_masquerade: Vec<Vec<Cidr>>,

    /// Machine-readable output: every command prints one JSON value on stdout
    /// (`ls`, `port`, `conntrack`, `stats`, `gc`, `load`, `datapath`, `version`).
    #[arg(long, global = true)]
    pub json: bool,

    /// Log at debug level (default: warnings only); logs go to stderr.
    #[arg(short, long, env = "NETNS_DEBUG", global = true)]
    pub debug: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run as OCI hook (the default): state JSON on stdin.
    Hook,
    /// List containers with their address and host veth.
    Ls,
    /// Print version and datapath layout version.
    Version,
    /// Load and attach the datapath (creating the bridge if needed) and exit; with
    /// --follow, stay: print the datapath's log and collect expired conntrack entries.
    Load {
        #[arg(long)]
        follow: bool,
    },
    /// Port forwards (docker -p syntax).
    #[command(subcommand)]
    Port(PortCommand),
    /// The connection-tracking table of the datapath.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Translation counters and drops by reason.
    Stats,
    /// Remove expired conntrack entries and reconcile the state directory (tear down
    /// and release what belongs to containers that no longer exist; remove port
    /// forwards, endpoints, host veths and port links no lease owns): once, or every
    /// --interval seconds until the datapath is unloaded, or as the collector service
    /// (--daemon).
    Gc(GcArgs),
    /// Inspect and manage the pinned datapath.
    #[command(subcommand)]
    Datapath(DatapathCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum PortCommand {
    /// Forward host ports to a container: SPEC = [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp].
    Add {
        /// Container id, or its address.
        container: String,
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Remove forwards (the host side of SPEC is what counts; CONTAINER may be "-" for any).
    Rm {
        container: String,
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// List forwards.
    Ls,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConntrackCommand {
    /// List flows: protocol, original and translated tuples, state, age, packets/bytes,
    /// owner and flags. Flows the datapath treats as gone (expired, or of a container
    /// that is gone) are hidden unless --all.
    Ls {
        /// Also list expired and stale flows (still in the maps until met or swept).
        #[arg(long)]
        all: bool,
    },
    /// Delete every entry.
    Flush,
}

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Sweep every SECONDS until the datapath is gone (default: one sweep); with
    /// --daemon, every SECONDS instead of every --gc-interval.
    #[arg(long)]
    pub interval: Option<u64>,
    /// Testing aid (`fault-injection` builds): sweep once as if SECONDS more had
    /// passed, so expiry is tested without waiting for the clock.
    #[cfg(feature = "fault-injection")]
    #[arg(
        long,
        hide = true,
        conflicts_with_all = ["interval", "daemon"],
        value_name = "SECONDS"
    )]
    pub now_offset: Option<u64>,
    /// Run as the collector service (contrib/systemd/netns-gc.service): in the
    /// foreground, logging to stderr, every --gc-interval (or --interval) seconds until
    /// stopped, waiting for a datapath while none is loaded. Only one collector runs per
    /// state directory (gc.lock); a second one exits with an error. Optional: flows
    /// expire in the datapath; the collector keeps `conntrack ls` tidy and reconciles.
    #[arg(long)]
    pub daemon: bool,
    /// Set the conntrack timeouts (seconds) all collectors use, e.g.
    /// `tcp_syn=120,tcp_established=432000,tcp_fin=120,tcp_close=10,udp=30,udp_stream=120,icmp=30,generic=600`
    /// (generic: protocols other than TCP, UDP and ICMP).
    #[arg(long)]
    pub timeouts: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DatapathCommand {
    /// Programs, links and maps: where they are pinned and how many entries.
    Status,
    /// Replace the programs with this binary's, keeping maps and flows.
    Reload,
    /// Re-attach whatever is missing or detached; reports what it repaired.
    Check,
    /// Detach and unpin everything (and with --delete-bridge, delete the bridge).
    Unload {
        #[arg(long)]
        delete_bridge: bool,
    },
}

impl GlobalArgs {
    /// The typed configuration the domain code works from.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            bridge: self.bridge.clone(),
            gateway: self.ip,
            gateway6: self.ip6,
            mtu: self.mtu,
            uplink: self.uplink.clone(),
            state_dir: self.state_dir.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
            nat_ports: self.nat_ports,
            cgroup: self.cgroup.clone(),
            ct_max: self.ct_max,
            ct_max_per_container: self.ct_max_per_container,
            fast_path: self.fast_path == OnOff::On,
            ct_counters: self.ct_counters == OnOff::On,
            allow_inbound: self.inbound_cidrs(),
            no_masquerade: self.nomasq_cidrs(),
        }
    }

    /// `--allow-inbound`, every occurrence, without duplicates, in order.
    pub fn inbound_cidrs(&self) -> Vec<Cidr> {
        dedup_cidrs(&self.allow_inbound)
    }

    /// `--no-masquerade`, every occurrence, without duplicates, in order.
    pub fn nomasq_cidrs(&self) -> Vec<Cidr> {
        dedup_cidrs(&self.no_masquerade)
    }
}

/// The CIDRs of every occurrence of a list flag, first occurrence kept.
fn dedup_cidrs(lists: &[Vec<Cidr>]) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    for c in lists.iter().flatten() {
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

/// Linux interface name rules (IFNAMSIZ - 1 bytes; '/', ':' and whitespace break sysfs or aliases).
pub fn parse_ifname(s: &str) -> Result<String, ArgError> {
    if s.is_empty() || s.len() > 15 {
        return Err(ArgError::IfnameLength(s.len()));
    }
    if s == "."
        || s == ".."
        || s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(ArgError::IfnameChars);
    }
    Ok(s.to_owned())
}

/// Refuses /run/netns (and /var/run/netns, which usually is the same directory) and
/// anything below it: iproute2 treats every entry there as a namespace name.
pub fn parse_state_dir(s: &str) -> Result<PathBuf, ArgError> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(ArgError::StateDirRelative);
    }
    let lexical = normalize(p);
    let netns = Path::new(IPROUTE2_NETNS_DIR);
    let resolved = resolve_existing_prefix(&lexical);
    let netns_resolved = resolve_existing_prefix(netns);
    for cand in [&lexical, &resolved] {
        if cand.starts_with(netns)
            || cand.starts_with(&netns_resolved)
            || cand.starts_with("/var/run/netns")
        {
            return Err(ArgError::StateDirIsNetnsDir(p.to_owned()));
        }
    }
    Ok(lexical)
}

/// Drops `.` and resolves `..` lexically (no symlinks).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Canonicalizes the longest existing ancestor (symlinks such as /var/run -> /run) and
/// appends the rest, so a directory that does not exist yet can still be compared.
fn resolve_existing_prefix(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (
            existing.file_name().map(ToOwned::to_owned),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["netns"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let g = cli.global;
        assert_eq!(g.bridge, "netns0");
        assert_eq!(g.ip, "172.19.0.1/16".parse().unwrap());
        assert_eq!(g.state_dir, PathBuf::from("/run/netns-hook"));
        assert_eq!(g.bpffs_dir, PathBuf::from("/sys/fs/bpf/netns"));
        assert_eq!(
            g.nat_ports,
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        assert_eq!(g.mtu, None);
        assert_eq!(g.uplink, None);
    }

    #[test]
    fn subcommands_and_global_flags_after_them() {
        let cli = parse(&["ls", "--json", "--bridge", "br9"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Ls)));
        assert!(cli.global.json);
        assert_eq!(cli.global.bridge, "br9");
        assert!(matches!(
            parse(&["-d", "hook"]).unwrap().command,
            Some(Command::Hook)
        ));
        assert!(matches!(
            parse(&["version"]).unwrap().command,
            Some(Command::Version)
        ));
    }

    #[test]
    fn ifnames() {
        assert!(parse_ifname("netns0").is_ok());
        assert!(parse_ifname("abcdefghijklmno").is_ok());
        assert_eq!(
            parse_ifname("abcdefghijklmnop"),
            Err(ArgError::IfnameLength(16))
        );
        assert_eq!(parse_ifname(""), Err(ArgError::IfnameLength(0)));
        for bad in ["a/b", "a:b", "a b", "a\tb", ".", ".."] {
            assert_eq!(parse_ifname(bad), Err(ArgError::IfnameChars), "{bad}");
        }
        assert!(parse(&["--bridge", "x y"]).is_err());
    }

    #[test]
    fn allow_inbound_cidrs() {
        let c = |s: &str| parse_cidr(s).unwrap().to_string();
        assert_eq!(c("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(c(" 10.1.2.3/16 "), "10.1.0.0/16");
        assert_eq!(c("192.0.2.7"), "192.0.2.7/32");
        assert_eq!(c("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(c("1.2.3.4/0"), "0.0.0.0/0");
        for (bad, want) in [
            ("10.0.0.0/33", ArgError::InboundPrefix("10.0.0.0/33".into())),
            (
                "10.0.0.0/300",
                ArgError::InboundPrefix("10.0.0.0/300".into()),
            ),
            ("10.0.0/8", ArgError::InboundSyntax("10.0.0/8".into())),
            ("10.0.0.0/", ArgError::InboundSyntax("10.0.0.0/".into())),
            ("10.0.0.0/x", ArgError::InboundSyntax("10.0.0.0/x".into())),
            ("fd00::/8", ArgError::InboundSyntax("fd00::/8".into())),
            ("", ArgError::InboundSyntax("".into())),
        ] {
            assert_eq!(parse_cidr(bad), Err(want), "{bad}");
        }
        assert!(parse(&[]).unwrap().global.inbound_cidrs().is_empty());
        assert_eq!(parse_cidr_list(""), Ok(vec![]));
        assert_eq!(parse_cidr_list(" , "), Ok(vec![]));
        let g = parse(&[
            "--allow-inbound",
            "10.0.0.0/8,192.168.1.0/24",
            "--allow-inbound",
            "172.16.0.1/12 10.0.0.0/8",
        ])
        .unwrap()
        .global;
        let got: Vec<String> = g.inbound_cidrs().iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.0/8", "192.168.1.0/24", "172.16.0.0/12"]);
        let e = parse(&["--allow-inbound", "10.0.0.0/8,nope"]).unwrap_err();
        assert!(
            e.to_string().contains("\"nope\": expected an IPv4 CIDR"),
            "{e}"
        );
    }

    #[test]
    fn no_masquerade_cidrs() {
        let g = parse(&[]).unwrap().global;
        assert!(g.nomasq_cidrs().is_empty());
        assert!(g.net_config().no_masquerade.is_empty());
        let g = parse(&[
            "--no-masquerade",
            "172.19.0.0/16, 10.0.0.0/8",
            "--no-masquerade=10.1.2.3/8\t198.51.100.7",
            "--allow-inbound",
            "203.0.113.0/24",
            "ls",
        ])
        .unwrap()
        .global;
        let s = |v: Vec<Cidr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            s(g.nomasq_cidrs()),
            ["172.19.0.0/16", "10.0.0.0/8", "198.51.100.7/32"]
        );
        let cfg = g.net_config();
        assert_eq!(s(cfg.no_masquerade.clone()), s(g.nomasq_cidrs()));
        // The two lists are independent.
        assert_eq!(s(cfg.allow_inbound), ["203.0.113.0/24"]);
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "fd00::/8"] {
            let e = parse(&["--no-masquerade", bad]).unwrap_err();
            assert!(e.to_string().contains("no-masquerade"), "{bad}: {e}");
        }
        // An empty value (NETNS_NO_MASQUERADE= in config.json) is an empty list.
        let g = parse(&["--no-masquerade", ""]).unwrap().global;
        assert!(g.nomasq_cidrs().is_empty());
    }

    #[test]
    fn state_dir_refuses_iproute2_dir() {
        for bad in [
            "/run/netns",
            "/run/netns/",
            "/run/netns/x",
            "/run/./netns",
            "/run/x/../netns",
            "/var/run/netns",
        ] {
            assert!(
                matches!(parse_state_dir(bad), Err(ArgError::StateDirIsNetnsDir(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_state_dir("rel"), Err(ArgError::StateDirRelative));
        assert_eq!(
            parse_state_dir("/run/netns-hook").unwrap(),
            PathBuf::from("/run/netns-hook")
        );
        assert!(parse(&["--state-dir", "/run/netns"]).is_err());
    }

    #[test]
    fn env_vars_feed_flags() {
        // Each env var is checked through a fresh parse; the process env is shared by
        // tests, so use clap's own env lookup on a command built here.
        use clap::CommandFactory;
        let cmd = Cli::command();
        let envs: Vec<_> = cmd
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        for e in [
            "NETNS_BRIDGE",
            "NETNS_IP",
            "NETNS_MTU",
            "NETNS_UPLINK",
            "NETNS_STATE_DIR",
            "NETNS_BPFFS_DIR",
            "NETNS_NAT_PORTS",
            "NETNS_ALLOW_INBOUND",
            "NETNS_NO_MASQUERADE",
        ] {
            assert!(envs.iter().any(|x| x == e), "{e} missing");
        }
    }
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}
