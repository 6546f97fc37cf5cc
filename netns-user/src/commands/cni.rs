//! The CNI verb: `CNI_COMMAND` in the environment makes the binary a CNI plugin
//! ([`crate::cni`]); the result or the error JSON goes to stdout.

use std::io::{Read as _, Write as _};

use crate::cni::{self, Env, Output};

/// True when a runtime calls us as a CNI plugin.
pub fn requested() -> bool {
    std::env::var_os("CNI_COMMAND").is_some_and(|v| !v.is_empty())
}

/// Runs one CNI call on the process's environment and stdin; returns the exit status.
pub fn run() -> u8 {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    // VERSION may come with nothing on stdin; a read error is a decode error below.
    let read = std::io::stdin().read_to_end(&mut stdin);
    let result = match read {
        Ok(_) => cni::run(&env, &stdin),
        Err(e) => Err((
            cni::conf::NEWEST.to_owned(),
            cni::CniError::new(cni::code::IO, "reading stdin").with_details(e.to_string()),
        )),
    };
    let mut out = std::io::stdout().lock();
    let (value, status) = match result {
        Ok(Output::Json(v)) => (Some(v), 0),
        Ok(Output::Nothing) => (None, 0),
        Err((version, e)) => {
            log::error!("CNI {}: {e}", env.command);
            (Some(e.to_json(&version)), 1)
        }
    };
    if let Some(v) = value {
        let written = serde_json::to_writer(&mut out, &v)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
            .and_then(|()| out.flush());
        if written.is_err() {
            return 1;
        }
    }
    status
}
