//! The access log: one structured line per decision (target `fwgate::access`), written through
//! `tracing` so the format (text or JSON) is the subscriber's. Refusal lines are sampled: during
//! a reconnect storm a refused fleet could otherwise write millions of identical lines, so past
//! a per-second budget lines are dropped, counted, and a summary line says how many.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;

fn process_seconds() -> u64 {
    crate::clock::since_start().as_secs()
}

/// Per-second budget for refusal lines, lock-free.
#[derive(Debug)]
pub struct RefusalSampler {
    per_second: u64,
    /// (second << 32) | lines written in that second.
    window: AtomicU64,
    suppressed: AtomicU64,
    suppressed_total: Counter,
}

impl RefusalSampler {
    /// A sampler writing at most `per_second` refusal lines per second (0: none).
    pub fn new(per_second: u32, suppressed_total: Counter) -> RefusalSampler {
        RefusalSampler {
            per_second: u64::from(per_second),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            suppressed_total,
        }
    }

    /// Whether this refusal may be logged. Reports (once) how many were dropped in past seconds.
    pub fn allow(&self) -> bool {
        self.allow_at(process_seconds())
    }

    fn allow_at(&self, now: u64) -> bool {
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (second, count) = (current >> 32, current & 0xffff_ffff);
            let (next, fresh) = if second == now {
                (current + 1, false)
            } else {
                ((now << 32) | 1, true)
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if fresh {
                        let dropped = self.suppressed.swap(0, Ordering::Relaxed);
                        if dropped > 0 {
                            tracing::warn!(target: "fwgate::access", suppressed = dropped, "refusal log lines suppressed by sampling (see fwgate_access_log_suppressed_total)");
                        }
                    }
                    let allowed = if fresh { 1 } else { count + 1 };
                    if allowed <= self.per_second {
                        return true;
                    }
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    self.suppressed_total.inc();
                    return false;
                }
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_second_then_reset() {
        let c = Counter::default();
        let s = RefusalSampler::new(3, c.clone());
        let allowed = (0..10).filter(|_| s.allow_at(5)).count();
        assert_eq!(allowed, 3);
        assert_eq!(c.get(), 7);
        assert!(s.allow_at(6));
        assert_eq!(s.suppressed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn zero_budget_logs_nothing() {
        let s = RefusalSampler::new(0, Counter::default());
        assert!(!s.allow_at(1));
    }
}
