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
