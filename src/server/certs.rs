//! The appliance's TLS material, shared by HTTPS and MQTTS: the site's own certificate, or a CA and a
//! server certificate generated once into `<data_dir>/certs/` (clients pin `ca.pem`). The server
//! certificate is re-issued from the same CA when the box's names or addresses change, so pinned
//! clients keep working. The rustls config resolves its certificate through [`ReloadableCert`],
//! which re-reads the files on SIGHUP. rustls uses the `ring` provider, chosen explicitly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS set-up failure, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not a usable PEM certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(String),
}

/// Where the certificate, key and (when generated) CA live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// The generated CA certificate clients should trust; `None` for a site certificate.
    pub ca: Option<PathBuf>,
}

use crate::tls::provider;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// The names and addresses the generated server certificate covers.
fn subject_alt_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Some(h) = crate::net::hostname() {
        names.push(h.clone());
        if !h.contains('.') {
            names.push(format!("{h}.local"));
        }
    }
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    for ip in crate::net::local_ips() {
        let s = ip.to_string();
        if !names.contains(&s) {
            names.push(s);
        }
    }
    names
}

/// Parameters of the generated CA (fixed, so the issuer can be re-created from its key).
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Hangar local CA");
    dn.push(DnType::OrganizationName, "Hangar");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

/// Uses the configured certificate, or generates (once) a CA and a server certificate into
/// `<data_dir>/certs/`. Returns where they are and whether anything was generated now.
pub fn ensure_certificates(
    cfg: &crate::config::TlsConfig,
    data_dir: &Path,
) -> Result<(CertPaths, bool), TlsError> {
    if !cfg.cert.is_empty() {
        return Ok((
            CertPaths {
                cert: PathBuf::from(&cfg.cert),
                key: PathBuf::from(&cfg.key),
                ca: None,
            },
            false,
        ));
    }
    let dir = data_dir.join("certs");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let paths = CertPaths {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: Some(dir.join("ca.pem")),
    };
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let sans_file = dir.join("server.sans");
    let mut generated = false;

    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = ca_params()?.self_signed(&key).map_err(gen_err)?;
        crate::server::auth::write_private_file(&ca_key, key.serialize_pem().as_bytes())
            .map_err(io_err(&ca_key))?;
        std::fs::write(&ca_cert, cert.pem()).map_err(io_err(&ca_cert))?;
        let _ = std::fs::remove_file(&sans_file); // force a new leaf
        generated = true;
    }

    let sans = subject_alt_names();
    let wanted = sans.join("\n");
    let current = std::fs::read_to_string(&sans_file).unwrap_or_default();
    if current != wanted || !paths.cert.exists() || !paths.key.exists() {
        let ca_key_pem = std::fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        let ca_pem = std::fs::read_to_string(&ca_cert).map_err(io_err(&ca_cert))?;
        let ca_kp = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
            path: ca_key.clone(),
            reason: e.to_string(),
        })?;
        // The CA's subject is fixed, so its parameters plus its stored key re-create the issuer.
        let issuer = Issuer::new(ca_params()?, ca_kp);
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Hangar appliance");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        crate::server::auth::write_private_file(&paths.key, key.serialize_pem().as_bytes())
            .map_err(io_err(&paths.key))?;
        let chain = format!("{}{}", cert.pem(), ca_pem);
        crate::server::auth::write_private_file(&paths.cert, chain.as_bytes())
            .map_err(io_err(&paths.cert))?;
        std::fs::write(&sans_file, &wanted).map_err(io_err(&sans_file))?;
        generated = true;
    }
    Ok((paths, generated))
}

/// Loads a PEM chain and key into a rustls certified key.
pub fn load_certified_key(paths: &CertPaths) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| TlsError::Pem {
            path,
            reason: e.to_string(),
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(pem_err(&paths.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&paths.cert))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: paths.cert.clone(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(pem_err(&paths.key))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Pem {
        path: paths.key.clone(),
        reason: format!("key does not fit the certificate: {e}"),
    })
}

/// A server certificate that can be swapped while the listeners run.
#[derive(Debug)]
pub struct ReloadableCert {
    paths: CertPaths,
    current: RwLock<Arc<CertifiedKey>>,
    /// Reloads that swapped the certificate, and those that failed (the old one stayed).
    pub reloads: std::sync::atomic::AtomicU64,
    pub reload_failures: std::sync::atomic::AtomicU64,
}

impl ReloadableCert {
    /// Loads the certificate once.
    pub fn load(paths: CertPaths) -> Result<Arc<ReloadableCert>, TlsError> {
        let ck = load_certified_key(&paths)?;
        Ok(Arc::new(ReloadableCert {
            paths,
            current: RwLock::new(Arc::new(ck)),
            reloads: Default::default(),
            reload_failures: Default::default(),
        }))
    }

    /// Re-reads the files; on error the old certificate stays in use. Counted either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        use std::sync::atomic::Ordering::Relaxed;
        let ck = load_certified_key(&self.paths).inspect_err(|_| {
            self.reload_failures.fetch_add(1, Relaxed);
        })?;
        *self.current.write().expect("cert lock poisoned") = Arc::new(ck);
        self.reloads.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The files this certificate comes from.
    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock poisoned").clone())
    }
}

/// A rustls server config over the reloadable certificate, offering `alpn` protocols.
pub fn server_config(cert: Arc<ReloadableCert>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// A client without a certificate fails the handshake.
    Required,
    /// A certificate is verified if the client presents one.
    Optional,
}

/// A server config that verifies client certificates against the CA(s) in `ca_file`.
pub fn server_config_with_clients(
    cert: Arc<ReloadableCert>,
    alpn: &[&[u8]],
    ca_file: &Path,
    mode: ClientCerts,
) -> Result<Arc<ServerConfig>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: ca_file.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".into()));
    }
    for c in certs {
        roots.add(c).map_err(|e| pem(e.to_string()))?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let verifier = match mode {
        ClientCerts::Required => builder.build(),
        ClientCerts::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| pem(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_and_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::TlsConfig::default();
        let (paths, generated) = ensure_certificates(&cfg, dir.path()).unwrap();
        assert!(generated);
        let ca_before = std::fs::read(paths.ca.as_ref().unwrap()).unwrap();
        let (paths2, generated) = ensure_certificates(&cfg, dir.path()).unwrap();
        assert!(!generated);
        assert_eq!(
            std::fs::read(paths2.ca.as_ref().unwrap()).unwrap(),
            ca_before
        );
        let rc = ReloadableCert::load(paths).unwrap();
        rc.reload().unwrap();
    }
}
