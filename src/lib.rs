//! wsdrain: graceful pod termination for WebSocket services.
//! See DESIGN.md in docs/ for the contracts every module shares.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod api;
pub mod config;
pub mod conn;
pub mod drain;
pub mod echo;
pub mod http1;
pub mod inject;
pub mod kube;
pub mod lab;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod prestop;
pub mod proxy;
pub mod signals;
pub mod webhook;
pub mod wrap;
