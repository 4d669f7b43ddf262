//! Client of the app's admin API v1 (docs/admin-api.md).
//!
//! One plain HTTP/1.1 connection per call (calls are rare: one per close batch or
//! poll), the whole call bounded by the client's timeout, the answer bounded in size.
//! Every way the app can let us down is its own `AdminError` variant, so the agent can
//! log it clearly and count it under a stable metrics label.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::http1::{self, Endpoint, read_limited};

/// Largest answer body we read; the real answers are a few dozen bytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// How much of an unexpected body goes into an error message.
const EXCERPT_BYTES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    pub max: u64,
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub closed: u64,
    pub remaining: u64,
}

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin URL {url} cannot be used: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("admin API at {addr} unreachable: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API {call} timed out after {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    #[error("admin API {call} failed at the HTTP level: {message}")]
    Http { call: &'static str, message: String },
    #[error("admin API {call} answered HTTP {status}: {excerpt:?}")]
    Status {
        call: &'static str,
        status: u16,
        excerpt: String,
    },
    #[error(
        "admin API {call} answered a body that is not a JSON object: {message}; body starts {excerpt:?}"
    )]
    NotJson {
        call: &'static str,
        message: String,
        excerpt: String,
    },
    #[error("admin API {call} answer: field `{field}` {problem}")]
    BadField {
        call: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("admin API {call} answer is larger than {limit} bytes; not read further")]
    TooLarge { call: &'static str, limit: usize },
}

impl AdminError {
    /// The `result` label of `wsdrain_admin_requests_total` ("ok" is the success label).
    pub fn result_label(&self) -> &'static str {
        match self {
            AdminError::BadUrl { .. } | AdminError::Connect { .. } => "refused",
            AdminError::Timeout { .. } => "timeout",
            AdminError::Http { .. } | AdminError::Status { .. } => "http_error",
            AdminError::NotJson { .. } | AdminError::BadField { .. } => "bad_body",
            AdminError::TooLarge { .. } => "too_large",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: Uri,
    timeout: Duration,
}

const DRAIN: &str = "POST /drain";
const CONNECTIONS: &str = "GET /connections";

impl AdminClient {
    /// `base` is the admin API root, e.g. `http://127.0.0.1:8081` (a path prefix is kept);
    /// `timeout` bounds each call from connect to the last body byte.
    pub fn new(base: Uri, timeout: Duration) -> Self {
        Self { base, timeout }
    }

    /// The bound of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn drain(&self, req: &DrainRequest) -> Result<DrainReply, AdminError> {
        let body = serde_json::to_vec(req).map_err(|e| AdminError::Http {
            call: DRAIN,
            message: format!("cannot encode request: {e}"),
        })?;
        let value = self.call(DRAIN, Method::POST, "/drain", body).await?;
        Ok(DrainReply {
            closed: u64_field(DRAIN, &value, "closed")?,
            remaining: u64_field(DRAIN, &value, "remaining")?,
        })
    }

    pub async fn connections(&self) -> Result<u64, AdminError> {
        let value = self
            .call(CONNECTIONS, Method::GET, "/connections", Vec::new())
            .await?;
        u64_field(CONNECTIONS, &value, "open")
    }

    async fn call(
        &self,
        call: &'static str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Value, AdminError> {
        tokio::time::timeout(self.timeout, self.exchange(call, method, path, body))
            .await
            .map_err(|_| AdminError::Timeout {
                call,
                timeout: self.timeout,
            })?
    }

    async fn exchange(
        &self,
        call: &'static str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Value, AdminError> {
        let endpoint = Endpoint::parse(&self.base).map_err(|reason| AdminError::BadUrl {
            url: self.base.to_string(),
            reason,
        })?;
        let stream = endpoint
            .connect()
            .await
            .map_err(|source| AdminError::Connect {
                addr: endpoint.authority.clone(),
                source,
            })?;
        let http_err = |e: hyper::Error| AdminError::Http {
            call,
            message: e.to_string(),
        };
        let (mut sender, _conn) = http1::handshake(stream).await.map_err(http_err)?;

        let target = endpoint.target(path);
        let request = Request::builder()
            .method(method)
            .uri(target)
            .header(HOST, endpoint.authority.as_str())
            .header(CONNECTION, "close")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AdminError::Http {
                call,
                message: format!("cannot build request: {e}"),
            })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let declared_len = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());

        if !status.is_success() {
            // Read a little for the message; the rest does not matter.
            let (head, _) = read_limited(response.into_body(), EXCERPT_BYTES)
                .await
                .unwrap_or_default();
            return Err(AdminError::Status {
                call,
                status: status.as_u16(),
                excerpt: excerpt(&head),
            });
        }
        if declared_len.is_some_and(|n| n > MAX_REPLY_BYTES as u64) {
            return Err(AdminError::TooLarge {
                call,
                limit: MAX_REPLY_BYTES,
            });
        }
        let (bytes, complete) = read_limited(response.into_body(), MAX_REPLY_BYTES)
            .await
            .map_err(http_err)?;
        if !complete {
            return Err(AdminError::TooLarge {
                call,
                limit: MAX_REPLY_BYTES,
            });
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(value @ Value::Object(_)) => Ok(value),
            Ok(other) => Err(AdminError::NotJson {
                call,
                message: format!("got a JSON {}", json_kind(&other)),
                excerpt: excerpt(&bytes),
            }),
            Err(e) => Err(AdminError::NotJson {
                call,
                message: e.to_string(),
                excerpt: excerpt(&bytes),
            }),
        }
    }
}

fn u64_field(call: &'static str, value: &Value, field: &'static str) -> Result<u64, AdminError> {
    match value.get(field) {
        None => Err(AdminError::BadField {
            call,
            field,
            problem: "is missing".to_owned(),
        }),
        Some(v) => v.as_u64().ok_or_else(|| AdminError::BadField {
            call,
            field,
            problem: format!(
                "must be a non-negative integer, got {}",
                excerpt(v.to_string().as_bytes())
            ),
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

/// A short, printable start of a body for error messages.
fn excerpt(bytes: &[u8]) -> String {
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
    fn labels() {
        let call = DRAIN;
        let cases = [
            (
                AdminError::Connect {
                    addr: "x".into(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                "refused",
            ),
            (
                AdminError::Timeout {
                    call,
                    timeout: Duration::from_secs(1),
                },
                "timeout",
            ),
            (
                AdminError::Status {
                    call,
                    status: 500,
                    excerpt: String::new(),
                },
                "http_error",
            ),
            (
                AdminError::BadField {
                    call,
                    field: "closed",
                    problem: String::new(),
                },
                "bad_body",
            ),
            (AdminError::TooLarge { call, limit: 1 }, "too_large"),
        ];
        for (err, label) in cases {
            assert_eq!(err.result_label(), label, "{err}");
        }
    }

    #[test]
    fn excerpt_is_short_and_printable() {
        assert_eq!(excerpt(b"a\nb\r\n"), "a b");
        let long = vec![b'x'; 1000];
        let e = excerpt(&long);
        assert!(e.len() < 210 && e.ends_with('…'), "{e}");
    }
}
