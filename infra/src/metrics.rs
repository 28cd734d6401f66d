//! Prometheus metrics of the process, named `newsroom_<what>_<unit>`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The process-wide metrics registry.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn registered<C: prometheus::core::Collector + Clone + 'static>(collector: C) -> C {
    // Registration fails only for a duplicate name, which would be a bug caught by tests.
    if let Err(e) = REGISTRY.register(Box::new(collector.clone())) {
        tracing::error!(error = %e, "metric registered twice");
    }
    collector
}

static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new("newsroom_http_requests_total", "HTTP requests served"),
            &["route", "method", "status"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

static HTTP_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    registered(
        HistogramVec::new(
            HistogramOpts::new(
                "newsroom_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route", "method"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Events a consumer handled, by consumer and outcome (`applied`, `skipped`, `failed`).
pub static CONSUMER_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new(
                "newsroom_consumer_events_total",
                "Events handled by consumers",
            ),
            &["consumer", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Records appended to the log by the command side, by outcome (`committed`, `failed`).
pub static APPENDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new(
                "newsroom_log_appends_total",
                "Records appended to the event log",
            ),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Partitions this process writes (command API).
pub static PARTITIONS_OWNED: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    registered(
        prometheus::IntGauge::new(
            "newsroom_command_partitions_owned",
            "Partitions whose writer runs in this process",
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Query answers by endpoint and by the store that gave them (`redis`, `postgres`).
pub static QUERY_ANSWERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new(
                "newsroom_query_answers_total",
                "Query answers by endpoint and store",
            ),
            &["endpoint", "store"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Notification e-mails by outcome (`sent`, `failed`, `skipped`).
pub static EMAILS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new("newsroom_emails_total", "Notification e-mails by outcome"),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Reads handed to the log, by outcome (`sent`, `dropped`).
pub static READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            Opts::new("newsroom_reads_total", "Reads recorded by the query API"),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Events a projection still has to apply, per partition (from librdkafka's statistics).
pub static PROJECTION_LAG_EVENTS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    registered(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "newsroom_projection_lag_events",
                "Events of the log a projection has not applied yet",
            ),
            &["projection", "partition"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Milliseconds between an event's append and its application, for the last event a
/// projection applied on each partition.
pub static PROJECTION_LAG_MS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    registered(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "newsroom_projection_lag_milliseconds",
                "Age of the last applied event when it was applied",
            ),
            &["projection", "partition"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
});

/// Records one served request.
pub fn record_http(route: &str, method: &str, status: u16, elapsed: Duration) {
    HTTP_REQUESTS
        .with_label_values(&[route, method, &status.to_string()])
        .inc();
    HTTP_LATENCY
        .with_label_values(&[route, method])
        .observe(elapsed.as_secs_f64());
}

/// The metrics in the Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}
