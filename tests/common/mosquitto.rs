//! A real mosquitto 2 (Debian's) for tests: with its dynamic-security plugin as the site's
//! broker, or plain as a plant's broker a bridge reaches.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tool;

pub const DYNSEC_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";
pub const ADMIN_PASSWORD: &str = "broker-admin-pw";

/// A mosquitto 2 with the dynamic-security plugin on a free loopback port, its state in `dir`.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Mosquitto {
    /// With the dynamic-security plugin (its admin `admin`); None (the test is skipped)
    /// without mosquitto or its plugin, unless CI requires them.
    pub fn start(dir: &Path) -> Option<Mosquitto> {
        Mosquitto::start_in(dir, "mosquitto", true)
    }

    /// A plain one (anonymous clients welcome) in `dir/<name>`, as a plant's broker.
    pub fn plain(dir: &Path, name: &str) -> Option<Mosquitto> {
        Mosquitto::start_in(dir, name, false)
    }

    fn start_in(dir: &Path, name: &str, dynsec: bool) -> Option<Mosquitto> {
        tool("mosquitto", "mosquitto")?;
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let auth = if dynsec {
            let ctrl = tool("mosquitto_ctrl", "mosquitto-clients")?;
            assert!(
                Path::new(DYNSEC_PLUGIN).exists(),
                "mosquitto's dynamic-security plugin is missing ({DYNSEC_PLUGIN})"
            );
            let file = dir.join("dynsec.json");
            let out = Command::new(ctrl)
                .args(["dynsec", "init"])
                .arg(&file)
                .args(["admin", ADMIN_PASSWORD])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            format!(
                "allow_anonymous false\nplugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {}\n",
                file.display()
            )
        } else {
            "allow_anonymous true\n".to_string()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\nlistener {port} 127.0.0.1\n{auth}persistence true\npersistence_location {}/\nmax_inflight_messages 1000\nmax_queued_messages 100000\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.run();
        Some(m)
    }

    /// Starts the process and waits until it says it runs.
    pub fn run(&mut self) {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("running") || line.contains("Error") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("mosquitto did not start");
        assert!(line.contains("running"), "mosquitto: {line}");
        self.child = Some(child);
    }

    /// SIGTERM (mosquitto saves its state) and start again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// SIGTERM, repeated until it exits (mosquitto can miss one sent right after it said
    /// it runs).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "mosquitto did not stop");
                // SAFETY: plain syscall on our own child's pid.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The `[mqtt]` keys of a Hangar riding this broker, as its admin.
    pub fn hangar_toml(&self, root: &Path) -> String {
        let pw = root.join("broker.pw");
        std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
        format!(
            "engine = \"external\"\n[mqtt.external]\nurl = \"{}\"\nclient_id = \"hangar-test\"\nusername = \"admin\"\npassword_file = {:?}\nsync = \"mosquitto-dynsec\"\n",
            self.url(),
            pw.display()
        )
    }

    /// `mosquitto_sub` as `user`: Ok once it is subscribed (its first message, or a timeout
    /// with the connection up), Err(stderr) if the broker refused it.
    pub fn connects(&self, user: &str, password: &str) -> Result<(), String> {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-u", user, "-P", password, "-t", "nothing/here", "-W", "1"])
            .args(["-i", &format!("probe-{user}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // -W ends a subscribed client with status 27 (timed out); a refusal prints why
        if err.contains("refused") || err.contains("not authorised") || err.contains("Error") {
            Err(err)
        } else {
            Ok(())
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
