//! The contract between the stream crash test and its child processor.
//!
//! Inputs are events in the embedded log: `Profile` (payload
//! `"<user> <segment>"`) and `Reaction` (payload `"<id> <user> <creative>"`).
//! The child runs [`topology`] with a [`smartmsg_engine::stream::StreamRunner`]
//! (state and checkpoint in redb, outputs appended to the same log) until
//! killed. The parent recomputes every expected output with plain code
//! ([`Reference`]) and compares.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use smartmsg_engine::stream::{EmitStrategy, Json, Topology, Windowed, Windows};

/// The runner's name.
pub const RUNNER: &str = "crash-stream";
/// Window size (ms).
pub const WINDOW_MS: u64 = 1_000;
/// Grace (ms).
pub const GRACE_MS: u64 = 200;

/// A parsed reaction: id, user, creative.
pub fn parse_reaction(p: &[u8]) -> Option<(u64, u32, u32)> {
    let s = std::str::from_utf8(p).ok()?;
    let mut it = s.split(' ');
    let r = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(r)
}

/// A parsed profile: user, segment.
pub fn parse_profile(p: &[u8]) -> Option<(u32, u32)> {
    let s = std::str::from_utf8(p).ok()?;
    let (u, seg) = s.split_once(' ')?;
    Some((u.parse().ok()?, seg.parse().ok()?))
}

/// Whether a reaction passes the filter.
pub fn keep(id: u64) -> bool {
    id % 10 != 7
}

/// The segment a user without a profile gets.
pub const NO_SEGMENT: u32 = u32::MAX;

/// What the `echo` output carries per kept reaction: (user, creative,
/// segment).
pub type Echo = Json<(u32, u32, u32)>;

/// The topology under test:
///
/// - `Profile` → a table user → segment;
/// - `Reaction` → parse → filter (`keep`) → left join with the profiles →
///   - `echo`: one output per kept reaction, keyed by its id;
///   - `totals`: a running count per creative, emitted on every update;
///   - `windows`: counts per (creative, segment) in tumbling windows with
///     grace, emitted once when a window closes; late reactions to `late`.
pub fn topology() -> Topology {
    let t = Topology::new();
    let profiles = t
        .stream::<Bytes, Bytes>("Profile")
        .flat_map(|_, v| parse_profile(&v))
        .to_table("profiles");
    let joined = t
        .stream::<Bytes, Bytes>("Reaction")
        .flat_map(|_, v| parse_reaction(&v).map(|(id, user, c)| (user, (id, c))))
        .filter(|_, (id, _)| keep(*id))
        .left_join(&profiles, |(id, c), seg: Option<&u32>| {
            (id, c, seg.copied().unwrap_or(NO_SEGMENT))
        });
    joined
        .map(|user, (id, c, seg)| (id, Json((user, c, seg))))
        .to("echo");
    joined
        .map(|_, (_, c, _)| (c, ()))
        .group_by_key()
        .count("totals")
        .to("totals");
    joined
        .map(|_, (id, c, seg)| ((c, seg), id))
        .group_by_key()
        .windowed_by(
            Windows::tumbling(WINDOW_MS)
                .expect("valid window")
                .grace(GRACE_MS),
        )
        .emit(EmitStrategy::OnWindowClose)
        .late_records_to("late")
        .count("window-counts")
        .to("windows");
    t
}

/// Expected results, computed with plain code from the inputs in log order.
#[derive(Debug, Default)]
pub struct Reference {
    /// id → (user, creative, segment) of every kept reaction.
    pub echo: BTreeMap<u64, (u32, u32, u32)>,
    /// Final count per creative.
    pub totals: BTreeMap<u32, u64>,
    /// (creative, segment, window start) → count, for closed windows.
    pub windows: BTreeMap<(u32, u32, u64), u64>,
    /// Ids of late reactions.
    pub late: Vec<u64>,
    /// The stream time reached.
    pub stream_time: u64,
}

impl Reference {
    /// Computes the reference from `(kind, payload, timestamp)` inputs in
    /// log order.
    pub fn compute<'a>(inputs: impl IntoIterator<Item = (&'a str, &'a [u8], u64)>) -> Self {
        let mut r = Reference::default();
        let mut profiles: HashMap<u32, u32> = HashMap::new();
        let mut open: BTreeMap<(u64, u32, u32), u64> = BTreeMap::new();
        let close = |start: u64| start + WINDOW_MS + GRACE_MS;
        for (kind, payload, ts) in inputs {
            if ts > r.stream_time {
                r.stream_time = ts;
                let st = r.stream_time;
                let due: Vec<_> = open
                    .keys()
                    .filter(|(start, _, _)| close(*start) <= st)
                    .copied()
                    .collect();
                for k in due {
                    let n = open.remove(&k).unwrap_or(0);
                    r.windows.insert((k.1, k.2, k.0), n);
                }
            }
            match kind {
                "Profile" => {
                    if let Some((u, seg)) = parse_profile(payload) {
                        profiles.insert(u, seg);
                    }
                }
                "Reaction" => {
                    let Some((id, user, c)) = parse_reaction(payload) else {
                        continue;
                    };
                    if !keep(id) {
                        continue;
                    }
                    let seg = profiles.get(&user).copied().unwrap_or(NO_SEGMENT);
                    r.echo.insert(id, (user, c, seg));
                    *r.totals.entry(c).or_default() += 1;
                    let start = ts - ts % WINDOW_MS;
                    if close(start) <= r.stream_time {
                        r.late.push(id);
                    } else {
                        *open.entry((start, c, seg)).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        r
    }
}

/// The key type of the `windows` output.
pub type WindowKey = Windowed<(u32, u32)>;
