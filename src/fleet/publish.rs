//! Rules in the store (`[fleet] rules = true`): publishing, history, diffs, rollback.
//!
//! A publication is one transaction: if `state/rules` is still at the revision read before,
//! write the new [`RulesDoc`] there, its metadata under `rules/history/<seq>`, its text under
//! `rules/versions/<seq>`, an audit record and the change stamp; drop history older than
//! [`HISTORY_KEPT`] publications. Its revision (the REV of `fwgate rules history`) is the
//! transaction's. Validation happens before, with the same compiler `fwgate check` uses, and
//! again on every instance when the document arrives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use super::etcd::types::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use super::etcd::{Client, EtcdError};
use super::keys::{unix_ms, AuditRecord, Keys, RulesDoc, RulesMeta, Stamp};
use super::state::parse_rules_doc;
use crate::metrics::Metrics;
use crate::rules::{file, RuleSet};

/// Publications kept in the history (older ones cannot be rolled back to).
pub const HISTORY_KEPT: u64 = 100;
/// Largest rules text published (written twice per publication; etcd refuses requests over
/// 1.5 MiB by default).
pub const MAX_RULES_TEXT: usize = 256 * 1024;

/// What can go wrong publishing or reading rules.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store failed.
    #[error("{0}")]
    Store(#[from] EtcdError),
    /// The rules do not compile (the message is `fwgate check`'s).
    #[error("{0}")]
    Invalid(String),
    /// Someone published in between.
    #[error("{0}")]
    Conflict(String),
    /// No such publication.
    #[error("{0}")]
    NotFound(String),
}

/// A publication's result.
#[derive(Debug, Clone)]
pub struct Published {
    /// Publication number.
    pub seq: u64,
    /// Store revision (the REV in `fwgate rules history`).
    pub revision: i64,
    /// Content hash.
    pub hash: String,
    /// One-line summary.
    pub summary: String,
    /// The same text was already in force: nothing was written.
    pub unchanged: bool,
}

/// One line of the history.
#[derive(Debug, Clone)]
pub struct HistoryItem {
    /// Store revision of the publication.
    pub revision: i64,
    /// Its metadata.
    pub meta: RulesMeta,
}

/// Compiles rules text exactly as `fwgate check` does; `label` names it in errors.
pub fn validate(text: &str, label: &Path) -> Result<RuleSet, PublishError> {
    if text.len() > MAX_RULES_TEXT {
        return Err(PublishError::Invalid(format!(
            "{}: {} bytes; at most {MAX_RULES_TEXT} can be published",
            label.display(),
            text.len()
        )));
    }
    file::compile(text, Some(label), &Metrics::new(), 1)
        .map_err(|e| PublishError::Invalid(e.to_string()))
}

/// A rule's settings as `/v1/rules` shows them, without its position and live counters.
fn rule_shapes(rules: &RuleSet) -> (BTreeMap<String, Value>, Value) {
    let mut json = crate::admin::rule_set_json(rules);
    let mut shapes = BTreeMap::new();
    if let Some(list) = json["rules"].as_array_mut() {
        for r in list {
            if let Some(o) = r.as_object_mut() {
                for volatile in ["line", "open_connections", "keys"] {
                    o.remove(volatile);
                }
            }
            let name = r["name"].as_str().unwrap_or("").to_string();
            shapes.insert(name, r.clone());
        }
    }
    let rest = serde_json::json!({
        "defaults": json["defaults"],
        "ordering": json["ordering"],
        "version_sources": json["version_sources"],
        "device_id_sources": json["device_id_sources"],
    });
    (shapes, rest)
}

/// One line: rule count and what changed against `previous`.
pub fn summarize(previous: Option<&str>, next: &RuleSet) -> String {
    let count = next.rules.len();
    let mut s = format!("{count} rule{}", if count == 1 { "" } else { "s" });
    let Some(prev) = previous.and_then(|t| file::compile(t, None, &Metrics::new(), 1).ok()) else {
        s.push_str("; first publication");
        return s;
    };
    let (old, old_rest) = rule_shapes(&prev);
    let (new, new_rest) = rule_shapes(next);
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut parts = Vec::new();
    for n in names {
        match (old.get(n), new.get(n)) {
            (None, Some(_)) => parts.push(format!("+{n}")),
            (Some(_), None) => parts.push(format!("-{n}")),
            (Some(a), Some(b)) if a != b => parts.push(format!("~{n}")),
            _ => {}
        }
    }
    if old_rest != new_rest {
        parts.push("defaults/sources changed".into());
    }
    if parts.is_empty() {
        s.push_str("; no rule changed (comments or layout only)");
    } else {
        s.push_str("; ");
        s.push_str(&parts.join(" "));
    }
    if s.len() > 200 {
        let cut = (0..=197)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp::RequestPut(PutRequest {
        key,
        value,
        lease: 0,
    })
}

/// The highest publication number in the history (0: none).
async fn last_seq(client: &Client, keys: &Keys) -> Result<u64, EtcdError> {
    let (key, range_end) = keys.history_range();
    let r = client
        .range(&RangeRequest {
            key,
            range_end,
            keys_only: true,
            ..Default::default()
        })
        .await?;
    Ok(r.kvs
        .iter()
        .filter_map(|kv| {
            std::str::from_utf8(&kv.key)
                .ok()?
                .rsplit('/')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0))
}

/// Publishes `text` (already validated into `compiled`). `action` is `rules_push` or
/// `rules_rollback` (for the audit trail).
pub async fn publish(
    client: &Client,
    keys: &Keys,
    text: &str,
    compiled: &RuleSet,
    author: &str,
    action: &str,
) -> Result<Published, PublishError> {
    let current = client
        .range(&RangeRequest {
            key: keys.rules(),
            ..Default::default()
        })
        .await?;
    let current_kv = current.kvs.into_iter().next();
    let expected = current_kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let current_doc = current_kv
        .as_ref()
        .and_then(|kv| parse_rules_doc(&kv.value).ok());
    let hash = crate::rules::content_hash(text.as_bytes());
    if let (Some(doc), Some(kv)) = (&current_doc, &current_kv) {
        if doc.hash == hash {
            return Ok(Published {
                seq: doc.seq,
                revision: kv.mod_revision,
                hash,
                summary: doc.summary.clone(),
                unchanged: true,
            });
        }
    }
    let seq = last_seq(client, keys)
        .await?
        .max(current_doc.as_ref().map_or(0, |d| d.seq))
        + 1;
    let summary = summarize(current_doc.as_ref().map(|d| d.text.as_str()), compiled);
    let at_ms = unix_ms();
    let meta = RulesMeta {
        seq,
        author: author.to_string(),
        published_at_ms: at_ms,
        hash: hash.clone(),
        summary: summary.clone(),
    };
    let doc = RulesDoc {
        seq,
        text: text.to_string(),
        author: author.to_string(),
        published_at_ms: at_ms,
        hash: hash.clone(),
        summary: summary.clone(),
    };
    let audit = AuditRecord {
        at_ms,
        action: action.to_string(),
        subject: format!("rules #{seq}"),
        by: author.to_string(),
        via: "cli".into(),
        reason: summary.clone(),
        before: current_doc.as_ref().map(|d| {
            serde_json::json!({"seq": d.seq, "hash": d.hash, "author": d.author, "summary": d.summary})
        }),
        after: Some(serde_json::json!({"seq": seq, "hash": hash, "author": author, "summary": summary})),
    };
    let mut success = vec![
        put(keys.rules(), serde_json::to_vec(&doc).unwrap_or_default()),
        put(
            keys.history(seq),
            serde_json::to_vec(&meta).unwrap_or_default(),
        ),
        put(keys.version(seq), text.as_bytes().to_vec()),
        put(
            keys.audit(at_ms, action),
            serde_json::to_vec(&audit).unwrap_or_default(),
        ),
        put(
            keys.stamp(),
            serde_json::to_vec(&Stamp {
                at_ms,
                action: action.to_string(),
                subject: format!("rules #{seq}"),
            })
            .unwrap_or_default(),
        ),
    ];
    if seq > HISTORY_KEPT {
        let oldest_kept = seq + 1 - HISTORY_KEPT;
        success.push(RequestOp::RequestDeleteRange(DeleteRangeRequest {
            key: keys.history_range().0,
            range_end: keys.history(oldest_kept),
        }));
        success.push(RequestOp::RequestDeleteRange(DeleteRangeRequest {
            key: keys.versions_range().0,
            range_end: keys.version(oldest_kept),
        }));
    }
    let r = client
        .txn(&TxnRequest {
            compare: vec![Compare::mod_revision_is(keys.rules(), expected)],
            success,
            failure: Vec::new(),
        })
        .await?;
    if !r.succeeded {
        return Err(PublishError::Conflict(
            "someone published rules at the same time; nothing was published: look at `fwgate rules history` and run the command again".into(),
        ));
    }
    Ok(Published {
        seq,
        revision: r.header.revision,
        hash,
        summary,
        unchanged: false,
    })
}

/// The published rule sets, newest first.
pub async fn history(client: &Client, keys: &Keys) -> Result<Vec<HistoryItem>, PublishError> {
    let (key, range_end) = keys.history_range();
    let r = client
        .range(&RangeRequest {
            key,
            range_end,
            ..Default::default()
        })
        .await?;
    let mut items: Vec<HistoryItem> = r
        .kvs
        .iter()
        .filter_map(|kv| {
            serde_json::from_slice::<RulesMeta>(&kv.value)
                .ok()
                .map(|meta| HistoryItem {
                    revision: kv.create_revision,
                    meta,
                })
        })
        .collect();
    items.sort_by_key(|i| std::cmp::Reverse(i.revision));
    Ok(items)
}

/// The text published at `revision` (a REV from the history).
pub async fn text_at(
    client: &Client,
    keys: &Keys,
    revision: i64,
) -> Result<(HistoryItem, String), PublishError> {
    let items = history(client, keys).await?;
    let Some(item) = items.iter().find(|i| i.revision == revision).cloned() else {
        let known: Vec<String> = items
            .iter()
            .take(10)
            .map(|i| i.revision.to_string())
            .collect();
        return Err(PublishError::NotFound(format!(
            "no publication at revision {revision}; recent ones: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let r = client
        .range(&RangeRequest {
            key: keys.version(item.meta.seq),
            ..Default::default()
        })
        .await?;
    let kv = r.kvs.into_iter().next().ok_or_else(|| {
        PublishError::NotFound(format!(
            "the text of publication #{} (revision {revision}) is gone from the store",
            item.meta.seq
        ))
    })?;
    let text = String::from_utf8(kv.value).map_err(|_| {
        PublishError::Invalid(format!(
            "the text of publication #{} is not UTF-8",
            item.meta.seq
        ))
    })?;
    Ok((item, text))
}

/// The rules document in force in the store now (text and revision), if any.
pub async fn current(
    client: &Client,
    keys: &Keys,
) -> Result<Option<(RulesDoc, i64)>, PublishError> {
    let r = client
        .range(&RangeRequest {
            key: keys.rules(),
            ..Default::default()
        })
        .await?;
    match r.kvs.into_iter().next() {
        None => Ok(None),
        Some(kv) => parse_rules_doc(&kv.value)
            .map(|d| Some((d, kv.mod_revision)))
            .map_err(PublishError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_what_changed() {
        let a = "[[rule]]\nname = \"a\"\nversions = \"<2\"\naction = \"deny\"\n[[rule]]\nname = \"b\"\nversions = \">=9\"\naction = \"deny\"\n";
        let b = "# comment\n[[rule]]\nname = \"a\"\nversions = \"<3\"\naction = \"deny\"\n[[rule]]\nname = \"c\"\nversions = \">=9\"\naction = \"deny\"\n";
        let next = validate(b, Path::new("b.toml")).unwrap();
        assert_eq!(summarize(Some(a), &next), "2 rules; ~a -b +c");
        assert_eq!(summarize(None, &next), "2 rules; first publication");
        let same = validate(&format!("# x\n{a}"), Path::new("a.toml")).unwrap();
        assert_eq!(
            summarize(Some(a), &same),
            "2 rules; no rule changed (comments or layout only)"
        );
        let e = validate("[[rule]]\nname = 1\n", Path::new("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.toml:2:"), "{e}");
    }
}
