//! Rebuilding a partition's state from the log (read_committed, from the latest snapshot):
//! every event or nothing.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use newsroom_infra::codec;
use newsroom_infra::kafka::read_committed_consumer;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use super::{Shared, snapshot};
use crate::aggregate::Aggregate;
use crate::domain::Stamp;

/// How long a rebuild may take before the takeover is retried.
pub(super) const REBUILD_DEADLINE: Duration = Duration::from_secs(300);

/// The state of every aggregate of `partition`, folded from its committed events.
pub async fn state<A: Aggregate>(
    shared: &Shared,
    partition: i32,
) -> anyhow::Result<(HashMap<Uuid, A::State>, i64)> {
    let topic = A::STREAM.topic(&shared.kafka);
    let group = format!("{}.cmd-rebuild", shared.kafka.topic_prefix);
    let consumer: StreamConsumer = read_committed_consumer(&shared.kafka, &group)
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("creating the rebuild consumer")?;
    let timeout = shared.kafka.timeout();
    // Every event this state must hold lies below the end counting open transactions: a
    // transaction whose commit was still under way (this writer's own, when its commit
    // timed out, or a dead owner's) is waited for, not missed.
    let high = {
        let (ends, topic) = (shared.ends.clone(), topic.clone());
        tokio::task::spawn_blocking(move || ends.end(&topic, partition, timeout)).await??
    };
    let (mut states, start) = match snapshot::load::<A>(&shared.pool, partition).await {
        Ok(Some((states, next))) if next <= high => (states, next),
        Ok(Some(_)) => {
            tracing::warn!(%topic, partition, "snapshot is ahead of the log (topic recreated?); ignoring it");
            (HashMap::new(), 0)
        }
        Ok(None) => (HashMap::new(), 0),
        Err(e) => {
            tracing::warn!(%topic, partition, error = format!("{e:#}"), "snapshot unreadable; rebuilding from the start");
            (HashMap::new(), 0)
        }
    };
    if start >= high {
        return Ok((states, high));
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = tokio::time::Instant::now() + REBUILD_DEADLINE;
    let mut events = 0u64;
    let mut last_error: Option<String> = None;
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        if position(&consumer, &topic, partition) >= high {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "rebuilding {topic}/{partition} took too long (last Kafka error: {})",
            last_error.as_deref().unwrap_or("none")
        );
        let message = match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        {
            Err(_) => continue,
            // librdkafka reports a broken connection and goes on (reconnecting, or reading
            // from the partition's new leader): so does the rebuild, within its deadline.
            Ok(Err(error)) if transient(&error) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    warned = Some(tokio::time::Instant::now());
                    tracing::warn!(%topic, partition, %error, "rebuilding a partition: Kafka error; going on");
                }
                last_error = Some(error.to_string());
                continue;
            }
            Ok(message) => message.context("reading the partition")?,
        };
        let offset = message.offset();
        let Some(payload) = message.payload() else {
            continue;
        };
        // A partition is never served from a state that misses an event: an event that
        // cannot be decoded (the registry down, or bytes that are no event) fails the
        // takeover, which is retried.
        let decoded = codec::decode(&shared.registry, payload)
            .await
            .with_context(|| {
                format!("event at {topic}/{partition}@{offset} cannot be decoded; the partition is not served")
            })?;
        let (metadata, change) = A::decode(&decoded.name, decoded.value, &shared.keys)
            .with_context(|| format!("event at {topic}/{partition}@{offset}"))?;
        let id = metadata.aggregate_id;
        let stamp = Stamp {
            id,
            version: metadata.aggregate_version,
            at: metadata.occurred_at(),
        };
        match A::apply(states.remove(&id), &change, stamp) {
            Some(state) => states.insert(id, state),
            None => None,
        };
        events += 1;
        if offset + 1 >= high {
            break;
        }
    }
    tracing::debug!(%topic, partition, from = start, events, "partition rebuilt");
    Ok((states, high))
}

/// An error the consumer recovers from by itself (a connection lost, a leader moving).
pub(super) fn transient(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}

fn position(consumer: &StreamConsumer, topic: &str, partition: i32) -> i64 {
    let Ok(list) = consumer.position() else {
        return 0;
    };
    list.find_partition(topic, partition)
        .and_then(|p| p.offset().to_raw())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn a_lost_connection_is_gone_past_and_a_missing_partition_is_not() {
        let consuming = |code| KafkaError::MessageConsumption(code);
        assert!(super::transient(&consuming(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(super::transient(&consuming(
            RDKafkaErrorCode::NotLeaderForPartition
        )));
        assert!(!super::transient(&consuming(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(!super::transient(&consuming(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }
}
