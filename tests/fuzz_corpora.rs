//! Every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/artifacts/<target>/`, fixed since) runs through its target again, on stable: what a
//! fuzzer once broke stays fixed, without the nightly toolchain. See SECURITY.md for running
//! the fuzzers themselves.

use std::path::Path;

#[test]
fn every_corpus_and_crash_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, target) in hangar::fuzzing::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                if path.is_file() {
                    let data = std::fs::read(&path).unwrap();
                    let r = std::panic::catch_unwind(|| target(&data));
                    assert!(r.is_ok(), "{name}: {} panics", path.display());
                    n += 1;
                }
            }
        }
        assert!(n > 0, "no corpus for fuzz target {name}");
        total += n;
    }
    assert!(total >= hangar::fuzzing::TARGETS.len());
}

#[test]
fn every_fuzz_target_has_a_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for (name, _) in hangar::fuzzing::TARGETS {
        let src = std::fs::read_to_string(dir.join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{name}.rs: {e}"));
        assert!(src.contains(&format!("hangar::fuzzing::{name}(")), "{name}");
    }
}
