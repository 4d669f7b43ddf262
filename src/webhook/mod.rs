//! The mutating admission webhook over TLS: AdmissionReview v1 in, JSON Patch out, using
//! the same pure injector as `wsdrain inject`. See docs/webhook.md.

pub mod connections;
pub mod drains;
pub mod metrics;
pub mod pki;
pub mod review;
pub mod self_managed;
pub mod server;
pub mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use tokio_util::sync::CancellationToken;

use crate::inject::{DEFAULT_IMAGE, InjectSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecars {
    /// Ask the API server its version at start (>= 1.29 → native).
    Auto,
    True,
    False,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "WSDRAIN_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: std::net::SocketAddr,

    /// PEM certificate chain (reloaded when the file changes).
    #[arg(
        long,
        env = "WSDRAIN_WEBHOOK_CERT",
        requires = "key",
        required_unless_present_any = ["self_signed", "self_managed"]
    )]
    pub cert: Option<PathBuf>,

    /// PEM private key (reloaded when the file changes).
    #[arg(long, env = "WSDRAIN_WEBHOOK_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Generate a CA and serving certificate in memory (labs) and print the caBundle.
    #[arg(long, env = "WSDRAIN_WEBHOOK_SELF_SIGNED", conflicts_with_all = ["cert", "key"])]
    pub self_signed: bool,

    /// Manage the CA and serving certificate in the Secret `--tls-secret` and keep the
    /// caBundle of `--webhook-config` current (no cert-manager); replicas elect one writer
    /// with the Lease `--lease`.
    #[arg(long, env = "WSDRAIN_WEBHOOK_SELF_MANAGED", conflicts_with_all = ["cert", "key", "self_signed"])]
    pub self_managed: bool,

    /// Secret holding ca.crt, ca.key, tls.crt, tls.key (`--self-managed`).
    #[arg(
        long,
        env = "WSDRAIN_WEBHOOK_TLS_SECRET",
        default_value = "wsdrain-webhook-tls"
    )]
    pub tls_secret: String,

    /// Lease naming the one replica that writes certificates (`--self-managed`).
    #[arg(long, env = "WSDRAIN_WEBHOOK_LEASE", default_value = "wsdrain-webhook")]
    pub lease: String,

    /// MutatingWebhookConfiguration whose caBundle is kept current (`--self-managed`).
    #[arg(long, env = "WSDRAIN_WEBHOOK_CONFIG", default_value = "wsdrain")]
    pub webhook_config: String,

    /// This replica's name in the Lease; the pod name (downward API).
    #[arg(long, env = "WSDRAIN_WEBHOOK_IDENTITY", default_value = "")]
    pub identity: String,

    /// Names for the self-signed or self-managed certificate (DNS names or IPs, comma-separated in the env
    /// var). Default: localhost, 127.0.0.1 and the service's DNS names.
    #[arg(long = "san", env = "WSDRAIN_WEBHOOK_SANS", value_delimiter = ',')]
    pub sans: Vec<String>,

    /// Service name, for the default certificate names.
    #[arg(
        long,
        env = "WSDRAIN_WEBHOOK_SERVICE",
        default_value = "wsdrain-webhook"
    )]
    pub service: String,

    /// Namespace the webhook runs in: the default certificate names, and where the
    /// Secret and Lease of `--self-managed` are.
    #[arg(long, env = "WSDRAIN_WEBHOOK_NAMESPACE", default_value = "wsdrain")]
    pub namespace: String,

    /// Agent image to inject.
    #[arg(long, env = "WSDRAIN_WEBHOOK_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,

    /// imagePullPolicy of the injected containers.
    #[arg(long, env = "WSDRAIN_WEBHOOK_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["IfNotPresent", "Always", "Never"])]
    pub image_pull_policy: String,

    /// Whether the cluster runs native sidecars (restartPolicy: Always init containers).
    #[arg(long, env = "WSDRAIN_WEBHOOK_NATIVE_SIDECARS", default_value = "auto")]
    pub native_sidecars: NativeSidecars,

    /// How often the certificate files are checked for changes.
    #[arg(long, env = "WSDRAIN_WEBHOOK_CERT_POLL", default_value = "1s",
          value_parser = crate::units::parse_duration)]
    pub cert_poll: Duration,

    /// Largest request body accepted (bytes); larger gets 413.
    #[arg(long, env = "WSDRAIN_WEBHOOK_MAX_BODY", default_value_t = server::DEFAULT_BODY_LIMIT)]
    pub max_body: usize,
}

pub async fn run(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    tls::install_ring();
    let native_sidecars = match args.native_sidecars {
        NativeSidecars::True => true,
        NativeSidecars::False => false,
        NativeSidecars::Auto => detect_native_sidecars().await,
    };

    let stop = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let client = match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::info!(error = %e, "no Kubernetes API configuration: drains are not counted");
            None
        }
    };
    if let Some(client) = &client {
        tokio::spawn(drains::count(client.clone(), metrics.clone(), stop.clone()));
    }
    let store = serving_certificate(&args, client, metrics.clone(), stop.clone()).await?;
    let tls_config = tls::server_config(store)?;

    let app = Arc::new(server::App {
        settings: InjectSettings {
            image_pull_policy: args.image_pull_policy.clone(),
            native_sidecars,
            // The MutatingWebhookConfiguration's selectors only call us for opted-in
            // namespaces or pods (the namespace label is not in the request), so being
            // called means opted in; a pod label `wsdrain.io/inject: "false"` still wins.
            namespace_opted_in: true,
            ..InjectSettings::new(args.image.clone())
        },
        metrics,
        body_limit: args.max_body,
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        image = %args.image,
        native_sidecars,
        "webhook serving /mutate, /healthz, /metrics"
    );
    tokio::spawn(stop_on_signal(stop.clone()));
    server::serve(listener, tls_config, app, stop).await;
    tracing::info!("webhook stopped");
    Ok(ExitCode::SUCCESS)
}

/// Where the served certificate comes from: generated in memory (`--self-signed`), the
/// Secret kept by `--self-managed`, or the files `--cert`/`--key` (cert-manager). Starts
/// the task that keeps it current.
async fn serving_certificate(
    args: &WebhookArgs,
    client: Option<kube::Client>,
    metrics: Arc<metrics::Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<Arc<tls::CertStore>> {
    let store = if args.self_signed {
        let sans = sans(args, true);
        let generated = tls::self_signed(&sans).context("--self-signed")?;
        // stdout carries only this line, so scripts can take it: `... | sed -n 's/^caBundle: //p'`.
        println!(
            "caBundle: {}",
            BASE64_STANDARD.encode(generated.ca_pem.as_bytes())
        );
        tracing::info!(?sans, "serving a self-signed certificate (lab use)");
        tls::CertStore::new(generated.key)
    } else if args.self_managed {
        let client = client
            .context("--self-managed needs the Kubernetes API (in-cluster config or kubeconfig)")?;
        let identity = if args.identity.is_empty() {
            std::env::var("HOSTNAME")
                .unwrap_or_else(|_| format!("wsdrain-webhook-{}", std::process::id()))
        } else {
            args.identity.clone()
        };
        let names = self_managed::Names {
            namespace: args.namespace.clone(),
            secret: args.tls_secret.clone(),
            lease: args.lease.clone(),
            webhook_config: args.webhook_config.clone(),
            identity,
            sans: sans(args, false),
        };
        tracing::info!(?names, "self-managed certificates");
        let mut manager = self_managed::Manager::new(client, names);
        let every = self_managed::ROUND_EVERY;
        let (key, served) =
            self_managed::first_certificate(&mut manager, Duration::from_secs(2)).await;
        let store = tls::CertStore::new(key);
        tokio::spawn(self_managed::run(
            manager,
            store.clone(),
            served,
            every,
            stop.clone(),
            metrics.clone(),
        ));
        store
    } else {
        let (Some(cert), Some(key)) = (args.cert.clone(), args.key.clone()) else {
            anyhow::bail!(
                "--cert and --key are required unless --self-signed or --self-managed is given"
            );
        };
        let mut files = tls::FilePair::new(cert, key);
        let first = files
            .load_if_changed()
            .context("loading --cert/--key")?
            .context("certificate files unreadable")?;
        let store = tls::CertStore::new(first);
        tokio::spawn(tls::watch(
            files,
            store.clone(),
            args.cert_poll,
            stop.clone(),
            metrics.clone(),
        ));
        store
    };
    Ok(store)
}

/// `--san`, or the Service's DNS names (and loopback names for labs).
fn sans(args: &WebhookArgs, loopback: bool) -> Vec<String> {
    if !args.sans.is_empty() {
        return args.sans.clone();
    }
    let (service, namespace) = (&args.service, &args.namespace);
    let mut names = if loopback {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    } else {
        vec![]
    };
    names.extend([
        service.clone(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]);
    names
}

async fn stop_on_signal(stop: CancellationToken) {
    match crate::signals::Termination::install() {
        Ok(termination) => {
            let sig = termination.first().await;
            tracing::info!(
                signal = crate::signals::name(sig),
                "finishing in-flight requests"
            );
            stop.cancel();
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT"),
    }
}

/// Native sidecars are on by default from Kubernetes 1.29. Without a version we fall back
/// to classic sidecars, which work on every version; on a cluster older than 1.29 a
/// native sidecar would be an init container that never exits and the pod would hang.
async fn detect_native_sidecars() -> bool {
    let probe = async {
        let client = kube::Client::try_default().await?;
        let info = client.apiserver_version().await?;
        Ok::<_, kube::Error>((info.major, info.minor, info.git_version))
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok((major, minor, git))) => match supports_native_sidecars(&major, &minor) {
            Some(native) => {
                tracing::info!(version = %git, native_sidecars = native, "API server version");
                native
            }
            None => {
                tracing::warn!(%major, %minor, "API server version not understood; injecting classic sidecars");
                false
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "API server not reachable; injecting classic sidecars");
            false
        }
        Err(_) => {
            tracing::warn!("API server version probe timed out; injecting classic sidecars");
            false
        }
    }
}

/// `minor` may carry a suffix ("29+" on GKE/EKS).
fn supports_native_sidecars(major: &str, minor: &str) -> Option<bool> {
    let num = |s: &str| {
        s.trim()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    let (major, minor) = (num(major)?, num(minor)?);
    Some((major, minor) >= (1, 29))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_gate() {
        assert_eq!(supports_native_sidecars("1", "28"), Some(false));
        assert_eq!(supports_native_sidecars("1", "29+"), Some(true));
        assert_eq!(supports_native_sidecars("1", "33"), Some(true));
        assert_eq!(supports_native_sidecars("2", "0"), Some(true));
        assert_eq!(supports_native_sidecars("1", ""), None);
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: WebhookArgs,
        }
        let cli = Cli::try_parse_from(["x", "--self-signed", "--san", "a,b"]).expect("parse");
        assert_eq!(cli.args.sans, ["a", "b"]);
        assert_eq!(cli.args.native_sidecars, NativeSidecars::Auto);
        assert!(
            Cli::try_parse_from(["x"]).is_err(),
            "needs certs or --self-signed"
        );
        assert!(
            Cli::try_parse_from(["x", "--cert", "c"]).is_err(),
            "cert needs key"
        );
        assert!(Cli::try_parse_from(["x", "--self-signed", "--cert", "c", "--key", "k"]).is_err());
        let cli = Cli::try_parse_from(["x", "--self-managed"]).expect("self-managed alone");
        assert_eq!(
            (
                cli.args.tls_secret.as_str(),
                cli.args.lease.as_str(),
                cli.args.webhook_config.as_str()
            ),
            ("wsdrain-webhook-tls", "wsdrain-webhook", "wsdrain"),
            "the names the overlay's RBAC grants"
        );
        assert!(Cli::try_parse_from(["x", "--self-managed", "--self-signed"]).is_err());
        assert!(Cli::try_parse_from(["x", "--self-managed", "--cert", "c", "--key", "k"]).is_err());
    }
}
