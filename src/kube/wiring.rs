//! Glue between `PodLink` and the drain runner, so the agent only plugs it in.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

use super::{PodLink, drain_deadline};
use crate::drain::report::Notice;
use crate::drain::runner::DeadlineProbe;

/// The runner's deadline probe: `deletionTimestamp − app_reserve` as an `Instant`, or
/// `None` when the pod is not being deleted or the API failed (the configured deadline
/// stands). The runner keeps the earlier of this and its own deadline.
pub fn deadline_probe(
    link: Arc<PodLink>,
    drain_timeout: Duration,
    app_reserve: Duration,
) -> DeadlineProbe {
    Arc::new(move || {
        let link = link.clone();
        Box::pin(async move {
            let deletion = link.deletion_time().await?;
            Some(deletion_deadline(deletion, drain_timeout, app_reserve))
        })
    })
}

/// `deletion − app_reserve` as an `Instant` from now, never later than a drain starting
/// now could last (`drain_timeout`): the runner keeps the earlier of this and its own.
pub fn deletion_deadline(
    deletion: SystemTime,
    drain_timeout: Duration,
    app_reserve: Duration,
) -> Instant {
    let now = Instant::now();
    drain_deadline(
        now + drain_timeout,
        now,
        SystemTime::now(),
        Some(deletion),
        app_reserve,
    )
}

/// Follows the drain's notices: the readiness-gate condition goes False at drain start,
/// then every notice becomes an Event. Ends when the runner is gone.
pub async fn follow_notices(link: Arc<PodLink>, mut notices: broadcast::Receiver<Notice>) {
    loop {
        match notices.recv().await {
            Ok(notice) => {
                if matches!(notice, Notice::Started { .. }) {
                    link.set_serving(false).await;
                }
                link.publish(&notice).await;
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(skipped = n, "Kubernetes Events fell behind drain notices");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
