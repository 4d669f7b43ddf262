//! The drain marker: a small file in `--state-dir` (an emptyDir in Kubernetes, which
//! outlives a container restart but not the pod) written when a drain starts, so that an
//! agent restarted mid-drain (OOM kill, crash, liveness failure) resumes the drain with
//! its original deadline instead of serving again with a fresh budget.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::drain::Trigger;

/// File name inside the state directory.
pub const FILE: &str = "drain.json";
/// A marker is a few dozen bytes; anything much larger is not ours.
const MAX_LEN: u64 = 4096;

/// What a restarted agent needs to resume: what started the drain, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub trigger: Trigger,
    /// Wall-clock trigger time, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
}

#[derive(Debug, Error)]
pub enum MarkerError {
    #[error("drain marker {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drain marker {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Marker {
    pub fn new(trigger: Trigger, started: SystemTime) -> Marker {
        let ms = started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Marker {
            trigger,
            started_unix_ms: ms.min(u128::from(u64::MAX)) as u64,
        }
    }

    pub fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_unix_ms)
    }

    /// Parses a marker's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Marker, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The marker in `dir`, if a drain started there before.
pub fn read(dir: &Path) -> Result<Option<Marker>, MarkerError> {
    let path = path(dir);
    let io = |source| MarkerError::Io {
        path: path.clone(),
        source,
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if meta.len() > MAX_LEN {
        return Err(MarkerError::Invalid {
            path,
            reason: format!("{} bytes, more than {MAX_LEN}", meta.len()),
        });
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    Marker::parse(&bytes)
        .map(Some)
        .map_err(|reason| MarkerError::Invalid { path, reason })
}

/// Writes the marker atomically (a temporary file renamed over it), so a kill while
/// writing leaves either the old marker or the new one.
pub fn write(dir: &Path, marker: &Marker) -> Result<(), MarkerError> {
    let path = path(dir);
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let io = |source| MarkerError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec(marker).map_err(|e| MarkerError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let started = UNIX_EPOCH + Duration::from_millis(1_764_550_000_123);
        let m = Marker::new(Trigger::Prestop, started);
        write(dir.path(), &m).unwrap();
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(back.started(), started);
    }

    #[test]
    fn garbage_and_huge_markers_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{\"trigger\":\"nope\"}").unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains(FILE), "{e}");
        std::fs::write(path(dir.path()), vec![b' '; 10_000]).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("bytes"));
    }
}
