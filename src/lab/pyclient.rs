//! The same load driven by `tests/clients/lab_client.py` (Python `websockets`), so what
//! arrives on the wire is judged by code no one in this project wrote. The script
//! prints `ready` once its clients are connected, and after stdin closes one JSON
//! `ConnRecord` per line.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStdin;

use super::LabError;
use super::client::{ClientOpts, ConnRecord};
use super::procs::{Child, RUN_ENV};

#[derive(Debug, Clone)]
pub struct PyConfig {
    pub python: PathBuf,
    pub script: PathBuf,
}

pub struct PyClients {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl PyClients {
    /// Starts `n` clients with ids from `first_id` and waits until they are connected.
    pub async fn start(
        cfg: &PyConfig,
        n: usize,
        first_id: usize,
        opts: &ClientOpts,
        epoch: Instant,
        run_id: &str,
    ) -> Result<PyClients, LabError> {
        let mut cmd = tokio::process::Command::new(&cfg.python);
        cmd.arg(&cfg.script)
            .args(["--url", &format!("ws://{}/", opts.front)])
            .args(["--clients", &n.to_string()])
            .args(["--first-id", &first_id.to_string()])
            .args(["--interval-ms", &opts.interval.as_millis().to_string()])
            .args(["--epoch-ms", &epoch.elapsed().as_millis().to_string()])
            .env(RUN_ENV, run_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Take the pipes before handing the command over: spawn here, then wrap.
        let mut child = cmd
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::Spawn("python client".into(), e))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LabError::Clients("python client has no stdout".into()))?;
        let child = Child::adopt("python client", child)?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(15), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "ready" {
                    return true;
                }
            }
            false
        })
        .await;
        if !matches!(ready, Ok(true)) {
            return Err(LabError::Clients(
                "python client did not report ready within 15s".into(),
            ));
        }
        Ok(PyClients {
            child,
            stdin,
            lines,
        })
    }

    /// Closes stdin (the stop signal) and reads the records.
    pub async fn stop(mut self) -> Result<Vec<ConnRecord>, LabError> {
        drop(self.stdin.take());
        let mut records = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Ok(r) = serde_json::from_str::<ConnRecord>(&line) {
                    records.push(r);
                }
            }
        })
        .await;
        self.child.kill().await;
        read.map_err(|_| LabError::Clients("python client did not finish in 10s".into()))?;
        Ok(records)
    }
}
