//! Test helpers for backends and aggregates (feature `testkit`).
