//! The one place that turns admission outcomes and backend failures into HTTP responses.
//! Every refusal is a small static response built without touching the backend.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER, UPGRADE};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::rules::Refusal;

/// The content type of every answer fwgate writes itself.
pub const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// The protocol a 426 (Upgrade Required) refusal names in its `Upgrade` header, which RFC 9110
/// §15.5.22 requires: devices reach fwgate's backends over WebSocket.
pub const UPGRADE_REQUIRED_PROTOCOL: HeaderValue = HeaderValue::from_static("websocket");

/// Why fwgate answered instead of the backend (besides a rule refusing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFailure {
    /// The backend refused or reset the TCP connection: 502.
    UpstreamUnreachable,
    /// Connecting to the backend took longer than `connect_timeout`: 504.
    UpstreamConnectTimeout,
    /// The backend's response head took longer than `response_timeout`: 504.
    UpstreamResponseTimeout,
    /// The backend broke the exchange: 502.
    UpstreamBroken,
    /// Too many backend connects already in progress (`max_pending_connects`): 503 at once.
    UpstreamBusy,
    /// A rule change or kill-switch entry refused the request while it waited for the backend.
    ClosedByPolicy,
    /// The client's request body was malformed (bad chunked framing) or cut short: 400.
    ClientBodyMalformed,
    /// The client sent no body bytes for `body_read_timeout`: 408.
    ClientBodyTimeout,
}

impl ProxyFailure {
    /// The client caused it (its request body), not the backend.
    pub fn is_client_error(self) -> bool {
        matches!(
            self,
            ProxyFailure::ClientBodyMalformed | ProxyFailure::ClientBodyTimeout
        )
    }

    /// Status and body for this failure.
    pub fn status_and_body(self) -> (StatusCode, &'static str) {
        match self {
            ProxyFailure::UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "backend unreachable\n"),
            ProxyFailure::UpstreamConnectTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "backend connect timed out\n")
            }
            ProxyFailure::UpstreamResponseTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "backend response timed out\n")
            }
            ProxyFailure::UpstreamBroken => {
                (StatusCode::BAD_GATEWAY, "backend connection failed\n")
            }
            ProxyFailure::UpstreamBusy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "backend busy, retry later\n",
            ),
            ProxyFailure::ClosedByPolicy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "refused: the rules in force no longer admit this request\n",
            ),
            ProxyFailure::ClientBodyMalformed => {
                (StatusCode::BAD_REQUEST, "malformed request body\n")
            }
            ProxyFailure::ClientBodyTimeout => {
                (StatusCode::REQUEST_TIMEOUT, "request body timed out\n")
            }
        }
    }
}

/// fwgate's own small answer (a refusal): status, plain-text body, `Retry-After` if any.
/// Kept this plain so that the fast path writes it without building a `Response` and its
/// header map; hyper's path turns it into one.
pub struct Answer {
    /// Response status.
    pub status: StatusCode,
    /// Plain-text body (shared, never copied).
    pub body: Bytes,
    /// `Retry-After`, in seconds (already jittered).
    pub retry_after: Option<u64>,
}

impl Answer {
    /// A rule's refusal. `retry_after` (a wait fwgate computed, such as a backoff's) wins
    /// over the rule's own, which is otherwise jittered now.
    pub fn refusal(r: &Refusal, retry_after: Option<u64>) -> Answer {
        Answer {
            status: r.status,
            body: r.body.clone(),
            retry_after: retry_after.or_else(|| r.retry_after_secs()),
        }
    }

    /// A fixed answer without `Retry-After`.
    pub fn plain(status: StatusCode, body: &'static str) -> Answer {
        Answer {
            status,
            body: Bytes::from_static(body.as_bytes()),
            retry_after: None,
        }
    }

    /// The answer as hyper sends it.
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::fixed(self.body));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            resp.headers_mut()
                .insert(UPGRADE, UPGRADE_REQUIRED_PROTOCOL);
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        resp
    }
}

/// A response for a backend failure. After a client body failure the connection cannot carry
/// another request (the rest of the body is unread): it closes.
pub fn failure(f: ProxyFailure) -> Response<ResponseBody> {
    let (status, body) = f.status_and_body();
    let mut resp = plain(status, body);
    if f.is_client_error() {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A small plain-text response.
pub fn plain(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::fixed(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    resp
}

/// Called once when a forwarded response body finishes or is dropped (for the access log).
pub trait BodyDone: Send + Sync {
    /// `bytes` is how many body bytes reached the client; `complete` is false if it was cut short.
    fn done(self: Box<Self>, bytes: u64, complete: bool);
}

/// The body of every response fwgate sends: a fixed buffer, or the backend's stream relayed
/// frame by frame (never buffered whole) with a byte count.
pub struct ResponseBody {
    inner: Inner,
}

enum Inner {
    Fixed(Option<Bytes>),
    Upstream {
        body: Incoming,
        sent: u64,
        on_done: Option<Box<dyn BodyDone>>,
        close: Option<std::sync::Arc<crate::registry::CloseSignal>>,
    },
}

/// Why a streaming response was cut short by fwgate itself.
#[derive(Debug, thiserror::Error)]
#[error("closed by fwgate: the rules in force no longer admit this request")]
pub struct ClosedByPolicy;

impl ResponseBody {
    /// A body that is exactly these bytes (Content-Length is set from it).
    pub fn fixed(bytes: Bytes) -> ResponseBody {
        ResponseBody {
            inner: Inner::Fixed(Some(bytes)),
        }
    }

    /// The bytes of a fixed body (None for a streamed one), for callers that write the
    /// response themselves.
    pub fn fixed_bytes(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Fixed(b) => Some(b.as_deref().unwrap_or_default()),
            Inner::Upstream { .. } => None,
        }
    }

    /// An empty body.
    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: Inner::Fixed(None),
        }
    }

    /// The backend's body, streamed; `on_done` runs when it ends or is dropped. When `close` is
    /// signalled (a rule change or kill-switch entry refuses this request now), the body ends
    /// with an error, which makes the server abort the response and close the connection.
    pub fn upstream(
        body: Incoming,
        on_done: Option<Box<dyn BodyDone>>,
        close: Option<std::sync::Arc<crate::registry::CloseSignal>>,
    ) -> ResponseBody {
        ResponseBody {
            inner: Inner::Upstream {
                body,
                sent: 0,
                on_done,
                close,
            },
        }
    }
}

/// Errors of [`ResponseBody`]: the backend's, or fwgate closing a request by policy.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().inner {
            Inner::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream {
                body,
                sent,
                on_done,
                close,
            } => {
                if let Some(c) = close {
                    if c.poll_closed(cx).is_ready() {
                        if let Some(done) = on_done.take() {
                            done.done(*sent, false);
                        }
                        return Poll::Ready(Some(Err(Box::new(ClosedByPolicy))));
                    }
                }
                let polled = Pin::new(&mut *body)
                    .poll_frame(cx)
                    .map(|o| o.map(|r| r.map_err(BodyError::from)));
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            *sent += data.len() as u64;
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(done) = on_done.take() {
                            done.done(*sent, true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(done) = on_done.take() {
                            done.done(*sent, false);
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Fixed(b) => b.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Fixed(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Fixed(None) => SizeHint::with_exact(0),
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Inner::Upstream {
            body,
            sent,
            on_done,
            ..
        } = &mut self.inner
        {
            if let Some(done) = on_done.take() {
                // A body already at its end is never polled (HEAD, 204, empty): that is complete.
                done.done(*sent, body.is_end_stream());
            }
        }
    }
}
