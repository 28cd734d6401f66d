//! The process's one writer: a thread with one transactional producer that holds the
//! state of every partition this process owns, decides the commands waiting for any of
//! them one after another, and commits everything it decided in one Kafka transaction
//! (ADR 15).
//!
//! Zombie fencing is the ownership group's: every transaction also commits an offset of
//! the ownership topic with the group metadata of this process's ownership consumer
//! (KIP-447), so the group coordinator refuses the transaction of a process that is no
//! longer a member of the current generation, and it aborts. A live process that hands a
//! partition over (a cooperative revocation) removes it from the writer before its
//! revocation returns, which waits for the transaction in flight.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use newsroom_events::EventMetadata;
use newsroom_events::consistency::Position;
use newsroom_events::metadata::micros;
use newsroom_infra::kafka::{Stream, outcomes_topic, ownership_topic, transactional_producer};
use newsroom_infra::metrics::APPENDS;
use newsroom_infra::producer::{self, Delivery, Record};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::outcome::{self, Keyed, Outcome, Recent};
use super::{CommandError, Committed, Request, Shared, rebuild, snapshot};
use crate::aggregate::{Aggregate, NewsAggregate, UserAggregate};
use crate::domain::Stamp;

/// Commands taken into one transaction at most.
const MAX_BATCH: usize = 4000;
/// The longest a batch waits for the commands it expects.
const GATHER_MAX: Duration = Duration::from_millis(3);
/// Requests waiting for the writer before new ones are refused.
const QUEUE: usize = 16_384;
/// Further waits for a commit that timed out (each one Kafka timeout) before its outcome
/// counts as unknown.
const COMMIT_RESUMES: usize = 2;
/// Pause between attempts to reach Kafka again.
const RECOVERY_PAUSE: Duration = Duration::from_millis(250);
/// Test-only fault point: milliseconds each transaction waits after it began, with its
/// commands decided and nothing produced yet (where a frozen zombie is, for fencing tests).
const HOLD_VARIABLE: &str = "NEWSROOM_TEST_HOLD_TRANSACTION_MS";
/// Test-only fault: when set, a committed transaction that recorded outcomes of keyed
/// commands is treated as one whose commit Kafka did not confirm (503, outcome unknown).
const UNCERTAIN_VARIABLE: &str = "NEWSROOM_TEST_UNCERTAIN_KEYED";

type Producer = producer::Producer<WriterContext>;

/// The ownership consumer's group metadata (member id and generation), read at each
/// transaction; `None` while this process is not a member.
pub type GroupMetadata = Arc<dyn Fn() -> Option<Arc<ConsumerGroupMetadata>> + Send + Sync>;

/// The group metadata of `consumer` as the writer must see it: read between two reads of
/// the membership that agree, and only while the consumer is a member. A reset membership
/// (no member id, generation -1, as librdkafka holds it after the coordinator forgot the
/// member) passes the coordinator's checks, so it is never handed out.
pub fn group_metadata_of<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: Arc<rdkafka::consumer::StreamConsumer<C>>,
) -> GroupMetadata {
    use rdkafka::consumer::Consumer as _;
    Arc::new(move || {
        let before = newsroom_infra::kafka::group_membership(consumer.client())?;
        let metadata = consumer.group_metadata()?;
        let after = newsroom_infra::kafka::group_membership(consumer.client())?;
        (before == after).then(|| Arc::new(metadata))
    })
}

/// Where the writer reads the group metadata from; set once the ownership consumer exists.
#[derive(Clone, Default)]
pub struct Group(Arc<OnceLock<GroupMetadata>>);

impl Group {
    /// Sets the source (the first call wins).
    pub fn set(&self, source: GroupMetadata) {
        let _ = self.0.set(source);
    }

    fn metadata(&self) -> Option<Arc<ConsumerGroupMetadata>> {
        self.0.get().and_then(|source| source())
    }
}

/// Notices when librdkafka finds every broker down, so that writes fail fast.
pub struct WriterContext {
    connected: Arc<AtomicBool>,
    kafka_up: Arc<AtomicBool>,
}

impl ClientContext for WriterContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connected.store(false, Ordering::Relaxed);
            self.kafka_up.store(false, Ordering::Relaxed);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

/// One aggregate topic's partition as the writer holds it: the committed state of every
/// aggregate and where the log ends.
pub struct Log<S> {
    states: HashMap<Uuid, S>,
    next_offset: i64,
    since_snapshot: u64,
    /// Set when a snapshot an erasure asked for could be neither written nor replaced by
    /// none: the next batch takes it again.
    snapshot_owed: Arc<AtomicBool>,
    /// The snapshot task last started: each waits for the one before, so that an older
    /// snapshot cannot land after a newer one or after the drop an erasure asked for.
    snapshotting: Option<tokio::task::JoinHandle<()>>,
}

impl<S> Log<S> {
    /// A partition rebuilt up to `next_offset`.
    pub fn new(states: HashMap<Uuid, S>, next_offset: i64) -> Self {
        Log {
            states,
            next_offset,
            since_snapshot: 0,
            snapshot_owed: Arc::default(),
            snapshotting: None,
        }
    }
}

/// A partition of both aggregate topics, held by the writer.
struct Held {
    users: Log<<UserAggregate as Aggregate>::State>,
    news: Log<<NewsAggregate as Aggregate>::State>,
    /// Outcomes of the keyed commands of the last 24 hours.
    recent: Recent,
    still_owned: StillOwned,
}

/// Answers whether this process still holds the assignment a partition was taken over for.
pub type StillOwned = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the writer thread is sent.
#[doc(hidden)]
pub struct Message(Inner);

enum Inner {
    /// A request for a users partition.
    Users(i32, Request<UserAggregate>),
    /// A request for a news partition.
    News(i32, Request<NewsAggregate>),
    /// Start serving a rebuilt partition.
    Install {
        partition: i32,
        held: Box<Held>,
        done: oneshot::Sender<bool>,
    },
    /// Stop serving a partition (drop its state).
    Remove { partition: i32 },
    /// A reconnection attempt finished.
    Connected(Result<Connection, String>),
    /// Stop the thread.
    Stop,
}

/// Lets the generic request path build the writer's message of its aggregate type.
pub trait Routed: Aggregate + Sized {
    /// The message carrying `request` for `partition`.
    #[doc(hidden)]
    fn message(partition: i32, request: Request<Self>) -> Message;
}

impl Routed for UserAggregate {
    fn message(partition: i32, request: Request<Self>) -> Message {
        Message(Inner::Users(partition, request))
    }
}

impl Routed for NewsAggregate {
    fn message(partition: i32, request: Request<Self>) -> Message {
        Message(Inner::News(partition, request))
    }
}

/// Orders revocations with transactions. A transaction passes the gate once, before it
/// produces anything, keeping only the partitions this process still holds; a revocation
/// (which first withdraws the assignment that `still_owned` reads) then waits until every
/// transaction that passed before it has finished. So once a revocation returns, every
/// record this process will ever have produced for the partition is acknowledged, below
/// the log end the next owner's rebuild reads to, and no later one is produced.
#[derive(Default)]
struct Gate {
    /// Transactions that passed, and transactions finished.
    counts: std::sync::Mutex<(u64, u64)>,
    finished: std::sync::Condvar,
    /// The step the transaction in flight is at, and since when (what a revocation that
    /// waited too long reports).
    phase: std::sync::Mutex<Option<(&'static str, Instant)>>,
}

impl Gate {
    /// Records the step the transaction in flight has reached (`None`: it ended).
    fn at(&self, phase: Option<&'static str>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.map(|p| (p, Instant::now()));
    }

    /// The step of the transaction in flight and how long it has been at it.
    fn phase(&self) -> Option<(&'static str, Duration)> {
        self.phase
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(phase, since)| (phase, since.elapsed()))
    }

    /// Lets a transaction pass with the partitions `keep` accepts; its number.
    fn pass(&self, keep: impl FnOnce()) -> u64 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        keep();
        counts.0 += 1;
        counts.0
    }

    fn finish(&self, number: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.1 = counts.1.max(number);
        self.finished.notify_all();
    }

    /// Waits (at most `limit`) until every transaction that passed has finished.
    fn drain(&self, limit: Duration) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let target = counts.0;
        let (counts, _) = self
            .finished
            .wait_timeout_while(counts, limit, |c| c.1 < target)
            .unwrap_or_else(|e| e.into_inner());
        counts.1 >= target
    }
}

/// The writer's queue is full, or the writer stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the writer's queue is full or it stopped")]
pub struct Refused;

/// The handle of the writer thread.
#[derive(Clone)]
pub struct Writer {
    sender: std_mpsc::SyncSender<Message>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    timeout: Duration,
    fetcher: Arc<outcome::Fetcher>,
}

impl Writer {
    /// Creates the producer (a transactional id of this process's own), and starts the
    /// writer thread. `group` gives the ownership group's metadata.
    pub async fn start(shared: Arc<Shared>, instance: &str, group: Group) -> anyhow::Result<Self> {
        let transactional_id = format!("{}.cmd.{instance}", shared.kafka.topic_prefix);
        let connection = connect(&shared, &transactional_id).await?;
        let (sender, receiver) = std_mpsc::sync_channel(QUEUE);
        let hold = std::env::var(HOLD_VARIABLE)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        let gate = Arc::new(Gate::default());
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .context("building the writer's clock")?;
        let thread = Thread {
            gate: gate.clone(),
            shared: shared.clone(),
            runtime: Handle::current(),
            clock,
            sender: sender.clone(),
            transactional_id,
            connection: Some(connection),
            reconnecting: false,
            held: HashMap::new(),
            group,
            ownership_topic: ownership_topic(&shared.kafka),
            outcomes_topic: outcomes_topic(&shared.kafka),
            topics: [
                Stream::Users.topic(&shared.kafka),
                Stream::News.topic(&shared.kafka),
            ],
            hold,
            uncertain_keyed: std::env::var_os(UNCERTAIN_VARIABLE).is_some(),
        };
        std::thread::Builder::new()
            .name("cmd-writer".into())
            .spawn(move || thread.run(receiver))
            .context("starting the writer thread")?;
        Ok(Writer {
            sender,
            gate,
            timeout: shared.kafka.timeout(),
            shared,
            fetcher: Arc::default(),
        })
    }

    /// Hands `request` for `partition` to the writer; refused when the writer's queue is
    /// full or the writer stopped.
    pub fn send<A: Routed>(&self, partition: i32, request: Request<A>) -> Result<(), Refused> {
        self.sender
            .try_send(A::message(partition, request))
            .map_err(|_| Refused)
    }

    /// Rebuilds `partition` of both aggregate topics from the latest snapshots and the log,
    /// and has the writer serve it. Returns the users' states it started from (for the
    /// e-mail claims), or `None` when the partition was revoked meanwhile.
    pub async fn take(
        &self,
        partition: i32,
        still_owned: StillOwned,
    ) -> anyhow::Result<Option<HashMap<Uuid, <UserAggregate as Aggregate>::State>>> {
        let (users, users_next) = rebuild::state::<UserAggregate>(&self.shared, partition).await?;
        let (news, news_next) = rebuild::state::<NewsAggregate>(&self.shared, partition).await?;
        let shared = self.shared.clone();
        let recent =
            tokio::task::spawn_blocking(move || outcome::load(&shared, partition)).await??;
        tracing::info!(
            partition,
            users = users.len(),
            news = news.len(),
            users_next,
            news_next,
            keys = recent.len(),
            "partition rebuilt"
        );
        let initial = users.clone();
        let held = Box::new(Held {
            users: Log::new(users, users_next),
            news: Log::new(news, news_next),
            recent,
            still_owned,
        });
        let (done, installed) = oneshot::channel();
        post(
            &self.sender,
            Message(Inner::Install {
                partition,
                held,
                done,
            }),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the writer stopped"))?;
        Ok(installed.await?.then_some(initial))
    }

    /// What the writer works with.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The answer recorded at `offset` of the outcomes partition `partition`.
    pub async fn recorded<A: Aggregate>(
        &self,
        partition: i32,
        offset: i64,
    ) -> Result<Committed<A::State>, CommandError> {
        let (shared, fetcher) = (self.shared.clone(), self.fetcher.clone());
        let read =
            tokio::task::spawn_blocking(move || fetcher.fetch(&shared, partition, offset)).await;
        match read {
            Ok(Ok(read)) => outcome::answer::<A>(&self.shared, partition, &read),
            Ok(Err(e)) => {
                tracing::warn!(
                    partition,
                    offset,
                    error = format!("{e:#}"),
                    "reading an outcome"
                );
                Err(CommandError::Unavailable {
                    reason: "the outcome of this request could not be read".into(),
                    definitive: false,
                })
            }
            Err(e) => Err(CommandError::unavailable(e.to_string())),
        }
    }

    /// Stops the writer thread (what waits is refused).
    pub fn stop(&self) {
        let _ = self.sender.send(Message(Inner::Stop));
    }

    /// Stops serving `partitions`, whose assignments the caller withdrew already: returns
    /// once no transaction of this process holds records of them that are not
    /// acknowledged, and none will produce any (blocking: called from the rebalance
    /// callback).
    pub fn remove(&self, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        // The states are dropped in the queue's order; the gate is what makes it safe.
        for &partition in partitions {
            let _ = self.sender.try_send(Message(Inner::Remove { partition }));
        }
        // A transaction that passed the gate ends within its calls' bounds (events' and
        // outcomes' deliveries, flush, offsets with their extra second, commit and its
        // resumes, or an abort), plus a timeout's slack. Should it run out anyway, nothing
        // it produced can reach the next owner's state uncounted: its records are all
        // acknowledged before its offsets go to the group coordinator, which accepts them
        // only from the current generation, and the next owner reads the partition's end
        // only once a later generation gave it the partition.
        if !self.gate.drain(self.timeout * (7 + COMMIT_RESUMES as u32)) {
            let (phase, since) = self.gate.phase().unwrap_or(("none", Duration::ZERO));
            tracing::error!(
                ?partitions,
                phase,
                phase_ms = since.as_millis() as u64,
                "a transaction of the revoked partitions did not finish in time"
            );
        }
    }
}

/// Sends a message from async code without blocking a runtime thread while the queue is
/// full.
async fn post(sender: &std_mpsc::SyncSender<Message>, message: Message) -> Result<(), Refused> {
    let mut message = message;
    loop {
        match sender.try_send(message) {
            Ok(()) => return Ok(()),
            Err(std_mpsc::TrySendError::Full(back)) => {
                message = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => return Err(Refused),
        }
    }
}

/// Transactional producers taken in turn. A committed transaction leaves its
/// coordinator writing the commit markers for a few milliseconds, during which the same
/// producer's next transaction is refused (CONCURRENT_TRANSACTIONS) and retried; the next
/// producer's is not. Transactions still run one at a time, in order.
pub(crate) struct Connection {
    producers: Vec<Producer>,
    connected: Arc<AtomicBool>,
    turn: usize,
    /// The thread that sends the ownership offsets (see [`offsets_sent_within`]).
    offsets: std_mpsc::SyncSender<OffsetsJob>,
}

/// A call of `send_offsets_to_transaction` for the offsets thread, and where its result goes.
struct OffsetsJob {
    producer: Producer,
    owned: TopicPartitionList,
    group: Arc<ConsumerGroupMetadata>,
    timeout: Duration,
    done: std_mpsc::SyncSender<Result<(), KafkaError>>,
}

/// Starts a connection's offsets thread; it ends once the connection is dropped and the
/// call it is in, if any, has returned.
fn offsets_thread() -> anyhow::Result<std_mpsc::SyncSender<OffsetsJob>> {
    let (jobs, queue) = std_mpsc::sync_channel::<OffsetsJob>(1);
    std::thread::Builder::new()
        .name("cmd-offsets".into())
        .spawn(move || {
            while let Ok(job) = queue.recv() {
                let sent =
                    job.producer
                        .send_offsets_to_transaction(&job.owned, &job.group, job.timeout);
                let _ = job.done.send(sent);
            }
        })
        .context("starting the offsets thread")?;
    Ok(jobs)
}

/// Producers in the writer's turn.
const PRODUCERS: usize = 2;

async fn connect(shared: &Shared, transactional_id: &str) -> anyhow::Result<Connection> {
    let connected = Arc::new(AtomicBool::new(true));
    let timeout = shared.kafka.timeout();
    let mut producers = Vec::with_capacity(PRODUCERS);
    for turn in 0..PRODUCERS {
        let context = WriterContext {
            connected: connected.clone(),
            kafka_up: shared.kafka_up.clone(),
        };
        let producer = Producer::with_context(
            &transactional_producer(&shared.kafka, &format!("{transactional_id}.{turn}")),
            context,
        )?;
        let init = producer.clone();
        tokio::task::spawn_blocking(move || {
            newsroom_infra::kafka::init_transactions(timeout, |t| init.init_transactions(t))
        })
        .await??;
        producers.push(producer);
    }
    shared.kafka_up.store(true, Ordering::Relaxed);
    Ok(Connection {
        producers,
        connected,
        turn: 0,
        offsets: offsets_thread()?,
    })
}

/// How a transaction failed.
enum Failure {
    /// Aborted: nothing is in the log; the producer goes on.
    Aborted(String),
    /// Kafka did not confirm the outcome: reconnect, and rebuild the partitions involved.
    Uncertain(String),
    /// The producer was fenced or failed fatally (its transaction is aborted): reconnect.
    Fatal(String),
}

/// The decisions of one partition of one aggregate topic in the current batch.
struct Decisions<S> {
    /// State changes (None: the aggregate is gone), applied once committed.
    overlay: HashMap<Uuid, Option<S>>,
    decided: Vec<Decided<S>>,
    /// Keyed commands refused: their refusal is recorded before it is answered.
    refused: Vec<Refusal<S>>,
    reads: Vec<(Uuid, oneshot::Sender<Option<S>>)>,
    force_snapshot: bool,
}

impl<S> Default for Decisions<S> {
    fn default() -> Self {
        Decisions {
            overlay: HashMap::new(),
            decided: Vec::new(),
            refused: Vec::new(),
            reads: Vec::new(),
            force_snapshot: false,
        }
    }
}

type Reply<S> = oneshot::Sender<Result<Committed<S>, CommandError>>;

struct Decided<S> {
    reply: Reply<S>,
    id: Uuid,
    payload: Vec<u8>,
    offset: i64,
    /// The state right after this command (its answer).
    state: S,
    /// A keyed command's outcome record.
    outcome: Option<Outcome>,
    /// The request's trace context, for the event's record headers.
    trace: Option<String>,
}

struct Refusal<S> {
    reply: Reply<S>,
    outcome: Outcome,
    error: crate::domain::DomainError,
}

/// A batch's decisions for one partition of both topics.
#[derive(Default)]
struct Batch {
    users: Decisions<<UserAggregate as Aggregate>::State>,
    news: Decisions<<NewsAggregate as Aggregate>::State>,
    /// The key scopes of this batch's keyed commands.
    keys: HashSet<[u8; 32]>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.users.decided.is_empty()
            && self.news.decided.is_empty()
            && self.users.refused.is_empty()
            && self.news.refused.is_empty()
    }
}

/// An event of a transaction, with the outcome record of its command if it is keyed.
struct EventRecord<'a> {
    topic: &'a str,
    partition: i32,
    key: Uuid,
    payload: &'a [u8],
    outcome: Option<&'a Outcome>,
    trace: Option<&'a str>,
}

/// Which decision an event record is: partition, topic (users: false, news: true), index.
type Origin = (i32, bool, usize);

/// The events and keyed refusals of a batch, in one order, with where each came from.
fn batch_records<'a>(
    batch: &'a HashMap<i32, Batch>,
    topics: &'a [String; 2],
) -> (Vec<EventRecord<'a>>, Vec<Origin>, Vec<(i32, &'a Outcome)>) {
    fn of<'a, S>(
        partition: i32,
        news: bool,
        topic: &'a str,
        decisions: &'a Decisions<S>,
        out: &mut (Vec<EventRecord<'a>>, Vec<Origin>, Vec<(i32, &'a Outcome)>),
    ) {
        for (index, d) in decisions.decided.iter().enumerate() {
            out.0.push(EventRecord {
                topic,
                partition,
                key: d.id,
                payload: &d.payload,
                outcome: d.outcome.as_ref(),
                trace: d.trace.as_deref(),
            });
            out.1.push((partition, news, index));
        }
        out.2
            .extend(decisions.refused.iter().map(|r| (partition, &r.outcome)));
    }
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (partition, b) in batch {
        of(*partition, false, &topics[0], &b.users, &mut out);
        of(*partition, true, &topics[1], &b.news, &mut out);
    }
    out
}

struct Thread {
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    runtime: Handle,
    /// A runtime of this thread's own, whose clock bounds the waits for acknowledgements
    /// (the process's runtime drives its timers only from its own threads).
    clock: tokio::runtime::Runtime,
    sender: std_mpsc::SyncSender<Message>,
    transactional_id: String,
    connection: Option<Connection>,
    reconnecting: bool,
    held: HashMap<i32, Held>,
    group: Group,
    ownership_topic: String,
    outcomes_topic: String,
    /// The users and news topics.
    topics: [String; 2],
    hold: Option<Duration>,
    uncertain_keyed: bool,
}

fn refuse<A: Aggregate>(request: Request<A>, reason: &str) {
    match request {
        Request::Command { reply, .. } => {
            APPENDS.with_label_values(&["refused"]).inc();
            let _ = reply.send(Err(CommandError::unavailable(reason)));
        }
        Request::Read { reply, .. } => drop(reply),
        Request::Recall { reply, .. } => drop(reply),
    }
}

impl Thread {
    fn run(mut self, receiver: std_mpsc::Receiver<Message>) {
        // The group-commit window is sized by load: callers answered by one transaction
        // come back with their next commands within a moment, so the next batch waits for
        // as many commands as the last one had, for at most half the last transaction's
        // time (never longer than GATHER_MAX). A lone caller finds its batch full at once.
        let mut expected = 0usize;
        let mut last_transaction = Duration::ZERO;
        while let Ok(first) = receiver.recv() {
            let mut batch: HashMap<i32, Batch> = HashMap::new();
            let mut commands = 0;
            let deadline = Instant::now() + (last_transaction / 2).min(GATHER_MAX);
            let mut next = Some(first);
            loop {
                while let Some(message) = next.take() {
                    if matches!(message.0, Inner::Stop) {
                        self.held.clear();
                        for (_, b) in batch {
                            fail(b, "the command API is stopping", true);
                        }
                        tracing::info!("the writer stopped");
                        return;
                    }
                    commands += self.take(message, &mut batch);
                    if commands < MAX_BATCH {
                        next = receiver.try_recv().ok();
                    }
                }
                let now = Instant::now();
                if commands == 0 || commands >= expected.min(MAX_BATCH) || now >= deadline {
                    break;
                }
                match receiver.recv_timeout(deadline - now) {
                    Ok(message) => next = Some(message),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let started = Instant::now();
                let committed = self.commit_batch(batch);
                if committed > 0 {
                    expected = committed;
                    last_transaction = started.elapsed();
                }
            }
        }
        tracing::info!("the writer stopped");
    }

    fn available(&mut self) -> Result<(), &'static str> {
        match &self.connection {
            Some(c) if c.connected.load(Ordering::Relaxed) => Ok(()),
            _ => {
                self.connection = None;
                self.reconnect();
                Err("Kafka is unreachable")
            }
        }
    }

    /// Starts a reconnection in the background unless one runs.
    fn reconnect(&mut self) {
        if self.reconnecting {
            return;
        }
        self.reconnecting = true;
        let (shared, id, sender) = (
            self.shared.clone(),
            self.transactional_id.clone(),
            self.sender.clone(),
        );
        self.runtime.spawn(async move {
            tokio::time::sleep(RECOVERY_PAUSE).await;
            let outcome = connect(&shared, &id).await.map_err(|e| format!("{e:#}"));
            let _ = post(&sender, Message(Inner::Connected(outcome))).await;
        });
    }

    /// Takes a request for `partition` of `A` into the batch (see [`admit`]).
    fn admit<A: Aggregate>(
        &mut self,
        partition: i32,
        request: Request<A>,
        batch: &mut HashMap<i32, Batch>,
        log: impl Fn(&Held) -> &Log<A::State>,
        decisions: impl Fn(&mut Batch) -> (&mut Decisions<A::State>, &mut HashSet<[u8; 32]>),
    ) -> usize {
        let available = self.available();
        let Some(held) = self.held.get(&partition) else {
            refuse(request, "the partition is not served here now");
            return 0;
        };
        let (decisions, keys) = decisions(batch.entry(partition).or_default());
        let known = Known {
            log: log(held),
            recent: &held.recent,
        };
        admit::<A>(&self.shared, available, known, decisions, keys, request)
    }

    /// Takes one message into the batch; returns how many commands it added.
    fn take(&mut self, Message(message): Message, batch: &mut HashMap<i32, Batch>) -> usize {
        match message {
            Inner::Users(partition, request) => self.admit(
                partition,
                request,
                batch,
                |h| &h.users,
                |b| (&mut b.users, &mut b.keys),
            ),
            Inner::News(partition, request) => self.admit(
                partition,
                request,
                batch,
                |h| &h.news,
                |b| (&mut b.news, &mut b.keys),
            ),
            Inner::Install {
                partition,
                held,
                done,
            } => {
                // A revocation that came during the rebuild wins.
                let installed = (held.still_owned)();
                if installed {
                    self.held.insert(partition, *held);
                }
                let _ = done.send(installed);
                0
            }
            Inner::Remove { partition } => {
                // What the batch being gathered decided for it is refused, not committed
                // (the gate would refuse it anyway).
                self.held.remove(&partition);
                if let Some(dropped) = batch.remove(&partition) {
                    fail(dropped, "the partition moved to another process", true);
                }
                0
            }
            Inner::Connected(Ok(connection)) => {
                self.reconnecting = false;
                self.connection = Some(connection);
                tracing::info!("the writer reconnected to Kafka");
                0
            }
            Inner::Stop => 0,
            Inner::Connected(Err(error)) => {
                self.reconnecting = false;
                tracing::debug!(error, "reconnecting the writer failed");
                self.reconnect();
                0
            }
        }
    }

    /// Commits what the batch decided; returns how many commands it committed.
    fn commit_batch(&mut self, mut batch: HashMap<i32, Batch>) -> usize {
        // Through the gate: partitions revoked meanwhile are refused, not produced.
        let mut revoked = Vec::new();
        let number = self.gate.pass(|| {
            for partition in batch.keys() {
                if !self.held.get(partition).is_some_and(|h| (h.still_owned)()) {
                    revoked.push(*partition);
                }
            }
        });
        for partition in revoked {
            if let Some(dropped) = batch.remove(&partition) {
                fail(dropped, "the partition moved to another process", true);
            }
        }
        let committed = self.gated_commit(batch);
        self.gate.at(None);
        self.gate.finish(number);
        committed
    }

    fn gated_commit(&mut self, mut batch: HashMap<i32, Batch>) -> usize {
        if batch.values().all(Batch::is_empty) {
            for (partition, b) in batch {
                self.answer(partition, b, &HashMap::new());
            }
            return 0;
        }
        let Some(connection) = &mut self.connection else {
            for (_, b) in batch {
                fail(b, "Kafka is unreachable", true);
            }
            return 0;
        };
        connection.turn = (connection.turn + 1) % connection.producers.len();
        let producer = connection.producers[connection.turn].clone();
        let offsets = connection.offsets.clone();
        let partitions: Vec<i32> = batch
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(p, _)| *p)
            .collect();
        let (records, origins, refusals) = batch_records(&batch, &self.topics);
        let count = records.len();
        let started = Instant::now();
        let mut outcome = self.transaction(&producer, &offsets, &records, &refusals, &partitions);
        drop((records, refusals));
        if self.uncertain_keyed
            && let Ok((_, recorded)) = &outcome
            && !recorded.is_empty()
        {
            outcome = Err(Failure::Uncertain(format!("{UNCERTAIN_VARIABLE} is set")));
        }
        match outcome {
            Ok((offsets, recorded)) => {
                for ((partition, news, index), offset) in origins.into_iter().zip(offsets) {
                    let Some(b) = batch.get_mut(&partition) else {
                        continue;
                    };
                    let decided = if news {
                        b.news.decided.get_mut(index).map(|d| &mut d.offset)
                    } else {
                        b.users.decided.get_mut(index).map(|d| &mut d.offset)
                    };
                    if let Some(slot) = decided {
                        *slot = offset;
                    }
                }
                APPENDS
                    .with_label_values(&["committed"])
                    .inc_by(count as u64);
                for (partition, b) in batch {
                    self.answer(partition, b, &recorded);
                }
                count
            }
            Err(failure) => {
                APPENDS.with_label_values(&["failed"]).inc_by(count as u64);
                let (reason, definitive) = match &failure {
                    Failure::Aborted(r) | Failure::Fatal(r) => (r.clone(), true),
                    Failure::Uncertain(r) => (r.clone(), false),
                };
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::warn!(reason, definitive, elapsed_ms, "transaction failed");
                for (partition, mut b) in batch {
                    if let Some(held) = self.held.get(&partition) {
                        read(&held.users, std::mem::take(&mut b.users.reads));
                        read(&held.news, std::mem::take(&mut b.news.reads));
                    }
                    fail(b, &reason, definitive);
                }
                match failure {
                    Failure::Aborted(_) => {}
                    Failure::Fatal(_) => {
                        self.connection = None;
                        self.reconnect();
                    }
                    Failure::Uncertain(_) => {
                        // The states of these partitions may lag the log: rebuild them.
                        // The new producer's init_transactions settles the open
                        // transaction, and the rebuild reads past it.
                        self.connection = None;
                        self.reconnect();
                        for partition in partitions {
                            if let Some(held) = self.held.remove(&partition) {
                                self.rebuild(partition, held.still_owned);
                            }
                        }
                    }
                }
                0
            }
        }
    }

    /// Rebuilds a partition whose last transaction's outcome is unknown, then serves it
    /// again (unless it was revoked meanwhile).
    fn rebuild(&self, partition: i32, still_owned: StillOwned) {
        let writer = Writer {
            sender: self.sender.clone(),
            shared: self.shared.clone(),
            gate: self.gate.clone(),
            timeout: self.shared.kafka.timeout(),
            fetcher: Arc::default(),
        };
        self.runtime.spawn(async move {
            while still_owned() {
                match writer.take(partition, still_owned.clone()).await {
                    Ok(_) => {
                        tracing::info!(partition, "partition rebuilt after an unknown outcome");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(partition, error = format!("{e:#}"), "rebuilding failed");
                        tokio::time::sleep(RECOVERY_PAUSE).await;
                    }
                }
            }
        });
    }

    /// Applies a committed batch of one partition to the held states and answers it;
    /// `recorded` gives the offsets of the outcome records by partition and key scope.
    fn answer(&mut self, partition: i32, batch: Batch, recorded: &Recorded) {
        let Some(held) = self.held.get_mut(&partition) else {
            fail(batch, "the partition moved to another process", false);
            return;
        };
        let mut at = Settling {
            shared: &self.shared,
            runtime: &self.runtime,
            partition,
            recent: &mut held.recent,
            recorded,
        };
        settle::<UserAggregate>(&mut at, &mut held.users, batch.users);
        settle::<NewsAggregate>(&mut at, &mut held.news, batch.news);
    }

    /// Waits for `delivery` until `deadline`; past it, the record counts as timed out.
    fn delivered(&self, delivery: Delivery, deadline: Instant) -> producer::Delivered {
        let deadline = tokio::time::Instant::from_std(deadline);
        self.clock
            .block_on(async move { tokio::time::timeout_at(deadline, delivery).await })
            .unwrap_or(Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )))
    }

    /// Begins, produces the events, waits for their acknowledgements, produces the
    /// outcome records `outcomes` makes of their offsets and waits for those, commits the
    /// ownership offsets with the group metadata (the zombie fence), commits. Returns the
    /// events' offsets in record order, and the outcome records' offsets.
    fn transaction(
        &self,
        producer: &Producer,
        offsets_thread: &std_mpsc::SyncSender<OffsetsJob>,
        records: &[EventRecord<'_>],
        refusals: &[(i32, &Outcome)],
        partitions: &[i32],
    ) -> Result<(Vec<i64>, Recorded), Failure> {
        let timeout = self.shared.kafka.timeout();
        let abort = |error: KafkaError| {
            if is_fatal(&error) {
                return Failure::Fatal(error.to_string());
            }
            self.gate.at(Some("abort"));
            match producer.abort_transaction(timeout) {
                Ok(()) => Failure::Aborted(error.to_string()),
                Err(abort) if is_fatal(&abort) => Failure::Fatal(abort.to_string()),
                // Nothing was committed; the next init_transactions aborts what is open.
                Err(abort) => Failure::Fatal(format!("{error}; abort failed: {abort}")),
            }
        };
        // The coordinator checks this member and generation when the offsets are sent,
        // which is after every record is acknowledged: a process that is no longer the
        // member it was here cannot commit.
        self.gate.at(Some("group metadata"));
        let group = self.group.metadata().ok_or_else(|| {
            Failure::Aborted("this process has not joined the ownership group".into())
        })?;
        let mut owned = TopicPartitionList::new();
        for partition in partitions {
            owned
                .add_partition_offset(&self.ownership_topic, *partition, Offset::Offset(0))
                .map_err(|e| Failure::Aborted(e.to_string()))?;
        }
        let start = Instant::now();
        self.gate.at(Some("begin"));
        producer.begin_transaction().map_err(abort)?;
        if let Some(hold) = self.hold {
            std::thread::sleep(hold);
        }
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(records.len());
        for event in records {
            let record = Record {
                topic: event.topic,
                partition: Some(event.partition),
                key: Some(event.key.as_bytes().as_slice()),
                payload: Some(event.payload),
                headers: event.trace.map(|trace| {
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: newsroom_infra::trace::HEADER,
                        value: Some(trace),
                    })
                }),
            };
            deliveries.push(producer.send(record).map_err(abort)?);
        }
        // Every record must be in the log before the ownership check: a process that
        // passed it and was frozen before producing could otherwise append behind the
        // log end its successor rebuilt from.
        // Acknowledgements are awaited until the Kafka timeout and no longer: an idempotent
        // producer never times out a record already sent, so a broker that stops answering
        // would otherwise hold this writer, and every request queued behind it, for minutes.
        self.gate.at(Some("acknowledgements"));
        let acknowledged_by = Instant::now() + timeout;
        let mut offsets = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.delivered(delivery, acknowledged_by) {
                Ok((_, offset)) => offsets.push(offset),
                Err(error) => return Err(abort(error)),
            }
        }
        // The outcomes of keyed commands name their events' offsets, so they follow.
        let outcomes = records
            .iter()
            .zip(&offsets)
            .filter_map(|(event, offset)| Some((event.partition, event.outcome?, Some(*offset))))
            .chain(refusals.iter().map(|(partition, o)| (*partition, *o, None)));
        let mut recorded = Recorded::new();
        let mut deliveries = Vec::new();
        for (partition, outcome, event_offset) in outcomes {
            let record = Record {
                topic: &self.outcomes_topic,
                partition: Some(partition),
                key: Some(outcome.keyed.scope.as_slice()),
                payload: Some(&outcome.value),
                headers: Some(outcome.headers(event_offset)),
            };
            let delivery = producer.send(record).map_err(abort)?;
            deliveries.push(((partition, outcome.keyed.scope), delivery));
        }
        let acknowledged_by = Instant::now() + timeout;
        for (key, delivery) in deliveries {
            match self.delivered(delivery, acknowledged_by) {
                Ok((_, offset)) => recorded.insert(key, offset),
                Err(error) => return Err(abort(error)),
            };
        }
        // The delivery counter can lag the reports by a moment; settle it with short
        // flushes (which also serve the reports on this thread) so that the commit's own
        // flush finds nothing in flight: it would poll for 100 ms. Measured against
        // waiting on the in-flight count in short sleeps, and against no wait (ADR 23).
        self.gate.at(Some("flush"));
        let deadline = Instant::now() + timeout;
        while producer.flush(Duration::from_millis(1)).is_err() {
            if Instant::now() >= deadline {
                return Err(abort(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut)));
            }
        }
        let produced = start.elapsed();
        self.gate.at(Some("offsets"));
        offsets_sent_within(offsets_thread, producer, owned, group, timeout)?.map_err(abort)?;
        let offsets_sent = start.elapsed();
        self.gate.at(Some("commit"));
        let mut commit = producer.commit_transaction(timeout);
        // A commit that timed out goes on in librdkafka, which resumes it when called again:
        // its outcome becomes known instead of being reported unknown (a 503 the client must
        // retry, a reconnection, and a rebuild of every partition in the transaction).
        let mut resumed = false;
        for _ in 0..COMMIT_RESUMES {
            match &commit {
                Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                    resumed = true;
                    commit = producer.commit_transaction(timeout);
                }
                _ => break,
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (produced_ms, offsets_ms) = (ms(produced), ms(offsets_sent));
        let committed_ms = ms(start.elapsed());
        tracing::debug!(
            events = records.len(),
            outcomes = recorded.len(),
            partitions = partitions.len(),
            produced_ms,
            offsets_ms,
            committed_ms,
            "transaction"
        );
        // Where a slow transaction spent its time (the stalls under broker faults, ADR 22).
        if start.elapsed() >= timeout / 2 {
            tracing::warn!(
                produced_ms,
                offsets_ms,
                committed_ms,
                committed = commit.is_ok(),
                "a slow transaction"
            );
        }
        if let Err(error) = commit {
            return Err(match &error {
                // A commit request that may have reached the coordinator before it timed
                // out can have committed, whatever a later attempt says.
                _ if resumed => Failure::Uncertain(error.to_string()),
                KafkaError::Transaction(e) if e.txn_requires_abort() => abort(error),
                _ if is_fatal(&error) => Failure::Fatal(error.to_string()),
                _ => Failure::Uncertain(error.to_string()),
            });
        }
        Ok((offsets, recorded))
    }
}

/// Sends the ownership offsets into the transaction, waiting for it no longer than
/// `timeout` and a second. librdkafka does not bound that call while the group
/// coordinator's broker is down (its coordinator request waits for the connection without
/// a timer): the chaos run saw it hold the writer, and every request behind it, for over
/// 20 s after a broker kill. So the connection's offsets thread makes the call (a hand-off
/// costs tens of microseconds here; a thread started per call cost 200). Past the wait the
/// transaction counts as failed for good (`Fatal`): the writer takes new producers, whose
/// `init_transactions` fences this one and aborts its transaction, so nothing it produced
/// is ever committed; the abandoned call ends whenever librdkafka lets it, and its thread
/// with it.
fn offsets_sent_within(
    offsets_thread: &std_mpsc::SyncSender<OffsetsJob>,
    producer: &Producer,
    owned: TopicPartitionList,
    group: Arc<ConsumerGroupMetadata>,
    timeout: Duration,
) -> Result<Result<(), KafkaError>, Failure> {
    let wait = timeout + Duration::from_secs(1);
    let (done, outcome) = std_mpsc::sync_channel(1);
    let job = OffsetsJob {
        producer: producer.clone(),
        owned,
        group,
        timeout,
        done,
    };
    // The thread is idle between transactions: a full queue means its last call hangs.
    offsets_thread
        .try_send(job)
        .map_err(|_| Failure::Fatal("the offsets thread is busy or gone".into()))?;
    outcome.recv_timeout(wait).map_err(|_| {
        Failure::Fatal(format!(
            "sending the ownership offsets took over {} ms",
            wait.as_millis()
        ))
    })
}

/// What the writer holds of a partition of one aggregate topic: the committed states, and
/// the recent keyed outcomes (of both topics).
struct Known<'a, S> {
    log: &'a Log<S>,
    recent: &'a Recent,
}

/// Takes a request into the batch: decided when Kafka is reachable; otherwise a command is
/// refused at once and a read answered from the held state.
fn admit<A: Aggregate>(
    shared: &Shared,
    available: Result<(), &'static str>,
    known: Known<'_, A::State>,
    decisions: &mut Decisions<A::State>,
    keys: &mut HashSet<[u8; 32]>,
    request: Request<A>,
) -> usize {
    match (available, request) {
        (_, Request::Recall { keyed, reply }) => {
            let _ = reply.send(recall(known.recent, keys, &keyed));
            0
        }
        (Ok(()), request) => decide::<A>(shared, known, decisions, keys, request),
        (Err(_), Request::Read { id, reply }) => {
            let _ = reply.send(known.log.states.get(&id).cloned());
            0
        }
        (Err(reason), request) => {
            refuse(request, reason);
            0
        }
    }
}

/// What the writer knows of `keyed`: nothing (`None`), its recorded outcome's offset, or
/// why it cannot be run (another request with the key, or one being written).
fn recall(
    recent: &Recent,
    keys: &HashSet<[u8; 32]>,
    keyed: &Keyed,
) -> Option<Result<i64, CommandError>> {
    if keys.contains(&keyed.scope) {
        return Some(Err(CommandError::Unavailable {
            reason: "a request with this Idempotency-Key is being written".into(),
            definitive: false,
        }));
    }
    let now = micros(chrono::Utc::now());
    let entry = recent.get(&keyed.scope, now)?;
    Some(if entry.request == keyed.request {
        Ok(entry.offset)
    } else {
        Err(CommandError::KeyReused)
    })
}

/// Decides one request against the held state plus the batch's earlier changes. A keyed
/// command whose key has an outcome is answered by it instead.
fn decide<A: Aggregate>(
    shared: &Shared,
    known: Known<'_, A::State>,
    decisions: &mut Decisions<A::State>,
    keys: &mut HashSet<[u8; 32]>,
    request: Request<A>,
) -> usize {
    let log = known.log;
    let (id, command, meta, reply) = match request {
        Request::Read { id, reply } => {
            decisions.reads.push((id, reply));
            return 0;
        }
        Request::Recall { keyed, reply } => {
            let _ = reply.send(recall(known.recent, keys, &keyed));
            return 0;
        }
        Request::Command {
            id,
            command,
            meta,
            reply,
        } => (id, command, meta, reply),
    };
    let at = micros(meta.now);
    if let Some(known) = meta.keyed.and_then(|k| recall(known.recent, keys, &k)) {
        let _ = reply.send(Err(known.map_or_else(|e| e, CommandError::Recorded)));
        return 0;
    }
    let current = match decisions.overlay.get(&id) {
        Some(state) => state.clone(),
        None => log.states.get(&id).cloned(),
    };
    let change = match A::handle(id, current.as_ref(), command) {
        Ok(change) => change,
        Err(error) => {
            let Some(keyed) = meta.keyed else {
                let _ = reply.send(Err(error.into()));
                return 0;
            };
            // Recorded before it is answered, so that a retry gets the same refusal.
            let source = outcome::Source::Refused(&error);
            let Some(outcome) = keyed_outcome::<A>(shared, keyed, id, at, source) else {
                let _ = reply.send(Err(unrecordable()));
                return 0;
            };
            keys.insert(keyed.scope);
            decisions.refused.push(Refusal {
                reply,
                outcome,
                error,
            });
            return 1;
        }
    };
    let version = current.as_ref().map_or(0, A::version) + 1;
    let metadata = EventMetadata {
        event_id: meta.event_id,
        aggregate_id: id,
        aggregate_version: version,
        occurred_at: at,
        correlation_id: meta.correlation_id,
        causation_id: meta.command_id,
        actor_id: meta.actor_id,
        schema_version: 0,
    };
    let id_of = |name: &str| shared.registry.id_of(name);
    match A::encode(&change, metadata, &shared.keys, &id_of) {
        Ok(payload) => {
            decisions.force_snapshot |= A::forces_snapshot(&change);
            let stamp = Stamp {
                id,
                version,
                at: meta.now,
            };
            let Some(after) = A::apply(current, &change, stamp) else {
                tracing::error!(%id, "a command left no state");
                let _ = reply.send(Err(CommandError::unavailable("the command left no state")));
                return 0;
            };
            let outcome = match meta.keyed {
                Some(keyed) => {
                    let source = outcome::Source::Committed(&after);
                    let Some(outcome) = keyed_outcome::<A>(shared, keyed, id, at, source) else {
                        let _ = reply.send(Err(unrecordable()));
                        return 0;
                    };
                    keys.insert(keyed.scope);
                    Some(outcome)
                }
                None => None,
            };
            decisions.overlay.insert(id, Some(after.clone()));
            decisions.decided.push(Decided {
                reply,
                id,
                payload,
                offset: -1,
                state: after,
                outcome,
                trace: meta.trace,
            });
            1
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "encoding an event failed");
            let _ = reply.send(Err(CommandError::unavailable(
                "the event could not be encoded",
            )));
            0
        }
    }
}

/// The outcome record of a keyed command; `None` (and the command refused, nothing
/// written) when it cannot be made.
fn keyed_outcome<A: Aggregate>(
    shared: &Shared,
    keyed: Keyed,
    id: Uuid,
    at: i64,
    source: outcome::Source<'_, A::State>,
) -> Option<Outcome> {
    outcome::record::<A>(shared, keyed, id, at, source)
        .map_err(|e| {
            tracing::error!(%id, error = format!("{e:#}"), "an outcome cannot be recorded");
        })
        .ok()
}

fn unrecordable() -> CommandError {
    CommandError::unavailable("the outcome of this command cannot be recorded")
}

/// Offsets of a transaction's outcome records, by partition and key scope.
type Recorded = HashMap<(i32, [u8; 32]), i64>;

/// Where a committed batch of one partition is settled.
struct Settling<'a> {
    shared: &'a Arc<Shared>,
    runtime: &'a Handle,
    partition: i32,
    recent: &'a mut Recent,
    recorded: &'a Recorded,
}

impl Settling<'_> {
    /// Indexes the outcome of a keyed command, if it was recorded.
    fn remember(&mut self, outcome: &Outcome) {
        let scope = outcome.keyed.scope;
        if let Some(offset) = self.recorded.get(&(self.partition, scope)) {
            let entry = outcome::Entry {
                request: outcome.keyed.request,
                at: outcome.at,
                offset: *offset,
            };
            self.recent.insert(scope, entry);
        }
    }
}

/// Applies committed decisions to `log`, answers them, and takes a snapshot when due.
fn settle<A: Aggregate>(
    at: &mut Settling<'_>,
    log: &mut Log<A::State>,
    decisions: Decisions<A::State>,
) {
    let (shared, runtime, partition) = (at.shared, at.runtime, at.partition);
    let Decisions {
        overlay,
        decided,
        refused,
        reads,
        force_snapshot,
    } = decisions;
    let events = decided.len() as u64;
    for (id, state) in overlay {
        match state {
            Some(state) => log.states.insert(id, state),
            None => log.states.remove(&id),
        };
    }
    for r in refused {
        at.remember(&r.outcome);
        let _ = r.reply.send(Err(CommandError::Domain(r.error)));
    }
    for d in decided {
        if let Some(outcome) = &d.outcome {
            at.remember(outcome);
        }
        log.next_offset = log.next_offset.max(d.offset + 1);
        // The state right after this command, not after the batch.
        let _ = d.reply.send(Ok(Committed {
            state: d.state,
            position: Position {
                partition,
                offset: d.offset,
            },
        }));
    }
    read(log, reads);
    log.since_snapshot += events;
    let due = events > 0 && log.since_snapshot >= shared.kafka.snapshot_every;
    let forced = force_snapshot || log.snapshot_owed.swap(false, Ordering::SeqCst);
    if forced || due {
        log.since_snapshot = 0;
        let states: Vec<A::State> = log.states.values().cloned().collect();
        let (pool, next, owed) = (
            shared.pool.clone(),
            log.next_offset,
            log.snapshot_owed.clone(),
        );
        let previous = log.snapshotting.take();
        log.snapshotting = Some(runtime.spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            if !forced {
                if let Err(e) = snapshot::save::<A>(&pool, partition, states, next).await {
                    tracing::warn!(partition, error = format!("{e:#}"), "snapshot failed");
                }
                return;
            }
            // An erasure: the older snapshot may hold what was erased, so it is replaced,
            // or else dropped (a takeover then rebuilds from the log), or else owed.
            use newsroom_infra::retry::with_retries;
            let Err(e) = with_retries("taking the snapshot an erasure asks for", || {
                snapshot::save::<A>(&pool, partition, states.clone(), next)
            })
            .await
            else {
                return;
            };
            tracing::warn!(
                partition,
                error = format!("{e:#}"),
                "snapshot after an erasure failed; dropping the older one"
            );
            if let Err(e) = with_retries("dropping the snapshot older than an erasure", || {
                snapshot::drop_older::<A>(&pool, partition, next)
            })
            .await
            {
                owed.store(true, Ordering::SeqCst);
                tracing::error!(
                    partition,
                    error = format!("{e:#}"),
                    "the snapshot older than an erasure is still there; the next batch tries again"
                );
            }
        }));
    }
}

/// Answers reads with the committed states.
fn read<S: Clone>(log: &Log<S>, reads: Vec<(Uuid, oneshot::Sender<Option<S>>)>) {
    for (id, reply) in reads {
        let _ = reply.send(log.states.get(&id).cloned());
    }
}

/// Answers a batch that did not commit (reads get the committed state: none here).
fn fail(batch: Batch, reason: &str, definitive: bool) {
    fn each<S>(decisions: Decisions<S>, reason: &str, definitive: bool) {
        let error = || CommandError::Unavailable {
            reason: reason.to_owned(),
            definitive,
        };
        for d in decisions.decided {
            let _ = d.reply.send(Err(error()));
        }
        for r in decisions.refused {
            let _ = r.reply.send(Err(error()));
        }
    }
    each(batch.users, reason, definitive);
    each(batch.news, reason, definitive);
}

fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => e.is_fatal() || e.code() == RDKafkaErrorCode::Fenced,
        other => matches!(
            other.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        ),
    }
}
