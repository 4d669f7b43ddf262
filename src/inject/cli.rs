//! `wsdrain inject` and `wsdrain uninject`: manifests in (a file, a directory read
//! recursively, or `-` for stdin; multi-document YAML or JSON, `kind: List` included),
//! the same manifests out on stdout (like `linkerd inject`). Only the pod templates of
//! workloads change; every other document is copied through as written. Warnings and
//! skips go to stderr.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::Value;

use super::appgw;
use super::yaml::{parse_document, split_documents, strip_bom};
use super::{DEFAULT_IMAGE, Decision, InjectSettings, clip, inject_pod, uninject_pod};

/// Inputs larger than this are refused (manifests, not data dumps).
const MAX_INPUT: u64 = 32 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest file, directory (read recursively: *.yaml, *.yml, *.json), or - for stdin.
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

#[derive(Debug, Clone, clap::Args)]
pub struct UninjectArgs {
    /// Manifest file, directory (read recursively: *.yaml, *.yml, *.json), or - for stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
}

/// What became of one pod (template).
pub enum Outcome {
    /// Left as it is, with the reason.
    Skip(String),
    /// Replaced by this pod, with warnings.
    Changed(Value, Vec<String>),
}

pub fn run(args: InjectArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&args.file)?;
    let base = InjectSettings {
        image_pull_policy: args.image_pull_policy.clone(),
        namespace_opted_in: args.namespace_opted_in,
        native_sidecars: args.native_sidecars,
        ..InjectSettings::new(args.image.clone())
    };
    let mut objects = Vec::new();
    let output = transform_documents(
        &input,
        |pod| {
            let mut s = base.clone();
            s.token = args.token.clone().unwrap_or_else(InjectSettings::new_token);
            Ok(match inject_pod(pod, &s)? {
                Decision::Skip { reason } => Outcome::Skip(reason),
                Decision::Patch { patch, warnings } => {
                    let mut pod = pod.clone();
                    json_patch::patch(&mut pod, &patch)?;
                    Outcome::Changed(pod, warnings)
                }
            })
        },
        "injected",
        &mut |line| eprintln!("wsdrain inject: {line}"),
        &mut objects,
    )?;
    for w in appgw::warnings(&objects.iter().collect::<Vec<_>>()) {
        eprintln!("wsdrain inject: warning: {w}");
    }
    std::io::stdout().lock().write_all(output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// `wsdrain uninject`: every injected pod template back to what it was before.
pub fn run_uninject(args: UninjectArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&args.file)?;
    let output = transform_documents(
        &input,
        |pod| {
            Ok(match uninject_pod(pod)? {
                None => Outcome::Skip("not injected".into()),
                Some(original) => Outcome::Changed(original, Vec::new()),
            })
        },
        "uninjected",
        &mut |line| eprintln!("wsdrain uninject: {line}"),
        &mut Vec::new(),
    )?;
    std::io::stdout().lock().write_all(output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// The text of `path`: stdin for `-`, every manifest below a directory (sorted, joined
/// with `---`), or one file.
fn read_input(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        return read_limited(std::io::stdin(), "standard input");
    }
    if !path.is_dir() {
        let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        return read_limited(file, &path.display().to_string());
    }
    let mut files = Vec::new();
    manifests_below(path, &mut files)?;
    files.sort();
    let mut out = String::new();
    for file in files {
        let f = std::fs::File::open(&file).with_context(|| format!("{}", file.display()))?;
        let text = read_limited(f, &file.display().to_string())?;
        if !out.is_empty() {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("---\n");
        }
        out.push_str(strip_bom(&text));
        if out.len() as u64 > MAX_INPUT {
            bail!(
                "{}: more than {} MiB of manifests",
                path.display(),
                MAX_INPUT >> 20
            );
        }
    }
    Ok(out)
}

fn manifests_below(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            manifests_below(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
    Ok(())
}

fn read_limited(source: impl Read, name: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    source
        .take(MAX_INPUT + 1)
        .read_to_string(&mut text)
        .with_context(|| name.to_string())?;
    if text.len() as u64 > MAX_INPUT {
        bail!("{name}: larger than {} MiB", MAX_INPUT >> 20);
    }
    Ok(text)
}

/// JSON Pointer of the pod template inside a workload of `kind`.
pub(super) fn template_pointer(kind: &str) -> Option<&'static str> {
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

/// Runs `transform` on every pod template of every document (and of every item of a
/// `kind: List`); documents it leaves alone are copied through byte for byte. Every
/// object, as it comes out, is appended to `objects`.
pub fn transform_documents(
    input: &str,
    mut transform: impl FnMut(&Value) -> anyhow::Result<Outcome>,
    done: &str,
    report: &mut impl FnMut(String),
    objects: &mut Vec<Value>,
) -> anyhow::Result<String> {
    let mut out = String::with_capacity(input.len() * 2);
    for (i, part) in split_documents(strip_bom(input)).into_iter().enumerate() {
        if i % 2 == 1 {
            out.push_str(part);
            continue;
        }
        let n = i / 2 + 1;
        let mut doc = parse_document(part).with_context(|| format!("document {n}"))?;
        let changed = if doc.get("kind").and_then(Value::as_str) == Some("List") {
            let mut changed = false;
            let items = doc.get_mut("items").and_then(Value::as_array_mut);
            for (j, item) in items.into_iter().flatten().enumerate() {
                let prefix = format!("List/items[{j}] ");
                changed |= transform_object(item, &prefix, &mut transform, done, report)?;
            }
            changed
        } else {
            transform_object(&mut doc, "", &mut transform, done, report)?
        };
        if changed {
            out.push_str(&serde_norway::to_string(&doc)?);
        } else {
            out.push_str(part);
        }
        match doc {
            Value::Object(mut list) if list.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(Value::Array(items)) = list.remove("items") {
                    objects.extend(items);
                }
            }
            Value::Null => {}
            other => objects.push(other),
        }
    }
    Ok(out)
}

/// One object: its pod template through `transform`; true when it changed.
fn transform_object(
    object: &mut Value,
    prefix: &str,
    transform: &mut impl FnMut(&Value) -> anyhow::Result<Outcome>,
    done: &str,
    report: &mut impl FnMut(String),
) -> anyhow::Result<bool> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let Some(pointer) = template_pointer(kind) else {
        return Ok(false);
    };
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let label = clip(&format!("{prefix}{kind}/{name}"));
    let Some(template) = object.pointer_mut(pointer) else {
        report(format!("{label}: skipped: no pod template at {pointer}"));
        return Ok(false);
    };
    match transform(template).with_context(|| label.clone())? {
        Outcome::Skip(reason) => {
            report(format!("{label}: skipped: {reason}"));
            Ok(false)
        }
        Outcome::Changed(pod, warnings) => {
            *template = pod;
            for w in warnings {
                report(format!("{label}: warning: {w}"));
            }
            report(format!("{label}: {done}"));
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert_eq!(
            template_pointer("CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_pointer("Pod"), Some(""));
        assert_eq!(template_pointer("ConfigMap"), None);
    }

    #[test]
    fn list_items_are_transformed() {
        let input = "kind: List\nitems:\n- kind: Pod\n  metadata: {name: a}\n- kind: Service\n";
        let mut lines = Vec::new();
        let out = transform_documents(
            input,
            |pod| {
                let mut pod = pod.clone();
                pod["touched"] = true.into();
                Ok(Outcome::Changed(pod, vec![]))
            },
            "done",
            &mut |l| lines.push(l),
            &mut Vec::new(),
        )
        .unwrap();
        let v: Value = serde_norway::from_str(&out).unwrap();
        assert_eq!(v["items"][0]["touched"], true);
        assert!(v["items"][1].get("touched").is_none());
        assert_eq!(lines, ["List/items[0] Pod/a: done"]);
    }
}
