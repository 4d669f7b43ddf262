//! The child side of `wsdrain wrap`: spawn, reap, signal, and leave no process behind.
//! Reaping is `waitpid(-1)` driven by SIGCHLD, so nothing else in this process may wait
//! for children of its own (no `tokio::process`, no `Command::output`).

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("{cmd}: command not found")]
    NotFound { cmd: String },
    #[error("{cmd}: cannot execute: {source}")]
    CannotExecute { cmd: String, source: io::Error },
}

impl SpawnError {
    /// The exit code a POSIX shell uses for the same failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpawnError::NotFound { .. } => 127,
            SpawnError::CannotExecute { .. } => 126,
        }
    }
}

/// Starts CMD with the inherited stdio and environment. std resets handled signals and
/// the signal mask in the child, so the app starts with default dispositions.
pub fn spawn(command: &[String]) -> Result<Pid, SpawnError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| SpawnError::NotFound { cmd: String::new() })?;
    match Command::new(program).args(args).spawn() {
        // The std handle is dropped on purpose: its status is collected by `reap`.
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SpawnError::NotFound {
            cmd: program.clone(),
        }),
        Err(source) => Err(SpawnError::CannotExecute {
            cmd: program.clone(),
            source,
        }),
    }
}

/// Collects every exited child (the app and orphans re-parented to us) without blocking.
/// Returns the app's status once it is among them.
pub fn reap(app: Option<Pid>) -> Option<WaitStatus> {
    let mut app_status = None;
    // Bounded: each round reaps one process; far more than a container ever holds.
    for _ in 0..100_000 {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) if app.is_some() && status.pid() == app => app_status = Some(status),
            Ok(status) => tracing::debug!(pid = ?status.pid(), "reaped an orphaned process"),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                break;
            }
        }
    }
    app_status
}

/// Sends `sig` to `pid`, logging instead of failing: the process may just have exited.
pub fn send(pid: Pid, sig: Signal) {
    if let Err(e) = kill(pid, sig) {
        tracing::debug!(pid = pid.as_raw(), signal = %sig, error = %e, "signal not delivered");
    }
}

/// Exit code of a wrapper whose child ended with `status`, like a shell: the child's code,
/// or 128 + the signal that killed it.
pub fn exit_code(status: WaitStatus) -> u8 {
    match status {
        WaitStatus::Exited(_, code) => u8::try_from(code).unwrap_or(1),
        WaitStatus::Signaled(_, sig, _) => u8::try_from(128 + sig as i32).unwrap_or(255),
        // Not reported without WUNTRACED/WCONTINUED; treat as a generic failure.
        _ => 1,
    }
}

/// Processes whose parent is `parent`, read from /proc (zombies included).
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        (parse_stat_ppid(&stat)? == parent.as_raw()).then_some(Pid::from_raw(pid))
    })
    .collect()
}

/// The parent pid from a /proc/PID/stat line; the command name may contain spaces and ')'.
fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// After the app is gone: descendants it left behind were re-parented to us (PID 1 or
/// subreaper). They get SIGTERM, then SIGKILL at `deadline`, and are reaped, so nothing
/// outlives the wrapper. Returns how many were found.
pub fn stop_leftovers(deadline: Instant) -> usize {
    let me = nix::unistd::getpid();
    let mut seen = std::collections::HashSet::new();
    let mut killed = false;
    // Bounded in rounds and time: at most deadline + 2 s.
    let hard_end = deadline.max(Instant::now()) + Duration::from_secs(2);
    for _ in 0..10_000 {
        reap(None);
        let left = children_of(me);
        if left.is_empty() || Instant::now() >= hard_end {
            if !left.is_empty() {
                tracing::warn!(count = left.len(), "leftover processes did not go away");
            }
            break;
        }
        let past_deadline = Instant::now() >= deadline;
        for pid in left {
            if seen.insert(pid) {
                tracing::info!(
                    pid = pid.as_raw(),
                    "stopping a leftover process with SIGTERM"
                );
                send(pid, Signal::SIGTERM);
            }
            if past_deadline {
                send(pid, Signal::SIGKILL);
            }
        }
        if past_deadline && !killed {
            killed = true;
            tracing::warn!("leftover processes still running at the deadline: SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ppid_with_odd_names() {
        assert_eq!(parse_stat_ppid("42 (sh) S 7 42 42 0"), Some(7));
        assert_eq!(parse_stat_ppid("42 (a) b) (c) Z 1 0 0"), Some(1));
        assert_eq!(parse_stat_ppid("42 (x"), None);
        assert_eq!(parse_stat_ppid("42 (x) R nope"), None);
    }

    #[test]
    fn exit_codes_like_a_shell() {
        let p = Pid::from_raw(5);
        assert_eq!(exit_code(WaitStatus::Exited(p, 0)), 0);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), 3);
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            137
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGTERM, true)),
            143
        );
    }

    #[test]
    fn spawn_errors_map_to_shell_codes() {
        let missing = spawn(&["/nonexistent/wsdrain-test-cmd".into()]).unwrap_err();
        assert_eq!(missing.exit_code(), 127);
        assert!(missing.to_string().contains("command not found"));
        let dir = spawn(&["/".into()]).unwrap_err();
        assert_eq!(dir.exit_code(), 126);
    }
}
