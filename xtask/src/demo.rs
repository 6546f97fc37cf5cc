//! `cargo xtask demo`: two real runc containers with the netns hooks, in private
//! namespaces (a "host" with an uplink to a "wan" namespace), showing masquerade,
//! a port forward, conntrack and teardown. Nothing touches the machine's own network.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use netns_tests::topo::{UPLINK_IP, WAN_IP};
use netns_tests::{Container, Topology};

fn show(title: &str, out: &std::process::Output) {
    println!("\n\x1b[1m$ {title}\x1b[0m");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        print!("{err}");
    }
}

fn step(s: &str) {
    println!("\n\x1b[1;34m== {s}\x1b[0m");
}

pub fn run(bin: &Path) -> anyhow::Result<()> {
    // SAFETY: single-threaded at this point; the harness reads NETNS_BIN.
    unsafe { std::env::set_var("NETNS_BIN", bin) };
    step("private topology: host namespace with uplink up0 198.51.100.2/24 -> wan namespace 198.51.100.1/24");
    let t = Topology::new();
    println!("host netns {}, wan netns {}, state {}, pins {}", t.host.name, t.wan.name, t.state_dir.display(), t.bpffs_dir.display());

    step("a web server in the wan namespace that tells clients who they are");
    let _web = t.wan_spawn(
        "socat TCP-LISTEN:8000,reuseaddr,fork SYSTEM:'printf \"HTTP/1.0 200 OK\\r\\n\\r\\nhello from the wan; you came from $SOCAT_PEERADDR\\n\"'",
    );
    std::thread::sleep(Duration::from_millis(300));

    step("two runc containers; prestart hook = netns (bridge, veth, IP, eBPF datapath)");
    let mut ann = BTreeMap::new();
    ann.insert("netns.ports".to_owned(), "8080:80/tcp".to_owned());
    let a = Container::start_with(&t, &ann, &[]).map_err(|o| anyhow::anyhow!("runc: {}", String::from_utf8_lossy(&o.stderr)))?;
    let b = Container::start(&t);
    println!("container {} pid {}, container {} pid {}", a.id, a.pid, b.id, b.pid);
    show("netns ls", &t.netns_cmd(&["ls"]).output()?);

    step("inside container A");
    show("ip addr show eth0", &a.exec(&["ip", "-4", "addr", "show", "eth0"]));
    show("ip route", &a.exec(&["ip", "route"]));
    show(&format!("ping -c 2 {WAN_IP}"), &a.exec(&["ping", "-c", "2", WAN_IP]));
    show(&format!("wget -qO- http://{WAN_IP}:8000/"), &a.exec(&["wget", "-qO-", &format!("http://{WAN_IP}:8000/")]));
    println!("(the wan server saw the uplink address {UPLINK_IP}, not the container's)");

    step("port forward 8080 -> A:80 (from the netns.ports annotation), reached from the wan");
    let _srv = a
        .cmd("socat")
        .args(["TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:echo served by container A to $SOCAT_PEERADDR"])
        .spawn()
        .map(netns_tests::util::ChildGuard)?;
    std::thread::sleep(Duration::from_millis(300));
    show(&format!("(wan) socat - TCP:{UPLINK_IP}:8080"), &t.wan_sh(&format!("echo | socat -t 2 - TCP:{UPLINK_IP}:8080")));
    show(&format!("(container B, hairpin) socat - TCP:{UPLINK_IP}:8080"), &b.sh(&format!("echo | socat -t 2 - TCP:{UPLINK_IP}:8080")));
    show("(host) echo the host says HI | nc localhost 8080", &t.host_sh("echo the host says HI | socat -t 2 - TCP:127.0.0.1:8080"));

    step("datapath state");
    show("netns port ls", &t.netns_cmd(&["port", "ls"]).output()?);
    show("netns conntrack ls", &t.netns_cmd(&["conntrack", "ls"]).output()?);
    show("netns stats", &t.netns_cmd(&["stats"]).output()?);
    show("iptables-save -t nat (host namespace: empty, NAT is eBPF)", &t.host.cmd("iptables-save").args(["-t", "nat"]).output()?);

    step("teardown: runc delete runs the poststop hook");
    let out = a.delete();
    show("runc delete A", &out);
    show("netns ls", &t.netns_cmd(&["ls"]).output()?);
    drop(b);
    drop(t);
    println!("\nall namespaces, pins and containers removed");
    Ok(())
}
