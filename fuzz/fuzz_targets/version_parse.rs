//! The lenient firmware-version parser, fed arbitrary bytes (as a header value would be).
//!
//! Properties checked on every input that parses:
//! - the normalised form (`Display`) parses back to the same version;
//! - `cmp_with` is reflexive (`Equal` with itself) in both orderings.
#![no_main]

use std::cmp::Ordering;

use fwgate::version::{FirmwareVersion, VersionOrdering};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = FirmwareVersion::parse_bytes(data) else {
        return;
    };
    let shown = v.to_string();
    assert_eq!(
        FirmwareVersion::parse(&shown),
        Ok(v),
        "display/parse round trip failed for input {data:?}, displayed as {shown:?}"
    );
    for ordering in [VersionOrdering::Firmware, VersionOrdering::Semver] {
        assert_eq!(
            v.cmp_with(&v, ordering),
            Ordering::Equal,
            "{v:?} is not Equal to itself in {ordering}"
        );
    }
});
