//! `wsdrain prestop`: the client for exec-style hooks. Calls the agent's /prestop, retries
//! while the agent is not up yet, and exits once the drain has ended.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;

use crate::api::TOKEN_HEADER;
use crate::http1::{self, Endpoint, read_limited};
use crate::units::parse_duration;

#[derive(Debug, Clone, clap::Args)]
pub struct PrestopArgs {
    /// The agent's API base URL.
    #[arg(
        long,
        env = "WSDRAIN_AGENT_URL",
        default_value = "http://127.0.0.1:19901"
    )]
    pub agent_url: hyper::Uri,

    /// Token for the X-Wsdrain-Token header.
    #[arg(long, env = "WSDRAIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// How long to retry while the agent is not reachable.
    #[arg(long, env = "WSDRAIN_PRESTOP_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub wait_agent: Duration,
}

const RETRY_EVERY: Duration = Duration::from_millis(200);
const MAX_ANSWER: usize = 64 * 1024;

pub async fn run(args: PrestopArgs) -> anyhow::Result<ExitCode> {
    let endpoint = Endpoint::parse(&args.agent_url)
        .map_err(|e| anyhow::anyhow!("--agent-url {}: {e}", args.agent_url))?;
    let give_up = Instant::now() + args.wait_agent;
    let mut attempts = 0u32;
    let stream = loop {
        attempts += 1;
        match endpoint.connect().await {
            Ok(s) => break s,
            Err(e) if Instant::now() + RETRY_EVERY < give_up => {
                if attempts == 1 {
                    tracing::info!(error = %e, "agent not reachable yet; retrying");
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(e) => bail!(
                "agent at {} not reachable after {:?} ({attempts} attempts): {e}",
                args.agent_url,
                args.wait_agent
            ),
        }
    };
    let (mut sender, _conn) = http1::handshake(stream)
        .await
        .context("HTTP handshake with the agent")?;
    let mut req = Request::post(endpoint.target("/prestop"))
        .header(hyper::header::HOST, endpoint.authority.as_str());
    if let Some(token) = &args.token {
        req = req.header(TOKEN_HEADER, token);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .context("building the /prestop request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("agent closed the connection during the drain")?;
    let status = resp.status();
    // A summary is a few hundred bytes; anything far larger is not our agent.
    let (body, _complete) = read_limited(resp.into_body(), MAX_ANSWER)
        .await
        .context("reading the agent's answer")?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("agent answered {status}: {}", text.trim());
    }
    println!("{}", text.trim());
    Ok(ExitCode::SUCCESS)
}
