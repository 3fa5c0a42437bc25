//! The `fwgate` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use fwgate::admin::AdminToken;
use fwgate::cli::{self, ExplainInput};
use fwgate::config::Config;
use fwgate::fleet::cli::{FleetAction, RulesAction};
use fwgate::gate::Gate;
use fwgate::kill_cli::KillAction;
use fwgate::metrics::Metrics;
use fwgate::Listeners;

/// Firmware-version admission proxy.
#[derive(Parser)]
#[command(name = "fwgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (default: the built-in configuration).
    #[arg(long, global = true, env = "FWGATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and rules files; print every error with file:line:column.
    Check {
        /// Also ask the running instances what the rules file would change (nothing is applied).
        #[arg(long)]
        preview: bool,
        /// Admin API of an instance to ask (repeat). Default: the fleet's live instances in
        /// fleet mode, else this config's admin address.
        #[arg(long = "admin", requires = "preview")]
        admins: Vec<String>,
    },
    /// Show how a version (or a request's headers) would be decided, and by which rule.
    Explain {
        /// A firmware version as a device would send it (e.g. v3.8.0b3).
        version: Option<String>,
        /// Request header 'Name: value' to run the configured version sources on (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Query string for query sources (e.g. 'fw=3.8.0').
        #[arg(long)]
        query: Option<String>,
        /// Request path (for rules with path_prefix).
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Manage emergency kill-switch entries through the admin API (of one or many instances).
    Kill {
        #[command(subcommand)]
        action: KillAction,
        /// Admin API of an instance (repeat for a fleet). Default: this config's admin address.
        #[arg(long = "admin", global = true)]
        admins: Vec<String>,
        /// File with the admin token (default: $FWGATE_ADMIN_TOKEN, then the config's token_file).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
    },
    /// Fleet mode: publish the rules to every instance through the store, list, diff, roll back.
    Rules {
        #[command(subcommand)]
        action: RulesAction,
    },
    /// Fleet mode: the store and every instance with the state revision it has applied.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { preview, admins } => {
            let (out, ok) = cli::check(cli.config.as_deref());
            print!("{out}");
            if !ok {
                return ExitCode::FAILURE;
            }
            if !preview {
                return ExitCode::SUCCESS;
            }
            async_command(cli.config, |rt, config| {
                rt.block_on(fwgate::preview_cli::run(config, admins))
            })
        }
        Command::Explain {
            version,
            headers,
            query,
            path,
        } => {
            if version.is_none() && headers.is_empty() && query.is_none() {
                eprintln!("fwgate explain: give a VERSION, or --header/--query to run extraction");
                return ExitCode::from(2);
            }
            let result = cli::load_config(cli.config.as_deref())
                .and_then(|c| cli::load_rules(&c, &Metrics::new()).map(|r| (c, r)))
                .map_err(|e| e.to_string())
                .and_then(|(config, rules)| {
                    let kill = cli::load_kill_set(&config, &rules)?;
                    cli::explain(
                        &rules,
                        &kill,
                        &ExplainInput {
                            version,
                            headers,
                            query,
                            path,
                        },
                    )
                });
            match result {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Kill {
            action,
            admins,
            token_file,
        } => kill(cli.config, action, admins, token_file),
        Command::Rules { action } => async_command(cli.config, |rt, config| {
            rt.block_on(fwgate::fleet::cli::rules(config, action))
        }),
        Command::Fleet { action } => async_command(cli.config, |rt, config| {
            rt.block_on(fwgate::fleet::cli::fleet(config, action))
        }),
        Command::Run => match run(cli.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fwgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn kill(
    config_path: Option<PathBuf>,
    action: KillAction,
    mut admins: Vec<String>,
    token_file: Option<PathBuf>,
) -> ExitCode {
    let config = config_path.as_deref().map(fwgate::config::Config::load);
    if let Some(Err(e)) = &config {
        eprintln!("invalid configuration:\n{e}");
        return ExitCode::FAILURE;
    }
    let config = config.and_then(Result::ok);
    if admins.is_empty() {
        let addr = config.as_ref().map(|c| c.admin.addr).unwrap_or_else(|| {
            fwgate::config::DEFAULT_ADMIN_ADDR
                .parse()
                .unwrap_or(([127, 0, 0, 1], 9901).into())
        });
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        admins.push(format!("http://{host}:{}", addr.port()));
    }
    let token_path = token_file.or_else(|| {
        std::env::var_os("FWGATE_ADMIN_TOKEN")
            .is_none()
            .then(|| config.as_ref().and_then(|c| c.admin.token_file.clone()))
            .flatten()
    });
    let token = match token_path {
        Some(p) => match std::fs::read_to_string(&p) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!("cannot read token file {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => std::env::var("FWGATE_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (out, ok) = runtime.block_on(fwgate::kill_cli::run(action, &admins, token));
    print!("{out}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs a command that needs `--config` and an async runtime (`rules`, `fleet`, `check --preview`).
fn async_command(
    config_path: Option<PathBuf>,
    command: impl FnOnce(&tokio::runtime::Runtime, &Config) -> (String, bool),
) -> ExitCode {
    let config = match cli::load_config(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (out, ok) = command(&runtime, &config);
    print!("{out}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = cli::load_config(config_path.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    fwgate::logging::install(config.log.format);
    if config.source.is_none() {
        tracing::warn!("no --config given: using the built-in configuration (listen 0.0.0.0:8080, upstream 127.0.0.1:9000, admin 127.0.0.1:9901, admit everything)");
    }
    let metrics = Arc::new(Metrics::new());
    let rules = cli::load_rules(&config, &metrics)
        .map_err(|e| anyhow::anyhow!("invalid rules; refusing to start without rules:\n{e}"))?;
    for w in &rules.warnings {
        tracing::warn!(warning = %w, "rules warning");
    }
    let token = admin_token(&config)?;
    let workers = config.worker_threads(std::env::var("TOKIO_WORKER_THREADS").ok().as_deref());
    // One worker: tokio's single-threaded scheduler does the same work without the multi-thread
    // scheduler's queues and atomics (about 2.5% fewer instructions per operation, measured).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let proxy = fwgate::proxy::bind(config.listen.addr, config.listen.backlog)
            .with_context(|| format!("cannot listen on {} ([listen] addr)", config.listen.addr))?;
        let admin = tokio::net::TcpListener::bind(config.admin.addr)
            .await
            .with_context(|| format!("cannot listen on {} ([admin] addr)", config.admin.addr))?;
        tracing::info!(
            listen = %proxy.local_addr()?,
            admin = %admin.local_addr()?,
            upstream = %config.upstream.addr,
            rules = %config.rules_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<embedded>".into()),
            rule_count = rules.rules.len(),
            ordering = rules.ordering.as_str(),
            admin_token = if token.is_set() { "set" } else { "unset (mutating admin endpoints answer 403)" },
            tls = config.tls.as_ref().map(|t| format!("cert {} client_ca {}", t.cert.display(), t.client_ca.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "none".into()))).unwrap_or_else(|| "off".into()),
            upstream_tls = config.upstream.tls.as_ref().map(|(_, name)| name.as_str()).unwrap_or("off"),
            proxy_protocol = config.listen.proxy_protocol,
            state_dir = %config.state_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (kill-switch entries cannot be created)".into()),
            max_open_connections = config.listen.max_open_connections,
            backoff = config.limits.backoff.enabled,
            shutdown_grace_s = config.shutdown_grace.as_secs_f64(),
            workers,
            "fwgate started"
        );
        let tls = fwgate::TlsListener::from_config(&config).context("[tls]")?;
        if let Some(fleet) = &config.fleet {
            // TLS and password files are read now so a missing one stops the start, loudly.
            fwgate::fleet::etcd::Client::new(fleet).context("[fleet]")?;
        }
        let gate = Arc::new(Gate::new(config, rules, metrics).map_err(anyhow::Error::msg)?);
        tokio::spawn(reload_on_sighup(gate.clone()));
        fwgate::run(Listeners { proxy, admin, tls }, gate, token, termination()).await;
        tracing::info!("stopped");
        Ok(())
    })
}

fn admin_token(config: &Config) -> anyhow::Result<AdminToken> {
    if let Some(path) = &config.admin.token_file {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read admin token file {} ([admin] token_file)",
                path.display()
            )
        })?;
        return Ok(AdminToken::new(&text));
    }
    Ok(std::env::var("FWGATE_ADMIN_TOKEN")
        .map(|t| AdminToken::new(&t))
        .unwrap_or_else(|_| AdminToken::none()))
}

async fn reload_on_sighup(gate: Arc<Gate>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; reload with POST /v1/reload");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading rules");
        let _ = gate.reload(false).await;
    }
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Per-connection buffers are too large for glibc's thread cache; mimalloc serves them from
/// per-thread pages (see the `mimalloc` feature in Cargo.toml for the measurement).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
