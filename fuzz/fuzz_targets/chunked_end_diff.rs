//! Differential: where a chunked body ends, by the fast path's `ChunkedEnd` (which relays the
//! body untouched) and by hyper's chunked decoder, on the same bytes after a chunked head.
//!
//! Checked: when the fast path finds the end, hyper decodes the body to its end too (on the
//! bytes up to that end, then a close). The fast path may be stricter (it refuses some
//! trailer lines hyper's decoder lets through): that cuts the response, as hyper's path cuts
//! one it cannot decode, and is allowed.
#![no_main]

#[path = "hyper_client.rs"]
mod hyper_client;

use fwgate::proxy::h1::fuzzing::chunked_end;
use hyper_client::HyperVerdict;
use libfuzzer_sys::fuzz_target;

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let fast = chunked_end(data);
    let Ok(Some(body_end)) = fast else {
        return;
    };
    let mut response = HEAD.to_vec();
    response.extend_from_slice(&data[..body_end]);
    let decoded = match hyper_client::get(&response) {
        HyperVerdict::Response { body, .. } => body.is_some(),
        HyperVerdict::Refused => false,
    };
    assert!(
        decoded,
        "the fast path finds the end, hyper cannot decode it: {:?}",
        String::from_utf8_lossy(&data[..body_end])
    );
});
