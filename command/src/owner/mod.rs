//! One writer per partition. Command processes share a Kafka consumer group on the
//! `<prefix>.command-owners` topic, which has as many partitions as the aggregate topics:
//! owning its partition `i` makes a process the only writer of `users/i` and `news/i`.
//!
//! For each owned partition a [`writer`] task holds a transactional producer whose
//! `transactional.id` is the partition's own (`<prefix>.cmd.<stream>.<i>`), so that a new
//! owner's `init_transactions` fences the previous one; it rebuilds the partition's state
//! from the log, then applies commands one after another and commits them in batches.

mod membership;
mod rebuild;
mod snapshot;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use newsroom_events::consistency::Position;
use newsroom_events::partition::partition_of;
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

pub use membership::Membership;

use crate::aggregate::{Aggregate, NewsAggregate, UserAggregate};
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
}

/// A local partition writer's state as seen by request handlers.
pub enum Slot<A: Aggregate> {
    /// Being taken over (connecting, rebuilding).
    Starting,
    /// Serving through this queue.
    Ready(mpsc::Sender<Request<A>>),
}

/// Where requests for a partition go.
pub enum Route<A: Aggregate> {
    /// This process writes it.
    Local(mpsc::Sender<Request<A>>),
    /// This process owns it but is still rebuilding it: retry shortly.
    Starting,
    /// Another process owns it (or nobody, while ownership moves).
    Elsewhere,
}

/// Partition → slot, per aggregate type.
pub type Table<A> = RwLock<HashMap<i32, Slot<A>>>;

/// The partitions this process owns, per aggregate type.
pub struct Owners {
    users: Table<UserAggregate>,
    news: Table<NewsAggregate>,
    /// Partitions assigned to this process, each with the number of its assignment, so
    /// that a takeover finishing after a revocation does not serve the partition.
    assigned: std::sync::Mutex<HashMap<i32, u64>>,
    assignments: std::sync::atomic::AtomicU64,
    /// Partitions of the aggregate topics.
    pub partitions: i32,
}

/// Gives the owners table of an aggregate type.
pub trait Owned: Aggregate + Sized {
    /// The table.
    fn table(owners: &Owners) -> &Table<Self>;
}

impl Owned for UserAggregate {
    fn table(owners: &Owners) -> &Table<Self> {
        &owners.users
    }
}

impl Owned for NewsAggregate {
    fn table(owners: &Owners) -> &Table<Self> {
        &owners.news
    }
}

impl Owners {
    /// No partition owned yet.
    pub fn new(partitions: i32) -> Self {
        Owners {
            users: RwLock::new(HashMap::new()),
            news: RwLock::new(HashMap::new()),
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

    /// Where requests for `partition` of `A` go.
    pub fn route<A: Owned>(&self, partition: i32) -> Route<A> {
        let table = A::table(self).read().unwrap_or_else(|e| e.into_inner());
        match table.get(&partition) {
            Some(Slot::Ready(sender)) if !sender.is_closed() => Route::Local(sender.clone()),
            Some(Slot::Starting) => Route::Starting,
            _ => Route::Elsewhere,
        }
    }

    /// Partitions of `A` this process serves now.
    pub fn ready<A: Owned>(&self) -> Vec<i32> {
        let table = A::table(self).read().unwrap_or_else(|e| e.into_inner());
        let mut ready: Vec<i32> = table
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready(s) if !s.is_closed()))
            .map(|(p, _)| *p)
            .collect();
        ready.sort_unstable();
        ready
    }

    /// Whether every partition this process was given is ready (and it was given any).
    pub fn all_ready(&self) -> bool {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        let news = self.news.read().unwrap_or_else(|e| e.into_inner());
        !users.is_empty()
            && users.values().all(|s| matches!(s, Slot::Ready(_)))
            && news.values().all(|s| matches!(s, Slot::Ready(_)))
    }

    fn set<A: Owned>(&self, partition: i32, slot: Option<Slot<A>>) {
        let mut table = A::table(self).write().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(slot) => table.insert(partition, slot),
            None => table.remove(&partition),
        };
    }

    /// A fresh id (UUID v7) for a new aggregate of `A` in a partition this process serves,
    /// if it serves any; otherwise one in any partition.
    pub fn new_id<A: Owned>(&self) -> Uuid {
        let local = self.ready::<A>();
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
    let sender = match owners.route::<A>(owners.partition_of(id)) {
        Route::Local(sender) => sender,
        Route::Starting => {
            return Err(Submitted::Failed(CommandError::unavailable(
                "the partition is being taken over",
            )));
        }
        Route::Elsewhere => return Err(Submitted::NotHere),
    };
    let (reply, answer) = oneshot::channel();
    sender.send(request(reply)).await.map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())
}

/// Sends `command` for aggregate `id` to its local writer and waits for the commit.
pub async fn submit<A: Owned>(
    owners: &Owners,
    id: Uuid,
    command: A::Command,
    meta: RequestMeta,
) -> Result<Committed<A::State>, Submitted> {
    ask::<A, _>(owners, id, |reply| Request::Command {
        id,
        command,
        meta,
        reply,
    })
    .await?
    .map_err(Submitted::Failed)
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

/// Starts writers for `partition` of both aggregate types.
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
        owners.set::<UserAggregate>(partition, Some(Slot::Starting));
        owners.set::<NewsAggregate>(partition, Some(Slot::Starting));
    }
    shared.keys.load_partition(partition).await?;
    let still_owned: writer::StillOwned = {
        let owners = owners.clone();
        Arc::new(move || owners.holds(partition, assignment))
    };
    // Each start fences the partition's previous writer: do not start after a revocation.
    anyhow::ensure!(still_owned(), "revoked before its takeover");
    let (users, user_states) =
        writer::start::<UserAggregate>(shared.clone(), partition, still_owned.clone()).await?;
    anyhow::ensure!(still_owned(), "revoked during its takeover");
    let (news, _) = writer::start::<NewsAggregate>(shared.clone(), partition, still_owned).await?;
    shared
        .claims
        .reconcile(partition, &user_states, &shared.keys)
        .await?;
    drop(user_states);
    {
        // Checked and published under the assignment lock: a revocation that came during
        // the takeover wins, and the writers just started are dropped (they stop).
        let assigned = owners.assigned.lock().unwrap_or_else(|e| e.into_inner());
        if assigned.get(&partition) != Some(&assignment) {
            tracing::info!(partition, "revoked during its takeover; not serving it");
            return Ok(());
        }
        owners.set::<UserAggregate>(partition, Some(Slot::Ready(users)));
        owners.set::<NewsAggregate>(partition, Some(Slot::Ready(news)));
    }
    shared.directory.announce(partition).await?;
    newsroom_infra::metrics::PARTITIONS_OWNED.set(owners.ready::<UserAggregate>().len() as i64);
    tracing::info!(partition, "partition taken over");
    Ok(())
}

/// Stops serving `partition`: new requests go elsewhere; writers finish their batch.
pub(crate) fn give_up(owners: &Owners, partition: i32) {
    let mut assigned = owners.assigned.lock().unwrap_or_else(|e| e.into_inner());
    assigned.remove(&partition);
    owners.set::<UserAggregate>(partition, None);
    owners.set::<NewsAggregate>(partition, None);
    drop(assigned);
    newsroom_infra::metrics::PARTITIONS_OWNED.set(owners.ready::<UserAggregate>().len() as i64);
}
