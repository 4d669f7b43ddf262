//! The self-managed PKI (`--self-managed`): a CA and a serving certificate it signed, kept
//! together in one Secret, and the decision of when to renew which. Pure: the time is
//! passed in, and the Kubernetes side (`self_managed`) only reads and writes the Secret.
//!
//! Renewal never breaks a handshake: a new CA joins the bundle next to the old one (which
//! stays until it expires), and signs serving certificates only once it has been in the
//! bundle for `CA_PROPAGATION`, so every API server has seen it first.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

pub const CA_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Longer than a serving certificate lives, so that one signed by the old CA expires
/// before the old CA leaves the bundle.
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(180 * 24 * 3600);
pub const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a new CA sits in the caBundle before it signs: the API servers' view of the
/// webhook configuration lags the write by seconds.
pub const CA_PROPAGATION: Duration = Duration::from_secs(10 * 60);
/// Certificates start this long before they are made, for clocks a little behind ours.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Keys of the Secret; the same names cert-manager writes, so a mounted Secret of either
/// kind looks alike.
pub const CA_CERTS: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the Secret holds no CA key to sign with")]
    NoCaKey,
}

/// What the Secret holds, as PEM text (empty when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Material {
    /// Every CA the webhook configuration trusts, the current (signing) one first.
    pub ca_bundle: String,
    pub ca_key: String,
    /// Serving certificate followed by the CA that signed it.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Material {
    pub fn from_secret_data(data: Option<&BTreeMap<String, ByteString>>) -> Material {
        let get = |key: &str| {
            data.and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default()
        };
        Material {
            ca_bundle: get(CA_CERTS),
            ca_key: get(CA_KEY),
            tls_cert: get(TLS_CERT),
            tls_key: get(TLS_KEY),
        }
    }

    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        [
            (CA_CERTS, &self.ca_bundle),
            (CA_KEY, &self.ca_key),
            (TLS_CERT, &self.tls_cert),
            (TLS_KEY, &self.tls_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
        .collect()
    }
}

/// One parsed certificate.
#[derive(Debug, Clone)]
struct Cert {
    pem: String,
    der: Vec<u8>,
    spki: Vec<u8>,
    /// DNS names and IP addresses, as written in `--san`.
    sans: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

fn parse_chain(pem: &str) -> Vec<Cert> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .filter_map(|der| {
            let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
            let validity = x509.validity();
            let sans = x509
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|ext| {
                    ext.value
                        .general_names
                        .iter()
                        .filter_map(|name| match name {
                            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                            GeneralName::IPAddress(ip) => ip_text(ip),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Cert {
                sans,
                pem: pem_of(&der),
                spki: x509.public_key().raw.to_vec(),
                not_before: validity.not_before.to_datetime().into(),
                not_after: validity.not_after.to_datetime().into(),
                der: der.to_vec(),
            })
        })
        .collect()
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(ip.to_string())
}

fn pem_of(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    use base64::prelude::{BASE64_STANDARD, Engine as _};
    let b64 = BASE64_STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

fn remaining(cert: &Cert, now: SystemTime) -> Duration {
    cert.not_after.duration_since(now).unwrap_or_default()
}

/// What a tick should renew, and why (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub new_ca: bool,
    pub new_leaf: bool,
    pub reason: &'static str,
}

/// Decides what to renew in `m` at `now`, for a serving certificate naming `sans`.
pub fn plan(m: &Material, sans: &[String], now: SystemTime) -> Plan {
    let cas = parse_chain(&m.ca_bundle);
    let key_spki = KeyPair::from_pem(&m.ca_key)
        .ok()
        .map(|k| k.subject_public_key_info());
    let current = cas
        .first()
        .filter(|ca| key_spki.as_deref() == Some(ca.spki.as_slice()));
    let ca_fresh = current.is_some_and(|ca| remaining(ca, now) > CA_RENEW_BEFORE);

    let chain = parse_chain(&m.tls_cert);
    let pair_ok = super::tls::certified_key(m.tls_cert.as_bytes(), m.tls_key.as_bytes()).is_ok();
    // Usable: served today without a handshake failing; its signer is still trusted.
    let leaf_usable = pair_ok
        && chain
            .first()
            .is_some_and(|leaf| remaining(leaf, now) > Duration::ZERO)
        && chain.get(1).is_some_and(|signer| {
            remaining(signer, now) > Duration::ZERO && cas.iter().any(|ca| ca.der == signer.der)
        });
    let same_names = |leaf: &Cert| {
        let mut have = leaf.sans.clone();
        let mut want = sans.to_vec();
        have.sort();
        want.sort();
        have == want
    };
    let renamed = chain.first().is_some_and(|leaf| !same_names(leaf));
    let leaf_fresh = leaf_usable
        && !renamed
        && chain
            .first()
            .is_some_and(|leaf| remaining(leaf, now) > LEAF_RENEW_BEFORE);

    let keep = |reason| Plan {
        new_ca: false,
        new_leaf: false,
        reason,
    };
    if !ca_fresh {
        let reason = match current {
            None if cas.is_empty() => "no CA yet",
            None => "CA key missing or not matching the CA",
            Some(_) => "CA expires soon",
        };
        // The new CA is not yet known to the API servers: a still usable serving
        // certificate stays until the new CA has propagated.
        return Plan {
            new_ca: true,
            new_leaf: !leaf_usable,
            reason,
        };
    }
    if leaf_fresh {
        return keep("certificates current");
    }
    let propagated = current.is_some_and(|ca| {
        now.duration_since(ca.not_before)
            .is_ok_and(|age| age >= BACKDATE + CA_PROPAGATION)
    });
    if leaf_usable && !propagated {
        return keep("serving certificate renewal waits for the new CA to propagate");
    }
    Plan {
        new_ca: false,
        new_leaf: true,
        reason: if renamed {
            "serving certificate names changed"
        } else if leaf_usable {
            "serving certificate expires soon"
        } else {
            "no usable serving certificate"
        },
    }
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    let start = now.checked_sub(BACKDATE).unwrap_or(now);
    params.not_before = start.into();
    params.not_after = (now + lifetime).into();
}

/// Carries out `plan` on `m`: the Secret's next content.
pub fn renew(
    m: &Material,
    plan: Plan,
    sans: &[String],
    now: SystemTime,
) -> Result<Material, PkiError> {
    let mut next = m.clone();
    if plan.new_ca {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "wsdrain webhook CA");
        validity(&mut params, now, CA_LIFETIME);
        let ca = params.self_signed(&key)?;
        // Older CAs stay trusted until they expire: serving certificates they signed are
        // still in use.
        let mut bundle = ca.pem();
        for old in parse_chain(&m.ca_bundle) {
            if remaining(&old, now) > Duration::ZERO {
                bundle.push_str(&old.pem);
            }
        }
        next.ca_bundle = bundle;
        next.ca_key = key.serialize_pem();
    }
    if plan.new_leaf {
        let ca = parse_chain(&next.ca_bundle)
            .into_iter()
            .next()
            .ok_or(PkiError::NoCaKey)?;
        let ca_key = KeyPair::from_pem(&next.ca_key).map_err(|_| PkiError::NoCaKey)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.der.clone()), ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "wsdrain webhook");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, now, LEAF_LIFETIME);
        let leaf = params.signed_by(&key, &issuer)?;
        next.tls_cert = format!("{}{}", leaf.pem(), ca.pem);
        next.tls_key = key.serialize_pem();
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// When the serving certificate in `m` stops being fresh.
    fn leaf_not_after(m: &Material) -> Option<SystemTime> {
        parse_chain(&m.tls_cert).first().map(|c| c.not_after)
    }

    const SANS: &[&str] = &["wsdrain-webhook.wsdrain.svc", "127.0.0.1"];

    fn sans() -> Vec<String> {
        SANS.iter().map(|s| s.to_string()).collect()
    }

    fn step(m: &Material, now: SystemTime) -> (Plan, Material) {
        let p = plan(m, &sans(), now);
        (p, renew(m, p, &sans(), now).expect("renew"))
    }

    fn cas(m: &Material) -> usize {
        parse_chain(&m.ca_bundle).len()
    }

    /// What the API server checks: the serving certificate verifies for the Service's
    /// name against the caBundle alone, at `now`.
    fn verifies(m: &Material, now: SystemTime) -> Result<(), rustls::Error> {
        use rustls::client::WebPkiServerVerifier;
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        for ca in parse_chain(&m.ca_bundle) {
            roots.add(CertificateDer::from(ca.der)).expect("root");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .expect("verifier");
        let chain = parse_chain(&m.tls_cert);
        let leaf = CertificateDer::from(chain[0].der.clone());
        let at =
            UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).expect("time"));
        let name = ServerName::try_from(SANS[0]).expect("name");
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at)
            .map(|_| ())
    }

    #[test]
    fn empty_secret_gets_a_ca_and_a_serving_certificate_at_once() {
        super::super::tls::install_ring();
        let now = SystemTime::now();
        let (p, m) = step(&Material::default(), now);
        assert!(p.new_ca && p.new_leaf, "{p:?}");
        assert_eq!(cas(&m), 1);
        assert!(
            super::super::tls::certified_key(m.tls_cert.as_bytes(), m.tls_key.as_bytes()).is_ok()
        );
        verifies(&m, now).expect("a client trusting the bundle accepts the certificate");
        assert_eq!(
            plan(&m, &sans(), now),
            Plan {
                new_ca: false,
                new_leaf: false,
                reason: "certificates current"
            }
        );
        // Round trip through the Secret's data.
        assert_eq!(Material::from_secret_data(Some(&m.to_secret_data())), m);
    }

    #[test]
    fn serving_certificate_renews_before_expiry_under_the_same_ca() {
        super::super::tls::install_ring();
        let t0 = SystemTime::now();
        let (_, m) = step(&Material::default(), t0);
        let t1 = t0 + LEAF_LIFETIME - LEAF_RENEW_BEFORE + DAY;
        let (p, m2) = step(&m, t1);
        assert_eq!((p.new_ca, p.new_leaf), (false, true), "{p:?}");
        assert_eq!(m2.ca_bundle, m.ca_bundle, "the caBundle does not change");
        assert_ne!(m2.tls_cert, m.tls_cert);
        assert!(leaf_not_after(&m2).expect("leaf") > t1 + LEAF_RENEW_BEFORE);
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_and_signs_only_after_propagation() {
        super::super::tls::install_ring();
        let t0 = SystemTime::now();
        let (_, m) = step(&Material::default(), t0);
        let rotation = t0 + CA_LIFETIME - CA_RENEW_BEFORE + DAY;
        // A serving certificate issued 61 days before: due, still usable.
        let leaf_only = Plan {
            new_ca: false,
            new_leaf: true,
            reason: "test",
        };
        let before = renew(&m, leaf_only, &sans(), rotation - 61 * DAY).expect("leaf");
        let (p, rotated) = step(&before, rotation);
        assert!(p.new_ca, "{p:?}");
        assert!(
            !p.new_leaf,
            "serving cert under the old CA is still usable: {p:?}"
        );
        assert_eq!(cas(&rotated), 2, "new CA first, old CA kept");
        assert_eq!(
            parse_chain(&rotated.ca_bundle)[1].der,
            parse_chain(&before.ca_bundle)[0].der
        );
        assert_eq!(rotated.tls_cert, before.tls_cert);
        verifies(&rotated, rotation).expect("old serving certificate still trusted");

        // The due serving certificate waits for the new CA to propagate, then is signed
        // by the new CA.
        let p = plan(&rotated, &sans(), rotation + Duration::from_secs(60));
        assert!(!p.new_ca && !p.new_leaf, "{p:?}");
        assert_eq!(
            p.reason,
            "serving certificate renewal waits for the new CA to propagate"
        );
        let late = rotation + CA_PROPAGATION + BACKDATE;
        let (p, renewed) = step(&rotated, late);
        assert_eq!((p.new_ca, p.new_leaf), (false, true), "{p:?}");
        let signer = &parse_chain(&renewed.tls_cert)[1];
        assert_eq!(
            signer.der,
            parse_chain(&renewed.ca_bundle)[0].der,
            "signed by the new CA"
        );
        verifies(&renewed, late).expect("new serving certificate trusted");

        // Once the old CA has expired it leaves the bundle at the next CA change only;
        // until then it is harmless. An expired serving certificate is replaced at once.
        let (p, _) = step(&renewed, late + LEAF_LIFETIME + DAY);
        assert!(p.new_leaf);
    }

    #[test]
    fn garbage_or_a_foreign_key_starts_over() {
        super::super::tls::install_ring();
        let now = SystemTime::now();
        let bad = Material {
            ca_bundle: "junk".into(),
            ca_key: "junk".into(),
            tls_cert: "junk".into(),
            tls_key: "junk".into(),
        };
        let p = plan(&bad, &sans(), now);
        assert!(p.new_ca && p.new_leaf, "{p:?}");

        let (_, good) = step(&Material::default(), now);
        let foreign = Material {
            ca_key: KeyPair::generate().expect("key").serialize_pem(),
            ..good
        };
        let p = plan(&foreign, &sans(), now);
        assert!(p.new_ca, "{p:?}");
        assert_eq!(p.reason, "CA key missing or not matching the CA");
    }

    #[test]
    fn changed_names_renew_the_serving_certificate_under_the_same_ca() {
        super::super::tls::install_ring();
        let now = SystemTime::now();
        let (_, m) = step(&Material::default(), now);
        let mut reordered = sans();
        reordered.reverse();
        assert!(!plan(&m, &reordered, now).new_leaf, "order does not matter");
        let renamed = vec!["other.wsdrain.svc".to_string()];
        let p = plan(&m, &renamed, now + Duration::from_secs(3600));
        assert_eq!((p.new_ca, p.new_leaf), (false, true), "{p:?}");
        assert_eq!(p.reason, "serving certificate names changed");
        let next = renew(&m, p, &renamed, now).expect("renew");
        assert_eq!(parse_chain(&next.tls_cert)[0].sans, renamed);
    }
}
