//! Fleet propagation: three in-process instances on one etcd (started here on 127.0.0.1, data
//! on /dev/shm), 100 kill-switch changes (adds and removes, written through a different
//! instance each time, with compare-and-set and the audit record, as the admin API does).
//! For every change and every instance: the time from the start of the write to the moment
//! that instance's entries in force reflect it (polled every 100 µs), then p50 / p99 / max;
//! plus how long the write call took (it returns once every instance reported the change).
//! `cargo bench --bench fleet_propagation`; needs the `etcd` binary (skipped without it).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwgate::admin::AdminToken;
use fwgate::config::Config;
use fwgate::gate::Gate;
use fwgate::killswitch::{self, NewEntry};
use fwgate::metrics::Metrics;
use fwgate::rules::file;
use fwgate::version::VersionOrdering;
use fwgate::Listeners;

const CHANGES: usize = 100;
const INSTANCES: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Instance {
    gate: Arc<Gate>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn instance(endpoint: &str, id: &str) -> Instance {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("rules.toml"),
        "[defaults]\naction = \"allow\"\n",
    )
    .expect("rules");
    std::fs::write(
        dir.path().join("fwgate.toml"),
        format!(
            "rules = \"rules.toml\"\nstate_dir = \"state\"\nshutdown_grace = \"1s\"\n[fleet]\netcd = [\"{endpoint}\"]\ninstance_id = \"{id}\"\n"
        ),
    )
    .expect("config");
    let config = Config::load(&dir.path().join("fwgate.toml")).expect("config");
    let metrics = Arc::new(Metrics::new());
    let rules = file::load(&dir.path().join("rules.toml"), &metrics, 1).expect("rules");
    let gate = Arc::new(Gate::new(config, rules, metrics).expect("gate"));
    let listeners = Listeners {
        proxy: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        tls: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(fwgate::run(
        listeners,
        gate.clone(),
        AdminToken::none(),
        async {
            let _ = stopped.await;
        },
    ));
    Instance {
        gate,
        stop,
        task,
        _dir: dir,
    }
}

fn has(gate: &Gate, id: &str) -> bool {
    gate.kill_set().entries.iter().any(|e| e.spec.id == id)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    if Command::new("etcd").arg("--version").output().is_err() {
        println!("fleet_propagation: SKIPPED, the etcd binary is not installed (apt-get install etcd-server)");
        return;
    }
    let data = tempfile::Builder::new()
        .prefix("fwgate-bench-etcd")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .expect("data dir");
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(data.path().join("data"))
        .args([
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args(["--initial-cluster-state", "new", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut members = Vec::new();
        for i in 0..INSTANCES {
            members.push(instance(&endpoint, &format!("bench-{i}")).await);
        }
        let started = Instant::now();
        while members.iter().any(|m| m.gate.fleet_unsynced()) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "instances did not sync with etcd"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the heartbeats list every instance before the first write waits for them.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut applied = Vec::with_capacity(CHANGES * INSTANCES);
        let mut writes = Vec::with_capacity(CHANGES);
        for change in 0..CHANGES {
            let id = format!("bench-{}", change / 2);
            let adding = change % 2 == 0;
            let writer = members[change % INSTANCES].gate.clone();
            let gates: Vec<Arc<Gate>> = members.iter().map(|m| m.gate.clone()).collect();
            let t0 = Instant::now();
            let watchers: Vec<_> = gates
                .into_iter()
                .map(|g| {
                    let id = id.clone();
                    tokio::spawn(async move {
                        while has(&g, &id) != adding {
                            assert!(t0.elapsed() < Duration::from_secs(10), "change not applied");
                            tokio::time::sleep(Duration::from_micros(100)).await;
                        }
                        t0.elapsed()
                    })
                })
                .collect();
            if adding {
                let spec = killswitch::spec_from_request(
                    NewEntry {
                        versions: format!(">={}.0.0", change + 1),
                        reason: "propagation benchmark".into(),
                        id: Some(id.clone()),
                        ttl: None,
                        expires_at: None,
                        status: None,
                        retry_after: None,
                        jitter: None,
                        close_existing: None,
                        drain: None,
                    },
                    VersionOrdering::Firmware,
                    Some("bench".into()),
                )
                .expect("spec");
                writer.kill_add(spec, false).await.expect("add");
            } else {
                writer.kill_remove(&id, Some("bench")).await.expect("remove");
            }
            writes.push(t0.elapsed());
            for w in watchers {
                applied.push(w.await.expect("watcher"));
            }
        }
        applied.sort();
        writes.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "fleet propagation over {CHANGES} kill-switch changes x {INSTANCES} instances (write start -> entries in force on each instance): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&applied, 0.5)),
            ms(percentile(&applied, 0.99)),
            ms(applied[applied.len() - 1])
        );
        println!(
            "write call (compare-and-set + audit, returns once every instance reported it): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&writes, 0.5)),
            ms(percentile(&writes, 0.99)),
            ms(writes[writes.len() - 1])
        );
        for m in members {
            let _ = m.stop.send(());
            let _ = m.task.await;
        }
    });
    let _ = etcd.kill();
    let _ = etcd.wait();
}
