//! wsdrain: graceful pod termination for WebSocket services.
//! docs/architecture.md maps the modules; docs/ holds the contracts they share.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod api;
pub mod conn;
pub mod drain;
#[cfg(feature = "echo")]
pub mod echo;
pub mod fleet;
pub mod http1;
pub mod inject;
pub mod kube;
#[cfg(feature = "lab")]
pub mod lab;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod prestop;
pub mod proxy;
pub mod signals;
pub mod units;
pub mod webhook;
pub mod wrap;

/// Property-test cases: `default` in `make test`, `PROPTEST_CASES` in `make fuzz`.
#[doc(hidden)]
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}
