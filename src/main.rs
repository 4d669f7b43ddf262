//! The `wsdrain` binary: one subcommand per part (DESIGN.md, "Parts").

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wsdrain::agent::config::AgentArgs;
use wsdrain::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "wsdrain",
    version,
    about = "Graceful pod termination for WebSocket services"
)]
struct Cli {
    /// Log format: json lines (default) or text.
    #[arg(
        long,
        global = true,
        env = "WSDRAIN_LOG_FORMAT",
        default_value = "json"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the drain sidecar next to the app.
    Agent(AgentArgs),
    /// Run the mutating admission webhook that injects the agent.
    Webhook(wsdrain::webhook::WebhookArgs),
    /// Inject the agent into manifests offline (YAML in, YAML out).
    Inject(wsdrain::inject::cli::InjectArgs),
    /// Remove what `inject` (or the webhook) added, restoring the original pods.
    Uninject(wsdrain::inject::cli::UninjectArgs),
    /// Run CMD as a child and drain before passing SIGTERM on (no sidecar).
    Wrap(wsdrain::wrap::WrapArgs),
    /// Hook client: call the agent's /prestop and wait for the drain to end.
    Prestop(wsdrain::prestop::PrestopArgs),
    /// The reference WebSocket echo app implementing admin API v1.
    Echo(wsdrain::echo::EchoArgs),
    /// Reproduce scale-downs on this machine with real pods, ingress and clients.
    Lab(wsdrain::lab::LabArgs),
    /// Copy this binary to DEST (init container of `wsdrain.io/mode: wrap`).
    #[command(hide = true)]
    CopySelf {
        /// Where to write the executable copy.
        dest: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wsdrain::logging::init(cli.log_format);
    // One TLS provider for the whole process (kube client, webhook): ring, not aws-lc.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        // wrap manages its own runtime and exit code (it must reap children first).
        Command::Wrap(args) => return wsdrain::wrap::main(args),
        // inject is synchronous I/O on files.
        Command::Inject(args) => wsdrain::inject::cli::run(args),
        Command::Uninject(args) => wsdrain::inject::cli::run_uninject(args),
        Command::CopySelf { dest } => wsdrain::inject::copy_self::copy_self(&dest)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("copy-self {}: {e}", dest.display())),
        Command::Agent(args) => block_on(async { wsdrain::agent::run(args.validate()?).await }),
        Command::Webhook(args) => block_on(wsdrain::webhook::run(args)),
        Command::Prestop(args) => block_on(wsdrain::prestop::run(args)),
        Command::Echo(args) => block_on(wsdrain::echo::run(args)),
        Command::Lab(args) => block_on(wsdrain::lab::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("wsdrain: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(
    future: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(future)
}
