//! Admin API v1, the contract between the agent and an app that closes its own
//! WebSockets (docs/admin-api.md): the wire types and limits both sides share (`v1`),
//! and the agent's client (`client`), which is one `SessionCloser` of the drain core.

pub mod client;
pub mod v1;

pub use client::{AdminClient, AdminError};
pub use v1::{DrainReply, DrainRequest, MAX_REPLY_BYTES};
