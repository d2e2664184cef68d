//! One place that sets up logging for every Gantry binary: human-readable text by default,
//! JSON lines when `log.format = "json"`, filtered by `log.level` unless `RUST_LOG` is set.
//! Logs go to stderr so that stdout stays free for what a command prints.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Calling it twice is harmless (the second call does nothing).
pub fn init(format: &str, level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
