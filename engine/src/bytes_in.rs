//! [`Input`]: the one checked byte cursor every decoder in the workspace
//! reads with (frames, index checkpoints, envelopes, queue messages,
//! payloads).
//!
//! It is a thin layer on [`bytes::Buf`] for `&[u8]`: every read first
//! checks [`Buf::remaining`] (the `Buf::get_*` methods panic on short
//! input), so a read past the end is an [`InputError`] naming what was
//! being read and at which byte, never a panic. Nothing here allocates:
//! slices borrow the input, and [`Input::count`] refuses a length that the
//! bytes left could not hold, so that a caller sizing a `Vec` from a
//! decoded count never allocates more than the input justifies.
//!
//! ```
//! use smartmsg_engine::bytes_in::{Input, InputError};
//!
//! let mut i = Input::new(&[2, 0, b'h', b'i', 7]);
//! assert_eq!(i.prefixed_u16_le("name").unwrap(), b"hi");
//! assert_eq!(i.u8("flags").unwrap(), 7);
//! let e = i.u32_le("count").unwrap_err();
//! assert_eq!(e, InputError::Short { what: "count", at: 5, needed: 4, left: 0 });
//! ```

use bytes::Buf;

/// Why a read from an [`Input`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The input ends before the field does.
    #[error("{what}: {needed} bytes at byte {at} run past the end ({left} left)")]
    Short {
        /// What was being read.
        what: &'static str,
        /// The byte offset the field starts at.
        at: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A LEB128 varint longer than 10 bytes or above `u64::MAX`.
    #[error("{what}: bad varint at byte {at}")]
    BadVarint {
        /// What was being read.
        what: &'static str,
        /// Where the varint starts.
        at: usize,
    },
    /// A count of items larger than the bytes left could hold.
    #[error("{what}: a count of {count} at byte {at} exceeds the bytes left ({left})")]
    TooMany {
        /// What was being counted.
        what: &'static str,
        /// Where the count starts.
        at: usize,
        /// The count read.
        count: u64,
        /// Bytes left after it.
        left: usize,
    },
}

impl InputError {
    /// The byte offset the failed read started at.
    pub fn at(&self) -> usize {
        match *self {
            Self::Short { at, .. } | Self::BadVarint { at, .. } | Self::TooMany { at, .. } => at,
        }
    }

    /// What was being read.
    pub fn what(&self) -> &'static str {
        match *self {
            Self::Short { what, .. }
            | Self::BadVarint { what, .. }
            | Self::TooMany { what, .. } => what,
        }
    }
}

/// A bounds-checked cursor over borrowed bytes (see the [module](self)).
#[derive(Debug, Clone)]
pub struct Input<'a> {
    buf: &'a [u8],
    len: usize,
}

macro_rules! ints {
    ($($name:ident: $t:ty = $get:ident;)*) => {$(
        #[doc = concat!("Reads a `", stringify!($t), "` (`", stringify!($get), "`).")]
        pub fn $name(&mut self, what: &'static str) -> Result<$t, InputError> {
            self.need(std::mem::size_of::<$t>(), what)?;
            Ok(self.buf.$get())
        }
    )*};
}

impl<'a> Input<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            buf: bytes,
            len: bytes.len(),
        }
    }

    /// A cursor over `bytes` whose offsets (in errors and
    /// [`Input::position`]) count from `start`: for a body that sits at
    /// `start` inside a larger record.
    pub fn at_offset(bytes: &'a [u8], start: usize) -> Self {
        Self {
            buf: bytes,
            len: bytes.len().saturating_add(start),
        }
    }

    /// The offset of the next byte.
    pub fn position(&self) -> usize {
        self.len - self.buf.remaining()
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        !self.buf.has_remaining()
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), InputError> {
        if self.buf.remaining() < n {
            return Err(InputError::Short {
                what,
                at: self.position(),
                needed: n,
                left: self.buf.remaining(),
            });
        }
        Ok(())
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], InputError> {
        self.need(n, what)?;
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Takes exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], InputError> {
        self.need(N, what)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }

    /// Takes everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    ints! {
        u8: u8 = get_u8;
        u16_le: u16 = get_u16_le;
        u16_be: u16 = get_u16;
        u32_le: u32 = get_u32_le;
        u32_be: u32 = get_u32;
        u64_le: u64 = get_u64_le;
        u64_be: u64 = get_u64;
        i64_le: i64 = get_i64_le;
        f32_le: f32 = get_f32_le;
        f64_le: f64 = get_f64_le;
    }

    /// A `u16` little-endian length, then that many bytes.
    pub fn prefixed_u16_le(&mut self, what: &'static str) -> Result<&'a [u8], InputError> {
        let n = self.u16_le(what)?;
        self.take(usize::from(n), what)
    }

    /// A `u16` big-endian length, then that many bytes.
    pub fn prefixed_u16_be(&mut self, what: &'static str) -> Result<&'a [u8], InputError> {
        let n = self.u16_be(what)?;
        self.take(usize::from(n), what)
    }

    /// A `u32` little-endian length, then that many bytes.
    pub fn prefixed_u32_le(&mut self, what: &'static str) -> Result<&'a [u8], InputError> {
        let n = self.u32_le(what)?;
        self.take(n as usize, what)
    }

    /// A `u32` big-endian length, then that many bytes.
    pub fn prefixed_u32_be(&mut self, what: &'static str) -> Result<&'a [u8], InputError> {
        let n = self.u32_be(what)?;
        self.take(n as usize, what)
    }

    /// A LEB128 varint of at most 10 bytes and at most `u64::MAX`.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, InputError> {
        let at = self.position();
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                break;
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(InputError::BadVarint { what, at })
    }

    /// Checks that `count` items of at least `each` bytes fit in the bytes
    /// left, and returns it as a `usize`: a length safe to size a `Vec`
    /// with. `at` is where the count was read (for the error).
    pub fn fits(
        &self,
        count: u64,
        each: usize,
        at: usize,
        what: &'static str,
    ) -> Result<usize, InputError> {
        let left = self.remaining();
        match usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(each.max(1)))
        {
            Some(bytes) if bytes <= left => Ok(count as usize),
            _ => Err(InputError::TooMany {
                what,
                at,
                count,
                left,
            }),
        }
    }

    /// A varint count of items that each take at least one byte, checked
    /// with [`Input::fits`].
    pub fn count(&mut self, what: &'static str) -> Result<usize, InputError> {
        let at = self.position();
        let n = self.varint(what)?;
        self.fits(n, 1, at, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_byte_orders_and_reports_short_reads() {
        let bytes = [1, 0, 0, 1, 0xff];
        let mut i = Input::new(&bytes);
        assert_eq!(i.u16_le("a").unwrap(), 1);
        assert_eq!(i.u16_be("b").unwrap(), 1);
        assert_eq!(i.position(), 4);
        assert_eq!(
            i.u32_be("c").unwrap_err(),
            InputError::Short {
                what: "c",
                at: 4,
                needed: 4,
                left: 1
            }
        );
        // A failed read consumes nothing.
        assert_eq!(i.u8("d").unwrap(), 0xff);
        assert!(i.is_empty());
        assert!(i.u8("e").is_err());
        assert_eq!(Input::at_offset(&[], 9).u8("x").unwrap_err().at(), 9);
    }

    #[test]
    fn varints_and_counts() {
        let mut i = Input::new(&[0xac, 0x02, 3, 1, 2]);
        assert_eq!(i.varint("v").unwrap(), 300);
        assert!(matches!(
            i.count("n"),
            Err(InputError::TooMany { count: 3, .. })
        ));
        let mut max = vec![0xff; 9];
        max.push(1);
        assert_eq!(Input::new(&max).varint("v").unwrap(), u64::MAX);
        max[9] = 2;
        assert_eq!(
            Input::new(&max).varint("v").unwrap_err(),
            InputError::BadVarint { what: "v", at: 0 }
        );
        let i = Input::new(&[0; 8]);
        assert_eq!(i.fits(2, 4, 0, "x").unwrap(), 2);
        assert!(i.fits(3, 4, 0, "x").is_err());
        assert!(i.fits(u64::MAX, usize::MAX, 0, "x").is_err());
    }

    #[test]
    fn never_panics_on_any_prefix() {
        let bytes: Vec<u8> = (0..40u8).map(|b| b.wrapping_mul(37)).collect();
        for end in 0..bytes.len() {
            let mut i = Input::new(&bytes[..end]);
            let _ = i.prefixed_u16_le("a");
            let _ = i.prefixed_u32_be("b");
            let _ = i.varint("c");
            let _ = i.f64_le("d");
            let _ = i.count("e");
        }
    }
}
