//! Version ranges as operators write them in rules (`>=3.8.0-b3, <3.9 || =4.0.1`, `3.8.*`),
//! parsed into sorted, disjoint intervals of the total order of versions.
//!
//! A range is a SET on the total order chosen by [`VersionOrdering`], with none of Cargo's or
//! npm's pre-release opt-in: `>=3.8.0-b3` contains `3.8.0-b10` (firmware ordering), `3.8.0`,
//! `3.9.0-b1` and `4.0.0`, and `<3.9.0` contains `3.9.0-b1`.
//!
//! Syntax: alternatives separated by `||` (OR); an alternative is one or more comparators
//! separated by `,` (AND); a comparator is an optional operator (`=`, `>`, `>=`, `<`, `<=`;
//! none means `=`) followed by a version in the lenient syntax of [`crate::version`], or a
//! wildcard `*`, `3.*`, `3.8.*` (`x` and `X` work too) with no operator or `=`. `3.8.*` is every
//! version whose major is 3 and minor is 8, pre-releases of 3.8.0 included. A bare partial
//! version (`3.8`) means exactly 3.8.0; [`VersionRange::partial_bare_versions`] reports it so
//! that `fwgate check` can ask "did you mean `3.8.*`?".
//!
//! A wildcard's edges are exact: `3.8.*` is `[3.8.0-0, 3.9.0-0)`, because `M.m.p-0` is the least
//! version of its core in both orderings (see [`FirmwareVersion::lowest_of_core`]).

use std::cmp::Ordering;
use std::fmt;
use std::ops::Bound;

use crate::version::{FirmwareVersion, VersionOrdering};

/// Why a range text was refused, with the 1-based byte column of the offending token so that
/// `fwgate check` can print `file:line:column`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct RangeError {
    /// 1-based byte column within the range text.
    pub column: usize,
    /// What is wrong, and how to write it instead when that is known.
    pub message: String,
}

impl RangeError {
    fn new(column: usize, message: impl Into<String>) -> RangeError {
        RangeError {
            column,
            message: message.into(),
        }
    }
}

/// One contiguous run of versions in the total order; the range is the union of its intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    /// Where it starts: `Unbounded` is below every version.
    pub lower: Bound<FirmwareVersion>,
    /// Where it ends: `Unbounded` is above every version.
    pub upper: Bound<FirmwareVersion>,
}

impl Interval {
    /// Every version.
    pub const EVERYTHING: Interval = Interval {
        lower: Bound::Unbounded,
        upper: Bound::Unbounded,
    };

    /// Whether `version` lies in the interval, compared in `ordering`.
    pub fn contains(&self, version: &FirmwareVersion, ordering: VersionOrdering) -> bool {
        let above_lower = match &self.lower {
            Bound::Unbounded => true,
            Bound::Included(lower) => version.cmp_with(lower, ordering) != Ordering::Less,
            Bound::Excluded(lower) => version.cmp_with(lower, ordering) == Ordering::Greater,
        };
        let below_upper = match &self.upper {
            Bound::Unbounded => true,
            Bound::Included(upper) => version.cmp_with(upper, ordering) != Ordering::Greater,
            Bound::Excluded(upper) => version.cmp_with(upper, ordering) == Ordering::Less,
        };
        above_lower && below_upper
    }

    /// Whether this is every version.
    pub fn is_everything(&self) -> bool {
        *self == Interval::EVERYTHING
    }
}

/// A bare partial version such as `3.8` (no operator), which means exactly 3.8.0 and is
/// probably meant as `3.8.*`: reported so that `fwgate check` can warn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialBareVersion {
    /// 1-based byte column of the version within the range text.
    pub column: usize,
    /// The version as written, e.g. `3.8`.
    pub written: String,
    /// The wildcard that was probably meant, e.g. `3.8.*`.
    pub suggestion: String,
}

/// An upper bound `<X.Y.Z` on a release: the set includes X.Y.Z's pre-releases (they sort
/// before X.Y.Z), which surprises whoever meant "below the X.Y.Z line". Reported so that
/// `fwgate check` can say so and suggest `<X.Y.Z-0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreReleaseUpperBound {
    /// 1-based byte column of the comparator within the range text.
    pub column: usize,
    /// The comparator as written, e.g. `<3.9`.
    pub written: String,
    /// The release bound, e.g. `3.9.0`.
    pub release: FirmwareVersion,
}

/// A parsed version range: the set of versions a rule applies to, in one ordering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRange {
    text: String,
    ordering: VersionOrdering,
    /// Sorted, pairwise disjoint and non-touching, none empty.
    intervals: Vec<Interval>,
    partial_bare_versions: Vec<PartialBareVersion>,
    pre_release_upper_bounds: Vec<PreReleaseUpperBound>,
}

impl VersionRange {
    /// Parses a range (see the module docs for the syntax) for evaluation in `ordering`.
    ///
    /// Refuses empty texts, alternatives and comparators, unknown operators (including `^` and
    /// `~`), malformed versions, wildcards with an operator or followed by more, and any
    /// alternative whose comparators contradict each other (it would match no version).
    pub fn parse(text: &str, ordering: VersionOrdering) -> Result<VersionRange, RangeError> {
        if text.trim_ascii().is_empty() {
            return Err(RangeError::new(
                1,
                "empty range: write a version, a wildcard such as `3.8.*`, or `*` for every version",
            ));
        }
        let alternatives = split_with_offsets(text, 0, "||");
        let mut cut_intervals = Vec::with_capacity(alternatives.len());
        let mut notes = Notes::default();
        for (index, &(offset, alternative)) in alternatives.iter().enumerate() {
            if alternative.trim_ascii().is_empty() {
                // Point at the `||` next to the hole: the following one, else the preceding one.
                let column = if index + 1 < alternatives.len() {
                    offset + alternative.len() + 1
                } else {
                    offset - 1
                };
                return Err(RangeError::new(
                    column,
                    "empty alternative: `||` needs a range on both sides",
                ));
            }
            let interval = parse_alternative(alternative, offset, ordering, &mut notes)?;
            cut_intervals.push(interval);
        }
        let intervals = merge(cut_intervals, ordering)
            .into_iter()
            .map(CutInterval::to_interval)
            .collect();
        Ok(VersionRange {
            text: text.to_string(),
            ordering,
            intervals,
            partial_bare_versions: notes.partial_bare_versions,
            pre_release_upper_bounds: notes.pre_release_upper_bounds,
        })
    }

    /// Whether `version` is in the range: a linear check over the intervals, used for single
    /// ranges and as the reference for [`crate::rules::index::VersionIndex`]. `version` must be
    /// in its [`FirmwareVersion::canonical`] spelling for the range's ordering, as every
    /// [`crate::rules::VersionInput`] is (the endpoints are).
    pub fn contains(&self, version: &FirmwareVersion) -> bool {
        self.intervals
            .iter()
            .any(|interval| interval.contains(version, self.ordering))
    }

    /// The range as sorted, disjoint, non-empty intervals (overlapping or touching alternatives
    /// are merged), for indexing.
    pub fn intervals(&self) -> &[Interval] {
        &self.intervals
    }

    /// The ordering the range was parsed for; its intervals are only meaningful in it.
    pub fn ordering(&self) -> VersionOrdering {
        self.ordering
    }

    /// Whether the range contains every version (e.g. `*`, or `<3 || >=3`).
    pub fn matches_everything(&self) -> bool {
        matches!(self.intervals.as_slice(), [only] if only.is_everything())
    }

    /// The text as written, for display and logs.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Every bare partial version (`3.8`, `3`) in the text: each means exactly `M.m.0`, which is
    /// rarely what was meant.
    pub fn partial_bare_versions(&self) -> &[PartialBareVersion] {
        &self.partial_bare_versions
    }

    /// Whether the text uses a bare partial version (see [`VersionRange::partial_bare_versions`]).
    pub fn uses_partial_bare_version(&self) -> bool {
        !self.partial_bare_versions.is_empty()
    }

    /// Every `<X.Y.Z` comparator on a release, which also takes X.Y.Z's pre-releases.
    pub fn pre_release_upper_bounds(&self) -> &[PreReleaseUpperBound] {
        &self.pre_release_upper_bounds
    }

    /// Whether some version lies in both ranges (parsed for the same ordering).
    pub fn overlaps(&self, other: &VersionRange) -> bool {
        let ordering = self.ordering;
        self.intervals.iter().any(|a| {
            other.intervals.iter().any(|b| {
                !CutInterval::from_interval(a)
                    .intersect(CutInterval::from_interval(b), ordering)
                    .is_empty(ordering)
            })
        })
    }
}

impl fmt::Display for VersionRange {
    /// The text as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A position between versions in the total order. Cuts make intersections, emptiness and
/// merging plain comparisons; `Below(MIN)` and `Above(MAX)` are normalised to the ends.
#[derive(Clone, Copy, Debug)]
enum Cut {
    BelowAll,
    /// Just below this version.
    Below(FirmwareVersion),
    /// Just above this version.
    Above(FirmwareVersion),
    AboveAll,
}

impl Cut {
    fn below(version: FirmwareVersion) -> Cut {
        if version == FirmwareVersion::MIN {
            Cut::BelowAll
        } else {
            Cut::Below(version)
        }
    }

    fn above(version: FirmwareVersion) -> Cut {
        if version == FirmwareVersion::MAX {
            Cut::AboveAll
        } else {
            Cut::Above(version)
        }
    }

    fn cmp(&self, other: &Cut, ordering: VersionOrdering) -> Ordering {
        match (self, other) {
            (Cut::BelowAll, Cut::BelowAll) | (Cut::AboveAll, Cut::AboveAll) => Ordering::Equal,
            (Cut::BelowAll, _) | (_, Cut::AboveAll) => Ordering::Less,
            (_, Cut::BelowAll) | (Cut::AboveAll, _) => Ordering::Greater,
            (Cut::Below(a) | Cut::Above(a), Cut::Below(b) | Cut::Above(b)) => a
                .cmp_with(b, ordering)
                .then_with(|| self.is_above().cmp(&other.is_above())),
        }
    }

    fn is_above(&self) -> bool {
        matches!(self, Cut::Above(_) | Cut::AboveAll)
    }

    fn max(self, other: Cut, ordering: VersionOrdering) -> Cut {
        if self.cmp(&other, ordering) == Ordering::Less {
            other
        } else {
            self
        }
    }

    fn min(self, other: Cut, ordering: VersionOrdering) -> Cut {
        if self.cmp(&other, ordering) == Ordering::Greater {
            other
        } else {
            self
        }
    }

    /// This cut as the lower edge of an interval (exact even at the ends).
    fn as_lower_bound(self) -> Bound<FirmwareVersion> {
        match self {
            Cut::BelowAll => Bound::Unbounded,
            Cut::Below(version) => Bound::Included(version),
            Cut::Above(version) => Bound::Excluded(version),
            Cut::AboveAll => Bound::Excluded(FirmwareVersion::MAX),
        }
    }

    /// This cut as the upper edge of an interval (exact even at the ends).
    fn as_upper_bound(self) -> Bound<FirmwareVersion> {
        match self {
            Cut::BelowAll => Bound::Excluded(FirmwareVersion::MIN),
            Cut::Below(version) => Bound::Excluded(version),
            Cut::Above(version) => Bound::Included(version),
            Cut::AboveAll => Bound::Unbounded,
        }
    }
}

/// The versions between two cuts.
#[derive(Clone, Copy, Debug)]
struct CutInterval {
    lower: Cut,
    upper: Cut,
}

impl CutInterval {
    const EVERYTHING: CutInterval = CutInterval {
        lower: Cut::BelowAll,
        upper: Cut::AboveAll,
    };

    fn intersect(self, other: CutInterval, ordering: VersionOrdering) -> CutInterval {
        CutInterval {
            lower: self.lower.max(other.lower, ordering),
            upper: self.upper.min(other.upper, ordering),
        }
    }

    /// Empty when the cuts cross or meet. (Two cuts around adjacent versions with nothing
    /// between them, such as `>3.8.0, <3.8.1-0`, are not detected: that interval is then kept
    /// and simply matches nothing.)
    fn is_empty(&self, ordering: VersionOrdering) -> bool {
        self.lower.cmp(&self.upper, ordering) != Ordering::Less
    }

    fn from_interval(interval: &Interval) -> CutInterval {
        CutInterval {
            lower: match interval.lower {
                Bound::Unbounded => Cut::BelowAll,
                Bound::Included(v) => Cut::below(v),
                Bound::Excluded(v) => Cut::above(v),
            },
            upper: match interval.upper {
                Bound::Unbounded => Cut::AboveAll,
                Bound::Included(v) => Cut::above(v),
                Bound::Excluded(v) => Cut::below(v),
            },
        }
    }

    fn to_interval(self) -> Interval {
        Interval {
            lower: self.lower.as_lower_bound(),
            upper: self.upper.as_upper_bound(),
        }
    }
}

/// Sorts intervals and merges those that overlap or touch, so each version is in at most one.
fn merge(mut intervals: Vec<CutInterval>, ordering: VersionOrdering) -> Vec<CutInterval> {
    intervals.sort_by(|a, b| a.lower.cmp(&b.lower, ordering));
    let mut merged: Vec<CutInterval> = Vec::with_capacity(intervals.len());
    for interval in intervals {
        match merged.last_mut() {
            Some(last) if last.upper.cmp(&interval.lower, ordering) != Ordering::Less => {
                last.upper = last.upper.max(interval.upper, ordering);
            }
            _ => merged.push(interval),
        }
    }
    merged
}

/// Splits `text` on `separator`, giving each part with its byte offset (plus `base`).
fn split_with_offsets<'a>(text: &'a str, base: usize, separator: &str) -> Vec<(usize, &'a str)> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices(separator) {
        parts.push((base + start, &text[start..at]));
        start = at + separator.len();
    }
    parts.push((base + start, &text[start..]));
    parts
}

/// What parsing noticed about how a range was written, for `fwgate check`.
#[derive(Default)]
struct Notes {
    partial_bare_versions: Vec<PartialBareVersion>,
    pre_release_upper_bounds: Vec<PreReleaseUpperBound>,
}

/// Parses one `||` alternative (a `,`-separated intersection) at byte `offset` of the text.
fn parse_alternative(
    text: &str,
    offset: usize,
    ordering: VersionOrdering,
    notes: &mut Notes,
) -> Result<CutInterval, RangeError> {
    let comparators = split_with_offsets(text, offset, ",");
    let mut interval = CutInterval::EVERYTHING;
    let mut upper_bounds = Vec::new();
    for (index, &(comparator_offset, comparator)) in comparators.iter().enumerate() {
        if comparator.trim_ascii().is_empty() {
            // Point at the `,` next to the hole: the preceding one, else the following one.
            let column = if index > 0 {
                comparator_offset
            } else {
                comparator_offset + comparator.len() + 1
            };
            return Err(RangeError::new(
                column,
                "empty comparator: `,` needs a comparator on both sides",
            ));
        }
        let parsed = parse_comparator(comparator, comparator_offset, ordering)?;
        interval = interval.intersect(parsed.interval, ordering);
        if interval.is_empty(ordering) {
            return Err(RangeError::new(
                parsed.column,
                format!(
                    "this alternative matches no version: `{}` excludes everything the comparators before it allow",
                    parsed.token
                ),
            ));
        }
        notes
            .partial_bare_versions
            .extend(parsed.partial_bare_version);
        upper_bounds.extend(parsed.pre_release_upper_bound);
    }
    // `>=3.9.0-0, <3.9.0` is about 3.9.0's pre-releases on purpose; `<3.9.0` alone, or
    // `>=3.8.0, <3.9.0`, takes them along with what comes before them: worth a word.
    notes
        .pre_release_upper_bounds
        .extend(upper_bounds.into_iter().filter(|bound| {
            let line_start = FirmwareVersion::lowest_of_core(
                bound.release.major(),
                bound.release.minor(),
                bound.release.patch(),
            );
            interval.lower.cmp(&Cut::below(line_start), ordering) == Ordering::Less
        }));
    Ok(interval)
}

/// Bytes that can start an operator; a run of them is read as one operator token.
const OPERATOR_CHARS: &[u8] = b"<>=!~^";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operator {
    Eq,
    Gt,
    Ge,
    Lt,
    Le,
}

struct ParsedComparator<'a> {
    interval: CutInterval,
    /// 1-based column of the comparator.
    column: usize,
    /// The comparator as written (trimmed).
    token: &'a str,
    partial_bare_version: Option<PartialBareVersion>,
    pre_release_upper_bound: Option<PreReleaseUpperBound>,
}

/// Parses one comparator at byte `offset` of the whole text. The version is taken in its
/// [`FirmwareVersion::canonical`] spelling for `ordering`, as versions from the wire are.
fn parse_comparator(
    text: &str,
    offset: usize,
    ordering: VersionOrdering,
) -> Result<ParsedComparator<'_>, RangeError> {
    let token = text.trim_ascii();
    let start = offset + (text.len() - text.trim_ascii_start().len());
    let column = start + 1;
    if let Some(bar) = token.find('|') {
        return Err(RangeError::new(
            start + bar + 1,
            "a single `|` is not valid: separate alternatives with `||`",
        ));
    }

    let operator_len = token
        .bytes()
        .take_while(|b| OPERATOR_CHARS.contains(b))
        .count();
    let (operator_text, after_operator) = token.split_at(operator_len);
    let operator = parse_operator(operator_text).map_err(|m| RangeError::new(column, m))?;

    let version_text = after_operator.trim_ascii_start();
    let version_start = start + operator_len + (after_operator.len() - version_text.len());
    let Some(first) = version_text.bytes().next() else {
        return Err(RangeError::new(
            column,
            format!("missing version after `{operator_text}`"),
        ));
    };
    if OPERATOR_CHARS.contains(&first) {
        return Err(RangeError::new(
            version_start + 1,
            format!(
                "unexpected `{}` after `{operator_text}`: write the operator without spaces, e.g. `>=`",
                char::from(first)
            ),
        ));
    }
    let version_len = version_text
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(version_text.len());
    let (version_token, after_version) = version_text.split_at(version_len);
    let extra = after_version.trim_ascii_start();
    if !extra.is_empty() {
        return Err(RangeError::new(
            version_start + version_len + (after_version.len() - extra.len()) + 1,
            format!(
                "unexpected `{extra}` after `{version_token}`: separate comparators with `,` (AND) and alternatives with `||` (OR)"
            ),
        ));
    }

    match scan_wildcard(version_token) {
        Err((at, message)) => Err(RangeError::new(version_start + at + 1, message)),
        Ok(Some(wildcard)) => {
            if let Some(operator) = operator.filter(|&o| o != Operator::Eq) {
                return Err(RangeError::new(
                    column,
                    format!(
                        "a wildcard takes no operator (only `=` or none): write `{version_token}` alone{}",
                        wildcard.bound_hint(operator)
                    ),
                ));
            }
            Ok(ParsedComparator {
                interval: wildcard.interval(),
                column,
                token,
                partial_bare_version: None,
                pre_release_upper_bound: None,
            })
        }
        Ok(None) => {
            let (version, details) =
                FirmwareVersion::parse_with_details(version_token).map_err(|e| {
                    RangeError::new(
                        version_start + 1,
                        format!("malformed version `{version_token}`: {e}"),
                    )
                })?;
            let version = version.canonical(ordering);
            let is_partial_bare =
                operator.is_none() && details.core_components < 3 && !version.is_prerelease();
            let partial_bare_version = is_partial_bare.then(|| PartialBareVersion {
                column: version_start + 1,
                written: version_token.to_string(),
                suggestion: if details.core_components == 1 {
                    format!("{}.*", version.major())
                } else {
                    format!("{}.{}.*", version.major(), version.minor())
                },
            });
            let pre_release_upper_bound = (operator == Some(Operator::Lt)
                && !version.is_prerelease())
            .then(|| PreReleaseUpperBound {
                column,
                written: token.to_string(),
                release: version,
            });
            Ok(ParsedComparator {
                interval: operator.unwrap_or(Operator::Eq).interval(version),
                column,
                token,
                partial_bare_version,
                pre_release_upper_bound,
            })
        }
    }
}

impl Operator {
    /// The versions `self version` selects.
    fn interval(self, version: FirmwareVersion) -> CutInterval {
        let (lower, upper) = match self {
            Operator::Eq => (Cut::below(version), Cut::above(version)),
            Operator::Gt => (Cut::above(version), Cut::AboveAll),
            Operator::Ge => (Cut::below(version), Cut::AboveAll),
            Operator::Lt => (Cut::BelowAll, Cut::below(version)),
            Operator::Le => (Cut::BelowAll, Cut::above(version)),
        };
        CutInterval { lower, upper }
    }
}

/// `None` for no operator (which means `=`), or the message explaining why it is refused.
fn parse_operator(text: &str) -> Result<Option<Operator>, String> {
    match text {
        "" => Ok(None),
        "=" => Ok(Some(Operator::Eq)),
        ">" => Ok(Some(Operator::Gt)),
        ">=" => Ok(Some(Operator::Ge)),
        "<" => Ok(Some(Operator::Lt)),
        "<=" => Ok(Some(Operator::Le)),
        "=>" => Err("unknown operator `=>`: did you mean `>=`?".to_string()),
        "=<" => Err("unknown operator `=<`: did you mean `<=`?".to_string()),
        "==" => Err("unknown operator `==`: write `=` (or no operator)".to_string()),
        "!=" => Err(
            "`!=` is not supported: use two alternatives, e.g. `<3.8.0 || >3.8.0`".to_string(),
        ),
        other if other.contains(['^', '~']) => Err(format!(
            "unknown operator `{other}`: `^` and `~` ranges are not supported; write explicit bounds with `>=` and `<`, e.g. `>=3.8.0, <4`"
        )),
        other => Err(format!(
            "unknown operator `{other}`: use `=`, `>`, `>=`, `<` or `<=`"
        )),
    }
}

/// A wildcard comparator: `*` (`fixed = [None, None]`), `M.*` or `M.m.*`.
#[derive(Clone, Copy, Debug)]
struct Wildcard {
    fixed: [Option<u64>; 2],
}

impl Wildcard {
    /// For `>=3.8.*` and the like: the version bound that was probably meant, e.g.
    /// `, or bound a version instead: `>=3.8.0-0``, or nothing when there is none.
    fn bound_hint(self, operator: Operator) -> String {
        let interval = self.interval();
        let (written, edge) = match operator {
            Operator::Eq => return String::new(),
            Operator::Ge => (">=", interval.lower),
            Operator::Lt => ("<", interval.lower),
            Operator::Gt => (">=", interval.upper),
            Operator::Le => ("<", interval.upper),
        };
        match edge {
            Cut::Below(version) => format!(", or bound a version instead: `{written}{version}`"),
            _ => String::new(),
        }
    }

    /// The exact interval: from the least version of the first core it covers, up to (not
    /// including) the least version of the first core after it.
    fn interval(self) -> CutInterval {
        let (first_core, next_core) = match self.fixed {
            [None, _] => return CutInterval::EVERYTHING,
            [Some(major), None] => ((major, 0), major.checked_add(1).map(|next| (next, 0))),
            [Some(major), Some(minor)] => (
                (major, minor),
                match minor.checked_add(1) {
                    Some(next) => Some((major, next)),
                    None => major.checked_add(1).map(|next| (next, 0)),
                },
            ),
        };
        let lowest = |(major, minor): (u64, u64)| FirmwareVersion::lowest_of_core(major, minor, 0);
        CutInterval {
            lower: Cut::below(lowest(first_core)),
            upper: next_core.map_or(Cut::AboveAll, |core| Cut::below(lowest(core))),
        }
    }
}

/// Recognises `*`, `M.*`, `M.m.*` (also with `x`/`X`, and an optional `v`). `Ok(None)` when the
/// token is not a wildcard (it is then parsed as a version); `Err((byte offset, message))` for a
/// wildcard in the wrong place.
fn scan_wildcard(token: &str) -> Result<Option<Wildcard>, (usize, String)> {
    let bytes = token.as_bytes();
    let mut pos = usize::from(matches!(bytes.first(), Some(b'v' | b'V')));
    let mut fixed = [None; 3];
    let mut count = 0;
    loop {
        if matches!(bytes.get(pos), Some(b'*' | b'x' | b'X')) {
            if count == fixed.len() {
                return Err((
                    pos,
                    "a wildcard can only replace the minor or the patch, as in `3.*` or `3.8.*`"
                        .to_string(),
                ));
            }
            if pos + 1 < bytes.len() {
                return Err((
                    pos + 1,
                    format!("nothing may follow a wildcard: write `{}`", &token[..=pos]),
                ));
            }
            return Ok(Some(Wildcard {
                fixed: [fixed[0], fixed[1]],
            }));
        }
        let digits = bytes[pos..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || count == fixed.len() {
            return Ok(None);
        }
        // Too large for u64: not a wildcard we can represent; the version parser says why.
        let Ok(value) = token[pos..pos + digits].parse::<u64>() else {
            return Ok(None);
        };
        fixed[count] = Some(value);
        count += 1;
        pos += digits;
        if bytes.get(pos) != Some(&b'.') {
            return Ok(None);
        }
        pos += 1;
    }
}

/// Random ranges and a brute-force reference, shared with the index tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use proptest::prelude::*;

    /// Pre-releases for generated versions: small, with collisions, prefixes, leading zeros.
    pub(crate) const PRE_POOL: &[&str] = &[
        "", "b1", "b2", "b3", "b10", "rc1", "rc2", "alpha", "0", "1", "10", "b3.1", "b03", "01",
        "00", "0.0", "b1.0", "-", "rc1-x", "1a",
    ];

    pub(crate) fn version(major: u64, minor: u64, patch: u64, pre: &str) -> FirmwareVersion {
        let text = if pre.is_empty() {
            format!("{major}.{minor}.{patch}")
        } else {
            format!("{major}.{minor}.{patch}-{pre}")
        };
        match FirmwareVersion::parse(&text) {
            Ok(version) => version,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    /// Every version the generators can produce (majors 0..4, minors 0..4, patches 0..3).
    pub(crate) fn grid() -> Vec<FirmwareVersion> {
        let mut out = Vec::new();
        for major in 0..4 {
            for minor in 0..4 {
                for patch in 0..3 {
                    for pre in PRE_POOL {
                        out.push(version(major, minor, patch, pre));
                    }
                }
            }
        }
        out
    }

    pub(crate) fn version_strategy() -> impl Strategy<Value = FirmwareVersion> {
        (0u64..4, 0u64..4, 0u64..3, 0..PRE_POOL.len())
            .prop_map(|(major, minor, patch, pre)| version(major, minor, patch, PRE_POOL[pre]))
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum TestOperator {
        None,
        Eq,
        Gt,
        Ge,
        Lt,
        Le,
    }

    #[derive(Clone, Debug)]
    pub(crate) enum TestComparator {
        Compare {
            operator: TestOperator,
            version: FirmwareVersion,
            /// Which of several equivalent spellings to render.
            spelling: u8,
        },
        Wildcard {
            major: Option<u64>,
            minor: Option<u64>,
            symbol: char,
            explicit_eq: bool,
        },
    }

    impl TestComparator {
        /// The core as rendered: text and number of components.
        fn render_core(&self) -> (String, usize) {
            let TestComparator::Compare {
                version, spelling, ..
            } = self
            else {
                return (String::new(), 0);
            };
            let (major, minor, patch) = (version.major(), version.minor(), version.patch());
            let partial = matches!(spelling, 2 | 6);
            if partial && patch == 0 && minor == 0 {
                (format!("{major}"), 1)
            } else if partial && patch == 0 {
                (format!("{major}.{minor}"), 2)
            } else if *spelling == 5 {
                (format!("0{major}.0{minor}.{patch}"), 3)
            } else {
                (format!("{major}.{minor}.{patch}"), 3)
            }
        }

        fn render(&self) -> String {
            match self {
                TestComparator::Compare {
                    operator,
                    version,
                    spelling,
                } => {
                    let operator = match operator {
                        TestOperator::None => "",
                        TestOperator::Eq => "=",
                        TestOperator::Gt => ">",
                        TestOperator::Ge => ">=",
                        TestOperator::Lt => "<",
                        TestOperator::Le => "<=",
                    };
                    let (core, _) = self.render_core();
                    let pre = version.pre();
                    let dashless = matches!(spelling, 3 | 6)
                        && pre.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
                    let prefix = if *spelling == 1 { "v" } else { "" };
                    let mut text = format!("{operator}{prefix}{core}");
                    if !pre.is_empty() {
                        if !dashless {
                            text.push('-');
                        }
                        text.push_str(pre);
                    }
                    if *spelling == 4 {
                        text.push_str("+build.7");
                    }
                    text
                }
                TestComparator::Wildcard {
                    major,
                    minor,
                    symbol,
                    explicit_eq,
                } => {
                    let mut text = String::from(if *explicit_eq { "=" } else { "" });
                    if let Some(major) = major {
                        text.push_str(&format!("{major}."));
                        if let Some(minor) = minor {
                            text.push_str(&format!("{minor}."));
                        }
                    }
                    text.push(*symbol);
                    text
                }
            }
        }

        /// Whether this comparator is a bare partial version (should be reported).
        pub(crate) fn is_partial_bare(&self) -> bool {
            match self {
                TestComparator::Compare {
                    operator, version, ..
                } => {
                    *operator == TestOperator::None
                        && self.render_core().1 < 3
                        && !version.is_prerelease()
                }
                TestComparator::Wildcard { .. } => false,
            }
        }

        /// Brute force: the comparator evaluated directly with `cmp_with`, both sides in the
        /// spelling decisions use.
        pub(crate) fn contains(&self, v: &FirmwareVersion, ordering: VersionOrdering) -> bool {
            match self {
                TestComparator::Compare {
                    operator, version, ..
                } => {
                    let order = v
                        .canonical(ordering)
                        .cmp_with(&version.canonical(ordering), ordering);
                    match operator {
                        TestOperator::None | TestOperator::Eq => order == Ordering::Equal,
                        TestOperator::Gt => order == Ordering::Greater,
                        TestOperator::Ge => order != Ordering::Less,
                        TestOperator::Lt => order == Ordering::Less,
                        TestOperator::Le => order != Ordering::Greater,
                    }
                }
                TestComparator::Wildcard { major, minor, .. } => {
                    major.is_none_or(|major| v.major() == major)
                        && minor.is_none_or(|minor| v.minor() == minor)
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    pub(crate) struct TestRange {
        pub(crate) alternatives: Vec<Vec<TestComparator>>,
        pub(crate) spacing: u8,
    }

    impl TestRange {
        pub(crate) fn render(&self) -> String {
            let s = self.spacing;
            let or = ["||", " || ", "|| ", " ||"][usize::from(s % 4)];
            let and = [",", ", ", " , ", " ,"][usize::from(s / 4 % 4)];
            let text = self
                .alternatives
                .iter()
                .map(|alternative| {
                    alternative
                        .iter()
                        .map(TestComparator::render)
                        .collect::<Vec<_>>()
                        .join(and)
                })
                .collect::<Vec<_>>()
                .join(or);
            if s / 16 % 2 == 1 {
                format!("  {text}\t")
            } else {
                text
            }
        }

        pub(crate) fn alternative_contains(
            &self,
            index: usize,
            v: &FirmwareVersion,
            ordering: VersionOrdering,
        ) -> bool {
            self.alternatives[index]
                .iter()
                .all(|comparator| comparator.contains(v, ordering))
        }

        /// Brute force: OR of ANDs of comparators.
        pub(crate) fn contains(&self, v: &FirmwareVersion, ordering: VersionOrdering) -> bool {
            (0..self.alternatives.len()).any(|i| self.alternative_contains(i, v, ordering))
        }
    }

    fn operator_strategy() -> impl Strategy<Value = TestOperator> {
        // Half-lines weigh more than points so that intersections are often non-empty.
        prop_oneof![
            1 => Just(TestOperator::None),
            1 => Just(TestOperator::Eq),
            2 => Just(TestOperator::Gt),
            2 => Just(TestOperator::Ge),
            2 => Just(TestOperator::Lt),
            2 => Just(TestOperator::Le),
        ]
    }

    pub(crate) fn comparator_strategy() -> impl Strategy<Value = TestComparator> {
        prop_oneof![
            4 => (operator_strategy(), version_strategy(), 0u8..7).prop_map(
                |(operator, version, spelling)| TestComparator::Compare {
                    operator,
                    version,
                    spelling,
                }
            ),
            1 => (0usize..3, 0u64..4, 0u64..4, 0usize..3, any::<bool>()).prop_map(
                |(fixed, major, minor, symbol, explicit_eq)| TestComparator::Wildcard {
                    major: (fixed >= 1).then_some(major),
                    minor: (fixed >= 2).then_some(minor),
                    symbol: ['*', 'x', 'X'][symbol],
                    explicit_eq,
                }
            ),
        ]
    }

    pub(crate) fn range_strategy() -> impl Strategy<Value = TestRange> {
        (
            prop::collection::vec(
                prop_oneof![
                    3 => prop::collection::vec(comparator_strategy(), 1..2),
                    2 => prop::collection::vec(comparator_strategy(), 2..3),
                    1 => prop::collection::vec(comparator_strategy(), 3..4),
                ],
                1..4,
            ),
            any::<u8>(),
        )
            .prop_map(|(alternatives, spacing)| TestRange {
                alternatives,
                spacing,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use proptest::prelude::*;

    const FIRMWARE: VersionOrdering = VersionOrdering::Firmware;
    const SEMVER: VersionOrdering = VersionOrdering::Semver;

    fn v(text: &str) -> FirmwareVersion {
        match FirmwareVersion::parse(text) {
            Ok(version) => version,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn range(text: &str, ordering: VersionOrdering) -> VersionRange {
        match VersionRange::parse(text, ordering) {
            Ok(range) => range,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn assert_contains(text: &str, ordering: VersionOrdering, inside: &[&str], outside: &[&str]) {
        let r = range(text, ordering);
        for version in inside {
            assert!(
                r.contains(&v(version)),
                "{ordering}: {text} should contain {version}"
            );
        }
        for version in outside {
            assert!(
                !r.contains(&v(version)),
                "{ordering}: {text} should not contain {version}"
            );
        }
    }

    fn error(text: &str) -> RangeError {
        match VersionRange::parse(text, FIRMWARE) {
            Ok(r) => panic!("{text:?} should be refused, got {:?}", r.intervals()),
            Err(e) => e,
        }
    }

    fn assert_error(text: &str, column: usize, fragment: &str) {
        let e = error(text);
        assert_eq!(e.column, column, "{text:?}: {e}");
        assert!(
            e.message.contains(fragment),
            "{text:?}: {e:?} should mention {fragment:?}"
        );
    }

    #[test]
    fn a_range_is_a_set_on_the_total_order() {
        // The product example: no pre-release opt-in, b10 after b3.
        assert_contains(
            ">=3.8.0-b3",
            FIRMWARE,
            &[
                "3.8.0-b3",
                "3.8.0-b4",
                "3.8.0-b10",
                "3.8.0-rc1",
                "3.8.0",
                "3.9.0-b1",
                "4.0.0",
            ],
            &["3.8.0-b2", "3.8.0-b", "3.7.99", "3.8.0-alpha", "3.8.0-1"],
        );
        assert_contains(
            "<3.9.0",
            FIRMWARE,
            &["3.9.0-b1", "3.9.0-0", "3.8.99", "0.0.0-0"],
            &["3.9.0", "3.9.1-b1"],
        );
        // Semver: ASCII identifiers, so b10 sorts before b3 — but 3.9.0-b1 is still inside.
        assert_contains(
            ">=3.8.0-b3",
            SEMVER,
            &[
                "3.8.0-b3",
                "3.8.0-b4",
                "3.8.0-rc1",
                "3.8.0",
                "3.9.0-b1",
                "4.0.0",
            ],
            &["3.8.0-b10", "3.8.0-b2"],
        );
    }

    #[test]
    fn operators_have_their_plain_meaning() {
        for ordering in VersionOrdering::ALL {
            assert_contains(
                "=3.8.0",
                ordering,
                &["3.8.0", "v3.8"],
                &["3.8.0-b1", "3.8.1"],
            );
            assert_contains("3.8.0-b3", ordering, &["3.8.0b3"], &["3.8.0-b03", "3.8.0"]);
            assert_contains(
                ">3.8.0",
                ordering,
                &["3.8.1-0", "4.0.0"],
                &["3.8.0", "3.8.0-rc1"],
            );
            assert_contains(">=3.8.0", ordering, &["3.8.0", "3.8.1-b1"], &["3.8.0-rc1"]);
            assert_contains(
                "<3.8.0",
                ordering,
                &["3.8.0-rc1", "0.0.0"],
                &["3.8.0", "3.8.1"],
            );
            assert_contains("<=3.8.0", ordering, &["3.8.0", "3.8.0-rc1"], &["3.8.1-0"]);
            assert_contains(
                ">= 3.8.0 , < 4",
                ordering,
                &["3.8.0", "3.99.0", "4.0.0-rc1"],
                &["3.8.0-rc1", "4.0.0"],
            );
            assert_contains(
                "<3 || >=4",
                ordering,
                &["2.9.9", "3.0.0-b1", "4.0.0", "5.0.0-b1"],
                &["3.0.0", "3.5.0", "4.0.0-rc1"],
            );
            assert_contains(
                ">=v3.8.0b3, <3.8.0+build",
                ordering,
                &["3.8.0-rc1"],
                &["3.8.0"],
            );
            assert_contains("=3.8.0+build.5", ordering, &["3.8.0"], &["3.8.0-b1"]);
        }
    }

    #[test]
    fn wildcards_cover_a_line_including_its_pre_releases() {
        for ordering in VersionOrdering::ALL {
            for text in ["3.8.*", "3.8.x", "3.8.X", "=3.8.*", "v3.8.*", " = 3.8.* "] {
                assert_contains(
                    text,
                    ordering,
                    &[
                        "3.8.0-0",
                        "3.8.0-00",
                        "3.8.0-b1",
                        "3.8.0-0.0",
                        "3.8.0--",
                        "3.8.0-1",
                        "3.8.0",
                        "3.8.5-rc1",
                        "3.8.99",
                        "3.8.18446744073709551615",
                    ],
                    &[
                        "3.9.0-0",
                        "3.9.0-b1",
                        "3.9.0",
                        "3.7.99",
                        "3.7.99-rc1",
                        "4.8.0",
                    ],
                );
            }
            for text in ["3.*", "3.x", "3.X", "=3.*"] {
                assert_contains(
                    text,
                    ordering,
                    &[
                        "3.0.0-0",
                        "3.0.0-b1",
                        "3.0.0",
                        "3.8.0-b1",
                        "3.18446744073709551615.0",
                    ],
                    &["4.0.0-0", "4.0.0-b1", "2.99.99", "2.99.99-rc1"],
                );
            }
            for text in ["*", "x", "X", "=*"] {
                let r = range(text, ordering);
                assert!(r.matches_everything(), "{text}");
                for version in ["0.0.0-0", "3.8.0-b1", "18446744073709551615.0.0"] {
                    assert!(r.contains(&v(version)));
                }
            }
        }
    }

    #[test]
    fn wildcard_edges_at_u64_max_are_exact() {
        for ordering in VersionOrdering::ALL {
            assert_contains(
                "18446744073709551615.*",
                ordering,
                &[
                    "18446744073709551615.0.0-0",
                    "18446744073709551615.18446744073709551615.18446744073709551615",
                ],
                &["18446744073709551614.99.99"],
            );
            assert_contains(
                "3.18446744073709551615.*",
                ordering,
                &["3.18446744073709551615.0-0", "3.18446744073709551615.7"],
                &["4.0.0-0", "3.18446744073709551614.9"],
            );
            let top = range("18446744073709551615.*", ordering);
            assert_eq!(top.intervals()[0].upper, Bound::Unbounded);
        }
    }

    #[test]
    fn wildcard_lower_edge_is_the_least_pre_release_in_both_orderings() {
        // The `-0` trick: `3.8.*` starts at 3.8.0-0 and that is below every 3.8.0 pre-release.
        let pres = [
            "0", "00", "0.0", "0.a", "0a", "-", "--", "-0", "1", "01", "A", "a", "b1", "rc1",
            "0-0", "0.0.0.0",
        ];
        for ordering in VersionOrdering::ALL {
            let line = range("3.8.*", ordering);
            assert_eq!(
                line.intervals(),
                &[Interval {
                    lower: Bound::Included(v("3.8.0-0")),
                    upper: Bound::Excluded(v("3.9.0-0")),
                }]
            );
            for pre in pres {
                assert!(line.contains(&v(&format!("3.8.0-{pre}"))), "{pre}");
                assert!(!line.contains(&v(&format!("3.9.0-{pre}"))), "{pre}");
                assert!(range(">=3.8.0-0", ordering).contains(&v(&format!("3.8.0-{pre}"))));
            }
        }
    }

    #[test]
    fn bare_partial_versions_mean_exactly_that_version_and_are_reported() {
        let r = range("3.8", FIRMWARE);
        assert!(r.contains(&v("3.8.0")));
        assert!(!r.contains(&v("3.8.1")));
        assert!(!r.contains(&v("3.8.0-b1")));
        assert!(r.uses_partial_bare_version());
        assert_eq!(
            r.partial_bare_versions(),
            &[PartialBareVersion {
                column: 1,
                written: "3.8".to_string(),
                suggestion: "3.8.*".to_string(),
            }]
        );
        let r = range(">=2, 3 || v4", FIRMWARE);
        let reported: Vec<_> = r
            .partial_bare_versions()
            .iter()
            .map(|p| (p.column, p.written.as_str(), p.suggestion.as_str()))
            .collect();
        assert_eq!(reported, [(6, "3", "3.*"), (11, "v4", "4.*")]);
        for not_partial in [
            "3.8.0", "=3.8", ">=3.8", "<3", "3.8.*", "3.8b1", "3.8-rc1", "*",
        ] {
            assert!(
                !range(not_partial, FIRMWARE).uses_partial_bare_version(),
                "{not_partial}"
            );
        }
    }

    #[test]
    fn alternatives_are_merged_into_sorted_disjoint_intervals() {
        let r = range("<3 || <2", FIRMWARE);
        assert_eq!(r.intervals().len(), 1);
        assert!(range("<3 || >=3", FIRMWARE).matches_everything());
        assert!(range("<=3 || >3", FIRMWARE).matches_everything());
        assert!(range("* || 3.8.0", FIRMWARE).matches_everything());
        assert!(range(">=0.0.0-0", FIRMWARE).matches_everything());
        assert!(range(
            "<=18446744073709551615.18446744073709551615.18446744073709551615",
            FIRMWARE
        )
        .matches_everything());
        assert!(!range(">=0.0.0", FIRMWARE).matches_everything());
        let gap = range("<3 || >3", FIRMWARE);
        assert_eq!(gap.intervals().len(), 2);
        assert!(!gap.contains(&v("3.0.0")));
        assert_eq!(
            range("3.9.* || 3.8.*", FIRMWARE).intervals(),
            &[Interval {
                lower: Bound::Included(v("3.8.0-0")),
                upper: Bound::Excluded(v("3.10.0-0")),
            }]
        );
        assert_eq!(
            range("=5 || =1 || =3", FIRMWARE).intervals(),
            &[
                Interval {
                    lower: Bound::Included(v("1.0.0")),
                    upper: Bound::Included(v("1.0.0")),
                },
                Interval {
                    lower: Bound::Included(v("3.0.0")),
                    upper: Bound::Included(v("3.0.0")),
                },
                Interval {
                    lower: Bound::Included(v("5.0.0")),
                    upper: Bound::Included(v("5.0.0")),
                },
            ]
        );
    }

    #[test]
    fn keeps_text_and_ordering() {
        let r = range(" >= 3.8.0-b3 ", SEMVER);
        assert_eq!(r.as_str(), " >= 3.8.0-b3 ");
        assert_eq!(r.to_string(), " >= 3.8.0-b3 ");
        assert_eq!(r.ordering(), SEMVER);
    }

    #[test]
    fn errors_point_at_the_offending_token() {
        assert_error("", 1, "empty range");
        assert_error("   ", 1, "empty range");
        assert_error(">=3.8,", 6, "empty comparator");
        assert_error(", <4", 1, "empty comparator");
        assert_error(">=3.8,,<4", 6, "empty comparator");
        assert_error(">=3.8, ,<4", 6, "empty comparator");
        assert_error(">=3 ||", 5, "empty alternative");
        assert_error("|| <4", 1, "empty alternative");
        assert_error("1 ||  || 2", 7, "empty alternative");
        assert_error("=>3.8", 1, "did you mean `>=`");
        assert_error("=<3.8", 1, "did you mean `<=`");
        assert_error("==3.8", 1, "`==`");
        assert_error("!=3.8", 1, "not supported");
        assert_error(">>3.8", 1, "unknown operator `>>`");
        for text in ["~3.8", "^3.8", "~>3.8", "~=3.8"] {
            assert_error(text, 1, "are not supported");
            let message = error(text).message;
            assert!(message.contains("`^` and `~`") && message.contains("`>=`"));
            assert!(message.contains("`<`"));
        }
        assert_error(">=3.0, ^3.8", 8, "not supported");
        assert_error(">=3..8", 3, "malformed version `3..8`");
        assert_error(">=3..8", 3, "MAJOR");
        assert_error(">= 3.8.0.1", 4, "more than 3 numeric components");
        assert_error("3.8.0-", 1, "bad pre-release");
        assert_error("Airtame", 1, "malformed version");
        assert_error(">=3.8.*", 1, "a wildcard takes no operator");
        assert_error(">=3.8.*", 1, "`>=3.8.0-0`");
        assert_error(">3.8.*", 1, "`>=3.9.0-0`");
        assert_error("<3.8.x", 1, "`<3.8.0-0`");
        assert_error("<=3.*", 1, "`<4.0.0-0`");
        assert_error("<*", 1, "a wildcard takes no operator");
        assert_error(">=3, <3.x", 6, "a wildcard takes no operator");
        assert_error("3.*.1", 4, "nothing may follow a wildcard: write `3.*`");
        assert_error("3.8.*-b1", 6, "nothing may follow a wildcard");
        assert_error("*.8", 2, "nothing may follow a wildcard");
        assert_error("3.8.0.*", 7, "only replace the minor or the patch");
        assert_error("99999999999999999999.*", 1, "number too large");
        assert_error(">4, <3", 5, "matches no version");
        assert_error(">3.8.0, <3.8.0", 9, "matches no version");
        assert_error(">=3.8.0, <3.8.0", 10, "matches no version");
        assert_error("3.9.*, <=3.8.99", 8, "matches no version");
        assert_error("3.8.*, 3.9.*", 8, "matches no version");
        assert_error("1 || >4, <3", 10, "matches no version");
        assert_error("<0.0.0-0", 1, "matches no version");
        assert_error(
            ">18446744073709551615.18446744073709551615.18446744073709551615",
            1,
            "matches no version",
        );
        assert_error("3.8.0 4", 7, "unexpected `4`");
        assert_error(">= 3.8.0   <4", 12, "separate comparators with `,`");
        assert_error(">=3 | <4", 5, "single `|`");
        assert_error("> =3", 3, "without spaces");
        assert_error(">=", 1, "missing version after `>=`");
        assert_error(" >= ", 2, "missing version after `>=`");
        assert_error("3.8.0-é", 1, "non-ASCII");
        let e = error(">4, <3");
        assert!(e.to_string().starts_with("column 5: "));
    }

    #[test]
    fn emptiness_is_checked_in_the_ranges_ordering() {
        // b10 < b3 in semver only.
        assert!(VersionRange::parse(">=3.8.0-b3, <=3.8.0-b10", FIRMWARE).is_ok());
        let e = VersionRange::parse(">=3.8.0-b3, <=3.8.0-b10", SEMVER).unwrap_err();
        assert!(e.message.contains("matches no version"));
    }

    /// `text` spelled differently but equal under the firmware ordering: letters of the
    /// pre-release in mixed case (by `case_bits`), zeros put before runs of digits (by
    /// `zero_bits`), and a `V` prefix on odd seeds.
    fn respelled(version: &FirmwareVersion, case_bits: u64, zero_bits: u64) -> String {
        let mut pre = String::new();
        let mut previous_is_digit = false;
        for (i, c) in version.pre().chars().enumerate() {
            let bit = 1u64 << (i % 64);
            if c.is_ascii_digit() && !previous_is_digit && zero_bits & bit != 0 {
                pre.push('0');
            }
            previous_is_digit = c.is_ascii_digit();
            pre.push(if case_bits & bit != 0 {
                c.to_ascii_uppercase()
            } else {
                c
            });
        }
        let prefix = if case_bits & 1 == 1 { "V" } else { "" };
        let core = format!(
            "{prefix}{}.{}.{}",
            version.major(),
            version.minor(),
            version.patch()
        );
        if pre.is_empty() {
            core
        } else {
            format!("{core}-{pre}")
        }
    }

    #[test]
    fn the_incident_spellings_are_inside_the_blocked_range() {
        let blocked = range(">=3.8.0-b3", FIRMWARE);
        for written in [
            "3.8.0-B3",
            "3.8.0-b03",
            "3.8.0-RC1",
            "V3.8.0-B10",
            "3.8.0-B004",
        ] {
            let input = crate::rules::VersionInput::from_text(written, FIRMWARE);
            let crate::rules::VersionInput::Parsed(version) = input else {
                panic!("{written} did not parse");
            };
            assert!(blocked.contains(&version), "{written} slipped through");
        }
        let below = crate::rules::VersionInput::from_text("3.8.0-B2", FIRMWARE);
        assert!(matches!(below, crate::rules::VersionInput::Parsed(v) if !blocked.contains(&v)));
        // Endpoints are spelled the same way: `>=3.8.0-B03` is `>=3.8.0-b3`.
        assert_eq!(
            range(">=3.8.0-B03", FIRMWARE).intervals(),
            blocked.intervals()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn equal_spellings_get_the_same_answer_from_every_range(
            test_range in range_strategy(),
            version in version_strategy(),
            case_bits in any::<u64>(),
            zero_bits in any::<u64>(),
            range_case_bits in any::<u64>(),
        ) {
            use crate::rules::VersionInput;
            let text = test_range.render();
            let Ok(parsed) = VersionRange::parse(&text, FIRMWARE) else {
                return Ok(());
            };
            // The same range with its endpoints' letters in another case.
            let shouted: String = text
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if c != 'x' && c != 'X' && range_case_bits & (1 << (i % 64)) != 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            let Ok(shouted) = VersionRange::parse(&shouted, FIRMWARE) else {
                return Err(TestCaseError::fail(format!("{shouted:?} refused")));
            };
            let written = version.to_string();
            let other = respelled(&version, case_bits, zero_bits);
            let (VersionInput::Parsed(a), VersionInput::Parsed(b)) = (
                VersionInput::from_text(&written, FIRMWARE),
                VersionInput::from_text(&other, FIRMWARE),
            ) else {
                return Err(TestCaseError::fail(format!("{written} or {other} did not parse")));
            };
            prop_assert_eq!(a, b, "{} and {} are one version", written, other);
            prop_assert_eq!(parsed.contains(&a), parsed.contains(&b), "{:?}: {} vs {}", text, written, other);
            prop_assert_eq!(parsed.contains(&a), shouted.contains(&b), "{:?} respelled", text);
        }

        #[test]
        fn contains_equals_the_brute_force_reference(test_range in range_strategy()) {
            let text = test_range.render();
            let versions = grid();
            for ordering in VersionOrdering::ALL {
                match VersionRange::parse(&text, ordering) {
                    Ok(parsed) => {
                        for version in &versions {
                            prop_assert_eq!(
                                parsed.contains(&version.canonical(ordering)),
                                test_range.contains(version, ordering),
                                "{} {:?} {}", ordering, text, version
                            );
                        }
                        // Intervals: sorted, disjoint, never touching, never empty.
                        let cuts: Vec<CutInterval> = parsed
                            .intervals()
                            .iter()
                            .map(|i| CutInterval {
                                lower: match i.lower {
                                    Bound::Unbounded => Cut::BelowAll,
                                    Bound::Included(v) => Cut::below(v),
                                    Bound::Excluded(v) => Cut::above(v),
                                },
                                upper: match i.upper {
                                    Bound::Unbounded => Cut::AboveAll,
                                    Bound::Included(v) => Cut::above(v),
                                    Bound::Excluded(v) => Cut::below(v),
                                },
                            })
                            .collect();
                        for (i, cut) in cuts.iter().enumerate() {
                            prop_assert!(!cut.is_empty(ordering));
                            if let Some(next) = cuts.get(i + 1) {
                                prop_assert_eq!(cut.upper.cmp(&next.lower, ordering), Ordering::Less);
                            }
                        }
                        let expected_partial = test_range
                            .alternatives
                            .iter()
                            .flatten()
                            .any(TestComparator::is_partial_bare);
                        prop_assert_eq!(parsed.uses_partial_bare_version(), expected_partial);
                        prop_assert_eq!(parsed.as_str(), text.as_str());
                    }
                    Err(e) => {
                        // The only refusal a generated range can earn: an empty alternative,
                        // and then it really matches none of the versions.
                        prop_assert!(e.message.contains("matches no version"), "{:?}: {}", text, e);
                        let some_alternative_is_empty = (0..test_range.alternatives.len())
                            .any(|i| versions.iter().all(|v| !test_range.alternative_contains(i, v, ordering)));
                        prop_assert!(some_alternative_is_empty, "{:?}: {}", text, e);
                    }
                }
            }
        }

        #[test]
        fn parse_never_panics(text in "[ <>=!~^*xX.,|0-9vbrc+-]{0,40}") {
            for ordering in VersionOrdering::ALL {
                if let Err(e) = VersionRange::parse(&text, ordering) {
                    prop_assert!(e.column >= 1 && e.column <= text.len().max(1), "{:?}: {}", text, e);
                }
            }
        }

        #[test]
        fn parse_never_panics_on_any_text(text in "\\PC{0,40}") {
            let _ = VersionRange::parse(&text, FIRMWARE);
        }
    }
}
