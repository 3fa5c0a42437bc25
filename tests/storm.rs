//! The 2020-02-08 incident in miniature, on loopback, asserting on counts.
//!
//! The backend's load is `good + bad + bad²/10`: every connection from the bad cohort makes
//! every other one more expensive (the table scan). Past its capacity it "runs out of memory":
//! every connection drops at once, and the fleet reconnects, which is the cascade. Without
//! rules (control) the backend crashes; with a `deny` or `limit` rule on the bad cohort plus the
//! reconnect backoff, it stays under capacity, every good device ends up connected, and the bad
//! cohort's backend attempts are bounded.

// tokio-tungstenite's handshake callback signature returns its (large) error response type.
#![allow(clippy::result_large_err)]

#[allow(dead_code)]
#[path = "../examples/storm/fleet.rs"]
mod fleet;
#[allow(dead_code)]
#[path = "integration/util.rs"]
mod util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;

use fleet::{Cohort, Fleet, FleetConfig};
use util::{eventually, start_proxy};

const GOOD: usize = 40;
const BAD: usize = 20;
const CAPACITY: f64 = 60.0;
const BAD_VERSION: &str = "3.8.0-b3";

/// A backend that collapses under the bad cohort.
struct FragileBackend {
    addr: SocketAddr,
    good_open: Arc<AtomicU64>,
    bad_open: Arc<AtomicU64>,
    bad_attempts: Arc<AtomicU64>,
    crashes: Arc<AtomicU64>,
    /// Highest load seen, ×100.
    peak_load: Arc<AtomicU64>,
}

fn load(good: u64, bad: u64) -> f64 {
    good as f64 + bad as f64 + (bad * bad) as f64 / 10.0
}

async fn fragile_backend() -> FragileBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = FragileBackend {
        addr: listener.local_addr().unwrap(),
        good_open: Arc::default(),
        bad_open: Arc::default(),
        bad_attempts: Arc::default(),
        crashes: Arc::default(),
        peak_load: Arc::default(),
    };
    let (good_open, bad_open, bad_attempts, crashes, peak) = (
        b.good_open.clone(),
        b.bad_open.clone(),
        b.bad_attempts.clone(),
        b.crashes.clone(),
        b.peak_load.clone(),
    );
    // Bumped on every crash: every connection task drops its socket.
    let (crash_tx, crash_rx) = tokio::sync::watch::channel(0u64);
    let crash_tx = Arc::new(crash_tx);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (good_open, bad_open, bad_attempts, crashes, peak) = (
                good_open.clone(),
                bad_open.clone(),
                bad_attempts.clone(),
                crashes.clone(),
                peak.clone(),
            );
            let (crash_tx, mut crash_rx) = (crash_tx.clone(), crash_rx.clone());
            tokio::spawn(async move {
                let is_bad = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = is_bad.clone();
                let ws = tokio_tungstenite::accept_hdr_async(
                    stream,
                    move |req: &http::Request<()>, resp| {
                        let bad = req
                            .headers()
                            .get("x-firmware-version")
                            .is_some_and(|v| v == BAD_VERSION);
                        flag.store(bad, Ordering::SeqCst);
                        Ok(resp)
                    },
                )
                .await;
                let Ok(mut ws) = ws else { return };
                let bad = is_bad.load(Ordering::SeqCst);
                let counter = if bad { &bad_open } else { &good_open };
                if bad {
                    bad_attempts.fetch_add(1, Ordering::SeqCst);
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let now = load(
                    good_open.load(Ordering::SeqCst),
                    bad_open.load(Ordering::SeqCst),
                );
                peak.fetch_max((now * 100.0) as u64, Ordering::SeqCst);
                if now > CAPACITY {
                    crashes.fetch_add(1, Ordering::SeqCst);
                    crash_tx.send_modify(|g| *g += 1);
                }
                let seen = *crash_rx.borrow_and_update();
                tokio::select! {
                    _ = async { while let Some(Ok(_)) = ws.next().await {} } => {}
                    _ = crash_rx.wait_for(|g| *g != seen) => {}
                }
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    b
}

fn fleet(target: SocketAddr) -> Fleet {
    Fleet::start(fleet_config(target))
}

fn fleet_config(target: SocketAddr) -> FleetConfig {
    FleetConfig {
        target,
        path: "/ws".into(),
        cohorts: vec![
            Cohort {
                name: "good",
                devices: GOOD,
                version: "3.7.2".into(),
            },
            Cohort {
                name: "bad",
                devices: BAD,
                version: BAD_VERSION.into(),
            },
        ],
        reconnect_delay: (Duration::from_millis(10), Duration::from_millis(80)),
        handshake_timeout: Duration::from_secs(5),
        device_ids: true,
        hold: None,
    }
}

/// Waits until the bad cohort has retried several times (the storm is on), bounded by a deadline.
async fn storm_under_way(f: &Fleet) {
    eventually("bad cohort retried a few times", || async {
        f.stats[1].attempts.load(Ordering::Relaxed) >= (BAD * 4) as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_rules_the_backend_collapses() {
    let backend = fragile_backend().await;
    let proxy = start_proxy("# no rules\n", backend.addr, "").await;
    let f = fleet(proxy.addr);
    eventually("the backend collapses under the bad cohort", || async {
        backend.crashes.load(Ordering::SeqCst) >= 1
    })
    .await;
    let summary = f.summary(Duration::ZERO);
    f.stop().await;
    assert!(
        backend.peak_load.load(Ordering::SeqCst) as f64 / 100.0 > CAPACITY,
        "{summary}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rule_and_backoff_keep_the_backend_up() {
    let backend = fragile_backend().await;
    let rules = format!("[[rule]]\nname = \"block-table-scan\"\nversions = \">={BAD_VERSION}\"\naction = \"deny\"\nstatus = 503\nretry_after = \"30s\"\n");
    let proxy = start_proxy(&rules, backend.addr, "").await;
    let f = fleet(proxy.addr);
    eventually("every good device connected", || async {
        f.stats[0].connected.load(Ordering::Relaxed) == GOOD as u64
    })
    .await;
    storm_under_way(&f).await;
    // Devices that keep hammering (over 10 refusals a minute) are taken over by the backoff.
    eventually("the reconnect backoff engages", || async {
        util::metric(
            &proxy,
            "fwgate_decisions_total{decision=\"limited\",rule=\"backoff\"}",
        )
        .await
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    let summary = f.summary(Duration::ZERO);
    let good_connected = f.stats[0].connected.load(Ordering::Relaxed);
    let refused = f.stats[1].refused.lock().unwrap().values().sum::<u64>();
    f.stop().await;
    assert_eq!(backend.crashes.load(Ordering::SeqCst), 0, "{summary}");
    assert!(
        backend.peak_load.load(Ordering::SeqCst) as f64 / 100.0 <= CAPACITY,
        "{summary}"
    );
    assert_eq!(good_connected, GOOD as u64, "{summary}");
    assert_eq!(
        backend.bad_attempts.load(Ordering::SeqCst),
        0,
        "bad cohort reached the backend\n{summary}"
    );
    assert!(
        refused >= BAD as u64,
        "every bad device is refused at least once\n{summary}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_rule_throttles_the_cohort_instead() {
    let backend = fragile_backend().await;
    let rules = format!("[[rule]]\nname = \"throttle-table-scan\"\nversions = \">={BAD_VERSION}\"\naction = \"limit\"\nmax_connections = 5\nrate = \"5/m\"\n");
    let proxy = start_proxy(&rules, backend.addr, "").await;
    let f = fleet(proxy.addr);
    eventually("every good device connected", || async {
        f.stats[0].connected.load(Ordering::Relaxed) == GOOD as u64
    })
    .await;
    storm_under_way(&f).await;
    let summary = f.summary(Duration::ZERO);
    let refused_429 = f.stats[1]
        .refused
        .lock()
        .unwrap()
        .get(&429)
        .copied()
        .unwrap_or(0);
    f.stop().await;
    assert_eq!(backend.crashes.load(Ordering::SeqCst), 0, "{summary}");
    let bad_attempts = backend.bad_attempts.load(Ordering::SeqCst);
    assert!(
        (1..=5).contains(&bad_attempts),
        "bad cohort backend attempts {bad_attempts}\n{summary}"
    );
    assert!(refused_429 > 0, "{summary}");
    proxy.stop().await;
}

/// The most common deployment shape: every device behind one address (an office NAT, or a
/// load balancer without PROXY protocol), no device ids, default settings. Good devices close
/// and reconnect every ~200 ms (far more churn than any real fleet) while a refused cohort
/// retries: fwgate's own storm protection must never refuse a good device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_behind_one_address_are_never_held_back_for_each_other() {
    let backend = ws_echo_backend().await;
    let rules = format!("[[rule]]\nname = \"block-table-scan\"\nversions = \">={BAD_VERSION}\"\naction = \"deny\"\nstatus = 503\n");
    let proxy = start_proxy(&rules, backend, "").await;
    let mut config = fleet_config(proxy.addr);
    config.cohorts[0].devices = 25;
    config.cohorts[1].devices = 5;
    config.device_ids = false;
    config.hold = Some(Duration::from_millis(200));
    let f = Fleet::start(config);
    // 250 good handshakes from one address in a few seconds: the old per-address backoff
    // (10 events a minute) held back most of them.
    eventually("good devices reconnected many times", || async {
        f.stats[0].admitted.load(Ordering::Relaxed) >= 250
            && f.stats[1].attempts.load(Ordering::Relaxed) >= 25
    })
    .await;
    let summary = f.summary(Duration::ZERO);
    let good_refused = f.stats[0].refused.lock().unwrap().clone();
    let good_errors = f.stats[0].errors.load(Ordering::Relaxed);
    let bad_refused = f.stats[1].refused.lock().unwrap().clone();
    let bad_admitted = f.stats[1].admitted.load(Ordering::Relaxed);
    f.stop().await;
    assert!(good_refused.is_empty(), "good devices refused\n{summary}");
    assert_eq!(good_errors, 0, "{summary}");
    assert_eq!(bad_admitted, 0, "{summary}");
    assert_eq!(
        bad_refused.keys().copied().collect::<Vec<_>>(),
        vec![503],
        "{summary}"
    );
    assert_eq!(
        util::metric(
            &proxy,
            "fwgate_decisions_total{decision=\"limited\",rule=\"backoff\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    proxy.stop().await;
}

/// A WebSocket backend that accepts and holds every connection until the client closes it.
async fn ws_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    addr
}
