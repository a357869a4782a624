//! Validation of every name that comes from outside (versions, device types, device ids, file
//! names) and the version order. Nothing unvalidated ever becomes a path on disk or a topic level.

use std::cmp::Ordering;

/// Names that cannot be versions because they are API path segments.
const RESERVED_VERSIONS: [&str; 2] = ["latest", "upload"];

/// `[0-9A-Za-z.+-]{1,64}`, not `.`/`..` and not a reserved API segment.
pub fn valid_version(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
        && v != "."
        && v != ".."
        && !RESERVED_VERSIONS.contains(&v)
}

/// `[A-Za-z0-9_-]{1,64}`
pub fn valid_device_type(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// One part of a device id: `[A-Za-z0-9_.:-]{1,128}`, not `.` or `..`.
fn valid_id_part(p: &str) -> bool {
    (1..=128).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && p != "."
        && p != ".."
}

/// A gateway id, or an Alibaba-protocol id `{productKey}/{deviceName}` (each part of that form).
pub fn valid_device_id(id: &str) -> bool {
    match id.split_once('/') {
        None => valid_id_part(id),
        Some((pk, dn)) => valid_id_part(pk) && valid_id_part(dn),
    }
}

/// The download file name of a firmware, as in the source document: `{deviceType}_v{version}.bin`.
pub fn firmware_file_name(device_type: &str, version: &str) -> String {
    format!("{device_type}_v{version}.bin")
}

/// Splits `{deviceType}_v{version}.bin` back into its parts, validating both.
/// A device type may itself contain `_v`; a version never contains `_`, so the last `_v` splits.
pub fn parse_firmware_file_name(name: &str) -> Option<(&str, &str)> {
    let stem = name.strip_suffix(".bin")?;
    let idx = stem.rfind("_v")?;
    let (device_type, version) = (&stem[..idx], &stem[idx + 2..]);
    (valid_device_type(device_type) && valid_version(version)).then_some((device_type, version))
}

/// Compares versions numerically by dot-separated parts (`1.0.10 > 1.0.9`); a semver pre-release
/// (`1.0.0-rc.1`) sorts before its release; build metadata (`+...`) only breaks ties.
/// Missing parts count as 0 and non-numeric parts sort after numeric ones. The order is total:
/// versions that compare equal by these rules are ordered by their text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a_main, a_build) = a.split_once('+').unwrap_or((a, ""));
    let (b_main, b_build) = b.split_once('+').unwrap_or((b, ""));
    let (a_core, a_pre) = split_pre(a_main);
    let (b_core, b_pre) = split_pre(b_main);
    compare_dotted(a_core, b_core, true)
        .then_with(|| match (a_pre, b_pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => compare_dotted(x, y, false),
        })
        .then_with(|| a_build.cmp(b_build))
        .then_with(|| a.cmp(b))
}

fn split_pre(s: &str) -> (&str, Option<&str>) {
    match s.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (s, None),
    }
}

fn compare_dotted(a: &str, b: &str, pad_with_zero: bool) -> Ordering {
    let mut ai = a.split('.');
    let mut bi = b.split('.');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return Ordering::Equal,
            (x, y) => {
                let (x, y) = if pad_with_zero {
                    (x.unwrap_or("0"), y.unwrap_or("0"))
                } else {
                    // semver: a shorter pre-release list sorts first when all else is equal
                    match (x, y) {
                        (None, Some(_)) => return Ordering::Less,
                        (Some(_), None) => return Ordering::Greater,
                        (Some(x), Some(y)) => (x, y),
                        (None, None) => unreachable!(),
                    }
                };
                let ord = compare_part(x, y);
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

fn compare_part(x: &str, y: &str) -> Ordering {
    let xn = !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let yn = !y.is_empty() && y.bytes().all(|b| b.is_ascii_digit());
    match (xn, yn) {
        (true, true) => {
            let xt = x.trim_start_matches('0');
            let yt = y.trim_start_matches('0');
            xt.len().cmp(&yt.len()).then_with(|| xt.cmp(yt))
        }
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => x.cmp(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for v in ["1.0.2", "1.0.0-rc.1+build.5", "2026.11", "a"] {
            assert!(valid_version(v), "{v}");
        }
        for v in [
            "",
            "..",
            ".",
            "1/2",
            "1 0",
            "1_0",
            "latest",
            &"1".repeat(65),
            "é",
        ] {
            assert!(!valid_version(v), "{v}");
        }
        assert!(valid_device_type("gateway_v2-x"));
        assert!(!valid_device_type("gate.way"));
        assert!(!valid_device_type("../x"));
        assert!(valid_device_id("HQ2026ABC123"));
        assert!(valid_device_id("a1B2c3/oven-01"));
        assert!(!valid_device_id("a/b/c"));
        assert!(!valid_device_id("../etc"));
        assert!(!valid_device_id("a+b"));
        assert!(!valid_device_id("#"));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(firmware_file_name("gateway", "1.0.2"), "gateway_v1.0.2.bin");
        assert_eq!(
            parse_firmware_file_name("gateway_v1.0.2.bin"),
            Some(("gateway", "1.0.2"))
        );
        assert_eq!(
            parse_firmware_file_name("my_vendor_v2_v1.0.bin"),
            Some(("my_vendor_v2", "1.0"))
        );
        assert_eq!(parse_firmware_file_name("gateway_v...bin"), None);
        assert_eq!(parse_firmware_file_name("gateway_v1.0"), None);
        assert_eq!(parse_firmware_file_name("../gateway_v1.bin"), None);
        assert_eq!(parse_firmware_file_name("_v1.bin"), None);
    }

    #[test]
    fn version_order() {
        use Ordering::*;
        let cases = [
            ("1.0.10", "1.0.9", Greater),
            ("1.0.0-rc.1", "1.0.0", Less),
            ("1.0.0-alpha", "1.0.0-alpha.1", Less),
            ("1.0.0-alpha.1", "1.0.0-alpha.beta", Less),
            ("1.0.0-beta.2", "1.0.0-beta.11", Less),
            ("2", "1.9.9", Greater),
            ("1.0", "1.0.0", Less), // equal by value; text breaks the tie
            ("1.0.0", "1.0.0", Equal),
            ("010", "9", Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
        let mut v = vec!["1.0.9", "1.0.10", "1.0.10-rc.1", "0.9", "1.0.2"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v, ["0.9", "1.0.2", "1.0.9", "1.0.10-rc.1", "1.0.10"]);
    }
}
