//! The drain timeline: a pure state machine with an injected clock (`machine`, `pacing`),
//! the close-reason hint, and the async runner that does the I/O (`runner`).

pub mod hint;
pub mod machine;
pub mod pacing;
pub mod report;
pub mod runner;
pub mod seams;

#[cfg(test)]
mod machine_tests;
