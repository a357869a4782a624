//! The site's broker: general traffic beside OTA, with stock clients (rumqttc, mosquitto_pub
//! and mosquitto_sub, the Eclipse Paho interoperability suite) and a raw client for what they
//! will not do on demand.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mqtt::{Device, Seen};
use common::raw::{self, Raw};
use common::{Appliance, Proc, Server, tool};
use serde_json::json;

/// Writes `text` as an acl file in `dir`.
fn acl_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("acl");
    std::fs::write(&p, text).unwrap();
    p
}

/// The in-process appliance with these acl lines, anonymous clients allowed.
async fn open_broker(
    acl: &str,
    tweak: impl FnOnce(&mut hangar::config::Config),
) -> (Server, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let acl = acl_file(files.path(), acl);
    let s = Server::start_with(|c| {
        c.mqtt.allow_anonymous = true;
        c.mqtt.acl_file = acl.to_string_lossy().into_owned();
        tweak(c);
    })
    .await;
    (s, files)
}

/// `mosquitto_pub`/`mosquitto_sub` on the broker at `port` with a login, then `args`:
/// (success, output).
async fn mosq(program: &Path, port: u16, login: (&str, &str), args: &[&str]) -> (bool, String) {
    let port = port.to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-u", login.0, "-P", login.1];
    all.extend_from_slice(args);
    run(program, &all).await
}

/// [`mosq`], which must succeed; its output.
async fn mosq_ok(program: &Path, port: u16, login: (&str, &str), args: &[&str]) -> String {
    let (ok, out) = mosq(program, port, login, args).await;
    assert!(ok, "{args:?}: {out}");
    out
}

/// Runs a stock command line, returning (success, stdout).
async fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paho_interoperability_suite_passes_all_ten() {
    let Some(python) = tool("python3", "python3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let acl = acl_file(
        dir.path(),
        "topic deny test/nosubscribe\ntopic readwrite #\n",
    );
    let p = Proc::spawn_with(
        dir.path(),
        "",
        &format!("allow_anonymous = true\nacl_file = {:?}\n", acl),
        [0; 4],
    )
    .await;
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho");
    let out = tokio::process::Command::new(python)
        .arg(suite.join("run_v311.py"))
        .args(["127.0.0.1", &p.mqtt.to_string()])
        .env("PYTHONPATH", &suite)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("RESULT ran=10 failures=0 errors=0"),
        "the Paho suite:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_persistent_sessions_survive_kill_9() {
    let (Some(sub), Some(publ)) = (
        tool("mosquitto_sub", "mosquitto-clients"),
        tool("mosquitto_pub", "mosquitto-clients"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let acl = acl_file(
        dir.path(),
        "user app\ntopic readwrite k/#\ntopic readwrite r/#\n",
    );
    let mut a = Appliance::start_with(dir.path(), "", &format!("acl_file = {acl:?}\n")).await;
    let (st, b) = a
        .call(
            "POST",
            "/api/mqtt/users",
            Some(json!({"name": "app", "password": "app-secret-1"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let app = ("app", "app-secret-1");
    let port = a.running().mqtt;
    // a persistent session subscribes, then goes away
    let keeper = ["-i", "keeper", "-c", "-q", "1", "-t", "k/#"];
    mosq_ok(&sub, port, app, &[&keeper[..], &["-E"]].concat()).await;
    // every publish below returns after its PUBACK (QoS 1) or PUBCOMP (QoS 2)
    for i in 1..=20 {
        let (t, m) = (format!("r/{i}"), format!("retained {i}"));
        mosq_ok(&publ, port, app, &["-q", "1", "-r", "-t", &t, "-m", &m]).await;
    }
    for i in 1..=50 {
        let (t, m) = (format!("k/{i}"), format!("queued {i}"));
        mosq_ok(&publ, port, app, &["-q", "1", "-t", &t, "-m", &m]).await;
    }
    let last = ["-q", "2", "-t", "k/last", "-m", "exactly once"];
    mosq_ok(&publ, port, app, &last).await;

    a.kill_and_restart().await;

    let port = a.running().mqtt;
    let out = mosq_ok(
        &sub,
        port,
        app,
        &["-t", "r/#", "-C", "20", "-W", "20", "-v"],
    )
    .await;
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<String> = (1..=20).map(|i| format!("r/{i} retained {i}")).collect();
    want.sort();
    assert_eq!(got, want);
    let out = mosq_ok(
        &sub,
        port,
        app,
        &[&keeper[..], &["-C", "51", "-W", "20", "-v"]].concat(),
    )
    .await;
    let want: Vec<String> = (1..=50)
        .map(|i| format!("k/{i} queued {i}"))
        .chain(["k/last exactly once".to_string()])
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "in order, none lost");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_is_exactly_once_across_reconnects() {
    let (s, _files) = open_broker("topic readwrite #\n", |_| {}).await;
    let (mut watcher, _) = Raw::connect(s.mqtt, "watcher", true, None).await;
    watcher.send(&raw::subscribe(1, &[("q2/#", 2)])).await;
    assert_eq!(watcher.next_of(9, 10).await.body, vec![0, 1, 2]);

    // a publisher's PUBLISH arrives, the PUBREC is lost with the connection: it sends the
    // PUBLISH again (DUP) on a resumed session, then PUBREL
    let (mut p, ack) = Raw::connect(s.mqtt, "pub", false, None).await;
    assert_eq!(ack, [0, 0]);
    p.send(&raw::publish("q2/a", b"one", 2, 7, false, false))
        .await;
    assert_eq!(p.next_of(5, 10).await.id(), 7, "PUBREC");
    drop(p);
    let (mut p, ack) = Raw::connect(s.mqtt, "pub", false, None).await;
    assert_eq!(ack, [1, 0], "session present");
    p.send(&raw::publish("q2/a", b"one", 2, 7, false, true))
        .await;
    assert_eq!(p.next_of(5, 10).await.id(), 7, "PUBREC again");
    p.send(&raw::ack(raw::PUBREL, 7)).await;
    assert_eq!(p.next_of(7, 10).await.id(), 7, "PUBCOMP");
    p.send(&raw::publish("q2/a", b"marker", 1, 8, false, false))
        .await;

    // (the marker may arrive while "one"'s handshake is still going: every packet is handled
    // as it comes)
    let (mut seen, mut released) = (Vec::new(), Vec::new());
    loop {
        let g = watcher.next(10).await.expect("connection closed");
        match g.kind() {
            6 => {
                released.push(g.id());
                watcher.send(&raw::ack(raw::PUBCOMP, g.id())).await;
                continue;
            }
            3 => {}
            _ => continue,
        }
        let (_, qos, pkid, payload, ..) = g.publish();
        match qos {
            1 => watcher.send(&raw::ack(raw::PUBACK, pkid)).await,
            2 => watcher.send(&raw::ack(raw::PUBREC, pkid)).await,
            _ => {}
        }
        if payload == b"marker" {
            break;
        }
        seen.push(String::from_utf8(payload).unwrap());
    }
    assert_eq!(seen, ["one"], "routed once");
    if released.is_empty() {
        // the PUBREL for "one" comes after the marker
        let rel = watcher.next_of(6, 10).await;
        watcher.send(&raw::ack(raw::PUBCOMP, rel.id())).await;
    }

    // a subscriber acknowledges the first half (PUBREC) and loses its connection: on its
    // resumed session it gets the PUBREL, not the message again
    let (mut sub, _) = Raw::connect(s.mqtt, "sub", false, None).await;
    sub.send(&raw::subscribe(1, &[("q2/#", 2)])).await;
    sub.next_of(9, 10).await;
    p.send(&raw::publish("q2/b", b"two", 2, 9, false, false))
        .await;
    let g = sub.next_of(3, 10).await;
    let (topic, qos, pkid, payload, dup, _) = g.publish();
    assert_eq!(
        (topic.as_str(), qos, &payload[..], dup),
        ("q2/b", 2, &b"two"[..], false)
    );
    sub.send(&raw::ack(raw::PUBREC, pkid)).await;
    let rel = sub.next_of(6, 10).await;
    assert_eq!(rel.id(), pkid);
    drop(sub); // no PUBCOMP
    let (mut sub, ack) = Raw::connect(s.mqtt, "sub", false, None).await;
    assert_eq!(ack, [1, 0]);
    let again = sub.next(10).await.unwrap();
    assert_eq!(
        (again.first, again.id()),
        (raw::PUBREL, pkid),
        "PUBREL again, not the PUBLISH"
    );
    sub.send(&raw::ack(raw::PUBCOMP, pkid)).await;
    p.send(&raw::publish("q2/b", b"marker", 1, 10, false, false))
        .await;
    let g = sub.next_of(3, 10).await;
    assert_eq!(g.publish().3, b"marker", "and nothing twice");

    // a subscriber that never acknowledged: the message comes again, marked DUP
    let (mut sub2, _) = Raw::connect(s.mqtt, "sub2", false, None).await;
    sub2.send(&raw::subscribe(1, &[("q2/#", 1)])).await;
    sub2.next_of(9, 10).await;
    p.send(&raw::publish("q2/c", b"three", 1, 11, false, false))
        .await;
    let first = sub2.next_of(3, 10).await.publish();
    drop(sub2);
    let (mut sub2, _) = Raw::connect(s.mqtt, "sub2", false, None).await;
    let again = sub2.next_of(3, 10).await.publish();
    assert_eq!((again.2, &again.3, again.4), (first.2, &first.3, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_patterns_with_user_name_and_client_id() {
    let acl = "\
# nothing for anonymous clients
pattern readwrite site/%u/#
pattern read commands/%c
user historian
topic read site/#
user scada
topic write commands/#
";
    let (s, _files) = open_broker(acl, |c| c.mqtt.allow_anonymous = false).await;
    for u in ["historian", "scada", "alice", "bob"] {
        let (st, b) = s
            .post_json(
                "/api/mqtt/users",
                json!({"name": u, "password": format!("{u}-pw-1")}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
    }
    let mut historian =
        Device::connect(s.mqtt, "h1", Some(("historian", "historian-pw-1")), None).await;
    historian.expect_connected().await;
    historian.subscribe("site/#").await;
    historian.expect_subscribe_refused("commands/#").await;

    let mut alice = Device::connect(s.mqtt, "line-3", Some(("alice", "alice-pw-1")), None).await;
    alice.expect_connected().await;
    // %u: her own subtree only
    alice
        .publish_refused("site/bob/temp", json!({"t": 1}))
        .await;
    alice.publish("site/alice/temp", json!({"t": 2})).await;
    let (topic, body) = historian.message(10).await;
    assert_eq!(
        (topic.as_str(), &body),
        ("site/alice/temp", &json!({"t": 2}))
    );
    alice.subscribe("site/alice/#").await;
    alice.expect_subscribe_refused("site/bob/#").await;
    // %c: commands to her client id, sent by scada
    alice.subscribe("commands/line-3").await;
    alice.expect_subscribe_refused("commands/line-4").await;
    let scada = Device::connect(s.mqtt, "scada", Some(("scada", "scada-pw-1")), None).await;
    scada
        .publish("commands/line-3", json!({"stop": true}))
        .await;
    loop {
        let (topic, body) = alice.message(10).await;
        if topic == "commands/line-3" {
            assert_eq!(body, json!({"stop": true}));
            break;
        }
    }
    // a user name or client id with a wildcard gets no pattern (it could widen its own)
    let mut sneaky = Device::connect(s.mqtt, "#", Some(("bob", "bob-pw-1")), None).await;
    sneaky.expect_connected().await;
    sneaky.expect_subscribe_refused("commands/#").await;
    // a wrong password, an unknown user, no credentials: refused at CONNECT
    for (id, creds) in [
        ("w1", Some(("alice", "wrong"))),
        ("w2", Some(("mallory", "x"))),
        ("w3", None),
    ] {
        let mut d = Device::connect(s.mqtt, id, creds, None).await;
        match d.next(10).await {
            Seen::Connected(c) => assert_ne!(c, rumqttc::ConnectReturnCode::Success, "{id}"),
            Seen::Closed(_) => {}
            other => panic!("{id}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_password_file_and_acl_file_work_unchanged() {
    let (Some(passwd), Some(sub), Some(publ)) = (
        tool("mosquitto_passwd", "mosquitto"),
        tool("mosquitto_sub", "mosquitto-clients"),
        tool("mosquitto_pub", "mosquitto-clients"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd").to_string_lossy().into_owned();
    for (create, user, secret) in [
        (true, "historian", "hist-secret"),
        (false, "gw-app", "gw-app-secret"),
    ] {
        let args = [&["-c"][..(create as usize)], &["-b", &pw, user, secret]].concat();
        let (ok, out) = run(&passwd, &args).await;
        assert!(ok, "{out}");
    }
    // the ACL a site's mosquitto has: user lines and a pattern
    let acl = acl_file(
        dir.path(),
        "# site ACL\nuser historian\ntopic read plant/#\n\nuser gw-app\ntopic write plant/line1/#\npattern write clients/%c/status\n",
    );
    let p = Proc::spawn_with(
        dir.path(),
        "",
        &format!("password_file = {pw:?}\nacl_file = {acl:?}\n"),
        [0; 4],
    )
    .await;
    let port = p.mqtt;
    let listener = tokio::spawn({
        let sub = sub.clone();
        async move {
            let args = ["-t", "plant/#", "-C", "1", "-W", "20", "-v"];
            mosq_ok(&sub, port, ("historian", "hist-secret"), &args).await
        }
    });
    // the subscriber is ready when the broker lists its subscription
    let c = reqwest::Client::new();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let api = |path: &str| {
        c.get(format!("http://127.0.0.1:{}{path}", p.http))
            .bearer_auth(token.trim())
    };
    loop {
        let v: serde_json::Value = api("/api/mqtt/clients?kind=user")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"][0]["subscriptions"][0]["filter"] == "plant/#" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gw = ("gw-app", "gw-app-secret");
    mosq_ok(
        &publ,
        port,
        gw,
        &["-q", "1", "-t", "plant/line1/temp", "-m", "21.5"],
    )
    .await;
    assert_eq!(listener.await.unwrap().trim(), "plant/line1/temp 21.5");

    // a wrong password is refused the way mosquitto_pub reports it
    let (ok, out) = mosq(
        &publ,
        port,
        ("historian", "nope"),
        &["-t", "plant/x", "-m", "1"],
    )
    .await;
    assert!(!ok, "{out}");
    // the file's users are listed, and cannot be deleted through the API
    let list: serde_json::Value = api("/api/mqtt/users")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["data"][0],
        json!({"name": "gw-app", "source": "password_file", "createdAt": null})
    );
    let r = c
        .delete(format!(
            "http://127.0.0.1:{}/api/mqtt/users/historian",
            p.http
        ))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    // SIGHUP reloads both files: a new user and a new ACL line work without a restart
    let (ok, out) = run(&passwd, &["-b", &pw, "late", "late-secret"]).await;
    assert!(ok, "{out}");
    std::fs::write(&acl, "user late\ntopic readwrite late/#\n").unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(p.pid(), libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // mosquitto_sub -E exits 0 once its subscription is granted
    while !mosq(&sub, port, ("late", "late-secret"), &["-t", "late/#", "-E"])
        .await
        .0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload never took"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ota_topics_stay_closed_to_applications() {
    let (s, _files) = open_broker("user app\ntopic readwrite #\n", |c| {
        c.mqtt.allow_anonymous = false
    })
    .await;
    let (st, b) = s
        .post_json(
            "/api/mqtt/users",
            json!({"name": "app", "password": "app-pw-123"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut app = Device::connect(s.mqtt, "app", Some(("app", "app-pw-123")), None).await;
    app.expect_connected().await;
    app.subscribe("#").await;
    // no ACL line opens a device's OTA topics, exactly or by the OTA namespace's wildcards
    for f in [
        "hanqi/gateway/GW1/command",
        "hanqi/gateway/+/command",
        "hanqi/gateway/GW1/report",
        "/ota/device/upgrade/pk1/dn1",
        "/sys/pk1/dn1/thing/ota/firmware/get_reply",
    ] {
        app.expect_subscribe_refused(f).await;
    }
    let mut gw = Device::connect(s.mqtt, "gw1", Some(("GW1", "gw1-secret")), None).await;
    gw.expect_connected().await;
    gw.subscribe("hanqi/gateway/GW1/command").await;
    // a forged command is dropped
    app.publish_refused(
        "hanqi/gateway/GW1/command",
        json!({"msgType": "ota_upgrade"}),
    )
    .await;
    // a real upgrade: the command and the device's reports never reach the `#` subscriber
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (topic, cmd) = gw.message(10).await;
    assert_eq!(
        (topic.as_str(), cmd["msgType"].as_str()),
        ("hanqi/gateway/GW1/command", Some("ota_upgrade"))
    );
    gw.publish(
        "hanqi/gateway/GW1/report",
        json!({"msgType":"ota_progress","msgId":cmd["msgId"],"data":{"state":"downloading","progress":10}}),
    )
    .await;
    s.wait_task("GW1", |t| t["progress"] == 10).await;
    // the device's general traffic is the ACL's business (its %u, here: no lines for it)
    gw.publish_refused("site/GW1/telemetry", json!({"t": 1}))
        .await;
    // the first thing `#` sees is the marker published after all of it
    app.publish("after/all", json!({"marker": true})).await;
    let (topic, _) = app.message(10).await;
    assert_eq!(topic, "after/all");
    let (_, clients) = s.get_json("/api/mqtt/clients").await;
    let kinds: Vec<&str> = clients["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["user", "device"], "{clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_users_through_the_api_and_the_cli() {
    let (s, files) = open_broker("user app\ntopic readwrite app/#\n", |c| {
        c.mqtt.allow_anonymous = false
    })
    .await;
    let (st, b) = s
        .post_json(
            "/api/mqtt/users",
            json!({"name": "app", "password": "app-pw-123"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["source"], "hangar");
    for (body, status) in [
        (json!({"name": "app", "password": "x"}), 409),
        (json!({"name": "bad name", "password": "x"}), 400),
        (json!({"name": "a+b", "password": "x"}), 400),
        (json!({"name": "ok", "password": ""}), 400),
        (json!({"name": "ok"}), 400),
    ] {
        let (st, b) = s.post_json("/api/mqtt/users", body.clone()).await;
        assert_eq!(st, status, "{body}: {b}");
        assert_eq!(b["status"], false);
    }
    // the CLI, with the password from a file
    let pw = files.path().join("pw");
    std::fs::write(&pw, "cli-pw-1234\n").unwrap();
    let (ok, out, err) = s.cli(&[
        "mqtt-user",
        "add",
        "viacli",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = s.cli(&["mqtt-user", "list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "viacli"]);
    let mut d = Device::connect(s.mqtt, "v", Some(("viacli", "cli-pw-1234")), None).await;
    d.expect_connected().await;
    // deleting a user closes its connections and refuses its next login
    let mut app = Device::connect(s.mqtt, "app-1", Some(("app", "app-pw-123")), None).await;
    app.expect_connected().await;
    let (st, _) = s.delete_json("/api/mqtt/users/app").await;
    assert_eq!(st, 200);
    app.expect_closed(10).await;
    let mut again = Device::connect(s.mqtt, "app-2", Some(("app", "app-pw-123")), None).await;
    match again.next(10).await {
        Seen::Connected(c) => assert_ne!(c, rumqttc::ConnectReturnCode::Success),
        Seen::Closed(_) => {}
        other => panic!("{other:?}"),
    }
    let (st, _) = s.delete_json("/api/mqtt/users/app").await;
    assert_eq!(st, 404);
    let (ok, _, err) = s.cli(&["mqtt-user", "delete", "viacli"]);
    assert!(ok, "{err}");
    // both changes are in the audit log
    let (_, audit) = s.get_json("/api/audit?action=mqtt_user.").await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"mqtt_user.add") && actions.contains(&"mqtt_user.delete"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_counted_and_bounded() {
    let (s, _files) = open_broker("topic readwrite #\n", |c| {
        c.mqtt.max_retained_messages = 100;
        c.mqtt.max_queued_messages = 50;
        c.mqtt.max_subscriptions_per_client = 1000;
    })
    .await;
    let dropped =
        |reason: &str| format!("hangar_mqtt_messages_dropped_total{{reason=\"{reason}\"}}");

    // a subscription storm: 10,000 filters in one SUBSCRIBE; 1,000 are granted
    let (mut storm, _) = Raw::connect(s.mqtt, "storm", true, None).await;
    let filters: Vec<String> = (0..10_000).map(|i| format!("storm/{i}")).collect();
    let asked: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 0)).collect();
    storm.send(&raw::subscribe(1, &asked)).await;
    let suback = storm.next_of(9, 10).await;
    let codes = &suback.body[2..];
    assert_eq!(codes.len(), 10_000);
    assert!(codes[..1000].iter().all(|c| *c == 0) && codes[1000..].iter().all(|c| *c == 0x80));
    assert_eq!(s.metric(&dropped("subscription_limit")).await, 9000.0);

    // a retained flood: beyond the limit, delivered but not retained
    let (mut flood, _) = Raw::connect(s.mqtt, "flood", true, None).await;
    for i in 0..150u16 {
        flood
            .send(&raw::publish(
                &format!("ret/{i}"),
                b"r",
                1,
                i + 1,
                true,
                false,
            ))
            .await;
    }
    for _ in 0..150 {
        flood.next_of(4, 10).await;
    }
    assert_eq!(s.metric("hangar_mqtt_retained").await, 100.0);
    assert_eq!(s.metric(&dropped("retained_limit")).await, 50.0);

    // a subscriber that never reads its QoS 1 queue: the publisher and another subscriber are
    // not held back, and what the slow one is owed stays bounded
    let (mut slow, _) = Raw::connect(s.mqtt, "slow", true, None).await;
    slow.send(&raw::subscribe(1, &[("burst/#", 1)])).await;
    slow.next_of(9, 10).await;
    let (mut fast, _) = Raw::connect(s.mqtt, "fast", true, None).await;
    fast.send(&raw::subscribe(1, &[("burst/#", 0)])).await;
    fast.next_of(9, 10).await;
    let payload = vec![b'x'; 1000];
    for i in 0..500u16 {
        flood
            .send(&raw::publish("burst/x", &payload, 1, i + 1, false, false))
            .await;
    }
    for _ in 0..500 {
        flood.next_of(4, 10).await;
    }
    for _ in 0..500 {
        fast.next_of(3, 10).await;
    }
    // 20 in flight (never acknowledged) + 50 queued at most
    assert!(s.metric(&dropped("queue_full")).await >= 430.0);
    assert!(s.metric("hangar_mqtt_queued").await <= 70.0);

    // malformed general traffic closes the offender only: QoS 3, a wildcard topic, packet id 0
    for bad in [
        raw::frame(0x36, b"\x00\x01a\x00\x01x"),
        raw::publish("a/+", b"x", 0, 0, false, false),
        raw::publish("a/b", b"x", 1, 0, false, false),
        raw::frame(0x30, b"\x00\x02\xff\xfex"),
    ] {
        let (mut r, _) = Raw::connect(s.mqtt, "bad", true, None).await;
        r.send(&bad).await;
        assert!(r.next(10).await.is_none(), "{bad:?} was accepted");
    }
    flood
        .send(&raw::publish("still/alive", b"x", 1, 999, false, false))
        .await;
    assert_eq!(flood.next_of(4, 10).await.id(), 999);

    // a stranger with a device's client id gets a session of its own; the device keeps its
    s.register("GW1", "gateway", "gw1-secret").await;
    let mut gw = Device::connect(s.mqtt, "gw1-main", Some(("GW1", "gw1-secret")), None).await;
    gw.expect_connected().await;
    gw.subscribe("hanqi/gateway/GW1/command").await;
    let (mut stranger, ack) = Raw::connect(s.mqtt, "gw1-main", true, None).await;
    assert_eq!(ack, [0, 0]);
    stranger.send(&raw::subscribe(1, &[("x", 0)])).await;
    stranger.next_of(9, 10).await;
    s.release("1.0.2", "gateway", 1000).await;
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (topic, _) = gw.message(10).await;
    assert_eq!(topic, "hanqi/gateway/GW1/command");
    assert_eq!(s.metric("hangar_mqtt_session_takeovers_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_in_parallel_leave_a_working_client_alone() {
    let (s, _files) = open_broker("topic readwrite #\n", |_| {}).await;
    let (mut sub, _) = Raw::connect(s.mqtt, "steady-sub", true, None).await;
    sub.send(&raw::subscribe(1, &[("steady/#", 1)])).await;
    sub.next_of(9, 10).await;
    let port = s.mqtt;
    // 40 hostile clients at once: garbage, half packets, subscription storms, oversized frames
    let mut hostile = Vec::new();
    for i in 0..40u32 {
        hostile.push(tokio::spawn(async move {
            let (mut r, _) = Raw::connect(port, &format!("h{i}"), true, None).await;
            match i % 4 {
                0 => r.send(&[0xff; 64]).await,
                1 => r.send(&raw::frame(0x30, &[0; 10])[..5]).await,
                2 => {
                    let filters: Vec<String> = (0..3000).map(|j| format!("s/{i}/{j}")).collect();
                    let asked: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 1)).collect();
                    r.send(&raw::subscribe(1, &asked)).await;
                }
                _ => r.send(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await,
            }
            r
        }));
    }
    let (mut p, _) = Raw::connect(s.mqtt, "steady-pub", true, None).await;
    for i in 1..=200u16 {
        p.send(&raw::publish(
            "steady/x",
            &i.to_be_bytes(),
            1,
            i,
            false,
            false,
        ))
        .await;
    }
    for i in 1..=200u16 {
        assert_eq!(p.next_of(4, 10).await.id(), i);
        let (_, _, pkid, payload, ..) = sub.next_of(3, 10).await.publish();
        assert_eq!(payload, i.to_be_bytes());
        sub.send(&raw::ack(raw::PUBACK, pkid)).await;
    }
    for h in hostile {
        h.await.unwrap();
    }
    assert!(
        s.metric("hangar_mqtt_messages_dropped_total{reason=\"protocol_error\"}")
            .await
            >= 20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reaches_an_application_while_a_campaign_upgrades_the_same_devices() {
    let acl = "pattern write site/%u/telemetry\nuser historian\ntopic read site/+/telemetry\n";
    let (s, _files) = open_broker(acl, |c| c.mqtt.allow_anonymous = false).await;
    let (st, b) = s
        .post_json(
            "/api/mqtt/users",
            json!({"name": "historian", "password": "hist-pw-1"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    s.release("1.0.2", "gateway", 50_000).await;
    let mut hist =
        Device::connect(s.mqtt, "historian", Some(("historian", "hist-pw-1")), None).await;
    hist.expect_connected().await;
    hist.subscribe("site/+/telemetry").await;
    let n = 5;
    let _sim = s.sim(&[
        "--devices",
        &n.to_string(),
        "--version",
        "1.0.1",
        "--register",
        "--id-prefix",
        "TEL",
        "--telemetry",
        "0.2",
        "--timeout",
        "120",
    ]);
    s.wait_online(n).await;
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "telemetry", "deviceType": "gateway", "version": "1.0.2", "targets": {"all": true}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    // telemetry flows before, during and after the upgrade: each device is heard on 1.0.1 and,
    // on the same connection's successor, on 1.0.2
    let mut before = std::collections::BTreeSet::new();
    let mut after = std::collections::BTreeSet::new();
    while after.len() < n {
        let (topic, body) = hist.message(30).await;
        let device = body["device"].as_str().unwrap().to_string();
        assert_eq!(topic, format!("site/{device}/telemetry"));
        match body["version"].as_str().unwrap() {
            "1.0.1" => before.insert(device),
            "1.0.2" => after.insert(device),
            v => panic!("version {v}"),
        };
    }
    assert_eq!(before.len(), n, "{before:?}");
    s.wait_campaign(&id, 60, |c| c["status"] == "completed")
        .await;
}

/// A site CA: its PEM and an issuer for client certificates.
fn site_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(p, key))
}

/// A client certificate with this CN: (certificate PEM, key PEM).
fn client_cert(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, cn: &str) -> (String, String) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_identities_for_mqtts_and_downloads() {
    use common::mqtt::tls_config_with_cert;
    let files = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = site_ca("Site CA");
    let ca = files.path().join("site-ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let acl = acl_file(
        files.path(),
        "pattern write site/%u/#\nuser historian\ntopic read site/#\n",
    );
    let s = Server::start_with(|c| {
        c.mqtt.require_certificate = true;
        c.mqtt.use_identity_as_username = true;
        c.mqtt.client_ca_file = ca.to_string_lossy().into_owned();
        c.mqtt.acl_file = acl.to_string_lossy().into_owned();
    })
    .await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let img = s.release("1.0.2", "gateway", 30_000).await;
    let data = s.dir.path();
    let (gw_cert, gw_key) = client_cert(&issuer, "GW1");
    let (h_cert, h_key) = client_cert(&issuer, "historian");

    // the device: its certificate is its login (no user name, no password)
    let mut gw = Device::connect_with(
        s.mqtts,
        "gw1",
        None,
        Some(tls_config_with_cert(data, &gw_cert, &gw_key)),
    )
    .await;
    gw.expect_connected().await;
    gw.subscribe("hanqi/gateway/GW1/command").await;
    let mut hist = Device::connect_with(
        s.mqtts,
        "hist",
        None,
        Some(tls_config_with_cert(data, &h_cert, &h_key)),
    )
    .await;
    hist.expect_connected().await;
    hist.subscribe("site/#").await;
    gw.publish("site/GW1/state", json!({"ok": true})).await;
    let (topic, _) = hist.message(10).await;
    assert_eq!(topic, "site/GW1/state");
    let (_, clients) = s.get_json("/api/mqtt/clients").await;
    let who: Vec<(String, String)> = clients["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().into(),
                c["identity"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("device".into(), "GW1".into()),
            ("user".into(), "historian".into())
        ]
    );
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (_, cmd) = gw.message(10).await;
    assert_eq!(cmd["msgType"], "ota_upgrade");

    // no certificate, or one of another CA: the handshake fails
    let mut bare = Device::connect(s.mqtts, "bare", Some(("GW1", "gw1-secret")), Some(data)).await;
    assert!(matches!(bare.next(10).await, Seen::Closed(_)));
    let (_, other) = site_ca("Another CA");
    let (o_cert, o_key) = client_cert(&other, "GW1");
    let mut forged = Device::connect_with(
        s.mqtts,
        "forged",
        None,
        Some(tls_config_with_cert(data, &o_cert, &o_key)),
    )
    .await;
    assert!(matches!(forged.next(10).await, Seen::Closed(_)));
    // plain MQTT keeps password logins
    let mut plain = Device::connect(s.mqtt, "plain", Some(("GW1", "gw1-secret")), None).await;
    plain.expect_connected().await;

    // HTTPS downloads: the device's certificate instead of a signed URL, for its device type
    let https = |cert: &str, key: &str| {
        let pem = std::fs::read(data.join("certs/ca.pem")).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
            .build()
            .unwrap()
    };
    let url = format!("{}/firmware/gateway_v1.0.2.bin", s.base);
    let r = https(&gw_cert, &gw_key).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), img);
    let r = https(&h_cert, &h_key).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "a user's certificate is not a device's");
    s.post_json("/api/ota/devices", json!({"id": "CAM1", "deviceType": "camera", "protocol": "gateway", "secret": "cam-secret-1"}))
        .await;
    let (c_cert, c_key) = client_cert(&issuer, "CAM1");
    let r = https(&c_cert, &c_key).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 403, "another device type's image");
    let r = common::client_for(data, false)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no certificate, no token");
}
