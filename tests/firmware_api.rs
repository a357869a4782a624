//! Firmware API end to end over real HTTPS: upload, list, release, latest, get, status, delete,
//! download and compare hashes; every bad input gets its 4xx and changes nothing stored.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn upload_list_release_latest_download() {
    let s = Server::start().await;
    let v109 = image(300_000, 1);
    let v110 = image(400_000, 2);
    let v102 = image(100_000, 3);

    // uploaded out of version order: 1.0.10 first, then 1.0.9 and 1.0.2
    for (v, img) in [("1.0.10", &v110), ("1.0.9", &v109), ("1.0.2", &v102)] {
        let (st, body) = s.upload(v, None, img.clone()).await;
        assert_eq!(st, 201, "{body}");
        assert_eq!(body["status"], true);
        assert_eq!(body["message"], "Success");
        let d = &body["data"];
        assert_eq!(d["version"], v);
        assert_eq!(d["deviceType"], "gateway");
        assert_eq!(d["fileName"], format!("gateway_v{v}.bin"));
        assert!(
            d["fileUrl"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/firmware/gateway_v{v}.bin"))
        );
        assert_eq!(d["fileSize"], img.len() as u64);
        assert_eq!(d["md5"], md5_hex(img));
        assert_eq!(d["sha256"], sha256_hex(img));
        assert_eq!(d["status"], "draft");
        assert_eq!(d["releaseDate"], Value::Null);
    }

    // nothing released yet
    let (st, body) = s
        .get_json("/api/ota/firmware/latest?deviceType=gateway")
        .await;
    assert_eq!(st, 404, "{body}");
    assert_eq!(body["status"], false);

    let (st, list) = s.get_json("/api/ota/firmware").await;
    assert_eq!(st, 200);
    let versions: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        versions,
        ["1.0.2", "1.0.9", "1.0.10"],
        "newest upload first"
    );

    for v in ["1.0.9", "1.0.10", "1.0.2"] {
        let (st, body) = s
            .post_json(&format!("/api/ota/firmware/{v}/release"), json!({}))
            .await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["data"]["status"], "released");
        assert!(body["data"]["releaseDate"].is_string());
    }
    // release is idempotent and keeps the first release date
    let (_, before) = s.get_json("/api/ota/firmware/1.0.9").await;
    let (st, again) = s
        .post_json("/api/ota/firmware/1.0.9/release", json!({}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(again["data"]["releaseDate"], before["data"]["releaseDate"]);

    // latest follows version order, not upload order
    let (st, latest) = s
        .get_json("/api/ota/firmware/latest?deviceType=gateway")
        .await;
    assert_eq!(st, 200);
    assert_eq!(latest["data"]["version"], "1.0.10");
    let (_, latest) = s.get_json("/api/ota/firmware/latest").await;
    assert_eq!(
        latest["data"]["version"], "1.0.10",
        "deviceType defaults to gateway"
    );

    // deprecating the newest moves latest back
    let (st, _) = s
        .post_json(
            "/api/ota/firmware/1.0.10/status",
            json!({"status": "deprecated"}),
        )
        .await;
    assert_eq!(st, 200);
    let (_, latest) = s.get_json("/api/ota/firmware/latest").await;
    assert_eq!(latest["data"]["version"], "1.0.9");

    // filters
    let (_, list) = s.get_json("/api/ota/firmware?status=deprecated").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (_, list) = s.get_json("/api/ota/firmware?deviceType=other").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (_, list) = s.get_json("/api/ota/firmware?limit=1&offset=1").await;
    assert_eq!(list["data"][0]["version"], "1.0.9");

    // download through the admin token, both listeners
    for base in [&s.base, &s.plain] {
        let r = s
            .client
            .get(format!("{base}/firmware/gateway_v1.0.9.bin"))
            .header("authorization", s.auth())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        let b = r.bytes().await.unwrap();
        assert_eq!(md5_hex(&b), md5_hex(&v109));
        assert_eq!(sha256_hex(&b), sha256_hex(&v109));
    }

    // other device types live side by side with the same version
    let (st, body) = s.upload("1.0.9", Some("sensor_x"), image(1000, 9)).await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = s
        .get_json("/api/ota/firmware/1.0.9?deviceType=sensor_x")
        .await;
    assert_eq!(st, 200);
    assert_eq!(body["data"]["fileName"], "sensor_x_v1.0.9.bin");

    // delete removes the record and the image
    let blobs_before = s.files_under("blobs");
    let r = s
        .client
        .delete(s.url("/api/ota/firmware/1.0.9?deviceType=sensor_x"))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.files_under("blobs"), blobs_before - 1);
    let (st, _) = s
        .get_json("/api/ota/firmware/1.0.9?deviceType=sensor_x")
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn cli_verbs_find_the_appliance_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(dir.path(), "").await;
    let img = dir.path().join("fw.bin");
    std::fs::write(&img, image(50_000, 4)).unwrap();
    let run = |args: &[&str]| p.cli(args);
    let (ok, out, err) = run(&[
        "firmware",
        "upload",
        img.to_str().unwrap(),
        "--version",
        "2.0.0",
        "--description",
        "cli",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["md5"], md5_hex(&image(50_000, 4)));
    let (ok, _, err) = run(&["firmware", "release", "2.0.0"]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["firmware", "latest"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["version"],
        "2.0.0"
    );
    let (ok, out, _) = run(&["firmware", "list"]);
    assert!(ok);
    assert!(out.contains("2.0.0") && out.contains("released"), "{out}");
    // a duplicate is refused with the API's message and a failing exit status
    let (ok, _, err) = run(&[
        "firmware",
        "upload",
        img.to_str().unwrap(),
        "--version",
        "2.0.0",
    ]);
    assert!(!ok);
    assert!(
        err.contains("409") && err.contains("already exists"),
        "{err}"
    );
    assert!(p.term().success());
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let s = Server::start_with(|c| c.http.max_upload_bytes = 1 << 20).await;
    let (st, _) = s.upload("1.0.0", None, image(1000, 1)).await;
    assert_eq!(st, 201);
    let snapshot = || async {
        let (_, l) = s.get_json("/api/ota/firmware").await;
        (l, s.files_under("blobs"), s.files_under("tmp"))
    };
    let before = snapshot().await;

    // tokens
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic abc"),
        Some(s.token.as_str()),
    ] {
        let mut req = s.client.get(s.url("/api/ota/firmware"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["status"], false);
        assert_eq!(b["error"], "UNAUTHORIZED");
    }
    let r = s
        .client
        .post(s.url("/api/ota/firmware/1.0.0/release"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // names outside the patterns
    for (v, t) in [
        ("../etc", None),
        ("1.0/2", None),
        ("", None),
        ("latest", None),
        ("1.0.1", Some("../x")),
        ("1.0.1", Some("a.b")),
    ] {
        let (st, b) = s.upload(v, t, image(10, 1)).await;
        assert_eq!(st, 400, "{v} {t:?}: {b}");
        assert_eq!(b["status"], false);
    }
    for path in [
        "/api/ota/firmware/1.0.0?deviceType=..%2Fetc",
        "/api/ota/firmware/..%2F..%2Fetc?deviceType=gateway",
        "/api/ota/firmware/latest?deviceType=a%20b",
        "/api/ota/firmware?status=bogus",
        "/api/ota/firmware?limit=0",
        "/api/ota/firmware?limit=10001",
        "/api/ota/firmware?offset=-1",
    ] {
        let (st, b) = s.get_json(path).await;
        assert_eq!(st, 400, "{path}: {b}");
    }

    // duplicate
    let (st, b) = s.upload("1.0.0", None, image(1000, 2)).await;
    assert_eq!(st, 409, "{b}");
    assert_eq!(b["error"], "CONFLICT");

    // empty file, no file, no version, not multipart, two files
    let (st, b) = s.upload("1.0.1", None, Vec::new()).await;
    assert_eq!(st, 400, "{b}");
    let form = reqwest::multipart::Form::new().text("version", "1.0.1");
    let r = s.post_form(form).await;
    assert_eq!(r.status(), 400);
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(vec![1, 2, 3]));
    let r = s.post_form(form).await;
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .post(s.url("/api/ota/firmware/upload"))
        .header("authorization", s.auth())
        .body("plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"], false);
    let form = reqwest::multipart::Form::new()
        .text("version", "1.0.1")
        .part("file", reqwest::multipart::Part::bytes(vec![1, 2, 3]))
        .part("file", reqwest::multipart::Part::bytes(vec![4, 5, 6]));
    let r = s.post_form(form).await;
    assert_eq!(r.status(), 400);
    let form = reqwest::multipart::Form::new()
        .text("version", "1.0.1")
        .text("forceUpgrade", "perhaps")
        .part("file", reqwest::multipart::Part::bytes(vec![1, 2, 3]));
    let r = s.post_form(form).await;
    assert_eq!(r.status(), 400);

    // too large: declared length (refused before reading) and streamed without a length
    let (st, b) = s.upload("1.0.2", None, image(3 << 20, 3)).await;
    assert_eq!(st, 413, "{b}");
    assert_eq!(b["error"], "PAYLOAD_TOO_LARGE");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..24).map(|i| Ok(image(64 * 1024, i))).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let form = reqwest::multipart::Form::new()
        .text("version", "1.0.3")
        .part("file", reqwest::multipart::Part::stream(body));
    // the rest of the body is read and discarded, so the client (HTTP/2 here) sees the 413
    let r = s.post_form(form).await;
    assert_eq!(r.status(), 413);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "PAYLOAD_TOO_LARGE");
    // the same over HTTP/1.1 without a length (chunked)
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..24).map(|i| Ok(image(64 * 1024, i))).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let form = reqwest::multipart::Form::new()
        .text("version", "1.0.3")
        .part("file", reqwest::multipart::Part::stream(body));
    let h1 = client_for(s.dir.path(), true);
    let r = h1
        .post(s.url("/api/ota/firmware/upload"))
        .header("authorization", s.auth())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // status changes
    let (st, _) = s
        .post_json(
            "/api/ota/firmware/1.0.0/status",
            json!({"status": "shipped"}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = s
        .post_json("/api/ota/firmware/1.0.0/status", json!({"nope": 1}))
        .await;
    assert_eq!(st, 400);
    let r = s
        .client
        .post(s.url("/api/ota/firmware/1.0.0/status"))
        .header("authorization", s.auth())
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (st, _) = s
        .post_json("/api/ota/firmware/9.9.9/release", json!({}))
        .await;
    assert_eq!(st, 404);
    let (st, _) = s
        .post_json(
            "/api/ota/firmware/9.9.9/status",
            json!({"status": "testing"}),
        )
        .await;
    assert_eq!(st, 404);

    // unknown routes and methods answer in the envelope
    let (st, b) = s.get_json("/api/ota/nothing").await;
    assert_eq!(st, 404);
    assert_eq!(b["status"], false);
    let r = s
        .client
        .put(s.url("/api/ota/firmware/1.0.0"))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // tmp/ is empty again (partial uploads removed) and nothing else moved
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.files_under("tmp") > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(snapshot().await, before);

    // released firmware cannot go back to draft
    let (st, _) = s
        .post_json("/api/ota/firmware/1.0.0/release", json!({}))
        .await;
    assert_eq!(st, 200);
    let (st, b) = s
        .post_json("/api/ota/firmware/1.0.0/status", json!({"status": "draft"}))
        .await;
    assert_eq!(st, 409, "{b}");
}
