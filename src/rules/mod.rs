//! The rules in force: what each firmware version is allowed to do.
//!
//! A [`RuleSet`] is compiled once per load (see [`file`]) and never mutated; reloads swap a whole
//! new one in. Deciding is: missing/unparseable versions go to their defaults; a parsed version
//! is looked up in a [`index::VersionIndex`] (a binary search over the rules' interval endpoints,
//! independent of the number of rules), and the first matching enforced rule wins, in file order.
//! Shadow-mode rules never change a decision: the first one that matches is recorded (counted
//! and logged as what it would have done) and evaluation goes on as if it were absent.

pub mod file;
pub mod index;
pub mod range;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;

use crate::extract::{Extractor, Found, HeaderSource};
use crate::limits::LimitState;
use crate::metrics::{DecisionKind, RuleCounters, RuleHealth};
use crate::version::{FirmwareVersion, VersionOrdering};
use index::VersionIndex;
use range::VersionRange;

/// Status of a refusal when a rule does not set one.
pub const DEFAULT_DENY_STATUS: StatusCode = StatusCode::FORBIDDEN;
/// Body of a refusal when a rule does not set one.
pub const DEFAULT_DENY_BODY: &str = "firmware version refused\n";
/// How long `close_existing` spreads closures when a rule sets no `drain`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// What to do with a connection.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward it.
    Allow,
    /// Refuse it without contacting the backend.
    Deny(Refusal),
    /// Admit it within a rate and/or concurrency limit; over it, refuse (429 by default).
    Limit(LimitAction),
}

impl Action {
    /// The decisions a decider with this action can be counted under, and whether it admits
    /// connections: a shadow rule only ever counts `shadow_*` (it never decides), an enforced
    /// one what its action does. For [`crate::metrics::Metrics::rule_counters_for`].
    pub fn possible_decisions(&self, shadow: bool) -> (&'static [DecisionKind], bool) {
        match (self, shadow) {
            (Action::Deny(_), true) => (&[DecisionKind::shadow_deny], false),
            (_, true) => (&[DecisionKind::shadow_allow], false),
            (Action::Allow, false) => (&[DecisionKind::allow], true),
            (Action::Deny(_), false) => (&[DecisionKind::deny], false),
            (Action::Limit(_), false) => (&[DecisionKind::allow, DecisionKind::limited], true),
        }
    }
}

/// A rule's `limit` action: the shared limiter state and how to refuse when over it.
#[derive(Debug, Clone)]
pub struct LimitAction {
    /// Buckets and open-connection count, kept across reloads by rule name.
    pub state: Arc<LimitState>,
    /// Status and body when over the limit; `retry_after` is the base used for a concurrency
    /// cap (a rate limit computes its own from the limiter).
    pub refusal: Refusal,
}

impl Action {
    /// `"allow"` or `"deny"`, as written in the files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny(_) => "deny",
            Action::Limit(_) => "limit",
        }
    }
}

/// How to refuse: a static response, built without allocation beyond the header map.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Response status (4xx or 5xx).
    pub status: StatusCode,
    /// Response body (shared, never copied).
    pub body: Bytes,
    /// Base `Retry-After`, if any.
    pub retry_after: Option<Duration>,
    /// Spread of `Retry-After`: the value is uniform in `base × (1 ± jitter)`, so a refused
    /// fleet does not come back in one wave.
    pub jitter: f64,
}

impl Refusal {
    /// A refusal with the default status and body.
    pub fn default_deny() -> Refusal {
        Refusal {
            status: DEFAULT_DENY_STATUS,
            body: Bytes::from_static(DEFAULT_DENY_BODY.as_bytes()),
            retry_after: None,
            jitter: 0.0,
        }
    }

    /// The jittered `Retry-After` in whole seconds (at least 1), if one is configured.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|base| jittered_secs(base, self.jitter))
    }
}

/// `base` spread uniformly over `base × (1 ± jitter)`, in whole seconds, at least 1.
pub fn jittered_secs(base: Duration, jitter: f64) -> u64 {
    let spread = if jitter > 0.0 {
        1.0 + jitter * (fastrand::f64() * 2.0 - 1.0)
    } else {
        1.0
    };
    (base.as_secs_f64() * spread).round().max(1.0) as u64
}

/// A wait that must not be shortened (a limiter's next admission): `wait` rounded up, then
/// spread upwards only, over `wait × (1 + jitter)`.
pub fn jittered_wait_secs(wait: Duration, jitter: f64) -> u64 {
    let base = wait.as_secs_f64().ceil().max(1.0);
    (base * (1.0 + jitter.max(0.0) * fastrand::f64())).ceil() as u64
}

impl Refusal {
    /// The same refusal with a computed `Retry-After` (seconds) instead of the configured one.
    pub fn with_retry_after_secs(&self, secs: u64) -> Refusal {
        Refusal {
            retry_after: Some(Duration::from_secs(secs)),
            jitter: 0.0,
            ..self.clone()
        }
    }
}

/// Whether a rule acts or only reports what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The rule decides.
    Enforce,
    /// The rule is counted and logged when it matches; the decision ignores it.
    Shadow,
}

impl Mode {
    /// `"enforce"` or `"shadow"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// Anything that can make a decision (a rule, a default, a kill-switch entry): a name for logs
/// and metrics, an action, and its pre-resolved counters.
#[derive(Debug, Clone)]
pub struct Decider {
    /// Rule name, `default`, `missing`, `unparseable` or `killswitch:<id>`.
    pub name: Arc<str>,
    /// What it does.
    pub action: Action,
    /// Its metrics, resolved at compile time.
    pub counters: RuleCounters,
    /// Whether open connections it refuses after a change are closed.
    pub close_existing: bool,
    /// Over how long those closures are spread.
    pub drain: Duration,
    /// Backend-health metrics of what it admits; None for deciders that only refuse.
    pub health: Option<Arc<RuleHealth>>,
}

/// One `[[rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name, action and counters.
    pub decider: Decider,
    /// The versions it applies to.
    pub range: VersionRange,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Extra condition: the request path starts with this.
    pub path_prefix: Option<Box<str>>,
    /// 1-based line in the rules file, for `explain` and `/v1/rules`.
    pub line: usize,
}

impl Rule {
    /// Whether a match on this rule ends the search (enforced, no extra condition).
    pub fn is_terminal(&self) -> bool {
        self.mode == Mode::Enforce && self.path_prefix.is_none()
    }

    fn applies_to_path(&self, path: &str) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|prefix| path.starts_with(prefix))
    }
}

/// The version of one request, as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionInput {
    /// No source yielded a value.
    Missing,
    /// A value was found but is not a version.
    Unparseable,
    /// A version.
    Parsed(FirmwareVersion),
}

impl VersionInput {
    /// Parses what extraction found, in the spelling decisions use under `ordering`
    /// ([`FirmwareVersion::canonical`]): every version that reaches a decision goes through here.
    pub fn from_found(found: Option<&Found<'_>>, ordering: VersionOrdering) -> VersionInput {
        match found {
            None => VersionInput::Missing,
            Some(f) => match f.parse_version() {
                Ok(v) => VersionInput::Parsed(v.canonical(ordering)),
                Err(_) => VersionInput::Unparseable,
            },
        }
    }

    /// A version written as text (an operator's input, a test), as [`VersionInput::from_found`]
    /// would take it from the wire.
    pub fn from_text(text: &str, ordering: VersionOrdering) -> VersionInput {
        match FirmwareVersion::parse(text) {
            Ok(v) => VersionInput::Parsed(v.canonical(ordering)),
            Err(_) => VersionInput::Unparseable,
        }
    }
}

/// Why a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// A kill-switch entry.
    KillSwitch,
    /// A rule, by position.
    Rule(usize),
    /// No rule matched.
    Default,
    /// No version was found.
    Missing,
    /// The version could not be parsed.
    Unparseable,
}

/// The decision for one request: borrowed from the rule set (and kill switch), never allocated.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    /// Who decided (name, action, counters).
    pub decider: &'a Decider,
    /// What kind of decider it is.
    pub by: DecidedBy,
    /// The first shadow rule that matched, if any: what it would have done is reported.
    pub shadow: Option<&'a Decider>,
}

impl Decision<'_> {
    /// Whether the connection is forwarded (a `limit` rule admits within its limit).
    pub fn admits(&self) -> bool {
        !matches!(self.decider.action, Action::Deny(_))
    }
}

/// The defaults: what happens when no rule decides.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// No rule matched.
    pub no_match: Decider,
    /// No version found.
    pub missing: Decider,
    /// Version found but unparseable.
    pub unparseable: Decider,
}

/// Where a rule set came from, for `/v1/rules` and logs.
#[derive(Debug, Clone)]
pub struct RuleSetSource {
    /// The rules file (None: embedded default).
    pub path: Option<PathBuf>,
    /// FNV-1a 64 of the file content, hex: reloads with an unchanged hash are skipped.
    pub content_hash: String,
    /// When it was compiled.
    pub loaded_at: SystemTime,
    /// Monotonic generation within this process.
    pub generation: u64,
    /// The file's text, for the diff against the next generation.
    pub text: Arc<str>,
}

/// A compiled, immutable rule set.
#[derive(Debug)]
pub struct RuleSet {
    /// Where to find the firmware version.
    pub version_sources: Extractor,
    /// Where to find the device id.
    pub device_sources: Extractor,
    /// How versions are ordered.
    pub ordering: VersionOrdering,
    /// The defaults.
    pub defaults: Defaults,
    /// The rules in file order.
    pub rules: Vec<Rule>,
    /// Binary-search index over the rules' ranges.
    pub index: VersionIndex,
    /// Provenance.
    pub source: RuleSetSource,
    /// Non-fatal findings (e.g. a bare `3.8` that means exactly 3.8.0), shown by `check`.
    pub warnings: Vec<String>,
    /// Every header a version or device-id source reads: a request whose `Connection` header
    /// names one is refused, as hop-by-hop removal would take it from the backend.
    pub source_headers: Vec<http::HeaderName>,
}

impl RuleSet {
    /// Decides one request. Cost: one binary search plus a scan of the (few) conditional
    /// candidates covering this version; no allocation.
    pub fn decide(&self, version: &VersionInput, path: &str) -> Decision<'_> {
        let v = match version {
            VersionInput::Missing => return self.default_decision(DecidedBy::Missing, None),
            VersionInput::Unparseable => {
                return self.default_decision(DecidedBy::Unparseable, None)
            }
            VersionInput::Parsed(v) => v,
        };
        let mut shadow = None;
        for &i in self.index.candidates(v) {
            let Some(rule) = self.rules.get(i as usize) else {
                continue;
            };
            if !rule.applies_to_path(path) {
                continue;
            }
            if rule.mode == Mode::Shadow {
                shadow.get_or_insert(&rule.decider);
                continue;
            }
            return Decision {
                decider: &rule.decider,
                by: DecidedBy::Rule(i as usize),
                shadow,
            };
        }
        self.default_decision(DecidedBy::Default, shadow)
    }

    fn default_decision<'a>(&'a self, by: DecidedBy, shadow: Option<&'a Decider>) -> Decision<'a> {
        let decider = match by {
            DecidedBy::Missing => &self.defaults.missing,
            DecidedBy::Unparseable => &self.defaults.unparseable,
            _ => &self.defaults.no_match,
        };
        Decision {
            decider,
            by,
            shadow,
        }
    }

    /// The first header this rule set decides on that the request's `Connection` header
    /// names, if any. One pass over `Connection`'s tokens; most requests name none.
    pub fn source_header_in_connection<H: HeaderSource + ?Sized>(
        &self,
        headers: &H,
    ) -> Option<&http::HeaderName> {
        let mut named = None;
        headers.each_value(&http::header::CONNECTION, |value| {
            named = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .find_map(|token| {
                    self.source_headers
                        .iter()
                        .find(|h| h.as_str().as_bytes().eq_ignore_ascii_case(token))
                });
            named.is_none()
        });
        named
    }

    /// The rule at `index`, when a decision names one.
    pub fn rule(&self, by: DecidedBy) -> Option<&Rule> {
        match by {
            DecidedBy::Rule(i) => self.rules.get(i),
            _ => None,
        }
    }
}

/// FNV-1a 64-bit hash in hex: enough to tell whether a file changed (not a security hash).
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
