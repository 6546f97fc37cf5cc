//! The OCI runtime state a hook receives on stdin.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Container ids become file names in the state directory, so they are bounded and
/// must not be able to escape it.
pub const MAX_ID_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("reading the container state from stdin")]
    Read(#[source] std::io::Error),
    #[error("the container state on stdin is empty (a hook gets the OCI state JSON on stdin)")]
    Empty,
    #[error("the container state JSON is truncated (line {line}, column {column})")]
    Truncated { line: usize, column: usize },
    #[error("malformed container state JSON")]
    Malformed(#[source] serde_json::Error),
    #[error("container state has no \"pid\" (needed to find the container's network namespace)")]
    MissingPid,
    #[error("container state has pid {0}: a pid must be positive")]
    BadPid(i64),
    #[error("container pid {0} does not exist (/proc/{0} is missing)")]
    NoSuchPid(i64),
    #[error("invalid container id {id:?}: {why}")]
    BadId { id: String, why: &'static str },
    #[error("unsupported container status {0:?} (expected creating, created or stopped)")]
    UnsupportedStatus(String),
}

/// OCI runtime-spec `State`. Unknown fields are ignored (runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub oci_version: String,
    pub id: String,
    pub status: String,
    /// Signed so that a negative pid gets a clear error rather than a parse error.
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// What the hook is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `creating` (runc 1.0+ runs prestart/createRuntime while creating) or `created`.
    Prestart,
    /// `stopped`: poststop.
    Poststop,
}

impl State {
    /// Parses and validates the fields every phase needs (id, status).
    pub fn parse(input: &[u8]) -> Result<State, OciError> {
        if input.iter().all(u8::is_ascii_whitespace) {
            return Err(OciError::Empty);
        }
        let st: State = serde_json::from_slice(input).map_err(|e| {
            if e.is_eof() {
                OciError::Truncated {
                    line: e.line(),
                    column: e.column(),
                }
            } else {
                OciError::Malformed(e)
            }
        })?;
        validate_id(&st.id)?;
        st.phase()?;
        Ok(st)
    }

    pub fn from_reader(mut r: impl Read) -> Result<State, OciError> {
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).map_err(OciError::Read)?;
        State::parse(&buf)
    }

    pub fn phase(&self) -> Result<Phase, OciError> {
        match self.status.as_str() {
            "creating" | "created" => Ok(Phase::Prestart),
            "stopped" => Ok(Phase::Poststop),
            other => Err(OciError::UnsupportedStatus(other.to_owned())),
        }
    }

    /// The pid, required to be positive and alive (prestart only: at poststop it is
    /// usually gone).
    pub fn live_pid(&self) -> Result<u32, OciError> {
        self.live_pid_in(Path::new("/proc"))
    }

    fn live_pid_in(&self, proc: &Path) -> Result<u32, OciError> {
        let pid = self.pid.ok_or(OciError::MissingPid)?;
        // pid 0 is what runtimes write once the process is gone.
        let p = u32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(OciError::BadPid(pid))?;
        if !proc.join(p.to_string()).exists() {
            return Err(OciError::NoSuchPid(pid));
        }
        Ok(p)
    }
}

/// Non-empty, at most [`MAX_ID_LEN`] bytes, not `.`/`..`, no `/`, no `..`, no control
/// characters.
pub fn validate_id(id: &str) -> Result<(), OciError> {
    let bad = |why| {
        Err(OciError::BadId {
            id: id.chars().take(80).collect(),
            why,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("longer than 1024 bytes");
    }
    if id == "." {
        return bad("\".\" is not a usable name");
    }
    if id.contains("..") {
        return bad("contains \"..\"");
    }
    if id.contains('/') {
        return bad("contains '/'");
    }
    if id.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNC: &str = r#"{"ociVersion":"1.0.2-dev","id":"test1","status":"creating","pid":4370,"bundle":"/path"}"#;

    #[test]
    fn parses_runc_and_crun_states() {
        let s = State::parse(RUNC.as_bytes()).unwrap();
        assert_eq!(s.id, "test1");
        assert_eq!(s.pid, Some(4370));
        assert_eq!(s.phase().unwrap(), Phase::Prestart);
        assert_eq!(s.bundle, PathBuf::from("/path"));
        // crun adds annotations and sends "created"; unknown fields are fine.
        let crun = r#"{"ociVersion":"1.0.0","id":"c","status":"created","pid":1,"bundle":"/b",
                       "annotations":{"a":"b"},"rootfs":"/r","created":"2020-01-01T00:00:00Z"}"#;
        let s = State::parse(crun.as_bytes()).unwrap();
        assert_eq!(s.annotations["a"], "b");
        assert_eq!(s.phase().unwrap(), Phase::Prestart);
        let stopped = r#"{"ociVersion":"1.0.2","id":"c","status":"stopped","bundle":"/b"}"#;
        let s = State::parse(stopped.as_bytes()).unwrap();
        assert_eq!(s.phase().unwrap(), Phase::Poststop);
        assert_eq!(s.pid, None);
    }

    #[test]
    fn malformed_and_truncated() {
        assert!(matches!(State::parse(b""), Err(OciError::Empty)));
        assert!(matches!(State::parse(b"  \n"), Err(OciError::Empty)));
        assert!(matches!(
            State::parse(&RUNC.as_bytes()[..30]),
            Err(OciError::Truncated { .. })
        ));
        assert!(matches!(
            State::parse(b"{\"id\": 5}"),
            Err(OciError::Malformed(_))
        ));
        assert!(matches!(
            State::parse(b"not json"),
            Err(OciError::Malformed(_))
        ));
        // Missing required fields are malformed too, and the message says which.
        let e = State::parse(br#"{"ociVersion":"1","status":"creating","pid":1}"#).unwrap_err();
        assert!(format!("{:?}", e).contains("id"), "{e:?}");
    }

    #[test]
    fn status() {
        let e =
            State::parse(br#"{"ociVersion":"1","id":"x","status":"running","pid":1}"#).unwrap_err();
        assert!(matches!(e, OciError::UnsupportedStatus(ref s) if s == "running"));
        assert!(e.to_string().contains("running"));
    }

    #[test]
    fn pids() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("42")).unwrap();
        let st = |pid: &str| {
            State::parse(
                format!(r#"{{"ociVersion":"1","id":"x","status":"creating"{pid}}}"#).as_bytes(),
            )
            .unwrap()
        };
        assert!(matches!(
            st("").live_pid_in(dir.path()),
            Err(OciError::MissingPid)
        ));
        assert!(matches!(
            st(r#","pid":null"#).live_pid_in(dir.path()),
            Err(OciError::MissingPid)
        ));
        assert!(matches!(
            st(r#","pid":0"#).live_pid_in(dir.path()),
            Err(OciError::BadPid(0))
        ));
        assert!(matches!(
            st(r#","pid":-3"#).live_pid_in(dir.path()),
            Err(OciError::BadPid(-3))
        ));
        assert!(matches!(
            st(r#","pid":99999999999"#).live_pid_in(dir.path()),
            Err(OciError::BadPid(_))
        ));
        assert!(matches!(
            st(r#","pid":43"#).live_pid_in(dir.path()),
            Err(OciError::NoSuchPid(43))
        ));
        assert_eq!(st(r#","pid":42"#).live_pid_in(dir.path()).unwrap(), 42);
        // The real /proc: this process exists.
        let me = std::process::id();
        assert_eq!(st(&format!(r#","pid":{me}"#)).live_pid().unwrap(), me);
        // A non-integer pid is malformed JSON for our schema.
        assert!(matches!(
            State::parse(br#"{"ociVersion":"1","id":"x","status":"creating","pid":"1"}"#),
            Err(OciError::Malformed(_))
        ));
    }

    #[test]
    fn ids() {
        for ok in ["a", "my-container_1.2", "x.y", &"a".repeat(MAX_ID_LEN)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "a..b",
            "a\nb",
            "a\0b",
            "\u{7f}",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(
                matches!(validate_id(bad), Err(OciError::BadId { .. })),
                "{bad:?}"
            );
        }
        let e = State::parse(br#"{"ociVersion":"1","id":"../etc","status":"creating","pid":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("invalid container id"), "{e}");
    }
}
