//! Fixed-size histograms with power-of-two buckets, for percentiles per cohort and per time
//! slot without storing samples: bucket 0 holds values below `BASE`, bucket `i` values in
//! `[BASE·2^(i-1), BASE·2^i)`, the last one everything above. A percentile is interpolated
//! inside its bucket, so it is within a factor of two of the truth and usually much closer:
//! enough to tell a cohort answered in 200 ms from one answered in 10 ms.

use super::window::Tally;

/// Counts of values in power-of-two buckets above `BASE` (in the caller's unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram<const N: usize, const BASE: u64> {
    counts: [u32; N],
}

impl<const N: usize, const BASE: u64> Default for Histogram<N, BASE> {
    fn default() -> Self {
        Histogram { counts: [0; N] }
    }
}

impl<const N: usize, const BASE: u64> Histogram<N, BASE> {
    /// Counts one value.
    pub fn record(&mut self, value: u64) {
        let bucket = if value < BASE {
            0
        } else {
            // value >= BASE >= 1, so the quotient is at least 1 and ilog2 is defined.
            ((value / BASE).ilog2() as usize + 1).min(N - 1)
        };
        self.counts[bucket] = self.counts[bucket].saturating_add(1);
    }

    /// This histogram without the values of `part` (bucket by bucket), e.g. the fleet
    /// without one cohort.
    pub fn minus(&self, part: &Self) -> Self {
        let mut out = *self;
        for (a, b) in out.counts.iter_mut().zip(part.counts) {
            *a = a.saturating_sub(b);
        }
        out
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// The `q`-quantile (0..=1), interpolated within its bucket; None without values.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let c = f64::from(c);
            if seen + c >= rank {
                let (lo, hi) = Self::bounds(i);
                return Some(lo + (hi - lo) * ((rank - seen) / c));
            }
            seen += c;
        }
        let (_, hi) = Self::bounds(N - 1);
        Some(hi)
    }

    fn bounds(bucket: usize) -> (f64, f64) {
        let base = BASE as f64;
        if bucket == 0 {
            (0.0, base)
        } else {
            let lo = base * f64::from(1u32 << (bucket - 1).min(31));
            (lo, lo * 2.0)
        }
    }
}

impl<const N: usize, const BASE: u64> Tally for Histogram<N, BASE> {
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a = a.saturating_add(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_land_within_a_factor_of_two_and_order_is_kept() {
        let mut h = Histogram::<22, 128>::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..99 {
            h.record(2_000);
        }
        h.record(400_000);
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        let p100 = h.quantile(1.0).unwrap();
        assert!((1_000.0..=4_000.0).contains(&p50), "{p50}");
        assert!((1_000.0..=4_000.0).contains(&p99), "{p99}");
        assert!((200_000.0..=800_000.0).contains(&p100), "{p100}");
        assert_eq!(h.count(), 100);
        let mut tiny = Histogram::<22, 128>::default();
        tiny.record(0);
        assert!(tiny.quantile(0.99).unwrap() <= 128.0);
        let mut huge = Histogram::<4, 128>::default();
        huge.record(u64::MAX);
        assert_eq!(huge.quantile(0.5), Some(1024.0));
        let mut merged = Histogram::<22, 128>::default();
        merged.merge(&h);
        merged.merge(&tiny);
        assert_eq!(merged.count(), 101);
    }
}
