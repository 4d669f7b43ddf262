//! Fleet awareness (docs/scaling.md): the agent reads its peers' `/status` every
//! `--fleet-interval`, and
//! - rebalances after a scale-up: a pod well above the fleet mean closes its excess,
//!   paced, while it stays Ready (`rebalance`, a pure decision);
//! - shares one reconnect budget with the pods draining at the same time: its close
//!   rate is `--fleet-close-rate` / D (`budget`), fed to the drain core.

pub mod args;
pub mod budget;
pub mod peers;
pub mod rebalance;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Uri;
use kube::runtime::events::{Event, EventType};
use prometheus_client::metrics::counter::Counter;

use crate::drain::pacing::{batch_size, hint_delay};
use crate::drain::runner::Drainer;
use crate::drain::seams::{CloseRequest, SessionCloser, SessionCounter};
use crate::drain::settings::DelayRange;
use crate::kube::PodLink;
use budget::Budget;
use peers::{Peer, PeerStatus, SliceWatch};
use rebalance::{Decision, Rebalancer};

/// Bound of one peer's `/status` call.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often peers are read while this pod drains: who else drains changes the share.
pub const DRAINING_INTERVAL: Duration = Duration::from_millis(500);
/// How often the loop looks at the own drain between two rounds (a drain start
/// triggers a round at once).
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// Where the peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--peers`: agent base URLs (this agent's own is skipped).
    Static(Vec<Uri>),
    /// `--service`: the EndpointSlices of this Service in the pod's namespace.
    Service(String),
}

/// Checked fleet settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub source: Source,
    pub interval: Duration,
    /// `None`: no rebalancing (the default).
    pub rebalance: Option<rebalance::Settings>,
    /// `None`: no fleet budget (the default).
    pub budget: Option<Budget>,
}

/// What the loop needs from the agent's drain.
pub trait DrainView: Send + Sync + 'static {
    fn is_draining(&self) -> bool;
    /// Sessions per second this pod may close while draining; `None`: no limit.
    fn set_close_rate(&self, per_second: Option<f64>);
    /// The drain's close request (code and hint) for `max` sessions and a reconnect
    /// delay of `after_ms`: rebalancing closes look like the drain's.
    fn close_request(&self, max: u64, after_ms: u64) -> CloseRequest;
}

impl DrainView for Drainer {
    fn is_draining(&self) -> bool {
        Drainer::is_draining(self)
    }

    fn set_close_rate(&self, per_second: Option<f64>) {
        Drainer::set_close_rate(self, per_second);
    }

    fn close_request(&self, max: u64, after_ms: u64) -> CloseRequest {
        Drainer::close_request(self, max, after_ms)
    }
}

/// How rebalancing closes go out: the drain's closer, the hint's delay range and tick.
pub struct Closing {
    pub closer: Arc<dyn SessionCloser>,
    pub reconnect_after: DelayRange,
    pub tick: Duration,
}

/// Everything the loop talks to.
pub struct Links {
    pub drain: Arc<dyn DrainView>,
    pub counter: Arc<dyn SessionCounter>,
    /// `None`: no closer (wait-only agent): rebalancing is impossible and logged once.
    pub closing: Option<Closing>,
    /// `wsdrain_rebalance_closes_total`.
    pub rebalance_closes: Counter,
    /// Events (`Rebalanced`) and, with `--service`, the API client.
    pub kube: Option<Arc<PodLink>>,
    /// This agent's own API address (skipped in a static list).
    pub own_addr: SocketAddr,
    /// This pod's IP (`POD_IP`), skipped in EndpointSlices besides the pod's name.
    pub own_ip: Option<IpAddr>,
}

/// One round's view of a peer that answered.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub peer: Peer,
    pub status: Option<PeerStatus>,
}

/// Draining peers: `terminating` in the EndpointSlice or not `Serving` in `/status`
/// (a terminating peer counts even when it no longer answers).
pub fn draining_peers(views: &[PeerView]) -> usize {
    views
        .iter()
        .filter(|v| v.peer.terminating || v.status.is_some_and(|s| s.draining))
        .count()
}

fn is_ready(v: &PeerView) -> bool {
    !v.peer.terminating && v.status.is_some_and(|s| !s.draining)
}

/// Remembers since when each peer has been ready; a peer that is not (draining,
/// unreachable, gone) starts over.
pub fn track_ready(since: &mut HashMap<Uri, Instant>, views: &[PeerView], now: Instant) {
    since.retain(|url, _| views.iter().any(|v| &v.peer.url == url && is_ready(v)));
    for v in views.iter().filter(|v| is_ready(v)) {
        since.entry(v.peer.url.clone()).or_insert(now);
    }
}

/// The counts of the peers ready for at least `warmup` that answered with one. A new
/// pod is Ready before the ingress routes to it (endpoint propagation, the ingress's
/// own sync): closing for it earlier sends the clients back to the old pods.
pub fn ready_counts(
    views: &[PeerView],
    since: &HashMap<Uri, Instant>,
    now: Instant,
    warmup: Duration,
) -> Vec<i64> {
    views
        .iter()
        .filter(|v| {
            since
                .get(&v.peer.url)
                .is_some_and(|t| now.saturating_duration_since(*t) >= warmup)
        })
        .filter_map(|v| v.status?.count)
        .collect()
}

/// The fleet loop; runs until the process ends. With peers but neither rebalancing
/// nor a budget there is nothing to do, and it returns at once.
pub async fn run(cfg: FleetConfig, links: Links) {
    if cfg.rebalance.is_none() && cfg.budget.is_none() {
        tracing::debug!("peers given, but neither --rebalance nor --fleet-close-rate");
        return;
    }
    tracing::info!(
        peers = %match &cfg.source {
            Source::Static(urls) => format!("{} listed", urls.len()),
            Source::Service(s) => format!("EndpointSlices of Service {s}"),
        },
        interval_ms = cfg.interval.as_millis() as u64,
        rebalance = cfg.rebalance.is_some(),
        fleet_close_rate = cfg.budget.map(|b| b.per_second()),
        "fleet awareness on"
    );
    let slices = match &cfg.source {
        Source::Service(service) => match &links.kube {
            Some(link) => Some((
                SliceWatch::start(link.client(), &link.pod().namespace, service),
                link.pod().name.clone(),
            )),
            None => {
                tracing::warn!(%service, "--service needs the Kubernetes API (POD_NAME, POD_NAMESPACE); no peers");
                None
            }
        },
        Source::Static(_) => None,
    };
    let (own_addr, own_ip) = (links.own_addr, links.own_ip);
    let peers_now = || match (&cfg.source, &slices) {
        (Source::Static(urls), _) => peers::static_peers(urls, own_addr),
        (Source::Service(_), Some((watch, own_pod))) => {
            peers::peers_from_slices(&watch.slices(), Some(own_pod), own_ip, own_addr.port())
        }
        (Source::Service(_), None) => Vec::new(),
    };
    let mut rebalancer = cfg.rebalance.map(Rebalancer::new);
    if rebalancer.is_some() && links.closing.is_none() {
        tracing::warn!(
            "--rebalance needs a way to close sessions (--admin-url or --proxy); not rebalancing"
        );
        rebalancer = None;
    }
    let links = Arc::new(links);
    let mut rate: Option<f64> = None;
    let mut rebalancing: Option<tokio::task::JoinHandle<()>> = None;
    let mut was_draining = false;
    let mut ready_since: HashMap<Uri, Instant> = HashMap::new();
    loop {
        let views = poll(&peers_now()).await;
        track_ready(&mut ready_since, &views, Instant::now());
        let draining = links.drain.is_draining();
        if let Some(budget) = cfg.budget {
            let others = draining_peers(&views);
            let share = budget.share(others);
            if draining && rate != Some(share) {
                tracing::info!(
                    rate_per_s = share,
                    draining_pods = others + 1,
                    fleet_close_rate = budget.per_second(),
                    "fleet close budget: this pod's share"
                );
            }
            // Every round while draining, not only on a change: each call re-fits the
            // drain's close window to the sessions left, so closes that fell behind
            // (a busy node) are not caught up in bursts above the share.
            if draining || rate != Some(share) {
                links.drain.set_close_rate(Some(share));
                rate = Some(share);
            }
        }
        let running = rebalancing.as_ref().is_some_and(|h| !h.is_finished());
        // A draining pod holds its sessions (`decide` says so at once): no count needed.
        if let Some(r) = rebalancer.as_mut()
            && !running
            && !draining
            && let Some(own) = own_count(links.counter.as_ref()).await
        {
            let warmup = r.settings().warmup;
            let counts = ready_counts(&views, &ready_since, Instant::now(), warmup);
            if let Decision::Close {
                sessions,
                over,
                target,
            } = r.decide(Instant::now(), own, &counts, draining)
            {
                tracing::info!(
                    sessions,
                    window_ms = over.as_millis() as u64,
                    own,
                    fleet_mean = target,
                    ready_peers = counts.len(),
                    "rebalance: closing sessions above the fleet mean, staying Ready"
                );
                let links = links.clone();
                rebalancing = Some(tokio::spawn(async move {
                    let closed = close_paced(&links, sessions, over).await;
                    announce(&links, sessions, closed, own, target, over).await;
                }));
            }
        }
        was_draining |= draining;
        let next = Instant::now()
            + if draining {
                DRAINING_INTERVAL.min(cfg.interval)
            } else {
                cfg.interval
            };
        // A drain start is a reason to look at once: the budget share matters from its
        // first close on.
        while Instant::now() < next {
            tokio::time::sleep(DRAIN_CHECK.min(next.saturating_duration_since(Instant::now())))
                .await;
            if !was_draining && links.drain.is_draining() {
                break;
            }
        }
    }
}

/// Every peer's status, concurrently; unreachable peers get `status: None`.
pub async fn poll(peers: &[Peer]) -> Vec<PeerView> {
    let answers = futures_util::future::join_all(
        peers
            .iter()
            .map(|p| peers::fetch_status(&p.url, STATUS_TIMEOUT)),
    )
    .await;
    peers
        .iter()
        .zip(answers)
        .map(|(peer, answer)| {
            if let Err(e) = &answer {
                tracing::debug!(error = %e, "peer skipped this round");
            }
            PeerView {
                peer: peer.clone(),
                status: answer.ok(),
            }
        })
        .collect()
}

async fn own_count(counter: &dyn SessionCounter) -> Option<u64> {
    match counter.snapshot().await {
        Ok(s) => Some(s.ids.len() as u64),
        Err(e) => {
            tracing::debug!(error = %e, "own count failed; no rebalance decision this round");
            None
        }
    }
}

/// Closes `sessions` in batches, one per tick, spread over `window`, each with the hint
/// growing over the window. Stops early when a drain starts (it takes over), when the
/// closer reports no sessions left, or when the closer fails. Returns the sessions closed.
pub async fn close_paced(links: &Links, sessions: u64, window: Duration) -> u64 {
    let Some(c) = &links.closing else {
        return 0;
    };
    let start = Instant::now();
    let (mut left, mut closed) = (sessions, 0u64);
    let mut next = start;
    while left > 0 && !links.drain.is_draining() {
        let elapsed = start.elapsed();
        let max = batch_size(left, window.saturating_sub(elapsed), c.tick).min(left);
        let after_ms = hint_delay(c.reconnect_after, elapsed, window).as_millis() as u64;
        let req = links.drain.close_request(max, after_ms);
        match tokio::time::timeout(c.closer.timeout(), c.closer.close(req)).await {
            Ok(Ok(reply)) => {
                // The closer's numbers are input: never count more than was asked for.
                let n = reply.closed.min(max);
                closed += n;
                links.rebalance_closes.inc_by(n);
                left -= max;
                if reply.remaining == 0 {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "rebalance close failed; this rebalance stops");
                break;
            }
            Err(_) => {
                tracing::warn!("rebalance close timed out; this rebalance stops");
                break;
            }
        }
        next += c.tick;
        tokio::time::sleep_until(next.into()).await;
    }
    closed
}

/// The log line and the Kubernetes Event `Rebalanced` at the end of a rebalance.
async fn announce(links: &Links, planned: u64, closed: u64, own: u64, mean: u64, over: Duration) {
    tracing::info!(
        planned,
        closed,
        own,
        fleet_mean = mean,
        "rebalance finished"
    );
    if let Some(link) = &links.kube {
        link.publish_event(&rebalanced_event(planned, closed, own, mean, over))
            .await;
    }
}

/// The `Rebalanced` Event.
pub fn rebalanced_event(planned: u64, closed: u64, own: u64, mean: u64, over: Duration) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Rebalanced".into(),
        note: Some(format!(
            "Closed {closed} of {planned} planned WebSocket sessions over {}s with a reconnect hint: {own} sessions here against a fleet mean of {mean}",
            over.as_secs()
        )),
        action: "Rebalance".into(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(url: &str, status: Option<(&str, i64)>, terminating: bool) -> PeerView {
        PeerView {
            peer: Peer {
                url: url.parse().unwrap(),
                terminating,
            },
            status: status.map(|(state, n)| PeerStatus {
                count: Some(n),
                draining: state != "Serving",
            }),
        }
    }

    #[test]
    fn new_peers_count_after_the_warmup_and_start_over_when_not_ready() {
        let (t0, s) = (Instant::now(), Duration::from_secs(1));
        let warmup = 5 * s;
        let mut since = HashMap::new();
        let old = view("http://10.0.0.1:1", Some(("Serving", 90)), false);
        track_ready(&mut since, std::slice::from_ref(&old), t0);
        let views = [
            old.clone(),
            view("http://10.0.0.2:1", Some(("Serving", 0)), false),
            view("http://10.0.0.3:1", Some(("Closing", 40)), false),
            view("http://10.0.0.4:1", Some(("Serving", 40)), true),
            view("http://10.0.0.5:1", None, false),
        ];
        track_ready(&mut since, &views, t0 + 5 * s);
        // The new empty pod does not count yet: the ingress may not route to it.
        assert_eq!(ready_counts(&views, &since, t0 + 5 * s, warmup), vec![90]);
        assert_eq!(
            ready_counts(&views, &since, t0 + 10 * s, warmup),
            vec![90, 0]
        );
        assert_eq!(draining_peers(&views), 2);
        // Unreachable for a round: it warms up again.
        let gone = [old.clone()];
        track_ready(&mut since, &gone, t0 + 11 * s);
        track_ready(&mut since, &views, t0 + 12 * s);
        assert_eq!(ready_counts(&views, &since, t0 + 12 * s, warmup), vec![90]);
    }
}
