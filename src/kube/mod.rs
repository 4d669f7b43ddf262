//! The Kubernetes API side of the agent: the own pod's deletionTimestamp (the real
//! deadline), the readiness-gate condition, drain Events, and the termination message.
//!
//! Every call is bounded by `CALL_TIMEOUT`; every failure is counted, logged once per
//! kind with the RBAC it needs, and turned into "no information" so that the drain
//! timeline is the same as with the API off.

pub mod events;
mod failures;
mod kill_time;
mod termination;
mod wiring;

use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use thiserror::Error;

pub use events::{ACTION, event_for};
pub use failures::{Call, Kind};
pub use kill_time::kill_instant;
pub use termination::{MAX_TERMINATION_MESSAGE, termination_message, write_termination_message};
pub use wiring::{feed_deletion_at_start, follow_notices, kill_time};

use crate::drain::report::Notice;
use failures::Failures;

/// The agent's own pod (downward API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
}

/// Bound of one API call (and of client start-up).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The pod condition behind the readiness gate the injector adds.
pub const SERVING_CONDITION: &str = "wsdrain.io/serving";
/// `reportingController` of our Events.
pub const REPORTING_CONTROLLER: &str = "wsdrain.io/agent";
/// Server-side end of one watch request; the agent watches again after it.
const WATCH_SECONDS: u32 = 290;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes API configuration (neither an in-cluster service account nor KUBECONFIG): {0}"
    )]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
    #[error("Kubernetes API configuration took longer than {0:?}")]
    Timeout(Duration),
}

/// The agent's link to its own pod in the API server.
pub struct PodLink {
    pods: Api<Pod>,
    pod: PodRef,
    readiness_gate: bool,
    recorder: Recorder,
    failures: Failures,
    /// Learnt from the first read of the pod; `kubectl describe` matches Events by uid.
    uid: OnceLock<String>,
    /// `publish` reads the pod for its uid at most once (a forbidden read would otherwise
    /// cost a failed call before every Event).
    uid_lookup_tried: AtomicBool,
    call_timeout: Duration,
    /// Condition patches go out one at a time, and once a drain set False nothing sets
    /// True again: a late True must not put a draining pod back into endpoints.
    condition: tokio::sync::Mutex<()>,
    unready: AtomicBool,
}

impl PodLink {
    /// kube's standard config inference: in-cluster service account, else KUBECONFIG.
    pub async fn connect(pod: PodRef, readiness_gate: bool) -> Result<PodLink, KubeError> {
        let config = tokio::time::timeout(CALL_TIMEOUT, kube::Config::infer())
            .await
            .map_err(|_| KubeError::Timeout(CALL_TIMEOUT))??;
        Self::from_config(config, pod, readiness_gate)
    }

    /// A link from an explicit config (e.g. a kubeconfig for another API server).
    pub fn from_config(
        mut config: kube::Config,
        pod: PodRef,
        readiness_gate: bool,
    ) -> Result<PodLink, KubeError> {
        // kube's TLS uses the process-wide rustls provider; ring is ours. Already
        // installed by main is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        config.connect_timeout = Some(CALL_TIMEOUT);
        let client = Client::try_from(config)?;
        Ok(Self::new(client, pod, readiness_gate))
    }

    pub fn new(client: Client, pod: PodRef, readiness_gate: bool) -> PodLink {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: Some(pod.name.clone()),
        };
        PodLink {
            pods: Api::namespaced(client.clone(), &pod.namespace),
            recorder: Recorder::new(client, reporter),
            pod,
            readiness_gate,
            condition: tokio::sync::Mutex::new(()),
            unready: AtomicBool::new(false),
            failures: Failures::default(),
            uid: OnceLock::new(),
            uid_lookup_tried: AtomicBool::new(false),
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// Changes the per-call bound (tests use a short one).
    pub fn with_call_timeout(mut self, timeout: Duration) -> PodLink {
        self.call_timeout = timeout;
        self
    }

    /// The API client (the fleet's EndpointSlice watch shares it).
    pub fn client(&self) -> Client {
        self.pods.clone().into_client()
    }

    pub fn pod(&self) -> &PodRef {
        &self.pod
    }

    /// API failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.count()
    }

    /// Whether a failure of this call and kind has been logged.
    pub fn failure_logged(&self, call: Call, kind: Kind) -> bool {
        self.failures.logged(call, kind)
    }

    /// Runs one bounded API call; a failure is recorded and becomes `None`.
    async fn call<T>(
        &self,
        call: Call,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failures.record(call, Kind::of(&e), &e);
                None
            }
            Err(_) => {
                let detail = format!("no answer within {:?}", self.call_timeout);
                self.failures.record(call, Kind::Timeout, &detail);
                None
            }
        }
    }

    /// Notes the uid and returns the deletion time of a pod read from the API.
    fn observe(&self, pod: &Pod) -> Option<SystemTime> {
        if let Some(uid) = &pod.metadata.uid {
            let _ = self.uid.set(uid.clone());
        }
        pod.metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0))
    }

    /// The own pod's deletionTimestamp, if it is being deleted. `None` on any failure.
    pub async fn deletion_time(&self) -> Option<SystemTime> {
        let pod = self
            .call(Call::GetPod, self.pods.get(&self.pod.name))
            .await?;
        self.observe(&pod)
    }

    /// Resolves when the own pod gets a deletionTimestamp. Watches only this pod (field
    /// selector on its name), starting each watch with the pod's current state, and
    /// watches again with backoff after errors. Never resolves if the API is unusable.
    pub async fn wait_for_deletion(&self) -> SystemTime {
        // kube-runtime's watcher lists the pod (so a deletion that happened before is
        // seen), then watches from there, re-lists after a gap, and backs off on errors.
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.pod.name))
            .timeout(WATCH_SECONDS);
        let stream = watcher(self.pods.clone(), config).default_backoff();
        let mut stream = pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    if let Some(t) = self.observe(&pod) {
                        return t;
                    }
                }
                // Gone already (forced deletion): its time is now or earlier.
                Ok(watcher::Event::Delete(pod)) => {
                    return self.observe(&pod).unwrap_or_else(SystemTime::now);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => {
                    let kind = match &e {
                        watcher::Error::InitialListFailed(err)
                        | watcher::Error::WatchStartFailed(err)
                        | watcher::Error::WatchFailed(err) => Kind::of(err),
                        watcher::Error::WatchError(status) => Kind::of_code(status.code),
                        watcher::Error::NoResourceVersion => Kind::Other,
                    };
                    self.failures.record(Call::WatchPod, kind, &e);
                }
            }
        }
        // The watcher's stream never ends; if it did, nothing more can be learnt.
        std::future::pending().await
    }

    /// Sets the readiness-gate condition (only with the gate enabled). Returns false when
    /// the patch failed, so the caller can retry setting True. After False, True is a no-op.
    pub async fn set_serving(&self, serving: bool) -> bool {
        if !self.readiness_gate {
            return true;
        }
        if !serving {
            self.unready.store(true, Ordering::SeqCst);
        }
        let _one_at_a_time = self.condition.lock().await;
        if serving && self.unready.load(Ordering::SeqCst) {
            return true;
        }
        let patch = serde_json::json!({
            "status": { "conditions": [serving_condition(serving, Timestamp::now())] }
        });
        let params = PatchParams::default();
        let strategic = Patch::Strategic(patch);
        self.call(
            Call::PatchStatus,
            self.pods.patch_status(&self.pod.name, &params, &strategic),
        )
        .await
        .is_some()
    }

    /// Publishes the Event for a drain notice on the own pod. The first Event may cost one
    /// extra bounded call (reading the pod's uid) unless `deletion_time` ran before.
    pub async fn publish(&self, notice: &Notice) {
        self.publish_event(&event_for(notice)).await;
    }

    /// Publishes an Event on the own pod (drain notices, the fleet's `Rebalanced`).
    pub async fn publish_event(&self, event: &Event) {
        if self.uid.get().is_none() && !self.uid_lookup_tried.swap(true, Ordering::Relaxed) {
            // Without the uid the Event exists but `kubectl describe pod` won't list it.
            self.deletion_time().await;
        }
        let reference = self.object_ref();
        self.call(Call::PublishEvent, self.recorder.publish(event, &reference))
            .await;
    }

    fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(self.pod.name.clone()),
            namespace: Some(self.pod.namespace.clone()),
            uid: self.uid.get().cloned(),
            ..Default::default()
        }
    }
}

/// The `wsdrain.io/serving` condition as patched into `status.conditions`.
pub fn serving_condition(serving: bool, now: Timestamp) -> PodCondition {
    let (status, reason, message) = if serving {
        ("True", "Serving", "wsdrain agent is serving")
    } else {
        (
            "False",
            "Draining",
            "wsdrain agent is draining WebSocket connections",
        )
    };
    PodCondition {
        type_: SERVING_CONDITION.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: Some(Time(now)),
        ..Default::default()
    }
}
