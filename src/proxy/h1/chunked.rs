//! The end of a chunked body, found without decoding it.

/// Most trailer fields accepted: hyper's client limit (its `max_headers` default).
const MAX_TRAILERS: u8 = 100;

/// A token character (RFC 9110 §5.6.2), as in a field name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Finds where a chunked body ends (after the last chunk and the trailers) without decoding
/// it, so the body is relayed byte for byte and the connection's next message is not touched.
#[derive(Debug, Default)]
pub(super) struct ChunkedEnd {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Trailer lines seen (hyper's client takes at most [`MAX_TRAILERS`]).
    trailers: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk size's hex digits.
    #[default]
    Size,
    /// Whitespace after the size: more of it, an extension or the line end.
    SizeLws,
    /// An extension, up to the line end.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data (`size` bytes left).
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer field's name (a token), up to its colon.
    TrailerName,
    /// In a trailer field's value, up to the line end.
    TrailerLine,
    /// Expecting the LF that ends a trailer line.
    TrailerLf,
    /// Expecting the final LF.
    EndLf,
    /// The body has ended.
    Done,
}

impl ChunkedEnd {
    /// Feeds the next bytes of the body: `Ok(Some(n))` when the body ends after `n` of them,
    /// `Ok(None)` when all of them belong to it and more follow, `Err` when it is malformed.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // At most 16 hex digits: the size fits a u64.
                        if self.digits == 16 {
                            return Err(());
                        }
                        let digit = (b as char).to_digit(16).ok_or(())?;
                        self.size = self.size * 16 + u64::from(digit);
                        self.digits += 1;
                    }
                    _ if self.digits == 0 => return Err(()),
                    b'\r' => self.state = ChunkState::SizeLf,
                    b';' => self.state = ChunkState::Extension,
                    b' ' | b'\t' => self.state = ChunkState::SizeLws,
                    _ => return Err(()),
                },
                ChunkState::SizeLws => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    _ => return Err(()),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => return Err(()),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.end_of_size_line();
                }
                ChunkState::Data => {
                    let available = (bytes.len() - i) as u64;
                    let n = available.min(self.size);
                    self.size -= n;
                    i += n as usize;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    _ => return Err(()),
                },
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.next_chunk();
                }
                // Trailer fields are read as hyper reads them (httparse's header grammar): a
                // token, a colon, a value without control characters but HTAB.
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    _ if is_tchar(b) && self.trailers < MAX_TRAILERS => {
                        self.trailers += 1;
                        self.state = ChunkState::TrailerName;
                    }
                    _ => return Err(()),
                },
                ChunkState::TrailerName => match b {
                    b':' => self.state = ChunkState::TrailerLine,
                    _ if is_tchar(b) => {}
                    _ => return Err(()),
                },
                ChunkState::TrailerLine => match b {
                    b'\r' => self.state = ChunkState::TrailerLf,
                    b'\t' => {}
                    _ if b < 0x20 || b == 0x7f => return Err(()),
                    _ => {}
                },
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::Done;
                    return Ok(Some(i + 1));
                }
                ChunkState::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == ChunkState::Done).then_some(bytes.len()))
    }

    fn end_of_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }

    fn next_chunk(&mut self) {
        self.state = ChunkState::Size;
        self.size = 0;
        self.digits = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] =
        b"5;name=v\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n";

    #[test]
    fn chunked_end_is_found_at_every_split_and_not_before() {
        let mut next = CHUNKED.to_vec();
        next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..=next.len() {
            let mut end = ChunkedEnd::default();
            let (a, b) = next.split_at(split);
            let found = match end.feed(a).unwrap() {
                Some(n) => n,
                None => a.len() + end.feed(b).unwrap().expect("end not found"),
            };
            assert_eq!(found, CHUNKED.len(), "split at {split}");
        }
        // Byte by byte: nothing before the last byte says it ended.
        let mut end = ChunkedEnd::default();
        for (i, b) in CHUNKED.iter().enumerate() {
            let r = end.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == CHUNKED.len() - 1, "at byte {i}");
        }
    }

    #[test]
    fn chunked_needs_crlf_as_hypers_decoder_does_and_takes_no_trailers() {
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(b"0\r\n\r\n").unwrap(), Some(5));
        let mut end = ChunkedEnd::default();
        assert_eq!(
            end.feed(b"3 \t;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n").unwrap(),
            Some(25)
        );
        // Found by differential fuzzing against hyper's client: hyper refuses these.
        for bad in [
            &b"0\r\ndd\0wxrz\r\n0\r\nX-T: 1\r\n\r\n"[..],
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nX: a\x01b\r\n\r\n",
            b"3\nabc\n0\n\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"3;a\nb\r\nabc\r\n0\r\n\r\n",
            b"3 x\r\nabc\r\n0\r\n\r\n",
        ] {
            assert!(
                ChunkedEnd::default().feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let trailers = |n: usize| {
            let mut body = b"0\r\n".to_vec();
            for i in 0..n {
                body.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body
        };
        let hundred = trailers(100);
        assert_eq!(
            ChunkedEnd::default().feed(&hundred),
            Ok(Some(hundred.len()))
        );
        assert!(ChunkedEnd::default().feed(&trailers(101)).is_err());
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\r\nhelloX",
            b"5\rX",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
        ] {
            assert!(ChunkedEnd::default().feed(bad).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A chunked body from chunk sizes, extensions and trailers, as a backend would send it.
        fn chunked_body(chunks: &[(usize, bool)], trailers: &[String]) -> Vec<u8> {
            let eol: &[u8] = b"\r\n";
            let mut out = Vec::new();
            for (i, (len, ext)) in chunks.iter().enumerate() {
                out.extend_from_slice(format!("{len:X}").as_bytes());
                if *ext {
                    out.extend_from_slice(b";k=v");
                }
                out.extend_from_slice(eol);
                out.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, *len));
                out.extend_from_slice(eol);
            }
            out.extend_from_slice(b"0");
            out.extend_from_slice(eol);
            for t in trailers {
                out.extend_from_slice(format!("X-{t}: {t}").as_bytes());
                out.extend_from_slice(eol);
            }
            out.extend_from_slice(eol);
            out
        }

        proptest! {
            #[test]
            fn chunked_end_is_exact_however_the_body_is_cut(
                chunks in proptest::collection::vec((1usize..300, any::<bool>()), 0..6),
                trailers in proptest::collection::vec("[a-z]{1,8}", 0..3),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
                tail in proptest::collection::vec(any::<u8>(), 0..20),
            ) {
                let body = chunked_body(&chunks, &trailers);
                let mut stream = body.clone();
                stream.extend_from_slice(&tail);
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                points.push(stream.len());
                points.sort_unstable();
                let mut end = ChunkedEnd::default();
                let (mut at, mut found) = (0, None);
                for p in points {
                    if found.is_some() || p < at {
                        continue;
                    }
                    if let Some(n) = end.feed(&stream[at..p]).unwrap() {
                        found = Some(at + n);
                    }
                    at = p;
                }
                prop_assert_eq!(found, Some(body.len()));
            }

        }
    }
}
