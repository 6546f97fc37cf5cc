//! Issue 11: podman 4.3.1 (hooks.d, runc) runs the hook, as shared/notes/real-clients.md
//! describes: the container gets the bridge network, and no process is left in the
//! engine's tree (conmon is a child subreaper: anything the hook left running would
//! keep it waiting forever). podman must be installed (scripts/setup.sh): without it
//! these tests fail.

use std::net::Ipv4Addr;
use std::time::Duration;

use netns_tests::Topology;
use netns_tests::podman::Podman;
use netns_tests::topo::{UPLINK_IP, WAN_IP};
use netns_tests::util::{output, tcp_ask, tcp_who_server, unique};

use netns_tests::util::{assert_bridge_address, inet, text};

/// Nothing of the topology's is left: no process (conmon, podman cleanup, netns), no
/// lease, no endpoint, no host veth.
fn assert_all_gone(t: &Topology, p: &Podman<'_>, when: &str) {
    if let Err(left) = p.wait_no_processes(Duration::from_secs(30)) {
        panic!("{when}: processes left in the engine's tree: {left:#?}");
    }
    assert_eq!(
        t.containers(),
        Vec::<serde_json::Value>::new(),
        "{when}: leases"
    );
    // (A refused start may not have loaded the datapath at all.)
    if t.pins().exists() {
        assert_eq!(
            t.endpoints(),
            Vec::<Ipv4Addr>::new(),
            "{when}: datapath endpoints"
        );
    }
    let links = t.host.ip(&["-o", "link"]);
    assert!(!links.contains("netnsv0-"), "{when}: host veths: {links}");
}

#[test]
fn a_podman_container_gets_the_bridge_network_and_leaves_no_process_behind() {
    let t = Topology::new();
    let p = Podman::new(&t);
    let _srv = t.wan_spawn(&tcp_who_server(7500));
    t.wan.wait_listen("tcp", 7500);

    // Detached: the first container of this state directory, the one whose conmon
    // used to wait forever for the collector the hook started.
    let name = unique("pd");
    let o = p.run(
        &["-d", "--name", &name, "--network", "none"],
        &["sleep", "100000"],
    );
    assert!(o.status.success(), "podman run -d: {}", text(&o.stderr));
    let pid = p.pid(&name).to_string();
    let addr = output(t.host.cmd("nsenter").args([
        "-t", &pid, "-n", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]));
    let ip = inet(&text(&addr.stdout));
    assert_bridge_address(ip);
    let ls = t.containers();
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["ip"], ip.to_string(), "{ls:?}");
    // The wan peer sees the uplink address (masquerade): from the container's
    // namespace with the host's socat, and from the container itself (busybox nc).
    let asked =
        output(
            t.host
                .cmd("nsenter")
                .args(["-t", &pid, "-n", "sh", "-c", &tcp_ask(WAN_IP, 7500)]),
        );
    assert_eq!(
        text(&asked.stdout).trim(),
        format!("peer={UPLINK_IP}"),
        "{}",
        text(&asked.stderr)
    );
    let exec = p.output(&["exec", &name, "nc", WAN_IP, "7500"]);
    assert!(
        text(&exec.stdout).contains(&format!("peer={UPLINK_IP}")),
        "podman exec nc: {} {}",
        text(&exec.stdout),
        text(&exec.stderr)
    );
    // The hook has exited: no netns process runs while the container does.
    assert!(
        p.netns_processes().is_empty(),
        "netns processes after prestart: {:#?}",
        p.netns_processes()
    );
    let rm = p.output(&["rm", "-f", "-t", "0", &name]);
    assert!(rm.status.success(), "podman rm -f: {}", text(&rm.stderr));
    assert_all_gone(&t, &p, "after podman rm -f");

    // In the foreground, exiting by itself: conmon exits with it (before any rm).
    let name = unique("pd");
    let script = format!("ip -4 -o addr show dev eth0; nc {WAN_IP} 7500 </dev/null");
    let o = p.run(
        &["--name", &name, "--network", "none"],
        &["sh", "-c", &script],
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "podman run: {out} {}", text(&o.stderr));
    assert_bridge_address(inet(&out));
    assert!(out.contains(&format!("peer={UPLINK_IP}")), "{out}");
    if let Err(left) = p.wait_no_processes(Duration::from_secs(30)) {
        panic!("after the container exited: processes left in the engine's tree: {left:#?}");
    }
    // poststop ran in `podman container cleanup`, which conmon started at the exit.
    assert_eq!(
        t.containers(),
        Vec::<serde_json::Value>::new(),
        "lease after the exit"
    );
    let rm = p.output(&["rm", &name]);
    assert!(rm.status.success(), "podman rm: {}", text(&rm.stderr));
    assert_all_gone(&t, &p, "after exit and podman rm");
}

#[test]
fn podmans_own_network_is_refused_with_a_hint_to_use_network_none() {
    let t = Topology::new();
    let p = Podman::new(&t);
    // No --network: podman's default network (a CNI bridge, private config) gives the
    // container an eth0 before the prestart hook runs.
    let name = unique("pd");
    let o = p.run(&["--rm", "--name", &name], &["true"]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "podman run must fail: {err}");
    assert!(
        err.contains("--network none"),
        "the hook's hint reaches podman's stderr: {err}"
    );
    let _ = p.output(&["rm", "-f", "-t", "0", &name]);
    assert_all_gone(&t, &p, "after the refused start");
}
