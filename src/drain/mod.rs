//! The drain core: the timeline as a pure state machine with an injected clock
//! (`machine`, `pacing`), its settings and reports, the close-reason hint, the two traits
//! it talks to the world through (`seams`), and the thin async runner (`runner`).
//!
//! Nothing in here imports the agent's flags, HTTP, metrics or Kubernetes: the edges
//! depend on the core, never the reverse.

pub mod hint;
pub mod machine;
pub mod pacing;
pub mod report;
pub mod runner;
pub mod seams;
pub mod settings;

#[cfg(test)]
mod machine_tests;

pub use machine::{Phase, Status};
pub use report::{Notice, Outcome, Summary, Trigger};
pub use runner::Drainer;
pub use seams::{SessionCloser, SessionCounter};
pub use settings::{DelayRange, Settings};
