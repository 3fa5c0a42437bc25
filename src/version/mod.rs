//! Firmware versions: what a device reports, parsed leniently into a small `Copy` value,
//! and the two total orders (`firmware`, `semver`) that version ranges are evaluated in.
//!
//! This module owns [`FirmwareVersion`] and its allocation-free parser, [`ParseError`],
//! [`VersionOrdering`] and [`FirmwareVersion::cmp_with`]. Nothing here allocates, so it can
//! run on every connection.
//!
//! # Accepted syntax (lenient)
//!
//! `[v|V]MAJOR[.MINOR[.PATCH]][[-]PRE][+BUILD]`, surrounded by optional ASCII whitespace:
//! missing MINOR/PATCH are 0, leading zeros in the core are accepted, the `-` before a
//! pre-release may be left out when the pre-release starts with a letter (`3.8.0b3`,
//! `3.8b3`), and build metadata is validated then discarded.
//!
//! # Ordering
//!
//! Both orderings compare MAJOR, MINOR, PATCH numerically, put a pre-release before its
//! release, and compare pre-releases identifier by identifier (split on `.`), a shorter list
//! of otherwise equal identifiers being smaller. They differ on identifiers that are not
//! purely numeric: [`VersionOrdering::Semver`] compares them as ASCII bytes (SemVer 2.0 §11),
//! [`VersionOrdering::Firmware`] compares them in "natural" order (`b3 < b10`).
//!
//! **Tie-break.** The lenient parser accepts leading zeros inside pre-release identifiers, so
//! two different pre-releases can have equal precedence (`b03` and `b3`, `03` and `3`). Such
//! a tie is broken by comparing the raw pre-release bytes (ASCII), so `3.8.0-b03 < 3.8.0-b3`
//! and `3.8.0-0 < 3.8.0-00`. This only decides between versions that are equal under the
//! rules above; it makes `cmp_with` a total order consistent with `==`, for sorting.
//!
//! **Deciding uses one spelling per version.** Under the firmware ordering, letters compare
//! case-insensitively and digits by value when deciding whether a version is inside a range:
//! every version from the wire and every range endpoint is first put in its
//! [`FirmwareVersion::canonical`] form (lower-case letters, no leading zeros), so `3.8.0-B03`,
//! `3.8.0-b3` and `V3.8.0-b003` are one version and no range can tell them apart. The
//! `semver` ordering keeps the text as written (strict SemVer 2.0).

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Longest accepted version in bytes, after trimming. Also the longest normalised form
/// (`MAJOR.MINOR.PATCH[-PRE]`), so every parsed version prints to a string that parses back.
pub const MAX_VERSION_LEN: usize = 64;

/// Longest raw input (before trimming whitespace) that the parser looks at: anything longer is
/// rejected as [`ParseError::TooLong`] without being scanned, so an oversized header is cheap.
pub const MAX_RAW_INPUT_LEN: usize = 256;

/// Room for the pre-release: it is always shorter than the whole normalised form.
const PRE_CAPACITY: usize = MAX_VERSION_LEN;

/// Why a string is not a firmware version. Each message is short enough for a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// Nothing but whitespace.
    #[error("empty version")]
    Empty,
    /// More than [`MAX_VERSION_LEN`] bytes after trimming (or [`MAX_RAW_INPUT_LEN`] before).
    #[error("longer than 64 bytes")]
    TooLong,
    /// A byte outside ASCII.
    #[error("contains non-ASCII characters")]
    NotAscii,
    /// The `MAJOR[.MINOR[.PATCH]]` part is missing or has an empty or non-numeric component.
    #[error("expected MAJOR[.MINOR[.PATCH]] made of decimal digits")]
    BadCore,
    /// A fourth numeric component, as in `3.8.0.1`.
    #[error("more than 3 numeric components (MAJOR.MINOR.PATCH)")]
    TooManyComponents,
    /// A core component does not fit in 64 bits.
    #[error("number too large (at most 18446744073709551615)")]
    NumberTooLarge,
    /// The pre-release after `-` is empty or has an empty or invalid identifier.
    #[error("bad pre-release: expected dot-separated non-empty identifiers of [0-9A-Za-z-]")]
    BadPreRelease,
    /// The build metadata after `+` is empty or has an empty or invalid identifier.
    #[error("bad build metadata: expected dot-separated non-empty identifiers of [0-9A-Za-z-]")]
    BadBuild,
    /// Something other than `-`, a letter or `+` follows the core.
    #[error("unexpected characters after the version")]
    TrailingGarbage,
    /// Valid syntax, but `MAJOR.MINOR.PATCH-PRE` would exceed 64 bytes once normalised
    /// (e.g. a long dash-less pre-release after a one-number core).
    #[error("normalised form MAJOR.MINOR.PATCH-PRE would be longer than 64 bytes")]
    NormalisedTooLong,
}

/// What the text looked like beyond the version itself, for diagnostics such as
/// "`3.8` means exactly 3.8.0, did you mean `3.8.*`?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseDetails {
    /// How many of MAJOR, MINOR, PATCH were written (1 to 3).
    pub core_components: u8,
    /// Whether `+BUILD` metadata was present (and discarded).
    pub had_build_metadata: bool,
}

/// A parsed firmware version: `MAJOR.MINOR.PATCH[-PRE]`, build metadata dropped.
///
/// `Copy` and allocation-free (the pre-release lives in an inline buffer), so it can be
/// parsed and compared on every connection. Equality and hashing are structural; there is
/// deliberately no `Ord`, because the order depends on [`VersionOrdering`]: use
/// [`FirmwareVersion::cmp_with`].
#[derive(Clone, Copy)]
pub struct FirmwareVersion {
    major: u64,
    minor: u64,
    patch: u64,
    /// Bytes of `pre` in use; the rest stay zero.
    pre_len: u8,
    /// The pre-release identifiers joined by `.`, ASCII only.
    pre: [u8; PRE_CAPACITY],
}

impl FirmwareVersion {
    /// The smallest version in both orderings: `0.0.0-0` (see [`FirmwareVersion::lowest_of_core`]).
    pub const MIN: FirmwareVersion = FirmwareVersion::lowest_of_core(0, 0, 0);

    /// The largest version in both orderings: `u64::MAX` three times, no pre-release.
    pub const MAX: FirmwareVersion = FirmwareVersion::new(u64::MAX, u64::MAX, u64::MAX);

    /// A release version (no pre-release), for code and tests that build versions directly.
    pub const fn new(major: u64, minor: u64, patch: u64) -> FirmwareVersion {
        FirmwareVersion {
            major,
            minor,
            patch,
            pre_len: 0,
            pre: [0; PRE_CAPACITY],
        }
    }

    /// `MAJOR.MINOR.PATCH-0`: the least version whose core is `major.minor.patch`, pre-releases
    /// included, in BOTH orderings. Wildcards (`3.8.*`) use it as their exact lower edge.
    ///
    /// Why it is the least: any version with this core either has no pre-release (and a
    /// pre-release sorts before it) or a pre-release whose first identifier is either
    /// non-numeric (numeric identifiers sort first), or numeric with a value >= 0. If that value
    /// is 0, either it has more identifiers (the shorter list `0` is smaller) or it is a single
    /// identifier spelled `00…0`, which ties on precedence and loses the byte tie-break
    /// (`"0"` is a prefix of it).
    pub const fn lowest_of_core(major: u64, minor: u64, patch: u64) -> FirmwareVersion {
        let mut version = FirmwareVersion::new(major, minor, patch);
        version.pre[0] = b'0';
        version.pre_len = 1;
        version
    }

    /// Parses a version from text, leniently (see the module docs). Never panics, never allocates.
    pub fn parse(text: &str) -> Result<FirmwareVersion, ParseError> {
        FirmwareVersion::parse_bytes(text.as_bytes())
    }

    /// Parses a version from raw bytes (e.g. a header value), leniently. Never panics, never allocates.
    pub fn parse_bytes(input: &[u8]) -> Result<FirmwareVersion, ParseError> {
        FirmwareVersion::parse_bytes_with_details(input).map(|(version, _)| version)
    }

    /// Like [`FirmwareVersion::parse`], also telling how the version was written.
    pub fn parse_with_details(text: &str) -> Result<(FirmwareVersion, ParseDetails), ParseError> {
        FirmwareVersion::parse_bytes_with_details(text.as_bytes())
    }

    /// Like [`FirmwareVersion::parse_bytes`], also telling how the version was written.
    pub fn parse_bytes_with_details(
        input: &[u8],
    ) -> Result<(FirmwareVersion, ParseDetails), ParseError> {
        if input.len() > MAX_RAW_INPUT_LEN {
            return Err(ParseError::TooLong);
        }
        let text = input.trim_ascii();
        let Some(&first) = text.first() else {
            return Err(ParseError::Empty);
        };
        if text.len() > MAX_VERSION_LEN {
            return Err(ParseError::TooLong);
        }
        if !text.is_ascii() {
            return Err(ParseError::NotAscii);
        }

        let mut pos = usize::from(matches!(first, b'v' | b'V'));
        let mut core = [0u64; 3];
        let mut components = 0usize;
        loop {
            let (value, digits) = parse_decimal(&text[pos..])?;
            if digits == 0 {
                return Err(ParseError::BadCore);
            }
            core[components] = value;
            components += 1;
            pos += digits;
            if text.get(pos) != Some(&b'.') {
                break;
            }
            if components == core.len() {
                let next_is_digit = text.get(pos + 1).is_some_and(u8::is_ascii_digit);
                return Err(if next_is_digit {
                    ParseError::TooManyComponents
                } else {
                    ParseError::BadCore
                });
            }
            pos += 1;
        }

        let rest = &text[pos..];
        let (pre, build) = match rest.first() {
            None => (None, None),
            Some(b'+') => (None, Some(&rest[1..])),
            Some(b'-') => split_at_plus(&rest[1..]),
            Some(c) if c.is_ascii_alphabetic() => split_at_plus(rest),
            Some(_) => return Err(ParseError::TrailingGarbage),
        };
        let pre = match pre {
            Some(pre) if !are_valid_identifiers(pre) => return Err(ParseError::BadPreRelease),
            Some(pre) => pre,
            None => &[],
        };
        if let Some(build) = build {
            if !are_valid_identifiers(build) {
                return Err(ParseError::BadBuild);
            }
        }

        let [major, minor, patch] = core;
        let pre_part_len = if pre.is_empty() { 0 } else { 1 + pre.len() };
        let normalised_len =
            decimal_len(major) + decimal_len(minor) + decimal_len(patch) + 2 + pre_part_len;
        if normalised_len > MAX_VERSION_LEN {
            return Err(ParseError::NormalisedTooLong);
        }

        let mut version = FirmwareVersion::new(major, minor, patch);
        // pre.len() < MAX_VERSION_LEN = PRE_CAPACITY (checked just above), so it fits both the
        // buffer and the u8 length.
        version.pre[..pre.len()].copy_from_slice(pre);
        version.pre_len = pre.len() as u8;
        let details = ParseDetails {
            // At most 3 (the loop above stops there).
            core_components: components as u8,
            had_build_metadata: build.is_some(),
        };
        Ok((version, details))
    }

    /// The MAJOR number.
    pub const fn major(&self) -> u64 {
        self.major
    }

    /// The MINOR number (0 when it was not written).
    pub const fn minor(&self) -> u64 {
        self.minor
    }

    /// The PATCH number (0 when it was not written).
    pub const fn patch(&self) -> u64 {
        self.patch
    }

    /// The pre-release without its leading `-` (`""` for a release), as written.
    pub fn pre(&self) -> &str {
        // Only ASCII bytes are ever stored, so this never falls back.
        std::str::from_utf8(self.pre_bytes()).unwrap_or_default()
    }

    /// Whether this is a pre-release (sorts before the release with the same core).
    pub const fn is_prerelease(&self) -> bool {
        self.pre_len != 0
    }

    fn pre_bytes(&self) -> &[u8] {
        &self.pre[..self.pre_len as usize]
    }

    /// The spelling every decision uses in `ordering`. Under [`VersionOrdering::Firmware`]
    /// letters are lower-cased and leading zeros are dropped from every run of digits in the
    /// pre-release, so spellings the firmware ordering means as one version (`3.8.0-RC01`,
    /// `3.8.0-rc1`; `3.8.0-B03`, `3.8.0-b3`) become one value: no range can tell them apart and
    /// nobody dodges a rule by spelling a tag differently. [`VersionOrdering::Semver`] keeps
    /// the text as written (strict SemVer 2.0 precedence is case-sensitive).
    ///
    /// Allocation-free; a version already in that form is returned as is after one scan.
    pub fn canonical(self, ordering: VersionOrdering) -> FirmwareVersion {
        if ordering == VersionOrdering::Semver || is_firmware_canonical(self.pre_bytes()) {
            return self;
        }
        let mut out = FirmwareVersion::new(self.major, self.minor, self.patch);
        let pre = self.pre_bytes();
        let mut n = 0;
        let mut i = 0;
        while i < pre.len() {
            if pre[i].is_ascii_digit() {
                let start = i;
                while i < pre.len() && pre[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = strip_leading_zeros(&pre[start..i]);
                let digits: &[u8] = if digits.is_empty() { b"0" } else { digits };
                // The canonical form is never longer than the original, so it fits.
                out.pre[n..n + digits.len()].copy_from_slice(digits);
                n += digits.len();
            } else {
                out.pre[n] = pre[i].to_ascii_lowercase();
                n += 1;
                i += 1;
            }
        }
        // n <= pre.len() < PRE_CAPACITY.
        out.pre_len = n as u8;
        out
    }

    /// Whether this is already the spelling [`FirmwareVersion::canonical`] gives in `ordering`.
    pub fn is_canonical(&self, ordering: VersionOrdering) -> bool {
        ordering == VersionOrdering::Semver || is_firmware_canonical(self.pre_bytes())
    }

    /// Compares two versions in the given ordering. A total order: `Equal` exactly when the
    /// versions are `==` (see the tie-break in the module docs).
    pub fn cmp_with(&self, other: &FirmwareVersion, ordering: VersionOrdering) -> Ordering {
        self.major
            .cmp(&other.major)
            .then(self.minor.cmp(&other.minor))
            .then(self.patch.cmp(&other.patch))
            .then_with(|| compare_pre_releases(self.pre_bytes(), other.pre_bytes(), ordering))
    }
}

impl PartialEq for FirmwareVersion {
    fn eq(&self, other: &FirmwareVersion) -> bool {
        self.major == other.major
            && self.minor == other.minor
            && self.patch == other.patch
            && self.pre_bytes() == other.pre_bytes()
    }
}

impl Eq for FirmwareVersion {}

impl Hash for FirmwareVersion {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.major.hash(state);
        self.minor.hash(state);
        self.patch.hash(state);
        self.pre_bytes().hash(state);
    }
}

impl fmt::Display for FirmwareVersion {
    /// The normalised form `MAJOR.MINOR.PATCH[-PRE]`, which parses back to the same version.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if self.is_prerelease() {
            write!(f, "-{}", self.pre())?;
        }
        Ok(())
    }
}

impl fmt::Debug for FirmwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FirmwareVersion({self})")
    }
}

impl FromStr for FirmwareVersion {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<FirmwareVersion, ParseError> {
        FirmwareVersion::parse(text)
    }
}

/// How pre-release identifiers are ordered; chosen per rules file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum VersionOrdering {
    /// Natural order for identifiers with letters (`b3 < b10 < rc1`): what firmware teams mean.
    #[default]
    Firmware,
    /// Strict SemVer 2.0 precedence (`b10 < b3`, ASCII), for fleets that want it.
    Semver,
}

impl VersionOrdering {
    /// Both orderings, for tests and documentation.
    pub const ALL: [VersionOrdering; 2] = [VersionOrdering::Firmware, VersionOrdering::Semver];

    /// The name used in files and on the command line: `"firmware"` or `"semver"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            VersionOrdering::Firmware => "firmware",
            VersionOrdering::Semver => "semver",
        }
    }
}

impl fmt::Display for VersionOrdering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An ordering name other than `firmware` or `semver`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown version ordering `{0}`: expected `firmware` or `semver`")]
pub struct UnknownOrdering(pub String);

impl FromStr for VersionOrdering {
    type Err = UnknownOrdering;

    /// Accepts the names from [`VersionOrdering::as_str`], ignoring ASCII case and surrounding
    /// whitespace.
    fn from_str(text: &str) -> Result<VersionOrdering, UnknownOrdering> {
        let name = text.trim();
        VersionOrdering::ALL
            .into_iter()
            .find(|ordering| ordering.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownOrdering(text.to_string()))
    }
}

/// No upper-case letter and no run of digits with a leading zero (other than a lone `0`).
fn is_firmware_canonical(pre: &[u8]) -> bool {
    let mut previous_is_digit = false;
    for (i, &b) in pre.iter().enumerate() {
        if b.is_ascii_uppercase() {
            return false;
        }
        let is_digit = b.is_ascii_digit();
        if is_digit
            && !previous_is_digit
            && b == b'0'
            && pre.get(i + 1).is_some_and(u8::is_ascii_digit)
        {
            return false;
        }
        previous_is_digit = is_digit;
    }
    true
}

/// Reads leading ASCII digits: (value, number of digits). Zero digits gives (0, 0).
fn parse_decimal(bytes: &[u8]) -> Result<(u64, usize), ParseError> {
    let mut value: u64 = 0;
    let mut digits = 0;
    for &byte in bytes.iter().take_while(|b| b.is_ascii_digit()) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(byte - b'0')))
            .ok_or(ParseError::NumberTooLarge)?;
        digits += 1;
    }
    Ok((value, digits))
}

/// Number of decimal digits of `n`.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Splits `PRE[+BUILD]` into the pre-release and the optional build metadata.
fn split_at_plus(text: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    match text.iter().position(|&b| b == b'+') {
        Some(plus) => (Some(&text[..plus]), Some(&text[plus + 1..])),
        None => (Some(text), None),
    }
}

/// Dot-separated, non-empty identifiers of `[0-9A-Za-z-]`.
fn are_valid_identifiers(text: &[u8]) -> bool {
    text.split(|&b| b == b'.').all(|identifier| {
        !identifier.is_empty()
            && identifier
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// Orders two pre-releases (empty = release). See the module docs, including the tie-break.
fn compare_pre_releases(a: &[u8], b: &[u8], ordering: VersionOrdering) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        (false, false) => {}
    }
    let mut a_identifiers = a.split(|&c| c == b'.');
    let mut b_identifiers = b.split(|&c| c == b'.');
    loop {
        match (a_identifiers.next(), b_identifiers.next()) {
            (Some(x), Some(y)) => {
                let order = compare_identifiers(x, y, ordering);
                if order != Ordering::Equal {
                    return order;
                }
            }
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            // Equal precedence; only leading zeros can differ. Tie-break on the raw bytes.
            (None, None) => return a.cmp(b),
        }
    }
}

/// Orders two pre-release identifiers by precedence (leading zeros ignored).
fn compare_identifiers(a: &[u8], b: &[u8], ordering: VersionOrdering) -> Ordering {
    let a_is_numeric = a.iter().all(u8::is_ascii_digit);
    let b_is_numeric = b.iter().all(u8::is_ascii_digit);
    match (a_is_numeric, b_is_numeric) {
        (true, true) => compare_digit_strings(a, b),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => match ordering {
            VersionOrdering::Semver => a.cmp(b),
            VersionOrdering::Firmware => compare_natural(a, b),
        },
    }
}

/// Compares two non-empty digit strings by value without parsing them (no overflow):
/// the longer one without leading zeros is larger, else the bytes decide.
fn compare_digit_strings(a: &[u8], b: &[u8]) -> Ordering {
    let a = strip_leading_zeros(a);
    let b = strip_leading_zeros(b);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn strip_leading_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&b| b == b'0').count();
    &digits[zeros..]
}

/// Natural order: maximal digit runs compare by value, other runs by bytes, a digit run sorts
/// before a non-digit run, and a prefix sorts first (`b < b1 < b3 < b10 < rc1`).
fn compare_natural(a: &[u8], b: &[u8]) -> Ordering {
    let mut a_runs = Runs(a);
    let mut b_runs = Runs(b);
    loop {
        match (a_runs.next(), b_runs.next()) {
            (Some(x), Some(y)) => {
                let x_is_digits = x.first().is_some_and(u8::is_ascii_digit);
                let y_is_digits = y.first().is_some_and(u8::is_ascii_digit);
                let order = match (x_is_digits, y_is_digits) {
                    (true, true) => compare_digit_strings(x, y),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => x.cmp(y),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (None, None) => return Ordering::Equal,
        }
    }
}

/// Iterator over the maximal runs of digits and of non-digits of an identifier.
struct Runs<'a>(&'a [u8]);

impl<'a> Iterator for Runs<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let first_is_digit = self.0.first()?.is_ascii_digit();
        let run_len = self
            .0
            .iter()
            .take_while(|b| b.is_ascii_digit() == first_is_digit)
            .count();
        let (run, rest) = self.0.split_at(run_len);
        self.0 = rest;
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const FIRMWARE: VersionOrdering = VersionOrdering::Firmware;
    const SEMVER: VersionOrdering = VersionOrdering::Semver;

    fn v(text: &str) -> FirmwareVersion {
        match FirmwareVersion::parse(text) {
            Ok(version) => version,
            Err(e) => panic!("{text:?} should parse: {e}"),
        }
    }

    fn parts(version: &FirmwareVersion) -> (u64, u64, u64, &str) {
        (
            version.major(),
            version.minor(),
            version.patch(),
            version.pre(),
        )
    }

    /// Asserts that `chain` is strictly increasing, pairwise (not only neighbours).
    fn assert_strictly_increasing(chain: &[&str], ordering: VersionOrdering) {
        let versions: Vec<FirmwareVersion> = chain.iter().map(|t| v(t)).collect();
        for i in 0..versions.len() {
            assert_eq!(
                versions[i].cmp_with(&versions[i], ordering),
                Ordering::Equal
            );
            for j in i + 1..versions.len() {
                assert_eq!(
                    versions[i].cmp_with(&versions[j], ordering),
                    Ordering::Less,
                    "{ordering}: expected {} < {}",
                    chain[i],
                    chain[j]
                );
                assert_eq!(
                    versions[j].cmp_with(&versions[i], ordering),
                    Ordering::Greater,
                    "{ordering}: expected {} > {}",
                    chain[j],
                    chain[i]
                );
            }
        }
    }

    #[test]
    fn parses_the_lenient_syntax() {
        type Parts = (u64, u64, u64, &'static str);
        let cases: &[(&str, Parts)] = &[
            ("3.8.0", (3, 8, 0, "")),
            ("v3.8.0-b3", (3, 8, 0, "b3")),
            ("V3.8.0-b3", (3, 8, 0, "b3")),
            ("3.8", (3, 8, 0, "")),
            ("3", (3, 0, 0, "")),
            ("v3", (3, 0, 0, "")),
            ("03.8", (3, 8, 0, "")),
            ("003.008.000", (3, 8, 0, "")),
            ("3.8.0b3", (3, 8, 0, "b3")),
            ("3.8b3", (3, 8, 0, "b3")),
            ("3b3", (3, 0, 0, "b3")),
            ("3.8.0B3", (3, 8, 0, "B3")),
            ("3.8.0rc1.2", (3, 8, 0, "rc1.2")),
            ("3.8.0-rc1.2", (3, 8, 0, "rc1.2")),
            ("3.8.0-alpha.1", (3, 8, 0, "alpha.1")),
            ("3.8.0-b3-x", (3, 8, 0, "b3-x")),
            ("3.8.0b3-x", (3, 8, 0, "b3-x")),
            ("3.8.0--", (3, 8, 0, "-")),
            ("3.8.0-0", (3, 8, 0, "0")),
            ("3.8.0-b03", (3, 8, 0, "b03")),
            ("3.8.0+build.5", (3, 8, 0, "")),
            ("3.8.0-b3+build.5", (3, 8, 0, "b3")),
            ("3.8.0b3+build-5.x", (3, 8, 0, "b3")),
            ("3.8+exp", (3, 8, 0, "")),
            ("3+exp", (3, 0, 0, "")),
            ("  3.8.0\t\r\n", (3, 8, 0, "")),
            ("\tv3.8.0-b3 ", (3, 8, 0, "b3")),
            (
                "18446744073709551615.18446744073709551615.18446744073709551615",
                (u64::MAX, u64::MAX, u64::MAX, ""),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parts(&v(text)), *expected, "{text:?}");
        }
    }

    #[test]
    fn rejects_malformed_input_with_a_precise_reason() {
        use ParseError::*;
        let cases: &[(&str, ParseError)] = &[
            ("", Empty),
            ("   \t\n", Empty),
            ("3..8", BadCore),
            ("3.", BadCore),
            ("3.8.", BadCore),
            (".3", BadCore),
            ("v", BadCore),
            ("vv3", BadCore),
            ("v.3", BadCore),
            ("-3", BadCore),
            ("Airtame-garbage", BadCore),
            ("version 3", BadCore),
            ("3.8.0.1", TooManyComponents),
            ("3.8.0.", BadCore),
            ("3.8.0.rc1", BadCore),
            ("18446744073709551616", NumberTooLarge),
            ("3.99999999999999999999", NumberTooLarge),
            ("3.8.0-", BadPreRelease),
            ("3.8.0-b..1", BadPreRelease),
            ("3.8.0-b.", BadPreRelease),
            ("3.8.0-.b", BadPreRelease),
            ("3.8.0-b_1", BadPreRelease),
            ("3.8.0b_1", BadPreRelease),
            ("3.8.0-+build", BadPreRelease),
            ("3.8.0-b 1", BadPreRelease),
            ("3.8.0+", BadBuild),
            ("3.8.0+a..b", BadBuild),
            ("3.8.0+a+b", BadBuild),
            ("3.8.0-b1+", BadBuild),
            ("3.8.0+a_b", BadBuild),
            ("3.8.0_1", TrailingGarbage),
            ("3.8.0 rc1", TrailingGarbage),
            ("3.8.0/x", TrailingGarbage),
            ("3,8", TrailingGarbage),
            ("3.8.0-é", NotAscii),
            ("é3", NotAscii),
            ("3.8.0\u{a0}", NotAscii),
        ];
        for (text, expected) in cases {
            assert_eq!(FirmwareVersion::parse(text), Err(*expected), "{text:?}");
        }
    }

    #[test]
    fn length_limits_apply_after_trimming_and_to_the_raw_input() {
        let exactly_64 = format!("3.8.0-{}", "a".repeat(58));
        assert_eq!(exactly_64.len(), MAX_VERSION_LEN);
        assert_eq!(v(&exactly_64).pre().len(), 58);
        assert_eq!(v(&exactly_64).to_string(), exactly_64);

        let exactly_65 = format!("3.8.0-{}", "a".repeat(59));
        assert_eq!(
            FirmwareVersion::parse(&exactly_65),
            Err(ParseError::TooLong)
        );

        // Whitespace does not count, up to the raw limit.
        let padded = format!("{0}{exactly_64}{0}", " ".repeat(20));
        assert_eq!(v(&padded), v(&exactly_64));
        let raw_limit = format!("{exactly_64}{}", " ".repeat(MAX_RAW_INPUT_LEN - 64));
        assert_eq!(raw_limit.len(), MAX_RAW_INPUT_LEN);
        assert!(FirmwareVersion::parse(&raw_limit).is_ok());
        let over_raw_limit = format!("{raw_limit} ");
        assert_eq!(
            FirmwareVersion::parse(&over_raw_limit),
            Err(ParseError::TooLong)
        );
        let huge_whitespace = " ".repeat(1_000_000);
        assert_eq!(
            FirmwareVersion::parse(&huge_whitespace),
            Err(ParseError::TooLong)
        );
        let huge = "9".repeat(1_000_000);
        assert_eq!(FirmwareVersion::parse(&huge), Err(ParseError::TooLong));

        // A short input whose normalised form would not fit.
        let short_core = format!("3{}", "b".repeat(59)); // 60 bytes, 3.0.0-bbb… is 65
        assert_eq!(
            FirmwareVersion::parse(&short_core),
            Err(ParseError::NormalisedTooLong)
        );
        let short_core_fits = format!("3{}", "b".repeat(58)); // normalises to exactly 64
        assert_eq!(v(&short_core_fits).to_string().len(), 64);
    }

    #[test]
    fn error_messages_are_short_and_precise() {
        assert_eq!(ParseError::Empty.to_string(), "empty version");
        assert_eq!(ParseError::TooLong.to_string(), "longer than 64 bytes");
        assert!(ParseError::BadCore.to_string().contains("MAJOR"));
        assert!(ParseError::BadPreRelease
            .to_string()
            .contains("pre-release"));
        assert!(ParseError::BadBuild.to_string().contains("build metadata"));
    }

    #[test]
    fn details_report_partial_cores_and_build_metadata() {
        let (_, d) = FirmwareVersion::parse_with_details("3.8").unwrap();
        assert_eq!(
            d,
            ParseDetails {
                core_components: 2,
                had_build_metadata: false
            }
        );
        let (_, d) = FirmwareVersion::parse_with_details("v3+b").unwrap();
        assert_eq!(d.core_components, 1);
        assert!(d.had_build_metadata);
        let (_, d) = FirmwareVersion::parse_with_details("3.8.0b1").unwrap();
        assert_eq!(d.core_components, 3);
    }

    #[test]
    fn display_is_the_normalised_form() {
        let cases = [
            ("v03.8b3+x", "3.8.0-b3"),
            ("3", "3.0.0"),
            ("3.8.0rc1.2", "3.8.0-rc1.2"),
            ("3.8.0-b03", "3.8.0-b03"),
            (" V1.2.3 ", "1.2.3"),
        ];
        for (text, shown) in cases {
            assert_eq!(v(text).to_string(), shown);
            assert_eq!(v(shown), v(text));
        }
        assert_eq!(format!("{:?}", v("3.8b3")), "FirmwareVersion(3.8.0-b3)");
        assert_eq!(FirmwareVersion::new(1, 2, 3).to_string(), "1.2.3");
        assert_eq!(FirmwareVersion::MIN.to_string(), "0.0.0-0");
        assert_eq!("3.8".parse::<FirmwareVersion>(), Ok(v("3.8.0")));
    }

    #[test]
    fn equality_and_hash_are_structural_and_ignore_build_metadata() {
        assert_eq!(v("3.8"), v("3.8.0"));
        assert_eq!(v("3.8"), v("v3.8.0+abc"));
        assert_eq!(v("03.8"), FirmwareVersion::new(3, 8, 0));
        assert_eq!(v("3.8.0b3"), v("3.8.0-b3+x.y"));
        assert_ne!(v("3.8.0-b03"), v("3.8.0-b3"));
        assert_ne!(v("3.8.0-b3"), v("3.8.0"));
        let set: HashSet<FirmwareVersion> = ["3.8", "3.8.0", "v3.8.0+a", "3.8.0-b3", "3.8b3"]
            .iter()
            .map(|t| v(t))
            .collect();
        assert_eq!(set.len(), 2);
        assert!(!v("3.8.0").is_prerelease());
        assert!(v("3.8.0-0").is_prerelease());
    }

    #[test]
    fn firmware_ordering_matches_the_product_examples() {
        assert_strictly_increasing(
            &[
                "3.8.0-b3",
                "3.8.0-b4",
                "3.8.0-b10",
                "3.8.0-rc1",
                "3.8.0",
                "3.8.1-b1",
                "3.9.0-b1",
                "4.0.0",
            ],
            FIRMWARE,
        );
        assert_strictly_increasing(&["3.8.0-b3", "3.8.0-b10"], FIRMWARE);
        assert_strictly_increasing(&["3.8.0-rc1", "3.8.0-rc2"], FIRMWARE);
        assert_strictly_increasing(&["3.8.0-b9", "3.8.0-rc1"], FIRMWARE);
        assert_strictly_increasing(&["3.8.0-b", "3.8.0-b1"], FIRMWARE);
        assert_strictly_increasing(&["3.8.0-alpha", "3.8.0-beta"], FIRMWARE);
        // Numeric identifiers: by value, and before anything with a letter or '-'.
        assert_strictly_increasing(
            &[
                "1.0.0-1", "1.0.0-2", "1.0.0-10", "1.0.0-1a", "1.0.0--", "1.0.0-a",
            ],
            FIRMWARE,
        );
        // Runs: digit run < non-digit run; shorter list of runs first.
        assert_strictly_increasing(
            &[
                "1.0.0-a",
                "1.0.0-a1",
                "1.0.0-a1b",
                "1.0.0-a2",
                "1.0.0-a10",
                "1.0.0-a10-1",
                "1.0.0-ab",
                "1.0.0-b",
            ],
            FIRMWARE,
        );
        assert_strictly_increasing(&["1.0.0-1x", "1.0.0-2x", "1.0.0-10x", "1.0.0-x"], FIRMWARE);
        // Identifier lists.
        assert_strictly_increasing(
            &[
                "3.8.0-b3",
                "3.8.0-b3.1",
                "3.8.0-b3.2",
                "3.8.0-b3.a",
                "3.8.0-b4",
            ],
            FIRMWARE,
        );
        // The SemVer spec example holds in firmware mode too (no mixed runs in it).
        assert_strictly_increasing(SEMVER_SPEC_EXAMPLE, FIRMWARE);
    }

    const SEMVER_SPEC_EXAMPLE: &[&str] = &[
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
    ];

    #[test]
    fn semver_ordering_is_strict_semver_precedence() {
        assert_strictly_increasing(SEMVER_SPEC_EXAMPLE, SEMVER);
        assert_strictly_increasing(&["3.8.0-b10", "3.8.0-b3"], SEMVER);
        assert_strictly_increasing(&["3.8.0-B3", "3.8.0-b10"], SEMVER); // ASCII: uppercase first
        assert_strictly_increasing(&["1.0.0-2", "1.0.0-10", "1.0.0-1a", "1.0.0-a"], SEMVER);
        // A shorter identifier list wins before later identifiers are looked at.
        assert_strictly_increasing(&["1.0.0-a", "1.0.0-a.b", "1.0.0-a-b"], SEMVER);
        assert_strictly_increasing(
            &[
                "1.9.0",
                "1.10.0",
                "1.11.0",
                "2.0.0-0",
                "2.0.0-rc.1",
                "2.0.0",
                "2.0.1",
            ],
            SEMVER,
        );
        // SemVer §11 example for cores: 1.0.0 < 2.0.0 < 2.1.0 < 2.1.1.
        assert_strictly_increasing(&["1.0.0", "2.0.0", "2.1.0", "2.1.1"], SEMVER);
        // Where the two orderings disagree.
        let b3 = v("3.8.0-b3");
        let b10 = v("3.8.0-b10");
        assert_eq!(b3.cmp_with(&b10, FIRMWARE), Ordering::Less);
        assert_eq!(b3.cmp_with(&b10, SEMVER), Ordering::Greater);
    }

    #[test]
    fn core_is_numeric_and_leading_zeros_in_it_are_equal() {
        for ordering in VersionOrdering::ALL {
            assert_eq!(v("03.8.0").cmp_with(&v("3.8.0"), ordering), Ordering::Equal);
            assert_eq!(
                v("3.8.00-b1").cmp_with(&v("3.8.0-b1"), ordering),
                Ordering::Equal
            );
            assert_strictly_increasing(&["3.9.0", "3.10.0", "10.0.0"], ordering);
        }
    }

    #[test]
    fn leading_zeros_in_pre_releases_tie_break_on_bytes() {
        for ordering in VersionOrdering::ALL {
            // Equal precedence, different spelling: the bytes decide, never Equal.
            assert_strictly_increasing(&["3.8.0-b03", "3.8.0-b3"], ordering);
            assert_strictly_increasing(&["3.8.0-03", "3.8.0-3"], ordering);
            assert_strictly_increasing(&["3.8.0-0", "3.8.0-00", "3.8.0-000"], ordering);
            // The tie-break is a last resort: a later identifier decides first.
            assert_strictly_increasing(&["3.8.0-3.1", "3.8.0-03.2"], ordering);
            // Leading zeros never change precedence against other values.
            assert_strictly_increasing(&["3.8.0-2", "3.8.0-03", "3.8.0-3", "3.8.0-4"], ordering);
        }
        assert_strictly_increasing(&["3.8.0-b2", "3.8.0-b03", "3.8.0-b3", "3.8.0-b4"], FIRMWARE);
        assert_strictly_increasing(&["3.8.0-b01x", "3.8.0-b1x", "3.8.0-b1y"], FIRMWARE);
    }

    #[test]
    fn huge_numeric_identifiers_compare_without_overflow() {
        let big = "99999999999999999999999999999";
        let bigger = "100000000000000000000000000000";
        for ordering in VersionOrdering::ALL {
            let a = v(&format!("1.0.0-{big}"));
            let b = v(&format!("1.0.0-{bigger}"));
            assert_eq!(a.cmp_with(&b, ordering), Ordering::Less);
            assert_eq!(b.cmp_with(&a, ordering), Ordering::Greater);
            let padded = v(&format!("1.0.0-000{big}"));
            assert_eq!(padded.cmp_with(&b, ordering), Ordering::Less);
            assert_eq!(padded.cmp_with(&a, ordering), Ordering::Less); // tie-break
        }
        let a = v(&format!("1.0.0-b{big}"));
        let b = v(&format!("1.0.0-b{bigger}"));
        assert_eq!(a.cmp_with(&b, FIRMWARE), Ordering::Less);
        assert_eq!(a.cmp_with(&b, SEMVER), Ordering::Greater); // '9' > '1'
        assert_strictly_increasing(
            &[
                "18446744073709551615.0.0",
                "18446744073709551615.18446744073709551615.18446744073709551615",
            ],
            FIRMWARE,
        );
    }

    /// Pre-releases chosen to probe the bottom of a core's pre-release order.
    const LOW_PRE_RELEASES: &[&str] = &[
        "0", "00", "000", "0.0", "00.0", "0.00", "0.a", "0a", "0-", "1", "01", "-", "--", "-0",
        "A", "a", "a0", "b1", "rc1", "0.0.0",
    ];

    #[test]
    fn lowest_of_core_is_below_every_version_of_its_core_in_both_orderings() {
        for ordering in VersionOrdering::ALL {
            let lowest = FirmwareVersion::lowest_of_core(3, 8, 0);
            assert_eq!(lowest, v("3.8.0-0"));
            for pre in LOW_PRE_RELEASES {
                let other = v(&format!("3.8.0-{pre}"));
                let expected = if other == lowest {
                    Ordering::Equal
                } else {
                    Ordering::Less
                };
                assert_eq!(
                    lowest.cmp_with(&other, ordering),
                    expected,
                    "{ordering} {pre}"
                );
            }
            assert_eq!(lowest.cmp_with(&v("3.8.0"), ordering), Ordering::Less);
            // Everything of the previous cores is below it.
            for below in [
                "3.7.18446744073709551615",
                "3.7.99",
                "2.99.99",
                "3.7.99-rc1",
            ] {
                assert_eq!(v(below).cmp_with(&lowest, ordering), Ordering::Less);
            }
            assert_eq!(
                FirmwareVersion::MIN.cmp_with(&v("0.0.0-00"), ordering),
                Ordering::Less
            );
            assert_eq!(
                FirmwareVersion::MAX.cmp_with(
                    &v("18446744073709551615.18446744073709551615.18446744073709551615-z"),
                    ordering
                ),
                Ordering::Greater
            );
        }
    }

    #[test]
    fn ordering_names_round_trip() {
        assert_eq!(VersionOrdering::default(), VersionOrdering::Firmware);
        for ordering in VersionOrdering::ALL {
            assert_eq!(ordering.as_str().parse::<VersionOrdering>(), Ok(ordering));
            assert_eq!(ordering.to_string(), ordering.as_str());
        }
        assert_eq!(" SemVer ".parse::<VersionOrdering>(), Ok(SEMVER));
        let err = "cargo".parse::<VersionOrdering>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown version ordering `cargo`: expected `firmware` or `semver`"
        );
    }

    /// Pre-releases for the exhaustive grid: collisions, leading zeros, mixed runs.
    const GRID_PRE_RELEASES: &[&str] = &[
        "", "b1", "b2", "b3", "b10", "rc1", "rc2", "alpha", "0", "1", "10", "b3.1", "b03", "01",
        "00", "0.0", "b1.0", "rc1-x", "-", "B3", "b", "beta.2", "beta.11", "1a", "a1b", "-1",
    ];

    fn grid() -> Vec<FirmwareVersion> {
        let mut out = Vec::new();
        for major in 0..3 {
            for minor in 0..3 {
                for patch in 0..2 {
                    for pre in GRID_PRE_RELEASES {
                        let text = if pre.is_empty() {
                            format!("{major}.{minor}.{patch}")
                        } else {
                            format!("{major}.{minor}.{patch}-{pre}")
                        };
                        out.push(v(&text));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn canonical_spelling_folds_case_and_leading_zeros_under_firmware_only() {
        for (written, canonical) in [
            ("3.8.0-B3", "3.8.0-b3"),
            ("3.8.0-b03", "3.8.0-b3"),
            ("3.8.0-RC1", "3.8.0-rc1"),
            ("V3.8.0-B10", "3.8.0-b10"),
            ("3.8.0-00", "3.8.0-0"),
            ("3.8.0-0", "3.8.0-0"),
            ("3.8.0-b3.007", "3.8.0-b3.7"),
            ("3.8.0-Rc-01X", "3.8.0-rc-1x"),
            ("3.8.0-b0a00", "3.8.0-b0a0"),
            ("3.8.0-b10", "3.8.0-b10"),
            ("3.8.0", "3.8.0"),
        ] {
            let version = v(written).canonical(FIRMWARE);
            assert_eq!(version.to_string(), canonical, "{written}");
            assert!(version.is_canonical(FIRMWARE), "{written}");
            assert_eq!(
                version.canonical(FIRMWARE),
                version,
                "idempotent: {written}"
            );
            // semver keeps the text: RC1 and rc1 differ there (ASCII precedence).
            assert_eq!(v(written).canonical(SEMVER), v(written), "{written}");
        }
        assert!(!v("3.8.0-RC1").is_canonical(FIRMWARE));
        assert!(v("3.8.0-RC1").is_canonical(SEMVER));
    }

    #[test]
    fn exhaustive_grid_is_totally_ordered_in_both_orderings() {
        let versions = grid();
        for ordering in VersionOrdering::ALL {
            let mut sorted = versions.clone();
            sorted.sort_by(|a, b| a.cmp_with(b, ordering));
            for pair in sorted.windows(2) {
                assert!(oracle::key(&pair[0], ordering) < oracle::key(&pair[1], ordering));
            }
            // Pairwise consistency with one linear order proves antisymmetry and transitivity
            // on this set; Equal only on the diagonal proves consistency with ==.
            for (i, a) in sorted.iter().enumerate() {
                for (j, b) in sorted.iter().enumerate() {
                    assert_eq!(a.cmp_with(b, ordering), i.cmp(&j), "{ordering}: {a} vs {b}");
                    assert_eq!(a == b, i == j);
                }
            }
        }
    }

    fn pre_release_strategy() -> impl Strategy<Value = String> {
        // Small alphabets so that equal runs, prefixes and leading zeros all happen.
        prop::collection::vec("[0-2]{1,3}|[ab-]{1,2}|[ab]?[0-2]{1,2}[ab]?|0[0-9]", 1..4)
            .prop_map(|identifiers| identifiers.join("."))
    }

    fn version_strategy() -> impl Strategy<Value = FirmwareVersion> {
        (
            0u64..3,
            0u64..3,
            0u64..2,
            prop::option::of(pre_release_strategy()),
        )
            .prop_map(|(major, minor, patch, pre)| {
                let text = match pre {
                    Some(pre) => format!("{major}.{minor}.{patch}-{pre}"),
                    None => format!("{major}.{minor}.{patch}"),
                };
                v(&text)
            })
    }

    /// An independent statement of both orderings as derived `Ord` on sort keys, used as the
    /// oracle for `cmp_with`. Variant order encodes "numeric before non-numeric" and "a
    /// pre-release before its release"; `Vec` order encodes "a prefix sorts first"; digit
    /// strings become (length without leading zeros, digits); the raw bytes break ties last.
    mod oracle {
        use super::*;

        #[derive(PartialEq, Eq, PartialOrd, Ord, Debug)]
        pub(super) enum Run {
            Digits(usize, Vec<u8>),
            Text(Vec<u8>),
        }

        #[derive(PartialEq, Eq, PartialOrd, Ord, Debug)]
        pub(super) enum Identifier {
            Numeric(usize, Vec<u8>),
            Natural(Vec<Run>),
            Ascii(Vec<u8>),
        }

        #[derive(PartialEq, Eq, PartialOrd, Ord, Debug)]
        pub(super) enum Pre {
            Some(Vec<Identifier>),
            Release,
        }

        fn digits(text: &[u8]) -> (usize, Vec<u8>) {
            let value: Vec<u8> = text.iter().copied().skip_while(|&b| b == b'0').collect();
            (value.len(), value)
        }

        fn runs(text: &[u8]) -> Vec<Run> {
            text.chunk_by(|a, b| a.is_ascii_digit() == b.is_ascii_digit())
                .map(|run| {
                    if run[0].is_ascii_digit() {
                        let (len, value) = digits(run);
                        Run::Digits(len, value)
                    } else {
                        Run::Text(run.to_vec())
                    }
                })
                .collect()
        }

        pub(super) fn key(
            version: &FirmwareVersion,
            ordering: VersionOrdering,
        ) -> (u64, u64, u64, Pre, Vec<u8>) {
            let raw = version.pre().as_bytes().to_vec();
            let pre = if raw.is_empty() {
                Pre::Release
            } else {
                Pre::Some(
                    raw.split(|&b| b == b'.')
                        .map(|id| {
                            if id.iter().all(u8::is_ascii_digit) {
                                let (len, value) = digits(id);
                                Identifier::Numeric(len, value)
                            } else if ordering == VersionOrdering::Firmware {
                                Identifier::Natural(runs(id))
                            } else {
                                Identifier::Ascii(id.to_vec())
                            }
                        })
                        .collect(),
                )
            };
            (version.major(), version.minor(), version.patch(), pre, raw)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn cmp_with_matches_the_sort_key_oracle(a in version_strategy(), b in version_strategy()) {
            for ordering in VersionOrdering::ALL {
                prop_assert_eq!(
                    a.cmp_with(&b, ordering),
                    oracle::key(&a, ordering).cmp(&oracle::key(&b, ordering)),
                    "{} {} vs {}", ordering, a, b
                );
            }
        }

        #[test]
        fn cmp_with_is_a_total_order_consistent_with_eq(
            a in version_strategy(),
            b in version_strategy(),
            c in version_strategy(),
        ) {
            for ordering in VersionOrdering::ALL {
                let ab = a.cmp_with(&b, ordering);
                prop_assert_eq!(ab, b.cmp_with(&a, ordering).reverse());
                prop_assert_eq!(ab == Ordering::Equal, a == b);
                prop_assert_eq!(a.cmp_with(&a, ordering), Ordering::Equal);
                let bc = b.cmp_with(&c, ordering);
                if ab != Ordering::Greater && bc != Ordering::Greater {
                    prop_assert_ne!(a.cmp_with(&c, ordering), Ordering::Greater);
                }
                if ab == Ordering::Less && bc == Ordering::Less {
                    prop_assert_eq!(a.cmp_with(&c, ordering), Ordering::Less);
                }
                // The least version of a core is below every version of that core.
                let lowest = FirmwareVersion::lowest_of_core(a.major(), a.minor(), a.patch());
                prop_assert_ne!(lowest.cmp_with(&a, ordering), Ordering::Greater);
            }
        }

        #[test]
        fn parse_never_panics_on_any_string(text in "\\PC{0,80}") {
            let _ = FirmwareVersion::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = FirmwareVersion::parse_bytes(&bytes);
        }

        #[test]
        fn parse_never_panics_on_version_like_text(
            text in "[ \tvV]{0,2}[0-9.]{0,25}[-+]?[0-9A-Za-z.+_-]{0,45}[ ]{0,2}"
        ) {
            if let Ok(version) = FirmwareVersion::parse(&text) {
                prop_assert_eq!(FirmwareVersion::parse(&version.to_string()), Ok(version));
            }
        }

        #[test]
        fn display_round_trips(
            major in any::<u64>(),
            minor in any::<u64>(),
            patch in any::<u64>(),
            pre in prop::option::of("[0-9A-Za-z-]{1,8}(\\.[0-9A-Za-z-]{1,8}){0,2}"),
            build in prop::option::of("[0-9A-Za-z-]{1,5}"),
            v_prefix in any::<bool>(),
        ) {
            let mut text = format!("{}{major}.{minor}.{patch}", if v_prefix { "v" } else { "" });
            if let Some(pre) = &pre {
                text.push('-');
                text.push_str(pre);
            }
            if let Some(build) = &build {
                text.push('+');
                text.push_str(build);
            }
            match FirmwareVersion::parse(&text) {
                Ok(version) => {
                    prop_assert_eq!(version.major(), major);
                    prop_assert_eq!(version.pre(), pre.as_deref().unwrap_or(""));
                    let shown = version.to_string();
                    prop_assert!(shown.len() <= MAX_VERSION_LEN);
                    prop_assert_eq!(FirmwareVersion::parse(&shown), Ok(version));
                }
                Err(e) => prop_assert!(
                    matches!(e, ParseError::TooLong | ParseError::NormalisedTooLong),
                    "{text:?}: {e}"
                ),
            }
        }
    }
}
