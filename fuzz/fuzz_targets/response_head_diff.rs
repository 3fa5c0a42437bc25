//! Differential: a backend's response head read by the fast path and by hyper's client (what
//! fwgate's hyper path forwards with), on the same bytes.
//!
//! Checked on every input: whenever the fast path relays a response, hyper's client accepts it
//! too, with the same status, and a body length hyper announces is the one the fast path frames
//! (the fast path may be stricter: refusing what hyper accepts is a 502, which is allowed).
#![no_main]

#[path = "hyper_client.rs"]
mod hyper_client;

use fwgate::proxy::h1::fuzzing::{response_head, BodyFraming, ResponseVerdict};
use hyper_client::HyperVerdict;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ResponseVerdict::Complete {
        status, framing, ..
    } = response_head(data)
    else {
        return;
    };
    match hyper_client::get(data) {
        HyperVerdict::Refused => panic!(
            "the fast path relays status {status} ({framing:?}) that hyper refuses: {:?}",
            String::from_utf8_lossy(data)
        ),
        HyperVerdict::Response {
            status: hyper_status,
            exact_length,
            ..
        } => {
            assert_eq!(status, hyper_status, "{:?}", String::from_utf8_lossy(data));
            match (framing, exact_length) {
                (BodyFraming::Length(n), Some(m)) => assert_eq!(n, m, "{:?}", String::from_utf8_lossy(data)),
                (BodyFraming::Empty, Some(m)) => assert_eq!(m, 0, "{:?}", String::from_utf8_lossy(data)),
                (BodyFraming::Length(n), None) => panic!("fast path frames {n} bytes, hyper does not: {:?}", String::from_utf8_lossy(data)),
                (f, Some(m)) if m > 0 => panic!("fast path frames {f:?}, hyper {m} bytes: {:?}", String::from_utf8_lossy(data)),
                _ => {}
            }
        }
    }
});
