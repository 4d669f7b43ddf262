//! `wsdrain inject -f FILE|-`: multi-document YAML in, injected YAML out (like
//! `linkerd inject`). Only the pod templates of workloads change; every other document
//! is copied through as written. Warnings and skips go to stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::Value;

use super::{DEFAULT_IMAGE, Decision, InjectSettings, inject_pod};

/// Inputs larger than this are refused (manifests, not data dumps).
const MAX_INPUT: u64 = 32 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,

    /// Image of the injected agent.
    #[arg(long, env = "WSDRAIN_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,

    /// imagePullPolicy of the injected containers.
    #[arg(long, env = "WSDRAIN_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["IfNotPresent", "Always", "Never"])]
    pub image_pull_policy: String,

    /// The target cluster runs native sidecars (Kubernetes >= 1.29); used by sidecar=auto.
    #[arg(long, env = "WSDRAIN_NATIVE_SIDECARS", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "true|false")]
    pub native_sidecars: bool,

    /// Treat the pods as living in a namespace labelled wsdrain.io/injection=enabled.
    #[arg(long, env = "WSDRAIN_NAMESPACE_OPTED_IN", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "true|false")]
    pub namespace_opted_in: bool,

    /// Fixed token instead of a random one per pod template (reproducible output only).
    #[arg(
        long,
        env = "WSDRAIN_INJECT_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub token: Option<String>,
}

pub fn run(args: InjectArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&args.file)?;
    let base = InjectSettings {
        image_pull_policy: args.image_pull_policy.clone(),
        namespace_opted_in: args.namespace_opted_in,
        native_sidecars: args.native_sidecars,
        ..InjectSettings::new(args.image.clone())
    };
    let mut report = |line: String| eprintln!("wsdrain inject: {line}");
    let output = inject_documents(
        &input,
        |doc| {
            let mut s = base.clone();
            s.token = args.token.clone().unwrap_or_else(InjectSettings::new_token);
            inject_pod(doc, &s)
        },
        &mut report,
    )?;
    std::io::stdout().lock().write_all(output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn read_input(file: &PathBuf) -> anyhow::Result<String> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_INPUT + 1)
            .read_to_string(&mut text)?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("{}", file.display()))?
            .take(MAX_INPUT + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("{}", file.display()))?;
    }
    if text.len() as u64 > MAX_INPUT {
        bail!("input is larger than {} MiB", MAX_INPUT >> 20);
    }
    Ok(text)
}

/// JSON Pointer of the pod template inside a workload of `kind`.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Splits on `---` lines, keeping the separators so untouched documents come out as
/// written.
fn split_documents(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_sep = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_sep {
            parts.push(&input[start..pos]);
            parts.push(&input[pos..pos + line.len()]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    parts.push(&input[start..]);
    parts
}

/// Runs `inject` on every pod template; documents are parts at even indexes.
pub fn inject_documents(
    input: &str,
    mut inject: impl FnMut(&Value) -> Result<Decision, super::InjectError>,
    report: &mut impl FnMut(String),
) -> anyhow::Result<String> {
    let mut out = String::with_capacity(input.len() * 2);
    for (i, part) in split_documents(input).into_iter().enumerate() {
        if i % 2 == 1 {
            out.push_str(part);
            continue;
        }
        let n = i / 2 + 1;
        let yaml: serde_norway::Value =
            serde_norway::from_str(part).with_context(|| format!("document {n}"))?;
        let kind = yaml.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let Some(pointer) = template_pointer(kind) else {
            out.push_str(part);
            continue;
        };
        let mut doc: Value =
            serde_json::to_value(&yaml).with_context(|| format!("document {n}"))?;
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let label = format!("{kind}/{name}");
        let Some(template) = doc.pointer_mut(pointer) else {
            report(format!("{label}: skipped: no pod template at {pointer}"));
            out.push_str(part);
            continue;
        };
        match inject(template).with_context(|| label.clone())? {
            Decision::Skip { reason } => {
                report(format!("{label}: skipped: {reason}"));
                out.push_str(part);
            }
            Decision::Patch { patch, warnings } => {
                json_patch::patch(template, &patch).with_context(|| label.clone())?;
                for w in warnings {
                    report(format!("{label}: warning: {w}"));
                }
                report(format!("{label}: injected"));
                out.push_str(&serde_norway::to_string(&doc)?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_separators_and_text() {
        let input = "a: 1\n---\nb: 2\n--- # c\n\nc: 3";
        let parts = split_documents(input);
        assert_eq!(parts, ["a: 1\n", "---\n", "b: 2\n", "--- # c\n", "\nc: 3"]);
        assert_eq!(parts.concat(), input);
        assert_eq!(split_documents("x: '---'\n"), ["x: '---'\n"]);
    }

    #[test]
    fn templates() {
        assert_eq!(
            template_pointer("CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_pointer("Pod"), Some(""));
        assert_eq!(template_pointer("ConfigMap"), None);
    }
}
