//! `--self-managed`: TLS without cert-manager. The webhook keeps its own CA and serving
//! certificate in one Secret (`pki` decides what to renew) and keeps the `caBundle` of
//! its MutatingWebhookConfiguration equal to the Secret's CA bundle. Replicas agree on one
//! writer through a coordination.k8s.io Lease; every replica serves the certificate it
//! reads from the Secret.
//!
//! All three objects are named, so RBAC grants get/update (patch for the configuration)
//! on exactly these names and nothing else; the Secret and the Lease are created by the
//! manifests, because `create` cannot be limited by name.

use std::time::{Duration, SystemTime};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::pki::{self, Material, PkiError};

/// A leader that stops renewing is replaced after this.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);
/// How often every replica renews or checks the Lease and reads the Secret.
pub const ROUND_EVERY: Duration = Duration::from_secs(10);
/// A round that takes longer (a hung API connection) is abandoned and retried.
const ROUND_TIMEOUT: Duration = Duration::from_secs(20);
/// Field manager of our patches, as seen in `managedFields`.
const MANAGER: &str = "wsdrain-webhook";

/// The objects this webhook manages, and who it is.
#[derive(Debug, Clone)]
pub struct Names {
    pub namespace: String,
    pub secret: String,
    pub lease: String,
    pub webhook_config: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    /// Names in the serving certificate.
    pub sans: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelfManagedError {
    #[error("{call}: {source}")]
    Api {
        call: &'static str,
        source: kube::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
}

fn api(call: &'static str) -> impl FnOnce(kube::Error) -> SelfManagedError {
    move |source| SelfManagedError::Api { call, source }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What the Lease tells this replica to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds it.
    Follow,
}

/// Pure decision on a Lease read at `now`.
pub fn lease_step(spec: Option<&LeaseSpec>, me: &str, now: SystemTime) -> LeaseStep {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    if holder == Some(me) {
        return LeaseStep::Renew;
    }
    let expires = spec.and_then(|s| {
        let renewed = SystemTime::from(s.renew_time.as_ref()?.0);
        let secs = u64::try_from(s.lease_duration_seconds?).ok()?;
        Some(renewed + Duration::from_secs(secs))
    });
    match (holder, expires) {
        (Some(_), Some(expires)) if expires > now => LeaseStep::Follow,
        _ => LeaseStep::Acquire,
    }
}

fn micro_time(t: SystemTime) -> Option<MicroTime> {
    Timestamp::try_from(t).ok().map(MicroTime)
}

/// One round's result.
#[derive(Debug, Clone)]
pub struct Round {
    pub leader: bool,
    /// What the Secret holds after the round (what to serve).
    pub material: Material,
}

pub struct Manager {
    names: Names,
    leases: Api<Lease>,
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    leader: bool,
}

impl Manager {
    pub fn new(client: kube::Client, names: Names) -> Manager {
        Manager {
            leases: Api::namespaced(client.clone(), &names.namespace),
            secrets: Api::namespaced(client.clone(), &names.namespace),
            configs: Api::all(client),
            names,
            leader: false,
        }
    }

    /// Lease, then Secret (renewed by the leader when due), then the caBundle (leader).
    pub async fn round(&mut self, now: SystemTime) -> Result<Round, SelfManagedError> {
        let leader = self.hold_lease(now).await?;
        if leader != self.leader {
            tracing::info!(
                identity = %self.names.identity,
                lease = %self.names.lease,
                leader,
                "certificate writer changed"
            );
            self.leader = leader;
        }
        let secret = self
            .secrets
            .get(&self.names.secret)
            .await
            .map_err(api("get Secret"))?;
        let mut material = Material::from_secret_data(secret.data.as_ref());
        if leader {
            let plan = pki::plan(&material, &self.names.sans, now);
            if plan.new_ca || plan.new_leaf {
                let next = pki::renew(&material, plan, &self.names.sans, now)?;
                let mut updated = secret;
                updated.data = Some(next.to_secret_data());
                match self
                    .secrets
                    .replace(&self.names.secret, &PostParams::default(), &updated)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            secret = %self.names.secret,
                            new_ca = plan.new_ca,
                            new_serving_certificate = plan.new_leaf,
                            reason = plan.reason,
                            "certificates renewed"
                        );
                        material = next;
                    }
                    // Someone wrote in between (a former leader): read it next round.
                    Err(e) if is_conflict(&e) => {}
                    Err(e) => return Err(api("update Secret")(e)),
                }
            }
            if !material.ca_bundle.is_empty() {
                self.sync_ca_bundle(&material.ca_bundle).await?;
            }
        }
        Ok(Round { leader, material })
    }

    /// Renews or takes the Lease when `lease_step` says so; true when we hold it now.
    async fn hold_lease(&self, now: SystemTime) -> Result<bool, SelfManagedError> {
        let mut lease = self
            .leases
            .get(&self.names.lease)
            .await
            .map_err(api("get Lease"))?;
        let step = lease_step(lease.spec.as_ref(), &self.names.identity, now);
        let mut spec = lease.spec.take().unwrap_or_default();
        match step {
            LeaseStep::Follow => return Ok(false),
            LeaseStep::Renew => {}
            LeaseStep::Acquire => {
                spec.holder_identity = Some(self.names.identity.clone());
                spec.acquire_time = micro_time(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.renew_time = micro_time(now);
        spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        lease.spec = Some(spec);
        // The resourceVersion read above makes this a compare-and-swap: of two replicas
        // taking a free Lease at once, one gets 409 and follows.
        match self
            .leases
            .replace(&self.names.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(api("update Lease")(e)),
        }
    }

    /// Sets every webhook's `clientConfig.caBundle` to `bundle` where it differs, in one
    /// JSON Patch whose `test` ops make it fail rather than write to a reordered list.
    async fn sync_ca_bundle(&self, bundle: &str) -> Result<(), SelfManagedError> {
        let config = self
            .configs
            .get(&self.names.webhook_config)
            .await
            .map_err(api("get MutatingWebhookConfiguration"))?;
        let want = BASE64_STANDARD.encode(bundle);
        let mut ops = Vec::new();
        for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
            let current = webhook.client_config.ca_bundle.as_ref().map(|b| &b.0[..]);
            if current != Some(bundle.as_bytes()) {
                ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name}));
                ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": want}));
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| api("build caBundle patch")(kube::Error::SerdeError(e)))?;
        self.configs
            .patch(
                &self.names.webhook_config,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::<()>::Json(patch),
            )
            .await
            .map_err(api("patch MutatingWebhookConfiguration caBundle"))?;
        tracing::info!(config = %self.names.webhook_config, "caBundle updated");
        Ok(())
    }
}

async fn bounded_round(manager: &mut Manager) -> Result<Round, String> {
    match tokio::time::timeout(ROUND_TIMEOUT, manager.round(SystemTime::now())).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from the API within {ROUND_TIMEOUT:?}")),
    }
}

/// Rounds until the Secret holds a serving certificate (the leader writes it on the first
/// round; a follower waits for it), retrying every `every`; then the key to serve.
pub async fn first_certificate(
    manager: &mut Manager,
    every: Duration,
) -> (rustls::sign::CertifiedKey, String) {
    loop {
        match bounded_round(manager).await {
            Ok(round) => match super::tls::certified_key(
                round.material.tls_cert.as_bytes(),
                round.material.tls_key.as_bytes(),
            ) {
                Ok(key) => return (key, round.material.tls_cert),
                Err(e) => {
                    tracing::info!(leader = round.leader, reason = %e, "waiting for the serving certificate in the Secret")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "self-managed certificates: round failed; retrying")
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Every `every`: a round, and the served certificate swapped when the Secret's changed.
/// Failures are logged and retried next round; the current certificate stays in service.
pub async fn run(
    mut manager: Manager,
    store: std::sync::Arc<super::tls::CertStore>,
    mut served: String,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    metrics: std::sync::Arc<super::metrics::Metrics>,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let round = match bounded_round(&mut manager).await {
            Ok(round) => round,
            Err(e) => {
                tracing::warn!(error = %e, "self-managed certificates: round failed; retrying");
                continue;
            }
        };
        if round.material.tls_cert == served {
            continue;
        }
        match super::tls::certified_key(
            round.material.tls_cert.as_bytes(),
            round.material.tls_key.as_bytes(),
        ) {
            Ok(key) => {
                store.set(key);
                metrics.certificate_reloaded(true);
                served = round.material.tls_cert;
                tracing::info!("serving the renewed certificate from the Secret");
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate in the Secret not usable; still serving the previous one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: SystemTime, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: micro_time(renewed),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn lease_steps() {
        let now = SystemTime::now();
        let ago = |s| now - Duration::from_secs(s);
        assert_eq!(lease_step(None, "a", now), LeaseStep::Acquire);
        assert_eq!(
            lease_step(Some(&LeaseSpec::default()), "a", now),
            LeaseStep::Acquire
        );
        assert_eq!(
            lease_step(Some(&spec("a", ago(100), 30)), "a", now),
            LeaseStep::Renew,
            "ours, even if late"
        );
        assert_eq!(
            lease_step(Some(&spec("b", ago(10), 30)), "a", now),
            LeaseStep::Follow
        );
        assert_eq!(
            lease_step(Some(&spec("b", ago(31), 30)), "a", now),
            LeaseStep::Acquire,
            "expired"
        );
        let mut no_time = spec("b", now, 30);
        no_time.renew_time = None;
        assert_eq!(lease_step(Some(&no_time), "a", now), LeaseStep::Acquire);
    }
}
