//! The mutating admission webhook over TLS (stub: helper fills in).

use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    #[arg(long, env = "WSDRAIN_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: std::net::SocketAddr,
}

pub async fn run(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("webhook not built yet: {args:?}")
}
