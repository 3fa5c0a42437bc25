//! Benchmarks of the per-connection decision core: `VersionIndex::candidates` over 1, 100 and
//! 10,000 rules of realistic shapes (its cost must stay flat as rules grow), and
//! `FirmwareVersion::parse` of typical inputs, including garbage.
//!
//! Run with `cargo bench --bench decide` (add `-- --quick` for a short run). On noisy
//! machines prefer instruction counts: `valgrind --tool=callgrind` on the bench binary.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fwgate::rules::index::VersionIndex;
use fwgate::rules::range::VersionRange;
use fwgate::version::{FirmwareVersion, VersionOrdering};

const ORDERING: VersionOrdering = VersionOrdering::Firmware;

/// `count` ranges cycling through the shapes rules files use: a blocked beta line
/// (`>=a.b.c-bN, <a.b.(c+1)`), a single release (`=x.y.z`) and a whole minor line (`x.y.*`).
/// Three in four are terminal (enforced without conditions); the rest are candidates the
/// caller re-checks (shadow mode, path prefix).
fn realistic_ranges(count: usize) -> Vec<(VersionRange, bool)> {
    (0..count)
        .map(|i| {
            let (major, minor, patch) = (i / 100, (i / 10) % 10, i % 10);
            let text = match i % 3 {
                0 => format!(
                    ">={major}.{minor}.{patch}-b{}, <{major}.{minor}.{}",
                    i % 7 + 1,
                    patch + 1
                ),
                1 => format!("={major}.{minor}.{patch}"),
                _ => format!("{major}.{minor}.*"),
            };
            let range = match VersionRange::parse(&text, ORDERING) {
                Ok(range) => range,
                Err(e) => panic!("bench range {text:?} is invalid: {e}"),
            };
            (range, i % 4 != 0)
        })
        .collect()
}

fn parse(text: &str) -> FirmwareVersion {
    match FirmwareVersion::parse(text) {
        Ok(version) => version,
        Err(e) => panic!("bench version {text:?} is invalid: {e}"),
    }
}

fn bench_candidates(c: &mut Criterion) {
    let probes = [
        ("in-beta-line", parse("3.8.0-b3")),
        ("release", parse("50.5.5")),
        ("pre-release-of-line", parse("99.9.0-rc1")),
        ("above-all", parse("1000.0.0")),
    ];
    let mut group = c.benchmark_group("candidates");
    for rule_count in [1usize, 100, 10_000] {
        let entries = realistic_ranges(rule_count);
        let index = match VersionIndex::build(entries.iter().map(|(r, t)| (r, *t)), ORDERING) {
            Ok(index) => index,
            Err(e) => panic!("bench index: {e}"),
        };
        for (name, version) in &probes {
            group.bench_with_input(
                BenchmarkId::new(*name, rule_count),
                version,
                |b, version| b.iter(|| black_box(index.candidates(black_box(version))).len()),
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    for rule_count in [100usize, 10_000] {
        let entries = realistic_ranges(rule_count);
        group.bench_with_input(
            BenchmarkId::from_parameter(rule_count),
            &entries,
            |b, entries| {
                b.iter(|| {
                    VersionIndex::build(entries.iter().map(|(r, t)| (r, *t)), ORDERING)
                        .map(|index| index.stored_candidates())
                })
            },
        );
    }
    group.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for input in ["v3.8.0-b3", "3.8", "Airtame-garbage"] {
        group.bench_with_input(BenchmarkId::from_parameter(input), input, |b, input| {
            b.iter(|| FirmwareVersion::parse(black_box(input)).is_ok())
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_candidates, bench_parse
}
criterion_main!(benches);
