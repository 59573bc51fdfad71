//! Tracing and Prometheus metrics set-up, done once per process.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Targets capped at `info` whatever `RUST_LOG` says: below that they dump
/// whole frames, and frames carry message text and tokens (issue 7: logs never
/// hold secrets).
const FRAME_DUMPERS: [&str; 2] = ["tungstenite=info", "tokio_tungstenite=info"];

/// Installs the fmt tracing subscriber, filtered by `RUST_LOG` (default `info`).
/// Does nothing when one is installed already.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = FRAME_DUMPERS
        .iter()
        .filter_map(|directive| directive.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: logs piped to files or collectors stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders.
/// Histograms named `*_seconds` get latency buckets, `*_size` power-of-two buckets.
///
/// # Errors
///
/// Fails when another recorder is installed already.
pub fn init_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    // Latency buckets from 100 µs to 5 s, in seconds.
    const BUCKETS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    // Counts of things per operation (sends per commit, ...): powers of two.
    const SIZE_BUCKETS: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ];
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)?
        .install_recorder()
}
