//! PostgreSQL connection pools.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::settings::PostgresSettings;

/// Opens a pool; fails if the database does not answer within a few seconds.
pub async fn connect(settings: &PostgresSettings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&settings.url)
        .await
        .context("connecting to PostgreSQL")
}

/// Applies every migration of `infra/migrations` (read models and command-side tables).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(pool)
        .await
        .context("applying the database migrations")?;
    Ok(())
}
