//! The agent's client of the app's admin API v1 (docs/admin-api.md).
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
use thiserror::Error;

use super::v1::{
    self, CONNECTIONS_PATH, DRAIN_PATH, DrainReply, DrainRequest, EXCERPT_BYTES, FieldError,
    MAX_REPLY_BYTES, excerpt,
};
use crate::drain::seams::{BoxFuture, CloseError, CloseReply, CloseRequest, SessionCloser};
use crate::http1::{self, Endpoint, read_limited};

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
    #[error("admin API {call} answered a body that is not a JSON object: {message}")]
    NotJson { call: &'static str, message: String },
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
        let answer = self.call(DRAIN, Method::POST, DRAIN_PATH, body).await?;
        v1::parse_drain_reply(&answer).map_err(|e| bad_field(DRAIN, e))
    }

    pub async fn connections(&self) -> Result<u64, AdminError> {
        let answer = self
            .call(CONNECTIONS, Method::GET, CONNECTIONS_PATH, Vec::new())
            .await?;
        v1::parse_connections_reply(&answer)
            .map(|r| r.open)
            .map_err(|e| bad_field(CONNECTIONS, e))
    }

    async fn call(
        &self,
        call: &'static str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, AdminError> {
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
    ) -> Result<Vec<u8>, AdminError> {
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
        Ok(bytes)
    }
}

fn bad_field(call: &'static str, e: FieldError) -> AdminError {
    if e.field == "body" {
        return AdminError::NotJson {
            call,
            message: e.message,
        };
    }
    AdminError::BadField {
        call,
        field: e.field,
        problem: e.message,
    }
}

/// The admin API is the drain's closer when the app implements it.
impl SessionCloser for AdminClient {
    fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>> {
        Box::pin(async move {
            let req = DrainRequest {
                max: req.max,
                code: req.code,
                reason: req.reason,
            };
            match self.drain(&req).await {
                Ok(r) => Ok(CloseReply {
                    closed: r.closed,
                    remaining: r.remaining,
                }),
                Err(e) => Err(CloseError {
                    label: e.result_label(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
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
}
