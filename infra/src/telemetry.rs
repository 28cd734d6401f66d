//! Logging: JSON lines by default (one object per event, request id in the span fields).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `NEWSROOM_LOG` sets the filter (default `info`),
/// `NEWSROOM_LOG_FORMAT=pretty` gives human-readable lines instead of JSON.
pub fn init() {
    let filter = EnvFilter::try_from_env("NEWSROOM_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn,sqlx=warn"));
    let pretty = std::env::var("NEWSROOM_LOG_FORMAT").is_ok_and(|f| f == "pretty");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if pretty {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    };
    // A second init (tests start several roles in one process) keeps the first subscriber.
    let _ = result;
}
