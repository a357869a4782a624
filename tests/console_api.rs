//! Sign-in, sessions, roles, CSRF, the audit log and the event stream, through the HTTP API
//! with a plain client: the rules the console's pages rely on, enforced by the server.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The appliance with an operator `olga` and a viewer `vera`.
async fn server() -> Server {
    let s = Server::start().await;
    for (name, role) in [("olga", "operator"), ("vera", "viewer")] {
        let (st, b) = s
            .post_json(
                "/api/users",
                json!({"name": name, "role": role, "password": format!("{name}'s password")}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
    }
    s
}

/// POST /api/auth/login; status, envelope and the `name=value` of the cookie set.
async fn login(s: &Server, user: &str, password: &str) -> (u16, Value, Option<String>) {
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let cookie = r
        .headers()
        .get("set-cookie")
        .map(|c| c.to_str().unwrap().to_string());
    (st, r.json().await.unwrap(), cookie)
}

async fn signed_in(s: &Server, user: &str) -> (String, String) {
    let (st, b, c) = login(s, user, &format!("{user}'s password")).await;
    assert_eq!(st, 200, "{b}");
    let cookie = c.unwrap().split(';').next().unwrap().to_string();
    (cookie, b["data"]["csrfToken"].as_str().unwrap().to_string())
}

/// A request with a session cookie (and, if given, the CSRF token and an Origin).
async fn with_session(
    s: &Server,
    method: &str,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    origin: Option<&str>,
) -> (u16, Value) {
    let mut r = s
        .client
        .request(method.parse().unwrap(), s.url(path))
        .header("cookie", cookie);
    if let Some(t) = csrf {
        r = r.header("x-csrf-token", t);
    }
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn sign_in_says_nothing_about_which_half_was_wrong_and_slows_down_guessing() {
    let s = server().await;
    let (st, b, cookie) = login(&s, "olga", "olga's password").await;
    assert_eq!(st, 200, "{b}");
    let cookie = cookie.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    assert_eq!(b["data"]["role"], "operator");

    let (st1, wrong, _) = login(&s, "olga", "guess").await;
    let (st2, nobody, _) = login(&s, "nobody", "guess").await;
    assert_eq!((st1, st2), (401, 401));
    assert_eq!(
        wrong["message"], nobody["message"],
        "the refusal tells names apart"
    );
    assert_eq!(wrong["message"], "wrong user name or password");

    // five failures in all for olga, then she must wait (429 with Retry-After), even with the
    // right password; another user is not locked out by her
    for _ in 0..4 {
        assert_eq!(login(&s, "olga", "guess").await.0, 401);
    }
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .json(&json!({"username": "olga", "password": "olga's password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "THROTTLED", "{b}");
    // another user signs in from the same address ...
    let (st, _, _) = login(&s, "vera", "vera's password").await;
    assert_eq!(st, 200, "one name's failures locked out another");
    // ... until that address has failed 20 times (6 so far)
    for i in 0..14 {
        assert_eq!(login(&s, &format!("nobody{i}"), "guess").await.0, 401);
    }
    let (st, _, _) = login(&s, "vera", "vera's password").await;
    assert_eq!(st, 429, "failures from one address slow that address");

    // the sign-ins are in the audit log, the refused ones sampled (tests/sign_in.rs) and all
    // of them counted
    let (_, log) = s.get_json("/api/audit?action=auth.login").await;
    let results: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert!(
        results.contains(&"ok") && results.contains(&"refused 401"),
        "{results:?}"
    );
    assert_eq!(
        s.metric("hangar_auth_sign_ins_total{result=\"throttled\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn bad_input_to_sign_in_and_users_is_a_clear_4xx() {
    let s = server().await;
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"username":"olga","password":"{}"}}"#,
            "x".repeat(100_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for (body, why) in [
        (
            json!({"name": "<b>", "role": "viewer", "password": "long enough"}),
            "name",
        ),
        (
            json!({"name": "kim", "role": "root", "password": "long enough"}),
            "role",
        ),
        (
            json!({"name": "kim", "role": "viewer", "password": "short"}),
            "too short",
        ),
        (
            json!({"name": "olga", "role": "viewer", "password": "long enough"}),
            "exists",
        ),
    ] {
        let (st, b) = s.post_json("/api/users", body).await;
        assert!(st == 400 || st == 409, "{why}: {st} {b}");
        assert!(b["message"].as_str().unwrap().contains(why), "{why}: {b}");
    }
}

#[tokio::test]
async fn roles_are_enforced_by_the_server() {
    let s = server().await;
    let origin = s.base.clone();
    let (vc, vt) = signed_in(&s, "vera").await;
    let (oc, ot) = signed_in(&s, "olga").await;
    // a viewer reads, and is refused every change with 403 and the envelope
    assert_eq!(
        with_session(&s, "GET", "/api/ota/devices", &vc, None, None)
            .await
            .0,
        200
    );
    let (st, b) = with_session(
        &s,
        "POST",
        "/api/ota/firmware/1.0.0/release",
        &vc,
        Some(&vt),
        Some(&origin),
    )
    .await;
    assert_eq!((st, b["error"].as_str()), (403, Some("FORBIDDEN")), "{b}");
    // secrets and users are the admin's, also to read
    assert_eq!(
        with_session(&s, "GET", "/api/ota/backup", &oc, None, None)
            .await
            .0,
        403
    );
    assert_eq!(
        with_session(&s, "GET", "/api/users", &oc, None, None)
            .await
            .0,
        403
    );
    // an operator may not delete devices (admin) but may act on firmware
    s.register("GW1", "gateway", "gw1-secret").await;
    assert_eq!(
        with_session(
            &s,
            "DELETE",
            "/api/ota/devices/GW1",
            &oc,
            Some(&ot),
            Some(&origin)
        )
        .await
        .0,
        403
    );
    let (st, b) = with_session(
        &s,
        "POST",
        "/api/ota/firmware/9.9.9/release",
        &oc,
        Some(&ot),
        Some(&origin),
    )
    .await;
    assert_eq!(st, 404, "allowed, and then not found: {b}");
    // the admin token still works everywhere
    assert_eq!(s.get_json("/api/users").await.0, 200);
}

#[tokio::test]
async fn a_cookie_alone_cannot_change_anything() {
    let s = server().await;
    let (c, t) = signed_in(&s, "olga").await;
    let path = "/api/ota/task/GW9/cancel";
    let origin = s.base.clone();
    // no token; a wrong token; the right token from another site; no Origin nor Referer
    for (csrf, from) in [
        (None, Some(origin.as_str())),
        (Some("0".repeat(64)), Some(origin.as_str())),
        (Some(t.clone()), Some("https://evil.example")),
        (Some(t.clone()), None),
    ] {
        let (st, b) = with_session(&s, "POST", path, &c, csrf.as_deref(), from).await;
        assert_eq!(
            (st, b["error"].as_str()),
            (403, Some("CSRF")),
            "{csrf:?} {from:?}: {b}"
        );
    }
    // with both it goes through (to a 404: GW9 does not exist)
    let (st, b) = with_session(&s, "POST", path, &c, Some(&t), Some(&origin)).await;
    assert_eq!(st, 404, "{b}");
    // a forged cookie is no session
    let forged = format!("hangar_session={}", "ab".repeat(32));
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &forged, None, None)
            .await
            .0,
        401
    );
    // a sign-in posted from another site is refused
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .header("origin", "https://evil.example")
        .json(&json!({"username": "olga", "password": "olga's password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn sessions_end_at_sign_out_at_a_new_password_and_when_the_user_goes() {
    let s = server().await;
    let origin = s.base.clone();
    let (c1, t1) = signed_in(&s, "olga").await;
    let (c2, _) = signed_in(&s, "olga").await;
    let (c3, _) = signed_in(&s, "vera").await;
    assert_eq!(
        with_session(
            &s,
            "POST",
            "/api/auth/logout",
            &c1,
            Some(&t1),
            Some(&origin)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c1, None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c2, None, None)
            .await
            .0,
        200,
        "the other session stays"
    );
    let r = s
        .client
        .patch(s.url("/api/users/olga"))
        .header("authorization", s.auth())
        .json(&json!({"password": "a new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c2, None, None)
            .await
            .0,
        401,
        "a new password ends old sessions"
    );
    assert_eq!(s.delete_json("/api/users/vera").await.0, 200);
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c3, None, None)
            .await
            .0,
        401
    );
    // pages send a browser without a session to sign in
    let r = client_no_redirect(s.dir.path())
        .get(s.url("/firmware"))
        .header("cookie", &c3)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login?next=%2Ffirmware");
}

#[tokio::test(flavor = "current_thread")]
async fn a_session_expires_after_its_hours() {
    let s = Server::start_with(|c| c.auth.session_hours = 2).await;
    let (st, b) = s
        .post_json(
            "/api/users",
            json!({"name": "olga", "role": "viewer", "password": "olga's password"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (c, _) = signed_in(&s, "olga").await;
    // the appliance's clock is tokio's: pause it and move it on by hours
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c, None, None)
            .await
            .0,
        200
    );
    tokio::time::advance(Duration::from_secs(3601)).await;
    assert_eq!(
        with_session(&s, "GET", "/api/auth/session", &c, None, None)
            .await
            .0,
        401
    );
}

// the CLI runs as a child process the test waits for: the appliance needs threads of its own
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_audited_with_who_how_what_and_the_result() {
    let s = server().await;
    let origin = s.base.clone();
    let (c, t) = signed_in(&s, "olga").await;
    s.upload("1.0.1", None, image(10_000, 1)).await;
    with_session(
        &s,
        "POST",
        "/api/ota/firmware/1.0.1/release?deviceType=gateway",
        &c,
        Some(&t),
        Some(&origin),
    )
    .await;
    let out = std::process::Command::new(bin())
        .args(["audit", "--limit", "10", "--config"])
        .arg(s.client_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, log) = s.get_json("/api/audit?limit=10").await;
    let e = &log["data"][0];
    assert_eq!(
        (
            e["actor"].as_str(),
            e["via"].as_str(),
            e["action"].as_str(),
            e["target"].as_str(),
            e["result"].as_str()
        ),
        (
            Some("olga"),
            Some("session"),
            Some("firmware.release"),
            Some("gateway/1.0.1"),
            Some("ok")
        ),
        "{log}"
    );
    let e = &log["data"][1];
    assert_eq!(
        (
            e["actor"].as_str(),
            e["via"].as_str(),
            e["action"].as_str(),
            e["target"].as_str()
        ),
        (
            Some("admin-token"),
            Some("token"),
            Some("firmware.upload"),
            Some("gateway/1.0.1")
        ),
        "{log}"
    );
    // filters
    let (_, mine) = s.get_json("/api/audit?actor=olga&action=firmware.").await;
    assert!(
        mine["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "olga")
    );
    let (st, b) = s.get_json("/api/audit?since=yesterday").await;
    assert_eq!(st, 400, "{b}");
    // the CLI's own requests say so
    let out = std::process::Command::new(bin())
        .args(["user", "add", "kim", "--role", "viewer", "--config"])
        .arg(s.client_config())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(b"kim's password\n")?;
            ch.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let (_, log) = s.get_json("/api/audit?action=user.add").await;
    assert_eq!(
        (
            log["data"][0]["via"].as_str(),
            log["data"][0]["target"].as_str()
        ),
        (Some("cli"), Some("kim")),
        "{log}"
    );
}

/// Reads SSE frames from `r` until one named `event` (or the deadline); returns its id and data.
async fn next_event(r: &mut reqwest::Response, buf: &mut String, event: &str) -> (u64, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let field = |k: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::to_string)
            };
            if field("event: ").as_deref() == Some(event) {
                let id = field("id: ").unwrap().parse().unwrap();
                return (id, serde_json::from_str(&field("data: ").unwrap()).unwrap());
            }
        }
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {event} event"))
            .unwrap()
            .expect("the stream ended");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn the_event_stream_resumes_and_says_resync_when_it_cannot() {
    let s = server().await;
    let events = |last: Option<u64>| {
        let mut r = s
            .client
            .get(s.url("/api/events"))
            .header("authorization", s.auth());
        if let Some(l) = last {
            r = r.header("last-event-id", l.to_string());
        }
        r.send()
    };
    let mut r = events(None).await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let (start, _) = next_event(&mut r, &mut buf, "hello").await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let (id, d) = next_event(&mut r, &mut buf, "changes").await;
    assert!(id > start);
    assert_eq!(d["devices"], json!(["GW1"]), "{d}");
    drop(r);

    // resume after what this client saw: it gets what it missed, nothing twice
    s.register("GW2", "gateway", "gw2-secret").await;
    let mut r = events(Some(id)).await.unwrap();
    let mut buf = String::new();
    let (id2, d) = next_event(&mut r, &mut buf, "changes").await;
    assert!(id2 > id);
    assert_eq!(d["devices"], json!(["GW2"]), "{d}");
    drop(r);

    // a client further behind than the appliance keeps is told to reload, not left with a gap
    let list: Vec<Value> = (0..9000)
        .map(|i| json!({"id": format!("IMP{i:05}"), "deviceType": "gateway", "protocol": "gateway", "secret": "imported-secret"}))
        .collect();
    let (st, b) = s.post_json("/api/ota/devices/import", json!(list)).await;
    assert_eq!(st, 200, "{b}");
    let mut r = events(Some(id2)).await.unwrap();
    let mut buf = String::new();
    let (id3, _) = next_event(&mut r, &mut buf, "resync").await;
    assert!(id3 >= id2 + 9000, "{id3}");
}

#[tokio::test]
async fn an_event_client_that_never_reads_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start_with(|c| c.http.send_timeout_secs = 2).await;
    let plain = s.plain.trim_start_matches("http://").to_string();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut conn = sock.connect(plain.parse().unwrap()).await.unwrap();
    conn.write_all(
        format!(
            "GET /api/events HTTP/1.1\r\nHost: {plain}\r\nAuthorization: Bearer {}\r\n\r\n",
            s.token
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // changes arrive faster than nobody reads them: the appliance stops waiting after 2 s
    let feed = s.app.as_ref().unwrap().events();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0u64;
    while s.metric("hangar_http_send_timeouts_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent client was never cut off"
        );
        for _ in 0..500 {
            n += 1;
            feed.publish(hangar::server::events::Change::Task {
                device_id: format!("{n:0>120}"),
                campaign_id: None,
                status: "downloading",
                progress: 50,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
}

#[tokio::test]
async fn open_event_streams_do_not_hold_a_shutdown() {
    let mut s = server().await;
    let mut r = s
        .client
        .get(s.url("/api/events"))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    let mut buf = String::new();
    next_event(&mut r, &mut buf, "hello").await;
    // the listeners drain for up to 10 s; an event stream must end at once instead
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), s.app.take().unwrap().shutdown())
        .await
        .expect("an open event stream held the shutdown");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match r.chunk().await {
                Ok(Some(c)) if c.is_empty() => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "the stream did not end: {ended:?}"
    );
}

/// The pages say things once and truthfully: the statistics name campaigns, a device's timeline
/// does not repeat what its badges say, a failure group shows the error message, and a
/// firmware that require_signed would refuse has its Release disabled with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_name_campaigns_say_things_once_and_disable_what_would_be_refused() {
    let s = Server::start_with(|c| c.trust.require_signed = true).await;
    let page = |path: &'static str| {
        let (c, url, token) = (s.client.clone(), s.url(path), s.token.clone());
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    // an unsigned draft: Release is disabled, with the reason
    let up = s
        .post_form(
            reqwest::multipart::Form::new()
                .text("version", "1.0.5")
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(image(500, 5)).file_name("f.bin"),
                ),
        )
        .await;
    assert_eq!(up.status(), 201);
    let fw = page("/firmware").await;
    let row = &fw[fw.find("data-version=\"1.0.5\"").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(
        row.contains("disabled") && row.contains("require_signed"),
        "{row}"
    );
    assert!(row.contains("Delete"), "{row}");

    // a device's task: its timeline says "downloading 40 %" once
    let s2 = Server::start().await;
    s2.register("GW1", "gateway", "secret-123").await;
    s2.release("1.0.2", "gateway", 1000).await;
    let mut d =
        common::mqtt::Device::connect(s2.mqtt, "gw1", Some(("GW1", "secret-123")), None).await;
    d.expect_connected().await;
    d.subscribe("hanqi/gateway/GW1/command").await;
    let (st, t) = s2
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{t}");
    let msg = t["data"]["msgId"].as_str().unwrap().to_string();
    for (state, p) in [("downloading", 40), ("failed", 40)] {
        d.publish(
            "hanqi/gateway/GW1/report",
            json!({"msgType":"ota_progress","msgId":msg,"uuid":"GW1","timestamp":1,
                   "data":{"state":state,"progress":p,"currentVersion":"1.0.1","errorCode":"DOWNLOAD_FAILED","errorMessage":"disk full on the gateway"}}),
        )
        .await;
    }
    s2.wait_task("GW1", |t| t["status"] == "failed").await;
    let dev = s2
        .client
        .get(s2.url("/devices/GW1"))
        .bearer_auth(&s2.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !dev.contains("downloading 40%"),
        "the timeline repeats itself: {dev}"
    );
    assert!(dev.contains("failed: DOWNLOAD_FAILED"), "{dev}");

    // a campaign's failures show the message; the statistics call it by its name
    s2.register("GW2", "gateway", "secret-123").await;
    let (st, c) = s2
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "night shift", "version": "1.0.2", "targets": {"deviceIds": ["GW1"]}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    let t = s2
        .wait_task("GW1", |t| {
            t["campaignId"] == id.as_str() && t["status"] == "pending"
        })
        .await;
    let msg = t["msgId"].as_str().unwrap().to_string();
    d.publish(
        "hanqi/gateway/GW1/report",
        json!({"msgType":"ota_progress","msgId":msg,"uuid":"GW1","timestamp":1,
               "data":{"state":"failed","progress":0,"currentVersion":"1.0.1","errorCode":"VERIFY_FAILED","errorMessage":"md5 mismatch"}}),
    )
    .await;
    s2.wait_campaign(&id, 30, |c| c["counts"]["failed"] == 1)
        .await;
    let get = |path: String| {
        let (c, url, token) = (s2.client.clone(), s2.url(&path), s2.token.clone());
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let detail = get(format!("/campaigns/{id}")).await;
    assert!(
        detail.contains("VERIFY_FAILED") && detail.contains("md5 mismatch"),
        "{detail}"
    );
    let stats = get("/statistics".into()).await;
    assert!(stats.contains(&format!("night shift ({id})")), "{stats}");
}
