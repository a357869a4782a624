//! Offline verbs of keys and signatures: `hangar key generate`, `hangar firmware sign`, and
//! loading a secret key for them and for `hangar bundle create`.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::client::CliError;
use crate::trust;

/// `hangar key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make a minisign key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Generate {
        /// Path stem of the two files, e.g. `vendor` or `/secure/vendor`.
        name: PathBuf,
        /// Leave the secret key unencrypted (automation; keep the file safe another way).
        #[arg(long)]
        no_password: bool,
        /// Read the password from this file's first line instead of asking.
        #[arg(long, conflicts_with = "no_password")]
        password_file: Option<PathBuf>,
    },
}

/// Runs `hangar key ...`.
pub fn key(cmd: KeyCmd) -> Result<(), CliError> {
    match cmd {
        KeyCmd::Generate {
            name,
            no_password,
            password_file,
        } => {
            let password = if no_password {
                None
            } else {
                let pw = super::users::password(password_file.as_deref())?;
                if pw.is_empty() {
                    return Err(CliError::Trust(
                        "an empty password: give one, or --no-password for an unencrypted key"
                            .into(),
                    ));
                }
                Some(pw)
            };
            let (k, p) = trust::generate(&name, password).map_err(trust_err)?;
            let public = std::fs::read_to_string(&p).map_err(|source| CliError::Io {
                context: format!("reading {}", p.display()),
                source,
            })?;
            let key = trust::TrustedKey::parse("new", &public).map_err(trust_err)?;
            eprintln!(
                "wrote {} (secret: keep it off the appliance) and {} (public, key id {})",
                k.display(),
                p.display(),
                key.key_id
            );
            println!("{}", key.base64);
            Ok(())
        }
    }
}

/// A trust error as the CLI reports it.
pub fn trust_err(e: trust::TrustError) -> CliError {
    CliError::Trust(e.to_string())
}

/// Loads a secret key, asking for (or reading) its password only when it is encrypted.
pub fn load_secret_key(
    path: &Path,
    password_file: Option<&Path>,
) -> Result<trust::SecretKey, CliError> {
    let mut asked: Option<CliError> = None;
    let r = trust::SecretKey::load(path, || {
        super::users::password_once(password_file).map_err(|e| {
            let m = e.to_string();
            asked = Some(e);
            std::io::Error::other(m)
        })
    });
    match (r, asked) {
        (Ok(k), _) => Ok(k),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(trust_err(e)),
    }
}

/// `hangar firmware sign FILE --version V --device-type T --key K`: writes `FILE.minisig`.
pub fn sign_firmware(
    file: &Path,
    version: &str,
    device_type: &str,
    key: &Path,
    password_file: Option<&Path>,
) -> Result<PathBuf, CliError> {
    if !crate::ids::valid_version(version) || !crate::ids::valid_device_type(device_type) {
        return Err(CliError::Trust(format!(
            "version {version:?} or device type {device_type:?} is not valid (versions [0-9A-Za-z.+-]{{1,64}}, device types [A-Za-z0-9_-]{{1,64}})"
        )));
    }
    let sk = load_secret_key(key, password_file)?;
    let open = |what: &str| {
        std::fs::File::open(file).map_err(|source| CliError::Io {
            context: format!("{what} {}", file.display()),
            source,
        })
    };
    let sha256 = sha256_file(&mut open("reading")?).map_err(|source| CliError::Io {
        context: format!("reading {}", file.display()),
        source,
    })?;
    let comment = trust::firmware_comment(device_type, version, &sha256);
    let text = sk.sign(open("reading")?, &comment).map_err(trust_err)?;
    let mut out = file.as_os_str().to_owned();
    out.push(".minisig");
    let out = PathBuf::from(out);
    let tmp = out.with_extension("minisig.tmp");
    let _ = std::fs::remove_file(&tmp);
    trust::write_new(&tmp, text.as_bytes(), 0o644).map_err(trust_err)?;
    std::fs::rename(&tmp, &out).map_err(|source| CliError::Io {
        context: format!("writing {}", out.display()),
        source,
    })?;
    eprintln!("wrote {} (key {}, {comment})", out.display(), sk.key_id);
    Ok(out)
}

/// Hex sha256 of everything `r` yields.
pub fn sha256_file(r: &mut impl std::io::Read) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}
