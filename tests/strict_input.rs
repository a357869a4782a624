//! Hostile and sloppy HTTP input gets the JSON envelope and a clear reason — never axum's or
//! hyper's plain-text or empty answers — and the upload form is taken strictly: fields as sent,
//! each once, bounded part headers, no control characters in stored free text.

mod common;

use common::{Server, image, mutating_routes};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn envelope(r: reqwest::Response) -> (u16, Value) {
    let st = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    assert!(
        ct.starts_with("application/json"),
        "{st} is not the envelope ({ct}): {text:?}"
    );
    (st, serde_json::from_str(&text).unwrap())
}

/// Routes whose body is not a JSON document (their limits are tested elsewhere).
const NOT_JSON: &[&str] = &[
    "/api/ota/firmware/upload",
    "/api/ota/devices/import",
    // a bundle is a tar (tests/signatures.rs refuses bad ones)
    "/api/ota/bundles",
    // takes no body: signing out ignores one
    "/api/auth/logout",
];

/// A route's `{param}`s filled with plausible values.
fn fill_params(route: &str) -> String {
    let mut out = String::new();
    let mut rest = route;
    while let Some(i) = rest.find('{') {
        let j = rest[i..].find('}').unwrap() + i;
        out.push_str(&rest[..i]);
        out.push_str(match &rest[i + 1..j] {
            "version" => "1.0.0",
            "action" => "pause",
            _ => "dev-1",
        });
        rest = &rest[j + 1..];
    }
    out + rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_json_body_is_a_413_envelope_on_every_json_route() {
    let s = Server::start().await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(3 << 20));
    let routes: Vec<_> = mutating_routes()
        .into_iter()
        .filter(|(m, p)| m != "DELETE" && !NOT_JSON.contains(&p.as_str()))
        .collect();
    assert!(routes.len() >= 8, "{routes:?}");
    let mut too_large = 0;
    let n = routes.len();
    for (method, path) in routes {
        let path = fill_params(&path);
        let r = s
            .client
            .request(method.parse().unwrap(), s.url(&path))
            .header("authorization", s.auth())
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        let (st, body) = envelope(r).await;
        // a route that takes no body (campaign actions) may say first that its target is missing
        match st {
            413 => {
                assert_eq!(
                    body["error"], "PAYLOAD_TOO_LARGE",
                    "{method} {path}: {body}"
                );
                too_large += 1;
            }
            404 => assert_eq!(body["error"], "NOT_FOUND", "{method} {path}: {body}"),
            _ => panic!("{method} {path}: {st} {body}"),
        }
    }
    assert!(
        too_large * 2 >= n,
        "only {too_large} of {n} routes said 413"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_refused_after_the_auth_check_as_the_envelope() {
    let s = Server::start().await;
    for path in [
        "/api/ota/devices/%FF",
        "/api/ota/firmware/%FF%FE",
        "/api/ota/campaigns/%C3",
        "/firmware/%FF",
    ] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        let (st, body) = envelope(r).await;
        assert_eq!(st, 401, "{path} without a token: {body}");
        let r = s
            .client
            .get(s.url(path))
            .header("authorization", s.auth())
            .send()
            .await
            .unwrap();
        let (st, body) = envelope(r).await;
        // (a route that takes no GET answers 405 before looking at its parameters)
        assert!(st == 400 || st == 405, "{path}: {st} {body}");
        if st == 400 {
            assert!(
                body["message"].as_str().unwrap().contains("not valid"),
                "{path}: {body}"
            );
        }
    }
}

/// One raw HTTP/1.1 exchange on the plain listener.
async fn raw(s: &Server, request: &[u8]) -> String {
    let addr = s.plain.trim_start_matches("http://");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_with_a_control_character_does_not_get_an_empty_400() {
    let s = Server::start().await;
    let ok = raw(
        &s,
        format!(
            "GET /api/ota/devices HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\x1b[31m\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            s.auth()
        )
        .as_bytes(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"status\":true"), "{ok}");
    // a token with a control character in it is no token: the 401 envelope
    let refused = raw(
        &s,
        format!(
            "GET /api/ota/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x01{}\r\nConnection: close\r\n\r\n",
            s.token
        )
        .as_bytes(),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains("\"error\":\"UNAUTHORIZED\""), "{refused}");
}

async fn upload_raw(s: &Server, boundary: &str, body: Vec<u8>) -> (u16, Value) {
    let r = s
        .client
        .post(s.url("/api/ota/firmware/upload"))
        .header("authorization", s.auth())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    envelope(r).await
}

fn part(boundary: &str, name: &str, extra_header: &str, value: &[u8]) -> Vec<u8> {
    let mut p = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n{extra_header}\r\n"
    )
    .into_bytes();
    p.extend_from_slice(value);
    p.extend_from_slice(b"\r\n");
    p
}

fn form(boundary: &str, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut b = parts.concat();
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_fields_are_taken_strictly() {
    let s = Server::start().await;
    let bd = "hangarTestBoundary";
    let file = |n: u64| {
        part(
            bd,
            "file",
            "Content-Type: application/octet-stream\r\n",
            &image(10_000, n),
        )
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a version with a trailing space",
            form(bd, &[part(bd, "version", "", b"1.0.0 "), file(1)]),
            "version",
        ),
        (
            "two version parts",
            form(
                bd,
                &[
                    part(bd, "version", "", b"1.0.0"),
                    part(bd, "version", "", b"2.0.0"),
                    file(2),
                ],
            ),
            "more than one `version`",
        ),
        (
            "a 1 MiB part header",
            form(
                bd,
                &[
                    part(
                        bd,
                        "version",
                        &format!("X-Pad: {}\r\n", "p".repeat(1 << 20)),
                        b"1.0.0",
                    ),
                    file(3),
                ],
            ),
            "headers are longer",
        ),
        (
            "NUL and ESC in the description",
            form(
                bd,
                &[
                    part(bd, "version", "", b"1.0.0"),
                    part(bd, "description", "", b"ok\x00\x1b[2J"),
                    file(4),
                ],
            ),
            "control character",
        ),
    ];
    for (what, body, says) in cases {
        let (st, b) = upload_raw(&s, bd, body).await;
        assert_eq!(st, 400, "{what}: {b}");
        assert!(b["message"].as_str().unwrap().contains(says), "{what}: {b}");
    }
    // nothing of those was stored
    let (_, list) = s.get_json("/api/ota/firmware").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    // the well-formed form is taken, with its tab and line breaks
    let (st, b) = upload_raw(
        &s,
        bd,
        form(
            bd,
            &[
                part(bd, "version", "", b"1.0.0"),
                part(bd, "description", "", b"fixes:\n\t- the modem"),
                file(5),
            ],
        ),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["description"], "fixes:\n\t- the modem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_bodies_are_cut_off_and_counted() {
    let s = Server::start_with(|c| c.http.body_idle_timeout_secs = 1).await;
    let addr = s.plain.trim_start_matches("http://").to_string();
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /api/ota/firmware/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 1000000\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"version\"\r\n\r\n1.0.{i}\r\n--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n",
            s.auth()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&[7u8; 5000]).await.unwrap();
        stalled.push(c);
    }
    // each one ends: the server gives up on the body (the answer, if any, is an error)
    for (i, c) in stalled.iter_mut().enumerate() {
        let mut out = Vec::new();
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(20), c.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "stalled body {i} was still open after 20 s");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
            "{i}: {text}"
        );
    }
    let n = s.metric("hangar_http_body_timeouts_total").await;
    assert!(n >= 20.0, "{n} body timeouts counted");
    // nothing was stored
    let (_, list) = s.get_json("/api/ota/firmware").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
}
