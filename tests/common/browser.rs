//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`): the
//! few W3C WebDriver commands the console tests need, over plain HTTP to a chromedriver this
//! harness starts on a free port.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session.
pub struct Browser {
    _driver: tokio::process::Child,
    http: reqwest::Client,
    session: String,
    base: String,
    _profile: tempfile::TempDir,
}

/// An element of the page.
#[derive(Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile; `None` (the test is
    /// skipped, or fails under `HANGAR_TEST_REQUIRE_TOOLS=1`) without them.
    pub async fn start() -> Option<Browser> {
        let driver = super::tool("chromedriver", "chromium-driver")?;
        let chromium = super::tool("chromium", "chromium")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // chromedriver says on stdout when it listens
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await.unwrap() {
                if l.contains("started successfully") {
                    return;
                }
            }
            panic!("chromedriver exited");
        })
        .await
        .expect("chromedriver starts");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {r}"))
            .to_string();
        Some(Browser {
            _driver: child,
            http,
            session,
            base,
            _profile: profile,
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut r = self.http.request(method, url);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let v = self.cmd(method, path, body).await;
        assert!(
            v.get("error").is_none(),
            "WebDriver {path}: {}",
            v["message"]
        );
        v
    }

    /// Opens `url` and waits for it to load.
    pub async fn go(&self, url: &str) {
        self.ok(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The page's URL.
    pub async fn url(&self) -> String {
        self.ok(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` as given) in the page; its return value.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.ok(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs an async `script` whose last argument is the callback to call with the result.
    pub async fn js_async(&self, script: &str, args: Value) -> Value {
        self.ok(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The first element matching `css`, waiting up to 30 s for it.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self
                .cmd(
                    reqwest::Method::POST,
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            if let Some(id) = v[ELEMENT].as_str() {
                return Element(id.to_string());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element {css} on {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length",
            json!([css]),
        )
        .await
        .as_u64()
        .unwrap() as usize
    }

    /// Clicks.
    pub async fn click(&self, e: &Element) {
        self.ok(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            Some(json!({})),
        )
        .await;
    }

    /// Finds and clicks the first element matching `css`; again if the page replaced it
    /// between the two (a live region refreshed).
    pub async fn click_on(&self, css: &str) {
        for _ in 0..20 {
            let e = self.find(css).await;
            let v = self
                .cmd(
                    reqwest::Method::POST,
                    &format!("/element/{}/click", e.0),
                    Some(json!({})),
                )
                .await;
            match v["error"].as_str() {
                None => return,
                Some("stale element reference") => continue,
                Some(_) => panic!("click on {css}: {}", v["message"]),
            }
        }
        panic!("{css} kept being replaced");
    }

    /// Types into a field (for a file input: the file's path).
    pub async fn type_in(&self, e: &Element, text: &str) {
        self.ok(
            reqwest::Method::POST,
            &format!("/element/{}/clear", e.0),
            Some(json!({})),
        )
        .await;
        self.ok(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Sets a file input to `path`.
    pub async fn choose_file(&self, e: &Element, path: &Path) {
        self.ok(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({"text": path.display().to_string()})),
        )
        .await;
    }

    /// The element's visible text.
    pub async fn text(&self, e: &Element) -> String {
        self.ok(
            reqwest::Method::GET,
            &format!("/element/{}/text", e.0),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The text of the first element matching `css` (waiting for it).
    pub async fn text_of(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.text(&e).await
    }

    /// Waits up to `secs` for `script` (returning a boolean) to be true in the page.
    pub async fn until(&self, secs: u64, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if self.js(script, json!([])).await == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {secs} s on {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Accepts the `confirm()` the page shows, waiting for it to appear.
    pub async fn accept_dialog(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .cmd(reqwest::Method::POST, "/alert/accept", Some(json!({})))
                .await;
            if v.get("error").is_none() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no dialog: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops every cookie (signs the browser out without the page).
    pub async fn forget_cookies(&self) {
        self.ok(reqwest::Method::DELETE, "/cookie", None).await;
    }

    /// A PNG of the window, into `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.ok(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // end the session so Chromium exits with chromedriver (a blocking HTTP/1.1 DELETE)
        use std::io::{Read, Write};
        let addr = self.base.trim_start_matches("http://").to_string();
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = s.read(&mut [0u8; 1024]);
        }
    }
}
