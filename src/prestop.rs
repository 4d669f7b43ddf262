//! `wsdrain prestop`: the client for exec-style hooks. Calls the agent's /prestop, retries
//! while the agent is not up yet, and exits once the drain has ended.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::TOKEN_HEADER;
use crate::config::parse_duration;

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

pub async fn run(args: PrestopArgs) -> anyhow::Result<ExitCode> {
    if args.agent_url.scheme_str() != Some("http") {
        bail!("--agent-url {}: must be an http:// URL", args.agent_url);
    }
    let host = args
        .agent_url
        .host()
        .context("--agent-url: no host")?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = args.agent_url.port_u16().unwrap_or(80);
    let give_up = Instant::now() + args.wait_agent;
    let mut attempts = 0u32;
    let stream = loop {
        attempts += 1;
        match TcpStream::connect((host.as_str(), port)).await {
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
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the agent")?;
    tokio::spawn(conn);
    let mut req = Request::post(format!(
        "{}/prestop",
        args.agent_url.to_string().trim_end_matches('/')
    ))
    .header(hyper::header::HOST, format!("{host}:{port}"));
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
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the agent's answer")?
        .to_bytes();
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    if !status.is_success() {
        bail!("agent answered {status}: {}", text.trim());
    }
    println!("{}", text.trim());
    Ok(ExitCode::SUCCESS)
}
