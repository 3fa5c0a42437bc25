//! `[fleet]` in `fwgate.toml`: where the fleet's shared state lives (etcd), and how to reach it
//! in production (TLS with a private CA and a client certificate, user and password from a
//! file, timeouts). Fleet mode is on exactly when this table is present.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Validator;

/// Every key lives under this prefix unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/fwgate/";
/// TCP (and TLS) connect time to one etcd endpoint before trying the next.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for one etcd request, every endpoint tried included; past it the call fails loudly.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an instance reports its applied revision (its lease lives 5 intervals).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A watch that delivers nothing (not even the progress answers fwgate asks for) for this long
/// is considered stalled and reconnected.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The etcd client port when an endpoint does not name one.
pub const DEFAULT_ETCD_PORT: u16 = 2379;

/// `[fleet]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// etcd client URLs, e.g. `["http://10.0.0.7:2379", "http://10.0.0.8:2379"]` (`https://` with `ca_file`).
    pub etcd: Spanned<Vec<Spanned<String>>>,
    /// Key prefix; must end with `/`. Default `"/fwgate/"`.
    pub prefix: Option<Spanned<String>>,
    /// `true`: the rules in force come from the store (`fwgate rules push`). Default false.
    pub rules: Option<bool>,
    /// This instance's name in the fleet. Default: `<hostname>:<admin port>`.
    pub instance_id: Option<Spanned<String>>,
    /// PEM CA bundle etcd's server certificate must chain to (required for `https://`).
    pub ca_file: Option<Spanned<String>>,
    /// PEM client certificate chain for etcd's `--client-cert-auth` (with `key_file`).
    pub cert_file: Option<Spanned<String>>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<Spanned<String>>,
    /// etcd user (with `password_file`), for etcd's `auth enable`.
    pub username: Option<Spanned<String>>,
    /// File holding that user's password (trailing whitespace ignored; never logged).
    pub password_file: Option<Spanned<String>>,
    /// Connect time per endpoint, e.g. `"2s"`.
    pub connect_timeout: Option<Spanned<String>>,
    /// Time per request, failover included, e.g. `"5s"`.
    pub request_timeout: Option<Spanned<String>>,
    /// Heartbeat period, e.g. `"2s"`.
    pub heartbeat_interval: Option<Spanned<String>>,
    /// Silence after which a watch is reconnected, e.g. `"10s"`.
    pub stall_timeout: Option<Spanned<String>>,
}

/// One etcd client URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    /// As configured (for messages), without a trailing `/`.
    pub url: String,
    /// `https://`.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl EtcdEndpoint {
    /// Parses `http://host[:port]` or `https://host[:port]` (a trailing `/` is allowed).
    pub fn parse(text: &str) -> Result<EtcdEndpoint, String> {
        let t = text.trim().trim_end_matches('/');
        let (tls, rest) = if let Some(r) = t.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = t.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!(
                "{text:?} must start with http:// or https:// (e.g. \"http://10.0.0.7:2379\")"
            ));
        };
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(format!(
                "{text:?} must be scheme://host:port with no path or user (e.g. \"http://10.0.0.7:2379\")"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: unclosed '[' in an IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{text:?}: expected ':port' after ']'")),
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            None => DEFAULT_ETCD_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{text:?}: port {p:?} is not a port number"))?,
        };
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        Ok(EtcdEndpoint {
            url: t.to_string(),
            tls,
            host,
            port,
        })
    }

    /// `host:port` for connecting (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Validated `[fleet]`.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// etcd endpoints, tried in order (the last one that answered first).
    pub endpoints: Vec<EtcdEndpoint>,
    /// Key prefix (ends with `/`).
    pub prefix: String,
    /// Whether the rules in force come from the store.
    pub rules: bool,
    /// This instance's name, if configured.
    pub instance_id: Option<String>,
    /// CA bundle for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for etcd.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// etcd user and the file with its password.
    pub auth: Option<(String, PathBuf)>,
    /// Connect time per endpoint.
    pub connect_timeout: Duration,
    /// Time per request.
    pub request_timeout: Duration,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Watch silence before reconnecting.
    pub stall_timeout: Duration,
}

impl FleetConfig {
    /// The endpoints as written, comma-separated, for messages ("etcd http://a:2379,http://b:2379").
    pub fn describe(&self) -> String {
        let urls: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        format!("etcd {}", urls.join(","))
    }
}

fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Validates `[fleet]`, reporting every problem through `v`; `base` anchors relative paths.
pub(super) fn validate(raw: &RawFleet, base: &Path, v: &mut Validator<'_>) -> FleetConfig {
    let mut endpoints = Vec::new();
    if raw.etcd.get_ref().is_empty() {
        v.error(
            raw.etcd.span().start,
            "[fleet] etcd needs at least one endpoint, e.g. [\"http://10.0.0.7:2379\"]",
        );
    }
    for e in raw.etcd.get_ref() {
        match EtcdEndpoint::parse(e.get_ref()) {
            Ok(ep) => endpoints.push(ep),
            Err(m) => v.error(e.span().start, m),
        }
    }
    let tls = endpoints.iter().any(|e| e.tls);
    if tls && endpoints.iter().any(|e| !e.tls) {
        v.error(
            raw.etcd.span().start,
            "[fleet] etcd endpoints must all be http:// or all https://",
        );
    }
    let prefix = match &raw.prefix {
        None => DEFAULT_PREFIX.to_string(),
        Some(p) => {
            let text = p.get_ref();
            if text.is_empty()
                || !text.ends_with('/')
                || text.chars().any(|c| c.is_control())
                || text.len() > 256
            {
                v.error(
                    p.span().start,
                    format!("[fleet] prefix {text:?} must end with '/' (e.g. \"/fwgate/\"), so that one fleet's keys never match another's"),
                );
            }
            text.clone()
        }
    };
    let instance_id = raw.instance_id.as_ref().map(|s| {
        if !valid_instance_id(s.get_ref()) {
            v.error(
                s.span().start,
                "[fleet] instance_id must be 1-128 characters of letters, digits, '-', '_', '.', ':'",
            );
        }
        s.get_ref().clone()
    });
    let ca_file = raw.ca_file.as_ref().map(|p| base.join(p.get_ref()));
    if tls && ca_file.is_none() {
        v.error(
            raw.etcd.span().start,
            "[fleet] https:// endpoints need ca_file (the CA bundle etcd's certificate chains to)",
        );
    }
    if !tls {
        for x in [&raw.ca_file, &raw.cert_file, &raw.key_file]
            .into_iter()
            .flatten()
        {
            v.error(
                x.span().start,
                "[fleet] ca_file, cert_file and key_file only apply to https:// endpoints",
            );
        }
    }
    let client_cert = match (&raw.cert_file, &raw.key_file) {
        (Some(c), Some(k)) => Some((base.join(c.get_ref()), base.join(k.get_ref()))),
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => {
            v.error(x.span().start, "[fleet] cert_file and key_file go together");
            None
        }
    };
    let auth = match (&raw.username, &raw.password_file) {
        (Some(u), Some(p)) => Some((u.get_ref().clone(), base.join(p.get_ref()))),
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => {
            v.error(
                x.span().start,
                "[fleet] username and password_file go together",
            );
            None
        }
    };
    let connect_timeout = v.duration(&raw.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    let request_timeout = v.duration(&raw.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    let heartbeat_interval = v.duration(&raw.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
    let stall_timeout = v.duration(&raw.stall_timeout, DEFAULT_STALL_TIMEOUT);
    for (value, d, min) in [
        (
            &raw.connect_timeout,
            connect_timeout,
            Duration::from_millis(10),
        ),
        (
            &raw.request_timeout,
            request_timeout,
            Duration::from_millis(10),
        ),
        (
            &raw.heartbeat_interval,
            heartbeat_interval,
            Duration::from_millis(100),
        ),
        (
            &raw.stall_timeout,
            stall_timeout,
            Duration::from_millis(300),
        ),
    ] {
        if let Some(s) = value {
            if d < min || d > Duration::from_secs(3600) {
                v.error(
                    s.span().start,
                    format!(
                        "{:?} is out of range: must be between {min:?} and 1h",
                        s.get_ref()
                    ),
                );
            }
        }
    }
    FleetConfig {
        endpoints,
        prefix,
        rules: raw.rules.unwrap_or(false),
        instance_id,
        ca_file,
        client_cert,
        auth,
        connect_timeout,
        request_timeout,
        heartbeat_interval,
        stall_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn endpoints_parse_with_default_port_and_ipv6() {
        let e = EtcdEndpoint::parse("http://10.0.0.7:2379/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("10.0.0.7", 2379, false));
        assert_eq!(e.url, "http://10.0.0.7:2379");
        let e = EtcdEndpoint::parse("https://etcd.internal").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("etcd.internal", 2379, true)
        );
        let e = EtcdEndpoint::parse("http://[::1]:23790").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 23790));
        assert_eq!(e.authority(), "[::1]:23790");
        for bad in [
            "10.0.0.7:2379",
            "http://",
            "http://h:0",
            "http://h:x",
            "http://h/v3",
            "http://u@h",
        ] {
            assert!(EtcdEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fleet_defaults_and_cross_checks() {
        let c = Config::from_toml(
            "state_dir = \"s\"\n[fleet]\netcd = [\"http://127.0.0.1:2379\"]\n",
            Some(Path::new("/etc/fwgate/fwgate.toml")),
        )
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.prefix, "/fwgate/");
        assert!(!f.rules);
        assert_eq!(f.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let errs = Config::from_toml(
            "[fleet]\netcd = [\"https://a:2379\", \"http://b:2379\"]\nprefix = \"/fwgate\"\nusername = \"u\"\ncert_file = \"c.pem\"\n",
            Some(Path::new("f.toml")),
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "all be http:// or all https://",
            "must end with '/'",
            "need ca_file",
            "cert_file and key_file go together",
            "username and password_file go together",
            "needs state_dir",
        ] {
            assert!(errs.contains(needle), "missing {needle:?} in\n{errs}");
        }
    }
}
