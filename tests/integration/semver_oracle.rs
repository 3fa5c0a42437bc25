//! fwgate's `semver` ordering against the `semver` crate as an oracle: on valid SemVer 2.0
//! strings, the order of two versions is exactly `semver::Version::cmp_precedence`.

use fwgate::version::{FirmwareVersion, VersionOrdering};
use proptest::prelude::*;

/// A SemVer 2.0 numeric identifier (no leading zero), kept short enough to stay under
/// fwgate's version length limit with three of them and a pre-release.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        (1u64..20).prop_map(|n| n.to_string()),
        (1u64..u64::MAX).prop_map(|n| n.to_string()),
    ]
}

/// A pre-release identifier: numeric, or alphanumeric with at least one non-digit; small
/// alphabets so that equal and prefix-sharing identifiers are common.
fn identifier() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..12).prop_map(|n| n.to_string()),
        "[a-c]{1,3}",
        "[a-c][0-9]{1,2}",
        "[0-9][A-Z-]",
        "-{1,2}",
    ]
}

/// A valid SemVer 2.0 string: core, optional pre-release, optional build metadata.
fn semver_text() -> impl Strategy<Value = String> {
    (
        (number(), number(), number()),
        proptest::collection::vec(identifier(), 0..4),
        proptest::option::of("[0-9A-Za-z-]{1,6}(\\.[0-9A-Za-z-]{1,4})?"),
    )
        .prop_map(|((major, minor, patch), pre, build)| {
            let major = if major.len() > 6 { "7".into() } else { major };
            let mut s = format!("{major}.{minor}.{patch}");
            if !pre.is_empty() {
                s.push('-');
                s.push_str(&pre.join("."));
            }
            if let Some(b) = build {
                s.push('+');
                s.push_str(&b);
            }
            s
        })
        .prop_filter("within fwgate's version length limit", |s| {
            s.len() <= fwgate::version::MAX_VERSION_LEN
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn semver_ordering_is_semver_precedence(a in semver_text(), b in semver_text()) {
        let oracle_a = semver::Version::parse(&a).expect("generator makes valid SemVer");
        let oracle_b = semver::Version::parse(&b).expect("generator makes valid SemVer");
        let ours_a = FirmwareVersion::parse(&a)
            .map_err(|e| TestCaseError::fail(format!("{a:?} is valid SemVer, fwgate refused it: {e}")))?;
        let ours_b = FirmwareVersion::parse(&b)
            .map_err(|e| TestCaseError::fail(format!("{b:?} is valid SemVer, fwgate refused it: {e}")))?;
        prop_assert_eq!(
            ours_a.cmp_with(&ours_b, VersionOrdering::Semver),
            oracle_a.cmp_precedence(&oracle_b),
            "{} vs {}", a, b
        );
    }

    #[test]
    fn a_version_equals_itself_with_other_build_metadata(a in semver_text()) {
        let core = a.split('+').next().unwrap_or(&a).to_string();
        let with_build = format!("{core}+build.5");
        let (x, y) = (FirmwareVersion::parse(&a), FirmwareVersion::parse(&with_build));
        if let (Ok(x), Ok(y)) = (x, y) {
            prop_assert_eq!(x.cmp_with(&y, VersionOrdering::Semver), std::cmp::Ordering::Equal);
        }
    }
}
