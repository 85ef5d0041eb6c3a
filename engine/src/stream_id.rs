//! Validated stream identifiers.

use std::fmt;
use std::sync::Arc;

/// The name of an event stream, e.g. `campaign-42`.
///
/// Validated on construction: 1 to [`StreamId::MAX_LEN`] bytes of ASCII
/// letters, digits and `-_.:/@`. Cheap to clone (reference counted).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

/// Why a string is not a valid [`StreamId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamIdError {
    /// The name is empty.
    #[error("stream id is empty")]
    Empty,
    /// The name is longer than [`StreamId::MAX_LEN`] bytes.
    #[error("stream id is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a character outside the allowed set.
    #[error("stream id holds {ch:?} at byte {at}; allowed: ASCII letters, digits and -_.:/@")]
    BadChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

impl StreamId {
    /// The longest stream id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `name` and makes a stream id of it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, StreamIdError> {
        let name = name.as_ref();
        Self::validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// Checks `name` without allocating.
    pub fn validate(name: &str) -> Result<(), StreamIdError> {
        if name.is_empty() {
            return Err(StreamIdError::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(StreamIdError::TooLong {
                len: name.len(),
                max: Self::MAX_LEN,
            });
        }
        if let Some((at, ch)) = name.char_indices().find(|&(_, c)| !Self::allowed(c)) {
            return Err(StreamIdError::BadChar { ch, at });
        }
        Ok(())
    }

    fn allowed(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", &*self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for StreamId {
    type Error = StreamIdError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StreamId::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names() {
        for n in ["campaign-1", "a", "user:42/profile", "x@y.z_w"] {
            assert_eq!(StreamId::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(StreamId::new(""), Err(StreamIdError::Empty));
        assert!(matches!(
            StreamId::new("a".repeat(129)),
            Err(StreamIdError::TooLong { len: 129, max: 128 })
        ));
        assert_eq!(
            StreamId::new("ab c"),
            Err(StreamIdError::BadChar { ch: ' ', at: 2 })
        );
        assert!(matches!(
            StreamId::new("é"),
            Err(StreamIdError::BadChar { at: 0, .. })
        ));
    }
}
