//! Configuration of a [`RabbitDelayQueue`](crate::RabbitDelayQueue) and the
//! delay-level arithmetic.

use std::time::Duration;

use smartmsg_engine::QueueLimits;

use crate::error::RabbitError;

/// Longest queue-name prefix (AMQP queue names are at most 255 bytes).
pub const MAX_PREFIX_LEN: usize = 200;

/// Largest payload this backend accepts whatever the limits say (RabbitMQ
/// 3.10's default `max_message_size` is 128 MiB; a job envelope adds a few
/// hundred bytes).
pub const MAX_PAYLOAD_CAP: usize = 64 << 20;

/// How a [`RabbitDelayQueue`](crate::RabbitDelayQueue) connects and what it
/// enforces. Build it with [`RabbitConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Prefix of every queue this delay queue uses (ASCII letters, digits,
    /// `.`, `-`, `_`; at most [`MAX_PREFIX_LEN`] bytes). Processes that
    /// share a prefix share the queue.
    pub prefix: String,
    /// The limits enforced (typed errors when exceeded).
    pub limits: QueueLimits,
    /// TTL of the shortest delay level, in ms. A job with less than this
    /// left goes straight to the due queue (and `poll_due` holds it until
    /// `now_ms` reaches its due time).
    pub base_ms: u64,
    /// Number of delay levels: level `k` has a TTL of `base_ms << k`. A
    /// delay longer than the top level cycles through the top level, so
    /// there is no maximum delay.
    pub levels: u8,
    /// Unacked messages the hop consumer may hold at once (its prefetch).
    pub hop_prefetch: u16,
    /// Most due-queue messages `poll_due` keeps fetched but not yet leased
    /// (messages that reached the due queue before `now_ms` reached their
    /// due time). When full, `poll_due` stops fetching.
    pub max_held: usize,
    /// Retention of the journal stream (`x-max-age`, RabbitMQ syntax such as
    /// `7D`, `12h`). Make it longer than your longest delay: a job whose
    /// journal record has aged out is still delivered, but a process that
    /// opens the queue afterwards no longer knows it is pending.
    pub journal_max_age: String,
    /// How long a tombstone is kept after the later of its job's due time
    /// and the moment it was written, in ms.
    pub tombstone_grace_ms: u64,
    /// Virtual-time mode: every job goes straight to the due queue (the
    /// TTL levels are not used) and `poll_due` releases it once the
    /// caller's `now_ms` reaches its due time. RabbitMQ is then the durable
    /// store, lease and dead-letter machinery for a caller that drives its
    /// own clock (a simulation, the conformance suite). A poller fetches
    /// and holds up to [`max_held`](Self::max_held) not-yet-due jobs, so
    /// keep fewer than that pending; lease expiry follows `now_ms` only.
    pub virtual_time: bool,
    /// Whether a background task expires leases by the wall clock (in
    /// addition to `poll_due`, which expires them by the caller's
    /// `now_ms`). Turn it off when callers pass a `now_ms` that is not the
    /// wall clock.
    pub background_lease_expiry: bool,
    /// Period of the background task (lease expiry, tombstone pruning).
    pub sweep_interval: Duration,
    /// The broker's `consumer_timeout` in ms (RabbitMQ's default is 30
    /// minutes; 0 if it is disabled): a delivery unacked for longer makes
    /// the broker close the channel, so `limits.lease_ms` must stay below
    /// it.
    pub broker_consumer_timeout_ms: u64,
    /// How long `open` (and each reconnect) may take to connect, declare the
    /// queues and read the journal to its end.
    pub open_timeout: Duration,
    /// First and largest wait between reconnect attempts.
    pub reconnect_backoff: (Duration, Duration),
    /// Dead letters kept in the dead-letter queue (`x-max-length`, the
    /// oldest dropped first); default 100,000. Part of the queue's
    /// declaration: changing it for an existing prefix makes `open` fail
    /// with the broker's `PRECONDITION_FAILED` until the queue is deleted.
    pub max_dead_letters: u32,
}

impl RabbitConfig {
    /// A configuration with the defaults: [`QueueLimits::default`], levels
    /// of 8 ms × 2^k for k = 0..21 (the top level is 4.66 h), journal
    /// retention 7 days, tombstones kept 1 h past due.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            limits: QueueLimits::default(),
            base_ms: 8,
            levels: 22,
            hop_prefetch: 256,
            max_held: 10_000,
            virtual_time: false,
            journal_max_age: "7D".into(),
            tombstone_grace_ms: 3_600_000,
            background_lease_expiry: true,
            sweep_interval: Duration::from_millis(200),
            broker_consumer_timeout_ms: 30 * 60 * 1000,
            open_timeout: Duration::from_secs(60),
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            max_dead_letters: 100_000,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), RabbitError> {
        let bad = |m: String| Err(RabbitError::Config(m));
        if self.prefix.is_empty() || self.prefix.len() > MAX_PREFIX_LEN {
            return bad(format!(
                "prefix must be 1 to {MAX_PREFIX_LEN} bytes, it is {}",
                self.prefix.len()
            ));
        }
        if let Some(c) = self
            .prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return bad(format!("prefix: character {c:?} is not allowed"));
        }
        if self.base_ms == 0 {
            return bad("base_ms must be at least 1".into());
        }
        if self.levels == 0 || self.levels > 40 {
            return bad(format!("levels must be 1 to 40, it is {}", self.levels));
        }
        let top = self.base_ms.checked_shl(u32::from(self.levels) - 1);
        if top.is_none_or(|t| t > u64::from(u32::MAX) || t >> (self.levels - 1) != self.base_ms) {
            return bad(format!(
                "the top level's TTL base_ms << (levels - 1) must fit RabbitMQ's 32-bit \
                 x-message-ttl (base_ms {}, levels {})",
                self.base_ms, self.levels
            ));
        }
        let l = &self.limits;
        if l.max_id_len == 0 || l.max_id_len > 1024 {
            return bad(format!(
                "limits.max_id_len must be 1 to 1024, it is {}",
                l.max_id_len
            ));
        }
        if l.max_payload_bytes > MAX_PAYLOAD_CAP {
            return bad(format!(
                "limits.max_payload_bytes is {}; this backend caps it at {MAX_PAYLOAD_CAP}",
                l.max_payload_bytes
            ));
        }
        if l.max_poll == 0 || l.max_attempts == 0 || l.lease_ms == 0 {
            return bad("limits.max_poll, max_attempts and lease_ms must be positive".into());
        }
        if self.broker_consumer_timeout_ms != 0 && l.lease_ms >= self.broker_consumer_timeout_ms {
            return bad(format!(
                "limits.lease_ms ({}) must be below the broker's consumer_timeout ({} ms): a \
                 delivery held longer makes RabbitMQ close the channel",
                l.lease_ms, self.broker_consumer_timeout_ms
            ));
        }
        if self.hop_prefetch == 0 || self.max_held == 0 {
            return bad("hop_prefetch and max_held must be positive".into());
        }
        if self.journal_max_age.is_empty()
            || !self
                .journal_max_age
                .ends_with(['Y', 'M', 'D', 'h', 'm', 's'])
            || !self.journal_max_age[..self.journal_max_age.len() - 1]
                .chars()
                .all(|c| c.is_ascii_digit())
            || self.journal_max_age.len() < 2
        {
            return bad(format!(
                "journal_max_age {:?} is not a RabbitMQ age such as 7D or 12h",
                self.journal_max_age
            ));
        }
        Ok(())
    }

    /// TTL of level `k`, in ms.
    pub fn level_ttl_ms(&self, k: u8) -> u64 {
        self.base_ms << k
    }

    /// Where a message with `remaining_ms` left goes: the largest level
    /// whose TTL is at most `remaining_ms`, or `None` (the due queue) when
    /// less than `base_ms` is left.
    pub fn level_for(&self, remaining_ms: u64) -> Option<u8> {
        if remaining_ms < self.base_ms {
            return None;
        }
        let ratio = remaining_ms / self.base_ms; // ≥ 1
        let k = 63 - ratio.leading_zeros(); // floor(log2(ratio))
        Some(k.min(u32::from(self.levels) - 1) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_pick_the_largest_ttl_not_above_the_remaining_delay() {
        let c = RabbitConfig::new("amqp://x", "p");
        c.validate().unwrap();
        assert_eq!(c.level_for(0), None);
        assert_eq!(c.level_for(7), None);
        assert_eq!(c.level_for(8), Some(0));
        assert_eq!(c.level_for(15), Some(0));
        assert_eq!(c.level_for(16), Some(1));
        assert_eq!(c.level_for(1000), Some(6)); // 512 ms
        assert_eq!(c.level_ttl_ms(6), 512);
        for r in [8u64, 9, 100, 1000, 3_600_000, 16_777_215] {
            let k = c.level_for(r).unwrap();
            assert!(c.level_ttl_ms(k) <= r);
            assert!(k == c.levels - 1 || c.level_ttl_ms(k + 1) > r);
        }
        assert_eq!(c.level_for(u64::MAX), Some(21));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let mut c = RabbitConfig::new("amqp://x", "p q");
        assert!(c.validate().is_err());
        c.prefix = "ok".into();
        c.levels = 40;
        assert!(c.validate().is_err());
        c.levels = 22;
        c.limits.lease_ms = 31 * 60 * 1000;
        assert!(c.validate().is_err());
        c.limits.lease_ms = 1000;
        c.journal_max_age = "forever".into();
        assert!(c.validate().is_err());
        c.journal_max_age = "12h".into();
        c.validate().unwrap();
    }
}
