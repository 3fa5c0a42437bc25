//! Where the fleet's data lives in etcd, under the configured prefix `P`, and the documents
//! stored there. Everything an instance must *apply* is under `P state/`, so one watch covers
//! it and nothing else (heartbeats and audit records do not wake every instance):
//!
//! | key | value |
//! |---|---|
//! | `P state/killswitch/<id>` | a kill-switch entry: the same JSON as in `killswitch.json` |
//! | `P state/rules` | [`RulesDoc`]: the rules text in force (with `rules = true`) |
//! | `P state/stamp` | [`Stamp`]: rewritten by every fwgate change, for propagation timing |
//! | `P audit/<unix ms>-<nonce>-<action>` | [`AuditRecord`]: who, when, why, before, after |
//! | `P rules/history/<seq>` | [`RulesMeta`]: one line per published rule set |
//! | `P rules/versions/<seq>` | that rule set's text |
//! | `P instances/<instance id>` | [`Heartbeat`], under a lease: live instances only |

use serde::{Deserialize, Serialize};

use crate::killswitch::EntrySpec;

/// The end of etcd's prefix range for `prefix` (the prefix with its last byte incremented).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: the range runs to the end of the keyspace.
    vec![0]
}

/// What a key under `P state/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKey {
    /// A kill-switch entry with this id.
    Entry(String),
    /// The rules document.
    Rules,
    /// The change stamp.
    Stamp,
    /// Something fwgate does not know (ignored).
    Unknown,
}

/// The key layout for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (validated to end with `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    /// `[start, end)` of everything instances apply.
    pub fn state_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("state/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// `[start, end)` of the kill-switch entries.
    pub fn entries_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("state/killswitch/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// One kill-switch entry.
    pub fn entry(&self, id: &str) -> Vec<u8> {
        self.key(&format!("state/killswitch/{id}"))
    }

    /// The rules document.
    pub fn rules(&self) -> Vec<u8> {
        self.key("state/rules")
    }

    /// The change stamp.
    pub fn stamp(&self) -> Vec<u8> {
        self.key("state/stamp")
    }

    /// A new audit record's key: sorts by time.
    pub fn audit(&self, at_ms: u64, action: &str) -> Vec<u8> {
        self.key(&format!(
            "audit/{at_ms:016}-{:04x}-{action}",
            fastrand::u16(..)
        ))
    }

    /// `[start, end)` of the audit records.
    pub fn audit_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("audit/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// A history record of the published rules.
    pub fn history(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("rules/history/{seq:010}"))
    }

    /// `[start, end)` of the history records.
    pub fn history_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("rules/history/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// The text of a published rule set.
    pub fn version(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("rules/versions/{seq:010}"))
    }

    /// `[start, end)` of the rule-set texts.
    pub fn versions_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("rules/versions/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// One instance's heartbeat.
    pub fn instance(&self, id: &str) -> Vec<u8> {
        self.key(&format!("instances/{id}"))
    }

    /// `[start, end)` of the heartbeats.
    pub fn instances_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.key("instances/");
        let end = prefix_end(&start);
        (start, end)
    }

    /// What a key under `P state/` is.
    pub fn classify(&self, key: &[u8]) -> StateKey {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
            .and_then(|k| k.strip_prefix("state/"))
        else {
            return StateKey::Unknown;
        };
        match rest {
            "rules" => StateKey::Rules,
            "stamp" => StateKey::Stamp,
            _ => match rest.strip_prefix("killswitch/") {
                Some(id) if !id.is_empty() => StateKey::Entry(id.to_string()),
                _ => StateKey::Unknown,
            },
        }
    }
}

/// The rules in force fleet-wide (`P state/rules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesDoc {
    /// Publication number (1, 2, ...); names `rules/history/<seq>` and `rules/versions/<seq>`.
    pub seq: u64,
    /// The rules file text.
    pub text: String,
    /// Who published it.
    pub author: String,
    /// When, unix milliseconds.
    pub published_at_ms: u64,
    /// Content hash of `text` (as `/v1/rules` shows it); checked by every instance.
    pub hash: String,
    /// One line: rule count and what changed.
    pub summary: String,
}

/// One published rule set, without its text (`P rules/history/<seq>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesMeta {
    /// Publication number.
    pub seq: u64,
    /// Who published it.
    pub author: String,
    /// When, unix milliseconds.
    pub published_at_ms: u64,
    /// Content hash of the text.
    pub hash: String,
    /// One line: rule count and what changed.
    pub summary: String,
}

/// Rewritten by every change fwgate makes under `P state/`, so each instance can time how long
/// the change took to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    /// When the change was written, unix milliseconds (the writer's clock).
    pub at_ms: u64,
    /// `kill_add`, `kill_remove`, `rules_push`, `rules_rollback`.
    pub action: String,
    /// The entry id or rules publication.
    pub subject: String,
}

/// One change, as kept in `P audit/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, unix milliseconds.
    pub at_ms: u64,
    /// `kill_add`, `kill_remove`, `rules_push`, `rules_rollback`.
    pub action: String,
    /// Entry id, or `rules #<seq>`.
    pub subject: String,
    /// Who (the CLI's actor header, or the publishing user).
    pub by: String,
    /// Which instance (or `cli`) wrote it.
    pub via: String,
    /// Why (an entry's reason, or the rules summary).
    pub reason: String,
    /// The entry (or rules metadata) before the change; `null` when it did not exist.
    pub before: Option<serde_json::Value>,
    /// After the change; `null` when removed.
    pub after: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A kill-switch change.
    pub fn entry(
        action: &str,
        id: &str,
        by: Option<&str>,
        via: &str,
        before: Option<&EntrySpec>,
        after: Option<&EntrySpec>,
    ) -> AuditRecord {
        AuditRecord {
            at_ms: unix_ms(),
            action: action.into(),
            subject: id.into(),
            by: by.unwrap_or("-").into(),
            via: via.into(),
            reason: after
                .or(before)
                .map(|s| s.reason.clone())
                .unwrap_or_default(),
            before: before.and_then(|s| serde_json::to_value(s).ok()),
            after: after.and_then(|s| serde_json::to_value(s).ok()),
        }
    }
}

/// An instance's report of itself (`P instances/<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Instance id.
    pub id: String,
    /// The state revision it has in force.
    pub applied_revision: i64,
    /// When it wrote this, unix milliseconds.
    pub at_ms: u64,
    /// Its admin listener.
    pub admin: String,
    /// fwgate version.
    pub version: String,
    /// Where its state came from: `etcd` or `cache`.
    pub source: String,
}

/// Now, unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_and_classification() {
        assert_eq!(prefix_end(b"/fwgate/state/"), b"/fwgate/state0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        let k = Keys::new("/fwgate/");
        let (start, end) = k.state_range();
        for key in [k.entry("x"), k.rules(), k.stamp()] {
            assert!(key >= start && key < end);
        }
        for key in [k.instance("i"), k.history(1), k.audit(1, "a")] {
            assert!(!(key >= start && key < end));
        }
        assert_eq!(k.classify(&k.entry("ks-1")), StateKey::Entry("ks-1".into()));
        assert_eq!(k.classify(&k.rules()), StateKey::Rules);
        assert_eq!(k.classify(&k.stamp()), StateKey::Stamp);
        assert_eq!(k.classify(b"/other/state/rules"), StateKey::Unknown);
        assert_eq!(k.classify(b"/fwgate/state/killswitch/"), StateKey::Unknown);
        assert!(k.history(2) > k.history(1) && k.history(10) > k.history(9));
    }
}
