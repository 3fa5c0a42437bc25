//! A simulated device fleet for reconnect-storm rehearsals: every device opens a WebSocket with
//! its firmware version and device id, holds it, and when it is refused or dropped reconnects
//! after a short random delay, as real devices do. Shared by `examples/storm` (the operator tool)
//! and `tests/storm.rs` (the incident in miniature). Loopback targets, bounded in time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

/// One group of devices running the same firmware.
#[derive(Debug, Clone)]
pub struct Cohort {
    /// Name in the summary.
    pub name: &'static str,
    /// How many devices.
    pub devices: usize,
    /// The firmware version they send.
    pub version: String,
}

/// The fleet and how it behaves.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// fwgate (or a backend, for a control run).
    pub target: SocketAddr,
    /// Request path of the WebSocket upgrade.
    pub path: String,
    /// The cohorts.
    pub cohorts: Vec<Cohort>,
    /// Random reconnect delay after a refusal or a drop (min, max).
    pub reconnect_delay: (Duration, Duration),
    /// Give up on one handshake after this long.
    pub handshake_timeout: Duration,
    /// Send `X-Device-Id`. Without it, devices are told apart only by what fwgate can see
    /// (here: one shared address, as behind an office NAT or a load balancer).
    pub device_ids: bool,
    /// Devices close their WebSocket themselves after about this long (±50%) and reconnect:
    /// ordinary churn. None: they hold it until it is dropped.
    pub hold: Option<Duration>,
}

/// What one cohort experienced.
#[derive(Debug, Default)]
pub struct CohortStats {
    /// Handshakes attempted.
    pub attempts: AtomicU64,
    /// Handshakes admitted (101).
    pub admitted: AtomicU64,
    /// Devices connected right now.
    pub connected: AtomicU64,
    /// Established connections that were later dropped.
    pub dropped: AtomicU64,
    /// Connection errors and timeouts.
    pub errors: AtomicU64,
    /// Refusals by status code.
    pub refused: Mutex<BTreeMap<u16, u64>>,
    /// Handshake latencies in microseconds (admitted and refused).
    pub latencies_us: Mutex<Vec<u64>>,
}

impl CohortStats {
    /// The p-th percentile handshake latency.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let mut l = self.latencies_us.lock().ok()?.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        Some(Duration::from_micros(l[i.min(l.len() - 1)]))
    }
}

/// A running fleet.
pub struct Fleet {
    /// Stats per cohort, in the config's order.
    pub stats: Vec<Arc<CohortStats>>,
    /// The config it runs with.
    pub config: FleetConfig,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts every device.
    pub fn start(config: FleetConfig) -> Fleet {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut stats = Vec::new();
        let mut tasks = Vec::new();
        for (c, cohort) in config.cohorts.iter().enumerate() {
            let s = Arc::new(CohortStats::default());
            stats.push(s.clone());
            for d in 0..cohort.devices {
                let device_id = format!("{}-{c}-{d}", cohort.name);
                tasks.push(tokio::spawn(device(
                    config.clone(),
                    cohort.version.clone(),
                    device_id,
                    s.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        Fleet {
            stats,
            config,
            stop,
            tasks,
        }
    }

    /// Stops every device and waits for them (bounded by the handshake timeout).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// One screen: per cohort, attempts, admitted, connected now, refusals, errors, p99.
    pub fn summary(&self, elapsed: Duration) -> String {
        let mut out = format!(
            "{:<10} {:>8} {:>9} {:>9} {:>8} {:>7} {:>12}  refused (status: count)\n",
            "cohort", "devices", "attempts", "admitted", "conn.now", "errors", "p99 handshake"
        );
        for (cohort, s) in self.config.cohorts.iter().zip(&self.stats) {
            let refused = s
                .refused
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<10} {:>8} {:>9} {:>9} {:>8} {:>7} {:>12}  {}\n",
                format!("{} {}", cohort.name, cohort.version),
                cohort.devices,
                s.attempts.load(Ordering::Relaxed),
                s.admitted.load(Ordering::Relaxed),
                s.connected.load(Ordering::Relaxed),
                s.errors.load(Ordering::Relaxed),
                s.percentile(0.99)
                    .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_else(|| "-".into()),
                if refused.is_empty() {
                    "-".into()
                } else {
                    refused
                },
            ));
        }
        out.push_str(&format!("elapsed {:.1} s\n", elapsed.as_secs_f64()));
        out
    }
}

async fn pause(config: &FleetConfig, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    let (lo, hi) = config.reconnect_delay;
    let span = hi.saturating_sub(lo).as_millis() as u64;
    let wait = lo + Duration::from_millis(fastrand::u64(0..=span));
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// How an admitted connection ended.
enum Ended {
    /// fwgate or the backend dropped it.
    Dropped,
    /// The device closed it after its hold time.
    Closed,
    /// The fleet is stopping.
    Stopped,
}

async fn device(
    config: FleetConfig,
    version: String,
    device_id: String,
    stats: Arc<CohortStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Spread the first connects a little, as a fleet coming online does.
    if !pause(&config, &mut stop).await {
        return;
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let Ok(mut req) = format!("ws://{}{}", config.target, config.path).into_client_request()
        else {
            return;
        };
        if let Ok(v) = version.parse() {
            req.headers_mut().insert("x-firmware-version", v);
        }
        if let (true, Ok(d)) = (config.device_ids, device_id.parse()) {
            req.headers_mut().insert("x-device-id", d);
        }
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = tokio::time::timeout(config.handshake_timeout, async {
            let tcp = tokio::net::TcpStream::connect(config.target).await?;
            tokio_tungstenite::client_async(req, tcp)
                .await
                .map_err(|e| match e {
                    WsError::Http(resp) => {
                        std::io::Error::other(format!("status {}", resp.status().as_u16()))
                    }
                    other => std::io::Error::other(other.to_string()),
                })
        })
        .await;
        let elapsed = started.elapsed().as_micros() as u64;
        if let Ok(mut l) = stats.latencies_us.lock() {
            l.push(elapsed);
        }
        match result {
            Ok(Ok((mut ws, _))) => {
                stats.admitted.fetch_add(1, Ordering::Relaxed);
                stats.connected.fetch_add(1, Ordering::Relaxed);
                let held = async {
                    match config.hold {
                        Some(hold) => {
                            let ms = hold.as_millis() as u64;
                            let jittered = ms / 2 + fastrand::u64(0..=ms);
                            tokio::time::sleep(Duration::from_millis(jittered)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                let ended = tokio::select! {
                    _ = async { while let Some(Ok(_)) = ws.next().await {} } => Ended::Dropped,
                    _ = held => Ended::Closed,
                    _ = stop.wait_for(|s| *s) => Ended::Stopped,
                };
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                match ended {
                    Ended::Stopped => return,
                    Ended::Dropped => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ended::Closed => {
                        let _ =
                            tokio::time::timeout(config.handshake_timeout, ws.close(None)).await;
                    }
                }
            }
            Ok(Err(e)) => {
                let status = e
                    .to_string()
                    .strip_prefix("status ")
                    .and_then(|s| s.parse::<u16>().ok());
                match status {
                    Some(code) => {
                        if let Ok(mut m) = stats.refused.lock() {
                            *m.entry(code).or_default() += 1;
                        }
                    }
                    None => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !pause(&config, &mut stop).await {
            return;
        }
    }
}
