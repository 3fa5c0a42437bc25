//! The version-range parser, fed arbitrary UTF-8 text in both orderings.
//!
//! - Ok: `contains` is probed with a few fixed versions (including the extremes) and must not
//!   panic.
//! - Err: the error's 1-based column must point inside the text or just past its end
//!   (`1..=text.len() + 1`), so `fwgate check` can always print a usable file:line:column.
#![no_main]

use std::sync::OnceLock;

use fwgate::rules::range::VersionRange;
use fwgate::version::{FirmwareVersion, VersionOrdering};
use libfuzzer_sys::fuzz_target;

fn probes() -> &'static [FirmwareVersion] {
    static PROBES: OnceLock<Vec<FirmwareVersion>> = OnceLock::new();
    PROBES.get_or_init(|| {
        let mut probes = vec![FirmwareVersion::MIN, FirmwareVersion::MAX];
        for text in [
            "0.0.0",
            "1.9.9",
            "2.0.0",
            "3.8.0-b3",
            "3.8.0-b10",
            "3.8.0-rc1",
            "3.8.0",
            "3.9.0-b1",
            "4.0.0",
            "18446744073709551615.18446744073709551615.18446744073709551615-0",
        ] {
            probes.push(FirmwareVersion::parse(text).expect("probe versions parse"));
        }
        probes
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for ordering in [VersionOrdering::Firmware, VersionOrdering::Semver] {
        match VersionRange::parse(text, ordering) {
            Ok(range) => {
                for probe in probes() {
                    let _ = range.contains(probe);
                }
                let _ = range.matches_everything();
            }
            Err(e) => {
                assert!(
                    (1..=text.len() + 1).contains(&e.column),
                    "column {} out of 1..={} for {text:?} ({ordering}): {}",
                    e.column,
                    text.len() + 1,
                    e.message
                );
            }
        }
    }
});
