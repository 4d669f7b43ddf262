//! The pod's `wsdrain.io/*` annotations, parsed and checked (docs/injection.md).

use std::time::Duration;

use serde_json::{Map, Value};

use super::{InjectError, clip, shown};
use crate::units::{check_close_code, format_duration, parse_duration, parse_range};

pub const PREFIX: &str = "wsdrain.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Native,
    Classic,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grace {
    /// Raise terminationGracePeriodSeconds to fit the drain timeout.
    Raise,
    /// Shrink the drain timeout to fit the grace period (default).
    Clamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sidecar,
    Wrap,
    /// Sidecar whose agent sits in the data path of the app port (`--proxy`).
    Proxy,
}

/// A `wsdrain.io/ports` entry: a number or the name of a containerPort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub app_container: Option<String>,
    pub ports: Option<Vec<PortRef>>,
    pub admin_url: Option<String>,
    pub drain_timeout: Option<Duration>,
    pub settle_max: Option<Duration>,
    pub close_code: Option<u16>,
    /// Kept as written (validated), handed to the agent as is.
    pub reconnect_after: Option<String>,
    pub sidecar: Sidecar,
    pub readiness_gate: bool,
    pub grace: Grace,
    pub mode: Mode,
    /// Port the proxy listens on (proxy mode; default app port + 10000).
    pub proxy_port: Option<u16>,
    /// Per-pod overrides of the agent container.
    pub image: Option<String>,
    pub resources: Resources,
    /// `RUST_LOG` of the agent.
    pub log_level: Option<String>,
    /// Fleet awareness: the Service whose endpoints are the peers.
    pub service: Option<String>,
    pub rebalance: bool,
    /// Sessions per second the whole fleet may close (a positive integer).
    pub fleet_close_rate: Option<u32>,
    /// Unknown `wsdrain.io/*` annotations (likely typos).
    pub warnings: Vec<String>,
}

const KNOWN: &[&str] = &[
    "app-container",
    "ports",
    "admin-url",
    "drain-timeout",
    "settle-max",
    "close-code",
    "reconnect-after",
    "sidecar",
    "readiness-gate",
    "grace",
    "mode",
    "proxy-port",
    "image",
    "cpu-request",
    "cpu-limit",
    "memory-request",
    "memory-limit",
    "log-level",
    "service",
    "rebalance",
    "fleet-close-rate",
    "status",
];

/// Requests and limits of the agent container, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for Resources {
    /// No CPU limit: throttling the agent would slow the drain.
    fn default() -> Self {
        Resources {
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: None,
            memory_limit: Some("64Mi".into()),
        }
    }
}

/// A parser's message that quotes the whole value, with the value shown truncated.
fn reword(raw: &str, error: &str) -> String {
    let detail = error.replace(&format!("'{}' ", raw.trim()), "");
    format!("{} {}", shown(raw), clip(&detail))
}

/// Where an annotation lives, for error messages.
pub fn field(key: &str) -> String {
    format!("metadata.annotations[\"{key}\"]")
}

fn bad(key: &str, reason: impl Into<String>) -> InjectError {
    InjectError::new(field(key), reason)
}

impl Options {
    pub fn parse(annotations: &Map<String, Value>) -> Result<Self, InjectError> {
        let get = |name: &str| -> Result<Option<String>, InjectError> {
            let key = format!("{PREFIX}{name}");
            match annotations.get(&key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
                Some(other) => Err(bad(&key, format!("{other} is not a string"))),
            }
        };
        let key = |name: &str| format!("{PREFIX}{name}");
        let duration = |name: &str| -> Result<Option<Duration>, InjectError> {
            match get(name)? {
                None => Ok(None),
                Some(raw) => match parse_duration(&raw) {
                    Ok(d) if d.is_zero() => Err(bad(
                        &key(name),
                        format!("{} must be more than 0", shown(&raw)),
                    )),
                    Ok(d) => Ok(Some(d)),
                    Err(e) => Err(bad(&key(name), reword(&raw, &e))),
                },
            }
        };
        let choice = |name: &str, allowed: &[&str], default: &str| -> Result<String, InjectError> {
            let value = get(name)?.unwrap_or_else(|| default.to_string());
            if allowed.contains(&value.as_str()) {
                Ok(value)
            } else {
                Err(bad(
                    &key(name),
                    format!("{} is not one of {}", shown(&value), allowed.join(", ")),
                ))
            }
        };

        let app_container = get("app-container")?.filter(|s| !s.is_empty());
        let ports = get("ports")?
            .map(|raw| parse_ports(&raw).map_err(|e| bad(&key("ports"), e)))
            .transpose()?;
        let admin_url = get("admin-url")?
            .filter(|s| !s.is_empty())
            .map(|raw| {
                crate::units::parse_admin_url(&raw)
                    .map(|_| raw)
                    .map_err(|e| bad(&key("admin-url"), e))
            })
            .transpose()?;
        let drain_timeout = duration("drain-timeout")?;
        let settle_max = duration("settle-max")?;
        let close_code = get("close-code")?
            .map(|raw| {
                let code: u16 = raw.parse().map_err(|_| {
                    bad(
                        &key("close-code"),
                        format!("{} is not a number", shown(&raw)),
                    )
                })?;
                check_close_code(code).map_err(|e| bad(&key("close-code"), e))?;
                Ok::<u16, InjectError>(code)
            })
            .transpose()?;
        let reconnect_after = get("reconnect-after")?
            .map(|raw| match parse_range(&raw) {
                Ok(r) if r.max > Duration::from_secs(3600) => Err(bad(
                    &key("reconnect-after"),
                    format!(
                        "{}: at most 1h (got {})",
                        shown(&raw),
                        format_duration(r.max)
                    ),
                )),
                Ok(_) => Ok(raw),
                Err(e) => Err(bad(&key("reconnect-after"), reword(&raw, &e))),
            })
            .transpose()?;
        let sidecar = match choice("sidecar", &["native", "classic", "auto"], "auto")?.as_str() {
            "native" => Sidecar::Native,
            "classic" => Sidecar::Classic,
            _ => Sidecar::Auto,
        };
        let readiness_gate = choice("readiness-gate", &["true", "false"], "false")? == "true";
        let grace = match choice("grace", &["raise", "clamp"], "clamp")?.as_str() {
            "raise" => Grace::Raise,
            _ => Grace::Clamp,
        };
        let mode = match choice("mode", &["sidecar", "wrap", "proxy"], "sidecar")?.as_str() {
            "wrap" => Mode::Wrap,
            "proxy" => Mode::Proxy,
            _ => Mode::Sidecar,
        };
        let proxy_port = get("proxy-port")?
            .map(|raw| match raw.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad(
                    &key("proxy-port"),
                    format!("{} is not a port number (1-65535)", shown(&raw)),
                )),
            })
            .transpose()?;
        if proxy_port.is_some() && mode != Mode::Proxy {
            return Err(bad(
                &key("proxy-port"),
                "only means something with wsdrain.io/mode: proxy",
            ));
        }
        let image = get("image")?
            .map(|raw| {
                if raw.is_empty()
                    || raw.len() > 512
                    || raw.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    Err(bad(
                        &key("image"),
                        format!("{} is not an image reference", shown(&raw)),
                    ))
                } else {
                    Ok(raw)
                }
            })
            .transpose()?;
        let quantity = |name: &str| -> Result<Option<(String, f64)>, InjectError> {
            get(name)?
                .map(|raw| match parse_quantity(&raw) {
                    Some(v) if v > 0.0 => Ok((raw, v)),
                    _ => Err(bad(
                        &key(name),
                        format!(
                            "{} is not a positive quantity (e.g. 50m, 0.5, 32Mi, 1Gi)",
                            shown(&raw)
                        ),
                    )),
                })
                .transpose()
        };
        let mut resources = Resources::default();
        for (what, request, limit) in [
            ("cpu", &mut resources.cpu_request, &mut resources.cpu_limit),
            (
                "memory",
                &mut resources.memory_request,
                &mut resources.memory_limit,
            ),
        ] {
            let asked_request = quantity(&format!("{what}-request"))?;
            let asked_limit = quantity(&format!("{what}-limit"))?;
            if let Some((raw, _)) = &asked_limit {
                *limit = Some(raw.clone());
            }
            let limit_value = limit.as_deref().and_then(parse_quantity);
            match asked_request {
                Some((raw, v)) => {
                    if limit_value.is_some_and(|l| v > l) {
                        return Err(bad(
                            &key(&format!("{what}-request")),
                            format!(
                                "{} is more than the {what} limit {}",
                                shown(&raw),
                                limit.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                    *request = raw;
                }
                // A limit under the default request lowers the request with it.
                None => {
                    if let (Some(l), Some(r)) = (limit_value, parse_quantity(request))
                        && l < r
                    {
                        *request = limit.clone().unwrap_or_default();
                    }
                }
            }
        }
        let log_level = get("log-level")?
            .map(|raw| {
                if ["error", "warn", "info", "debug", "trace"].contains(&raw.as_str()) {
                    Ok(raw)
                } else {
                    Err(bad(
                        &key("log-level"),
                        format!(
                            "{} is not one of error, warn, info, debug, trace",
                            shown(&raw)
                        ),
                    ))
                }
            })
            .transpose()?;
        let service = get("service")?
            .map(|raw| {
                if crate::units::is_dns_label(&raw) {
                    Ok(raw)
                } else {
                    Err(bad(
                        &key("service"),
                        format!(
                            "{} is not a Service name (lowercase letters, digits, -; at most 63)",
                            shown(&raw)
                        ),
                    ))
                }
            })
            .transpose()?;
        let rebalance = choice("rebalance", &["true", "false"], "false")? == "true";
        let fleet_close_rate = get("fleet-close-rate")?
            .map(|raw| match raw.parse::<u32>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(
                    &key("fleet-close-rate"),
                    format!(
                        "{} is not a positive whole number of sessions per second",
                        shown(&raw)
                    ),
                )),
            })
            .transpose()?;

        let warnings = annotations
            .keys()
            .filter_map(|k| k.strip_prefix(PREFIX).map(|name| (k, name)))
            .filter(|(_, name)| !KNOWN.contains(name))
            .map(|(k, _)| format!("unknown annotation {} ignored (typo?)", shown(k)))
            .collect();

        Ok(Options {
            app_container,
            ports,
            admin_url,
            drain_timeout,
            settle_max,
            close_code,
            reconnect_after,
            sidecar,
            readiness_gate,
            grace,
            mode,
            proxy_port,
            image,
            resources,
            log_level,
            service,
            rebalance,
            fleet_close_rate,
            warnings,
        })
    }
}

fn parse_ports(raw: &str) -> Result<Vec<PortRef>, String> {
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim) {
        let port = if item.bytes().all(|b| b.is_ascii_digit()) && !item.is_empty() {
            match item.parse::<u16>() {
                Ok(p) if p > 0 => PortRef::Number(p),
                _ => return Err(format!("{} is not a port number (1-65535)", shown(item))),
            }
        } else if is_port_name(item) {
            PortRef::Name(item.to_string())
        } else {
            return Err(format!(
                "{} is neither a port number nor a containerPort name",
                shown(item)
            ));
        };
        if !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
}

/// The value of a Kubernetes quantity (`50m`, `0.5`, `32Mi`, `1e3`, `1G`), or `None`
/// when it is not one.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number.matches('.').count() > 1 || number == "." || number.contains('+')
    {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e => {
            let exp = e.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            10f64.powi(exp.parse().ok()?)
        }
    };
    Some(n * scale).filter(|v| v.is_finite())
}

/// IANA service name as Kubernetes uses it for containerPort names.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(pairs: &[(&str, &str)]) -> Result<Options, InjectError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), json!(v)))
            .collect();
        Options::parse(&map)
    }

    #[test]
    fn defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.sidecar, Sidecar::Auto);
        assert_eq!(o.grace, Grace::Clamp);
        assert_eq!(o.mode, Mode::Sidecar);
        assert!(!o.readiness_gate);
        assert!(o.ports.is_none() && o.drain_timeout.is_none());
    }

    #[test]
    fn values() {
        let o = parse(&[
            ("ports", "8080, ws,8080"),
            ("drain-timeout", "40s"),
            ("close-code", "4001"),
            ("reconnect-after", "1s..3s"),
            ("admin-url", "http://127.0.0.1:8081"),
            ("sidecar", "classic"),
            ("grace", "raise"),
            ("mode", "wrap"),
            ("readiness-gate", "true"),
        ])
        .unwrap();
        assert_eq!(
            o.ports,
            Some(vec![PortRef::Number(8080), PortRef::Name("ws".into())])
        );
        assert_eq!(o.drain_timeout, Some(Duration::from_secs(40)));
        assert_eq!(o.close_code, Some(4001));
        assert_eq!(o.sidecar, Sidecar::Classic);
        assert_eq!((o.grace, o.mode), (Grace::Raise, Mode::Wrap));
        assert!(o.readiness_gate);
    }

    #[test]
    fn errors_name_the_annotation() {
        let err = parse(&[("drain-timeout", "abc")]).unwrap_err();
        assert_eq!(
            err.field,
            r#"metadata.annotations["wsdrain.io/drain-timeout"]"#
        );
        assert!(
            err.to_string()
                .contains(r#""abc" is not a duration: expected number at 0"#),
            "{err}"
        );
        for (k, v) in [
            ("ports", "0"),
            ("ports", "Web_Port"),
            ("close-code", "1000"),
            ("close-code", "x"),
            ("reconnect-after", "3s..1s"),
            ("admin-url", "https://x"),
            ("sidecar", "yes"),
            ("grace", "more"),
            ("mode", "inline"),
            ("readiness-gate", "1"),
            ("settle-max", "0"),
        ] {
            let err = parse(&[(k, v)]).unwrap_err();
            assert!(err.field.contains(k), "{k}={v}: {err}");
        }
        let map = [("wsdrain.io/ports".to_string(), json!(8080))]
            .into_iter()
            .collect();
        assert!(
            Options::parse(&map)
                .unwrap_err()
                .reason
                .contains("not a string")
        );
    }

    #[test]
    fn overrides_and_fleet() {
        let o = parse(&[
            ("image", "registry.example/wsdrain:1"),
            ("cpu-request", "50m"),
            ("cpu-limit", "1"),
            ("memory-limit", "8Mi"),
            ("log-level", "debug"),
            ("service", "chat"),
            ("rebalance", "true"),
            ("fleet-close-rate", "50"),
            ("mode", "proxy"),
            ("proxy-port", "9000"),
        ])
        .unwrap();
        assert_eq!(o.image.as_deref(), Some("registry.example/wsdrain:1"));
        assert_eq!(
            o.resources,
            Resources {
                cpu_request: "50m".into(),
                cpu_limit: Some("1".into()),
                // Lowered with the limit.
                memory_request: "8Mi".into(),
                memory_limit: Some("8Mi".into()),
            }
        );
        assert_eq!(o.log_level.as_deref(), Some("debug"));
        assert_eq!(o.service.as_deref(), Some("chat"));
        assert!(o.rebalance);
        assert_eq!(o.fleet_close_rate, Some(50));
        assert_eq!((o.mode, o.proxy_port), (Mode::Proxy, Some(9000)));
        for (k, v) in [
            ("image", "has space"),
            ("cpu-request", "lots"),
            ("memory-limit", "-1Mi"),
            ("memory-request", "0"),
            ("log-level", "loud"),
            ("service", "Chat_1"),
            ("rebalance", "yes"),
            ("fleet-close-rate", "0"),
            ("fleet-close-rate", "2.5"),
            ("proxy-port", "70000"),
        ] {
            let err = parse(&[(k, v), ("mode", "proxy")]).unwrap_err();
            assert!(err.field.contains(k), "{k}={v}: {err}");
        }
        let err = parse(&[("cpu-request", "2"), ("cpu-limit", "500m")]).unwrap_err();
        assert!(err.reason.contains("more than the cpu limit 500m"), "{err}");
        let err = parse(&[("proxy-port", "9000")]).unwrap_err();
        assert!(err.reason.contains("mode: proxy"), "{err}");
    }

    #[test]
    fn quantities() {
        for (q, v) in [
            ("50m", 0.05),
            ("1", 1.0),
            ("0.5", 0.5),
            ("32Mi", 33554432.0),
            ("1e3", 1000.0),
            ("2k", 2000.0),
        ] {
            assert_eq!(parse_quantity(q), Some(v), "{q}");
        }
        for q in ["", "m", "1.2.3", "1Xi", "1e", "Mi", "1 Mi", "1e9999"] {
            assert_eq!(parse_quantity(q), None, "{q}");
        }
    }

    #[test]
    fn unknown_annotation_warns() {
        let o = parse(&[("drain-timout", "5s")]).unwrap();
        assert_eq!(o.warnings.len(), 1);
        assert!(o.warnings[0].contains("wsdrain.io/drain-timout"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn annotation() -> impl Strategy<Value = (String, Value)> {
            let name = prop_oneof![
                prop::sample::select(KNOWN.to_vec()).prop_map(str::to_string),
                "[a-z-]{1,12}",
            ];
            let value = prop_oneof![
                "[ -~]{0,24}".prop_map(Value::from),
                "[0-9]{1,6}(ms|s|m|h|Mi|m)?".prop_map(Value::from),
                prop::sample::select(vec![
                    "true", "false", "proxy", "wrap", "native", "8080,ws", "0..2s"
                ])
                .prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[ -~]{2000,3000}".prop_map(Value::from),
            ];
            (name, value).prop_map(|(n, v)| (format!("{PREFIX}{n}"), v))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

            /// Any annotations: a result, never a panic; an error names the annotation
            /// and stays short however long the value.
            #[test]
            fn any_annotations_parse_or_name_the_field(
                pairs in prop::collection::vec(annotation(), 0..8)
            ) {
                let map: Map<String, Value> = pairs.into_iter().collect();
                match Options::parse(&map) {
                    Ok(o) => {
                        for w in &o.warnings {
                            prop_assert!(w.len() < 1200, "{} bytes", w.len());
                        }
                    }
                    Err(e) => {
                        prop_assert!(e.field.starts_with("metadata.annotations[\"wsdrain.io/"), "{}", e);
                        prop_assert!(e.to_string().len() < 1200, "{} bytes", e.to_string().len());
                    }
                }
            }

            /// Valid quantities keep their value through the parser.
            #[test]
            fn quantities_scale(n in 1u32..100_000, suffix in prop::sample::select(vec!["", "m", "k", "Mi", "Gi"])) {
                let scale = match suffix { "m" => 1e-3, "k" => 1e3, "Mi" => 1048576.0, "Gi" => 1073741824.0, _ => 1.0 };
                prop_assert_eq!(parse_quantity(&format!("{n}{suffix}")), Some(f64::from(n) * scale));
            }
        }
    }
}
