//! The decision for one pod: opt-in, idempotency, app container, ports and grace
//! period, then the operations for sidecar or wrap mode.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::containers::{self, AgentPlan, COPY_NAME, Proxy};
use super::mesh;
use super::options::{self, Grace, Mode, Options, PortRef, Sidecar};
use super::patch::Ops;
use super::status::{Status, VERSION};
use super::{
    AGENT_NAME, Decision, INJECT_LABEL, InjectError, InjectSettings, STATUS_ANNOTATION, clip, shown,
};
use crate::units::format_duration;

/// The readiness-gate condition the agent patches (one name for both sides).
pub use crate::kube::SERVING_CONDITION as READINESS_CONDITION;
const DEFAULT_GRACE_SECS: i64 = 30;
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Why `decide` stopped early.
enum Stop {
    Skip(String),
    Error(InjectError),
}

impl From<InjectError> for Stop {
    fn from(e: InjectError) -> Self {
        Stop::Error(e)
    }
}

fn skip<T>(reason: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Skip(reason.into()))
}

pub fn decide(pod: &Value, settings: &InjectSettings) -> Result<Decision, InjectError> {
    let status = match Status::of(pod) {
        Ok(None) => return fresh(pod, settings),
        Ok(Some(status)) => status,
        Err(_) => {
            let raw = pod["metadata"]["annotations"][STATUS_ANNOTATION].to_string();
            return Ok(Decision::Skip {
                reason: format!(
                    "already injected ({STATUS_ANNOTATION}: {}, written by an older wsdrain: not updated)",
                    clip(&raw)
                ),
            });
        }
    };
    if status.version == VERSION && status.image == injected_image(pod, settings) {
        return Ok(Decision::Skip {
            reason: format!(
                "already injected (wsdrain {}, image {})",
                status.version,
                shown(&status.image)
            ),
        });
    }
    // Injected by another version or with another image: undo, inject again, and
    // patch the difference.
    let original = status.undo(pod)?;
    match fresh(&original, settings)? {
        Decision::Skip { reason } => Ok(Decision::Skip {
            reason: format!(
                "injected by wsdrain {} and not updated: {reason}",
                status.version
            ),
        }),
        Decision::Patch {
            patch,
            mut warnings,
        } => {
            let mut updated = original;
            json_patch::patch(&mut updated, &patch)
                .map_err(|e| InjectError::new("spec", format!("patch does not apply: {e}")))?;
            warnings.push(format!(
                "updated the agent injected by wsdrain {} (image {}) to wsdrain {VERSION} (image {})",
                status.version,
                shown(&status.image),
                shown(&settings.image)
            ));
            Ok(Decision::Patch {
                patch: json_patch::diff(pod, &updated),
                warnings,
            })
        }
    }
}

/// The pod as it was before injection; `None` when it carries no status.
pub fn undo(pod: &Value) -> Result<Option<Value>, InjectError> {
    Status::of(pod)?.map(|s| s.undo(pod)).transpose()
}

/// Injection into a pod that carries no status.
fn fresh(pod: &Value, settings: &InjectSettings) -> Result<Decision, InjectError> {
    let Planned {
        mut ops,
        warnings,
        annotations,
    } = match plan(pod, settings) {
        Ok(planned) => planned,
        Err(Stop::Skip(reason)) => return Ok(Decision::Skip { reason }),
        Err(Stop::Error(e)) => return Err(e),
    };
    // The status records the undo patch, computed on the pod with a placeholder
    // status so that undoing removes the annotation (and a map created for it) too.
    let mut injected = pod.clone();
    let mut probe = ops.clone();
    let mut with_status = annotations.clone();
    with_status.push((STATUS_ANNOTATION.to_string(), json!("")));
    add_annotations(pod, &mut probe, with_status);
    json_patch::patch(&mut injected, &probe.into_patch()?)
        .map_err(|e| InjectError::new("spec", format!("patch does not apply: {e}")))?;
    let image = injected_image(pod, settings);
    let status = Status::new(&image, pod, &injected);
    let mut with_status = annotations;
    with_status.push((STATUS_ANNOTATION.to_string(), json!(status.to_annotation())));
    add_annotations(pod, &mut ops, with_status);
    Ok(Decision::Patch {
        patch: ops.into_patch()?,
        warnings: warnings.iter().map(|w| clip(w)).collect(),
    })
}

/// The agent image for `pod`: its `wsdrain.io/image`, else the injector's.
fn injected_image(pod: &Value, settings: &InjectSettings) -> String {
    pod.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .and_then(|a| Options::parse(a).ok())
        .and_then(|o| o.image)
        .unwrap_or_else(|| settings.image.clone())
}

/// Sets annotations (`add` replaces an existing key), creating the map, or metadata
/// itself (templates may lack it), when absent.
fn add_annotations(pod: &Value, ops: &mut Ops, annotations: Vec<(String, Value)>) {
    let map = || Value::Object(annotations.iter().cloned().collect());
    match pod.get("metadata") {
        None | Some(Value::Null) => ops.add(&["metadata"], json!({"annotations": map()})),
        Some(metadata) if !metadata.get("annotations").is_some_and(Value::is_object) => {
            ops.add(&["metadata", "annotations"], map());
        }
        Some(_) => {
            for (k, v) in annotations {
                ops.add(&["metadata", "annotations", &k], v);
            }
        }
    }
}

/// The object at `path`, `None` when absent or null, an error when it is another type.
fn object<'a>(
    v: &'a Value,
    path: &[&str],
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, InjectError> {
    let mut cur = v;
    for key in path {
        match cur.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(next) => cur = next,
        }
    }
    cur.as_object()
        .map(Some)
        .ok_or_else(|| InjectError::new(field, "is not an object"))
}

fn array<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'a Vec<Value>>, InjectError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(InjectError::new(format!("{field}.{key}"), "is not a list")),
    }
}

fn name_of(c: &Value) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or("")
}

/// What `plan` decided: operations, warnings, and annotations to set on the pod.
struct Planned {
    ops: Ops,
    warnings: Vec<String>,
    annotations: Vec<(String, Value)>,
}

fn plan(pod: &Value, settings: &InjectSettings) -> Result<Planned, Stop> {
    let empty = Map::new();
    let labels = object(pod, &["metadata", "labels"], "metadata.labels")?.unwrap_or(&empty);
    let annotations_obj = object(pod, &["metadata", "annotations"], "metadata.annotations")?;
    let annotations = annotations_obj.unwrap_or(&empty);

    match labels.get(INJECT_LABEL).map(|v| v.as_str()) {
        Some(Some("false")) => return skip(format!("opted out by label {INJECT_LABEL}=false")),
        Some(Some("true")) => {}
        None if settings.namespace_opted_in => {}
        None => {
            return skip(format!(
                "not opted in (pod label {INJECT_LABEL}=true or namespace label wsdrain.io/injection=enabled)"
            ));
        }
        Some(other) => {
            let value = other.map_or_else(|| "a non-string".into(), shown);
            return Err(InjectError::new(
                format!("metadata.labels[\"{INJECT_LABEL}\"]"),
                format!("{value} is neither \"true\" nor \"false\""),
            )
            .into());
        }
    }

    let spec =
        object(pod, &["spec"], "spec")?.ok_or_else(|| InjectError::new("spec", "missing"))?;
    let containers = match array(spec, "containers", "spec")? {
        Some(c) if !c.is_empty() => c,
        _ => return Err(InjectError::new("spec.containers", "no containers").into()),
    };
    let init = array(spec, "initContainers", "spec")?;
    let mut options = Options::parse(annotations)?;
    let mut warnings = options.warnings.clone();
    if options.mode == Mode::Wrap {
        for (set, name) in [
            (options.service.is_some(), "service"),
            (options.rebalance, "rebalance"),
            (options.fleet_close_rate.is_some(), "fleet-close-rate"),
            (options.log_level.is_some(), "log-level"),
        ] {
            if set {
                warnings.push(format!(
                    "wsdrain.io/{name} ignored: wrap mode runs no agent container to give it to"
                ));
            }
        }
        (options.service, options.rebalance) = (None, false);
        (options.fleet_close_rate, options.log_level) = (None, None);
    }

    check_ports(containers, "spec.containers")?;
    check_ports(init.into_iter().flatten(), "spec.initContainers")?;
    let all = || containers.iter().chain(init.into_iter().flatten());
    if let Some(c) = all().find(|c| [AGENT_NAME, COPY_NAME].contains(&name_of(c))) {
        return skip(format!(
            "a container named {} already exists",
            shown(name_of(c))
        ));
    }
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return skip(
            "hostNetwork pods share the node's sockets: the agent cannot count this pod's connections",
        );
    }
    if let Some(c) = all().find(|c| declared_ports(c).iter().any(|p| p.1 == settings.agent_port)) {
        return skip(format!(
            "container {} uses port {}, the agent's port",
            shown(name_of(c)),
            settings.agent_port
        ));
    }

    let app_idx = choose_app(containers, annotations, &options, &mut warnings)?;
    let app = &containers[app_idx];
    let app_name = name_of(app).to_string();
    let app_shown = shown(&app_name);
    let ports = match resolve_ports(app, &options)? {
        p if p.is_empty() => {
            return skip(format!(
                "container {app_shown} declares no TCP containerPorts; name the app ports in wsdrain.io/ports"
            ));
        }
        p => p,
    };

    let mut ops = Ops::default();
    let mut new_annotations = Vec::new();

    let (grace_secs, drain_timeout) = fit_grace(spec, &options, settings, &mut ops, &mut warnings)?;
    let idx = app_idx.to_string();
    let proxy = match options.mode {
        Mode::Proxy => Some(proxy_port(
            app,
            &idx,
            &ports,
            &options,
            settings,
            all(),
            &mut ops,
            &mut warnings,
        )?),
        _ => None,
    };
    let plan = AgentPlan {
        settings,
        options: &options,
        ports: &ports,
        grace_secs,
        drain_timeout,
        image: options.image.as_deref().unwrap_or(&settings.image),
        proxy,
    };
    let app_path = ["spec", "containers", idx.as_str()];
    let app_obj = app
        .as_object()
        .ok_or_else(|| InjectError::new(format!("spec.containers[{idx}]"), "is not an object"))?;
    let field = format!("spec.containers[{idx}]");

    match options.mode {
        Mode::Sidecar | Mode::Proxy => {
            let native = match (options.sidecar, settings.native_sidecars) {
                (Sidecar::Classic, _) | (Sidecar::Auto, false) => false,
                (Sidecar::Auto, true) | (Sidecar::Native, true) => true,
                (Sidecar::Native, false) => {
                    warnings.push(
                        "wsdrain.io/sidecar: native asked for, but the cluster predates native sidecars (1.29): injected a classic sidecar container".into(),
                    );
                    false
                }
            };
            let agent = containers::agent(&plan, native);
            if native {
                ops.push(&["spec", "initContainers"], init.is_some(), agent);
            } else {
                if let Some(policy @ ("Never" | "OnFailure")) =
                    spec.get("restartPolicy").and_then(Value::as_str)
                {
                    warnings.push(format!(
                        "classic sidecar in a pod with restartPolicy {policy}: the agent keeps running after the app exits, so a Job's pod never completes; use native sidecars (wsdrain.io/sidecar: native)"
                    ));
                }
                ops.push(&["spec", "containers"], true, agent);
            }
            let lifecycle = object(app, &["lifecycle"], &format!("{field}.lifecycle"))?;
            if lifecycle.is_some_and(|l| l.get("preStop").is_some_and(|p| !p.is_null())) {
                warnings.push(format!(
                    "container {app_shown} already has a preStop hook: kept, no wsdrain hook added, so the drain will not hold its SIGTERM"
                ));
            } else {
                let mut p = app_path.to_vec();
                p.push("lifecycle");
                ops.set(
                    &p,
                    lifecycle.is_some(),
                    "preStop",
                    containers::prestop(settings),
                );
            }
        }
        Mode::Wrap => {
            let command = match array(app_obj, "command", &field)? {
                Some(c) if !c.is_empty() => c,
                _ => {
                    return skip(format!(
                        "wsdrain.io/mode: wrap needs the command of container {app_shown} in the pod spec (it runs the image ENTRYPOINT, which the injector cannot see); set command, or use mode sidecar"
                    ));
                }
            };
            ops.push(
                &["spec", "initContainers"],
                init.is_some(),
                containers::copy_init(&plan),
            );
            ops.push(
                &["spec", "volumes"],
                spec.get("volumes").is_some_and(Value::is_array),
                containers::bin_volume(),
            );
            let with = |key: &'static str| {
                let mut p = app_path.to_vec();
                p.push(key);
                p
            };
            ops.push(
                &with("volumeMounts"),
                array(app_obj, "volumeMounts", &field)?.is_some(),
                containers::bin_mount(),
            );
            let mut env_exists = array(app_obj, "env", &field)?.is_some();
            for e in containers::wrap_env() {
                ops.push(&with("env"), env_exists, e);
                env_exists = true;
            }
            ops.replace(&with("command"), containers::wrap_command(&plan, command));
        }
    }

    if options.readiness_gate {
        let gates = array(spec, "readinessGates", "spec")?;
        let present = gates
            .into_iter()
            .flatten()
            .any(|g| g.get("conditionType").and_then(Value::as_str) == Some(READINESS_CONDITION));
        if !present {
            ops.push(
                &["spec", "readinessGates"],
                gates.is_some(),
                json!({"conditionType": READINESS_CONDITION}),
            );
        }
    }
    mesh::keep_alive(
        &mesh::Drain {
            spec,
            labels,
            annotations,
            drain_timeout,
            grace_secs,
            agent_port: settings.agent_port,
        },
        &mut ops,
        &mut new_annotations,
        &mut warnings,
    )?;
    Ok(Planned {
        ops,
        warnings,
        annotations: new_annotations,
    })
}

/// Proxy mode: the port the agent listens on, and the app's containerPort name moved
/// to it so that Services targeting the name reach the proxy. Probes of the app that
/// named the port get its number instead (a port name resolves per container).
#[allow(clippy::too_many_arguments)]
fn proxy_port<'a>(
    app: &Value,
    idx: &str,
    ports: &[u16],
    options: &Options,
    settings: &InjectSettings,
    mut all: impl Iterator<Item = &'a Value>,
    ops: &mut Ops,
    warnings: &mut Vec<String>,
) -> Result<Proxy, InjectError> {
    let key = options::field("wsdrain.io/proxy-port");
    let app_port = ports[0];
    let listen = match options.proxy_port {
        Some(p) => p,
        None => app_port.checked_add(10000).ok_or_else(|| {
            InjectError::new(
                &key,
                format!("app port {app_port} + 10000 is over 65535: set the proxy port"),
            )
        })?,
    };
    if listen == settings.agent_port || listen == app_port {
        return Err(InjectError::new(
            key,
            format!("{listen} is the agent's or the app's own port"),
        ));
    }
    if let Some(c) = all.find(|c| declared_ports(c).iter().any(|p| p.1 == listen)) {
        return Err(InjectError::new(
            key,
            format!(
                "{listen} is already a port of container {}",
                shown(name_of(c))
            ),
        ));
    }
    let declared = app.get("ports").and_then(Value::as_array);
    let entry = declared.into_iter().flatten().position(|p| {
        p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(app_port))
            && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP"
    });
    let name = entry
        .and_then(|j| declared?.get(j)?.get("name")?.as_str())
        .map(str::to_string);
    let app_shown = shown(name_of(app));
    if ports.len() > 1 {
        warnings.push(format!(
            "wsdrain.io/mode: proxy puts the proxy in front of port {app_port} only; the other app ports are counted, not proxied"
        ));
    }
    match (&name, entry) {
        (Some(name), Some(j)) => {
            let j = j.to_string();
            ops.remove(&["spec", "containers", idx, "ports", &j, "name"]);
            for (probe, handler) in named_port_users(app, name) {
                ops.replace(
                    &["spec", "containers", idx, probe, handler, "port"],
                    json!(app_port),
                );
            }
            warnings.push(format!(
                "wsdrain.io/mode: proxy: the agent listens on {listen} and forwards to the app on 127.0.0.1:{app_port}; the port name {} moved from container {app_shown} to the agent, so Services with targetPort: {} now go through the proxy. The injector cannot see Services: one with targetPort: {app_port} (a number) still reaches the app directly and its sessions get no close frame; target the port by name or the proxy port {listen}",
                shown(name),
                shown(name)
            ));
        }
        _ => warnings.push(format!(
            "wsdrain.io/mode: proxy: the agent listens on {listen} and forwards to the app on 127.0.0.1:{app_port}, but the app's containerPort {app_port} has no name to move: only Services with targetPort: {listen} go through the proxy; name the containerPort and target it by name"
        )),
    }
    Ok(Proxy {
        listen,
        app: app_port,
        name,
    })
}

/// (probe, handler) of the app's probes that use the port `name`.
fn named_port_users(app: &Value, name: &str) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        for handler in ["httpGet", "tcpSocket"] {
            if app
                .pointer(&format!("/{probe}/{handler}/port"))
                .and_then(Value::as_str)
                == Some(name)
            {
                out.push((probe, handler));
            }
        }
    }
    out
}

/// App container: annotation, else kubectl's default-container, else the only
/// container declaring TCP ports, else the first.
fn choose_app(
    containers: &[Value],
    annotations: &Map<String, Value>,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<usize, InjectError> {
    let find = |name: &str| containers.iter().position(|c| name_of(c) == name);
    if let Some(name) = &options.app_container {
        return find(name).ok_or_else(|| {
            let names: Vec<&str> = containers.iter().map(name_of).collect();
            InjectError::new(
                options::field("wsdrain.io/app-container"),
                format!(
                    "no container named {} (containers: {})",
                    shown(name),
                    names.join(", ")
                ),
            )
        });
    }
    if let Some(name) = annotations.get(DEFAULT_CONTAINER).and_then(Value::as_str) {
        match find(name) {
            Some(i) => return Ok(i),
            None => warnings.push(format!(
                "{DEFAULT_CONTAINER} names {}, which is not a container: chose the app container by its ports instead",
                shown(name)
            )),
        }
    }
    // A logger or other helper without ports must not be taken for the app; a mesh
    // proxy's ports do not count.
    let with_tcp: Vec<usize> = (0..containers.len())
        .filter(|&i| !mesh::is_proxy(name_of(&containers[i])))
        .filter(|&i| declared_ports(&containers[i]).iter().any(|p| p.2 == "TCP"))
        .collect();
    Ok(match with_tcp[..] {
        [only] => only,
        _ => 0,
    })
}

/// Every containerPort must be a port number: the API server would refuse the pod,
/// and a dropped one would leave the agent counting nothing.
fn check_ports<'a>(
    containers: impl IntoIterator<Item = &'a Value>,
    list: &str,
) -> Result<(), InjectError> {
    for (i, c) in containers.into_iter().enumerate() {
        let Some(ports) = c.get("ports").filter(|p| !p.is_null()) else {
            continue;
        };
        let ports = ports
            .as_array()
            .ok_or_else(|| InjectError::new(format!("{list}[{i}].ports"), "is not a list"))?;
        for (j, p) in ports.iter().enumerate() {
            let field = format!("{list}[{i}].ports[{j}].containerPort");
            match p.get("containerPort") {
                Some(v) if v.as_u64().is_some_and(|n| (1..=65535).contains(&n)) => {}
                Some(v) => {
                    return Err(InjectError::new(
                        field,
                        format!("{} is not a port number (1-65535)", clip(&v.to_string())),
                    ));
                }
                None => return Err(InjectError::new(field, "missing")),
            }
        }
    }
    Ok(())
}

/// (name, port, protocol) of each well-formed containerPort.
fn declared_ports(c: &Value) -> Vec<(Option<&str>, u16, &str)> {
    c.get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p
                .get("containerPort")?
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())?;
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            Some((p.get("name").and_then(Value::as_str), port, proto))
        })
        .collect()
}

fn resolve_ports(app: &Value, options: &Options) -> Result<Vec<u16>, InjectError> {
    let declared = declared_ports(app);
    let mut out = Vec::new();
    match &options.ports {
        Some(refs) => {
            for r in refs {
                let port = match r {
                    PortRef::Number(n) => *n,
                    PortRef::Name(name) => declared
                        .iter()
                        .find(|p| p.0 == Some(name.as_str()))
                        .map(|p| p.1)
                        .ok_or_else(|| {
                            InjectError::new(
                                options::field("wsdrain.io/ports"),
                                format!(
                                    "container {} has no containerPort named {}",
                                    shown(name_of(app)),
                                    shown(name)
                                ),
                            )
                        })?,
                };
                out.push(port);
            }
        }
        None => out.extend(declared.iter().filter(|p| p.2 == "TCP").map(|p| p.1)),
    }
    let mut seen = Vec::new();
    out.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
    Ok(out)
}

/// Makes drain timeout + app reserve fit in terminationGracePeriodSeconds:
/// raise the grace period or shrink the drain timeout. Returns (grace, drain timeout).
fn fit_grace(
    spec: &Map<String, Value>,
    options: &Options,
    settings: &InjectSettings,
    ops: &mut Ops,
    warnings: &mut Vec<String>,
) -> Result<(i64, Duration), Stop> {
    const FIELD: &str = "spec.terminationGracePeriodSeconds";
    let (grace_secs, stated) = match spec.get("terminationGracePeriodSeconds") {
        None | Some(Value::Null) => (DEFAULT_GRACE_SECS, false),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => (n, true),
            _ => {
                return Err(
                    InjectError::new(FIELD, format!("{v} is not a number of seconds")).into(),
                );
            }
        },
    };
    let reserve = settings.app_reserve;
    let grace = Duration::from_secs(grace_secs.unsigned_abs());
    let default_drain =
        Duration::from_secs(DEFAULT_GRACE_SECS.unsigned_abs()).saturating_sub(reserve);
    let wanted = options.drain_timeout.unwrap_or(if grace > reserve {
        grace - reserve
    } else {
        default_drain
    });
    if wanted + reserve <= grace {
        return Ok((grace_secs, wanted));
    }
    let (w, r) = (format_duration(wanted), format_duration(reserve));
    match options.grace {
        Grace::Raise => {
            let total = wanted + reserve;
            let raised = i64::try_from(total.as_secs() + u64::from(total.subsec_nanos() > 0))
                .map_err(|_| InjectError::new(FIELD, "overflow"))?;
            let path = ["spec", "terminationGracePeriodSeconds"];
            if stated {
                ops.replace(&path, json!(raised));
            } else {
                ops.add(&path, json!(raised));
            }
            warnings.push(format!(
                "terminationGracePeriodSeconds raised from {grace_secs} to {raised} so that drain timeout {w} + app reserve {r} fit (wsdrain.io/grace: raise)"
            ));
            Ok((raised, wanted))
        }
        Grace::Clamp if grace > reserve => {
            let drain = grace - reserve;
            warnings.push(format!(
                "drain timeout shrunk from {w} to {} so that it + app reserve {r} fit terminationGracePeriodSeconds {grace_secs}; set wsdrain.io/grace: raise to keep {w}",
                format_duration(drain)
            ));
            Ok((grace_secs, drain))
        }
        Grace::Clamp => skip(format!(
            "terminationGracePeriodSeconds {grace_secs} leaves no drain time after the app reserve {r}; raise it or set wsdrain.io/grace: raise"
        )),
    }
}
