//! The one rustls crypto provider (`ring`, chosen explicitly) of every TLS config of ours: the
//! appliance's listeners, devices, the CLI and the tests.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every rustls config of ours uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The common name (CN) of a DER certificate's subject: the identity a client certificate
/// carries (`mqtt.use_identity_as_username`, device downloads over HTTPS).
pub fn certificate_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A rustls client config trusting the CA certificates in `ca_pem` (ring provider): devices,
/// the CLI, and the appliance as a client of the site's broker.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("bad PEM: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in the CA file".into());
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
