//! What the appliance trusts and how it signs: the keyring (the `[trust] keys` of the config
//! plus keys that imported bundles added, kept in the store), the check of a firmware's
//! signature, the release gate of `require_signed`, and the site key that signs reports.
//! Nothing here reads a clock: a signature is valid or not whatever the date.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::server::store::{FirmwareRecord, FirmwareSignature, SignatureStatus, Store};
use crate::trust::{self, Keyring, Signature, TrustedKey};

/// Why the appliance's trust could not be set up or a signature made.
#[derive(Debug, thiserror::Error)]
pub enum SignaturesError {
    /// The configured keys, the site key or a signature.
    #[error("{context}: {source}")]
    Key {
        /// What was being done.
        context: String,
        /// The cause.
        source: trust::TrustError,
    },
    /// The keys bundles added could not be read from the store.
    #[error("reading the trusted keys: {0}")]
    Store(#[from] crate::server::store::StoreError),
}

impl SignaturesError {
    fn key(context: impl Into<String>) -> impl FnOnce(trust::TrustError) -> SignaturesError {
        let context = context.into();
        move |source| SignaturesError::Key { context, source }
    }
}

/// The appliance's trust: keys, policy, site key.
pub struct Signatures {
    configured: Keyring,
    ring: RwLock<Arc<Keyring>>,
    /// The bundle that added each stored key (by name), as of the last reload.
    from_bundles: RwLock<std::collections::HashMap<String, String>>,
    store: Store,
    /// Only firmware signed by a trusted key can be released (`[trust] require_signed`).
    pub require_signed: bool,
    site: SiteKey,
}

/// The appliance's own key pair: generated once into the data directory (`site.key`, mode
/// 0600, unencrypted so the appliance starts unattended; `site.pub`).
pub struct SiteKey {
    secret: trust::SecretKey,
    /// The public half, named `site`.
    pub public: TrustedKey,
}

impl SiteKey {
    /// Loads `<dir>/site.key`, generating the pair the first time.
    pub fn load_or_create(dir: &Path) -> Result<SiteKey, SignaturesError> {
        let stem: PathBuf = dir.join("site");
        let key = stem.with_extension("key");
        if !key.exists() {
            trust::generate(&stem, None)
                .map_err(SignaturesError::key("generating the site key"))?;
            tracing::info!(path = %key.display(), "generated the site key that signs reports");
        }
        let context = format!("the site key {}", key.display());
        let secret = trust::SecretKey::load(&key, || {
            Err(std::io::Error::other(
                "the site key is encrypted; the appliance needs it without a password",
            ))
        })
        .map_err(SignaturesError::key(context.clone()))?;
        let public = secret
            .public("site")
            .map_err(SignaturesError::key(context))?;
        Ok(SiteKey { secret, public })
    }

    /// Signs bytes in memory with `trusted_comment`.
    pub fn sign(&self, bytes: &[u8], trusted_comment: &str) -> Result<String, trust::TrustError> {
        self.sign_reader(bytes, trusted_comment)
    }

    /// Signs everything `r` yields (prehashed: read once, in bounded memory).
    pub fn sign_reader(
        &self,
        r: impl std::io::Read,
        trusted_comment: &str,
    ) -> Result<String, trust::TrustError> {
        self.secret.sign(r, trusted_comment)
    }
}

impl Signatures {
    /// The configured keys plus those in the store; the site key from `data_dir`.
    pub fn open(
        configured: Keyring,
        require_signed: bool,
        store: Store,
        data_dir: &Path,
    ) -> Result<Signatures, SignaturesError> {
        let site = SiteKey::load_or_create(data_dir)?;
        let s = Signatures {
            ring: RwLock::new(Arc::new(configured.clone())),
            from_bundles: RwLock::default(),
            configured,
            store,
            require_signed,
            site,
        };
        s.reload()?;
        Ok(s)
    }

    /// Re-reads the keys that bundles added (after an import).
    pub fn reload(&self) -> Result<(), crate::server::store::StoreError> {
        let mut ring = self.configured.clone();
        let mut from_bundles = std::collections::HashMap::new();
        for k in self.store.list_trust_keys()? {
            if ring.by_name(&k.name).is_some() {
                continue; // the config's key of that name wins
            }
            match TrustedKey::parse(&k.name, &k.key) {
                Ok(key) => {
                    ring.add(key);
                    from_bundles.insert(k.name, k.bundle_id);
                }
                Err(e) => {
                    tracing::warn!(name = %k.name, error = %e, "a stored trusted key is unusable; ignored")
                }
            }
        }
        *self.ring.write().expect("keyring lock") = Arc::new(ring);
        *self.from_bundles.write().expect("keyring lock") = from_bundles;
        Ok(())
    }

    /// The key `[trust] keys` names `name`, if any.
    pub fn configured(&self, name: &str) -> Option<&TrustedKey> {
        self.configured.by_name(name)
    }

    /// The keys trusted now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.ring.read().expect("keyring lock").clone()
    }

    /// Where keys come from: `config` or `bundle <id>`, per key name.
    pub fn origin(&self, name: &str) -> String {
        match self.from_bundles.read().expect("keyring lock").get(name) {
            Some(id) => format!("bundle {id}"),
            None => "config".into(),
        }
    }

    /// The site key.
    pub fn site(&self) -> &SiteKey {
        &self.site
    }

    /// The trusted key that made `sig`, for checking while the bytes stream.
    pub fn streaming_check(&self, sig: &Signature) -> Option<(TrustedKey, Signature)> {
        let ring = self.keyring();
        ring.signer_of(sig).ok().map(|k| (k.clone(), sig.clone()))
    }

    /// Judges a firmware's signature: `streamed` is the result of checking the bytes while
    /// they were written (`None`: not checked yet, then `file` is read). Blocking.
    pub fn judge_firmware(
        &self,
        sig: &Signature,
        streamed: Option<Result<(), trust::TrustError>>,
        file: &Path,
        device_type: &str,
        version: &str,
        sha256: &str,
    ) -> FirmwareSignature {
        let ring = self.keyring();
        let mut out = FirmwareSignature {
            text: sig.text.clone(),
            key_id: sig.key_id.clone(),
            signer: None,
            status: SignatureStatus::Invalid,
            reason: String::new(),
        };
        let key = match ring.signer_of(sig) {
            Ok(k) => k,
            Err(e) => {
                out.reason = e.to_string();
                return out;
            }
        };
        out.signer = Some(key.name.clone());
        let bytes = match streamed {
            Some(r) => r,
            None => std::fs::File::open(file)
                .map_err(|source| trust::TrustError::Io {
                    context: format!("reading {}", file.display()),
                    source,
                })
                .and_then(|f| key.verify_reader(sig, f)),
        };
        let checked = bytes.and_then(|()| {
            trust::check_firmware_comment(sig.trusted_comment(), device_type, version, sha256)
        });
        if let Err(e) = checked {
            out.reason = e.to_string();
            return out;
        }
        out.status = SignatureStatus::Valid;
        out
    }

    /// `none`, `valid` or `invalid` now: a signature found valid at upload stays valid while
    /// its key is trusted.
    pub fn status_of(&self, rec: &FirmwareRecord) -> (&'static str, Option<String>) {
        match &rec.signature {
            None => ("none", None),
            Some(s) if s.status == SignatureStatus::Valid => {
                if self.keyring().keys().iter().any(|k| k.key_id == s.key_id) {
                    ("valid", None)
                } else {
                    (
                        "invalid",
                        Some(format!("key {} is no longer trusted", s.key_id)),
                    )
                }
            }
            Some(s) => ("invalid", Some(s.reason.clone())),
        }
    }

    /// Why `rec` cannot be released under `require_signed`, if it cannot.
    pub fn release_refusal(&self, rec: &FirmwareRecord) -> Option<String> {
        if !self.require_signed {
            return None;
        }
        match self.status_of(rec) {
            ("valid", _) => None,
            ("none", _) => Some(format!(
                "firmware {} for device type {} is not signed, and [trust] require_signed is on: upload it again with its signature (hangar firmware sign)",
                rec.version, rec.device_type
            )),
            (_, why) => Some(format!(
                "firmware {} for device type {} has no valid signature by a trusted key ({}), and [trust] require_signed is on",
                rec.version,
                rec.device_type,
                why.unwrap_or_default()
            )),
        }
    }
}
