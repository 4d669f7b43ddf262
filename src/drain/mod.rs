//! The drain timeline: a pure state machine with an injected clock, and its async runner.

pub mod hint;
pub mod report;
