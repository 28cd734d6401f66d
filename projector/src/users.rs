//! The `users` read model. Personal fields are decrypted with the user's key from
//! `cmd_user_keys`; once the key is destroyed they read as empty, and `UserErased`
//! clears the row's personal data for good.

use anyhow::Context as _;
use newsroom_events::personal::{self, Personal, UserKey};
use newsroom_events::users::UserEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::postgres::Projection;

/// Projects User events into the `users` table.
pub struct UsersProjection {
    /// The topic it reads.
    pub topic: String,
}

/// Decrypts a user's personal data with their key (empty once the key is destroyed).
pub(crate) async fn open<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user: Uuid,
    blob: &[u8],
) -> anyhow::Result<Personal> {
    let key = sqlx::query_scalar!("SELECT key FROM cmd_user_keys WHERE user_id = $1", user)
        .fetch_optional(db)
        .await
        .context("reading a user key")?;
    Ok(key
        .and_then(|bytes| UserKey::from_slice(&bytes))
        .and_then(|key| personal::open(&key, user, blob).ok())
        .unwrap_or_default())
}

impl Projection for UsersProjection {
    fn name(&self) -> &'static str {
        "users"
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
        let event = UserEvent::from_avro(&event.name, event.value)?;
        let meta = event.metadata().clone();
        let (id, version, at) = (
            meta.aggregate_id,
            meta.aggregate_version,
            meta.occurred_at(),
        );
        let erased = matches!(event, UserEvent::Erased(_));
        // Every write is guarded by version: a redelivered or replayed event changes nothing.
        let query = match event {
            UserEvent::Registered(e) => {
                let p = open(&mut **tx, id, &e.personal).await?;
                sqlx::query!(
                    "INSERT INTO users (id, name, email, role, version, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (id) DO NOTHING",
                    id,
                    p.name.unwrap_or_default(),
                    p.email.unwrap_or_default(),
                    e.role.as_str(),
                    version,
                    at,
                )
            }
            UserEvent::Updated(e) => {
                let p = match &e.personal {
                    Some(blob) => open(&mut **tx, id, blob).await?,
                    None => Personal::default(),
                };
                let categories: Option<Vec<String>> = e
                    .followed_categories
                    .map(|cs| cs.iter().map(|c| c.as_str().to_owned()).collect());
                sqlx::query!(
                    "UPDATE users SET name = COALESCE($3, name), email = COALESCE($4, email), \
                     followed_categories = COALESCE($5, followed_categories), \
                     email_notifications = COALESCE($6, email_notifications), version = $2, updated_at = $7 \
                     WHERE id = $1 AND version < $2",
                    id,
                    version,
                    p.name,
                    p.email,
                    categories.as_deref(),
                    e.email_notifications,
                    at,
                )
            }
            UserEvent::RoleChanged(e) => sqlx::query!(
                "UPDATE users SET role = $3, version = $2, updated_at = $4 WHERE id = $1 AND version < $2",
                id,
                version,
                e.role.as_str(),
                at,
            ),
            UserEvent::PasswordChanged(_) => sqlx::query!(
                "UPDATE users SET version = $2, updated_at = $3 WHERE id = $1 AND version < $2",
                id,
                version,
                at,
            ),
            UserEvent::NotificationsRead(e) => sqlx::query!(
                "UPDATE users SET notifications_read_at = $3, version = $2, updated_at = $4 \
                 WHERE id = $1 AND version < $2",
                id,
                version,
                chrono::DateTime::from_timestamp_micros(e.read_at),
                at,
            ),
            UserEvent::Erased(_) => sqlx::query!(
                "UPDATE users SET erased = true, name = '', email = '', version = $2, updated_at = $3 \
                 WHERE id = $1 AND version < $2",
                id,
                version,
                at,
            ),
        };
        query
            .execute(&mut **tx)
            .await
            .context("projecting a user event")?;
        if erased {
            // Their reads stay counted, anonymously; their history goes.
            sqlx::query!("DELETE FROM reading_history WHERE user_id = $1", id)
                .execute(&mut **tx)
                .await
                .context("removing an erased user's history")?;
        }
        Ok(())
    }
}
