//! The rules-file compiler, fed arbitrary UTF-8 text: it must answer Ok or Err, never panic.
//! When it compiles, a few decisions are made with it (parsed versions, missing, unparseable).
#![no_main]

use std::sync::OnceLock;

use fwgate::metrics::Metrics;
use fwgate::rules::file::compile;
use fwgate::rules::VersionInput;
use fwgate::version::FirmwareVersion;
use libfuzzer_sys::fuzz_target;

fn inputs() -> &'static [VersionInput] {
    static INPUTS: OnceLock<Vec<VersionInput>> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let mut inputs = vec![
            VersionInput::Missing,
            VersionInput::Unparseable,
            VersionInput::Parsed(FirmwareVersion::MIN),
            VersionInput::Parsed(FirmwareVersion::MAX),
        ];
        for text in [
            "1.9.9",
            "2.0.0",
            "3.8.0-b3",
            "3.8.0-b10",
            "3.8.0",
            "3.9.0-b1",
            "4.0.0",
        ] {
            inputs.push(VersionInput::Parsed(
                FirmwareVersion::parse(text).expect("probe versions parse"),
            ));
        }
        inputs
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A fresh registry per input, as at start-up: a shared one would keep one label set per
    // rule name ever seen and grow without bound over a fuzzing run.
    let metrics = Metrics::new();
    let Ok(rules) = compile(text, None, &metrics, 1) else {
        return;
    };
    for input in inputs() {
        for path in ["/", "/api/v1/connect"] {
            let decision = rules.decide(input, path);
            let _ = decision.admits();
        }
    }
});
