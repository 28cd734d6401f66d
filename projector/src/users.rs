//! The `users` read model.

use anyhow::Context as _;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec::Decoded;
use sqlx::{Postgres, Transaction};

use crate::consumer::Projection;

/// Projects User events into the `users` table.
pub struct UsersProjection;

impl Projection for UsersProjection {
    fn name(&self) -> &'static str {
        "users"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: Decoded,
    ) -> anyhow::Result<()> {
        {
            let event = UserEvent::from_avro(&event.name, event.value)?;
            match event {
                UserEvent::Registered(e) => {
                    let at = e.metadata.occurred_at();
                    // Guarded by version: a redelivered or replayed event changes nothing.
                    sqlx::query(
                        "INSERT INTO users (id, name, email, role, version, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $6) \
                         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, \
                         role = EXCLUDED.role, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at \
                         WHERE users.version < EXCLUDED.version",
                    )
                    .bind(e.metadata.aggregate_id)
                    .bind(&e.name)
                    .bind(&e.email)
                    .bind(e.role.as_str())
                    .bind(e.metadata.aggregate_version)
                    .bind(at)
                    .execute(&mut **tx)
                    .await
                    .context("projecting UserRegistered")?;
                }
            }
            Ok(())
        }
    }
}
