//! One writer per partition. Command processes share a Kafka consumer group on the
//! `<prefix>.command-owners` topic, which has as many partitions as the aggregate topics:
//! owning its partition `i` makes a process the only writer of `users/i` and `news/i`.
//!
//! The process's one [`writer`] thread holds the state of every owned partition (rebuilt
//! from the latest snapshot and the log when the partition is taken over), decides the
//! commands waiting for any of them one after another, and commits them all in one Kafka
//! transaction that the ownership group's generation fences (ADR 15).

mod membership;
pub mod outcome;
mod rebuild;
mod snapshot;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use newsroom_events::consistency::Position;
use newsroom_events::partition::partition_of;
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use tokio::sync::oneshot;
use uuid::Uuid;

pub use membership::Membership;
/// An aggregate type the writer serves.
pub use writer::Routed as Owned;

use crate::aggregate::Aggregate;
use crate::claims::Claims;
use crate::domain::DomainError;
use crate::forward::Directory;
use crate::keys::Keys;

/// What the writers share.
pub struct Shared {
    /// Kafka settings (topics, timeouts).
    pub kafka: KafkaSettings,
    /// Schema ids.
    pub registry: Registry,
    /// User data keys.
    pub keys: Keys,
    /// E-mail claims.
    pub claims: Claims,
    /// The ownership directory (for forwarding).
    pub directory: Directory,
    /// Partitions of every aggregate topic.
    pub partitions: i32,
    /// The command-side database (snapshots).
    pub pool: sqlx::PgPool,
    /// Where partitions end, counting open transactions (what rebuilds read to).
    pub ends: Arc<newsroom_infra::kafka::PartitionEnds>,
    /// False from the moment a writer finds every broker down until a writer reaches
    /// Kafka again (readiness reports it).
    pub kafka_up: Arc<std::sync::atomic::AtomicBool>,
}

/// Who and what a command comes from.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The request id.
    pub correlation_id: String,
    /// This command's id.
    pub command_id: String,
    /// The caller.
    pub actor_id: Option<Uuid>,
    /// The id the resulting event gets.
    pub event_id: Uuid,
    /// When the command was received.
    pub now: DateTime<Utc>,
    /// Its `Idempotency-Key`, if it has one.
    pub keyed: Option<outcome::Keyed>,
    /// The W3C trace context of the request, when traces are exported: its events carry
    /// it in their record headers.
    pub trace: Option<String>,
}

impl RequestMeta {
    /// Metadata for a command received now.
    pub fn new(correlation_id: String, actor_id: Option<Uuid>) -> Self {
        RequestMeta {
            correlation_id,
            command_id: Uuid::now_v7().to_string(),
            actor_id,
            event_id: Uuid::now_v7(),
            now: Utc::now(),
            keyed: None,
            trace: newsroom_infra::trace::traceparent(&tracing::Span::current()),
        }
    }

    /// Metadata for the command of `req` (with its `Idempotency-Key`).
    pub fn of(req: &actix_web::HttpRequest, actor_id: Option<Uuid>) -> Self {
        use actix_web::HttpMessage as _;
        RequestMeta {
            keyed: req.extensions().get::<outcome::Keyed>().copied(),
            ..RequestMeta::new(newsroom_infra::http::RequestId::of(req), actor_id)
        }
    }
}

/// The state after a committed command and where its event landed.
#[derive(Debug, Clone)]
pub struct Committed<S> {
    /// State after the command.
    pub state: S,
    /// Partition and offset of the event.
    pub position: Position,
}

/// Why a command did not commit. In every case nothing of it is in the log, except
/// where `definitive` is false (a commit whose outcome Kafka did not confirm).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// The aggregate refused it.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Kafka is unreachable, the partition is moving, or the writer was fenced.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// False when the commit's outcome is unknown.
        definitive: bool,
    },
    /// The `Idempotency-Key` was first used with another request.
    #[error("the Idempotency-Key was used with another request")]
    KeyReused,
    /// The key's first request is answered by the outcome recorded at this offset of the
    /// outcomes topic (resolved by [`submit`]; never reaches a handler).
    #[error("recorded at offset {0}")]
    Recorded(i64),
}

impl CommandError {
    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        CommandError::Unavailable {
            reason: reason.into(),
            definitive: true,
        }
    }
}

/// A request to a partition writer.
pub enum Request<A: Aggregate> {
    /// Decide and append.
    Command {
        /// Aggregate id.
        id: Uuid,
        /// The command.
        command: A::Command,
        /// Its metadata.
        meta: RequestMeta,
        /// The answer, sent after the commit.
        reply: oneshot::Sender<Result<Committed<A::State>, CommandError>>,
    },
    /// Read the current state (ordered with the commands).
    Read {
        /// Aggregate id.
        id: Uuid,
        /// The answer.
        reply: oneshot::Sender<Option<A::State>>,
    },
    /// What is recorded for an `Idempotency-Key`: nothing, the offset of its outcome, or
    /// why it cannot run now.
    Recall {
        /// The key.
        keyed: outcome::Keyed,
        /// The answer.
        reply: oneshot::Sender<Option<Result<i64, CommandError>>>,
    },
}

/// A local partition's state as seen by request handlers.
pub enum Slot {
    /// Being taken over (rebuilding).
    Starting,
    /// Served by the writer.
    Ready,
}

/// Where requests for a partition go.
pub enum Route {
    /// This process writes it.
    Local,
    /// This process owns it but is still rebuilding it: retry shortly.
    Starting,
    /// Another process owns it (or nobody, while ownership moves).
    Elsewhere,
}

/// Partition → slot.
pub type Table = RwLock<HashMap<i32, Slot>>;

/// The partitions this process owns, and the writer that serves them.
pub struct Owners {
    table: Table,
    /// The writer.
    pub writer: writer::Writer,
    /// Partitions assigned to this process, each with the number of its assignment, so
    /// that a takeover finishing after a revocation does not serve the partition.
    assigned: std::sync::Mutex<HashMap<i32, u64>>,
    assignments: std::sync::atomic::AtomicU64,
    /// Partitions of the aggregate topics.
    pub partitions: i32,
}

impl Owners {
    /// No partition owned yet.
    pub fn new(partitions: i32, writer: writer::Writer) -> Self {
        Owners {
            table: RwLock::new(HashMap::new()),
            writer,
            assigned: std::sync::Mutex::new(HashMap::new()),
            assignments: std::sync::atomic::AtomicU64::new(0),
            partitions,
        }
    }

    /// Records that the group gave `partition` to this process; the returned number
    /// identifies this assignment.
    pub(crate) fn assign(&self, partition: i32) -> u64 {
        let number = self
            .assignments
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition, number);
        number
    }

    /// Whether assignment `number` of `partition` still holds.
    pub(crate) fn holds(&self, partition: i32, number: u64) -> bool {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            == Some(&number)
    }

    /// The partition of aggregate `id`.
    pub fn partition_of(&self, id: Uuid) -> i32 {
        partition_of(id.as_bytes(), self.partitions)
    }

    /// Where requests for `partition` go.
    pub fn route(&self, partition: i32) -> Route {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match table.get(&partition) {
            Some(Slot::Ready) => Route::Local,
            Some(Slot::Starting) => Route::Starting,
            None => Route::Elsewhere,
        }
    }

    /// Partitions this process serves now.
    pub fn ready(&self) -> Vec<i32> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut ready: Vec<i32> = table
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready))
            .map(|(p, _)| *p)
            .collect();
        ready.sort_unstable();
        ready
    }

    /// Whether every partition this process was given is ready (and it was given any).
    pub fn all_ready(&self) -> bool {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        !table.is_empty() && table.values().all(|s| matches!(s, Slot::Ready))
    }

    fn set(&self, partition: i32, slot: Option<Slot>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(slot) => table.insert(partition, slot),
            None => table.remove(&partition),
        };
    }

    /// A fresh id (UUID v7) for a new aggregate of `A` in a partition this process serves,
    /// if it serves any; otherwise one in any partition.
    pub fn new_id(&self) -> Uuid {
        let local = self.ready();
        if local.is_empty() {
            return Uuid::now_v7();
        }
        loop {
            let id = Uuid::now_v7();
            if local.contains(&self.partition_of(id)) {
                return id;
            }
        }
    }
}

/// Hands a request for aggregate `id` to its local writer and waits for the answer.
async fn ask<A: Owned, T>(
    owners: &Owners,
    id: Uuid,
    request: impl FnOnce(oneshot::Sender<T>) -> Request<A>,
) -> Result<T, Submitted> {
    let stopped = || Submitted::Failed(CommandError::unavailable("the partition writer stopped"));
    let partition = owners.partition_of(id);
    match owners.route(partition) {
        Route::Local => {}
        Route::Starting => {
            return Err(Submitted::Failed(CommandError::unavailable(
                "the partition is being taken over",
            )));
        }
        Route::Elsewhere => return Err(Submitted::NotHere),
    };
    let (reply, answer) = oneshot::channel();
    owners.writer.send(partition, request(reply)).map_err(|_| {
        Submitted::Failed(CommandError::unavailable(
            "the writer's queue is full or it stopped",
        ))
    })?;
    answer.await.map_err(|_| stopped())
}

/// Test-only fault point: milliseconds a keyed command that committed waits before it is
/// answered (where a crash leaves a client without the answer to a command in the log).
const HOLD_ANSWER_VARIABLE: &str = "NEWSROOM_TEST_HOLD_ANSWER_MS";

static HOLD_ANSWER: std::sync::LazyLock<Option<std::time::Duration>> =
    std::sync::LazyLock::new(|| {
        std::env::var(HOLD_ANSWER_VARIABLE)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis)
    });

/// Sends `command` for aggregate `id` to its local writer and waits for the commit.
pub async fn submit<A: Owned>(
    owners: &Owners,
    id: Uuid,
    command: A::Command,
    meta: RequestMeta,
) -> Result<Committed<A::State>, Submitted> {
    let keyed = meta.keyed.is_some();
    let answer = ask::<A, _>(owners, id, |reply| Request::Command {
        id,
        command,
        meta,
        reply,
    })
    .await?;
    if let Some(hold) = *HOLD_ANSWER
        && keyed
        && answer.is_ok()
    {
        tokio::time::sleep(hold).await;
    }
    let Err(CommandError::Recorded(offset)) = answer else {
        return answer.map_err(Submitted::Failed);
    };
    // A retry: answered as the first request was.
    let partition = owners.partition_of(id);
    owners
        .writer
        .recorded::<A>(partition, offset)
        .await
        .map_err(Submitted::Failed)
}

/// The answer recorded for the `Idempotency-Key` of a command on aggregate `id`, if the
/// key's first request was decided already: what a route with effects outside the writer
/// (e-mail claims, password checks, keys) asks before it does anything. `Ok(None)`: run it.
pub async fn recall<A: Owned>(
    owners: &Owners,
    id: Uuid,
    meta: &RequestMeta,
) -> Result<Option<Committed<A::State>>, Submitted> {
    let Some(keyed) = meta.keyed else {
        return Ok(None);
    };
    let known = ask::<A, _>(owners, id, |reply| Request::Recall { keyed, reply }).await?;
    match known {
        None => Ok(None),
        Some(Err(error)) => Err(Submitted::Failed(error)),
        Some(Ok(offset)) => owners
            .writer
            .recorded::<A>(owners.partition_of(id), offset)
            .await
            .map(Some)
            .map_err(Submitted::Failed),
    }
}

/// Reads the current state of aggregate `id` from its local writer.
pub async fn read<A: Owned>(owners: &Owners, id: Uuid) -> Result<Option<A::State>, Submitted> {
    ask::<A, _>(owners, id, |reply| Request::Read { id, reply }).await
}

/// The outcome of handing a request to the local writers.
#[derive(Debug)]
pub enum Submitted {
    /// Another process owns the partition: forward the request.
    NotHere,
    /// The command failed.
    Failed(CommandError),
}

/// How long one step of a takeover that talks to PostgreSQL may take in all: a server that
/// stops answering in the middle of a query (frozen: its statement timeout cannot fire)
/// must fail the step, so that the takeover is retried, instead of leaving the partition
/// unserved. Generous: a large partition's keys and claims take a while on a busy machine.
const TAKEOVER_STEP: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `step` of a takeover within [`TAKEOVER_STEP`].
async fn bounded<T>(
    what: &'static str,
    step: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(TAKEOVER_STEP, step).await {
        Ok(result) => result.context(what),
        Err(_) => anyhow::bail!("{what}: not done within {} s", TAKEOVER_STEP.as_secs()),
    }
}

/// Rebuilds `partition` of both aggregate topics and has the writer serve it.
pub(crate) async fn take_over(
    shared: Arc<Shared>,
    owners: Arc<Owners>,
    partition: i32,
    assignment: u64,
) -> anyhow::Result<()> {
    {
        let assigned = owners.assigned.lock().unwrap_or_else(|e| e.into_inner());
        if assigned.get(&partition) != Some(&assignment) {
            return Ok(());
        }
        owners.set(partition, Some(Slot::Starting));
    }
    bounded(
        "loading the partition's token keys",
        shared.keys.load_partition(partition),
    )
    .await?;
    let still_owned: writer::StillOwned = {
        let owners = owners.clone();
        Arc::new(move || owners.holds(partition, assignment))
    };
    // The directory points here before anything is served, so that forwarded requests
    // find this process as soon as it serves.
    bounded(
        "announcing the partition",
        shared.directory.announce(partition),
    )
    .await?;
    let Some(user_states) = owners.writer.take(partition, still_owned).await? else {
        tracing::info!(partition, "revoked during its takeover; not serving it");
        return Ok(());
    };
    bounded(
        "reconciling the partition's e-mail claims",
        shared
            .claims
            .reconcile(partition, &user_states, &shared.keys),
    )
    .await?;
    drop(user_states);
    {
        // Checked and published under the assignment lock: a revocation that came during
        // the takeover wins (and removed the partition from the writer).
        let assigned = owners.assigned.lock().unwrap_or_else(|e| e.into_inner());
        if assigned.get(&partition) != Some(&assignment) {
            tracing::info!(partition, "revoked during its takeover; not serving it");
            return Ok(());
        }
        owners.set(partition, Some(Slot::Ready));
    }
    newsroom_infra::metrics::PARTITIONS_OWNED.set(owners.ready().len() as i64);
    tracing::info!(partition, "partition taken over");
    Ok(())
}

/// Stops serving `partitions`: new requests go elsewhere, and once this returns no
/// transaction of this process holds or will hold records of them. All of them are
/// withdrawn before the one wait for the transaction in flight (a wait per partition held
/// the rebalance, and so the group, for as many times longer when that transaction hung).
pub(crate) fn give_up(owners: &Owners, partitions: &[i32]) {
    let mut assigned = owners.assigned.lock().unwrap_or_else(|e| e.into_inner());
    for partition in partitions {
        assigned.remove(partition);
        owners.set(*partition, None);
    }
    drop(assigned);
    owners.writer.remove(partitions);
    newsroom_infra::metrics::PARTITIONS_OWNED.set(owners.ready().len() as i64);
}
