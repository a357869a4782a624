//! Backup and restore round trip: an online backup through the CLI (checksums verified),
//! a restore that refuses a non-empty dir and a damaged file, and an appliance started on the
//! restored dir that has the same firmware (byte for byte), deltas, devices, tasks, campaigns
//! and admin token.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, bin, client_for, fixture, test_config};
use hangar::server::app::App;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_round_trip() {
    let s = Server::start().await;
    s.release_bytes("1.0.1", "gateway", fixture("old.bin"))
        .await;
    s.release_bytes("1.0.2", "gateway", fixture("new.bin"))
        .await;
    s.register("GW1", "gateway", "secret-123").await;
    s.register("GW2", "gateway", "secret-123").await;
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = s
        .post_json(
            "/api/ota/firmware/1.0.2/deltas",
            json!({"fromVersion": "1.0.1"}),
        )
        .await;
    assert!(st == 202 || st == 200, "{b}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.get_json("/api/ota/firmware/1.0.2/deltas").await.1["data"][0]["status"] != "ready" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, b) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "kept", "version": "1.0.2",
            "targets": {"deviceIds": ["GW2"]}}),
        )
        .await;
    assert_eq!(st, 201, "{b}");

    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("b.tar");
    let out = Command::new(bin())
        .args(["--config"])
        .arg(s.client_config())
        .args(["backup", "--out"])
        .arg(&tar)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksums verified"));

    let restore = |file: &Path, dir: &Path, force: bool| {
        let mut c = Command::new(bin());
        c.arg("restore").arg(file).arg("--data-dir").arg(dir);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    // a damaged backup is refused before anything is written
    let mut bytes = std::fs::read(&tar).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    let bad = work.path().join("bad.tar");
    std::fs::write(&bad, &bytes).unwrap();
    let target = work.path().join("restored");
    let out = restore(&bad, &target, false);
    assert!(!out.status.success());
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none());
    // a non-empty dir is refused without --force
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("something"), b"x").unwrap();
    let out = restore(&tar, &target, false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = restore(&tar, &target, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the original stops; an appliance on the restored dir has everything
    let token = s.token.clone();
    let site_before = s.get_json("/api/site").await.1["data"]["siteKey"].clone();
    assert!(site_before.as_str().is_some_and(|k| k.starts_with("RW")));
    drop(s);
    let app = App::start(test_config(&target)).await.unwrap();
    assert_eq!(app.admin_token, token, "same admin token");
    let client = client_for(&target, false);
    let base = format!("https://localhost:{}", app.https.port());
    let get = |path: &str| {
        let req = client.get(format!("{base}{path}")).bearer_auth(&token);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let fw = get("/api/ota/firmware").await;
    assert_eq!(fw["data"].as_array().unwrap().len(), 2, "{fw}");
    // the site keeps its report-signing key
    assert_eq!(get("/api/site").await["data"]["siteKey"], site_before);
    let img = client
        .get(format!("{base}/firmware/gateway_v1.0.2.bin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(img.to_vec(), fixture("new.bin"));
    let d = get("/api/ota/firmware/1.0.2/deltas").await;
    assert_eq!(d["data"][0]["status"], "ready", "{d}");
    let patch = client
        .get(d["data"][0]["url"].as_str().unwrap())
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 200);
    assert_eq!(
        get("/api/ota/devices").await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let t = get("/api/ota/task/GW1").await;
    assert_eq!(t["data"]["toVersion"], "1.0.2", "{t}");
    let c = get("/api/ota/campaigns").await;
    assert_eq!(c["data"][0]["name"], "kept", "{c}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_onto_a_running_appliance_is_refused_and_names_it() {
    let work = tempfile::tempdir().unwrap();
    let mut p = common::Proc::spawn(work.path(), "").await;
    let data = work.path().join("data");
    let tar = work.path().join("b.tar");
    let (ok, _, err) = p.cli(&["backup", "--out", tar.to_str().unwrap()]);
    assert!(ok, "{err}");
    let out = Command::new(bin())
        .args(["restore"])
        .arg(&tar)
        .arg("--data-dir")
        .arg(&data)
        .arg("--force")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restore onto a live dir succeeded: {err}"
    );
    assert!(err.contains(&format!("pid {}", p.pid())), "{err}");
    // nothing was moved aside, and the appliance still serves from it
    let siblings: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data."))
        .collect();
    assert!(siblings.is_empty(), "{siblings:?}");
    let (ok, _, err) = p.cli(&["firmware", "list"]);
    assert!(ok, "{err}");
    // a second appliance on the same dir is refused the same way
    let cfg = test_config(&data);
    match App::start(cfg).await {
        Ok(_) => panic!("a second appliance started on a live data dir"),
        Err(e) => assert!(e.to_string().contains(&format!("pid {}", p.pid())), "{e}"),
    }
    // once it stopped, the restore goes through
    p.term();
    let out = Command::new(bin())
        .args(["restore"])
        .arg(&tar)
        .arg("--data-dir")
        .arg(&data)
        .arg("--force")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
