//! Scratch: load the datapath in the current netns. args: bpffs uplink_ifindex uplink_ip bridge_ifindex [port_ifindex ep_ip ep_mac]
use std::net::Ipv4Addr;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let cfg = netns::datapath::DatapathConfig {
        bpffs_dir: a[1].clone().into(),
        uplink_ifindex: a[2].parse().unwrap(),
        uplink_addr: Some(a[3].parse().unwrap()),
        bridge_ifindex: a[4].parse().unwrap(),
        gateway: Ipv4Addr::new(172, 19, 0, 1),
        prefix_len: 16,
        nat_ports: (32768, 60999),
    };
    let mut dp = netns::datapath::Datapath::ensure_loaded(&cfg).unwrap();
    if a.len() > 5 {
        let ifi: u32 = a[5].parse().unwrap();
        let ip: Ipv4Addr = a[6].parse().unwrap();
        let mut mac = [0u8; 6];
        for (i, p) in a[7].split(':').enumerate() { mac[i] = u8::from_str_radix(p, 16).unwrap(); }
        dp.attach_port(ifi).unwrap();
        dp.add_endpoint(ip, netns_common::Endpoint { ifindex: ifi, mac, _pad: [0; 2] }).unwrap();
    }
    if std::env::var("RELOAD").is_ok() { println!("reloaded {:?}", dp.reload().unwrap()); }
    if std::env::var("CHECK").is_ok() { println!("repaired {:?}", dp.check(&cfg, None).unwrap()); }
    if let Ok(cg) = std::env::var("CGROUP") { dp.attach_cgroup(std::path::Path::new(&cg)).unwrap(); }
    for (s, v) in dp.stats().unwrap() { if v > 0 { println!("{} {}", s.name(), v); } }
    for (k, v) in dp.conntrack_entries().unwrap() { println!("{k:?} -> {v:?}"); }
}
