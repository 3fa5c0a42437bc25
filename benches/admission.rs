//! The whole admission check as the proxy runs it per request (snapshot, kill switch, rules
//! index, `limit` rule limiter, counters), on one thread and on two threads contending.
//! `cargo bench --bench admission`

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use fwgate::config::Config;
use fwgate::gate::{Gate, Verdict};
use fwgate::metrics::Metrics;
use fwgate::rules::{file, VersionInput};
use fwgate::version::FirmwareVersion;

fn gate(rules: &str) -> Gate {
    let metrics = Arc::new(Metrics::new());
    let rules = file::compile(rules, None, &metrics, 1).expect("bench rules compile");
    Gate::new(Config::embedded(), rules, metrics).expect("gate")
}

const RULES: &str = r#"
[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3, <3.9"
action = "deny"
status = 503
[[rule]]
name = "throttle-4x"
versions = "4.*"
action = "limit"
rate = "1000000/s"
burst = 1000000
key = "device"
[[rule]]
name = "too-old"
versions = "<2"
action = "deny"
"#;

fn admit_once(g: &Gate, v: &VersionInput, device: &[u8], ip: IpAddr) -> bool {
    let snap = g.snapshot();
    let d = g.decide(&snap, v, "/ws");
    matches!(g.apply(&d, Some(device), ip), Verdict::Forward(_))
}

fn contended(c: &mut Criterion) {
    let g = Arc::new(gate(RULES));
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    let allowed = VersionInput::Parsed(FirmwareVersion::parse("3.7.2").unwrap());
    let limited = VersionInput::Parsed(FirmwareVersion::parse("4.1.0").unwrap());
    let refused = VersionInput::Parsed(FirmwareVersion::parse("3.8.0-b7").unwrap());

    let mut group = c.benchmark_group("admission");
    group.measurement_time(Duration::from_secs(3));
    for (name, v) in [
        ("allow", allowed),
        ("deny", refused),
        ("limit_by_device", limited),
    ] {
        group.bench_function(format!("{name}/1_thread"), |b| {
            b.iter(|| black_box(admit_once(&g, &v, b"device-1", ip)))
        });
        group.bench_function(format!("{name}/2_threads"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2u8 {
                        let g = g.clone();
                        s.spawn(move || {
                            let device = [b'd', t];
                            for _ in 0..iters {
                                black_box(admit_once(&g, &v, &device, ip));
                            }
                        });
                    }
                });
                // Time per admission per thread: contention shows as growth over 1 thread.
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, contended);
criterion_main!(benches);
