//! Reading history and read counts, from the reads stream.

use anyhow::Context as _;
use newsroom_events::reads::ReadEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};

use crate::postgres::Projection;

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
        let meta = &read.metadata;
        // Erased users' reads stay counted but leave no history.
        sqlx::query(
            "INSERT INTO reading_history (event_id, user_id, news_id, read_at) \
             SELECT $1, $2, $3, $4 WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = $2 AND erased) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(meta.event_id)
        .bind(meta.aggregate_id)
        .bind(read.news_id)
        .bind(meta.occurred_at())
        .execute(&mut **tx)
        .await
        .context("recording a read")?;
        sqlx::query(
            "INSERT INTO news_reads_hourly (news_id, hour, reads) VALUES ($1, date_trunc('hour', $2::timestamptz), 1) \
             ON CONFLICT (news_id, hour) DO UPDATE SET reads = news_reads_hourly.reads + 1",
        )
        .bind(read.news_id)
        .bind(meta.occurred_at())
        .execute(&mut **tx)
        .await
        .context("counting a read for trending")?;
        sqlx::query(
            "INSERT INTO news_read_counts (news_id, reads) VALUES ($1, 1) \
             ON CONFLICT (news_id) DO UPDATE SET reads = news_read_counts.reads + 1",
        )
        .bind(read.news_id)
        .execute(&mut **tx)
        .await
        .context("counting a read")?;
        Ok(())
    }
}
