//! Delta packages end to end: generated eagerly for the versions devices run, applied by
//! Debian's `bspatch` byte for byte (a real MCU image pair and a generated pair), used by
//! simulated devices (and a corrupted one falls back to the full image), never made for a
//! version nobody runs; bad requests are 4xx; a corrupted stored patch is caught before serving.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, bin, fixture, image, sim_result};
use serde_json::{Value, json};

/// The patch applied by Debian's bspatch (OLD NEW PATCH). Without it installed (a box with only
/// Rust; `common::tool` says so, and fails in CI) our own apply stands in, so the rest of the
/// test still runs.
fn bspatch(old: &[u8], patch: &[u8]) -> Vec<u8> {
    let Some(tool) = common::tool("bspatch", "bsdiff") else {
        let mut out = Vec::new();
        hangar::bsdiff::apply(old, patch, 1 << 30, &mut out).unwrap();
        return out;
    };
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("old"), old).unwrap();
    std::fs::write(d.path().join("p"), patch).unwrap();
    let st = Command::new(tool)
        .arg(d.path().join("old"))
        .arg(d.path().join("new"))
        .arg(d.path().join("p"))
        .status()
        .unwrap();
    assert!(st.success(), "bspatch failed");
    std::fs::read(d.path().join("new")).unwrap()
}

async fn wait_deltas(
    s: &Server,
    version: &str,
    dt: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let path = format!("/api/ota/firmware/{version}/deltas?deviceType={dt}");
    let list = s
        .wait_for(&path, 60, |d| d.as_array().is_some_and(|l| pred(l)))
        .await;
    list.as_array().unwrap().clone()
}

async fn fetch(s: &Server, url: &str) -> (u16, Vec<u8>) {
    let r = s
        .client
        .get(url)
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_deltas_are_bspatch_exact_and_used_by_devices() {
    let s = Server::start().await;
    let (old, new) = (fixture("old.bin"), fixture("new.bin"));
    s.release_bytes("0.9.0", "hub", image(290_000, 9)).await; // nobody runs it
    s.release_bytes("1.0.1", "hub", old.clone()).await;
    // four devices use the delta; two get a corrupted patch and must fall back
    let good = s.sim(&[
        "--devices",
        "4",
        "--device-type",
        "hub",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "120",
        "--id-prefix",
        "OK",
        "--protocol",
        "mixed",
    ]);
    let bad = s.sim(&[
        "--devices",
        "2",
        "--device-type",
        "hub",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "120",
        "--id-prefix",
        "BAD",
        "--corrupt-delta-rate",
        "1",
    ]);
    s.wait_online(6).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.get_json("/api/ota/devices/OK0001").await.1["data"]["firmwareVersion"] != "1.0.1" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    s.release_bytes("1.0.2", "hub", new.clone()).await;
    let list = wait_deltas(&s, "1.0.2", "hub", |l| {
        l.iter()
            .all(|d| d["status"] == "ready" || d["status"] == "failed")
            && !l.is_empty()
    })
    .await;
    assert_eq!(list.len(), 1, "only 1.0.1 is in the field: {list:?}");
    let d = &list[0];
    assert_eq!(d["status"], "ready", "{d}");
    assert_eq!(d["fromVersion"], "1.0.1");
    assert_eq!(d["format"], "bsdiff40");
    let (st, patch) = fetch(&s, d["url"].as_str().unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(&patch[..8], b"BSDIFF40");
    assert_eq!(patch.len() as u64, d["size"].as_u64().unwrap());
    assert!(patch.len() < new.len() / 2, "{} bytes", patch.len());
    assert_eq!(
        bspatch(&old, &patch),
        new,
        "Debian's bspatch reproduces the target"
    );

    // mixed: even ids speak the Alibaba protocol (isDiff 1 with our full-image extension)
    for id in [
        "OK0001",
        "hub%2FOK0002",
        "OK0003",
        "hub%2FOK0004",
        "BAD0001",
        "BAD0002",
    ] {
        let (st, b) = s
            .post_json(
                &format!("/api/ota/upgrade/{id}"),
                json!({"version": "1.0.2"}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
        assert_eq!(b["data"]["delta"]["fromVersion"], "1.0.1", "{b}");
    }
    let (code, sum) = sim_result(good, 150).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], 4, "{sum}");
    assert_eq!(sum["deltaUsed"], 4, "{sum}");
    let (code, sum) = sim_result(bad, 150).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], 2, "{sum}");
    assert_eq!(sum["deltaFallbacks"], 2, "{sum}");
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    let dl = &stats["data"]["downloads"];
    assert!(
        dl["bytesDelta"].as_u64().unwrap() >= 6 * patch.len() as u64,
        "{dl}"
    );
    assert!(dl["bytesSaved"].as_u64().unwrap() > 0, "{dl}");
    // per target: the two fallbacks downloaded the full image, nobody else did (the simulators'
    // one-off fetch of their base image 1.0.1 counts under 1.0.1)
    let v2 = dl["perFirmware"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["version"] == "1.0.2")
        .unwrap();
    assert_eq!(
        v2["bytesFull"].as_u64().unwrap(),
        2 * new.len() as u64,
        "{dl}"
    );
    let (_, tasks) = s.get_json("/api/ota/tasks?deviceType=hub").await;
    for t in tasks["data"].as_array().unwrap() {
        assert_eq!(t["status"], "completed", "{t}");
    }

    // a stored patch damaged on disk is caught by its hash, withdrawn and rebuilt
    let sha = d["sha256"].as_str().unwrap();
    let blob = s.dir.path().join("blobs/sha256").join(&sha[..2]).join(sha);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let (st, _) = fetch(&s, d["url"].as_str().unwrap()).await;
    assert_eq!(st, 500, "a corrupt patch is never served");
    let list = wait_deltas(&s, "1.0.2", "hub", |l| l[0]["status"] == "ready").await;
    let (st, again) = fetch(&s, list[0]["url"].as_str().unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(bspatch(&old, &again), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_requests_are_checked() {
    let s = Server::start().await;
    s.release_bytes("1.0.0", "hub", fixture("old.bin")).await;
    s.release_bytes("1.1.0", "hub", fixture("new.bin")).await;
    s.release_bytes("1.0.0", "other", image(5000, 1)).await;
    s.release_bytes("2.0.0", "hub", image(300_000, 77)).await; // unrelated content
    let post = |v: &str, dt: &str, body: Value| {
        let s = &s;
        let path = format!("/api/ota/firmware/{v}/deltas?deviceType={dt}");
        async move { s.post_json(&path, body).await }
    };
    assert_eq!(
        post("1.1.0", "hub", json!({"fromVersion": "1.1.0"}))
            .await
            .0,
        400
    );
    assert_eq!(
        post("1.0.0", "hub", json!({"fromVersion": "1.1.0"}))
            .await
            .0,
        400
    );
    assert_eq!(
        post("1.1.0", "hub", json!({"fromVersion": "0.1.0"}))
            .await
            .0,
        404
    );
    assert_eq!(
        post("9.9.9", "hub", json!({"fromVersion": "1.0.0"}))
            .await
            .0,
        404
    );
    assert_eq!(
        post("1.1.0", "hub", json!({"fromVersion": "../x"})).await.0,
        400
    );
    assert_eq!(post("1.1.0", "hub", json!({"from": "1.0.0"})).await.0, 400);
    let (st, b) = s
        .post_json(
            "/api/ota/firmware/1.1.0/deltas?deviceType=other",
            json!({"fromVersion": "1.0.0"}),
        )
        .await;
    assert_eq!(st, 404, "1.1.0 is not an 'other' firmware: {b}");
    // different device types: 1.0.5 exists only for 'other'
    s.release_bytes("1.0.5", "other", image(5000, 2)).await;
    let (st, b) = post("1.1.0", "hub", json!({"fromVersion": "1.0.5"})).await;
    assert_eq!(st, 400, "{b}");

    // on demand: accepted, then ready; asking again answers the existing one
    let (st, b) = post("1.1.0", "hub", json!({"fromVersion": "1.0.0"})).await;
    assert!(st == 202 || st == 200, "{st} {b}");
    wait_deltas(&s, "1.1.0", "hub", |l| {
        l.iter().any(|d| d["status"] == "ready")
    })
    .await;
    let (st, b) = post("1.1.0", "hub", json!({"fromVersion": "1.0.0"})).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"]["status"], "ready");

    // not worth it: unrelated images make a patch as big as the image; recorded, never offered
    let (st, _) = post("2.0.0", "hub", json!({"fromVersion": "1.0.0"})).await;
    assert_eq!(st, 202);
    let l = wait_deltas(&s, "2.0.0", "hub", |l| l[0]["status"] == "skipped").await;
    assert!(l[0]["url"].is_null(), "{l:?}");
    let r = s
        .client
        .get(s.url("/firmware/deltas/hub_v1.0.0_to_v2.0.0.bsdiff"))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // no token, no patch
    let r = s
        .client
        .get(s.url("/firmware/deltas/hub_v1.0.0_to_v1.1.0.bsdiff"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // deleting the target deletes its deltas
    let before = s.files_under("blobs");
    let (st, b) = s
        .delete_json("/api/ota/firmware/1.1.0?deviceType=hub")
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        s.files_under("blobs"),
        before - 2,
        "image and patch removed"
    );
}

#[test]
fn cli_patches_interoperate_with_debian_bsdiff() {
    let Some(bsdiff) = common::tool("bsdiff", "bsdiff") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    // a generated pair: a base image and a "next build" with shifted and edited regions
    let old = image(400_000, 5);
    let mut new = old[..100_000].to_vec();
    new.extend_from_slice(&image(3000, 6));
    new.extend_from_slice(&old[100_000..250_000]);
    for b in new.iter_mut().skip(150_000).step_by(997) {
        *b = b.wrapping_add(3);
    }
    new.extend_from_slice(&old[260_000..]);
    for (name, bytes) in [("old", &old), ("new", &new)] {
        std::fs::write(p(name), bytes).unwrap();
    }
    // ours -> Debian's bspatch
    let mut c = Command::new(bin());
    assert!(
        c.args(["delta", "make"])
            .args([p("old"), p("new"), p("ours.patch")])
            .status()
            .unwrap()
            .success()
    );
    let patch = std::fs::read(p("ours.patch")).unwrap();
    assert!(patch.len() < new.len() / 10, "{}", patch.len());
    assert_eq!(bspatch(&old, &patch), new);
    // Debian's bsdiff -> ours
    assert!(
        Command::new(bsdiff)
            .args([p("old"), p("new"), p("debian.patch")])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new(bin())
            .args(["delta", "apply"])
            .args([p("old"), p("debian.patch"), p("out")])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(std::fs::read(p("out")).unwrap(), new);
    // a corrupt patch is an error, and leaves no output behind
    let mut bad = patch.clone();
    let n = bad.len();
    bad[n / 2] ^= 0xff;
    std::fs::write(p("bad.patch"), &bad).unwrap();
    let out = Command::new(bin())
        .args(["delta", "apply"])
        .args([p("old"), p("bad.patch"), p("out2")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!p("out2").exists());
}
