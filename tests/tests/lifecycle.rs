//! Issue 5: lifecycle, faults and bad actors: the datapath outlives every process,
//! reload keeps live flows, check repairs, unload removes, parallel hooks, spoofing,
//! file modes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;
use std::time::Duration;

use netns_common::{LAYOUT_VERSION, maps, progs};
use netns_tests::bpf;
use netns_tests::runc::Bundle;
use netns_tests::topo::{UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::out;
use netns_tests::util::{ChildGuard, pids_with_arg, sh, unique, wait_for};
use netns_tests::{Container, Topology};

fn stats(t: &Topology) -> serde_json::Value {
    serde_json::from_str(&t.netns(&["stats", "--json"])).unwrap()
}

/// No `netns` process of this topology runs (scan of /proc for its state directory as
/// an argument): the hook starts none, so an engine's subreaper (podman's conmon) never
/// waits for one.
fn assert_no_netns_process(t: &Topology, when: &str) {
    let left = pids_with_arg(&t.state_dir.display().to_string());
    let cmdlines: Vec<String> = left
        .iter()
        .map(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {}", String::from_utf8_lossy(&c).replace('\0', " "))
        })
        .collect();
    assert!(
        left.is_empty(),
        "{when}: netns processes left: {cmdlines:#?}"
    );
}

/// Whether process `pid` holds a flock on `path` (/proc/locks: "N: FLOCK ADVISORY
/// WRITE PID MAJ:MIN:INODE ...").
fn holds_flock(pid: u32, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(ino) = std::fs::metadata(path).map(|m| m.ino()) else {
        return false;
    };
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"FLOCK")
                && f.get(4) == Some(&pid.to_string().as_str())
                && f.get(5)
                    .and_then(|d| d.rsplit(':').next())
                    .is_some_and(|i| i == ino.to_string())
        })
}

/// The ids of the programs pinned under the datapath's `progs/` (bpftool), by name.
fn pinned_progs(t: &Topology) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = std::fs::read_dir(t.pins().join("progs"))
        .expect("progs pin directory")
        .map(|e| {
            let e = e.unwrap();
            let id = bpf::pinned_prog_id(&t.host, &e.path()).unwrap_or_else(|e| panic!("{e:#}"));
            (e.file_name().to_string_lossy().into_owned(), id)
        })
        .collect();
    v.sort();
    v
}

fn prog_id(pinned: &[(String, u32)], name: &str) -> u32 {
    pinned
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no pinned program {name}: {pinned:?}"))
        .1
}

/// The ids of the TCX programs attached to `ifname` (ingress, egress), kernel's view.
fn tcx_ids(t: &Topology, ifname: &str) -> (Vec<u32>, Vec<u32>) {
    let x = t.tcx(ifname);
    (
        x.ingress.iter().map(|a| a.id).collect(),
        x.egress.iter().map(|a| a.id).collect(),
    )
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
    // No netns process left: the hook has exited and started nothing.
    assert_no_netns_process(&t, "after prestart");
    assert!(
        c.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success(),
        "flows keep flowing"
    );
    // The kernel's view: the uplink's and the container port's TCX programs are still
    // attached, and the conntrack map holds the ping's two directions.
    let up = t.tcx(UPLINK);
    assert_eq!(
        (up.ingress_names(), up.egress_names()),
        (
            vec![bpf::obj_name(progs::UPLINK_INGRESS)],
            vec![bpf::obj_name(progs::UPLINK_EGRESS)]
        ),
        "{up:?}"
    );
    let port = t.tcx(&c.host_veth());
    assert_eq!(
        port.ingress_names(),
        vec![bpf::obj_name(progs::PORT_INGRESS)],
        "{port:?}"
    );
    let ct = t.map_entries(maps::CONNTRACK);
    assert!(ct >= 2, "{ct} conntrack entries");
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
    // Both flows are established (their server sockets say so) before the reload.
    t.wan
        .wait_ss(&["-Htn", "state", "established", "sport = :7301"]);
    c.wait_ss(&["-Htn", "state", "established", "sport = :7300"]);
    let before = pinned_progs(&t);
    let (ing, eg) = tcx_ids(&t, UPLINK);
    let (port, _) = tcx_ids(&t, &c.host_veth());
    assert_eq!(
        (ing, eg, port),
        (
            vec![prog_id(&before, progs::UPLINK_INGRESS)],
            vec![prog_id(&before, progs::UPLINK_EGRESS)],
            vec![prog_id(&before, progs::PORT_INGRESS)]
        ),
        "control: the pinned programs are the attached ones"
    );
    let reload = t.netns(&["datapath", "reload"]);
    assert!(reload.contains("maps kept"), "{reload}");
    // The kernel's view: every program was replaced, and the interfaces run the new ones.
    let after = pinned_progs(&t);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name} was not replaced: {before:?} -> {after:?}");
    }
    assert_eq!(
        tcx_ids(&t, UPLINK),
        (
            vec![prog_id(&after, progs::UPLINK_INGRESS)],
            vec![prog_id(&after, progs::UPLINK_EGRESS)]
        ),
        "up0 runs the new programs, one per direction"
    );
    assert_eq!(
        tcx_ids(&t, &c.host_veth()).0,
        vec![prog_id(&after, progs::PORT_INGRESS)],
        "the bridge port runs the new program"
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
    assert_eq!(
        t.tcx(UPLINK).egress_names(),
        vec![bpf::obj_name(progs::UPLINK_EGRESS)],
        "control"
    );
    sh(&format!("bpftool link detach pinned {}", link.display()));
    assert!(
        t.tcx(UPLINK).egress.is_empty(),
        "detached in the kernel's view"
    );
    let st = t.netns(&["datapath", "status"]);
    assert!(st.contains("DETACHED"), "{st}");
    let rep = t.netns(&["datapath", "check"]);
    assert!(rep.contains("repaired: netns_uplink_egress"), "{rep}");
    assert!(!t.netns(&["datapath", "status"]).contains("DETACHED"));
    let up = t.tcx(UPLINK);
    assert_eq!(
        (up.ingress_names(), up.egress_names()),
        (
            vec![bpf::obj_name(progs::UPLINK_INGRESS)],
            vec![bpf::obj_name(progs::UPLINK_EGRESS)]
        ),
        "re-attached in the kernel's view, once"
    );
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
    // What the kernel holds before: the pinned programs and links, and what is attached
    // to up0 and to the topology's cgroup.
    let prog_ids: Vec<u32> = pinned_progs(&t).into_iter().map(|(_, id)| id).collect();
    let link_ids: Vec<u32> = std::fs::read_dir(t.pins().join("links"))
        .expect("links pin directory")
        .map(|e| {
            bpf::pinned_link(&t.host, &e.unwrap().path())
                .unwrap_or_else(|e| panic!("{e:#}"))
                .id
        })
        .collect();
    assert!(!prog_ids.is_empty(), "control: programs pinned");
    // At least up0's two (and the cgroup's; the bridge port's went with the container).
    assert!(link_ids.len() >= 2, "control: {link_ids:?}");
    let up = t.tcx(UPLINK);
    assert!(
        up.ingress.len() == 1 && up.egress.len() == 1,
        "control: {up:?}"
    );
    let cg = bpf::cgroup_hooks(&t.host, &t.cgroup).unwrap();
    assert!(cg.values().all(|p| p.len() == 1), "control: {cg:?}");

    let o = t.netns(&["datapath", "unload", "--delete-bridge"]);
    assert!(
        o.contains("unloaded") && o.contains("deleted bridge"),
        "{o}"
    );
    let left: Vec<_> = walk(&t.bpffs_dir);
    assert!(left.is_empty(), "pins left under the bpffs dir: {left:?}");
    let up = t.tcx(UPLINK);
    assert!(
        up.ingress.is_empty() && up.egress.is_empty(),
        "TCX programs left on up0: {up:?}"
    );
    let cg = bpf::cgroup_hooks(&t.host, &t.cgroup).unwrap();
    assert!(
        cg.values().all(Vec::is_empty),
        "socket programs left on the cgroup: {cg:?}"
    );
    // Nothing holds them any more, so the kernel frees links and programs (at once for
    // the links; a program goes once the last descriptor closes).
    let alive = || -> (Vec<u32>, Vec<u32>) {
        (
            link_ids
                .iter()
                .copied()
                .filter(|i| bpf::link_exists(&t.host, *i))
                .collect(),
            prog_ids
                .iter()
                .copied()
                .filter(|i| bpf::prog_exists(&t.host, *i))
                .collect(),
        )
    };
    let freed = wait_for(Duration::from_secs(10), || {
        let (l, p) = alive();
        (l.is_empty() && p.is_empty()).then_some(())
    });
    assert!(
        freed.is_some(),
        "links and programs still alive: {:?}",
        alive()
    );
    assert!(!t.host.ip(&["-o", "link"]).contains("netns0"));
    let o = t.netns_cmd(&["stats"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not loaded"));
}

/// Every file below `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
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
    // 32 hooks at once started no process that outlives them (no collector).
    assert_no_netns_process(&t, "after 32 parallel prestarts");
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
}

#[test]
fn prestart_and_poststop_leave_no_netns_process() {
    let t = Topology::new();
    let c = Container::start(&t);
    assert_no_netns_process(&t, "after prestart");
    let del = c.delete();
    assert!(
        del.status.success(),
        "runc delete (poststop): {}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert_no_netns_process(&t, "after poststop");
    assert!(t.containers().is_empty(), "poststop released the lease");
    // No collector started, not even briefly: only it takes gc.lock.
    assert!(
        !t.state_dir.join("gc.lock").exists(),
        "a collector ran: {}",
        t.state_dir.join("gc.lock").display()
    );
}

#[test]
fn one_gc_daemon_per_state_directory_waits_for_the_datapath_and_reconciles() {
    let t = Topology::new();
    let lock = t.state_dir.join("gc.lock");
    let start = || {
        ChildGuard::spawn(
            t.netns_cmd(&["gc", "--daemon", "--interval", "1"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    };
    // Before any container: no datapath, no state directory yet.
    let mut first = start();
    let pid = first.0.id();
    assert!(
        wait_for(Duration::from_secs(10), || holds_flock(pid, &lock)
            .then_some(()))
        .is_some(),
        "the collector takes {}",
        lock.display()
    );
    // A second one for the same state directory refuses, naming the first.
    let second = t.netns_cmd(&["gc", "--daemon"]).output().expect("netns gc");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("already runs"),
        "a second collector: {} {err}",
        second.status
    );
    // It waits for a datapath instead of exiting without one.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "exited without a datapath"
    );
    // A container whose poststop never runs (no poststop hook): its lease outlives
    // it, and the collector reconciles it away.
    let id = unique("c");
    let hook = Bundle::netns_hook(&t, &[]);
    let bundle = Bundle::with_hooks(
        &t,
        &id,
        &BTreeMap::new(),
        serde_json::json!({ "prestart": [hook] }),
    );
    let c = Container::start_bundle(&t, id.clone(), &bundle).expect("start");
    let keep = Container::start(&t);
    drop(c);
    let healed = wait_for(Duration::from_secs(15), || {
        let ls = t.containers();
        (ls.len() == 1 && ls[0]["id"] == keep.id.as_str()).then_some(())
    });
    assert!(
        healed.is_some(),
        "the collector reconciles {id}: {:?}",
        t.containers()
    );
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the collector keeps running"
    );
    // Stopped, the lock is free for the next one.
    drop(first);
    let next = start();
    let pid = next.0.id();
    assert!(
        wait_for(Duration::from_secs(10), || holds_flock(pid, &lock)
            .then_some(()))
        .is_some(),
        "a new collector takes the lock of a stopped one"
    );
}

/// Host veths (bridge ports) in the topology's host namespace.
fn host_veths(t: &Topology) -> usize {
    t.host
        .ip(&["-o", "link"])
        .lines()
        .filter(|l| l.contains("netnsv0-"))
        .count()
}

#[test]
fn a_killed_hook_leaves_nothing_gc_cannot_reconcile() {
    let t = Topology::new();
    let keep = Container::start(&t);
    // Only the test's own `netns gc` reconciles: the hook starts no collector.
    assert_no_netns_process(&t, "after prestart");
    for step in ["veth", "attach-port", "add-endpoint", "port-map"] {
        let mut ann = BTreeMap::new();
        ann.insert("netns.ports".to_owned(), "9600:80/tcp".to_owned());
        // Prestart only: runc would run poststop after the failed start and tear down
        // what the killed hook made; this is the case where nothing did (runc itself
        // killed too, a crash), so gc must find and remove it.
        let id = unique("c");
        let hook = Bundle::netns_hook(&t, &[("NETNS_KILL_AT", step)]);
        let bundle = Bundle::with_hooks(&t, &id, &ann, serde_json::json!({ "prestart": [hook] }));
        let r = Container::start_bundle(&t, id.clone(), &bundle);
        assert!(
            r.is_err(),
            "a hook killed at {step} fails the container start"
        );
        // Control: the killed hook left its lease behind, and what it had put in the
        // datapath (the kill comes after the step named). Its veth goes with the
        // container's namespace, whenever the kernel gets round to it.
        let leases = t.containers();
        let ip: Ipv4Addr = leases
            .iter()
            .find(|l| l["id"] == id.as_str())
            .and_then(|l| l["ip"].as_str())
            .unwrap_or_else(|| panic!("no lease left by {id} after {step}: {leases:?}"))
            .parse()
            .unwrap();
        let keep_ip: Ipv4Addr = keep.ip().parse().unwrap();
        if matches!(step, "add-endpoint" | "port-map") {
            let mut want = vec![keep_ip, ip];
            want.sort();
            assert_eq!(t.endpoints(), want, "control after {step}");
        }
        if step == "port-map" {
            assert_eq!(t.map_entries(maps::PORTS), 1, "control after {step}");
        }
        let report = t.netns(&["gc"]);
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("reconciled: ") && l.contains(&id)),
            "gc reconciles what the hook killed at {step} left ({id}, {ip}): {report}"
        );
        // Only the healthy container is left: one lease, one veth, one endpoint.
        assert_eq!(t.containers().len(), 1, "after {step}: {report}");
        let veths = wait_for(Duration::from_secs(10), || {
            (host_veths(&t) == 1).then_some(())
        });
        assert!(
            veths.is_some(),
            "after {step}: {report}\n{}",
            t.host.ip(&["-o", "link"])
        );
        assert!(
            !t.netns(&["port", "ls"]).contains("9600"),
            "port map left after {step}"
        );
        assert_eq!(t.endpoints(), vec![keep_ip], "after {step}");
        assert_eq!(t.map_entries(maps::PORTS), 0, "after {step}");
        // And a second gc finds nothing more.
        let again = t.netns(&["gc"]);
        assert!(again.contains("nothing to reconcile"), "{again}");
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

/// `netns <topology flags> ARGS` with no capabilities at all (setpriv), `stdin` on
/// standard input.
fn without_caps(t: &Topology, args: &[&str], stdin: &str) -> Output {
    use std::io::Write as _;
    let mut cmd = t.host.cmd("setpriv");
    cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(netns_tests::netns_bin())
        .args(t.flags())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_cli_refuses_without_capabilities() {
    let t = Topology::new();
    let c = Container::start(&t);
    let ports_before = t.netns(&["port", "ls", "--json"]);
    for args in [
        &["stats"][..],
        &["port", "ls"],
        &["port", "add", &c.id, "9700:80/tcp"],
        &["conntrack", "ls"],
        &["gc"],
        &["load"],
        &["datapath", "status"],
        &["datapath", "unload"],
    ] {
        let o = without_caps(&t, args, "");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} without capabilities must fail"
        );
        assert!(
            err.contains("needs CAP_NET_ADMIN") && err.contains("effective capabilities"),
            "{args:?} is refused by the capability check: {err}"
        );
    }
    // The hook too, before it makes anything: a prestart for a fresh container.
    let o = without_caps(
        &t,
        &[],
        &format!(
            r#"{{"ociVersion":"1.0.2","id":"nocaps","status":"creating","pid":{},"bundle":"/"}}"#,
            c.pid
        ),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "prestart without capabilities must fail"
    );
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    // Nothing changed: still one lease, the datapath loaded, the port table the same.
    assert_eq!(t.containers().len(), 1);
    assert!(t.pins().is_dir());
    assert_eq!(t.netns(&["port", "ls", "--json"]), ports_before);
    // Reading the lease list needs none: `ls` works and lists the container.
    let o = without_caps(&t, &["ls", "--json"], "");
    assert!(
        o.status.success(),
        "ls without capabilities: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ls: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        ls.len() == 1 && ls[0]["id"] == c.id.as_str(),
        "ls lists the container: {ls:?}"
    );
}

/// Binds argv[1] (SO_REUSEADDR), sends argv[3] to argv[2] (`addr:port`) up to 8 times
/// and prints the first answer, or "none".
const UDP_ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
h, p = sys.argv[2].rsplit(":", 1)
s.settimeout(0.3)
for i in range(8):
    s.sendto(sys.argv[3].encode(), (h, int(p)))
    try:
        print(s.recv(100).decode().strip()); break
    except Exception:
        pass
else:
    print("none")
"#;

/// Answers every datagram on each port of argv[2:] with "argv[1] DATA".
const UDP_TAG: &str = r#"
import select, socket, sys
socks = []
for p in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p))); socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        d, a = s.recvfrom(1000)
        s.sendto(sys.argv[1].encode() + b" " + d, a)
"#;

fn udp_ask(mut cmd: std::process::Command, sport: u16, to: &str, what: &str) -> String {
    out(&cmd
        .args(["-c", UDP_ASK, &sport.to_string(), to, what])
        .output()
        .expect("python3"))
}

fn udp_tag(mut cmd: std::process::Command, tag: &str, ports: &[u16]) -> ChildGuard {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let g = ChildGuard::spawn(cmd.args(["-c", UDP_TAG, tag]).args(&ports));
    // Bound once `ss` shows it (the caller's namespace).
    std::thread::sleep(Duration::from_millis(300));
    g
}

fn ct_flows(t: &Topology) -> Vec<serde_json::Value> {
    serde_json::from_str(&t.netns(&["conntrack", "ls", "--json"])).expect("conntrack ls --json")
}

/// Halves in both conntrack tables (the kernel's view, bpftool) made for the endpoint
/// generation `generation`.
fn ct_entries_of_generation(t: &Topology, generation: u32) -> usize {
    let at = std::mem::offset_of!(netns_common::CtEntry, generation);
    [maps::CONNTRACK, maps::CT_NEW]
        .iter()
        .flat_map(|m| t.map_dump(m))
        .filter(|e| e.value.get(at..at + 4) == Some(&generation.to_ne_bytes()[..]))
        .count()
}

#[test]
fn a_stopped_containers_flows_leave_conntrack_ls_and_never_reach_the_next_on_its_address() {
    // One container address in a /30: the next container gets the stopped one's.
    let t = Topology::with_flags(&["--ip", "172.19.0.1/30"]);
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "7601:7601/udp".to_owned());
    let old = Container::start_with(&t, &ann, &[]).expect("start");
    let ip = old.ip();
    let old_gen = netns_common::endpoint_generation(&old.id);
    let wan_srv = udp_tag(t.wan.cmd("python3"), "wan", &[7602]);
    let old_srv = udp_tag(old.cmd("python3"), "old", &[7601]);
    // Three flows: out (SNAT, from 42600), in through the port forward (DNAT, the peer
    // at 42601), and a ping nothing meets again.
    assert_eq!(
        udp_ask(old.cmd("python3"), 42600, &format!("{WAN_IP}:7602"), "out"),
        "wan out"
    );
    assert_eq!(
        udp_ask(
            t.wan.cmd("python3"),
            42601,
            &format!("{UPLINK_IP}:7601"),
            "in"
        ),
        "old in"
    );
    assert!(
        old.exec(&["ping", "-c", "1", "-W", "2", WAN_IP])
            .status
            .success()
    );
    let fl = ct_flows(&t);
    let mine: Vec<&serde_json::Value> = fl.iter().filter(|f| f["owner"] == ip.as_str()).collect();
    assert!(
        mine.len() >= 3,
        "control: its three flows are listed: {fl:#?}"
    );
    let snat = mine
        .iter()
        .find(|f| f["original"]["sport"] == 42600)
        .unwrap_or_else(|| panic!("{fl:#?}"));
    assert!(
        snat["kind"] == "snat" && snat["assured"] == true && snat["replied"] == true,
        "{snat}"
    );
    let nat_port = snat["translated"]["sport"].as_u64().unwrap();
    assert!(
        mine.iter()
            .any(|f| f["kind"] == "dnat" && f["original"]["sport"] == 42601),
        "{fl:#?}"
    );
    drop(old_srv);
    let d = old.delete();
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    // None of its flows is listed, in JSON or text...
    let fl = ct_flows(&t);
    assert!(
        !fl.iter().any(|f| f["owner"] == ip.as_str()),
        "a stopped container's flows are listed: {fl:#?}"
    );
    let text = t.netns(&["conntrack", "ls"]);
    assert!(
        !text.contains(&format!("owner={ip} ")) && !text.contains(&format!("{ip}:")),
        "{text}"
    );
    // ...although the stop did not walk the tables: its entries are stale, not gone.
    assert!(
        ct_entries_of_generation(&t, old_gen) >= 2,
        "control: the stopped container's entries are still in the tables (stale)"
    );
    let stale_before = stats(&t)["ct_stale"].as_u64().unwrap();
    // A new container on the same address, listening where the old flows led.
    let new = Container::start(&t);
    assert_eq!(new.ip(), ip, "the /30 has one container address");
    let new_srv = udp_tag(new.cmd("python3"), "new", &[7601, 42600]);
    // The peers go on with the old flows: the new container must get none of it (there
    // is no port forward to it, and the old flows are stale).
    drop(wan_srv);
    assert_eq!(
        udp_ask(
            t.wan.cmd("python3"),
            42601,
            &format!("{UPLINK_IP}:7601"),
            "late-in"
        ),
        "none",
        "the old port-forward flow reached the new container"
    );
    assert_eq!(
        udp_ask(
            t.wan.cmd("python3"),
            7602,
            &format!("{UPLINK_IP}:{nat_port}"),
            "late-reply"
        ),
        "none",
        "a reply of the old masqueraded flow reached the new container"
    );
    assert!(
        stats(&t)["ct_stale"].as_u64().unwrap() > stale_before,
        "the datapath met stale entries and dropped them"
    );
    // The same tuples now make the new container's own flows.
    t.netns(&["port", "add", &new.id, "7601:7601/udp"]);
    assert_eq!(
        udp_ask(
            t.wan.cmd("python3"),
            42601,
            &format!("{UPLINK_IP}:7601"),
            "again"
        ),
        "new again"
    );
    let _wan_srv = udp_tag(t.wan.cmd("python3"), "wan", &[7602]);
    assert_eq!(
        udp_ask(new.cmd("python3"), 42600, &format!("{WAN_IP}:7602"), "out2"),
        "wan out2"
    );
    let fl = ct_flows(&t);
    let f = fl
        .iter()
        .find(|f| f["original"]["sport"] == 42600)
        .unwrap_or_else(|| panic!("{fl:#?}"));
    assert!(
        f["owner"] == ip.as_str() && f["age_secs"].as_u64().unwrap() <= 5,
        "a fresh flow of the new container: {f}"
    );
    // The rest of the old container's entries (its ping, met by nothing): a sweep
    // deletes them, and only them.
    let gc: serde_json::Value = serde_json::from_str(&t.netns(&["gc", "--json"])).unwrap();
    assert!(
        gc["conntrack"]["stale"].as_u64().unwrap() >= 1,
        "gc swept the stale ping flow: {gc}"
    );
    assert_eq!(
        ct_entries_of_generation(&t, old_gen),
        0,
        "no entry of the stopped container left after gc: {gc}"
    );
    assert_eq!(
        ct_flows(&t).len(),
        fl.len(),
        "the new container's flows stay: {gc}"
    );
    drop(new_srv);
}
