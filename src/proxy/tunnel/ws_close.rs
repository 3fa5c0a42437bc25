//! The Close frames fwgate writes when it closes a WebSocket tunnel on purpose (a rule with
//! `close_existing`, a kill-switch entry, the shutdown drain). Without one the device sees its
//! connection simply end, an abnormal closure (1006) that most client libraries answer by
//! reconnecting at once: the very wave fwgate spreads its closes out to avoid.
//!
//! The device gets an unmasked Close frame (as a server sends it) whose code says whether to
//! come back later or not, with the reason the close signal carries; the backend gets a masked
//! one (as a client must send it) saying its device is going away. Control frames are never
//! compressed, so a tunnel with permessage-deflate takes the same frames.

use std::time::Duration;

use crate::registry::{cut_to, CloseCause, MAX_CLOSE_REASON_BYTES};

/// How long a WebSocket close may take from the close signal: the message in flight each way
/// (its end is waited for, so no frame is cut in two), the Close frames, and the peers'
/// answers. Past it the connections are cut as for any other tunnel. Long enough for a large
/// message on a slow link to finish, short enough for the shutdown drain to plan around.
pub const WS_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// RFC 6455 §7.4.1: the endpoint is going away (what the backend is told).
pub const GOING_AWAY: u16 = 1001;
/// RFC 6455 §7.4.1: a message violated the endpoint's policy (a deny rule closed it).
pub const POLICY_VIOLATION: u16 = 1008;
/// IANA registry: try again later (a kill-switch entry, the shutdown drain; limits never close
/// an open tunnel, they refuse new handshakes).
pub const TRY_AGAIN_LATER: u16 = 1013;

/// Longest Close frame: 2 header bytes, 4 of mask key, the code and the longest reason.
pub(super) const MAX_CLOSE_FRAME: usize = 2 + 4 + 2 + MAX_CLOSE_REASON_BYTES;

/// The code a device is sent for `cause`: a deny rule is a refusal to come back with this
/// firmware; the others are temporary.
pub fn device_code(cause: CloseCause) -> u16 {
    match cause {
        CloseCause::Policy => POLICY_VIOLATION,
        CloseCause::KillSwitch | CloseCause::Shutdown => TRY_AGAIN_LATER,
    }
}

/// Who a Close frame goes to: the device (unmasked, the cause's code) or the backend (masked,
/// [`GOING_AWAY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Peer {
    Device,
    Backend,
}

/// The bit of [`super::Counts::close_frames`] saying `peer` got its Close frame.
pub(super) fn sent_bit(peer: Peer) -> u8 {
    match peer {
        Peer::Device => super::SENT_TO_DEVICE,
        Peer::Backend => super::SENT_TO_BACKEND,
    }
}

/// Writes the Close frame for `peer` into `out` (at least [`MAX_CLOSE_FRAME`] bytes) and
/// returns its length. `reason` is cut to [`MAX_CLOSE_REASON_BYTES`] on a character boundary.
pub(super) fn write_close_frame(
    peer: Peer,
    cause: CloseCause,
    reason: &str,
    out: &mut [u8],
) -> usize {
    debug_assert!(out.len() >= MAX_CLOSE_FRAME, "close frame buffer too small");
    let reason = cut_to(reason, MAX_CLOSE_REASON_BYTES).as_bytes();
    let code = match peer {
        Peer::Device => device_code(cause),
        Peer::Backend => GOING_AWAY,
    };
    let payload_len = 2 + reason.len();
    // FIN + opcode 0x8 (close); the length fits the 7-bit field (at most 125).
    out[0] = 0x88;
    out[1] = payload_len as u8;
    let mut at = 2;
    let mask = match peer {
        Peer::Device => None,
        Peer::Backend => {
            // The mask only stops a browser's script from choosing the bytes on the wire
            // (RFC 6455 §10.3); fwgate writes these bytes itself, so a fast non-crypto random
            // key is enough.
            let key = fastrand::u32(..).to_ne_bytes();
            out[1] |= 0x80;
            out[2..6].copy_from_slice(&key);
            at = 6;
            Some(key)
        }
    };
    out[at..at + 2].copy_from_slice(&code.to_be_bytes());
    out[at + 2..at + payload_len].copy_from_slice(reason);
    if let Some(key) = mask {
        for (i, b) in out[at..at + payload_len].iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    at + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmasks a frame written by [`write_close_frame`]: (masked, code, reason).
    fn read(frame: &[u8]) -> (bool, u16, String) {
        assert_eq!(frame[0], 0x88, "FIN + close");
        let masked = frame[1] & 0x80 != 0;
        let len = usize::from(frame[1] & 0x7f);
        let (key, payload) = if masked {
            (Some(&frame[2..6]), &frame[6..])
        } else {
            (None, &frame[2..])
        };
        assert_eq!(payload.len(), len);
        let payload: Vec<u8> = payload
            .iter()
            .enumerate()
            .map(|(i, b)| key.map_or(*b, |k| b ^ k[i % 4]))
            .collect();
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        (
            masked,
            code,
            String::from_utf8(payload[2..].to_vec()).unwrap(),
        )
    }

    #[test]
    fn device_frames_are_unmasked_with_the_causes_code_and_backend_frames_masked_1001() {
        let mut out = [0u8; MAX_CLOSE_FRAME];
        let n = write_close_frame(
            Peer::Device,
            CloseCause::Policy,
            "refused by rule x",
            &mut out,
        );
        assert_eq!(read(&out[..n]), (false, 1008, "refused by rule x".into()));
        let n = write_close_frame(Peer::Device, CloseCause::KillSwitch, "k", &mut out);
        assert_eq!(read(&out[..n]), (false, 1013, "k".into()));
        let n = write_close_frame(Peer::Device, CloseCause::Shutdown, "", &mut out);
        assert_eq!(read(&out[..n]), (false, 1013, String::new()));
        let n = write_close_frame(Peer::Backend, CloseCause::Policy, "why", &mut out);
        assert_eq!(read(&out[..n]), (true, 1001, "why".into()));
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary_to_fit_a_control_frame() {
        let mut out = [0u8; MAX_CLOSE_FRAME];
        let long = "é".repeat(100);
        let n = write_close_frame(Peer::Backend, CloseCause::Shutdown, &long, &mut out);
        let (_, code, reason) = read(&out[..n]);
        assert_eq!(code, 1001);
        assert_eq!(reason.len(), 122, "61 two-byte characters");
        assert!(n <= MAX_CLOSE_FRAME && out[1] & 0x7f <= 125);
    }
}
