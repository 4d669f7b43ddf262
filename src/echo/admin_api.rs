//! The echo app's side of admin API v1 (docs/admin-api.md); the wire types and their
//! parser are shared with the agent's client in `crate::admin::v1`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::App;
use crate::admin::v1::{
    self, CONNECTIONS_PATH, ConnectionsReply, DRAIN_PATH, DrainReply, ErrorReply, FieldError,
    MAX_REQUEST_BYTES,
};

fn error(status: StatusCode, err: &FieldError) -> Response<Full<Bytes>> {
    crate::net::json(status, &json!(err.reply()))
}

pub async fn handle(req: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, CONNECTIONS_PATH) => crate::net::json(
            StatusCode::OK,
            &json!(ConnectionsReply {
                open: app.sessions.open_count()
            }),
        ),
        (&Method::POST, DRAIN_PATH) => {
            let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    let status = if err.is::<http_body_util::LengthLimitError>() {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    return crate::net::json(
                        status,
                        &json!(ErrorReply {
                            error: format!("body: {err}"),
                            field: "body".to_owned(),
                        }),
                    );
                }
            };
            let params = match v1::parse_drain_request(&body) {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(field = err.field, error = err.message, "bad drain request");
                    return error(StatusCode::BAD_REQUEST, &err);
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
            crate::net::json(StatusCode::OK, &json!(DrainReply { closed, remaining }))
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
