//! The command side's way into the event log: appends go through one writer thread that
//! owns a transactional Kafka producer and commits everything waiting in one transaction
//! (group commit). An append is answered only after its transaction committed; when the
//! transaction fails it is aborted and the callers get [`AppendError::Unavailable`].
//!
//! librdkafka's transaction calls block, so the writer is a plain OS thread fed through a
//! bounded channel: a full channel is back-pressure and answers 503 at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use newsroom_events::consistency::Position;
use newsroom_infra::kafka::{Stream, transactional_producer};
use newsroom_infra::metrics::APPENDS;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Records waiting for the writer before new appends are refused.
const QUEUE_CAPACITY: usize = 4096;
/// Records in one transaction at most.
const MAX_BATCH_RECORDS: usize = 2000;
/// Pause between attempts to reach Kafka while it is down.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// One record to append.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// The stream (topic) it goes to.
    pub stream: Stream,
    /// The aggregate id: the record key, which picks the partition.
    pub key: Uuid,
    /// The framed Avro event.
    pub payload: Vec<u8>,
}

/// Why an append did not happen. In every case nothing of it is visible in the log.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Kafka could not be reached or refused the transaction; it was aborted.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
}

struct Job {
    records: Vec<OutRecord>,
    reply: oneshot::Sender<Result<Vec<(Stream, Position)>, AppendError>>,
}

impl Job {
    fn refuse(self, why: &str) {
        APPENDS
            .with_label_values(&["refused"])
            .inc_by(self.records.len() as u64);
        let _ = self
            .reply
            .send(Err(AppendError::Unavailable(why.to_owned())));
    }
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    jobs: SyncSender<Job>,
    connected: Arc<AtomicBool>,
}

impl EventLog {
    /// Starts the writer thread with transactional id `<prefix>.command.<instance>`.
    pub fn start(settings: &KafkaSettings) -> Self {
        let (jobs, queue) = sync_channel(QUEUE_CAPACITY);
        let connected = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            settings: settings.clone(),
            transactional_id: format!("{}.command.{}", settings.topic_prefix, settings.instance_id),
            connected: connected.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run(queue));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the event log writer");
        }
        EventLog { jobs, connected }
    }

    /// Whether the writer currently holds an initialised transactional producer.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Appends `records` atomically; returns where each landed, in order. Fails at once
    /// while the writer has no connection to Kafka.
    pub async fn append(
        &self,
        records: Vec<OutRecord>,
    ) -> Result<Vec<(Stream, Position)>, AppendError> {
        let (reply, answer) = oneshot::channel();
        if !self.is_connected() {
            Job { records, reply }.refuse("Kafka is unreachable");
            return answer
                .await
                .unwrap_or_else(|_| Err(AppendError::Unavailable("Kafka is unreachable".into())));
        }
        match self.jobs.try_send(Job { records, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                job.refuse("too many writes are waiting");
            }
            Err(TrySendError::Disconnected(job)) => {
                job.refuse("the writer has stopped");
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::Unavailable("the writer has stopped".into())))
    }
}

struct Writer {
    settings: KafkaSettings,
    transactional_id: String,
    connected: Arc<AtomicBool>,
}

impl Writer {
    fn run(self, queue: Receiver<Job>) {
        let mut producer: Option<FutureProducer<WriterContext>> = None;
        let mut last_error = String::new();
        loop {
            if producer.is_some() && !self.connected.load(Ordering::Relaxed) {
                // librdkafka reported every broker down: rebuild, so that "connected" again
                // means a fresh init_transactions succeeded.
                producer = None;
            }
            let Some(active) = producer.as_ref() else {
                match self.connect() {
                    Ok(p) => {
                        tracing::info!(transactional_id = %self.transactional_id, "event log writer connected");
                        producer = Some(p);
                        self.connected.store(true, Ordering::Relaxed);
                        last_error.clear();
                    }
                    Err(e) => {
                        let why = format!("Kafka unreachable: {e}");
                        if why != last_error {
                            tracing::warn!(error = %why, "event log writer cannot reach Kafka; refusing writes");
                            last_error = why.clone();
                        }
                        if !refuse_for(&queue, RECONNECT_PAUSE, &why) {
                            return;
                        }
                    }
                }
                continue;
            };
            let first = match queue.recv_timeout(RECONNECT_PAUSE) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            let mut records = batch[0].records.len();
            while records < MAX_BATCH_RECORDS {
                match queue.try_recv() {
                    Ok(job) => {
                        records += job.records.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.commit(active, batch) {
                tracing::warn!(error = %e, "transaction failed; the producer will be rebuilt");
                self.connected.store(false, Ordering::Relaxed);
                // A new producer with the same transactional id fences this one and aborts
                // whatever it left open, so nothing of the failed batch becomes visible.
                producer = None;
            }
        }
    }

    fn connect(&self) -> Result<FutureProducer<WriterContext>, KafkaError> {
        let context = WriterContext {
            connected: self.connected.clone(),
        };
        let producer: FutureProducer<WriterContext> =
            transactional_producer(&self.settings, &self.transactional_id)
                .create_with_context(context)?;
        producer.init_transactions(self.settings.timeout())?;
        Ok(producer)
    }

    /// Commits the batch in one transaction and answers every job. `Err` means the
    /// producer is unusable (every job was already answered with an error).
    fn commit(
        &self,
        producer: &FutureProducer<WriterContext>,
        batch: Vec<Job>,
    ) -> Result<(), String> {
        let count: usize = batch.iter().map(|j| j.records.len()).sum();
        match self.try_commit(producer, &batch) {
            Ok(deliveries) => {
                APPENDS
                    .with_label_values(&["committed"])
                    .inc_by(count as u64);
                let mut deliveries = deliveries.into_iter();
                for job in batch {
                    let positions: Vec<_> = deliveries.by_ref().take(job.records.len()).collect();
                    let _ = job.reply.send(Ok(positions));
                }
                Ok(())
            }
            Err(e) => {
                let why = e.to_string();
                let aborted = producer.abort_transaction(self.settings.timeout());
                APPENDS.with_label_values(&["failed"]).inc_by(count as u64);
                for job in batch {
                    let _ = job.reply.send(Err(AppendError::Unavailable(why.clone())));
                }
                match aborted {
                    Ok(()) if !is_fatal(&e) => Ok(()),
                    Ok(()) => Err(why),
                    Err(abort) => Err(format!("{why}; abort failed: {abort}")),
                }
            }
        }
    }

    fn try_commit(
        &self,
        producer: &FutureProducer<WriterContext>,
        batch: &[Job],
    ) -> Result<Vec<(Stream, Position)>, KafkaError> {
        producer.begin_transaction()?;
        let mut pending = Vec::new();
        for record in batch.iter().flat_map(|j| &j.records) {
            let topic = record.stream.topic(&self.settings);
            let key = record.key.as_bytes();
            let delivery = producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key(key.as_slice())
                        .payload(&record.payload),
                )
                .map_err(|(e, _)| e)?;
            pending.push((record.stream, delivery));
        }
        // Committing flushes every record; afterwards all deliveries have resolved.
        producer.commit_transaction(self.settings.timeout())?;
        let mut positions = Vec::with_capacity(pending.len());
        for (stream, delivery) in pending {
            let delivered = futures::executor::block_on(delivery)
                .map_err(|_| KafkaError::Canceled)?
                .map_err(|(e, _)| e)?;
            positions.push((
                stream,
                Position {
                    partition: delivered.partition,
                    offset: delivered.offset,
                },
            ));
        }
        Ok(positions)
    }
}

fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => e.is_fatal(),
        other => other
            .rdkafka_error_code()
            .is_some_and(|c| matches!(c, RDKafkaErrorCode::Fatal | RDKafkaErrorCode::Fenced)),
    }
}

/// Routes librdkafka's logs into tracing and notices when every broker is down.
struct WriterContext {
    connected: Arc<AtomicBool>,
}

impl ClientContext for WriterContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connected.store(false, Ordering::Relaxed);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

/// Answers every job arriving within `pause` with `why`; false if all senders are gone.
fn refuse_for(queue: &Receiver<Job>, pause: Duration, why: &str) -> bool {
    let until = Instant::now() + pause;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match queue.recv_timeout(left) {
            Ok(job) => job.refuse(why),
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}
