//! The loop every consumer of the log shares. It assigns itself every partition of its
//! topics from the offsets its store holds (not Kafka's), reads batches, and hands each
//! batch to the store, which applies the events and moves the offsets in one atomic write
//! (compare-and-set on the offsets it started from, so that two instances cannot both
//! apply a batch). An event that cannot be decoded or applied after bounded retries is
//! dead-lettered and later events of its aggregate are parked behind it; everything else
//! keeps flowing.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use newsroom_events::wire;
use newsroom_infra::codec::{self, Decoded};
use newsroom_infra::kafka::{best_effort_producer, dead_letter_topic, read_committed_consumer};
use newsroom_infra::metrics::{CONSUMER_EVENTS, PROJECTION_LAG_EVENTS, PROJECTION_LAG_MS};
use newsroom_infra::producer::Producer;
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::dead_letters::{Aggregate, Parking};

/// Most events applied in one batch by a live consumer (a replay takes more at once: it
/// has no reader waiting for each batch).
const MAX_BATCH: usize = 1000;
const MAX_REPLAY_BATCH: usize = 5000;
/// Times an event that fails to apply is tried before it is dead-lettered.
const ATTEMPTS: u32 = 3;
/// Pause after a failure of the store itself (retried without end: an outage is not the
/// event's fault).
const OUTAGE_PAUSE: Duration = Duration::from_millis(500);
/// How often parked aggregates are checked for requests when no events arrive.
const IDLE_TICK: Duration = Duration::from_millis(500);

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
}

/// Runs `store`'s consumer in `mode` until `shutdown` resolves, publishing the offsets it
/// has committed on `progress`.
pub async fn run<S: Store>(
    store: S,
    mode: Mode,
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
    tokio::pin!(shutdown);
    loop {
        let session = Session {
            store: &store,
            mode,
            context: &context,
            producer: &producer,
            progress: &progress,
            label: &label,
        };
        match session.run(&mut shutdown).await {
            Ok(true) => break,
            Ok(false) => {}
            // A live consumer outlasts every outage; a replay reports it.
            Err(e) if mode == Mode::Live => {
                tracing::warn!(consumer = %label, error = format!("{e:#}"), "consumer failed; starting over");
                tokio::time::sleep(OUTAGE_PAUSE).await;
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(consumer = %label, "consumer stopped");
    Ok(())
}

struct Session<'a, S> {
    store: &'a S,
    mode: Mode,
    context: &'a Context,
    producer: &'a Producer,
    progress: &'a watch::Sender<Progress>,
    label: &'a str,
}

impl<S: Store> Session<'_, S> {
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
        let mut worker = Worker {
            store: self.store,
            mode: self.mode,
            version,
            registry: &self.context.registry,
            parked: parking.load().await?,
            parking,
            offsets,
            label: self.label.to_owned(),
        };
        let consumer = worker.assign(&self.context.kafka).await?;
        self.progress
            .send_modify(|p| p.offsets.clone_from(&worker.offsets));
        tracing::info!(consumer = %self.label, version, "consumer started");
        let max = match self.mode {
            Mode::Live => MAX_BATCH,
            Mode::Replay(_) => MAX_REPLAY_BATCH,
        };
        let mut batches = consumer.stream().ready_chunks(max);
        let mut tick = tokio::time::interval(IDLE_TICK);
        loop {
            let chunk = tokio::select! {
                () = shutdown.as_mut() => return Ok(true),
                _ = tick.tick() => None,
                chunk = batches.next() => chunk,
            };
            if !worker.requests().await? {
                return Ok(false);
            }
            let Some(chunk) = chunk else {
                // Idle: let the store check that it still holds what this consumer thinks.
                if !worker.heartbeat().await {
                    return Ok(false);
                }
                continue;
            };
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
                    }),
                    Err(e) => tracing::warn!(consumer = %self.label, error = %e, "consumer error"),
                }
            }
            let count = records.len() as u64;
            if !worker.batch(records).await? {
                return Ok(false);
            }
            self.progress.send_modify(|p| {
                p.offsets.clone_from(&worker.offsets);
                p.events += count;
            });
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
    offsets: Offsets,
    label: String,
}

enum Decoding {
    Permanent(anyhow::Error),
    Outage(anyhow::Error),
}

impl<S: Store> Worker<'_, S> {
    async fn assign(&self, kafka: &KafkaSettings) -> anyhow::Result<StreamConsumer<LagContext>> {
        let group = format!("{}.{}", kafka.topic_prefix, self.label);
        let consumer: StreamConsumer<LagContext> = read_committed_consumer(kafka, &group)
            .set("statistics.interval.ms", "1000")
            .create_with_context(LagContext {
                consumer: self.label.clone(),
            })
            .context("creating the consumer")?;
        let mut assignment = TopicPartitionList::new();
        for topic in self.store.topics() {
            for partition in partitions_of(&consumer, &topic).await? {
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

    async fn decode(&self, payload: Option<&[u8]>) -> Result<Decoded, Decoding> {
        let Some(bytes) = payload else {
            return Err(Decoding::Permanent(anyhow::anyhow!(
                "a record without a payload"
            )));
        };
        match codec::decode(self.registry, bytes).await {
            Ok(decoded) => Ok(decoded),
            // Garbage, or a schema id the registry (which answers) does not know.
            Err(e) if wire::unframe(bytes).is_err() || self.registry.ping().await => {
                Err(Decoding::Permanent(e))
            }
            Err(e) => Err(Decoding::Outage(e)),
        }
    }

    /// Applies one batch; `false` when the consumer must reopen.
    async fn batch(&mut self, records: Vec<Record>) -> anyhow::Result<bool> {
        // After a reopen, records fetched before it may still arrive: skip what is applied.
        let records: Vec<Record> = records
            .into_iter()
            .filter(|r| {
                self.offsets
                    .get(&(r.topic.to_string(), r.partition))
                    .is_none_or(|next| r.offset >= *next)
            })
            .collect();
        if records.is_empty() {
            return Ok(true);
        }
        let mut to = self.offsets.clone();
        for r in &records {
            to.insert((r.topic.to_string(), r.partition), r.offset + 1);
        }
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
                match self.decode(r.payload.as_deref()).await {
                    Ok(event) => {
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
                caught_up: records.len() < MAX_BATCH,
            };
            match self.store.commit(self.mode, self.version, batch).await {
                Ok(Committed::Done) => {
                    self.offsets = to;
                    self.parked = blocked;
                    let parked = fates.iter().filter(|f| matches!(f, Fate::Park(_))).count();
                    self.observe(&records, count, parked as u64);
                    return Ok(true);
                }
                Ok(Committed::Paused) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Committed::Reopen) => {
                    tracing::info!(consumer = %self.label, "version or offsets moved; reopening");
                    return Ok(false);
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
        for (topic, aggregate, action) in self.parking.requests().await? {
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

/// Publishes librdkafka's per-partition consumer lag as `newsroom_projection_lag_events`.
pub struct LagContext {
    consumer: String,
}

impl rdkafka::ClientContext for LagContext {
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

impl rdkafka::consumer::ConsumerContext for LagContext {}

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
