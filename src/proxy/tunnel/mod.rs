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
//! - `pool`: the per-thread pool of relay buffers;
//! - `ws_frames`: where WebSocket messages begin and end, from their headers alone;
//! - `ws_close`: the Close frames sent when fwgate closes a WebSocket tunnel on purpose.
//!
//! When fwgate closes a tunnel (a rule with `close_existing`, a kill-switch entry, the
//! shutdown drain), a tunnel that is not WebSocket has both connections closed at once. A
//! WebSocket tunnel first lets each direction finish the message in flight (within
//! [`WS_CLOSE_WAIT`]), then sends each peer a Close frame, shuts its write side and reads what
//! the peer still sends until it closes too, so that the close is orderly and the frame is
//! not lost to a reset.

use std::sync::atomic::{AtomicU64, AtomicU8};

use crate::registry::CloseCause;

mod generic;
mod pool;
mod supervise;
mod tcp;
#[cfg(test)]
mod tests;
mod ws_close;
mod ws_frames;

pub use generic::relay_generic;
pub use pool::RELAY_BUFFER_BYTES;
pub use tcp::relay_tcp;
pub(in crate::proxy) use tcp::{read_drained, send_now};
pub use ws_close::{device_code, GOING_AWAY, POLICY_VIOLATION, TRY_AGAIN_LATER, WS_CLOSE_WAIT};

/// What a tunnel carries, as the backend's 101 named it (its `Upgrade` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `Upgrade: websocket`: closes by fwgate send Close frames.
    WebSocket,
    /// Any other protocol: closes by fwgate close the connections.
    Other,
}

impl Protocol {
    /// The protocol a 101's `Upgrade` value names.
    pub fn of_upgrade(value: Option<&[u8]>) -> Protocol {
        match value {
            Some(v) if v.trim_ascii().eq_ignore_ascii_case(b"websocket") => Protocol::WebSocket,
            _ => Protocol::Other,
        }
    }
}

/// What a relay's directions count, read by the supervisor when the tunnel ends. Atomics
/// only because the relay's future must be `Send`: everything runs in one task.
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// Bytes from the client to the backend.
    up: AtomicU64,
    /// Bytes from the backend to the client.
    down: AtomicU64,
    /// Close frames sent: [`SENT_TO_DEVICE`], [`SENT_TO_BACKEND`].
    close_frames: AtomicU8,
}

/// [`Counts::close_frames`]: the device got its Close frame.
const SENT_TO_DEVICE: u8 = 1;
/// [`Counts::close_frames`]: the backend got its Close frame.
const SENT_TO_BACKEND: u8 = 2;

/// How a tunnel ended, with byte counts for the access log.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes from the client to the backend.
    pub client_to_upstream: u64,
    /// Bytes from the backend to the client.
    pub upstream_to_client: u64,
    /// Why it ended.
    pub end: TunnelEnd,
    /// The code of the Close frame sent to the device, if fwgate closed a WebSocket tunnel
    /// and the frame went out.
    pub device_close_code: Option<u16>,
    /// Whether the backend was sent its Close frame ([`GOING_AWAY`]).
    pub backend_close_sent: bool,
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
