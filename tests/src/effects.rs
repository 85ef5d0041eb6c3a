//! A test aggregate for the delay-queue scheduler tests: each command
//! records one `Fired` event for a job, and the aggregate does **not**
//! deduplicate by itself, so only the scheduler's idempotency key keeps a
//! job's effect to one.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use smartmsg_engine::{
    Aggregate, DecideCtx, DecodeError, EventCodec, EventLog, Job, ManualClock, Repository, StreamId,
};

/// Effects counted per job id.
#[derive(Debug, Default)]
pub struct Effects {
    /// job id → number of `Fired` events.
    pub fired: BTreeMap<String, u32>,
}

/// The aggregate's only error (never returned).
#[derive(Debug)]
pub struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

/// One effect of one job.
#[derive(Debug, Clone)]
pub struct Fired(pub String);

impl EventCodec for Fired {
    fn kind(&self) -> &'static str {
        "Fired"
    }
    fn schema(&self) -> u16 {
        1
    }
    fn encode(&self) -> Bytes {
        Bytes::from(self.0.clone())
    }
    fn decode(kind: &str, _schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        match kind {
            "Fired" => Ok(Fired(String::from_utf8_lossy(payload).into_owned())),
            k => Err(DecodeError::UnknownKind { kind: k.into() }),
        }
    }
}

impl Aggregate for Effects {
    type Command = String;
    type Event = Fired;
    type Error = Never;
    fn decide(&self, job: &String, _: &DecideCtx) -> Result<Vec<Fired>, Never> {
        Ok(vec![Fired(job.clone())])
    }
    fn evolve(&mut self, e: &Fired) {
        *self.fired.entry(e.0.clone()).or_default() += 1;
    }
}

/// Streams the effects are spread over.
pub const STREAMS: u64 = 8;

/// The stream a job's effect goes to.
pub fn stream_of(id: &str) -> StreamId {
    let h = id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    StreamId::new(format!("fx-{}", h % STREAMS)).expect("valid stream id")
}

/// The scheduler's mapper: every job fires an effect named after its id.
pub fn mapper(job: &Job) -> Result<(StreamId, String), String> {
    Ok((stream_of(job.id.as_str()), job.id.to_string()))
}

/// Every job's effect count, read from the log.
pub async fn effects(log: Arc<dyn EventLog>) -> BTreeMap<String, u32> {
    let repo = Repository::<Effects>::new(log, Arc::new(ManualClock::new(0)));
    let mut all = BTreeMap::new();
    for i in 0..STREAMS {
        let s = StreamId::new(format!("fx-{i}")).expect("valid");
        let loaded = repo.load(&s).await.expect("load effects");
        for (k, v) in loaded.state.fired {
            *all.entry(k).or_default() += v;
        }
    }
    all
}
