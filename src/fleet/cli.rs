//! What `fwgate rules push|history|diff|rollback` and `fwgate fleet status` print. They talk to
//! the store named by `--config`'s `[fleet]` directly (not to an instance), so they work while
//! every instance is down. Output is short and for people; the exit status says whether it
//! worked (and, for `fleet status`, whether the fleet agrees).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::etcd::types::RangeRequest;
use super::etcd::{escape, Client};
use super::keys::{Keys, StateKey};
use super::publish::{self, PublishError};
use super::status::{converged, list_instances, wait_for_revision};
use crate::config::Config;
use crate::shared::Convergence;

/// How long `rules push` and `rules rollback` wait for the fleet to apply the publication.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// `fwgate rules ...` (clap reads these doc comments as help).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RulesAction {
    /// Validate FILE exactly as `fwgate check` does and, only if valid, publish it to the fleet.
    Push {
        /// The rules file.
        file: PathBuf,
        /// Who publishes (default: $USER).
        #[arg(long)]
        author: Option<String>,
    },
    /// One line per published rule set, newest first: REV, time, author, hash, summary.
    History {
        /// Lines to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// What changed from publication REV to REV2 (default: to the rules in the store now).
    Diff {
        /// The older publication's REV.
        rev: i64,
        /// The newer one's.
        rev2: Option<i64>,
    },
    /// Publish the rules of an earlier publication again (validated again).
    Rollback {
        /// The publication's REV.
        rev: i64,
        /// Who rolls back (default: $USER).
        #[arg(long)]
        author: Option<String>,
    },
}

/// `fwgate fleet ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetAction {
    /// The store, the state revision, and every live instance with the revision it applied.
    Status,
}

/// RFC 3339 UTC, to the second, from unix milliseconds.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn default_author(given: Option<String>) -> String {
    let a = given
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    a.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

fn connect(config: &Config) -> Result<(Client, Keys), String> {
    let fleet = config.fleet.as_ref().ok_or_else(|| {
        format!(
            "fleet mode is off in {}: add [fleet] etcd = [\"http://host:2379\"]",
            config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the built-in configuration (give --config)".into())
        )
    })?;
    let client = Client::new(fleet).map_err(|e| e.to_string())?;
    Ok((client, Keys::new(&fleet.prefix)))
}

/// The admin API of every live instance of the fleet `config` names (`http://host:port`),
/// for commands that ask each instance (`fwgate check --preview`).
pub async fn live_admins(config: &Config) -> Result<Vec<String>, String> {
    let (client, keys) = connect(config)?;
    let interval = config
        .fleet
        .as_ref()
        .map_or(Duration::from_secs(1), |f| f.heartbeat_interval);
    let list = list_instances(&client, &keys, interval)
        .await
        .map_err(|e| format!("cannot list the fleet's instances: {e}"))?;
    Ok(list
        .into_iter()
        .filter(|i| i.live)
        .map(|i| format!("http://{}", i.admin))
        .collect())
}

fn convergence_line(c: &Convergence) -> String {
    if let Some(why) = &c.unknown {
        return format!("could not tell which instances applied it: {why}");
    }
    if c.lagging.is_empty() {
        return format!(
            "applied by {} live instance(s) in {} ms",
            c.applied.len(),
            c.waited_ms
        );
    }
    let lag: Vec<String> = c
        .lagging
        .iter()
        .map(|l| format!("{} (at revision {})", l.id, l.applied_revision))
        .collect();
    format!(
        "LAGGING after {} ms: {}; applied by {}",
        c.waited_ms,
        lag.join(", "),
        c.applied.len()
    )
}

/// Runs `fwgate rules ...`; returns (output, success).
pub async fn rules(config: &Config, action: RulesAction) -> (String, bool) {
    match rules_inner(config, action).await {
        Ok(out) => out,
        Err(e) => (format!("{e}\n"), false),
    }
}

async fn rules_inner(config: &Config, action: RulesAction) -> Result<(String, bool), String> {
    let (client, keys) = connect(config)?;
    let mut out = String::new();
    let fail = |e: PublishError| e.to_string();
    match action {
        RulesAction::Push { file, author } => {
            // The same code path as `fwgate check` for a rules file.
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: cannot read rules file: {e}", file.display()))?;
            let compiled = match publish::validate(&text, &file) {
                Ok(r) => r,
                Err(e) => return Ok((format!("{e}\nnot published: the file is invalid\n"), false)),
            };
            for w in &compiled.warnings {
                let _ = writeln!(out, "warning: {w}");
            }
            publish_and_wait(
                config,
                &client,
                &keys,
                &text,
                &compiled,
                &default_author(author),
                "rules_push",
                &mut out,
            )
            .await
        }
        RulesAction::Rollback { rev, author } => {
            let (item, text) = publish::text_at(&client, &keys, rev).await.map_err(fail)?;
            let label = PathBuf::from(format!("rules #{} (revision {rev})", item.meta.seq));
            let compiled = match publish::validate(&text, &label) {
                Ok(r) => r,
                Err(e) => {
                    return Ok((
                        format!(
                        "{e}\nnot published: that publication does not compile with this fwgate\n"
                    ),
                        false,
                    ))
                }
            };
            let _ = writeln!(
                out,
                "rolling back to rules #{} (revision {rev}, by {}, {})",
                item.meta.seq,
                escape(&item.meta.author),
                format_time(item.meta.published_at_ms)
            );
            publish_and_wait(
                config,
                &client,
                &keys,
                &text,
                &compiled,
                &default_author(author),
                "rules_rollback",
                &mut out,
            )
            .await
        }
        RulesAction::History { limit } => {
            let items = publish::history(&client, &keys).await.map_err(fail)?;
            if items.is_empty() {
                return Ok((
                    "no rules published yet (instances use their local rules files)\n".into(),
                    true,
                ));
            }
            let _ = writeln!(
                out,
                "{:<8}  {:<20}  {:<16}  {:<16}  SUMMARY",
                "REV", "TIME", "AUTHOR", "HASH"
            );
            for i in items.iter().take(limit.max(1)) {
                let _ = writeln!(
                    out,
                    "{:<8}  {:<20}  {:<16}  {:<16}  {}",
                    i.revision,
                    format_time(i.meta.published_at_ms),
                    escape(&i.meta.author),
                    escape(&i.meta.hash),
                    escape(&i.meta.summary)
                );
            }
            Ok((out, true))
        }
        RulesAction::Diff { rev, rev2 } => {
            let (from, old) = publish::text_at(&client, &keys, rev).await.map_err(fail)?;
            let (to_label, new) = match rev2 {
                Some(r2) => {
                    let (to, text) = publish::text_at(&client, &keys, r2).await.map_err(fail)?;
                    (
                        format!(
                            "rules #{} (revision {r2}, {})",
                            to.meta.seq,
                            escape(&to.meta.author)
                        ),
                        text,
                    )
                }
                None => match publish::current(&client, &keys).await.map_err(fail)? {
                    Some((doc, r)) => (
                        format!(
                            "rules in the store now: #{} (revision {r}, {})",
                            doc.seq,
                            escape(&doc.author)
                        ),
                        doc.text,
                    ),
                    None => return Err("no rules in the store now; give two revisions".into()),
                },
            };
            let from_label = format!(
                "rules #{} (revision {rev}, {})",
                from.meta.seq,
                escape(&from.meta.author)
            );
            if old == new {
                let _ = writeln!(out, "no difference between {from_label} and {to_label}");
                return Ok((out, true));
            }
            let diff = similar::TextDiff::from_lines(&old, &new);
            let _ = write!(
                out,
                "{}",
                diff.unified_diff()
                    .context_radius(3)
                    .header(&from_label, &to_label)
            );
            Ok((out, true))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish_and_wait(
    config: &Config,
    client: &Client,
    keys: &Keys,
    text: &str,
    compiled: &crate::rules::RuleSet,
    author: &str,
    action: &str,
    out: &mut String,
) -> Result<(String, bool), String> {
    let fleet = config.fleet.as_ref();
    if fleet.is_some_and(|f| !f.rules) {
        let _ = writeln!(
            out,
            "note: [fleet] rules = false in this configuration: instances configured like it keep their local rules files"
        );
    }
    let started = Instant::now();
    let p = publish::publish(client, keys, text, compiled, author, action)
        .await
        .map_err(|e| format!("{out}{e}"))?;
    if p.unchanged {
        let _ = writeln!(
            out,
            "unchanged: the store already has this text (rules #{}, revision {}); nothing published",
            p.seq, p.revision
        );
        return Ok((std::mem::take(out), true));
    }
    let _ = writeln!(
        out,
        "published rules #{} at revision {} (hash {}): {}",
        p.seq, p.revision, p.hash, p.summary
    );
    let interval = fleet.map_or(Duration::from_secs(2), |f| f.heartbeat_interval);
    let c = wait_for_revision(
        client,
        keys,
        interval,
        p.revision,
        started,
        started + PUBLISH_WAIT,
    )
    .await;
    let _ = writeln!(out, "{}", convergence_line(&c));
    let ok = c.lagging.is_empty() && c.unknown.is_none();
    Ok((std::mem::take(out), ok))
}

/// Runs `fwgate fleet ...`; returns (output, success: store reachable and fleet converged).
pub async fn fleet(config: &Config, action: FleetAction) -> (String, bool) {
    match action {
        FleetAction::Status => match status(config).await {
            Ok(out) => out,
            Err(e) => (format!("{e}\n"), false),
        },
    }
}

async fn status(config: &Config) -> Result<(String, bool), String> {
    let (client, keys) = connect(config)?;
    let interval = config
        .fleet
        .as_ref()
        .map_or(Duration::from_secs(2), |f| f.heartbeat_interval);
    let (key, range_end) = keys.state_range();
    let state = client
        .range(&RangeRequest {
            key,
            range_end,
            keys_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("store: {e}"))?;
    let state_revision = state
        .kvs
        .iter()
        .map(|kv| kv.mod_revision)
        .max()
        .unwrap_or(0);
    let entries = state
        .kvs
        .iter()
        .filter(|kv| matches!(keys.classify(&kv.key), StateKey::Entry(_)))
        .count();
    let rules = publish::current(&client, &keys).await;
    let instances = list_instances(&client, &keys, interval)
        .await
        .map_err(|e| format!("instances: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "store      {} prefix {}  revision {}  reachable",
        client.describe(),
        keys.prefix(),
        state.header.revision
    );
    let rules_text = match rules {
        Ok(Some((doc, _))) => format!(
            "rules #{} by {} at {}",
            doc.seq,
            escape(&doc.author),
            format_time(doc.published_at_ms)
        ),
        Ok(None) => "no rules published".into(),
        Err(e) => format!("INVALID rules document: {e}"),
    };
    let _ = writeln!(
        out,
        "state      revision {state_revision}: {entries} kill-switch entr{}, {rules_text}",
        if entries == 1 { "y" } else { "ies" }
    );
    let live = instances.iter().filter(|i| i.live).count();
    let behind = instances
        .iter()
        .filter(|i| i.live && i.applied_revision < state_revision)
        .count();
    let agree = converged(&instances) && behind == 0;
    let _ = writeln!(
        out,
        "instances  {live} live{}",
        if agree {
            format!(", all at revision {state_revision}")
        } else {
            format!(", {behind} LAGGING behind revision {state_revision}")
        }
    );
    if !instances.is_empty() {
        let _ = writeln!(
            out,
            "{:<28}  {:>8}  {:>7}  {:<6}  {:<22}  {:<8}  STATE",
            "ID", "APPLIED", "AGE", "SOURCE", "ADMIN", "VERSION"
        );
        for i in &instances {
            let state = if !i.live {
                "SILENT"
            } else if i.applied_revision < state_revision {
                "LAGGING"
            } else {
                "ok"
            };
            let _ = writeln!(
                out,
                "{:<28}  {:>8}  {:>6.1}s  {:<6}  {:<22}  {:<8}  {state}",
                escape(&i.id),
                i.applied_revision,
                i.age_s,
                escape(&i.source),
                escape(&i.admin),
                escape(&i.version)
            );
        }
    }
    Ok((out, agree))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(
            format_time(1_581_120_000_000 + 3_723_000),
            "2020-02-08T01:02:03Z"
        );
    }
}
