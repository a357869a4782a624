//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly), one per parser that takes
//! bytes from outside. `tests/fuzz_corpora.rs` replays every checked-in corpus file and crash
//! through the same functions on stable, so a fixed crash stays fixed. Each function must
//! neither panic nor allocate beyond a bound for any input; where a result has an invariant
//! (ranges inside the file, a patch no longer than allowed), it asserts it.

use bytes::BytesMut;

use crate::protocol::{self, Inbound, alibaba, gateway};
use crate::server::broker::packet;

/// Largest packet the MQTT target accepts (like a small `mqtt.max_packet_bytes`).
const MAX_PACKET: usize = 64 * 1024;

/// MQTT framing and decoding with every 3.1.1 check, topic classification and both device
/// JSON protocols on every PUBLISH payload ([`mqtt_session`] follows one connection's login
/// and the OTA rules). What decodes encodes back to a packet that decodes the same. The input
/// arrives in chunks whose sizes come from the input itself, as from a socket.
pub fn mqtt_stream(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(split % 64) + 1;
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match packet::take_frame(&mut buf, MAX_PACKET) {
                Ok(Some((_, frame))) => {
                    assert!(frame.len() <= MAX_PACKET);
                    let Ok(p) = packet::decode(&frame) else {
                        return; // the connection would be closed
                    };
                    if let packet::Packet::Publish(p) = &p {
                        device_report(&p.topic, &p.payload);
                        let _ = protocol::is_ota_topic("hanqi", &p.topic);
                    }
                    let again = packet::encode_client(&p);
                    assert_eq!(
                        packet::decode(&again).as_ref(),
                        Ok(&p),
                        "re-encoding changed it"
                    );
                }
                Ok(None) => break,
                Err(_) => return, // the connection would be closed
            }
        }
    }
}

/// Credentials the session target knows: a gateway and an Alibaba device.
struct FuzzDevices;

impl crate::server::broker::Authenticator for FuzzDevices {
    fn authenticate(&self, username: &str, password: &str) -> Option<(String, protocol::Protocol)> {
        match (username, password) {
            ("GW1", "gw-secret") => Some(("GW1".into(), protocol::Protocol::Gateway)),
            ("pk1&dn1", "ali-secret") => Some(("pk1/dn1".into(), protocol::Protocol::Alibaba)),
            _ => None,
        }
    }

    fn device(&self, name: &str) -> Option<(String, protocol::Protocol)> {
        match name {
            "GW1" => Some(("GW1".into(), protocol::Protocol::Gateway)),
            "pk1&dn1" | "pk1/dn1" => Some(("pk1/dn1".into(), protocol::Protocol::Alibaba)),
            _ => None,
        }
    }
}

/// A whole connection through the front door's decisions: the first byte picks the chunk size
/// and whether anonymous lab devices are allowed; then CONNECT (logged in as `GW1`/`gw-secret`
/// or `pk1&dn1`/`ali-secret`, refused, or anonymous), and every PUBLISH topic and SUBSCRIBE
/// filter against that connection's ACL, which must never let it touch another device's topic.
pub fn mqtt_session(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 64) + 1;
    crate::server::broker::replay_session(
        &FuzzDevices,
        first & 0x80 != 0,
        "hanqi",
        rest,
        step,
        MAX_PACKET,
    );
}

/// What the front door and the task engine read from a device report.
fn device_report(topic: &str, payload: &[u8]) {
    if let Some((_proto, _id, kind)) = protocol::classify_report_topic("hanqi", topic) {
        match kind {
            Inbound::GatewayReport => {
                let _ = gateway::parse_report(payload);
            }
            Inbound::AlibabaInform => {
                let _ = alibaba::parse_inform(payload);
            }
            Inbound::AlibabaProgress => {
                let _ = alibaba::parse_progress(payload);
            }
            Inbound::AlibabaGet => {
                let _ = alibaba::parse_get(payload);
            }
        }
    }
    // and every parser on every payload, whatever the topic
    let _ = gateway::parse_report(payload);
    let _ = alibaba::parse_inform(payload);
    let _ = alibaba::parse_progress(payload);
    let _ = alibaba::parse_get(payload);
}

/// Both device JSON protocols on a raw payload.
pub fn device_json(data: &[u8]) {
    device_report("hanqi/gateway/GW1/report", data);
    device_report("/sys/pk/dn/thing/ota/firmware/get", data);
}

/// The multipart part-header bound and the boundary parameter of a Content-Type: the first
/// line is the Content-Type, the rest the body, in chunks sized by the input.
pub fn multipart(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (ct, body) = text.split_once('\n').unwrap_or((&text, ""));
    let Some(boundary) = crate::server::http::firmware_api::multer_boundary(ct) else {
        return;
    };
    if boundary.is_empty() {
        return;
    }
    let step = (body.len() % 97) + 1;
    let mut g = crate::server::http::partguard::PartGuard::new(&boundary);
    for c in body.as_bytes().chunks(step) {
        if g.feed(c).is_err() {
            return;
        }
    }
}

/// Range, If-Range's entity tag and If-None-Match of a download: lines 1-3 of the input, the
/// file length from line 4.
pub fn range(data: &[u8]) {
    use crate::server::http::download::{RangePlan, etag_list_matches, plan_ranges};
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let (range, tag, inm) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    let len = lines
        .next()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .unwrap_or(1000);
    let inside = |r: &std::ops::RangeInclusive<u64>| r.start() <= r.end() && *r.end() < len;
    match plan_ranges(range, len) {
        RangePlan::Full | RangePlan::Unsatisfiable => {}
        RangePlan::Single(r) => assert!(inside(&r), "{r:?} outside {len}"),
        RangePlan::Multi(rs) => {
            assert!(rs.len() > 1);
            let total: u64 = rs.iter().map(|r| r.end() - r.start() + 1).sum();
            assert!(total < len);
            assert!(rs.iter().all(inside));
        }
    }
    let _ = etag_list_matches(inm, tag, true);
    let _ = etag_list_matches(inm, tag, false);
    let _ = httpdate::parse_http_date(tag);
}

/// `hangar.toml`: parsing and validation.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_toml(text, "fuzz.toml");
    }
}

/// Most bytes a hostile patch may make the device side produce.
const MAX_PATCHED: u64 = 1 << 20;

/// A BSDIFF40 patch applied on the device side: the first byte says how long the old image is
/// (from the input after it), the rest is the patch.
pub fn bspatch(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cut = (usize::from(n) * 4).min(rest.len());
    let (old, patch) = rest.split_at(cut);
    let mut out = Counting(0);
    if let Ok(written) = crate::bsdiff::apply(old, patch, MAX_PATCHED, &mut out) {
        assert!(written <= MAX_PATCHED && out.0 == written);
    }
    assert!(out.0 <= MAX_PATCHED, "wrote {} bytes", out.0);
}

/// A writer that counts and drops what it gets.
struct Counting(u64);

impl std::io::Write for Counting {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The general path's rules: an acl_file (the input up to its first zero byte), then topic
/// names and filters (the rest, split at newlines) against it and against the router's
/// indexes. The subscription index finds exactly the filters that match a topic, the retained
/// tree exactly the topics a filter matches, and a subscription the ACL grants whole never
/// covers a topic the ACL would not let its client read.
pub fn mqtt_general(data: &[u8]) {
    use crate::server::broker::acl::{Acl, Grant, Want};
    use crate::server::broker::topics::{self, Index, Tree};
    let (acl_text, rest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(acl) = Acl::parse(&String::from_utf8_lossy(acl_text)) else {
        return;
    };
    let words: Vec<String> = String::from_utf8_lossy(rest)
        .split('\n')
        .take(64)
        .map(|w| w.chars().take(64).collect())
        .collect();
    let filters: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| packet::valid_filter(w))
        .collect();
    let names: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| topics::valid_topic(w))
        .collect();
    let mut index = Index::default();
    for (i, f) in filters.iter().enumerate() {
        index.insert(f, i);
    }
    let mut tree = Tree::default();
    for (i, t) in names.iter().enumerate() {
        tree.insert(t, i);
    }
    for (ti, t) in names.iter().enumerate() {
        let mut got = Vec::new();
        index.lookup(t, &mut got);
        let mut got: Vec<usize> = got.into_iter().copied().collect();
        got.sort_unstable();
        got.dedup();
        let want: Vec<usize> = (0..filters.len())
            .filter(|i| topics::matches(filters[*i], t))
            .collect();
        assert_eq!(got, want, "index lookup of {t:?}");
        let _ = ti;
    }
    for f in &filters {
        let mut got = Vec::new();
        tree.matching(f, &mut got);
        let mut got: Vec<&str> = got.into_iter().map(|i| names[*i]).collect();
        got.sort_unstable();
        got.dedup();
        let mut want: Vec<&str> = names
            .iter()
            .copied()
            .filter(|t| topics::matches(f, t))
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(got, want, "retained matching of {f:?}");
        for (user, client) in [(Some("u1"), "c1"), (None, "c2")] {
            if acl.grant(user, client, f) == Grant::All {
                for t in names.iter().filter(|t| topics::matches(f, t)) {
                    assert!(
                        acl.allows(user, client, t, Want::Read),
                        "{f:?} granted whole, but {t:?} is not readable"
                    );
                }
            }
        }
    }
}

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target by name (the directory names under `fuzz/corpus`).
pub const TARGETS: &[(&str, Target)] = &[
    ("mqtt_stream", mqtt_stream),
    ("mqtt_session", mqtt_session),
    ("mqtt_general", mqtt_general),
    ("device_json", device_json),
    ("multipart", multipart),
    ("range", range),
    ("config", config),
    ("bspatch", bspatch),
    ("bundle", bundle),
    ("report", report),
    ("backup", backup),
];

/// The key the bundle target trusts (its secret half is nowhere: inputs that pass the
/// signature check are not expected; the manifest parser is also fed directly, as a
/// compromised vendor key could feed it).
const FUZZ_KEY: &str = "RWRraK7xSt1d2hVZp4qRq5EWI/USs2La7GhHbrLr4JOusNd4jD82b2Ks";

/// An offline bundle as `POST /api/ota/bundles` reads it: the strict ustar reader, the
/// manifest and its signature (bounded reads), the manifest's parser and checks, then every
/// further entry streamed to its end.
pub fn bundle(data: &[u8]) {
    use crate::bundle::{self, MANIFEST, MANIFEST_SIG, MAX_MANIFEST_BYTES, TarReader};
    let mut tar = TarReader::new(data);
    let Ok(manifest) = bundle::read_small(&mut tar, MANIFEST, MAX_MANIFEST_BYTES) else {
        return;
    };
    assert!(manifest.len() as u64 <= MAX_MANIFEST_BYTES);
    if let Ok(m) = serde_json::from_slice::<bundle::Manifest>(&manifest)
        && m.validate().is_ok()
    {
        for name in m.entry_names() {
            let _ = m.size_of(name);
        }
    }
    let Ok(sig) = bundle::read_small(
        &mut tar,
        MANIFEST_SIG,
        crate::trust::MAX_SIGNATURE_BYTES as u64,
    ) else {
        return;
    };
    let ring = crate::trust::Keyring::new(vec![
        crate::trust::TrustedKey::parse("fuzz", FUZZ_KEY).expect("a valid key"),
    ]);
    let _ = bundle::verify_manifest(&ring, &manifest, &String::from_utf8_lossy(&sig));
    let mut entries = 0;
    while let Ok(Some(_)) = tar.next_entry() {
        entries += 1;
        if entries > bundle::MAX_ITEMS + bundle::MAX_EXTRAS
            || std::io::copy(&mut tar.entry(), &mut std::io::sink()).is_err()
        {
            return;
        }
    }
}

/// A signed site report as `hangar report verify` reads it: the tar of `report.json` and its
/// signature, the audit section's hash chain (also given directly as JSON), the declared span a
/// retention dropped.
pub fn report(data: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<crate::report::AuditChain>(data) {
        let _ = crate::report::check_chain(&c);
    }
    let mut tar = crate::bundle::TarReader::new(data);
    let Ok(json) = crate::bundle::read_small(&mut tar, "report.json", 1 << 20) else {
        return;
    };
    if let Ok(r) = serde_json::from_slice::<serde_json::Value>(&json)
        && let Ok(c) = serde_json::from_value::<crate::report::AuditChain>(r["audit"].clone())
    {
        let _ = crate::report::check_chain(&c);
    }
    if let Ok(sig) = crate::bundle::read_small(&mut tar, "report.json.minisig", 4096) {
        let _ = crate::trust::Signature::parse(&String::from_utf8_lossy(&sig));
    }
}

/// A backup as `hangar restore` reads it before it writes anything: the tar, its manifest, every
/// entry's size and hash; a backup that verifies has its store dump imported into a scratch store.
pub fn backup(data: &[u8]) {
    let Ok(m) = crate::server::backup::verify_reader(data) else {
        return;
    };
    let mut ar = tar::Archive::new(data);
    let Ok(entries) = ar.entries() else { return };
    for e in entries.flatten() {
        let is_store = e.path().is_ok_and(|p| p.as_os_str() == "store.jsonl");
        if is_store
            && m.files
                .get("store.jsonl")
                .is_some_and(|(size, _)| *size < 1 << 20)
        {
            let dir = tempfile_dir();
            if let Ok(store) = crate::server::store::Store::open(&dir) {
                let _ = store.import(std::io::BufReader::new(e));
            }
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    }
}

/// A scratch directory for one run of the backup target.
fn tempfile_dir() -> std::path::PathBuf {
    let mut r = [0u8; 8];
    rand::fill(&mut r);
    std::env::temp_dir().join(format!("hangar-fuzz-{}", hex::encode(r)))
}
