//! Self-tests of the harness, independent of the product: a private topology, a real
//! runc container whose prestart/poststop hooks are a shell script that logs its
//! stdin, and nothing left behind afterwards. If these fail, the product tests' results
//! mean nothing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use netns_tests::runc::Bundle;
use netns_tests::topo::{UPLINK, UPLINK_IP, WAN_IP};
use netns_tests::util::{
    ChildGuard, kill_with_arg, pids_with_arg, run, tcp_ask, tcp_who_server, unique, wait_for,
};
use netns_tests::{Container, NamedNetns, NetnsGuard, Topology};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The process has exited (gone, or a zombie), within 5 s.
fn gone(pid: u32) -> bool {
    wait_for(Duration::from_secs(5), || {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(()),
            Ok(s) => (s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'))
            .then_some(()),
        }
    })
    .is_some()
}

fn netns_list() -> String {
    run(Command::new("ip").args(["netns", "list"]))
}

#[test]
fn runc_with_a_logging_hook_in_a_private_topology_and_nothing_left_behind() {
    let t = Topology::new();
    let (host, wan) = (t.host.name.clone(), t.wan.name.clone());
    let (tmp, bpffs, cgroup) = (t.tmp.clone(), t.bpffs_dir.clone(), t.cgroup.clone());
    let list = netns_list();
    assert!(list.contains(&host) && list.contains(&wan), "{list}");

    // The uplink: address, default route, the wan peer answers (inside our namespaces).
    assert!(
        t.host
            .ip(&["-4", "-o", "addr", "show", "dev", UPLINK])
            .contains(&format!("{UPLINK_IP}/24"))
    );
    assert!(
        t.host
            .ip(&["route", "show", "default"])
            .contains(&format!("default via {WAN_IP} dev {UPLINK}"))
    );
    let ping = t
        .host
        .cmd("ping")
        .args(["-c", "1", "-W", "2", WAN_IP])
        .output()
        .unwrap();
    assert!(ping.status.success(), "host -> wan: {}", stdout(&ping));
    for ns in [&t.host, &t.wan] {
        assert!(
            ns.ip(&["-o", "link", "show", "lo"]).contains("UP"),
            "lo up in {}",
            ns.name
        );
    }

    // A dummy hook: appends the state JSON it gets on stdin to a log.
    let hook = t.path("hook.sh");
    let log = t.path("hook.log");
    fs::write(&hook, "#!/bin/sh\n{ cat; echo; } >> \"$1\"\n").unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let h = serde_json::json!({ "path": hook, "args": ["hook", log] });
    let hooks = serde_json::json!({ "prestart": [h.clone()], "poststop": [h] });
    let id = unique("c");
    let bundle = Bundle::with_hooks(&t, &id, &BTreeMap::new(), hooks);
    let c = Container::start_bundle(&t, id.clone(), &bundle)
        .unwrap_or_else(|o| panic!("runc run: {}", String::from_utf8_lossy(&o.stderr)));

    let states: Vec<serde_json::Value> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(states.len(), 1, "prestart ran once: {states:?}");
    assert_eq!(states[0]["id"], id.as_str());
    assert_eq!(states[0]["pid"], c.pid);
    assert_eq!(states[0]["bundle"], bundle.dir.display().to_string());

    // The container has its own, empty network namespace (only lo).
    let ino = |p: &str| fs::metadata(p).unwrap().ino();
    assert_ne!(ino(&format!("/proc/{}/ns/net", c.pid)), ino(&t.host.path()));
    assert_ne!(
        ino(&format!("/proc/{}/ns/net", c.pid)),
        ino("/proc/self/ns/net")
    );
    let links = stdout(&c.sh("ip -o link"));
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    // runc exec runs busybox inside it.
    let e = c.exec(&["sh", "-c", "echo hi from $(cat /proc/1/comm)"]);
    assert_eq!(
        stdout(&e).trim(),
        "hi from sleep",
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );

    // A server in wan, reachable from the host namespace, killed by its guard.
    let srv = t.wan_spawn(&tcp_who_server(7900));
    t.wan.wait_listen("tcp", 7900);
    let got = t
        .host
        .cmd("sh")
        .args(["-c", &tcp_ask(WAN_IP, 7900)])
        .output()
        .unwrap();
    assert_eq!(stdout(&got).trim(), format!("peer={UPLINK_IP}"));
    let srv_pid = srv.0.id();
    drop(srv);
    assert!(
        !Path::new(&format!("/proc/{srv_pid}")).exists(),
        "server reaped"
    );

    // runc delete runs poststop with status "stopped".
    let pid = c.pid;
    let out = c.delete();
    assert!(
        out.status.success(),
        "runc delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log_text = fs::read_to_string(&log).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(log_text.lines().rfind(|l| !l.trim().is_empty()).unwrap()).unwrap();
    assert_eq!(last["status"], "stopped", "{log_text}");
    assert_eq!(last["id"], id.as_str());
    assert!(gone(pid), "container process {pid} still running");
    let root = t.runc_root.display().to_string();
    assert_eq!(
        run(Command::new("runc").args(["--root", &root, "list", "-q"])).trim(),
        ""
    );

    // A second container is still running when the topology drops: Drop deletes it.
    let id2 = unique("c");
    let b2 = Bundle::with_hooks(&t, &id2, &BTreeMap::new(), serde_json::json!({}));
    let c2 = Container::start_bundle(&t, id2.clone(), &b2).expect("second container");
    let pid2 = c2.pid;
    std::mem::forget(c2);

    drop(t);
    let list = netns_list();
    assert!(
        !list.contains(&host) && !list.contains(&wan),
        "namespaces left: {list}"
    );
    assert!(!tmp.exists(), "{} left", tmp.display());
    assert!(!bpffs.exists(), "{} left", bpffs.display());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(gone(pid2), "container {id2} (pid {pid2}) left running");
}

#[test]
fn netns_guard_enters_and_restores_the_thread_namespace() {
    let ns = NamedNetns::new(&unique("ng"));
    let veth = unique("g");
    ns.ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{veth}p"),
    ]);
    let mine = || fs::read_link("/proc/thread-self/ns/net").unwrap();
    let before = mine();
    {
        let _g = NetnsGuard::new(&ns.path());
        assert_ne!(mine(), before);
        assert!(
            nix::net::if_::if_nametoindex(veth.as_str()).is_ok(),
            "{veth} visible inside"
        );
    }
    assert_eq!(mine(), before, "restored on drop");
    assert!(
        nix::net::if_::if_nametoindex(veth.as_str()).is_err(),
        "{veth} not visible outside"
    );
    let path = ns.path();
    drop(ns);
    assert!(!Path::new(&path).exists());
    assert!(!netns_list().contains(&path.rsplit('/').next().unwrap().to_owned()));
}

#[test]
fn unique_names_are_short_and_distinct() {
    let names: Vec<String> = (0..300).map(|_| unique("nt")).collect();
    let mut d = names.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), names.len());
    // Room for a one-letter suffix in a 15-byte interface name.
    assert!(names.iter().all(|n| n.len() <= 14), "{names:?}");
}

#[test]
fn kill_with_arg_kills_exactly_the_processes_with_that_argument() {
    let mark = format!("/tmp/netns-test-mark-{}", unique("k"));
    // `read` is a builtin: these shells block on their stdin pipe without forking.
    let block = |args: &[&str]| {
        ChildGuard::spawn(
            Command::new("sh")
                .args(["-c", "read x", "sh"])
                .args(args)
                .stdin(std::process::Stdio::piped()),
        )
    };
    let victim = block(&["--state-dir", &mark]);
    let bystander = block(&[&format!("{mark}x"), &format!("--state-dir={mark}/y")]);
    let also = block(&[&format!("--state-dir={mark}")]);
    let pids = wait_for(Duration::from_secs(5), || {
        let p = pids_with_arg(&mark);
        (p.len() >= 2).then_some(p)
    })
    .expect("found by argument");
    let mut want = vec![victim.0.id(), also.0.id()];
    want.sort();
    let mut pids = pids;
    pids.sort();
    assert_eq!(pids, want);
    kill_with_arg(&mark);
    let mut victim = victim;
    let st =
        wait_for(Duration::from_secs(5), || victim.0.try_wait().unwrap()).expect("victim killed");
    assert!(!st.success());
    let mut bystander = bystander;
    assert!(
        bystander.0.try_wait().unwrap().is_none(),
        "bystander untouched"
    );
}

#[test]
fn a_failed_topology_build_says_why_and_leaves_nothing() {
    let cfg = netns_tests::topo::Config::test(&[]).unwrap();
    // Its wan namespace's name is taken: the build fails after making the host.
    let squatter = NamedNetns::new(&format!("{}w", cfg.tag));
    let (tag, tmp, cgroup) = (cfg.tag.clone(), cfg.tmp.clone(), cfg.cgroup.clone());
    let err = match Topology::build(cfg) {
        Ok(_) => panic!("building over an existing namespace must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("netns") && err.contains(&format!("{tag}w")),
        "{err}"
    );
    let list = netns_list();
    assert!(
        !list.contains(&format!("{tag}h")),
        "host namespace left: {list}"
    );
    assert!(
        list.contains(&squatter.name),
        "the other namespace is untouched"
    );
    assert!(!tmp.exists() && !cgroup.exists());
}

#[test]
fn the_bpftool_helpers_read_what_the_kernel_holds() {
    use netns_tests::bpf;
    netns_tests::topo::ensure_bpffs().unwrap();
    let ns = NamedNetns::new(&unique("nt"));
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(Path::new("/sys/fs/bpf").join(format!("netns-test-{}", unique("m"))));
    fs::create_dir_all(&dir.0).unwrap();
    let pin = dir.0.join("m");
    let p = pin.to_str().unwrap();
    run(ns.cmd("bpftool").args([
        "map", "create", p, "type", "hash", "key", "4", "value", "4", "entries", "8", "name",
        "nt_test",
    ]));
    assert_eq!(bpf::map_entries(&ns, &pin).unwrap(), 0);
    for i in 1..=3u8 {
        let (k, v) = (i.to_string(), (i * 2).to_string());
        run(ns.cmd("bpftool").args([
            "map", "update", "pinned", p, "key", &k, "0", "0", "0", "value", "0", "0", "0", &v,
        ]));
    }
    let mut got = bpf::map_dump(&ns, &pin).unwrap();
    got.sort_by(|a, b| a.key.cmp(&b.key));
    let want: Vec<bpf::Entry> = (1..=3u8)
        .map(|i| bpf::Entry {
            key: vec![i, 0, 0, 0],
            value: vec![0, 0, 0, i * 2],
        })
        .collect();
    assert_eq!(got, want);
    assert!(
        bpf::map_dump(&ns, &dir.0.join("none")).is_err(),
        "no such pin"
    );
    // Nothing is attached to a fresh namespace's lo.
    let x = bpf::tcx(&ns, "lo").unwrap();
    assert!(x.ingress.is_empty() && x.egress.is_empty(), "{x:?}");
    assert_eq!(bpf::obj_name("netns_uplink_ingress"), "netns_uplink_in");
}
