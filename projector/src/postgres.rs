//! PostgreSQL read models. Each projection's tables live in the schema
//! `<projection>_v<version>`; the query side reads the active version through views in
//! `public` (ADR 8). A batch is one transaction: the projection's rows, then the offsets,
//! moved only if they still hold what this consumer started from.

use std::future::Future;

use anyhow::Context as _;
use futures::future::BoxFuture;
use newsroom_infra::codec::Decoded;
use sqlx::{PgPool, Postgres, Transaction};

use crate::consumer::{Batch, Committed, Failure, Mode, Offsets, Store};

/// A read model in PostgreSQL fed from one topic.
pub trait Projection: Send + Sync {
    /// Name under which its versions, offsets and dead letters are kept.
    fn name(&self) -> &'static str;
    /// The topics it consumes (full names).
    fn topics(&self) -> Vec<String>;
    /// Applies one decoded event inside the batch's transaction (whose `search_path`
    /// starts with the version's schema). `live` is false while a replay builds a new
    /// version: side effects (e-mail) must not be scheduled then.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        event: Decoded,
        live: bool,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// Whether the live projection schedules side effects (e-mail) with its rows; if so its
    /// commits wait for the disk (see `commit`).
    fn side_effects(&self) -> bool {
        false
    }

    /// Applies a batch's events in order; on failure, the index of the event to blame.
    /// The default applies them one by one; a projection may write runs of events with
    /// one statement, as long as it blames the right event when one fails.
    fn apply_all<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Postgres>,
        events: Vec<Decoded>,
        live: bool,
    ) -> impl Future<Output = Result<(), (usize, anyhow::Error)>> + Send + 'a
    where
        Self: Sized,
    {
        async move {
            for (index, event) in events.into_iter().enumerate() {
                self.apply(tx, event, live).await.map_err(|e| (index, e))?;
            }
            Ok(())
        }
    }
}

/// Runs `bulk` (one statement for a run of events) under a savepoint; if the database
/// refuses it, rolls it back and applies the run's events one by one with `single`, so
/// that the event to blame is found.
pub async fn bulk_or_each<T, B, S>(
    tx: &mut Transaction<'static, Postgres>,
    run: Vec<T>,
    first_index: usize,
    bulk: B,
    single: S,
) -> Result<(), (usize, anyhow::Error)>
where
    B: for<'a> FnOnce(
        &'a mut Transaction<'static, Postgres>,
        &'a [T],
    ) -> BoxFuture<'a, anyhow::Result<()>>,
    S: for<'a> Fn(&'a mut Transaction<'static, Postgres>, T) -> BoxFuture<'a, anyhow::Result<()>>,
{
    if run.len() == 1 {
        let item = run.into_iter().next().expect("one item");
        return single(tx, item).await.map_err(|e| (first_index, e));
    }
    sqlx::query!("SAVEPOINT bulk")
        .execute(&mut **tx)
        .await
        .map_err(|e| (first_index, e.into()))?;
    match bulk(tx, &run).await {
        Ok(()) => {
            sqlx::query!("RELEASE SAVEPOINT bulk")
                .execute(&mut **tx)
                .await
                .map_err(|e| (first_index, e.into()))?;
            Ok(())
        }
        Err(e)
            if !matches!(
                e.downcast_ref::<sqlx::Error>(),
                Some(sqlx::Error::Database(_))
            ) =>
        {
            Err((first_index, e))
        }
        Err(_) => {
            sqlx::query!("ROLLBACK TO SAVEPOINT bulk")
                .execute(&mut **tx)
                .await
                .map_err(|e| (first_index, e.into()))?;
            for (offset, item) in run.into_iter().enumerate() {
                single(tx, item)
                    .await
                    .map_err(|e| (first_index + offset, e))?;
            }
            Ok(())
        }
    }
}

/// `items` as PostgreSQL's text input of a `text[]` (`{"a","b \"c\""}`): every element
/// quoted, backslashes and double quotes escaped, so that braces, commas, spaces and the
/// word NULL are read back as the text they are.
pub fn text_array(items: &[String]) -> String {
    let mut out = String::with_capacity(2 + items.iter().map(|i| i.len() + 3).sum::<usize>());
    out.push('{');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The schema holding `version` of `projection`'s tables.
pub fn schema(projection: &str, version: i32) -> String {
    format!("{projection}_v{version}")
}

/// A projection writing to PostgreSQL.
pub struct Tables<P> {
    projection: P,
    pool: PgPool,
}

impl<P: Projection> Tables<P> {
    /// `projection` over `pool`.
    pub fn new(projection: P, pool: PgPool) -> Self {
        Tables { projection, pool }
    }

    /// The database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Classifies an error of an event's statements: the database refusing the statement is
/// the event's fault; losing the connection is an outage.
fn blame(index: usize, error: anyhow::Error) -> Failure {
    match error.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(_)) | None => Failure::Event { index, error },
        Some(_) => Failure::Outage(error),
    }
}

fn outage(error: sqlx::Error) -> Failure {
    Failure::Outage(error.into())
}

/// The state of a projection's versions.
struct Versions {
    active: i32,
    building: Option<i32>,
    switching: bool,
}

/// Reads the state of `projection`'s versions; `share`: sharing its row, which a replay's
/// switch updates, so that a batch that reads it inside its transaction keeps out of the
/// switch.
async fn versions(
    db: impl sqlx::PgExecutor<'_>,
    projection: &str,
    share: bool,
) -> Result<Versions, sqlx::Error> {
    if share {
        sqlx::query_as!(
            Versions,
            r#"SELECT active, building, coalesce(switching_until > now(), false) AS "switching!"
               FROM projection_versions WHERE projection = $1 FOR SHARE"#,
            projection
        )
        .fetch_one(db)
        .await
    } else {
        sqlx::query_as!(
            Versions,
            r#"SELECT active, building, coalesce(switching_until > now(), false) AS "switching!"
               FROM projection_versions WHERE projection = $1"#,
            projection
        )
        .fetch_one(db)
        .await
    }
}

impl<P: Projection> Store for Tables<P> {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn topics(&self) -> Vec<String> {
        self.projection.topics()
    }

    async fn open(&self, mode: Mode) -> anyhow::Result<(i32, Offsets)> {
        let versions = versions(&self.pool, self.name(), false)
            .await
            .with_context(|| format!("reading the versions of {}", self.name()))?;
        let version = match mode {
            Mode::Live => versions.active,
            Mode::Replay(v) => {
                anyhow::ensure!(
                    versions.building == Some(v),
                    "version {v} of {} is no longer being built",
                    self.name()
                );
                v
            }
        };
        let rows = sqlx::query!(
            "SELECT topic, partition, next_offset FROM projection_offsets WHERE projection = $1 AND version = $2",
            self.name(),
            version,
        )
        .fetch_all(&self.pool)
        .await
        .context("reading stored offsets")?;
        Ok((
            version,
            rows.into_iter()
                .map(|row| ((row.topic, row.partition), row.next_offset))
                .collect(),
        ))
    }

    async fn commit(
        &self,
        mode: Mode,
        version: i32,
        batch: Batch<'_>,
    ) -> Result<Committed, Failure> {
        let Batch {
            events, from, to, ..
        } = batch;
        if events.is_empty() && from == to {
            return Ok(Committed::Done);
        }
        let name = self.name();
        let mut tx = self.pool.begin().await.map_err(outage)?;
        let versions = versions(&mut *tx, name, true).await.map_err(outage)?;
        match mode {
            Mode::Live if versions.active != version => return Ok(Committed::Reopen),
            Mode::Live if versions.switching => return Ok(Committed::Paused),
            Mode::Replay(v) if versions.building != Some(v) => return Ok(Committed::Reopen),
            _ => {}
        }
        // The schema name is built from the projection's static name and a number.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}, public",
            schema(name, version)
        )))
        .execute(&mut *tx)
        .await
        .map_err(outage)?;
        // A read model is rebuilt from the log: if PostgreSQL crashes right after a commit
        // that was not yet on disk, the rows and the offsets are lost together and the
        // batch is applied again. So commits need not wait for the disk — except those
        // that schedule e-mails, which must not be scheduled twice.
        if !(mode == Mode::Live && self.projection.side_effects()) {
            sqlx::query!("SET LOCAL synchronous_commit TO off")
                .execute(&mut *tx)
                .await
                .map_err(outage)?;
        }
        if let Err((index, e)) = self
            .projection
            .apply_all(&mut tx, events, mode == Mode::Live)
            .await
        {
            return Err(blame(index, e));
        }
        for ((topic, partition), next) in to {
            let moved = match from.get(&(topic.clone(), *partition)) {
                Some(previous) if previous == next => continue,
                Some(previous) => sqlx::query!(
                    "UPDATE projection_offsets SET next_offset = $5, updated_at = now() \
                     WHERE projection = $1 AND version = $2 AND topic = $3 AND partition = $4 AND next_offset = $6",
                    name,
                    version,
                    topic,
                    partition,
                    next,
                    previous,
                )
                .execute(&mut *tx)
                .await,
                None => sqlx::query!(
                    "INSERT INTO projection_offsets (projection, version, topic, partition, next_offset) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    name,
                    version,
                    topic,
                    partition,
                    next,
                )
                .execute(&mut *tx)
                .await,
            }
            .map_err(outage)?
            .rows_affected();
            if moved == 0 {
                tracing::warn!(
                    projection = name,
                    %topic,
                    partition,
                    "stored offsets moved under this consumer (another instance?)"
                );
                return Ok(Committed::Reopen);
            }
        }
        tx.commit().await.map_err(outage)?;
        Ok(Committed::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::text_array;

    #[test]
    fn an_array_literal_quotes_every_element_and_escapes_quotes_and_backslashes() {
        let items = [
            "plain",
            "two words",
            "NULL",
            "a,b{c}",
            r#"say "hi""#,
            r"back\slash",
        ]
        .map(str::to_owned);
        assert_eq!(
            text_array(&items),
            r#"{"plain","two words","NULL","a,b{c}","say \"hi\"","back\\slash"}"#
        );
        assert_eq!(text_array(&[]), "{}");
    }
}
