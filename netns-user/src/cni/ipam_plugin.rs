//! Delegation to an IPAM plugin (the configuration's `ipam.type`), as the CNI
//! conventions say: the same environment with the command set, the same network
//! configuration on stdin, the plugin found in `CNI_PATH`. The child is waited for:
//! nothing outlives the call or holds the runtime's pipes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::error::{CniError, code};

/// Runs `plugin` for `command`; its result (ADD) or `Value::Null` (output-less commands).
pub fn exec(
    plugin: &str,
    command: &str,
    cni_path: &[PathBuf],
    stdin: &[u8],
) -> Result<Value, CniError> {
    let bin = cni_path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {plugin:?} not found in CNI_PATH"),
            )
            .with_details(
                cni_path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            )
        })?;
    let fail = |what: &str, e: std::io::Error| {
        CniError::new(code::IPAM_PLUGIN, format!("IPAM plugin {plugin}: {what}"))
            .with_details(e.to_string())
    };
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail("starting it", e))?;
    let mut input = child.stdin.take().expect("piped");
    let written = input.write_all(stdin);
    drop(input);
    let out = child
        .wait_with_output()
        .map_err(|e| fail("waiting for it", e))?;
    written.map_err(|e| fail("writing its stdin", e))?;
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        let (c, msg) = parsed
            .as_ref()
            .map(|v| {
                (
                    v["code"].as_u64().unwrap_or(0),
                    v["msg"].as_str().unwrap_or("").to_owned(),
                )
            })
            .unwrap_or((0, String::from_utf8_lossy(&out.stdout).trim().to_owned()));
        return Err(CniError::new(
            code::IPAM_PLUGIN,
            format!(
                "IPAM plugin {plugin} {command} failed ({}): {msg}",
                out.status
            ),
        )
        .with_details(format!("its error code {c}")));
    }
    Ok(parsed.unwrap_or(Value::Null))
}
