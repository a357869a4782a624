//! The device and task CLI verbs against the real binary: add, import (CSV with a bad line),
//! list, show, upgrade, task, task --cancel.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn device_and_task_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), "").await;
    let run = |args: &[&str]| p.cli(args);
    let (ok, out, err) = run(&[
        "device",
        "add",
        "GW1",
        "--secret",
        "password1",
        "--tags",
        "line-3,hall-a",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["tags"],
        serde_json::json!(["line-3", "hall-a"])
    );

    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "id,deviceType,protocol,secret,tags\nGW2,gateway,gateway,password2,line-3\npk1/oven-1,,alibaba,password3,\nGW1,gateway,gateway,password1,\nbad id,gateway,gateway,password4,\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["device", "import", csv.to_str().unwrap()]);
    assert!(!ok, "two lines fail, so the import fails as a whole");
    assert!(out.contains("imported 2, failed 2"), "{out}");
    assert!(err.contains("GW1") && err.contains("bad id"), "{err}");

    let (ok, out, _) = run(&["device", "list"]);
    assert!(ok);
    for id in ["GW1", "GW2", "pk1/oven-1"] {
        assert!(out.contains(id), "{out}");
    }
    let (ok, out, err) = run(&["device", "show", "pk1/oven-1"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["deviceType"],
        "pk1"
    );

    let img = dir.path().join("fw.bin");
    std::fs::write(&img, image(1000, 1)).unwrap();
    assert!(
        run(&[
            "firmware",
            "upload",
            img.to_str().unwrap(),
            "--version",
            "1.0.2"
        ])
        .0
    );
    assert!(run(&["firmware", "release", "1.0.2"]).0);
    let (ok, out, err) = run(&["upgrade", "GW2", "--version", "1.0.2"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "pending"
    );
    let (ok, _, err) = run(&["upgrade", "GW2", "--version", "1.0.2"]);
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, out, _) = run(&["task", "GW2"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["toVersion"],
        "1.0.2"
    );
    let (ok, out, err) = run(&["task", "GW2", "--cancel"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "cancelled"
    );
    // --follow on a finished task prints it and reports that it did not complete
    let (ok, _, err) = run(&["task", "GW2", "--follow"]);
    assert!(!ok && err.contains("cancelled"), "{err}");
    let (ok, _, err) = run(&["device", "delete", "GW1"]);
    assert!(ok, "{err}");
}

/// The CLI as people use it: every device listed (pages, a "more" line, --all), tags changed,
/// imports that update, tasks filtered, same-version and downgrade upgrades refused unless
/// asked for, a closed pipe, errors on one line without a backtrace, aligned tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_everything_and_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), "").await;
    let run = |args: &[&str]| p.cli(args);
    let devices: Vec<Value> = (0..1005)
        .map(|i| serde_json::json!({"id": format!("D{i:04}"), "secret": "secret-123", "tags": ["a"]}))
        .collect();
    let file = dir.path().join("devices.json");
    std::fs::write(&file, serde_json::to_string(&devices).unwrap()).unwrap();
    let (ok, out, err) = run(&["device", "import", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");

    // every device, not silently the first 1,000
    let (ok, out, _) = run(&["device", "list"]);
    assert!(ok);
    assert_eq!(
        out.lines().count(),
        1002,
        "header, 1000 rows, the more line"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("... 5 more devices (of 1005)"),
        "{}",
        out.lines().last().unwrap()
    );
    let (_, out, _) = run(&["device", "list", "--all"]);
    assert_eq!(out.lines().count(), 1006);
    assert!(out.contains("D1004"));
    // aligned: every row's second column starts where its header does
    let col = out.lines().next().unwrap().find("PROTOCOL").unwrap();
    for l in out.lines().skip(1) {
        assert_eq!(&l[col..col + 7], "gateway", "{l}");
    }
    // a closed pipe is no panic
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --config {} device list --all | head -1",
            bin().display(),
            p.config.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&sh.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&sh.stdout).lines().count(), 1);

    // tags: change one device, update many through an import
    let (ok, out, err) = run(&["device", "tag", "D0001", "--add", "line-3", "--remove", "a"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["tags"],
        serde_json::json!(["line-3"])
    );
    let csv = dir.path().join("update.csv");
    std::fs::write(
        &csv,
        "id,secret,tags\nD0002,secret-123,line-3;hall-b\nD0003,secret-123,line-3\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["device", "import", csv.to_str().unwrap()]);
    assert!(!ok && err.contains("already registered"), "{err}");
    // an update needs no secret column
    std::fs::write(&csv, "id,tags\nD0002,line-3;hall-b\nD0003,line-3\n").unwrap();
    let (ok, out, err) = run(&["device", "import", "--update", csv.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(&["device", "list", "--tag", "line-3"]);
    let ids: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, ["D0001", "D0002", "D0003"], "{out}");

    // upgrades: the version a device runs, or an older one, only when asked for
    let img = dir.path().join("fw.bin");
    for v in ["1.0.1", "1.0.2"] {
        std::fs::write(&img, image(1000, v.len() as u64)).unwrap();
        assert!(run(&["firmware", "upload", img.to_str().unwrap(), "--version", v]).0);
        assert!(run(&["firmware", "release", v]).0);
    }
    // D0005 says it runs 1.0.2
    let ports: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/ports.json")).unwrap())
            .unwrap();
    let mqtt = ports["mqtt"].as_u64().unwrap() as u16;
    let d = common::mqtt::Device::connect(mqtt, "d5", Some(("D0005", "secret-123")), None).await;
    d.publish(
        "hanqi/gateway/D0005/report",
        serde_json::json!({"msgType":"heartbeat","data":{"firmwareVersion":"1.0.2"}}),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !run(&["device", "show", "D0005"])
        .1
        .contains("\"firmwareVersion\": \"1.0.2\"")
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (ok, _, err) = run(&["upgrade", "D0005", "--version", "1.0.2"]);
    assert!(
        !ok && err.contains("409") && err.contains("already runs 1.0.2"),
        "{err}"
    );
    let (ok, _, err) = run(&["upgrade", "D0005", "--version", "1.0.1"]);
    assert!(
        !ok && err.contains("409") && err.contains("newer than 1.0.1"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "upgrade",
        "D0005",
        "--version",
        "1.0.1",
        "--allow-downgrade",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["task", "D0005", "--cancel"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(&["upgrade", "D0005", "--version", "1.0.2", "--force"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["tasks", "--device", "D0005", "--status", "cancelled"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("1.0.2 -> 1.0.1") && out.contains("cancelled"),
        "{out}"
    );
    drop(d);

    // one line per error, no backtrace even when asked for one
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&p.config)
        .args(["upgrade", "NOPE", "--version", "1.0.2"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("hangar: 404: device NOPE is not registered"),
        "{err}"
    );
    assert!(
        !err.contains("backtrace") && !err.contains("Caused by"),
        "{err}"
    );
}

#[tokio::test]
async fn logs_off_a_terminal_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\nplain_listen = \"\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "hangar=info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("hangar is serving") {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "{t}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file:\n{text}"
    );
}

/// What a newcomer and a script meet: `--json` on every list and show verb (so `| jq` works),
/// filters by type and protocol, errors that name flags instead of API fields, a restore that
/// names the file it cannot find, help that offers only what applies, and `campaign show
/// --follow` into a pipe: a line per change, why it waits, and an exit status by outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_json_names_its_flags_and_follows_into_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), "").await;
    let run = |args: &[&str]| p.cli(args);
    let json = |args: &[&str]| -> Value {
        let (ok, out, err) = run(args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} is not JSON ({e}): {out}"))
    };
    for (id, proto) in [("GW1", "gateway"), ("pk1/oven-1", "alibaba")] {
        assert!(
            run(&[
                "device",
                "add",
                id,
                "--secret",
                "password1",
                "--protocol",
                proto
            ])
            .0
        );
    }
    let img = dir.path().join("fw.bin");
    std::fs::write(&img, image(1000, 1)).unwrap();
    for v in ["1.0.1", "1.0.2"] {
        assert!(run(&["firmware", "upload", img.to_str().unwrap(), "--version", v]).0);
        assert!(run(&["firmware", "release", v]).0);
    }
    // every list and show verb, as JSON
    assert_eq!(
        json(&["firmware", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        json(&["firmware", "show", "1.0.1", "--json"])["version"],
        "1.0.1"
    );
    assert_eq!(
        json(&["device", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(json(&["device", "show", "GW1", "--json"])["id"], "GW1");
    let ali = json(&["device", "list", "--json", "--protocol", "alibaba"]);
    assert_eq!(ali.as_array().unwrap().len(), 1, "{ali}");
    assert_eq!(ali[0]["id"], "pk1/oven-1");
    let gw = json(&["device", "list", "--json", "--type", "gateway"]);
    assert_eq!(gw.as_array().unwrap().len(), 1, "{gw}");
    assert!(json(&["tasks", "--json"]).is_array());
    assert!(json(&["campaign", "list", "--json"]).is_array());
    assert!(json(&["user", "list", "--json"]).is_array());
    // the connection options may follow the verb
    let url = format!("http://127.0.0.1:{}", p.http);
    assert!(json(&["firmware", "list", "--json", "--url", &url]).is_array());

    // errors name the flags
    let (ok, _, err) = run(&["upgrade", "GW1", "--version", "1.0.1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["upgrade", "GW1", "--version", "1.0.1"]);
    assert!(!ok && err.contains("pass --force"), "{err}");
    assert!(!err.contains("pass force"), "{err}");

    // a restore names what it cannot find
    let (ok, _, err) = run(&[
        "restore",
        "/nonexistent/backup.tar",
        "--data-dir",
        dir.path().join("restored").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("/nonexistent/backup.tar"), "{err}");

    // help offers what applies, and nothing internal
    for verb in [
        &["delta", "make"][..],
        &["serve"],
        &["key", "generate"],
        &["config", "check"],
    ] {
        let mut args = verb.to_vec();
        args.push("--help");
        let (ok, out, err) = run(&args);
        assert!(ok, "{err}");
        for opt in ["--url", "--token", "--mqtt"] {
            assert!(!out.contains(opt), "{verb:?} --help offers {opt}: {out}");
        }
    }
    let (_, out, _) = run(&["firmware", "list", "--help"]);
    assert!(out.contains("--url") && !out.contains("--mqtt"), "{out}");
    let (_, out, _) = run(&["sim", "--help"]);
    assert!(out.contains("--mqtt"), "{out}");
    assert!(!out.contains("SPEC") && !out.contains("section"), "{out}");

    // --follow into a pipe: a line per change with the reason, the exit by outcome
    let body = dir.path().join("c.json");
    std::fs::write(
        &body,
        r#"{"name":"held","version":"1.0.2","targets":{"deviceIds":["GW1"]},"startAt":"2099-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let c = json(&["campaign", "create", body.to_str().unwrap()]);
    let id = c["id"].as_str().unwrap().to_string();
    let mut follow = tokio::process::Command::new(bin())
        .args([
            "--config",
            p.config.to_str().unwrap(),
            "campaign",
            "show",
            &id,
            "--follow",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(follow.stdout.take().unwrap());
    let mut first = String::new();
    let read = tokio::io::AsyncBufReadExt::read_line(&mut out, &mut first);
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("no line off a terminal")
        .unwrap();
    assert!(
        first.contains("scheduled") && first.contains("2099"),
        "{first}"
    );
    let (ok, _, err) = run(&["campaign", "cancel", &id]);
    assert!(ok, "{err}");
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), follow.wait())
        .await
        .expect("--follow did not end with the campaign")
        .unwrap();
    assert_eq!(status.code(), Some(2), "a cancelled campaign exits 2");
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut out, &mut rest)
        .await
        .unwrap();
    assert!(rest.contains("cancelled"), "{rest}");
}
