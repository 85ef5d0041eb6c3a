//! Shared helpers for smartmsg's cross-crate tests.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod crash;
pub mod effects;
pub mod plan;
pub mod runtime_crash;
pub mod services;
pub mod stream_crash;

/// Sends the libraries' warnings (a torn tail cut at recovery, a refused
/// job) to stderr, or what `RUST_LOG` selects: every child binary of the
/// crash tests calls it first, so that a failing test's output shows them.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
