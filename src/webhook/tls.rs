//! Serving certificate: loaded from PEM files and reloaded when they change (cert-manager
//! rotates the Secret under us), or generated with rcgen for labs (`--self-signed`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate PEM: {0}")]
    CertPem(rustls::pki_types::pem::Error),
    #[error("certificate file holds no CERTIFICATE block")]
    NoCert,
    #[error("private key PEM: {0}")]
    KeyPem(rustls::pki_types::pem::Error),
    #[error("certificate and key do not go together: {0}")]
    Key(rustls::Error),
    #[error("generate self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS config: {0}")]
    Config(rustls::Error),
}

/// Makes ring the process-wide rustls provider (DEPENDENCIES.md: tokio-rustls would
/// otherwise look for aws-lc-rs). A second call, or another part of the process having
/// done it first, is fine.
pub fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Parses a PEM certificate chain and private key and checks that they match.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::CertPem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsError::KeyPem)?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(TlsError::Key)
}

/// The certificate currently served. Handshakes read it; the reloader swaps it whole, so
/// a handshake sees either the old or the new pair, never a mix.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> Arc<CertStore> {
        Arc::new(CertStore {
            current: RwLock::new(Arc::new(key)),
        })
    }

    pub fn set(&self, key: CertifiedKey) {
        // A poisoned lock only means a panic elsewhere mid-swap; the value is still whole.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// A rustls server config that asks `store` for the certificate on every handshake.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // The API server speaks HTTP/1.1 to webhooks; we serve nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The PEM files on disk, and what was last tried, so a bad pair is logged once, not
/// every poll.
pub struct FilePair {
    pub cert: PathBuf,
    pub key: PathBuf,
    last: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl FilePair {
    pub fn new(cert: PathBuf, key: PathBuf) -> FilePair {
        FilePair {
            cert,
            key,
            last: None,
        }
    }

    /// Reads both files; returns the parsed pair if their content changed since the last
    /// call, None if unchanged. A pair that fails to parse is remembered as tried.
    pub fn load_if_changed(&mut self) -> Result<Option<CertifiedKey>, TlsError> {
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        if self
            .last
            .as_ref()
            .is_some_and(|(c, k)| *c == cert && *k == key)
        {
            return Ok(None);
        }
        let parsed = certified_key(&cert, &key);
        self.last = Some((cert, key));
        parsed.map(Some)
    }
}

/// Polls the files every `every` and swaps the served certificate when they change. Content
/// is compared, not mtimes: Secret volumes swap a symlink, and copies keep mtimes.
/// A bad new pair (half-written, mismatched key) keeps the old certificate in service.
pub async fn watch(
    mut files: FilePair,
    store: Arc<CertStore>,
    every: Duration,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match files.load_if_changed() {
            Ok(None) => {}
            Ok(Some(key)) => {
                store.set(key);
                metrics.certificate_reloaded(true);
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            Err(err) => {
                metrics.certificate_reloaded(false);
                tracing::error!(
                    cert = %files.cert.display(),
                    key = %files.key.display(),
                    error = %err,
                    "new certificate not loaded; still serving the previous one"
                )
            }
        }
    }
}

/// A lab CA and a serving certificate it signed, all in memory.
pub struct SelfSigned {
    pub ca_pem: String,
    pub key: CertifiedKey,
}

/// Generates a CA and a leaf for `sans` (DNS names or IP addresses). The CA, not the leaf,
/// goes into the webhook's caBundle, as with a cert-manager CA issuer.
pub fn self_signed(sans: &[String]) -> Result<SelfSigned, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wsdrain webhook lab CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(sans.to_vec())?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "wsdrain webhook");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

    let key = certified_key(
        format!("{}{}", leaf.pem(), ca_cert.pem()).as_bytes(),
        leaf_key.serialize_pem().as_bytes(),
    )?;
    Ok(SelfSigned {
        ca_pem: ca_cert.pem(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads_and_mismatch_is_refused() {
        install_ring();
        let a = self_signed(&["localhost".into(), "127.0.0.1".into()]).expect("gen a");
        assert_eq!(a.key.cert.len(), 2, "leaf + CA");
        assert!(a.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));

        let k1 = rcgen::KeyPair::generate().expect("key");
        let k2 = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&k1)
            .expect("cert");
        assert!(certified_key(cert.pem().as_bytes(), k1.serialize_pem().as_bytes()).is_ok());
        let err = certified_key(cert.pem().as_bytes(), k2.serialize_pem().as_bytes());
        assert!(matches!(err, Err(TlsError::Key(_))), "{err:?}");
        assert!(matches!(
            certified_key(b"garbage", k1.serialize_pem().as_bytes()),
            Err(TlsError::NoCert | TlsError::CertPem(_))
        ));
    }

    #[test]
    fn file_pair_reports_changes_once() {
        install_ring();
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        let mut files = FilePair::new(c.clone(), k);
        assert!(matches!(files.load_if_changed(), Ok(Some(_))));
        assert!(matches!(files.load_if_changed(), Ok(None)));
        std::fs::write(&c, "not a cert").expect("write");
        assert!(files.load_if_changed().is_err());
        // The same bad content is not reported again.
        assert!(matches!(files.load_if_changed(), Ok(None)));
    }
}
