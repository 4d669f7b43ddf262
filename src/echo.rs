//! The reference WebSocket echo app with admin API v1 (stub: helper fills in).

use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Public WebSocket (and plain HTTP) address.
    #[arg(long, env = "ECHO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin API v1 address; must be a loopback address.
    #[arg(long, env = "ECHO_ADMIN", default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
}

pub async fn run(args: EchoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("echo app not built yet: {args:?}")
}
