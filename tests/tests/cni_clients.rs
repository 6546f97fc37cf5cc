//! The netns CNI plugin driven by real clients: podman 4.3 (CNI backend, `-p`) and
//! containerd 1.6 (`ctr run --cni`), each with private configuration, plugin, storage
//! and state directories, run in a topology's host namespace. podman and containerd
//! must be installed (scripts/setup.sh): without them these tests fail.

use std::net::Ipv4Addr;
use std::time::Duration;

use netns_tests::Topology;
use netns_tests::clients::{conflist, http_get, machine_snapshot, write_www};
use netns_tests::containerd::Containerd;
use netns_tests::podman::Podman;
use netns_tests::topo::{UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::{
    ChildGuard, UDP_WHO, output, tcp_ask, tcp_who_server, udp_ask, unique, wait_for, wait_listen,
};
use serde_json::Value;

use netns_tests::util::{assert_bridge_address, inet, text};

/// `ip -4 -o addr show dev eth0` in the network namespace of process `pid`.
fn eth0_address(t: &Topology, pid: u32) -> Ipv4Addr {
    let o = output(t.host.cmd("nsenter").args([
        "-t",
        &pid.to_string(),
        "-n",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        "eth0",
    ]));
    inet(&text(&o.stdout))
}

/// The address in a `peer=ADDR` line (also busybox httpd's IPv4-mapped `[::ffff:ADDR]`).
fn peer(body: &str) -> Option<Ipv4Addr> {
    body.lines().find_map(|l| {
        let a = l.trim().strip_prefix("peer=")?;
        let a = a.trim_start_matches("[::ffff:").trim_end_matches(']');
        a.parse().ok()
    })
}

/// The counters of `netns stats --json` that are not zero.
fn nonzero_counters(t: &Topology) -> Value {
    let mut s = t.stats();
    if let Some(m) = s.as_object_mut() {
        m.retain(|_, v| v.as_u64() != Some(0));
    }
    s
}

/// The host's veths the plugin made (`netnsv0-…`).
fn host_veths(t: &Topology) -> Vec<String> {
    t.host
        .ip(&["-o", "link"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
        .filter(|n| n.starts_with("netnsv0-"))
        .collect()
}

/// `netns port ls --json` against the topology's private state directory.
fn port_forwards(t: &Topology) -> Vec<Value> {
    serde_json::from_str(&t.netns(&["port", "ls", "--json"])).expect("port ls --json is JSON")
}

/// The one lease there must be: the plugin's record of the attachment `ifname` eth0 to
/// network `network`, with the container's address `ip`.
fn assert_one_cni_lease(t: &Topology, network: &str, ip: Ipv4Addr) -> Value {
    let ls = t.containers();
    assert_eq!(ls.len(), 1, "leases: {ls:#?}");
    let l = &ls[0];
    assert_eq!(l["ip"], ip.to_string(), "{l:#}");
    assert_eq!(l["ifname"], "eth0", "{l:#}");
    assert_eq!(l["cni"]["network"], network, "{l:#}");
    assert_eq!(l["cni"]["ifname"], "eth0", "{l:#}");
    let id = l["cni"]["container_id"].as_str().unwrap_or_default();
    assert_eq!(l["id"], format!("{id}:eth0"), "lease key: {l:#}");
    assert_eq!(
        host_veths(t),
        vec![l["host_veth"].as_str().unwrap().to_owned()]
    );
    l.clone()
}

/// The plugin's DEL left nothing: no lease, no port forward, no datapath endpoint, no
/// host veth.
fn assert_plugin_state_empty(t: &Topology, when: &str) {
    assert_eq!(t.containers(), Vec::<Value>::new(), "{when}: leases");
    assert_eq!(
        port_forwards(t),
        Vec::<Value>::new(),
        "{when}: port forwards"
    );
    if t.pins().exists() {
        assert_eq!(t.endpoints(), Vec::<Ipv4Addr>::new(), "{when}: endpoints");
    }
    assert_eq!(host_veths(t), Vec::<String>::new(), "{when}: host veths");
}

#[test]
fn podman_cni_backend_with_the_netns_plugin_publishes_a_port_and_cleans_up() {
    let before = machine_snapshot();
    let t = Topology::new();
    let network = unique("pn");
    let p = Podman::with_cni(&t, &conflist(&t, &network));
    let marker = unique("hello-");
    write_www(&p.rootfs, &marker);
    let _srv = t.wan_spawn(&tcp_who_server(7500));
    t.wan.wait_listen("tcp", 7500);

    let name = unique("pc");
    let o = p.run(
        &[
            "-d",
            "--name",
            &name,
            "--network",
            &network,
            "-p",
            "8080:80",
            "-p",
            "5353:53/udp",
        ],
        &["httpd", "-f", "-v", "-p", "80", "-h", "/www"],
    );
    assert!(o.status.success(), "podman run -d: {}", text(&o.stderr));
    let pid = p.pid(&name);
    let ip = eth0_address(&t, pid);
    assert_bridge_address(ip);
    let lease = assert_one_cni_lease(&t, &network, ip);
    assert_eq!(
        lease["cni"]["container_id"].as_str().map(str::len),
        Some(64),
        "podman's container id: {lease:#}"
    );
    // podman passed -p as runtimeConfig.portMappings: 8080/tcp -> ip:80, 5353/udp -> ip:53.
    let mut fwd: Vec<(u64, String, u64, String)> = port_forwards(&t)
        .iter()
        .map(|f| {
            (
                f["host_port"].as_u64().unwrap_or_default(),
                f["proto"].as_str().unwrap_or_default().to_owned(),
                f["container_port"].as_u64().unwrap_or_default(),
                f["container_ip"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    fwd.sort();
    assert_eq!(
        fwd,
        vec![
            (5353, "udp".to_owned(), 53, ip.to_string()),
            (8080, "tcp".to_owned(), 80, ip.to_string()),
        ],
        "port forwards"
    );

    // From wan through the uplink address: the page, and the peer as the container sees
    // it (the CGI's REMOTE_ADDR): wan's own address, not rewritten on the way in; the
    // same over UDP (the host's python in the container's namespace: busybox nc has no
    // -u). Failures are reported at the end, after the teardown checks have run too.
    let mut inbound: Vec<String> = inbound_problem(&t, &p, &name, ip, &marker)
        .into_iter()
        .collect();
    let pid_s = pid.to_string();
    let udp = ChildGuard::spawn(
        t.host
            .cmd("nsenter")
            .args(["-t", &pid_s, "-n", "python3", "-c", UDP_WHO, "53"]),
    );
    wait_listen(&["-t", &pid_s, "-n"], "udp", 53);
    let o = t.wan_sh(&udp_ask(UPLINK_IP, 5353));
    if peer(&text(&o.stdout)) != WAN_IP.parse().ok() {
        let host_ss = output(t.host.cmd("ss").args(["-Hlunp", "sport = :5353"]));
        inbound.push(format!(
            "UDP via {UPLINK_IP}:5353 from wan: {:?} {}\nhost sockets on 5353: {}",
            text(&o.stdout),
            text(&o.stderr),
            text(&host_ss.stdout)
        ));
    }
    drop(udp);
    // Outbound: the wan peer sees the uplink address (masquerade).
    let exec = p.output(&["exec", &name, "nc", WAN_IP, "7500"]);
    assert!(
        text(&exec.stdout).contains(&format!("peer={UPLINK_IP}")),
        "podman exec nc: {} {}",
        text(&exec.stdout),
        text(&exec.stderr)
    );
    // The plugin started nothing that outlives a call.
    assert!(
        p.netns_processes().is_empty(),
        "netns processes while the container runs: {:#?}",
        p.netns_processes()
    );

    let rm = p.output(&["rm", "-f", "-t", "0", &name]);
    assert!(rm.status.success(), "podman rm -f: {}", text(&rm.stderr));
    assert_plugin_state_empty(&t, "after podman rm -f");
    if let Err(left) = p.wait_no_processes(Duration::from_secs(30)) {
        panic!("after podman rm -f: processes left: {left:#?}");
    }
    // The port is closed again.
    let o = t.wan_sh(&http_get(UPLINK_IP, 8080, "/"));
    assert!(
        !text(&o.stdout).contains(&marker),
        "still served after rm: {}",
        text(&o.stdout)
    );

    // In the foreground, exiting by itself: DEL comes from `podman container cleanup`,
    // which conmon starts at the exit (before any rm).
    let name = unique("pc");
    let script = format!("ip -4 -o addr show dev eth0; nc {WAN_IP} 7500 </dev/null");
    let o = p.run(
        &["--name", &name, "--network", &network],
        &["sh", "-c", &script],
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "podman run: {out} {}", text(&o.stderr));
    assert_bridge_address(inet(&out));
    assert!(out.contains(&format!("peer={UPLINK_IP}")), "{out}");
    if let Err(left) = p.wait_no_processes(Duration::from_secs(30)) {
        panic!("after the container exited: processes left: {left:#?}");
    }
    assert_plugin_state_empty(&t, "after the container exited");
    let rm = p.output(&["rm", &name]);
    assert!(rm.status.success(), "podman rm: {}", text(&rm.stderr));
    assert_plugin_state_empty(&t, "after exit and podman rm");

    drop(p);
    assert_eq!(
        machine_snapshot(),
        before,
        "the machine's CNI/containerd directories changed"
    );
    assert!(inbound.is_empty(), "{}", inbound.join("\n\n"));
}

/// What is wrong with `-p 8080:80` of podman container `name` (address `ip`, whose
/// httpd serves `marker`) seen from wan, with what tells where it breaks; None if the
/// page and the CGI's peer address are right.
fn inbound_problem(
    t: &Topology,
    p: &Podman<'_>,
    name: &str,
    ip: Ipv4Addr,
    marker: &str,
) -> Option<String> {
    let got = wait_for(Duration::from_secs(15), || {
        let o = t.wan_sh(&http_get(UPLINK_IP, 8080, "/"));
        text(&o.stdout).contains(marker).then_some(())
    });
    if got.is_none() {
        // httpd itself (its socket, its answer to the host), the host's own sockets on
        // the port (rootful podman reserves every published port with a listening
        // socket that conmon holds), the forward table, the counters.
        let pid = p.pid(name).to_string();
        let direct = t.host_sh(&http_get(&ip.to_string(), 80, "/"));
        let ss = output(
            t.host
                .cmd("nsenter")
                .args(["-t", &pid, "-n", "ss", "-Hltn"]),
        );
        let host_ss = output(t.host.cmd("ss").args(["-Hltnup", "sport = :8080"]));
        return Some(format!(
            "GET / via {UPLINK_IP}:8080 from wan got no answer\n\
             direct from the host to {ip}:80: {}\ncontainer sockets: {}\n\
             host sockets on 8080: {}\nport forwards: {:#?}\ncounters: {:#}",
            text(&direct.stdout),
            text(&ss.stdout),
            text(&host_ss.stdout),
            port_forwards(t),
            nonzero_counters(t)
        ));
    }
    let o = t.wan_sh(&http_get(UPLINK_IP, 8080, "/cgi-bin/peer"));
    let body = text(&o.stdout);
    (peer(&body) != WAN_IP.parse().ok()).then(|| {
        format!(
            "the container must see wan's address {WAN_IP} as the peer: {body} {}",
            text(&o.stderr)
        )
    })
}

#[test]
fn ctr_run_cni_with_the_netns_plugin_gets_eth0_masquerades_and_each_del_cleans_up_its_own() {
    let before = machine_snapshot();
    {
        let t = Topology::new();
        let network = unique("cn");
        let mut c = Containerd::new(&t);
        c.install_network(&conflist(&t, &network));
        let _srv = t.wan_spawn(&tcp_who_server(7501));
        t.wan.wait_listen("tcp", 7501);

        // Foreground: ctr itself calls DEL once the task exits (ctr 1.6 has no -p, so
        // no port mapping reaches the plugin; `ctr run -d` would never call DEL).
        let id = unique("cc");
        let script = format!("nc {WAN_IP} 7501 </dev/null; exec sleep 100000");
        let ctr_run = c.run_cni(&id, &["sh", "-c", &script]);
        let pid = c.task_pid(&id);
        let ip = eth0_address(&t, pid);
        assert_bridge_address(ip);
        let lease = assert_one_cni_lease(&t, &network, ip);
        // go-cni's container id is "<namespace>-<id>", the netns /proc/PID/ns/net.
        assert_eq!(
            lease["cni"]["container_id"],
            format!("default-{id}"),
            "{lease:#}"
        );
        assert_eq!(
            lease["cni"]["netns"],
            format!("/proc/{pid}/ns/net"),
            "{lease:#}"
        );
        // Outbound from the container's namespace (the host's socat) and from the
        // container itself (busybox nc through ctr task exec): masqueraded.
        let asked = output(t.host.cmd("nsenter").args([
            "-t",
            &pid.to_string(),
            "-n",
            "sh",
            "-c",
            &tcp_ask(WAN_IP, 7501),
        ]));
        assert_eq!(
            text(&asked.stdout).trim(),
            format!("peer={UPLINK_IP}"),
            "{}",
            text(&asked.stderr)
        );
        let exec_id = unique("x");
        let exec = c.output(&[
            "task",
            "exec",
            "--exec-id",
            &exec_id,
            &id,
            "nc",
            WAN_IP,
            "7501",
        ]);
        assert!(
            text(&exec.stdout).contains(&format!("peer={UPLINK_IP}")),
            "ctr task exec nc: {} {}",
            text(&exec.stdout),
            text(&exec.stderr)
        );

        // A second container: its own address and attachment; the first one's DEL
        // must leave it alone.
        let id2 = unique("cc");
        let ctr_run2 = c.run_cni(&id2, &["sleep", "100000"]);
        let pid2 = c.task_pid(&id2);
        let ip2 = eth0_address(&t, pid2);
        assert_bridge_address(ip2);
        assert_ne!(ip, ip2, "two containers, one address");
        assert_eq!(t.containers().len(), 2, "{:#?}", t.containers());
        assert_eq!(host_veths(&t).len(), 2, "{:?}", host_veths(&t));

        let kill = c.output(&["task", "kill", "-s", "SIGKILL", &id]);
        assert!(
            kill.status.success(),
            "ctr task kill: {}",
            text(&kill.stderr)
        );
        // ctr run: DEL (with CNI_NETNS empty: the namespace went with the task), then
        // the task's delete; it exits with the task's status, 128 + SIGKILL. A failed
        // DEL would make it exit 1 with "ctr: …".
        let out = ctr_run.wait_output(Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(137),
            "ctr run after the kill: stdout {} stderr {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains(&format!("peer={UPLINK_IP}")),
            "the container's own nc at start: {}",
            text(&out.stdout)
        );
        let rm = c.output(&["container", "rm", &id]);
        assert!(rm.status.success(), "ctr c rm: {}", text(&rm.stderr));
        let lease2 = assert_one_cni_lease(&t, &network, ip2);
        assert_eq!(lease2["cni"]["container_id"], format!("default-{id2}"));
        let asked = output(t.host.cmd("nsenter").args([
            "-t",
            &pid2.to_string(),
            "-n",
            "sh",
            "-c",
            &tcp_ask(WAN_IP, 7501),
        ]));
        assert_eq!(
            text(&asked.stdout).trim(),
            format!("peer={UPLINK_IP}"),
            "the second container after the first one's DEL: {}",
            text(&asked.stderr)
        );

        let kill = c.output(&["task", "kill", "-s", "SIGKILL", &id2]);
        assert!(
            kill.status.success(),
            "ctr task kill: {}",
            text(&kill.stderr)
        );
        let out = ctr_run2.wait_output(Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(137),
            "ctr run: {}",
            text(&out.stderr)
        );
        let rm = c.output(&["container", "rm", &id2]);
        assert!(rm.status.success(), "ctr c rm: {}", text(&rm.stderr));
        assert_eq!(c.containers(), Vec::<String>::new(), "ctr c ls");
        assert_plugin_state_empty(&t, "after ctr task kill + ctr c rm");

        // Detached: ctr 1.6 never calls DEL (not on `task kill`, `task rm` or `c rm`),
        // so the attachment outlives the container; its namespace and veth are gone, and
        // a full reconcile (`netns gc`, the plugin's settings) releases the rest.
        let id3 = unique("cd");
        let o = c.run_cni_detached(&id3, &["sleep", "100000"]);
        assert!(o.status.success(), "ctr run -d: {}", text(&o.stderr));
        let pid3 = c.task_pid(&id3);
        let ip3 = eth0_address(&t, pid3);
        assert_one_cni_lease(&t, &network, ip3);
        for args in [
            &["task", "kill", "-s", "SIGKILL", &id3][..],
            &["task", "rm", "-f", &id3],
            &["container", "rm", &id3],
        ] {
            let o = c.output(args);
            assert!(o.status.success(), "ctr {args:?}: {}", text(&o.stderr));
        }
        let leases = t.containers();
        assert_eq!(
            leases.len(),
            1,
            "ctr 1.6 calls no DEL after a detached run: the lease stays: {leases:#?}"
        );
        let gone = wait_for(Duration::from_secs(10), || {
            host_veths(&t).is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "host veth after the namespace went: {:?}",
            host_veths(&t)
        );
        let gc = output(
            t.host
                .cmd(t.bin())
                .arg("--state-dir")
                .arg(&t.state_dir)
                .arg("--bpffs-dir")
                .arg(&t.bpffs_dir)
                .args(["--uplink", UPLINK, "--cgroup", "none", "gc"]),
        );
        assert!(gc.status.success(), "netns gc: {}", text(&gc.stderr));
        assert_plugin_state_empty(&t, "after the detached run and netns gc");

        let left = c.stop();
        assert!(left.is_empty(), "left after stopping containerd: {left:#?}");
    }
    assert_eq!(
        machine_snapshot(),
        before,
        "the machine's CNI/containerd directories changed"
    );
}
