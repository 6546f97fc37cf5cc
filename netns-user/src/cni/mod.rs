//! The CNI plugin: the same binary, when `CNI_COMMAND` is set, speaks CNI 1.1.0 (and
//! the versions runtimes still ask for, [`conf::SUPPORTED_VERSIONS`]). An attachment
//! is made exactly as the hook makes a container's network ([`crate::container`]):
//! bridge, veth (host end `netnsv0-c<hash>`, container end `CNI_IFNAME` in
//! `CNI_NETNS`), address, default route, datapath entries, port forwards from
//! `runtimeConfig.portMappings`. Its lease is keyed `<CNI_CONTAINERID>:<CNI_IFNAME>`
//! and records the attachment, so DEL, CHECK and GC work from the state directory
//! alone (DEL also after the namespace is gone).
//!
//! Output: the result (ADD), VERSION's answer, or nothing on stdout; errors as the
//! spec's error JSON on stdout with exit status 1. Logs go to stderr. The plugin
//! starts no process but a delegated IPAM plugin, which it waits for.

mod add;
mod check;
pub mod conf;
mod del;
pub mod error;
mod gc;
mod ipam_plugin;
pub mod result;
mod status;

use std::path::PathBuf;

use serde_json::Value;

pub use error::{CniError, code};

use crate::container::Request;

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the process environment (empty values count as absent, as in libcni).
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            path: var("CNI_PATH")
                .map(|p| {
                    p.split(':')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is required for this command"),
            )
        })
    }

    /// CNI_CONTAINERID: non-empty, alphanumerics and `_.-`, starting alphanumeric.
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = Self::required(&self.container_id, "CNI_CONTAINERID")?;
        let ok = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {id:?} may hold only letters, digits, '_', '.' and '-', starting with a letter or digit"
                ),
            ));
        }
        Ok(id)
    }

    /// CNI_IFNAME, checked as an interface name.
    pub fn ifname(&self) -> Result<&str, CniError> {
        let n = Self::required(&self.ifname, "CNI_IFNAME")?;
        crate::cli::parse_ifname(n)
            .map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {n:?}: {e}")))?;
        Ok(n)
    }

    pub fn netns(&self) -> Result<&str, CniError> {
        Self::required(&self.netns, "CNI_NETNS")
    }

    /// The lease key of this attachment.
    pub fn key(&self) -> Result<String, CniError> {
        Ok(format!("{}:{}", self.container_id()?, self.ifname()?))
    }
}

/// What one call prints on stdout on success.
pub enum Output {
    Json(Value),
    Nothing,
}

/// Runs one call; the error carries the version to print it in.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Output, (String, CniError)> {
    let version_of = |stdin: &[u8]| -> String {
        serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .filter(|v| conf::SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| conf::NEWEST.to_owned())
    };
    if env.command == "VERSION" {
        return Ok(Output::Json(serde_json::json!({
            "cniVersion": version_of(stdin),
            "supportedVersions": conf::SUPPORTED_VERSIONS,
        })));
    }
    let with_version = |e: CniError| (version_of(stdin), e);
    let known = ["ADD", "DEL", "CHECK", "STATUS", "GC"];
    if !known.contains(&env.command.as_str()) {
        return Err(with_version(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_COMMAND {:?} is not a CNI command (ADD, DEL, CHECK, STATUS, GC, VERSION)",
                env.command
            ),
        )));
    }
    let c = conf::parse(stdin).map_err(with_version)?;
    let needs = |min: &str| {
        if conf::version_at_least(&c.cni_version, min) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{} needs CNI version {min} or later; the configuration says {}",
                    env.command, c.cni_version
                ),
            ))
        }
    };
    let version = c.cni_version.clone();
    let r = (|| match env.command.as_str() {
        "ADD" => add::run(env, &c, stdin).map(Output::Json),
        "DEL" => del::run(env, &c, stdin).map(|()| Output::Nothing),
        "CHECK" => {
            needs("0.4.0")?;
            check::run(env, &c, stdin).map(|()| Output::Nothing)
        }
        "STATUS" => {
            needs("1.1.0")?;
            status::run(&c).map(|()| Output::Nothing)
        }
        _ => {
            needs("1.1.0")?;
            gc::run(env, &c, stdin).map(|()| Output::Nothing)
        }
    })();
    r.map_err(|e| (version, e))
}

/// The privileges ADD, DEL, CHECK and GC need, as a CNI error.
fn require_caps(what: &str) -> Result<(), CniError> {
    crate::caps::require(what, crate::caps::Need::DATAPATH)
        .map_err(|e| error::from_error(code::PRIVILEGE, what, &e))
}

/// A tokio runtime for netlink, as a CNI error.
fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    crate::network::runtime().map_err(|e| error::from_error(code::SETUP, "netlink runtime", &e))
}

/// The container-service request for an attachment.
fn request<'a>(
    key: &'a str,
    ifname: &'a str,
    ns: &'a std::fs::File,
    netns_ino: u64,
) -> Request<'a> {
    Request {
        netns_ino: Some(netns_ino),
        ifname,
        ..Request::hook(key, 0, ns)
    }
}
