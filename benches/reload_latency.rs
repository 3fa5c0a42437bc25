//! From a valid rules file landing on disk (temp file + rename, as editors and config tools
//! do) to the first decision under the new rules, through the real watcher, debounce, compile
//! and swap. `cargo bench --bench reload_latency` prints min / median / p95 / max over 30 edits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fwgate::admin::AdminToken;
use fwgate::config::Config;
use fwgate::gate::Gate;
use fwgate::metrics::Metrics;
use fwgate::rules::{file, VersionInput};
use fwgate::version::FirmwareVersion;
use fwgate::Listeners;

const EDITS: usize = 30;

fn rules(blocked: bool) -> String {
    let range = if blocked { ">=3.8.0-b3" } else { ">=99" };
    // 100 unrelated rules so the compile is realistic.
    let mut text =
        format!("[[rule]]\nname = \"target\"\nversions = \"{range}\"\naction = \"deny\"\n");
    for i in 0..100 {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nversions = \">=1.{i}.0, <1.{i}.5\"\naction = \"deny\"\n"
        ));
    }
    text
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules_path = dir.path().join("rules.toml");
        std::fs::write(&rules_path, rules(false)).expect("write rules");
        std::fs::write(dir.path().join("fwgate.toml"), "rules = \"rules.toml\"\n").expect("write config");
        let config = Config::load(&dir.path().join("fwgate.toml")).expect("config");
        let metrics = Arc::new(Metrics::new());
        let initial = file::load(&rules_path, &metrics, 1).expect("rules");
        let gate = Arc::new(Gate::new(config, initial, metrics).expect("gate"));
        let listeners = Listeners {
            proxy: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            tls: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fwgate::run(listeners, gate.clone(), AdminToken::none(), async {
            let _ = stopped.await;
        }));
        let probe = VersionInput::Parsed(FirmwareVersion::parse("3.8.0").expect("version"));
        let refused = |gate: &Gate| {
            let snap = gate.snapshot();
            !gate.decide(&snap, &probe, "/").admits()
        };
        // Let the watcher start.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut samples = Vec::new();
        for i in 0..EDITS {
            let blocked = i % 2 == 0;
            let tmp = dir.path().join(".rules.toml.tmp");
            std::fs::write(&tmp, rules(blocked)).expect("write");
            let started = Instant::now();
            std::fs::rename(&tmp, &rules_path).expect("rename");
            while refused(&gate) != blocked {
                if started.elapsed() > Duration::from_secs(10) {
                    panic!("edit {i} not applied within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples.push(started.elapsed());
        }
        let _ = stop.send(());
        let _ = task.await;
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "reload latency over {EDITS} edits (rename into place -> first decision under the new rules): min {:.0} ms, median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
            ms(samples[0]),
            ms(samples[EDITS / 2]),
            ms(samples[EDITS * 95 / 100]),
            ms(samples[EDITS - 1])
        );
    });
}
