//! Living next to a service mesh. With an Istio or Linkerd proxy in the pod, the
//! clients' WebSockets run through that proxy; if it exits when termination starts
//! (a classic sidecar gets SIGTERM at once), the drain is cut short. This keeps the
//! mesh proxy alive until the drain ends, and lets the kubelet's preStop call reach
//! the agent without the proxy (a mesh requiring mTLS would refuse it).
//! - Native mesh sidecars need nothing: they stop after the app, and the agent, which
//!   comes after them in initContainers, stops first.
//! - Classic mesh sidecars already in the pod (the mesh injected first) get the
//!   setting on the container itself.
//! - A pod the mesh will inject later (its opt-in marker, no proxy yet) gets the
//!   mesh's own annotations.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::patch::Ops;
use super::{InjectError, shown};
use crate::units::{format_duration, parse_duration};

pub const ISTIO_PROXY: &str = "istio-proxy";
pub const LINKERD_PROXY: &str = "linkerd-proxy";
const ISTIO_CONFIG: &str = "proxy.istio.io/config";
const ISTIO_EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const ISTIO_EXIT_ON_ZERO: &str = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS";
const LINKERD_WAIT: &str = "config.alpha.linkerd.io/proxy-wait-before-exit-seconds";
const LINKERD_GRACE: &str = "config.linkerd.io/shutdown-grace-period";
const LINKERD_SKIP_INBOUND: &str = "config.linkerd.io/skip-inbound-ports";

/// A mesh proxy container: not the app, whatever ports it declares.
pub fn is_proxy(name: &str) -> bool {
    name == ISTIO_PROXY || name == LINKERD_PROXY
}

/// What the mesh settings are sized to.
pub struct Drain<'a> {
    pub spec: &'a Map<String, Value>,
    pub labels: &'a Map<String, Value>,
    pub annotations: &'a Map<String, Value>,
    pub drain_timeout: Duration,
    pub grace_secs: i64,
    pub agent_port: u16,
}

enum Found {
    /// In `containers` at this index.
    Classic(usize),
    Native,
    /// Not in the pod, but the pod asks the mesh to inject it.
    Pending,
    Absent,
}

fn find(spec: &Map<String, Value>, name: &str, pending: bool) -> Found {
    let named = |c: &&Value| c.get("name").and_then(Value::as_str) == Some(name);
    let list = |key: &str| spec.get(key).and_then(Value::as_array);
    if let Some(i) = list("containers").and_then(|c| c.iter().position(|c| named(&c))) {
        return Found::Classic(i);
    }
    if list("initContainers").is_some_and(|c| c.iter().any(|c| named(&c))) {
        return Found::Native;
    }
    if pending {
        Found::Pending
    } else {
        Found::Absent
    }
}

fn text<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// Adds the settings that keep a mesh proxy alive through the drain.
pub fn keep_alive(
    d: &Drain,
    ops: &mut Ops,
    annotations: &mut Vec<(String, Value)>,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    let istio_marker = |m: &Map<String, Value>| text(m, "sidecar.istio.io/inject") == Some("true");
    let istio = find(
        d.spec,
        ISTIO_PROXY,
        istio_marker(d.labels) || istio_marker(d.annotations),
    );
    let linkerd_marker = matches!(
        text(d.annotations, "linkerd.io/inject"),
        Some("enabled" | "ingress")
    );
    let linkerd = find(d.spec, LINKERD_PROXY, linkerd_marker);
    let t = format_duration(d.drain_timeout);
    let wait_secs = d.drain_timeout.as_secs() + u64::from(d.drain_timeout.subsec_nanos() > 0);
    let g = d.grace_secs;

    match istio {
        Found::Absent | Found::Native => {}
        Found::Classic(i) => {
            let env = d.spec["containers"][i].get("env").and_then(Value::as_array);
            let current = env
                .into_iter()
                .flatten()
                .find(|e| e["name"] == ISTIO_EXIT_ON_ZERO);
            match current.map(|e| e.get("value").and_then(Value::as_str)) {
                None => {
                    let i = i.to_string();
                    ops.push(
                        &["spec", "containers", &i, "env"],
                        env.is_some(),
                        json!({"name": ISTIO_EXIT_ON_ZERO, "value": "true"}),
                    );
                    warnings.push(format!(
                        "istio-proxy is a classic sidecar: on SIGTERM it would drain for terminationDrainDuration (5s by default) and exit, cutting a drain of up to {t}; set {ISTIO_EXIT_ON_ZERO}=true on it, so it exits once the pod's connections reach zero (at most at the grace period, {g}s)"
                    ));
                }
                Some(Some("true")) => {}
                Some(other) => warnings.push(format!(
                    "istio-proxy has {ISTIO_EXIT_ON_ZERO}={}: left as is, so it may exit before a drain of up to {t} ends",
                    shown(other.unwrap_or("?"))
                )),
            }
            exclude_in_init(d, "istio-init", "-d", ops, warnings);
        }
        Found::Pending => {
            let config = istio_config(d.annotations.get(ISTIO_CONFIG), g)?;
            annotations.push((ISTIO_CONFIG.into(), json!(config)));
            warnings.push(format!(
                "Istio will inject its proxy: {ISTIO_CONFIG} sets terminationDrainDuration {g}s (the grace period) and {ISTIO_EXIT_ON_ZERO}=true, so istio-proxy stays up through a drain of up to {t} and exits once the connections reach zero"
            ));
        }
    }
    if !matches!(istio, Found::Absent) {
        let ports = with_port(text(d.annotations, ISTIO_EXCLUDE_INBOUND), d.agent_port);
        if let Some(ports) = ports {
            annotations.push((ISTIO_EXCLUDE_INBOUND.into(), json!(ports)));
        }
    }

    match linkerd {
        Found::Absent | Found::Native => {}
        Found::Classic(i) => {
            let c = &d.spec["containers"][i];
            let idx = i.to_string();
            let sleep = c
                .pointer("/lifecycle/preStop/exec/command")
                .and_then(Value::as_array);
            let current = sleep.and_then(|cmd| match &cmd[..] {
                [bin, secs] if bin == "/bin/sleep" => secs.as_str()?.parse::<u64>().ok(),
                _ => None,
            });
            let hook = json!({"exec": {"command": ["/bin/sleep", wait_secs.to_string()]}});
            let has_prestop = c
                .pointer("/lifecycle/preStop")
                .is_some_and(|p| !p.is_null());
            match (has_prestop, current) {
                (false, _) => {
                    let lifecycle = c.get("lifecycle").is_some_and(Value::is_object);
                    let path = ["spec", "containers", &idx, "lifecycle"];
                    ops.set(&path, lifecycle, "preStop", hook);
                }
                (true, Some(n)) if n < wait_secs => {
                    ops.replace(&["spec", "containers", &idx, "lifecycle", "preStop"], hook);
                }
                (true, Some(_)) => {}
                (true, None) => {
                    warnings.push(format!(
                        "linkerd-proxy already has its own preStop hook: left as is, so it may stop taking new connections before a drain of up to {t} ends"
                    ));
                }
            }
            exclude_in_init(
                d,
                "linkerd-init",
                "--inbound-ports-to-ignore",
                ops,
                warnings,
            );
            if !has_prestop || current.is_some_and(|n| n < wait_secs) {
                warnings.push(format!(
                    "linkerd-proxy is a classic sidecar: on SIGTERM it stops accepting connections (the kubelet's hook call, the agent's API calls); a preStop sleep of {wait_secs}s (what {LINKERD_WAIT} renders) keeps it serving through a drain of up to {t}"
                ));
            }
        }
        Found::Pending => {
            let current =
                text(d.annotations, LINKERD_WAIT).and_then(|v| v.trim().parse::<u64>().ok());
            if current.is_none_or(|n| n < wait_secs) {
                annotations.push((LINKERD_WAIT.into(), json!(wait_secs.to_string())));
            }
            let grace = text(d.annotations, LINKERD_GRACE);
            let short = grace
                .and_then(|v| parse_duration(v).ok())
                .is_some_and(|v| v < Duration::from_secs(g.unsigned_abs()));
            if short {
                annotations.push((LINKERD_GRACE.into(), json!(format!("{g}s"))));
            }
            warnings.push(format!(
                "Linkerd will inject its proxy: {LINKERD_WAIT}: {wait_secs} keeps linkerd-proxy serving through a drain of up to {t}{}",
                if short {
                    format!(" and {LINKERD_GRACE} was raised to the grace period, {g}s")
                } else {
                    String::new()
                }
            ));
        }
    }
    if !matches!(linkerd, Found::Absent) {
        let ports = with_port(text(d.annotations, LINKERD_SKIP_INBOUND), d.agent_port);
        if let Some(ports) = ports {
            annotations.push((LINKERD_SKIP_INBOUND.into(), json!(ports)));
        }
    }
    Ok(())
}

/// `list` (comma-separated ports) with `port` added, or `None` when already in it.
fn with_port(list: Option<&str>, port: u16) -> Option<String> {
    let list = list.unwrap_or("").trim();
    let present = list.split(',').any(|p| p.trim() == port.to_string());
    match (present, list.is_empty()) {
        (true, _) => None,
        (false, true) => Some(port.to_string()),
        (false, false) => Some(format!("{list},{port}")),
    }
}

/// The mesh's init container (istio-init, linkerd-init) had its iptables rules
/// rendered by the mesh's injector: its list of inbound ports not captured (`flag`)
/// gets the agent port too. With the mesh's CNI plugin there is no init container
/// and the annotation is read when the pod starts.
fn exclude_in_init(d: &Drain, name: &str, flag: &str, ops: &mut Ops, warnings: &mut Vec<String>) {
    let init = d.spec.get("initContainers").and_then(Value::as_array);
    let Some((i, c)) = init
        .into_iter()
        .flatten()
        .enumerate()
        .find(|(_, c)| c["name"] == name)
    else {
        return;
    };
    let args = c.get("args").and_then(Value::as_array);
    let at = args.and_then(|a| a.iter().position(|v| v == flag));
    let current = at.and_then(|k| args?.get(k + 1)?.as_str());
    match (at, current) {
        (Some(k), Some(list)) => {
            if let Some(ports) = with_port(Some(list), d.agent_port) {
                let (i, k) = (i.to_string(), (k + 1).to_string());
                ops.replace(&["spec", "initContainers", &i, "args", &k], json!(ports));
            }
        }
        _ => warnings.push(format!(
            "{name} has no {flag} list of inbound ports to leave alone: port {} stays captured by the mesh, which may refuse the kubelet's plain-text preStop call to the agent (mTLS required)",
            d.agent_port
        )),
    }
}

/// `proxy.istio.io/config` (YAML) with terminationDrainDuration at least the grace
/// period and EXIT_ON_ZERO_ACTIVE_CONNECTIONS in proxyMetadata; written as JSON.
fn istio_config(current: Option<&Value>, grace_secs: i64) -> Result<String, InjectError> {
    let field = super::options::field(ISTIO_CONFIG);
    let mut config = match current {
        None => Map::new(),
        Some(Value::String(s)) if s.trim().is_empty() => Map::new(),
        Some(Value::String(s)) => {
            let parsed = super::yaml::parse_document(s)
                .map_err(|e| InjectError::new(&field, format!("is not YAML: {e}")))?;
            match parsed {
                Value::Object(m) => m,
                Value::Null => Map::new(),
                _ => return Err(InjectError::new(field, "is not a mapping")),
            }
        }
        Some(_) => return Err(InjectError::new(field, "is not a string")),
    };
    let grace = Duration::from_secs(grace_secs.unsigned_abs());
    let long_enough = config
        .get("terminationDrainDuration")
        .and_then(Value::as_str)
        .and_then(|v| parse_duration(v).ok())
        .is_some_and(|v| v >= grace);
    if !long_enough {
        config.insert(
            "terminationDrainDuration".into(),
            json!(format!("{grace_secs}s")),
        );
    }
    let metadata = config.entry("proxyMetadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        return Err(InjectError::new(field, "proxyMetadata is not a mapping"));
    }
    metadata.as_object_mut().into_iter().for_each(|m| {
        m.entry(ISTIO_EXIT_ON_ZERO).or_insert(json!("true"));
    });
    Ok(Value::Object(config).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_added_once() {
        assert_eq!(with_port(None, 19901).as_deref(), Some("19901"));
        assert_eq!(
            with_port(Some("15090, 15021"), 19901).as_deref(),
            Some("15090, 15021,19901")
        );
        assert_eq!(with_port(Some("19901,1"), 19901), None);
    }

    #[test]
    fn istio_config_merged() {
        let c = istio_config(
            Some(&json!(
                "holdApplicationUntilProxyStarts: true\nterminationDrainDuration: 1m30s\n"
            )),
            45,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["terminationDrainDuration"], "1m30s");
        assert_eq!(v["holdApplicationUntilProxyStarts"], true);
        assert_eq!(v["proxyMetadata"][ISTIO_EXIT_ON_ZERO], "true");
        let c = istio_config(None, 45).unwrap();
        assert!(c.contains(r#""terminationDrainDuration":"45s""#), "{c}");
        assert!(istio_config(Some(&json!("[1")), 45).is_err());
    }
}
