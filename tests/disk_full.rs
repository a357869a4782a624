//! A full disk: the real binary on a small tmpfs of its own. Writes answer 507 DISK_FULL with
//! the free bytes, `/healthz` and `/metrics` say the store is degraded, downloads keep working,
//! the store recovers by itself once space is freed, and nothing acknowledged is lost — across
//! the episode and across a `kill -9` inside it. Needs root (to mount the tmpfs): skipped, and
//! says so, elsewhere; `.ci/run` runs it as root. Covered while full: upload, registration, a
//! device report (no PUBACK), a delta request, a backup download and firmware downloads.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mqtt::Device;
use common::{Appliance, file_names, image};
use serde_json::{Value, json};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: a plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            let required = std::env::var("HANGAR_TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
            assert!(!required, "the disk-full test needs root to mount a tmpfs");
            common::skipped("disk-full test: needs root to mount a tmpfs".into());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            // root without the right to mount (an unprivileged container): nothing to test on
            other => {
                common::skipped(format!(
                    "disk-full test: cannot mount a tmpfs here ({})",
                    match other {
                        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                        Err(e) => e.to_string(),
                    }
                ));
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        for size in [1 << 20, 64 << 10, 4 << 10, 512] {
            let buf = vec![0x5a; size];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

struct Site {
    fs: Tmpfs,
    a: Appliance,
}

const EXTRA: &str = "[store]\nmin_free_bytes = 2097152\n";

impl std::ops::Deref for Site {
    type Target = Appliance;
    fn deref(&self) -> &Appliance {
        &self.a
    }
}

impl Site {
    async fn register(&self, id: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/api/ota/devices",
            Some(json!({"id": id, "secret": "s3cret-s3cret", "protocol": "gateway"})),
        )
        .await
    }

    async fn health(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/healthz", self.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "/healthz answers 200 while degraded too");
        r.json::<Value>().await.unwrap()["data"].clone()
    }

    /// Registers devices until the disk refuses one; returns the acknowledged ids and the 507.
    async fn register_until_full(&self, prefix: &str, acked: &mut Vec<String>) -> Value {
        for i in 0..100_000 {
            let id = format!("{prefix}-{i:05}");
            let (st, body) = self.register(&id).await;
            match st {
                201 => acked.push(id),
                507 => return body,
                other => panic!("registering {id} on a full disk: {other} {body}"),
            }
        }
        panic!("the disk never filled");
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.health().await["store"] != "ok" {
            assert!(
                Instant::now() < deadline,
                "the store did not recover by itself"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn assert_disk_full(what: &str, body: &Value) {
    assert_eq!(body["error"], "DISK_FULL", "{what}: {body}");
    assert_eq!(body["status"], false, "{what}: {body}");
    assert!(body["freeBytes"].is_u64(), "{what}: no freeBytes: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("disk is full"),
        "{what}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_keeps_serving_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("40m") else {
        return;
    };
    let a = Appliance::start_in(fs.path(), EXTRA).await;
    let mut site = Site { fs, a };
    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("before-{i:02}");
        assert_eq!(site.register(&id).await.0, 201);
        acked.push(id);
    }
    let img = image(300_000, 7);
    assert_eq!(site.upload("1.0.0", img.clone()).await.0, 201);
    // a device with an upgrade in flight, to report while the disk is full
    assert_eq!(site.upload("0.9.0", image(290_000, 6)).await.0, 201);
    for v in ["0.9.0", "1.0.0"] {
        let (st, b) = site
            .call("POST", &format!("/api/ota/firmware/{v}/release"), None)
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let (st, b) = site
        .call(
            "POST",
            "/api/ota/devices",
            Some(json!({"id": "GWR", "secret": "s3cret-s3cret", "protocol": "gateway"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let mqtt = site.running().mqtt;
    let mut dev = Device::connect(mqtt, "gwr", Some(("GWR", "s3cret-s3cret")), None).await;
    dev.expect_connected().await;
    dev.subscribe("hanqi/gateway/GWR/command").await;
    let (st, b) = site
        .call(
            "POST",
            "/api/ota/upgrade/GWR",
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (_, cmd) = dev.message(10).await;
    let msg_id = cmd["msgId"].as_str().unwrap().to_string();
    let progress = |p: u32| {
        json!({"msgId": msg_id, "msgType": "ota_progress", "deviceId": "GWR",
            "data": {"msgId": msg_id, "state": "downloading", "progress": p}})
    };

    // an upload that would leave less than min_free_bytes is refused before the disk is full
    let (st, body) = site.upload("1.0.1", image(39 << 20, 8)).await;
    assert_eq!(st, 507, "{body}");
    assert_disk_full("upload over min_free_bytes", &body);
    assert!(body["message"].as_str().unwrap().contains("min_free_bytes"));

    // fill the disk: writes get 507 with the free bytes, no 500
    let filler = site.fs.fill();
    let (st, body) = site.upload("1.0.2", image(100_000, 9)).await;
    assert_eq!(st, 507, "{body}");
    assert_disk_full("upload on a full disk", &body);
    let refused = site.register_until_full("during", &mut acked).await;
    assert_disk_full("registration on a full disk", &refused);
    // and stays refused (no acknowledgement of a write that is not on disk)
    let (st, body) = site.register("during-again").await;
    assert_eq!(st, 507, "{body}");
    // a device report cannot be stored: no PUBACK, the connection closes, the device resends later
    dev.publish("hanqi/gateway/GWR/report", progress(40)).await;
    dev.expect_closed(10).await;
    // a delta cannot be queued: the envelope, not a 500
    let (st, body) = site
        .call(
            "POST",
            "/api/ota/firmware/1.0.0/deltas",
            Some(json!({"fromVersion": "0.9.0"})),
        )
        .await;
    assert!(
        st == 507 || st == 202,
        "delta request on a full disk: {st} {body}"
    );
    if st == 507 {
        assert_disk_full("delta request", &body);
    }
    // a backup is assembled on the data disk before it is sent: it says why it cannot be
    let (st, body) = site.call("GET", "/api/ota/backup", None).await;
    assert_eq!(st, 507, "backup on a full disk: {body}");
    assert_disk_full("backup", &body);

    let h = site.health().await;
    assert_eq!(h["state"], "degraded", "{h}");
    assert_eq!(h["store"], "degraded", "{h}");
    assert!(
        h["reasons"][0].as_str().unwrap().contains("disk full"),
        "{h}"
    );
    assert_eq!(site.metric("hangar_store_degraded").await, 1.0);

    // reads and downloads keep working
    let (st, list) = site.call("GET", "/api/ota/firmware", None).await;
    assert_eq!(st, 200, "{list}");
    let dl = site.fetch("/firmware/gateway_v1.0.0.bin").await.unwrap();
    assert_eq!(dl.status(), 200);
    assert_eq!(dl.bytes().await.unwrap().as_ref(), &img[..]);

    // space returns: the store reopens by itself and writes succeed again
    std::fs::remove_file(&filler).unwrap();
    site.wait_healthy().await;
    assert_eq!(site.metric("hangar_store_degraded").await, 0.0);
    assert!(site.metric("hangar_store_recoveries_total").await >= 1.0);
    assert_eq!(site.register("after-1").await.0, 201);
    acked.push("after-1".into());
    // the device reconnects and its report is taken now
    let mut dev = Device::connect(mqtt, "gwr", Some(("GWR", "s3cret-s3cret")), None).await;
    dev.expect_connected().await;
    dev.publish("hanqi/gateway/GWR/report", progress(60)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, t) = site.call("GET", "/api/ota/task/GWR", None).await;
        if t["data"]["progress"] == 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the report after recovery was not taken: {t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(site.upload("1.0.3", image(50_000, 10)).await.0, 201);
    let backup = site.fetch("/api/ota/backup").await.unwrap();
    assert_eq!(backup.status(), 200, "backup after recovery");
    assert!(backup.bytes().await.unwrap().len() > 600_000);

    // a second episode, ended by kill -9 while the store is degraded
    let filler = site.fs.fill();
    let refused = site.register_until_full("second", &mut acked).await;
    assert_disk_full("second episode", &refused);
    site.a.kill();
    std::fs::remove_file(&filler).unwrap();
    site.a.restart().await;

    for id in &acked {
        let (st, body) = site
            .call("GET", &format!("/api/ota/devices/{id}"), None)
            .await;
        assert_eq!(st, 200, "acknowledged device {id} was lost: {body}");
    }
    for v in ["1.0.0", "1.0.3"] {
        let (st, body) = site
            .call("GET", &format!("/api/ota/firmware/{v}"), None)
            .await;
        assert_eq!(st, 200, "acknowledged firmware {v} was lost: {body}");
    }
    assert_eq!(site.register("after-restart").await.0, 201);
}

/// A delta that is being built when the disk fills up: its patch cannot be stored, so it does
/// not become ready; it says why, leaves nothing in `tmp/` or `blobs/`, is never stuck
/// "building", and is built once space returns (by itself, or when asked again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_build_that_meets_a_full_disk_fails_cleanly_and_builds_once_space_returns() {
    let Some(fs) = Tmpfs::mount("48m") else {
        return;
    };
    let a = Appliance::start_in(fs.path(), EXTRA).await;
    let site = Site { fs, a };
    let old = image(3 << 20, 21);
    let mut new = old.clone();
    for i in (0..new.len()).step_by(4099) {
        new[i] ^= 0x5a;
    }
    for (v, img) in [("0.9.0", old), ("1.0.0", new.clone())] {
        assert_eq!(site.upload(v, img).await.0, 201);
        let (st, b) = site
            .call("POST", &format!("/api/ota/firmware/{v}/release"), None)
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let ask = || async {
        site.call(
            "POST",
            "/api/ota/firmware/1.0.0/deltas",
            Some(json!({"fromVersion": "0.9.0"})),
        )
        .await
    };
    let (st, b) = ask().await;
    assert_eq!(st, 202, "{b}");
    // the build of a 3 MiB pair takes far longer than filling the disk
    let filler = site.fs.fill();
    let delta = || async {
        let (_, l) = site
            .call("GET", "/api/ota/firmware/1.0.0/deltas", None)
            .await;
        l["data"][0].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        let d = delta().await;
        if d["status"] != "queued" && d["status"] != "building" {
            break d;
        }
        // a store that could not record the outcome is degraded; that is an ending too
        if site.health().await["store"] == "degraded" {
            break d;
        }
        assert!(Instant::now() < deadline, "the build never ended: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(
        ended["status"], "ready",
        "a patch was stored on a full disk: {ended}"
    );
    if ended["status"] == "failed" {
        let why = ended["error"].as_str().unwrap_or("");
        assert!(
            why.contains("disk is full") && why.contains("bytes free"),
            "the failure does not say the disk is full: {ended}"
        );
    }
    let tmp = file_names(&site.data().join("tmp"));
    assert!(tmp.is_empty(), "a partial patch was left in tmp/: {tmp:?}");

    // space returns: the delta is built, by itself or when asked again
    std::fs::remove_file(&filler).unwrap();
    site.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let d = delta().await;
        if d["status"] == "ready" {
            break d;
        }
        if d["status"] == "failed" {
            let (st, b) = ask().await;
            assert_eq!(st, 202, "asking again after space returned: {b}");
        }
        assert!(
            Instant::now() < deadline,
            "the delta was not built after space returned: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let file = ready["url"].as_str().unwrap().rsplit('/').next().unwrap();
    let patch = site
        .fetch(&format!("/firmware/deltas/{file}"))
        .await
        .unwrap();
    assert_eq!(patch.status(), 200, "{ready}");
    let patch = patch.bytes().await.unwrap();
    assert_eq!(common::sha256_hex(&patch), ready["sha256"], "{ready}");
    let blobs = file_names(&site.data().join("blobs"));
    assert_eq!(
        blobs.len(),
        3,
        "two images and one patch, nothing else: {blobs:?}"
    );
    assert!(file_names(&site.data().join("tmp")).is_empty());
}
