//! `fwgate check --preview`: what the rules file of `--config` would change on the live
//! instances, before anyone applies it. Each instance answers `POST /v1/rules/preview` from
//! its own census and open connections; this sums them per version and prints one screen.
//! Nothing is applied anywhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use http::Method;
use serde_json::Value;

use crate::admin::client;

/// One version's change, summed over the instances.
#[derive(Default)]
struct Summed {
    from: String,
    to: String,
    active: u64,
    per_minute: u64,
}

/// Posts `rules_text` to every instance in `admins`; returns (output, every instance answered
/// and the file is valid). The file's warnings are `check`'s to print, not repeated here.
pub async fn preview(rules_text: &str, admins: &[String]) -> (String, bool) {
    let mut tasks = Vec::new();
    for admin in admins {
        let (admin, body) = (admin.clone(), rules_text.to_string());
        tasks.push(tokio::spawn(async move {
            let answer = client::call(
                &admin,
                Method::POST,
                "/v1/rules/preview",
                None,
                None,
                Some(body),
            )
            .await;
            (admin, answer)
        }));
    }
    let mut out = String::new();
    let mut ok = true;
    let mut answered = 0;
    let mut changes: BTreeMap<(String, String), Summed> = BTreeMap::new();
    for t in tasks {
        let Ok((admin, answer)) = t.await else {
            ok = false;
            continue;
        };
        let parsed = answer.and_then(|(status, body)| {
            let v: Value = serde_json::from_str(&body).map_err(|_| {
                format!("answered {status}, not a preview (an fwgate older than the preview?)")
            })?;
            match status {
                200 => Ok(v),
                422 => Err(format!(
                    "the rules file is invalid there: {}",
                    v["error"].as_str().unwrap_or("?")
                )),
                404 => Err("this instance has no preview endpoint (upgrade it)".into()),
                other => Err(format!(
                    "answered {other}: {}",
                    v["error"].as_str().unwrap_or("?")
                )),
            }
        });
        match parsed {
            Ok(v) => {
                answered += 1;
                let _ = writeln!(out, "ok    {admin}");
                for c in v["changes"].as_array().into_iter().flatten() {
                    let key = (
                        c["change"].as_str().unwrap_or("?").to_string(),
                        c["version"].as_str().unwrap_or("?").to_string(),
                    );
                    let s = changes.entry(key).or_default();
                    let side = |x: &Value| {
                        format!(
                            "{} ({})",
                            x["decision"].as_str().unwrap_or("?"),
                            x["rule"].as_str().unwrap_or("?")
                        )
                    };
                    s.from = side(&c["from"]);
                    s.to = side(&c["to"]);
                    s.active += c["active_connections"].as_u64().unwrap_or(0);
                    s.per_minute += c["handshakes_last_minute"].as_u64().unwrap_or(0);
                }
            }
            Err(e) => {
                ok = false;
                let _ = writeln!(out, "FAIL  {admin}  {e}");
            }
        }
    }
    let _ = writeln!(
        out,
        "\nimpact over {answered} instance(s), from their census of the last minute and their open connections (nothing was applied):"
    );
    for kind in [
        "newly_refused",
        "newly_admitted",
        "newly_limited",
        "no_longer_limited",
    ] {
        let rows: Vec<&Summed> = changes
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|(_, s)| s)
            .collect();
        let _ = writeln!(
            out,
            "  {:<18} {:>3} version(s) {:>7} open connection(s) {:>8} handshakes/min",
            kind.replace('_', " "),
            rows.len(),
            rows.iter().map(|s| s.active).sum::<u64>(),
            rows.iter().map(|s| s.per_minute).sum::<u64>(),
        );
    }
    if !changes.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<18} {:<16} {:<28} {:<28} {:>6} {:>8}",
            "change", "version", "now", "then", "open", "per min"
        );
        for ((kind, version), s) in &changes {
            let _ = writeln!(
                out,
                "  {:<18} {:<16} {:<28} {:<28} {:>6} {:>8}",
                kind.replace('_', " "),
                version,
                s.from,
                s.to,
                s.active,
                s.per_minute
            );
        }
    } else if answered > 0 {
        let _ = writeln!(
            out,
            "\n  no version seen by these instances would be decided differently"
        );
    }
    if !ok {
        let _ = writeln!(
            out,
            "\nsome instances did not answer: the impact above leaves them out"
        );
    }
    (out, ok && answered > 0)
}

/// `fwgate check --preview [--admin URL]...`: the rules file of `config` against the
/// instances given, else the live instances of its fleet (fleet mode), else its own admin
/// address. Run after `check` said the file is valid.
pub async fn run(config: &crate::config::Config, admins: Vec<String>) -> (String, bool) {
    let text = match &config.rules_path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return (format!("cannot read {}: {e}\n", path.display()), false),
        },
        None => crate::rules::file::EMBEDDED_RULES.to_string(),
    };
    let admins = if !admins.is_empty() {
        admins
    } else if config.fleet.is_some() {
        match crate::fleet::cli::live_admins(config).await {
            Ok(list) if !list.is_empty() => list,
            Ok(_) => return ("no live instance in the fleet to ask\n".into(), false),
            Err(e) => return (format!("{e}\n"), false),
        }
    } else {
        vec![format!("http://{}", config.admin.addr)]
    };
    preview(&text, &admins).await
}
