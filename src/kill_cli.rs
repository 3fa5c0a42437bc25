//! `fwgate kill`: manage kill-switch entries through the admin API of one or many instances.
//! Output is short and human: what was refused, how many connections it hit, how to undo it.
//! The exit status is non-zero if any instance failed.

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
    },
    /// List entries.
    List,
    /// Remove an entry (undo).
    #[command(name = "rm")]
    Remove {
        /// The entry id.
        id: String,
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
    for t in tasks {
        match t.await {
            Ok((admin, Ok(text))) => {
                any_ok = true;
                let _ = writeln!(out, "ok    {admin}  {text}");
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
    if !all_ok {
        let what = if any_retryable {
            "retry them once the cause shown is fixed (the same command is safe to repeat)"
        } else {
            "fix the cause shown for each, then run the command again"
        };
        let _ = writeln!(
            out,
            "some instances FAILED: they are not in the state shown above; {what}"
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

async fn one(
    admin: &str,
    action: &KillAction,
    token: Option<&str>,
    actor: Option<&str>,
) -> Result<String, Failure> {
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
            let path = if *dry_run {
                "/v1/killswitch?dry_run=true"
            } else {
                "/v1/killswitch"
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
            Ok(format!(
                "{verb} {} as {} (status {}{}): {matching} open connection(s) match{}",
                e["versions"].as_str().unwrap_or("?"),
                e["id"].as_str().unwrap_or("?"),
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
            ))
        }
        KillAction::List => {
            let v = expect(
                client::call(admin, Method::GET, "/v1/killswitch", token, actor, None).await,
                &[200],
                "",
            )?;
            let entries = v["entries"].as_array().cloned().unwrap_or_default();
            if entries.is_empty() {
                return Ok("no kill-switch entries".into());
            }
            let mut s = format!(
                "{} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                let _ = write!(
                    s,
                    "\n      {}  {}  status {}  {}  {} conn  {:?}",
                    e["id"].as_str().unwrap_or("?"),
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
            Ok(s)
        }
        KillAction::Remove { id } => {
            let v = expect(
                client::call(
                    admin,
                    Method::DELETE,
                    &format!("/v1/killswitch/{id}"),
                    token,
                    actor,
                    None,
                )
                .await,
                &[200],
                id,
            )?;
            Ok(format!(
                "removed {id} ({})",
                v["removed"]["versions"].as_str().unwrap_or("?")
            ))
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
