//! PROXY protocol v1 and v2 (HAProxy's spec), so that behind a TCP load balancer the client
//! address in logs, per-IP limits and the reconnect backoff is the device's, not the load
//! balancer's. Only the header is read (at most 107 bytes for v1, 16 + 216 for v2); TLVs are
//! skipped. Whether a peer may send one is decided by the caller (trusted networks).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// Longest v2 address block we accept (IPv6 addresses plus generous TLVs).
const V2_MAX_LEN: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// It starts like one but is malformed.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The peer closed or the read failed.
    #[error("reading PROXY protocol header: {0}")]
    Io(String),
}

/// The source address the header announces; `None` for `UNKNOWN` (v1) or `LOCAL` (v2), which
/// mean "use the connection's own address" (health checks from the load balancer).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let io = |e: std::io::Error| ProxyHeaderError::Io(e.to_string());
    let mut start = [0u8; 8];
    r.read_exact(&mut start).await.map_err(io)?;
    if start == V2_SIGNATURE[..8] {
        let mut rest = [0u8; 8];
        r.read_exact(&mut rest).await.map_err(io)?;
        if rest[..4] != V2_SIGNATURE[8..] {
            return Err(ProxyHeaderError::Malformed("bad v2 signature"));
        }
        let (ver_cmd, family) = (rest[4], rest[5]);
        let len = usize::from(u16::from_be_bytes([rest[6], rest[7]]));
        if ver_cmd >> 4 != 2 {
            return Err(ProxyHeaderError::Malformed("unsupported v2 version"));
        }
        if len > V2_MAX_LEN {
            return Err(ProxyHeaderError::Malformed("v2 header too long"));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.map_err(io)?;
        return match ver_cmd & 0x0f {
            0x0 => Ok(None),
            0x1 => parse_v2_addresses(family, &body).map(Some),
            _ => Err(ProxyHeaderError::Malformed("unknown v2 command")),
        };
    }
    if &start[..6] != b"PROXY " {
        return Err(ProxyHeaderError::Missing);
    }
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed(
                "v1 header longer than 107 bytes",
            ));
        }
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.map_err(io)?;
        line.push(b[0]);
    }
    parse_v1(&line[..line.len() - 2])
}

fn parse_v2_addresses(family: u8, body: &[u8]) -> Result<SocketAddr, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed("v2 address block too short");
    match family {
        // TCP over IPv4 (and UDP, which we treat the same: only the source matters).
        0x11 | 0x12 => {
            let b = body.get(..12).ok_or(bad)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([b[8], b[9]]),
            ))
        }
        0x21 | 0x22 => {
            let b = body.get(..36).ok_or(bad)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let ip = Ipv6Addr::from(octets);
            Ok(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be_bytes([b[32], b[33]]),
            ))
        }
        _ => Err(ProxyHeaderError::Malformed("unsupported v2 address family")),
    }
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ProxyHeaderError::Malformed("v1 header is not ASCII"))?;
    let mut parts = text.split(' ');
    let bad = ProxyHeaderError::Malformed("v1 header must be PROXY TCP4|TCP6 SRC DST SPORT DPORT");
    if parts.next() != Some("PROXY") {
        return Err(bad);
    }
    match parts.next() {
        Some("UNKNOWN") => Ok(None),
        Some(proto @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(bad);
            };
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            if (proto == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::Malformed(
                    "v1 address family does not match",
                ));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(bad),
    }
}

/// Builds a v2 header (for tests and tools that speak to fwgate through a simulated balancer).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
        let mut r = bytes;
        read_header(&mut r).await
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            read(b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\nGET").await,
            Ok(Some("198.51.100.22:35646".parse().unwrap()))
        );
        assert_eq!(
            read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n").await,
            Ok(Some("[2001:db8::1]:4000".parse().unwrap()))
        );
        assert_eq!(read(b"PROXY UNKNOWN\r\n").await, Ok(None));
    }

    #[tokio::test]
    async fn v2_round_trips_and_local_means_no_override() {
        let src: SocketAddr = "192.0.2.9:5555".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let mut bytes = encode_v2(src, dst);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(read(&bytes).await, Ok(Some(src)));
        let v6: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        assert_eq!(read(&encode_v2(v6, dst)).await, Ok(Some(v6)));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await, Ok(None));
    }

    #[tokio::test]
    async fn garbage_is_refused_without_reading_unbounded() {
        assert_eq!(
            read(b"GET / HTTP/1.1\r\n\r\n").await,
            Err(ProxyHeaderError::Missing)
        );
        assert!(matches!(
            read(b"PROXY TCP4 1.2.3.4\r\n").await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 ::1 ::1 1 2\r\n").await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read(&huge).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(read(b"PROX").await, Err(ProxyHeaderError::Io(_))));
    }
}
