//! Snapshots of a partition writer's state in `cmd_snapshots`: the state of every
//! aggregate of the partition and the offset the rest of the log starts at. Taken every
//! so many events (and at once after an erasure), written off the command path; a newer
//! snapshot is never overwritten by an older one.

use std::collections::HashMap;

use anyhow::Context as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::aggregate::Aggregate;

/// Loads the latest snapshot of `partition`: the states and the offset to go on from.
pub async fn load<A: Aggregate>(
    pool: &PgPool,
    partition: i32,
) -> anyhow::Result<Option<(HashMap<Uuid, A::State>, i64)>> {
    let row = sqlx::query!(
        "SELECT next_offset, state FROM cmd_snapshots WHERE stream = $1 AND partition = $2",
        A::STREAM.name(),
        partition,
    )
    .fetch_optional(pool)
    .await
    .context("reading a snapshot")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (next_offset, bytes) = (row.next_offset, row.state);
    let states =
        tokio::task::spawn_blocking(move || serde_json::from_slice::<Vec<A::State>>(&bytes))
            .await?
            .context("decoding a snapshot")?;
    Ok(Some((
        states.into_iter().map(|s| (A::id(&s), s)).collect(),
        next_offset,
    )))
}

/// Drops the snapshot of `partition` if it was taken before `next_offset` (the partition
/// is then rebuilt from the log's start at its next takeover).
pub async fn drop_older<A: Aggregate>(
    pool: &PgPool,
    partition: i32,
    next_offset: i64,
) -> anyhow::Result<()> {
    sqlx::query!(
        "DELETE FROM cmd_snapshots WHERE stream = $1 AND partition = $2 AND next_offset < $3",
        A::STREAM.name(),
        partition,
        next_offset,
    )
    .execute(pool)
    .await
    .context("dropping a snapshot")?;
    Ok(())
}

/// Stores `states` as the snapshot of `partition` up to `next_offset` (unless a newer one
/// is there).
pub async fn save<A: Aggregate>(
    pool: &PgPool,
    partition: i32,
    states: Vec<A::State>,
    next_offset: i64,
) -> anyhow::Result<()> {
    let count = states.len() as i32;
    let bytes = tokio::task::spawn_blocking(move || serde_json::to_vec(&states))
        .await?
        .context("encoding a snapshot")?;
    sqlx::query!(
        "INSERT INTO cmd_snapshots (stream, partition, next_offset, aggregates, state) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (stream, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
         aggregates = EXCLUDED.aggregates, state = EXCLUDED.state, taken_at = now() \
         WHERE cmd_snapshots.next_offset < EXCLUDED.next_offset",
        A::STREAM.name(),
        partition,
        next_offset,
        count,
        bytes,
    )
    .execute(pool)
    .await
    .context("writing a snapshot")?;
    tracing::debug!(
        stream = A::STREAM.name(),
        partition,
        next_offset,
        aggregates = count,
        "snapshot taken"
    );
    Ok(())
}
