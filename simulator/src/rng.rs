//! Deterministic randomness: every random stream of a simulation is derived
//! from the scenario's seed and a label, so the same seed gives the same run
//! whatever the order the streams are used in (and across crashes).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64's finaliser: a bijective avalanche of a 64-bit value.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a label, for mixing names into seeds.
pub fn label(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Mixes `parts` into one well-spread 64-bit value.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x6A09_E667_F3BC_C908u64;
    for &p in parts {
        h = splitmix(h ^ splitmix(p));
    }
    h
}

/// A uniform value in `[0, 1)` from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal value from two hashes (Box–Muller).
pub fn normal(h1: u64, h2: u64) -> f64 {
    let u1 = 1.0 - unit(h1); // (0, 1]
    let u2 = unit(h2);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A seeded generator for the stream named by `seed` and `parts`.
pub fn stream(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    let mut all = Vec::with_capacity(parts.len() + 1);
    all.push(seed);
    all.extend_from_slice(parts);
    ChaCha8Rng::seed_from_u64(mix(&all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_in_range_and_normal_has_unit_variance() {
        let n = 20_000u64;
        let mut s = 0.0;
        let mut ss = 0.0;
        for i in 0..n {
            let u = unit(mix(&[1, i]));
            assert!((0.0..1.0).contains(&u));
            let z = normal(mix(&[2, i]), mix(&[3, i]));
            s += z;
            ss += z * z;
        }
        assert!((s / n as f64).abs() < 0.05);
        assert!((ss / n as f64 - 1.0).abs() < 0.05);
    }
}
