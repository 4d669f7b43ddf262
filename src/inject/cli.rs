//! `wsdrain inject -f FILE|-` (stub: helper fills in).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
}

pub fn run(args: InjectArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("inject not built yet: {args:?}")
}
