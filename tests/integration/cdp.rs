//! A small Chrome DevTools Protocol client for the console tests: it starts Debian's headless
//! `chromium` with its own temporary profile, opens a page, evaluates JavaScript in it, types
//! like a keyboard, and collects what the page complained about (console errors, uncaught
//! exceptions, failed loads). [`Browser::close`] shuts it down cleanly; on drop (a failed
//! test) its process group is killed. Either way its temporary profile is removed.
//!
//! No sleeps: every wait polls the page with a deadline and says what it waited for.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::util::DEADLINE;

/// The chromium binary: `$FWGATE_CHROMIUM`, else `chromium` (Debian) or `chromium-browser`
/// on `PATH`. None when there is none.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FWGATE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Where the test is skipped, and why, in a way nobody can miss in the output.
pub fn skip_without_chromium(test: &str) -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        eprintln!(
            "\n*** SKIPPED {test}: no `chromium` on PATH (and FWGATE_CHROMIUM unset). \
             Install it (`apt-get install chromium`, as .ci/run does) to run the console's \
             browser tests. ***\n"
        );
    }
    found
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A running headless chromium and the DevTools connection to it.
pub struct Browser {
    child: Child,
    /// The temporary user-data directory (removed once the browser is gone).
    profile: PathBuf,
    outbox: mpsc::UnboundedSender<String>,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
        if matches!(self.child.try_wait(), Ok(None)) {
            // Not closed (the test failed): kill the browser and its helpers, which share its
            // process group, by that group's id; the plain kill is the fallback.
            let group = format!("-{}", self.child.id());
            let killed = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !killed {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        // A helper that was still exiting may write one last file: try again a few times.
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.profile) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(25));
                }
                _ => break,
            }
        }
    }
}

impl Browser {
    /// Starts `binary` headless (flags from DEPENDENCIES.md and the machine notes: no sandbox
    /// as root, no GPU, no background networking, a fresh profile) and connects to it.
    pub async fn launch(binary: &std::path::Path) -> Browser {
        let profile = tempfile::tempdir().unwrap().keep();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-crash-reporter",
                "--disable-breakpad",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Its own process group, so that the helpers it starts can be killed with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // A thread reads stderr for the whole life of the browser (so it never blocks on a
        // full pipe), hands over the DevTools address, and keeps the rest for diagnostics.
        let stderr = Arc::new(Mutex::new(String::new()));
        let (url_tx, url_rx) = oneshot::channel::<String>();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
                let mut log = log.lock().unwrap();
                if log.len() < 64 * 1024 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let url = match tokio::time::timeout(DEADLINE, url_rx).await {
            Ok(Ok(url)) => url,
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&profile);
                panic!(
                    "chromium did not print its DevTools address ({}):\n{}",
                    if outcome.is_err() {
                        "timed out"
                    } else {
                        "it exited"
                    },
                    stderr.lock().unwrap()
                );
            }
        };
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(&url))
            .await
            .expect("DevTools connect timed out")
            .unwrap_or_else(|e| panic!("cannot connect to DevTools at {url}: {e}"));
        let (mut sink, mut source) = ws.split();
        let (outbox, mut outbox_rx) = mpsc::unbounded_channel::<String>();
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, ev) = (pending.clone(), events.clone());
        let reader = tokio::spawn(async move {
            loop {
                tokio::select! {
                    out = outbox_rx.recv() => match out {
                        Some(text) => if sink.send(Message::text(text)).await.is_err() { return },
                        None => return,
                    },
                    msg = source.next() => {
                        let Some(Ok(msg)) = msg else { return };
                        let Ok(text) = msg.into_text() else { continue };
                        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                        match v.get("id").and_then(Value::as_u64) {
                            Some(id) => {
                                if let Some(tx) = p.lock().unwrap().remove(&id) {
                                    let _ = tx.send(v);
                                }
                            }
                            None => ev.lock().unwrap().push(v),
                        }
                    }
                }
            }
        });
        Browser {
            child,
            profile,
            outbox,
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader,
            stderr,
        }
    }

    /// Asks the browser to quit and waits until it has (helpers included); then drop removes
    /// the profile.
    pub async fn close(mut self) {
        let _ = self
            .outbox
            .send(json!({"id": 0, "method": "Browser.close", "params": {}}).to_string());
        let until = tokio::time::Instant::now() + DEADLINE;
        while matches!(self.child.try_wait(), Ok(None)) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Still running after the deadline: drop kills it.
    }

    /// Sends one command (to a page when `session` is set) and waits for its answer.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.outbox
            .send(msg.to_string())
            .unwrap_or_else(|_| panic!("DevTools connection closed before {method}"));
        let answer = tokio::time::timeout(DEADLINE, rx)
            .await
            .unwrap_or_else(|_| panic!("no DevTools answer to {method} within {DEADLINE:?}"))
            .unwrap_or_else(|_| {
                panic!(
                    "DevTools connection closed during {method}; chromium said:\n{}",
                    self.stderr.lock().unwrap()
                )
            });
        if let Some(err) = answer.get("error") {
            panic!("DevTools {method} failed: {err}");
        }
        answer["result"].clone()
    }

    /// Opens `url` in a new tab of 1400×1000 and waits until it has loaded.
    pub async fn open(&self, url: &str) -> Page<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        let page = Page {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let nav = page.call("Page.navigate", json!({"url": url})).await;
        assert!(
            nav.get("errorText").is_none(),
            "cannot open {url}: {}",
            nav["errorText"]
        );
        page.wait_for(
            "the page to finish loading",
            "document.readyState === 'complete'",
        )
        .await;
        page
    }
}

/// One tab.
pub struct Page<'b> {
    browser: &'b Browser,
    session: String,
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value as JSON;
    /// panics, with the page's complaints, when it throws.
    pub async fn eval(&self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!(
                "evaluating `{expr}` threw: {}\npage problems: {:#?}",
                ex["exception"]["description"].as_str().unwrap_or("?"),
                self.problems()
            );
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy; panics after the deadline with `what`, the last value,
    /// what the page complained about and what it shows.
    pub async fn wait_for(&self, what: &str, expr: &str) -> Value {
        let until = tokio::time::Instant::now() + DEADLINE;
        let wrapped =
            format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return null; }} }})()");
        loop {
            let v = self.eval(&wrapped).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() > until {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "timed out after {DEADLINE:?} waiting for {what}\n`{expr}` was {v}\npage problems: {:#?}\npage text:\n{}",
                    self.problems(),
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element `selector` names (its click handlers run as for a mouse click).
    pub async fn click(&self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({sel}); if (!el || el.disabled) return false; el.scrollIntoView({{block: 'center'}}); el.click(); return true; }})()"
            ))
            .await;
        assert_eq!(
            found,
            Value::Bool(true),
            "no enabled element {selector} to click"
        );
    }

    /// Focuses `selector`, clears it, and types `text` as keyboard input would (input events).
    pub async fn type_into(&self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({sel}); if (!el) return false; el.focus(); el.select(); return true; }})()"
            ))
            .await;
        assert_eq!(
            found,
            Value::Bool(true),
            "no element {selector} to type into"
        );
        if text.is_empty() {
            self.call("Input.dispatchKeyEvent", json!({"type": "keyDown", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8}))
                .await;
            self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8}))
                .await;
        } else {
            self.call("Input.insertText", json!({"text": text})).await;
        }
    }

    /// The text content of `selector` (empty when absent).
    pub async fn text(&self, selector: &str) -> String {
        let sel = serde_json::to_string(selector).unwrap();
        self.eval(&format!(
            "(() => {{ const el = document.querySelector({sel}); return el ? el.textContent : ''; }})()"
        ))
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// What this page complained about: console errors and assertions, uncaught exceptions,
    /// and error log entries (failed loads among them), as one line each.
    pub fn problems(&self) -> Vec<String> {
        let events = self.browser.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e["sessionId"] == self.session.as_str())
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Runtime.consoleAPICalled"
                        if matches!(p["type"].as_str(), Some("error" | "assert")) =>
                    {
                        let args: Vec<String> = p["args"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| {
                                a["value"]
                                    .as_str()
                                    .map(str::to_string)
                                    .or_else(|| a["description"].as_str().map(str::to_string))
                                    .unwrap_or_else(|| a.to_string())
                            })
                            .collect();
                        Some(format!(
                            "console.{}: {}",
                            p["type"].as_str()?,
                            args.join(" ")
                        ))
                    }
                    "Runtime.exceptionThrown" => Some(format!(
                        "uncaught: {}",
                        p["exceptionDetails"]["exception"]["description"]
                            .as_str()
                            .or(p["exceptionDetails"]["text"].as_str())
                            .unwrap_or("?")
                    )),
                    "Log.entryAdded" if p["entry"]["level"] == "error" => Some(format!(
                        "log ({}): {} {}",
                        p["entry"]["source"].as_str().unwrap_or("?"),
                        p["entry"]["text"].as_str().unwrap_or("?"),
                        p["entry"]["url"].as_str().unwrap_or("")
                    )),
                    _ => None,
                }
            })
            .collect()
    }
}
