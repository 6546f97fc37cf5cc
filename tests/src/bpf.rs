//! The kernel's view of BPF objects, independent of the product under test: `bpftool`
//! for pinned maps, programs and links, and `BPF_PROG_QUERY` (a raw bpf(2) call from
//! python) for what is attached to an interface or a cgroup (bpftool 7.1 does not show
//! TCX attachments). Everything runs in the namespace the caller passes, the one whose
//! interfaces the question is about.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::ns::NamedNetns;
use crate::util::try_run;

/// One map entry as bpftool dumps it: raw key and value bytes (the value is empty for
/// per-CPU maps, whose dump has one value per CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

fn bytes(v: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let Some(a) = v.as_array() else {
        return Ok(Vec::new());
    };
    a.iter()
        .map(|b| {
            let s = b.as_str().context("a byte as a string")?;
            u8::from_str_radix(s.trim_start_matches("0x"), 16)
                .with_context(|| format!("byte {s:?}"))
        })
        .collect()
}

fn bpftool_json(ns: &NamedNetns, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = try_run(ns.cmd("bpftool").arg("-j").args(args))?;
    serde_json::from_str(&out).with_context(|| format!("bpftool -j {}: {out}", args.join(" ")))
}

/// `bpftool map dump pinned PIN`: every entry of the map.
pub fn map_dump(ns: &NamedNetns, pin: &Path) -> anyhow::Result<Vec<Entry>> {
    let pin = pin.to_str().context("utf-8 pin path")?;
    let v = bpftool_json(ns, &["map", "dump", "pinned", pin])?;
    v.as_array()
        .with_context(|| format!("map dump of {pin} is not a list: {v}"))?
        .iter()
        .map(|e| {
            Ok(Entry {
                key: bytes(&e["key"])?,
                value: bytes(&e["value"])?,
            })
        })
        .collect()
}

/// How many entries the pinned map holds (`bpftool map dump`).
pub fn map_entries(ns: &NamedNetns, pin: &Path) -> anyhow::Result<u64> {
    Ok(map_dump(ns, pin)?.len() as u64)
}

/// The id of the pinned program.
pub fn pinned_prog_id(ns: &NamedNetns, pin: &Path) -> anyhow::Result<u32> {
    let pin = pin.to_str().context("utf-8 pin path")?;
    let v = bpftool_json(ns, &["prog", "show", "pinned", pin])?;
    v["id"]
        .as_u64()
        .map(|i| i as u32)
        .with_context(|| format!("no id for {pin}: {v}"))
}

/// A BPF link: its id and the id of the program it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub id: u32,
    pub prog_id: u32,
}

/// The pinned link (`bpftool link show pinned`).
pub fn pinned_link(ns: &NamedNetns, pin: &Path) -> anyhow::Result<Link> {
    let pin = pin.to_str().context("utf-8 pin path")?;
    let v = bpftool_json(ns, &["link", "show", "pinned", pin])?;
    match (v["id"].as_u64(), v["prog_id"].as_u64()) {
        (Some(id), Some(prog_id)) => Ok(Link {
            id: id as u32,
            prog_id: prog_id as u32,
        }),
        _ => bail!("no id/prog_id for link {pin}: {v}"),
    }
}

/// Whether the kernel still has a program with this id (`bpftool prog show id N`).
pub fn prog_exists(ns: &NamedNetns, id: u32) -> bool {
    ns.cmd("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the kernel still has a link with this id (`bpftool link show id N`).
pub fn link_exists(ns: &NamedNetns, id: u32) -> bool {
    ns.cmd("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The name the kernel keeps for an object called `name`: at most 15 bytes
/// (`BPF_OBJ_NAME_LEN` with its NUL).
pub fn obj_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// A program attached somewhere: id and (kernel, so at most 15 bytes) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub name: String,
}

/// Programs attached (BPF_PROG_QUERY, in the namespace it runs in) to argv[2]: with
/// argv[1] "tcx" an interface, for TCX ingress and egress; with "cgroup" a cgroup
/// directory, for the socket hooks netns uses. Prints {"ATTACH": [[id, name], ...]}.
const BPF_QUERY: &str = r#"
import ctypes, json, os, platform, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
def bpf(cmd, attr):
    r = libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return r
def name(pid):
    a = ctypes.create_string_buffer(128); struct.pack_into("=I", a, 0, pid)
    fd = bpf(13, a)  # BPF_PROG_GET_FD_BY_ID
    info = ctypes.create_string_buffer(256)
    a = ctypes.create_string_buffer(128); struct.pack_into("=IIQ", a, 0, fd, 256, ctypes.addressof(info))
    bpf(15, a)  # BPF_OBJ_GET_INFO_BY_FD
    os.close(fd)
    return info.raw[64:80].split(b"\0")[0].decode()
def query(target, attach_type):
    ids = (ctypes.c_uint32 * 64)()
    a = ctypes.create_string_buffer(128)
    struct.pack_into("=IIIIQI", a, 0, target, attach_type, 0, 0, ctypes.addressof(ids), 64)
    bpf(16, a)  # BPF_PROG_QUERY
    n = struct.unpack_from("=I", a, 24)[0]
    return [[ids[i], name(ids[i])] for i in range(n)]
if sys.argv[1] == "tcx":
    target = socket.if_nametoindex(sys.argv[2])
    types = {"ingress": 46, "egress": 47}
else:
    target = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)
    types = {"bind4": 8, "connect4": 10, "sendmsg4": 14, "recvmsg4": 19, "getpeername4": 29}
print(json.dumps({k: query(target, v) for k, v in types.items()}))
"#;

fn query(
    ns: &NamedNetns,
    kind: &str,
    target: &str,
) -> anyhow::Result<BTreeMap<String, Vec<Attached>>> {
    let out = try_run(ns.cmd("python3").args(["-c", BPF_QUERY, kind, target]))?;
    let v: BTreeMap<String, Vec<(u32, String)>> =
        serde_json::from_str(&out).with_context(|| format!("BPF_PROG_QUERY output: {out}"))?;
    Ok(v.into_iter()
        .map(|(k, progs)| {
            let progs = progs
                .into_iter()
                .map(|(id, name)| Attached { id, name })
                .collect();
            (k, progs)
        })
        .collect())
}

/// The TCX programs on one interface, in attach order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcx {
    pub ingress: Vec<Attached>,
    pub egress: Vec<Attached>,
}

impl Tcx {
    pub fn ingress_names(&self) -> Vec<&str> {
        self.ingress.iter().map(|a| a.name.as_str()).collect()
    }
    pub fn egress_names(&self) -> Vec<&str> {
        self.egress.iter().map(|a| a.name.as_str()).collect()
    }
}

/// The TCX programs attached to `ifname` in `ns` (BPF_PROG_QUERY).
pub fn tcx(ns: &NamedNetns, ifname: &str) -> anyhow::Result<Tcx> {
    let mut q = query(ns, "tcx", ifname)?;
    Ok(Tcx {
        ingress: q.remove("ingress").unwrap_or_default(),
        egress: q.remove("egress").unwrap_or_default(),
    })
}

/// The programs on the cgroup `dir`'s socket hooks (bind4, connect4, sendmsg4,
/// recvmsg4, getpeername4), by hook.
pub fn cgroup_hooks(
    ns: &NamedNetns,
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, Vec<Attached>>> {
    query(ns, "cgroup", dir.to_str().context("utf-8 cgroup path")?)
}

/// `bpftool map delete pinned PIN key hex ...`: removes one entry of the pinned map by
/// its raw key bytes (an error if there is no such entry).
pub fn map_delete(ns: &NamedNetns, pin: &Path, key: &[u8]) -> anyhow::Result<()> {
    let pin = pin.to_str().context("utf-8 pin path")?;
    let hex: Vec<String> = key.iter().map(|b| format!("{b:02x}")).collect();
    try_run(
        ns.cmd("bpftool")
            .args(["map", "delete", "pinned", pin, "key", "hex"])
            .args(&hex),
    )?;
    Ok(())
}
