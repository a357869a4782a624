//! The systemd contract of `hangar serve`: READY=1 on $NOTIFY_SOCKET once every listener is up
//! (Type=notify), the data dir taken from $STATE_DIRECTORY (StateDirectory=), and a clean exit
//! on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn notifies_ready_and_uses_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // no data_dir in the config: STATE_DIRECTORY decides
    let cfg = dir.path().join("hangar.toml");
    std::fs::write(
        &cfg,
        "[http]\nlisten = \"127.0.0.1:0\"\nplain_listen = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(common::bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("STATE_DIRECTORY", &state)
        .env("RUST_LOG", "hangar=warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // by the time READY is sent, the listeners are bound and recorded
    let ports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("ports.json")).unwrap()).unwrap();
    let port = ports["https"].as_u64().unwrap();
    std::net::TcpStream::connect(("127.0.0.1", port as u16)).expect("HTTPS listener is up");
    assert!(state.join("admin.token").exists());
    assert!(state.join("certs/ca.pem").exists());
    assert!(!dir.path().join("hangar-data").exists());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}
