//! `cargo run --release --example storm -- --target 127.0.0.1:8080 ...`: points a simulated
//! fleet at a running fwgate and prints a one-screen summary, so operators can rehearse rules
//! (and watch `/metrics`, `/v1/versions`) before an incident. Loopback or your own test
//! environment only: never point it at production.

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
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seconds = args.seconds.min(600);
    println!(
        "fwgate storm: {} good ({}) + {} bad ({}) devices against {} for {seconds}s",
        args.good, args.good_version, args.bad, args.bad_version, args.target
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
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let summary = fleet.summary(started.elapsed());
    fleet.stop().await;
    print!("{summary}");
}
