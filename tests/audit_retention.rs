//! The audit log stays within its retention, the drop stays provable in the signed report's
//! hash chain, and the report is streamed in bounded memory however long the log is.

mod common;

use std::path::Path;

use common::*;
use hangar::server::store::{AUDIT_SCHEMA, AuditRecord, Store};
use serde_json::Value;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn hangar(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn report(f: &Path) -> Value {
    let mut t = hangar::bundle::TarReader::new(std::fs::File::open(f).unwrap());
    serde_json::from_slice(&hangar::bundle::read_small(&mut t, "report.json", 1 << 30).unwrap())
        .unwrap()
}

/// Writes `n` audit entries straight into a store that no appliance holds (what a long-lived
/// site accumulates), `at_ms` one millisecond apart from `from_ms`.
fn fill_audit(store_dir: &Path, n: u64, from_ms: i64) {
    let store = Store::open(store_dir).unwrap();
    for i in 0..n {
        store
            .append_audit(&AuditRecord {
                schema: AUDIT_SCHEMA,
                seq: 0,
                at_ms: from_ms + i as i64,
                actor: "olga".into(),
                via: "session".into(),
                action: "auth.login".into(),
                target: format!("10.0.{}.{}", i / 250, i % 250),
                result: "refused 401".into(),
                status: 401,
            })
            .unwrap();
    }
    store.flush_blocking().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_the_oldest_and_the_report_chain_says_so() {
    let mut s = Server::start_with(|c| c.audit.max_entries = 1000).await;
    s.register("GW-A", "gateway", "audit-secret").await;
    let work = tempfile::tempdir().unwrap();
    let (ok, site_pub, err) = s.cli(&["site", "key"]);
    assert!(ok, "{err}");
    let site = work.path().join("site.pub");
    std::fs::write(&site, &site_pub).unwrap();
    // a report before anything is dropped
    let r1 = work.path().join("r1.tar");
    let (ok, _, err) = s.cli(&["report", "export", "--out", p(&r1)]);
    assert!(ok, "{err}");
    let first = report(&r1);
    let to1 = first["to"].as_u64().unwrap();

    // 2,500 more entries (written while the appliance is stopped), then a start: retention
    // runs at start and keeps 1,000 (and then its own entry)
    s.restart_around(
        |dir| fill_audit(&dir.join("store"), 2500, 1_700_000_000_000),
        |c| c.audit.max_entries = 1000,
    )
    .await;
    let (_, log) = s.get_json("/api/audit?action=audit.retention").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut log = log;
    while log["data"].as_array().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run at start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        log = s.get_json("/api/audit?action=audit.retention").await.1;
    }
    let entry = &log["data"][0];
    assert_eq!(entry["actor"], "system", "{entry}");
    let target = entry["target"].as_str().unwrap();
    assert!(target.starts_with("entries 1-"), "{target}");
    let r = s
        .client
        .get(s.url("/api/audit?limit=1"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    let kept: u64 = r.headers()["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1000..=1002).contains(&kept),
        "{kept} entries kept with max_entries = 1000"
    );

    // a full report now declares the dropped span and verifies
    let r2 = work.path().join("r2.tar");
    let (ok, _, err) = s.cli(&["report", "export", "--out", p(&r2)]);
    assert!(ok, "{err}");
    let (ok, out, err) = hangar(&["report", "verify", p(&r2), "--site-key", p(&site)]);
    assert!(ok && out.contains("valid"), "{out}{err}");
    let second = report(&r2);
    let dropped = &second["audit"]["dropped"];
    assert_eq!(dropped["from"], 1, "{dropped}");
    let dropped_to = dropped["to"].as_u64().unwrap();
    assert!(
        target.contains(&format!(
            "chain hash at {dropped_to}: {}",
            dropped["lastHash"].as_str().unwrap()
        )),
        "{target} vs {dropped}"
    );
    // the hash carried over the dropped span is the one a report made before them computed:
    // the first report's entries are a prefix of what was dropped
    assert!(to1 < dropped_to);
    // an incremental report from the first one's end continues it across the gap
    let r3 = work.path().join("r3.tar");
    let (ok, _, err) = s.cli(&[
        "report",
        "export",
        "--out",
        p(&r3),
        "--since",
        &to1.to_string(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = hangar(&[
        "report",
        "verify",
        p(&r3),
        "--site-key",
        p(&site),
        "--previous",
        p(&r1),
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("dropped by the appliance's retention"),
        "{err}"
    );
    // editing the declared span's hash breaks the signature, not only the chain
    let third = report(&r3);
    assert_eq!(third["audit"]["dropped"]["from"], to1 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_of_a_long_log_is_streamed_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // 150,000 entries: a sign-in flood's worth (the old export held the whole JSON: 49 MB
    // for 116,000 entries and a 639 MB peak)
    fill_audit(&dir.path().join("data/store"), 150_000, 1_700_000_000_000);
    let a = Appliance::start_in(dir.path(), "[audit]\nmax_entries = 1000000\n").await;
    let before = a.running().status_kb("VmRSS");
    let hwm_before = a.running().status_kb("VmHWM");
    let out = dir.path().join("r.tar");
    let mut r = a.fetch("/api/reports").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("content-length"));
    let mut f = std::fs::File::create(&out).unwrap();
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.unwrap() {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
        n += chunk.len() as u64;
    }
    drop(f);
    let peak = a.running().status_kb("VmHWM");
    eprintln!("report {n} bytes; RSS before {before} kB, peak {peak} kB (was {hwm_before})");
    assert!(n > 20_000_000, "the report is {n} bytes");
    // the first export also brings the log into the store's page cache
    assert!(
        peak < before.max(hwm_before) + 64 * 1024,
        "peak RSS {peak} kB for a {n}-byte report, {before} kB before"
    );
    // a second export's own memory: buffers, not the report
    let again = a.running().status_kb("VmRSS");
    let r = a.fetch("/api/reports").await.unwrap();
    let len = r.bytes().await.unwrap().len() as u64;
    assert!(len > 20_000_000);
    let peak2 = a.running().status_kb("VmHWM");
    eprintln!("second export: RSS before {again} kB, peak {peak2} kB");
    assert!(
        peak2 < again.max(peak) + 16 * 1024,
        "a second {len}-byte export raised the peak from {peak} kB to {peak2} kB"
    );
    let (ok, site_pub, err) = a.running().cli(&["site", "key"]);
    assert!(ok, "{err}");
    let site = dir.path().join("site.pub");
    std::fs::write(&site, &site_pub).unwrap();
    let (ok, out, err) = hangar(&["report", "verify", p(&out), "--site-key", p(&site)]);
    assert!(ok && out.contains("valid"), "{out}{err}");
    // nothing of it is left in the data directory
    let tmp = dir.path().join("data/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
