//! What the real-client tests (podman's CNI backend, `ctr run --cni`) share: the netns
//! network configuration list, a snapshot of the machine's own CNI/containerd
//! directories (to prove they stay untouched), and HTTP from the wan namespace.

use std::path::Path;

use serde_json::{Value, json};

use crate::topo::{GATEWAY, Topology, UPLINK};

/// The machine's directories a real client would use by default: none may change.
pub const MACHINE_DIRS: &[&str] = &[
    "/etc/cni",
    "/etc/cni/net.d",
    "/opt/cni",
    "/opt/cni/bin",
    "/opt/containerd",
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/cni",
];

/// `{"cniVersion":"1.0.0","name":NAME,"plugins":[{"type":"netns",...}]}` with the
/// topology's bridge address, uplink, private state and bpffs directories and
/// `cgroup: none` (a client's plugin runs outside any test cgroup); port mappings as a
/// capability, so the runtime injects `runtimeConfig.portMappings`.
pub fn conflist(topo: &Topology, name: &str) -> Value {
    let mut plugin = json!({
        "type": "netns",
        "bridge": "netns0",
        "ip": format!("{GATEWAY}/16"),
        "uplink": UPLINK,
        "stateDir": topo.state_dir,
        "bpffsDir": topo.bpffs_dir,
        "cgroup": "none",
        "capabilities": { "portMappings": true },
    });
    // The datapath mode the suite runs in (as the hook's flags have it).
    if let Ok(v) = std::env::var("NETNS_TEST_FAST_PATH") {
        plugin["fastPath"] = (v == "on").into();
    }
    json!({ "cniVersion": "1.0.0", "name": name, "plugins": [plugin] })
}

/// What each of [`MACHINE_DIRS`] holds (None: absent), to compare before and after.
pub fn machine_snapshot() -> Vec<(String, Option<Vec<String>>)> {
    MACHINE_DIRS
        .iter()
        .map(|d| {
            let entries = std::fs::read_dir(d).ok().map(|rd| {
                let mut v: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            });
            (
                (*d).to_owned(),
                entries.or_else(|| Path::new(d).exists().then(Vec::new)),
            )
        })
        .collect()
}

/// Shell command: `GET path` over HTTP/1.0 to `addr:port`, printing the whole response
/// (socat from the namespace it runs in; busybox's wget segfaults here).
pub fn http_get(addr: &str, port: u16, path: &str) -> String {
    format!(
        "printf 'GET {path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' | timeout 20 socat -t 10 - TCP:{addr}:{port}"
    )
}

/// A www directory for busybox httpd in `rootfs`/www: an index with `marker` and a CGI
/// script answering `peer=<REMOTE_ADDR>`, i.e. the client's address as the container
/// sees it.
pub fn write_www(rootfs: &Path, marker: &str) {
    let www = rootfs.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).expect("www dir");
    std::fs::write(www.join("index.html"), format!("{marker}\n")).expect("index.html");
    let cgi = www.join("cgi-bin/peer");
    std::fs::write(
        &cgi,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"peer=$REMOTE_ADDR\"\n",
    )
    .expect("cgi script");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).expect("chmod cgi");
}
