//! The device download (`hangar::device::fetch`) against deliberately misbehaving HTTP servers:
//! a connection cut mid-body resumes with Range; a server answering 200 to a resume makes it
//! start over cleanly; a body longer than announced, a wrong md5 and an unreachable URL end in the
//! right error.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use hangar::device::fetch::{self, Expect, FetchError, Memory, Received};

#[derive(Clone, Copy)]
enum Mode {
    /// First response cut after half the body; then honours Range.
    CutThenRange,
    /// Cut after half, then ignores Range (200 with the whole body).
    CutThenIgnoreRange,
    /// Announces and sends more bytes than the command says.
    Oversized,
}

/// Serves `body` on 127.0.0.1; returns the URL and the Range headers it saw.
fn serve(body: Vec<u8>, mode: Mode) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/fw.bin", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().enumerate() {
            let mut conn = conn.unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            seen2.lock().unwrap().push(range.clone());
            let etag = "\"abc\"";
            let (status, start, send): (&str, usize, Vec<u8>) = match (mode, &range) {
                (Mode::Oversized, _) => {
                    let mut b = body.clone();
                    b.extend_from_slice(b"trailing garbage");
                    ("200 OK", 0, b)
                }
                (Mode::CutThenRange, Some(from)) => {
                    let from: usize = from.parse().unwrap();
                    ("206 Partial Content", from, body[from..].to_vec())
                }
                _ => ("200 OK", 0, body.clone()),
            };
            let len = send.len();
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nETag: {etag}\r\nConnection: close\r\n"
            );
            if status.starts_with("206") {
                head += &format!(
                    "Content-Range: bytes {start}-{}/{}\r\n",
                    body.len() - 1,
                    body.len()
                );
            }
            head += "\r\n";
            let _ = conn.write_all(head.as_bytes());
            let cut = n == 0 && !matches!(mode, Mode::Oversized);
            let upto = if cut { len / 2 } else { len };
            let _ = conn.write_all(&send[..upto]);
            let _ = conn.flush();
            // dropping the connection mid-body is the network drop
        }
    });
    (url, seen)
}

fn expect(body: &[u8]) -> Expect {
    use md5::Digest;
    Expect {
        size: body.len() as u64,
        md5: hex::encode(md5::Md5::digest(body)),
        sha256: Some(hex::encode(sha2::Sha256::digest(body))),
    }
}

fn body() -> Vec<u8> {
    (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

async fn get(url: &str, e: &Expect) -> (Result<(), FetchError>, Vec<u8>) {
    let http = reqwest::Client::new();
    let mut sink = Memory::default();
    let mut rx = Received::default();
    let opts = fetch::Options {
        max_attempts: 3,
        ..Default::default()
    };
    let r = fetch::fetch(&http, url, e, &mut sink, &mut rx, &opts, &mut |_, _| {}).await;
    (r, sink.0)
}

#[tokio::test]
async fn a_cut_download_resumes_with_range() {
    let b = body();
    let (url, seen) = serve(b.clone(), Mode::CutThenRange);
    let (r, got) = get(&url, &expect(&b)).await;
    r.unwrap();
    assert_eq!(got, b);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], None);
    assert!(
        seen[1]
            .as_deref()
            .is_some_and(|s| s.parse::<usize>().unwrap() > 0),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_200_to_a_resume_starts_over_cleanly() {
    let b = body();
    let (url, _) = serve(b.clone(), Mode::CutThenIgnoreRange);
    let (r, got) = get(&url, &expect(&b)).await;
    r.unwrap();
    assert_eq!(got, b, "no duplicated prefix");
}

#[tokio::test]
async fn bad_bodies_and_hashes_and_urls_are_errors() {
    let b = body();
    let (url, _) = serve(b.clone(), Mode::Oversized);
    assert!(matches!(
        get(&url, &expect(&b)).await.0,
        Err(FetchError::Verify(_))
    ));
    let (url, _) = serve(b.clone(), Mode::CutThenRange);
    let mut wrong = expect(&b);
    wrong.md5 = "0".repeat(32);
    assert!(matches!(get(&url, &wrong).await.0, Err(FetchError::Verify(m)) if m.contains("md5")));
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (r, _) = get(&format!("http://{closed}/fw.bin"), &expect(&b)).await;
    assert!(matches!(r, Err(FetchError::Download(_))), "{r:?}");
}

/// A patch fetched beside bytes already checked (a simulator's earlier device): compared, not
/// hashed — a resume after a cut still counts right, a body that differs is hashed after all
/// and refused on its md5, and one that differs yet carries the md5 would be taken.
#[tokio::test]
async fn a_patch_is_compared_with_bytes_already_checked() {
    let b = body();
    let http = reqwest::Client::new();
    let offer = |url: &str, md5: &str| hangar::device::client::DeltaOffer {
        from_version: "1.0.0".into(),
        url: url.into(),
        md5: md5.into(),
        size: b.len() as u64,
    };
    let md5 = expect(&b).md5;
    // cut mid-body, resumed with Range, in the size-only mode
    let (url, seen) = serve(b.clone(), Mode::CutThenRange);
    let got = fetch::fetch_patch(&http, &offer(&url, &md5), Some(&b))
        .await
        .unwrap();
    assert_eq!(got, b);
    assert_eq!(seen.lock().unwrap().len(), 2, "resumed once");
    // the server's bytes differ from the checked ones and from the md5: refused
    let mut other = b.clone();
    other[1000] ^= 0xff;
    let (url, _) = serve(other.clone(), Mode::CutThenIgnoreRange);
    let e = fetch::fetch_patch(&http, &offer(&url, &md5), Some(&b))
        .await
        .unwrap_err();
    assert!(e.contains("md5"), "{e}");
    // the bytes "checked" before were wrong, the server's match the md5: taken
    let (url, _) = serve(b.clone(), Mode::CutThenRange);
    let got = fetch::fetch_patch(&http, &offer(&url, &md5), Some(&other))
        .await
        .unwrap();
    assert_eq!(got, b);
    // with nothing known, hashed on the way as before
    let (url, _) = serve(other, Mode::CutThenRange);
    let e = fetch::fetch_patch(&http, &offer(&url, &md5), None)
        .await
        .unwrap_err();
    assert!(e.contains("md5"), "{e}");
}
