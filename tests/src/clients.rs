//! What the real-client tests (podman's CNI backend, `ctr run --cni`) share: the netns
//! network configuration list, a snapshot of the machine's own CNI/containerd
//! directories (to prove they stay untouched), and HTTP from the wan namespace.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::topo::{GATEWAY, Topology, UPLINK};

/// sh script run by `unshare -m --propagation private`: `$1` a private directory for a
/// tmpfs holding overlay layers, then target/source pairs up to `--`, then the command
/// to exec. Bind-mounts each source over its target; a missing target is created in an
/// overlay (upper layer on that tmpfs) of its nearest existing ancestor (never "/"), so
/// nothing is written to the machine's filesystem: it all lives in the new mount
/// namespace, gone with its last process.
const SHADOW_SCRIPT: &str = r#"set -eu
layers=$1; shift
mount -t tmpfs -o mode=0700 netns-test "$layers"
n=0
while [ "$1" != -- ]; do
    target=$1; source=$2; shift 2
    if [ ! -d "$target" ]; then
        a=$(dirname "$target")
        while [ ! -d "$a" ]; do a=$(dirname "$a"); done
        if [ "$a" = / ]; then echo "shadow: no ancestor of $target to overlay" >&2; exit 1; fi
        n=$((n + 1))
        mkdir "$layers/u$n" "$layers/w$n"
        mount -t overlay netns-test -o "lowerdir=$a,upperdir=$layers/u$n,workdir=$layers/w$n" "$a"
        mkdir -p "$target"
    fi
    mount --bind "$source" "$target"
done
shift
exec "$@"
"#;

/// `program` in the topology's host namespace and in a private mount namespace in
/// which each `(target, source)` of `shadows` has the private directory `source`
/// bind-mounted over the machine's `target` (made only inside that namespace if it is
/// missing, see [`SHADOW_SCRIPT`]); `layers` is an empty private directory it needs.
pub fn in_private_mounts(
    topo: &Topology,
    layers: &Path,
    shadows: &[(&str, &Path)],
    program: &[&OsStr],
) -> Command {
    let mut cmd = topo.host.cmd("unshare");
    cmd.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        SHADOW_SCRIPT,
        "shadow",
    ])
    .arg(layers);
    for (target, source) in shadows {
        cmd.arg(target).arg(source);
    }
    cmd.arg("--").args(program);
    cmd
}

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

/// A directory's sorted entries and modification time.
pub type DirState = (Vec<String>, std::time::SystemTime);

/// What each of [`MACHINE_DIRS`] is: absent, or its entries and its modification
/// time (which also catches a file made and removed again), to compare before and after.
pub fn machine_snapshot() -> Vec<(String, Option<DirState>)> {
    MACHINE_DIRS
        .iter()
        .map(|d| {
            let state = std::fs::metadata(d).ok().map(|m| {
                let mut entries: Vec<String> = std::fs::read_dir(d)
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                entries.sort();
                (entries, m.modified().expect("mtime"))
            });
            ((*d).to_owned(), state)
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
