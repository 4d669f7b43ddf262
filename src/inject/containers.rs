//! JSON of what the patch adds: the agent container, the app's preStop hook and the
//! wrap-mode pieces. Values only; where they go is decided in `mod.rs`.

use serde_json::{Value, json};

use super::options::{Options, Resources};
use super::{AGENT_NAME, InjectSettings, TOKEN_HEADER};
use crate::units::format_duration;

/// Timings and ports resolved for one pod.
pub struct AgentPlan<'a> {
    pub settings: &'a InjectSettings,
    pub options: &'a Options,
    pub ports: &'a [u16],
    pub grace_secs: i64,
    pub drain_timeout: std::time::Duration,
    /// The agent image: `wsdrain.io/image`, else the injector's.
    pub image: &'a str,
    /// Proxy mode: the agent's listen port, the app port behind it, and the name of
    /// the app's containerPort, which moves to the agent.
    pub proxy: Option<Proxy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub listen: u16,
    pub app: u16,
    pub name: Option<String>,
}

pub const BIN_VOLUME: &str = "wsdrain-bin";
pub const BIN_DIR: &str = "/wsdrain-bin";
pub const COPY_NAME: &str = "wsdrain-copy";

fn ports_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Agent settings as (env name, flag, value): the sidecar takes env, wrap takes flags.
fn agent_options(plan: &AgentPlan) -> Vec<(&'static str, &'static str, String)> {
    let o = plan.options;
    let mut out = Vec::new();
    match &plan.proxy {
        // --ports defaults to the proxy's listen port; other app ports are counted too.
        Some(p) => {
            out.push((
                "WSDRAIN_PROXY",
                "--proxy",
                format!("0.0.0.0:{}=127.0.0.1:{}", p.listen, p.app),
            ));
            if plan.ports.len() > 1 {
                let mut ports = vec![p.listen];
                ports.extend(plan.ports.iter().filter(|&&q| q != p.app));
                out.push(("WSDRAIN_PORTS", "--ports", ports_list(&ports)));
            }
        }
        None => out.push(("WSDRAIN_PORTS", "--ports", ports_list(plan.ports))),
    }
    out.extend([
        (
            "WSDRAIN_GRACE_PERIOD",
            "--grace-period",
            format!("{}s", plan.grace_secs),
        ),
        (
            "WSDRAIN_DRAIN_TIMEOUT",
            "--drain-timeout",
            format_duration(plan.drain_timeout),
        ),
    ]);
    if let Some(url) = &o.admin_url {
        out.push(("WSDRAIN_ADMIN_URL", "--admin-url", url.clone()));
    }
    if let Some(d) = o.settle_max {
        out.push(("WSDRAIN_SETTLE_MAX", "--settle-max", format_duration(d)));
    }
    if let Some(code) = o.close_code {
        out.push(("WSDRAIN_CLOSE_CODE", "--close-code", code.to_string()));
    }
    if let Some(r) = &o.reconnect_after {
        out.push(("WSDRAIN_RECONNECT_AFTER", "--reconnect-after", r.clone()));
    }
    if let Some(service) = &o.service {
        out.push(("WSDRAIN_SERVICE", "--service", service.clone()));
    }
    if o.rebalance {
        out.push(("WSDRAIN_REBALANCE", "--rebalance", "true".into()));
    }
    if let Some(rate) = o.fleet_close_rate {
        out.push((
            "WSDRAIN_FLEET_CLOSE_RATE",
            "--fleet-close-rate",
            rate.to_string(),
        ));
    }
    out.push(("WSDRAIN_TOKEN", "--token", plan.settings.token.clone()));
    out
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

/// Hardened securityContext shared by every container we add.
fn security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "privileged": false,
        "readOnlyRootFilesystem": true,
        "runAsGroup": 65532,
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

fn resources(r: &Resources) -> Value {
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = &r.cpu_limit {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(memory) = &r.memory_limit {
        limits.insert("memory".into(), json!(memory));
    }
    json!({"requests": {"cpu": r.cpu_request, "memory": r.memory_request}, "limits": limits})
}

/// The agent container; `native` makes it a sidecar init container.
pub fn agent(plan: &AgentPlan, native: bool) -> Value {
    let s = plan.settings;
    let port = s.agent_port;
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        field_env("HOST_IP", "status.hostIP"),
    ];
    env.extend(
        agent_options(plan)
            .into_iter()
            .map(|(name, _, value)| json!({"name": name, "value": value})),
    );
    // No WSDRAIN_TRIGGER_FROM: on bridge CNIs (kubenet, flannel) the kubelet reaches the
    // pod from the bridge, not HOST_IP, and a refused hook silently skips the drain. The
    // per-pod token is the guard.
    if plan.options.readiness_gate {
        env.push(json!({"name": "WSDRAIN_READINESS_GATE", "value": "true"}));
    }
    if let Some(level) = &plan.options.log_level {
        env.push(json!({"name": "RUST_LOG", "value": level}));
    }
    let mut ports = vec![json!({"name": "wsdrain-api", "containerPort": port, "protocol": "TCP"})];
    if let Some(p) = &plan.proxy {
        let mut proxy = json!({"containerPort": p.listen, "protocol": "TCP"});
        if let Some(name) = &p.name {
            proxy["name"] = json!(name);
        }
        ports.push(proxy);
    }
    let mut c = json!({
        "name": AGENT_NAME,
        "image": plan.image,
        "imagePullPolicy": s.image_pull_policy,
        "args": ["agent"],
        "ports": ports,
        "env": env,
        // Fails fast once draining so the pod leaves rotation even without a gate.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port, "scheme": "HTTP"},
            "periodSeconds": 2, "timeoutSeconds": 1, "failureThreshold": 1, "successThreshold": 1
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": port, "scheme": "HTTP"},
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3, "successThreshold": 1
        },
        "resources": resources(&plan.options.resources),
        "securityContext": security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError"
    });
    if native {
        c["restartPolicy"] = json!("Always");
    }
    c
}

/// The app's preStop: blocks in the kubelet until the agent's drain ends.
pub fn prestop(settings: &InjectSettings) -> Value {
    json!({"httpGet": {
        "path": "/prestop",
        "port": settings.agent_port,
        "scheme": "HTTP",
        "httpHeaders": [{"name": TOKEN_HEADER, "value": settings.token}]
    }})
}

/// Wrap mode: init container copying the static binary into the shared volume.
pub fn copy_init(plan: &AgentPlan) -> Value {
    json!({
        "name": COPY_NAME,
        "image": plan.image,
        "imagePullPolicy": plan.settings.image_pull_policy,
        "command": ["/wsdrain", "copy-self", format!("{BIN_DIR}/wsdrain")],
        "volumeMounts": [{"name": BIN_VOLUME, "mountPath": BIN_DIR}],
        "resources": resources(&plan.options.resources),
        "securityContext": security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError"
    })
}

pub fn bin_volume() -> Value {
    json!({"name": BIN_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
}

pub fn bin_mount() -> Value {
    json!({"name": BIN_VOLUME, "mountPath": BIN_DIR, "readOnly": true})
}

/// Downward-API env the wrapped command refers to as `$(WSDRAIN_POD_NAME)`; prefixed
/// so it cannot clash with the app's own POD_NAME.
pub fn wrap_env() -> Vec<Value> {
    vec![
        field_env("WSDRAIN_POD_NAME", "metadata.name"),
        field_env("WSDRAIN_POD_NAMESPACE", "metadata.namespace"),
    ]
}

/// `wsdrain wrap --flags… -- <original command>`; the app's `args` stay as they are and
/// the kubelet appends them after the command.
pub fn wrap_command(plan: &AgentPlan, original: &[Value]) -> Value {
    let mut cmd = vec![json!(format!("{BIN_DIR}/wsdrain")), json!("wrap")];
    for (_, flag, value) in agent_options(plan) {
        cmd.push(json!(format!("{flag}={value}")));
    }
    if plan.options.readiness_gate {
        cmd.push(json!("--readiness-gate"));
    }
    // The app's SIGTERM comes after the drain; wrap's own SIGKILL must come before the
    // kubelet's at the end of the grace period, so it gets to report the exit itself.
    let child_grace = plan
        .settings
        .app_reserve
        .saturating_sub(std::time::Duration::from_secs(1))
        .max(std::time::Duration::from_secs(1));
    cmd.push(json!(format!(
        "--child-grace={}",
        format_duration(child_grace)
    )));
    cmd.push(json!("--pod-name=$(WSDRAIN_POD_NAME)"));
    cmd.push(json!("--pod-namespace=$(WSDRAIN_POD_NAMESPACE)"));
    cmd.push(json!("--"));
    cmd.extend(original.iter().cloned());
    Value::Array(cmd)
}
