//! `wsdrain agent`: wires the edges (socket counting, the admin client, the HTTP API,
//! Kubernetes, signals) to the drain core.

pub mod config;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::AdminClient;
use crate::api::{self, Guard};
use crate::conn::{Counter, Filter, SocketCounter};
use crate::drain::report::{Notice, Trigger};
use crate::drain::runner::{Drainer, Parts};
use crate::drain::seams::SessionCloser;
use crate::kube::{self, PodLink};
use crate::metrics::Metrics;
use crate::signals;
use crate::units::format_duration;
use config::AgentConfig;

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
        let link = match cfg.kube.clone() {
            Some(pod) => match PodLink::connect(pod, cfg.readiness_gate).await {
                Ok(link) => Some(Arc::new(link)),
                Err(e) => {
                    tracing::warn!(error = %e, "Kubernetes API client unavailable; draining without it");
                    None
                }
            },
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let closer = cfg.admin_url.clone().map(|url| {
            Arc::new(AdminClient::new(url, cfg.admin_timeout)) as Arc<dyn SessionCloser>
        });
        let parts = Parts {
            counter: Arc::new(SocketCounter::new(counter)),
            closer,
            close_code: cfg.close_code,
            hint: cfg.hint.clone(),
            observer: metrics.clone(),
        };
        let drainer = Drainer::new(cfg.drain_settings(), parts);
        spawn_termination_message(&drainer, &cfg);

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
        if cfg.drain_timeout + cfg.app_reserve > cfg.grace_period {
            tracing::warn!(
                drain_timeout = %format_duration(cfg.drain_timeout),
                app_reserve = %format_duration(cfg.app_reserve),
                grace_period = %format_duration(cfg.grace_period),
                "drain timeout + app reserve exceed the grace period: the kubelet may SIGKILL the app before it finishes"
            );
        }
        let guard = Guard {
            token: cfg.token.clone(),
            trigger_from: cfg.trigger_from.clone(),
        };
        tokio::spawn(api::serve(
            listener,
            drainer.clone(),
            metrics.clone(),
            guard,
        ));
        if let Some(link) = link {
            spawn_kube(link, &drainer, &metrics);
        }
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
fn spawn_termination_message(drainer: &Drainer, cfg: &AgentConfig) {
    let Some(path) = cfg.termination_log.clone() else {
        return;
    };
    let mut notices = drainer.notices();
    tokio::spawn(async move {
        while let Ok(notice) = notices.recv().await {
            if let Notice::Finished(summary) = notice
                && let Err(e) = kube::write_termination_message(&path, &summary)
            {
                tracing::debug!(path = %path.display(), error = %e, "termination message not written");
            }
        }
    });
}

/// The pod's side of the drain: readiness condition, Events, the deletion watch, and the
/// API failure count for /metrics.
fn spawn_kube(link: Arc<PodLink>, drainer: &Drainer, metrics: &Arc<Metrics>) {
    tokio::spawn(kube::follow_notices(link.clone(), drainer.notices()));
    tokio::spawn(kube::feed_deletion_at_start(link.clone(), drainer.clone()));
    // The gate keeps the pod NotReady until True sticks: retry until it does (or a drain
    // started, which makes it a no-op).
    let serving = link.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        while !serving.set_serving(true).await {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
    // Starts the drain when the pod is deleted even if no hook reaches the agent
    // (`wrap`, or an app container whose own preStop was kept), and applies the real
    // deadline to a drain that was already running (a maintenance `POST /drain`).
    let (watch, d) = (link.clone(), drainer.clone());
    tokio::spawn(async move {
        let deletion = watch.wait_for_deletion().await;
        tracing::info!("pod deletion seen: draining");
        d.pod_deleting(kube::kill_instant(
            deletion,
            tokio::time::Instant::now().into_std(),
            std::time::SystemTime::now(),
        ));
    });
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics.kube_failures.set(link.failures() as i64);
        }
    });
}

/// The sidecar's main: serve until SIGTERM, drain (or join the drain), linger, exit 0.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<ExitCode> {
    let linger = cfg.linger;
    // Handlers first: a classic sidecar gets SIGTERM at t0, maybe while still starting.
    let signals = signals::Termination::install().context("installing signal handlers")?;
    let agent = Agent::start(cfg).await?;
    let sig = signals.first().await;
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
