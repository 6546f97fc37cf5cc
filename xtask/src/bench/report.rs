//! Results and their rendering: one Markdown document, also printed on the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::sys::{median, percentile};
use super::topo::Kind;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Metric {
    LatOutP50,
    LatOutP99,
    LatInP50,
    LatInP99,
    TcpRrOutP50,
    TcpRrOutP99,
    TcpRrInP50,
    TcpRrInP99,
    UdpOut,
    UdpIn,
    UdpC2c,
    TcpUp,
    TcpDown,
    Conn1,
    Conn10k,
    Udp6Out,
    Tcp6Up,
    Tcp6Down,
    Conn6,
}

impl Metric {
    pub const ALL: [Metric; 19] = [
        Metric::LatOutP50,
        Metric::LatOutP99,
        Metric::LatInP50,
        Metric::LatInP99,
        Metric::TcpRrOutP50,
        Metric::TcpRrOutP99,
        Metric::TcpRrInP50,
        Metric::TcpRrInP99,
        Metric::UdpOut,
        Metric::UdpIn,
        Metric::UdpC2c,
        Metric::TcpUp,
        Metric::TcpDown,
        Metric::Conn1,
        Metric::Conn10k,
        Metric::Udp6Out,
        Metric::Tcp6Up,
        Metric::Tcp6Down,
        Metric::Conn6,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::LatOutP50 => "1. UDP latency p50, container → wan (SNAT)",
            Metric::LatOutP99 => "1. UDP latency p99, container → wan (SNAT)",
            Metric::LatInP50 => "1. UDP latency p50, wan → container (port forward)",
            Metric::LatInP99 => "1. UDP latency p99, wan → container (port forward)",
            Metric::TcpRrOutP50 => "1b. TCP request/response p50, container → wan (SNAT)",
            Metric::TcpRrOutP99 => "1b. TCP request/response p99, container → wan (SNAT)",
            Metric::TcpRrInP50 => "1b. TCP request/response p50, wan → container (port forward)",
            Metric::TcpRrInP99 => "1b. TCP request/response p99, wan → container (port forward)",
            Metric::UdpOut => "2. UDP 64 B delivered, container → wan (SNAT)",
            Metric::UdpIn => "2. UDP 64 B delivered, wan → container (port forward)",
            Metric::UdpC2c => "2b. UDP 64 B delivered, container a → container b (bridge)",
            Metric::TcpUp => "3. TCP bulk, container → wan (iperf3)",
            Metric::TcpDown => "3. TCP bulk, wan → container (iperf3 -R)",
            Metric::Conn1 => "4. TCP connections, port forward, 1 mapping",
            Metric::Conn10k => "4. TCP connections, port forward, 10,000 mappings",
            Metric::Udp6Out => "8. IPv6 UDP 64 B delivered, container → wan (NAT66; iperf3)",
            Metric::Tcp6Up => "8. IPv6 TCP bulk, container → wan (NAT66; iperf3)",
            Metric::Tcp6Down => "8. IPv6 TCP bulk, wan → container (NAT66; iperf3 -R)",
            Metric::Conn6 => "8. IPv6 TCP connections, port forward [::]:8083, 1 mapping",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::LatOutP50
            | Metric::LatOutP99
            | Metric::LatInP50
            | Metric::LatInP99
            | Metric::TcpRrOutP50
            | Metric::TcpRrOutP99
            | Metric::TcpRrInP50
            | Metric::TcpRrInP99 => "µs",
            Metric::UdpOut | Metric::UdpIn | Metric::UdpC2c | Metric::Udp6Out => "msg/s",
            Metric::TcpUp | Metric::TcpDown | Metric::Tcp6Up | Metric::Tcp6Down => "Gbit/s",
            Metric::Conn1 | Metric::Conn10k | Metric::Conn6 => "conn/s",
        }
    }

    /// The issue-12 goal for this figure, as variant / no NAT: (at least, bound) for
    /// rates, (at most, bound) for latencies.
    pub fn goal(self) -> Option<(bool, f64)> {
        match self {
            Metric::UdpOut | Metric::UdpIn | Metric::UdpC2c => Some((true, 1.25)),
            Metric::LatOutP50 | Metric::LatInP50 | Metric::TcpRrOutP50 | Metric::TcpRrInP50 => {
                Some((false, 0.95))
            }
            Metric::TcpUp | Metric::TcpDown => Some((true, 1.00)),
            Metric::Conn1 | Metric::Conn10k => Some((true, 1.15)),
            _ => None,
        }
    }

    fn fmt(self, v: f64) -> String {
        match self.unit() {
            "µs" => format!("{v:.1}"),
            "Gbit/s" => format!("{v:.2}"),
            _ => thousands(v.round() as u64),
        }
    }
}

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Default)]
pub struct Results {
    pub vals: BTreeMap<(Metric, Kind), Vec<f64>>,
    /// Cells that could not be measured, with the reason.
    pub na: BTreeMap<(Metric, Kind), String>,
    /// Workload 5 rows: method, median seconds, how measured.
    pub install: Vec<(String, Option<f64>, String)>,
    /// Workload 6 rows: what, samples (seconds), note.
    pub starts: Vec<(String, Vec<f64>, String)>,
    /// Workload 6: poststop with an empty and a full conntrack table.
    pub poststop: Option<PoststopGoal>,
    /// Workload 7: CNI ADD/DEL per container, one row per plugin and mapping count.
    pub cni: Vec<CniRow>,
    /// Extra observations (profiles, errors that did not stop the run).
    pub notes: Vec<String>,
}

/// Workload 7, one bed: samples in seconds of the measured containers (the warm-up
/// container's ADD and DEL apart).
#[derive(Debug, Clone, Default)]
pub struct CniRow {
    pub label: String,
    /// netns's plugin (else the reference chain): the numerator of the ratio rows.
    pub netns: bool,
    pub mappings: usize,
    pub add: Vec<f64>,
    pub del: Vec<f64>,
    pub first_add: Option<f64>,
    pub last_del: Option<f64>,
    /// Chains only: per plugin type, its ADD and DEL samples.
    pub plugins: Vec<(String, Vec<f64>, Vec<f64>)>,
    /// Why the bed stopped early.
    pub err: Option<String>,
    pub note: String,
}

impl CniRow {
    /// ADD + DEL per container (containers whose both calls were measured).
    pub fn sum(&self) -> Vec<f64> {
        self.add.iter().zip(&self.del).map(|(a, d)| a + d).collect()
    }

    /// How ADD grows with the containers already there: the median of the last
    /// quarter of the ADDs over that of the first quarter.
    pub fn add_growth(&self) -> Option<f64> {
        let q = self.add.len() / 4;
        if q == 0 {
            return None;
        }
        let (a, b) = (
            median(&self.add[..q])?,
            median(&self.add[self.add.len() - q..])?,
        );
        (a > 0.0).then(|| b / a)
    }

    /// p50, p90 of ADD, DEL, ADD+DEL.
    fn stats(&self) -> [Option<f64>; 6] {
        let s = self.sum();
        [
            median(&self.add),
            percentile(&self.add, 90.0),
            median(&self.del),
            percentile(&self.del, 90.0),
            median(&s),
            percentile(&s, 90.0),
        ]
    }
}

/// The poststop medians (seconds) with 0 and `entries` conntrack entries.
#[derive(Debug, Clone, Copy)]
pub struct PoststopGoal {
    pub empty_p50: f64,
    pub full_p50: f64,
    pub entries: usize,
    pub ratio: f64,
}

impl PoststopGoal {
    pub fn line(&self) -> String {
        let goal = super::POSTSTOP_GOAL;
        format!(
            "6. netns poststop: p50 {} with 0 conntrack entries, {} with {}: {:.2}x, goal <= {goal}x: {}.",
            fmt_secs(self.empty_p50),
            fmt_secs(self.full_p50),
            thousands(self.entries as u64),
            self.ratio,
            if self.ratio <= goal { "PASS" } else { "FAIL" }
        )
    }
}

impl Results {
    pub fn push(&mut self, m: Metric, k: Kind, v: f64) {
        self.vals.entry((m, k)).or_default().push(v);
    }

    pub fn na(&mut self, m: Metric, k: Kind, why: &str) {
        self.na.entry((m, k)).or_insert_with(|| why.to_owned());
    }

    pub fn med(&self, m: Metric, k: Kind) -> Option<f64> {
        self.vals.get(&(m, k)).and_then(|v| median(v))
    }

    fn cell(&self, m: Metric, k: Kind) -> String {
        match self.vals.get(&(m, k)) {
            Some(v) if !v.is_empty() => {
                let med = median(v).unwrap_or(0.0);
                let (lo, hi) = (
                    percentile(v, 0.0).unwrap_or(0.0),
                    percentile(v, 100.0).unwrap_or(0.0),
                );
                if v.len() > 1 && med > 0.0 {
                    let spread = (hi - lo) / 2.0 / med * 100.0;
                    if spread > 100.0 {
                        format!("{} (max {})", m.fmt(med), m.fmt(hi))
                    } else {
                        format!("{} ±{spread:.0}%", m.fmt(med))
                    }
                } else {
                    m.fmt(med)
                }
            }
            _ => match self.na.get(&(m, k)) {
                Some(why) => format!("n/a ({why})"),
                None => "–".to_owned(),
            },
        }
    }

    /// variant / no NAT: the median of per-round ratios when both have every round
    /// (the rounds are interleaved, so this cancels drift), else the ratio of medians.
    pub fn ratio_val(&self, m: Metric, k: Kind) -> Option<f64> {
        self.ratio_to(m, k, Kind::NoNat)
    }

    /// variant / `base` (median of per-round ratios, as `ratio_val`).
    pub fn ratio_to(&self, m: Metric, k: Kind, base: Kind) -> Option<f64> {
        let (v, base) = (self.vals.get(&(m, k))?, self.vals.get(&(m, base))?);
        if v.len() == base.len() && !v.is_empty() && base.iter().all(|b| *b > 0.0) {
            return median(&v.iter().zip(base).map(|(a, b)| a / b).collect::<Vec<_>>());
        }
        match (median(v), median(base)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    fn ratio(&self, m: Metric, k: Kind, base: Kind) -> String {
        self.ratio_to(m, k, base)
            .map_or("–".to_owned(), |r| format!("{r:.2}"))
    }

    /// The results section (tables and automatic observations), Markdown.
    pub fn markdown(&self, rounds: usize) -> String {
        let mut s = String::new();
        // Sections of workloads that did not run (`--only`) are left out.
        let datapath = !self.vals.is_empty() || !self.na.is_empty();
        if datapath {
            let _ = writeln!(
                s,
                "### Datapath (workloads 1–4): median of {rounds} interleaved rounds, ± half the min–max spread\n"
            );
            let mut head = vec!["workload".to_owned(), "unit".to_owned()];
            head.extend(Kind::ALL.iter().map(|k| k.label().to_owned()));
            let mut rows = vec![head];
            for m in Metric::ALL {
                let mut r = vec![m.label().to_owned(), m.unit().to_owned()];
                r.extend(Kind::ALL.iter().map(|k| self.cell(m, *k)));
                rows.push(r);
            }
            let mut flat = vec!["4. 10,000 / 1 mapping".to_owned(), "ratio".to_owned()];
            for k in Kind::ALL {
                flat.push(
                    match (self.med(Metric::Conn10k, k), self.med(Metric::Conn1, k)) {
                        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                        _ => "–".to_owned(),
                    },
                );
            }
            rows.push(flat);
            s.push_str(&table(&rows));

            let _ = writeln!(
                s,
                "\n### Ratios: median of the per-round ratios to no NAT and to the floor\n"
            );
            let others = [Kind::Iptables, Kind::Ebpf, Kind::EbpfFast];
            let mut head = vec!["workload".to_owned()];
            for k in others.iter().chain([&Kind::Floor]) {
                head.push(format!("{} / no NAT", k.label()));
            }
            for k in [&Kind::NoNat].into_iter().chain(others.iter()) {
                head.push(format!("{} / floor", k.label()));
            }
            let mut rows = vec![head];
            for m in Metric::ALL {
                let mut r = vec![m.label().to_owned()];
                for k in others.iter().chain([&Kind::Floor]) {
                    r.push(self.ratio(m, *k, Kind::NoNat));
                }
                for k in [&Kind::NoNat].into_iter().chain(others.iter()) {
                    r.push(self.ratio(m, *k, Kind::Floor));
                }
                rows.push(r);
            }
            s.push_str(&table(&rows));
            s.push_str(
            "\nRatios are variant / no NAT (or / floor), the median of the per-round ratios (each round measures the five \
             back to back): above 1 is slower for latency, below 1 is slower for rates. \
             Latency is sockperf's (half the round trip). \"Delivered\" counts datagrams that reached the \
             receiving socket (UdpInDatagrams of the receiver's namespace) per second of sending. In the \
             no-NAT topology there is no port forward: wan talks to the container's address directly, \
             and its 10,000-mapping row is the same setup measured again in the later phase (a drift check).\n",
        );
        }

        if !self.install.is_empty() {
            let _ = writeln!(s, "\n### Installing 10,000 port mappings (workload 5)\n");
            let mut rows = vec![vec![
                "method".to_owned(),
                "time".to_owned(),
                "how".to_owned(),
            ]];
            for (what, secs, how) in &self.install {
                rows.push(vec![
                    what.clone(),
                    secs.map_or("n/a".to_owned(), fmt_secs),
                    how.clone(),
                ]);
            }
            s.push_str(&table(&rows));
        }

        if !self.starts.is_empty() {
            let _ = writeln!(s, "\n### Container network start cost (workload 6)\n");
            let mut rows = vec![vec![
                "step".to_owned(),
                "p50".to_owned(),
                "p90".to_owned(),
                "n".to_owned(),
                "note".to_owned(),
            ]];
            for (what, v, note) in &self.starts {
                rows.push(vec![
                    what.clone(),
                    median(v).map_or("n/a".to_owned(), fmt_secs),
                    percentile(v, 90.0).map_or("n/a".to_owned(), fmt_secs),
                    v.len().to_string(),
                    note.clone(),
                ]);
            }
            s.push_str(&table(&rows));
        }

        if !self.cni.is_empty() {
            s.push_str(&self.cni_markdown());
        }

        if datapath || self.poststop.is_some() || !self.notes.is_empty() {
            let _ = writeln!(
                s,
                "\n### Against the goals (computed from the numbers above)\n"
            );
        }
        for k in [Kind::Ebpf, Kind::EbpfFast]
            .into_iter()
            .filter(|_| datapath)
        {
            for m in Metric::ALL {
                let Some((at_least, bound)) = m.goal() else {
                    continue;
                };
                let (cmp, line) = match self.ratio_val(m, k) {
                    Some(r) => {
                        let met = if at_least { r >= bound } else { r <= bound };
                        let floor = self
                            .ratio_to(m, k, Kind::Floor)
                            .map_or(String::new(), |f| format!("; {f:.2} of the floor"));
                        (
                            if met { "PASS" } else { "FAIL" },
                            format!("{r:.2}x no NAT{floor}"),
                        )
                    }
                    None => ("not measured", String::new()),
                };
                let _ = writeln!(
                    s,
                    "- issue 12, {}: {} {} ({}{} {bound:.2}x no NAT): {cmp}.",
                    m.label(),
                    k.label(),
                    line,
                    if line.is_empty() { "" } else { "goal " },
                    if at_least { ">=" } else { "<=" },
                );
            }
        }
        for k in [Kind::Iptables, Kind::Ebpf] {
            if let (Some(a), Some(b)) = (self.med(Metric::Conn10k, k), self.med(Metric::Conn1, k)) {
                let _ = writeln!(
                    s,
                    "- 4. {}: 10,000 mappings give {:.0}% of the 1-mapping connection rate{}.",
                    k.label(),
                    a / b * 100.0,
                    if k == Kind::Ebpf {
                        if a / b >= 0.95 {
                            " (flat: goal met)"
                        } else {
                            " (not flat: goal missed)"
                        }
                    } else {
                        ""
                    }
                );
            }
        }
        if let Some(p) = &self.poststop {
            let _ = writeln!(s, "- {}", p.line());
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}

impl Results {
    /// Workload 7's table: one row per bed, then netns / reference per mapping count.
    fn cni_markdown(&self) -> String {
        let mut s = String::new();
        let n = self.cni.iter().map(|r| r.add.len()).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "\n### CNI plugin ADD / DEL per container (workload 7)\n\n\
             Each plugin exec'd as libcni 1.2 does (env `CNI_*`, config on stdin, `prevResult` \
             threaded through the chain on ADD, the cached result given to every plugin on DEL, \
             DEL in reverse order, `runtimeConfig.portMappings` injected into the entries that \
             declare the capability), in a private host namespace per row, into fresh \
             `ip netns add` namespaces. {n} containers per row added one after the other and \
             kept (the tables grow), then deleted oldest first; the rows take turns at every \
             step. A warm-up container before them (its ADD makes the bridge, the datapath or \
             the iptables chains; its first and last port forwards are checked from wan) is \
             left out of the percentiles and deleted last. Host ports 20000 up, container ports 80 up, tcp. \
             ADD growth: median ADD of the last quarter of the containers over that of the first \
             quarter (above 1: ADD gets dearer as containers accumulate).\n"
        );
        let mut rows = vec![
            [
                "plugin",
                "mappings",
                "ADD p50",
                "ADD p90",
                "DEL p50",
                "DEL p90",
                "ADD+DEL p50",
                "ADD+DEL p90",
                "n",
                "first ADD",
                "last DEL",
                "ADD growth",
                "note",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        let f = |v: Option<f64>| v.map_or("n/a".to_owned(), fmt_secs);
        for r in &self.cni {
            let mut row = vec![r.label.clone(), r.mappings.to_string()];
            row.extend(r.stats().into_iter().map(f));
            row.push(r.sum().len().to_string());
            row.push(f(r.first_add));
            row.push(f(r.last_del));
            row.push(r.add_growth().map_or("–".to_owned(), |g| format!("{g:.2}")));
            let mut note: Vec<String> =
                [r.note.clone()]
                    .into_iter()
                    .filter(|n| !n.is_empty())
                    .chain(r.plugins.iter().map(|(p, a, d)| {
                        format!("{p} ADD {} / DEL {}", f(median(a)), f(median(d)))
                    }))
                    .collect();
            if let Some(e) = &r.err {
                note.push(format!("stopped: {e}"));
            }
            row.push(note.join("; "));
            rows.push(row);
        }
        let mut m: Vec<usize> = self.cni.iter().map(|r| r.mappings).collect();
        m.dedup();
        for mappings in m {
            let pick = |netns: bool| {
                self.cni
                    .iter()
                    .find(|r| r.mappings == mappings && r.netns == netns)
            };
            let (Some(a), Some(b)) = (pick(true), pick(false)) else {
                continue;
            };
            let mut row = vec!["netns / reference (ratio)".to_owned(), mappings.to_string()];
            for (x, y) in a.stats().into_iter().zip(b.stats()) {
                row.push(match (x, y) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                    _ => "–".to_owned(),
                });
            }
            row.push(String::new());
            for (x, y) in [(a.first_add, b.first_add), (a.last_del, b.last_del)] {
                row.push(match (x, y) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                    _ => "–".to_owned(),
                });
            }
            row.push(String::new());
            row.push("below 1: netns is cheaper".to_owned());
            rows.push(row);
        }
        s.push_str(&table(&rows));
        s
    }
}

pub fn fmt_secs(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.2} s")
    } else {
        format!("{:.1} ms", v * 1000.0)
    }
}

/// A Markdown table with padded columns (readable on a terminal too).
pub fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..n).map(width).collect();
    let mut s = String::new();
    for (ri, r) in rows.iter().enumerate() {
        s.push('|');
        for (i, wi) in w.iter().enumerate() {
            let c = r.get(i).map_or("", String::as_str);
            let pad = wi - c.chars().count();
            // Numbers right-aligned, text left-aligned.
            if ri > 0 && i > 0 && c.chars().next().is_some_and(|ch| ch.is_ascii_digit()) {
                let _ = write!(s, " {}{c} |", " ".repeat(pad));
            } else {
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
        }
        s.push('\n');
        if ri == 0 {
            s.push('|');
            for wi in &w {
                let _ = write!(s, "{}|", "-".repeat(wi + 2));
            }
            s.push('\n');
        }
    }
    s
}
