//! A bounded table of the heaviest keys under a flood of distinct ones: the space-saving
//! algorithm (Metwally, Agrawal, El Abbadi, 2005) with weights that halve every minute.
//!
//! When a new key arrives at a full table, the key with the least weight leaves and the
//! newcomer takes its weight plus one. So a flood of distinct junk only ever replaces junk:
//! a key keeps its place while it carries more than about 1/capacity of the recent traffic,
//! whatever the number of distinct keys. Halving weights every minute lets keys that went
//! quiet make room for today's. The table never holds more than `capacity` keys.

use std::collections::HashMap;
use std::hash::Hash;

/// Longest halving applied at once (a weight is a `u32`).
const MAX_HALVINGS: u32 = 31;

struct Slot<V> {
    weight: u32,
    /// Minute of the last update; the weight halves once per minute since.
    minute: u32,
    value: V,
}

impl<V> Slot<V> {
    fn weight_at(&self, minute: u32) -> u32 {
        self.weight >> minute.saturating_sub(self.minute).min(MAX_HALVINGS)
    }
}

/// At most `capacity` keys, each with a value; see the module docs for who stays.
pub struct SpaceSaving<K, V> {
    capacity: usize,
    slots: HashMap<K, Slot<V>>,
}

impl<K: Hash + Eq + Copy, V: Default> SpaceSaving<K, V> {
    /// An empty table holding at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> SpaceSaving<K, V> {
        SpaceSaving {
            capacity: capacity.max(1),
            slots: HashMap::new(),
        }
    }

    /// The value of `key`, counted once more at `minute`. A new key that finds the table
    /// full takes the place of the lightest key, which is handed to `evicted` first.
    pub fn touch(&mut self, key: K, minute: u32, evicted: impl FnOnce(K, V)) -> &mut V {
        let mut weight = 1;
        if !self.slots.contains_key(&key) && self.slots.len() >= self.capacity {
            let lightest = self
                .slots
                .iter()
                .min_by_key(|(_, slot)| slot.weight_at(minute))
                .map(|(k, slot)| (*k, slot.weight_at(minute)));
            if let Some((gone, gone_weight)) = lightest {
                if let Some(slot) = self.slots.remove(&gone) {
                    evicted(gone, slot.value);
                }
                weight = gone_weight.saturating_add(1);
            }
        }
        let slot = self.slots.entry(key).or_insert_with(|| Slot {
            weight: weight.saturating_sub(1),
            minute,
            value: V::default(),
        });
        slot.weight = slot.weight_at(minute).saturating_add(1);
        slot.minute = minute;
        &mut slot.value
    }

    /// The value of `key`, if held; does not count as an occurrence.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.slots.get_mut(key).map(|slot| &mut slot.value)
    }

    /// Every key with its value.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().map(|(k, slot)| (k, &slot.value))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_distinct_keys_never_pushes_out_a_heavy_one() {
        let mut table = SpaceSaving::<u64, u32>::new(64);
        let mut evicted = 0u64;
        for _ in 0..50 {
            *table.touch(7, 0, |_, _| evicted += 1) += 1;
        }
        for junk in 1_000..1_000 + 2_000u64 {
            table.touch(junk, 0, |_, _| evicted += 1);
            assert!(table.len() <= 64);
        }
        assert_eq!(
            table.iter().find(|(k, _)| **k == 7).map(|(_, v)| *v),
            Some(50)
        );
        assert_eq!(
            evicted,
            2_000 - 63,
            "every junk key beyond the capacity left again"
        );
        // A real newcomer after the flood gets in and stays while it keeps coming.
        for _ in 0..50 {
            table.touch(8, 0, |_, _| {});
            for junk in 0..10u64 {
                table.touch(10_000 + junk, 0, |_, _| {});
            }
        }
        assert!(table.iter().any(|(k, _)| *k == 8));
    }

    #[test]
    fn quiet_keys_make_room_as_their_weight_halves() {
        let mut table = SpaceSaving::<u64, ()>::new(2);
        for _ in 0..1_000 {
            table.touch(1, 0, |_, _| {});
        }
        table.touch(2, 0, |_, _| {});
        // An hour later, key 1's weight has halved 60 times: a newcomer takes its place
        // rather than the recently seen key 2... which is as light; either may go, but the
        // stale heavy key must be able to go.
        let mut gone = Vec::new();
        table.touch(2, 60, |_, _| {});
        table.touch(3, 60, |k, _| gone.push(k));
        assert_eq!(gone, vec![1]);
    }
}
