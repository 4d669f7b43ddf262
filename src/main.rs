//! The `wsdrain` binary: one subcommand per part (docs/architecture.md). The lab and the
//! echo app exist only in builds with the `lab`/`echo` features (the default); the image
//! builds without them.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use wsdrain::agent::config::AgentArgs;
use wsdrain::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "wsdrain",
    version,
    about = "Graceful pod termination for WebSocket services",
    after_help = "Run `wsdrain <COMMAND> --help` for a command's flags and an example."
)]
struct Cli {
    /// Log format: json lines (default) or text.
    #[arg(
        long,
        global = true,
        env = "WSDRAIN_LOG_FORMAT",
        default_value = "json",
        help_heading = "Global options"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the drain sidecar next to the app.
    #[command(
        after_help = "Example (the app serves WebSockets on :8080, admin API on :8081):
  wsdrain agent --ports 8080 --admin-url http://127.0.0.1:8081 --grace-period 60s"
    )]
    Agent(AgentArgs),
    /// Run the mutating admission webhook that injects the agent.
    #[command(after_help = "Example (certificate mounted by cert-manager):
  wsdrain webhook --cert /tls/tls.crt --key /tls/tls.key --image ghcr.io/example/wsdrain:0.1.0")]
    Webhook(wsdrain::webhook::WebhookArgs),
    /// Inject the agent into manifests offline (YAML in, YAML out).
    #[command(after_help = "Example:
  wsdrain inject -f deployment.yaml > injected.yaml
  kubectl get deploy chat -o yaml | wsdrain inject -f - | kubectl apply -f -")]
    Inject(wsdrain::inject::cli::InjectArgs),
    /// Remove what `inject` (or the webhook) added, restoring the original pods.
    #[command(after_help = "Example:
  wsdrain uninject -f injected.yaml > original.yaml
  kubectl get deploy chat -o yaml | wsdrain uninject -f - | kubectl apply -f -")]
    Uninject(wsdrain::inject::cli::UninjectArgs),
    /// Run CMD as a child and drain before passing SIGTERM on (no sidecar).
    #[command(after_help = "Example (as the container's entrypoint):
  wsdrain wrap --ports 8080 --admin-url http://127.0.0.1:8081 -- /app/server --port 8080")]
    Wrap(wsdrain::wrap::WrapArgs),
    /// Hook client: call the agent's /prestop and wait for the drain to end.
    #[command(after_help = "Example (the app container's preStop exec hook):
  wsdrain prestop --agent-url http://127.0.0.1:19901")]
    Prestop(wsdrain::prestop::PrestopArgs),
    /// The reference WebSocket echo app implementing admin API v1.
    #[cfg(feature = "echo")]
    #[command(after_help = "Example:
  wsdrain echo --listen 127.0.0.1:8080 --admin 127.0.0.1:8081")]
    Echo(wsdrain::echo::EchoArgs),
    /// Reproduce scale-downs on this machine with real pods, ingress and clients.
    #[cfg(feature = "lab")]
    #[command(after_help = "Example (needs root: network namespaces):
  wsdrain lab seed --agent on --clients 400 --grace 20s --json")]
    Lab(wsdrain::lab::LabArgs),
    /// Print the version, git commit, build profile and features.
    #[command(after_help = "Example:
  wsdrain version")]
    Version,
    /// Print a shell completion script for bash, zsh or fish.
    #[command(after_help = "Example:
  wsdrain completion bash > /etc/bash_completion.d/wsdrain
  wsdrain completion zsh > \"${fpath[1]}/_wsdrain\"
  wsdrain completion fish > ~/.config/fish/completions/wsdrain.fish")]
    Completion {
        /// The shell to generate the script for.
        shell: clap_complete::Shell,
    },
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
        Command::Version => write_stdout(version_text().as_bytes()),
        Command::Completion { shell } => {
            // Into a buffer first: clap_complete panics when its writer fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "wsdrain", &mut script);
            write_stdout(&script)
        }
        Command::Agent(args) => match args.validate() {
            Ok(cfg) => block_on(wsdrain::agent::run(cfg)),
            Err(e) => usage_error(e),
        },
        Command::Webhook(args) => block_on(wsdrain::webhook::run(args)),
        Command::Prestop(args) => block_on(wsdrain::prestop::run(args)),
        #[cfg(feature = "echo")]
        Command::Echo(args) => block_on(wsdrain::echo::run(args)),
        #[cfg(feature = "lab")]
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

/// A bad flag value found after parsing: reported like clap's own errors, with the
/// same exit code (2), so every bad flag ends the same way. Failures at run time exit 1.
fn usage_error(e: impl std::fmt::Display) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, e)
        .exit()
}

/// `wsdrain version`: one `key: value` line each. The commit comes from the environment
/// at build time (`make` and the image scripts set WSDRAIN_GIT_COMMIT), the profile from
/// build.rs.
fn version_text() -> String {
    let features: Vec<&str> = [
        ("echo", cfg!(feature = "echo")),
        ("lab", cfg!(feature = "lab")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    format!(
        "wsdrain {}\ncommit: {}\nprofile: {}\nfeatures: {}\n",
        env!("CARGO_PKG_VERSION"),
        option_env!("WSDRAIN_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .unwrap_or("unknown"),
        env!("WSDRAIN_BUILD_PROFILE"),
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        },
    )
}

/// Writes all of `bytes` to stdout; a closed pipe is an error, not a panic.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Two workers for every async subcommand. The agent too: a current-thread runtime saved
/// it no measurable memory (docs/benchmarks.md, "Footprint").
fn block_on(
    future: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every `wsdrain …` line of every subcommand's example parses with the flags that
    /// exist today (the part before a pipe or redirection).
    #[test]
    fn every_subcommand_has_an_example_that_parses() {
        let cli = Cli::command();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let examples: Vec<&str> = help
                .lines()
                .map(str::trim)
                .filter_map(|l| {
                    l.split(['|', '>'])
                        .find(|p| p.trim().starts_with("wsdrain "))
                })
                .collect();
            assert!(!examples.is_empty(), "`wsdrain {name}` has no example");
            for example in examples {
                let words = example.split_whitespace();
                if let Err(e) = Cli::try_parse_from(words) {
                    panic!("example of `{name}` does not parse: {example}\n{e}");
                }
            }
        }
    }
}
