//! Refusals of requests with a body reach the client as the status plus the JSON envelope, over
//! HTTP/2 (curl's default on https, where an early answer used to arrive as a stream reset and
//! curl showed `000`) and over HTTP/1.1: 401 without a token, 413 for a JSON body over its limit,
//! 409 for an upload whose version exists, 400 for a malformed body — with curl itself and with
//! a streaming reqwest client.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, image, tool};
use serde_json::Value;

/// `curl` with `args`, returning (HTTP status, HTTP version, body as JSON or Null).
fn curl(curl: &Path, ca: &Path, args: &[&str]) -> (u16, String, Value) {
    let out = Command::new(curl)
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut it = tail.split(' ');
    let status = it.next().unwrap_or("0").parse().unwrap_or(0);
    let version = it.next().unwrap_or("").to_string();
    (
        status,
        version,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn assert_envelope(what: &str, (st, ver, body): &(u16, String, Value), status: u16, code: &str) {
    assert_eq!(*st, status, "{what} over HTTP/{ver}: {body}");
    assert_eq!(body["status"], false, "{what}: {body}");
    assert_eq!(body["error"], code, "{what}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_every_refusal_of_a_big_body_over_http2_and_http1() {
    let Some(curl_bin) = tool("curl", "curl") else {
        return;
    };
    let s = Server::start().await;
    s.release("1.0.0", "gateway", 1000).await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("fw.bin");
    std::fs::write(&big, image(3_000_000, 5)).unwrap();
    let ca = s.dir.path().join("certs/ca.pem");
    let upload = s.url("/api/ota/firmware/upload");
    let devices = s.url("/api/ota/devices");
    let auth = format!("Authorization: Bearer {}", s.token);
    let file = format!("file=@{}", big.display());
    let json_file = format!("@{}", big.display());
    for proto in ["--http2", "--http1.1"] {
        let want = if proto == "--http2" { "2" } else { "1.1" };
        // 401: no token, 3 MB upload
        let r = curl(
            &curl_bin,
            &ca,
            &[proto, "-F", &file, "-F", "version=1.0.1", &upload],
        );
        assert_eq!(r.1, want);
        assert_envelope("upload without a token", &r, 401, "UNAUTHORIZED");
        // 409: the version exists, and the form says so before the file
        let r = curl(
            &curl_bin,
            &ca,
            &[
                proto,
                "-H",
                &auth,
                "-F",
                "version=1.0.0",
                "-F",
                &file,
                &upload,
            ],
        );
        assert_envelope("upload of an existing version", &r, 409, "CONFLICT");
        let post_json = |data: &str| {
            curl(
                &curl_bin,
                &ca,
                &[
                    proto,
                    "-H",
                    &auth,
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    data,
                    &devices,
                ],
            )
        };
        // 413: a JSON route sent 3 MB
        assert_envelope(
            "a 3 MB JSON body",
            &post_json(&json_file),
            413,
            "PAYLOAD_TOO_LARGE",
        );
        // 400: a body that is not JSON
        let r = post_json("{not json");
        assert_envelope("a malformed JSON body", &r, 400, "BAD_REQUEST");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_http2_client_gets_the_401_of_an_upload() {
    let s = Server::start().await;
    let h2 = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                &std::fs::read(s.dir.path().join("certs/ca.pem")).unwrap(),
            )
            .unwrap(),
        )
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for with_token in [false, true] {
        // 8 MiB in 64 KiB chunks, streamed (no Content-Length)
        let chunks = (0..128).map(|i| Ok::<_, std::io::Error>(image(64 * 1024, i)));
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let mut req = h2
            .post(s.url("/api/ota/devices"))
            .header("content-type", "application/json")
            .body(body);
        if with_token {
            req = req.header("authorization", s.auth());
        }
        let r = req.send().await.expect("an answer, not a reset");
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let want = if with_token { 413 } else { 401 };
        assert_eq!(r.status().as_u16(), want);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], false, "{v}");
    }
}
