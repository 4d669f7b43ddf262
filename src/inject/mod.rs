//! Pure injection: pod spec + settings -> JSON Patch + warnings (stub: helper fills in).

pub mod cli;
