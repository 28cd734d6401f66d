//! The batch loop every projection shares: assign partitions from stored offsets, read
//! batches, apply them in one transaction together with the new offsets.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use newsroom_infra::codec::{self, Decoded};
use newsroom_infra::kafka::read_committed_consumer;
use newsroom_infra::metrics::{CONSUMER_EVENTS, PROJECTION_LAG_EVENTS, PROJECTION_LAG_MS};
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgPool, Postgres, Transaction};

/// Most events applied in one transaction.
const MAX_BATCH: usize = 1000;
/// Pause before a batch whose transaction failed is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// One event as read from the log, before decoding.
pub struct Raw {
    /// Partition it came from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// When it was appended (milliseconds since the epoch), if the broker said.
    pub appended_ms: Option<i64>,
    /// The framed Avro payload (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
}

/// A read model fed from one topic.
pub trait Projection: Send + Sync {
    /// Name under which offsets are kept.
    fn name(&self) -> &'static str;
    /// Applies one decoded event inside the batch's transaction.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        event: Decoded,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;
}

/// Runs `projection` over `topic` until `shutdown` resolves.
pub async fn run<P: Projection>(
    projection: P,
    topic: String,
    kafka: &KafkaSettings,
    pool: PgPool,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let group = format!("{}.{}", kafka.topic_prefix, projection.name());
    let consumer: StreamConsumer<LagContext> = read_committed_consumer(kafka, &group)
        .set("statistics.interval.ms", "1000")
        .create_with_context(LagContext {
            projection: projection.name(),
        })
        .context("creating the projection consumer")?;
    let partitions = partitions_of(&consumer, &topic).await?;
    let stored = stored_offsets(&pool, projection.name(), &topic).await?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let offset = stored
            .get(&partition)
            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
        assignment
            .add_partition_offset(&topic, partition, offset)
            .context("building the assignment")?;
    }
    consumer
        .assign(&assignment)
        .context("assigning partitions")?;
    tracing::info!(projection = projection.name(), %topic, "projection started");

    let mut batches = consumer.stream().ready_chunks(MAX_BATCH);
    tokio::pin!(shutdown);
    loop {
        let chunk = tokio::select! {
            () = &mut shutdown => break,
            chunk = batches.next() => chunk,
        };
        let Some(chunk) = chunk else { break };
        let mut batch = Vec::with_capacity(chunk.len());
        for message in chunk {
            match message {
                Ok(m) => batch.push(Raw {
                    partition: m.partition(),
                    offset: m.offset(),
                    appended_ms: m.timestamp().to_millis(),
                    payload: m.payload().map(<[u8]>::to_vec),
                }),
                Err(e) => tracing::warn!(error = %e, "consumer error"),
            }
        }
        while let Err(e) = apply_batch(&projection, &topic, &pool, &registry, &batch).await {
            tracing::warn!(
                projection = projection.name(),
                error = format!("{e:#}"),
                "batch failed; retrying"
            );
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    tracing::info!(projection = projection.name(), "projection stopped");
    Ok(())
}

async fn apply_batch<P: Projection>(
    projection: &P,
    topic: &str,
    pool: &PgPool,
    registry: &Registry,
    batch: &[Raw],
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut tx = pool
        .begin()
        .await
        .context("beginning the batch transaction")?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let (mut applied, mut skipped) = (0u64, 0u64);
    for raw in batch {
        next.insert(raw.partition, raw.offset + 1);
        let decoded = match &raw.payload {
            Some(payload) => codec::decode(registry, payload).await,
            None => Err(anyhow::anyhow!("record without a payload")),
        };
        match decoded {
            Ok(event) => {
                projection.apply(&mut tx, event).await?;
                applied += 1;
            }
            Err(e) => {
                // Undecodable records are logged and passed over so the projection keeps
                // flowing (dead-letter topics replace this, see the read-side issue).
                tracing::warn!(
                    projection = projection.name(),
                    partition = raw.partition,
                    offset = raw.offset,
                    error = format!("{e:#}"),
                    "skipping an event that cannot be decoded"
                );
                skipped += 1;
            }
        }
    }
    for (partition, offset) in &next {
        sqlx::query(
            "INSERT INTO projection_offsets (projection, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(projection.name())
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await
        .context("storing offsets")?;
    }
    tx.commit().await.context("committing the batch")?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
    for raw in batch {
        if let Some(at) = raw.appended_ms {
            newest.insert(raw.partition, at);
        }
    }
    for (partition, at) in newest {
        PROJECTION_LAG_MS
            .with_label_values(&[projection.name(), &partition.to_string()])
            .set((now_ms - at).max(0));
    }
    CONSUMER_EVENTS
        .with_label_values(&[projection.name(), "applied"])
        .inc_by(applied);
    CONSUMER_EVENTS
        .with_label_values(&[projection.name(), "skipped"])
        .inc_by(skipped);
    Ok(())
}

/// Publishes librdkafka's per-partition consumer lag as `newsroom_projection_lag_events`.
pub struct LagContext {
    projection: &'static str,
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                // What the projection has been handed (or, before the first record, where
                // it fetches from), against the last stable offset of the partition.
                let position = if stats.app_offset >= 0 {
                    stats.app_offset
                } else {
                    stats.next_offset
                };
                if *partition < 0 || position < 0 || stats.ls_offset < 0 {
                    continue;
                }
                PROJECTION_LAG_EVENTS
                    .with_label_values(&[self.projection, &partition.to_string()])
                    .set((stats.ls_offset - position).max(0));
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

async fn partitions_of(
    consumer: &StreamConsumer<LagContext>,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(metadata) = metadata {
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if !partitions.is_empty() {
                return Ok(partitions);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("topic {topic} has no partitions (does it exist? is Kafka up?)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn stored_offsets(
    pool: &PgPool,
    projection: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM projection_offsets WHERE projection = $1 AND topic = $2")
            .bind(projection)
            .bind(topic)
            .fetch_all(pool)
            .await
            .context("reading stored offsets")?;
    Ok(rows.into_iter().collect())
}
