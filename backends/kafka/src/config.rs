//! Configuration of a [`crate::KafkaEventLog`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use smartmsg_engine::Limits;

use crate::error::KafkaLogError;

/// A test hook called on the writer thread after every record of a Kafka
/// transaction was acknowledged by the broker and before the transaction is
/// committed, with the transaction's batch sequence number. It returns
/// whether to commit (`false` aborts the transaction as if the commit had
/// failed). Crash, fencing and abort tests use it to stop or fail a writer
/// at exactly that point.
pub type BeforeCommitHook = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Where the log lives and how it talks to Kafka.
///
/// One log is one events topic (`smartmsg.<log_name>.events`) written by one
/// writer whose `transactional.id` is `smartmsg.<log_name>.writer`; see the
/// crate documentation for what that means for deployment.
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap: String,
    /// The log's name: ASCII letters, digits, `.`, `_`, `-`; at most 200
    /// bytes. The topic and the transactional id derive from it.
    pub log_name: String,
    /// Partitions of the events topic (1 to 65,535). Streams are hashed over
    /// this count, so it is fixed for the log's life; opening an existing
    /// topic with another count is refused.
    pub partitions: u32,
    /// Replication factor used when the topic is created (3 in production;
    /// the default 1 suits a single test broker).
    pub replication_factor: i32,
    /// Limits enforced on appends and reads.
    pub limits: Limits,
    /// `transaction.timeout.ms`: the broker aborts a transaction its writer
    /// left open this long (a crashed writer's, unless a new writer fences
    /// it sooner).
    pub transaction_timeout: Duration,
    /// How long one broker operation may take before it counts as failed
    /// (producer `message.timeout.ms`, commits, metadata, a stalled read or
    /// rebuild).
    pub request_timeout: Duration,
    /// Most events the writer puts into one Kafka transaction when appends
    /// queue up (group commit); a single larger `AppendTx` still goes alone.
    pub max_batch_events: usize,
    /// Most payload bytes in one Kafka transaction (as for
    /// `max_batch_events`).
    pub max_batch_bytes: usize,
    /// Appends that may wait for the writer; further callers wait for room.
    pub queue_capacity: usize,
    /// Consumers kept for reads; this many reads run at once.
    pub readers: usize,
    /// A read fetches a partition's wanted offsets as runs; a gap between
    /// two wanted offsets wider than this starts a new run (a new fetch
    /// position) instead of reading through the records in between.
    pub seek_gap: i64,
    /// The writer checkpoints its index to the topic
    /// `smartmsg.<log_name>.checkpoints` each time this many events were
    /// committed since its last checkpoint, so that `open` reads only the
    /// events after the newest checkpoint instead of the whole events topic
    /// (see `checkpoint.rs`). `0` disables checkpoints: none is
    /// written and `open` ignores existing ones (a full rebuild).
    pub checkpoint_every_events: u64,
    /// Largest piece of a checkpoint in one Kafka record (a checkpoint of a
    /// large log is many MB and is split into records of at most this
    /// many bytes plus a 40-byte header). 1 KiB to 1 MiB; the checkpoints
    /// topic's `max.message.bytes` is set above it.
    pub checkpoint_chunk_bytes: usize,
    /// Extra librdkafka properties for every client (security, SASL, …),
    /// applied after the backend's own.
    pub client_properties: Vec<(String, String)>,
    /// Test hook; see [`BeforeCommitHook`]. `None` in production.
    #[doc(hidden)]
    pub before_commit: Option<BeforeCommitHook>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("log_name", &self.log_name)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("limits", &self.limits)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("queue_capacity", &self.queue_capacity)
            .field("readers", &self.readers)
            .field("seek_gap", &self.seek_gap)
            .field("checkpoint_every_events", &self.checkpoint_every_events)
            .field("checkpoint_chunk_bytes", &self.checkpoint_chunk_bytes)
            .field("client_properties", &self.client_properties)
            .field("before_commit", &self.before_commit.is_some())
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration with the defaults: 4 partitions, replication 1,
    /// default limits, 60 s transaction timeout, 30 s request timeout, a
    /// checkpoint every 100,000 events in chunks of 512 KiB.
    pub fn new(bootstrap: impl Into<String>, log_name: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            log_name: log_name.into(),
            partitions: 4,
            replication_factor: 1,
            limits: Limits::default(),
            transaction_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_batch_events: 10_000,
            max_batch_bytes: 8 << 20,
            queue_capacity: 10_000,
            readers: 4,
            seek_gap: 1_000,
            checkpoint_every_events: 100_000,
            checkpoint_chunk_bytes: 512 << 10,
            client_properties: Vec::new(),
            before_commit: None,
        }
    }

    /// Sets the partition count.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// The events topic: `smartmsg.<log_name>.events`.
    pub fn topic(&self) -> String {
        format!("smartmsg.{}.events", self.log_name)
    }

    /// Sets [`KafkaConfig::checkpoint_every_events`] (`0` disables
    /// checkpoints).
    pub fn with_checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_every_events = events;
        self
    }

    /// The checkpoints topic: `smartmsg.<log_name>.checkpoints`.
    pub fn checkpoint_topic(&self) -> String {
        format!("smartmsg.{}.checkpoints", self.log_name)
    }

    /// The largest record written to the checkpoints topic (a chunk and
    /// its header, rounded up); its `max.message.bytes`.
    pub fn max_checkpoint_record_bytes(&self) -> usize {
        self.checkpoint_chunk_bytes + (4 << 10)
    }

    /// The writer's `transactional.id`: `smartmsg.<log_name>.writer`.
    pub fn transactional_id(&self) -> String {
        format!("smartmsg.{}.writer", self.log_name)
    }

    /// The largest Kafka record this log writes: an event at
    /// [`Limits::max_event_bytes`] plus its key and envelope, rounded up.
    /// Producer `message.max.bytes` and the topic's `max.message.bytes` are
    /// set to it.
    pub fn max_record_bytes(&self) -> usize {
        (self.limits.max_event_bytes + (64 << 10)).max(1 << 20)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), KafkaLogError> {
        let bad = |m: String| Err(KafkaLogError::Config(m));
        if self.bootstrap.trim().is_empty() {
            return bad("bootstrap is empty".into());
        }
        if self.log_name.is_empty()
            || self.log_name.len() > 200
            || !self
                .log_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad(format!(
                "log name {:?} must be 1 to 200 ASCII letters, digits, '.', '_' or '-'",
                self.log_name
            ));
        }
        if self.partitions == 0 || self.partitions > u32::from(u16::MAX) {
            return bad(format!(
                "partitions is {}; it must be 1 to 65535",
                self.partitions
            ));
        }
        if self.replication_factor < 1 {
            return bad("replication_factor must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_kind_len > usize::from(u16::MAX) || l.max_id_len > usize::from(u16::MAX) {
            return bad("max_kind_len and max_id_len must fit in 16 bits".into());
        }
        if l.max_event_bytes > (256 << 20) {
            return bad("max_event_bytes above 256 MiB is not supported on Kafka".into());
        }
        if l.max_tx_events > u32::MAX as usize / 2 || self.max_batch_events > u32::MAX as usize / 2
        {
            return bad("max_tx_events and max_batch_events must fit in 31 bits".into());
        }
        if self.max_batch_events == 0 || self.max_batch_bytes == 0 {
            return bad("max_batch_events and max_batch_bytes must be positive".into());
        }
        if self.queue_capacity == 0 || self.readers == 0 {
            return bad("queue_capacity and readers must be positive".into());
        }
        if !(1 << 10..=1 << 20).contains(&self.checkpoint_chunk_bytes) {
            return bad(format!(
                "checkpoint_chunk_bytes is {}; it must be 1 KiB to 1 MiB",
                self.checkpoint_chunk_bytes
            ));
        }
        if self.seek_gap < 1 {
            return bad("seek_gap must be positive".into());
        }
        if self.request_timeout < Duration::from_millis(100)
            || self.transaction_timeout < self.request_timeout + Duration::from_secs(1)
        {
            return bad(
                "request_timeout must be at least 100 ms and transaction_timeout at least \
                 request_timeout + 1 s"
                    .into(),
            );
        }
        Ok(())
    }

    pub(crate) fn client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c.set("client.id", format!("smartmsg.{}", self.log_name));
        c
    }

    pub(crate) fn apply_overrides(&self, c: &mut rdkafka::ClientConfig) {
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
    }

    pub(crate) fn request_ms(&self) -> u64 {
        self.request_timeout.as_millis() as u64
    }
}
