//! Repository hygiene: every Rust source file starts with a `//!` line saying what lives there.

use std::path::Path;

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_rust_file_has_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "tests"] {
        walk(&root.join(d), &mut files);
    }
    assert!(files.len() > 10);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.lines().next().is_some_and(|l| l.starts_with("//!"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! doc line: {missing:?}"
    );
}

/// The tree shows its audiences, and they depend on each other one way only: the device side
/// knows the appliance only through its protocols, the appliance knows neither the devices' code
/// nor the operator's CLI, and what all three share depends on none of them.
#[test]
fn audiences_depend_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules: [(&str, &[&str]); 3] = [
        ("device", &["crate::server", "crate::cli"]),
        ("server", &["crate::device", "crate::cli"]),
        ("", &["crate::server", "crate::device", "crate::cli"]),
    ];
    let mut broken = Vec::new();
    for (dir, forbidden) in rules {
        let mut files = Vec::new();
        if dir.is_empty() {
            // the shared modules: files and folders beside the three audiences
            for e in std::fs::read_dir(&root).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if ["server", "device", "cli", "lib.rs", "main.rs", "fuzzing.rs"]
                    .contains(&name.as_str())
                {
                    continue;
                }
                if p.is_dir() {
                    walk(&p, &mut files);
                } else {
                    files.push(p);
                }
            }
        } else {
            walk(&root.join(dir), &mut files);
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for bad in forbidden {
                if text.contains(bad) {
                    broken.push(format!("{} names {bad}", f.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}
