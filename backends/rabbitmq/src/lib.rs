//! # smartmsg-rabbitmq
//!
//! The [`DelayQueue`](smartmsg_engine::DelayQueue) port on a RabbitMQ
//! server, with [lapin](https://docs.rs/lapin): [`RabbitDelayQueue`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use smartmsg_engine::{DelayQueue, Job, JobId};
//! use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
//!
//! let cfg = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "smartmsg.delay");
//! let q = RabbitDelayQueue::open(cfg).await?;
//! let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
//! q.schedule(Job { id: JobId::new("campaign-7/batch-3")?, due_ms: now + 60_000, payload: "go".into() }).await?;
//! for lease in q.poll_due(now + 60_000, 100).await? {
//!     // … run it, make its effect durable, then:
//!     q.ack(&lease.token).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! ## Design: a timing wheel made of queues
//!
//! RabbitMQ has no delayed delivery without a plugin, and a per-message TTL
//! on a classic queue only expires at the head of the queue: a 1 s message
//! behind a 1 h one waits an hour. So every queue here has **one fixed
//! TTL**, and a job *hops down* a ladder of them:
//!
//! - `{prefix}.level.{k}` for k = 0..[`levels`](RabbitConfig::levels): a
//!   durable classic queue with `x-message-ttl = base_ms << k` (defaults:
//!   8 ms × 2^k, k = 0..21, so 8 ms … 4.66 h) whose dead-letter exchange
//!   (the default exchange) routes expired messages to `{prefix}.hop`.
//!   Within one level every message has the same TTL, so expiry order is
//!   queue order: nothing ever waits behind a longer delay.
//! - A job is published to the largest level whose TTL is at most its
//!   remaining delay. When it expires, the **hop consumer** (a background
//!   task of every open queue) re-publishes it, with the remaining delay
//!   recomputed from the wall clock, to the largest level that fits, and so
//!   on; once less than `base_ms` is left it goes to `{prefix}.due`. A delay
//!   longer than the top level cycles through the top level, so there is
//!   no maximum delay. A delay `d` takes about popcount(d / base_ms) hops
//!   (at most `levels`, plus one per top-level cycle), and lateness does not
//!   add up across hops because each hop recomputes what is left.
//! - `poll_due` takes messages from `{prefix}.due` with `basic.get` (manual
//!   ack), holds those whose due time is still above the caller's `now_ms`
//!   (they arrive up to `base_ms` early), and leases the due ones, earliest
//!   due first (ties by id) among those it holds.
//! - Every publish is persistent (`delivery_mode` 2) to a durable queue and
//!   waits for its **publisher confirm**; every consumer acks manually,
//!   and a message is acked only after its successor (the next hop, the
//!   re-published copy, the dead letter, the tombstone) is confirmed. A
//!   crash between the two leaves a duplicate copy, never a loss; copies are
//!   de-duplicated on delivery (below).
//! - `{prefix}.dead`: dead-letter records (job id, payload or raw message,
//!   attempts, reason). [`dead_letters`](smartmsg_engine::DelayQueue::dead_letters)
//!   reads them without consuming (get, then nack with requeue).
//! - `{prefix}.journal`: a RabbitMQ **stream** (append-only, read by every
//!   process from its start, retention [`journal_max_age`](RabbitConfig::journal_max_age))
//!   of `Pending{id, seq, rev, at, hash}` and `Retired{id, before}` records.
//!   Every open queue replays it into a registry of pending ids and
//!   tombstones, follows it, and reads it up to a barrier of its own
//!   before `open` returns (and after each reconnect).
//!
//! ### Message format
//!
//! The body is a small versioned binary envelope (magic `SMDQ`, version 1,
//! kind, big-endian fields; see `codec.rs`): a job carries its id, its
//! `due_ms`, when it is due now (`at_ms`: later after an expired lease or a
//! nack), `seq` (its incarnation: one per successful `schedule`), the number
//! of deliveries already made and the payload. Anything on the hop or due queue
//! that does not decode (wrong magic, unknown version, truncation, trailing
//! bytes, an invalid id) is filed on the dead-letter queue with the reason
//! and the raw bytes, then acked: never a panic, never silently dropped.
//!
//! ## Guarantees and how each is met
//!
//! - **Durable on return.** `schedule` returns after the broker confirmed
//!   the job message (persistent, durable queue) and its journal record.
//! - **No head-of-line blocking**, by the fixed-TTL levels above (tested:
//!   a 1 s job scheduled after a 1 h job fires at about 1 s).
//! - **Survives a broker restart.** Queues are durable, messages persistent,
//!   the journal is a stream; the queue object reconnects by itself (with
//!   backoff) and re-reads the journal from where it stopped. Tested with
//!   `rabbitmqctl stop_app` / `start_app` while jobs are pending.
//! - **Survives a broker crash.** The levels are quorum queues with
//!   at-least-once dead-lettering (RabbitMQ ≥ 3.10): the broker drops an
//!   expired job from its level only once the hop queue confirmed it, so a
//!   crash at that instant leaves a duplicate, never a loss (tested by
//!   halting the Erlang VM with 150 jobs in the levels). At boot the levels
//!   start before the exchanges are back, and a job that expires then waits
//!   for the broker's dead-letter retry,
//!   `dead_letter_worker_publisher_confirm_timeout` (default 180 s; set it
//!   to about 5 s in `advanced.config`, as `scripts/services.sh` does).
//! - **Leases.** A leased delivery stays unacked on the broker. When its
//!   deadline passes (checked by `poll_due` against its `now_ms`, and by a
//!   background task against the wall clock unless
//!   [`background_lease_expiry`](RabbitConfig::background_lease_expiry) is
//!   off), a copy carrying the number of deliveries made so far is
//!   re-published, due again at the lease's deadline, and the original
//!   acked: the attempt count lives in the message, so it is right across
//!   processes, and the next lease has attempt + 1. After `max_attempts`
//!   deliveries the job is dead-lettered instead, with the reason.
//!   `nack(token, None)` re-publishes it due at the `now_ms` of the poll
//!   that leased it (so at once, ahead of jobs due later), `nack(token,
//!   Some(t))` due at `t` (through the levels); a lease always carries the
//!   job as scheduled (its own `due_ms`). These are the engine's precise
//!   semantics (`smartmsg_engine::delay_memory`).
//!   If the connection (or the process) holding a delivery dies, the broker
//!   puts it back itself, flagged `redelivered`; that flag counts as one
//!   more delivery, so a job that crashes its worker every time still ends
//!   in the dead letters. (A message that was only *held*, fetched but not
//!   yet due, is counted too: after a connection loss its attempt number
//!   can be one too high.)
//! - **Cancel** writes a tombstone `Retired{id, before = now}` to the
//!   journal: every process drops any copy of that job with an older `seq`
//!   on sight (at a hop or at the due queue), a restarted process learns it
//!   by replaying the journal, and held copies are acked away at once. A
//!   leased job is removed at once too: its lease is stale (`ack` and
//!   `nack` report [`StaleLease`](smartmsg_engine::QueueError::StaleLease)
//!   and ack the delivery away). `cancel` returns whether the registry (or
//!   this process) knew the job as pending or leased.
//!   Tombstones are kept until `max(due, now) + tombstone_grace_ms`.
//! - **Ack** writes the same kind of tombstone before acking the delivery,
//!   so any duplicate copy still travelling is dropped, and the id is free
//!   again (a later `schedule` has a newer `seq`).
//!
//! ## Idempotent `schedule`, and its limits
//!
//! RabbitMQ has no de-duplication, so the registry does it: `schedule` of
//! an id the registry holds as pending returns
//! [`AlreadyPending`](smartmsg_engine::Scheduled::AlreadyPending) for the
//! same `due_ms` and payload (compared by a 64-bit FNV-1a hash) and
//! [`JobIdReused`](smartmsg_engine::QueueError::JobIdReused) otherwise.
//! Concurrent `schedule`s of one id in one process are serialised. A retry
//! after a failed `schedule` with the same content reuses the failed call's
//! `seq`, so if the first message did reach the broker the two are one
//! incarnation, and the second copy is dropped on delivery (as a duplicate
//! of a copy held or leased here, or as retired once one was acked). What
//! it cannot do:
//!
//! - **Across processes it is eventual.** Another process learns of a
//!   schedule, ack or cancel when it reads the journal (milliseconds). Two
//!   processes scheduling the same id within that window both succeed and
//!   the job runs twice (at-least-once; the job id must make the effect
//!   once, as the port requires anyway).
//! - Duplicate copies consumed by *different* processes at the same moment
//!   are both delivered.
//! - Tombstones and `before = now` assume the clocks of the processes
//!   sharing a prefix agree to well within the time between an ack or
//!   cancel and the next schedule of the same id (NTP is ample).
//! - The registry is as old as the journal's retention: a job pending
//!   longer than [`journal_max_age`](RabbitConfig::journal_max_age) still
//!   fires, but a process opened after its record aged out no longer
//!   de-duplicates or cancels it by registry (a cancel still writes a
//!   tombstone, kept `tombstone_grace_ms`). Set the retention above your
//!   longest delay. Opening replays the whole retained journal (time
//!   proportional to it: about 120 k records/s in a release build, 28 k/s
//!   in a debug build, on the reference machine; 1 M records ≈ 8 s).
//! - Memory: each pending id costs about 100 bytes in every open queue.
//!
//! ## Time: this backend follows the wall clock
//!
//! The port passes `now_ms` in, but RabbitMQ's TTLs run on the broker's real
//! time. So the levels move jobs by the wall clock, and `now_ms` only
//! filters: `poll_due(now_ms, max)` returns jobs with `due_ms ≤ now_ms` among
//! those that have *reached the due queue*. With `now_ms` = the wall clock
//! (the intended use), a job is returned at most the precision below after
//! its due time. With a virtual clock ahead of real time, jobs come no
//! sooner than real time brings them; behind it, they wait in the due queue
//! (and up to [`max_held`](RabbitConfig::max_held) of them fetched and
//! held) until `now_ms` catches up. `len` and `next_due` come from the
//! journal registry: every pending or leased job of every process
//! (eventually); `next_due` is the earliest time at which a poll may return
//! or end something: pending jobs' due times (a job whose lease expired or
//! was nacked is due at its new time) and this process's lease deadlines.
//! For a caller that drives its own clock there is a
//! [`virtual_time`](RabbitConfig::virtual_time) mode (below).
//!
//! ## Timing precision (measured)
//!
//! Lateness = the wall-clock time `poll_due` returned a job minus its
//! `due_ms`, with a poller calling `poll_due(wall_ms, …)` every 2 ms (test
//! `timing_precision`: 300 jobs, random delays of 50 ms to 12 s, so through
//! every level up to 8 s; RabbitMQ 3.10.8 on loopback, 2 shared cores,
//! debug build; five runs):
//!
//! | lateness | p50    | p99     | max     |
//! |----------|--------|---------|---------|
//! | measured | 2–3 ms | 5–15 ms | 6–25 ms |
//!
//! No job fired early (a job that reaches the due queue before its due
//! time is held until `now_ms` reaches it). A job's lateness is what its
//! last hop costs (TTL timer, dead-lettering, hop consumer, confirmed
//! publish) plus the poll interval; earlier hops do not add up because each
//! recomputes the time left. Jobs due 150 ms apart fire in due order
//! (`mixed_delays_in_random_order_fire_in_due_order`), and a 1 s job
//! scheduled after a 1 h job fires 2–5 ms after its second
//! (`no_head_of_line_blocking`). Lateness grows when the hop consumers
//! (one per open queue, `hop_prefetch` in flight each) fall behind the
//! hop rate, or while the broker is down (jobs due during an outage fire
//! right after the reconnect). Timings are printed by the tests, never
//! asserted beyond a loose 750 ms bound.
//!
//! ## Closing, crashing, reconnecting
//!
//! [`close`](RabbitDelayQueue::close) ends every outstanding lease as if
//! nacked with no retry time (due again at the time of the poll that leased
//! it, or dead-lettered after its last attempt) and puts fetched jobs back
//! unchanged, so a reopened queue carries on exactly. Dropping the queue
//! (or a crash) leaves that to the broker: unacked deliveries return to the
//! due queue flagged redelivered, counted as a delivery. When the connection
//! drops (or a channel is closed under it) the queue reconnects in the
//! background with backoff, declares its queues again and reads the
//! journal again from its start (a crashed broker may have lost the
//! stream's unsynced tail); operations meanwhile fail with
//! [`RabbitError::Disconnected`]. Leases of the lost connection are void
//! (the broker redelivers them); acking one still writes its tombstone,
//! so the redelivered copy is dropped if it has not been leased again yet.
//!
//! ## Several processes on one prefix
//!
//! Any number of processes may open the same prefix: every one hops
//! expired messages, follows the journal and polls the due queue. A poll
//! fetches everything on the due queue up to [`max_held`](RabbitConfig::max_held)
//! to order it by due time, so one busy poller can take jobs another would
//! have leased; lower `max_held` (towards the poll size) to share more
//! evenly, at the cost of due-order across what was not fetched.
//!
//! ## Conformance
//!
//! The engine's `testkit` suite (`delay_queue_conformance`) drives a
//! virtual clock (due times up to 31 years ahead and `u64::MAX`, returned
//! the moment `now_ms` reaches them), which real TTLs cannot follow. It runs
//! against the real broker with [`virtual_time`](RabbitConfig::virtual_time)
//! on (every job straight to the due queue, released by the caller's
//! clock), which exercises everything but the TTL ladder: confirms, the
//! journal, idempotency, tombstones, leases, attempts, dead letters,
//! `len`, `next_due` and reopening. The ladder, precision, broker restarts,
//! crashes and several processes are covered by the real-time tests
//! (`tests/realtime.rs`, `tests/restart.rs`).
//!
//! ## Limits
//!
//! Everything in [`QueueLimits`](smartmsg_engine::QueueLimits) is checked
//! with a typed error (`BadJobId`, `PayloadTooLarge`, `PollTooLarge`);
//! payloads are capped at [`MAX_PAYLOAD_CAP`] whatever the limits say, and
//! `lease_ms` must stay below the broker's `consumer_timeout` (30 min by
//! default; a delivery unacked longer than that makes RabbitMQ close the
//! channel, after which the job is redelivered). Configuration errors,
//! connection loss and broker refusals are [`RabbitError`]s inside
//! [`QueueError::Backend`](smartmsg_engine::QueueError::Backend).
//! Throughput is bounded by RabbitMQ with confirms: a `schedule` costs two
//! confirmed publishes (job, journal record), each hop one, an ack one
//! (its tombstone), an expired lease or a nack two. One caller scheduling
//! one job at a time measured 650–1,000 schedules/s here
//! (`timing_precision` schedules 300 jobs in 300–480 ms); concurrent
//! callers share the channel and pipeline their confirms.
#![forbid(unsafe_code)]

#[cfg(feature = "internals")]
pub mod codec;
#[cfg(not(feature = "internals"))]
mod codec;
pub mod config;
pub mod error;
mod queue;
pub mod registry;

pub use config::{RabbitConfig, MAX_PAYLOAD_CAP, MAX_PREFIX_LEN};
pub use error::RabbitError;
pub use queue::{delete_queues, QueueNames, RabbitDelayQueue};
