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
    /// Send no X-Device-Id: every device looks alike from one address, as behind an office NAT
    /// or a load balancer without PROXY protocol (the reconnect backoff must not hold them back).
    #[arg(long)]
    no_device_ids: bool,
    /// Each device closes its WebSocket after about this many ms (±50%) and reconnects:
    /// ordinary churn. Default: hold it until dropped.
    #[arg(long)]
    hold_ms: Option<u64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
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
