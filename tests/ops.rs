//! Operations: Prometheus metrics (behind the token on HTTPS, and on the optional loopback
//! listener), and a walk over every route of the router source checking that nothing but
//! `/healthz` answers without credentials.

mod common;

use std::time::Duration;

use common::Server;
use hangar::config::Listen;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_behind_the_token() {
    let s = Server::start_with(|c| c.metrics.listen = Listen::loopback_any_port()).await;
    s.release("1.0.1", "gateway", 10_000).await;
    s.register("GW1", "gateway", "secret-123").await;
    let dev = common::mqtt::Device::connect(s.mqtt, "c1", Some(("GW1", "secret-123")), None).await;
    // a download and a refused request, so the counters move
    let r = s
        .client
        .get(s.url("/firmware/gateway_v1.0.1.bin"))
        .header("authorization", s.auth())
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let _ = r.bytes().await;
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // a PATCH is counted under its own name
    let r = s
        .client
        .patch(s.url("/api/users/nobody"))
        .header("authorization", s.auth())
        .json(&serde_json::json!({"role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let r = s
            .client
            .get(s.url("/metrics"))
            .header("authorization", s.auth())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let t = r.text().await.unwrap();
        if t.contains("hangar_connected_devices{protocol=\"gateway\"} 1") {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for needle in [
        "# TYPE hangar_mqtt_messages_in counter",
        "hangar_mqtt_messages_dropped_total{reason=\"malformed\"}",
        "hangar_commands_sent_total",
        "hangar_tasks{state=\"pending\"}",
        "# TYPE hangar_task_duration_seconds histogram",
        "hangar_campaigns{state=\"running\"}",
        "hangar_download_bytes_total{kind=\"full\"} 100",
        "hangar_download_range_requests_total 1",
        "hangar_active_downloads",
        "hangar_http_requests_total{route=\"/firmware/{file}\",method=\"GET\",status=\"206\"} 1",
        "hangar_http_requests_total{route=\"/api/users/{name}\",method=\"PATCH\",status=\"404\"} 1",
        "hangar_auth_sign_ins_total{result=\"throttled\"}",
        "hangar_auth_password_checks_total",
        "hangar_auth_failures_total{listener=\"http\"}",
        "hangar_delta_queue_length",
        "# TYPE hangar_delta_generation_seconds histogram",
        "hangar_store_size_bytes",
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    drop(dev);
    // the loopback listener answers without a token
    let ports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("ports.json")).unwrap()).unwrap();
    let port = ports["metrics"]
        .as_u64()
        .expect("metrics port in ports.json");
    let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("hangar_tasks"));
    let r = reqwest::get(format!("http://127.0.0.1:{port}/api/ota/firmware"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "only /metrics there");
}

#[test]
fn metrics_listener_must_be_loopback() {
    let mut c = hangar::config::Config::default();
    c.metrics.listen = "0.0.0.0:9464".parse().unwrap();
    let e = c.validate("test.toml").unwrap_err();
    assert_eq!(e.key, "metrics.listen");
}

/// Every `.route("...")` of the HTTP sources, with sample values for its parameters. Read from
/// the source so that a new route is walked without anyone remembering to add it here.
fn routes() -> Vec<String> {
    let src = common::http_sources();
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + 7..];
        let q = rest.find('"').unwrap();
        let tail = &rest[q + 1..];
        let end = tail.find('"').unwrap();
        out.push(
            tail[..end]
                .replace("{version}", "1.0.1")
                .replace("{id}", "c1")
                .replace("{device}", "GW1")
                .replace("{action}", "pause")
                .replace("{name}", "olga")
                .replace("{file}", "gateway_v1.0.1.bin"),
        );
    }
    out.sort();
    out.dedup();
    assert!(out.len() >= 20, "the walk found only {out:?}");
    out
}

/// What a listener in `ports.json` is, so the walk knows what it may answer unauthenticated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Listener {
    /// The API listeners: everything but `/healthz` needs credentials.
    Api,
    /// The loopback metrics listener: `/metrics` and nothing else.
    Metrics,
    /// A device broker port (not HTTP).
    Mqtt,
}

/// Every listener the app opened, from `ports.json`. A key this test does not know fails it:
/// a new listener must be classified (and so walked) before it ships.
fn listeners(data_dir: &std::path::Path) -> Vec<(String, u16, Listener)> {
    let ports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("ports.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for (k, v) in ports.as_object().unwrap() {
        let Some(port) = v.as_u64() else { continue };
        let kind = match k.as_str() {
            "https" | "http" => Listener::Api,
            "metrics" => Listener::Metrics,
            "mqtt" | "mqtts" => Listener::Mqtt,
            other => panic!("ports.json names a listener the route walk does not know: {other}"),
        };
        out.push((k.clone(), port as u16, kind));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_refuses_every_route_without_credentials() {
    // every optional listener on, and the broker hooks, so each one is walked
    let hook_dir = tempfile::tempdir().unwrap();
    let hook_token = hook_dir.path().join("hooks.token");
    std::fs::write(&hook_token, "a-hook-credential-0123456789\n").unwrap();
    let hook_token = hook_token.display().to_string();
    let s = Server::start_with(move |c| {
        c.metrics.listen = Listen::loopback_any_port();
        c.hooks.token_file = hook_token;
    })
    .await;
    s.release("1.0.1", "gateway", 1000).await;
    s.register("GW1", "gateway", "secret-123").await;
    // redirects are not followed: a console page's 303 to the sign-in page is its refusal
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let https = common::client_no_redirect(s.dir.path());
    let found = listeners(s.dir.path());
    let kinds: Vec<Listener> = found.iter().map(|l| l.2).collect();
    for k in [Listener::Api, Listener::Metrics, Listener::Mqtt] {
        assert!(kinds.contains(&k), "no {k:?} listener in {found:?}");
    }
    let mut walked = 0;
    for (name, port, kind) in &found {
        let (base, client) = match (name.as_str(), kind) {
            (_, Listener::Mqtt) => continue,
            ("https", _) => (format!("https://localhost:{port}"), &https),
            _ => (format!("http://127.0.0.1:{port}"), &plain),
        };
        for path in routes() {
            let path = path.replace(
                "/firmware/deltas/gateway_v1.0.1.bin",
                "/firmware/deltas/gateway_v1.0.0_to_v1.0.1.bsdiff",
            );
            // open on the API listeners: health, the sign-in page and its assets, sign-in itself
            let open = match kind {
                Listener::Api => {
                    ["/healthz", "/login", "/api/auth/login"].contains(&path.as_str())
                        || path.starts_with("/assets/")
                }
                _ => path == "/metrics",
            };
            for method in ["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH"] {
                for auth in [None, Some("Bearer not-the-token")] {
                    let mut req = client
                        .request(method.parse().unwrap(), format!("{base}{path}"))
                        .header("content-type", "application/json")
                        .body(json!({}).to_string());
                    if let Some(a) = auth {
                        req = req.header("authorization", a);
                    }
                    let st = req.send().await.unwrap().status().as_u16();
                    walked += 1;
                    if open {
                        continue;
                    }
                    let page = !path.starts_with("/api/")
                        && !path.starts_with("/firmware/")
                        && !path.starts_with("/hooks/")
                        && path != "/metrics";
                    let refused = match kind {
                        Listener::Api if page && (method == "GET" || method == "HEAD") => st == 303,
                        Listener::Api => st == 401 || st == 405,
                        _ => st == 404 || st == 405,
                    };
                    assert!(
                        refused,
                        "{name} listener: {method} {path} answered {st} without credentials ({auth:?})"
                    );
                }
            }
        }
    }
    assert!(walked > 300, "walked only {walked} requests");
}

/// Every API route of the router source, with the methods it registers: `(method, path)`.
fn api_routes_with_methods() -> Vec<(String, String)> {
    let src = common::http_sources();
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + 7..];
        // the route call ends where its parentheses close
        let mut depth = 1;
        let mut end = 0;
        for (j, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[..end];
        let q = call.find('"').unwrap();
        let path = &call[q + 1..q + 1 + call[q + 1..].find('"').unwrap()];
        if !(path.starts_with("/api/") || path == "/metrics") || path == "/api/auth/login" {
            continue;
        }
        let mut found = false;
        for m in ["get", "post", "put", "patch", "delete"] {
            let word = |k: usize| {
                k == 0
                    || !call.as_bytes()[k - 1].is_ascii_alphanumeric()
                        && call.as_bytes()[k - 1] != b'_'
            };
            let pat = format!("{m}(");
            if call.match_indices(&pat).any(|(k, _)| word(k)) {
                out.push((m.to_uppercase(), path.to_string()));
                found = true;
            }
        }
        assert!(found, "no method found in .route({call})");
    }
    out.sort();
    out.dedup();
    out
}

/// Reads must not fail open: every API route of the router has an explicit line in the access
/// table for every method it serves (an unlisted one would be admin-only and audited as
/// "unknown", which is safe but surely not what its author meant).
#[test]
fn every_api_route_has_an_access_rule() {
    let routes = api_routes_with_methods();
    assert!(routes.len() >= 35, "the walk found only {routes:?}");
    let missing: Vec<_> = routes
        .iter()
        .filter(|(m, p)| hangar::server::http::access::listed(&m.parse().unwrap(), p).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "API routes without an access rule: {missing:?}"
    );
    // and the metrics listener serves nothing an API rule would have to cover
    assert!(routes.contains(&("GET".into(), "/metrics".into())));
}
