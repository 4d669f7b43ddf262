//! Client of the app's admin API v1 (stub: helper fills in).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    #[error("admin API unreachable: {0}")]
    Connect(String),
}

impl AdminError {
    /// The `result` label of `wsdrain_admin_requests_total`.
    pub fn result_label(&self) -> &'static str {
        "refused"
    }
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: hyper::Uri,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(base: hyper::Uri, timeout: Duration) -> Self {
        Self { base, timeout }
    }

    pub async fn drain(&self, req: &DrainRequest) -> Result<DrainReply, AdminError> {
        let _ = (req, self.timeout);
        Err(AdminError::Connect(self.base.to_string()))
    }

    pub async fn connections(&self) -> Result<u64, AdminError> {
        Err(AdminError::Connect(self.base.to_string()))
    }
}
