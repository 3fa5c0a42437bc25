//! The incident console (`GET /` on the admin listener), driven in a real headless Chromium
//! over the DevTools protocol against the real proxy with real traffic: what it shows must be
//! what the JSON says, the slow cohort must be flagged, and the kill switch must work from the
//! page with the token and fail clearly without it. Skipped loudly without `chromium`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::cdp::{skip_without_chromium, Browser, Page};
use crate::etcd::{self, Etcd};
use crate::storm_backend::{self, BackendConfig};
use crate::util::*;

const GOOD: &str = "3.7.2";
const SLOW: &str = "3.8.0-b3";
/// The slow cohort's backend delay: its 101 comes this much later than everyone else's (which
/// come at once on loopback: well under a millisecond in a release build, a few in debug, but
/// up to a hundred or two on a loaded 2-core CI machine starting browsers for other tests, and
/// the census flags p99 at 5x the rest).
const SLOW_MS: u64 = 1000;
/// Admit everything: what the console shows is the traffic, the backend and the kill switch.
const RULES: &str = "# no rules: the defaults admit every version\n";

/// What the page asks for once and finds absent: `/v1/fleet` answers 404 when fleet mode is off
/// (the page then hides the fleet box and stops asking).
const EXPECTED_404S: &[&str] = &["/v1/fleet"];

/// The console with one refresh done.
async fn open_console<'b>(browser: &'b Browser, admin: SocketAddr) -> Page<'b> {
    let page = browser.open(&format!("http://{admin}/")).await;
    page.wait_for(
        "the first refresh",
        "Number(document.documentElement.dataset.refreshes) >= 1",
    )
    .await;
    page
}

/// Fails with the page's complaints, except the expected ones (substrings).
fn assert_no_problems(page: &Page<'_>, expected: &[&str]) {
    let problems: Vec<String> = page
        .problems()
        .into_iter()
        .filter(|p| !expected.iter().any(|e| p.contains(e)))
        .collect();
    assert!(problems.is_empty(), "the console complained: {problems:#?}");
}

/// `n` WebSocket handshakes of `version` through the proxy, all at once; the open sockets.
async fn handshakes(
    proxy: SocketAddr,
    version: &str,
    n: usize,
) -> Vec<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let headers = [("X-Firmware-Version", version)];
    let all =
        futures_util::future::join_all((0..n).map(|_| ws_connect(proxy, "/ws", &headers))).await;
    all.into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("handshake of {version} refused: {e}")))
        .collect()
}

async fn json(proxy: &Proxy, path: &str) -> Value {
    let (status, body) = admin_get(proxy, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"))
}

#[tokio::test]
async fn console_assets_carry_the_policy_and_every_import_is_served() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let (status, head, html) = get(proxy.admin, "/", &[]).await;
    assert_eq!(status, 200, "{head}");
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(
        header(&head, "content-security-policy")
            .unwrap()
            .starts_with("default-src 'self'"),
        "{head}"
    );
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "referrer-policy"), Some("no-referrer"));
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    let etag = header(&head, "etag").expect("an ETag").to_string();
    let (status, _, body) = get(proxy.admin, "/", &[("If-None-Match", &etag)]).await;
    assert_eq!((status, body.as_str()), (304, ""));
    // Walk the page's module graph: every file it names must be served, as the right type,
    // under the same policy (a missing asset is a blank console in production).
    let mut queue: Vec<String> = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let url = &part[..part.find('"').unwrap()];
            if url.starts_with('/') {
                queue.push(url.to_string());
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    while let Some(url) = queue.pop() {
        if !seen.insert(url.clone()) {
            continue;
        }
        let (status, head, body) = get(proxy.admin, &url, &[]).await;
        assert_eq!(status, 200, "{url} is referenced but not served");
        let ct = header(&head, "content-type").unwrap_or("");
        let expected = if url.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        };
        assert!(ct.starts_with(expected), "{url}: content-type {ct}");
        assert!(header(&head, "content-security-policy").is_some(), "{url}");
        assert!(header(&head, "etag").is_some(), "{url}");
        // `import ... from './x.js'` resolves against the importing file's directory.
        let dir = &url[..=url.rfind('/').unwrap()];
        for part in body.split("from './").skip(1) {
            let name = &part[..part.find('\'').unwrap()];
            queue.push(format!("{dir}{name}"));
        }
    }
    assert!(seen.len() >= 4, "the page names too few assets: {seen:?}");
    assert_eq!(get(proxy.admin, "/favicon.ico", &[]).await.0, 204);
    let (status, _) = admin_post(&proxy, "/", None, "").await;
    assert_eq!(status, 405);
    // The API is untouched: unknown paths are still the API's 404.
    assert_eq!(admin_get(&proxy, "/nope").await.0, 404);
    proxy.stop().await;
}

#[tokio::test]
async fn console_shows_the_traffic_and_flags_the_slow_cohort() {
    let Some(chromium) =
        skip_without_chromium("console_shows_the_traffic_and_flags_the_slow_cohort")
    else {
        return;
    };
    let (backend, backend_stats) = storm_backend::start(
        "127.0.0.1:0".parse().unwrap(),
        BackendConfig {
            slow_version: Some(SLOW.into()),
            slow: Duration::from_millis(SLOW_MS),
        },
    )
    .await
    .unwrap();
    let proxy = start_proxy(RULES, backend, "").await;
    // The good cohort a few at a time, so that its backend time is the backend's and not a
    // queue of 40 connects on a busy machine; the slow one all at once (its delay dominates).
    let mut good = Vec::new();
    for _ in 0..10 {
        good.extend(handshakes(proxy.addr, GOOD, 4).await);
    }
    let slow = handshakes(proxy.addr, SLOW, 30).await;
    assert_eq!(
        backend_stats
            .slowed
            .load(std::sync::atomic::Ordering::Relaxed),
        30,
        "the backend slowed exactly the slow cohort"
    );
    // The API's view first: the console must show this, not its own arithmetic.
    let report = json(&proxy, "/v1/versions").await;
    let row = |v: &str| -> Value {
        report["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == v)
            .cloned()
            .unwrap_or_else(|| panic!("{v} not in /v1/versions: {report:#}"))
    };
    let (good_row, slow_row) = (row(GOOD), row(SLOW));
    let p50 = |r: &Value| r["backend_last_minute"]["p50_ms"].as_f64().unwrap();
    assert!(
        p50(&slow_row) >= 20.0 * p50(&good_row),
        "the slow cohort's backend is at least 20x slower: {slow_row:#} vs {good_row:#}"
    );
    assert!(
        !slow_row["suspect"].is_null(),
        "API flags {SLOW}: {slow_row:#}"
    );
    assert!(
        good_row["suspect"].is_null(),
        "API does not flag {GOOD}: {good_row:#}"
    );

    let browser = Browser::launch(&chromium).await;
    let page = open_console(&browser, proxy.admin).await;
    // Both cohorts, the slow one first, marked in words and not only in colour.
    let order = page
        .wait_for(
            "both cohorts in the table",
            "(() => { const v = [...document.querySelectorAll('#cohort-rows tr:not(.suspect-detail)')].map(r => r.dataset.version); return v.length >= 2 ? v : null; })()",
        )
        .await;
    assert_eq!(order[0], SLOW, "suspects first: {order}");
    assert!(order.as_array().unwrap().iter().any(|v| v == GOOD));
    let sel = |v: &str, cell: &str| {
        format!("#cohort-rows tr[data-version='{v}']:not(.suspect-detail) td.{cell}")
    };
    assert!(page
        .text(&sel(SLOW, "suspect-flag"))
        .await
        .contains("SUSPECT"));
    assert_eq!(page.text(&sel(GOOD, "suspect-flag")).await, "no");
    let slow_class = page
        .eval(&format!(
            "document.querySelector(\"#cohort-rows tr[data-version='{SLOW}']\").className"
        ))
        .await;
    assert_eq!(slow_class, "suspect");
    let detail = page
        .text(&format!(
            "#cohort-rows tr.suspect-detail[data-version='{SLOW}']"
        ))
        .await;
    let kill_command = slow_row["suspect"]["kill_command"].as_str().unwrap();
    assert!(
        detail.contains(kill_command),
        "the suggested command is shown as the API gives it: {detail}"
    );
    // The figures are the API's, cell for cell.
    for (r, v) in [(&good_row, GOOD), (&slow_row, SLOW)] {
        assert_eq!(
            page.text(&sel(v, "handshakes")).await,
            r["handshakes_last_minute"].to_string(),
            "{v}"
        );
        assert_eq!(
            page.text(&sel(v, "active")).await,
            r["active_connections"].to_string(),
            "{v}"
        );
    }
    // Backend time as the API gives it (about 1 s), not "–" (no samples).
    let slow_p99 = page.text(&sel(SLOW, "p99")).await;
    assert!(slow_p99.ends_with(" s"), "{slow_p99}");
    let good_p99 = page.text(&sel(GOOD, "p99")).await;
    assert!(good_p99.ends_with(" ms"), "{good_p99}");
    // The suspect tile counts what the API counts.
    assert_eq!(
        page.text("#suspect-count").await,
        report["suspects"].to_string()
    );
    // The decisions chart drew bars for this traffic, and the backend chart its lines.
    page.wait_for(
        "admitted bars in the decisions chart",
        "[...document.querySelectorAll('#decisions-chart rect.fill-admitted')].some(r => Number(r.getAttribute('height')) > 0)",
    )
    .await;
    page.wait_for(
        "a p99 line in the backend chart",
        "document.querySelectorAll('#backend-chart .point.line-p99').length > 0",
    )
    .await;
    // Sorting by a header click, and back.
    page.click("#cohorts th[data-key='handshakes']").await;
    let first = page
        .eval("document.querySelector('#cohort-rows tr').dataset.version")
        .await;
    assert_eq!(first, GOOD, "40 handshakes sort above 30");
    page.click("#cohort-default-order").await;
    let first = page
        .eval("document.querySelector('#cohort-rows tr').dataset.version")
        .await;
    assert_eq!(first, SLOW);
    // A refresh keeps what the operator typed, where they scrolled, and the layout.
    page.type_into("#preview-text", "# half-typed rules").await;
    let before = page
        .eval("window.scrollTo(0, 300); [window.scrollY, document.body.scrollHeight, Number(document.documentElement.dataset.refreshes)]")
        .await;
    page.wait_for(
        "another refresh",
        &format!(
            "Number(document.documentElement.dataset.refreshes) > {}",
            before[2]
        ),
    )
    .await;
    let after = page
        .eval("[window.scrollY, document.body.scrollHeight, document.getElementById('preview-text').value]")
        .await;
    assert_eq!(
        (&after[0], &after[1]),
        (&before[0], &before[1]),
        "scroll position and page height"
    );
    assert_eq!(after[2], "# half-typed rules");
    assert_no_problems(&page, EXPECTED_404S);
    browser.close().await;
    drop((good, slow));
    proxy.stop().await;
}

#[tokio::test]
async fn console_adds_and_lifts_a_kill_switch_entry_with_the_token() {
    let Some(chromium) =
        skip_without_chromium("console_adds_and_lifts_a_kill_switch_entry_with_the_token")
    else {
        return;
    };
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    // A device of the version about to be refused, connected: the dry run must count it.
    let _open = handshakes(proxy.addr, SLOW, 1).await;
    let browser = Browser::launch(&chromium).await;
    let page = open_console(&browser, proxy.admin).await;
    page.wait_for(
        "the cohort row",
        &format!("document.querySelector(\"#cohort-rows tr[data-version='{SLOW}']\")"),
    )
    .await;

    page.type_into("#token", TEST_TOKEN).await;
    page.type_into("#kill-versions", &format!(">={SLOW}")).await;
    page.type_into("#kill-reason", "console test: slow cohort")
        .await;
    page.type_into("#kill-ttl", "10m").await;
    page.click("#kill-dry-run").await;
    page.wait_for(
        "the dry run's impact",
        "!document.getElementById('kill-preview').hidden",
    )
    .await;
    assert_eq!(page.text("#kill-impact-connections").await, "1");
    assert!(page
        .text("#kill-confirm")
        .await
        .contains(&format!(">={SLOW}")));
    let entries = json(&proxy, "/v1/killswitch").await;
    assert_eq!(
        entries["entries"].as_array().unwrap().len(),
        0,
        "a dry run changes nothing"
    );
    // Editing the form after the dry run withdraws the confirm button.
    page.type_into("#kill-ttl", "20m").await;
    assert_eq!(
        page.eval("document.getElementById('kill-preview').hidden")
            .await,
        Value::Bool(true)
    );
    page.click("#kill-dry-run").await;
    page.wait_for(
        "the dry run again",
        "!document.getElementById('kill-preview').hidden",
    )
    .await;
    page.click("#kill-confirm").await;
    page.wait_for(
        "the entry in the kill-switch panel",
        &format!("[...document.querySelectorAll('#kill-rows tr[data-id]')].some(r => r.textContent.includes('>={SLOW}'))"),
    )
    .await;
    assert!(page.text("#kill-message").await.contains("Refusing"));
    let entries = json(&proxy, "/v1/killswitch").await;
    let entry = &entries["entries"][0];
    assert_eq!(entry["versions"], format!(">={SLOW}"));
    assert_eq!(entry["reason"], "console test: slow cohort");
    assert_eq!(entry["created_by"], "console");
    let left = entry["expires_in_s"].as_u64().unwrap();
    assert!((1100..=1200).contains(&left), "20m TTL: {left}");
    // The countdown is on the page.
    let countdown = page.text("#kill-rows tr[data-id] td.expires").await;
    assert!(
        countdown.starts_with("19m") || countdown.starts_with("20m"),
        "{countdown}"
    );

    // A real device of that version is now refused; another version is not.
    let refused = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", SLOW)]).await;
    assert_eq!(handshake_status(&refused), 503);
    let other = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", GOOD)]).await;
    assert_eq!(handshake_status(&other), 101);
    // The refusal shows in the decisions chart by its kind, and the entry in its tile.
    page.wait_for(
        "a kill-switch refusal in the decisions chart",
        "document.querySelectorAll('#decisions-chart rect.fill-killswitch').length > 0",
    )
    .await;
    assert_eq!(page.text("#kill-count").await, "1");

    // Lift: two clicks, then the version is admitted again.
    page.click("#kill-rows tr[data-id] button.lift").await;
    page.click("#kill-rows tr[data-id] button.lift-confirm")
        .await;
    page.wait_for(
        "the entry gone from the panel",
        "document.querySelectorAll('#kill-rows tr[data-id]').length === 0",
    )
    .await;
    assert!(page.text("#kill-message").await.contains("Lifted"));
    let entries = json(&proxy, "/v1/killswitch").await;
    assert_eq!(entries["entries"].as_array().unwrap().len(), 0);
    let admitted = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", SLOW)]).await;
    assert_eq!(handshake_status(&admitted), 101);

    // The token stayed in the tab: no storage, no cookie, not in the URL.
    let kept = page
        .eval(&format!(
            "localStorage.length + sessionStorage.length + document.cookie.length + (location.href.includes('{TEST_TOKEN}') ? 1 : 0)"
        ))
        .await;
    assert_eq!(kept, 0);
    assert_no_problems(&page, EXPECTED_404S);
    browser.close().await;
    proxy.stop().await;
}

#[tokio::test]
async fn console_actions_without_the_token_fail_with_a_clear_message() {
    let Some(chromium) =
        skip_without_chromium("console_actions_without_the_token_fail_with_a_clear_message")
    else {
        return;
    };
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let unconfigured = start_proxy(RULES, backend.addr, "# no admin token\n").await;
    let browser = Browser::launch(&chromium).await;
    let page = open_console(&browser, proxy.admin).await;
    page.type_into("#kill-versions", &format!(">={SLOW}")).await;
    page.type_into("#kill-reason", "no token").await;

    // No token typed: nothing is sent, and the page says what to type and where it is.
    page.click("#kill-dry-run").await;
    let msg = page
        .wait_for(
            "the no-token message",
            "document.getElementById('kill-message').textContent",
        )
        .await;
    let msg = msg.as_str().unwrap();
    assert!(msg.contains("type the admin token"), "{msg}");
    assert!(msg.contains("token_file"), "{msg}");
    assert_no_problems(&page, EXPECTED_404S);

    // A wrong token: the API's 401, said plainly.
    page.type_into("#token", "not-the-token").await;
    page.click("#kill-dry-run").await;
    let msg = page
        .wait_for(
            "the 401 message",
            "(() => { const t = document.getElementById('kill-message').textContent; return t.includes('401') ? t : null; })()",
        )
        .await;
    assert!(msg.as_str().unwrap().contains("wrong"), "{msg}");
    assert!(
        page.eval("document.getElementById('kill-preview').hidden")
            .await
            == Value::Bool(true)
    );
    let entries = json(&proxy, "/v1/killswitch").await;
    assert_eq!(entries["entries"].as_array().unwrap().len(), 0);

    // An instance with no token configured: 403, and the page says how to configure one.
    let page = open_console(&browser, unconfigured.admin).await;
    page.type_into("#token", "anything").await;
    page.type_into("#kill-versions", &format!(">={SLOW}")).await;
    page.type_into("#kill-reason", "no token configured").await;
    page.click("#kill-dry-run").await;
    let msg = page
        .wait_for(
            "the 403 message",
            "(() => { const t = document.getElementById('kill-message').textContent; return t.includes('403') ? t : null; })()",
        )
        .await;
    assert!(
        msg.as_str().unwrap().contains("no admin token configured"),
        "{msg}"
    );
    let entries = json(&unconfigured, "/v1/killswitch").await;
    assert_eq!(entries["entries"].as_array().unwrap().len(), 0);
    browser.close().await;
    proxy.stop().await;
    unconfigured.stop().await;
}

/// The shipped rule, in shadow mode: 3.8.0-b3 is admitted, and counted as "would deny".
const SHADOW_RULES: &str = r#"
[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
mode = "shadow"
"#;

#[tokio::test]
async fn console_explains_previews_and_shows_rules_audit_and_upstream() {
    let Some(chromium) =
        skip_without_chromium("console_explains_previews_and_shows_rules_audit_and_upstream")
    else {
        return;
    };
    let backend = ws_backend().await;
    let proxy = start_proxy(SHADOW_RULES, backend.addr, "").await;
    let _slow = handshakes(proxy.addr, SLOW, 3).await;
    let _good = handshakes(proxy.addr, GOOD, 2).await;
    let browser = Browser::launch(&chromium).await;
    let page = open_console(&browser, proxy.admin).await;

    // Explain: the page shows what /v1/explain says, text included.
    page.type_into("#explain-version", "v3.8.0b3").await;
    page.click("#explain-run").await;
    let shown = page
        .wait_for(
            "the explanation",
            "document.querySelector('#explain-result .explain-text')?.textContent",
        )
        .await;
    let api = json(&proxy, "/v1/explain?version=v3.8.0b3").await;
    assert_eq!(
        shown, api["text"],
        "the page prints what fwgate explain prints"
    );
    assert!(shown.as_str().unwrap().contains("shadow"), "{shown}");
    assert_eq!(
        page.text("#explain-result .explain-decision").await,
        "allow"
    );

    // Rules preview: the shadow rule enforced would newly refuse the 3 open 3.8.0-b3 devices.
    let enforced = SHADOW_RULES.replace("mode = \"shadow\"", "mode = \"enforce\"");
    page.type_into("#preview-text", &enforced).await;
    page.click("#preview-run").await;
    page.wait_for(
        "the preview totals",
        "document.querySelector('#preview-result .total-newly_refused')",
    )
    .await;
    let (status, body) = admin_post(&proxy, "/v1/rules/preview", None, &enforced).await;
    assert_eq!(status, 200, "{body}");
    let api: Value = serde_json::from_str(&body).unwrap();
    let refused = &api["totals"]["newly_refused"];
    assert_eq!(refused["versions"], 1, "{api:#}");
    assert_eq!(refused["active_connections"], 3, "{api:#}");
    let text = page.text("#preview-result .total-newly_refused").await;
    assert!(
        text.starts_with("1 versions · 3 open connections"),
        "{text}"
    );
    let changes = page.text("#preview-result table").await;
    assert!(
        changes.contains(SLOW) && changes.contains("newly refused"),
        "{changes}"
    );
    // Nothing was applied.
    assert_eq!(json(&proxy, "/v1/rules").await["generation"], 1);
    // An invalid file: the error with its location, on the page.
    page.type_into("#preview-text", "x = [").await;
    page.click("#preview-run").await;
    let error = page
        .wait_for(
            "the invalid-file message",
            "document.querySelector('#preview-result .message.error')?.textContent",
        )
        .await;
    assert!(error.as_str().unwrap().contains("rules.toml:1:"), "{error}");

    // Apply it for real: the rules panel shows the new generation and the diff, the audit
    // trail the change, in the API's order.
    std::fs::write(proxy.rules_path(), &enforced).unwrap();
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    page.wait_for(
        "generation 2 on the page",
        "document.getElementById('rules-generation').textContent === '2'",
    )
    .await;
    assert_eq!(
        page.text("#rules-diff .del").await,
        "- mode = \"shadow\"",
        "the diff against generation 1"
    );
    assert_eq!(page.text("#rules-diff .add").await, "+ mode = \"enforce\"");
    let audit = json(&proxy, "/v1/audit").await;
    let newest = audit["events"][0]["action"].as_str().unwrap().to_string();
    assert_eq!(newest, "rules_applied", "{audit:#}");
    page.wait_for(
        "the reload in the audit trail",
        "document.querySelector('#audit-rows tr')?.className === 'audit-rules_applied'",
    )
    .await;

    // Upstream: the state the API reports, in the panel and the tile.
    let upstream = json(&proxy, "/v1/upstream").await;
    let state = upstream["state"].as_str().unwrap();
    assert_eq!(page.text("#upstream-state").await, state);
    assert!(page
        .text("#upstream-facts")
        .await
        .contains(&backend.addr.to_string()));
    // Fleet mode is off: no fleet box.
    assert_eq!(
        page.eval("document.getElementById('fleet-box').hidden")
            .await,
        Value::Bool(true)
    );
    // The invalid file's 422 is the browser's own note of an answer the page handled.
    assert_no_problems(&page, &["/v1/fleet", "422 (Unprocessable Entity)"]);
    browser.close().await;
    proxy.stop().await;
}

#[tokio::test]
async fn console_shows_the_fleet_in_fleet_mode() {
    let Some(chromium) = skip_without_chromium("console_shows_the_fleet_in_fleet_mode") else {
        return;
    };
    if !etcd::available("console_shows_the_fleet_in_fleet_mode") {
        return;
    }
    let store = Etcd::start().await;
    let backend = ws_backend().await;
    let fleet = |id: &str| {
        format!(
            "[fleet]\netcd = [\"{}\"]\ninstance_id = \"{id}\"\nheartbeat_interval = \"200ms\"\n",
            store.url()
        )
    };
    let a = start_proxy(RULES, backend.addr, &fleet("console-a")).await;
    let b = start_proxy(RULES, backend.addr, &fleet("console-b")).await;
    let browser = Browser::launch(&chromium).await;
    let page = open_console(&browser, a.admin).await;
    let ids = page
        .wait_for(
            "both instances in the fleet box",
            "(() => { const r = [...document.querySelectorAll('#fleet-rows tr')].map(t => t.cells[0].textContent); return !document.getElementById('fleet-box').hidden && r.length === 2 ? r : null; })()",
        )
        .await;
    assert_eq!(ids, serde_json::json!(["console-a", "console-b"]));
    let facts = page
        .wait_for(
            "convergence",
            "(() => { const t = document.getElementById('fleet-facts').textContent; return t.includes('yes: every live instance') ? t : null; })()",
        )
        .await;
    assert!(facts.as_str().unwrap().contains("console-a"), "{facts}");

    // A kill switch added on one instance's console holds on the other, and lifts there too.
    page.type_into("#token", TEST_TOKEN).await;
    page.type_into("#kill-versions", &format!("={SLOW}")).await;
    page.type_into("#kill-reason", "fleet-wide from the console")
        .await;
    page.click("#kill-dry-run").await;
    page.wait_for(
        "the fleet-wide dry run",
        "!document.getElementById('kill-preview').hidden && document.getElementById('kill-preview-body').textContent.includes('every instance of the fleet')",
    )
    .await;
    page.click("#kill-confirm").await;
    page.wait_for(
        "the fleet entry on the page",
        "document.querySelectorAll('#kill-rows tr[data-id]').length === 1",
    )
    .await;
    eventually("instance b refuses the version", || async {
        handshake_status(&ws_connect(b.addr, "/ws", &[("X-Firmware-Version", SLOW)]).await) == 503
    })
    .await;
    page.click("#kill-rows tr[data-id] button.lift").await;
    page.click("#kill-rows tr[data-id] button.lift-confirm")
        .await;
    page.wait_for(
        "the entry lifted",
        "document.querySelectorAll('#kill-rows tr[data-id]').length === 0",
    )
    .await;
    eventually("instance b admits the version again", || async {
        handshake_status(&ws_connect(b.addr, "/ws", &[("X-Firmware-Version", SLOW)]).await) == 101
    })
    .await;
    // In fleet mode every endpoint the page reads exists: not one complaint.
    assert_no_problems(&page, &[]);
    browser.close().await;
    a.stop().await;
    b.stop().await;
}
