//! The one factory of Kafka clients: every producer, consumer and admin client of newsroom
//! is configured here, so that timeouts, isolation and logging are the same everywhere.

use std::time::Duration;

use anyhow::Context as _;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::settings::KafkaSettings;

/// The event streams of newsroom, each one topic named `<prefix>.<stream>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Events of the User aggregate, keyed by user id.
    Users,
    /// Events of the News aggregate, keyed by news id.
    News,
    /// Read facts, keyed by user id.
    Reads,
}

impl Stream {
    /// Every stream.
    pub const ALL: [Stream; 3] = [Stream::Users, Stream::News, Stream::Reads];

    /// The stream's name without the deployment prefix (as in consistency tokens).
    pub fn name(self) -> &'static str {
        match self {
            Stream::Users => "users",
            Stream::News => "news",
            Stream::Reads => "reads",
        }
    }

    /// The stream's topic under `settings`' prefix.
    pub fn topic(self, settings: &KafkaSettings) -> String {
        format!("{}.{}", settings.topic_prefix, self.name())
    }
}

fn base(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", format!("newsroom-{}", settings.instance_id))
        .set("socket.connection.setup.timeout.ms", "2000")
        .set("reconnect.backoff.max.ms", "1000")
        // Metadata cached while a broker was away (a partition "unknown", a leader gone)
        // is asked for again within 30 s, not the default 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "30000")
        .set("log_level", "4")
        .set("security.protocol", &settings.security_protocol);
    if settings
        .security_protocol
        .to_ascii_lowercase()
        .starts_with("sasl_")
    {
        config.set("sasl.mechanisms", &settings.sasl_mechanism);
        if let Some(username) = &settings.sasl_username {
            config.set("sasl.username", username);
        }
        if let Some(password) = &settings.sasl_password {
            config.set("sasl.password", password.expose());
        }
    }
    for (key, value) in [
        ("ssl.ca.location", &settings.ssl_ca_location),
        (
            "ssl.certificate.location",
            &settings.ssl_certificate_location,
        ),
        ("ssl.key.location", &settings.ssl_key_location),
    ] {
        if let Some(value) = value {
            config.set(key, value);
        }
    }
    // NEWSROOM_KAFKA_DEBUG=eos,broker,... turns on librdkafka's debug contexts.
    if let Ok(contexts) = std::env::var("NEWSROOM_KAFKA_DEBUG") {
        config.set("debug", contexts).set("log_level", "7");
    }
    config
}

/// A producer's `init_transactions` (`init`), tried again while Kafka answers with a retriable error (a
/// coordinator still loading its transaction log after a broker start answers
/// COORDINATOR_LOAD_IN_PROGRESS), until `timeout` has passed. Blocking.
pub fn init_transactions(
    timeout: Duration,
    mut init: impl FnMut(Duration) -> rdkafka::error::KafkaResult<()>,
) -> rdkafka::error::KafkaResult<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match init(left.max(Duration::from_millis(100))) {
            Err(rdkafka::error::KafkaError::Transaction(e))
                if e.is_retriable() && std::time::Instant::now() + RETRY_PAUSE < deadline =>
            {
                tracing::info!(error = %e, "init_transactions: retrying");
                std::thread::sleep(RETRY_PAUSE);
            }
            outcome => return outcome,
        }
    }
}

/// The pause between two tries of `init_transactions`.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// A transactional, idempotent producer configuration with the given transactional id.
pub fn transactional_producer(settings: &KafkaSettings, transactional_id: &str) -> ClientConfig {
    let timeout = settings.timeout_ms.max(1000);
    let mut config = base(settings);
    config
        .set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The writer batches by itself: send what a transaction holds at once.
        .set("linger.ms", "0")
        // A transaction begun right after a commit meets CONCURRENT_TRANSACTIONS while the
        // broker writes the previous markers; the default 100 ms retry backoff would make
        // every batch wait for it.
        .set("retry.backoff.ms", "2")
        .set("retry.backoff.max.ms", "50")
        // lz4, not zstd: the broker decompresses every batch to validate it, and each
        // consumer once more; zstd cost the broker and the consumers several times more.
        .set("compression.type", "lz4")
        .set("message.timeout.ms", timeout.to_string())
        // A transaction a dead process left open holds back read_committed readers, and so
        // the takeover of its partitions, until the coordinator aborts it: keep it short.
        .set(
            "transaction.timeout.ms",
            (timeout * 3).max(6_000).to_string(),
        );
    config
}

/// An idempotent, non-transactional producer for facts that may be dropped under
/// pressure (reads): bounded queue, short delivery timeout.
pub fn best_effort_producer(settings: &KafkaSettings) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "100000")
        .set("message.timeout.ms", "10000");
    config
}

/// A consumer configuration that sees only committed records and never commits offsets to
/// Kafka: consumers keep their offsets with their writes.
pub fn read_committed_consumer(settings: &KafkaSettings, group_id: &str) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // A fetch is answered as soon as anything new is readable (fetch.min.bytes is 1),
        // so this wait only bounds an idle fetch: long, so that idle consumers cost the
        // broker two fetches a second instead of a hundred.
        .set("fetch.wait.max.ms", "500");
    config
}

/// A client that reads where partitions end counting the records of transactions still
/// open (high watermarks), never a group member. A `read_committed` consumer's end is the
/// last stable offset, which stops before the first open transaction.
pub fn end_reader(settings: &KafkaSettings) -> ClientConfig {
    let mut config = base(settings);
    config.set("isolation.level", "read_uncommitted");
    config
}

/// Where partitions end, counting open transactions: one long-lived client (see
/// [`end_reader`]). A state rebuilt to the last stable offset misses a transaction that
/// commits afterwards, so a writer that must hold every event rebuilds to this end
/// instead, and so waits until every transaction with records below it is committed or
/// aborted (a dead writer's is aborted at `transaction.timeout.ms`).
pub struct PartitionEnds(rdkafka::consumer::BaseConsumer);

impl PartitionEnds {
    /// Creates the client.
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let client = end_reader(settings)
            .create()
            .context("creating the client that reads partitions' ends")?;
        Ok(PartitionEnds(client))
    }

    /// Where `partition` of `topic` ends now (blocking). A first failure asks the cluster
    /// for the topic's metadata before the one retry: the client answers from its cache,
    /// and a cache filled while a broker was down can say "unknown partition" until its
    /// periodic refresh, five minutes later (the chaos run's stalls after broker kills).
    pub fn end(&self, topic: &str, partition: i32, timeout: Duration) -> anyhow::Result<i64> {
        use rdkafka::consumer::Consumer as _;
        let read = || self.0.fetch_watermarks(topic, partition, timeout);
        let (_, high) = read()
            .or_else(|first| {
                tracing::debug!(%topic, partition, error = %first, "reading a partition's end; refreshing the metadata");
                self.0.fetch_metadata(Some(topic), timeout)?;
                read()
            })
            .with_context(|| format!("reading the end of {topic}/{partition}"))?;
        Ok(high)
    }
}

/// The topic whose partitions the command processes share out: owning partition `i` of it
/// makes a process the writer of partition `i` of every aggregate topic. Nothing is
/// written to it.
pub fn ownership_topic(settings: &KafkaSettings) -> String {
    format!("{}.command-owners", settings.topic_prefix)
}

/// The outcomes of commands sent with an `Idempotency-Key` (written by the command API in
/// the transaction of their events, partitioned like the aggregates, kept 25 hours).
pub fn outcomes_topic(settings: &KafkaSettings) -> String {
    format!("{}.outcomes", settings.topic_prefix)
}

/// How long the outcomes topic keeps records: the 24 hours a key answers, and an hour.
const OUTCOMES_RETENTION_MS: &str = "90000000";

/// The consumers of the log, each with a dead-letter topic of its own.
pub const CONSUMERS: [&str; 6] = ["users", "news", "reads", "cache", "recommend", "notify"];

/// The dead-letter topic of `consumer`: events it could not apply, with the reason.
pub fn dead_letter_topic(settings: &KafkaSettings, consumer: &str) -> String {
    format!("{}.{consumer}.dead-letters", settings.topic_prefix)
}

/// Every topic of the deployment: the event topics, the ownership and outcomes topics, and
/// the dead-letter topics.
pub fn deployment_topics(settings: &KafkaSettings) -> Vec<String> {
    let mut names: Vec<String> = Stream::ALL.iter().map(|s| s.topic(settings)).collect();
    names.push(ownership_topic(settings));
    names.extend(CONSUMERS.iter().map(|c| dead_letter_topic(settings, c)));
    names.push(outcomes_topic(settings));
    names
}

/// Deletes every topic of the deployment (those that exist): what a throwaway deployment,
/// such as a test's, leaves behind otherwise keeps the broker's files open for good.
pub async fn delete_topics(settings: &KafkaSettings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(settings)
        .create()
        .context("creating the Kafka admin client")?;
    let names = deployment_topics(settings);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .delete_topics(&names, &options)
        .await
        .context("deleting the deployment's topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => anyhow::bail!("deleting topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Creates the event topics (and the ownership, outcomes and dead-letter topics) that do
/// not exist yet; events are kept forever, outcomes 25 hours.
pub async fn ensure_topics(settings: &KafkaSettings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(settings)
        .create()
        .context("creating the Kafka admin client")?;
    let names = deployment_topics(settings);
    let outcomes = outcomes_topic(settings);
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
                TopicReplication::Fixed(settings.replication),
            )
            .set(
                "retention.ms",
                if *name == outcomes {
                    OUTCOMES_RETENTION_MS
                } else {
                    "-1"
                },
            )
            .set(
                "min.insync.replicas",
                if settings.replication > 1 { "2" } else { "1" },
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(topics.iter(), &options)
        .await
        .context("creating the event topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// The member id and generation of `client`'s membership in its consumer group, as
/// librdkafka holds them now; `None` while it is not a member (not joined yet, left, or
/// reset after the coordinator forgot it). rust-rdkafka's `ConsumerGroupMetadata` does
/// not show them, and a transaction that commits offsets with a reset membership (no
/// member id, generation -1) passes the group coordinator's checks: the writer must know.
#[allow(unsafe_code)]
pub fn group_membership<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Option<(String, i32)> {
    use rdkafka::bindings as rd;
    // SAFETY: `rd_kafka_consumer_group_metadata` returns a copy owned by the caller (or
    // null for a client that is not a consumer); the member id it points to lives as long
    // as that copy, which is destroyed only after the id was copied out.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(client.native_ptr());
        if metadata.is_null() {
            return None;
        }
        let member = rd::rd_kafka_consumer_group_metadata_member_id(metadata);
        let member = if member.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(member)
                .to_string_lossy()
                .into_owned()
        };
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        (generation >= 0 && !member.is_empty()).then_some((member, generation))
    }
}
