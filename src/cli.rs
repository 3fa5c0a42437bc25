//! What `fwgate check` and `fwgate explain` print. Kept in the library (not `main.rs`) so the
//! exact output operators rely on is unit-tested.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;
use crate::diag::FileErrors;
use crate::duration::format_duration;
use crate::extract::Extracted;
use crate::killswitch::{self, KillSet};
use crate::metrics::Metrics;
use crate::rules::{file, Action, DecidedBy, RuleSet, VersionInput};
use crate::version::FirmwareVersion;

/// Loads the config (or the embedded default when `path` is None).
pub fn load_config(path: Option<&Path>) -> Result<Config, FileErrors> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::embedded()),
    }
}

/// Loads the rules the config names (or the embedded admit-all rules).
pub fn load_rules(config: &Config, metrics: &Metrics) -> Result<RuleSet, FileErrors> {
    match &config.rules_path {
        Some(p) => file::load(p, metrics, 1),
        None => file::compile(file::EMBEDDED_RULES, None, metrics, 1),
    }
}

/// `fwgate check`: every problem (exit non-zero), or a one-line summary plus warnings.
pub fn check(config_path: Option<&Path>) -> (String, bool) {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => return (format!("{e}\n"), false),
    };
    let mut out = String::new();
    let mut ok = true;
    if let Some(files) = &config.tls {
        if let Err(e) = crate::tls::load_certified_key(files) {
            let _ = writeln!(out, "[tls]: {e}");
            ok = false;
        }
    }
    if let Some(token) = &config.admin.token_file {
        if let Err(e) = std::fs::metadata(token) {
            let _ = writeln!(
                out,
                "{}: cannot read admin token file: {e}",
                token.display()
            );
            ok = false;
        }
    }
    if let Some(fleet) = &config.fleet {
        // The etcd TLS and password files, as `run` reads them.
        if let Err(e) = crate::fleet::etcd::Client::new(fleet) {
            let _ = writeln!(out, "[fleet]: {e}");
            ok = false;
        }
    }
    match load_rules(&config, &Metrics::new()) {
        Err(e) => {
            let _ = writeln!(out, "{e}");
            ok = false;
        }
        Ok(rules) => {
            for w in &rules.warnings {
                let _ = writeln!(out, "warning: {w}");
            }
            if ok {
                let _ = writeln!(
                    out,
                    "ok: {} and {}: {} rule(s), {} ordering, listen {}, upstream {}, admin {}",
                    config
                        .source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "<embedded config>".into()),
                    shown(&config.rules_path),
                    rules.rules.len(),
                    rules.ordering.as_str(),
                    config.listen.addr,
                    config.upstream.addr,
                    config.admin.addr,
                );
            }
        }
    }
    (out, ok)
}

fn shown(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<embedded rules>".into())
}

/// What to explain: a version as given, and/or request pieces to run extraction on.
#[derive(Debug, Default, Clone)]
pub struct ExplainInput {
    /// A version string, used as-is (no extraction).
    pub version: Option<String>,
    /// `Name: value` headers to run the configured sources on.
    pub headers: Vec<String>,
    /// A query string (`fw=3.8.0&x=1`) for query sources.
    pub query: Option<String>,
    /// Request path (rules may have a `path_prefix`).
    pub path: String,
}

/// The kill-switch entries persisted in the config's `state_dir` (what a running instance with
/// this config has in force), read-only; empty without a `state_dir`.
pub fn load_kill_set(config: &Config, rules: &RuleSet) -> Result<KillSet, String> {
    match &config.state_dir {
        None => Ok(KillSet::default()),
        Some(dir) => killswitch::load_at_startup(
            &dir.join(killswitch::STATE_FILE),
            rules.ordering,
            &Metrics::new(),
        )
        .map(|(set, _)| set)
        .map_err(|e| e.to_string()),
    }
}

/// `fwgate explain`: the normalised version, the decision and the rule that makes it.
pub fn explain(rules: &RuleSet, kill: &KillSet, input: &ExplainInput) -> Result<String, String> {
    let mut out = String::new();
    let version = if let Some(raw) = &input.version {
        let parsed = FirmwareVersion::parse(raw);
        let _ = writeln!(out, "input:    {raw:?} (given directly)");
        match parsed {
            Ok(v) => VersionInput::Parsed(v.canonical(rules.ordering)),
            Err(e) => {
                let _ = writeln!(out, "parse:    unparseable: {e}");
                VersionInput::Unparseable
            }
        }
    } else {
        let mut headers = HeaderMap::new();
        for h in &input.headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("--header {h:?} must look like 'Name: value'"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("--header {h:?}: invalid header name"))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|_| format!("--header {h:?}: invalid header value"))?;
            headers.append(name, value);
        }
        let extracted =
            rules
                .version_sources
                .extract(&headers, input.query.as_deref(), None, rules.ordering);
        match &extracted {
            Extracted::Ambiguous(why) => {
                let _ = writeln!(
                    out,
                    "input:    ambiguous: {}\ndecision: REFUSED 400 (a request is never decided on one value while the backend may read another)",
                    rules.version_sources.explain(*why)
                );
                return Ok(out);
            }
            Extracted::Missing => {
                let _ = writeln!(
                    out,
                    "input:    no source yielded a version (sources: {})",
                    rules
                        .version_sources
                        .sources()
                        .iter()
                        .map(|s| s.describe())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Extracted::Found(f) => {
                let source = rules.version_sources.sources()[f.source].describe();
                let _ = writeln!(out, "input:    {:?} from {source}", f.display(256));
                if let Err(e) = f.parse_version() {
                    let _ = writeln!(out, "parse:    unparseable: {e}");
                }
            }
        }
        VersionInput::from_found(extracted.found(), rules.ordering)
    };
    match &version {
        VersionInput::Parsed(v) => {
            let _ = writeln!(out, "version:  {v} ({} ordering)", rules.ordering.as_str());
        }
        VersionInput::Missing => {
            let _ = writeln!(out, "version:  missing");
        }
        VersionInput::Unparseable => {
            let _ = writeln!(out, "version:  unparseable");
        }
    }
    if let Some(e) = kill.find(&version) {
        let _ = writeln!(
            out,
            "decision: DENY {} (emergency kill switch)\nby:       kill-switch entry {:?}: versions {:?}, reason {:?}{}\nundo:     fwgate kill rm {}",
            e.spec.status,
            e.spec.id,
            e.spec.versions,
            e.spec.reason,
            e.spec
                .expires_at
                .map(|x| format!(", expires in {}s", x.saturating_sub(killswitch::unix_now())))
                .unwrap_or_default(),
            e.spec.id
        );
        return Ok(out);
    }
    let path = crate::path::normalize(&input.path);
    if path != input.path {
        let _ = writeln!(out, "path:     {:?} (as {:?})", &*path, input.path);
    }
    let d = rules.decide(&version, &path);
    let verdict = match &d.decider.action {
        Action::Allow => "ALLOW (forwarded to the backend)".to_string(),
        Action::Limit(l) => {
            let spec = l.state.spec();
            let mut s = "LIMIT: forwarded while within".to_string();
            if let Some((rate, burst)) = spec.rate {
                let _ = write!(
                    s,
                    " {} per {} (burst {}, per {})",
                    rate.count,
                    format_duration(rate.per),
                    burst.map_or(rate.count.get(), |b| b.get()),
                    spec.key.as_str()
                );
            }
            if let Some(m) = spec.max_connections {
                let _ = write!(s, " max {m} open connections");
            }
            let _ = write!(s, "; over it {}", l.refusal.status);
            s
        }
        Action::Deny(r) => {
            let mut s = format!("DENY {}", r.status);
            if let Some(ra) = r.retry_after {
                let _ = write!(s, ", Retry-After {}", format_duration(ra));
                if r.jitter > 0.0 {
                    let _ = write!(s, " ±{:.0}%", r.jitter * 100.0);
                }
            }
            s
        }
    };
    let _ = writeln!(out, "decision: {verdict}");
    let by = match d.by {
        DecidedBy::Rule(_) => match rules.rule(d.by) {
            Some(r) => format!(
                "rule {:?} (line {}): versions {:?}{}",
                &*r.decider.name,
                r.line,
                r.range.as_str(),
                r.path_prefix
                    .as_deref()
                    .map(|p| format!(", path_prefix {p:?}"))
                    .unwrap_or_default()
            ),
            None => d.decider.name.to_string(),
        },
        DecidedBy::Default => "[defaults] action (no rule matched)".into(),
        DecidedBy::Missing => "[defaults] missing (no version found)".into(),
        DecidedBy::Unparseable => "[defaults] unparseable (version could not be parsed)".into(),
        DecidedBy::KillSwitch => format!("kill switch {}", d.decider.name),
    };
    let _ = writeln!(out, "by:       {by}");
    if let Some(s) = d.shadow {
        let _ = writeln!(
            out,
            "shadow:   rule {:?} matched in shadow mode and would {}",
            &*s.name,
            s.action.as_str()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incident_rules() -> RuleSet {
        file::compile(
            r#"
[version]
sources = [
  { header = "x-firmware-version" },
  { header = "user-agent", pattern = '^Airtame/(?P<version>\S+)' },
  { query = "fw" },
]
[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
retry_after = "30m"
jitter = 0.5
"#,
            Some(Path::new("rules.toml")),
            &Metrics::new(),
            1,
        )
        .unwrap()
    }

    #[test]
    fn explain_a_version() {
        let out = explain(
            &incident_rules(),
            &KillSet::default(),
            &ExplainInput {
                version: Some("v3.8.0b10".into()),
                path: "/".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            out.contains("version:  3.8.0-b10 (firmware ordering)"),
            "{out}"
        );
        assert!(
            out.contains("decision: DENY 503 Service Unavailable, Retry-After 30m ±50%"),
            "{out}"
        );
        assert!(
            out.contains("by:       rule \"block-table-scan\" (line 8)"),
            "{out}"
        );
    }

    #[test]
    fn explain_runs_extraction() {
        let out = explain(
            &incident_rules(),
            &KillSet::default(),
            &ExplainInput {
                headers: vec!["User-Agent: Airtame/3.8.0-b2 (x)".into()],
                path: "/".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(out.contains("from header user-agent"), "{out}");
        assert!(out.contains("decision: ALLOW"), "{out}");
        assert!(out.contains("[defaults] action"), "{out}");
    }

    #[test]
    fn explain_shows_a_kill_switch_entry_first() {
        let rules = incident_rules();
        let spec = killswitch::spec_from_request(
            serde_json::from_str(r#"{"versions": "*", "reason": "maintenance", "id": "m"}"#)
                .unwrap(),
            rules.ordering,
            None,
        )
        .unwrap();
        let kill = KillSet {
            entries: vec![
                killswitch::compile_entry(spec, rules.ordering, &Metrics::new()).unwrap(),
            ],
        };
        let out = explain(
            &rules,
            &kill,
            &ExplainInput {
                version: Some("1.0.0".into()),
                path: "/".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            out.contains("decision: DENY 503 (emergency kill switch)"),
            "{out}"
        );
        assert!(out.contains("undo:     fwgate kill rm m"), "{out}");
    }

    #[test]
    fn explain_unparseable_says_why() {
        let out = explain(
            &incident_rules(),
            &KillSet::default(),
            &ExplainInput {
                version: Some("banana".into()),
                path: "/".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(out.contains("parse:    unparseable:"), "{out}");
        assert!(out.contains("decision: DENY 403"), "{out}");
    }
}
