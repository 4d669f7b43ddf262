//! `wsdrain agent`: wires counting, the admin client, the drain runner and the HTTP API.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::AdminClient;
use crate::api::{self, Guard};
use crate::config::{AgentConfig, format_duration};
use crate::conn::{Counter, Filter};
use crate::drain::machine::Timings;
use crate::drain::report::{Notice, Trigger};
use crate::drain::runner::{Drainer, Io};
use crate::kube::{self, PodLink};
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
        let counter = Arc::new(Mutex::new(counter));
        let io = Io {
            counter: counter.clone(),
            admin: cfg
                .admin_url
                .clone()
                .map(|url| AdminClient::new(url, cfg.admin_timeout)),
            close_code: cfg.close_code,
            hint: cfg.hint.clone(),
            metrics: Arc::new(Metrics::new()),
            deadline_probe: link
                .clone()
                .map(|l| kube::deadline_probe(l, cfg.drain_timeout, cfg.app_reserve)),
        };
        let drainer = Drainer::new(Timings::from_config(&cfg), cfg.drain_timeout, io);
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
        tokio::spawn(api::serve(listener, drainer.clone(), guard));
        if let Some(fleet) = cfg.fleet.clone() {
            let links = fleet_links(&cfg, &drainer, counter, link.clone(), local_addr);
            tokio::spawn(crate::fleet::run(fleet, links));
        }
        if let Some(link) = link {
            spawn_kube(link, &drainer, &cfg);
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

/// What the fleet loop talks to: the drain, the counter, and the admin API as closer.
fn fleet_links(
    cfg: &AgentConfig,
    drainer: &Drainer,
    counter: Arc<Mutex<Counter>>,
    link: Option<Arc<PodLink>>,
    own_addr: SocketAddr,
) -> crate::fleet::Links {
    crate::fleet::Links {
        drain: Arc::new(drainer.clone()),
        counter: Arc::new(seams::CountSeam(counter)),
        closing: cfg.admin_url.clone().map(|url| crate::fleet::Closing {
            closer: Arc::new(seams::AdminSeam(AdminClient::new(url, cfg.admin_timeout))),
            code: cfg.close_code,
            hint: cfg.hint.clone(),
            reconnect_after: cfg.reconnect_after,
            tick: cfg.close_tick,
        }),
        rebalance_closes: drainer.metrics().rebalance_closes.clone(),
        kube: link,
        own_addr,
        own_ip: cfg.pod_ip,
    }
}

/// Until the drain core talks through `drain::seams` itself: the admin client and the
/// socket counter behind the seams, for the fleet loop.
mod seams {
    use std::sync::{Arc, Mutex};

    use crate::admin::{AdminClient, DrainRequest};
    use crate::conn::Counter;
    use crate::drain::runner::Drainer;
    use crate::drain::seams::{
        BoxFuture, CloseError, CloseReply, CloseRequest, CountError, SessionCloser,
        SessionCounter, Snapshot,
    };

    pub struct AdminSeam(pub AdminClient);

    impl SessionCloser for AdminSeam {
        fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>> {
            Box::pin(async move {
                let req = DrainRequest {
                    max: req.max,
                    code: req.code,
                    reason: req.reason,
                };
                match self.0.drain(&req).await {
                    Ok(r) => Ok(CloseReply {
                        closed: r.closed,
                        remaining: r.remaining,
                    }),
                    Err(e) => Err(CloseError {
                        label: e.result_label(),
                        message: e.to_string(),
                    }),
                }
            })
        }

        fn timeout(&self) -> std::time::Duration {
            self.0.timeout()
        }
    }

    pub struct CountSeam(pub Arc<Mutex<Counter>>);

    impl SessionCounter for CountSeam {
        fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
            let counter = self.0.clone();
            Box::pin(async move {
                let snap = tokio::task::spawn_blocking(move || {
                    counter
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .snapshot()
                })
                .await
                .map_err(|e| CountError(e.to_string()))?
                .map_err(|e| CountError(e.to_string()))?;
                Ok(Snapshot { ids: snap.ids })
            })
        }
    }

    impl crate::fleet::DrainView for Drainer {
        fn is_draining(&self) -> bool {
            Drainer::is_draining(self)
        }

        fn set_close_rate(&self, per_second: Option<f64>) {
            tracing::debug!(?per_second, "fleet close rate (the drain core does not take it yet)");
        }
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
fn spawn_kube(link: Arc<PodLink>, drainer: &Drainer, cfg: &AgentConfig) {
    tokio::spawn(kube::follow_notices(link.clone(), drainer.notices()));
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
    let (timeout, reserve) = (cfg.drain_timeout, cfg.app_reserve);
    tokio::spawn(async move {
        let deletion = watch.wait_for_deletion().await;
        tracing::info!("pod deletion seen: draining");
        d.start(Trigger::PodDeletion);
        d.shorten_deadline(kube::deletion_deadline(deletion, timeout, reserve));
    });
    let metrics = drainer.metrics().clone();
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
