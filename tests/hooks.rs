//! The site broker's hooks, called as EMQX 5 and VerneMQ call them: the request bodies are the
//! shapes of those brokers' documentation (EMQX's HTTP authentication/authorization templates,
//! VerneMQ's webhook examples), the answers are checked against the shapes they accept.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "hook-credential-0123456789";
const OVEN: &str = "a1Oven/oven-01";

async fn start() -> (Server, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("hooks.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let path = file.display().to_string();
    let s = Server::start_with(move |c| c.hooks.token_file = path).await;
    s.register("GW1", "gateway", "gw1-secret-1").await;
    s.register("GW2", "gateway", "gw2-secret-2").await;
    s.register(OVEN, "alibaba", "oven-secret").await;
    (s, secrets)
}

/// POSTs `body` to the hook with the hook credential as a bearer token; (status, JSON).
async fn call(s: &Server, hook: &str, body: Value) -> (u16, Value) {
    call_with(s, hook, &body.to_string(), Some(&format!("Bearer {TOKEN}"))).await
}

async fn call_with(s: &Server, hook: &str, body: &str, auth: Option<&str>) -> (u16, Value) {
    let mut r = s
        .client
        .post(s.url(&format!("/hooks/{hook}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    if let Some(h) = hook.strip_prefix("vernemq/") {
        r = r.header("vernemq-hook", h);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn emqx_authn(user: &str, password: &str) -> Value {
    // the body template of EMQX's HTTP authentication, as a site configures it
    json!({"clientid": user, "username": user, "password": password, "peerhost": "10.0.0.7", "cn": ""})
}

fn emqx_authz(user: &str, action: &str, topic: &str) -> Value {
    json!({"clientid": user, "username": user, "peerhost": "10.0.0.7", "proto_name": "MQTT",
           "mountpoint": "", "action": action, "topic": topic, "qos": 1, "retain": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_authentication_and_authorization() {
    let (s, _t) = start().await;
    let (st, b) = call(&s, "emqx/authn", emqx_authn("GW1", "gw1-secret-1")).await;
    assert_eq!(st, 200);
    assert_eq!(b["result"], "allow", "{b}");
    assert_eq!(b["is_superuser"], false);
    let acl = b["acl"].as_array().unwrap();
    assert!(acl.contains(
        &json!({"permission": "allow", "action": "publish", "topic": "eq hanqi/gateway/GW1/report"})
    ));
    assert!(acl.contains(
        &json!({"permission": "allow", "action": "subscribe", "topic": "eq hanqi/gateway/GW1/command"})
    ));
    // an Alibaba device logs in as pk&dn
    let (_, b) = call(
        &s,
        "emqx/authn",
        emqx_authn("a1Oven&oven-01", "oven-secret"),
    )
    .await;
    assert_eq!(b["result"], "allow", "{b}");
    // a wrong secret is refused; a user name that is no device is the site's own account
    assert_eq!(
        call(&s, "emqx/authn", emqx_authn("GW1", "wrong-secret"))
            .await
            .1["result"],
        "deny"
    );
    assert_eq!(
        call(&s, "emqx/authn", emqx_authn("scada", "whatever"))
            .await
            .1["result"],
        "ignore"
    );
    // a body the appliance cannot read: deny, never ignore
    let (st, b) = call_with(
        &s,
        "emqx/authn",
        "{not json",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!((st, &b["result"]), (200, &json!("deny")));

    for (user, action, topic, want) in [
        ("GW1", "publish", "hanqi/gateway/GW1/report", "allow"),
        ("GW1", "subscribe", "hanqi/gateway/GW1/command", "allow"),
        ("GW1", "publish", "hanqi/gateway/GW2/report", "deny"),
        ("GW1", "subscribe", "hanqi/gateway/GW2/command", "deny"),
        ("GW1", "publish", "hanqi/gateway/GW1/command", "deny"),
        ("GW1", "subscribe", "hanqi/gateway/+/command", "deny"),
        ("GW1", "publish", "site/GW1/telemetry", "ignore"),
        ("scada", "subscribe", "#", "deny"),
        ("scada", "subscribe", "hanqi/#", "deny"),
        ("scada", "subscribe", "site/#", "ignore"),
        (
            "scada",
            "publish",
            "/ota/device/upgrade/a1Oven/oven-01",
            "deny",
        ),
        (
            "a1Oven&oven-01",
            "publish",
            "/ota/device/inform/a1Oven/oven-01",
            "allow",
        ),
        (
            "a1Oven&oven-01",
            "subscribe",
            "/ota/device/upgrade/a1Oven/oven-01",
            "allow",
        ),
        ("GW1", "all", "site/x", "deny"),
    ] {
        let (st, b) = call(&s, "emqx/authz", emqx_authz(user, action, topic)).await;
        assert_eq!(st, 200);
        assert_eq!(b["result"], want, "{user} {action} {topic}: {b}");
    }
    let (_, b) = call_with(&s, "emqx/authz", "[]", Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(b["result"], "deny");
    assert!(
        s.metric("hangar_hook_decisions_total{result=\"deny\"}")
            .await
            >= 8.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vernemq_webhooks() {
    let (s, _t) = start().await;
    // the bodies of VerneMQ's webhook documentation
    let register = |user: &str, pass: &str| {
        json!({"peer_addr": "127.0.0.1", "peer_port": 8888, "username": user, "password": pass,
               "mountpoint": "", "client_id": user, "clean_session": false})
    };
    let ok = json!({"result": "ok"});
    let next = json!({"result": "next"});
    let refused = json!({"result": {"error": "not_allowed"}});
    let hook = "vernemq/auth_on_register";
    assert_eq!(call(&s, hook, register("GW1", "gw1-secret-1")).await.1, ok);
    assert_eq!(
        call(&s, hook, register("GW1", "nope-nope")).await.1,
        refused
    );
    assert_eq!(call(&s, hook, register("scada", "x")).await.1, next);
    let tok = format!("Bearer {TOKEN}");
    assert_eq!(call_with(&s, hook, "{", Some(&tok)).await.1, refused);

    let subscribe = |user: &str, topics: &[&str]| {
        json!({"client_id": user, "mountpoint": "", "username": user,
               "topics": topics.iter().map(|t| json!({"topic": t, "qos": 1})).collect::<Vec<_>>()})
    };
    let hook = "vernemq/auth_on_subscribe";
    assert_eq!(
        call(&s, hook, subscribe("GW1", &["hanqi/gateway/GW1/command"]))
            .await
            .1,
        ok
    );
    assert_eq!(
        call(
            &s,
            hook,
            subscribe("GW1", &["hanqi/gateway/GW1/command", "hanqi/#"])
        )
        .await
        .1,
        refused
    );
    assert_eq!(call(&s, hook, subscribe("scada", &["#"])).await.1, refused);
    assert_eq!(
        call(&s, hook, subscribe("scada", &["site/+/telemetry"]))
            .await
            .1,
        next
    );

    let publish = |user: &str, topic: &str| {
        json!({"username": user, "client_id": user, "mountpoint": "", "qos": 1, "topic": topic,
               "payload": "e30=", "retain": false})
    };
    let hook = "vernemq/auth_on_publish";
    assert_eq!(
        call(&s, hook, publish("GW1", "hanqi/gateway/GW1/report"))
            .await
            .1,
        ok
    );
    assert_eq!(
        call(&s, hook, publish("GW2", "hanqi/gateway/GW1/report"))
            .await
            .1,
        refused
    );
    assert_eq!(
        call(&s, hook, publish("GW2", "site/GW2/telemetry")).await.1,
        next
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_need_their_own_credential_and_follow_the_registry() {
    let (s, _t) = start().await;
    let body = emqx_authn("GW1", "gw1-secret-1").to_string();
    // no credential, a wrong one, the admin token: 401
    for auth in [
        None,
        Some("Bearer not-the-hook-credential".to_string()),
        Some(s.auth()),
    ] {
        let (st, b) = call_with(&s, "emqx/authn", &body, auth.as_deref()).await;
        assert_eq!(st, 401, "{auth:?}: {b}");
        assert_ne!(b["result"], "allow");
    }
    // Basic (any user, the credential as password) and ?token= work too
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("emqx:{TOKEN}")
        )
    );
    assert_eq!(
        call_with(&s, "emqx/authn", &body, Some(&basic)).await.1["result"],
        "allow"
    );
    let r = s
        .client
        .post(s.url(&format!("/hooks/vernemq/auth_on_register?token={TOKEN}")))
        .body(
            json!({"username": "GW1", "password": "gw1-secret-1", "client_id": "GW1"}).to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"result": "ok"}));

    // a deleted device is no longer let in (within the decision cache's 2 s)
    let (st, b) = s.delete_json("/api/ota/devices/GW1").await;
    assert_eq!(st, 200, "{b}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = call(&s, "emqx/authn", emqx_authn("GW1", "gw1-secret-1")).await;
        if b["result"] != "allow" {
            assert_eq!(
                b["result"], "ignore",
                "no longer a device: the site's own chain decides"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still allowed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, b) = call(
        &s,
        "emqx/authz",
        emqx_authz("GW1", "publish", "hanqi/gateway/GW1/report"),
    )
    .await;
    assert_ne!(b["result"], "allow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_are_off_without_a_credential_file() {
    let s = Server::start().await;
    let (st, _) = call(&s, "emqx/authn", emqx_authn("x", "y")).await;
    assert_eq!(st, 404);
}
