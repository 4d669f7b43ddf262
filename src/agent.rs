//! `wsdrain agent` (being written).

use std::process::ExitCode;

use crate::config::AgentConfig;

pub async fn run(cfg: AgentConfig) -> anyhow::Result<ExitCode> {
    anyhow::bail!("agent not built yet: {:?}", cfg.listen)
}
