//! `wsdrain agent`: wires counting, the admin client, the drain runner and the HTTP API.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::AdminClient;
use crate::api::{self, Guard};
use crate::config::{AgentConfig, format_duration};
use crate::conn::{Counter, Filter};
use crate::drain::machine::Timings;
use crate::drain::report::{Notice, Trigger};
use crate::drain::runner::{Drainer, Io};
use crate::metrics::Metrics;
use crate::signals;

/// A running agent: API served, drain ready to start on a trigger. No signal handling of
/// its own, so `wrap` can embed it.
pub struct Agent {
    drainer: Drainer,
    local_addr: SocketAddr,
}

impl Agent {
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("--listen {}: cannot bind", cfg.listen))?;
        let local_addr = listener
            .local_addr()
            .context("--listen: no local address")?;

        let counter = Counter::new(Filter {
            ports: cfg.ports.clone(),
            address: cfg.address,
        });
        let backend = counter.backend();
        let io = Io {
            counter: Arc::new(Mutex::new(counter)),
            admin: cfg
                .admin_url
                .clone()
                .map(|url| AdminClient::new(url, cfg.admin_timeout)),
            admin_timeout: cfg.admin_timeout,
            close_code: cfg.close_code,
            hint: cfg.hint.clone(),
            metrics: Arc::new(Metrics::new()),
            deadline_probe: None,
        };
        let drainer = Drainer::new(Timings::from_config(&cfg), cfg.drain_timeout, io);
        spawn_notice_log(&drainer, &cfg);

        tracing::info!(
            listen = %local_addr,
            ports = ?cfg.ports,
            address = ?cfg.address,
            counting = ?backend,
            admin_url = cfg.admin_url.as_ref().map(|u| u.to_string()),
            drain_timeout = %format_duration(cfg.drain_timeout),
            token = cfg.token.is_some(),
            "agent serving"
        );
        let guard = Guard {
            token: cfg.token.clone(),
            trigger_from: cfg.trigger_from.clone(),
        };
        tokio::spawn(api::serve(listener, drainer.clone(), guard));
        Ok(Agent {
            drainer,
            local_addr,
        })
    }

    pub fn drainer(&self) -> Drainer {
        self.drainer.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Writes the termination message when a drain finishes.
fn spawn_notice_log(drainer: &Drainer, cfg: &AgentConfig) {
    let mut notices = drainer.notices();
    let path = cfg.termination_log.clone();
    tokio::spawn(async move {
        while let Ok(notice) = notices.recv().await {
            if let (Notice::Finished(summary), Some(path)) = (&notice, &path) {
                let line = serde_json::to_string(summary).unwrap_or_default();
                if let Err(e) = tokio::fs::write(path, line + "\n").await {
                    tracing::debug!(path = %path.display(), error = %e, "termination message not written");
                }
            }
        }
    });
}

/// The sidecar's main: serve until SIGTERM, drain (or join the drain), linger, exit 0.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<ExitCode> {
    let linger = cfg.linger;
    let agent = Agent::start(cfg).await?;
    let sig = signals::termination()
        .await
        .context("installing signal handlers")?;
    tracing::info!(
        signal = signals::name(sig),
        "termination signal: draining before exit"
    );
    let summary = agent.drainer().drain(Trigger::Signal).await;
    // Let waiting hooks read their answers before the process goes away.
    tokio::time::sleep(linger).await;
    tracing::info!(outcome = ?summary.outcome, "agent exiting");
    Ok(ExitCode::SUCCESS)
}
