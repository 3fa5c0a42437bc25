//! Hot reload: every way people replace files, invalid files, SIGHUP, the API, and what
//! happens to open connections.

use std::os::unix::fs::symlink;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

fn rules_blocking(range: &str) -> String {
    format!("[[rule]]\nname = \"block\"\nversions = \"{range}\"\naction = \"deny\"\nstatus = 503\n")
}

async fn status_for(proxy: &Proxy, version: &str) -> u16 {
    get(proxy.addr, "/", &[("X-Firmware-Version", version)])
        .await
        .0
}

async fn wait_refused(proxy: &Proxy, version: &str, what: &str) {
    eventually(what, || async { status_for(proxy, version).await == 503 }).await;
}

#[tokio::test]
async fn write_in_place_applies_within_the_target() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    assert_eq!(status_for(&proxy, "3.8.0").await, 200);
    let started = Instant::now();
    std::fs::write(proxy.rules_path(), rules_blocking(">=3.8.0-b3")).unwrap();
    wait_refused(&proxy, "3.8.0", "in-place write applied").await;
    let took = started.elapsed();
    // Target is 500 ms; allow slack for a loaded 2-core CI machine.
    assert!(took < Duration::from_secs(3), "reload took {took:?}");
    assert_eq!(metric(&proxy, "fwgate_rules_generation").await, Some(2.0));
    proxy.stop().await;
}

#[tokio::test]
async fn temp_file_then_rename_applies() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    let tmp = proxy.dir.path().join(".rules.toml.tmp");
    std::fs::write(&tmp, rules_blocking(">=3.8.0-b3")).unwrap();
    std::fs::rename(&tmp, proxy.rules_path()).unwrap();
    wait_refused(&proxy, "3.8.0", "rename applied").await;
    // And a second rename still works (the watch survived the first).
    std::fs::write(&tmp, rules_blocking(">=3.9")).unwrap();
    std::fs::rename(&tmp, proxy.rules_path()).unwrap();
    eventually("second rename applied", || async {
        status_for(&proxy, "3.8.0").await == 200
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn vim_style_backup_and_delete_recreate_apply() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    let path = proxy.rules_path();
    // vim: rename the original to a backup, write a new file, delete the backup.
    let backup = proxy.dir.path().join("rules.toml~");
    std::fs::rename(&path, &backup).unwrap();
    std::fs::write(&path, rules_blocking(">=3.8.0-b3")).unwrap();
    std::fs::remove_file(&backup).unwrap();
    wait_refused(&proxy, "3.8.0", "vim-style save applied").await;
    // Delete and recreate.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, rules_blocking(">=3.7")).unwrap();
    wait_refused(&proxy, "3.7.0", "delete + recreate applied").await;
    proxy.stop().await;
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_applies() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    // Lay out a ConfigMap volume in a sub-directory and point the proxy's rules at it by
    // rewriting fwgate's rules path: rules.toml -> ..data/rules.toml, ..data -> ..2026_1.
    let dir = proxy.dir.path();
    let cm = |name: &str, range: &str| {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("rules.toml"), rules_blocking(range)).unwrap();
    };
    cm("..2026_1", ">=9");
    symlink("..2026_1", dir.join("..data")).unwrap();
    std::fs::remove_file(dir.join("rules.toml")).unwrap();
    symlink("..data/rules.toml", dir.join("rules.toml")).unwrap();
    eventually("still admitted through the first symlink", || async {
        status_for(&proxy, "3.8.0").await == 200
    })
    .await;
    // The atomic swap: new timestamped dir, new ..data_tmp symlink renamed over ..data, old dir removed.
    for (i, range) in [(2, ">=3.8.0-b3"), (3, ">=3.7")] {
        let name = format!("..2026_{i}");
        cm(&name, range);
        symlink(&name, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join(format!("..2026_{}", i - 1))).unwrap();
        let probe = if i == 2 { "3.8.0" } else { "3.7.0" };
        wait_refused(&proxy, probe, &format!("configmap swap {i} applied")).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn invalid_file_keeps_old_rules_and_reports_the_error() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=3.8.0-b3"), backend.addr, "").await;
    std::fs::write(
        proxy.rules_path(),
        "[[rule]]\nname = \"block\"\nversions = \">=3.8.0-b3,\"\naction = \"deny\"\n",
    )
    .unwrap();
    eventually("reload error reported", || async {
        metric(&proxy, "fwgate_rules_reloads_total{result=\"error\"}").await == Some(1.0)
    })
    .await;
    assert_eq!(
        status_for(&proxy, "3.8.0").await,
        503,
        "old rules must stay in force"
    );
    assert_eq!(status_for(&proxy, "3.7.0").await, 200);
    let (_, body) = admin_get(&proxy, "/v1/rules").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let err = v["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error: {body}"));
    assert!(err.contains("rules.toml:3:"), "{err}");
    assert_eq!(v["generation"], 1);
    // The API reports the same error.
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 422, "{body}");
    // A valid file clears the error.
    std::fs::write(proxy.rules_path(), rules_blocking(">=3.7")).unwrap();
    wait_refused(&proxy, "3.7.0", "valid file applied after an invalid one").await;
    let (_, body) = admin_get(&proxy, "/v1/rules").await;
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["last_error"].is_null());
    proxy.stop().await;
}

#[tokio::test]
async fn reload_api_applies_and_reports_generation() {
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    std::fs::write(proxy.rules_path(), rules_blocking(">=3.8.0-b3")).unwrap();
    // The watcher may win the race; either way the API must answer with the generation in force.
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 2, "{body}");
    assert_eq!(status_for(&proxy, "3.8.0").await, 503);
    proxy.stop().await;
}

#[tokio::test]
async fn open_websocket_survives_a_reload() {
    let backend = ws_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    let mut ws = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.8.0")])
        .await
        .unwrap();
    // Refuse its version from now on, without close_existing: it must be kept.
    std::fs::write(proxy.rules_path(), rules_blocking(">=3.8.0-b3")).unwrap();
    wait_refused(&proxy, "3.8.0", "new rules applied").await;
    ws.send(Message::text("still here")).await.unwrap();
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("still here"));
    proxy.stop().await;
}

#[tokio::test]
async fn close_existing_closes_exactly_the_matching_tunnels_within_the_drain() {
    let backend = ws_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for i in 0..4 {
        bad.push(
            ws_connect(
                proxy.addr,
                "/ws",
                &[("X-Firmware-Version", &format!("3.8.0-b{}", 3 + i))],
            )
            .await
            .unwrap(),
        );
        good.push(
            ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.7.0")])
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    std::fs::write(
        proxy.rules_path(),
        "[[rule]]\nname = \"block\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\nclose_existing = true\ndrain = \"1s\"\n",
    )
    .unwrap();
    for mut ws in bad {
        let end = tokio::time::timeout(DEADLINE, async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a matching tunnel was not closed");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "closing took {took:?} for a 1s drain"
    );
    for ws in good.iter_mut() {
        ws.send(Message::text("ok")).await.unwrap();
        let got = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text("ok"), "a non-matching tunnel was harmed");
    }
    assert_eq!(
        metric(&proxy, "fwgate_tunnels_closed_by_policy_total").await,
        Some(4.0)
    );
    assert_eq!(backend.connections(), 8);
    proxy.stop().await;
}

/// A child process that is killed if the test fails before it exits on its own.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGHUP needs a real process. The change is made where the watcher cannot see it: the
/// configured `rules.toml` is a symlink into a sub-directory, and the real file is rewritten in
/// place there, so the watched directory gets no event and the periodic re-check (30 s) is
/// longer than the deadline. Only SIGHUP can apply it in time.
#[tokio::test]
async fn sighup_reloads_the_binary() {
    sighup_reloads_the_binary_with(0).await;
}

/// The same with one worker: the single-threaded scheduler serves, reloads and stops too.
#[tokio::test]
async fn sighup_reloads_the_binary_with_one_worker() {
    sighup_reloads_the_binary_with(1).await;
}

async fn sighup_reloads_the_binary_with(workers: usize) {
    let backend = http_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let free = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin) = (free(()), free(()));
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("rules.toml"), rules_blocking(">=9")).unwrap();
    symlink("real/rules.toml", dir.path().join("rules.toml")).unwrap();
    std::fs::write(
        dir.path().join("fwgate.toml"),
        format!("workers = {workers}\nrules = \"rules.toml\"\n[listen]\naddr = \"{listen}\"\n[upstream]\naddr = \"{}\"\n[admin]\naddr = \"{admin}\"\n[log]\naccess = false\n", backend.addr),
    )
    .unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_fwgate"))
            .args([
                "run",
                "--config",
                dir.path().join("fwgate.toml").to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    eventually("binary is ready", || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
    })
    .await;
    let status =
        |v: &'static str| async move { get(listen, "/", &[("X-Firmware-Version", v)]).await.0 };
    assert_eq!(status("3.8.0").await, 200);
    std::fs::write(real.join("rules.toml"), rules_blocking(">=3.8")).unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    eventually("SIGHUP reload applied", || async {
        status("3.8.0").await == 503
    })
    .await;
    // SIGTERM: graceful exit with status 0.
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "fwgate did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
}

/// Reads a raw HTTP response until the connection ends; returns (complete, body bytes seen).
async fn drain_response(mut s: tokio::net::TcpStream) -> (bool, usize) {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut all)).await;
    let complete = all.ends_with(b"0\r\n\r\n");
    (complete, all.len())
}

#[tokio::test]
async fn close_existing_also_ends_long_requests_it_now_refuses() {
    use tokio::io::AsyncWriteExt;
    let backend = http_backend().await;
    let proxy = start_proxy(&rules_blocking(">=9"), backend.addr, "").await;
    let start = |version: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET /drip/100 HTTP/1.1\r\nHost: x\r\nX-Firmware-Version: {version}\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            s
        }
    };
    let bad = start("3.8.0").await;
    let good = start("3.7.0").await;
    let (bad, good) = (
        tokio::spawn(drain_response(bad)),
        tokio::spawn(drain_response(good)),
    );
    eventually("both requests in flight", || async {
        metric(&proxy, "fwgate_active_connections{rule=\"default\"}").await == Some(2.0)
    })
    .await;
    std::fs::write(
        proxy.rules_path(),
        "[[rule]]\nname = \"block\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\nclose_existing = true\ndrain = \"200ms\"\n",
    )
    .unwrap();
    let (bad_complete, bad_bytes) = bad.await.unwrap();
    assert!(
        !bad_complete,
        "the refused request ran to completion ({bad_bytes} bytes)"
    );
    assert!(bad_bytes < 100 * 1024, "{bad_bytes}");
    let (good_complete, good_bytes) = good.await.unwrap();
    assert!(
        good_complete,
        "a request the new rules still admit was cut ({good_bytes} bytes)"
    );
    assert_eq!(
        metric(&proxy, "fwgate_tunnels_closed_by_policy_total").await,
        Some(1.0)
    );
    proxy.stop().await;
}

/// A bad edit reverted to the exact rules in force: the reload finds nothing to apply, but the
/// file is valid, so the error is cleared (and /v1/reload says `unchanged` without it).
#[tokio::test]
async fn reverting_a_bad_edit_to_the_rules_in_force_clears_the_error() {
    let backend = http_backend().await;
    let good = rules_blocking(">=3.8.0-b3");
    let proxy = start_proxy(&good, backend.addr, "").await;
    std::fs::write(
        proxy.rules_path(),
        "[[rule]]\nname = \"block\"\nversions = \">=3.8,\"\n",
    )
    .unwrap();
    eventually("reload error reported", || async {
        let (_, body) = admin_get(&proxy, "/v1/rules").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["last_error"].is_string()
    })
    .await;
    std::fs::write(proxy.rules_path(), &good).unwrap();
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("unchanged"), "{body}");
    let (_, body) = admin_get(&proxy, "/v1/rules").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["last_error"].is_null(),
        "error kept after a valid reload: {body}"
    );
    assert_eq!(v["generation"], 1);
    proxy.stop().await;
}
