//! Termination signals: the first SIGTERM or SIGINT starts (or joins) the drain; a second
//! SIGINT exits at once for someone at a terminal who does not want to wait.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

/// Exit code for an impatient second Ctrl-C, like a shell's 128 + SIGINT.
const INTERRUPTED: i32 = 130;

/// Resolves with the first termination signal. Installs the handlers at call time.
pub async fn termination() -> std::io::Result<i32> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let first = signals.next().await.unwrap_or(SIGTERM);
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if sig == SIGINT {
                tracing::warn!("second interrupt: exiting without waiting for the drain");
                std::process::exit(INTERRUPTED);
            }
            tracing::info!("SIGTERM again: the drain is already running");
        }
    });
    Ok(first)
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}
