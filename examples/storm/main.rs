//! `cargo run --release --example storm -- --target 127.0.0.1:8080 ...`: points a simulated
//! fleet at a running fwgate and prints a one-screen summary, so operators can rehearse rules
//! (and watch `/metrics`, `/v1/versions`, the console) before an incident. Loopback or your own
//! test environment only: never point it at production.
//!
//! `--serve-backend 127.0.0.1:9000 --slow-version 3.8.0-b3 --slow-ms 400` runs the other side
//! instead: a WebSocket echo backend whose bad cohort is slow (see `backend.rs`), to put fwgate
//! in front of.

mod backend;
mod fleet;

use std::time::{Duration, Instant};

use clap::Parser;

use fleet::{Cohort, Fleet, FleetConfig};

/// Rehearse a reconnect storm against a running fwgate.
#[derive(Parser)]
struct Args {
    /// fwgate's device address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: std::net::SocketAddr,
    /// WebSocket path.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// Devices on good firmware.
    #[arg(long, default_value_t = 200)]
    good: usize,
    /// Their firmware version.
    #[arg(long, default_value = "3.7.2")]
    good_version: String,
    /// Devices on the bad firmware.
    #[arg(long, default_value_t = 50)]
    bad: usize,
    /// Its firmware version.
    #[arg(long, default_value = "3.8.0-b3")]
    bad_version: String,
    /// How long to run, in seconds (at most 600).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Minimum reconnect delay in ms.
    #[arg(long, default_value_t = 50)]
    min_delay_ms: u64,
    /// Maximum reconnect delay in ms.
    #[arg(long, default_value_t = 500)]
    max_delay_ms: u64,
    /// Send no X-Device-Id: every device looks alike from one address, as behind an office NAT
    /// or a load balancer without PROXY protocol (the reconnect backoff must not hold them back).
    #[arg(long)]
    no_device_ids: bool,
    /// Each device closes its WebSocket after about this many ms (±50%) and reconnects:
    /// ordinary churn. Default: hold it until dropped.
    #[arg(long)]
    hold_ms: Option<u64>,
    /// Serve a loopback backend on this address instead of running a fleet: every upgrade gets
    /// its 101 and an echo, plain requests a 200; Ctrl-C stops it.
    #[arg(long)]
    serve_backend: Option<std::net::SocketAddr>,
    /// With --serve-backend: the firmware version (X-Firmware-Version) whose answers are slow.
    #[arg(long, requires = "serve_backend")]
    slow_version: Option<String>,
    /// With --serve-backend: how long the slow version waits for its 101 or response, in ms.
    #[arg(long, default_value_t = 400, requires = "serve_backend")]
    slow_ms: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(addr) = args.serve_backend {
        serve_backend(addr, args.slow_version, args.slow_ms).await;
        return;
    }
    let seconds = args.seconds.min(600);
    println!(
        "fwgate storm: {} good ({}) + {} bad ({}) devices against {} for {seconds}s{}",
        args.good,
        args.good_version,
        args.bad,
        args.bad_version,
        args.target,
        if args.no_device_ids {
            ", no device ids (one shared address)"
        } else {
            ""
        }
    );
    let fleet = Fleet::start(FleetConfig {
        target: args.target,
        path: args.path,
        cohorts: vec![
            Cohort {
                name: "good",
                devices: args.good,
                version: args.good_version,
            },
            Cohort {
                name: "bad",
                devices: args.bad,
                version: args.bad_version,
            },
        ],
        reconnect_delay: (
            Duration::from_millis(args.min_delay_ms),
            Duration::from_millis(args.max_delay_ms.max(args.min_delay_ms)),
        ),
        handshake_timeout: Duration::from_secs(10),
        device_ids: !args.no_device_ids,
        hold: args.hold_ms.map(Duration::from_millis),
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let summary = fleet.summary(started.elapsed());
    fleet.stop().await;
    print!("{summary}");
}

/// `--serve-backend`: the backend side of a rehearsal, until Ctrl-C.
async fn serve_backend(addr: std::net::SocketAddr, slow_version: Option<String>, slow_ms: u64) {
    let config = backend::BackendConfig {
        slow_version,
        slow: Duration::from_millis(slow_ms),
    };
    let slow = match &config.slow_version {
        Some(v) => format!("{v} answered after {slow_ms} ms, every other version at once"),
        None => "every version answered at once".into(),
    };
    let (bound, stats) = match backend::start(addr, config).await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("storm: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("fwgate storm backend on {bound}: {slow}; Ctrl-C to stop");
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("storm: cannot wait for Ctrl-C ({e}); stopping");
    }
    println!(
        "backend: {} connections, {} slowed answers, {} WebSockets open at the end",
        stats.connections.load(std::sync::atomic::Ordering::Relaxed),
        stats.slowed.load(std::sync::atomic::Ordering::Relaxed),
        stats.open.load(std::sync::atomic::Ordering::Relaxed),
    );
}
