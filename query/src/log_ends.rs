//! Where the log ends, as the query API needs to know it: a consistency token naming a
//! position at or past the end of its partition was not issued by a command (it is forged
//! or from another deployment), so it is refused with 400 at once instead of being waited
//! for (a forged token would otherwise hold a request and poll the read models for up to
//! 30 s).
//!
//! The ends are high watermarks (a committed event is below its partition's as soon as it
//! is acknowledged, before its transaction's markers are written), read on demand in one
//! request for every partition of the streams tokens name, and shared: a token ahead of
//! what is known asks for a refresh and waits for one that began after it arrived;
//! concurrent requests share that refresh. Whatever goes wrong in reading them lets the
//! token through unconfirmed: the read models' own wait decides then, for no longer than
//! the default consistency timeout.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use newsroom_infra::http::ApiError;
use newsroom_infra::kafka::end_reader;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, watch};

/// How long a request waits for the ends to be read before the token is let through.
const LOOKUP_LIMIT: Duration = Duration::from_secs(2);

/// The end offsets of the streams' partitions.
pub struct LogEnds {
    partitions: i32,
    /// Per topic, per partition (looked up by `&str`, without an allocation per token).
    ends: RwLock<HashMap<String, HashMap<i32, i64>>>,
    /// How many refreshes ended.
    refreshes: watch::Receiver<u64>,
    wanted: Arc<Notify>,
}

impl LogEnds {
    /// Starts the refresher for `topics` (each with the deployment's partition count).
    pub fn start(settings: &KafkaSettings, topics: Vec<String>) -> anyhow::Result<Arc<Self>> {
        let consumer: BaseConsumer = end_reader(settings).create()?;
        let (done, refreshes) = watch::channel(0u64);
        let wanted = Arc::new(Notify::new());
        let ends = Arc::new(LogEnds {
            partitions: settings.partitions,
            ends: RwLock::new(HashMap::new()),
            refreshes,
            wanted: wanted.clone(),
        });
        let (this, timeout, partitions) = (
            Arc::downgrade(&ends),
            settings.timeout(),
            settings.partitions,
        );
        let consumer = Arc::new(consumer);
        tokio::spawn(async move {
            let mut generation = 0u64;
            loop {
                wanted.notified().await;
                let (consumer, topics) = (consumer.clone(), topics.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let mut latest = TopicPartitionList::new();
                    for topic in &topics {
                        for partition in 0..partitions {
                            latest.add_partition_offset(topic, partition, Offset::End)?;
                        }
                    }
                    consumer.offsets_for_times(latest, timeout)
                })
                .await;
                let Some(ends) = this.upgrade() else {
                    return;
                };
                // Only what this refresh read is known: a partition it could not read
                // lets tokens through until one does.
                let mut fresh: HashMap<String, HashMap<i32, i64>> = HashMap::new();
                match read {
                    Ok(Ok(list)) => {
                        for element in list.elements() {
                            if let Some(end) = element.offset().to_raw().filter(|o| *o >= 0)
                                && element.error().is_ok()
                            {
                                fresh
                                    .entry(element.topic().to_owned())
                                    .or_default()
                                    .insert(element.partition(), end);
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "reading the log's ends"),
                    Err(e) => tracing::debug!(error = %e, "reading the log's ends"),
                }
                *ends.ends.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                generation += 1;
                if done.send(generation).is_err() {
                    return;
                }
            }
        });
        Ok(ends)
    }

    fn known(&self, topic: &str, partition: i32) -> Option<i64> {
        let ends = self.ends.read().unwrap_or_else(|e| e.into_inner());
        ends.get(topic)?.get(&partition).copied()
    }

    /// Refuses a token naming a position no command can have answered: a partition the
    /// topic does not have, or an offset at or past the partition's end. `Ok(true)`: every
    /// position is below the end read; `Ok(false)`: let through unconfirmed (an end could
    /// not be read). Waits for at most one refresh, whatever the number of positions.
    pub async fn check(&self, positions: &[(String, i32, i64)]) -> Result<bool, ApiError> {
        let forged = || {
            ApiError::Malformed(
                "X-Consistency-Token names a position this deployment's log does not have".into(),
            )
        };
        if positions.iter().any(|(_, p, _)| *p >= self.partitions) {
            return Err(forged());
        }
        let below = |(topic, partition, offset): &(String, i32, i64)| {
            self.known(topic, *partition)
                .is_some_and(|end| *offset < end)
        };
        if positions.iter().all(below) {
            return Ok(true);
        }
        // A refresh that began after this request: wait for the one running (if any) to
        // end, and for the next; refused only if that one read the partition's end.
        let mut refreshes = self.refreshes.clone();
        let start = *refreshes.borrow_and_update();
        let read = tokio::time::timeout(LOOKUP_LIMIT, async {
            loop {
                if *refreshes.borrow() >= start + 2 {
                    return true;
                }
                self.wanted.notify_one();
                if refreshes.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        let mut confirmed = true;
        for (topic, partition, offset) in positions {
            match self.known(topic, *partition) {
                Some(end) if read && *offset >= end => return Err(forged()),
                Some(end) => confirmed &= *offset < end,
                None => confirmed = false,
            }
        }
        Ok(confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_position_whose_end_cannot_be_read_is_let_through_unconfirmed_within_the_lookup_limit()
     {
        let mut settings = newsroom_infra::Settings::local_defaults().kafka;
        // Nothing listens there: the ends cannot be read.
        settings.brokers = "127.0.0.1:1".into();
        let ends = LogEnds::start(&settings, vec!["t.news".into()]).expect("a client");
        // However many positions the token names, one lookup's time.
        let positions: Vec<(String, i32, i64)> = (0..settings.partitions)
            .flat_map(|p| [("t.news".to_owned(), p, 5), ("t.users".to_owned(), p, 5)])
            .collect();
        let started = std::time::Instant::now();
        assert_eq!(ends.check(&positions).await.ok(), Some(false));
        assert!(started.elapsed() < LOOKUP_LIMIT + Duration::from_secs(1));
        // A partition the topic cannot have is refused without the log.
        let beyond = [("t.news".to_owned(), settings.partitions, 0)];
        assert!(ends.check(&beyond).await.is_err());
    }
}
