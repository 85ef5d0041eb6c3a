//! Time windows: tumbling and hopping, each with a grace period, and what
//! happens to records that arrive after their window closed (session
//! windows are in `session.rs`, join windows in `join.rs`).

use std::fmt;

use super::codec::{CodecError, Reader, StateCodec};

/// A half-open time interval `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    /// First millisecond in the window.
    pub start_ms: u64,
    /// First millisecond after it.
    pub end_ms: u64,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start_ms, self.end_ms)
    }
}

/// A key of a windowed aggregation: the grouping key and its window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Windowed<K> {
    /// The grouping key.
    pub key: K,
    /// The window.
    pub window: Window,
}

impl<K: StateCodec> StateCodec for Windowed<K> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.window.start_ms.encode(out);
        self.window.end_ms.encode(out);
        self.key.encode(out);
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let start_ms = u64::decode_from(r)?;
        let end_ms = u64::decode_from(r)?;
        let key = K::decode_from(r)?;
        Ok(Self {
            key,
            window: Window { start_ms, end_ms },
        })
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        self.window.start_ms.encode(out);
        self.window.end_ms.encode(out);
        self.key.encode_nested(out);
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let start_ms = u64::decode_from(r)?;
        let end_ms = u64::decode_from(r)?;
        let key = K::decode_nested(r)?;
        Ok(Self {
            key,
            window: Window { start_ms, end_ms },
        })
    }
}

/// Why a window specification is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// The size is 0.
    #[error("window size must be positive")]
    ZeroSize,
    /// The advance is 0 or larger than the size.
    #[error("hop {advance_ms} ms must be 1 to the window size {size_ms} ms")]
    BadAdvance {
        /// The size.
        size_ms: u64,
        /// The advance.
        advance_ms: u64,
    },
    /// A session window's inactivity gap is 0.
    #[error("session inactivity gap must be positive")]
    ZeroGap,
    /// A record would fall into more windows than
    /// [`Windows::MAX_WINDOWS_PER_RECORD`].
    #[error("size / advance = {windows} windows per record; the limit is {max}")]
    TooManyWindows {
        /// Windows per record.
        windows: u64,
        /// The limit.
        max: u64,
    },
}

/// Fixed-size windows aligned to the epoch: tumbling (advance = size) or
/// hopping (advance < size, overlapping), with a grace period.
///
/// A window `[start, end)` *closes* when stream time reaches
/// `end + grace`: from then on a record for it is late (counted, and sent to
/// the late-records output if one is set), and its result is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    size_ms: u64,
    advance_ms: u64,
    grace_ms: u64,
}

impl Windows {
    /// Most windows one record may fall into (`size / advance`).
    pub const MAX_WINDOWS_PER_RECORD: u64 = 1_024;

    /// Tumbling windows of `size_ms`, no grace.
    pub fn tumbling(size_ms: u64) -> Result<Self, WindowError> {
        Self::hopping(size_ms, size_ms)
    }

    /// Hopping windows of `size_ms` starting every `advance_ms`, no grace.
    pub fn hopping(size_ms: u64, advance_ms: u64) -> Result<Self, WindowError> {
        if size_ms == 0 {
            return Err(WindowError::ZeroSize);
        }
        if advance_ms == 0 || advance_ms > size_ms {
            return Err(WindowError::BadAdvance {
                size_ms,
                advance_ms,
            });
        }
        let windows = size_ms.div_ceil(advance_ms);
        if windows > Self::MAX_WINDOWS_PER_RECORD {
            return Err(WindowError::TooManyWindows {
                windows,
                max: Self::MAX_WINDOWS_PER_RECORD,
            });
        }
        Ok(Self {
            size_ms,
            advance_ms,
            grace_ms: 0,
        })
    }

    /// The same windows with a grace period of `grace_ms`.
    pub fn grace(mut self, grace_ms: u64) -> Self {
        self.grace_ms = grace_ms;
        self
    }

    /// The window size.
    pub fn size_ms(&self) -> u64 {
        self.size_ms
    }

    /// The hop between window starts.
    pub fn advance_ms(&self) -> u64 {
        self.advance_ms
    }

    /// The grace period.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// The window starting at `start_ms`.
    pub fn window_at(&self, start_ms: u64) -> Window {
        Window {
            start_ms,
            end_ms: start_ms.saturating_add(self.size_ms),
        }
    }

    /// When the window starting at `start_ms` closes (stream time).
    pub fn close_ms(&self, start_ms: u64) -> u64 {
        start_ms
            .saturating_add(self.size_ms)
            .saturating_add(self.grace_ms)
    }

    /// The starts of the windows `ts` falls into, ascending.
    pub fn starts_for(&self, ts: u64) -> impl Iterator<Item = u64> {
        let last = ts - ts % self.advance_ms;
        let first = if ts < self.size_ms {
            0
        } else {
            let lo = ts - self.size_ms; // window start must be > lo
            (lo / self.advance_ms + 1) * self.advance_ms
        };
        let step = self.advance_ms;
        std::iter::successors(Some(first), move |s: &u64| s.checked_add(step))
            .take_while(move |s| *s <= last)
    }
}

/// How a windowed aggregation reports its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmitStrategy {
    /// Every update of a window's aggregate is sent downstream.
    #[default]
    OnUpdate,
    /// Only the final aggregate, once, when the window closes (like Kafka
    /// Streams' `suppress(untilWindowCloses)`).
    OnWindowClose,
}

/// Why a record was not aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LateReason {
    /// The record's window had closed: stream time had reached the
    /// window's end plus the grace period (for a session window, the
    /// session the record would have started, `[ts, ts + 1)`, whose end
    /// plus gap plus grace stream time had reached).
    WindowClosed {
        /// The window.
        window: Window,
        /// When it closed (its end plus grace).
        closed_at_ms: u64,
        /// Stream time when the record arrived.
        stream_time_ms: u64,
    },
}

impl fmt::Display for LateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LateReason::WindowClosed {
                window,
                closed_at_ms,
                stream_time_ms,
            } => write!(
                f,
                "window {window} closed at stream time {closed_at_ms}; stream time is {stream_time_ms}"
            ),
        }
    }
}

/// A record dropped as late, with why (the value of the late-records
/// output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateRecord<V> {
    /// The record's value.
    pub value: V,
    /// Why it was dropped.
    pub reason: LateReason,
}

impl<V: StateCodec> StateCodec for LateRecord<V> {
    fn encode(&self, out: &mut Vec<u8>) {
        let LateReason::WindowClosed {
            window,
            closed_at_ms,
            stream_time_ms,
        } = self.reason;
        out.push(1);
        window.start_ms.encode(out);
        window.end_ms.encode(out);
        closed_at_ms.encode(out);
        stream_time_ms.encode(out);
        self.value.encode(out);
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let tag = r.array::<1>("late reason")?[0];
        if tag != 1 {
            return Err(CodecError::Invalid {
                what: "late reason",
                reason: format!("tag {tag}"),
            });
        }
        let start_ms = u64::decode_from(r)?;
        let end_ms = u64::decode_from(r)?;
        let closed_at_ms = u64::decode_from(r)?;
        let stream_time_ms = u64::decode_from(r)?;
        let value = V::decode_from(r)?;
        Ok(Self {
            value,
            reason: LateReason::WindowClosed {
                window: Window { start_ms, end_ms },
                closed_at_ms,
                stream_time_ms,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_and_hopping_starts() {
        let t = Windows::tumbling(60_000).unwrap();
        assert_eq!(t.starts_for(0).collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.starts_for(59_999).collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.starts_for(60_000).collect::<Vec<_>>(), vec![60_000]);
        let h = Windows::hopping(10, 5).unwrap();
        assert_eq!(h.starts_for(3).collect::<Vec<_>>(), vec![0]);
        assert_eq!(h.starts_for(7).collect::<Vec<_>>(), vec![0, 5]);
        assert_eq!(h.starts_for(10).collect::<Vec<_>>(), vec![5, 10]);
        let h = Windows::hopping(10, 3).unwrap();
        // windows [0,10) [3,13) [6,16) [9,19) [12,22): 12 is in 3,6,9,12
        assert_eq!(h.starts_for(12).collect::<Vec<_>>(), vec![3, 6, 9, 12]);
        let top = Windows::tumbling(1000).unwrap();
        assert_eq!(top.starts_for(u64::MAX).count(), 1);
        assert_eq!(top.grace(5).close_ms(u64::MAX - 10), u64::MAX);
    }

    #[test]
    fn bad_specs_are_refused() {
        assert_eq!(Windows::tumbling(0), Err(WindowError::ZeroSize));
        assert!(matches!(
            Windows::hopping(10, 11),
            Err(WindowError::BadAdvance { .. })
        ));
        assert!(matches!(
            Windows::hopping(1_000_000, 1),
            Err(WindowError::TooManyWindows { .. })
        ));
    }

    #[test]
    fn late_record_round_trips() {
        let l = LateRecord {
            value: String::from("v"),
            reason: LateReason::WindowClosed {
                window: Window {
                    start_ms: 0,
                    end_ms: 10,
                },
                closed_at_ms: 15,
                stream_time_ms: 20,
            },
        };
        assert_eq!(LateRecord::<String>::decode(&l.to_bytes()).unwrap(), l);
        assert!(l.reason.to_string().contains("closed at stream time 15"));
    }
}
