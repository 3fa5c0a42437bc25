//! The rules file (`rules.toml`): what operators edit and fwgate hot-reloads.
//!
//! [`compile`] turns the text into a [`RuleSet`] or into every problem found, each with
//! file:line:column. Structural problems (unknown keys, wrong types) come from serde with
//! `deny_unknown_fields`; semantic ones (bad ranges, duplicate names, bad regexes, bad
//! statuses) are collected together so one edit can fix them all.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::HeaderName;
use http::StatusCode;
use serde::Deserialize;
use toml::Spanned;

use super::index::VersionIndex;
use super::range::VersionRange;
use super::{
    content_hash, Action, Decider, Defaults, LimitAction, Mode, Refusal, Rule, RuleSet,
    RuleSetSource, DEFAULT_DRAIN,
};
use crate::diag::{FileError, FileErrors};
use crate::duration::parse_duration;
use crate::extract::{Extractor, Pattern, Source};
use crate::limits::{LimitKey, LimitSpec, LimitStore, Rate};
use crate::metrics::Metrics;
use crate::version::VersionOrdering;
use std::num::NonZeroU32;

/// The rules fwgate uses without a rules file: admit everything, whatever the version.
pub const EMBEDDED_RULES: &str = r#"# built-in default rules: admit everything
[version]
sources = [ { header = "x-firmware-version" } ]
[defaults]
action = "allow"
missing = "allow"
unparseable = "allow"
"#;

/// Longest rule name (it becomes a metric label and a log field).
pub const MAX_RULE_NAME_LEN: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    version: RawVersion,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    sources: Option<Vec<Spanned<RawSource>>>,
    device_id: Option<Vec<Spanned<RawSource>>>,
    ordering: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    header: Option<Spanned<String>>,
    pattern: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    action: Option<Spanned<String>>,
    missing: Option<Spanned<String>>,
    unparseable: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
    body: Option<String>,
    retry_after: Option<Spanned<String>>,
    jitter: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    versions: Spanned<String>,
    action: Spanned<String>,
    status: Option<Spanned<i64>>,
    retry_after: Option<Spanned<String>>,
    jitter: Option<Spanned<f64>>,
    body: Option<String>,
    mode: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    close_existing: Option<bool>,
    drain: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    key: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

/// Reads and compiles a rules file.
pub fn load(path: &Path, metrics: &Metrics, generation: u64) -> Result<RuleSet, FileErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FileError::whole(path, format!("cannot read rules file: {e}")))?;
    compile(&text, Some(path), metrics, generation)
}

/// Compiles rules text. `path` is used in messages and recorded as the source. Limit state is
/// fresh (use [`compile_with_limits`] to keep it across reloads).
pub fn compile(
    text: &str,
    path: Option<&Path>,
    metrics: &Metrics,
    generation: u64,
) -> Result<RuleSet, FileErrors> {
    compile_with_limits(text, path, metrics, &LimitStore::default(), generation)
}

/// Compiles rules text, taking `limit` state from `limits` so that unchanged limits keep their
/// buckets and open-connection counts across a reload.
pub fn compile_with_limits(
    text: &str,
    path: Option<&Path>,
    metrics: &Metrics,
    limits: &LimitStore,
    generation: u64,
) -> Result<RuleSet, FileErrors> {
    let shown = path.unwrap_or(Path::new("<embedded rules.toml>"));
    if text.trim().is_empty() {
        // Also what a reload sees in the middle of an in-place save (truncate, then write):
        // applying it would admit everything for a moment.
        return Err(FileError::whole(
            shown,
            "rules file is empty (a save in progress?); to run with no rules, write at least a comment",
        )
        .into());
    }
    let raw: RawRules = toml::from_str(text).map_err(|e| FileError::from_toml(shown, text, &e))?;
    let mut c = Compiler {
        path: shown,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    let ordering = match &raw.version.ordering {
        None => VersionOrdering::Firmware,
        Some(s) => match s.get_ref().as_str() {
            "firmware" => VersionOrdering::Firmware,
            "semver" => VersionOrdering::Semver,
            other => {
                c.error(
                    s.span().start,
                    format!("ordering must be \"firmware\" or \"semver\", not {other:?}"),
                );
                VersionOrdering::Firmware
            }
        },
    };
    let version_sources = match &raw.version.sources {
        None => Extractor::new(vec![Source::Header {
            name: HeaderName::from_static("x-firmware-version"),
            pattern: None,
        }]),
        Some(list) => {
            if list.is_empty() {
                c.error(0, "[version] sources is empty: list at least one source");
            }
            c.sources(list, "version")
        }
    };
    let device_sources = match &raw.version.device_id {
        None => Extractor::new(vec![Source::Header {
            name: HeaderName::from_static("x-device-id"),
            pattern: None,
        }]),
        Some(list) => c.sources(list, "id"),
    };

    let d = &raw.defaults;
    let default_refusal = c.refusal(&d.status, &d.retry_after, &d.jitter, &d.body, false);
    let mut default_decider = |name: &str, value: &Option<Spanned<String>>, fallback: &str| {
        let action = c.action(value, fallback, &default_refusal);
        let (kinds, admits) = action.possible_decisions(false);
        Decider {
            name: Arc::from(name),
            health: (!matches!(action, Action::Deny(_))).then(|| metrics.rule_health(name)),
            counters: metrics.rule_counters_for(name, kinds, admits),
            action,
            close_existing: false,
            drain: DEFAULT_DRAIN,
        }
    };
    let defaults = Defaults {
        no_match: default_decider("default", &d.action, "allow"),
        missing: default_decider("missing", &d.missing, "allow"),
        unparseable: default_decider("unparseable", &d.unparseable, "deny"),
    };

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    // Where each compiled rule starts in the file, for warnings about it.
    let mut rule_offsets = Vec::with_capacity(raw.rule.len());
    for spanned in &raw.rule {
        let r = spanned.get_ref();
        let name = r.name.get_ref();
        let reserved = ["default", "missing", "unparseable"].contains(&name.as_str())
            || name.starts_with("killswitch:");
        if name.is_empty()
            || name.len() > MAX_RULE_NAME_LEN
            || reserved
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.:".contains(ch))
        {
            c.error(r.name.span().start, format!("rule name {name:?} must be 1-{MAX_RULE_NAME_LEN} characters of letters, digits, '-', '_', '.', ':' and not a reserved name (default, missing, unparseable, killswitch:*)"));
        } else if !names.insert(name.clone()) {
            c.error(
                r.name.span().start,
                format!("duplicate rule name {name:?}: names must be unique (they label metrics and logs)"),
            );
        }
        let range = c.range(name, &r.versions, ordering);
        let is_limit = r.action.get_ref() == "limit";
        let mut refusal = c.refusal(&r.status, &r.retry_after, &r.jitter, &r.body, is_limit);
        let action = if is_limit {
            if r.status.is_none() {
                refusal.status = StatusCode::TOO_MANY_REQUESTS;
            }
            if r.body.is_none() {
                refusal.body = Bytes::from_static(
                    b"too many connections for this firmware version, retry later\n",
                );
            }
            if r.jitter.is_none() {
                refusal.jitter = 0.5;
            }
            c.limit(name, r, refusal, limits)
        } else {
            for (present, key) in [
                (r.rate.as_ref().map(|x| x.span().start), "rate"),
                (r.burst.as_ref().map(|x| x.span().start), "burst"),
                (r.key.as_ref().map(|x| x.span().start), "key"),
                (
                    r.max_connections.as_ref().map(|x| x.span().start),
                    "max_connections",
                ),
            ] {
                if let Some(offset) = present {
                    c.error(offset, format!("{key} only applies to action = \"limit\""));
                }
            }
            c.rule_action(&r.action, &refusal)
        };
        if matches!(action, Action::Allow)
            && (r.status.is_some() || r.retry_after.is_some() || r.body.is_some())
        {
            c.warnings.push(format!(
                "{}: rule {name:?} allows, so its status/retry_after/body are never used",
                c.pos(spanned.span().start)
            ));
        }
        let mode = match r.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => Mode::Enforce,
            Some(("shadow", _)) => Mode::Shadow,
            Some((other, span)) => {
                c.error(
                    span.start,
                    format!("mode must be \"enforce\" or \"shadow\", not {other:?}"),
                );
                Mode::Enforce
            }
        };
        let path_prefix = r.path_prefix.as_ref().map(|p| {
            if !p.get_ref().starts_with('/') {
                c.error(
                    p.span().start,
                    format!("path_prefix {:?} must start with '/'", p.get_ref()),
                );
            } else {
                let normal = crate::path::normalize(p.get_ref());
                if normal != p.get_ref().as_str() {
                    c.error(
                        p.span().start,
                        format!("path_prefix {:?} is compared with normalised request paths (no '//', '.' or '..' segments, unreserved characters decoded); write {:?}", p.get_ref(), &*normal),
                    );
                }
            }
            p.get_ref().clone().into_boxed_str()
        });
        let drain = c.duration(&r.drain).unwrap_or(DEFAULT_DRAIN);
        let (line, _) = crate::diag::line_col(text, spanned.span().start);
        if let Some(range) = range {
            rule_offsets.push(spanned.span().start);
            rules.push(Rule {
                decider: Decider {
                    name: Arc::from(name.as_str()),
                    // A shadow deny rule never decides, so it never admits either.
                    health: (!matches!(action, Action::Deny(_)) && mode == Mode::Enforce)
                        .then(|| metrics.rule_health(name)),
                    counters: {
                        let (kinds, admits) = action.possible_decisions(mode == Mode::Shadow);
                        metrics.rule_counters_for(name, kinds, admits)
                    },
                    action,
                    close_existing: r.close_existing.unwrap_or(false),
                    drain,
                },
                range,
                mode,
                path_prefix,
                line,
            });
        }
    }

    if !c.errors.is_empty() {
        return Err(FileErrors(c.errors));
    }
    let mut source_headers: Vec<HeaderName> = Vec::new();
    for source in version_sources
        .sources()
        .iter()
        .chain(device_sources.sources())
    {
        if let Source::Header { name, .. } = source {
            if !source_headers.contains(name) {
                source_headers.push(name.clone());
            }
        }
    }
    let index = VersionIndex::build(rules.iter().map(|r| (&r.range, r.is_terminal())), ordering)
        .map_err(|e| FileError::whole(shown, format!("rules cannot be indexed: {e}")))?;
    warn_about_rules_that_never_apply(&mut c, &rules, &index, &rule_offsets);
    Ok(RuleSet {
        version_sources,
        device_sources,
        ordering,
        defaults,
        rules,
        index,
        source: RuleSetSource {
            path: path.map(Path::to_path_buf),
            content_hash: content_hash(text.as_bytes()),
            text: Arc::from(text),
            loaded_at: SystemTime::now(),
            generation,
        },
        warnings: c.warnings,
        source_headers,
    })
}

/// Warns about every rule that no version can reach: each version it covers is decided first
/// by an earlier enforced rule without conditions. Such a rule never decides (or, in shadow
/// mode or with a `path_prefix`, never even matches), which is easy to miss when an earlier
/// rule is widened or switched from shadow to enforce.
fn warn_about_rules_that_never_apply(
    c: &mut Compiler<'_>,
    rules: &[Rule],
    index: &VersionIndex,
    rule_offsets: &[usize],
) {
    let reachable = index.reachable_entries();
    for (i, rule) in rules.iter().enumerate() {
        if reachable.get(i).copied().unwrap_or(true) {
            continue;
        }
        let takers: Vec<String> = rules[..i]
            .iter()
            .filter(|earlier| earlier.is_terminal() && earlier.range.overlaps(&rule.range))
            .map(|earlier| format!("{:?} (line {})", &*earlier.decider.name, earlier.line))
            .collect();
        let what = if rule.is_terminal() {
            "can never decide"
        } else {
            "can never match"
        };
        let offset = rule_offsets.get(i).copied().unwrap_or(0);
        c.warnings.push(format!(
            "{}: rule {:?} {what}: every version in {:?} is decided first by {} {}; move it above, narrow the earlier rule, or remove it",
            c.pos(offset),
            &*rule.decider.name,
            rule.range.as_str(),
            if takers.len() == 1 { "rule" } else { "rules" },
            takers.join(", "),
        ));
    }
}

/// Headers removed on every hop (RFC 9110 §7.6.1): never a source.
const HOP_BY_HOP_HEADERS: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Collects errors and warnings while compiling one file.
struct Compiler<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<FileError>,
    warnings: Vec<String>,
}

impl Compiler<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.errors
            .push(FileError::at(self.path, self.text, offset, message));
    }

    fn pos(&self, offset: usize) -> String {
        let (l, c) = crate::diag::line_col(self.text, offset);
        format!("{}:{l}:{c}", self.path.display())
    }

    fn sources(&mut self, list: &[Spanned<RawSource>], group: &str) -> Extractor {
        let mut out = Vec::new();
        for s in list {
            let raw = s.get_ref();
            if let Some(c) = &raw.client_cert {
                if raw.header.is_some() || raw.query.is_some() || c.get_ref() != "identity" {
                    self.error(
                        c.span().start,
                        "a client certificate source is { client_cert = \"identity\" } (optionally with pattern)",
                    );
                    continue;
                }
                let Ok(pattern) = self.pattern(&raw.pattern, group) else {
                    continue;
                };
                out.push(Source::ClientCert { pattern });
                continue;
            }
            match (&raw.header, &raw.query, &raw.pattern) {
                (Some(h), None, pattern) => {
                    let name = match HeaderName::from_bytes(h.get_ref().trim().as_bytes()) {
                        Ok(n) => n,
                        Err(_) => {
                            self.error(
                                h.span().start,
                                format!("{:?} is not a valid header name", h.get_ref()),
                            );
                            continue;
                        }
                    };
                    if HOP_BY_HOP_HEADERS.contains(&name.as_str()) {
                        self.error(
                            h.span().start,
                            format!("{name} is a hop-by-hop header (RFC 9110 §7.6.1), removed before the backend sees it: a version or device id cannot come from it"),
                        );
                        continue;
                    }
                    if name.as_str().contains('_') {
                        self.error(
                            h.span().start,
                            format!("{name:?}: header names with '_' are dropped before the backend (as nginx does), so they cannot be a source; use '-'"),
                        );
                        continue;
                    }
                    let Ok(pattern) = self.pattern(pattern, group) else {
                        continue;
                    };
                    out.push(Source::Header { name, pattern });
                }
                (None, Some(q), None) => {
                    if q.get_ref().is_empty() {
                        self.error(q.span().start, "query parameter name is empty");
                    }
                    out.push(Source::Query {
                        name: q.get_ref().clone().into_boxed_str(),
                    });
                }
                (None, Some(_), Some(p)) => self.error(
                    p.span().start,
                    "pattern only applies to header sources",
                ),
                _ => self.error(
                    s.span().start,
                    "a source is { header = \"name\" }, { header = \"name\", pattern = '...' }, { query = \"name\" } or { client_cert = \"identity\" }",
                ),
            }
        }
        Extractor::new(out)
    }

    /// Compiles an optional source pattern; `Err` once the error is recorded.
    fn pattern(
        &mut self,
        pattern: &Option<Spanned<String>>,
        group: &str,
    ) -> Result<Option<Pattern>, ()> {
        let Some(p) = pattern else {
            return Ok(None);
        };
        Pattern::new(p.get_ref(), group).map(Some).map_err(|e| {
            let text = e.to_string();
            let last = text.lines().last().unwrap_or("invalid regex");
            self.error(p.span().start, format!("invalid pattern: {last}"));
        })
    }

    fn range(
        &mut self,
        rule: &str,
        versions: &Spanned<String>,
        ordering: VersionOrdering,
    ) -> Option<VersionRange> {
        match VersionRange::parse(versions.get_ref(), ordering) {
            Ok(range) => {
                if range.uses_partial_bare_version() {
                    self.warnings.push(format!(
                        "{}: rule {rule:?}: versions {:?} uses a partial version without an operator, which means exactly that version (e.g. \"3.8\" is only 3.8.0); write \"3.8.*\" for the whole 3.8 line",
                        self.pos(versions.span().start),
                        versions.get_ref()
                    ));
                }
                for bound in range.pre_release_upper_bounds() {
                    let release = bound.release;
                    self.warnings.push(format!(
                        "{}: rule {rule:?}: {:?} also takes {release}'s pre-releases (e.g. {release}-b1 sorts before {release}); write \"<{release}-0\" to stop before them, or keep it if they belong to this rule",
                        self.pos(versions.span().start + bound.column),
                        bound.written,
                    ));
                }
                Some(range)
            }
            Err(e) => {
                // The span includes the opening quote; the column is 1-based within the string.
                let offset = versions.span().start + 1 + e.column.saturating_sub(1);
                self.error(
                    offset,
                    format!(
                        "rule {rule:?}: invalid versions {:?}: {}",
                        versions.get_ref(),
                        e.message
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, value: &Option<Spanned<String>>) -> Option<Duration> {
        let v = value.as_ref()?;
        match parse_duration(v.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(v.span().start, e);
                None
            }
        }
    }

    fn refusal(
        &mut self,
        status: &Option<Spanned<i64>>,
        retry_after: &Option<Spanned<String>>,
        jitter: &Option<Spanned<f64>>,
        body: &Option<String>,
        for_limit: bool,
    ) -> Refusal {
        let mut refusal = Refusal::default_deny();
        if let Some(s) = status {
            let n = *s.get_ref();
            match u16::try_from(n)
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
            {
                Some(code) if (400..=599).contains(&n) => refusal.status = code,
                _ => self.error(
                    s.span().start,
                    format!("status {n} is not a refusal: use 400-599 (e.g. 403, 429, 503)"),
                ),
            }
        }
        refusal.retry_after = self.duration(retry_after);
        if let Some(j) = jitter {
            let v = *j.get_ref();
            if (0.0..=1.0).contains(&v) {
                refusal.jitter = v;
            } else {
                self.error(
                    j.span().start,
                    format!(
                        "jitter {v} must be between 0 and 1 (0.5 spreads Retry-After over ±50%)"
                    ),
                );
            }
            if retry_after.is_none() && !for_limit {
                self.error(j.span().start, "jitter needs retry_after");
            }
        }
        if let Some(b) = body {
            let mut b = b.clone();
            if !b.ends_with('\n') {
                b.push('\n');
            }
            refusal.body = Bytes::from(b);
        }
        refusal
    }

    fn limit(&mut self, rule: &str, r: &RawRule, refusal: Refusal, limits: &LimitStore) -> Action {
        let rate = r.rate.as_ref().and_then(|x| {
            Rate::parse(x.get_ref())
                .map_err(|e| self.error(x.span().start, e))
                .ok()
        });
        let burst = r.burst.as_ref().and_then(|b| {
            let n = *b.get_ref();
            match u32::try_from(n).ok().and_then(NonZeroU32::new) {
                Some(n) => Some(n),
                None => {
                    self.error(
                        b.span().start,
                        format!("burst {n} must be a whole number from 1"),
                    );
                    None
                }
            }
        });
        let key = match r
            .key
            .as_ref()
            .map(|k| (k.get_ref().as_str(), k.span().start))
        {
            None | Some(("rule", _)) => LimitKey::Rule,
            Some(("device", _)) => LimitKey::Device,
            Some(("ip", _)) => LimitKey::Ip,
            Some((other, offset)) => {
                self.error(
                    offset,
                    format!("key must be \"rule\", \"device\" or \"ip\", not {other:?}"),
                );
                LimitKey::Rule
            }
        };
        let max_connections = r.max_connections.as_ref().and_then(|m| {
            let n = *m.get_ref();
            if n < 1 {
                self.error(
                    m.span().start,
                    format!("max_connections {n} must be at least 1"),
                );
                None
            } else {
                Some(n as usize)
            }
        });
        if r.rate.is_none() && r.max_connections.is_none() {
            self.error(
                r.action.span().start,
                format!("rule {rule:?}: action \"limit\" needs rate (e.g. \"50/s\") and/or max_connections"),
            );
        }
        if let (Some(b), None) = (&r.burst, &r.rate) {
            self.error(b.span().start, "burst needs rate");
        }
        let spec = LimitSpec {
            rate: rate.map(|rate| (rate, burst)),
            key,
            max_connections,
        };
        let mut refusal = refusal;
        if refusal.retry_after.is_none() {
            refusal.retry_after = Some(crate::limits::DEFAULT_CAP_RETRY_AFTER);
        }
        Action::Limit(LimitAction {
            state: limits.get(rule, spec),
            refusal,
        })
    }

    fn action(
        &mut self,
        value: &Option<Spanned<String>>,
        fallback: &str,
        refusal: &Refusal,
    ) -> Action {
        let (text, offset) = match value {
            None => (fallback, 0),
            Some(s) => (s.get_ref().as_str(), s.span().start),
        };
        match text {
            "allow" => Action::Allow,
            "deny" => Action::Deny(refusal.clone()),
            "limit" => {
                self.error(
                    offset,
                    "a default must be \"allow\" or \"deny\": \"limit\" is only valid in a [[rule]] (with rate, burst, key, max_connections)",
                );
                Action::Allow
            }
            other => {
                self.error(
                    offset,
                    format!("a default must be \"allow\" or \"deny\", not {other:?}"),
                );
                Action::Allow
            }
        }
    }

    /// A rule's `action` other than `limit` (compiled by [`Compiler::limit`]).
    fn rule_action(&mut self, value: &Spanned<String>, refusal: &Refusal) -> Action {
        match value.get_ref().as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny(refusal.clone()),
            other => {
                self.error(
                    value.span().start,
                    format!("action must be \"allow\", \"deny\" or \"limit\", not {other:?}"),
                );
                Action::Allow
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{DecidedBy, VersionInput};
    use crate::version::FirmwareVersion;

    fn compile_ok(text: &str) -> RuleSet {
        compile(text, Some(Path::new("rules.toml")), &Metrics::new(), 1)
            .unwrap_or_else(|e| panic!("should compile:\n{e}"))
    }

    fn compile_err(text: &str) -> String {
        compile(text, Some(Path::new("rules.toml")), &Metrics::new(), 1)
            .expect_err("should fail")
            .to_string()
    }

    fn decide(rules: &RuleSet, v: &str, path: &str) -> String {
        let input = VersionInput::Parsed(FirmwareVersion::parse(v).unwrap());
        let d = rules.decide(&input, path);
        let shadow = d
            .shadow
            .map(|s| format!(" (shadow {})", s.name))
            .unwrap_or_default();
        format!(
            "{} by {}{}",
            d.decider.action.as_str(),
            d.decider.name,
            shadow
        )
    }

    const INCIDENT: &str = r#"
[defaults]
action = "allow"
missing = "allow"
unparseable = "deny"

[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
retry_after = "30m"
jitter = 0.5
body = "firmware 3.8.0-b3+ is temporarily refused"
"#;

    #[test]
    fn the_incident_rule_refuses_exactly_the_bad_cohort() {
        let r = compile_ok(INCIDENT);
        for v in [
            "3.8.0-b3",
            "3.8.0-b4",
            "3.8.0-b10",
            "3.8.0",
            "3.9.0-b1",
            "4.0.0",
            "v3.8.0b3",
        ] {
            assert_eq!(decide(&r, v, "/"), "deny by block-table-scan", "{v}");
        }
        for v in ["3.8.0-b2", "3.8.0-b1", "3.7.9", "3.7.99-rc1", "1"] {
            assert_eq!(decide(&r, v, "/"), "allow by default", "{v}");
        }
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let r = compile_ok(
            r#"
[[rule]]
name = "allow-canary"
versions = "=3.8.0-b7"
action = "allow"
[[rule]]
name = "block"
versions = ">=3.8.0-b3"
action = "deny"
"#,
        );
        assert_eq!(decide(&r, "3.8.0-b7", "/"), "allow by allow-canary");
        assert_eq!(decide(&r, "3.8.0-b8", "/"), "deny by block");
    }

    #[test]
    fn shadow_rules_report_but_never_decide() {
        let r = compile_ok(
            r#"
[[rule]]
name = "try-block"
versions = ">=4"
action = "deny"
mode = "shadow"
[[rule]]
name = "old"
versions = "<2"
action = "deny"
"#,
        );
        assert_eq!(
            decide(&r, "4.1.0", "/"),
            "allow by default (shadow try-block)"
        );
        assert_eq!(decide(&r, "1.0.0", "/"), "deny by old");
    }

    #[test]
    fn path_prefix_is_an_extra_condition() {
        let r = compile_ok(
            r#"
[[rule]]
name = "ws-only"
versions = "*"
action = "deny"
path_prefix = "/ws"
[[rule]]
name = "rest"
versions = ">=1"
action = "allow"
"#,
        );
        assert_eq!(decide(&r, "2.0.0", "/ws/x"), "deny by ws-only");
        assert_eq!(decide(&r, "2.0.0", "/api"), "allow by rest");
        assert_eq!(decide(&r, "0.1.0", "/api"), "allow by default");
    }

    #[test]
    fn missing_and_unparseable_use_their_defaults() {
        let r = compile_ok(INCIDENT);
        let d = r.decide(&VersionInput::Missing, "/");
        assert_eq!((d.admits(), d.by), (true, DecidedBy::Missing));
        let d = r.decide(&VersionInput::Unparseable, "/");
        assert_eq!((d.admits(), d.by), (false, DecidedBy::Unparseable));
    }

    #[test]
    fn refusal_carries_status_body_and_jittered_retry_after() {
        let r = compile_ok(INCIDENT);
        let Action::Deny(refusal) = &r.rules[0].decider.action else {
            panic!("deny expected")
        };
        assert_eq!(refusal.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            &refusal.body[..],
            b"firmware 3.8.0-b3+ is temporarily refused\n"
        );
        for _ in 0..1000 {
            let s = refusal.retry_after_secs().unwrap();
            assert!((900..=2700).contains(&s), "{s}");
        }
    }

    #[test]
    fn errors_name_file_line_column_and_all_are_reported() {
        let text = "[[rule]]\nname = \"a\"\nversions = \">=3.8,\"\naction = \"deny\"\n\n[[rule]]\nname = \"a\"\nversions = \"*\"\naction = \"block\"\nstatus = 200\n";
        let e = compile_err(text);
        assert!(
            e.contains("rules.toml:3:18: rule \"a\": invalid versions"),
            "{e}"
        );
        assert!(
            e.contains("rules.toml:7:8: duplicate rule name \"a\""),
            "{e}"
        );
        assert!(e.contains("rules.toml:9:10: action must be"), "{e}");
        assert!(
            e.contains("rules.toml:10:10: status 200 is not a refusal"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let e = compile_err(
            "[[rule]]\nname = \"a\"\nversions = \"*\"\naction = \"deny\"\nstatuss = 503\n",
        );
        assert!(e.starts_with("rules.toml:5:1:"), "{e}");
        assert!(e.contains("statuss"), "{e}");
    }

    #[test]
    fn an_empty_file_is_refused_but_a_comment_is_fine() {
        assert!(compile_err("").contains("rules file is empty"));
        assert!(compile_err(" \n\t\n").contains("rules file is empty"));
        assert_eq!(compile_ok("# no rules on purpose\n").rules.len(), 0);
    }

    #[test]
    fn partial_bare_version_warns() {
        let r = compile_ok("[[rule]]\nname = \"a\"\nversions = \"3.8\"\naction = \"deny\"\n");
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("3.8.*"), "{:?}", r.warnings);
    }

    #[test]
    fn rules_that_can_never_apply_are_named_with_the_rule_that_takes_their_versions() {
        let text = "[[rule]]\nname = \"block\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\n\n[[rule]]\nname = \"beta\"\nversions = \">=3.9.0-0, <3.9.0-rc1\"\naction = \"limit\"\nrate = \"5/s\"\n\n[[rule]]\nname = \"old\"\nversions = \"<2.0.0-0\"\naction = \"deny\"\n";
        let r = compile_ok(text);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        let w = &r.warnings[0];
        assert!(
            w.starts_with("rules.toml:6:1: rule \"beta\" can never decide"),
            "{w}"
        );
        assert!(
            w.contains("decided first by rule \"block\" (line 1)"),
            "{w}"
        );
        // In shadow mode, the earlier rule takes nothing, and the later one decides again.
        let shadowed = text.replacen(
            "action = \"deny\"\n",
            "action = \"deny\"\nmode = \"shadow\"\n",
            1,
        );
        assert!(compile_ok(&shadowed).warnings.is_empty());
        // Covered by two earlier rules together, and a shadow rule that never matches.
        let split = "[[rule]]\nname = \"a\"\nversions = \"<3.0.0-0\"\naction = \"allow\"\n[[rule]]\nname = \"b\"\nversions = \">=3.0.0-0\"\naction = \"deny\"\n[[rule]]\nname = \"c\"\nversions = \"2.* || 4.*\"\naction = \"deny\"\nmode = \"shadow\"\n";
        let r = compile_ok(split);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("rule \"c\" can never match"),
            "{:?}",
            r.warnings
        );
        assert!(
            r.warnings[0].contains("rules \"a\" (line 1), \"b\" (line 5)"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn an_upper_bound_on_a_release_warns_that_it_takes_the_pre_releases() {
        let r =
            compile_ok("[[rule]]\nname = \"a\"\nversions = \">=3.8.0, <3.9\"\naction = \"deny\"\n");
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].starts_with("rules.toml:3:22:"),
            "{:?}",
            r.warnings
        );
        assert!(r.warnings[0].contains("\"<3.9.0-0\""), "{:?}", r.warnings);
        for quiet in [
            ">=3.9.0-0, <3.9.0",
            "<3.9.0-0",
            "3.8.*",
            "<=3.9.0",
            ">=3.8.0-b3",
        ] {
            let r = compile_ok(&format!(
                "[[rule]]\nname = \"a\"\nversions = \"{quiet}\"\naction = \"deny\"\n"
            ));
            assert!(r.warnings.is_empty(), "{quiet}: {:?}", r.warnings);
        }
    }

    #[test]
    fn action_errors_list_every_valid_value() {
        let e = compile_err("[[rule]]\nname = \"a\"\nversions = \"*\"\naction = \"block\"\n");
        assert!(e.contains("\"allow\", \"deny\" or \"limit\""), "{e}");
        let e = compile_err("[defaults]\naction = \"limit\"\n");
        assert!(e.contains("only valid in a [[rule]]"), "{e}");
    }

    #[test]
    fn embedded_rules_admit_everything() {
        let r = compile(EMBEDDED_RULES, None, &Metrics::new(), 0).unwrap();
        assert!(r.decide(&VersionInput::Missing, "/").admits());
        assert!(r.decide(&VersionInput::Unparseable, "/").admits());
        let v = VersionInput::Parsed(FirmwareVersion::parse("3.8.0-b3").unwrap());
        assert!(r.decide(&v, "/").admits());
    }
}
