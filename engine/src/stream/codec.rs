//! [`StateCodec`]: how keys, values and aggregates become bytes in a
//! [`KeyValueStore`](super::KeyValueStore), an outbox or a sink.

use bytes::Bytes;

use crate::bytes_in::{Input, InputError};

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes end before the value does.
    #[error("{what}: input ends after {got} bytes; {needed} needed")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// Bytes are left after the value.
    #[error("{what}: {extra} trailing bytes")]
    Trailing {
        /// What was being decoded.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// The bytes do not form a valid value.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// A type that can be written to and read back from bytes.
///
/// Encodings are compact and deterministic (the same value always gives the
/// same bytes). Integers are big-endian, so that byte order matches numeric
/// order for unsigned keys; variable-length parts inside tuples are length
/// prefixed. [`Json`] wraps any serde type.
///
/// `decode` must never panic, whatever the bytes: it returns a
/// [`CodecError`].
pub trait StateCodec: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Decodes a whole value from `bytes` (all of them).
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = Self::decode_from(&mut r)?;
        r.finish(std::any::type_name::<Self>())?;
        Ok(v)
    }

    /// Decodes a value from the front of `r`, leaving the rest. Types
    /// whose encoding is not self-delimiting implement this by reading a
    /// length prefix when nested (see [`StateCodec::encode_nested`]).
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError>;

    /// Appends a self-delimiting encoding (used inside tuples). The default
    /// is [`StateCodec::encode`]; variable-length types prefix a length.
    fn encode_nested(&self, out: &mut Vec<u8>) {
        self.encode(out)
    }

    /// Decodes what [`StateCodec::encode_nested`] wrote.
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Self::decode_from(r)
    }

    /// The encoding as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// A cursor over bytes being decoded: [`Input`] with this codec's errors
/// (big-endian integers, `u32` length prefixes).
#[derive(Debug)]
pub struct Reader<'a>(Input<'a>);

fn truncated(e: InputError) -> CodecError {
    match e {
        InputError::Short {
            what, needed, left, ..
        } => CodecError::Truncated {
            what,
            needed,
            got: left,
        },
        other => CodecError::Invalid {
            what: other.what(),
            reason: other.to_string(),
        },
    }
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(Input::new(bytes))
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        self.0.take(n, what).map_err(truncated)
    }

    /// Takes everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.0.rest()
    }

    /// Takes exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        self.0.array(what).map_err(truncated)
    }

    /// Reads a `u32` length prefix, then that many bytes.
    pub fn prefixed(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        self.0.prefixed_u32_be(what).map_err(truncated)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.0.remaining()
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing {
                what,
                extra: self.0.remaining(),
            })
        }
    }
}

fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

macro_rules! int_codec {
    ($($t:ty),*) => {$(
        impl StateCodec for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                Ok(<$t>::from_be_bytes(r.array(stringify!($t))?))
            }
        }
    )*};
}
int_codec!(u8, u16, u32, u64, u128, i32, i64);

impl StateCodec for f64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bits().to_be_bytes());
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(f64::from_bits(u64::from_be_bytes(r.array("f64")?)))
    }
}

impl StateCodec for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.array::<1>("bool")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(CodecError::Invalid {
                what: "bool",
                reason: format!("byte {b}"),
            }),
        }
    }
}

impl StateCodec for () {
    fn encode(&self, _: &mut Vec<u8>) {}
    fn decode_from(_: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(())
    }
}

impl StateCodec for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(r.rest().to_vec())
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        put_prefixed(out, self);
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(r.prefixed("bytes")?.to_vec())
    }
}

impl StateCodec for Bytes {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Bytes::copy_from_slice(r.rest()))
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        put_prefixed(out, self);
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Bytes::copy_from_slice(r.prefixed("bytes")?))
    }
}

impl StateCodec for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        utf8(r.rest())
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        put_prefixed(out, self.as_bytes());
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        utf8(r.prefixed("string")?)
    }
}

fn utf8(b: &[u8]) -> Result<String, CodecError> {
    String::from_utf8(b.to_vec()).map_err(|e| CodecError::Invalid {
        what: "string",
        reason: e.to_string(),
    })
}

impl<T: StateCodec> StateCodec for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.array::<1>("option tag")?[0] {
            0 => Ok(None),
            1 => T::decode_from(r).map(Some),
            b => Err(CodecError::Invalid {
                what: "option tag",
                reason: format!("byte {b}"),
            }),
        }
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode_nested(out);
            }
        }
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.array::<1>("option tag")?[0] {
            0 => Ok(None),
            1 => T::decode_nested(r).map(Some),
            b => Err(CodecError::Invalid {
                what: "option tag",
                reason: format!("byte {b}"),
            }),
        }
    }
}

macro_rules! tuple_codec {
    ($($n:ident),+; $last:ident) => {
        impl<$($n: StateCodec,)+ $last: StateCodec> StateCodec for ($($n,)+ $last) {
            #[allow(non_snake_case)]
            fn encode(&self, out: &mut Vec<u8>) {
                let ($($n,)+ $last) = self;
                $($n.encode_nested(out);)+
                $last.encode(out);
            }
            fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                Ok(($($n::decode_nested(r)?,)+ $last::decode_from(r)?))
            }
            #[allow(non_snake_case)]
            fn encode_nested(&self, out: &mut Vec<u8>) {
                let ($($n,)+ $last) = self;
                $($n.encode_nested(out);)+
                $last.encode_nested(out);
            }
            fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                Ok(($($n::decode_nested(r)?,)+ $last::decode_nested(r)?))
            }
        }
    };
}
tuple_codec!(A; B);
tuple_codec!(A, B; C);
tuple_codec!(A, B, C; D);

/// Wraps a serde type to store it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize + serde::de::DeserializeOwned> StateCodec for Json<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        // Serialising plain data into a vector cannot fail for the types
        // this is meant for (no maps with non-string keys); if it does the
        // value encodes as JSON `null`, which then fails to decode with a
        // typed error rather than panicking here.
        if serde_json::to_writer(&mut *out, &self.0).is_err() {
            out.extend_from_slice(b"null");
        }
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        serde_json::from_slice(r.rest())
            .map(Json)
            .map_err(|e| CodecError::Invalid {
                what: "json",
                reason: e.to_string(),
            })
    }
    fn encode_nested(&self, out: &mut Vec<u8>) {
        let mut v = Vec::new();
        self.encode(&mut v);
        put_prefixed(out, &v);
    }
    fn decode_nested(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let b = r.prefixed("json")?;
        Self::decode(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt<T: StateCodec + PartialEq + std::fmt::Debug>(v: T) {
        let b = v.to_bytes();
        assert_eq!(T::decode(&b).unwrap(), v);
    }

    #[test]
    fn round_trips() {
        rt(7u64);
        rt(-3i64);
        rt(String::from("héllo"));
        rt((1u32, String::from("a"), vec![1u8, 2]));
        rt((String::from("x"), 9u16));
        rt(Some((Bytes::from_static(b"k"), 1u8)));
        rt(Option::<u32>::None);
        rt(Json(vec![1, 2, 3]));
        rt((Json(String::from("z")), 2u64, true));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert!(matches!(
            u64::decode(&[1, 2]),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            u32::decode(&[0, 0, 0, 1, 9]),
            Err(CodecError::Trailing { .. })
        ));
        assert!(<(String, u8)>::decode(&[0, 0, 0, 9, b'a']).is_err());
        assert!(String::decode(&[0xff]).is_err());
        assert!(bool::decode(&[7]).is_err());
        assert!(Json::<u32>::decode(b"{").is_err());
    }

    #[test]
    fn big_endian_keys_sort_numerically() {
        let mut ks: Vec<Vec<u8>> = [300u64, 2, 70_000, 1]
            .iter()
            .map(|v| v.to_bytes())
            .collect();
        ks.sort();
        let back: Vec<u64> = ks.iter().map(|b| u64::decode(b).unwrap()).collect();
        assert_eq!(back, vec![1, 2, 300, 70_000]);
    }
}
