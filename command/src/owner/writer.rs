//! The writer of one partition of one aggregate topic: applies commands one after another
//! against the partition's state and commits each batch in one Kafka transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use newsroom_events::EventMetadata;
use newsroom_events::consistency::Position;
use newsroom_events::metadata::micros;
use newsroom_infra::kafka::transactional_producer;
use newsroom_infra::metrics::APPENDS;
use newsroom_infra::producer::{self, Record};
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{CommandError, Committed, Request, Shared, rebuild, snapshot};
use crate::aggregate::Aggregate;
use crate::domain::Stamp;

/// Requests taken into one transaction at most.
const MAX_BATCH: usize = 1000;
/// Requests waiting for a writer before new ones are refused.
const QUEUE: usize = 4096;
/// Pause between attempts to reach Kafka again.
const RECOVERY_PAUSE: Duration = Duration::from_millis(250);

type Producer = producer::Producer<WriterContext>;

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

/// The writer's view of its partition: the committed state and where the log ends.
struct Log<S> {
    states: HashMap<Uuid, S>,
    next_offset: i64,
    since_snapshot: u64,
}

impl<S: Clone> Log<S> {
    fn new(states: HashMap<Uuid, S>, next_offset: i64) -> Self {
        Log {
            states,
            next_offset,
            since_snapshot: 0,
        }
    }
}

struct Connection {
    producer: Producer,
    connected: Arc<AtomicBool>,
}

/// How a transaction failed.
enum Failure {
    /// Aborted: nothing is in the log; the producer can go on.
    Aborted(String),
    /// Kafka did not confirm the outcome, or the abort failed: rebuild before going on.
    Uncertain(String),
    /// Another owner took the partition: stop.
    Fenced(String),
}

fn transactional_id<A: Aggregate>(shared: &Shared, partition: i32) -> String {
    format!(
        "{}.cmd.{}.{}",
        shared.kafka.topic_prefix,
        A::STREAM.name(),
        partition
    )
}

/// The request queue of a started writer and the state it started from.
pub type Started<A> = (
    mpsc::Sender<Request<A>>,
    HashMap<Uuid, <A as Aggregate>::State>,
);

/// Answers whether this process still owns the partition (after a fencing error, a
/// writer whose process still owns the partition takes it back instead of stopping: the
/// fencing came from a takeover that was abandoned).
pub type StillOwned = Arc<dyn Fn() -> bool + Send + Sync>;

/// Connects (fencing any previous writer of the partition), rebuilds the state, and starts
/// the writer task; returns its request queue and a copy of the state it starts from.
pub async fn start<A: Aggregate>(
    shared: Arc<Shared>,
    partition: i32,
    still_owned: StillOwned,
) -> anyhow::Result<Started<A>> {
    let connection = connect::<A>(&shared, partition).await?;
    let (states, next_offset) = rebuild::state::<A>(&shared, partition).await?;
    tracing::info!(
        stream = A::STREAM.name(),
        partition,
        aggregates = states.len(),
        next_offset,
        "partition writer ready"
    );
    let (sender, requests) = mpsc::channel(QUEUE);
    let initial = states.clone();
    let log = Log::new(states, next_offset);
    tokio::spawn(run::<A>(
        shared,
        partition,
        connection,
        log,
        requests,
        still_owned,
    ));
    Ok((sender, initial))
}

async fn connect<A: Aggregate>(shared: &Shared, partition: i32) -> anyhow::Result<Connection> {
    let id = transactional_id::<A>(shared, partition);
    let connected = Arc::new(AtomicBool::new(true));
    let context = WriterContext {
        connected: connected.clone(),
        kafka_up: shared.kafka_up.clone(),
    };
    let producer = Producer::with_context(&transactional_producer(&shared.kafka, &id), context)?;
    let timeout = shared.kafka.timeout();
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(timeout)).await??;
    shared.kafka_up.store(true, Ordering::Relaxed);
    Ok(Connection {
        producer,
        connected,
    })
}

async fn run<A: Aggregate>(
    shared: Arc<Shared>,
    partition: i32,
    mut connection: Connection,
    mut log: Log<A::State>,
    mut requests: mpsc::Receiver<Request<A>>,
    still_owned: StillOwned,
) {
    let topic = A::STREAM.topic(&shared.kafka);
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        if !connection.connected.load(Ordering::Relaxed) {
            refuse(batch, "Kafka is unreachable");
            match recover::<A>(&shared, partition, &mut requests).await {
                Some((c, l)) => (connection, log) = (c, l),
                None => return,
            }
            continue;
        }
        match serve_batch::<A>(
            &shared,
            &topic,
            partition,
            &connection.producer,
            &mut log.states,
            batch,
        )
        .await
        {
            Ok(done) => {
                if let Some(last) = done.last_offset {
                    log.next_offset = last + 1;
                }
                log.since_snapshot += done.events;
                let due = done.events > 0 && log.since_snapshot >= shared.kafka.snapshot_every;
                if done.force_snapshot || due {
                    log.since_snapshot = 0;
                    let states: Vec<A::State> = log.states.values().cloned().collect();
                    let (pool, next) = (shared.pool.clone(), log.next_offset);
                    tokio::spawn(async move {
                        if let Err(e) = snapshot::save::<A>(&pool, partition, states, next).await {
                            tracing::warn!(partition, error = format!("{e:#}"), "snapshot failed");
                        }
                    });
                }
            }
            Err(Failure::Aborted(reason)) => {
                tracing::warn!(partition, reason, "transaction aborted")
            }
            Err(Failure::Uncertain(reason)) => {
                tracing::warn!(
                    partition,
                    reason,
                    "transaction outcome unknown; rebuilding the partition"
                );
                match recover::<A>(&shared, partition, &mut requests).await {
                    Some((c, l)) => (connection, log) = (c, l),
                    None => return,
                }
            }
            Err(Failure::Fenced(reason)) if still_owned() => {
                tracing::warn!(
                    stream = A::STREAM.name(),
                    partition,
                    reason,
                    "fenced by an abandoned takeover; taking the partition back"
                );
                match recover::<A>(&shared, partition, &mut requests).await {
                    Some((c, l)) => (connection, log) = (c, l),
                    None => return,
                }
            }
            Err(Failure::Fenced(reason)) => {
                tracing::warn!(
                    stream = A::STREAM.name(),
                    partition,
                    reason,
                    "fenced: another process owns the partition now"
                );
                return;
            }
        }
    }
    tracing::info!(
        stream = A::STREAM.name(),
        partition,
        "partition writer stopped"
    );
}

/// Reconnects and rebuilds, refusing requests (fast 503) until it works. `None` when the
/// partition was given up meanwhile (every sender gone).
async fn recover<A: Aggregate>(
    shared: &Arc<Shared>,
    partition: i32,
    requests: &mut mpsc::Receiver<Request<A>>,
) -> Option<(Connection, Log<A::State>)> {
    loop {
        let attempt = async {
            let connection = connect::<A>(shared, partition).await?;
            let (states, next_offset) = rebuild::state::<A>(shared, partition).await?;
            anyhow::Ok((connection, Log::new(states, next_offset)))
        };
        tokio::pin!(attempt);
        // Refuse what arrives while the attempt runs, so callers never wait on a dead Kafka.
        let outcome = loop {
            tokio::select! {
                outcome = &mut attempt => break outcome,
                request = requests.recv() => match request {
                    Some(request) => refuse(vec![request], "Kafka is unreachable"),
                    None => return None,
                },
            }
        };
        match outcome {
            Ok(recovered) => {
                tracing::info!(
                    stream = A::STREAM.name(),
                    partition,
                    "partition writer reconnected"
                );
                return Some(recovered);
            }
            Err(e) => {
                tracing::debug!(partition, error = format!("{e:#}"), "reconnecting failed");
                let pause = tokio::time::sleep(RECOVERY_PAUSE);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        request = requests.recv() => match request {
                            Some(request) => refuse(vec![request], "Kafka is unreachable"),
                            None => return None,
                        },
                    }
                }
            }
        }
    }
}

fn refuse<A: Aggregate>(batch: Vec<Request<A>>, reason: &str) {
    for request in batch {
        match request {
            Request::Command { reply, .. } => {
                APPENDS.with_label_values(&["refused"]).inc();
                let _ = reply.send(Err(CommandError::unavailable(reason)));
            }
            Request::Read { reply, .. } => drop(reply),
        }
    }
}

/// What a committed batch did.
struct BatchDone {
    events: u64,
    last_offset: Option<i64>,
    force_snapshot: bool,
}

struct Decided<S> {
    reply: oneshot::Sender<Result<Committed<S>, CommandError>>,
    id: Uuid,
    payload: Vec<u8>,
}

async fn serve_batch<A: Aggregate>(
    shared: &Arc<Shared>,
    topic: &str,
    partition: i32,
    producer: &Producer,
    states: &mut HashMap<Uuid, A::State>,
    batch: Vec<Request<A>>,
) -> Result<BatchDone, Failure> {
    // Commands see the effects of earlier commands of the same batch (an overlay), so
    // they are applied strictly one after another; nothing reaches `states` before commit.
    let mut overlay: HashMap<Uuid, Option<A::State>> = HashMap::new();
    let mut decided: Vec<Decided<A::State>> = Vec::new();
    let mut reads = Vec::new();
    let mut force_snapshot = false;
    let id_of = |name: &str| shared.registry.id_of(name);
    for request in batch {
        match request {
            Request::Read { id, reply } => reads.push((id, reply)),
            Request::Command {
                id,
                command,
                meta,
                reply,
            } => {
                let current = match overlay.get(&id) {
                    Some(state) => state.clone(),
                    None => states.get(&id).cloned(),
                };
                let change = match A::handle(id, current.as_ref(), command) {
                    Ok(change) => change,
                    Err(refused) => {
                        let _ = reply.send(Err(refused.into()));
                        continue;
                    }
                };
                let version = current.as_ref().map_or(0, A::version) + 1;
                let metadata = EventMetadata {
                    event_id: meta.event_id,
                    aggregate_id: id,
                    aggregate_version: version,
                    occurred_at: micros(meta.now),
                    correlation_id: meta.correlation_id,
                    causation_id: meta.command_id,
                    actor_id: meta.actor_id,
                    schema_version: 0,
                };
                match A::encode(&change, metadata, &shared.keys, &id_of) {
                    Ok(payload) => {
                        force_snapshot |= A::forces_snapshot(&change);
                        let stamp = Stamp {
                            id,
                            version,
                            at: meta.now,
                        };
                        overlay.insert(id, A::apply(current, &change, stamp));
                        decided.push(Decided { reply, id, payload });
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "encoding an event failed");
                        let _ = reply.send(Err(CommandError::unavailable(
                            "the event could not be encoded",
                        )));
                    }
                }
            }
        }
    }
    let outcome = if decided.is_empty() {
        Ok(Vec::new())
    } else {
        let records: Vec<(Uuid, Vec<u8>)> = decided
            .iter_mut()
            .map(|d| (d.id, std::mem::take(&mut d.payload)))
            .collect();
        let producer = producer.clone();
        let topic = topic.to_owned();
        let timeout = shared.kafka.timeout();
        let started = std::time::Instant::now();
        let count = records.len();
        let outcome = tokio::task::spawn_blocking(move || {
            commit(&producer, &topic, partition, &records, timeout)
        })
        .await
        .unwrap_or_else(|e| Err(Failure::Uncertain(format!("the commit task failed: {e}"))));
        tracing::debug!(
            partition,
            events = count,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "transaction"
        );
        outcome
    };
    match outcome {
        Ok(offsets) => {
            APPENDS
                .with_label_values(&["committed"])
                .inc_by(decided.len() as u64);
            let summary = BatchDone {
                events: decided.len() as u64,
                last_offset: offsets.iter().copied().max(),
                force_snapshot,
            };
            for (id, state) in overlay {
                match state {
                    Some(state) => states.insert(id, state),
                    None => states.remove(&id),
                };
            }
            for (d, offset) in decided.into_iter().zip(offsets) {
                let answer = states
                    .get(&d.id)
                    .cloned()
                    .map(|state| Committed {
                        state,
                        position: Position { partition, offset },
                    })
                    .ok_or_else(|| CommandError::unavailable("state missing after commit"));
                let _ = d.reply.send(answer);
            }
            for (id, reply) in reads {
                let _ = reply.send(states.get(&id).cloned());
            }
            Ok(summary)
        }
        Err(failure) => {
            APPENDS
                .with_label_values(&["failed"])
                .inc_by(decided.len() as u64);
            let (reason, definitive) = match &failure {
                Failure::Aborted(r) | Failure::Fenced(r) => (r.clone(), true),
                Failure::Uncertain(r) => (r.clone(), false),
            };
            for d in decided {
                let _ = d.reply.send(Err(CommandError::Unavailable {
                    reason: reason.clone(),
                    definitive,
                }));
            }
            for (id, reply) in reads {
                let _ = reply.send(states.get(&id).cloned());
            }
            Err(failure)
        }
    }
}

fn is_fenced(error: &KafkaError) -> bool {
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

/// Begins, produces, commits. Runs on a blocking thread.
fn commit(
    producer: &Producer,
    topic: &str,
    partition: i32,
    records: &[(Uuid, Vec<u8>)],
    timeout: Duration,
) -> Result<Vec<i64>, Failure> {
    let abort = |error: KafkaError| {
        if is_fenced(&error) {
            return Failure::Fenced(error.to_string());
        }
        match producer.abort_transaction(timeout) {
            Ok(()) => Failure::Aborted(error.to_string()),
            Err(abort) if is_fenced(&abort) => Failure::Fenced(abort.to_string()),
            // Nothing was committed; the next init_transactions aborts what is open.
            Err(abort) => Failure::Uncertain(format!("{error}; abort failed: {abort}")),
        }
    };
    producer.begin_transaction().map_err(abort)?;
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, payload) in records {
        let record = Record {
            topic,
            partition: Some(partition),
            key: Some(key.as_bytes().as_slice()),
            payload: Some(payload),
            headers: None,
        };
        deliveries.push(producer.send(record).map_err(abort)?);
    }
    // Wait for the acknowledgements first: with nothing left in flight, the flush inside
    // commit_transaction returns at once (otherwise rust-rdkafka's flush polls the event
    // queue that the polling thread drains, and waits 100 ms for nothing).
    let mut offsets = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match futures::executor::block_on(delivery) {
            Ok((_, offset)) => offsets.push(offset),
            Err(error) => return Err(abort(error)),
        }
    }
    // The delivery counter can lag the reports by a moment; settle it with short flushes
    // so that commit_transaction's own flush finds nothing in flight.
    let deadline = std::time::Instant::now() + timeout;
    while producer.flush(Duration::from_millis(1)).is_err() {
        if std::time::Instant::now() >= deadline {
            return Err(abort(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut)));
        }
    }
    if let Err(error) = producer.commit_transaction(timeout) {
        return Err(match &error {
            KafkaError::Transaction(e) if e.txn_requires_abort() => abort(error),
            _ if is_fenced(&error) => Failure::Fenced(error.to_string()),
            _ => Failure::Uncertain(error.to_string()),
        });
    }
    Ok(offsets)
}
