//! The one rustls crypto provider (`ring`, chosen explicitly) of every TLS config of ours: the
//! appliance's listeners, devices, the CLI and the tests.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every rustls config of ours uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
