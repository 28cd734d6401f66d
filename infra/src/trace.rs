//! Traces across the log: the W3C trace context (`traceparent`) of the HTTP request that
//! caused an event travels in the event's Kafka record headers, and each consumer's work on
//! that event, and the e-mail it leads to, are spans of the same trace (issue 15).
//!
//! Spans reach OpenTelemetry only when [`crate::telemetry`] installed its layer (an OTLP
//! endpoint is configured, or a test exporter): otherwise nothing here costs more than
//! reading a flag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (HTTP and Kafka) that carries the trace context.
pub const HEADER: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Marks traces as exported (by [`crate::telemetry`]).
pub(crate) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are exported to OpenTelemetry.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The `traceparent` of `span`, when traces are exported and the span belongs to a
/// sampled trace (an unsampled one is not carried on: nothing downstream would export it).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(HEADER)
}

/// Makes `span` continue the trace of `traceparent` (ignored when malformed, or when
/// traces are not exported).
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    if !enabled() || traceparent.len() > 128 {
        return;
    }
    let carrier = HashMap::from([(HEADER.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Whether a `traceparent` value names a sampled trace (`00-<trace>-<span>-<flags>`, the
/// flags' lowest bit), read without allocating.
pub fn sampled(value: &[u8]) -> bool {
    value.len() == 55
        && value.starts_with(b"00-")
        && value[54].is_ascii_hexdigit()
        && (char::from(value[54]).to_digit(16).unwrap_or(0) & 1) == 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn nothing_is_read_or_written_while_traces_are_off() {
        let span = tracing::info_span!("off");
        super::continue_from(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(super::traceparent(&span), None);
    }

    #[test]
    fn the_sampled_flag_is_read_from_the_header() {
        let id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        assert!(super::sampled(format!("{id}-01").as_bytes()));
        assert!(super::sampled(format!("{id}-03").as_bytes()));
        assert!(!super::sampled(format!("{id}-00").as_bytes()));
        assert!(!super::sampled(b"00-short-01"));
        assert!(!super::sampled(format!("{id}-0g").as_bytes()));
    }
}
