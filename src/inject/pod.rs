//! The decision for one pod: opt-in, idempotency, app container, ports and grace
//! period, then the operations for sidecar or wrap mode.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::containers::{self, AgentPlan, COPY_NAME};
use super::options::{self, Grace, Mode, Options, PortRef, Sidecar};
use super::patch::Ops;
use super::{AGENT_NAME, Decision, INJECT_LABEL, InjectError, InjectSettings, STATUS_ANNOTATION};
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
    match plan(pod, settings) {
        Ok((ops, warnings)) => Ok(Decision::Patch {
            patch: ops.into_patch()?,
            warnings,
        }),
        Err(Stop::Skip(reason)) => Ok(Decision::Skip { reason }),
        Err(Stop::Error(e)) => Err(e),
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

fn plan(pod: &Value, settings: &InjectSettings) -> Result<(Ops, Vec<String>), Stop> {
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
            return Err(InjectError::new(
                format!("metadata.labels[\"{INJECT_LABEL}\"]"),
                format!("{other:?} is neither \"true\" nor \"false\""),
            )
            .into());
        }
    }
    if let Some(status) = annotations.get(STATUS_ANNOTATION) {
        let status = status.as_str().unwrap_or("?");
        return skip(format!("already injected ({STATUS_ANNOTATION}: {status})"));
    }

    let spec =
        object(pod, &["spec"], "spec")?.ok_or_else(|| InjectError::new("spec", "missing"))?;
    let containers = match array(spec, "containers", "spec")? {
        Some(c) if !c.is_empty() => c,
        _ => return Err(InjectError::new("spec.containers", "no containers").into()),
    };
    let init = array(spec, "initContainers", "spec")?;
    let options = Options::parse(annotations)?;
    let mut warnings = options.warnings.clone();

    let all = || containers.iter().chain(init.into_iter().flatten());
    if let Some(c) = all().find(|c| [AGENT_NAME, COPY_NAME].contains(&name_of(c))) {
        return skip(format!("a container named {:?} already exists", name_of(c)));
    }
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return skip(
            "hostNetwork pods share the node's sockets: the agent cannot count this pod's connections",
        );
    }
    if let Some(c) = all().find(|c| declared_ports(c).iter().any(|p| p.1 == settings.agent_port)) {
        return skip(format!(
            "container {:?} uses port {}, the agent's port",
            name_of(c),
            settings.agent_port
        ));
    }

    let app_idx = choose_app(containers, annotations, &options, &mut warnings)?;
    let app = &containers[app_idx];
    let app_name = name_of(app).to_string();
    let ports = match resolve_ports(app, &options)? {
        p if p.is_empty() => {
            return skip(format!(
                "container {app_name:?} declares no TCP containerPorts; name the app ports in wsdrain.io/ports"
            ));
        }
        p => p,
    };

    let mut ops = Ops::default();
    if pod.get("metadata").is_none_or(Value::is_null) {
        // Templates may lack metadata altogether.
        ops.add(
            &["metadata"],
            json!({"annotations": {STATUS_ANNOTATION: "injected"}}),
        );
    } else {
        ops.set(
            &["metadata", "annotations"],
            annotations_obj.is_some(),
            STATUS_ANNOTATION,
            json!("injected"),
        );
    }

    let (grace_secs, drain_timeout) = fit_grace(spec, &options, settings, &mut ops, &mut warnings)?;
    let plan = AgentPlan {
        settings,
        options: &options,
        ports: &ports,
        grace_secs,
        drain_timeout,
    };
    let idx = app_idx.to_string();
    let app_path = ["spec", "containers", idx.as_str()];
    let app_obj = app
        .as_object()
        .ok_or_else(|| InjectError::new(format!("spec.containers[{idx}]"), "is not an object"))?;
    let field = format!("spec.containers[{idx}]");

    match options.mode {
        Mode::Sidecar => {
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
                    "container {app_name:?} already has a preStop hook: kept, no wsdrain hook added, so the drain will not hold its SIGTERM"
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
                        "wsdrain.io/mode: wrap needs the command of container {app_name:?} in the pod spec (it runs the image ENTRYPOINT, which the injector cannot see); set command, or use mode sidecar"
                    ));
                }
            };
            ops.push(
                &["spec", "initContainers"],
                init.is_some(),
                containers::copy_init(settings),
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
    Ok((ops, warnings))
}

/// App container: annotation, else kubectl's default-container, else the first.
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
                    "no container named {name:?} (containers: {})",
                    names.join(", ")
                ),
            )
        });
    }
    if let Some(name) = annotations.get(DEFAULT_CONTAINER).and_then(Value::as_str) {
        match find(name) {
            Some(i) => return Ok(i),
            None => warnings.push(format!(
                "{DEFAULT_CONTAINER} names {name:?}, which is not a container: drained the first container instead"
            )),
        }
    }
    Ok(0)
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
                                    "container {:?} has no containerPort named {name:?}",
                                    name_of(app)
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

/// Makes drain timeout + app reserve fit in terminationGracePeriodSeconds (docs/injection.md, "Grace-period arithmetic"):
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
