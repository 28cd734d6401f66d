//! Partition ownership through a Kafka consumer group on `<prefix>.command-owners`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::writer::Group;
use super::{Owners, Shared, give_up, take_over};

/// Pause after a failed takeover, doubled after each further failure up to `RETRY_MAX` (a
/// partition whose log cannot be read stays unserved and says so, without a tight loop).
const RETRY: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Reacts to assignments and revocations of the ownership group.
pub struct MembershipContext {
    shared: Arc<Shared>,
    owners: Arc<Owners>,
    runtime: Handle,
}

impl ClientContext for MembershipContext {}

impl ConsumerContext for MembershipContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions revoked");
            give_up(&self.owners, &partitions);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            for element in list.elements() {
                let partition = element.partition();
                tracing::info!(partition, "partition assigned; taking over");
                let (shared, owners) = (self.shared.clone(), self.owners.clone());
                let assignment = owners.assign(partition);
                self.runtime.spawn(async move {
                    let mut pause = RETRY;
                    loop {
                        match take_over(shared.clone(), owners.clone(), partition, assignment).await
                        {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::error!(
                                    partition,
                                    error = format!("{e:#}"),
                                    retry_in_ms = pause.as_millis() as u64,
                                    "takeover failed; the partition is not served until it succeeds"
                                );
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(RETRY_MAX);
                            }
                        }
                        // Stop retrying once the partition was revoked meanwhile.
                        if !owners.holds(partition, assignment) {
                            break;
                        }
                    }
                });
            }
        }
    }
}

/// The membership of this process in the ownership group.
pub struct Membership {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    owners: Arc<Owners>,
}

impl Membership {
    /// Joins the group; partitions are taken over as they are assigned. `group` is given
    /// this membership's group metadata, which fences the writer's transactions.
    pub fn join(
        shared: Arc<Shared>,
        owners: Arc<Owners>,
        instance: &str,
        group: &Group,
    ) -> anyhow::Result<Membership> {
        let topic = newsroom_infra::kafka::ownership_topic(&shared.kafka);
        let context = MembershipContext {
            shared: shared.clone(),
            owners: owners.clone(),
            runtime: Handle::current(),
        };
        let consumer: StreamConsumer<MembershipContext> =
            newsroom_infra::kafka::read_committed_consumer(
                &shared.kafka,
                &format!("{}.command", shared.kafka.topic_prefix),
            )
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("client.id", format!("newsroom-command-{instance}"))
            .create_with_context(context)
            .context("creating the ownership consumer")?;
        let consumer = Arc::new(consumer);
        group.set(super::writer::group_metadata_of(consumer.clone()));
        consumer
            .subscribe(&[&topic])
            .context("joining the ownership group")?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Nothing is ever written to the ownership topic: polling only keeps this
            // process in the group and runs the rebalance callbacks.
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    message = consumer.recv() => {
                        if let Err(e) = message {
                            tracing::debug!(error = %e, "ownership consumer");
                        }
                    }
                }
            }
            consumer.unsubscribe();
        });
        Ok(Membership { stop, task, owners })
    }

    /// Leaves the group (its partitions go to the other processes) and stops the writer.
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.owners.writer.stop();
    }
}
