//! PostgreSQL connection pools.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::settings::PostgresSettings;

/// Opens a pool whose connections cancel any statement that runs past the settings'
/// statement timeout; fails if the database does not answer within a few seconds.
pub async fn connect(settings: &PostgresSettings) -> anyhow::Result<PgPool> {
    pool_options(settings)
        .connect_with(connect_options(settings)?)
        .await
        .context("connecting to PostgreSQL")
}

/// [`connect`] for a serving role, which may start before its database: while PostgreSQL
/// cannot be reached (or is still starting), tries again every second for up to the
/// settings' startup wait, saying so every 10 s. A wrong URL, password or database name
/// fails at once.
pub async fn connect_waiting(settings: &PostgresSettings) -> anyhow::Result<PgPool> {
    let options = connect_options(settings)?;
    let started = std::time::Instant::now();
    let wait = Duration::from_secs(settings.startup_wait_secs);
    let mut said: Option<std::time::Instant> = None;
    loop {
        let error = match pool_options(settings).connect_with(options.clone()).await {
            Ok(pool) => {
                if said.is_some() {
                    tracing::info!("PostgreSQL answers; starting");
                }
                return Ok(pool);
            }
            Err(error) => error,
        };
        if !unreachable(&error) {
            return Err(anyhow::Error::new(error).context("connecting to PostgreSQL"));
        }
        if started.elapsed() >= wait {
            return Err(anyhow::Error::new(error).context(format!(
                "PostgreSQL could not be reached within {} s",
                wait.as_secs()
            )));
        }
        if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(
                error = %error,
                waited_s = started.elapsed().as_secs(),
                wait_s = wait.as_secs(),
                "PostgreSQL cannot be reached yet; waiting for it"
            );
            said = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `error` says the server cannot be reached or is not ready yet (not that
/// newsroom is misconfigured).
fn unreachable(error: &sqlx::Error) -> bool {
    match error {
        // A connection closed in the middle of the handshake reads as a protocol error.
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // Starting up, shutting down, or too many connections for now.
        sqlx::Error::Database(e) => {
            matches!(e.code().as_deref(), Some("57P03" | "57P01" | "53300"))
        }
        _ => false,
    }
}

fn pool_options(settings: &PostgresSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(3))
}

/// The URL's options, with the statement timeout (sent even when 0, so that 0 means no
/// limit whatever the role or server default).
fn connect_options(settings: &PostgresSettings) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(&settings.url)
        .context("reading the database URL")?
        .options([(
            "statement_timeout",
            settings.statement_timeout_ms.to_string(),
        )]))
}

/// Applies every migration of `infra/migrations` (read models and command-side tables), on
/// a connection of its own without the statement timeout (an index built on a large read
/// model may take longer), which is closed afterwards.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    // Opened with the limit lifted (the later option wins): a SET after connecting would
    // itself be bound by the limit, and a tight one cancels it on a busy server.
    use sqlx::Connection as _;
    let options = (*pool.connect_options())
        .clone()
        .options([("statement_timeout", "0")]);
    let mut connection = sqlx::PgConnection::connect_with(&options)
        .await
        .context("connecting to migrate")?;
    sqlx::migrate!("./migrations")
        .run(&mut connection)
        .await
        .context("applying the database migrations")?;
    connection.close().await.ok();
    Ok(())
}

/// Binds the database to the deployment's topic prefix on first use, and refuses a
/// database that belongs to another prefix (its read models, claims, keys and snapshots
/// came from other topics).
pub async fn check_deployment(pool: &PgPool, topic_prefix: &str) -> anyhow::Result<()> {
    sqlx::query!(
        "INSERT INTO deployment (topic_prefix) VALUES ($1) ON CONFLICT (only_row) DO NOTHING",
        topic_prefix,
    )
    .execute(pool)
    .await
    .context("recording the deployment")?;
    let owner = sqlx::query_scalar!("SELECT topic_prefix FROM deployment")
        .fetch_one(pool)
        .await
        .context("reading the deployment")?;
    anyhow::ensure!(
        owner == topic_prefix,
        "this database belongs to topic prefix '{owner}', not '{topic_prefix}': use one database per deployment"
    );
    Ok(())
}

/// Creates database `name` (letters, digits, `_` only) on the server of `admin_url` and
/// returns `admin_url` naming it instead: a throwaway database for a test or benchmark.
pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    use sqlx::Connection as _;
    anyhow::ensure!(
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "not a plain database name: {name}"
    );
    // The connection parameters after `?` (TLS ones among them) stay.
    let (path, query) = match admin_url.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (admin_url, String::new()),
    };
    let Some((base, _)) = path
        .rsplit_once('/')
        .filter(|(base, _)| base.contains("://") && !base.ends_with('/'))
    else {
        anyhow::bail!("the database URL has no database name");
    };
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    Ok(format!("{base}/{name}{query}"))
}

/// Drops database `name` (made by [`create_database`]), closing its connections.
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    anyhow::ensure!(
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "not a plain database name: {name}"
    );
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL")?;
    // FORCE cannot end a session of another role, such as an autovacuum worker that
    // happens to be on the database: those end by themselves (one on a table of a million
    // rows takes a while), so try again for up to a minute.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        match dropped {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await
            }
            Err(e) => return Err(e).with_context(|| format!("dropping database {name}")),
        }
    }
}
