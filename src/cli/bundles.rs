//! `hangar bundle create|verify|import` and `hangar site key`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::client::{CliError, Client};
use super::signing::{load_secret_key, sha256_file, trust_err};
use crate::bundle::{self, DeltaItem, FirmwareItem, Manifest, TrustItem};
use crate::trust::{self, Keyring, Signature, TrustedKey};

/// `hangar bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Make a signed offline bundle (on the vendor's machine; no appliance needed).
    Create {
        /// The signing key (secret).
        #[arg(long)]
        key: PathBuf,
        /// Read the key's password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
        /// An image: PATH:DEVICE_TYPE:VERSION (PATH.minisig is used when present, else the
        /// image is signed with --key). Repeat for more.
        #[arg(long = "firmware", required = true)]
        firmware: Vec<String>,
        /// Add BSDIFF40 patches between consecutive versions of each device type.
        #[arg(long)]
        deltas: bool,
        /// A campaign plan (the API's campaign body, JSON). Repeat for more.
        #[arg(long = "plan")]
        plans: Vec<PathBuf>,
        /// A public key the site should trust from now on: FILE.pub (trusted under its file
        /// name) or NAME=FILE.pub. Repeat for more.
        #[arg(long = "trust")]
        trust: Vec<String>,
        /// This signer's sequence number (the site refuses one not above the last it saw);
        /// default: seconds since 1970.
        #[arg(long)]
        sequence: Option<u64>,
        /// The bundle id; default: random.
        #[arg(long)]
        id: Option<String>,
    },
    /// Check a bundle offline: its signature, every hash and every firmware signature.
    Verify {
        /// The bundle.
        file: PathBuf,
        /// A trusted public key (minisign .pub file or its base64 line); repeatable. Without
        /// one, the `[trust] keys` of the config are used.
        #[arg(long = "key")]
        keys: Vec<String>,
    },
    /// Import a bundle into the appliance (POST /api/ota/bundles).
    Import {
        /// The bundle.
        file: PathBuf,
        /// Accept a sequence number not above the last one imported from its signer.
        #[arg(long)]
        allow_older: bool,
    },
}

/// `hangar site ...`
#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    /// Print the appliance's public key (it signs reports), as a minisign .pub file.
    Key,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| CliError::Io {
        context: what,
        source,
    }
}

fn key_text(arg: &str) -> Result<String, CliError> {
    trust::key_arg(arg).map_err(io_err(format!("reading {arg}")))
}

/// Runs `hangar bundle ...`.
pub async fn bundle(g: &super::Global, cmd: BundleCmd) -> Result<(), CliError> {
    match cmd {
        BundleCmd::Create {
            key,
            password_file,
            out,
            firmware,
            deltas,
            plans,
            trust,
            sequence,
            id,
        } => {
            let sk = load_secret_key(&key, password_file.as_deref())?;
            let m = tokio::task::spawn_blocking(move || {
                create(&sk, &out, &firmware, deltas, &plans, &trust, sequence, id).map(|m| (m, out))
            })
            .await
            .map_err(|e| CliError::Trust(e.to_string()))??;
            let (m, out) = m;
            eprintln!(
                "wrote {}: bundle {} sequence {}, {} firmware, {} deltas, {} plans, {} keys",
                out.display(),
                m.id,
                m.sequence,
                m.firmware.len(),
                m.deltas.len(),
                m.campaigns.len(),
                m.trust.len()
            );
            Ok(())
        }
        BundleCmd::Verify { file, keys } => {
            let ring = if keys.is_empty() {
                let loaded = crate::config::Config::load(g.config.as_deref())?;
                loaded.config.trust.keyring().map_err(trust_err)?
            } else {
                let texts: Vec<String> =
                    keys.iter().map(|k| key_text(k)).collect::<Result<_, _>>()?;
                Keyring::parse_unnamed(&texts).map_err(trust_err)?
            };
            if ring.is_empty() {
                return Err(CliError::Trust(
                    "no trusted key: give --key PUB (or [trust] keys in the config)".into(),
                ));
            }
            let m = tokio::task::spawn_blocking(move || verify_file(&file, &ring))
                .await
                .map_err(|e| CliError::Trust(e.to_string()))??;
            println!(
                "bundle {} sequence {} signed by {}: valid ({} firmware, {} deltas, {} plans, {} keys)",
                m.id,
                m.sequence,
                m.signer,
                m.firmware.len(),
                m.deltas.len(),
                m.campaigns.len(),
                m.trust.len()
            );
            Ok(())
        }
        BundleCmd::Import { file, allow_older } => {
            let client = Client::connect(&super::endpoint(g))?;
            let q = [("allowOlder", allow_older.to_string())];
            let v = client.post_file("/api/ota/bundles", &q, &file).await?;
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            for w in v["warnings"].as_array().into_iter().flatten() {
                eprintln!(
                    "warning: {}",
                    w.as_str().map(super::sanitize).unwrap_or_default()
                );
            }
            for c in v["campaigns"].as_array().into_iter().flatten() {
                eprintln!(
                    "campaign {} created from the bundle's plan: see `hangar campaign show {0}`, start it with `hangar campaign resume {0}`",
                    c.as_str().map(super::sanitize).unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// Runs `hangar site key`.
pub async fn site(g: &super::Global, cmd: SiteCmd) -> Result<(), CliError> {
    match cmd {
        SiteCmd::Key => {
            let client = Client::connect(&super::endpoint(g))?;
            let v = client.get("/api/site", &[]).await?;
            print!("{}", v["sitePublicKeyFile"].as_str().unwrap_or(""));
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn create(
    sk: &trust::SecretKey,
    out: &Path,
    firmware: &[String],
    deltas: bool,
    plans: &[PathBuf],
    trust_args: &[String],
    sequence: Option<u64>,
    id: Option<String>,
) -> Result<Manifest, CliError> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut items = Vec::new();
    for (i, spec) in firmware.iter().enumerate() {
        let mut parts = spec.rsplitn(3, ':');
        let (version, device_type, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(v), Some(t), Some(p)) => (v.to_string(), t.to_string(), PathBuf::from(p)),
            _ => {
                return Err(CliError::Trust(format!(
                    "--firmware {spec:?} must be PATH:DEVICE_TYPE:VERSION"
                )));
            }
        };
        let mut f =
            std::fs::File::open(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let size = f
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        let sha256 = sha256_file(&mut f).map_err(io_err(format!("reading {}", path.display())))?;
        let mut sig_path = path.as_os_str().to_owned();
        sig_path.push(".minisig");
        let sig_path = PathBuf::from(sig_path);
        let signature = if sig_path.exists() {
            std::fs::read_to_string(&sig_path)
                .map_err(io_err(format!("reading {}", sig_path.display())))?
        } else {
            let f = std::fs::File::open(&path)
                .map_err(io_err(format!("reading {}", path.display())))?;
            sk.sign(f, &trust::firmware_comment(&device_type, &version, &sha256))
                .map_err(trust_err)?
        };
        items.push(FirmwareItem {
            path: format!("firmware/{i}.bin"),
            device_type,
            version,
            size,
            sha256,
            signature,
            description: String::new(),
        });
        files.push(path);
    }
    let (delta_items, patches) = if deltas {
        make_deltas(&items, &files)?
    } else {
        (Vec::new(), Vec::new())
    };
    let campaigns = plans
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).map_err(io_err(format!("reading {}", p.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| CliError::Trust(format!("{}: {e}", p.display())))
        })
        .collect::<Result<Vec<serde_json::Value>, CliError>>()?;
    let trust = trust_args
        .iter()
        .map(|t| {
            // NAME=FILE.pub, or FILE.pub trusted under its file name
            let (name, file) = match t.split_once('=') {
                Some((n, f)) => (n.to_string(), f),
                None => (
                    Path::new(t)
                        .file_stem()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    t.as_str(),
                ),
            };
            let name = name.as_str();
            let k = TrustedKey::parse(name, &key_text(file)?).map_err(trust_err)?;
            Ok(TrustItem {
                name: name.to_string(),
                key: k.base64,
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let id = id.unwrap_or_else(|| {
        let mut b = [0u8; 12];
        rand::fill(&mut b);
        hex::encode(b)
    });
    let m = Manifest {
        format: bundle::FORMAT.into(),
        id,
        signer: sk.key_id.clone(),
        sequence: sequence.unwrap_or_else(|| (crate::time::now_ms() / 1000).max(0) as u64),
        created_at: crate::time::now_utc().to_rfc3339(),
        firmware: items,
        deltas: delta_items,
        campaigns,
        trust,
    };
    m.validate().map_err(|e| CliError::Trust(e.to_string()))?;
    let manifest = serde_json::to_vec_pretty(&m).expect("json");
    let sig = sk
        .sign(&manifest[..], &bundle::manifest_comment(&m.id, m.sequence))
        .map_err(trust_err)?;
    write_bundle(out, &m, &manifest, &sig, &files, &patches)?;
    Ok(m)
}

/// BSDIFF40 patches between consecutive versions of each device type (left out where not
/// much smaller than the image), and their manifest items.
fn make_deltas(
    items: &[FirmwareItem],
    files: &[PathBuf],
) -> Result<(Vec<DeltaItem>, Vec<Vec<u8>>), CliError> {
    let mut delta_items = Vec::new();
    let mut patches: Vec<Vec<u8>> = Vec::new();
    {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| {
            items[a]
                .device_type
                .cmp(&items[b].device_type)
                .then_with(|| crate::ids::compare_versions(&items[a].version, &items[b].version))
        });
        for w in order.windows(2) {
            let (a, b) = (&items[w[0]], &items[w[1]]);
            if a.device_type != b.device_type {
                continue;
            }
            let old = std::fs::read(&files[w[0]])
                .map_err(io_err(format!("reading {}", files[w[0]].display())))?;
            let new = std::fs::read(&files[w[1]])
                .map_err(io_err(format!("reading {}", files[w[1]].display())))?;
            let mut patch = Vec::new();
            crate::bsdiff::make(&old, &new, 0, &mut patch).map_err(io_err(format!(
                "computing the delta {} -> {}",
                a.version, b.version
            )))?;
            if patch.len() as f64 >= new.len() as f64 * 0.5 {
                eprintln!(
                    "delta {} -> {} is not much smaller than the image; left out",
                    a.version, b.version
                );
                continue;
            }
            let sha256 = sha256_file(&mut &patch[..]).expect("in memory");
            delta_items.push(DeltaItem {
                path: format!("deltas/{}.bsdiff", delta_items.len()),
                device_type: a.device_type.clone(),
                from_version: a.version.clone(),
                to_version: b.version.clone(),
                from_sha256: a.sha256.clone(),
                to_sha256: b.sha256.clone(),
                size: patch.len() as u64,
                sha256,
            });
            patches.push(patch);
        }
    }
    Ok((delta_items, patches))
}

/// Writes the bundle: manifest, its signature, the images, the patches; fsynced, then renamed
/// into place.
fn write_bundle(
    out: &Path,
    m: &Manifest,
    manifest: &[u8],
    sig: &str,
    files: &[PathBuf],
    patches: &[Vec<u8>],
) -> Result<(), CliError> {
    let tmp = out.with_extension("partial");
    let w = std::fs::File::create(&tmp).map_err(io_err(format!("writing {}", tmp.display())))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
    let werr = || io_err(format!("writing {}", tmp.display()));
    let entry = |w: &mut std::io::BufWriter<std::fs::File>,
                 name: &str,
                 data: &mut dyn Read,
                 size: u64| bundle::write_entry(w, name, data, size);
    entry(
        &mut w,
        bundle::MANIFEST,
        &mut &manifest[..],
        manifest.len() as u64,
    )
    .map_err(werr())?;
    entry(
        &mut w,
        bundle::MANIFEST_SIG,
        &mut sig.as_bytes(),
        sig.len() as u64,
    )
    .map_err(werr())?;
    for (item, path) in m.firmware.iter().zip(files) {
        let mut f =
            std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
        entry(&mut w, &item.path, &mut f, item.size).map_err(werr())?;
    }
    for (item, patch) in m.deltas.iter().zip(patches) {
        entry(&mut w, &item.path, &mut &patch[..], item.size).map_err(werr())?;
    }
    bundle::write_end(&mut w).map_err(werr())?;
    let f = w.into_inner().map_err(|e| CliError::Trust(e.to_string()))?;
    f.sync_all().map_err(werr())?;
    std::fs::rename(&tmp, out).map_err(io_err(format!("writing {}", out.display())))?;
    Ok(())
}

/// Checks a bundle file offline against `ring`.
fn verify_file(file: &Path, ring: &Keyring) -> Result<Manifest, CliError> {
    let f = std::fs::File::open(file).map_err(io_err(format!("reading {}", file.display())))?;
    let bad = |e: bundle::BundleError| CliError::Trust(format!("{}: {e}", file.display()));
    let mut tar = bundle::TarReader::new(std::io::BufReader::with_capacity(1 << 20, f));
    let manifest =
        bundle::read_small(&mut tar, bundle::MANIFEST, bundle::MAX_MANIFEST_BYTES).map_err(bad)?;
    let sig = bundle::read_small(
        &mut tar,
        bundle::MANIFEST_SIG,
        trust::MAX_SIGNATURE_BYTES as u64,
    )
    .map_err(bad)?;
    let sig = String::from_utf8_lossy(&sig).into_owned();
    let (_, m) = bundle::verify_manifest(ring, &manifest, &sig).map_err(bad)?;
    let mut fw_ring = ring.clone();
    for t in &m.trust {
        fw_ring.add(TrustedKey::parse(&t.name, &t.key).map_err(trust_err)?);
    }
    let mut seen = std::collections::HashSet::new();
    let fail = |m: String| CliError::Trust(format!("{}: {m}", file.display()));
    while let Some(h) = tar.next_entry().map_err(bad)? {
        let size = m
            .size_of(&h.name)
            .ok_or_else(|| fail(format!("entry {:?} is not in the manifest", h.name)))?;
        if !seen.insert(h.name.clone()) || size != h.size {
            return Err(fail(format!(
                "entry {:?} is repeated or has the wrong size",
                h.name
            )));
        }
        let fw = m.firmware.iter().find(|f| f.path == h.name);
        let sig = fw
            .map(|f| Signature::parse(&f.signature))
            .transpose()
            .map_err(trust_err)?;
        let key = match &sig {
            Some(s) => Some(
                fw_ring
                    .signer_of(s)
                    .map_err(|e| fail(format!("{}: {e}", h.name)))?,
            ),
            None => None,
        };
        let mut stream = match (key, &sig) {
            (Some(k), Some(s)) => Some(k.stream(s).map_err(trust_err)?),
            _ => None,
        };
        let mut sha = <sha2::Sha256 as sha2::Digest>::new();
        let mut data = tar.entry();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = data
                .read(&mut buf)
                .map_err(io_err(format!("reading {}", file.display())))?;
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut sha, &buf[..n]);
            if let Some(s) = stream.as_mut() {
                s.update(&buf[..n]);
            }
        }
        let got = hex::encode(sha2::Digest::finalize(sha));
        let want = fw
            .map(|f| f.sha256.clone())
            .or_else(|| {
                m.deltas
                    .iter()
                    .find(|d| d.path == h.name)
                    .map(|d| d.sha256.clone())
            })
            .unwrap_or_default();
        if !got.eq_ignore_ascii_case(&want) {
            return Err(fail(format!(
                "{} does not match the manifest (sha256 {got}, listed {want})",
                h.name
            )));
        }
        if let (Some(s), Some(f), Some(sig)) = (stream, fw, &sig) {
            s.finish()
                .map_err(|e| fail(format!("firmware {} {}: {e}", f.device_type, f.version)))?;
            trust::check_firmware_comment(sig.trusted_comment(), &f.device_type, &f.version, &got)
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    if let Some(missing) = m.entry_names().into_iter().find(|n| !seen.contains(*n)) {
        return Err(fail(format!(
            "the manifest lists {missing}, which the bundle does not hold"
        )));
    }
    let _ = std::io::stdout().flush();
    Ok(m)
}

/// `hangar report ...`
#[derive(Debug, Subcommand)]
pub enum ReportCmd {
    /// Write the appliance's signed report: inventory, tasks, campaigns, statistics and the
    /// audit log as a hash chain.
    Export {
        /// Where to write it (a tar of report.json and report.json.minisig).
        #[arg(long)]
        out: PathBuf,
        /// Only the audit entries after this sequence number (and the tasks changed since):
        /// the `to` of the report before.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Check a report anywhere, with the site's public key only.
    Verify {
        /// The report.
        file: PathBuf,
        /// The site's public key (`hangar site key` prints it): a .pub file or its base64 line.
        #[arg(long)]
        site_key: String,
        /// The report before this one: this one's chain must continue it.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

/// Runs `hangar report ...`.
pub async fn report(g: &super::Global, cmd: ReportCmd) -> Result<(), CliError> {
    match cmd {
        ReportCmd::Export { out, since } => {
            let client = Client::connect(&super::endpoint(g))?;
            let n = client
                .download_to(&format!("/api/reports?since={since}"), &out)
                .await?;
            eprintln!("{}: {n} bytes", out.display());
            Ok(())
        }
        ReportCmd::Verify {
            file,
            site_key,
            previous,
        } => {
            let key = TrustedKey::parse("site", &key_text(&site_key)?).map_err(trust_err)?;
            let r = verify_report(&file, &key)?;
            if let Some(p) = previous {
                let before = verify_report(&p, &key)?;
                let (end, start) = (
                    before["audit"]["lastHash"].as_str().unwrap_or(""),
                    r["audit"]["previousHash"].as_str().unwrap_or(""),
                );
                let dropped = &r["audit"]["dropped"];
                if before["to"] == r["since"] && dropped.is_object() && start.is_empty() {
                    // the entries right after the previous report were dropped by retention
                    // before this one was made: the gap is declared, signed, and chained on
                    eprintln!(
                        "note: audit entries {}..{} were dropped by the appliance's retention before this report; the chain goes on from their last hash {}, under the site's signature",
                        dropped["from"],
                        dropped["to"],
                        dropped["lastHash"].as_str().unwrap_or("")
                    );
                } else if end != start || before["to"] != r["since"] {
                    return Err(CliError::Trust(format!(
                        "{} does not continue {}: it starts after entry {} (hash {start}), the other ends at {} (hash {end})",
                        file.display(),
                        p.display(),
                        r["since"],
                        before["to"]
                    )));
                }
            }
            println!(
                "report of site {} (audit entries {}..{}, {} devices, {} tasks): signature and hash chain valid",
                key.key_id,
                r["since"],
                r["to"],
                r["devices"].as_array().map_or(0, Vec::len),
                r["tasks"].as_array().map_or(0, Vec::len)
            );
            Ok(())
        }
    }
}

fn verify_report(file: &Path, key: &TrustedKey) -> Result<serde_json::Value, CliError> {
    let f = std::fs::File::open(file).map_err(io_err(format!("reading {}", file.display())))?;
    let bad = |m: String| CliError::Trust(format!("{}: {m}", file.display()));
    let mut tar = bundle::TarReader::new(std::io::BufReader::new(f));
    let json =
        bundle::read_small(&mut tar, "report.json", 1 << 30).map_err(|e| bad(e.to_string()))?;
    let sig = bundle::read_small(
        &mut tar,
        "report.json.minisig",
        trust::MAX_SIGNATURE_BYTES as u64,
    )
    .map_err(|e| bad(e.to_string()))?;
    if tar.next_entry().map_err(|e| bad(e.to_string()))?.is_some() {
        return Err(bad("more entries than report.json and its signature".into()));
    }
    let sig = Signature::parse(&String::from_utf8_lossy(&sig)).map_err(|e| bad(e.to_string()))?;
    key.verify_bytes(&sig, &json)
        .map_err(|e| bad(format!("not signed by this site key: {e}")))?;
    let r: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| bad(format!("report.json: {e}")))?;
    let (since, to) = (
        r["since"].as_u64().unwrap_or(0),
        r["to"].as_u64().unwrap_or(0),
    );
    if sig.trusted_comment() != crate::report::comment(&key.key_id, since, to) {
        return Err(bad(format!(
            "the signature's trusted comment {:?} does not describe this report",
            sig.trusted_comment()
        )));
    }
    let chain: crate::report::AuditChain = serde_json::from_value(r["audit"].clone())
        .map_err(|e| bad(format!("its audit section: {e}")))?;
    crate::report::check_chain(&chain).map_err(|e| bad(e.to_string()))?;
    let start = chain.dropped.as_ref().map_or(since, |d| d.to);
    if chain.entries.last().map_or(start, |e| e.seq) != to {
        return Err(bad(format!("the audit chain does not end at entry {to}")));
    }
    Ok(r)
}
