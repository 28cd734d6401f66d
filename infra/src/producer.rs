//! Kafka producers whose delivery reports one thread of their own serves, polling a second
//! at a time.
//!
//! rust-rdkafka's `ThreadedProducer` (and the `FutureProducer` built on it) polls in
//! 100 ms rounds whose timeout it truncates to whole milliseconds, then spins through the
//! millisecond it lost: about 1 % of a core per producer. An idle `newsroom run` has some
//! twenty producers (one per partition writer, per consumer, for reads) and spent 17 % of
//! a core in those spins (measured: ADR 13). Rounds of a second cost a tenth of that;
//! reports are still served the moment they arrive, since a round ends early for none.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{DeliveryResult, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, ProducerContext};
use tokio::sync::oneshot;

/// One polling round. Also how long a dropped producer's thread may linger.
const ROUND: Duration = Duration::from_secs(1);

/// A `BaseProducer` with a polling thread of its own; it derefs to the `BaseProducer`
/// (transactions, flush). The thread stops within a round of the last clone's drop.
pub struct Polled<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    _stop: Arc<StopOnDrop>,
}

impl<C: ProducerContext + 'static> Clone for Polled<C> {
    fn clone(&self) -> Self {
        Polled {
            producer: self.producer.clone(),
            _stop: self._stop.clone(),
        }
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl<C: ProducerContext + 'static> Polled<C> {
    /// Creates the producer and starts its polling thread.
    pub fn create(config: &ClientConfig, context: C) -> KafkaResult<Self> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(ROUND);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("starting the poller: {e}")))?;
        Ok(Polled {
            producer,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }
}

impl<C: ProducerContext + 'static> Deref for Polled<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

/// Where Kafka put a record (partition, offset), or why it did not.
pub type Delivered = Result<(i32, i64), KafkaError>;

/// A client context that also answers each record's [`Delivery`].
pub struct Deliveries<C>(pub C);

impl<C: ClientContext> ClientContext for Deliveries<C> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl<C: ClientContext> ProducerContext for Deliveries<C> {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, answer: Self::DeliveryOpaque) {
        let delivered = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        // The sender may have stopped waiting; nothing to tell then.
        let _ = answer.send(delivered);
    }
}

/// A producer whose sends answer with a [`Delivery`] to await.
pub type Producer<C = DefaultClientContext> = Polled<Deliveries<C>>;

/// A record to send.
#[derive(Default)]
pub struct Record<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition, or the partitioner's choice.
    pub partition: Option<i32>,
    /// The key.
    pub key: Option<&'a [u8]>,
    /// The value.
    pub payload: Option<&'a [u8]>,
    /// The headers.
    pub headers: Option<OwnedHeaders>,
}

impl<C: ClientContext + 'static> Polled<Deliveries<C>> {
    /// A producer configured by `config` with `context`'s logging and error hooks.
    pub fn with_context(config: &ClientConfig, context: C) -> KafkaResult<Self> {
        Polled::create(config, Deliveries(context))
    }

    /// Queues `record`; the [`Delivery`] resolves once Kafka acknowledged or refused it.
    /// Fails at once when librdkafka cannot queue it (queue full, unknown partition).
    pub fn send(&self, record: Record<'_>) -> KafkaResult<Delivery> {
        let (answer, delivery) = oneshot::channel();
        let mut base = BaseRecord::<[u8], [u8], _>::with_opaque_to(record.topic, Box::new(answer));
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(key) = record.key {
            base = base.key(key);
        }
        if let Some(payload) = record.payload {
            base = base.payload(payload);
        }
        if let Some(headers) = record.headers {
            base = base.headers(headers);
        }
        self.producer.send(base).map_err(|(error, _)| error)?;
        Ok(Delivery(delivery))
    }
}

impl Producer {
    /// A producer configured by `config`.
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        Polled::with_context(config, DefaultClientContext)
    }
}

/// The outcome of one send.
pub struct Delivery(oneshot::Receiver<Delivered>);

impl Future for Delivery {
    type Output = Delivered;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivered> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(KafkaError::Canceled)))
    }
}
