//! `fwgate kill`: manage kill-switch entries through the admin API of one or many instances.
//! Output is short and human: what was refused, how many connections it hit, how to undo it.
//! The exit status is non-zero if any instance failed, if (in fleet mode) a live instance had
//! not applied the change within 5 s (they are named), or if `list` finds that the instances
//! do not hold the same entries.
//!
//! In fleet mode one `--admin` is enough: the instance writes to the fleet's store and waits
//! (server side, at most 5 s) until every live instance has applied the change; its answer
//! names the laggards, and this command prints them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use http::Method;
use serde_json::{json, Value};

use crate::admin::client;

/// What to do (also the `fwgate kill` subcommands: clap reads these doc comments as help).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KillAction {
    /// Refuse a firmware range now ('*' refuses everything: maintenance mode).
    Add {
        /// The range, e.g. '>=3.8.0-b3'.
        versions: String,
        /// Why (required; shown in logs and listings).
        #[arg(long)]
        reason: String,
        /// Remove the entry automatically after this long (e.g. 2h).
        #[arg(long)]
        ttl: Option<String>,
        /// Refusal status (default 503).
        #[arg(long)]
        status: Option<u16>,
        /// Base Retry-After (default 5m, jittered ±50%).
        #[arg(long)]
        retry_after: Option<String>,
        /// Keep open connections of that range instead of closing them.
        #[arg(long)]
        keep_existing: bool,
        /// Spread the closing of open connections over this long (default 10s).
        #[arg(long)]
        drain: Option<String>,
        /// Report how many connections would be hit; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Entry id (default: generated, the same on every --admin).
        #[arg(long)]
        id: Option<String>,
        /// This instance only, even in fleet mode (e.g. while the fleet store is unreachable).
        #[arg(long)]
        local: bool,
    },
    /// List entries (and say whether the instances agree).
    List,
    /// Remove an entry (undo).
    #[command(name = "rm")]
    Remove {
        /// The entry id.
        id: String,
        /// Remove a local entry (added with --local).
        #[arg(long)]
        local: bool,
    },
}

/// What to say when a change is asked for without a token: nothing is sent, since every
/// instance would refuse it.
pub const NO_TOKEN: &str = "no admin token: changes need the instance's token. Set FWGATE_ADMIN_TOKEN, pass --token-file PATH, or give --config with [admin] token_file; nothing was sent";

/// Runs `action` against every admin URL in parallel; returns (output, all succeeded).
pub async fn run(action: KillAction, admins: &[String], token: Option<String>) -> (String, bool) {
    let mutates = !matches!(action, KillAction::List);
    if mutates && token.as_deref().is_none_or(str::is_empty) {
        return (format!("FAIL  {NO_TOKEN}\n"), false);
    }
    let actor = std::env::var("USER")
        .ok()
        .map(|u| format!("{u} via fwgate kill"));
    // One id for the whole fleet, so `kill rm ID` later reaches the same entry everywhere.
    let mut action = action;
    if let KillAction::Add { id, .. } = &mut action {
        id.get_or_insert_with(crate::killswitch::generate_id);
    }
    let mut tasks = Vec::new();
    for admin in admins {
        let (admin, action, token, actor) =
            (admin.clone(), action.clone(), token.clone(), actor.clone());
        tasks.push(tokio::spawn(async move {
            let line = one(&admin, &action, token.as_deref(), actor.as_deref()).await;
            (admin, line)
        }));
    }
    let mut out = String::new();
    let mut all_ok = true;
    let mut any_ok = false;
    let mut any_retryable = false;
    let mut listings = Vec::new();
    for t in tasks {
        match t.await {
            Ok((admin, Ok((text, answer)))) => {
                any_ok = true;
                let _ = writeln!(out, "ok    {admin}  {text}");
                if let Some(line) = fleet_line(&answer) {
                    let _ = writeln!(out, "      {line}");
                    if line.starts_with("LAGGING") || line.starts_with("could not") {
                        all_ok = false;
                    }
                }
                if matches!(action, KillAction::List) {
                    listings.push((admin, answer));
                }
            }
            Ok((admin, Err(e))) => {
                all_ok = false;
                any_retryable |= e.retryable;
                let _ = writeln!(out, "FAIL  {admin}  {}", e.message);
            }
            Err(e) => {
                all_ok = false;
                any_retryable = true;
                let _ = writeln!(out, "FAIL  {e}");
            }
        }
    }
    let admin_flags: String = admins.iter().map(|a| format!(" --admin {a}")).collect();
    let admin_flags = match &action {
        KillAction::Add { local: true, .. } => format!(" --local{admin_flags}"),
        _ => admin_flags,
    };
    match &action {
        KillAction::Add {
            id: Some(id),
            dry_run: false,
            ..
        } if any_ok => {
            let _ = writeln!(out, "undo: fwgate kill rm {id}{admin_flags}");
        }
        KillAction::Add { dry_run: true, .. } => {
            let _ = writeln!(out, "dry run: nothing was changed");
        }
        _ => {}
    }
    if listings.len() > 1 {
        if let Some(report) = disagreement(&listings) {
            all_ok = false;
            out.push_str(&report);
        }
    }
    if !all_ok {
        let what = if any_retryable {
            "retry them once the cause shown is fixed (the same command is safe to repeat)"
        } else {
            "fix the cause shown for each, then run the command again"
        };
        let _ = writeln!(
            out,
            "some instances FAILED or disagree: they are not in the state shown above; {what}"
        );
    }
    (out, all_ok)
}

/// Why one instance did not do what was asked, and whether trying again can help.
#[derive(Debug)]
struct Failure {
    message: String,
    /// The instance was unreachable, slow or failed itself: the same command may work later.
    /// Otherwise (token, input) repeating it changes nothing.
    retryable: bool,
}

/// What a fleet-mode answer says about convergence, as one line.
fn fleet_line(answer: &Value) -> Option<String> {
    let f = answer.get("fleet")?;
    let revision = f["revision"].as_i64().unwrap_or(0);
    if let Some(why) = f["unknown"].as_str() {
        return Some(format!(
            "could not tell which instances applied revision {revision}: {why}"
        ));
    }
    let applied = f["applied"].as_array().map_or(0, Vec::len);
    let waited = f["waited_ms"].as_u64().unwrap_or(0);
    let lagging: Vec<String> = f["lagging"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| {
                    format!(
                        "{} (at revision {}, heard from {:.1}s ago)",
                        x["id"].as_str().unwrap_or("?"),
                        x["applied_revision"],
                        x["age_s"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(if lagging.is_empty() {
        format!(
            "fleet: revision {revision} applied by all {applied} live instance(s) in {waited} ms"
        )
    } else {
        format!(
            "LAGGING: after {waited} ms, revision {revision} is not applied by {}; applied by {applied}. It applies when they catch up; `fwgate fleet status` shows them",
            lagging.join(", ")
        )
    })
}

/// The active entries of one `GET /v1/killswitch` answer: id -> what identifies it.
fn entry_set(answer: &Value) -> BTreeMap<String, String> {
    answer["entries"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|e| e["active"].as_bool() != Some(false))
                .map(|e| {
                    (
                        e["id"].as_str().unwrap_or("?").to_string(),
                        format!(
                            "{} {} status {}{}",
                            e["scope"].as_str().unwrap_or("local"),
                            e["versions"].as_str().unwrap_or("?"),
                            e["status"],
                            e["expires_at"]
                                .as_u64()
                                .map(|x| format!(" until {x}"))
                                .unwrap_or_default()
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `None` when every instance lists the same active entries; else what differs, per entry.
fn disagreement(listings: &[(String, Value)]) -> Option<String> {
    let sets: Vec<(&str, BTreeMap<String, String>)> = listings
        .iter()
        .map(|(admin, v)| (admin.as_str(), entry_set(v)))
        .collect();
    if sets.windows(2).all(|w| w[0].1 == w[1].1) {
        return None;
    }
    let mut ids: Vec<&String> = sets.iter().flat_map(|(_, s)| s.keys()).collect();
    ids.sort();
    ids.dedup();
    let mut out = String::from("DISAGREE: the instances do not hold the same entries:\n");
    for id in ids {
        let seen: Vec<Option<&String>> = sets.iter().map(|(_, s)| s.get(id)).collect();
        if seen.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        let _ = writeln!(out, "      {id}:");
        for ((admin, _), entry) in sets.iter().zip(seen) {
            let _ = writeln!(
                out,
                "        {admin}  {}",
                entry.map(String::as_str).unwrap_or("MISSING")
            );
        }
    }
    Some(out)
}

async fn one(
    admin: &str,
    action: &KillAction,
    token: Option<&str>,
    actor: Option<&str>,
) -> Result<(String, Value), Failure> {
    match action {
        KillAction::Add {
            versions,
            reason,
            ttl,
            status,
            retry_after,
            keep_existing,
            drain,
            dry_run,
            id,
            local,
        } => {
            let mut body = json!({"versions": versions, "reason": reason, "id": id, "close_existing": !keep_existing});
            for (k, v) in [("ttl", ttl), ("retry_after", retry_after), ("drain", drain)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(s) = status {
                body["status"] = json!(s);
            }
            let path = match (*dry_run, *local) {
                (true, true) => "/v1/killswitch?dry_run=true&scope=local",
                (true, false) => "/v1/killswitch?dry_run=true",
                (false, true) => "/v1/killswitch?scope=local",
                (false, false) => "/v1/killswitch",
            };
            let v = expect(
                client::call(
                    admin,
                    Method::POST,
                    path,
                    token,
                    actor,
                    Some(body.to_string()),
                )
                .await,
                &[200, 201],
                "",
            )?;
            let e = &v["entry"];
            let matching = v["impact"]["matching_connections"].as_u64().unwrap_or(0);
            let closing = v["impact"]["closing"].as_u64().unwrap_or(0);
            let verb = if *dry_run { "would refuse" } else { "refusing" };
            let text = format!(
                "{verb} {} as {} ({}status {}{}): {matching} open connection(s) match{}",
                e["versions"].as_str().unwrap_or("?"),
                e["id"].as_str().unwrap_or("?"),
                match v["scope"].as_str() {
                    Some("fleet") => "fleet-wide, ",
                    Some("local") if *local => "this instance only, ",
                    _ => "",
                },
                e["status"],
                e["expires_at"]
                    .as_u64()
                    .map(|x| format!(
                        ", expires in {}s",
                        x.saturating_sub(crate::killswitch::unix_now())
                    ))
                    .unwrap_or_default(),
                if *dry_run || closing == 0 {
                    String::new()
                } else {
                    format!(
                        ", closing {closing} over {}",
                        e["drain"].as_str().unwrap_or("?")
                    )
                },
            );
            Ok((text, v))
        }
        KillAction::List => {
            let v = expect(
                client::call(admin, Method::GET, "/v1/killswitch", token, actor, None).await,
                &[200],
                "",
            )?;
            let entries = v["entries"].as_array().cloned().unwrap_or_default();
            if entries.is_empty() {
                return Ok(("no kill-switch entries".into(), v));
            }
            let mut s = format!(
                "{} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                let _ = write!(
                    s,
                    "\n      {}  {}  {}  status {}  {}  {} conn  {:?}",
                    e["id"].as_str().unwrap_or("?"),
                    e["scope"].as_str().unwrap_or("local"),
                    e["versions"].as_str().unwrap_or("?"),
                    e["status"],
                    match (e["active"].as_bool(), e["expires_in_s"].as_u64()) {
                        (Some(false), _) => "expired".to_string(),
                        (_, Some(s)) => format!("expires in {s}s"),
                        _ => "no expiry".to_string(),
                    },
                    e["matching_connections"],
                    e["reason"].as_str().unwrap_or(""),
                );
            }
            Ok((s, v))
        }
        KillAction::Remove { id, local } => {
            let v = expect(
                client::call(
                    admin,
                    Method::DELETE,
                    &format!(
                        "/v1/killswitch/{id}{}",
                        if *local { "?scope=local" } else { "" }
                    ),
                    token,
                    actor,
                    None,
                )
                .await,
                &[200],
                id,
            )?;
            let text = format!(
                "removed {id} ({}{})",
                v["removed"]["versions"].as_str().unwrap_or("?"),
                if v["scope"] == "fleet" {
                    ", fleet-wide"
                } else {
                    ""
                }
            );
            Ok((text, v))
        }
    }
}

/// The answer's JSON on an expected status; otherwise what went wrong and what to do about it.
/// `id` names the entry a removal was for.
fn expect(result: Result<(u16, String), String>, ok: &[u16], id: &str) -> Result<Value, Failure> {
    let (status, body) = result.map_err(|e| Failure {
        message: format!(
            "unreachable ({e}): is fwgate running there, and is this its [admin] addr?"
        ),
        retryable: true,
    })?;
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if ok.contains(&status) {
        return Ok(v);
    }
    let said = v["error"].as_str().unwrap_or(body.trim());
    let (advice, retryable) = match status {
        401 => ("wrong token: use the instance's token (FWGATE_ADMIN_TOKEN or --token-file must match its [admin] token_file)".to_string(), false),
        403 => ("the instance has no admin token configured, so it accepts no change: set [admin] token_file (or FWGATE_ADMIN_TOKEN) there and restart it".to_string(), false),
        404 if !id.is_empty() => (format!("no entry {id:?} there: `fwgate kill list` shows the ids in force"), false),
        400 | 404 | 405 | 422 => ("fix the command; nothing was changed".to_string(), false),
        _ => ("the instance failed (see its log); nothing was changed there".to_string(), true),
    };
    Err(Failure {
        message: format!("{status}: {said}: {advice}"),
        retryable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_that_differ_are_reported_per_entry() {
        let a = json!({"entries": [
            {"id": "x", "scope": "fleet", "versions": ">=3.8", "status": 503, "active": true},
            {"id": "old", "scope": "local", "versions": "*", "status": 503, "active": false},
        ]});
        let b = json!({"entries": [
            {"id": "x", "scope": "fleet", "versions": ">=3.8", "status": 503, "active": true},
        ]});
        let same = [("A".to_string(), a.clone()), ("B".to_string(), b.clone())];
        assert!(
            disagreement(&same).is_none(),
            "expired entries do not count"
        );
        let c = json!({"entries": []});
        let report = disagreement(&[("A".into(), a), ("C".into(), c)]).unwrap();
        assert!(report.contains("DISAGREE"), "{report}");
        assert!(report.contains("x:"), "{report}");
        assert!(report.contains("C  MISSING"), "{report}");
        assert!(!report.contains("old:"), "{report}");
    }

    #[test]
    fn fleet_answers_say_who_lags() {
        let v = json!({"fleet": {"revision": 7, "applied": ["a"], "lagging": [{"id": "b", "applied_revision": 5, "age_s": 0.5}], "waited_ms": 5000}});
        let line = fleet_line(&v).unwrap();
        assert!(
            line.starts_with("LAGGING") && line.contains("b (at revision 5"),
            "{line}"
        );
        let v = json!({"fleet": {"revision": 7, "applied": ["a", "b"], "lagging": [], "waited_ms": 12}});
        assert_eq!(
            fleet_line(&v).unwrap(),
            "fleet: revision 7 applied by all 2 live instance(s) in 12 ms"
        );
        assert!(fleet_line(&json!({"entry": {}})).is_none());
    }

    #[tokio::test]
    async fn a_change_that_reached_no_instance_offers_no_undo() {
        // Bound then dropped: nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (out, ok) = run(
            KillAction::Add {
                versions: "*".into(),
                reason: "test".into(),
                ttl: None,
                status: None,
                retry_after: None,
                keep_existing: false,
                drain: None,
                dry_run: false,
                id: None,
                local: false,
            },
            &[format!("http://{dead}")],
            Some("token".into()),
        )
        .await;
        assert!(!ok);
        assert!(out.contains("FAIL"), "{out}");
        assert!(!out.contains("undo"), "{out}");
    }
}
