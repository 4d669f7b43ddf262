//! Children of the lab: each in its own process group (so `sh -c` apps and their
//! children go together), tagged with the run id in the environment, SIGKILLed with
//! their group on Drop; and the run's temp dir, removed on Drop.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::LabError;

/// Environment variable carrying the run id into every child (tests scan for it).
pub const RUN_ENV: &str = "WSDRAIN_LAB_RUN";

pub struct Child {
    pub name: String,
    pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Child {
    /// Spawns `cmd` in a new process group; stdout and stderr go to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: tokio::process::Command,
        run_id: &str,
        log: &Path,
    ) -> Result<Child, LabError> {
        let out = std::fs::File::create(log).map_err(|e| LabError::io("create log", e))?;
        let err = out
            .try_clone()
            .map_err(|e| LabError::io("clone log handle", e))?;
        cmd.env(RUN_ENV, run_id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        Self::spawn_configured(name, cmd)
    }

    fn spawn_configured(name: &str, mut cmd: tokio::process::Command) -> Result<Child, LabError> {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::Spawn(name.to_owned(), e))?;
        Self::adopt(name, child)
    }

    /// Takes over a child spawned by the caller (who put it in its own process group).
    pub fn adopt(name: &str, mut child: tokio::process::Child) -> Result<Child, LabError> {
        let pid = child
            .id()
            .ok_or_else(|| LabError::Spawn(name.to_owned(), std::io::Error::other("no pid")))?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(status);
        });
        Ok(Child {
            name: name.to_owned(),
            // Pids fit in i32 on Linux (pid_max ≤ 2^22).
            pid: pid as i32,
            exit: rx,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to the child's whole process group; a gone group is not an error.
    pub fn signal(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.pid), sig);
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A receiver that turns `Some` when the child was reaped.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Waits up to `limit` for the child to exit.
    pub async fn wait(&self, limit: Duration) -> Option<ExitStatus> {
        let mut rx = self.exit.clone();
        let status = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
        match status {
            Ok(Ok(s)) => *s,
            _ => None,
        }
    }

    /// SIGKILLs the group and waits (bounded) for the reaping.
    pub async fn kill(&self) {
        self.signal(Signal::SIGKILL);
        let _ = self.wait(Duration::from_secs(2)).await;
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Also when the leader is gone: an `sh -c` app may have left children behind.
        self.signal(Signal::SIGKILL);
    }
}

/// The run's scratch directory (HAProxy config, admin socket, logs).
pub struct RunDir {
    pub path: PathBuf,
    keep: bool,
}

impl RunDir {
    pub fn create(run_id: &str, keep: bool) -> Result<RunDir, LabError> {
        let path = std::env::temp_dir().join(run_id);
        std::fs::create_dir_all(&path).map_err(|e| LabError::io("create run dir", e))?;
        Ok(RunDir { path, keep })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `wsdrain-lab-<pid>-<random>`: unique per run, found in children's env and HAProxy's
/// command line.
pub fn new_run_id() -> String {
    format!(
        "wsdrain-lab-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}
