//! API failures: classified, counted, and logged once per (call, kind) with the fix.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

/// The API calls the agent makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    GetPod,
    WatchPod,
    PatchStatus,
    PublishEvent,
}

impl Call {
    fn describe(self) -> &'static str {
        match self {
            Call::GetPod => "reading the own pod",
            Call::WatchPod => "watching the own pod",
            Call::PatchStatus => "patching the readiness-gate condition",
            Call::PublishEvent => "publishing an Event",
        }
    }

    /// The RBAC rule that allows the call (deploy/rbac-app.yaml grants all of them).
    pub fn rbac(self) -> &'static str {
        match self {
            Call::GetPod => "pods get",
            Call::WatchPod => "pods watch",
            Call::PatchStatus => "pods/status patch",
            Call::PublishEvent => "events create (and patch, events.k8s.io)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unauthorized,
    Forbidden,
    NotFound,
    Rejected,
    ServerError,
    Timeout,
    Unreachable,
    Other,
}

const KINDS: u32 = 8;

impl Kind {
    pub fn of(err: &kube::Error) -> Kind {
        match err {
            kube::Error::Api(status) => Kind::of_code(status.code),
            kube::Error::HyperError(_) | kube::Error::Service(_) => Kind::Unreachable,
            _ => Kind::Other,
        }
    }

    pub fn of_code(code: u16) -> Kind {
        match code {
            401 => Kind::Unauthorized,
            403 => Kind::Forbidden,
            404 => Kind::NotFound,
            408 | 504 => Kind::Timeout,
            500..=599 => Kind::ServerError,
            400..=499 => Kind::Rejected,
            _ => Kind::Other,
        }
    }

    fn hint(self, call: Call) -> String {
        match self {
            Kind::Forbidden => format!(
                "the pod's service account lacks RBAC '{}': apply deploy/rbac-app.yaml (docs/kubernetes.md)",
                call.rbac()
            ),
            Kind::Unauthorized => {
                "the service account token was rejected (is automountServiceAccountToken false?)"
                    .into()
            }
            Kind::NotFound => {
                "the pod was not found: check POD_NAME and POD_NAMESPACE (downward API)".into()
            }
            Kind::Rejected => "the API server rejected the request".into(),
            Kind::ServerError => "the API server failed; later calls try again".into(),
            Kind::Timeout => "no answer in time; later calls try again".into(),
            Kind::Unreachable => "cannot reach the API server (KUBERNETES_SERVICE_HOST or KUBECONFIG, egress NetworkPolicy)".into(),
            Kind::Other => "unexpected answer; later calls try again".into(),
        }
    }
}

/// Failure count plus one "already logged" bit per (call, kind).
#[derive(Debug, Default)]
pub struct Failures {
    count: AtomicU64,
    logged: AtomicU64,
}

impl Failures {
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn record(&self, call: Call, kind: Kind, detail: &dyn Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let bit = 1u64 << (call as u32 * KINDS + kind as u32);
        if self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                call = call.describe(),
                kind = ?kind,
                error = %detail,
                "Kubernetes API failure: {} (drain timeline unaffected; further {kind:?} failures of this call are only counted)",
                kind.hint(call),
            );
        } else {
            tracing::debug!(call = call.describe(), kind = ?kind, error = %detail, "Kubernetes API failure");
        }
    }

    /// Whether a (call, kind) failure has been logged (tests).
    pub fn logged(&self, call: Call, kind: Kind) -> bool {
        let bit = 1u64 << (call as u32 * KINDS + kind as u32);
        self.logged.load(Ordering::Relaxed) & bit != 0
    }
}
