//! netns: an OCI runtime hook giving runc containers a bridge network with eBPF NAT.

pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod datapath;
pub mod hook;
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
