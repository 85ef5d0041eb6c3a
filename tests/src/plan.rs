//! What a SIGKILL crash test did, so that a failing run can be rerun:
//! the seed of its generator (`SMARTMSG_CRASH_SEED` overrides it), the
//! number of kills (`SMARTMSG_CRASH_KILLS`), and each kill point as it
//! happens (printed to stderr, which the test harness shows for a failing
//! test). The kill points are delays on the wall clock: a rerun with the
//! same seed makes the same choices (workloads, delays), and lands the
//! kills at the same moments as closely as the machine's scheduling
//! allows.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A crash test's seed, kill count and generator.
#[derive(Debug)]
pub struct CrashPlan {
    /// The test's name.
    pub name: &'static str,
    /// The generator's seed.
    pub seed: u64,
    /// How many times the child is killed.
    pub kills: u32,
    /// The generator every random choice of the test comes from.
    pub rng: ChaCha8Rng,
}

impl CrashPlan {
    /// The plan of test `name`: `default_seed` and `default_kills` unless
    /// `SMARTMSG_CRASH_SEED` (decimal or `0x` hex) or
    /// `SMARTMSG_CRASH_KILLS` say otherwise. Prints how to rerun it.
    pub fn from_env(name: &'static str, default_seed: u64, default_kills: u32) -> Self {
        let seed = std::env::var("SMARTMSG_CRASH_SEED")
            .ok()
            .and_then(|s| parse_seed(&s))
            .unwrap_or(default_seed);
        let kills = std::env::var("SMARTMSG_CRASH_KILLS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_kills);
        eprintln!(
            "{name}: seed {seed:#x}, {kills} kills (rerun: SMARTMSG_CRASH_SEED={seed:#x} SMARTMSG_CRASH_KILLS={kills} cargo test --release -p smartmsg-tests --test <this test>)"
        );
        Self {
            name,
            seed,
            kills,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Records kill `round` after `after` (printed with the seed).
    pub fn killed(&self, round: u32, after: std::time::Duration) {
        eprintln!(
            "{} (seed {:#x}): kill {} of {} after {:?}",
            self.name,
            self.seed,
            round + 1,
            self.kills,
            after
        );
    }
}

/// A seed in decimal or `0x` hex.
pub fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("0x5eed"), Some(0x5eed));
        assert_eq!(parse_seed("24301"), Some(24301));
        assert_eq!(parse_seed("nope"), None);
    }
}
