//! The `news` read model.

use anyhow::Context as _;
use chrono::DateTime;
use newsroom_events::news::NewsEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};

use crate::postgres::Projection;

/// Projects News events into the `news` table.
pub struct NewsProjection {
    /// The topic it reads.
    pub topic: String,
}

impl Projection for NewsProjection {
    fn name(&self) -> &'static str {
        "news"
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
        let event = NewsEvent::from_avro(&event.name, event.value)?;
        let meta = event.metadata().clone();
        let (id, version, at) = (
            meta.aggregate_id,
            meta.aggregate_version,
            meta.occurred_at(),
        );
        // Every write is guarded by version: a redelivered or replayed event changes nothing.
        let status_change = |status: &'static str| {
            sqlx::query(
                "UPDATE news SET status = $3, version = $2, updated_at = $4 WHERE id = $1 AND version < $2",
            )
            .bind(id)
            .bind(version)
            .bind(status)
            .bind(at)
        };
        let query = match event {
            NewsEvent::Drafted(e) => sqlx::query(
                "INSERT INTO news (id, author_id, category, title, content, tags, status, version, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7, $8, $8) ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(e.author_id)
            .bind(e.category.as_str())
            .bind(e.title)
            .bind(e.content)
            .bind(e.tags)
            .bind(version)
            .bind(at),
            NewsEvent::Edited(e) => sqlx::query(
                "UPDATE news SET category = COALESCE($3, category), title = COALESCE($4, title), \
                 content = COALESCE($5, content), tags = COALESCE($6, tags), version = $2, updated_at = $7 \
                 WHERE id = $1 AND version < $2",
            )
            .bind(id)
            .bind(version)
            .bind(e.category.map(|c| c.as_str()))
            .bind(e.title)
            .bind(e.content)
            .bind(e.tags)
            .bind(at),
            NewsEvent::Published(e) => sqlx::query(
                "UPDATE news SET status = 'published', published_at = $3, version = $2, updated_at = $4 \
                 WHERE id = $1 AND version < $2",
            )
            .bind(id)
            .bind(version)
            .bind(DateTime::from_timestamp_micros(e.published_at))
            .bind(at),
            NewsEvent::Unpublished(_) => sqlx::query(
                "UPDATE news SET status = 'draft', published_at = NULL, version = $2, updated_at = $3 \
                 WHERE id = $1 AND version < $2",
            )
            .bind(id)
            .bind(version)
            .bind(at),
            NewsEvent::Archived(_) => status_change("archived"),
            NewsEvent::Deleted(_) => status_change("deleted"),
        };
        query
            .execute(&mut **tx)
            .await
            .context("projecting a news event")?;
        Ok(())
    }
}
