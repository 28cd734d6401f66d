//! Reading history and read counts, from the reads stream.

use anyhow::Context as _;
use futures::future::BoxFuture;
use newsroom_events::reads::{NewsRead, ReadEvent};
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};

use crate::postgres::{Projection, bulk_or_each};

/// Projects reads into `reading_history`, `news_reads_hourly` and `news_read_counts`.
pub struct ReadsProjection {
    /// The topic it reads.
    pub topic: String,
}

impl Projection for ReadsProjection {
    fn name(&self) -> &'static str {
        "reads"
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: Decoded,
        _live: bool,
    ) -> anyhow::Result<()> {
        let ReadEvent::Read(read) = ReadEvent::from_avro(&event.name, event.value)?;
        apply_read(tx, read).await
    }

    /// A batch's reads in three statements (history, hourly buckets, counts).
    async fn apply_all(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        events: Vec<Decoded>,
        _live: bool,
    ) -> Result<(), (usize, anyhow::Error)> {
        let mut reads = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            let ReadEvent::Read(read) =
                ReadEvent::from_avro(&event.name, event.value).map_err(|e| (index, e.into()))?;
            reads.push(read);
        }
        if reads.is_empty() {
            return Ok(());
        }
        bulk_or_each(tx, reads, 0, insert_reads_boxed, apply_read_boxed).await
    }
}

/// Reads in one statement per table; counts summed per article (and hour) first.
async fn insert_reads(
    tx: &mut Transaction<'static, Postgres>,
    reads: &[NewsRead],
) -> anyhow::Result<()> {
    let (mut events, mut users, mut news, mut at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hourly: std::collections::BTreeMap<(uuid::Uuid, i64), i64> = Default::default();
    let mut counts: std::collections::BTreeMap<uuid::Uuid, i64> = Default::default();
    for read in reads {
        let meta = &read.metadata;
        events.push(meta.event_id);
        users.push(meta.aggregate_id);
        news.push(read.news_id);
        at.push(meta.occurred_at());
        *hourly
            .entry((
                read.news_id,
                meta.occurred_at.div_euclid(3_600_000_000) * 3_600_000_000,
            ))
            .or_default() += 1;
        *counts.entry(read.news_id).or_default() += 1;
    }
    sqlx::query!(
        "INSERT INTO reading_history (event_id, user_id, news_id, read_at) \
         SELECT r.event_id, r.user_id, r.news_id, r.read_at \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[]) AS r(event_id, user_id, news_id, read_at) \
         WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = r.user_id AND u.erased) \
         ON CONFLICT (event_id) DO NOTHING",
        &events,
        &users,
        &news,
        &at,
    )
    .execute(&mut **tx)
    .await
    .context("recording reads")?;
    let (hour_news, hours, hour_reads): (Vec<_>, Vec<_>, Vec<_>) = hourly
        .into_iter()
        .map(|((n, h), c)| {
            (
                n,
                chrono::DateTime::from_timestamp_micros(h).unwrap_or_default(),
                c,
            )
        })
        .fold(
            (Vec::new(), Vec::new(), Vec::new()),
            |mut acc, (n, h, c)| {
                acc.0.push(n);
                acc.1.push(h);
                acc.2.push(c);
                acc
            },
        );
    sqlx::query!(
        "INSERT INTO news_reads_hourly (news_id, hour, reads) \
         SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[]) \
         ON CONFLICT (news_id, hour) DO UPDATE SET reads = news_reads_hourly.reads + EXCLUDED.reads",
        &hour_news,
        &hours,
        &hour_reads,
    )
    .execute(&mut **tx)
    .await
    .context("counting reads for trending")?;
    let (count_news, count_reads): (Vec<_>, Vec<_>) = counts.into_iter().unzip();
    sqlx::query!(
        "INSERT INTO news_read_counts (news_id, reads) SELECT * FROM unnest($1::uuid[], $2::bigint[]) \
         ON CONFLICT (news_id) DO UPDATE SET reads = news_read_counts.reads + EXCLUDED.reads",
        &count_news,
        &count_reads,
    )
    .execute(&mut **tx)
    .await
    .context("counting reads")?;
    Ok(())
}

/// One read.
async fn apply_read(tx: &mut Transaction<'static, Postgres>, read: NewsRead) -> anyhow::Result<()> {
    {
        let meta = &read.metadata;
        // Erased users' reads stay counted but leave no history.
        sqlx::query!(
            "INSERT INTO reading_history (event_id, user_id, news_id, read_at) \
             SELECT $1, $2, $3, $4 WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = $2 AND erased) \
             ON CONFLICT (event_id) DO NOTHING",
            meta.event_id,
            meta.aggregate_id,
            read.news_id,
            meta.occurred_at(),
        )
        .execute(&mut **tx)
        .await
        .context("recording a read")?;
        sqlx::query!(
            "INSERT INTO news_reads_hourly (news_id, hour, reads) VALUES ($1, date_trunc('hour', $2::timestamptz), 1) \
             ON CONFLICT (news_id, hour) DO UPDATE SET reads = news_reads_hourly.reads + 1",
            read.news_id,
            meta.occurred_at(),
        )
        .execute(&mut **tx)
        .await
        .context("counting a read for trending")?;
        sqlx::query!(
            "INSERT INTO news_read_counts (news_id, reads) VALUES ($1, 1) \
             ON CONFLICT (news_id) DO UPDATE SET reads = news_read_counts.reads + 1",
            read.news_id,
        )
        .execute(&mut **tx)
        .await
        .context("counting a read")?;
        Ok(())
    }
}

fn insert_reads_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    run: &'a [NewsRead],
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(insert_reads(tx, run))
}

fn apply_read_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    item: NewsRead,
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(apply_read(tx, item))
}
