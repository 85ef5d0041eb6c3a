//! Which shard a campaign belongs to.

/// How many shards a cluster has and which one holds a campaign.
///
/// A campaign's shard is Kafka's default partitioner applied to its id
/// (`murmur2(id) & 0x7fffffff mod shards`, as the Java client computes it
/// for a record keyed by the id, and librdkafka with
/// `partitioner=murmur2_random`). So a reactions topic with one partition
/// per shard, written by any producer that keys each reaction by its
/// campaign id with that partitioner, holds each shard's reactions in that
/// shard's partition. The count is fixed for the cluster's life, like a
/// topic's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    shards: u32,
}

/// The most shards a cluster may have.
pub const MAX_SHARDS: u32 = 1_024;

impl ShardMap {
    /// A cluster of `shards` shards (1 to [`MAX_SHARDS`]), or `None`.
    pub fn new(shards: u32) -> Option<Self> {
        (1..=MAX_SHARDS)
            .contains(&shards)
            .then_some(Self { shards })
    }

    /// The number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Every shard, in order.
    pub fn all(&self) -> impl Iterator<Item = u32> {
        0..self.shards
    }

    /// The shard holding campaign `id`.
    pub fn shard_of(&self, id: &str) -> u32 {
        (murmur2(id.as_bytes()) & 0x7fff_ffff) % self.shards
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): the
/// hash its default partitioner takes of a record's key.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from kafka-python's `kafka.partitioner.default.murmur2`, an
    /// independent port of the Java client's (printed unsigned; "21" is
    /// Kafka's own test vector -973932308).
    #[test]
    fn murmur2_matches_the_kafka_clients() {
        for (key, hash) in [
            ("", 275_646_681u32),
            ("a", 2_731_586_172),
            ("ab", 316_155_434),
            ("abc", 479_470_107),
            ("spring", 4_074_629_839),
            ("campaign-0", 68_056_570),
            ("21", 3_321_034_988),
            ("foobar", 3_504_634_814),
            ("a-little-bit-long-string", 3_308_985_760),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key:?}");
        }
        assert_eq!(murmur2(b"21") as i32, -973_932_308);
    }

    #[test]
    fn shards_are_the_default_partitioners_partitions() {
        let map = ShardMap::new(8).unwrap();
        // kafka-python: (murmur2(key) & 0x7fffffff) % 8.
        for (key, shard) in [
            ("", 1),
            ("a", 4),
            ("abc", 3),
            ("spring", 7),
            ("campaign-0", 2),
        ] {
            assert_eq!(map.shard_of(key), shard, "{key:?}");
        }
        assert!(ShardMap::new(0).is_none());
        assert!(ShardMap::new(MAX_SHARDS + 1).is_none());
        let one = ShardMap::new(1).unwrap();
        assert_eq!(one.shard_of("anything"), 0);
    }
}
