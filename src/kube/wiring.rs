//! Glue between `PodLink` and the drain, so the agent only plugs it in.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

use super::{PodLink, kill_instant};
use crate::drain::{Drainer, Notice};

/// Longest wait for the pod's deletion time at drain start; the drain runs meanwhile.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The pod's SIGKILL time, or `None` when the pod is not being deleted or the API failed
/// (then the drain's own timeout stands).
pub async fn kill_time(link: &PodLink) -> Option<Instant> {
    let deletion = link.deletion_time().await?;
    Some(kill_instant(
        deletion,
        tokio::time::Instant::now().into_std(),
        SystemTime::now(),
    ))
}

/// At every drain start, reads the pod's deletion time once and feeds it to the drain
/// (a `kubectl delete --grace-period=5` must shorten it). Ends when the drain is gone.
pub async fn feed_deletion_at_start(link: Arc<PodLink>, drainer: Drainer) {
    let mut notices = drainer.notices();
    loop {
        match notices.recv().await {
            Ok(Notice::Started { .. }) => {
                if let Ok(Some(kill_at)) =
                    tokio::time::timeout(PROBE_TIMEOUT, kill_time(&link)).await
                {
                    drainer.pod_deleting(kill_at);
                    tracing::info!(
                        deadline_in_ms = drainer.status().deadline_in_ms,
                        "pod deletion time applies"
                    );
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
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
