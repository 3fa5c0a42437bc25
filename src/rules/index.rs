//! [`VersionIndex`]: the rules that can apply to a version, found with one binary search
//! whatever the number of rules.
//!
//! Every interval endpoint of every range is collected, then sorted and deduplicated in the
//! ordering. The `n` points split the version line into `2n + 1` elementary pieces: the gap
//! before point 0, point 0, the gap after it, point 1, …, the gap after the last point. Each
//! piece lies wholly inside or wholly outside every interval, so each piece has one fixed
//! candidate list: the entries whose range covers it, in rule order, cut after the first
//! terminal one. The lists are flattened into one `Vec<u32>`. A lookup is a binary search for
//! the piece, then a slice: no allocation.
//!
//! Building is near-linear: entries are applied in rule order, and a "next open piece" skip
//! structure (union-find with path halving) makes each interval visit only pieces that no
//! earlier terminal entry has closed. Non-terminal entries store one candidate per piece they
//! cover; the total is capped by [`MAX_STORED_CANDIDATES`].

use std::ops::Bound;

use crate::rules::range::{Interval, VersionRange};
use crate::version::{FirmwareVersion, VersionOrdering};

/// Most (piece, entry) candidates an index stores (16 MB of `u32`). Only many overlapping
/// non-terminal rules (shadow mode, path conditions) over many distinct endpoints get near it.
pub const MAX_STORED_CANDIDATES: usize = 4_000_000;

/// Why a set of ranges cannot be indexed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A range was parsed for another ordering; its intervals would be wrong here.
    #[error("entry {entry} was parsed for the {found} ordering but the index uses {expected}")]
    OrderingMismatch {
        /// Position of the entry.
        entry: usize,
        /// The index's ordering.
        expected: VersionOrdering,
        /// The range's ordering.
        found: VersionOrdering,
    },
    /// More entries than a `u32` position can name.
    #[error("too many rules to index (at most {max})")]
    TooManyEntries {
        /// The limit.
        max: usize,
    },
    /// The candidate lists would exceed [`MAX_STORED_CANDIDATES`].
    #[error(
        "rules overlap too much: more than {limit} candidates would be stored; make broad rules terminal (enforced, without conditions) or merge overlapping rules"
    )]
    TooManyOverlaps {
        /// The limit.
        limit: usize,
    },
}

/// Precomputed candidate lists for every piece of the version line, for one decision per
/// connection in `O(log rules)`.
#[derive(Clone, Debug)]
pub struct VersionIndex {
    ordering: VersionOrdering,
    entry_count: usize,
    /// Sorted, distinct interval endpoints.
    points: Vec<FirmwareVersion>,
    /// Piece `p`'s candidates are `candidates[piece_starts[p]..piece_starts[p + 1]]`.
    piece_starts: Vec<u32>,
    candidates: Vec<u32>,
}

impl VersionIndex {
    /// Builds the index over `entries` in rule order: `(range, terminal)`. A terminal entry ends
    /// the search (an enforced rule without extra conditions); a non-terminal one is a
    /// candidate that the caller still checks (e.g. a `path_prefix` condition, or shadow mode).
    ///
    /// Every range must have been parsed for `ordering`.
    pub fn build<'a>(
        entries: impl IntoIterator<Item = (&'a VersionRange, bool)>,
        ordering: VersionOrdering,
    ) -> Result<VersionIndex, IndexError> {
        VersionIndex::build_with_limit(entries, ordering, MAX_STORED_CANDIDATES)
    }

    fn build_with_limit<'a>(
        entries: impl IntoIterator<Item = (&'a VersionRange, bool)>,
        ordering: VersionOrdering,
        max_candidates: usize,
    ) -> Result<VersionIndex, IndexError> {
        let entries: Vec<(&VersionRange, bool)> = entries.into_iter().collect();
        let max_entries = u32::MAX as usize;
        if entries.len() > max_entries {
            return Err(IndexError::TooManyEntries { max: max_entries });
        }
        if let Some((entry, (range, _))) = entries
            .iter()
            .enumerate()
            .find(|(_, (range, _))| range.ordering() != ordering)
        {
            return Err(IndexError::OrderingMismatch {
                entry,
                expected: ordering,
                found: range.ordering(),
            });
        }

        let mut points: Vec<FirmwareVersion> = entries
            .iter()
            .flat_map(|(range, _)| range.intervals())
            .flat_map(|interval| [interval.lower, interval.upper])
            .filter_map(|bound| match bound {
                Bound::Included(version) | Bound::Excluded(version) => Some(version),
                Bound::Unbounded => None,
            })
            .collect();
        points.sort_unstable_by(|a, b| a.cmp_with(b, ordering));
        // cmp_with is Equal exactly when ==, so this removes every duplicate.
        points.dedup();
        let piece_count = 2 * points.len() + 1;

        // Pass 1: count candidates per piece (and enforce the cap before allocating them).
        let limit = max_candidates.min(u32::MAX as usize);
        let mut counts = vec![0usize; piece_count];
        let mut total = 0usize;
        visit_candidates(&entries, &points, ordering, |piece, _| {
            total += 1;
            if total > limit {
                return Err(IndexError::TooManyOverlaps { limit });
            }
            counts[piece] += 1;
            Ok(())
        })?;

        let mut piece_starts = Vec::with_capacity(piece_count + 1);
        let mut running = 0u32;
        piece_starts.push(running);
        for count in &counts {
            // total <= limit <= u32::MAX, so neither conversion nor sum can overflow.
            running += *count as u32;
            piece_starts.push(running);
        }

        // Pass 2: the same visit, filling each piece's slice in rule order.
        let mut cursors: Vec<usize> = piece_starts[..piece_count]
            .iter()
            .map(|&start| start as usize)
            .collect();
        let mut candidates = vec![0u32; total];
        visit_candidates(&entries, &points, ordering, |piece, entry| {
            candidates[cursors[piece]] = entry;
            cursors[piece] += 1;
            Ok(())
        })?;

        Ok(VersionIndex {
            ordering,
            entry_count: entries.len(),
            points,
            piece_starts,
            candidates,
        })
    }

    /// Positions (in the `entries` given to [`VersionIndex::build`]) of every entry whose range
    /// contains `version`, ascending, stopping after the first terminal one. One binary search
    /// and a slice; no allocation.
    pub fn candidates(&self, version: &FirmwareVersion) -> &[u32] {
        let piece = match self
            .points
            .binary_search_by(|point| point.cmp_with(version, self.ordering))
        {
            Ok(point) => 2 * point + 1,
            Err(gap) => 2 * gap,
        };
        // piece < 2n + 1 = piece_starts.len() - 1, and the starts are within candidates.
        let start = self.piece_starts[piece] as usize;
        let end = self.piece_starts[piece + 1] as usize;
        &self.candidates[start..end]
    }

    /// For each entry, whether some version gets it as a candidate. An entry that none does
    /// is covered entirely by earlier terminal entries: it can never apply.
    pub fn reachable_entries(&self) -> Vec<bool> {
        let mut reachable = vec![false; self.entry_count];
        for &entry in &self.candidates {
            if let Some(r) = reachable.get_mut(entry as usize) {
                *r = true;
            }
        }
        reachable
    }

    /// Number of entries indexed.
    pub fn len(&self) -> usize {
        self.entry_count
    }

    /// Whether no entries are indexed (every lookup gives no candidate).
    pub fn is_empty(&self) -> bool {
        self.entry_count == 0
    }

    /// The ordering lookups compare in.
    pub fn ordering(&self) -> VersionOrdering {
        self.ordering
    }

    /// How many candidates are stored in total, to see how close a rule set is to
    /// [`MAX_STORED_CANDIDATES`].
    pub fn stored_candidates(&self) -> usize {
        self.candidates.len()
    }
}

/// Calls `visit(piece, entry)` for every candidate, pieces in any order but, for each piece,
/// entries in ascending order and none after the first terminal one.
fn visit_candidates(
    entries: &[(&VersionRange, bool)],
    points: &[FirmwareVersion],
    ordering: VersionOrdering,
    mut visit: impl FnMut(usize, u32) -> Result<(), IndexError>,
) -> Result<(), IndexError> {
    let mut open = OpenPieces::new(2 * points.len() + 1);
    for (entry, &(range, terminal)) in (0u32..).zip(entries) {
        // A range's intervals are disjoint, so no piece is visited twice for one entry.
        for interval in range.intervals() {
            let (first, last) = piece_span(interval, points, ordering);
            let mut piece = open.next_open(first);
            while piece <= last {
                visit(piece, entry)?;
                if terminal {
                    open.close(piece);
                }
                piece = open.next_open(piece + 1);
            }
        }
    }
    Ok(())
}

/// The first and last piece an interval covers (`first > last` would mean none).
fn piece_span(
    interval: &Interval,
    points: &[FirmwareVersion],
    ordering: VersionOrdering,
) -> (usize, usize) {
    // Every bound was collected into `points`, so the search always finds it (Ok).
    let position = |version: &FirmwareVersion| {
        points
            .binary_search_by(|point| point.cmp_with(version, ordering))
            .unwrap_or_else(|gap| gap)
    };
    let first = match &interval.lower {
        Bound::Unbounded => 0,
        Bound::Included(version) => 2 * position(version) + 1,
        Bound::Excluded(version) => 2 * position(version) + 2,
    };
    let last = match &interval.upper {
        Bound::Unbounded => 2 * points.len(),
        Bound::Included(version) => 2 * position(version) + 1,
        Bound::Excluded(version) => 2 * position(version),
    };
    (first, last)
}

/// "Next piece not yet closed by a terminal entry": union-find over piece positions with path
/// halving. Position `pieces` is a sentinel that is never closed.
struct OpenPieces {
    next: Vec<usize>,
}

impl OpenPieces {
    fn new(pieces: usize) -> OpenPieces {
        OpenPieces {
            next: (0..=pieces).collect(),
        }
    }

    /// The first open piece at or after `piece` (the sentinel if none).
    fn next_open(&mut self, mut piece: usize) -> usize {
        while self.next[piece] != piece {
            let skip = self.next[self.next[piece]];
            self.next[piece] = skip;
            piece = skip;
        }
        piece
    }

    fn close(&mut self, piece: usize) {
        self.next[piece] = piece + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::range::test_support::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    const FIRMWARE: VersionOrdering = VersionOrdering::Firmware;
    const SEMVER: VersionOrdering = VersionOrdering::Semver;

    fn v(text: &str) -> FirmwareVersion {
        match FirmwareVersion::parse(text) {
            Ok(version) => version,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn ranges(texts: &[&str], ordering: VersionOrdering) -> Vec<VersionRange> {
        texts
            .iter()
            .map(|text| match VersionRange::parse(text, ordering) {
                Ok(range) => range,
                Err(e) => panic!("{text:?}: {e}"),
            })
            .collect()
    }

    fn index(
        ranges: &[VersionRange],
        terminal: &[bool],
        ordering: VersionOrdering,
    ) -> VersionIndex {
        match VersionIndex::build(ranges.iter().zip(terminal.iter().copied()), ordering) {
            Ok(index) => index,
            Err(e) => panic!("{e}"),
        }
    }

    /// Every entry whose range contains `version`, in order, cut after the first terminal one.
    fn brute_force(
        ranges: &[VersionRange],
        terminal: &[bool],
        version: &FirmwareVersion,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, range) in ranges.iter().enumerate() {
            if range.contains(version) {
                out.push(i as u32);
                if terminal[i] {
                    break;
                }
            }
        }
        out
    }

    /// The versions worth probing for a set of ranges: the grid, every endpoint, and the least
    /// version of every endpoint's core and the next cores.
    fn probes(ranges: &[VersionRange]) -> Vec<FirmwareVersion> {
        let mut out = grid();
        let mut seen: std::collections::HashSet<FirmwareVersion> = out.iter().copied().collect();
        for range in ranges {
            for interval in range.intervals() {
                for bound in [interval.lower, interval.upper] {
                    if let Bound::Included(p) | Bound::Excluded(p) = bound {
                        let (major, minor, patch) = (p.major(), p.minor(), p.patch());
                        let next = patch.saturating_add(1);
                        for probe in [
                            p,
                            FirmwareVersion::lowest_of_core(major, minor, patch),
                            FirmwareVersion::new(major, minor, patch),
                            FirmwareVersion::lowest_of_core(major, minor, next),
                            FirmwareVersion::new(major, minor, next),
                        ] {
                            if seen.insert(probe) {
                                out.push(probe);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn assert_matches_brute_force(
        ranges: &[VersionRange],
        terminal: &[bool],
        ordering: VersionOrdering,
    ) {
        let index = index(ranges, terminal, ordering);
        assert_eq!(index.len(), ranges.len());
        for version in probes(ranges) {
            assert_eq!(
                index.candidates(&version),
                brute_force(ranges, terminal, &version).as_slice(),
                "{ordering} {version}"
            );
        }
    }

    #[test]
    fn candidates_follow_rule_order_and_stop_at_the_first_terminal() {
        let rules = ranges(&[">=3.8.0-b3, <3.9", "3.8.*", "=3.8.0-b1", "*"], FIRMWARE);
        let terminal = [true, false, true, true];
        let index = index(&rules, &terminal, FIRMWARE);
        assert_eq!(index.candidates(&v("3.8.0-b1")), &[1, 2]);
        assert_eq!(index.candidates(&v("3.8.0-b2")), &[1, 3]);
        assert_eq!(index.candidates(&v("3.8.0-b3")), &[0]);
        assert_eq!(index.candidates(&v("3.8.0-b10")), &[0]);
        assert_eq!(index.candidates(&v("3.8.5")), &[0]);
        assert_eq!(index.candidates(&v("3.9.0-b1")), &[0]);
        assert_eq!(index.candidates(&v("3.9.0")), &[3]);
        assert_eq!(index.candidates(&v("0.0.0-0")), &[3]);
        assert_eq!(index.candidates(&v("3.8.0-0")), &[1, 3]);
        assert_eq!(index.len(), 4);
        assert!(!index.is_empty());
        assert_eq!(index.ordering(), FIRMWARE);
    }

    #[test]
    fn the_ordering_decides_which_pre_releases_are_covered() {
        for ordering in VersionOrdering::ALL {
            let rules = ranges(&[">=3.8.0-b3"], ordering);
            let index = index(&rules, &[true], ordering);
            let expected: &[u32] = match ordering {
                VersionOrdering::Firmware => &[0],
                VersionOrdering::Semver => &[],
            };
            assert_eq!(index.candidates(&v("3.8.0-b10")), expected);
            assert_eq!(index.candidates(&v("3.9.0-b1")), &[0]);
        }
    }

    #[test]
    fn an_empty_index_has_no_candidates() {
        let index = index(&[], &[], FIRMWARE);
        assert!(index.is_empty());
        assert_eq!(index.len(), 0);
        assert!(index.candidates(&v("3.8.0")).is_empty());
        assert_eq!(index.stored_candidates(), 0);
    }

    #[test]
    fn refuses_ranges_parsed_for_another_ordering() {
        let firmware = ranges(&["3.8.*"], FIRMWARE);
        let semver = ranges(&["3.8.*"], SEMVER);
        let entries = [(&firmware[0], true), (&semver[0], true)];
        let e = VersionIndex::build(entries, FIRMWARE).unwrap_err();
        assert_eq!(
            e,
            IndexError::OrderingMismatch {
                entry: 1,
                expected: FIRMWARE,
                found: SEMVER
            }
        );
        assert_eq!(
            e.to_string(),
            "entry 1 was parsed for the semver ordering but the index uses firmware"
        );
    }

    #[test]
    fn caps_the_number_of_stored_candidates() {
        let rules = ranges(&["*", "3.8.*", "*"], FIRMWARE);
        // Points 3.8.0-0 and 3.9.0-0 make 5 pieces: `*` covers 5, `3.8.*` covers 2 (the point
        // 3.8.0-0 and the gap after it), the second `*` 5 again: 12 candidates.
        let entries = || rules.iter().map(|r| (r, false));
        assert_eq!(
            VersionIndex::build_with_limit(entries(), FIRMWARE, 12).map(|i| i.stored_candidates()),
            Ok(12)
        );
        assert_eq!(
            VersionIndex::build_with_limit(entries(), FIRMWARE, 11).unwrap_err(),
            IndexError::TooManyOverlaps { limit: 11 }
        );
    }

    #[test]
    fn the_real_cap_refuses_pathological_overlap() {
        // 1000 points (2001 pieces) covered by 2000 non-terminal `*`: 4,002,000 candidates.
        let mut texts: Vec<String> = (0..1000).map(|i| format!("=0.0.{i}")).collect();
        texts.extend((0..2000).map(|_| "*".to_string()));
        let rules: Vec<VersionRange> = texts
            .iter()
            .map(|t| VersionRange::parse(t, FIRMWARE).unwrap())
            .collect();
        let e = VersionIndex::build(rules.iter().map(|r| (r, false)), FIRMWARE).unwrap_err();
        assert_eq!(
            e,
            IndexError::TooManyOverlaps {
                limit: MAX_STORED_CANDIDATES
            }
        );
        assert!(e.to_string().contains("overlap too much"));
        // Making the broad rules terminal solves it: the first `*` ends every list.
        let index = VersionIndex::build(
            rules.iter().enumerate().map(|(i, r)| (r, i >= 1000)),
            FIRMWARE,
        )
        .unwrap();
        assert_eq!(index.candidates(&v("0.0.7")), &[7, 1000]);
        assert_eq!(index.candidates(&v("9.0.0")), &[1000]);
    }

    #[test]
    fn terminal_ranges_build_in_near_linear_time() {
        // 20,000 nested terminal half-lines: a naive build visits ~4e8 pieces; the skip
        // structure visits each piece once.
        let rules: Vec<VersionRange> = (0..20_000)
            .map(|i| {
                VersionRange::parse(&format!(">={}.{}.0", i / 100, i % 100), FIRMWARE).unwrap()
            })
            .collect();
        let rules_reversed: Vec<&VersionRange> = rules.iter().rev().collect();
        let index =
            VersionIndex::build(rules_reversed.iter().map(|r| (*r, true)), FIRMWARE).unwrap();
        assert!(index.stored_candidates() <= 2 * 20_000 + 1);
        assert_eq!(index.candidates(&v("199.99.0")), &[0]);
        assert_eq!(index.candidates(&v("0.0.0")), &[19_999]);
        assert_eq!(index.candidates(&v("0.0.0-rc1")), &[] as &[u32]);
        assert_eq!(index.candidates(&v("150.3.7")), &[20_000 - 1 - 15_003]);
    }

    #[test]
    fn many_random_ranges_match_brute_force() {
        // Deterministic: 1500 generated ranges with mostly non-terminal entries, so that
        // candidate lists are long and overlap heavily.
        let mut runner = TestRunner::deterministic();
        let strategy = (range_strategy(), 0u8..10);
        for ordering in VersionOrdering::ALL {
            let mut rules = Vec::new();
            let mut terminal = Vec::new();
            while rules.len() < 1500 {
                let (test_range, flag) = strategy.new_tree(&mut runner).unwrap().current();
                if let Ok(range) = VersionRange::parse(&test_range.render(), ordering) {
                    rules.push(range);
                    terminal.push(flag == 0);
                }
            }
            assert_matches_brute_force(&rules, &terminal, ordering);
        }
    }

    #[test]
    fn realistic_rule_files_match_brute_force() {
        let texts = [
            ">=3.8.0-b3, <3.8.1",
            "=3.7.2",
            "3.6.*",
            ">=3.9.0-b1 || <1",
            "3.*",
            "<=3.8.0-rc1, >2.0.0-b10",
            "2.1.0b3",
            "*",
        ];
        for ordering in VersionOrdering::ALL {
            let rules = ranges(&texts, ordering);
            for mask in 0u32..(1 << texts.len()) {
                let terminal: Vec<bool> = (0..texts.len()).map(|i| mask & (1 << i) != 0).collect();
                assert_matches_brute_force(&rules, &terminal, ordering);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn candidates_equal_brute_force(
            entries in prop::collection::vec((range_strategy(), any::<bool>()), 0..12)
        ) {
            for ordering in VersionOrdering::ALL {
                let mut rules = Vec::new();
                let mut references = Vec::new();
                let mut terminal = Vec::new();
                for (test_range, flag) in &entries {
                    if let Ok(range) = VersionRange::parse(&test_range.render(), ordering) {
                        rules.push(range);
                        references.push(test_range);
                        terminal.push(*flag);
                    }
                }
                let index = index(&rules, &terminal, ordering);
                for version in probes(&rules) {
                    // Versions reach a decision in their canonical spelling.
                    let version = version.canonical(ordering);
                    // Reference: each comparator evaluated directly with cmp_with.
                    let mut expected = Vec::new();
                    for (i, reference) in references.iter().enumerate() {
                        if reference.contains(&version, ordering) {
                            expected.push(i as u32);
                            if terminal[i] {
                                break;
                            }
                        }
                    }
                    prop_assert_eq!(
                        index.candidates(&version),
                        expected.as_slice(),
                        "{} {}", ordering, version
                    );
                }
            }
        }
    }
}
