//! A site's own certificate (`[tls] cert/key`) is served, and SIGHUP swaps in renewed files
//! without a restart; broken files on SIGHUP keep the old certificate in service.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls_pki_types::{CertificateDer, ServerName};

fn make_cert(cn: &str) -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

/// The leaf certificate the server presents on a fresh TLS connection.
async fn presented(port: u16, roots: &[CertificateDer<'static>]) -> CertificateDer<'static> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(hangar::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn site_certificate_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (a_pem, a_key, a_der) = make_cert("site-a");
    let (b_pem, b_key, b_der) = make_cert("site-b");
    let cert = dir.path().join("site.pem");
    let key = dir.path().join("site.key");
    std::fs::write(&cert, &a_pem).unwrap();
    std::fs::write(&key, &a_key).unwrap();
    let p = Proc::spawn(
        dir.path(),
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.to_string_lossy(),
            key.to_string_lossy()
        ),
    )
    .await;
    let roots = [a_der.clone(), b_der.clone()];
    assert_eq!(presented(p.https, &roots).await, a_der);
    assert!(
        !dir.path().join("data/certs/ca.pem").exists(),
        "no CA is generated for a site certificate"
    );

    std::fs::write(&cert, &b_pem).unwrap();
    std::fs::write(&key, &b_key).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(p.https, &roots).await != b_der {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(reloads(&p, "ok").await, 1.0);

    // a broken renewal keeps the working certificate (once the reload was tried: counted)
    std::fs::write(&cert, "not a certificate").unwrap();
    unsafe { libc::kill(p.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&p, "failed").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(presented(p.https, &roots).await, b_der);
    assert_eq!(reloads(&p, "ok").await, 1.0);
}

/// `hangar_tls_reloads_total{result=...}`.
async fn reloads(p: &Proc, result: &str) -> f64 {
    p.metric(&format!("hangar_tls_reloads_total{{result=\"{result}\"}}"))
        .await
}

#[tokio::test]
async fn broken_site_certificate_stops_the_start_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("site.pem");
    std::fs::write(&cert, "garbage").unwrap();
    let cfg = dir.path().join("h.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\nplain_listen = \"\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
            dir.path().join("data").to_string_lossy(),
            cert.to_string_lossy(),
            dir.path().join("missing.key").to_string_lossy()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site.pem"), "{err}");
}

#[test]
fn invalid_config_is_refused_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:99999\"\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("http.listen"),
        "{err}"
    );
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = std::process::Command::new(bin())
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = dir.path().join("default.toml");
    std::fs::write(&printed, &out.stdout).unwrap();
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .arg(&printed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
