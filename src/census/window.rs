//! Sliding time windows of per-slot tallies: the last minute in twelve 5-second slots and the
//! last hour in twelve 5-minute slots. A slot is reused in place when its time comes round
//! again, so a window never allocates after it is made.

/// Seconds per fine slot (the minute window).
pub const FINE_SLOT_SECS: u64 = 5;
const FINE_SLOTS: usize = 12;
const COARSE_SLOT_SECS: u64 = 300;
const COARSE_SLOTS: usize = 12;

/// What can be counted in a slot and added up over a window.
pub trait Tally: Copy + Default {
    /// Adds `other` into `self` (saturating).
    fn merge(&mut self, other: &Self);
}

/// One tally per slot over the last minute and the last hour.
#[derive(Clone)]
pub struct Window<T: Tally> {
    fine: [(u64, T); FINE_SLOTS],
    coarse: [(u64, T); COARSE_SLOTS],
}

impl<T: Tally> Default for Window<T> {
    fn default() -> Self {
        Window {
            fine: [(0, T::default()); FINE_SLOTS],
            coarse: [(0, T::default()); COARSE_SLOTS],
        }
    }
}

impl<T: Tally> Window<T> {
    /// Applies `update` to the current slot of both windows. `now_secs` must be at least one
    /// hour into the clock (see [`now_secs`]), so that stamp 0 means "never written".
    pub fn record(&mut self, now_secs: u64, update: impl Fn(&mut T)) {
        update(slot(&mut self.fine, now_secs / FINE_SLOT_SECS));
        update(slot(&mut self.coarse, now_secs / COARSE_SLOT_SECS));
    }

    /// The sum over the last minute.
    pub fn last_minute(&self, now_secs: u64) -> T {
        sum(&self.fine, now_secs / FINE_SLOT_SECS)
    }

    /// The sum over the last hour.
    pub fn last_hour(&self, now_secs: u64) -> T {
        sum(&self.coarse, now_secs / COARSE_SLOT_SECS)
    }

    /// Adds every slot of `other` that is still current into this window (a cohort folded
    /// into `other` when it leaves the table).
    pub fn absorb(&mut self, other: &Window<T>, now_secs: u64) {
        absorb(&mut self.fine, &other.fine, now_secs / FINE_SLOT_SECS);
        absorb(&mut self.coarse, &other.coarse, now_secs / COARSE_SLOT_SECS);
    }
}

/// The clock windows are stamped with: seconds since start, offset by one hour so that
/// stamp 0 never collides with "never written".
pub fn now_secs() -> u64 {
    crate::clock::since_start().as_secs() + 3600
}

fn slot<T: Tally, const N: usize>(slots: &mut [(u64, T); N], stamp: u64) -> &mut T {
    let slot = &mut slots[(stamp % N as u64) as usize];
    if slot.0 != stamp {
        *slot = (stamp, T::default());
    }
    &mut slot.1
}

fn is_current<const N: usize>(stamp: u64, current: u64) -> bool {
    stamp != 0 && stamp + N as u64 > current && stamp <= current
}

fn sum<T: Tally, const N: usize>(slots: &[(u64, T); N], current: u64) -> T {
    let mut total = T::default();
    for (stamp, tally) in slots {
        if is_current::<N>(*stamp, current) {
            total.merge(tally);
        }
    }
    total
}

fn absorb<T: Tally, const N: usize>(into: &mut [(u64, T); N], from: &[(u64, T); N], current: u64) {
    for (stamp, tally) in from {
        if is_current::<N>(*stamp, current) {
            slot(into, *stamp).merge(tally);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    struct Count(u32);

    impl Tally for Count {
        fn merge(&mut self, other: &Self) {
            self.0 = self.0.saturating_add(other.0);
        }
    }

    #[test]
    fn windows_slide_and_absorb_only_what_is_current() {
        let mut w = Window::<Count>::default();
        let t0 = 10_000;
        w.record(t0, |c| c.0 += 1);
        w.record(t0 + 1, |c| c.0 += 1);
        assert_eq!(w.last_minute(t0 + 1), Count(2));
        assert_eq!(w.last_minute(t0 + 70), Count(0));
        assert_eq!(w.last_hour(t0 + 70), Count(2));
        assert_eq!(w.last_hour(t0 + 3000), Count(2));
        assert_eq!(w.last_hour(t0 + 3700), Count(0));

        let mut other = Window::<Count>::default();
        other.record(t0 + 2, |c| c.0 += 5);
        other.absorb(&w, t0 + 30);
        assert_eq!(other.last_minute(t0 + 30), Count(7));
        assert_eq!(other.last_hour(t0 + 30), Count(7));
        // Long gone slots are not absorbed.
        let mut late = Window::<Count>::default();
        late.absorb(&w, t0 + 7200);
        assert_eq!(late.last_hour(t0 + 7200), Count(0));
    }
}
