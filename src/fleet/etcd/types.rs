//! The messages of etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/watch`, `/v3/lease/*`,
//! `/v3/auth/authenticate`), as far as fwgate uses them.
//!
//! The gateway speaks the protobuf JSON mapping: keys and values are base64, 64-bit integers
//! are JSON strings, and fields with their default value (0, false, empty) are left out, so
//! every field here has a default.

use serde::{Deserialize, Serialize};

/// Base64 for `bytes` fields.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// 64-bit integers: written as strings, read from strings or numbers.
mod int64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&n.to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(i64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(n),
            Either::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The header of every answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseHeader {
    /// The store's revision when the answer was made.
    #[serde(default, with = "int64")]
    pub revision: i64,
}

/// One key with its value and revisions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(default, with = "b64")]
    pub key: Vec<u8>,
    /// Revision of the key's creation (0 after a delete event).
    #[serde(default, with = "int64")]
    pub create_revision: i64,
    /// Revision of its last change.
    #[serde(default, with = "int64")]
    pub mod_revision: i64,
    /// The value.
    #[serde(default, with = "b64")]
    pub value: Vec<u8>,
    /// Lease attached, 0 for none.
    #[serde(default, with = "int64")]
    pub lease: i64,
}

/// `/v3/kv/range` (also a transaction operation).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RangeRequest {
    /// First key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// End of the range (exclusive); empty: just `key`.
    #[serde(with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
    /// Most keys returned; 0: no limit.
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub limit: i64,
    /// Keys and revisions only.
    #[serde(skip_serializing_if = "is_false")]
    pub keys_only: bool,
    /// Only the count.
    #[serde(skip_serializing_if = "is_false")]
    pub count_only: bool,
}

/// The answer to a range.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RangeResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// The keys found (at most `limit`).
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
    /// More keys exist beyond `limit`.
    #[serde(default)]
    pub more: bool,
    /// How many keys the range holds.
    #[serde(default, with = "int64")]
    pub count: i64,
}

/// `/v3/kv/put` (also a transaction operation).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PutRequest {
    /// Key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// Value.
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    /// Lease to attach (0: none).
    #[serde(with = "int64", skip_serializing_if = "is_zero")]
    pub lease: i64,
}

/// The answer to a put.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PutResponse {
    /// Header (its revision is the put's).
    #[serde(default)]
    pub header: ResponseHeader,
}

/// `/v3/kv/deleterange` (also a transaction operation).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteRangeRequest {
    /// First key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// End of the range (exclusive); empty: just `key`.
    #[serde(with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
}

/// The answer to a delete.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeleteRangeResponse {
    /// Header.
    #[serde(default)]
    pub header: ResponseHeader,
    /// Keys deleted.
    #[serde(default, with = "int64")]
    pub deleted: i64,
}

/// A transaction condition on one key's revision (0 when the key does not exist).
#[derive(Debug, Clone, Serialize)]
pub struct Compare {
    /// `EQUAL`.
    pub result: &'static str,
    /// `MOD` (last change) or `CREATE`.
    pub target: &'static str,
    /// The key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// For `MOD`.
    #[serde(serialize_with = "opt_int64", skip_serializing_if = "Option::is_none")]
    pub mod_revision: Option<i64>,
}

fn opt_int64<S: serde::Serializer>(n: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_str(&n.to_string()),
        None => s.serialize_none(),
    }
}

impl Compare {
    /// `key`'s last change is at `revision` (0: the key does not exist).
    pub fn mod_revision_is(key: Vec<u8>, revision: i64) -> Compare {
        Compare {
            result: "EQUAL",
            target: "MOD",
            key,
            mod_revision: Some(revision),
        }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOp {
    /// Read.
    RequestRange(RangeRequest),
    /// Write.
    RequestPut(PutRequest),
    /// Delete.
    RequestDeleteRange(DeleteRangeRequest),
}

/// `/v3/kv/txn`: if every compare holds, `success` runs, else `failure`, atomically.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TxnRequest {
    /// Conditions.
    pub compare: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<RequestOp>,
    /// Operations when they do not.
    pub failure: Vec<RequestOp>,
}

/// The result of one transaction operation.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseOp {
    /// For a range.
    #[serde(default)]
    pub response_range: Option<RangeResponse>,
}

/// The answer to a transaction.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TxnResponse {
    /// Header (its revision is the transaction's when it wrote).
    #[serde(default)]
    pub header: ResponseHeader,
    /// Whether the compares held.
    #[serde(default)]
    pub succeeded: bool,
    /// Results of the branch that ran.
    #[serde(default)]
    pub responses: Vec<ResponseOp>,
}

/// `/v3/lease/grant`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseGrantRequest {
    /// Seconds.
    #[serde(rename = "TTL", with = "int64")]
    pub ttl: i64,
}

/// The answer to a grant (also, wrapped in `result`, to a keep-alive).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LeaseResponse {
    /// Lease id.
    #[serde(rename = "ID", default, with = "int64")]
    pub id: i64,
    /// Seconds left; 0 (absent) when the lease does not exist any more.
    #[serde(rename = "TTL", default, with = "int64")]
    pub ttl: i64,
}

/// `/v3/lease/keepalive` and `/v3/lease/revoke`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseIdRequest {
    /// Lease id.
    #[serde(rename = "ID", with = "int64")]
    pub id: i64,
}

/// A streamed answer's envelope (`/v3/lease/keepalive`, `/v3/watch`).
#[derive(Debug, Clone, Deserialize)]
pub struct Streamed<T> {
    /// The message.
    pub result: Option<T>,
    /// An error instead.
    pub error: Option<GatewayError>,
}

/// `/v3/auth/authenticate`.
#[derive(Serialize)]
pub struct AuthenticateRequest<'a> {
    /// User.
    pub name: &'a str,
    /// Password.
    pub password: &'a str,
}

/// The answer to an authentication (the token is a secret: never logged).
#[derive(Deserialize)]
pub struct AuthenticateResponse {
    /// Token for the `Authorization` header.
    #[serde(default)]
    pub token: String,
}

/// What the gateway answers instead of a message when etcd refuses a request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GatewayError {
    /// gRPC status code (16: unauthenticated, 14: unavailable, ...).
    #[serde(default)]
    pub code: i32,
    /// etcd's message, e.g. `etcdserver: invalid auth token`.
    #[serde(default)]
    pub message: String,
    /// The same, in older gateways.
    #[serde(default)]
    pub error: String,
}

/// `create_request` of a watch.
#[derive(Debug, Clone, Serialize)]
pub struct WatchCreateRequest {
    /// First key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// End of the range (exclusive).
    #[serde(with = "b64")]
    pub range_end: Vec<u8>,
    /// First revision to deliver.
    #[serde(with = "int64")]
    pub start_revision: i64,
    /// Periodic progress answers from the server (in addition to the ones fwgate asks for).
    pub progress_notify: bool,
}

/// One change seen by a watch.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Event {
    /// `PUT` (absent: the default) or `DELETE`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The key after the change (for a delete: key and `mod_revision` only).
    #[serde(default)]
    pub kv: KeyValue,
}

impl Event {
    /// Whether the key was deleted.
    pub fn is_delete(&self) -> bool {
        self.kind.as_deref() == Some("DELETE")
    }
}

/// One message of a watch stream.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchResponse {
    /// Header; with no events, a progress answer: everything up to its revision was delivered.
    #[serde(default)]
    pub header: ResponseHeader,
    /// The watch was created.
    #[serde(default)]
    pub created: bool,
    /// The watch was cancelled (see `compact_revision` and `cancel_reason`).
    #[serde(default)]
    pub canceled: bool,
    /// Set when the requested start revision was compacted away: resync from a range.
    #[serde(default, with = "int64")]
    pub compact_revision: i64,
    /// Why it was cancelled.
    #[serde(default)]
    pub cancel_reason: String,
    /// Changes, in revision order.
    #[serde(default)]
    pub events: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_json_round_trips() {
        let put = serde_json::to_string(&PutRequest {
            key: b"foo".to_vec(),
            value: b"bar".to_vec(),
            lease: 7,
        })
        .unwrap();
        assert_eq!(put, r#"{"key":"Zm9v","value":"YmFy","lease":"7"}"#);
        let cmp = serde_json::to_string(&Compare::mod_revision_is(b"foo".to_vec(), 0)).unwrap();
        assert_eq!(
            cmp,
            r#"{"result":"EQUAL","target":"MOD","key":"Zm9v","mod_revision":"0"}"#
        );
        let op = serde_json::to_string(&RequestOp::RequestRange(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(op, r#"{"request_range":{"key":"YQ=="}}"#);
        // As etcd 3.4 answers (defaults left out, int64 as strings).
        let r: RangeResponse = serde_json::from_str(r#"{"header":{"cluster_id":"1","revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#).unwrap();
        assert_eq!(r.header.revision, 2);
        assert_eq!(
            (r.kvs[0].key.as_slice(), r.kvs[0].value.as_slice()),
            (&b"foo"[..], &b"bar"[..])
        );
        let t: TxnResponse = serde_json::from_str(r#"{"header":{"revision":"4"}}"#).unwrap();
        assert!(!t.succeeded);
        let w: Streamed<WatchResponse> = serde_json::from_str(r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"4"}}]}}"#).unwrap();
        let w = w.result.unwrap();
        assert!(w.events[0].is_delete());
        assert_eq!(w.events[0].kv.mod_revision, 4);
        let c: Streamed<WatchResponse> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"7"}}"#,
        )
        .unwrap();
        assert_eq!(c.result.unwrap().compact_revision, 7);
        let l: LeaseResponse =
            serde_json::from_str(r#"{"ID":"4111120345674708239","TTL":"5"}"#).unwrap();
        assert_eq!((l.id, l.ttl), (4111120345674708239, 5));
    }
}
