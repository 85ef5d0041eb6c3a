//! Shared helpers for smartmsg's cross-crate tests.
#![forbid(unsafe_code)]

pub mod crash;
pub mod effects;
pub mod plan;
pub mod runtime_crash;
pub mod stream_crash;
