//! Operations: Prometheus metrics (behind the token on HTTPS, and on the optional loopback
//! listener), and a walk over every route of the router source checking that nothing but
//! `/healthz` answers without credentials.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_behind_the_token() {
    let s = Server::start_with(|c| c.metrics.listen = "127.0.0.1:0".into()).await;
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
    c.metrics.listen = "0.0.0.0:9464".into();
    let e = c.validate("test.toml").unwrap_err();
    assert_eq!(e.key, "metrics.listen");
}

/// Every `.route("...")` of the router source, with sample values for its parameters.
fn routes() -> Vec<String> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs")).unwrap();
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
                .replace("{file}", "gateway_v1.0.1.bin"),
        );
    }
    assert!(out.len() >= 20, "the walk found only {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_credentials() {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.register("GW1", "gateway", "secret-123").await;
    let plain = reqwest::Client::new();
    for path in routes() {
        for method in ["GET", "HEAD", "POST", "DELETE", "PUT"] {
            for (base, client) in [(&s.base, &s.client), (&s.plain, &plain)] {
                let url = format!(
                    "{base}{}",
                    path.replace(
                        "/firmware/deltas/gateway_v1.0.1.bin",
                        "/firmware/deltas/gateway_v1.0.0_to_v1.0.1.bsdiff"
                    )
                );
                let r = client
                    .request(method.parse().unwrap(), &url)
                    .header("content-type", "application/json")
                    .body(json!({}).to_string())
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                if path == "/healthz" {
                    continue;
                }
                assert!(
                    st == 401 || st == 405,
                    "{method} {url} answered {st} without credentials"
                );
                // with a wrong token too
                let r = client
                    .request(method.parse().unwrap(), &url)
                    .header("authorization", "Bearer not-the-token")
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                assert!(
                    st == 401 || st == 405,
                    "{method} {url} answered {st} to a wrong token"
                );
            }
        }
    }
}
