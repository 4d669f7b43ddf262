//! `wsdrain wrap -- CMD…`: runs the app as a child and does the agent's job in-process.
//! SIGTERM starts the agent's drain; only when it ended does the app get SIGTERM, then
//! SIGKILL after `--child-grace`. Other signals are passed on at once. As PID 1 (or a
//! child subreaper) it reaps orphans and leaves no process behind. See docs/wrap.md.

mod child;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::signal::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH,
};
use thiserror::Error;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::agent::Agent;
use crate::agent::config::{AgentArgs, AgentConfig, ConfigError};
use crate::drain::report::{Summary, Trigger};
use crate::units::parse_duration;

#[derive(Debug, Clone, clap::Args)]
pub struct WrapArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Time the app gets after its SIGTERM (sent when the drain ended) before SIGKILL.
    #[arg(long, env = "WSDRAIN_CHILD_GRACE", default_value = "4s", value_parser = parse_duration)]
    pub child_grace: Duration,
    /// The app's command and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Signals passed on to the app as soon as they arrive.
const FORWARDED: [i32; 6] = [SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH];

#[derive(Debug, Error)]
pub enum WrapError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spawn(#[from] child::SpawnError),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the agent: {0:#}")]
    Agent(anyhow::Error),
}

impl WrapError {
    fn exit_code(&self) -> u8 {
        match self {
            WrapError::Spawn(e) => e.exit_code(),
            WrapError::Config(_) => 2,
            _ => 1,
        }
    }
}

pub fn main(args: WrapArgs) -> ExitCode {
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("wsdrain wrap: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn run(args: WrapArgs) -> Result<u8, WrapError> {
    let cfg = args.agent.validate()?;
    // Handlers first, before any thread or child exists: from here on no signal can end
    // us with its default action, and no SIGCHLD is missed.
    let mut signals =
        signal_hook::iterator::Signals::new(FORWARDED.iter().copied().chain([SIGTERM, SIGCHLD]))
            .map_err(WrapError::Signals)?;
    become_subreaper();

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let signals_handle = signals.handle();
    std::thread::Builder::new()
        .name("wrap-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .map_err(WrapError::Signals)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WrapError::Runtime)?;
    let ended = runtime.block_on(supervise(cfg, args.child_grace, &args.command, rx));
    runtime.shutdown_timeout(Duration::from_millis(200));
    signals_handle.close();
    let ended = ended?;

    let leftovers = child::stop_leftovers(ended.leftover_deadline);
    let code = child::exit_code(ended.status);
    tracing::info!(exit_code = code, status = ?ended.status, leftovers, "app exited; wrap exits with its code");
    Ok(code)
}

/// Not needed as PID 1, which inherits orphans anyway; elsewhere (docker --init, systemd,
/// a shell) this makes orphans of the app re-parent to us so that we can reap them.
fn become_subreaper() {
    if nix::unistd::getpid().as_raw() == 1 {
        return;
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper: orphans of the app go to the init process");
    }
}

enum Phase {
    Running,
    Draining(JoinHandle<Summary>),
    /// The app got SIGTERM; SIGKILL is due at `deadline` unless already sent.
    Stopping {
        deadline: Instant,
        killed: bool,
    },
}

enum Event {
    Signal(i32),
    SignalsClosed,
    Drained(Result<Summary, tokio::task::JoinError>),
    KillDue,
    ReapTick,
}

struct Ended {
    status: nix::sys::wait::WaitStatus,
    leftover_deadline: Instant,
}

async fn supervise(
    cfg: AgentConfig,
    child_grace: Duration,
    command: &[String],
    mut signals: UnboundedReceiver<i32>,
) -> Result<Ended, WrapError> {
    let linger = cfg.linger;
    // The agent binds before the app starts: a bad --listen fails before anything runs.
    let agent = Agent::start(cfg).await.map_err(WrapError::Agent)?;
    let drainer = agent.drainer();
    let app = child::spawn(command)?;
    tracing::info!(pid = app.as_raw(), command = ?command, "app started");

    let mut phase = Phase::Running;
    let mut signals_open = true;
    let mut drain_ended = None;
    // A fallback in case a SIGCHLD was coalesced away at an unlucky moment.
    let mut reap_tick = tokio::time::interval(Duration::from_secs(1));
    let status = loop {
        let kill_at = match phase {
            Phase::Stopping {
                deadline,
                killed: false,
            } => Some(deadline),
            _ => None,
        };
        let event = tokio::select! {
            sig = signals.recv(), if signals_open => sig.map_or(Event::SignalsClosed, Event::Signal),
            res = wait_drain(&mut phase) => Event::Drained(res),
            () = sleep_until(kill_at) => Event::KillDue,
            _ = reap_tick.tick() => Event::ReapTick,
        };
        match event {
            Event::Signal(SIGCHLD) | Event::ReapTick => {
                if let Some(status) = child::reap(Some(app)) {
                    break status;
                }
            }
            Event::Signal(SIGTERM) => match phase {
                Phase::Running => {
                    tracing::info!("SIGTERM: draining before the app gets it");
                    let drainer = drainer.clone();
                    phase = Phase::Draining(tokio::spawn(async move {
                        drainer.drain(Trigger::Signal).await
                    }));
                }
                Phase::Draining(_) => {
                    // Dropping the handle leaves the agent's drain running (still unready).
                    tracing::warn!(
                        "second SIGTERM: the app gets SIGTERM now, without waiting for the drain"
                    );
                    phase = terminate(app, child_grace);
                }
                Phase::Stopping { .. } => tracing::info!("SIGTERM again: the app already has it"),
            },
            Event::Signal(n) => match Signal::try_from(n) {
                Ok(sig) => {
                    tracing::info!(signal = %sig, "passing the signal on to the app");
                    child::send(app, sig);
                }
                Err(e) => tracing::warn!(signal = n, error = %e, "unknown signal"),
            },
            Event::SignalsClosed => {
                tracing::error!("signal handling stopped; only reaping from now on");
                signals_open = false;
            }
            Event::Drained(res) => {
                match res {
                    Ok(s) => tracing::info!(
                        outcome = ?s.outcome,
                        duration_ms = s.duration_ms,
                        remaining = s.remaining,
                        sessions_closed = s.sessions_closed,
                        "drain finished: SIGTERM to the app"
                    ),
                    Err(e) => tracing::error!(error = %e, "drain task failed: SIGTERM to the app"),
                }
                drain_ended = Some(Instant::now());
                phase = terminate(app, child_grace);
            }
            Event::KillDue => {
                tracing::warn!(
                    child_grace_ms = child_grace.as_millis() as u64,
                    "app still running after --child-grace: SIGKILL"
                );
                child::send(app, Signal::SIGKILL);
                if let Phase::Stopping { killed, .. } = &mut phase {
                    *killed = true;
                }
            }
        }
    };
    // Hooks waiting on /prestop were answered when the drain ended; give the answers
    // time to get out before the API goes away.
    if let Some(end) = drain_ended {
        tokio::time::sleep_until((end + linger).into()).await;
    }
    drop(agent);
    let leftover_deadline = match phase {
        Phase::Stopping { deadline, .. } => deadline,
        _ => Instant::now() + child_grace,
    };
    Ok(Ended {
        status,
        leftover_deadline,
    })
}

fn terminate(app: Pid, child_grace: Duration) -> Phase {
    child::send(app, Signal::SIGTERM);
    Phase::Stopping {
        deadline: Instant::now() + child_grace,
        killed: false,
    }
}

async fn wait_drain(phase: &mut Phase) -> Result<Summary, tokio::task::JoinError> {
    match phase {
        Phase::Draining(handle) => handle.await,
        _ => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
