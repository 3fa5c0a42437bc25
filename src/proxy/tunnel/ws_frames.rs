//! Where WebSocket messages begin and end in one direction of a tunnel, found from the frame
//! headers alone (RFC 6455 §5.2) as the bytes pass: no payload is copied or buffered, the
//! tracker only counts the payload bytes still to come. This is what lets fwgate put its own
//! Close frame into a stream without cutting a frame (or a fragmented message) in two.
//!
//! A frame header is 2 to 14 bytes: FIN, RSV and opcode; the mask bit and a 7-bit length;
//! 2 or 8 bytes of extended length (126, 127); 4 bytes of mask key if masked. A header split
//! across reads is followed byte by byte; the usual case (a whole header in one read) is read
//! straight from the slice. Bytes that are not WebSocket (garbage, a misbehaving peer) give
//! wrong boundaries, never a panic: a close then waits out its bound and cuts, as for any
//! other tunnel.

/// Follows the frames of one direction of a WebSocket tunnel. 16 bytes: it lives in every
/// idle tunnel, twice.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FrameTracker {
    /// Payload bytes of the current frame still to pass; while a header is being read, its
    /// extended length as far as it has arrived.
    payload_left: u64,
    /// Header bytes of the current frame seen so far; 0 between a payload and the next header.
    header_seen: u8,
    /// The header's first byte (FIN, opcode), once seen.
    first: u8,
    /// The header's second byte (mask bit, 7-bit length), once seen.
    second: u8,
    /// A data frame without FIN passed: the message goes on in continuation frames.
    in_fragmented_message: bool,
}

/// The opcodes from 0x8 on are control frames (close, ping, pong), which may come between
/// the fragments of a message and never end one.
const FIRST_CONTROL_OPCODE: u8 = 0x8;
/// The opcode of a Close frame.
const OPCODE_CLOSE: u8 = 0x8;

impl FrameTracker {
    /// Follows `bytes`, the next bytes of the stream. Runs for every relayed read of a
    /// WebSocket tunnel, so the two usual reads take a few instructions: one whole small frame
    /// from a frame boundary (a device's message), and a piece of a large payload.
    #[inline]
    pub(super) fn advance(&mut self, bytes: &[u8]) {
        if self.header_seen == 0 {
            if self.payload_left == 0 {
                if let [first, second, ..] = *bytes {
                    let short = usize::from(second & 0x7f);
                    let mask = usize::from(second >> 7) << 2;
                    if short < 126 && 2 + mask + short == bytes.len() {
                        self.frame_starts(first);
                        return;
                    }
                }
            } else if self.payload_left >= bytes.len() as u64 {
                self.payload_left -= bytes.len() as u64;
                return;
            }
        }
        self.advance_any(bytes);
    }

    /// [`FrameTracker::advance`] for any bytes: several frames, headers split across reads.
    #[inline(never)]
    fn advance_any(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.header_seen == 0 && self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skip;
                // skip <= bytes.len(), so it fits a usize.
                bytes = &bytes[skip as usize..];
            } else if self.header_seen == 0 && bytes.len() >= 2 {
                let header = header_len(bytes[1]);
                match bytes.get(..header) {
                    Some(whole) => {
                        self.read_whole_header(whole);
                        bytes = &bytes[header..];
                    }
                    None => bytes = self.read_header_byte(bytes),
                }
            } else {
                bytes = self.read_header_byte(bytes);
            }
        }
    }

    /// Whether the stream is between two messages: no header or payload half-passed, and no
    /// fragmented message waiting for its last fragment.
    pub(super) fn between_messages(&self) -> bool {
        self.header_seen == 0 && self.payload_left == 0 && !self.in_fragmented_message
    }

    /// Whether the bytes so far end with a whole Close frame: the peer has answered a close
    /// (RFC 6455 §7.1.1: then the TCP connection can be closed).
    pub(super) fn ended_with_close(&self) -> bool {
        self.header_seen == 0 && self.payload_left == 0 && self.first & 0x0f == OPCODE_CLOSE
    }

    /// At most how many bytes may be read next without going past the end of the current
    /// header or payload (at least 1): a close reads no further than the message in flight.
    pub(super) fn next_unit(&self) -> usize {
        match self.header_seen {
            0 if self.payload_left > 0 => usize::try_from(self.payload_left).unwrap_or(usize::MAX),
            0 => 2,
            1 => 1,
            seen => header_len(self.second)
                .saturating_sub(usize::from(seen))
                .max(1),
        }
    }

    /// A whole header in one slice (`bytes.len()` is its length).
    fn read_whole_header(&mut self, bytes: &[u8]) {
        self.first = bytes[0];
        self.second = bytes[1];
        self.payload_left = match bytes[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            127 => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&bytes[2..10]);
                u64::from_be_bytes(len)
            }
            short => u64::from(short),
        };
        self.header_done();
    }

    /// One byte of a header split across reads; returns the rest of `bytes` (not empty).
    fn read_header_byte<'b>(&mut self, bytes: &'b [u8]) -> &'b [u8] {
        let (&b, rest) = match bytes.split_first() {
            Some(split) => split,
            None => return bytes,
        };
        match self.header_seen {
            0 => self.first = b,
            1 => {
                self.second = b;
                self.payload_left = match b & 0x7f {
                    // The extended length follows; it is gathered here.
                    126 | 127 => 0,
                    short => u64::from(short),
                };
            }
            seen => {
                let extended = header_len(self.second & 0x7f) - 2;
                if usize::from(seen) - 2 < extended {
                    self.payload_left = (self.payload_left << 8) | u64::from(b);
                }
                // Otherwise a mask key byte: not needed to follow the frames.
            }
        }
        self.header_seen += 1;
        if self.header_seen >= 2 && usize::from(self.header_seen) == header_len(self.second) {
            self.header_done();
        }
        rest
    }

    /// The header is complete: its payload follows.
    fn header_done(&mut self) {
        self.header_seen = 0;
        self.frame_starts(self.first);
    }

    /// A frame whose header's first byte is `first` begins (its header passed).
    #[inline]
    fn frame_starts(&mut self, first: u8) {
        self.first = first;
        if first & 0x0f < FIRST_CONTROL_OPCODE {
            // A data or continuation frame: the message ends with the frame that has FIN.
            self.in_fragmented_message = first & 0x80 == 0;
        }
    }
}

/// The length of a header whose second byte is `second`: 2, plus 2 or 8 bytes of extended
/// length, plus 4 of mask key if masked.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One frame as a peer would send it: FIN, opcode, mask key (if masked), payload length.
    fn frame(fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: usize) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= 0xffff {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if let Some(key) = mask {
            out.extend_from_slice(&key);
        }
        // Payload bytes that look like headers, to catch a tracker reading into the payload.
        out.extend((0..len).map(|i| [0x81, 0xfe, 0x7f, 0x88][i % 4]));
        out
    }

    #[test]
    fn whole_frames_in_one_read() {
        let mut t = FrameTracker::default();
        let mut bytes = frame(true, 1, None, 5);
        bytes.extend(frame(true, 2, Some([1, 2, 3, 4]), 300));
        bytes.extend(frame(true, 9, None, 0));
        bytes.extend(frame(true, 2, None, 70_000));
        t.advance(&bytes);
        assert!(t.between_messages());
    }

    #[test]
    fn sixteen_and_sixty_four_bit_lengths_split_anywhere() {
        for len in [125, 126, 0xffff, 0x10000] {
            for masked in [None, Some([9, 8, 7, 6])] {
                let bytes = frame(true, 2, masked, len);
                for cut in 1..bytes.len().min(20) {
                    let mut t = FrameTracker::default();
                    t.advance(&bytes[..cut]);
                    assert!(!t.between_messages(), "len {len} cut {cut}");
                    t.advance(&bytes[cut..]);
                    assert!(t.between_messages(), "len {len} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn a_fragmented_message_ends_with_its_fin_frame_not_with_a_ping_between() {
        let mut t = FrameTracker::default();
        t.advance(&frame(false, 1, None, 3));
        assert!(!t.between_messages(), "first fragment");
        t.advance(&frame(true, 9, None, 2));
        assert!(!t.between_messages(), "a ping between fragments");
        t.advance(&frame(true, 0, None, 3));
        assert!(t.between_messages(), "the last fragment");
    }

    #[test]
    fn a_whole_close_frame_is_seen_and_half_of_one_is_not() {
        let mut t = FrameTracker::default();
        assert!(!t.ended_with_close());
        t.advance(&frame(true, 1, Some([1, 2, 3, 4]), 10));
        assert!(!t.ended_with_close());
        let close = frame(true, 8, Some([5, 6, 7, 8]), 20);
        t.advance(&close[..close.len() - 1]);
        assert!(!t.ended_with_close(), "its last byte is missing");
        t.advance(&close[close.len() - 1..]);
        assert!(t.ended_with_close());
    }

    #[test]
    fn next_unit_never_reads_past_the_message_in_flight() {
        let bytes = frame(true, 2, Some([1, 1, 1, 1]), 1000);
        let mut t = FrameTracker::default();
        let mut at = 0;
        let mut reads = 0;
        while at < bytes.len() {
            let n = t.next_unit().min(7);
            t.advance(&bytes[at..at + n]);
            at += n;
            reads += 1;
            assert!(reads < 1000, "no progress");
        }
        assert!(t.between_messages());
        assert_eq!(at, bytes.len());
    }

    fn any_frame() -> impl Strategy<Value = (bool, u8, Option<[u8; 4]>, usize)> {
        let len = prop_oneof![
            0usize..130,
            120usize..140,
            0xfff0usize..0x10010,
            0usize..3000
        ];
        (
            any::<bool>(),
            prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)],
            proptest::option::of(any::<[u8; 4]>()),
            len,
        )
    }

    proptest! {
        /// Any frames, cut into any reads: after each read the tracker is between messages
        /// exactly when the bytes so far end a message (a FIN data frame, or a control frame
        /// outside a fragmented message).
        #[test]
        fn boundaries_match_a_reference_for_any_reads(
            frames in proptest::collection::vec(any_frame(), 1..12),
            cuts in proptest::collection::vec(1usize..40_000, 1..30),
        ) {
            let mut bytes = Vec::new();
            let mut ends = std::collections::HashSet::new();
            ends.insert(0usize);
            let mut fragmented = false;
            for (fin, opcode, mask, len) in frames {
                bytes.extend(frame(fin, opcode, mask, len));
                if opcode < 8 {
                    fragmented = !fin;
                }
                if !fragmented {
                    ends.insert(bytes.len());
                }
            }
            let mut t = FrameTracker::default();
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at == bytes.len() {
                    break;
                }
                let next = (at + cut).min(bytes.len());
                t.advance(&bytes[at..next]);
                at = next;
                prop_assert_eq!(t.between_messages(), ends.contains(&at), "at {}", at);
            }
        }
    }
}
