//! [`Headers`]: the ordered `(name, bytes)` pairs a record carries beside
//! its key and value, as Kafka record headers.

use super::codec::{CodecError, Reader, StateCodec};

/// Why headers were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// More than [`Headers::MAX_COUNT`] headers.
    #[error("too many headers: the limit is {max}")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// More than [`Headers::MAX_BYTES`] bytes of names and values.
    #[error("headers of {bytes} bytes: the limit is {max}")]
    TooLarge {
        /// The size the headers would have had.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// A record's headers: an ordered list of `(name, value)` pairs. Names may
/// repeat (as in Kafka); [`Headers::last`] reads the last value of a name.
///
/// Bounded: at most [`Headers::MAX_COUNT`] pairs and
/// [`Headers::MAX_BYTES`] bytes of names and values together; adding past
/// either is a [`HeaderError`], and decoding bytes past either is a
/// [`CodecError`]. An empty `Headers` does not allocate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers {
    entries: Vec<(String, Vec<u8>)>,
    bytes: usize,
}

impl Headers {
    /// Most headers on one record.
    pub const MAX_COUNT: usize = 64;
    /// Most bytes of header names and values on one record.
    pub const MAX_BYTES: usize = 16 * 1024;

    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header (after any of the same name).
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), HeaderError> {
        let (name, value) = (name.into(), value.into());
        if self.entries.len() >= Self::MAX_COUNT {
            return Err(HeaderError::TooMany {
                max: Self::MAX_COUNT,
            });
        }
        let bytes = self
            .bytes
            .saturating_add(name.len())
            .saturating_add(value.len());
        if bytes > Self::MAX_BYTES {
            return Err(HeaderError::TooLarge {
                bytes,
                max: Self::MAX_BYTES,
            });
        }
        self.bytes = bytes;
        self.entries.push((name, value));
        Ok(())
    }

    /// These headers with one more appended (builder style).
    pub fn with(
        mut self,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Self, HeaderError> {
        self.add(name, value)?;
        Ok(self)
    }

    /// Headers from pairs, in order.
    pub fn from_pairs<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Result<Self, HeaderError>
    where
        N: Into<String>,
        V: Into<Vec<u8>>,
    {
        let mut h = Self::new();
        for (n, v) in pairs {
            h.add(n, v)?;
        }
        Ok(h)
    }

    /// The value of the last header named `name`.
    pub fn last(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The values of every header named `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Removes every header named `name`; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        self.bytes = self.entries.iter().map(|(n, v)| n.len() + v.len()).sum();
        before - self.entries.len()
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// The number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of names and values (what [`Headers::MAX_BYTES`] bounds).
    pub fn byte_size(&self) -> usize {
        self.bytes
    }
}

/// The encoding: a `u32` count, then each name and value with a `u32`
/// length prefix. Decoding enforces the limits.
impl StateCodec for Headers {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.entries.len() as u32).encode(out);
        for (n, v) in &self.entries {
            n.encode_nested(out);
            v.encode_nested(out);
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let n = u32::decode_from(r)? as usize;
        if n > Self::MAX_COUNT {
            return Err(CodecError::Invalid {
                what: "headers",
                reason: format!("{n} headers; the limit is {}", Self::MAX_COUNT),
            });
        }
        let mut h = Self::new();
        for _ in 0..n {
            let name = String::decode_nested(r)?;
            let value = Vec::<u8>::decode_nested(r)?;
            h.add(name, value).map_err(|e| CodecError::Invalid {
                what: "headers",
                reason: e.to_string(),
            })?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_repeatable_and_bounded() {
        let mut h = Headers::new()
            .with("a", b"1".to_vec())
            .unwrap()
            .with("b", b"2".to_vec())
            .unwrap()
            .with("a", b"3".to_vec())
            .unwrap();
        assert_eq!(h.last("a"), Some(&b"3"[..]));
        assert_eq!(h.all("a").collect::<Vec<_>>(), vec![&b"1"[..], &b"3"[..]]);
        assert_eq!(h.byte_size(), 6);
        let back = Headers::decode(&h.to_bytes()).unwrap();
        assert_eq!(back, h);
        assert_eq!(h.remove("a"), 2);
        assert_eq!((h.len(), h.byte_size()), (1, 2));

        let mut many = Headers::new();
        for i in 0..Headers::MAX_COUNT {
            many.add(format!("h{i}"), Vec::new()).unwrap();
        }
        assert_eq!(
            many.add("x", Vec::new()),
            Err(HeaderError::TooMany {
                max: Headers::MAX_COUNT
            })
        );
        let mut big = Headers::new();
        assert!(matches!(
            big.add("x", vec![0; Headers::MAX_BYTES]),
            Err(HeaderError::TooLarge { .. })
        ));
        assert!(big.is_empty());
    }

    #[test]
    fn decoding_garbage_or_oversized_headers_is_an_error() {
        assert!(Headers::decode(&[0, 0, 0]).is_err());
        assert!(Headers::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // One header whose value is over the byte limit.
        let mut b = Vec::new();
        1u32.encode(&mut b);
        "x".to_string().encode_nested(&mut b);
        vec![0u8; Headers::MAX_BYTES].encode_nested(&mut b);
        assert!(matches!(
            Headers::decode(&b),
            Err(CodecError::Invalid { .. })
        ));
    }
}
