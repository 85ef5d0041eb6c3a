//! Deterministic randomness: every random stream of a simulation is derived
//! from the scenario's seed and a label, so the same seed gives the same run
//! whatever the order the streams are used in (and across crashes). The
//! mixing functions are the domain's ([`smartmsg_domain::rng`]), so the
//! campaign driver and the simulator derive the same streams.

pub use smartmsg_domain::rng::{label, mix, splitmix, stream};

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
