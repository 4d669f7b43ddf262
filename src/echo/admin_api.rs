//! The app side of admin API v1 (docs/admin-api.md).
//!
//! `POST /drain {"max":N,"code":C,"reason":"..."}` → `{"closed":n,"remaining":m}`
//! `GET /connections` → `{"open":n}`

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::App;

/// Drain requests are tiny; anything bigger is a client bug.
const MAX_BODY: usize = 4096;
/// RFC 6455 §5.5: a control frame payload is at most 125 bytes, 2 of them the code.
pub use crate::drain::hint::MAX_REASON_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainParams {
    pub max: u64,
    pub code: u16,
    pub reason: String,
}

/// A 400 answer: which field is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field_err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// Close codes an endpoint may send (RFC 6455 §7.4): the defined and IANA-registered
/// 1000–1014 except those reserved for local use only (1004, 1005, 1006), plus the
/// 3000–4999 ranges for libraries and applications. Clients fail the connection on
/// anything else (Python `websockets` does), so we refuse it here.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

pub fn parse_drain(body: &[u8]) -> Result<DrainParams, FieldError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| field_err("body", format!("not valid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| field_err("body", "must be a JSON object"))?;

    let max = match obj.get("max") {
        None => return Err(field_err("max", "missing")),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| field_err("max", format!("must be an integer >= 0, got {v}")))?,
    };
    let code = match obj.get("code") {
        None => return Err(field_err("code", "missing")),
        Some(v) => v
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .filter(|&c| close_code_allowed(c))
            .ok_or_else(|| {
                field_err(
                    "code",
                    format!(
                        "must be a close code a server may send (1000-1003, 1007-1014, 3000-4999), got {v}"
                    ),
                )
            })?,
    };
    let reason = match obj.get("reason") {
        None => return Err(field_err("reason", "missing")),
        Some(Value::String(s)) if s.len() <= MAX_REASON_BYTES => s.clone(),
        Some(Value::String(s)) => {
            return Err(field_err(
                "reason",
                format!("is {} bytes, at most {MAX_REASON_BYTES} allowed", s.len()),
            ));
        }
        Some(v) => return Err(field_err("reason", format!("must be a string, got {v}"))),
    };
    Ok(DrainParams { max, code, reason })
}

fn bad_request(err: FieldError) -> Response<Full<Bytes>> {
    crate::net::json(
        StatusCode::BAD_REQUEST,
        &json!({"error": format!("{}: {}", err.field, err.message), "field": err.field}),
    )
}

pub async fn handle(req: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/connections") => {
            crate::net::json(StatusCode::OK, &json!({"open": app.sessions.open_count()}))
        }
        (&Method::POST, "/drain") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    let status = if err.is::<http_body_util::LengthLimitError>() {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    return crate::net::json(
                        status,
                        &json!({"error": format!("body: {err}"), "field": "body"}),
                    );
                }
            };
            let params = match parse_drain(&body) {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(field = err.field, error = err.message, "bad drain request");
                    return bad_request(err);
                }
            };
            app.start_draining();
            let (closed, remaining) = app.sessions.drain(params.max, params.code, &params.reason);
            tracing::info!(
                max = params.max,
                code = params.code,
                reason = params.reason,
                closed,
                remaining,
                "drain request"
            );
            crate::net::json(
                StatusCode::OK,
                &json!({"closed": closed, "remaining": remaining}),
            )
        }
        (_, "/connections" | "/drain") => crate::net::json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "use GET /connections or POST /drain"}),
        ),
        _ => crate::net::json(
            StatusCode::NOT_FOUND,
            &json!({"error": "admin API v1: GET /connections, POST /drain"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_good_request() {
        let p = parse_drain(br#"{"max":20,"code":1012,"reason":"{\"reconnect_after_ms\":1200}"}"#)
            .unwrap();
        assert_eq!(p.max, 20);
        assert_eq!(p.code, 1012);
        assert_eq!(p.reason, r#"{"reconnect_after_ms":1200}"#);
    }

    #[test]
    fn names_the_bad_field() {
        let long = "x".repeat(124);
        let cases: &[(&str, &str)] = &[
            ("nope", "body"),
            ("[1]", "body"),
            (r#"{"code":1012,"reason":""}"#, "max"),
            (r#"{"max":-1,"code":1012,"reason":""}"#, "max"),
            (r#"{"max":1.5,"code":1012,"reason":""}"#, "max"),
            (r#"{"max":1,"reason":""}"#, "code"),
            (r#"{"max":1,"code":999,"reason":""}"#, "code"),
            (r#"{"max":1,"code":1006,"reason":""}"#, "code"),
            (r#"{"max":1,"code":5000,"reason":""}"#, "code"),
            (r#"{"max":1,"code":"1012","reason":""}"#, "code"),
            (r#"{"max":1,"code":1012}"#, "reason"),
            (r#"{"max":1,"code":1012,"reason":7}"#, "reason"),
        ];
        for (body, field) in cases {
            let err = parse_drain(body.as_bytes()).unwrap_err();
            assert_eq!(err.field, *field, "{body}: {err:?}");
        }
        let body = format!(r#"{{"max":1,"code":1012,"reason":"{long}"}}"#);
        assert_eq!(parse_drain(body.as_bytes()).unwrap_err().field, "reason");
        // Exactly 123 bytes (multi-byte characters count in bytes) is fine.
        let ok = format!(r#"{{"max":1,"code":4000,"reason":"{}é"}}"#, "x".repeat(121));
        assert!(parse_drain(ok.as_bytes()).is_ok());
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1012, 1013, 3000, 4000, 4999] {
            assert!(close_code_allowed(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!close_code_allowed(bad), "{bad}");
        }
    }
}
