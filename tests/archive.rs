//! The task archive: finished tasks beyond the newest N of each device leave the store for
//! gzip files that `zcat` reads, the API still lists them, the statistics and the site report
//! still count them, backups carry them, and a file an interrupted pass left is removed.

mod common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

/// Ids of a task page, in order.
fn ids(page: &Value) -> Vec<u64> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Makes a finished (cancelled) task for `device`; its id.
async fn finished_task(s: &Server, device: &str) -> u64 {
    let (st, t) = s
        .post_json(
            &format!("/api/ota/upgrade/{device}"),
            json!({"version": "1.0.1"}),
        )
        .await;
    assert_eq!(st, 201, "{t}");
    let (st, b) = s
        .post_json(&format!("/api/ota/task/{device}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200, "{b}");
    t["data"]["id"].as_str().unwrap().parse().unwrap()
}

/// A task list: its `X-Total-Count` and the page.
async fn listed(s: &Server, path: &str) -> (u64, Value) {
    let r = s
        .client
        .get(s.url(path))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let total = r.headers()["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (total, r.json().await.unwrap())
}

fn stats(v: &Value) -> (u64, u64, u64) {
    let d = &v["data"];
    (
        d["total"].as_u64().unwrap(),
        d["cancelled"].as_u64().unwrap_or(u64::MAX),
        d["failed"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_move_to_the_archive_and_stay_readable() {
    let mut s = Server::start().await;
    s.release("1.0.1", "gateway", 4096).await;
    s.register("GW1", "gateway", "secret-123").await;
    s.register("GW2", "gateway", "secret-123").await;
    let mut gw1 = Vec::new();
    for _ in 0..4 {
        gw1.push(finished_task(&s, "GW1").await);
    }
    let gw2 = [
        finished_task(&s, "GW2").await,
        finished_task(&s, "GW2").await,
    ];
    // GW2's newest task is active: it never counts against the finished ones kept
    let (st, active) = s
        .post_json("/api/ota/upgrade/GW2", json!({"version": "1.0.1"}))
        .await;
    assert_eq!(st, 201, "{active}");
    let before = s.get_json("/api/ota/statistics").await.1;
    assert_eq!(stats(&before).0, 7, "{before}");
    let cancelled = "hangar_tasks{state=\"cancelled\"}";
    assert_eq!(s.metric(cancelled).await, 6.0);

    // off by default: a pass needs a number
    let (st, b) = s.post_json("/api/ota/tasks/archive", json!({})).await;
    assert_eq!(st, 400, "{b}");
    assert_eq!(b["status"], false);
    let (st, b) = archive_pass(&s, 0).await;
    assert_eq!(st, 400, "{b}");
    let (st, b) = archive_pass(&s, 1).await;
    assert_eq!(st, 200, "{b}");
    // GW1 keeps its newest finished task, GW2 its newest finished one (and its active one)
    assert_eq!(b["data"]["archived"], 4, "{b}");
    let file = b["data"]["files"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(b["data"]["files"][0]["tasks"], 4);

    let (_, in_store) = listed(&s, "/api/ota/tasks").await;
    let mut want_store = vec![
        gw1[3],
        gw2[1],
        active["data"]["id"].as_str().unwrap().parse().unwrap(),
    ];
    want_store.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&in_store), want_store, "{in_store}");
    let (total, archived) = listed(&s, "/api/ota/tasks?archived=true").await;
    assert_eq!(total, 4, "{archived}");
    let mut want_archived = vec![gw1[0], gw1[1], gw1[2], gw2[0]];
    want_archived.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&archived), want_archived, "newest first: {archived}");
    assert_eq!(archived["data"][0]["status"], "cancelled");
    // filters and paging as on the store's tasks
    let (total, page) = listed(
        &s,
        "/api/ota/tasks?archived=true&deviceId=GW1&limit=1&offset=1",
    )
    .await;
    assert_eq!((total, ids(&page)), (3, vec![gw1[1]]), "{page}");
    let (total, page) = listed(&s, "/api/ota/tasks?archived=true&deviceId=GW1&limit=2").await;
    assert_eq!((total, ids(&page)), (3, vec![gw1[2], gw1[1]]), "{page}");
    let (total, page) = listed(&s, "/api/ota/tasks?archived=true&status=completed").await;
    assert_eq!(total, 0, "{page}");
    let (st, _) = s.get_json("/api/ota/tasks?archived=maybe").await;
    assert_eq!(st, 400);
    // the statistics and the metrics still count them
    let after = s.get_json("/api/ota/statistics").await.1;
    assert_eq!(stats(&after), stats(&before), "{after}");
    assert_eq!(s.metric(cancelled).await, 6.0);
    assert_eq!(
        after["data"]["byVersion"], before["data"]["byVersion"],
        "{after}"
    );

    // the file is plain gzip of one JSON record per line
    let path = s.dir.path().join("archive").join(&file);
    let out = Command::new("zcat").arg(&path).output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["id"], gw1[0], "oldest first");

    // a second pass finds nothing more
    let (_, b) = archive_pass(&s, 1).await;
    assert_eq!(b["data"]["archived"], 0, "{b}");

    // the site report carries the archived tasks with the others
    let r = s
        .client
        .get(s.url("/api/reports"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tar_bytes = r.bytes().await.unwrap();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let report: Value = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_string_lossy() == "report.json")
        .map(|e| serde_json::from_reader(e).unwrap())
        .unwrap();
    assert_eq!(report["tasks"].as_array().unwrap().len(), 7, "every task");

    // a restart keeps both sides; a file no pass committed (a pass interrupted between its
    // file and the store) is removed by the next pass, and never listed
    s.restart_around(
        |dir| std::fs::write(dir.join("archive/tasks-1-1-1.jsonl.gz"), b"not gzip").unwrap(),
        |c| c.tasks.keep_finished_per_device = 1,
    )
    .await;
    let (_, archived) = listed(&s, "/api/ota/tasks?archived=true").await;
    assert_eq!(ids(&archived), want_archived, "{archived}");
    assert_eq!(listed(&s, "/api/ota/tasks").await.0, 3);
    let after = s.get_json("/api/ota/statistics").await.1;
    assert_eq!(stats(&after), stats(&before), "{after}");
    // (the configured pass ran at start and found nothing; the stray file is gone after a pass)
    let (_, b) = s.post_json("/api/ota/tasks/archive", json!({})).await;
    assert_eq!(b["data"]["archived"], 0, "{b}");
    assert!(!s.dir.path().join("archive/tasks-1-1-1.jsonl.gz").exists());
    assert!(path.exists());

    // a backup carries the archive
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("b.tar");
    let (ok, _, err) = s.cli(&["backup", "--out", tar.to_str().unwrap()]);
    assert!(ok, "{err}");
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&tar).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&format!("archive/{file}")), "{names:?}");
}

/// Many clients at once: passes run one at a time and archive each task exactly once;
/// listings beyond two at once are refused with the busy envelope, never queued without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_and_listings_in_parallel() {
    let s = std::sync::Arc::new(Server::start().await);
    s.release("1.0.1", "gateway", 4096).await;
    for d in 0..20 {
        let id = format!("P{d:02}");
        s.register(&id, "gateway", "secret-123").await;
        for _ in 0..3 {
            finished_task(&s, &id).await;
        }
    }
    let mut jobs = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let (st, b) = archive_pass(&s, 1).await;
                assert_eq!(st, 200, "{b}");
                (b["data"]["archived"].as_u64().unwrap(), 0, 0)
            } else {
                let r = s
                    .client
                    .get(s.url("/api/ota/tasks?archived=true&limit=5"))
                    .bearer_auth(&s.token)
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                let b: Value = r.json().await.unwrap();
                match st {
                    200 => (0, 1, 0),
                    503 => {
                        assert_eq!(
                            (&b["status"], &b["error"]),
                            (&json!(false), &json!("BUSY")),
                            "{b}"
                        );
                        (0, 0, 1)
                    }
                    other => panic!("{other}: {b}"),
                }
            }
        }));
    }
    let (mut archived, mut listed, mut busy) = (0, 0, 0);
    for j in jobs {
        let (a, l, b) = j.await.unwrap();
        (archived, listed, busy) = (archived + a, listed + l, busy + b);
    }
    eprintln!("archived {archived}, listings answered {listed}, refused busy {busy}");
    assert_eq!(archived, 40, "each task archived exactly once");
    assert_eq!(listed + busy, 13);
    assert_eq!(listed_total(&s, "/api/ota/tasks?archived=true").await, 40);
    assert_eq!(listed_total(&s, "/api/ota/tasks").await, 20);
    let stats = s.get_json("/api/ota/statistics").await.1;
    assert_eq!(stats["data"]["total"], 60, "{stats}");
    // one file per pass that moved something, none left over
    assert_eq!(file_names(&s.dir.path().join("archive")).len(), 1);
}

/// One archive pass keeping `keep` finished tasks per device.
async fn archive_pass(s: &Server, keep: u64) -> (u16, Value) {
    s.post_json(
        "/api/ota/tasks/archive",
        json!({ "keepFinishedPerDevice": keep }),
    )
    .await
}

async fn listed_total(s: &Server, path: &str) -> u64 {
    listed(s, path).await.0
}
