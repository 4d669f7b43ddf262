//! `wsdrain wrap -- CMD`: the agent in-process around the app (stub: helper fills in).

use std::process::ExitCode;

use crate::config::AgentArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct WrapArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// The app's command and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn main(args: WrapArgs) -> ExitCode {
    eprintln!("wrap not built yet: {:?}", args.command);
    ExitCode::FAILURE
}
