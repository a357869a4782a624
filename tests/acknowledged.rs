//! An acknowledged change is durable: for every mutating route of the API (read from the router
//! source, so a new one cannot be forgotten), the real binary is killed with SIGKILL right after
//! it answers, restarted on the same data dir, and the change must be there.

mod common;

use std::path::Path;

use common::{Appliance, image, md5_hex, mutating_routes};
use serde_json::{Value, json};

/// Routes that take a POST but change nothing (a dry run; the broker hooks only answer
/// questions).
const READ_ONLY: &[(&str, &str)] = &[
    ("POST", "/api/ota/campaigns/dry-run"),
    ("POST", "/hooks/emqx/authn"),
    ("POST", "/hooks/emqx/authz"),
    ("POST", "/hooks/vernemq/auth_on_register"),
    ("POST", "/hooks/vernemq/auth_on_subscribe"),
    ("POST", "/hooks/vernemq/auth_on_publish"),
];

fn assert_ok(what: &str, (st, b): &(u16, Value)) {
    assert!((200..300).contains(st), "{what}: {st} {b}");
}

/// Which of the routes a case below covers.
fn covered() -> Vec<(&'static str, &'static str)> {
    vec![
        ("POST", "/api/ota/firmware/upload"),
        ("POST", "/api/ota/firmware/{version}/release"),
        ("POST", "/api/ota/firmware/{version}/status"),
        ("POST", "/api/ota/firmware/{version}/deltas"),
        ("DELETE", "/api/ota/firmware/{version}"),
        ("POST", "/api/ota/devices"),
        ("POST", "/api/ota/devices/import"),
        ("PATCH", "/api/ota/devices/{id}"),
        ("DELETE", "/api/ota/devices/{id}"),
        ("POST", "/api/ota/upgrade/{device}"),
        ("POST", "/api/ota/task/{device}/cancel"),
        ("POST", "/api/ota/tasks/archive"),
        ("POST", "/api/ota/campaigns"),
        ("POST", "/api/ota/campaigns/{id}/{action}"),
        ("POST", "/api/users"),
        ("PATCH", "/api/users/{name}"),
        ("DELETE", "/api/users/{name}"),
        ("POST", "/api/mqtt/users"),
        ("DELETE", "/api/mqtt/users/{name}"),
        ("POST", "/api/auth/login"),
        ("POST", "/api/auth/logout"),
        ("POST", "/api/ota/bundles"),
    ]
}

#[test]
fn the_walk_covers_every_mutating_route() {
    let found = mutating_routes();
    assert!(found.len() >= 12, "{found:?}");
    let covered = covered();
    for (m, p) in &found {
        if READ_ONLY.contains(&(m.as_str(), p.as_str())) {
            continue;
        }
        assert!(
            covered.contains(&(m.as_str(), p.as_str())),
            "{m} {p} changes something but the kill -9 walk does not cover it: add a case"
        );
    }
    for c in &covered {
        assert!(
            found.iter().any(|(m, p)| (m.as_str(), p.as_str()) == *c),
            "{c:?} is covered but no longer a route"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_change_survives_a_kill_right_after_the_answer() {
    let mut a = Appliance::start().await;
    let img1 = image(300_000, 1);
    let img2 = image(310_000, 2);

    // POST upload
    assert_ok("upload 1.0.1", &a.upload("1.0.1", img1.clone()).await);
    a.kill_and_restart().await;
    let (st, fw) = a.get("/api/ota/firmware/1.0.1").await;
    assert_eq!(st, 200, "uploaded firmware lost: {fw}");
    let got = a
        .fetch("/firmware/gateway_v1.0.1.bin")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(md5_hex(&got), md5_hex(&img1));

    // POST release
    assert_ok(
        "release",
        &a.call("POST", "/api/ota/firmware/1.0.1/release", None)
            .await,
    );
    a.kill_and_restart().await;
    assert_eq!(
        a.get("/api/ota/firmware/1.0.1").await.1["data"]["status"],
        "released"
    );

    // POST status
    assert_ok("upload 1.0.2", &a.upload("1.0.2", img2.clone()).await);
    assert_ok(
        "status",
        &a.call(
            "POST",
            "/api/ota/firmware/1.0.2/status",
            Some(json!({"status": "testing"})),
        )
        .await,
    );
    a.kill_and_restart().await;
    assert_eq!(
        a.get("/api/ota/firmware/1.0.2").await.1["data"]["status"],
        "testing"
    );

    // DELETE firmware
    assert_ok("upload 1.0.9", &a.upload("1.0.9", image(1000, 9)).await);
    assert_ok(
        "delete firmware",
        &a.call("DELETE", "/api/ota/firmware/1.0.9", None).await,
    );
    a.kill_and_restart().await;
    assert_eq!(a.get("/api/ota/firmware/1.0.9").await.0, 404);

    // POST deltas (1.0.2 released first, then a delta from 1.0.1 requested)
    assert_ok(
        "release 1.0.2",
        &a.call("POST", "/api/ota/firmware/1.0.2/release", None)
            .await,
    );
    assert_ok(
        "request delta",
        &a.call(
            "POST",
            "/api/ota/firmware/1.0.2/deltas",
            Some(json!({"fromVersion": "1.0.1"})),
        )
        .await,
    );
    a.kill_and_restart().await;
    let (_, d) = a.get("/api/ota/firmware/1.0.2/deltas").await;
    assert!(
        d["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["fromVersion"] == "1.0.1"),
        "requested delta lost: {d}"
    );

    // POST devices: several registrations, each answered, then the kill
    for i in 0..10 {
        assert_ok(
            "register",
            &a.call(
                "POST",
                "/api/ota/devices",
                Some(json!({"id": format!("GW{i}"), "secret": "secret-123", "tags": ["a"]})),
            )
            .await,
        );
    }
    a.kill_and_restart().await;
    for i in 0..10 {
        assert_eq!(
            a.get(&format!("/api/ota/devices/GW{i}")).await.0,
            200,
            "registration of GW{i} was acknowledged and then lost"
        );
    }

    // POST devices/import
    let list: Vec<Value> = (0..20)
        .map(|i| json!({"id": format!("IMP{i}"), "secret": "secret-123"}))
        .collect();
    assert_ok(
        "import",
        &a.call("POST", "/api/ota/devices/import", Some(Value::Array(list)))
            .await,
    );
    a.kill_and_restart().await;
    for i in 0..20 {
        assert_eq!(a.get(&format!("/api/ota/devices/IMP{i}")).await.0, 200);
    }

    // PATCH devices/{id}
    assert_ok(
        "tag",
        &a.call(
            "PATCH",
            "/api/ota/devices/GW1",
            Some(json!({"addTags": ["line-3"], "removeTags": ["a"]})),
        )
        .await,
    );
    a.kill_and_restart().await;
    assert_eq!(
        a.get("/api/ota/devices/GW1").await.1["data"]["tags"],
        json!(["line-3"])
    );

    // DELETE devices/{id}
    assert_ok(
        "delete device",
        &a.call("DELETE", "/api/ota/devices/IMP0", None).await,
    );
    a.kill_and_restart().await;
    assert_eq!(a.get("/api/ota/devices/IMP0").await.0, 404);

    // POST upgrade (the device is offline: the task waits for it)
    let (st, t) = a
        .call(
            "POST",
            "/api/ota/upgrade/GW1",
            Some(json!({"version": "1.0.1"})),
        )
        .await;
    assert_ok("upgrade", &(st, t.clone()));
    a.kill_and_restart().await;
    let (_, now) = a.get("/api/ota/task/GW1").await;
    assert_eq!(now["data"]["id"], t["data"]["id"], "{now}");

    // POST task cancel
    assert_ok(
        "cancel",
        &a.call("POST", "/api/ota/task/GW1/cancel", None).await,
    );
    a.kill_and_restart().await;
    assert_eq!(
        a.get("/api/ota/task/GW1").await.1["data"]["status"],
        "cancelled"
    );

    // POST tasks/archive (a second finished task, the first one archived)
    let (st, t) = a
        .call(
            "POST",
            "/api/ota/upgrade/GW1",
            Some(json!({"version": "1.0.1"})),
        )
        .await;
    assert_ok("upgrade again", &(st, t.clone()));
    assert_ok(
        "cancel again",
        &a.call("POST", "/api/ota/task/GW1/cancel", None).await,
    );
    let (st, b) = a
        .call(
            "POST",
            "/api/ota/tasks/archive",
            Some(json!({"keepFinishedPerDevice": 1})),
        )
        .await;
    assert_ok("archive", &(st, b.clone()));
    assert_eq!(b["data"]["archived"], 1, "{b}");
    a.kill_and_restart().await;
    let (_, archived) = a.get("/api/ota/tasks?archived=true&deviceId=GW1").await;
    assert_eq!(archived["data"].as_array().unwrap().len(), 1, "{archived}");
    let (_, kept) = a.get("/api/ota/tasks?deviceId=GW1").await;
    assert_eq!(kept["data"][0]["id"], t["data"]["id"], "{kept}");
    assert_eq!(kept["data"].as_array().unwrap().len(), 1, "{kept}");

    // POST campaigns, then each action
    let (st, c) = a
        .call(
            "POST",
            "/api/ota/campaigns",
            Some(
                json!({"name": "kill walk", "version": "1.0.2", "targets": {"all": true},
                "startAt": "2099-01-01T00:00:00Z"}),
            ),
        )
        .await;
    assert_ok("campaign", &(st, c.clone()));
    let id = c["data"]["id"].as_str().unwrap().to_string();
    a.kill_and_restart().await;
    assert_eq!(
        a.get(&format!("/api/ota/campaigns/{id}")).await.1["data"]["status"],
        "scheduled"
    );
    for (action, status) in [
        ("pause", "paused"),
        ("resume", "scheduled"),
        ("cancel", "cancelled"),
    ] {
        assert_ok(
            action,
            &a.call("POST", &format!("/api/ota/campaigns/{id}/{action}"), None)
                .await,
        );
        a.kill_and_restart().await;
        assert_eq!(
            a.get(&format!("/api/ota/campaigns/{id}")).await.1["data"]["status"],
            status,
            "{action} was acknowledged and then lost"
        );
    }
    // every change above is in the audit log, as acknowledged
    let (_, log) = a.get("/api/audit?limit=1000").await;
    let actions: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "firmware.upload",
        "firmware.release",
        "device.register",
        "campaign.action",
    ] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }

    // users: add, change, sign in, sign out, delete — each survives a kill right after it
    assert_ok(
        "add user",
        &a.call(
            "POST",
            "/api/users",
            Some(json!({"name": "kim", "role": "viewer", "password": "first password"})),
        )
        .await,
    );
    a.kill_and_restart().await;
    assert_ok(
        "role",
        &a.call("PATCH", "/api/users/kim", Some(json!({"role": "operator"})))
            .await,
    );
    a.kill_and_restart().await;
    let (_, users) = a.get("/api/users").await;
    assert_eq!(users["data"][0]["role"], "operator", "{users}");
    let cookie = login(&a, "kim", "first password").await;
    a.kill_and_restart().await;
    assert_eq!(
        session(&a, &cookie).await,
        200,
        "a session acknowledged at sign-in was lost"
    );
    let r = a
        .http
        .post(format!("{}/api/auth/logout", a.base()))
        .header("cookie", &cookie)
        .header("origin", a.base())
        .header("x-csrf-token", csrf(&a, &cookie).await)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    a.kill_and_restart().await;
    assert_eq!(
        session(&a, &cookie).await,
        401,
        "a signed-out session came back"
    );
    assert_ok(
        "delete user",
        &a.call("DELETE", "/api/users/kim", None).await,
    );
    a.kill_and_restart().await;
    assert_eq!(a.get("/api/users").await.1["data"], json!([]));
    assert!(Path::new(&a.data()).exists());

    // MQTT application users: add, delete
    assert_ok(
        "add MQTT user",
        &a.call(
            "POST",
            "/api/mqtt/users",
            Some(json!({"name": "historian", "password": "historian pw"})),
        )
        .await,
    );
    a.kill_and_restart().await;
    let (_, users) = a.get("/api/mqtt/users").await;
    assert_eq!(users["data"][0]["name"], "historian", "{users}");
    assert_ok(
        "delete MQTT user",
        &a.call("DELETE", "/api/mqtt/users/historian", None).await,
    );
    a.kill_and_restart().await;
    assert_eq!(a.get("/api/mqtt/users").await.1["data"], json!([]));
}

/// Signs in; the `name=value` of the session cookie.
async fn login(a: &Appliance, user: &str, password: &str) -> String {
    let r = a
        .http
        .post(format!("{}/api/auth/login", a.base()))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = r.headers()["set-cookie"].to_str().unwrap();
    c.split(';').next().unwrap().to_string()
}

async fn session(a: &Appliance, cookie: &str) -> u16 {
    a.http
        .get(format!("{}/api/auth/session", a.base()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn csrf(a: &Appliance, cookie: &str) -> String {
    let r = a
        .http
        .get(format!("{}/api/auth/session", a.base()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    v["data"]["csrfToken"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_bundle_survives_a_kill_right_after_the_answer() {
    let root = tempfile::tempdir().unwrap();
    let vendor = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let stem = vendor.path().join("vendor");
    let public = run(&["key", "generate", stem.to_str().unwrap(), "--no-password"]);
    let img = vendor.path().join("fw.bin");
    std::fs::write(&img, image(200_000, 7)).unwrap();
    let bundle = vendor.path().join("b.tar");
    run(&[
        "bundle",
        "create",
        "--key",
        stem.with_extension("key").to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
        "--firmware",
        &format!("{}:gateway:4.0.0", img.display()),
    ]);
    let trust = format!(
        "[trust]\nkeys = [{{name = \"vendor\", key = {:?}}}]\n",
        public.trim()
    );
    let mut a = Appliance::start_in(root.path(), &trust).await;
    let r = a
        .http
        .post(format!("{}/api/ota/bundles", a.base()))
        .bearer_auth(a.token())
        .body(std::fs::read(&bundle).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    a.kill_and_restart().await;
    let (st, fw) = a.get("/api/ota/firmware/4.0.0").await;
    assert_eq!(st, 200, "imported firmware lost: {fw}");
    assert_eq!(fw["data"]["signatureStatus"], "valid");
    // and the bundle is known: importing it again changes nothing
    let r = a
        .http
        .post(format!("{}/api/ota/bundles", a.base()))
        .bearer_auth(a.token())
        .body(std::fs::read(&bundle).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
