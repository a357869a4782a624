//! `/firmware/{fileName}` over real HTTPS (HTTP/1.1 and HTTP/2): Range, If-Range, 416, HEAD,
//! conditional requests, multipart/byteranges, signed URLs, and a resumed download.

mod common;

use common::*;
use futures_util::StreamExt;
use reqwest::StatusCode;

const LEN: usize = 1_000_003;
const PATH: &str = "/firmware/gateway_v1.0.2.bin";

async fn setup() -> (Server, Vec<u8>) {
    let s = Server::start().await;
    let img = image(LEN, 42);
    let (st, b) = s.upload("1.0.2", None, img.clone()).await;
    assert_eq!(st, 201, "{b}");
    (s, img)
}

async fn get(s: &Server, c: &reqwest::Client, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = c.get(s.url(PATH)).header("authorization", s.auth());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn ranges_conditionals_and_head() {
    let (s, img) = setup().await;
    for c in [
        client_for(s.dir.path(), true),
        client_for(s.dir.path(), false),
    ] {
        // full
        let r = get(&s, &c, &[]).await;
        assert_eq!(r.status(), 200);
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let lm = r.headers()["last-modified"].to_str().unwrap().to_string();
        assert_eq!(etag, format!("\"{}\"", sha256_hex(&img)));
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        assert_eq!(r.headers()["content-length"], LEN.to_string().as_str());
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        assert_eq!(r.bytes().await.unwrap(), img);

        // the three single-range forms
        for (range, a, b) in [
            ("bytes=0-99", 0, 99),
            ("bytes=1000-", 1000, LEN - 1),
            ("bytes=-500", LEN - 500, LEN - 1),
            ("bytes=999000-99999999", 999_000, LEN - 1),
            ("bytes=-99999999", 0, LEN - 1),
        ] {
            let r = get(&s, &c, &[("range", range)]).await;
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(
                r.headers()["content-range"],
                format!("bytes {a}-{b}/{LEN}").as_str()
            );
            assert_eq!(
                r.headers()["content-length"],
                (b - a + 1).to_string().as_str()
            );
            assert_eq!(r.bytes().await.unwrap(), img[a..=b], "{range}");
        }

        // unsatisfiable
        for range in [
            "bytes=1000003-",
            "bytes=2000000-3000000",
            "bytes=18446744073709551615-",
            "bytes=99999999999999999999-",
        ] {
            let r = get(&s, &c, &[("range", range)]).await;
            assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
            assert_eq!(
                r.headers()["content-range"],
                format!("bytes */{LEN}").as_str()
            );
        }

        // malformed, reversed, abusive: ignored, whole file
        let many = format!(
            "bytes={}",
            (0..1000)
                .map(|i| format!("{}-{}", i * 10, i * 10 + 1))
                .collect::<Vec<_>>()
                .join(",")
        );
        for range in [
            "garbage",
            "bytes=abc",
            "bytes=9-1",
            "bytes=1-2-3",
            "pages=0-1",
            "bytes=0-1,,,,,,,,,,,,,,,,,,",
            many.as_str(),
            "bytes=0-500000,1-500001,2-500002",
        ] {
            let r = get(&s, &c, &[("range", range)]).await;
            assert_eq!(r.status(), 200, "{range}");
            assert_eq!(r.bytes().await.unwrap().len(), LEN);
        }

        // several ranges: a correct multipart/byteranges
        let r = get(&s, &c, &[("range", "bytes=0-9,100-199,-5")]).await;
        assert_eq!(r.status(), 206);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        let boundary = ct
            .strip_prefix("multipart/byteranges; boundary=")
            .expect("multipart")
            .to_string();
        let declared: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), declared);
        let parts = parse_multipart(&body, &boundary);
        assert_eq!(parts.len(), 3);
        for ((cr, data), (a, b)) in parts.iter().zip([(0, 9), (100, 199), (LEN - 5, LEN - 1)]) {
            assert_eq!(cr, &format!("bytes {a}-{b}/{LEN}"));
            assert_eq!(&data[..], &img[a..=b]);
        }

        // If-Range: fresh etag / date -> 206, stale -> 200
        let r = get(&s, &c, &[("range", "bytes=0-9"), ("if-range", &etag)]).await;
        assert_eq!(r.status(), 206);
        let r = get(&s, &c, &[("range", "bytes=0-9"), ("if-range", &lm)]).await;
        assert_eq!(r.status(), 206);
        let r = get(&s, &c, &[("range", "bytes=0-9"), ("if-range", "\"stale\"")]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), LEN);
        let r = get(
            &s,
            &c,
            &[
                ("range", "bytes=0-9"),
                ("if-range", "Mon, 01 Jan 2001 00:00:00 GMT"),
            ],
        )
        .await;
        assert_eq!(r.status(), 200);
        let r = get(
            &s,
            &c,
            &[("range", "bytes=0-9"), ("if-range", &format!("W/{etag}"))],
        )
        .await;
        assert_eq!(r.status(), 200, "weak validators never match If-Range");

        // conditional GET
        let r = get(&s, &c, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert!(r.bytes().await.unwrap().is_empty());
        let r = get(&s, &c, &[("if-none-match", "\"other\", *")]).await;
        assert_eq!(r.status(), 304);
        let r = get(&s, &c, &[("if-none-match", "\"other\"")]).await;
        assert_eq!(r.status(), 200);
        let r = get(&s, &c, &[("if-modified-since", &lm)]).await;
        assert_eq!(r.status(), 304);
        let r = get(&s, &c, &[("if-match", "\"other\"")]).await;
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
        let r = get(&s, &c, &[("if-match", &etag), ("range", "bytes=0-0")]).await;
        assert_eq!(r.status(), 206);

        // HEAD answers the headers GET would, without a body
        for (range, status, len) in [(None, 200, LEN), (Some("bytes=10-19"), 206, 10)] {
            let mut req = c.head(s.url(PATH)).header("authorization", s.auth());
            if let Some(rg) = range {
                req = req.header("range", rg);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()["content-length"], len.to_string().as_str());
            assert_eq!(r.headers()["etag"], etag.as_str());
            assert_eq!(r.headers()["accept-ranges"], "bytes");
            assert_eq!(r.headers()["last-modified"], lm.as_str());
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
}

/// (Content-Range, data) of each part.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delim = format!("\r\n--{boundary}");
    let text = body;
    let mut out = Vec::new();
    let mut pos = 0;
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    while let Some(start) = find(text, delim.as_bytes(), pos) {
        let after = start + delim.len();
        if text[after..].starts_with(b"--") {
            assert_eq!(&text[after..], b"--\r\n", "closing delimiter ends the body");
            break;
        }
        let headers_end = find(text, b"\r\n\r\n", after).unwrap();
        let headers = String::from_utf8_lossy(&text[after..headers_end]).to_string();
        let cr = headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .unwrap()
            .to_string();
        let data_start = headers_end + 4;
        let next = find(text, delim.as_bytes(), data_start).unwrap();
        out.push((cr, text[data_start..next].to_vec()));
        pos = next;
    }
    out
}

#[tokio::test]
async fn signed_urls_and_unauthorised_access() {
    let (s, img) = setup().await;
    let signer = hangar::server::auth::UrlSigner::load_or_create(s.dir.path(), 3600).unwrap();
    let now = hangar::time::now_secs();
    let token = signer.sign(PATH, now);
    let r = s
        .client
        .get(format!("{}{PATH}?token={token}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img);
    // with Range, over the plain listener too
    let r = s
        .client
        .get(format!("{}{PATH}?token={token}", s.plain))
        .header("range", "bytes=5-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), img[5..10]);

    let other = "/firmware/gateway_v1.0.3.bin";
    let expired = signer.sign(PATH, now - 7200);
    let for_other = signer.sign(other, now);
    for url in [
        format!("{}{PATH}", s.base),
        format!("{}{PATH}?token=", s.base),
        format!("{}{PATH}?token=garbage", s.base),
        format!("{}{PATH}?token={expired}", s.base),
        format!("{}{PATH}?token={for_other}", s.base),
    ] {
        let r = s.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{url}");
        let b: serde_json::Value = r.json().await.unwrap();
        assert_eq!(b["status"], false);
    }
    let r = s
        .client
        .get(s.url(PATH))
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // file names outside the pattern, and unknown firmware
    for (path, want) in [
        ("/firmware/gateway_v9.9.9.bin", 404),
        ("/firmware/gateway.bin", 400),
        ("/firmware/..%2Fgateway_v1.0.2.bin", 400),
        ("/firmware/gateway_v1.0.2.exe", 400),
    ] {
        let r = s
            .client
            .get(s.url(path))
            .header("authorization", s.auth())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
}

#[tokio::test]
async fn interrupted_download_resumes_with_range() {
    let (s, img) = setup().await;
    let c = client_for(s.dir.path(), true);
    // read part of the body, then drop the connection mid-way
    let r = get(&s, &c, &[]).await;
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 300_000 {
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    drop(stream);
    // resume from where we stopped, guarded by If-Range like curl -C - / wget -c with a validator
    let from = got.len();
    let r = get(
        &s,
        &c,
        &[("range", &format!("bytes={from}-")), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status(), 206);
    got.extend_from_slice(&r.bytes().await.unwrap());
    assert_eq!(got.len(), LEN);
    assert_eq!(sha256_hex(&got), sha256_hex(&img));
}

#[tokio::test]
async fn delete_and_reupload_serves_the_new_image() {
    let (s, img) = setup().await;
    let r = get(&s, &s.client, &[]).await;
    assert_eq!(r.bytes().await.unwrap(), img); // the descriptor is now cached
    let r = s
        .client
        .delete(s.url("/api/ota/firmware/1.0.2"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.files_under("blobs"), 0);
    let r = get(&s, &s.client, &[]).await;
    assert_eq!(r.status(), 404);
    // same version, new content; then the old content again (same blob path as before)
    let other = image(LEN + 10, 43);
    assert_eq!(s.upload("1.0.2", None, other.clone()).await.0, 201);
    assert_eq!(get(&s, &s.client, &[]).await.bytes().await.unwrap(), other);
    let r = s
        .client
        .delete(s.url("/api/ota/firmware/1.0.2"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.upload("1.0.2", None, img.clone()).await.0, 201);
    let r = get(&s, &s.client, &[("range", "bytes=-100")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), img[LEN - 100..]);
}
