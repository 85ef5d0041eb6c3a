//! The repository: load (snapshot + tail), decide, append with
//! `Exact(version)`, retry on conflict.
