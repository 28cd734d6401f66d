//! Dead letters: events a consumer could not decode or apply, and the later events of the
//! same aggregate parked behind them so that each aggregate's order holds.
//!
//! The parked events live in the `dead_letters` table (with their payloads), per consumer
//! and read-model version; each one that failed is also copied, with its reason, to the
//! consumer's dead-letter topic. `newsroom dead-letters retry|skip` only records a request
//! on the rows: the consumer that parked them carries it out between two batches, so that
//! nothing else ever writes its read model.

use std::collections::{BTreeSet, HashSet};

use anyhow::Context as _;
use newsroom_infra::producer::{self, Producer};
use rdkafka::message::{Header, OwnedHeaders};
use sqlx::PgPool;

use crate::consumer::{Position, Record};

/// A parked aggregate: the topic it comes from and its key.
pub type Aggregate = (String, String);

/// One parked event.
#[derive(Debug, sqlx::FromRow)]
pub struct Parked {
    /// Topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The raw record value.
    pub payload: Option<Vec<u8>>,
}

/// The dead letters of one consumer and read-model version.
pub struct Parking {
    pool: PgPool,
    consumer: &'static str,
    version: i32,
    producer: Producer,
    topic: String,
}

impl Parking {
    /// The parking of `consumer`'s `version`, copying failures to `topic`.
    pub fn new(
        pool: PgPool,
        consumer: &'static str,
        version: i32,
        producer: Producer,
        topic: String,
    ) -> Self {
        Parking {
            pool,
            consumer,
            version,
            producer,
            topic,
        }
    }

    /// The aggregates parked now in `held` partitions (`None`: in any).
    pub async fn load(
        &self,
        held: Option<&BTreeSet<Position>>,
    ) -> anyhow::Result<HashSet<Aggregate>> {
        let rows = sqlx::query!(
            "SELECT DISTINCT topic, partition, aggregate FROM dead_letters WHERE consumer = $1 AND version = $2",
            self.consumer,
            self.version,
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the parked aggregates")?;
        Ok(rows
            .into_iter()
            .map(|row| (row.topic, row.partition, row.aggregate))
            .filter(|(topic, partition, _)| {
                held.is_none_or(|h| h.contains(&(topic.clone(), *partition)))
            })
            .map(|(topic, _, aggregate)| (topic, aggregate))
            .collect())
    }

    /// Parks `record`: with a `reason` it is the event that failed (copied to the
    /// dead-letter topic), without one it waits behind an earlier failure. Idempotent.
    pub async fn park(&self, record: &Record, reason: Option<&str>) -> anyhow::Result<()> {
        let inserted = sqlx::query!(
            "INSERT INTO dead_letters (consumer, version, topic, partition, \"offset\", aggregate, payload, reason, attempts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            self.consumer,
            self.version,
            record.topic.as_ref(),
            record.partition,
            record.offset,
            record.aggregate(),
            record.payload.as_deref(),
            reason,
            i32::from(reason.is_some()),
        )
        .execute(&self.pool)
        .await
        .context("parking an event")?
        .rows_affected();
        if let Some(reason) = reason {
            tracing::error!(
                consumer = self.consumer,
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                aggregate = record.aggregate(),
                reason,
                "dead-lettered an event; later events of its aggregate wait behind it"
            );
            if inserted > 0 {
                self.copy_to_topic(record, reason).await?;
            }
        }
        Ok(())
    }

    async fn copy_to_topic(&self, record: &Record, reason: &str) -> anyhow::Result<()> {
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "newsroom.reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "newsroom.consumer",
                value: Some(self.consumer),
            })
            .insert(Header {
                key: "newsroom.topic",
                value: Some(record.topic.as_ref()),
            })
            .insert(Header {
                key: "newsroom.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "newsroom.offset",
                value: Some(&offset),
            });
        let out = producer::Record {
            topic: &self.topic,
            partition: None,
            key: record.key.as_deref(),
            payload: record.payload.as_deref(),
            headers: Some(headers),
        };
        self.producer
            .send(out)
            .map_err(|e| anyhow::anyhow!("writing to the dead-letter topic: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("writing to the dead-letter topic: {e}"))?;
        Ok(())
    }

    /// Aggregates with a pending `retry` or `skip`: topic, partition, aggregate, action.
    pub async fn requests(&self) -> anyhow::Result<Vec<(String, i32, String, String)>> {
        let rows = sqlx::query!(
            r#"SELECT topic, min(partition) AS "partition!", aggregate, min(action) AS "action!" FROM dead_letters
               WHERE consumer = $1 AND version = $2 AND action IS NOT NULL GROUP BY topic, aggregate"#,
            self.consumer,
            self.version,
        )
        .fetch_all(&self.pool)
        .await
        .context("reading dead-letter requests")?;
        Ok(rows
            .into_iter()
            .map(|row| (row.topic, row.partition, row.aggregate, row.action))
            .collect())
    }

    /// The parked events of an aggregate, oldest first.
    pub async fn events(&self, topic: &str, aggregate: &str) -> anyhow::Result<Vec<Parked>> {
        sqlx::query_as!(
            Parked,
            "SELECT topic, partition, \"offset\", payload FROM dead_letters \
             WHERE consumer = $1 AND version = $2 AND topic = $3 AND aggregate = $4 ORDER BY partition, \"offset\"",
            self.consumer,
            self.version,
            topic,
            aggregate,
        )
        .fetch_all(&self.pool)
        .await
        .context("reading parked events")
    }

    /// Removes a parked event (applied or skipped).
    pub async fn remove(&self, event: &Parked) -> anyhow::Result<()> {
        sqlx::query!(
            "DELETE FROM dead_letters WHERE consumer = $1 AND version = $2 AND topic = $3 AND partition = $4 AND \"offset\" = $5",
            self.consumer,
            self.version,
            event.topic,
            event.partition,
            event.offset,
        )
        .execute(&self.pool)
        .await
        .context("removing a parked event")?;
        Ok(())
    }

    /// Records that a parked event failed again.
    pub async fn failed_again(&self, event: &Parked, reason: &str) -> anyhow::Result<()> {
        sqlx::query!(
            "UPDATE dead_letters SET reason = $6, attempts = attempts + 1, updated_at = now() \
             WHERE consumer = $1 AND version = $2 AND topic = $3 AND partition = $4 AND \"offset\" = $5",
            self.consumer,
            self.version,
            event.topic,
            event.partition,
            event.offset,
            reason,
        )
        .execute(&self.pool)
        .await
        .context("recording a failed retry")?;
        Ok(())
    }

    /// Marks an aggregate's request as carried out.
    pub async fn done(&self, topic: &str, aggregate: &str) -> anyhow::Result<()> {
        sqlx::query!(
            "UPDATE dead_letters SET action = NULL, updated_at = now() \
             WHERE consumer = $1 AND version = $2 AND topic = $3 AND aggregate = $4",
            self.consumer,
            self.version,
            topic,
            aggregate,
        )
        .execute(&self.pool)
        .await
        .context("clearing a dead-letter request")?;
        Ok(())
    }
}

/// One parked aggregate as `newsroom dead-letters list` shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct Summary {
    /// Consumer.
    pub consumer: String,
    /// Read-model version.
    pub version: i32,
    /// Topic.
    pub topic: String,
    /// Aggregate key.
    pub aggregate: String,
    /// Partition and offset of the event that failed.
    pub partition: i32,
    /// Offset of the first parked event.
    pub offset: i64,
    /// Why it failed.
    pub reason: Option<String>,
    /// Times it was tried.
    pub attempts: i32,
    /// Events parked in all (the failed one included).
    pub parked: i64,
    /// Pending request.
    pub action: Option<String>,
}

/// Every parked aggregate, optionally of one consumer.
pub async fn list(pool: &PgPool, consumer: Option<&str>) -> anyhow::Result<Vec<Summary>> {
    sqlx::query_as!(
        Summary,
        r#"SELECT DISTINCT ON (consumer, version, topic, aggregate) consumer, version, topic, aggregate, partition, "offset",
           reason, attempts, count(*) OVER (PARTITION BY consumer, version, topic, aggregate) AS "parked!", action
           FROM dead_letters WHERE $1::text IS NULL OR consumer = $1
           ORDER BY consumer, version, topic, aggregate, partition, "offset""#,
        consumer,
    )
    .fetch_all(pool)
    .await
    .context("listing dead letters")
}

/// How many aggregates each consumer's version has parked: (consumer, version, count).
pub async fn parked(pool: &PgPool) -> anyhow::Result<Vec<(String, i32, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT consumer, version, count(DISTINCT (topic, aggregate)) AS "parked!" FROM dead_letters
           GROUP BY consumer, version"#,
    )
    .fetch_all(pool)
    .await
    .context("counting dead letters")?;
    Ok(rows
        .into_iter()
        .map(|row| (row.consumer, row.version, row.parked))
        .collect())
}

/// Asks `consumer` to retry (or skip the failed event of, then retry) one aggregate or all
/// of them; returns how many aggregates the request covers.
pub async fn request(
    pool: &PgPool,
    consumer: &str,
    aggregate: Option<&str>,
    action: &str,
) -> anyhow::Result<u64> {
    let count = sqlx::query_scalar!(
        r#"WITH marked AS (UPDATE dead_letters SET action = $3, updated_at = now()
           WHERE consumer = $1 AND ($2::text IS NULL OR aggregate = $2) RETURNING topic, aggregate)
           SELECT count(DISTINCT (topic, aggregate)) AS "count!" FROM marked"#,
        consumer,
        aggregate,
        action,
    )
    .fetch_one(pool)
    .await
    .context("recording the request")?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// How many of `consumer`'s aggregates still have a request the consumer has not carried
/// out.
pub async fn pending(pool: &PgPool, consumer: &str) -> anyhow::Result<i64> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(DISTINCT (topic, aggregate)) AS "count!" FROM dead_letters WHERE consumer = $1 AND action IS NOT NULL"#,
        consumer,
    )
    .fetch_one(pool)
    .await
    .context("reading pending requests")?;
    Ok(count)
}
