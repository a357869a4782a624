//! Shared test harness: starts the real appliance (in-process or as the binary) on ephemeral
//! ports in a temp data dir, and builds HTTPS clients that pin its generated CA.

#![allow(dead_code)]

pub mod browser;
pub mod mosquitto;
pub mod mqtt;
pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar::config::{Config, Listen};
use hangar::server::app::App;
use serde_json::Value;

/// A config for tests: everything on 127.0.0.1 port 0, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_string_lossy().into_owned(),
        ..Config::default()
    };
    let any = Listen::loopback_any_port();
    (c.http.listen, c.http.plain_listen) = (any, any);
    (c.mqtt.listen, c.mqtt.tls_listen) = (any, any);
    // test devices "reboot" in 300 ms: a second is grace enough, and keeps rollbacks quick
    c.tasks.reboot_grace_secs = 1;
    c
}

/// An HTTPS client trusting the appliance's generated CA.
pub fn client_for(data_dir: &Path, http1_only: bool) -> reqwest::Client {
    let pem = std::fs::read(data_dir.join("certs/ca.pem")).expect("generated CA");
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(120));
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// The in-process appliance with a client.
pub struct Server {
    pub mqtt: u16,
    pub mqtts: u16,
    pub app: Option<App>,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    pub base: String,
    pub plain: String,
    pub token: String,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        tweak(&mut cfg);
        let app = App::start(cfg).await.expect("server starts");
        let base = format!("https://localhost:{}", app.https.port());
        let plain = format!("http://{}", app.http.unwrap());
        let token = app.admin_token.clone();
        let client = client_for(dir.path(), false);
        Server {
            mqtt: app.mqtt.port(),
            mqtts: app.mqtts.map(|a| a.port()).unwrap_or(0),
            app: Some(app),
            dir,
            client,
            base,
            plain,
            token,
        }
    }

    /// Stops (drain + flush) and starts again on the same data dir.
    pub async fn restart(&mut self) {
        self.restart_with(|_| {}).await
    }

    /// Stops and starts again on the same data dir with a tweaked config.
    pub async fn restart_with(&mut self, tweak: impl FnOnce(&mut Config)) {
        self.restart_around(|_| {}, tweak).await
    }

    /// Stops, runs `between` on the data dir while nothing holds it, and starts again with a
    /// tweaked config.
    pub async fn restart_around(
        &mut self,
        between: impl FnOnce(&Path),
        tweak: impl FnOnce(&mut Config),
    ) {
        self.app.take().unwrap().shutdown().await;
        between(self.dir.path());
        let mut cfg = test_config(self.dir.path());
        tweak(&mut cfg);
        let app = App::start(cfg).await.expect("server restarts");
        self.base = format!("https://localhost:{}", app.https.port());
        self.plain = format!("http://{}", app.http.unwrap());
        self.mqtt = app.mqtt.port();
        self.mqtts = app.mqtts.map(|a| a.port()).unwrap_or(0);
        self.app = Some(app);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The value of one metric (`name` with its labels, if any, as /metrics prints it).
    pub async fn metric(&self, name: &str) -> f64 {
        scrape(&self.client, &self.url("/metrics"), &self.token, name).await
    }

    /// Returns once the campaign engine has finished `n` more rounds than now: what a test
    /// waits for before asserting that a campaign did *not* do something.
    pub async fn campaign_rounds_pass(&self, n: u64) {
        let from = self.metric("hangar_campaign_rounds_total").await;
        // a round at least every 1.1 s (its timer, then its rest)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30 + 2 * n);
        while self.metric("hangar_campaign_rounds_total").await < from + n as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the campaign engine stopped going round"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }

    pub async fn delete_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .delete(self.url(path))
            .header("authorization", self.auth())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("authorization", self.auth())
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }

    /// Uploads `bytes` as firmware; returns status and envelope.
    pub async fn upload(
        &self,
        version: &str,
        device_type: Option<&str>,
        bytes: Vec<u8>,
    ) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new().text("version", version.to_string());
        if let Some(t) = device_type {
            form = form.text("deviceType", t.to_string());
        }
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("fw.bin"),
        );
        let r = self.post_form(form).await;
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }

    /// POSTs a multipart form to the upload endpoint with the admin token.
    pub async fn post_form(&self, form: reqwest::multipart::Form) -> reqwest::Response {
        self.client
            .post(self.url("/api/ota/firmware/upload"))
            .header("authorization", self.auth())
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Registers a device through the API.
    pub async fn register(&self, id: &str, protocol: &str, secret: &str) {
        let (st, b) = self
            .post_json(
                "/api/ota/devices",
                serde_json::json!({"id": id, "protocol": protocol, "secret": secret}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
    }

    /// Uploads and releases a firmware; returns the image.
    pub async fn release(&self, version: &str, device_type: &str, len: usize) -> Vec<u8> {
        let img = image(len, version.len() as u64 * 7 + len as u64);
        self.release_bytes(version, device_type, img.clone()).await;
        img
    }

    /// Uploads and releases `img` as a firmware.
    pub async fn release_bytes(&self, version: &str, device_type: &str, img: Vec<u8>) {
        let (st, b) = self.upload(version, Some(device_type), img).await;
        assert_eq!(st, 201, "{b}");
        let (st, b) = self
            .post_json(
                &format!("/api/ota/firmware/{version}/release?deviceType={device_type}"),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(st, 200, "{b}");
    }

    /// Polls `GET path` until `pred` holds for its `data` (deadline `secs` on tokio's clock:
    /// virtual seconds in a paused-time test); returns it. The one polling loop of the tests:
    /// what they wait for is a state the API shows.
    pub async fn wait_for(&self, path: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (st, b) = self.get_json(path).await;
            if st == 200 && pred(&b["data"]) {
                return b["data"].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path} never got there in {secs} s: {st} {b}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the device's newest task until `pred` holds (deadline 15 s).
    pub async fn wait_task(&self, device: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/api/ota/task/{}", device.replace('/', "%2F"));
        self.wait_for(&path, 15, pred).await
    }

    /// Polls a campaign until `pred` holds (deadline `secs`).
    pub async fn wait_campaign(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(&format!("/api/ota/campaigns/{id}"), secs, pred)
            .await
    }

    /// Runs `hangar --config <client config> ARGS` (a blocking child: call it from a
    /// multi-threaded test, the server needs a worker meanwhile): (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli_with(&self.client_config(), args)
    }

    /// A config file for client verbs (`sim`, admin verbs) pointing at this server's data dir,
    /// so they find it through ports.json, admin.token and the generated CA as SPEC 1 says.
    pub fn client_config(&self) -> PathBuf {
        let p = self.dir.path().join("client.toml");
        if !p.exists() {
            std::fs::write(
                &p,
                format!(
                    "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n",
                    self.dir.path().to_string_lossy()
                ),
            )
            .unwrap();
        }
        p
    }

    /// Starts `hangar sim --config <client config> ARGS` as a child process.
    pub fn sim(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(bin())
            .arg("sim")
            .arg("--config")
            .arg(self.client_config())
            .args(["--summary-every", "0"])
            .args(args)
            .env("RUST_LOG", "hangar=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Polls until `n` devices are online (deadline 60 s).
    pub async fn wait_online(&self, n: usize) {
        self.wait_for("/api/ota/devices?online=true&limit=10000", 60, |d| {
            d.as_array().map_or(0, Vec::len) >= n
        })
        .await;
    }

    /// The download statistics of one version.
    pub async fn served(&self, device_type: &str, version: &str) -> Value {
        let (_, b) = self.get_json("/api/ota/statistics").await;
        b["data"]["downloads"]["perFirmware"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["deviceType"] == device_type && f["version"] == version)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Number of files under `<data_dir>/<sub>` (recursively).
    pub fn files_under(&self, sub: &str) -> usize {
        count_files(&self.dir.path().join(sub))
    }
}

/// How many files are under `p`, recursively.
pub fn count_files(p: &Path) -> usize {
    file_names(p).len()
}

/// Files under `dir`, recursively (names only).
pub fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(file_names(&p));
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so images are not trivially compressible.
pub fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn md5_hex(b: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(b))
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The text of every source file of the HTTP module and its submodules (where every `.route(`
/// is), for the tests that walk the routes.
pub fn http_sources() -> String {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/http"),
        &mut files,
    );
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// An HTTPS client trusting the appliance's CA that does not follow redirects (to see the
/// console's 303 to the sign-in page as it is).
pub fn client_no_redirect(data_dir: &Path) -> reqwest::Client {
    let pem = std::fs::read(data_dir.join("certs/ca.pem")).expect("generated CA");
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// `(method, path)` of every route that changes something, from the `.route(` calls of the HTTP
/// sources: each `post(`/`put(`/`patch(`/`delete(` in the method chain of a route.
pub fn mutating_routes() -> Vec<(String, String)> {
    let src = http_sources();
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + 7..];
        // the call's text up to its closing parenthesis
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(i, _)| i)
            .unwrap();
        let call = &rest[..end];
        let q = call.find('"').unwrap();
        let path = &call[q + 1..q + 1 + call[q + 1..].find('"').unwrap()];
        for m in ["post", "put", "patch", "delete"] {
            let needle = format!("{m}(");
            let named = call.match_indices(&needle).any(|(i, _)| {
                i == 0
                    || !(call.as_bytes()[i - 1].is_ascii_alphanumeric()
                        || call.as_bytes()[i - 1] == b'_')
            });
            if named {
                out.push((m.to_uppercase(), path.to_string()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The value of the metric line `name value` in a /metrics text; panics if there is none.
/// One metric of `GET url` with the admin token.
pub async fn scrape(client: &reqwest::Client, url: &str, token: &str, name: &str) -> f64 {
    let text = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_in(&text, name)
}

pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// A stock tool a test drives (curl, mosquitto_pub, bspatch, ...), found on `PATH`. On a box
/// without it the test is skipped with a message naming the Debian package; where
/// `HANGAR_TEST_REQUIRE_TOOLS=1` (set by `.ci/run`, which installs them) a missing tool fails the
/// test instead, so CI can never skip one silently.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("HANGAR_TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{name} is needed by this test: apt-get install {package}"
        );
        skipped(format!(
            "{name} is not installed (apt-get install {package})"
        ));
    }
    found
}

/// Says that a test skipped a part, where a person sees it: on the process's stderr itself, not
/// through `eprintln!`, which the test harness keeps to itself for tests that pass.
pub fn skipped(what: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {what}");
}

/// Runs `hangar --config CONFIG ARGS`: (success, stdout, stderr).
pub fn cli_with(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `hangar` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hangar"))
}

/// A file of the real MCU image pair in `tests/fixtures/stm32-pybricks-primehub` (`old.bin`,
/// `new.bin`).
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/stm32-pybricks-primehub")
            .join(name),
    )
    .unwrap()
}

/// Waits for a `hangar sim` child to exit; returns its exit code and the JSON summary (the last
/// line of its stdout).
pub async fn sim_result(child: tokio::process::Child, secs: u64) -> (i32, Value) {
    let out = tokio::time::timeout(Duration::from_secs(secs), child.wait_with_output())
        .await
        .expect("sim did not exit in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line of sim's stdout is not JSON ({e}): {stdout}"));
    (out.status.code().unwrap_or(-1), v)
}

/// `hangar serve` as a child process, on ephemeral ports in `dir`.
pub struct Proc {
    pub child: Child,
    pub config: PathBuf,
    pub https: u16,
    pub http: u16,
    pub mqtt: u16,
    pub mqtts: u16,
}

impl Proc {
    /// Writes a config into `dir` and starts the binary on free ports; waits for ports.json and
    /// /healthz.
    pub async fn spawn(dir: &Path, extra_toml: &str) -> Proc {
        Proc::spawn_on(dir, extra_toml, [0; 4]).await
    }

    /// [`Proc::spawn`] on these ports (https, http, mqtt, mqtts; 0 = any free one): a restart on
    /// the ports of the process before it, so devices and clients find it again.
    pub async fn spawn_on(dir: &Path, extra_toml: &str, ports: [u16; 4]) -> Proc {
        Proc::spawn_with(dir, extra_toml, "", ports).await
    }

    /// [`Proc::spawn_on`] with more `[mqtt]` keys (`mqtt_toml`, lines of `key = value`).
    pub async fn spawn_with(
        dir: &Path,
        extra_toml: &str,
        mqtt_toml: &str,
        ports: [u16; 4],
    ) -> Proc {
        let config = dir.join("hangar.toml");
        let data = dir.join("data");
        let [https, http, mqtt, mqtts] = ports;
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n{extra_toml}\n[http]\nlisten = \"127.0.0.1:{https}\"\nplain_listen = \"127.0.0.1:{http}\"\n[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\ntls_listen = \"127.0.0.1:{mqtts}\"\n{mqtt_toml}\n",
                data.to_string_lossy()
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(data.join("ports.json"));
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "hangar=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ports: Value = loop {
            if let Ok(t) = std::fs::read_to_string(data.join("ports.json"))
                && let Ok(v) = serde_json::from_str(&t)
            {
                break v;
            }
            assert!(Instant::now() < deadline, "server did not write ports.json");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited at start: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let p = Proc {
            child,
            config,
            https: ports["https"].as_u64().unwrap() as u16,
            http: ports["http"].as_u64().unwrap() as u16,
            mqtt: ports["mqtt"].as_u64().unwrap() as u16,
            mqtts: ports["mqtts"].as_u64().unwrap_or(0) as u16,
        };
        let c = reqwest::Client::new();
        loop {
            if let Ok(r) = c
                .get(format!("http://127.0.0.1:{}/healthz", p.http))
                .send()
                .await
                && r.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// Runs `hangar --config <this server's config> ARGS`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli_with(&self.config, args)
    }

    /// One metric, read over the plain listener with the admin token in the data dir.
    pub async fn metric(&self, name: &str) -> f64 {
        let data = self.config.parent().unwrap().join("data");
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
        let url = format!("http://127.0.0.1:{}/metrics", self.http);
        scrape(&reqwest::Client::new(), &url, token.trim(), name).await
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn term(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// A field of /proc/<pid>/status in kB (e.g. "VmHWM", "VmRSS").
    pub fn status_kb(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary (`Proc`) on a data directory that outlives it: killed and restarted at will.
pub struct Appliance {
    root: PathBuf,
    /// The ports of the first start (https, http, mqtt, mqtts), kept across restarts.
    ports: [u16; 4],
    _dir: Option<tempfile::TempDir>,
    extra: String,
    mqtt_extra: String,
    pub proc: Option<Proc>,
    pub http: reqwest::Client,
}

impl Appliance {
    /// In a fresh temp dir, default config.
    pub async fn start() -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Appliance::start_in(dir.path(), "").await;
        a._dir = Some(dir);
        a
    }

    /// In `root` (which the caller keeps), with extra config text.
    pub async fn start_in(root: &Path, extra_toml: &str) -> Appliance {
        Appliance::start_with(root, extra_toml, "").await
    }

    /// In `root`, with extra config text and more `[mqtt]` keys.
    pub async fn start_with(root: &Path, extra_toml: &str, mqtt_toml: &str) -> Appliance {
        let proc = Proc::spawn_with(root, extra_toml, mqtt_toml, [0; 4]).await;
        Appliance {
            ports: [proc.https, proc.http, proc.mqtt, proc.mqtts],
            root: root.to_path_buf(),
            _dir: None,
            extra: extra_toml.to_string(),
            mqtt_extra: mqtt_toml.to_string(),
            proc: Some(proc),
            http: reqwest::Client::new(),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.proc.as_ref().unwrap().http)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data().join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base()))
            .bearer_auth(self.token());
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn upload(&self, version: &str, img: Vec<u8>) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("version", version.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(img).file_name("fw.bin"),
            );
        let r = self
            .http
            .post(format!("{}/api/ota/firmware/upload", self.base()))
            .bearer_auth(self.token())
            .multipart(form)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    /// SIGKILL at once, then a new process on the same data dir.
    pub async fn kill_and_restart(&mut self) {
        self.kill();
        self.restart().await;
    }

    pub fn kill(&mut self) {
        self.proc.take().unwrap().kill9();
    }

    /// A CLI verb against it (its config file); panics with stderr when the verb fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.running().cli(args);
        assert!(ok, "{args:?}: {err}");
        out
    }

    /// Starts it again on the ports it had (a device or a `hangar sim` reconnects as it would
    /// to a real appliance after a crash).
    pub async fn restart(&mut self) {
        let ports = self.ports;
        self.proc = Some(Proc::spawn_with(&self.root, &self.extra, &self.mqtt_extra, ports).await);
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    /// `GET path` with the admin token, the response as it comes (downloads, backups); `Err`
    /// when the appliance does not answer.
    pub async fn fetch(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(self.token())
            .send()
            .await
    }

    /// The running process (ports, pid).
    pub fn running(&self) -> &Proc {
        self.proc.as_ref().expect("the appliance is running")
    }

    /// The value of one metric, as [`Server::metric`].
    pub async fn metric(&self, name: &str) -> f64 {
        let r = self.fetch("/metrics").await.unwrap();
        metric_in(&r.text().await.unwrap(), name)
    }
}
