//! The loop every consumer of the log shares. A live consumer joins its model's Kafka
//! consumer group, so that any number of processes share the partitions; a replay assigns
//! itself every partition. Either reads from the offsets its store holds (not Kafka's),
//! reads batches, and hands each batch to the store, which applies the events and moves
//! the offsets in one atomic write (compare-and-set on the offsets it started from, so
//! that two instances cannot both apply a batch, during a rebalance included). An event
//! that cannot be decoded or applied after bounded retries is dead-lettered and later
//! events of its aggregate are parked behind it; everything else keeps flowing.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use newsroom_events::wire;
use newsroom_infra::codec::{self, Decoded};
use newsroom_infra::kafka::{best_effort_producer, dead_letter_topic, read_committed_consumer};
use newsroom_infra::metrics::{CONSUMER_EVENTS, PROJECTION_LAG_EVENTS, PROJECTION_LAG_MS};
use newsroom_infra::producer::Producer;
use newsroom_infra::registry::{self, Registry};
use newsroom_infra::settings::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer as _, RebalanceProtocol, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::dead_letters::{Aggregate, Parking};

/// Most events applied in one batch by a live consumer (a replay takes more at once: it
/// has no reader waiting for each batch).
const MAX_BATCH: usize = 1000;
const MAX_REPLAY_BATCH: usize = 5000;
/// Most lanes a replay runs (one per core up to this).
const MAX_REPLAY_LANES: usize = 8;
/// Times an event that fails to apply is tried before it is dead-lettered.
const ATTEMPTS: u32 = 3;
/// Pause after a failure of the store itself (retried without end: an outage is not the
/// event's fault).
const OUTAGE_PAUSE: Duration = Duration::from_millis(500);
/// How often parked aggregates are checked for requests when no events arrive.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// How often a live consumer rereads the stored offsets of the partitions other processes
/// hold (where it starts on any of them that it is given).
const KNOWN_REFRESH: Duration = Duration::from_secs(10);
/// How long a live consumer's process may be silent before the group gives its
/// partitions to the others (a kill -9 is noticed within this).
const SESSION_TIMEOUT_MS: &str = "6000";

/// A topic and partition.
pub type Position = (String, i32);
/// The next offset to apply, per position.
pub type Offsets = BTreeMap<Position, i64>;

/// How far a consumer has come.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Offsets committed.
    pub offsets: Offsets,
    /// Events applied (or parked) since it started.
    pub events: u64,
}

/// One record as read from the log.
pub struct Record {
    /// Topic it came from.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// When it was appended (milliseconds since the epoch), if the broker said.
    pub appended_ms: Option<i64>,
    /// Key (the aggregate id).
    pub key: Option<Vec<u8>>,
    /// The framed Avro payload (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Its `traceparent` header, read only when traces are exported.
    pub trace: Option<String>,
}

/// A message's `traceparent` header, when traces are exported.
fn traced(message: &impl rdkafka::message::Message) -> Option<String> {
    use rdkafka::message::Headers as _;
    if !newsroom_infra::trace::enabled() {
        return None;
    }
    message
        .headers()?
        .iter()
        .find(|h| h.key == newsroom_infra::trace::HEADER)
        .and_then(|h| h.value)
        .filter(|v| newsroom_infra::trace::sampled(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

impl Record {
    /// The aggregate the record belongs to: its key (a UUID's 16 bytes in newsroom's
    /// topics) as text.
    pub fn aggregate(&self) -> String {
        match self.key.as_deref() {
            None => String::new(),
            Some(key) => match uuid::Uuid::from_slice(key) {
                Ok(id) => id.to_string(),
                Err(_) => match std::str::from_utf8(key) {
                    Ok(text) => text.to_owned(),
                    Err(_) => key.iter().map(|b| format!("{b:02x}")).collect(),
                },
            },
        }
    }

    fn parked_as(&self) -> Aggregate {
        (self.topic.to_string(), self.aggregate())
    }
}

/// Which version of its read model a consumer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The version the query side serves (it follows a switch made by a replay).
    Live,
    /// The version a replay is building.
    Replay(i32),
}

/// What a store did with a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// Applied, offsets moved.
    Done,
    /// Nothing written: a replay is about to switch versions; try again shortly.
    Paused,
    /// Nothing written: the version or the stored offsets are not what this consumer
    /// started from (a switch, or another instance); reopen.
    Reopen,
}

/// Why a store wrote nothing.
#[derive(Debug)]
pub enum Failure {
    /// The store failed (connection, timeout): retried without end.
    Outage(anyhow::Error),
    /// Event `index` of the batch cannot be applied.
    Event {
        /// Its index in the batch handed to the store.
        index: usize,
        /// Why.
        error: anyhow::Error,
    },
}

/// Where a consumer's read model and offsets live.
pub trait Store: Send + Sync {
    /// The consumer's name (offsets, dead letters, metrics).
    fn name(&self) -> &'static str;
    /// The topics it consumes.
    fn topics(&self) -> Vec<String>;
    /// The version to write in `mode`, and its stored offsets.
    fn open(&self, mode: Mode) -> impl Future<Output = anyhow::Result<(i32, Offsets)>> + Send;
    /// Applies the batch's events to `version` and moves the offsets from `from` to `to`,
    /// all or nothing. Empty offset maps apply parked events without touching offsets.
    fn commit(
        &self,
        mode: Mode,
        version: i32,
        batch: Batch<'_>,
    ) -> impl Future<Output = Result<Committed, Failure>> + Send;
}

/// What a consumer hands its store.
pub struct Batch<'a> {
    /// The events, in log order.
    pub events: Vec<Decoded>,
    /// The offsets the consumer started from.
    pub from: &'a Offsets,
    /// The offsets after the batch.
    pub to: &'a Offsets,
    /// Whether the consumer has (about) reached the end of the log with this batch.
    pub caught_up: bool,
}

/// What every consumer needs besides its store.
#[derive(Clone)]
pub struct Context {
    /// Kafka.
    pub kafka: KafkaSettings,
    /// The database holding dead letters.
    pub pool: PgPool,
    /// Schemas.
    pub registry: Registry,
    /// How many live consumers of each store run side by side in this process, each with
    /// its own share of the partitions (ADR 34); a replay runs one per core.
    pub lanes: usize,
}

/// Which share of the partitions a consumer of a process's lanes takes: in a replay, the
/// partitions whose number is `index` modulo `of` (a live consumer is given its share by
/// its group).
#[derive(Clone, Copy)]
struct Lane {
    index: usize,
    of: usize,
}

impl Lane {
    fn takes(self, partition: i32) -> bool {
        usize::try_from(partition).is_ok_and(|p| p % self.of == self.index)
    }
}

/// Runs `store`'s consumer in `mode` until `shutdown` resolves, publishing the offsets it
/// has committed on `progress`.
pub async fn run<S: Store + 'static>(
    store: S,
    mode: Mode,
    context: Context,
    progress: watch::Sender<Progress>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_within(store, mode, None, context, progress, shutdown).await
}

/// Builds version `version` of `store`'s read model (as a replay does) from the offsets it
/// has stored, applying only the records below `ceiling` on each partition (none of a
/// partition it does not name), until `shutdown` resolves. What it stops short of is read
/// again by the next run from the stored offsets.
pub async fn run_below<S: Store + 'static>(
    store: S,
    version: i32,
    ceiling: &Offsets,
    context: Context,
    progress: watch::Sender<Progress>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mode = Mode::Replay(version);
    run_within(store, mode, Some(ceiling), context, progress, shutdown).await
}

async fn run_within<S: Store + 'static>(
    store: S,
    mode: Mode,
    ceiling: Option<&Offsets>,
    context: Context,
    progress: watch::Sender<Progress>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let producer = Producer::new(&best_effort_producer(&context.kafka))
        .context("creating the dead-letter producer")?;
    let label = match mode {
        Mode::Live => store.name().to_owned(),
        Mode::Replay(v) => format!("{}-replay-v{v}", store.name()),
    };
    // Each lane is a consumer of its own (a member of the group when live) on the
    // partitions it is given, on a task of its own: it decodes and applies its batches
    // beside the others'. Dropping the set (an error in one lane) stops the others.
    let (stop, stopping) = watch::channel(false);
    let of = match mode {
        Mode::Live => context.lanes.max(1),
        // A replay is a batch job: as many lanes as cores (lanes beyond the partitions
        // would idle), for a model of one topic. A model that joins topics (an inbox entry
        // needs the follow, from another topic, applied before the publication) is built
        // by one lane: lanes run at their own pace, so one topic's partitions would run
        // ahead of the other's.
        Mode::Replay(_) if store.topics().len() == 1 => {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_REPLAY_LANES))
        }
        Mode::Replay(_) => 1,
    };
    let shared = Arc::new((
        store,
        context,
        producer,
        progress,
        label.clone(),
        ceiling.cloned(),
    ));
    let mut lanes = tokio::task::JoinSet::new();
    for index in 0..of {
        let (shared, mut stopping) = (shared.clone(), stopping.clone());
        lanes.spawn(async move {
            let (store, context, producer, progress, label, ceiling) = &*shared;
            let shutdown = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            let session = Session {
                store,
                mode,
                ceiling: ceiling.as_ref(),
                context,
                producer,
                progress,
                label,
                lane: Lane { index, of },
            };
            session.run_until(shutdown).await
        });
    }
    tokio::pin!(shutdown);
    let mut stopped = false;
    loop {
        tokio::select! {
            () = &mut shutdown, if !stopped => {
                stopped = true;
                let _ = stop.send(true);
            }
            done = lanes.join_next() => match done {
                None => break,
                Some(done) => done.context("a consumer lane failed")??,
            },
        }
    }
    tracing::info!(consumer = %label, "consumer stopped");
    Ok(())
}

struct Session<'a, S> {
    store: &'a S,
    mode: Mode,
    ceiling: Option<&'a Offsets>,
    context: &'a Context,
    producer: &'a Producer,
    progress: &'a watch::Sender<Progress>,
    label: &'a str,
    lane: Lane,
}

impl<S: Store> Session<'_, S> {
    /// Runs sessions until `shutdown` resolves; a live consumer outlasts every outage, a
    /// replay reports it.
    async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            match self.run(&mut shutdown).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if self.mode == Mode::Live => {
                    tracing::warn!(consumer = %self.label, error = format!("{e:#}"), "consumer failed; starting over");
                    tokio::time::sleep(OUTAGE_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the store and consumes until shutdown (`true`) or until it must reopen.
    async fn run(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<bool> {
        let (version, offsets) = self.store.open(self.mode).await?;
        let parking = Parking::new(
            self.context.pool.clone(),
            self.store.name(),
            version,
            self.producer.clone(),
            dead_letter_topic(&self.context.kafka, self.store.name()),
        );
        let holding = Arc::new(Holding::default());
        let mut worker = Worker {
            store: self.store,
            mode: self.mode,
            ceiling: self.ceiling,
            version,
            registry: &self.context.registry,
            parked: HashSet::new(),
            parking,
            offsets: Offsets::new(),
            held: Some(BTreeSet::new()),
            label: self.label.to_owned(),
            lane: self.lane,
        };
        let consumer = match self.mode {
            // A live consumer holds what its group gives it (see `follow`).
            Mode::Live => {
                holding.know(offsets);
                worker.subscribe(&self.context.kafka, holding.clone())?
            }
            Mode::Replay(_) => {
                // This lane's partitions only: the others move under other lanes.
                worker.offsets = offsets
                    .into_iter()
                    .filter(|(p, _)| self.lane.takes(p.1))
                    .collect();
                worker.held = None;
                worker.parked = worker.parking.load(None).await?;
                worker.assign(&self.context.kafka, holding.clone()).await?
            }
        };
        self.progress.send_modify(|p| worker.report(p, 0));
        tracing::info!(consumer = %self.label, version, "consumer started");
        let max = match self.mode {
            Mode::Live => MAX_BATCH,
            Mode::Replay(_) => MAX_REPLAY_BATCH,
        };
        // The feeder fetches and decodes the next batch while this loop applies one.
        let (fed, feed) = tokio::sync::mpsc::channel(1);
        let feeder = Feeder(tokio::spawn(feed_from(
            consumer,
            self.context.registry.clone(),
            max,
            self.label.to_owned(),
            fed,
        )));
        let outcome = self
            .consume(&mut worker, &holding, feed, max, shutdown)
            .await;
        // The consumer leaves (its group, when live) before another one is made.
        feeder.finish().await;
        outcome
    }

    /// Applies what the feeder hands over until shutdown (`true`) or until the consumer
    /// must reopen.
    async fn consume(
        &self,
        worker: &mut Worker<'_, S>,
        holding: &Arc<Holding>,
        mut feed: tokio::sync::mpsc::Receiver<Fed>,
        max: usize,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<bool> {
        let mut tick = tokio::time::interval(IDLE_TICK);
        let mut refreshed = tokio::time::Instant::now();
        // A chunk that did not fit in the last batch.
        let mut next: Option<Fed> = None;
        // A batch to apply again, after the stored offsets moved under it.
        let mut again: Option<Fed> = None;
        loop {
            let retrying = again.is_some();
            let mut chunk = match again.take().or_else(|| next.take()) {
                Some(fed) => Some(fed),
                None => tokio::select! {
                    () = shutdown.as_mut() => return Ok(true),
                    _ = tick.tick() => None,
                    fed = feed.recv() => match fed {
                        Some(fed) => Some(fed),
                        None => anyhow::bail!("the consumer's feeder stopped"),
                    },
                },
            };
            // What else is decoded already joins the batch, up to its size.
            if let Some(fed) = &mut chunk {
                while next.is_none()
                    && let Ok(more) = feed.try_recv()
                {
                    if fed.records.len() + more.records.len() > max {
                        next = Some(more);
                        break;
                    }
                    fed.records.extend(more.records);
                    fed.decoded.extend(more.decoded);
                }
                fed.more = next.is_some() || !feed.is_empty();
            }
            // The group moved partitions while the consumer was polled: before anything
            // fetched is applied, follow what this process holds now.
            if holding.changed() && !worker.follow(holding).await? {
                return Ok(false);
            }
            if !worker.requests().await? {
                return Ok(false);
            }
            let Some(chunk) = chunk else {
                // Idle: let the store check that it still holds what this consumer thinks.
                if !worker.heartbeat().await {
                    return Ok(false);
                }
                if self.mode == Mode::Live && refreshed.elapsed() >= KNOWN_REFRESH {
                    refreshed = tokio::time::Instant::now();
                    if !worker.refresh(holding).await {
                        return Ok(false);
                    }
                }
                continue;
            };
            let count = chunk.records.len() as u64;
            match worker.batch(chunk).await? {
                Applied::Done => {}
                Applied::Reopen => return Ok(false),
                // The group moved a partition of the batch while it was applied (the
                // feeder polls the consumer meanwhile), and its new holder went first, or
                // this lane was given a partition whose offsets another process moved:
                // reread the stored offsets and apply the rest, once; a second time, or a
                // switched version, reopens.
                Applied::Moved(records) if !retrying => {
                    if !worker.follow(holding).await? {
                        return Ok(false);
                    }
                    again = Some(Fed {
                        decoded: records.iter().map(|_| None).collect(),
                        records,
                        more: true,
                    });
                    continue;
                }
                Applied::Moved(_) => return Ok(false),
            }
            holding.know_held(&worker.offsets);
            self.progress.send_modify(|p| worker.report(p, count));
        }
    }
}

/// What became of a batch.
enum Applied {
    /// Applied (or parked), offsets moved.
    Done,
    /// Nothing written; the consumer must reopen.
    Reopen,
    /// Nothing written: the stored offsets or the version moved under the batch; its
    /// records, to apply again after rereading them.
    Moved(Vec<Record>),
}

/// Records as fetched, each with what decoding it gave (see [`feed_from`]).
struct Fed {
    records: Vec<Record>,
    /// Per record: its event, or why it could not be decoded (`None`: not tried); taken by
    /// the first attempt to apply it (a retry decodes again).
    decoded: Vec<Option<Result<Decoded, Decoding>>>,
    /// Whether more was fetched already than this batch holds (it has not caught up).
    more: bool,
}

/// The task that fetches and decodes; stopped when dropped.
struct Feeder(tokio::task::JoinHandle<()>);

impl Feeder {
    /// Waits for the feeder to stop (its receiver is gone) and drop its consumer, at most
    /// [`FEEDER_STOP`]; then it is aborted (which drops the consumer too).
    async fn finish(mut self) {
        let _ = tokio::time::timeout(FEEDER_STOP, &mut self.0).await;
    }
}

/// How long a consumer waits for its feeder to stop.
const FEEDER_STOP: Duration = Duration::from_secs(10);

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fetches chunks of up to `max` records from `consumer` and decodes them, on a task of
/// its own, so that decoding (CPU) runs beside the store applying the previous batch;
/// hands them to `out` until it is closed. Polling the consumer here also runs its
/// rebalance callbacks.
async fn feed_from(
    consumer: StreamConsumer<ConsumerState>,
    registry: Registry,
    max: usize,
    label: String,
    out: tokio::sync::mpsc::Sender<Fed>,
) {
    let mut chunks = consumer.stream().ready_chunks(max);
    loop {
        let chunk = tokio::select! {
            () = out.closed() => return,
            chunk = chunks.next() => chunk,
        };
        let Some(chunk) = chunk else { return };
        let mut records = Vec::with_capacity(chunk.len());
        for message in chunk {
            match message {
                Ok(m) => records.push(Record {
                    topic: Arc::from(m.topic()),
                    partition: m.partition(),
                    offset: m.offset(),
                    appended_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    trace: traced(&m),
                }),
                Err(e) => tracing::warn!(consumer = %label, error = %e, "consumer error"),
            }
        }
        // After an outage the rest is left to the loop, which decodes again what it
        // needs once the registry is back; the loop going away stops the decoding.
        let decoding = async {
            let mut decoded = Vec::with_capacity(records.len());
            let mut out_of_service = false;
            for record in &records {
                if out_of_service {
                    decoded.push(None);
                    continue;
                }
                let result = decode(&registry, record.payload.as_deref()).await;
                out_of_service = matches!(result, Err(Decoding::Outage(_)));
                decoded.push(Some(result));
            }
            decoded
        };
        let decoded = tokio::select! {
            () = out.closed() => return,
            decoded = decoding => decoded,
        };
        let fed = Fed {
            records,
            decoded,
            more: false,
        };
        if out.send(fed).await.is_err() {
            return;
        }
    }
}

/// Decodes a record's payload; a registry that does not answer is an outage, anything
/// else the record's fault.
async fn decode(registry: &Registry, payload: Option<&[u8]>) -> Result<Decoded, Decoding> {
    let Some(bytes) = payload else {
        return Err(Decoding::Permanent(anyhow::anyhow!(
            "a record without a payload"
        )));
    };
    match codec::decode(registry, bytes).await {
        Ok(decoded) => Ok(decoded),
        // A fetch of the schema that timed out (under load the registry can be slow to
        // answer one call and quick the next) is an outage whatever a ping says.
        Err(e) if registry::unavailable(&e) => Err(Decoding::Outage(e)),
        // Garbage, or a schema id the registry (which answers) does not know.
        Err(e) if wire::unframe(bytes).is_err() || registry.ping().await => {
            Err(Decoding::Permanent(e))
        }
        Err(e) => Err(Decoding::Outage(e)),
    }
}

/// What a live consumer's group has given its process, shared between the rebalance
/// callback (which runs while the consumer is polled) and the loop.
#[derive(Default)]
struct Holding(Mutex<HoldingState>);

#[derive(Default)]
struct HoldingState {
    /// The stored offsets as last read: where fetching starts on an assigned partition.
    known: Offsets,
    /// The partitions held, each with the offset its fetching started from (`None`: the
    /// beginning).
    held: BTreeMap<Position, Option<i64>>,
    /// Whether `held` changed since the loop last looked.
    changed: bool,
}

impl Holding {
    fn state(&self) -> std::sync::MutexGuard<'_, HoldingState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces what is known of the stored offsets.
    fn know(&self, stored: Offsets) {
        self.state().known = stored;
    }

    /// Records the offsets this process committed on the partitions it holds.
    fn know_held(&self, committed: &Offsets) {
        let mut state = self.state();
        for (position, next) in committed {
            state.known.insert(position.clone(), *next);
        }
    }

    fn changed(&self) -> bool {
        std::mem::take(&mut self.state().changed)
    }

    fn held(&self) -> BTreeMap<Position, Option<i64>> {
        self.state().held.clone()
    }

    /// Carries out a rebalance: assigned partitions start at their known stored offsets.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<ConsumerState>,
        label: &str,
        lane: usize,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let positions: Vec<Position> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let mut state = self.state();
        state.changed = true;
        let (what, result) = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for (topic, partition) in &positions {
                    let start = state.known.get(&(topic.clone(), *partition)).copied();
                    let offset = start.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = list.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(consumer = %label, %topic, partition, error = %e, "cannot set where a partition starts");
                    }
                    state.held.insert((topic.clone(), *partition), start);
                }
                let result = if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                };
                ("partitions assigned", result)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for position in &positions {
                    state.held.remove(position);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                };
                ("partitions revoked", result)
            }
            other => {
                tracing::error!(consumer = %label, error = ?other, "rebalance failed; holding nothing");
                state.held.clear();
                ("partitions dropped", consumer.unassign())
            }
        };
        let named = |positions: &mut dyn Iterator<Item = &Position>| {
            positions
                .map(|(t, p)| format!("{t}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let partitions = named(&mut positions.iter());
        let holding = named(&mut state.held.keys());
        match result {
            // A cooperative rebalance that moved nothing here.
            Ok(()) if positions.is_empty() => {}
            Ok(()) => tracing::info!(consumer = %label, lane, %partitions, %holding, "{what}"),
            Err(e) => {
                tracing::error!(consumer = %label, %partitions, error = %e, "{what}, but librdkafka refused")
            }
        }
    }
}

/// What happens to a record of a batch.
#[derive(Clone)]
enum Fate {
    Apply,
    /// Parked: with a reason when it is the event that failed.
    Park(Option<String>),
}

struct Worker<'a, S> {
    store: &'a S,
    mode: Mode,
    version: i32,
    registry: &'a Registry,
    parking: Parking,
    parked: HashSet<Aggregate>,
    /// The next offset to apply on each held partition (absent: its beginning).
    offsets: Offsets,
    /// The partitions held (`None`: every one, as a replay).
    held: Option<BTreeSet<Position>>,
    /// The offsets a bounded build stops below (see [`run_below`]).
    ceiling: Option<&'a Offsets>,
    label: String,
    lane: Lane,
}

enum Decoding {
    Permanent(anyhow::Error),
    Outage(anyhow::Error),
}

impl<S: Store> Worker<'_, S> {
    fn consumer(
        &self,
        kafka: &KafkaSettings,
        holding: Arc<Holding>,
    ) -> anyhow::Result<StreamConsumer<ConsumerState>> {
        let group = format!("{}.{}", kafka.topic_prefix, self.label);
        read_committed_consumer(kafka, &group)
            .set("statistics.interval.ms", "1000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(ConsumerState {
                consumer: self.label.clone(),
                lane: self.lane.index,
                holding,
            })
            .context("creating the consumer")
    }

    /// A replay's consumer: every partition, from the stored offsets.
    async fn assign(
        &self,
        kafka: &KafkaSettings,
        holding: Arc<Holding>,
    ) -> anyhow::Result<StreamConsumer<ConsumerState>> {
        let consumer = self.consumer(kafka, holding)?;
        let mut assignment = TopicPartitionList::new();
        for topic in self.store.topics() {
            for partition in partitions_of(&consumer, &topic).await? {
                if !self.lane.takes(partition) {
                    continue;
                }
                let offset = self
                    .offsets
                    .get(&(topic.clone(), partition))
                    .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                assignment
                    .add_partition_offset(&topic, partition, offset)
                    .context("building the assignment")?;
            }
        }
        consumer
            .assign(&assignment)
            .context("assigning partitions")?;
        Ok(consumer)
    }

    /// A live consumer: a member of its model's group, holding what the group gives it.
    fn subscribe(
        &self,
        kafka: &KafkaSettings,
        holding: Arc<Holding>,
    ) -> anyhow::Result<StreamConsumer<ConsumerState>> {
        let consumer = self.consumer(kafka, holding)?;
        let topics = self.store.topics();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .context("joining the consumer group")?;
        Ok(consumer)
    }

    /// Follows a rebalance: reads the stored offsets of the partitions now held and their
    /// parked aggregates. `false` when the consumer must reopen: the version switched, or
    /// fetching started past what the store holds (the store lost data).
    async fn follow(&mut self, holding: &Holding) -> anyhow::Result<bool> {
        let held = holding.held();
        let (version, stored) = self.store.open(self.mode).await?;
        if version != self.version {
            return Ok(false);
        }
        for (position, start) in &held {
            // Fetching is past what the store holds when the store lost data (PostgreSQL
            // commits asynchronously, Redis keeps snapshots), either since the partition
            // was assigned or since this process applied more of it: read it again.
            let past = self.offsets.get(position).copied().max(*start);
            if let Some(past) = past
                && stored.get(position).is_none_or(|s| *s < past)
            {
                tracing::warn!(consumer = %self.label, topic = %position.0, partition = position.1, "the store is behind where fetching is; reopening");
                return Ok(false);
            }
        }
        let held: BTreeSet<Position> = held.into_keys().collect();
        self.offsets = stored
            .iter()
            .filter(|(p, _)| held.contains(*p))
            .map(|(p, o)| (p.clone(), *o))
            .collect();
        holding.know(stored);
        self.parked = self.parking.load(Some(&held)).await?;
        self.held = Some(held);
        Ok(true)
    }

    /// Rereads the stored offsets (where partitions the group may give this process
    /// later start); `false` when the consumer must reopen. A store that does not answer
    /// leaves what is known as it is (leaving the group over it would move every
    /// partition of every process).
    async fn refresh(&self, holding: &Holding) -> bool {
        match self.store.open(self.mode).await {
            Ok((version, _)) if version != self.version => false,
            Ok((_, stored)) => {
                holding.know(stored);
                holding.know_held(&self.offsets);
                true
            }
            Err(e) => {
                tracing::debug!(consumer = %self.label, error = format!("{e:#}"), "cannot reread the stored offsets");
                true
            }
        }
    }

    /// Adds to `progress` (shared by the lanes) this lane's offsets and `events` more.
    fn report(&self, progress: &mut Progress, events: u64) {
        let held = self.offsets.iter().filter(|(p, _)| self.holds(p));
        progress.offsets.extend(held.map(|(p, o)| (p.clone(), *o)));
        progress.events += events;
    }

    fn holds(&self, position: &Position) -> bool {
        match &self.held {
            Some(held) => held.contains(position),
            None => self.lane.takes(position.1),
        }
    }

    async fn decode(&self, payload: Option<&[u8]>) -> Result<Decoded, Decoding> {
        decode(self.registry, payload).await
    }

    /// Applies one batch.
    async fn batch(&mut self, fed: Fed) -> anyhow::Result<Applied> {
        // Only partitions held now, and only what is not applied yet: after a reopen or a
        // rebalance, records fetched before it may still arrive, and a partition given
        // back may be fetched again from where the store was.
        let mut to = self.offsets.clone();
        let fed_more = fed.more;
        let (records, mut decoded): (Vec<Record>, Vec<_>) = fed
            .records
            .into_iter()
            .zip(fed.decoded)
            .filter(|(r, _)| {
                let position = (r.topic.to_string(), r.partition);
                if !self.holds(&position)
                    || to.get(&position).is_some_and(|next| r.offset < *next)
                    || self
                        .ceiling
                        .is_some_and(|c| r.offset >= c.get(&position).copied().unwrap_or(0))
                {
                    return false;
                }
                to.insert(position, r.offset + 1);
                true
            })
            .unzip();
        if records.is_empty() {
            return Ok(Applied::Done);
        }
        // Each event that carries a trace context gets a span of that trace, open until
        // the batch is committed (or the consumer reopens).
        // A live consumer gives each event that carries a sampled trace context a span of
        // that trace, open until the batch is committed (or the consumer reopens). Replays
        // add none to old traces.
        let spans: Vec<Option<tracing::Span>> = records
            .iter()
            .map(|r| {
                let trace = r.trace.as_deref().filter(|_| self.mode == Mode::Live)?;
                let span = tracing::info_span!(
                    "apply",
                    consumer = %self.label,
                    topic = %r.topic,
                    partition = r.partition,
                    offset = r.offset
                );
                newsroom_infra::trace::continue_from(&span, trace);
                Some(span)
            })
            .collect();
        let mut fates = vec![Fate::Apply; records.len()];
        let mut failures = 0u32;
        loop {
            // Decide each record's fate in order: parked aggregates stay parked.
            let mut blocked = self.parked.clone();
            let mut events = Vec::new();
            let mut applied = Vec::new();
            let mut outage = None;
            for (i, r) in records.iter().enumerate() {
                let aggregate = r.parked_as();
                if matches!(fates[i], Fate::Park(_)) || blocked.contains(&aggregate) {
                    if matches!(fates[i], Fate::Apply) {
                        fates[i] = Fate::Park(None);
                    }
                    blocked.insert(aggregate);
                    continue;
                }
                let decoding = match decoded[i].take() {
                    Some(Ok(event)) => Ok(event),
                    Some(Err(Decoding::Permanent(e))) => Err(Decoding::Permanent(e)),
                    // Decoded again: the registry was out, or this is a retry.
                    Some(Err(Decoding::Outage(_))) | None => {
                        self.decode(r.payload.as_deref()).await
                    }
                };
                match decoding {
                    Ok(mut event) => {
                        // What the store starts from this event (an e-mail) continues
                        // this consumer's span.
                        event.trace = spans[i]
                            .as_ref()
                            .and_then(newsroom_infra::trace::traceparent);
                        events.push(event);
                        applied.push(i);
                    }
                    Err(Decoding::Permanent(e)) => {
                        fates[i] = Fate::Park(Some(format!("cannot decode: {e:#}")));
                        blocked.insert(aggregate);
                    }
                    Err(Decoding::Outage(e)) => {
                        outage = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = outage {
                tracing::warn!(consumer = %self.label, error = format!("{e:#}"), "the registry does not answer; retrying");
                tokio::time::sleep(OUTAGE_PAUSE).await;
                continue;
            }
            // Parked events are stored before the offsets move past them.
            for (i, fate) in fates.iter().enumerate() {
                if let Fate::Park(reason) = fate {
                    self.parking.park(&records[i], reason.as_deref()).await?;
                }
            }
            let count = events.len() as u64;
            let batch = Batch {
                events,
                from: &self.offsets,
                to: &to,
                caught_up: records.len() < MAX_BATCH && !fed_more,
            };
            match self.store.commit(self.mode, self.version, batch).await {
                Ok(Committed::Done) => {
                    self.offsets = to;
                    self.parked = blocked;
                    let parked = fates.iter().filter(|f| matches!(f, Fate::Park(_))).count();
                    self.observe(&records, count, parked as u64);
                    return Ok(Applied::Done);
                }
                Ok(Committed::Paused) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Committed::Reopen) if self.mode == Mode::Live => {
                    tracing::info!(consumer = %self.label, "version or offsets moved; rereading them");
                    return Ok(Applied::Moved(records));
                }
                Ok(Committed::Reopen) => {
                    tracing::info!(consumer = %self.label, "version or offsets moved; reopening");
                    return Ok(Applied::Reopen);
                }
                Err(Failure::Outage(e)) => {
                    tracing::warn!(consumer = %self.label, error = format!("{e:#}"), "the store failed; retrying");
                    tokio::time::sleep(OUTAGE_PAUSE).await;
                }
                Err(Failure::Event { index, error }) => {
                    failures += 1;
                    let Some(&i) = applied.get(index) else {
                        anyhow::bail!("the store blamed event {index} of {}", applied.len());
                    };
                    if failures < ATTEMPTS {
                        tracing::warn!(consumer = %self.label, offset = records[i].offset, error = format!("{error:#}"), "an event failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                    } else {
                        fates[i] = Fate::Park(Some(format!("cannot apply: {error:#}")));
                        failures = 0;
                    }
                }
            }
        }
    }

    /// An empty batch at the current offsets; `false` when the consumer must reopen.
    async fn heartbeat(&self) -> bool {
        let batch = Batch {
            events: Vec::new(),
            from: &self.offsets,
            to: &self.offsets,
            caught_up: true,
        };
        !matches!(
            self.store.commit(self.mode, self.version, batch).await,
            Ok(Committed::Reopen)
        )
    }

    /// Carries out pending `retry`/`skip` requests; `false` when the consumer must reopen.
    async fn requests(&mut self) -> anyhow::Result<bool> {
        if self.parked.is_empty() {
            return Ok(true);
        }
        let none = Offsets::new();
        for (topic, partition, aggregate, action) in self.parking.requests().await? {
            // Another process holds that partition and carries the request out.
            if !self.holds(&(topic.clone(), partition)) {
                continue;
            }
            let mut events = self.parking.events(&topic, &aggregate).await?.into_iter();
            if action == "skip"
                && let Some(head) = events.next()
            {
                self.parking.remove(&head).await?;
                tracing::warn!(consumer = %self.label, %topic, %aggregate, offset = head.offset, "skipped a dead-lettered event");
            }
            let mut cleared = true;
            for event in events {
                let decoded = match self.decode(event.payload.as_deref()).await {
                    Ok(d) => d,
                    Err(Decoding::Outage(e)) => return Err(e),
                    Err(Decoding::Permanent(e)) => {
                        self.parking
                            .failed_again(&event, &format!("cannot decode: {e:#}"))
                            .await?;
                        cleared = false;
                        break;
                    }
                };
                let batch = Batch {
                    events: vec![decoded],
                    from: &none,
                    to: &none,
                    caught_up: false,
                };
                match self.store.commit(self.mode, self.version, batch).await {
                    Ok(Committed::Done) => self.parking.remove(&event).await?,
                    Ok(Committed::Paused) => return Ok(true),
                    Ok(Committed::Reopen) => return Ok(false),
                    Err(Failure::Outage(e)) => return Err(e),
                    Err(Failure::Event { error, .. }) => {
                        self.parking
                            .failed_again(&event, &format!("cannot apply: {error:#}"))
                            .await?;
                        cleared = false;
                        break;
                    }
                }
            }
            self.parking.done(&topic, &aggregate).await?;
            if cleared {
                self.parked.remove(&(topic.clone(), aggregate.clone()));
                tracing::info!(consumer = %self.label, %topic, %aggregate, "a parked aggregate resumed");
            } else {
                tracing::warn!(consumer = %self.label, %topic, %aggregate, "a parked aggregate failed again");
            }
        }
        Ok(true)
    }

    fn observe(&self, records: &[Record], applied: u64, parked: u64) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
        for r in records {
            if let Some(at) = r.appended_ms {
                newest.insert(r.partition, at);
            }
        }
        for (partition, at) in newest {
            PROJECTION_LAG_MS
                .with_label_values(&[&self.label, &partition.to_string()])
                .set((now_ms - at).max(0));
        }
        CONSUMER_EVENTS
            .with_label_values(&[&self.label, "applied"])
            .inc_by(applied);
        CONSUMER_EVENTS
            .with_label_values(&[&self.label, "parked"])
            .inc_by(parked);
    }
}

/// A consumer's callbacks: librdkafka's per-partition consumer lag, published as
/// `newsroom_projection_lag_events`, and the rebalances of a live consumer's group.
pub struct ConsumerState {
    consumer: String,
    /// Which of the process's lanes it is.
    lane: usize,
    holding: Arc<Holding>,
}

impl rdkafka::ClientContext for ConsumerState {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                // What the consumer has been handed (or, before the first record, where
                // it fetches from), against the last stable offset of the partition.
                let position = if stats.app_offset >= 0 {
                    stats.app_offset
                } else {
                    stats.next_offset
                };
                if *partition < 0 || position < 0 || stats.ls_offset < 0 {
                    continue;
                }
                PROJECTION_LAG_EVENTS
                    .with_label_values(&[&self.consumer, &partition.to_string()])
                    .set((stats.ls_offset - position).max(0));
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ConsumerState {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        self.holding
            .rebalance(consumer, &self.consumer, self.lane, err, list);
    }
}

/// The partitions of `topic` (waits up to 30 s for it to exist).
pub async fn partitions_of<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<C>,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(metadata) = metadata {
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if !partitions.is_empty() {
                return Ok(partitions);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("topic {topic} has no partitions (does it exist? is Kafka up?)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
