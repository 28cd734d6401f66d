//! The notifier's read model: one inbox entry per (user, article) when an article is first
//! published in a category the user follows, and, from the live consumer only, an e-mail to
//! send (`email_outbox`, delivered by [`crate::mailer`]).
//!
//! Follows are kept as intervals and articles with their first publication time, so the
//! inbox does not depend on the order in which the users and news streams are read: a
//! publication notifies the users whose follow interval covers it, and a follow read after
//! publications it covers fills them in (ADR 11).

use anyhow::Context as _;
use newsroom_events::news::{NewsDrafted, NewsEvent};
use newsroom_events::users::UserEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use futures::future::BoxFuture;

use crate::postgres::{Projection, bulk_or_each};

/// The consumer's name.
pub const NAME: &str = "notify";

/// Projects users and news events into the inbox.
pub struct Notifier {
    /// The users and news topics.
    pub topics: Vec<String>,
}

/// Inbox entries for `user` and every article of `categories` first published at or after
/// `since` (a follow read after the publications it covers); e-mails too when `live`.
async fn backfill(
    tx: &mut Transaction<'static, Postgres>,
    user: Uuid,
    categories: &[String],
    since: chrono::DateTime<chrono::Utc>,
    live: bool,
) -> anyhow::Result<()> {
    if live {
        sqlx::query!(
            "WITH inbox AS (INSERT INTO notify_inbox (user_id, news_id, title, category, created_at) \
               SELECT $1, news_id, title, category, published_at FROM notify_articles \
               WHERE category = ANY($2) AND published_at >= $3 ON CONFLICT DO NOTHING RETURNING user_id, news_id, title, category) \
             INSERT INTO email_outbox (user_id, news_id, title, category) \
               SELECT i.user_id, i.news_id, i.title, i.category FROM inbox i \
               JOIN notify_subscribers s ON s.user_id = i.user_id AND s.email_on ON CONFLICT DO NOTHING",
            user,
            categories,
            since,
        )
    } else {
        sqlx::query!(
            "INSERT INTO notify_inbox (user_id, news_id, title, category, created_at) \
               SELECT $1, news_id, title, category, published_at FROM notify_articles \
               WHERE category = ANY($2) AND published_at >= $3 ON CONFLICT DO NOTHING",
            user,
            categories,
            since,
        )
    }
    .execute(&mut **tx)
    .await
    .context("filling in notifications of a new follow")?;
    Ok(())
}

impl Projection for Notifier {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        self.topics.clone()
    }

    fn side_effects(&self) -> bool {
        true
    }

    /// Runs of creations (most of what editors write) go in one statement each; the rest
    /// one by one, in order.
    async fn apply_all(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        events: Vec<Decoded>,
        live: bool,
    ) -> Result<(), (usize, anyhow::Error)> {
        let mut run: Vec<NewsDrafted> = Vec::new();
        let mut run_start = 0;
        for (index, event) in events.into_iter().enumerate() {
            if event.name == <NewsDrafted as newsroom_events::Event>::FULL_NAME {
                // Decoded here, so that an event that does not decode is the one blamed.
                match NewsEvent::from_avro(&event.name, event.value) {
                    Ok(NewsEvent::Drafted(drafted)) => {
                        if run.is_empty() {
                            run_start = index;
                        }
                        run.push(drafted);
                        continue;
                    }
                    Ok(_) => {
                        return Err((index, anyhow::anyhow!("not a creation: {}", event.name)));
                    }
                    Err(e) => return Err((index, e.into())),
                }
            }
            if !run.is_empty() {
                let run = std::mem::take(&mut run);
                bulk_or_each(tx, run, run_start, record_drafts_boxed, record_draft_boxed).await?;
            }
            self.apply(tx, event, live).await.map_err(|e| (index, e))?;
        }
        if !run.is_empty() {
            bulk_or_each(tx, run, run_start, record_drafts_boxed, record_draft_boxed).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: Decoded,
        live: bool,
    ) -> anyhow::Result<()> {
        if event.name.starts_with("newsroom.users.") {
            let event = UserEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (user, at) = (meta.aggregate_id, meta.occurred_at());
            match event {
                UserEvent::Updated(e) => {
                    if let Some(on) = e.email_notifications {
                        sqlx::query!(
                            "INSERT INTO notify_subscribers (user_id, email_on) VALUES ($1, $2) \
                             ON CONFLICT (user_id) DO UPDATE SET email_on = EXCLUDED.email_on",
                            user,
                            on,
                        )
                        .execute(&mut **tx)
                        .await
                        .context("recording e-mail preferences")?;
                    }
                    if let Some(categories) = e.followed_categories {
                        let categories: Vec<String> =
                            categories.iter().map(|c| c.as_str().to_owned()).collect();
                        // Unfollowed: the interval ends; entries a publication after its end
                        // made (read before this event) go.
                        let closed: Vec<String> = sqlx::query_scalar!(
                            "UPDATE notify_follows SET until = $3 \
                             WHERE user_id = $1 AND until IS NULL AND NOT (category = ANY($2)) RETURNING category",
                            user,
                            &categories,
                            at,
                        )
                        .fetch_all(&mut **tx)
                        .await
                        .context("closing follows")?;
                        sqlx::query!(
                            "DELETE FROM notify_inbox WHERE user_id = $1 AND category = ANY($2) AND created_at >= $3",
                            user,
                            &closed,
                            at,
                        )
                        .execute(&mut **tx)
                        .await
                        .context("removing notifications after an unfollow")?;
                        let opened: Vec<String> = sqlx::query_scalar!(
                            "INSERT INTO notify_follows (user_id, category, since) \
                             SELECT $1, c, $3 FROM unnest($2::text[]) c WHERE NOT EXISTS \
                             (SELECT 1 FROM notify_follows f WHERE f.user_id = $1 AND f.category = c AND f.until IS NULL) \
                             ON CONFLICT DO NOTHING RETURNING category",
                            user,
                            &categories,
                            at,
                        )
                        .fetch_all(&mut **tx)
                        .await
                        .context("opening follows")?;
                        if !opened.is_empty() {
                            backfill(tx, user, &opened, at, live).await?;
                        }
                    }
                }
                UserEvent::Erased(_) => {
                    for statement in [
                        sqlx::query!("DELETE FROM notify_inbox WHERE user_id = $1", user),
                        sqlx::query!("DELETE FROM notify_follows WHERE user_id = $1", user),
                        sqlx::query!("DELETE FROM notify_subscribers WHERE user_id = $1", user),
                    ] {
                        statement
                            .execute(&mut **tx)
                            .await
                            .context("forgetting an erased user")?;
                    }
                    if live {
                        sqlx::query!(
                            "DELETE FROM email_outbox WHERE user_id = $1 AND sent_at IS NULL",
                            user,
                        )
                        .execute(&mut **tx)
                        .await
                        .context("cancelling an erased user's e-mails")?;
                    }
                }
                _ => {}
            }
        } else if event.name.starts_with("newsroom.news.") {
            let trace = event.trace;
            let event = NewsEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (news, version) = (meta.aggregate_id, meta.aggregate_version);
            match event {
                NewsEvent::Drafted(e) => {
                    sqlx::query!(
                        "INSERT INTO notify_articles (news_id, title, category, version) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT DO NOTHING",
                        news,
                        e.title,
                        e.category.as_str(),
                        version,
                    )
                    .execute(&mut **tx)
                    .await
                    .context("recording an article")?;
                }
                NewsEvent::Edited(e) => {
                    sqlx::query!(
                        "UPDATE notify_articles SET title = COALESCE($3, title), category = COALESCE($4, category), version = $2 \
                         WHERE news_id = $1 AND version < $2",
                        news,
                        version,
                        e.title,
                        e.category.map(|c| c.as_str()),
                    )
                    .execute(&mut **tx)
                    .await
                    .context("recording an edit")?;
                }
                NewsEvent::Published(e) => {
                    let at = chrono::DateTime::from_timestamp_micros(e.published_at)
                        .context("publication time out of range")?;
                    // Only the first publication notifies; the followers whose interval
                    // covers it get one entry each.
                    if live {
                        sqlx::query!(
                        "WITH first AS (UPDATE notify_articles SET published_at = $2 WHERE news_id = $1 AND published_at IS NULL \
                           RETURNING news_id, title, category, published_at), \
                         inbox AS (INSERT INTO notify_inbox (user_id, news_id, title, category, created_at) \
                           SELECT f.user_id, a.news_id, a.title, a.category, a.published_at FROM first a \
                           JOIN notify_follows f ON f.category = a.category AND f.since <= a.published_at \
                             AND (f.until IS NULL OR f.until > a.published_at) \
                           ON CONFLICT DO NOTHING RETURNING user_id, news_id, title, category) \
                         INSERT INTO email_outbox (user_id, news_id, title, category, trace) \
                           SELECT i.user_id, i.news_id, i.title, i.category, $3 FROM inbox i \
                           JOIN notify_subscribers s ON s.user_id = i.user_id AND s.email_on ON CONFLICT DO NOTHING",
                        news,
                        at,
                        // Only the live notifier writes e-mails, with the publication's trace.
                        trace.as_deref(),
                        )
                        .execute(&mut **tx)
                        .await
                    } else {
                        sqlx::query!(
                        "WITH first AS (UPDATE notify_articles SET published_at = $2 WHERE news_id = $1 AND published_at IS NULL \
                           RETURNING news_id, title, category, published_at) \
                         INSERT INTO notify_inbox (user_id, news_id, title, category, created_at) \
                           SELECT f.user_id, a.news_id, a.title, a.category, a.published_at FROM first a \
                           JOIN notify_follows f ON f.category = a.category AND f.since <= a.published_at \
                             AND (f.until IS NULL OR f.until > a.published_at) \
                           ON CONFLICT DO NOTHING",
                        news,
                        at,
                        )
                        .execute(&mut **tx)
                        .await
                    }
                    .context("notifying followers")?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Records created articles in one statement.
async fn record_drafts(
    tx: &mut Transaction<'static, Postgres>,
    run: &[NewsDrafted],
) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = run.iter().map(|e| e.metadata.aggregate_id).collect();
    let titles: Vec<&str> = run.iter().map(|e| e.title.as_str()).collect();
    let categories: Vec<&str> = run.iter().map(|e| e.category.as_str()).collect();
    let versions: Vec<i64> = run.iter().map(|e| e.metadata.aggregate_version).collect();
    sqlx::query!(
        "INSERT INTO notify_articles (news_id, title, category, version) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[]) ON CONFLICT DO NOTHING",
        &ids,
        &titles as &[&str],
        &categories as &[&str],
        &versions,
    )
    .execute(&mut **tx)
    .await
    .context("recording articles")?;
    Ok(())
}

fn record_drafts_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    run: &'a [NewsDrafted],
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(record_drafts(tx, run))
}

fn record_draft_boxed<'a>(
    tx: &'a mut Transaction<'static, Postgres>,
    event: NewsDrafted,
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(async move { record_drafts(tx, std::slice::from_ref(&event)).await })
}
