//! One monotonic process clock for the windows and penalties that only need "time since
//! start" (census slots, log sampling, reconnect backoff), instead of one per module.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Time since the clock was first read (shortly after start).
pub fn since_start() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}
