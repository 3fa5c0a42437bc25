//! The byte tunnel behind an upgraded connection (WebSocket or any `Upgrade`).
//!
//! Idle device tunnels are the common case (a fleet holds them open for hours), so an idle
//! tunnel holds no buffer: each direction waits for readability on the socket itself and only
//! then borrows a buffer from a small per-thread pool, returning it as soon as the bytes are
//! written. Half-close is respected: when one side finishes sending, its peer's write side is
//! shut down and the other direction keeps flowing until it finishes too.
//!
//! # Layout
//!
//! - `tcp`: the relay between two plain TCP sockets (the normal case), and the socket calls
//!   the fast path shares with it;
//! - `generic`: the relay for any other streams (TLS on a leg);
//! - `supervise`: what both relays run under: per-part wake-ups, the close signal, the idle
//!   timer;
//! - `pool`: the per-thread pool of relay buffers.

use crate::registry::CloseCause;

mod generic;
mod pool;
mod supervise;
mod tcp;
#[cfg(test)]
mod tests;

pub use generic::relay_generic;
pub use pool::RELAY_BUFFER_BYTES;
pub use tcp::relay_tcp;
pub(in crate::proxy) use tcp::{read_drained, send_now};

/// How a tunnel ended, with byte counts for the access log.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes from the client to the backend.
    pub client_to_upstream: u64,
    /// Bytes from the backend to the client.
    pub upstream_to_client: u64,
    /// Why it ended.
    pub end: TunnelEnd,
}

/// Why a tunnel ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides finished sending (clean close).
    #[default]
    Closed,
    /// A socket error (reset, broken pipe).
    Error,
    /// Closed by fwgate because the rules in force no longer admit it.
    ClosedByPolicy,
    /// Closed by fwgate because a kill-switch entry refuses it.
    KillSwitch,
    /// Closed by fwgate at shutdown.
    Shutdown,
    /// No byte either way for `tunnel_idle_timeout`.
    IdleTimeout,
}

impl TunnelEnd {
    /// The end of a tunnel fwgate closed, by the cause its close signal carries.
    pub fn closed_by(cause: Option<CloseCause>) -> TunnelEnd {
        match cause {
            Some(CloseCause::KillSwitch) => TunnelEnd::KillSwitch,
            Some(CloseCause::Shutdown) => TunnelEnd::Shutdown,
            Some(CloseCause::Policy) | None => TunnelEnd::ClosedByPolicy,
        }
    }

    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Error => "error",
            TunnelEnd::ClosedByPolicy => "closed_by_policy",
            TunnelEnd::KillSwitch => "kill_switch",
            TunnelEnd::Shutdown => "shutdown",
            TunnelEnd::IdleTimeout => "idle_timeout",
        }
    }
}
