//! The README runs as written. Every ```sh block of README.md, in order — but those right after
//! a `<!-- not run: why -->` line — is run by bash in a fresh directory against the binary this
//! build made, with the appliance started as the README starts it except on ephemeral loopback
//! ports: the README's literal ports (8443, 8018, 1883, 8883) are replaced by the bound ones, and
//! the CLI finds the appliance through `HANGAR_CONFIG`. A block that fails fails the test with
//! the script's output.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, tool};

/// The README's ```sh blocks: (first line number, text, runnable).
fn blocks(readme: &str) -> Vec<(usize, String, bool)> {
    let mut out = Vec::new();
    let mut lines = readme.lines().enumerate().peekable();
    let mut last_text = "";
    while let Some((n, line)) = lines.next() {
        if line.trim() == "```sh" {
            let not_run = last_text.starts_with("<!-- not run:");
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push((n + 1, body, !not_run));
        } else if !line.trim().is_empty() {
            last_text = line.trim();
        }
    }
    out
}

#[test]
fn every_marked_block_says_why_it_is_not_run() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let all = blocks(&readme);
    assert!(
        all.iter().filter(|b| b.2).count() >= 8,
        "too few runnable blocks"
    );
    for l in readme.lines().filter(|l| l.starts_with("<!-- not run")) {
        assert!(l.len() > "<!-- not run: -->".len() + 5, "say why: {l}");
    }
    // the two commands a newcomer runs come first
    let first = &all[0].1;
    assert!(first.contains("cargo run --release -- serve") && first.contains("cargo test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs() {
    let tools = [
        ("bash", "bash"),
        ("curl", "curl"),
        ("jq", "jq"),
        ("mosquitto_pub", "mosquitto-clients"),
        ("mosquitto_sub", "mosquitto-clients"),
        ("bspatch", "bsdiff"),
    ];
    if tools.iter().any(|(t, p)| tool(t, p).is_none()) {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let config = work.join("hangar.toml");
    std::fs::write(
        &config,
        "data_dir = \"hangar-data\"\n[http]\nlisten = \"127.0.0.1:0\"\nplain_listen = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let log = std::fs::File::create(work.join("serve.log")).unwrap();
    let mut server = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(work)
        .env("RUST_LOG", "hangar=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let ports = wait_for_ports(&work.join("hangar-data/ports.json"), &mut server).await;
    let port = |k: &str| ports[k].as_u64().unwrap().to_string();

    // as a person's shell runs it, but stopping at the first failing command (no pipefail: a
    // `| head` that closes its pipe early is fine)
    let mut script = String::from("set -eu\nexec 2>&1\n");
    for (line, body, run) in blocks(&readme) {
        if !run {
            continue;
        }
        let body = body
            .replace(":8443", &format!(":{}", port("https")))
            .replace(":8018", &format!(":{}", port("http")))
            .replace("-p 8883", &format!("-p {}", port("mqtts")))
            .replace("-p 1883", &format!("-p {}", port("mqtt")));
        script.push_str(&format!("echo '--- README.md line {line}'\n{body}\n"));
    }
    script.push_str("echo '--- the walkthrough ran to its end'\n");
    std::fs::write(work.join("walkthrough.sh"), &script).unwrap();
    let bin_dir = bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = tokio::process::Command::new("bash")
        .arg(work.join("walkthrough.sh"))
        .current_dir(work)
        .env("PATH", path)
        .env("HANGAR_CONFIG", &config)
        .env("RUST_LOG", "hangar=warn")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pgid = child.id().unwrap() as i32;
    let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output()).await;
    // whatever the script left in the background (a subscriber, a simulator)
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = server.kill();
    let _ = server.wait();
    let out = out
        .expect("the walkthrough took longer than 10 minutes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // the transcript, for a person to read
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-walkthrough.log"),
        &text,
    );
    let tail: Vec<&str> = text.lines().rev().take(80).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success() && text.contains("--- the walkthrough ran to its end"),
        "the README walkthrough failed ({}); its last lines:\n{}\n(server log: {})",
        out.status,
        tail.join("\n"),
        std::fs::read_to_string(work.join("serve.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn wait_for_ports(p: &Path, server: &mut std::process::Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(p)
            && let Ok(v) = serde_json::from_str(&t)
        {
            return v;
        }
        assert!(Instant::now() < deadline, "the appliance did not start");
        if let Ok(Some(st)) = server.try_wait() {
            panic!("the appliance exited: {st}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
