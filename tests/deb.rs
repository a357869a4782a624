//! The Debian package: `cargo deb` builds it (from the test build's binary), and its contents,
//! conffiles and maintainer scripts are inspected with `dpkg-deb`; it is unpacked into a
//! throwaway root where the binary runs and accepts the packaged config. The packaged unit must
//! stay the repository's unit with a static user, and keep its systemd exposure at or under 2.0.

mod common;

use std::path::Path;
use std::process::Command;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("tool runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo deb` is a cargo subcommand (`cargo install cargo-deb`): found when `cargo deb
/// --version` answers.
fn cargo_deb(cargo: &str) -> bool {
    let found = Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let required = std::env::var("HANGAR_TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "cargo deb is needed by this test: cargo install cargo-deb"
        );
        common::skipped("cargo deb is not installed (cargo install cargo-deb)".into());
    }
    found
}

#[test]
fn debian_package_builds_and_installs_into_a_throwaway_root() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let deb = tmp.path().join("hangar.deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let Some(dpkg) = common::tool("dpkg-deb", "dpkg") else {
        return;
    };
    if !cargo_deb(&cargo) {
        return;
    }
    // the test build's binary (the release build is what `cargo deb` packages for real)
    sh(Command::new(cargo)
        .current_dir(root)
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "-o"])
        .arg(&deb));
    let list = sh(Command::new(&dpkg).arg("-c").arg(&deb));
    for f in [
        "./usr/bin/hangar",
        "./etc/hangar/hangar.toml",
        "./usr/lib/systemd/system/hangar.service",
        "./usr/lib/systemd/system/hangar-agent.service",
        "./usr/share/doc/hangar/examples/agent.toml",
        "./usr/share/doc/hangar/SECURITY.md",
    ] {
        assert!(list.lines().any(|l| l.ends_with(f)), "{f} missing:\n{list}");
    }
    let conffiles = sh(Command::new(&dpkg).arg("-I").arg(&deb).arg("conffiles"));
    assert!(conffiles.contains("/etc/hangar/hangar.toml"), "{conffiles}");
    let postinst = sh(Command::new(&dpkg).arg("-I").arg(&deb).arg("postinst"));
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(
        postinst.contains("hangar.service"),
        "enables the unit:\n{postinst}"
    );
    let postrm = sh(Command::new(&dpkg).arg("-I").arg(&deb).arg("postrm"));
    let purge = postrm.find("\"purge\"").expect("purge branch");
    assert!(
        postrm[purge..].contains("rm -rf /var/lib/hangar"),
        "{postrm}"
    );
    assert!(postrm[purge..].contains("userdel hangar"), "{postrm}");

    let fs = tmp.path().join("root");
    sh(Command::new(&dpkg).arg("-x").arg(&deb).arg(&fs));
    let bin = fs.join("usr/bin/hangar");
    assert!(sh(Command::new(&bin).arg("--version")).contains("hangar"));
    sh(Command::new(&bin)
        .args(["config", "check"])
        .arg(fs.join("etc/hangar/hangar.toml")));
    if let Some(analyze) = common::tool("systemd-analyze", "systemd") {
        let out = Command::new(analyze)
            .args(["security", "--offline=true"])
            .arg(fs.join("usr/lib/systemd/system/hangar.service"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("hangar.service: ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(level <= 2.0, "exposure {level}");
    }
}

#[test]
fn packaged_unit_is_the_repository_unit_with_a_static_user() {
    let strip = |p: &str| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && *l != "DynamicUser=yes")
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip("debian/hangar.service"),
        strip("systemd/hangar.service")
    );
    assert_eq!(
        strip("debian/hangar-agent.service"),
        strip("systemd/hangar-agent.service")
    );
}
