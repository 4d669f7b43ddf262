//! `wsdrain prestop` (being written).

use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct PrestopArgs {}

pub async fn run(_args: PrestopArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("prestop not built yet")
}
