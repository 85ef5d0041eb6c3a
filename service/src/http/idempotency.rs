//! `Idempotency-Key`: a repeated request returns the first answer and
//! changes nothing.
//!
//! Each answered request with a key is remembered (the key, a fingerprint
//! of the method, path and body, the status and the body of the answer),
//! in memory and in the log (stream `http-idempotency`), so a restart
//! remembers it too. The newest [`WINDOW`] keys are kept. The runtime's
//! commands also take their command id from the key, so even a request
//! repeated after its key was forgotten takes effect once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Keys remembered at most.
pub const WINDOW: usize = 100_000;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;
const STREAM: &str = "http-idempotency";
const KIND: &str = crate::kinds::IDEMPOTENT_ANSWER;

/// A remembered answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The key.
    pub key: String,
    /// The request's fingerprint.
    pub fingerprint: u64,
    /// The answer's status.
    pub status: u16,
    /// The answer's body (JSON).
    pub body: String,
}

/// Answers by key, and the keys in the order they came.
type Remembered = (HashMap<String, Answer>, VecDeque<String>);

/// The remembered answers.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Remembered>>,
}

/// FNV-1a 64 of the request.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> u64 {
    let mut h = smartmsg_engine::fnv::Fnv1a::new();
    for part in [method.as_bytes(), b"\0", path.as_bytes(), b"\0", body] {
        h.write(part);
    }
    h.finish()
}

impl Store {
    /// The answers remembered in `log` (the newest [`WINDOW`]).
    pub async fn load(log: &dyn EventLog) -> Result<Self, smartmsg_engine::ReadError> {
        let s = Self::default();
        let stream = StreamId::new(STREAM).unwrap_or_else(|_| unreachable!());
        let head = log.stream_version(&stream).await?;
        let mut v = head.saturating_sub(WINDOW as u64).max(1);
        loop {
            let page = log.read_stream(&stream, v, 10_000).await?;
            let Some(last) = page.last() else { break };
            v = last.version + 1;
            for e in &page {
                if let Ok(a) = serde_json::from_slice::<Answer>(&e.payload) {
                    s.remember(a);
                }
            }
        }
        Ok(s)
    }

    fn remember(&self, a: Answer) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *g;
        if map.insert(a.key.clone(), a.clone()).is_none() {
            order.push_back(a.key);
        }
        while order.len() > WINDOW {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// The answer remembered for `key`.
    pub fn get(&self, key: &str) -> Option<Answer> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.get(key).cloned()
    }

    /// Remembers an answer (durably, then in memory).
    pub async fn put(
        &self,
        log: &dyn EventLog,
        a: Answer,
    ) -> Result<(), smartmsg_engine::AppendError> {
        let stream = StreamId::new(STREAM).unwrap_or_else(|_| unreachable!());
        let body = serde_json::to_vec(&a).unwrap_or_default();
        log.append(AppendTx::single(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(KIND, 1, 0, Bytes::from(body))],
        ))
        .await?;
        self.remember(a);
        Ok(())
    }
}

/// Checks an `Idempotency-Key` header's value.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!("must be 1 to {MAX_KEY_LEN} bytes"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("printable ASCII only".into());
    }
    Ok(())
}

/// The campaign command id for a request's key: short, stable, and never
/// one of the runtime's own forms.
pub fn command_id(key: &str) -> String {
    format!("http:{:016x}", fingerprint("", "", key.as_bytes()))
}
