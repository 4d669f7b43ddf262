//! The local lab: pods on 127.0.0.N, a real HAProxy ingress, clients (stub: helper fills in).

pub mod kubelet;

use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// Scenario name: seed, rolling, deadline.
    pub scenario: String,
}

pub async fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("lab not built yet: {args:?}")
}
