//! The web console in a real browser: headless Chromium from Debian, driven over WebDriver,
//! against the real appliance and `hangar sim` devices. Sign-in, an upload through the page
//! with its progress, release, a campaign started from the form whose waves move to done with
//! no reload, the brake during a second one, a viewer refused, a script in a description shown
//! as text, and a cross-site form post that changes nothing.
//!
//! `HANGAR_SCREENSHOTS=DIR` also saves the fleet and campaign pages there (the README's
//! pictures: `scripts/screenshots.sh`).

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::*;
use serde_json::{Value, json};

async fn add_user(s: &Server, name: &str, role: &str, password: &str) {
    let (st, b) = s
        .post_json(
            "/api/users",
            json!({"name": name, "role": role, "password": password}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
}

async fn sign_in(b: &Browser, s: &Server, user: &str, password: &str) {
    if !b.url().await.contains("/login") {
        b.go(&s.url("/login")).await;
    }
    b.type_in(&b.find("input[name=username]").await, user).await;
    b.type_in(&b.find("input[name=password]").await, password)
        .await;
    b.click_on("#login-form button").await;
}

fn shot_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("HANGAR_SCREENSHOTS").map(std::path::PathBuf::from)
}

/// A page on another origin whose form posts to the appliance as soon as it loads.
async fn attacker_page(target: String) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}/win", l.local_addr().unwrap().port());
    let html = format!(
        r#"<!doctype html><html><body><form id=f method=post enctype="text/plain" action="{target}">
<input name='{{"status":"deprecated","x":"' value='"}}'></form>
<script>document.getElementById("f").submit()</script></body></html>"#
    );
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                html.len()
            );
            let _ = c.write_all(resp.as_bytes()).await;
        }
    });
    (url, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_engineer_runs_a_rollout_from_the_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let s = Server::start().await;
    add_user(&s, "olga", "operator", "olga's password").await;
    add_user(&s, "vera", "viewer", "vera's password").await;

    // not signed in: the page sends the browser to sign in, then back
    b.go(&s.url("/campaigns")).await;
    assert!(b.url().await.contains("/login?next="), "{}", b.url().await);
    sign_in(&b, &s, "olga", "not her password").await;
    b.until(10, "the generic refusal", "return document.querySelector('#login-error').textContent.includes('wrong user name or password')").await;
    sign_in(&b, &s, "olga", "olga's password").await;
    b.until(
        10,
        "back on the page asked for",
        "return location.pathname === '/campaigns'",
    )
    .await;

    // upload through the page, with its progress bar; a script in the description stays text
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw-1.0.1.bin");
    std::fs::write(&file, image(3_000_000, 11)).unwrap();
    let description = "<script>window.__xss=1</script><b>bold</b> & more";
    b.go(&s.url("/firmware")).await;
    b.type_in(&b.find("#upload-form input[name=version]").await, "1.0.1")
        .await;
    b.type_in(
        &b.find("#upload-form input[name=description]").await,
        description,
    )
    .await;
    b.choose_file(&b.find("#upload-form input[type=file]").await, &file)
        .await;
    b.click_on("#upload-form button[type=submit]").await;
    b.until(
        60,
        "the upload finished",
        "return document.querySelector('#upload-state').textContent.startsWith('uploaded 1.0.1')",
    )
    .await;
    assert_eq!(
        b.js(
            "return document.querySelector('#upload-progress').value",
            json!([])
        )
        .await
        .as_f64(),
        Some(100.0),
        "the progress bar did not reach the end"
    );
    b.until(
        10,
        "the new firmware listed",
        "return !!document.querySelector('tr[data-version=\"1.0.1\"] td.description')",
    )
    .await;
    let shown = b.text_of("tr[data-version=\"1.0.1\"] td.description").await;
    assert_eq!(shown, description, "the description is shown as its text");
    assert_eq!(
        b.js("return [window.__xss === undefined, document.querySelectorAll('td.description b').length]", json!([]))
            .await,
        json!([true, 0]),
        "markup in a description ran or rendered"
    );
    // release it
    b.click_on("tr[data-version=\"1.0.1\"] button.act").await;
    b.until(10, "released", "return document.querySelector('tr[data-version=\"1.0.1\"] .badge').textContent === 'released'").await;

    // six devices on 1.0.0; a campaign from the form, watched to done without a reload
    let _fast = s.sim(&[
        "--devices",
        "6",
        "--version",
        "1.0.0",
        "--register",
        "--id-prefix",
        "FAST",
    ]);
    s.wait_online(6).await;
    b.go(&s.url("/campaigns/new")).await;
    b.type_in(
        &b.find("#campaign-form input[name=name]").await,
        "line 3 to 1.0.1",
    )
    .await;
    b.type_in(&b.find("#campaign-form input[name=waves]").await, "50, 100")
        .await;
    b.type_in(
        &b.find("#campaign-form input[name=successThreshold]").await,
        "50",
    )
    .await;
    b.until(
        20,
        "the dry run beside the form",
        "return document.querySelector('#dry-run').textContent.includes('6 devices in 2 waves')",
    )
    .await;
    b.click_on("#campaign-form button[type=submit]").await;
    b.until(
        20,
        "on the campaign page",
        "return location.pathname.startsWith('/campaigns/c')",
    )
    .await;
    let campaign = b.url().await;
    b.js("window.__same_page = true", json!([])).await;
    b.until(120, "every wave done", "return document.querySelector('#campaign-status').textContent.includes('completed') && document.querySelector('#count-completed').textContent === '6'").await;
    assert_eq!(
        b.js("return window.__same_page === true", json!([])).await,
        json!(true),
        "the page was reloaded: it must update live"
    );
    assert_eq!(b.count("li.wave").await, 2);
    let waves = b.text_of("#waves").await;
    assert!(waves.contains("wave 1: 100 % ≥ 50 %, passed"), "{waves}");
    b.go(&campaign).await;
    b.find("#waves").await;
    assert_eq!(
        b.count("#brake").await,
        0,
        "a finished campaign offers the brake"
    );
    if let Some(d) = shot_dir() {
        b.screenshot(&d.join("campaign.png")).await;
        b.go(&s.url("/")).await;
        b.find("table.devices").await;
        b.screenshot(&d.join("fleet.png")).await;
    }

    // the brake during a second campaign: in-flight devices stop
    s.release_bytes("1.0.2", "gateway", image(4_000_000, 12))
        .await;
    let _slow = s.sim(&[
        "--devices",
        "3",
        "--version",
        "1.0.0",
        "--register",
        "--id-prefix",
        "SLOW",
        "--slow",
        "64",
    ]);
    s.wait_online(9).await;
    b.go(&s.url("/campaigns/new")).await;
    b.type_in(
        &b.find("#campaign-form input[name=name]").await,
        "slow ones",
    )
    .await;
    b.click(
        &b.find("select[name=firmware] option[value=\"gateway|1.0.2\"]")
            .await,
    )
    .await;
    b.click_on("input[name=targetKind][value=filter]").await;
    b.type_in(&b.find("input[name=fromVersions]").await, "1.0.0")
        .await;
    b.type_in(&b.find("#campaign-form input[name=waves]").await, "100")
        .await;
    b.until(
        20,
        "the second dry run",
        "return document.querySelector('#dry-run').textContent.includes('3 devices in 1 waves')",
    )
    .await;
    b.click_on("#campaign-form button[type=submit]").await;
    b.until(
        20,
        "on the second campaign",
        "return location.pathname.startsWith('/campaigns/c') && location.href !== arguments[0]"
            .replace("arguments[0]", &format!("'{campaign}'"))
            .as_str(),
    )
    .await;
    b.until(
        60,
        "devices downloading",
        "return Number(document.querySelector('#count-flying').textContent) >= 1",
    )
    .await;
    // a running campaign offers Pause and the brake, not Resume
    assert_eq!(b.count("#campaign-actions button").await, 2);
    assert!(b.text_of("#campaign-actions").await.contains("Pause"));
    assert!(!b.text_of("#campaign-actions").await.contains("Resume"));
    b.click_on("#brake").await;
    b.accept_dialog().await;
    b.until(30, "braked, nothing in flight", "return document.querySelector('#campaign-status').textContent.includes('cancelled') && document.querySelectorAll('table.inflight tbody tr').length === 0").await;
    // the page says what the brake could do; a braked campaign offers no actions
    b.until(
        10,
        "the brake's summary",
        "return !!document.querySelector('#brake-summary') && document.querySelector('#brake-summary').textContent.includes('of 3 in flight stopped')",
    )
    .await;
    b.go(&b.url().await).await;
    b.find("#waves").await;
    assert_eq!(
        b.count("#brake").await,
        0,
        "a braked campaign still offers the brake"
    );
    let (_, tasks) = s.get_json("/api/ota/tasks?limit=100").await;
    let slow: Vec<&Value> = tasks["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["deviceId"].as_str().unwrap().starts_with("SLOW"))
        .collect();
    assert!(!slow.is_empty());
    for t in slow {
        assert_eq!(t["status"], "cancelled", "{t}");
    }

    // one device from its page, the tutorial's flow: current and target version, a live bar
    b.go(&s.url("/devices/FAST0001")).await;
    assert_eq!(b.text_of("#device-version").await, "1.0.1");
    b.click_on("#upgrade-form select[name=version] option[value=\"1.0.2\"]")
        .await;
    b.js("window.__same_page = 'device'", json!([])).await;
    b.click_on("#upgrade-form button[type=submit]").await;
    b.until(
        60,
        "the device's bar ran to completed",
        "return document.querySelector('#device-version').textContent === '1.0.2' && document.querySelector('#live h2 .badge').textContent === 'completed'",
    )
    .await;
    assert_eq!(
        b.js("return window.__same_page", json!([])).await,
        json!("device"),
        "the device page was reloaded"
    );
    assert!(
        b.count("ol.timeline li").await >= 3,
        "the task's timeline is shown"
    );

    // a cross-site form post with olga's session changes nothing
    let target = s.url("/api/ota/firmware/1.0.2/status?deviceType=gateway");
    let (evil, _h) = attacker_page(target).await;
    b.go(&evil).await;
    b.until(
        10,
        "the forged post answered",
        "return location.href.includes('/api/ota/firmware/1.0.2/status')",
    )
    .await;
    let (_, fw) = s.get_json("/api/ota/firmware/1.0.2").await;
    assert_eq!(
        fw["data"]["status"], "released",
        "a cross-site post changed the firmware"
    );

    // a viewer sees no actions, and the server refuses the one she forges
    // (she follows a link that would send her to another site after signing in: she stays)
    b.forget_cookies().await;
    b.go(&s.url("/login?next=/%5Cevil.example")).await;
    sign_in(&b, &s, "vera", "vera's password").await;
    b.until(10, "signed in", "return location.pathname === '/'")
        .await;
    let here = b.url().await;
    assert!(
        here.starts_with(&s.url("/")),
        "sign-in sent the browser to {here}"
    );
    b.go(&campaign).await;
    b.find("#waves").await;
    assert_eq!(b.count("#campaign-actions").await, 0);
    let status = b
        .js_async(
            "const done = arguments[arguments.length - 1];
             fetch('/api/auth/session').then(r => r.json()).then(s =>
               fetch(location.pathname.replace('/campaigns/', '/api/ota/campaigns/') + '/pause',
                 {method: 'POST', headers: {'X-CSRF-Token': s.data.csrfToken}}))
             .then(r => r.json().then(j => done([r.status, j.error])));",
            json!([]),
        )
        .await;
    assert_eq!(status, json!([403, "FORBIDDEN"]));
    // what the engine did by itself is the system's, in the same log
    let (_, log) = s.get_json("/api/audit?actor=system").await;
    let done: Vec<&Value> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "campaign.completed")
        .collect();
    assert_eq!(done.len(), 1, "{log}");
    assert_eq!(done[0]["via"], "system");
    assert_eq!(done[0]["result"], "6 succeeded, 0 failed");
    let (_, log) = s.get_json("/api/audit?actor=vera").await;
    assert_eq!(log["data"][0]["result"], "refused 403", "{log}");
    let _ = Duration::ZERO;
}

/// An admin registers and tags a device, deletes a draft firmware and finds the backup, all
/// from the pages; the campaign form carries a start time and a daily window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_registers_tags_and_tidies_up_from_the_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let s = Server::start().await;
    add_user(&s, "ada", "admin", "ada's password").await;
    s.release("1.0.1", "oven_pk", 1000).await;
    b.go(&s.url("/login")).await;
    sign_in(&b, &s, "ada", "ada's password").await;
    b.until(10, "signed in", "return location.pathname === '/'")
        .await;
    assert_eq!(
        b.count("#backup-link").await,
        1,
        "no backup link for the admin"
    );
    // register a device, its type picked from the known ones
    b.click_on("#register summary").await;
    b.type_in(
        &b.find("#register-form input[name=id]").await,
        "oven_pk/oven-9",
    )
    .await;
    b.click(
        &b.find("#register-form select[name=protocol] option[value=alibaba]")
            .await,
    )
    .await;
    let known = b
        .js(
            "return Array.from(document.querySelectorAll('#known-types option')).map(o => o.value)",
            json!([]),
        )
        .await;
    assert!(
        known.as_array().unwrap().contains(&json!("oven_pk")),
        "{known}"
    );
    b.type_in(
        &b.find("#register-form input[name=deviceType]").await,
        "oven_pk",
    )
    .await;
    b.type_in(
        &b.find("#register-form input[name=secret]").await,
        "oven-secret-9",
    )
    .await;
    b.type_in(&b.find("#register-form input[name=tags]").await, "hall-b")
        .await;
    b.click_on("#register-form button[type=submit]").await;
    b.until(
        10,
        "the device in the table",
        "return document.querySelector('table.devices').textContent.includes('oven_pk/oven-9')",
    )
    .await;
    // tag it from its page
    b.go(&s.url("/devices/oven_pk%2Foven-9")).await;
    b.type_in(&b.find("#tag-form input[name=addTags]").await, "line-7")
        .await;
    b.click_on("#tag-form button[type=submit]").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, d) = s.get_json("/api/ota/devices/oven_pk%2Foven-9").await;
        if d["data"]["tags"] == json!(["hall-b", "line-7"]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a draft firmware goes away from the firmware page
    let up = s
        .post_form(
            reqwest::multipart::Form::new()
                .text("version", "9.9.9")
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(image(500, 9)).file_name("f.bin"),
                ),
        )
        .await;
    assert_eq!(up.status(), 201);
    b.go(&s.url("/firmware")).await;
    b.click_on("tr[data-version=\"9.9.9\"] button.danger").await;
    b.accept_dialog().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get_json("/api/ota/firmware/9.9.9").await.0 != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the draft was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the campaign form has a start time and a daily window, and sends them
    b.go(&s.url("/campaigns/new")).await;
    assert_eq!(b.count("#campaign-form input[name=startAt]").await, 1);
    assert_eq!(b.count("#campaign-form input[name=windowStart]").await, 1);
    assert!(
        b.text_of("#campaign-form")
            .await
            .contains("Pause at failures")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_page_shows_clients_and_manages_application_users() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let acl = files.path().join("acl");
    std::fs::write(&acl, "user historian\ntopic read site/#\n").unwrap();
    let s = Server::start_with(|c| c.mqtt.acl_file = acl.to_string_lossy().into_owned()).await;
    add_user(&s, "ada", "admin", "ada's password").await;
    b.go(&s.url("/login?next=%2Fbroker")).await;
    sign_in(&b, &s, "ada", "ada's password").await;
    b.until(
        10,
        "the broker page",
        "return location.pathname === '/broker'",
    )
    .await;
    // add an application user from the page
    b.click_on("#mqtt-users summary").await;
    b.type_in(
        &b.find("#mqtt-user-form input[name=name]").await,
        "historian",
    )
    .await;
    b.type_in(
        &b.find("#mqtt-user-form input[name=password]").await,
        "historian pw 1",
    )
    .await;
    b.click_on("#mqtt-user-form button[type=submit]").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get_json("/api/mqtt/users").await.1["data"][0]["name"] != "historian" {
        assert!(
            std::time::Instant::now() < deadline,
            "the user was not added"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // it connects and subscribes: the page follows by itself (no reload)
    let mut h = common::mqtt::Device::connect(
        s.mqtt,
        "historian-1",
        Some(("historian", "historian pw 1")),
        None,
    )
    .await;
    h.expect_connected().await;
    h.subscribe("site/#").await;
    b.until(
        15,
        "the client in the table",
        "return document.querySelector('#broker-client-table').textContent.includes('historian-1')",
    )
    .await;
    assert!(b.text_of("#broker-client-table").await.contains("site/#"));
    assert_eq!(b.text_of("#broker-clients").await.trim(), "1");
    if let Some(dir) = shot_dir() {
        b.screenshot(&dir.join("broker.png")).await;
    }
    // delete it from the page: its connection is closed
    b.click_on("#mqtt-user-table button.danger").await;
    b.accept_dialog().await;
    h.expect_closed(10).await;
    assert_eq!(s.get_json("/api/mqtt/users").await.1["data"], json!([]));
}
