//! The pod's `wsdrain.io/*` annotations, parsed and checked (docs/injection.md, "Annotations").

use std::time::Duration;

use serde_json::{Map, Value};

use super::InjectError;
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
    "status",
];

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
                    Ok(d) if d.is_zero() => {
                        Err(bad(&key(name), format!("{raw:?} must be more than 0")))
                    }
                    Ok(d) => Ok(Some(d)),
                    Err(e) => Err(bad(&key(name), format!("{raw:?} is not a duration: {e}"))),
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
                    format!("{value:?} is not one of {}", allowed.join(", ")),
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
                let code: u16 = raw
                    .parse()
                    .map_err(|_| bad(&key("close-code"), format!("{raw:?} is not a number")))?;
                check_close_code(code).map_err(|e| bad(&key("close-code"), e))?;
                Ok::<u16, InjectError>(code)
            })
            .transpose()?;
        let reconnect_after = get("reconnect-after")?
            .map(|raw| match parse_range(&raw) {
                Ok(r) if r.max > Duration::from_secs(3600) => Err(bad(
                    &key("reconnect-after"),
                    format!("{raw:?}: at most 1h (got {})", format_duration(r.max)),
                )),
                Ok(_) => Ok(raw),
                Err(e) => Err(bad(
                    &key("reconnect-after"),
                    format!("{raw:?} is not a range: {e}"),
                )),
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
        let mode = match choice("mode", &["sidecar", "wrap"], "sidecar")?.as_str() {
            "wrap" => Mode::Wrap,
            _ => Mode::Sidecar,
        };

        let warnings = annotations
            .keys()
            .filter_map(|k| k.strip_prefix(PREFIX).map(|name| (k, name)))
            .filter(|(_, name)| !KNOWN.contains(name))
            .map(|(k, _)| format!("unknown annotation {k} ignored (typo?)"))
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
                _ => return Err(format!("{item:?} is not a port number (1-65535)")),
            }
        } else if is_port_name(item) {
            PortRef::Name(item.to_string())
        } else {
            return Err(format!(
                "{item:?} is neither a port number nor a containerPort name"
            ));
        };
        if !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
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
            err.to_string().contains(r#""abc" is not a duration"#),
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
    fn unknown_annotation_warns() {
        let o = parse(&[("drain-timout", "5s")]).unwrap();
        assert_eq!(o.warnings.len(), 1);
        assert!(o.warnings[0].contains("wsdrain.io/drain-timout"));
    }
}
