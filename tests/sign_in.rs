//! Sign-in under attack, against the built binary: parallel guesses are counted before they are
//! checked and the password work runs a few at a time (peak memory does not grow with the
//! number of attackers), a stranger's guesses do not lock the real user out, a password change
//! ends a sign-in that was under way, refused sign-ins do not fill the audit log, the sign-in's
//! cross-site rule is the API's, and the page after signing in is always this appliance's.

mod common;

use std::net::IpAddr;

use common::*;
use serde_json::{Value, json};

/// A client whose connections leave from `from` (a loopback address of 127.0.0.0/8).
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn sign_in(c: &reqwest::Client, base: &str, user: &str, password: &str) -> reqwest::Response {
    c.post(format!("{base}/api/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Sends every (client, password) at once; the statuses, and whether each 429 said when to
/// come back.
async fn flood(base: &str, user: &str, tries: Vec<(reqwest::Client, String)>) -> Vec<u16> {
    let all: Vec<_> = tries
        .into_iter()
        .map(|(c, pw)| {
            let base = base.to_string();
            let user = user.to_string();
            tokio::spawn(async move {
                let r = sign_in(&c, &base, &user, &pw).await;
                let st = r.status().as_u16();
                if st == 429 {
                    assert!(
                        r.headers().contains_key("retry-after"),
                        "429 without Retry-After"
                    );
                }
                st
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in all {
        out.push(t.await.unwrap());
    }
    out
}

async fn add_user(s: &Server, name: &str, role: &str, password: &str) {
    let (st, b) = s
        .post_json(
            "/api/users",
            json!({"name": name, "role": role, "password": password}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
}

fn count(statuses: &[u16], st: u16) -> usize {
    statuses.iter().filter(|s| **s == st).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_are_counted_before_they_are_checked_and_memory_stays_flat() {
    let a = Appliance::start().await;
    let (st, b) = a
        .call(
            "POST",
            "/api/users",
            Some(json!({"name": "olga", "role": "operator", "password": "olga's password"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let base = a.base();
    let rss_before = a.running().status_kb("VmRSS");
    let checks = a.metric("hangar_auth_password_checks_total").await;

    // 200 wrong guesses for one user from one address, all at once: five are checked
    let c = client_from("127.0.0.1");
    let tries = (0..200)
        .map(|i| (c.clone(), format!("guess {i}")))
        .collect();
    let statuses = flood(&base, "olga", tries).await;
    assert_eq!(count(&statuses, 401), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 195, "{statuses:?}");
    let checked = a.metric("hangar_auth_password_checks_total").await - checks;
    assert_eq!(checked, 5.0, "password checks run for 200 parallel guesses");

    // 200 wrong guesses from 200 addresses at once: each address is fresh, so the per-name
    // limit (100) and the checks running at once (2) are what holds
    let tries = (0..200)
        .map(|i| {
            (
                client_from(&format!("127.0.{}.{}", 1 + i / 200, 1 + i % 200)),
                format!("g{i}"),
            )
        })
        .collect();
    let checks = a.metric("hangar_auth_password_checks_total").await;
    let statuses = flood(&base, "olga", tries).await;
    let checked = a.metric("hangar_auth_password_checks_total").await - checks;
    assert!(
        checked <= 100.0,
        "{checked} checks for one name from 200 addresses"
    );
    assert_eq!(
        count(&statuses, 401) + count(&statuses, 429),
        200,
        "{statuses:?}"
    );
    assert!(
        count(&statuses, 429) >= 100,
        "at most 100 for one name were let through: {statuses:?}"
    );
    let busy = a
        .metric("hangar_auth_sign_ins_total{result=\"busy\"}")
        .await;
    let throttled = a
        .metric("hangar_auth_sign_ins_total{result=\"throttled\"}")
        .await;
    assert_eq!(
        busy + throttled,
        count(&statuses, 429) as f64 + 195.0,
        "every 429 is counted by its reason"
    );

    // argon2id takes ~19 MiB per check: with two at a time the peak stays ~40 MiB over where it
    // was, whatever the number of attackers (64 at once used to peak at 2.4 GB)
    let peak = a.running().status_kb("VmHWM");
    let rss_after = a.running().status_kb("VmRSS");
    eprintln!("RSS before {rss_before} kB, peak {peak} kB, after {rss_after} kB");
    assert!(
        peak < rss_before + 100 * 1024,
        "peak RSS {peak} kB from {rss_before} kB under 400 parallel sign-ins"
    );
    assert!(
        rss_after < rss_before + 40 * 1024,
        "RSS {rss_after} kB after the flood, {rss_before} kB before: password memory was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_guesses_do_not_lock_out_the_real_user() {
    let s = Server::start().await;
    add_user(&s, "olga", "operator", "olga's password").await;
    let base = s.plain.as_str();
    // the attacker: 30 guesses from one address, in parallel
    let attacker = client_from("127.0.0.1");
    let tries = (0..30)
        .map(|i| (attacker.clone(), format!("guess {i}")))
        .collect();
    let statuses = flood(base, "olga", tries).await;
    assert_eq!(count(&statuses, 401), 5, "{statuses:?}");
    // even the right password waits from there ...
    let r = sign_in(&attacker, base, "olga", "olga's password").await;
    assert_eq!(r.status(), 429);
    // ... but olga at her own desk signs in
    let r = sign_in(&client_from("127.0.5.1"), base, "olga", "olga's password").await;
    assert_eq!(
        r.status(),
        200,
        "the real user was locked out by a stranger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_ends_a_sign_in_that_was_under_way() {
    let s = Server::start().await;
    add_user(&s, "olga", "operator", "password 0").await;
    let mut kept = Vec::new();
    for round in 0..20 {
        let old = format!("password {round}");
        let new = format!("password {}", round + 1);
        // sign in with the old password while an admin sets a new one
        let login = {
            let c = s.client.clone();
            let url = s.url("/api/auth/login");
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .json(&json!({"username": "olga", "password": old}))
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                let cookie = r
                    .headers()
                    .get("set-cookie")
                    .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string());
                (st, cookie)
            })
        };
        let change = s
            .client
            .patch(s.url("/api/users/olga"))
            .bearer_auth(&s.token)
            .json(&json!({"password": new}))
            .send()
            .await
            .unwrap();
        assert_eq!(change.status(), 200);
        let (st, cookie) = login.await.unwrap();
        if st == 200 {
            let r = s
                .client
                .get(s.url("/api/auth/session"))
                .header("cookie", cookie.unwrap())
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                kept.push(round);
            }
        }
    }
    assert!(
        kept.is_empty(),
        "sessions made with an old password outlived its change in rounds {kept:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sign_ins_are_counted_and_sampled_not_each_written() {
    let s = Server::start().await;
    let base = s.plain.clone();
    let before = audit_count(&s).await;
    // 300 refused sign-ins from 30 addresses, in parallel
    let mut all = Vec::new();
    for i in 0..300 {
        let c = client_from(&format!("127.0.9.{}", 1 + i % 30));
        let base = base.clone();
        all.push(tokio::spawn(async move {
            sign_in(&c, &base, &format!("nobody{i}"), "guess")
                .await
                .status()
                .as_u16()
        }));
    }
    for t in all {
        let st = t.await.unwrap();
        assert!(st == 401 || st == 429, "{st}");
    }
    let wrong = s
        .metric("hangar_auth_sign_ins_total{result=\"wrong\"}")
        .await;
    let throttled = s
        .metric("hangar_auth_sign_ins_total{result=\"throttled\"}")
        .await;
    let busy = s
        .metric("hangar_auth_sign_ins_total{result=\"busy\"}")
        .await;
    assert_eq!(wrong + throttled + busy, 300.0, "every refusal is counted");
    let written = audit_count(&s).await - before;
    assert!(
        (1..=3).contains(&written),
        "{written} audit entries for 300 refused sign-ins"
    );
    let (_, log) = s.get_json("/api/audit?action=auth.login").await;
    let first: &Value = &log["data"][0];
    assert!(
        first["result"].as_str().unwrap().starts_with("refused "),
        "{first}"
    );
}

/// How many audit entries of sign-ins there are (`X-Total-Count`).
async fn audit_count(s: &Server) -> u64 {
    let r = s
        .client
        .get(s.url("/api/audit?action=auth.login&limit=1"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    r.headers()["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn sign_in_follows_the_apis_cross_site_rule_and_json_is_never_sniffed_or_cached() {
    let s = Server::start().await;
    add_user(&s, "olga", "operator", "olga's password").await;
    let login = |referer: Option<&'static str>, origin: Option<&'static str>| {
        let mut r = s
            .client
            .post(s.url("/api/auth/login"))
            .json(&json!({"username": "olga", "password": "olga's password"}));
        if let Some(v) = referer {
            r = r.header("referer", v);
        }
        if let Some(v) = origin {
            r = r.header("origin", v);
        }
        r.send()
    };
    // a form on another site posts without Origin (old browsers, some privacy settings) but
    // with its Referer: refused as the API refuses it
    let r = login(Some("https://evil.example/login.html"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "CSRF", "{b}");
    let r = login(None, Some("https://evil.example")).await.unwrap();
    assert_eq!(r.status(), 403);
    // the console's own page, and a script that names nothing, sign in
    let own = s.url("/login");
    let own: &'static str = Box::leak(own.into_boxed_str());
    let r = login(Some(own), None).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = login(None, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    // every JSON answer, errors included
    for path in ["/api/ota/firmware", "/api/ota/nothing-here", "/healthz"] {
        let r = s
            .client
            .get(s.url(path))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        let h = r.headers();
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
    }
}

#[tokio::test]
async fn the_page_after_sign_in_is_always_this_appliances() {
    let s = Server::start().await;
    for (next, to) in [
        ("/%5Cevil.example", "/"),
        ("/%09/evil.example", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/campaigns", "/campaigns"),
    ] {
        let page = s
            .client
            .get(s.url(&format!("/login?next={next}")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(&format!("data-next=\"{to}\"")),
            "next={next}: {page}"
        );
    }
}

#[tokio::test]
async fn a_fresh_appliance_says_how_to_make_the_first_user() {
    let s = Server::start().await;
    let page = s
        .client
        .get(s.url("/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("hangar user add NAME --role admin"),
        "the first sign-in page dead-ends: {page}"
    );
    let (st, _) = s
        .post_json(
            "/api/users",
            json!({"name": "olga", "role": "admin", "password": "olga's password"}),
        )
        .await;
    assert_eq!(st, 201);
    let page = s
        .client
        .get(s.url("/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("No user exists yet"), "{page}");
}
