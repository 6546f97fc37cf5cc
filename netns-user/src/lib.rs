//! netns: an OCI runtime hook (and CNI plugin) giving containers a bridge network with
//! eBPF NAT.

pub mod apply;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod collector;
pub mod commands;
pub mod config;
pub mod container;
pub mod datapath;
pub mod hook;
pub mod host;
pub mod ipam;
pub mod network;
pub mod oci;
pub mod portmap;
pub mod reconcile;
pub mod reserve;
pub mod store;

/// An error and its sources joined by ": ", skipping a source whose text the message
/// before it already ends with (some errors repeat their source in their own Display).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let part = s.to_string();
        if !part.is_empty() && !out.ends_with(&part) {
            out.push_str(": ");
            out.push_str(&part);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    /// Layers point one way (docs/DATAPATH.md, "Architecture"): a module imports only
    /// modules of a lower rank, so there is no upward call and no cycle. Comments and
    /// test modules are not checked.
    #[test]
    fn layers_point_one_way() {
        const RANKS: &[(&str, u32)] = &[
            ("config", 0),
            ("caps", 0),
            ("cgroup", 0),
            ("oci", 0),
            ("store", 0),
            ("network", 1),
            ("ipam", 1),
            ("datapath", 2),
            ("reserve", 3),
            ("portmap", 4),
            ("apply", 5),
            ("host", 6),
            ("container", 7),
            ("reconcile", 8),
            ("collector", 9),
            ("hook", 10),
            ("cli", 11),
            ("cni", 12),
            ("commands", 13),
        ];
        let rank = |m: &str| RANKS.iter().find(|(n, _)| *n == m).map(|(_, r)| *r);
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut bad = Vec::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
                let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
                let Some(mine) = rank(module) else { continue };
                let text = std::fs::read_to_string(&p).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap();
                for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    for part in line.split("crate::").skip(1) {
                        let dep: String = part
                            .chars()
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        if let Some(theirs) = rank(&dep)
                            && dep != module
                            && theirs >= mine
                        {
                            bad.push(format!("{rel}: {module} imports {dep}"));
                        }
                    }
                }
            }
        }
        bad.sort();
        bad.dedup();
        assert!(
            bad.is_empty(),
            "upward or same-layer imports:\n{}",
            bad.join("\n")
        );
    }

    #[test]
    fn error_chain_dedups_repeated_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Mid);
        #[derive(Debug, thiserror::Error)]
        #[error("mid: {0}")]
        struct Mid(#[source] std::io::Error);
        let e = Outer(Mid(std::io::Error::from_raw_os_error(libc::ENOENT)));
        assert_eq!(
            super::error_chain(&e),
            "outer: mid: No such file or directory (os error 2)"
        );
    }
}
