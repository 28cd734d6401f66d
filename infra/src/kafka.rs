//! The one factory of Kafka clients: every producer, consumer and admin client of newsroom
//! is configured here, so that timeouts, isolation and logging are the same everywhere.

use std::time::Duration;

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
        .set("log_level", "4");
    // NEWSROOM_KAFKA_DEBUG=eos,broker,... turns on librdkafka's debug contexts.
    if let Ok(contexts) = std::env::var("NEWSROOM_KAFKA_DEBUG") {
        config.set("debug", contexts).set("log_level", "7");
    }
    config
}

/// A transactional, idempotent producer configuration with the given transactional id.
pub fn transactional_producer(settings: &KafkaSettings, transactional_id: &str) -> ClientConfig {
    let timeout = settings.timeout_ms.max(1000);
    let mut config = base(settings);
    config
        .set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        // A transaction begun right after a commit meets CONCURRENT_TRANSACTIONS while the
        // broker writes the previous markers; the default 100 ms retry backoff would make
        // every batch wait for it.
        .set("retry.backoff.ms", "2")
        .set("retry.backoff.max.ms", "50")
        .set("compression.type", "zstd")
        .set("message.timeout.ms", timeout.to_string())
        .set(
            "transaction.timeout.ms",
            (timeout * 5).max(10_000).to_string(),
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
        .set("fetch.wait.max.ms", "10");
    config
}

/// The topic whose partitions the command processes share out: owning partition `i` of it
/// makes a process the writer of partition `i` of every aggregate topic. Nothing is
/// written to it.
pub fn ownership_topic(settings: &KafkaSettings) -> String {
    format!("{}.command-owners", settings.topic_prefix)
}

/// The consumers of the log, each with a dead-letter topic of its own.
pub const CONSUMERS: [&str; 6] = ["users", "news", "reads", "cache", "recommend", "notify"];

/// The dead-letter topic of `consumer`: events it could not apply, with the reason.
pub fn dead_letter_topic(settings: &KafkaSettings, consumer: &str) -> String {
    format!("{}.{consumer}.dead-letters", settings.topic_prefix)
}

/// Creates the event topics (and the ownership topic) that do not exist yet; events are
/// kept forever.
pub async fn ensure_topics(settings: &KafkaSettings) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let admin: AdminClient<DefaultClientContext> = base(settings)
        .create()
        .context("creating the Kafka admin client")?;
    let mut names: Vec<String> = Stream::ALL.iter().map(|s| s.topic(settings)).collect();
    names.push(ownership_topic(settings));
    names.extend(CONSUMERS.iter().map(|c| dead_letter_topic(settings, c)));
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
                TopicReplication::Fixed(settings.replication),
            )
            .set("retention.ms", "-1")
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
