//! `keepalive_timeout` on hyper's path (TLS listeners, HTTP/2, and connections the fast path
//! hands over). hyper bounds the first request head from the accept and later heads from their
//! first byte, but not the idle time between a response and the next request. So each
//! connection counts its requests in flight, from the service call until the response body is
//! done or dropped, and remembers when the last one ended; [`KeepAlive::idled_out`] resolves
//! once nothing was in flight for the whole timeout, and the connection is then drained
//! (a request that starts meanwhile finishes first).

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// No request has ended yet: the first head is hyper's `header_read_timeout` business.
const NEVER: u64 = u64::MAX;

/// One connection's requests in flight and when the last one ended.
#[derive(Debug)]
pub struct KeepAlive {
    in_flight: AtomicU32,
    /// Milliseconds since `opened`, or [`NEVER`].
    last_done_ms: AtomicU64,
    opened: Instant,
}

impl KeepAlive {
    /// A new connection's tracker.
    pub fn new() -> Arc<KeepAlive> {
        Arc::new(KeepAlive {
            in_flight: AtomicU32::new(0),
            last_done_ms: AtomicU64::new(NEVER),
            opened: Instant::now(),
        })
    }

    /// A request started; it counts until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Resolves once the connection has had nothing in flight for `timeout` since its last
    /// response ended.
    pub async fn idled_out(&self, timeout: Duration) {
        loop {
            let last = self.last_done_ms.load(Ordering::Acquire);
            let idle_for = if last == NEVER || self.in_flight.load(Ordering::Acquire) > 0 {
                None
            } else {
                Some(self.now_ms().saturating_sub(last))
            };
            let wait = match idle_for {
                Some(ms) if ms >= timeout.as_millis() as u64 => return,
                Some(ms) => timeout - Duration::from_millis(ms),
                // Busy (or before the first response): look again a timeout later.
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }
}

/// A request in flight; dropping it records the end.
#[derive(Debug)]
pub struct InFlight(Arc<KeepAlive>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The time first, so a checker that sees the count reach zero sees this end too.
        self.0
            .last_done_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    /// Wraps `body`.
    pub fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idles_out_only_after_the_last_response_and_never_while_busy() {
        let k = KeepAlive::new();
        let timeout = Duration::from_millis(100);
        let bound = Duration::from_millis(400);
        // Before any response: never (the first head has its own timeout).
        assert!(tokio::time::timeout(bound, k.idled_out(timeout))
            .await
            .is_err());
        let req = k.begin();
        assert!(
            tokio::time::timeout(bound, k.idled_out(timeout))
                .await
                .is_err(),
            "a request in flight is not idling"
        );
        drop(req);
        let ended = Instant::now();
        k.idled_out(timeout).await;
        assert!(
            ended.elapsed() >= timeout,
            "idle counts from the end of the response"
        );
    }
}
