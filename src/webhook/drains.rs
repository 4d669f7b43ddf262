//! `wsdrain_drains_total{namespace,workload,outcome}`: drain outcomes counted cluster-wide
//! from the Events the agents publish, so the history outlives the drained pods (whose own
//! metrics die with them). The webhook runs all the time, which makes it the place to count.
//!
//! A kube-runtime watcher on core/v1 Events, filtered on the server by the agents'
//! reporting component. The first list after start is a baseline, not counted: those
//! drains were counted by the process before a restart, and counting them again would
//! make `increase()` see them twice. Lists after a reconnect count only what is new.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::metrics::{DrainLabels, Metrics};
use crate::kube::REPORTING_CONTROLLER;

/// The outcome label for an Event reason; None for reasons that are not a finished drain.
pub fn outcome_of(reason: &str) -> Option<&'static str> {
    match reason {
        crate::kube::events::DRAIN_COMPLETED => Some("drained"),
        crate::kube::events::DRAIN_DEADLINE_EXCEEDED => Some("deadline_exceeded"),
        _ => None,
    }
}

/// The workload a pod belongs to, from its generated name: Deployment pods are
/// `<name>-<template hash>-<5>`, DaemonSet and Job pods `<name>-<5>`, StatefulSet pods
/// `<name>-<ordinal>`. Generated parts use Kubernetes' safe alphabet (no vowels), so
/// `web-proxy` stays whole. Keeps the label's cardinality at the workloads', not the pods'.
pub fn workload_of(pod: &str) -> &str {
    const SAFE: &str = "bcdfghjklmnpqrstvwxz2456789";
    let generated = |s: &str, len: std::ops::RangeInclusive<usize>| {
        len.contains(&s.len()) && s.chars().all(|c| SAFE.contains(c))
    };
    let Some((rest, last)) = pod.rsplit_once('-') else {
        return pod;
    };
    if rest.is_empty() {
        return pod;
    }
    if !last.is_empty() && last.chars().all(|c| c.is_ascii_digit()) {
        return rest;
    }
    if !generated(last, 5..=5) {
        return pod;
    }
    match rest.rsplit_once('-') {
        Some((name, hash)) if !name.is_empty() && generated(hash, 6..=10) => name,
        _ => rest,
    }
}

/// How many times the Event has happened (a repeated Event becomes a series).
fn occurrences(event: &Event) -> u64 {
    let series = event.series.as_ref().and_then(|s| s.count);
    let count = series.or(event.count).unwrap_or(1);
    u64::try_from(count).unwrap_or(0).max(1)
}

/// What has been counted, by Event uid, so that a re-list or an update of a series counts
/// only what is new.
#[derive(Debug, Default)]
pub struct Tally {
    seen: HashMap<String, u64>,
    listing: Option<HashSet<String>>,
    baseline_done: bool,
}

impl Tally {
    /// A (re-)list starts.
    pub fn list_started(&mut self) {
        self.listing = Some(HashSet::new());
    }

    /// The list is complete: Events not in it are gone.
    pub fn list_done(&mut self) {
        if let Some(listed) = self.listing.take() {
            self.seen.retain(|uid, _| listed.contains(uid));
        }
        self.baseline_done = true;
    }

    /// An Event seen in a list or a watch: what to add to the counter, if anything.
    pub fn observe(&mut self, event: &Event) -> Option<(DrainLabels, u64)> {
        let uid = event.metadata.uid.clone()?;
        if let Some(listed) = self.listing.as_mut() {
            listed.insert(uid.clone());
        }
        let outcome = outcome_of(event.reason.as_deref()?)?;
        let now = occurrences(event);
        let before = self.seen.insert(uid, now).unwrap_or(0);
        if !self.baseline_done || now <= before {
            return None;
        }
        let object = &event.involved_object;
        let labels = DrainLabels {
            namespace: object
                .namespace
                .clone()
                .or_else(|| event.metadata.namespace.clone())
                .unwrap_or_default(),
            workload: workload_of(object.name.as_deref().unwrap_or("")).to_owned(),
            outcome: outcome.to_owned(),
        };
        Some((labels, now - before))
    }

    pub fn forget(&mut self, event: &Event) {
        if let Some(uid) = &event.metadata.uid {
            self.seen.remove(uid);
        }
    }
}

/// The server-side filter: only the agents' Events.
pub fn field_selector() -> String {
    format!("reportingComponent={REPORTING_CONTROLLER}")
}

/// Watches the agents' Events cluster-wide until `stop`, counting finished drains into
/// `metrics`. Errors (RBAC, API down) are logged and retried with kube-runtime's backoff.
pub async fn count(client: kube::Client, metrics: Arc<Metrics>, stop: CancellationToken) {
    let events: Api<Event> = Api::all(client);
    let config = watcher::Config::default().fields(&field_selector());
    let stream = watcher(events, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut tally = Tally::default();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = stream.next() => next,
        };
        match next {
            Some(Ok(watcher::Event::Init)) => tally.list_started(),
            Some(Ok(watcher::Event::InitApply(e) | watcher::Event::Apply(e))) => {
                if let Some((labels, times)) = tally.observe(&e) {
                    metrics.drains_finished(&labels, times);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => tally.list_done(),
            Some(Ok(watcher::Event::Delete(e))) => tally.forget(&e),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching drain Events failed; retrying (wsdrain_drains_total pauses)")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EventSeries, ObjectReference};
    use kube::api::ObjectMeta;

    fn event(uid: &str, reason: &str, pod: &str, series: Option<i32>) -> Event {
        Event {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                namespace: Some("chat".into()),
                ..ObjectMeta::default()
            },
            reason: Some(reason.into()),
            involved_object: ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("chat".into()),
                name: Some(pod.into()),
                ..ObjectReference::default()
            },
            series: series.map(|count| EventSeries {
                count: Some(count),
                ..EventSeries::default()
            }),
            ..Event::default()
        }
    }

    #[test]
    fn workloads_from_generated_pod_names() {
        for (pod, workload) in [
            ("ws-7d9f6c5b8d-x2x9z", "ws"),
            ("chat-api-5c8d7b9f4-qzt7k", "chat-api"),
            ("node-agent-x7z2k", "node-agent"),
            ("db-0", "db"),
            ("db-12", "db"),
            ("web-proxy", "web-proxy"),
            ("single", "single"),
            ("-", "-"),
            ("", ""),
        ] {
            assert_eq!(workload_of(pod), workload, "{pod}");
        }
    }

    #[test]
    fn first_list_is_a_baseline_then_new_and_repeated_events_count_once() {
        let mut tally = Tally::default();
        tally.list_started();
        assert_eq!(
            tally.observe(&event("old", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)),
            None
        );
        tally.list_done();

        let (labels, n) = tally
            .observe(&event("a", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None))
            .expect("counted");
        assert_eq!(
            (
                labels.namespace.as_str(),
                labels.workload.as_str(),
                labels.outcome.as_str(),
                n
            ),
            ("chat", "ws", "drained", 1)
        );
        // The same Event again (a re-sent MODIFIED): nothing new.
        assert_eq!(
            tally.observe(&event("a", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)),
            None
        );
        // A series grows from 2 to 3: one more.
        let late = "ws-7d9f6c5b8d-b4n6q";
        assert_eq!(
            tally
                .observe(&event("b", "DrainDeadlineExceeded", late, Some(2)))
                .map(|x| x.1),
            Some(2)
        );
        let (labels, n) = tally
            .observe(&event("b", "DrainDeadlineExceeded", late, Some(3)))
            .expect("counted");
        assert_eq!((labels.outcome.as_str(), n), ("deadline_exceeded", 1));
        // Not a finished drain.
        assert_eq!(tally.observe(&event("c", "DrainStarted", late, None)), None);
        assert_eq!(
            tally.observe(&event("d", "AdminEndpointFailing", late, None)),
            None
        );

        // A re-list after a reconnect counts only what it had not seen.
        tally.list_started();
        assert_eq!(
            tally.observe(&event("a", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)),
            None
        );
        assert!(
            tally
                .observe(&event("e", "DrainCompleted", "db-0", None))
                .is_some()
        );
        tally.list_done();
        assert!(
            !tally.seen.contains_key("b"),
            "gone from the list, forgotten"
        );
    }
}
