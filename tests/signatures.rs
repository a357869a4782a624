//! Signed firmware and offline bundles, end to end with the real binary and Debian's
//! `minisign`: keys made by `hangar key generate` and by `minisign -G`; signatures made by each
//! accepted by the appliance and checked by the other tool; the release gate of
//! `require_signed`; an agent that installs a signed image and refuses one whose signature does
//! not match; a bundle with two firmware, a delta and a campaign plan imported over the API
//! and run over `hangar sim` devices; and every bad bundle refused with nothing imported.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, bin, image, tool};
use serde_json::{Value, json};

fn hangar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `hangar key generate DIR/NAME --no-password`; returns the public key's base64 line.
fn keypair(dir: &Path, name: &str) -> String {
    let (ok, out, err) = hangar(&["key", "generate", p(&dir.join(name)), "--no-password"]);
    assert!(ok, "{err}");
    out.trim().to_string()
}

fn sign(file: &Path, version: &str, key: &Path) -> String {
    let (ok, _, err) = hangar(&[
        "firmware",
        "sign",
        p(file),
        "--version",
        version,
        "--device-type",
        "gateway",
        "--key",
        p(key),
    ]);
    assert!(ok, "{err}");
    std::fs::read_to_string(format!("{}.minisig", file.display())).unwrap()
}

async fn upload_signed(s: &Server, version: &str, img: &[u8], sig: Option<&str>) -> (u16, Value) {
    let mut form = reqwest::multipart::Form::new().text("version", version.to_string());
    if let Some(sig) = sig {
        form = form.text("signature", sig.to_string());
    }
    form = form.part(
        "file",
        reqwest::multipart::Part::bytes(img.to_vec()).file_name("fw.bin"),
    );
    let r = s.post_form(form).await;
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

async fn release(s: &Server, version: &str) -> (u16, Value) {
    s.post_json(
        &format!("/api/ota/firmware/{version}/release?deviceType=gateway"),
        json!({}),
    )
    .await
}

#[tokio::test]
async fn signed_firmware_both_ways_with_minisign_and_the_release_gate() {
    let Some(minisign) = tool("minisign", "minisign") else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let vendor = keypair(keys.path(), "vendor");
    let _other = keypair(keys.path(), "other");
    // a key pair made by the stock tool (no password)
    let st = Command::new(&minisign)
        .args(["-G", "-W", "-p"])
        .arg(keys.path().join("stock.pub"))
        .arg("-s")
        .arg(keys.path().join("stock.key"))
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let stock = std::fs::read_to_string(keys.path().join("stock.pub")).unwrap();
    let s = Server::start_with(|c| {
        c.trust.require_signed = true;
        c.trust.keys = vec![
            hangar::config::TrustKeyConfig {
                name: "vendor".into(),
                key: vendor.clone(),
            },
            hangar::config::TrustKeyConfig {
                name: "stock".into(),
                key: stock.clone(),
            },
        ];
    })
    .await;

    // 1. signed by `hangar firmware sign`: valid, releasable, and minisign -V agrees
    let a = keys.path().join("a.bin");
    std::fs::write(&a, image(300_000, 1)).unwrap();
    let sig_a = sign(&a, "1.0.1", &keys.path().join("vendor.key"));
    let (st, b) = upload_signed(&s, "1.0.1", &std::fs::read(&a).unwrap(), Some(&sig_a)).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["signatureStatus"], "valid", "{b}");
    assert_eq!(b["data"]["signer"], "vendor");
    assert_eq!(b["data"]["signature"], sig_a);
    assert_eq!(release(&s, "1.0.1").await.0, 200);
    let v = Command::new(&minisign)
        .args(["-V", "-q", "-p"])
        .arg(keys.path().join("vendor.pub"))
        .arg("-m")
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "minisign -V refused our signature: {v:?}"
    );

    // 2. signed by the stock `minisign -S`: equally valid
    let bpath = keys.path().join("b.bin");
    std::fs::write(&bpath, image(200_000, 2)).unwrap();
    let st = Command::new(&minisign)
        .args(["-S", "-s"])
        .arg(keys.path().join("stock.key"))
        .arg("-m")
        .arg(&bpath)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let sig_b = std::fs::read_to_string(format!("{}.minisig", bpath.display())).unwrap();
    let (st, b) = upload_signed(&s, "1.0.2", &std::fs::read(&bpath).unwrap(), Some(&sig_b)).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(
        (
            b["data"]["signatureStatus"].as_str(),
            b["data"]["signer"].as_str()
        ),
        (Some("valid"), Some("stock")),
        "{b}"
    );
    assert_eq!(release(&s, "1.0.2").await.0, 200);

    // 3. unsigned, another image's signature, another version's, an untrusted key: recorded,
    //    never releasable under require_signed
    let (st, b) = upload_signed(&s, "1.0.3", &image(1000, 3), None).await;
    assert_eq!(
        (st, b["data"]["signatureStatus"].as_str()),
        (201, Some("none"))
    );
    let (st, b) = release(&s, "1.0.3").await;
    assert_eq!(st, 409, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("require_signed"),
        "{b}"
    );

    let (st, b) = upload_signed(&s, "1.0.4", &image(300_000, 4), Some(&sig_a)).await;
    assert_eq!(
        (st, b["data"]["signatureStatus"].as_str()),
        (201, Some("invalid")),
        "{b}"
    );
    assert!(
        b["data"]["signatureError"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{b}"
    );
    assert_eq!(release(&s, "1.0.4").await.0, 409);

    let c = keys.path().join("c.bin");
    std::fs::write(&c, image(5000, 5)).unwrap();
    let sig_c = sign(&c, "9.9.9", &keys.path().join("vendor.key"));
    let (st, b) = upload_signed(&s, "1.0.5", &std::fs::read(&c).unwrap(), Some(&sig_c)).await;
    assert_eq!(
        (st, b["data"]["signatureStatus"].as_str()),
        (201, Some("invalid")),
        "{b}"
    );
    assert!(
        b["data"]["signatureError"]
            .as_str()
            .unwrap()
            .contains("9.9.9"),
        "{b}"
    );

    let d = keys.path().join("d.bin");
    std::fs::write(&d, image(5000, 6)).unwrap();
    let sig_d = sign(&d, "1.0.6", &keys.path().join("other.key"));
    let (st, b) = upload_signed(&s, "1.0.6", &std::fs::read(&d).unwrap(), Some(&sig_d)).await;
    assert_eq!(
        (st, b["data"]["signatureStatus"].as_str()),
        (201, Some("invalid")),
        "{b}"
    );
    assert!(
        b["data"]["signatureError"]
            .as_str()
            .unwrap()
            .contains("not a trusted key"),
        "{b}"
    );
    assert!(b["data"]["signer"].is_null());

    // 4. a signature part that is not one: 400, nothing stored
    let (st, b) = upload_signed(&s, "1.0.7", &image(100, 7), Some("not a signature")).await;
    assert_eq!(st, 400, "{b}");
    assert_eq!(
        s.get_json("/api/ota/firmware/1.0.7?deviceType=gateway")
            .await
            .0,
        404
    );

    // the console's firmware page shows each signature's state and signer
    let page = console_firmware_page(&s).await;
    assert!(
        page.contains("by <b>vendor</b>") && page.contains("by <b>stock</b>"),
        "{page}"
    );
    assert!(page.contains("not a trusted key"), "{page}");
    // and the site key and the trusted keys with where they came from
    let (_, site) = s.get_json("/api/site").await;
    assert!(
        page.contains(site["data"]["siteKey"].as_str().unwrap()),
        "{page}"
    );
    assert!(
        page.contains("<b>vendor</b></td>") && page.contains(">config<"),
        "{page}"
    );
    assert!(
        !page.contains("unsigned-warning"),
        "require_signed is on: {page}"
    );
    let lax = Server::start().await;
    assert!(
        console_firmware_page(&lax)
            .await
            .contains("unsigned-warning")
    );

    // the site key is there for reports, and the keys are listed
    let (_, site) = s.get_json("/api/site").await;
    assert_eq!(site["data"]["requireSigned"], true);
    assert_eq!(site["data"]["trustedKeys"].as_array().unwrap().len(), 2);
    assert!(site["data"]["siteKey"].as_str().unwrap().starts_with("RW"));
}

/// The console's firmware page as a signed-in viewer sees it.
async fn console_firmware_page(s: &Server) -> String {
    let (st, b) = s
        .post_json(
            "/api/users",
            json!({"name": "vic", "role": "viewer", "password": "vic's long password"}),
        )
        .await;
    assert!(st == 201 || st == 409, "{b}");
    let r = s
        .client
        .post(s.url("/api/auth/login"))
        .json(&json!({"username": "vic", "password": "vic's long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let r = s
        .client
        .get(s.url("/firmware"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

struct Vendor {
    dir: tempfile::TempDir,
    public: String,
}

impl Vendor {
    fn new() -> Vendor {
        let dir = tempfile::tempdir().unwrap();
        let public = keypair(dir.path(), "vendor");
        Vendor { dir, public }
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("vendor.key")
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let f = self.dir.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        f
    }

    fn bundle(&self, out: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir.path().join(out);
        let key = self.key();
        let mut args = vec!["bundle", "create", "--key", p(&key), "--out", p(&out)];
        args.extend_from_slice(extra);
        let (ok, _, err) = hangar(&args);
        assert!(ok, "bundle create: {err}");
        out
    }
}

async fn import(s: &Server, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let r = s
        .client
        .post(s.url(&format!("/api/ota/bundles{query}")))
        .header("authorization", s.auth())
        .body(bytes)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap())
}

fn trusting(public: &str) -> impl FnOnce(&mut hangar::config::Config) + '_ {
    move |c| {
        c.trust.keys = vec![hangar::config::TrustKeyConfig {
            name: "vendor".into(),
            key: public.to_string(),
        }]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_round_trip_its_plan_runs_and_replays_are_refused() {
    let v = Vendor::new();
    let old = common::fixture("old.bin");
    let new = common::fixture("new.bin");
    let f1 = v.file("fw-1.0.1.bin", &old);
    let f2 = v.file("fw-1.0.2.bin", &new);
    let plan = v.file(
        "plan.json",
        json!({"name": "bundle rollout", "deviceType": "gateway", "version": "1.0.2",
               "targets": {"all": true}, "waves": [50, 100], "successThreshold": 90})
        .to_string()
        .as_bytes(),
    );
    let fw1 = format!("{}:gateway:1.0.1", p(&f1));
    let fw2 = format!("{}:gateway:1.0.2", p(&f2));
    let b = v.bundle(
        "b1.tar",
        &[
            "--firmware",
            &fw1,
            "--firmware",
            &fw2,
            "--deltas",
            "--plan",
            p(&plan),
            "--sequence",
            "5",
        ],
    );
    // offline verification, anywhere
    let vendor_pub = v.dir.path().join("vendor.pub");
    let (ok, out, err) = hangar(&["bundle", "verify", p(&b), "--key", p(&vendor_pub)]);
    assert!(ok && out.contains("valid"), "{out}{err}");

    let s = Server::start_with(trusting(&v.public)).await;
    // the site's devices run 1.0.1 (from an earlier upload; the bundle's copy is the same)
    s.release_bytes("1.0.1", "gateway", old.clone()).await;
    // devices that check signatures with the appliance's trusted keys, as the agent does
    let mut sim = s.sim(&[
        "--devices",
        "4",
        "--version",
        "1.0.1",
        "--register",
        "--verify-signatures",
        "--timeout",
        "120",
    ]);
    s.wait_online(4).await;
    let (ok, out, err) = s.cli(&["bundle", "import", p(&b)]);
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["imported"], true, "{r}");
    assert_eq!(r["firmware"], json!(["gateway/1.0.2"]));
    assert_eq!(r["unchanged"], json!(["gateway/1.0.1"]));
    assert_eq!(r["deltas"], json!(["gateway/1.0.1->1.0.2"]));
    let campaign = r["campaigns"][0].as_str().unwrap().to_string();

    let (_, fw) = s
        .get_json("/api/ota/firmware/1.0.2?deviceType=gateway")
        .await;
    assert_eq!(fw["data"]["status"], "released", "{fw}");
    assert_eq!(fw["data"]["signatureStatus"], "valid");
    assert_eq!(fw["data"]["sha256"], common::sha256_hex(&new));
    let (_, d) = s
        .get_json("/api/ota/firmware/1.0.2/deltas?deviceType=gateway")
        .await;
    assert_eq!(d["data"][0]["status"], "ready", "{d}");
    let (_, c) = s.get_json(&format!("/api/ota/campaigns/{campaign}")).await;
    assert_eq!(c["data"]["status"], "paused", "{c}");

    // the same bundle again: nothing new; an older sequence from the same signer: refused
    let bytes = std::fs::read(&b).unwrap();
    let (st, again) = import(&s, bytes.clone(), "").await;
    assert_eq!(
        (st, again["data"]["imported"].as_bool()),
        (200, Some(false)),
        "{again}"
    );
    // (it also carries a trust change: a second vendor key, trusted under its file name)
    let second = keypair(v.dir.path(), "second");
    let second_pub = v.dir.path().join("second.pub");
    let older = v.bundle(
        "b0.tar",
        &[
            "--firmware",
            &fw1,
            "--sequence",
            "4",
            "--trust",
            p(&second_pub),
        ],
    );
    let (st, b0) = import(&s, std::fs::read(&older).unwrap(), "").await;
    assert_eq!(st, 409, "{b0}");
    assert!(b0["message"].as_str().unwrap().contains("replayed"), "{b0}");
    let (st, b0) = import(&s, std::fs::read(&older).unwrap(), "?allowOlder=true").await;
    assert_eq!(st, 201, "{b0}");
    assert_eq!(b0["data"]["keys"], json!(["second"]), "{b0}");
    let (_, site) = s.get_json("/api/site").await;
    let keys = site["data"]["trustedKeys"].as_array().unwrap();
    let added = keys
        .iter()
        .find(|k| k["name"] == "second")
        .expect("the key is trusted now");
    assert_eq!(added["key"], second.as_str());
    assert!(
        added["origin"].as_str().unwrap().starts_with("bundle "),
        "{added}"
    );
    // and a firmware signed by it is valid here
    let f3 = v.file("fw-5.0.0.bin", &image(4000, 50));
    let sig3 = sign(&f3, "5.0.0", &v.dir.path().join("second.key"));
    let (st, up) = upload_signed(&s, "5.0.0", &std::fs::read(&f3).unwrap(), Some(&sig3)).await;
    assert_eq!(
        (st, up["data"]["signer"].as_str()),
        (201, Some("second")),
        "{up}"
    );

    // the plan runs over the simulated devices, which take the bundle's delta
    let (st, r) = s
        .post_json(&format!("/api/ota/campaigns/{campaign}/resume"), json!({}))
        .await;
    assert_eq!(st, 200, "{r}");
    let done = s
        .wait_campaign(&campaign, 120, |c| c["status"] == "completed")
        .await;
    assert_eq!(done["counts"]["completed"], 4, "{done}");
    // an unsigned image: the simulated device refuses it
    s.release_bytes("1.0.3", "gateway", image(5000, 33)).await;
    let (st, r) = s
        .post_json("/api/ota/upgrade/SIM0001", json!({"version": "1.0.3"}))
        .await;
    assert_eq!(st, 201, "{r}");
    let t = s
        .wait_task("SIM0001", |t| {
            t["toVersion"] == "1.0.3" && t["status"] == "failed"
        })
        .await;
    assert_eq!(t["errorCode"], "VERIFY_FAILED", "{t}");
    let _ = sim.kill().await;
    let (_, tasks) = s
        .get_json(&format!("/api/ota/tasks?campaignId={campaign}"))
        .await;
    let tasks = tasks["data"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 4);
    assert!(
        tasks.iter().all(|t| t["delta"]["fromVersion"] == "1.0.1"),
        "{tasks:?}"
    );
}

#[tokio::test]
async fn bad_bundles_are_refused_and_import_nothing() {
    let v = Vendor::new();
    let img = image(100_000, 11);
    let f = v.file("fw.bin", &img);
    let fw = format!("{}:gateway:2.0.0", p(&f));
    let good =
        std::fs::read(v.bundle("good.tar", &["--firmware", &fw, "--sequence", "10"])).unwrap();
    let s = Server::start_with(trusting(&v.public)).await;

    // where things are in the tar: manifest data at 512, its signature after it
    let manifest_len = {
        let mut t = hangar::bundle::TarReader::new(&good[..]);
        t.next_entry().unwrap().unwrap().size as usize
    };
    let sig_header = 512 + manifest_len.div_ceil(512) * 512;
    let image_at = sig_header + 1024; // signature header + one block of signature
    let mut cases: Vec<(&str, Vec<u8>, u16)> = Vec::new();
    let mut b = good.clone();
    b[image_at + 5000] ^= 1;
    cases.push(("a flipped byte in the image", b, 422));
    let mut b = good.clone();
    b[512 + manifest_len / 2] ^= 1;
    cases.push(("a flipped byte in the manifest", b, 422));
    // in the signature line (the first line is minisign's untrusted comment, which nothing
    // relies on)
    let line2 = sig_header
        + 512
        + good[sig_header + 512..]
            .iter()
            .position(|&c| c == b'\n')
            .unwrap()
        + 1;
    let mut b = good.clone();
    b[line2 + 30] = if b[line2 + 30] == b'A' { b'B' } else { b'A' };
    cases.push(("a flipped byte in the signature", b, 422));
    for cut in [
        100,
        512 + 10,
        sig_header + 100,
        image_at + 50_000,
        good.len() - 1024,
        good.len() - 1,
    ] {
        cases.push(("a truncated bundle", good[..cut].to_vec(), 400));
    }
    // signed by a key the site does not trust (also: a trust change in it counts for nothing)
    let stranger = Vendor::new();
    let new_pub = format!("extra={}", p(&v.dir.path().join("vendor.pub")));
    let untrusted =
        std::fs::read(stranger.bundle("s.tar", &["--firmware", &fw, "--trust", &new_pub])).unwrap();
    cases.push(("an untrusted signer with a trust change", untrusted, 422));
    // entries that are not the manifest's: `..`, absolute, a link, an extra, a duplicate, missing
    let (manifest, sig) = {
        let mut t = hangar::bundle::TarReader::new(&good[..]);
        let m = hangar::bundle::read_small(&mut t, "bundle.json", 1 << 20).unwrap();
        let s = hangar::bundle::read_small(&mut t, "bundle.json.minisig", 4096).unwrap();
        (m, s)
    };
    let tar_with = |entries: &[(&str, &[u8])]| {
        let mut out = Vec::new();
        for (name, data) in [
            ("bundle.json", &manifest[..]),
            ("bundle.json.minisig", &sig[..]),
        ]
        .into_iter()
        .chain(entries.iter().copied())
        {
            hangar::bundle::write_entry(&mut out, name, &mut &data[..], data.len() as u64).unwrap();
        }
        hangar::bundle::write_end(&mut out).unwrap();
        out
    };
    // names the tar crate will not write: patched into the header by hand
    let renamed = |name: &str| {
        let mut t = tar_with(&[("xxxxxxxxxxxxxxxxx", &img)]);
        let at = 512 + manifest_len.div_ceil(512) * 512 + 1024;
        let mut h = tar::Header::from_byte_slice(&t[at..at + 512]).clone();
        let bytes = h.as_mut_bytes();
        bytes[..100].fill(0);
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        t[at..at + 512].copy_from_slice(h.as_bytes());
        t
    };
    cases.push(("a `..` entry", renamed("../firmware/0.bin"), 400));
    cases.push(("an absolute entry", renamed("/firmware/0.bin"), 400));
    cases.push((
        "an unlisted entry",
        tar_with(&[("firmware/0.bin", &img), ("firmware/1.bin", &img)]),
        400,
    ));
    cases.push((
        "a duplicate entry",
        tar_with(&[("firmware/0.bin", &img), ("firmware/0.bin", &img)]),
        400,
    ));
    cases.push(("a listed file missing", tar_with(&[]), 400));
    let many: Vec<(String, Vec<u8>)> = (0..100_000)
        .map(|i| (format!("x/{i}"), Vec::new()))
        .collect();
    let many_refs: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    cases.push(("100,000 entries", tar_with(&many_refs), 400));
    let mut link = tar_with(&[]);
    link.truncate(link.len() - 1024);
    let mut h = tar::Header::new_ustar();
    h.set_path("firmware/0.bin").unwrap();
    h.set_size(0);
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_link_name("/etc/shadow").unwrap();
    h.set_cksum();
    link.extend_from_slice(h.as_bytes());
    hangar::bundle::write_end(&mut link).unwrap();
    cases.push(("a symbolic link", link, 400));

    for (what, bytes, want) in cases {
        let (st, b) = import(&s, bytes, "").await;
        assert_eq!(st, want, "{what}: {b}");
        assert_eq!(b["status"], false, "{what}: {b}");
        let (_, list) = s.get_json("/api/ota/firmware").await;
        assert_eq!(list["data"], json!([]), "{what} imported something");
    }
    assert_eq!(s.files_under("tmp"), 0, "staged files are cleaned up");
    assert_eq!(s.files_under("blobs"), 0);

    // the same (type, version) with other content is a conflict; the good one then imports
    s.release_bytes("2.0.0", "gateway", image(100_000, 99))
        .await;
    let (st, b) = import(&s, good.clone(), "").await;
    assert_eq!(st, 409, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("other content"),
        "{b}"
    );
    let (st, b) = s
        .delete_json("/api/ota/firmware/2.0.0?deviceType=gateway")
        .await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = import(&s, good, "").await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["firmware"], json!(["gateway/2.0.0"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_installs_a_signed_image_and_refuses_a_bad_signature() {
    let v = Vendor::new();
    let s = Server::start_with(trusting(&v.public)).await;
    s.register("GW-S", "gateway", "agent-secret").await;
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    let script = |ver: &str| format!("#!/bin/sh\n# app {ver}\nexec sleep 600\n").into_bytes();
    std::fs::write(&app, script("1.0.0")).unwrap();
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"GW-S\"\nsecret = \"agent-secret\"\nprotocol = \"gateway\"\ndevice_type = \"gateway\"\n\
             mqtt_url = \"mqtts://localhost:{}\"\nca_file = {:?}\napp_path = {:?}\ninitial_version = \"1.0.0\"\n\
             state_dir = {:?}\nrestart = \"supervise\"\nhealth_secs = 1\ntrusted_keys = [{:?}]\nrequire_signed = true\n",
            s.mqtts,
            s.dir.path().join("certs/ca.pem"),
            app,
            work.path().join("state"),
            v.public,
        ),
    )
    .unwrap();
    let mut agent = Command::new(bin())
        .args(["agent", "--config"])
        .arg(&config)
        .env("RUST_LOG", "hangar=info")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    s.wait_for("/api/ota/devices/GW-S", 30, |d| {
        d["firmwareVersion"] == "1.0.0"
    })
    .await;

    let good = v.file("good.bin", &script("1.1.0"));
    let sig = sign(&good, "1.1.0", &v.key());
    let (st, b) = upload_signed(&s, "1.1.0", &script("1.1.0"), Some(&sig)).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(release(&s, "1.1.0").await.0, 200);
    s.post_json("/api/ota/upgrade/GW-S", json!({"version": "1.1.0"}))
        .await;
    let t = s
        .wait_task("GW-S", |t| {
            t["toVersion"] == "1.1.0" && t["status"] == "completed"
        })
        .await;
    assert_eq!(t["status"], "completed");
    assert_eq!(std::fs::read(&app).unwrap(), script("1.1.0"));

    // another image under the good signature: the server records it invalid (require_signed is
    // off here), the command carries the signature, and the agent refuses to install it
    let (st, b) = upload_signed(&s, "1.2.0", &script("1.2.0"), Some(&sig)).await;
    assert_eq!(
        (st, b["data"]["signatureStatus"].as_str()),
        (201, Some("invalid")),
        "{b}"
    );
    assert_eq!(release(&s, "1.2.0").await.0, 200);
    s.post_json("/api/ota/upgrade/GW-S", json!({"version": "1.2.0"}))
        .await;
    let t = s
        .wait_task("GW-S", |t| {
            t["toVersion"] == "1.2.0" && t["status"] == "failed"
        })
        .await;
    assert_eq!(t["errorCode"], "VERIFY_FAILED", "{t}");
    assert!(
        t["errorMessage"].as_str().unwrap().contains("signature"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(&app).unwrap(),
        script("1.1.0"),
        "nothing was installed"
    );

    // unsigned, with require_signed on the device: refused too
    s.release_bytes("1.3.0", "gateway", script("1.3.0")).await;
    s.post_json("/api/ota/upgrade/GW-S", json!({"version": "1.3.0"}))
        .await;
    let t = s
        .wait_task("GW-S", |t| {
            t["toVersion"] == "1.3.0" && t["status"] == "failed"
        })
        .await;
    assert_eq!(t["errorCode"], "VERIFY_FAILED", "{t}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_import_leaves_nothing_and_the_import_can_be_done_again() {
    let v = Vendor::new();
    let f1 = v.file("a.bin", &image(3_000_000, 21));
    let f2 = v.file("b.bin", &image(3_000_000, 22));
    let (a, b) = (
        format!("{}:gateway:3.0.0", p(&f1)),
        format!("{}:gateway:3.0.1", p(&f2)),
    );
    let bundle = std::fs::read(v.bundle("k.tar", &["--firmware", &a, "--firmware", &b])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trust = format!(
        "[trust]\nkeys = [{{name = \"vendor\", key = {:?}}}]\n",
        v.public
    );
    let mut proc = common::Proc::spawn(dir.path(), &trust).await;
    let data = dir.path().join("data");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    // everything up to the middle of the second image, then the client holds the connection
    let half = bundle.len() - 1_500_000;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tx.send(Ok(bundle[..half].to_vec())).await.unwrap();
    let url = format!("http://127.0.0.1:{}/api/ota/bundles", proc.http);
    let body = reqwest::Body::wrap_stream(tokio_stream_of(rx));
    let send = tokio::spawn(
        reqwest::Client::new()
            .post(url)
            .bearer_auth(token.trim())
            .body(body)
            .send(),
    );
    // the first image is staged and the second is being written: two files in tmp/
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::count_files(&data.join("tmp")) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the import never got that far"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    proc.kill9();
    let _ = send.await;
    drop(tx);

    let proc = common::Proc::spawn(dir.path(), &trust).await;
    let (ok, out, err) = proc.cli(&["firmware", "list"]);
    assert!(ok, "{err}");
    assert!(!out.contains("3.0."), "{out}");
    assert_eq!(
        common::count_files(&data.join("blobs")),
        0,
        "no orphan blob"
    );
    assert_eq!(common::count_files(&data.join("tmp")), 0);
    // nothing of the bundle was recorded: the same bundle imports in full
    let k = v.dir.path().join("k.tar");
    let (ok, out, err) = proc.cli(&["bundle", "import", p(&k)]);
    assert!(ok, "{err}");
    assert!(out.contains("gateway/3.0.1"), "{out}");
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// the CLI is a blocking child process talking to the in-process server: two workers
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_report_verifies_anywhere_and_incremental_ones_continue_the_chain() {
    let s = Server::start().await;
    let cli = |args: &[&str]| s.cli(args);
    s.register("GW-R", "gateway", "report-secret").await;
    s.release("1.0.1", "gateway", 1000).await;
    let work = tempfile::tempdir().unwrap();
    let (ok, site_pub, err) = cli(&["site", "key"]);
    assert!(ok, "{err}");
    let site = work.path().join("site.pub");
    std::fs::write(&site, &site_pub).unwrap();

    let r1 = work.path().join("r1.tar");
    let (ok, _, err) = cli(&["report", "export", "--out", p(&r1)]);
    assert!(ok, "{err}");
    let (ok, out, err) = hangar(&["report", "verify", p(&r1), "--site-key", p(&site)]);
    assert!(ok && out.contains("valid"), "{out}{err}");
    let report = |f: &Path| -> Value {
        let mut t = hangar::bundle::TarReader::new(std::fs::File::open(f).unwrap());
        serde_json::from_slice(&hangar::bundle::read_small(&mut t, "report.json", 1 << 30).unwrap())
            .unwrap()
    };
    let first = report(&r1);
    assert_eq!(first["devices"][0]["id"], "GW-R", "{first}");
    let actions: Vec<&str> = first["audit"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"firmware.upload") && actions.contains(&"device.register"),
        "{actions:?}"
    );

    // the stock minisign checks the extracted report.json with the site key
    if let Some(minisign) = tool("minisign", "minisign") {
        let dir = work.path().join("x");
        std::fs::create_dir(&dir).unwrap();
        assert!(
            Command::new("tar")
                .arg("xf")
                .arg(&r1)
                .arg("-C")
                .arg(&dir)
                .status()
                .unwrap()
                .success()
        );
        let v = Command::new(minisign)
            .args(["-V", "-q", "-p"])
            .arg(&site)
            .arg("-m")
            .arg(dir.join("report.json"))
            .output()
            .unwrap();
        assert!(v.status.success(), "{v:?}");
    }

    // more changes, then an incremental export that continues the chain
    s.release("1.0.2", "gateway", 1000).await;
    let to = first["to"].as_u64().unwrap().to_string();
    let r2 = work.path().join("r2.tar");
    let (ok, _, err) = cli(&["report", "export", "--out", p(&r2), "--since", &to]);
    assert!(ok, "{err}");
    let second = report(&r2);
    assert_eq!(second["audit"]["previousHash"], first["audit"]["lastHash"]);
    let (ok, out, err) = hangar(&[
        "report",
        "verify",
        p(&r2),
        "--site-key",
        p(&site),
        "--previous",
        p(&r1),
    ]);
    assert!(ok, "{out}{err}");
    // a report that does not continue the one named: refused
    let (ok, _, err) = hangar(&[
        "report",
        "verify",
        p(&r1),
        "--site-key",
        p(&site),
        "--previous",
        p(&r2),
    ]);
    assert!(!ok && err.contains("does not continue"), "{err}");

    // an edited report (an audit entry's result changed, the tar rebuilt): refused
    let mut edited = report(&r2);
    edited["audit"]["entries"][0]["result"] = json!("ok (edited)");
    let sig = {
        let mut t = hangar::bundle::TarReader::new(std::fs::File::open(&r2).unwrap());
        hangar::bundle::read_small(&mut t, "report.json", 1 << 30).unwrap();
        hangar::bundle::read_small(&mut t, "report.json.minisig", 4096).unwrap()
    };
    let json_bytes = serde_json::to_vec_pretty(&edited).unwrap();
    let mut tar = Vec::new();
    for (name, data) in [
        ("report.json", &json_bytes[..]),
        ("report.json.minisig", &sig[..]),
    ] {
        hangar::bundle::write_entry(&mut tar, name, &mut &data[..], data.len() as u64).unwrap();
    }
    hangar::bundle::write_end(&mut tar).unwrap();
    let bad = work.path().join("bad.tar");
    std::fs::write(&bad, tar).unwrap();
    let (ok, _, err) = hangar(&["report", "verify", p(&bad), "--site-key", p(&site)]);
    assert!(!ok && err.contains("not signed by this site key"), "{err}");
    // another site's key: refused
    let other = keypair(work.path(), "other");
    let (ok, _, _) = hangar(&["report", "verify", p(&r1), "--site-key", &other]);
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_cannot_trust_another_key_under_a_name_the_config_uses() {
    let v = Vendor::new();
    let s = Server::start_with(trusting(&v.public)).await;
    let other = keypair(v.dir.path(), "other");
    let other_pub = v.dir.path().join("other.pub");
    let fw = v.file("fw-1.0.1.bin", &image(3000, 61));
    let fw = format!("{}:gateway:1.0.1", p(&fw));
    let clash = format!("vendor={}", p(&other_pub));
    let b = v.bundle("clash.tar", &["--firmware", &fw, "--trust", &clash]);
    let (st, body) = import(&s, std::fs::read(&b).unwrap(), "").await;
    assert_eq!(st, 409, "{body}");
    assert_eq!(body["error"], "CONFLICT", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("\"vendor\""),
        "{body}"
    );
    // nothing of it was imported
    let (_, site) = s.get_json("/api/site").await;
    let keys = site["data"]["trustedKeys"].as_array().unwrap();
    assert!(keys.iter().all(|k| k["key"] != other.as_str()), "{site}");
    let (st, _) = s.get_json("/api/ota/firmware/1.0.1").await;
    assert_eq!(st, 404);
    // the same key under the config's name is no clash: it imports
    let same = format!("vendor={}", p(&v.dir.path().join("vendor.pub")));
    let b = v.bundle(
        "same.tar",
        &["--firmware", &fw, "--trust", &same, "--sequence", "2"],
    );
    let (st, body) = import(&s, std::fs::read(&b).unwrap(), "").await;
    assert_eq!(st, 201, "{body}");
}

/// A bundle's plan imported before any of its devices registered still becomes a campaign:
/// paused, saying it waits for matching devices, which join it as they register; the CLI says
/// on stderr what it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundles_plan_waits_for_its_devices_instead_of_vanishing() {
    let v = Vendor::new();
    let f1 = v.file("fw-1.0.1.bin", &image(3000, 71));
    let f2 = v.file("fw-1.0.2.bin", &image(3000, 72));
    let plan = v.file(
        "plan.json",
        json!({"name": "later", "deviceType": "gateway", "version": "1.0.2",
               "targets": {"fromVersions": ["1.0.1"]}})
        .to_string()
        .as_bytes(),
    );
    let fw1 = format!("{}:gateway:1.0.1", p(&f1));
    let fw2 = format!("{}:gateway:1.0.2", p(&f2));
    let b = v.bundle(
        "b.tar",
        &["--firmware", &fw1, "--firmware", &fw2, "--plan", p(&plan)],
    );
    let s = Server::start_with(trusting(&v.public)).await;
    let (ok, out, err) = s.cli(&["bundle", "import", p(&b)]);
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let id = r["campaigns"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no campaign from the plan: {r}"))
        .to_string();
    assert!(err.contains(&format!("campaign {id} created")), "{err}");
    let (_, c) = s.get_json(&format!("/api/ota/campaigns/{id}")).await;
    let c = &c["data"];
    assert_eq!(c["status"], "paused", "{c}");
    assert_eq!(c["total"], 0, "{c}");
    assert!(
        c["statusReason"]
            .as_str()
            .unwrap()
            .contains("waits for devices of type gateway matching its targets"),
        "{c}"
    );
    // devices register: they join it (still paused), then it runs when started
    let sim = s.sim(&[
        "--devices",
        "2",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "60",
    ]);
    s.wait_online(2).await;
    s.wait_campaign(&id, 30, |c| c["total"] == 2).await;
    let (st, r) = s
        .post_json(&format!("/api/ota/campaigns/{id}/resume"), json!({}))
        .await;
    assert_eq!(st, 200, "{r}");
    let done = s
        .wait_campaign(&id, 60, |c| c["status"] == "completed")
        .await;
    assert_eq!(done["counts"]["completed"], 2, "{done}");
    let _ = common::sim_result(sim, 60).await;
}
