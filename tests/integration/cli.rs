//! The `fwgate` binary's check and explain commands, run as an operator would.

use std::process::Command;

fn fwgate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fwgate"))
        .args(args)
        .env_remove("FWGATE_CONFIG")
        .output()
        .expect("run fwgate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn repo_config() -> String {
    format!("{}/config/fwgate.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_the_shipped_examples() {
    let (ok, out) = fwgate(&["check", "--config", &repo_config()]);
    assert!(ok, "shipped config must be valid:\n{out}");
    assert!(out.contains("ok: "), "{out}");
    assert!(out.contains("3 rule(s)"), "{out}");
}

#[test]
fn check_accepts_the_deploy_configs() {
    // The container image's config (its rules live in a sub-directory, as in Kubernetes).
    let path = format!("{}/deploy/docker/fwgate.toml", env!("CARGO_MANIFEST_DIR"));
    let (ok, out) = fwgate(&["check", "--config", &path]);
    assert!(ok, "{path} must be valid:\n{out}");
}

#[test]
fn check_reports_file_line_column_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fwgate.toml"), "rules = \"rules.toml\"\n").unwrap();
    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rule]]\nname = \"x\"\nversions = \">=3.8.0-b3 || ~3.9\"\naction = \"deny\"\n",
    )
    .unwrap();
    let (ok, out) = fwgate(&[
        "check",
        "--config",
        dir.path().join("fwgate.toml").to_str().unwrap(),
    ]);
    assert!(!ok, "broken rules must fail check:\n{out}");
    assert!(
        out.contains("rules.toml:3:27: rule \"x\": invalid versions"),
        "{out}"
    );
}

#[test]
fn check_without_config_uses_the_builtin_default() {
    let (ok, out) = fwgate(&["check"]);
    assert!(ok, "{out}");
    assert!(out.contains("<embedded config>"), "{out}");
}

#[test]
fn explain_names_the_rule_and_normalised_version() {
    let (ok, out) = fwgate(&["explain", "v3.8.0b10", "--config", &repo_config()]);
    assert!(ok, "{out}");
    assert!(out.contains("version:  3.8.0-b10"), "{out}");
    // The shipped incident rule is in shadow mode: admitted, and the shadow match is shown.
    assert!(out.contains("decision: ALLOW"), "{out}");
    assert!(out.contains("shadow:   rule \"block-table-scan\""), "{out}");

    let (ok, out) = fwgate(&["explain", "1.9.9", "--config", &repo_config()]);
    assert!(ok, "{out}");
    assert!(out.contains("decision: DENY 426"), "{out}");
    assert!(out.contains("rule \"too-old\""), "{out}");
}

#[test]
fn explain_runs_the_configured_extraction() {
    let (ok, out) = fwgate(&[
        "explain",
        "--header",
        "User-Agent: Airtame/1.0.0-b3 (x)",
        "--config",
        &repo_config(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("from header user-agent"), "{out}");
    assert!(out.contains("version:  1.0.0-b3"), "{out}");
    assert!(out.contains("DENY 426"), "{out}");
}

#[test]
fn check_warns_about_rules_that_can_never_decide_and_bounds_that_take_pre_releases() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fwgate.toml"), "rules = \"rules.toml\"\n").unwrap();
    // The shipped rules with the shadow rule switched to enforce, and an old-firmware bound
    // written without "-0".
    let shipped =
        std::fs::read_to_string(format!("{}/config/rules.toml", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .replace("mode = \"shadow\"", "mode = \"enforce\"")
            .replace("versions = \"<2.0.0-0\"", "versions = \"<2.0.0\"");
    std::fs::write(dir.path().join("rules.toml"), shipped).unwrap();
    let (ok, out) = fwgate(&[
        "check",
        "--config",
        dir.path().join("fwgate.toml").to_str().unwrap(),
    ]);
    assert!(ok, "warnings do not fail check:\n{out}");
    assert!(
        out.contains("rule \"throttle-3-9-beta\" can never decide")
            && out.contains("decided first by rule \"block-table-scan\""),
        "{out}"
    );
    assert!(
        out.contains("\"<2.0.0\" also takes 2.0.0's pre-releases"),
        "{out}"
    );
    // The shipped examples themselves are clean.
    let (_, out) = fwgate(&["check", "--config", &repo_config()]);
    assert!(!out.contains("warning"), "{out}");
}

/// `fwgate run` with its log going to a pipe (a log shipper, `journalctl`, `> file`): plain
/// text, no colour codes; floats short.
#[test]
fn run_logs_without_colour_codes_when_not_on_a_terminal() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), "# admit everything\n").unwrap();
    let config = dir.path().join("fwgate.toml");
    std::fs::write(
        &config,
        "rules = \"rules.toml\"\nshutdown_grace = \"1500ms\"\n[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.2:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fwgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("FWGATE_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fwgate");
    let stdout = child.stdout.take().unwrap();
    // Reading blocks until the start-up line is written (or the process ends: then EOF).
    let mut started = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.contains("fwgate started") {
            started = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = started.expect("fwgate did not log its start-up line");
    assert!(
        !line.contains('\u{1b}'),
        "colour codes in a piped log: {line:?}"
    );
    assert!(line.contains("shutdown_grace_s=1.5 "), "{line}");
}
