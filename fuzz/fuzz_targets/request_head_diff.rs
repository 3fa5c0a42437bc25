//! Differential: the request head the backend gets on the fast path and on hyper's path, from
//! the same client bytes (the fast path's rewrite against hyper's path's `strip_hop_by_hop`,
//! `Host` and forwarding headers).
//!
//! Checked: whenever the fast path takes a request, both send the same header lines (as a
//! multiset: names lower-cased, order ignored).
#![no_main]

use fwgate::proxy::h1::fuzzing::request_headers;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mut fast, mut hyper)) = request_headers(data) else {
        return;
    };
    fast.sort();
    hyper.sort();
    assert_eq!(
        fast,
        hyper,
        "the backend sees different heads for {:?}",
        String::from_utf8_lossy(data)
    );
});
