//! Traces across the log: one publication's trace, started by the caller's `traceparent`,
//! holds the command's request, each consumer's work on the event (read from the record's
//! headers) and the e-mail the notifier's mailer sends. Spans go to an in-memory exporter
//! (its own test binary: the subscriber is global to the process).

use std::time::Duration;

use newsroom_tests::{TestApp, mails_to, until};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use reqwest::StatusCode as S;
use serde_json::json;

/// A finished span of the trace, as the test looks at it.
#[derive(Debug)]
struct Span {
    name: String,
    consumer: Option<String>,
    id: SpanId,
    parent: SpanId,
}

#[tokio::test]
async fn a_publication_s_trace_links_the_command_the_projections_the_notifier_and_the_mailer()
-> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    newsroom_infra::telemetry::init_with(Some(
        SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build(),
    ));
    assert!(newsroom_infra::trace::enabled());
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let follower = app.reader().await?;
    app.follow(&follower, &["politics"]).await?;
    let response = app
        .http
        .post(format!("{}/v1/news", app.command_url))
        .bearer_auth(&editor.token)
        .json(&json!({"category": "politics", "title": "Traced", "content": "Text.", "tags": []}))
        .send()
        .await?;
    assert_eq!(response.status(), S::CREATED);
    let created: serde_json::Value = response.json().await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();

    // The caller's trace context on the publication.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .http
        .post(format!("{}/v1/news/{id}/publish", app.command_url))
        .bearer_auth(&editor.token)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await?;
    assert_eq!(response.status(), S::OK);
    until("the follower's e-mail", Duration::from_secs(60), || async {
        Ok(mails_to(&follower.email)?
            .iter()
            .any(|m| m.body.contains("Traced")))
    })
    .await?;

    let wanted = TraceId::from_hex(trace)?;
    let in_trace = || -> anyhow::Result<Vec<Span>> {
        newsroom_infra::telemetry::flush_spans();
        Ok(exporter
            .get_finished_spans()?
            .into_iter()
            .filter(|s| s.span_context.trace_id() == wanted)
            .map(|s| Span {
                name: s.name.to_string(),
                consumer: s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "consumer")
                    .map(|kv| kv.value.to_string()),
                id: s.span_context.span_id(),
                parent: s.parent_span_id,
            })
            .collect())
    };
    // Every consumer of the news topic has applied the event by the time the e-mail went
    // out but for the slowest; wait for their spans a little.
    let expected = ["news", "cache", "recommend", "notify"];
    until("every consumer's span", Duration::from_secs(30), || async {
        let spans = in_trace()?;
        Ok(expected.iter().all(|c| {
            spans
                .iter()
                .any(|s| s.name == "apply" && s.consumer.as_deref() == Some(c))
        }) && spans.iter().any(|s| s.name == "send e-mail"))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}; spans of the trace: {:?}", in_trace()))?;
    let spans = in_trace()?;
    assert!(
        spans.iter().any(|s| s.name == "request"),
        "the command's request is in the trace: {spans:?}"
    );
    // The e-mail continues the notifier's work on the event.
    let notified = spans
        .iter()
        .find(|s| s.name == "apply" && s.consumer.as_deref() == Some("notify"))
        .map(|s| s.id);
    let sent = spans.iter().find(|s| s.name == "send e-mail");
    assert_eq!(sent.map(|s| s.parent), notified, "{spans:?}");
    // Nothing of another consumer's topic claims this trace.
    assert!(
        !spans
            .iter()
            .any(|s| s.name == "apply" && s.consumer.as_deref() == Some("reads")),
        "{spans:?}"
    );
    app.stop().await
}
