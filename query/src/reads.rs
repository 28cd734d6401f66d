//! Recording reads: an authenticated `GET /v1/news/{id}` hands a `NewsRead` to a bounded
//! buffer and returns at once; a background task produces the buffered reads to
//! `<prefix>.reads`. When the buffer is full or Kafka does not take a read in time, the
//! read is dropped and counted (`newsroom_reads_total{outcome="dropped"}`): recording a
//! read never slows down or fails the GET.

use chrono::Utc;
use newsroom_events::Category;
use newsroom_events::EventMetadata;
use newsroom_events::metadata::micros;
use newsroom_events::reads::{NewsRead, ReadEvent};
use newsroom_infra::kafka::{Stream, best_effort_producer};
use newsroom_infra::metrics::READS;
use newsroom_infra::producer::Polled;
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::ClientContext;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, ProducerContext};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Reads waiting to be produced before new ones are dropped.
const BUFFER: usize = 10_000;

/// A read to record: who read which article, and the article's category and tags.
pub struct Read {
    /// The reader.
    pub user: Uuid,
    /// The article.
    pub news: Uuid,
    /// Its category.
    pub category: Category,
    /// Its tags.
    pub tags: Vec<String>,
    /// The request that read it.
    pub request_id: String,
}

/// Counts what Kafka did with each read.
struct Outcomes;

impl ClientContext for Outcomes {}

impl ProducerContext for Outcomes {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = if result.is_ok() { "sent" } else { "dropped" };
        READS.with_label_values(&[outcome]).inc();
    }
}

/// The handle handlers record reads through.
#[derive(Clone)]
pub struct Reads {
    buffer: mpsc::Sender<Read>,
}

impl Reads {
    /// Starts the producing task.
    pub fn start(kafka: &KafkaSettings, registry: Registry) -> anyhow::Result<Reads> {
        let producer = Polled::create(&best_effort_producer(kafka), Outcomes)?;
        let topic = Stream::Reads.topic(kafka);
        let (buffer, mut reads) = mpsc::channel::<Read>(BUFFER);
        tokio::spawn(async move {
            while let Some(read) = reads.recv().await {
                let event = ReadEvent::Read(NewsRead {
                    metadata: EventMetadata {
                        event_id: Uuid::now_v7(),
                        aggregate_id: read.user,
                        aggregate_version: 0,
                        occurred_at: micros(Utc::now()),
                        correlation_id: read.request_id.clone(),
                        causation_id: read.request_id,
                        actor_id: Some(read.user),
                        schema_version: 0,
                    },
                    news_id: read.news,
                    category: Some(read.category),
                    tags: Some(read.tags),
                })
                .with_schema_version();
                let payload = match event.encode(|name| registry.id_of(name)) {
                    Ok(payload) => payload,
                    Err(e) => {
                        tracing::error!(error = %e, "encoding a read");
                        READS.with_label_values(&["dropped"]).inc();
                        continue;
                    }
                };
                let key = read.user.as_bytes().to_vec();
                if let Err((e, _)) =
                    producer.send(BaseRecord::to(&topic).key(&key).payload(&payload))
                {
                    tracing::debug!(error = %e, "read dropped");
                    READS.with_label_values(&["dropped"]).inc();
                }
            }
        });
        Ok(Reads { buffer })
    }

    /// Hands a read over without waiting; drops (and counts) it if the buffer is full.
    pub fn record(&self, read: Read) {
        if self.buffer.try_send(read).is_err() {
            READS.with_label_values(&["dropped"]).inc();
        }
    }
}
