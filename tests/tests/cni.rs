//! The CNI plugin driven as libcni drives it (environment + stdin, stdout read to its
//! end), in a private host namespace with a wan peer: every command and version, bad
//! configurations and environments answered with error JSON, ADD twice, DEL after the
//! namespace is gone, GC keeping one valid attachment of three, port mappings from
//! `runtimeConfig` (with the UDP flow of a replaced container flushed), IPAM
//! delegation to host-local, CHECK finding what is broken, and rollback.

use std::net::Ipv4Addr;
use std::time::Duration;

use netns_tests::cni::{Cni, VERSIONS, pod, with_ports};
use netns_tests::topo::{UPLINK_IP, WAN_IP};
use netns_tests::util::{ChildGuard, UDP_WHO, output, tcp_ask, tcp_who_server, unique};
use netns_tests::{NamedNetns, Topology};
use serde_json::{Value, json};

fn leases(t: &Topology) -> Vec<Value> {
    t.containers()
}

fn lease_ids(t: &Topology) -> Vec<String> {
    let mut v: Vec<String> = leases(t)
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// Host veths (the `netnsv0-c…` ends) in the host namespace.
fn host_veths(t: &Topology) -> Vec<String> {
    let out = t.host.ip(&["-o", "link", "show", "type", "veth"]);
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .filter(|n| n.starts_with("netnsv0-c"))
        .collect()
}

fn in_pod(p: &NamedNetns, script: &str) -> std::process::Output {
    output(p.cmd("sh").arg("-c").arg(script))
}

/// The pod's TCP connection to the wan: the wan sees the uplink's address (masquerade).
fn assert_masqueraded(t: &Topology, p: &NamedNetns, port: u16) {
    let _srv = t.wan_spawn(&tcp_who_server(port));
    t.wan.wait_listen("tcp", port);
    let o = in_pod(p, &tcp_ask(WAN_IP, port));
    let got = String::from_utf8_lossy(&o.stdout);
    assert!(
        got.contains(&format!("peer={UPLINK_IP}")),
        "pod -> wan not masqueraded as {UPLINK_IP}: {o:?}"
    );
}

fn addr_of(result: &Value) -> Ipv4Addr {
    let a = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    a.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn version_lists_every_supported_version() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    for v in VERSIONS {
        let out = cni
            .call_raw(
                &[("CNI_COMMAND", "VERSION")],
                json!({"cniVersion": v}).to_string().as_bytes(),
            )
            .ok();
        assert_eq!(out["cniVersion"], *v);
        let listed: Vec<&str> = out["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(listed, VERSIONS);
    }
    // No stdin at all (some runtimes probe so).
    let out = cni.call_raw(&[("CNI_COMMAND", "VERSION")], b"").ok();
    assert_eq!(out["cniVersion"], "1.1.0");
}

#[test]
fn every_command_in_every_version() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    for (i, v) in VERSIONS.iter().enumerate() {
        let p = pod();
        let id = unique("ctr");
        let ifname = if i % 2 == 0 { "eth0" } else { "net1" };
        let conf = cni.conf(v);
        let r = cni.call("ADD", &id, Some(&p), ifname, &conf).ok();
        assert_eq!(r["cniVersion"], *v, "{r}");
        // 0.3.x/0.4.0 results tag every IP with its version; 1.0.0 dropped the field.
        let old = v.starts_with("0.");
        assert_eq!(r["ips"][0].get("version").is_some(), old, "{v}: {r}");
        let ifs = r["interfaces"].as_array().unwrap();
        let idx = r["ips"][0]["interface"].as_u64().unwrap() as usize;
        assert_eq!(ifs[idx]["name"], ifname, "{r}");
        assert_eq!(ifs[idx]["sandbox"], p.path(), "{r}");
        assert_eq!(r["ips"][0]["gateway"], "172.19.0.1", "{r}");
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0", "{r}");
        let ip = addr_of(&r);
        let shown = p.ip(&["-4", "-o", "addr", "show", "dev", ifname]);
        assert!(shown.contains(&format!("{ip}/16")), "{shown}");
        let mac = ifs[idx]["mac"].as_str().unwrap();
        assert!(p.ip(&["link", "show", ifname]).contains(mac));
        assert!(p.ip(&["route"]).contains("default via 172.19.0.1"));
        assert_masqueraded(&t, &p, 7000 + i as u16);
        assert_eq!(t.endpoints(), vec![ip], "datapath endpoint of {ip}");

        if *v != "0.3.0" && *v != "0.3.1" {
            let mut c = conf.clone();
            c["prevResult"] = r.clone();
            cni.call("CHECK", &id, Some(&p), ifname, &c).ok();
        } else {
            cni.call("CHECK", &id, Some(&p), ifname, &conf).err(1);
        }
        if *v == "1.1.0" {
            cni.call_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes())
                .ok();
        } else {
            cni.call_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes())
                .err(1);
        }
        cni.call("DEL", &id, Some(&p), ifname, &conf).ok();
        assert!(lease_ids(&t).is_empty(), "{v}: lease left");
        assert!(host_veths(&t).is_empty(), "{v}: veth left");
        assert!(t.endpoints().is_empty(), "{v}: endpoint left");
        // Idempotent.
        cni.call("DEL", &id, Some(&p), ifname, &conf).ok();
    }
}

#[test]
fn bad_input_is_answered_with_error_json_and_leaves_nothing() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let p = pod();
    let good = cni.conf("1.0.0");
    let netns = p.path();
    let env = |cmd: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", "c1".to_owned()),
            ("CNI_NETNS", netns.clone()),
            ("CNI_IFNAME", "eth0".to_owned()),
        ]
    };
    let call = |env: Vec<(&str, String)>, stdin: &[u8]| {
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni.call_raw(&e, stdin)
    };
    let without = |cmd, var: &str| -> Vec<(&'static str, String)> {
        env(cmd).into_iter().filter(|(k, _)| *k != var).collect()
    };
    let g = good.to_string();
    let gb = g.as_bytes();
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u64);
    let cases: Vec<Case> = vec![
        ("unknown command", env("FROB"), gb.to_vec(), 4),
        (
            "no container id",
            without("ADD", "CNI_CONTAINERID"),
            gb.to_vec(),
            4,
        ),
        (
            "bad container id",
            {
                let mut e = env("ADD");
                e[1].1 = "-bad/id".into();
                e
            },
            gb.to_vec(),
            4,
        ),
        ("no netns", without("ADD", "CNI_NETNS"), gb.to_vec(), 4),
        ("no ifname", without("ADD", "CNI_IFNAME"), gb.to_vec(), 4),
        (
            "bad ifname",
            {
                let mut e = env("ADD");
                e[3].1 = "this-name-is-far-too-long".into();
                e
            },
            gb.to_vec(),
            4,
        ),
        (
            "netns not a namespace",
            {
                let mut e = env("ADD");
                e[2].1 = "/etc/hostname".into();
                e
            },
            gb.to_vec(),
            4,
        ),
        (
            "our own namespace",
            {
                let mut e = env("ADD");
                e[2].1 = "/proc/self/ns/net".into();
                e
            },
            gb.to_vec(),
            4,
        ),
        ("not JSON", env("ADD"), b"{not json".to_vec(), 6),
        (
            "unsupported version",
            env("ADD"),
            {
                let mut c = good.clone();
                c["cniVersion"] = "0.2.0".into();
                c.to_string().into_bytes()
            },
            1,
        ),
        (
            "another plugin's config",
            env("ADD"),
            {
                let mut c = good.clone();
                c["type"] = "bridge".into();
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "network address as ip",
            env("ADD"),
            {
                let mut c = good.clone();
                c["ip"] = "10.9.0.0/24".into();
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "bad nat ports",
            env("ADD"),
            {
                let mut c = good.clone();
                c["natPorts"] = "9-1".into();
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "bad port mapping",
            env("ADD"),
            with_ports(&good, &[(0, 80, "tcp")])
                .to_string()
                .into_bytes(),
            7,
        ),
        (
            "sctp port mapping",
            env("ADD"),
            with_ports(&good, &[(80, 80, "sctp")])
                .to_string()
                .into_bytes(),
            7,
        ),
        (
            "GC without valid attachments",
            env("GC"),
            {
                let mut c = good.clone();
                c["cniVersion"] = "1.1.0".into();
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "ipam without type",
            env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"] = json!({"subnet": "172.19.0.0/16"});
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "missing ipam plugin",
            env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"] = json!({"type": "no-such-ipam"});
                c.to_string().into_bytes()
            },
            7,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let out = call(env, &stdin);
        let v = out.err(code);
        eprintln!("{what}: {v}");
        assert!(lease_ids(&t).is_empty(), "{what}: a lease was left");
        assert!(host_veths(&t).is_empty(), "{what}: a veth was left");
    }
    // Nothing reached the pod either.
    let links = p.ip(&["-o", "link"]);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
}

#[test]
fn add_twice_is_an_error_and_keeps_the_first() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let p = pod();
    let conf = cni.conf("1.0.0");
    let r = cni.add("twice", &p, &conf);
    let again = cni.call("ADD", "twice", Some(&p), "eth0", &conf);
    let e = again.err(101);
    assert!(e["msg"].as_str().unwrap().contains("eth0"), "{e}");
    assert_eq!(lease_ids(&t), vec!["twice:eth0".to_owned()]);
    assert_eq!(t.endpoints(), vec![addr_of(&r)]);
    assert_masqueraded(&t, &p, 7100);
    let mut c = conf.clone();
    c["prevResult"] = r;
    cni.call("CHECK", "twice", Some(&p), "eth0", &c).ok();
    // A second interface of the same container is another attachment.
    let r2 = cni.call("ADD", "twice", Some(&p), "net1", &conf).ok();
    assert_ne!(addr_of(&r2), addr_of(&c["prevResult"]));
    assert_eq!(lease_ids(&t).len(), 2);
    cni.call("DEL", "twice", Some(&p), "net1", &conf).ok();
    cni.del("twice", Some(&p), &conf);
    assert!(lease_ids(&t).is_empty());
}

#[test]
fn del_after_the_namespace_is_gone() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let conf = with_ports(&cni.conf("1.0.0"), &[(8081, 80, "tcp")]);
    let p = pod();
    cni.add("gone", &p, &conf);
    assert_eq!(host_veths(&t).len(), 1);
    let ports = t.netns(&["port", "ls", "--json"]);
    assert!(ports.contains("8081"), "{ports}");
    drop(p); // ip netns del: the veth goes with it.
    cni.del("gone", None, &conf);
    assert!(lease_ids(&t).is_empty());
    assert!(host_veths(&t).is_empty());
    assert!(t.endpoints().is_empty());
    let ports: Value = serde_json::from_str(&t.netns(&["port", "ls", "--json"])).unwrap();
    assert_eq!(ports.as_array().map(Vec::len), Some(0), "{ports}");
    // And DEL of something never added.
    cni.del("never", None, &conf);
}

#[test]
fn gc_keeps_only_valid_attachments() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let conf = cni.conf("1.1.0");
    let pods: Vec<NamedNetns> = (0..3).map(|_| pod()).collect();
    let ids = ["gca", "gcb", "gcc"];
    for (i, p) in ids.iter().zip(&pods) {
        cni.add(
            i,
            p,
            &with_ports(
                &conf,
                &[(
                    8090 + pods.iter().position(|q| q.name == p.name).unwrap() as u16,
                    80,
                    "tcp",
                )],
            ),
        );
    }
    assert_eq!(lease_ids(&t).len(), 3);
    // Another network's attachment in the same state directory is not this GC's.
    let other = Cni {
        network: unique("other"),
        ..Cni::new(&t)
    };
    let po = pod();
    other.add("gco", &po, &other.conf("1.1.0"));
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gcb", "ifname": "eth0"}]);
    cni.call_raw(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())
        .ok();
    assert_eq!(
        lease_ids(&t),
        vec!["gcb:eth0".to_owned(), "gco:eth0".to_owned()]
    );
    assert_eq!(host_veths(&t).len(), 2);
    let ports = t.netns(&["port", "ls", "--json"]);
    assert!(
        ports.contains("8091") && !ports.contains("8090") && !ports.contains("8092"),
        "{ports}"
    );
    assert_masqueraded(&t, &pods[1], 7200);
    other.del("gco", Some(&po), &other.conf("1.1.0"));
    cni.del("gcb", Some(&pods[1]), &conf);
}

#[test]
fn port_mappings_forward_and_a_replaced_container_gets_the_udp_flow() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let base = cni.conf("1.0.0");
    let conf = with_ports(&base, &[(8080, 80, "tcp"), (5353, 53, "udp")]);
    let p1 = pod();
    let r1 = cni.add("pm1", &p1, &conf);
    let spawn = |p: &NamedNetns, script: String| {
        ChildGuard::spawn(p.cmd("sh").arg("-c").arg(format!("exec {script}")))
    };
    let _tcp = spawn(&p1, tcp_who_server(80));
    let _udp1 = spawn(&p1, format!("python3 -c '{UDP_WHO}' 53"));
    p1.wait_listen("tcp", 80);
    p1.wait_listen("udp", 53);
    let o = t.wan_sh(&tcp_ask(UPLINK_IP, 8080));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("peer={WAN_IP}")),
        "wan -> uplink:8080 must reach the pod with the wan's address: {o:?}"
    );
    // A UDP client with a fixed source port keeps one flow (conntrack entry) alive.
    let ask_from = |sport: u16| {
        format!(
            "python3 -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n\
             s.bind((\"0.0.0.0\",{sport}))\nfor i in range(5):\n  s.sendto(b\"hi\",(\"{UPLINK_IP}\",5353))\n  try:\n    print(s.recv(100).decode().strip()); break\n  except socket.timeout: pass'"
        )
    };
    let o = t.wan_sh(&ask_from(40000));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("peer="),
        "udp via 5353: {o:?}"
    );
    // The container is replaced: DEL, a new one takes the same host ports.
    cni.del("pm1", Some(&p1), &conf);
    drop(_udp1);
    let p2 = pod();
    let r2 = cni.add("pm2", &p2, &conf);
    assert_ne!(addr_of(&r1), addr_of(&r2));
    // The new container answers with its own tag, so we can tell who got the datagram.
    let who2 = UDP_WHO.replace("peer=%s", "second peer=%s");
    let _udp2 = spawn(&p2, format!("python3 -c '{who2}' 53"));
    p2.wait_listen("udp", 53);
    let o = t.wan_sh(&ask_from(40000));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("second peer="),
        "the same UDP flow after the replacement must reach the new container: {o:?}"
    );
    cni.del("pm2", Some(&p2), &conf);
    let o = t.wan_sh(&tcp_ask(UPLINK_IP, 8080));
    assert!(
        !o.status.success() || o.stdout.is_empty(),
        "8080 still forwarded after DEL: {o:?}"
    );
}

#[test]
fn check_names_what_is_broken() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let conf = with_ports(&cni.conf("1.0.0"), &[(8082, 80, "tcp")]);
    let p = pod();
    let r = cni.add("chk", &p, &conf);
    let ip = addr_of(&r);
    let mut c = conf.clone();
    c["prevResult"] = r.clone();
    cni.call("CHECK", "chk", Some(&p), "eth0", &c).ok();
    // The runtime's port mappings changed without an ADD.
    let other = with_ports(&cni.conf("1.0.0"), &[(8083, 80, "tcp")]);
    let e = cni.call("CHECK", "chk", Some(&p), "eth0", &other).err(104);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains("8083") && msg.contains("8082"), "{e}");
    // Somebody removed the address and the default route in the container.
    p.ip(&["addr", "del", &format!("{ip}/16"), "dev", "eth0"]);
    let e = cni.call("CHECK", "chk", Some(&p), "eth0", &c).err(104);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("lacks {ip}/16")), "{e}");
    assert!(msg.contains("default route"), "{e}");
    // An attachment never made.
    cni.call("CHECK", "nope", Some(&p), "eth0", &c).err(104);
    cni.del("chk", Some(&p), &conf);
}

#[test]
fn ipam_is_delegated_to_host_local() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let data = t.path(&unique("hostlocal"));
    let mut conf = cni.conf("1.0.0");
    conf["ipam"] = json!({
        "type": "host-local",
        "dataDir": data,
        "ranges": [[{"subnet": "172.19.0.0/16", "rangeStart": "172.19.7.10", "rangeEnd": "172.19.7.20", "gateway": "172.19.0.1"}]],
    });
    let p = pod();
    let r = cni.add("hl", &p, &conf);
    assert_eq!(addr_of(&r), Ipv4Addr::new(172, 19, 7, 10), "{r}");
    let net_dir = data.join(&cni.network);
    assert!(
        net_dir.join("172.19.7.10").exists(),
        "host-local recorded the address"
    );
    assert_masqueraded(&t, &p, 7300);
    let mut c = conf.clone();
    c["prevResult"] = r;
    cni.call("CHECK", "hl", Some(&p), "eth0", &c).ok();
    // A failed ADD gives the plugin's address back (rollback), and leaves nothing.
    let p2 = pod();
    let mut failing = conf.clone();
    failing["ip"] = "10.50.0.1/24".into(); // the plugin's address does not fit
    cni.call("ADD", "hl2", Some(&p2), "eth0", &failing).err(102);
    assert!(
        !net_dir.join("172.19.7.11").exists(),
        "address of a failed ADD released"
    );
    cni.del("hl", Some(&p), &conf);
    assert!(
        !net_dir.join("172.19.7.10").exists(),
        "DEL released host-local's address"
    );
    assert!(lease_ids(&t).is_empty());
}

#[test]
fn a_failed_add_rolls_back_and_holds_no_pipes() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let p = pod();
    let conf = with_ports(&cni.conf("1.0.0"), &[(8084, 80, "tcp")]);
    let env = |fail: &'static str| {
        let netns = p.path();
        vec![
            ("CNI_COMMAND", "ADD".to_owned()),
            ("CNI_CONTAINERID", "rb".to_owned()),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("NETNS_FAIL_AT", fail.to_owned()),
        ]
    };
    for step in ["veth", "add-endpoint", "port-map", "persist"] {
        let e = env(step);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = cni.call_raw(&e, conf.to_string().as_bytes());
        out.err(100);
        assert!(lease_ids(&t).is_empty(), "{step}: lease left");
        assert!(host_veths(&t).is_empty(), "{step}: veth left");
        let ports: Value = serde_json::from_str(&t.netns(&["port", "ls", "--json"])).unwrap();
        assert_eq!(ports.as_array().map(Vec::len), Some(0), "{step}: {ports}");
        assert_eq!(
            p.ip(&["-o", "link"]).lines().count(),
            1,
            "{step}: pod not clean"
        );
    }
    // A successful ADD returns as soon as the plugin is done: both pipes closed, no
    // process of ours left (libcni reads stdout and stderr until they close).
    let out = cni.call("ADD", "rb", Some(&p), "eth0", &conf);
    out.ok();
    assert!(
        out.elapsed < Duration::from_secs(10),
        "ADD took {:?}",
        out.elapsed
    );
    assert!(
        netns_tests::util::pids_with_arg(&cni.plugin_dir.join("netns").display().to_string())
            .is_empty(),
        "a plugin process outlived the call"
    );
    cni.del("rb", Some(&p), &conf);
}

#[test]
fn status_reports_an_unusable_bpffs() {
    let t = Topology::new();
    let cni = Cni::new(&t);
    let mut conf = cni.conf("1.1.0");
    cni.call_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes())
        .ok();
    conf["bpffsDir"] = t.path("not-bpffs").display().to_string().into();
    let e = cni
        .call_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes())
        .err(50);
    assert!(e["msg"].as_str().unwrap().contains("bpffs"), "{e}");
}
