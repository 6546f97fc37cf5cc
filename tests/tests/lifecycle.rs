//! Issue 5: lifecycle, faults and bad actors: the datapath outlives every process,
//! reload keeps live flows, check repairs, unload removes, parallel hooks, spoofing,
//! file modes.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;
use std::time::Duration;

use netns_common::LAYOUT_VERSION;
use netns_tests::topo::{UPLINK_IP, WAN_IP};
use netns_tests::util::{ChildGuard, kill_with_arg, pids_with_arg, sh, wait_for};
use netns_tests::{Container, Topology};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stats(t: &Topology) -> serde_json::Value {
    serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap()
}

/// A slow TCP stream (1000 bytes every 20 ms for `secs`), counted by a sink that
/// prints the byte total at EOF.
fn slow_stream(secs: u32, addr: &str, port: u16) -> String {
    format!(
        "for i in $(seq 1 {}); do head -c 1000 /dev/zero; sleep 0.02; done | socat -u - TCP:{addr}:{port}",
        secs * 50
    )
}

#[test]
fn the_datapath_outlives_every_process() {
    let t = Topology::new();
    let c = Container::start(&t);
    // No netns process left (the collector is the only long-lived one: stop it too).
    let state_dir = t.state_dir.display().to_string();
    kill_with_arg(&state_dir);
    let left = wait_for(Duration::from_secs(5), || {
        pids_with_arg(&state_dir).is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "netns processes still running: {:?}",
        pids_with_arg(&state_dir)
    );
    assert!(
        c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success(),
        "flows keep flowing"
    );
    let st: serde_json::Value =
        serde_json::from_str(&t.netns(&["datapath", "status", "--json"])).unwrap();
    assert_eq!(
        st["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["attach"] != "cgroup")
            .count(),
        3,
        "{st}"
    );
    assert!(
        st["maps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "NETNS_CT" && m["entries"].as_u64().unwrap() >= 2)
    );
}

#[test]
fn reload_keeps_established_snat_and_port_forward_flows() {
    let t = Topology::new();
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "8700:7300/tcp".to_owned());
    let c = Container::start_with(&t, &ann, &[]).expect("start");
    // SNAT flow: container -> wan sink. Port-forward flow: wan -> container sink.
    let wan_sink = ChildGuard::spawn(
        t.wan
            .cmd("sh")
            .arg("-c")
            .arg("socat -u TCP-LISTEN:7301,reuseaddr STDOUT | wc -c")
            .stdout(std::process::Stdio::piped()),
    );
    let c_sink = ChildGuard::spawn(
        c.cmd("sh")
            .arg("-c")
            .arg("socat -u TCP-LISTEN:7300,reuseaddr STDOUT | wc -c")
            .stdout(std::process::Stdio::piped()),
    );
    t.wan.wait_listen("tcp", 7301);
    c.wait_listen("tcp", 7300);
    let snat = ChildGuard::spawn(c.cmd("sh").arg("-c").arg(slow_stream(3, WAN_IP, 7301)));
    let dnat = t.wan_spawn(&format!("sh -c '{}'", slow_stream(3, UPLINK_IP, 8700)));
    std::thread::sleep(Duration::from_millis(800));
    let before: serde_json::Value =
        serde_json::from_str(&t.netns(&["datapath", "status", "--json"])).unwrap();
    let reload = t.netns(&["datapath", "reload"]);
    assert!(reload.contains("maps kept"), "{reload}");
    let after: serde_json::Value =
        serde_json::from_str(&t.netns(&["datapath", "status", "--json"])).unwrap();
    assert_ne!(
        before["programs"], after["programs"],
        "programs were replaced"
    );
    assert!(
        snat.wait_output(Duration::from_secs(10)).status.success(),
        "SNAT flow reset"
    );
    assert!(
        dnat.wait_output(Duration::from_secs(10)).status.success(),
        "port-forward flow reset"
    );
    assert_eq!(out(&wan_sink.wait_output(Duration::from_secs(5))), "150000");
    assert_eq!(out(&c_sink.wait_output(Duration::from_secs(5))), "150000");
}

#[test]
fn check_reattaches_what_was_detached() {
    let t = Topology::new();
    let c = Container::start(&t);
    assert!(t.netns(&["datapath", "check"]).contains("ok"));
    let link = t
        .bpffs_dir
        .join(format!("v{LAYOUT_VERSION}/links/uplink-egress"));
    sh(&format!("bpftool link detach pinned {}", link.display()));
    let st = t.netns(&["datapath", "status"]);
    assert!(st.contains("DETACHED"), "{st}");
    let rep = t.netns(&["datapath", "check"]);
    assert!(rep.contains("repaired: netns_uplink_egress"), "{rep}");
    assert!(!t.netns(&["datapath", "status"]).contains("DETACHED"));
    assert!(
        c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    let snat = stats(&t)["snat_packets"].as_u64().unwrap();
    assert!(snat >= 1, "masquerade works again");
}

#[test]
fn unload_removes_programs_links_and_pins() {
    let t = Topology::new();
    let c = Container::start(&t);
    drop(c);
    let o = t.netns(&["datapath", "unload", "--delete-bridge"]);
    assert!(
        o.contains("unloaded") && o.contains("deleted bridge"),
        "{o}"
    );
    assert!(!t.bpffs_dir.join(format!("v{LAYOUT_VERSION}")).exists());
    let tcx = sh("bpftool net show 2>/dev/null || true");
    assert!(!tcx.contains(&t.bpffs_dir.display().to_string()));
    assert!(!t.host.ip(&["-o", "link"]).contains("netns0"));
    let o = t.netns_cmd(&["stats"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not loaded"));
}

#[test]
fn thirty_two_parallel_containers_get_distinct_addresses_and_work() {
    let t = Topology::new();
    let containers: Vec<Container<'_>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let t = &t;
                s.spawn(move || {
                    let mut ann = BTreeMap::new();
                    ann.insert("netns.ports".to_owned(), format!("{}:80/tcp", 9000 + i));
                    Container::start_with(t, &ann, &[])
                        .map_err(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().expect("parallel start"))
            .collect()
    });
    let mut ips: Vec<String> = containers.iter().map(Container::ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 32, "distinct addresses");
    assert_eq!(t.containers().len(), 32);
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&t.netns(&["port", "ls", "--json"])).unwrap();
    assert_eq!(ls.len(), 32);
    for c in containers.iter().step_by(4) {
        assert!(
            c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
                .status
                .success(),
            "{} networking",
            c.id
        );
    }
    let collectors: Vec<u32> = pids_with_arg(&t.state_dir.display().to_string())
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--daemon"))
        })
        .collect();
    assert_eq!(
        collectors.len(),
        1,
        "one collector per state directory: {collectors:?}"
    );
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let t = Topology::new();
    let a = Container::start(&t);
    let b = Container::start(&t);
    let _srv = t.wan_spawn("socat UDP-RECVFROM:7400,reuseaddr,fork SYSTEM:'echo got'");
    t.wan.wait_listen("udp", 7400);
    // A foreign address (B's) on A's eth0: those packets and ARP claims are dropped.
    let before = stats(&t)["drop_spoofed_ip"].as_u64().unwrap();
    a.sh("ip addr add 172.19.200.1/16 dev eth0");
    let o = a.sh(&format!(
        "echo x | timeout 2 socat -t 1 - UDP:{WAN_IP}:7400,bind=172.19.200.1"
    ));
    assert_eq!(out(&o), "", "spoofed source must not get through");
    let after = stats(&t)["drop_spoofed_ip"].as_u64().unwrap();
    assert!(after > before, "counted: {before} -> {after}");
    // B's own address from A: dropped too (no conntrack poisoning for B).
    a.sh("ip addr del 172.19.200.1/16 dev eth0");
    let bip = b.ip();
    a.sh(&format!("ip addr add {bip}/32 dev eth0"));
    let o = a.sh(&format!(
        "echo x | timeout 2 socat -t 1 - UDP:{WAN_IP}:7400,bind={bip}"
    ));
    assert_eq!(out(&o), "");
    assert!(
        !t.netns(&["conntrack", "ls"])
            .contains(&format!("src={bip}:")),
        "no entry made for B's address"
    );
    // A forged MAC with A's own address.
    a.sh(&format!("ip addr del {bip}/32 dev eth0"));
    a.sh("ip link set eth0 address 02:00:00:00:00:99");
    let mac_before = stats(&t)["drop_spoofed_mac"].as_u64().unwrap();
    let _ = a.sh(&format!(
        "echo x | timeout 2 socat -t 1 - UDP:{WAN_IP}:7400"
    ));
    assert!(stats(&t)["drop_spoofed_mac"].as_u64().unwrap() > mac_before);
    // B is unaffected.
    assert!(
        b.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
}

#[test]
fn pins_and_state_are_root_only() {
    let t = Topology::new();
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "9500:80/tcp".to_owned());
    let _c = Container::start_with(&t, &ann, &[]).expect("start");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&t.state_dir), 0o700);
    for e in std::fs::read_dir(&t.state_dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(
            mode(&p) & 0o077,
            0,
            "{} is group/other accessible",
            p.display()
        );
    }
    let root = t.bpffs_dir.join(format!("v{LAYOUT_VERSION}"));
    for dir in ["maps", "progs", "links"] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir}");
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    let _ = wait_for(Duration::from_millis(1), || Some(()));
}

#[test]
fn a_killed_hook_leaves_nothing_gc_cannot_reconcile() {
    let t = Topology::new();
    let keep = Container::start(&t);
    for step in ["veth", "attach-port", "add-endpoint", "port-map"] {
        let mut ann = BTreeMap::new();
        ann.insert("netns.ports".to_owned(), "9600:80/tcp".to_owned());
        let r = Container::start_with(&t, &ann, &[("NETNS_KILL_AT", step)]);
        assert!(
            r.is_err(),
            "a hook killed at {step} fails the container start"
        );
        let report = t.netns(&["gc"]);
        assert!(
            report.contains("reconciled") || report.contains("nothing to reconcile"),
            "{report}"
        );
        // Only the healthy container is left: one lease, one veth, one endpoint.
        assert_eq!(t.containers().len(), 1, "after {step}: {report}");
        let veths = t
            .host
            .ip(&["-o", "link"])
            .lines()
            .filter(|l| l.contains("netnsv0-"))
            .count();
        assert_eq!(veths, 1, "after {step}: {report}");
        assert!(
            !t.netns(&["port", "ls"]).contains("9600"),
            "port map left after {step}"
        );
        assert_eq!(t.map_entries("NETNS_EPS"), 1, "after {step}");
    }
    // The next container gets an address and works.
    let next = Container::start(&t);
    assert!(
        next.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    assert!(
        keep.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
}

#[test]
fn the_cli_refuses_without_capabilities() {
    let t = Topology::new();
    let _c = Container::start(&t);
    for args in [&["stats"][..], &["port", "ls"], &["datapath", "status"]] {
        let mut cmd = t.host.cmd("setpriv");
        cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(netns_tests::netns_bin())
            .args(t.flags())
            .args(args);
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} without capabilities must fail"
        );
        assert!(err.contains("CAP_NET_ADMIN"), "{args:?}: {err}");
    }
    // Reading the lease list needs none.
    let mut cmd = t.host.cmd("setpriv");
    cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(netns_tests::netns_bin())
        .args(t.flags())
        .arg("version");
    assert!(cmd.output().unwrap().status.success());
}
