//! `cargo xtask demo`: two real runc containers with the netns hooks, in private
//! namespaces (a "host" with an uplink to a "wan" namespace), showing masquerade,
//! a port forward, conntrack and teardown, then the same binary as a CNI plugin for a
//! pod namespace. Nothing touches the machine's own network.
//!
//! Everything it creates is owned by RAII guards (topology, containers, servers), so it
//! is removed when a step fails and on Ctrl-C / SIGTERM / SIGHUP: the signal handler
//! only sets a flag, the running step's child processes end (Ctrl-C reaches them too),
//! and the next check returns an error that unwinds through the guards.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use anyhow::{bail, ensure};
use netns_tests::cni::{Cni, with_ports};
use netns_tests::topo::{Config, GATEWAY, UPLINK_IP, WAN_IP};
use netns_tests::util::{ChildGuard, tcp_who_server, unique};
use netns_tests::{Container, NamedNetns, Topology};

fn check() -> anyhow::Result<()> {
    if crate::signals::interrupted() {
        bail!("interrupted: tearing everything down");
    }
    Ok(())
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn show(title: &str, out: &Output) -> anyhow::Result<()> {
    check()?;
    println!("\n\x1b[1m$ {title}\x1b[0m");
    print!("{}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        print!("{err}");
    }
    Ok(())
}

fn step(s: &str) -> anyhow::Result<()> {
    check()?;
    println!("\n\x1b[1;34m== {s}\x1b[0m");
    Ok(())
}

fn runc_err(o: Output) -> anyhow::Error {
    anyhow::anyhow!(
        "runc run (and its prestart hook) failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn run(bin: &Path) -> anyhow::Result<()> {
    crate::signals::install()?;
    let result = demo(bin);
    match &result {
        Ok(()) => {
            println!("\n\x1b[1;32mdemo ok\x1b[0m: containers, namespaces, pins and state removed")
        }
        Err(e) => eprintln!(
            "\n\x1b[1;31mdemo failed\x1b[0m: {e:#}\n(everything it created has been removed)"
        ),
    }
    result
}

fn demo(bin: &Path) -> anyhow::Result<()> {
    step(
        "private topology: host namespace with uplink up0 198.51.100.2/24 -> wan namespace 198.51.100.1/24",
    )?;
    let mut cfg = Config::test(&[])?;
    cfg.bin = Some(bin.to_owned());
    let t = Topology::build(cfg)?;
    println!(
        "host netns {}, wan netns {}\nstate dir {}\nbpffs pins {}",
        t.host.name,
        t.wan.name,
        t.state_dir.display(),
        t.bpffs_dir.display()
    );

    step("a web server in the wan namespace; it logs and answers each client's address")?;
    let seen = t.path("wan-server-saw");
    // The answer comes from a script file: socat's SYSTEM address would eat the quotes
    // and backslashes of an inline printf.
    let http = t.path("http.sh");
    std::fs::write(
        &http,
        format!(
            "echo \"$SOCAT_PEERADDR\" >> {}\n\
             printf 'HTTP/1.0 200 OK\\r\\n\\r\\nhello from the wan; you came from %s\\n' \"$SOCAT_PEERADDR\"\n",
            seen.display()
        ),
    )?;
    let _web = t.wan_spawn(&format!(
        "socat -t 10 TCP-LISTEN:8000,reuseaddr,fork SYSTEM:'sh {}'",
        http.display()
    ));
    t.wan.wait_listen("tcp", 8000);

    step("two runc containers; prestart hook = netns (bridge, veth, IP, eBPF datapath)")?;
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "8080:80/tcp".to_owned());
    let a = Container::start_with(&t, &ann, &[]).map_err(runc_err)?;
    let b = Container::start_with(&t, &BTreeMap::new(), &[]).map_err(runc_err)?;
    println!(
        "container A {} (pid {}), container B {} (pid {})",
        a.id, a.pid, b.id, b.pid
    );
    show("netns ls", &t.netns_cmd(&["ls"]).output()?)?;

    step("inside container A (busybox, via runc exec)")?;
    show(
        "ip addr show eth0",
        &a.exec(&["ip", "-4", "addr", "show", "eth0"]),
    )?;
    let route = a.exec(&["ip", "route"]);
    show("ip route", &route)?;
    ensure!(
        text(&route).contains(&format!("default via {GATEWAY}")),
        "no default route via {GATEWAY} in the container"
    );
    let ping = a.exec(&["ping", "-c", "2", "-W", "2", WAN_IP]);
    show(&format!("ping -c 2 {WAN_IP}"), &ping)?;
    ensure!(
        ping.status.success(),
        "ping from the container to the wan failed"
    );
    let url = format!("http://{WAN_IP}:8000/");
    let got = a.exec(&["wget", "-qO-", &url]);
    show(&format!("wget -qO- {url}"), &got)?;
    ensure!(
        text(&got).contains("you came from"),
        "wget from the container to the wan failed"
    );
    let got_b = b.exec(&["wget", "-qO-", &url]);
    show(&format!("(container B) wget -qO- {url}"), &got_b)?;

    step("what the wan server saw as client addresses (masquerade: the uplink's)")?;
    let saw = t.wan_sh(&format!("cat {}", seen.display()));
    show("(wan) cat server log", &saw)?;
    let saw = text(&saw);
    ensure!(
        !saw.trim().is_empty() && saw.lines().all(|l| l.trim() == UPLINK_IP),
        "the server should have seen only {UPLINK_IP}, saw: {saw:?}"
    );
    println!("-> only {UPLINK_IP}, never a 172.19.x.x container address");

    step("port forward 8080 -> A:80 (from the netns.ports annotation), reached from the wan")?;
    let srv = format!(
        "exec {}",
        tcp_who_server(80).replace("echo peer=", "echo served by container A to ")
    );
    let _srv = ChildGuard::spawn(a.cmd("sh").arg("-c").arg(srv));
    a.wait_listen("tcp", 80);
    show(
        &format!("(wan) socat - TCP:{UPLINK_IP}:8080"),
        &t.wan_sh(&format!("timeout 10 socat -u TCP:{UPLINK_IP}:8080 STDOUT")),
    )?;
    show(
        &format!("(container B, hairpin) socat - TCP:{UPLINK_IP}:8080"),
        &b.sh(&format!("timeout 10 socat -u TCP:{UPLINK_IP}:8080 STDOUT")),
    )?;

    step("the same binary as a CNI plugin: ADD a pod (ip netns add), portMappings 8081 -> 80")?;
    let cni = Cni::new(&t);
    let pod = NamedNetns::create(&unique("pod"), netns_tests::ns::plain)?;
    let conf = with_ports(&cni.conf("1.1.0"), &[(8081, 80, "tcp")]);
    let add = cni.call("ADD", "demo-pod", Some(&pod), "eth0", &conf);
    println!(
        "$ CNI_COMMAND=ADD CNI_NETNS={} CNI_IFNAME=eth0 netns < conflist\n{}",
        pod.path(),
        add.stdout.trim()
    );
    ensure!(add.status.success(), "CNI ADD failed: {}", add.stdout);
    let srv = format!(
        "exec {}",
        tcp_who_server(80).replace("echo peer=", "echo served by the CNI pod to ")
    );
    let _pod_srv = ChildGuard::spawn(pod.cmd("sh").arg("-c").arg(srv));
    pod.wait_listen("tcp", 80);
    let got = t.wan_sh(&format!("timeout 10 socat -u TCP:{UPLINK_IP}:8081 STDOUT"));
    show(&format!("(wan) socat - TCP:{UPLINK_IP}:8081"), &got)?;
    ensure!(
        text(&got).contains(&format!("served by the CNI pod to {WAN_IP}")),
        "the pod's port mapping did not answer the wan"
    );

    step("datapath state")?;
    show(
        "netns conntrack ls",
        &t.netns_cmd(&["conntrack", "ls"]).output()?,
    )?;
    show("netns port ls", &t.netns_cmd(&["port", "ls"]).output()?)?;
    show("netns stats", &t.netns_cmd(&["stats"]).output()?)?;
    show(
        "iptables-save -t nat (host namespace: no rules, NAT is eBPF)",
        &t.host.cmd("iptables-save").args(["-t", "nat"]).output()?,
    )?;

    step("teardown: CNI DEL for the pod, runc delete runs the poststop hook")?;
    let del = cni.call("DEL", "demo-pod", Some(&pod), "eth0", &conf);
    ensure!(del.status.success(), "CNI DEL failed: {}", del.stdout);
    println!("$ CNI_COMMAND=DEL ... netns: ok");
    let out = a.delete();
    show("runc delete A", &out)?;
    ensure!(out.status.success(), "runc delete failed");
    show("netns ls", &t.netns_cmd(&["ls"]).output()?)?;
    drop(b);
    drop(t);
    Ok(())
}
