//! The `news` read model.

use anyhow::Context as _;
use chrono::DateTime;
use futures::future::BoxFuture;
use newsroom_events::news::NewsEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};

use crate::postgres::{Projection, bulk_or_each, text_array};

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
        apply_event(tx, NewsEvent::from_avro(&event.name, event.value)?).await
    }

    /// Runs of creations (the bulk of a backlog) go in one statement each; the rest one by
    /// one, in order.
    async fn apply_all(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        events: Vec<Decoded>,
        _live: bool,
    ) -> Result<(), (usize, anyhow::Error)> {
        let mut run: Vec<NewsEvent> = Vec::new();
        let mut run_start = 0;
        for (index, event) in events.into_iter().enumerate() {
            let event =
                NewsEvent::from_avro(&event.name, event.value).map_err(|e| (index, e.into()))?;
            if matches!(event, NewsEvent::Drafted(_)) {
                if run.is_empty() {
                    run_start = index;
                }
                run.push(event);
                continue;
            }
            if !run.is_empty() {
                bulk_or_each(
                    tx,
                    std::mem::take(&mut run),
                    run_start,
                    insert_drafts_boxed,
                    apply_event_boxed,
                )
                .await?;
            }
            apply_event(tx, event).await.map_err(|e| (index, e))?;
        }
        if !run.is_empty() {
            bulk_or_each(tx, run, run_start, insert_drafts_boxed, apply_event_boxed).await?;
        }
        Ok(())
    }
}

/// Creations in one statement. Each row's tags travel as the text of an array (a
/// parameter cannot be an array of arrays of different lengths), which PostgreSQL's array
/// input reads back. Without `ON CONFLICT`: an article already there (which exactly-once
/// offsets leave to a log that drafts an id twice) fails the statement, and
/// [`bulk_or_each`] then applies the run one event at a time, each guarded. Public for
/// the tests, which check it against PostgreSQL.
pub async fn insert_drafts(
    tx: &mut Transaction<'static, Postgres>,
    run: &[NewsEvent],
) -> anyhow::Result<()> {
    let mut columns = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for event in run {
        if let NewsEvent::Drafted(e) = event {
            columns.0.push(e.metadata.aggregate_id);
            columns.1.push(e.author_id);
            columns.2.push(e.category.as_str());
            columns.3.push(e.title.as_str());
            columns.4.push(e.content.as_str());
            columns.5.push(text_array(&e.tags));
            columns.6.push(e.metadata.aggregate_version);
            columns.7.push(e.metadata.occurred_at());
        }
    }
    sqlx::query!(
        "INSERT INTO news (id, author_id, category, title, content, tags, status, version, created_at, updated_at) \
         SELECT id, author, category, title, content, tags::text[], 'draft', version, at, at \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::timestamptz[]) \
           AS r(id, author, category, title, content, tags, version, at)",
        &columns.0,
        &columns.1,
        &columns.2 as &[&str],
        &columns.3 as &[&str],
        &columns.4 as &[&str],
        &columns.5,
        &columns.6,
        &columns.7,
    )
    .execute(&mut **tx)
    .await
    .context("projecting news creations")?;
    Ok(())
}

/// One event.
async fn apply_event(
    tx: &mut Transaction<'static, Postgres>,
    event: NewsEvent,
) -> anyhow::Result<()> {
    {
        let meta = event.metadata().clone();
        let (id, version, at) = (
            meta.aggregate_id,
            meta.aggregate_version,
            meta.occurred_at(),
        );
        // Every write is guarded by version: a redelivered or replayed event changes nothing.
        let status_change = |status: &'static str| {
            sqlx::query!(
                "UPDATE news SET status = $3, version = $2, updated_at = $4 WHERE id = $1 AND version < $2",
                id,
                version,
                status,
                at,
            )
        };
        let query = match event {
            NewsEvent::Drafted(e) => sqlx::query!(
                "INSERT INTO news (id, author_id, category, title, content, tags, status, version, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'draft', $7, $8, $8) ON CONFLICT (id) DO NOTHING",
                id,
                e.author_id,
                e.category.as_str(),
                e.title,
                e.content,
                &e.tags,
                version,
                at,
            ),
            NewsEvent::Edited(e) => sqlx::query!(
                "UPDATE news SET category = COALESCE($3, category), title = COALESCE($4, title), \
                 content = COALESCE($5, content), tags = COALESCE($6, tags), version = $2, updated_at = $7 \
                 WHERE id = $1 AND version < $2",
                id,
                version,
                e.category.map(|c| c.as_str()),
                e.title,
                e.content,
                e.tags.as_deref(),
                at,
            ),
            NewsEvent::Published(e) => sqlx::query!(
                "UPDATE news SET status = 'published', published_at = $3, version = $2, updated_at = $4 \
                 WHERE id = $1 AND version < $2",
                id,
                version,
                DateTime::from_timestamp_micros(e.published_at),
                at,
            ),
            NewsEvent::Unpublished(_) => sqlx::query!(
                "UPDATE news SET status = 'draft', published_at = NULL, version = $2, updated_at = $3 \
                 WHERE id = $1 AND version < $2",
                id,
                version,
                at,
            ),
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

fn insert_drafts_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    run: &'a [NewsEvent],
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(insert_drafts(tx, run))
}

fn apply_event_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    item: NewsEvent,
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(apply_event(tx, item))
}
