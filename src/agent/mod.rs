//! `wsdrain agent`: wires the edges (socket counting, the admin client, the HTTP API,
//! Kubernetes, signals) to the drain core.

pub mod config;
pub mod marker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use tokio::net::TcpListener;

use crate::admin::AdminClient;
use crate::api::{self, Guard};
use crate::conn::{Counter, Filter, SocketCounter};
use crate::drain::report::{Notice, Trigger};
use crate::drain::runner::{Drainer, Parts};
use crate::drain::seams::{SessionCloser, SessionCounter};
use crate::fleet;
use crate::kube::{self, PodLink};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, TableAndSockets, TableCloser, TableCounter};
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

        // Proxy first: it binds the app's public port, and a clash should fail early.
        let proxy = if cfg.proxy.is_empty() {
            None
        } else {
            Some(Proxy::start(&cfg.proxy, cfg.proxy_timeouts).await?)
        };
        // sock_diag counts the ports the proxy does not carry (all of them without it);
        // the proxy's table counts its own sessions, with events.
        let sockets = || {
            let c = Counter::new(Filter {
                ports: cfg.ports.clone(),
                address: cfg.address,
            });
            let backend = c.backend();
            (
                Arc::new(if cfg.poll_only {
                    SocketCounter::new(c)
                } else {
                    SocketCounter::event_driven(c)
                }) as Arc<dyn SessionCounter>,
                Some(backend),
            )
        };
        let (counter, backend): (Arc<dyn SessionCounter>, _) = match &proxy {
            None => sockets(),
            Some(p) if cfg.ports.is_empty() => (Arc::new(TableCounter(p.table())), None),
            Some(p) => {
                let (sockets, backend) = sockets();
                let table = TableCounter(p.table());
                (Arc::new(TableAndSockets { table, sockets }), backend)
            }
        };
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
        // With an admin API the app closes its own sessions (the proxy relays those
        // closes); without one the proxy closes them.
        let closer = match (cfg.admin_url.clone(), &proxy) {
            (Some(url), _) => {
                Some(Arc::new(AdminClient::new(url, cfg.admin_timeout)) as Arc<dyn SessionCloser>)
            }
            (None, Some(p)) => Some(Arc::new(TableCloser(p.table())) as Arc<dyn SessionCloser>),
            (None, None) => None,
        };
        let parts = Parts {
            counter: counter.clone(),
            closer,
            close_code: cfg.close_code,
            hint: cfg.hint.clone(),
            observer: metrics.clone(),
        };
        let drainer = Drainer::new(cfg.drain_settings(), parts);
        spawn_termination_message(&drainer, &cfg);
        if let Some(dir) = &cfg.state_dir {
            spawn_marker_writer(&drainer, dir.clone());
            resume_from_marker(&drainer, dir);
        }

        tracing::info!(
            listen = %local_addr,
            ports = ?cfg.ports,
            address = ?cfg.address,
            counting = ?backend,
            admin_url = cfg.admin_url.as_ref().map(|u| u.to_string()),
            proxy = ?cfg.proxy.iter().map(|r| format!("{}={}", r.listen, r.upstream)).collect::<Vec<_>>(),
            drain_timeout = %format_duration(cfg.drain_timeout),
            token = cfg.token.is_some(),
            "agent serving"
        );
        for warning in &cfg.warnings {
            tracing::warn!("{warning}");
        }
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
        if let Some(fleet) = cfg.fleet.clone() {
            let links = fleet_links(&cfg, &drainer, counter, &metrics, link.clone(), local_addr);
            tokio::spawn(fleet::run(fleet, links));
        }
        if let Some(link) = link {
            spawn_kube(link, &drainer, &metrics);
        }
        if let Some(proxy) = &proxy {
            spawn_proxy_stats(proxy.stats(), &drainer, &metrics);
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

/// What the fleet loop talks to: the drain, its counter and closer (the rebalancer is
/// one more user of the drain's seams), the metric and the pod's API link.
fn fleet_links(
    cfg: &AgentConfig,
    drainer: &Drainer,
    counter: Arc<dyn SessionCounter>,
    metrics: &Metrics,
    link: Option<Arc<PodLink>>,
    own_addr: SocketAddr,
) -> fleet::Links {
    fleet::Links {
        drain: Arc::new(drainer.clone()),
        counter,
        closing: drainer.closer().map(|closer| fleet::Closing {
            closer,
            reconnect_after: cfg.drain_settings().reconnect_after,
            tick: cfg.close_tick,
        }),
        rebalance_closes: metrics.rebalance_closes.clone(),
        kube: link,
        own_addr,
        own_ip: cfg.pod_ip,
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

/// Writes the drain marker when a drain starts, so a restart resumes it.
fn spawn_marker_writer(drainer: &Drainer, dir: std::path::PathBuf) {
    let mut notices = drainer.notices();
    let d = drainer.clone();
    tokio::spawn(async move {
        while let Ok(notice) = notices.recv().await {
            if let Notice::Started { trigger, .. } = notice {
                let elapsed = Duration::from_millis(d.status().elapsed_ms);
                let now = std::time::SystemTime::now();
                let started = now.checked_sub(elapsed).unwrap_or(now);
                if let Err(e) = marker::write(&dir, &marker::Marker::new(trigger, started)) {
                    tracing::warn!(error = %e, "drain marker not written: a restarted agent would not resume this drain");
                }
            }
        }
    });
}

/// Resumes the drain a previous run of the agent started (its marker is in `dir`).
fn resume_from_marker(drainer: &Drainer, dir: &std::path::Path) {
    let now = tokio::time::Instant::now().into_std();
    let wall = std::time::SystemTime::now();
    match marker::read(dir) {
        Ok(None) => {}
        Ok(Some(m)) => {
            let ago = wall.duration_since(m.started()).unwrap_or_default();
            tracing::warn!(
                trigger = ?m.trigger,
                started_ms_ago = ago.as_millis() as u64,
                "a drain was running before this agent started: resuming it with its original deadline"
            );
            drainer.resume(m.trigger, kube::kill_instant(m.started(), now, wall));
        }
        Err(e) => {
            // Someone wrote it: a drain was running. Resume from now rather than serve.
            tracing::warn!(error = %e, "unreadable drain marker: resuming the drain from now");
            drainer.resume(Trigger::Signal, now);
        }
    }
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
        let set = || async {
            match serving.set_serving(true).await {
                true => Ok(()),
                false => Err("readiness-gate condition not set"),
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(30))
            .without_max_times();
        // Failures are counted and logged by the link; only the retry lives here.
        let _ = set.retry(backoff).await;
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

/// Copies the proxy's totals into /metrics every second, and logs them when a drain ends.
fn spawn_proxy_stats(stats: Arc<crate::proxy::Stats>, drainer: &Drainer, metrics: &Arc<Metrics>) {
    let metrics = metrics.clone();
    let mut notices = drainer.notices();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut open = true;
        loop {
            let finished = tokio::select! {
                _ = tick.tick() => false,
                n = notices.recv(), if open => match n {
                    Ok(notice) => matches!(notice, Notice::Finished(_)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => false,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        open = false;
                        false
                    }
                },
            };
            let s = stats.snapshot();
            for (event, n) in s.pairs() {
                metrics
                    .proxy_events
                    .get_or_create(&crate::metrics::EventLabel { event })
                    .set(n.min(i64::MAX as u64) as i64);
            }
            if finished {
                tracing::info!(
                    sessions = s.sessions,
                    drained = s.drained,
                    close_timeouts = s.close_timeouts,
                    bad_frames_client = s.bad_frames_client,
                    bad_frames_app = s.bad_frames_app,
                    stalled = s.stalled,
                    upstream_errors = s.upstream_errors,
                    "proxy totals at the end of the drain"
                );
            }
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
