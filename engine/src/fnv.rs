//! FNV-1a, 64 bits: the project's one stable hash.
//!
//! Its output is part of formats and identities — the Kafka log's
//! partition of a stream, transaction and command fingerprints, derived
//! idempotency keys, seeds mixed from labels — so it must never change; the
//! tests check it against the published test vectors of the FNV reference.

/// The FNV-1a 64-bit offset basis.
pub const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// The FNV 64-bit prime.
pub const PRIME: u64 = 0x0000_0100_0000_01b3;

/// An FNV-1a 64-bit hasher: feed bytes with [`Fnv1a::write`] (or as an
/// [`std::io::Write`]), read the hash with [`Fnv1a::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    /// A hasher at the offset basis.
    pub const fn new() -> Self {
        Self(OFFSET_BASIS)
    }

    /// A hasher started from `basis` instead of the offset basis: for
    /// seeded variants (the scheduler's job ids fold a seed into it).
    pub const fn with_basis(basis: u64) -> Self {
        Self(basis)
    }

    /// Feeds `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    /// The hash of everything fed so far.
    pub const fn finish(&self) -> u64 {
        self.0
    }
}

impl std::io::Write for Fnv1a {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Fnv1a::write(self, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The FNV-1a 64-bit hash of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    Fnv1a::new().write(bytes).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        // From the FNV reference test suite (FNV-1a, 64 bits).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn streaming_equals_one_shot() {
        let mut h = Fnv1a::new();
        h.write(b"foo").write(b"bar");
        assert_eq!(h.finish(), fnv1a(b"foobar"));
        let mut w = Fnv1a::new();
        std::io::Write::write_all(&mut w, b"foobar").unwrap();
        assert_eq!(w.finish(), fnv1a(b"foobar"));
    }
}
