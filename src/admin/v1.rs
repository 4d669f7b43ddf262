//! Admin API v1 on the wire, for both sides (docs/admin-api.md):
//!
//! `POST /drain {"max":N,"code":C,"reason":"..."}` → `200 {"closed":n,"remaining":m}`
//! `GET /connections` → `200 {"open":n}`
//! Errors: `4xx {"error":"field: why","field":"field"}`.
//!
//! The parsers take untrusted bytes (the app reads requests, the agent reads answers)
//! and name the field that is wrong.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::drain::hint::MAX_REASON_BYTES;

pub const DRAIN_PATH: &str = "/drain";
pub const CONNECTIONS_PATH: &str = "/connections";
/// Largest drain request an app accepts; real ones are under 200 bytes.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Largest answer body the agent reads; real answers are a few dozen bytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Close up to `max` open WebSocket sessions with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    pub max: u64,
    pub code: u16,
    pub reason: String,
}

/// Sessions closed by this call, and sessions still open after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub closed: u64,
    pub remaining: u64,
}

/// Open sessions now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsReply {
    pub open: u64,
}

/// The body of a 4xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    pub field: String,
}

/// Which field of a request or answer is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn reply(&self) -> ErrorReply {
        ErrorReply {
            error: format!("{}: {}", self.field, self.message),
            field: self.field.to_owned(),
        }
    }
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
/// anything else (Python `websockets` does), so an app refuses it.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The app side: reads a `POST /drain` body.
pub fn parse_drain_request(body: &[u8]) -> Result<DrainRequest, FieldError> {
    let obj = parse_object(body)?;
    let max = u64_field(&obj, "max")?;
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
                        "must be a close code a server may send (1000-1003, 1007-1014, 3000-4999), got {}",
                        excerpt(v.to_string().as_bytes())
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
        Some(v) => {
            return Err(field_err(
                "reason",
                format!(
                    "must be a string, got {}",
                    excerpt(v.to_string().as_bytes())
                ),
            ));
        }
    };
    Ok(DrainRequest { max, code, reason })
}

/// The agent side: reads a `POST /drain` answer.
pub fn parse_drain_reply(body: &[u8]) -> Result<DrainReply, FieldError> {
    let obj = parse_object(body)?;
    Ok(DrainReply {
        closed: u64_field(&obj, "closed")?,
        remaining: u64_field(&obj, "remaining")?,
    })
}

/// The agent side: reads a `GET /connections` answer.
pub fn parse_connections_reply(body: &[u8]) -> Result<ConnectionsReply, FieldError> {
    let obj = parse_object(body)?;
    Ok(ConnectionsReply {
        open: u64_field(&obj, "open")?,
    })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, FieldError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(other) => Err(field_err(
            "body",
            format!(
                "must be a JSON object, got a JSON {}; body starts {:?}",
                json_kind(&other),
                excerpt(body)
            ),
        )),
        Err(e) => Err(field_err(
            "body",
            format!("not valid JSON: {e}; body starts {:?}", excerpt(body)),
        )),
    }
}

fn u64_field(obj: &Map<String, Value>, field: &'static str) -> Result<u64, FieldError> {
    match obj.get(field) {
        None => Err(field_err(field, "is missing")),
        Some(v) => v.as_u64().ok_or_else(|| {
            field_err(
                field,
                format!(
                    "must be a non-negative integer, got {}",
                    excerpt(v.to_string().as_bytes())
                ),
            )
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// How much of an unexpected value goes into an error message.
pub const EXCERPT_BYTES: usize = 200;

/// A short, printable start of a body for error messages.
pub fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let text: String = String::from_utf8_lossy(head)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if bytes.len() > EXCERPT_BYTES {
        format!("{}…", text.trim_end())
    } else {
        text.trim_end().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_good_request() {
        let p = parse_drain_request(
            br#"{"max":20,"code":1012,"reason":"{\"reconnect_after_ms\":1200}"}"#,
        )
        .unwrap();
        assert_eq!(p.max, 20);
        assert_eq!(p.code, 1012);
        assert_eq!(p.reason, r#"{"reconnect_after_ms":1200}"#);
        // What the client sends is what the app reads.
        let sent = serde_json::to_vec(&p).unwrap();
        assert_eq!(parse_drain_request(&sent).unwrap(), p);
    }

    #[test]
    fn names_the_bad_request_field() {
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
            let err = parse_drain_request(body.as_bytes()).unwrap_err();
            assert_eq!(err.field, *field, "{body}: {err:?}");
        }
        let body = format!(r#"{{"max":1,"code":1012,"reason":"{long}"}}"#);
        assert_eq!(
            parse_drain_request(body.as_bytes()).unwrap_err().field,
            "reason"
        );
        // Exactly 123 bytes (multi-byte characters count in bytes) is fine.
        let ok = format!(r#"{{"max":1,"code":4000,"reason":"{}é"}}"#, "x".repeat(121));
        assert!(parse_drain_request(ok.as_bytes()).is_ok());
    }

    #[test]
    fn names_the_bad_reply_field() {
        assert_eq!(
            parse_drain_reply(br#"{"closed":3,"remaining":7}"#),
            Ok(DrainReply {
                closed: 3,
                remaining: 7
            })
        );
        let cases: &[(&[u8], &str)] = &[
            (b"<html>", "body"),
            (b"[]", "body"),
            (br#"{"remaining":1}"#, "closed"),
            (br#"{"closed":-1,"remaining":1}"#, "closed"),
            (br#"{"closed":1,"remaining":"2"}"#, "remaining"),
        ];
        for (body, field) in cases {
            assert_eq!(parse_drain_reply(body).unwrap_err().field, *field);
        }
        assert_eq!(parse_connections_reply(br#"{"open":4}"#).unwrap().open, 4);
        assert_eq!(parse_connections_reply(b"{}").unwrap_err().field, "open");
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

    #[test]
    fn excerpt_is_short_and_printable() {
        assert_eq!(excerpt(b"a\nb\r\n"), "a b");
        let long = vec![b'x'; 1000];
        let e = excerpt(&long);
        assert!(e.len() < 210 && e.ends_with('…'), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(1024)))]
            /// Arbitrary bytes from either side: an answer, never a panic.
            #[test]
            fn any_bytes_get_an_answer(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse_drain_request(&body);
                let _ = parse_drain_reply(&body);
                let _ = parse_connections_reply(&body);
            }

            /// JSON-shaped input with arbitrary values: valid ones read back exactly.
            #[test]
            fn json_shaped(max in any::<i64>(), code in any::<i32>(), reason in "\\PC{0,130}") {
                let body = serde_json::json!({"max": max, "code": code, "reason": reason}).to_string();
                match parse_drain_request(body.as_bytes()) {
                    Ok(r) => {
                        prop_assert_eq!(r.max as i64, max);
                        prop_assert!(close_code_allowed(r.code));
                        prop_assert!(r.reason.len() <= MAX_REASON_BYTES);
                    }
                    Err(e) => prop_assert!(["max", "code", "reason"].contains(&e.field)),
                }
            }
        }
    }
}
