//! `fwgate kill` failures: each cause gets its own message and what to do about it, and a
//! change asked for without a token is not sent at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use fwgate::kill_cli::{run, KillAction};

use crate::util::*;

fn add_all() -> KillAction {
    KillAction::Add {
        versions: "*".into(),
        reason: "cli test".into(),
        ttl: None,
        status: None,
        retry_after: None,
        keep_existing: false,
        drain: None,
        dry_run: false,
        id: Some("cli-test".into()),
        local: false,
    }
}

/// An admin endpoint that answers every request with `status` and `body`, counting requests.
async fn fixed_admin(status: u16, body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_change_without_a_token_is_not_sent() {
    let (url, seen) = fixed_admin(201, "{}").await;
    for action in [
        add_all(),
        KillAction::Remove {
            id: "x".into(),
            local: false,
        },
    ] {
        let (out, ok) = run(action, std::slice::from_ref(&url), None).await;
        assert!(!ok, "{out}");
        assert!(
            out.contains("no admin token") && out.contains("nothing was sent"),
            "{out}"
        );
        assert!(!out.contains("retry"), "{out}");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a request was sent without a token"
    );
    // Listing needs no token.
    let (out, _) = run(KillAction::List, std::slice::from_ref(&url), None).await;
    assert_eq!(seen.load(Ordering::SeqCst), 1, "{out}");
}

#[tokio::test]
async fn each_failure_says_what_to_do() {
    let token = Some("t".to_string());
    let cases: [(u16, &'static str, KillAction, &str); 5] = [
        (
            401,
            r#"{"error": "missing or wrong bearer token"}"#,
            add_all(),
            "wrong token: use the instance's token",
        ),
        (
            403,
            r#"{"error": "no admin token configured"}"#,
            add_all(),
            "set [admin] token_file (or FWGATE_ADMIN_TOKEN) there and restart it",
        ),
        (
            400,
            r#"{"error": "versions \">=3.8,\": empty comparator"}"#,
            add_all(),
            "versions \">=3.8,\": empty comparator: fix the command",
        ),
        (
            404,
            r#"{"error": "no kill-switch entry \"gone\""}"#,
            KillAction::Remove {
                id: "gone".into(),
                local: false,
            },
            "no entry \"gone\" there: `fwgate kill list` shows the ids",
        ),
        (
            500,
            r#"{"error": "cannot write", "note": "nothing was changed"}"#,
            add_all(),
            "the instance failed (see its log)",
        ),
    ];
    for (status, body, action, advice) in cases {
        let (url, _) = fixed_admin(status, body).await;
        let (out, ok) = run(action, &[url], token.clone()).await;
        assert!(!ok, "{status}: {out}");
        assert!(out.contains(advice), "{status}: {out}");
        let retry = out.contains("retry them");
        assert_eq!(
            retry,
            status == 500,
            "only a failing instance is worth retrying: {out}"
        );
    }
    // Nothing listens there.
    let dead = format!(
        "http://{}",
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let (out, ok) = run(add_all(), &[dead], token).await;
    assert!(!ok);
    assert!(
        out.contains("unreachable (cannot connect") && out.contains("[admin] addr"),
        "{out}"
    );
    assert!(out.contains("retry them"), "{out}");
}

/// The real admin API's answers map to the same advice.
#[tokio::test]
async fn a_real_instance_answers_map_to_the_same_advice() {
    let backend = http_backend().await;
    let proxy = start_proxy("[defaults]\naction = \"allow\"\n", backend.addr, "").await;
    let url = format!("http://{}", proxy.admin);
    let (out, _) = run(add_all(), std::slice::from_ref(&url), Some("wrong".into())).await;
    assert!(out.contains("401") && out.contains("wrong token"), "{out}");
    let (out, _) = run(
        KillAction::Remove {
            id: "nope".into(),
            local: false,
        },
        std::slice::from_ref(&url),
        Some(TEST_TOKEN.into()),
    )
    .await;
    assert!(out.contains("no entry \"nope\" there"), "{out}");
    let mut bad = add_all();
    if let KillAction::Add { versions, .. } = &mut bad {
        *versions = ">=3.8,".into();
    }
    let (out, _) = run(bad, std::slice::from_ref(&url), Some(TEST_TOKEN.into())).await;
    assert!(
        out.contains("400") && out.contains("fix the command"),
        "{out}"
    );
    proxy.stop().await;
}
