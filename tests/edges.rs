//! Download edges: the example nginx configs in `config/` run unchanged but for their EDIT
//! lines, in front of the real appliance. Devices of the edge's group get command URLs on the
//! edge; nginx checks the secure link itself (tampered 403, expired 410), serves Range and a
//! resumed download (`curl -C -`), and a second device's download comes from its cache; a
//! mirror stores what it pulled through and serves it from its directory; an edge that stops
//! answering its probe sends its devices back to the appliance.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use hangar::config::{EdgeConfig, EdgeMatch};
use md5::{Digest, Md5};
use serde_json::json;

const SECRET: &str = "edge-test-secret-0123456789";
const LEN: usize = 3 * 1024 * 1024 + 12_345;

/// A free loopback port (bound, then released for nginx).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian puts nginx in /usr/sbin, which a user's PATH may lack.
fn nginx() -> Option<PathBuf> {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.is_file() {
        return Some(sbin.to_path_buf());
    }
    tool("nginx", "nginx")
}

/// nginx running one of the example files, its EDIT lines pointed at this test's appliance.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(bin: &Path, example: &str, port: u16, s: &Server, root: Option<&Path>) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let data = s.dir.path().join("certs");
        let https = s.base.rsplit(':').next().unwrap().to_string();
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(example),
        )
        .unwrap();
        let mut conf = text
            .replace("/var/cache/nginx/hangar", &format!("{d}/cache"))
            .replace("hangar.local:8443", &format!("127.0.0.1:{https}"))
            .replace("listen 8443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
            .replace(
                "proxy_ssl_name                hangar.local;",
                "proxy_ssl_name                localhost;",
            )
            .replace(
                "/etc/nginx/ssl/hangar-ca.pem",
                &data.join("ca.pem").display().to_string(),
            )
            .replace("SITE_SECRET", SECRET);
        for name in ["edge", "mirror"] {
            conf = conf
                .replace(
                    &format!("/etc/nginx/ssl/{name}.pem"),
                    &data.join("server.pem").display().to_string(),
                )
                .replace(
                    &format!("/etc/nginx/ssl/{name}.key"),
                    &data.join("server.key").display().to_string(),
                );
        }
        if let Some(root) = root {
            conf = conf.replace("/srv/hangar-mirror", &root.display().to_string());
        }
        let directives = conf
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !directives.contains("hangar.local") && !directives.contains("/etc/nginx"),
            "an EDIT line was not replaced:\n{directives}"
        );
        std::fs::write(dir.path().join("site.conf"), conf).unwrap();
        // as root, nginx's workers would be `nobody`, who cannot read this test's files
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "{user}\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
                 include {d}/site.conf;\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["-p", &d, "-e", &format!("{d}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Nginx { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Stops nginx: SIGTERM to the master, which takes its workers along (SIGKILL would leave
    /// them serving).
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `curl -k` with the given arguments; (status line's code, headers, exit ok).
fn curl(args: &[&str]) -> (u16, String) {
    // one URL, so one -o: the caller's file (which `-C -` resumes), or nowhere
    let sink: &[&str] = if args.contains(&"-o") {
        &[]
    } else {
        &["-o", "/dev/null"]
    };
    let out = Command::new("curl")
        .args(["-sk", "-D", "-", "--max-time", "30"])
        .args(sink)
        .args(args)
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_string();
    let code = headers
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, headers)
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().rev().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn edge_state(s: &Server, base: &str) -> f64 {
    s.metric(&format!("hangar_download_edge_up{{edge=\"{base}\"}}"))
        .await
}

/// Waits (deadline 40 s: probes run every 10 s) until the edge's probe says `want`.
async fn edge_becomes(s: &Server, base: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while edge_state(s, base).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge {base} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URL in the command of a new upgrade task for `device`.
async fn command_url(s: &Server, device: &str) -> String {
    let (st, b) = s
        .post_json(
            &format!("/api/ota/upgrade/{device}"),
            json!({"version": "1.0.2"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    b["data"]["firmwareUrl"].as_str().unwrap().to_string()
}

async fn register(s: &Server, id: &str, tags: &[&str]) {
    let (st, b) = s
        .post_json(
            "/api/ota/devices",
            json!({"id": id, "protocol": "gateway", "secret": "secret-1", "deviceType": "gateway", "tags": tags}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
}

/// Whether `url` is `path` on the appliance's HTTPS listener (under its public URL).
fn on_appliance(s: &Server, url: &str, path: &str) -> bool {
    let port = s.base.rsplit(':').next().unwrap();
    url.starts_with("https://") && url.contains(&format!(":{port}{path}?token="))
}

fn secure_link(path: &str, expires: u64) -> String {
    let mut h = Md5::new();
    h.update(format!("{expires}{path} {SECRET}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_cache_and_a_mirror_serve_signed_downloads_and_fall_back_to_the_appliance() {
    let Some(bin) = nginx() else { return };
    if tool("curl", "curl").is_none() {
        return;
    }
    let (edge_port, mirror_port) = (free_port(), free_port());
    let edge_base = format!("https://127.0.0.1:{edge_port}");
    let mirror_base = format!("https://127.0.0.1:{mirror_port}");
    let (eb, mb) = (edge_base.clone(), mirror_base.clone());
    let s = Server::start_with(move |c| {
        c.downloads.secure_link_secret = SECRET.into();
        c.downloads.edge = vec![
            EdgeConfig {
                matches: EdgeMatch {
                    tags: vec!["hall-2".into()],
                    device_type: None,
                },
                base_url: eb,
            },
            EdgeConfig {
                matches: EdgeMatch {
                    tags: vec!["hall-3".into()],
                    device_type: None,
                },
                base_url: mb,
            },
        ];
    })
    .await;
    let img = image(LEN, 7);
    s.release_bytes("1.0.2", "gateway", img.clone()).await;
    for (id, tags) in [
        ("GW-A", vec!["hall-2"]),
        ("GW-B", vec!["hall-2", "line-1"]),
        ("GW-C", vec![]),
        ("GW-M1", vec!["hall-3"]),
        ("GW-M2", vec!["hall-3"]),
        ("GW-D", vec!["hall-2"]),
    ] {
        register(&s, id, &tags).await;
    }
    // not probed as up yet: the appliance's URL
    let mut edge = Nginx::start(&bin, "nginx-edge.conf", edge_port, &s, None);
    let mirror_root = tempfile::tempdir().unwrap();
    let _mirror = Nginx::start(
        &bin,
        "nginx-mirror.conf",
        mirror_port,
        &s,
        Some(mirror_root.path()),
    );
    edge_becomes(&s, &edge_base, 1.0).await;
    edge_becomes(&s, &mirror_base, 1.0).await;

    let path = "/firmware/gateway_v1.0.2.bin";
    let a = command_url(&s, "GW-A").await;
    assert!(a.starts_with(&format!("{edge_base}{path}?token=")), "{a}");
    assert!(a.contains("&md5=") && a.contains("&expires="), "{a}");
    let c = command_url(&s, "GW-C").await;
    assert!(on_appliance(&s, &c, path), "{c}");

    // GW-A: part of the image, then the rest resumed with curl -C -
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("a.bin");
    let out_s = out.display().to_string();
    let (code, h) = curl(&["-r", "0-1500000", "-o", &out_s, &a]);
    assert_eq!(code, 206, "{h}\n{}", edge.log());
    assert_eq!(header(&h, "x-cache-status"), Some("MISS"), "{h}");
    let (code, h) = curl(&["-C", "-", "-o", &out_s, &a]);
    assert_eq!(code, 206, "{h}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        img,
        "resumed download differs"
    );

    // GW-B: the whole image from the cache, the appliance not asked
    let before = s.metric("hangar_download_requests_total").await;
    let b = command_url(&s, "GW-B").await;
    let out_b = work.path().join("b.bin").display().to_string();
    let (code, h) = curl(&["-o", &out_b, &b]);
    assert_eq!(code, 200, "{h}");
    assert_eq!(header(&h, "x-cache-status"), Some("HIT"), "{h}");
    assert_eq!(std::fs::read(&out_b).unwrap(), img);
    assert_eq!(s.metric("hangar_download_requests_total").await, before);

    // nginx itself refuses a tampered link (403) and an expired one (410)
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let tampered = format!(
        "{edge_base}{path}?md5={}&expires={}",
        secure_link("/firmware/gateway_v9.bin", now + 600),
        now + 600
    );
    assert_eq!(curl(&[&tampered]).0, 403);
    let expired = format!(
        "{edge_base}{path}?md5={}&expires={}",
        secure_link(path, now - 10),
        now - 10
    );
    assert_eq!(curl(&[&expired]).0, 410);
    // and the appliance too (no token: the secure link alone, expired)
    let at_appliance = format!(
        "{}{path}?md5={}&expires={}",
        s.base,
        secure_link(path, now - 10),
        now - 10
    );
    assert_eq!(curl(&[&at_appliance]).0, 401);
    // a valid one is answered cacheably by the appliance
    let fresh = format!(
        "{}{path}?md5={}&expires={}",
        s.base,
        secure_link(path, now + 600),
        now + 600
    );
    let (code, h) = curl(&["-r", "0-99", &fresh]);
    assert_eq!(code, 206, "{h}");
    assert!(
        header(&h, "cache-control").is_some_and(|v| v.starts_with("public")),
        "{h}"
    );
    assert!(
        header(&h, "etag").is_some_and(|v| v.starts_with('"')),
        "{h}"
    );

    // the mirror: the first download pulls the file through and stores it, the second is served
    // from the mirror's directory
    let m1 = command_url(&s, "GW-M1").await;
    assert!(m1.starts_with(&mirror_base), "{m1}");
    let out_m = work.path().join("m.bin").display().to_string();
    let (code, h) = curl(&["-o", &out_m, &m1]);
    assert_eq!(code, 200, "{h}");
    assert_eq!(header(&h, "x-mirror"), Some("miss"), "{h}");
    assert_eq!(std::fs::read(&out_m).unwrap(), img);
    assert_eq!(
        std::fs::read(mirror_root.path().join("firmware/gateway_v1.0.2.bin")).unwrap(),
        img
    );
    let m2 = command_url(&s, "GW-M2").await;
    let (code, h) = curl(&["-r", "1000-1999", "-o", &out_m, &m2]);
    assert_eq!(code, 206, "{h}");
    assert_eq!(header(&h, "x-mirror"), Some("hit"), "{h}");
    assert_eq!(std::fs::read(&out_m).unwrap(), &img[1000..2000]);

    // the edge goes away: its devices are sent to the appliance
    edge.stop();
    edge_becomes(&s, &edge_base, 0.0).await;
    let d = command_url(&s, "GW-D").await;
    assert!(on_appliance(&s, &d, path), "{d}");
    let out_d = work.path().join("d.bin").display().to_string();
    assert_eq!(curl(&["-o", &out_d, &d]).0, 200);
    assert_eq!(std::fs::read(&out_d).unwrap(), img);
}
