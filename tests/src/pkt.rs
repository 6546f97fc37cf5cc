//! Crafted packets and independent observers, in python3 (no scapy): a small packet
//! library to prepend to scripts ([`PY_LIB`]), a background process whose output lines
//! are collected ([`Lines`]), and an AF_PACKET capture on one interface that reports
//! every frame as a JSON line ([`Capture`]). Everything runs in a namespace the caller
//! picks (`NamedNetns::cmd`, `Container::cmd`): nothing here chooses one.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::{ChildGuard, wait_for};

/// Python helpers: checksums, IPv4/UDP/TCP/ICMPv6 builders, fragments, Ethernet, and
/// senders (AF_PACKET on an interface; raw IP with IP_HDRINCL, which keeps the source
/// address as given).
pub const PY_LIB: &str = r#"
import socket, struct, sys, os, time, select, json

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s >> 16) + (s & 0xffff)
    return ~s & 0xffff

def ph4(src, dst, proto, n):
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, n)

def ip4(src, dst, proto, l4, ident=0x4242, frag=0, mf=False, ttl=64):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident,
                    (frag // 8) | (0x2000 if mf else 0), ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + l4

def udp(src, dst, sport, dport, data):
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = csum(ph4(src, dst, 17, len(u)) + u) or 0xffff
    return u[:6] + struct.pack("!H", c) + u[8:]

def tcp(src, dst, sport, dport, flags, seq=1, ack=0, data=b""):
    t = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    return t[:16] + struct.pack("!H", csum(ph4(src, dst, 6, len(t)) + t)) + t[18:]

def frags(src, dst, proto, l4, ident, size=1480):
    """IPv4 fragments of one datagram, in order (size: payload bytes per fragment)."""
    out, off = [], 0
    while off < len(l4):
        part = l4[off:off + size]
        out.append(ip4(src, dst, proto, part, ident=ident, frag=off, mf=off + size < len(l4)))
        off += size
    return out

def icmp6(src, dst, body):
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    c = csum(s + d + struct.pack("!IxxxB", len(body), 58) + body)
    return body[:2] + struct.pack("!H", c) + body[4:]

def ip6(src, dst, nh, payload, hlim=255):
    return (struct.pack("!IHBB", 6 << 28, len(payload), nh, hlim)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + payload)

def mac(s):
    return bytes.fromhex(s.replace(":", ""))

def eth(dst, src, etype, payload):
    f = mac(dst) + mac(src) + struct.pack("!H", etype) + payload
    return f + b"\0" * max(0, 60 - len(f))

def send_l2(iface, *frames):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for f in frames:
        s.send(f)

def send_l3(*pkts):
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in pkts:
        r.sendto(p, (socket.inet_ntoa(p[16:20]), 0))
"#;

/// `PY_LIB` followed by `body`: a complete script for `python3 -c`.
pub fn py(body: &str) -> String {
    format!("{PY_LIB}\n{body}")
}

/// A background process whose stdout (and stderr) lines are collected as they come;
/// lines can be written to its stdin. Killed on drop.
pub struct Lines {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let v = Arc::new(Mutex::new(Vec::new()));
    let w = v.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            w.lock().expect("lines lock").push(l);
        }
    });
    v
}

impl Lines {
    pub fn spawn(cmd: &mut Command) -> Lines {
        let mut child = ChildGuard::spawn(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let stdin = child.0.stdin.take();
        let out = collect(child.0.stdout.take().expect("stdout"));
        let err = collect(child.0.stderr.take().expect("stderr"));
        Lines {
            child,
            stdin,
            out,
            err,
        }
    }

    /// `python3 -c PY_LIB+body ARGS` run by `cmd` (e.g. `ns.cmd("python3")`).
    pub fn python(mut cmd: Command, body: &str, args: &[&str]) -> Lines {
        Self::spawn(cmd.arg("-c").arg(py(body)).args(args))
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lock().expect("lines lock").clone()
    }

    /// Stderr lines so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.err.lock().expect("lines lock").join("\n")
    }

    /// Waits for a stdout line `pred` accepts (also one that came earlier).
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        wait_for(timeout, || {
            if self.exited() {
                // Give the reader threads a moment to drain the pipe, then look once more.
                std::thread::sleep(Duration::from_millis(50));
                return Some(self.lines().into_iter().find(|l| pred(l)));
            }
            self.lines().into_iter().find(|l| pred(l)).map(Some)
        })
        .flatten()
    }

    /// Writes one line to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Sends `line` and waits for the next stdout line (request/response drivers).
    pub fn ask(&mut self, line: &str, timeout: Duration) -> Option<String> {
        let n = self.lines().len();
        self.send(line);
        wait_for(timeout, || self.lines().get(n).cloned())
    }

    pub fn exited(&self) -> bool {
        // try_wait needs &mut; peek through /proc instead (a zombie has exited).
        let pid = self.child.0.id();
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
        }
    }
}

/// AF_PACKET capture of every frame on one interface (both directions), one JSON
/// object per line: `dir` (packet type: 0 to us, 1 broadcast, 2 multicast, 3 other
/// host, 4 outgoing), `esrc`, `edst`, `etype`; for IPv4 `src`, `dst`, `proto`, `id`,
/// `frag` (offset in bytes), `mf`, for TCP/UDP first fragments `sport`, `dport`
/// (and TCP `flags`), and `data`: hex of the L4 payload (of the whole L4 part for
/// other protocols and later fragments); for ARP `arp_op`, `arp_sip`, `arp_sha`;
/// for IPv6 `src6`, `dst6`, `nh`.
const CAPTURE: &str = r#"
import socket, struct, sys, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], 0))
print("ready", flush=True)
def m(b): return ":".join("%02x" % x for x in b)
while True:
    f, a = s.recvfrom(65535)
    d = {"dir": a[2], "edst": m(f[0:6]), "esrc": m(f[6:12]), "etype": struct.unpack("!H", f[12:14])[0], "len": len(f)}
    p = f[14:]
    if d["etype"] == 0x0800 and len(p) >= 20:
        ihl = (p[0] & 15) * 4
        tot = struct.unpack("!H", p[2:4])[0]
        fo = struct.unpack("!H", p[6:8])[0]
        d.update(src=socket.inet_ntoa(p[12:16]), dst=socket.inet_ntoa(p[16:20]), proto=p[9],
                 id=struct.unpack("!H", p[4:6])[0], frag=(fo & 0x1fff) * 8, mf=bool(fo & 0x2000))
        l4 = p[ihl:tot]
        data = l4
        if d["frag"] == 0 and p[9] in (6, 17) and len(l4) >= 4:
            d["sport"], d["dport"] = struct.unpack("!HH", l4[:4])
            if p[9] == 6 and len(l4) >= 14:
                d["flags"] = l4[13]
                data = l4[(l4[12] >> 4) * 4:]
            elif p[9] == 17:
                data = l4[8:]
        d["data"] = data[:512].hex()
    elif d["etype"] == 0x0806 and len(p) >= 28:
        d.update(arp_op=struct.unpack("!H", p[6:8])[0], arp_sha=m(p[8:14]), arp_sip=socket.inet_ntoa(p[14:18]))
    elif d["etype"] == 0x86dd and len(p) >= 40:
        d.update(src6=socket.inet_ntop(socket.AF_INET6, p[8:24]), dst6=socket.inet_ntop(socket.AF_INET6, p[24:40]), nh=p[6])
    print(json.dumps(d), flush=True)
"#;

/// A running capture; see [`CAPTURE`] for what each frame reports.
pub struct Capture {
    lines: Lines,
}

impl Capture {
    /// Starts capturing on `iface` with `python3` as `cmd` runs it (which picks the
    /// namespace, e.g. `t.wan.cmd("python3")`); returns once the socket is bound.
    pub fn start(mut cmd: Command, iface: &str) -> Capture {
        let lines = Lines::spawn(cmd.arg("-c").arg(CAPTURE).arg(iface));
        assert!(
            lines
                .wait_line(Duration::from_secs(10), |l| l == "ready")
                .is_some(),
            "capture on {iface} did not start: {}",
            lines.stderr()
        );
        Capture { lines }
    }

    /// Every frame seen so far.
    pub fn frames(&self) -> Vec<serde_json::Value> {
        self.lines
            .lines()
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("capture line is JSON"))
            .collect()
    }

    /// Waits for a frame `pred` accepts (also one seen earlier).
    pub fn wait(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        wait_for(timeout, || self.frames().into_iter().find(|f| pred(f)))
    }
}

/// Whether a captured frame's payload (`data`) contains `tag`.
pub fn has_tag(frame: &serde_json::Value, tag: &str) -> bool {
    let hex: String = tag.bytes().map(|b| format!("{b:02x}")).collect();
    frame["data"].as_str().is_some_and(|d| d.contains(&hex))
}

/// The MAC address of `dev`, from `ip -o link show dev DEV` as `cmd` (an `ip` command
/// in some namespace) runs it.
pub fn mac_of(mut ip_cmd: Command, dev: &str) -> String {
    let o = crate::util::run(ip_cmd.args(["-o", "link", "show", "dev", dev]));
    o.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev}: {o}"))
        .to_owned()
}

/// Runs a python script (PY_LIB prepended) with `cmd`, which picks the namespace.
pub fn python(mut cmd: std::process::Command, body: &str, args: &[&str]) -> std::process::Output {
    crate::util::output(cmd.arg("-c").arg(py(body)).args(args))
}
