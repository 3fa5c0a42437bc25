//! A watch over the JSON gateway: `POST /v3/watch` whose body is the one `create_request`.
//!
//! The gateway relays etcd's watch stream as one JSON object per line. The request body is sent
//! whole: etcd 3.4's gateway (Go 1.19's HTTP/1 server) does not flush answers while it is still
//! reading a request body, so a body kept open to send `progress_request`s later would hold every
//! event back until the next line. Stalls are therefore detected outside the stream (see
//! [`crate::fleet::sync`]).

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use super::transport::Connection;
use super::types::{Streamed, WatchCreateRequest, WatchResponse};
use super::{escape, Client, EtcdError, MAX_RESPONSE_BYTES};

/// An open watch stream.
pub struct Watch {
    endpoint: String,
    body: Incoming,
    buf: Vec<u8>,
    _conn: Connection<Full<Bytes>>,
}

impl Client {
    /// Opens a watch (connect and answer head bounded by the request timeout, endpoints tried
    /// in order). The first message is normally the `created` answer.
    pub async fn watch(&self, create: &WatchCreateRequest) -> Result<Watch, EtcdError> {
        let first = Bytes::from(
            serde_json::to_vec(&serde_json::json!({ "create_request": create }))
                .map_err(|e| EtcdError::Config(format!("cannot encode the watch: {e}")))?,
        );
        let token = self.token().await?;
        let n = self.inner.transport.endpoints.len().max(1);
        let start = self
            .inner
            .preferred
            .load(std::sync::atomic::Ordering::Relaxed)
            % n;
        let timeout = self.inner.request_timeout;
        let mut last = String::from("no endpoint configured");
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = self.endpoint_url(index);
            let opened = tokio::time::timeout(
                timeout,
                self.open_watch(index, first.clone(), token.as_deref()),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
            match opened {
                Ok(OpenOutcome::Open(w)) => {
                    self.inner
                        .preferred
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    return Ok(w);
                }
                Ok(OpenOutcome::Refused(status, bytes)) => {
                    return Err(self
                        .decode::<serde_json::Value>(&endpoint, status, &bytes)
                        .err()
                        .unwrap_or(EtcdError::Protocol {
                            endpoint,
                            detail: format!("watch answered {status}"),
                        }))
                }
                Err(e) => last = format!("{endpoint}: {e}"),
            }
        }
        Err(EtcdError::Unreachable {
            store: self.inner.store.clone(),
            detail: last,
        })
    }

    async fn open_watch(
        &self,
        index: usize,
        first: Bytes,
        token: Option<&str>,
    ) -> Result<OpenOutcome, String> {
        let mut conn = self.inner.transport.connect::<Full<Bytes>>(index).await?;
        let req = self
            .post(index, "/v3/watch", token)
            .body(Full::new(first))
            .map_err(|e| format!("request: {e}"))?;
        let resp = conn
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("watch request failed: {e}"))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Ok(OpenOutcome::Refused(status, bytes));
        }
        Ok(OpenOutcome::Open(Watch {
            endpoint: self.endpoint_url(index),
            body: resp.into_body(),
            buf: Vec::new(),
            _conn: conn,
        }))
    }
}

enum OpenOutcome {
    Open(Watch),
    Refused(StatusCode, Bytes),
}

impl Watch {
    /// The endpoint this stream is on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next message; `Ok(None)` when etcd closed the stream. Cancel-safe: a partial line
    /// stays buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg: Streamed<WatchResponse> =
                    serde_json::from_slice(line).map_err(|e| EtcdError::Protocol {
                        endpoint: self.endpoint.clone(),
                        detail: format!("unexpected watch message: {e}"),
                    })?;
                return match (msg.result, msg.error) {
                    (Some(r), _) => Ok(Some(r)),
                    (None, Some(e)) => Err(EtcdError::Refused {
                        endpoint: self.endpoint.clone(),
                        code: e.code,
                        message: escape(if e.message.is_empty() {
                            &e.error
                        } else {
                            &e.message
                        }),
                    }),
                    (None, None) => continue,
                };
            }
            if self.buf.len() > MAX_RESPONSE_BYTES {
                return Err(EtcdError::Protocol {
                    endpoint: self.endpoint.clone(),
                    detail: format!("watch message larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(EtcdError::NoAnswer {
                        endpoint: self.endpoint.clone(),
                        detail: format!("watch stream broke: {e}"),
                    })
                }
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
            }
        }
    }
}
