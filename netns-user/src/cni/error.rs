//! CNI errors: the spec's codes, and netns's own from 100 up. Printed as the spec's
//! error JSON on stdout (`cniVersion`, `code`, `msg`, `details`), exit status 1.

use serde::Serialize;

/// The well-known codes of the CNI spec (1.1.0, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, existing attachments may have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// netns: setting up or tearing down failed (rolled back; see `details`).
    pub const SETUP: u32 = 100;
    /// netns: the interface already exists in the container.
    pub const IF_EXISTS: u32 = 101;
    /// netns: no address (pool exhausted, or the IPAM plugin's address does not fit).
    pub const ADDRESS: u32 = 102;
    /// netns: a port mapping was refused (taken, duplicate, host port in use).
    pub const PORT_MAPPING: u32 = 103;
    /// netns: CHECK found the attachment not as ADD left it.
    pub const CHECK: u32 = 104;
    /// netns: missing privileges (capabilities) for the datapath.
    pub const PRIVILEGE: u32 = 105;
    /// netns: the delegated IPAM plugin failed (its own code and message in `msg`).
    pub const IPAM_PLUGIN: u32 = 106;
}

/// One CNI error as the spec prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error JSON for `version` (the config's, or the newest when unknown).
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain struct");
        v["cniVersion"] = version.into();
        v
    }
}

/// A domain error as a CNI error: `msg` says what failed, `details` the cause chain.
pub fn from_error(code: u32, msg: &str, e: &dyn std::error::Error) -> CniError {
    CniError::new(code, msg).with_details(crate::error_chain(e))
}
