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
