//! The console's event browser: an aggregate's events, read from its partition of each
//! stream (the record key is the aggregate id), decoded with the registry's schemas.
//! Personal data stays sealed: the browser shows the size of a sealed field, never its
//! content.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use apache_avro::types::Value;
use newsroom_events::partition::partition_of;
use newsroom_infra::kafka::{Stream, read_committed_consumer};
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::KafkaSettings;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

/// Records one search reads at most, over all streams (a third each).
const MOST_SCANNED: u64 = 5_000_000;
/// Events one search shows at most (the newest ones).
const MOST_SHOWN: usize = 500;
/// How long one search may read (a third per stream).
const LONGEST: Duration = Duration::from_secs(20);

/// One field of an event's body.
#[derive(Debug, Clone)]
pub struct Field {
    /// Its name.
    pub name: String,
    /// Its value as text.
    pub text: String,
    /// The aggregate it names, if it is an id.
    pub link: Option<String>,
}

/// One event as the browser shows it.
#[derive(Debug, Clone)]
pub struct Shown {
    /// `topic/partition@offset`.
    pub position: String,
    /// The event type.
    pub name: String,
    /// Metadata fields, by name.
    pub event_id: String,
    /// The aggregate's version after it.
    pub version: String,
    /// When it happened.
    pub occurred_at: String,
    /// The request it came from.
    pub correlation: String,
    /// The command or event that caused it.
    pub causation: String,
    /// Whether the causation is an event shown on the same page.
    pub caused_here: bool,
    /// Who did it.
    pub actor: Option<String>,
    /// The rest of the body.
    pub fields: Vec<Field>,
    /// Why it could not be decoded.
    pub error: Option<String>,
}

/// What a search found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The events, in log order per stream.
    pub events: Vec<Shown>,
    /// Records read.
    pub scanned: u64,
    /// Whether the search stopped before the ends of the partitions.
    pub cut_short: bool,
    /// Milliseconds it took.
    pub elapsed_ms: u128,
}

struct Raw {
    position: String,
    payload: Option<Vec<u8>>,
}

/// Reads `aggregate`'s events from every stream; `permit` is held until the scan ends,
/// even if the caller goes away.
pub async fn search(
    kafka: &KafkaSettings,
    registry: &Registry,
    aggregate: Uuid,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<Found> {
    let started = Instant::now();
    let settings = kafka.clone();
    let (raw, scanned, cut_short) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        scan(&settings, aggregate)
    })
    .await??;
    let mut events = Vec::with_capacity(raw.len());
    for record in raw {
        events.push(decode(registry, record).await);
    }
    let ids: std::collections::HashSet<String> =
        events.iter().map(|e| e.event_id.clone()).collect();
    for event in &mut events {
        event.caused_here = ids.contains(&event.causation);
    }
    Ok(Found {
        events,
        scanned,
        cut_short,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

fn scan(kafka: &KafkaSettings, aggregate: Uuid) -> anyhow::Result<(Vec<Raw>, u64, bool)> {
    let client: BaseConsumer = read_committed_consumer(kafka, "newsroom-console-browser")
        .create()
        .context("creating the browser's Kafka client")?;
    let key = aggregate.as_bytes();
    // Each stream gets its share of the time and of the records, so that a long first one
    // does not keep the others from being read.
    let streams = Stream::ALL.len() as u32;
    let (mut found, mut scanned, mut cut_short) = (VecDeque::new(), 0u64, false);
    for stream in Stream::ALL {
        let deadline = Instant::now() + LONGEST / streams;
        let most = scanned + MOST_SCANNED / u64::from(streams);
        let topic = stream.topic(kafka);
        let metadata = client
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32);
        if partitions == 0 {
            continue;
        }
        let partition = partition_of(key, partitions);
        let (low, high) = client
            .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            .with_context(|| format!("reading the ends of {topic}/{partition}"))?;
        if high <= low {
            continue;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, partition, Offset::Offset(low))?;
        client.assign(&list)?;
        loop {
            if Instant::now() > deadline || scanned >= most {
                cut_short = true;
                break;
            }
            // The reader skips commit markers and aborted records: once its position is
            // past the end, nothing more will come.
            let past_end = || {
                client.position().ok().is_some_and(|position| {
                    position
                        .find_partition(&topic, partition)
                        .and_then(|p| p.offset().to_raw())
                        .is_some_and(|at| at >= high)
                })
            };
            let Some(message) = client.poll(Duration::from_millis(200)) else {
                if past_end() {
                    break;
                }
                continue;
            };
            let message = message.context("reading the log")?;
            scanned += 1;
            if message.key() == Some(key.as_slice()) {
                // The newest are kept: on call, the last events matter most.
                if found.len() >= MOST_SHOWN {
                    found.pop_front();
                    cut_short = true;
                }
                found.push_back(Raw {
                    position: format!("{topic}/{partition}@{}", message.offset()),
                    payload: message.payload().map(<[u8]>::to_vec),
                });
            }
            if message.offset() + 1 >= high {
                break;
            }
        }
    }
    Ok((found.into(), scanned, cut_short))
}

async fn decode(registry: &Registry, raw: Raw) -> Shown {
    let mut shown = Shown {
        position: raw.position,
        name: String::new(),
        event_id: String::new(),
        version: String::new(),
        occurred_at: String::new(),
        correlation: String::new(),
        causation: String::new(),
        caused_here: false,
        actor: None,
        fields: Vec::new(),
        error: None,
    };
    let Some(payload) = raw.payload else {
        shown.error = Some("a tombstone (no payload)".into());
        return shown;
    };
    let decoded = match newsroom_infra::codec::decode(registry, &payload).await {
        Ok(decoded) => decoded,
        Err(e) => {
            shown.error = Some(format!("cannot decode: {e:#}"));
            return shown;
        }
    };
    shown.name = decoded.name;
    let Value::Record(fields) = decoded.value else {
        shown.error = Some("not a record".into());
        return shown;
    };
    for (name, value) in fields {
        if name == "metadata" {
            if let Value::Record(meta) = value {
                for (key, value) in meta {
                    let text = text(&value);
                    match key.as_str() {
                        "event_id" => shown.event_id = text,
                        "aggregate_version" => shown.version = text,
                        "occurred_at" => shown.occurred_at = text,
                        "correlation_id" => shown.correlation = text,
                        "causation_id" => shown.causation = text,
                        "actor_id" => shown.actor = (text != "null").then_some(text),
                        _ => {}
                    }
                }
            }
            continue;
        }
        let text = text(&value);
        let link = Uuid::parse_str(&text).ok().map(|id| id.to_string());
        shown.fields.push(Field { name, text, link });
    }
    shown
}

/// A value as text: ids and times readable, sealed bytes by their size only.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => i.to_string(),
        Value::Long(l) | Value::TimeMicros(l) | Value::LocalTimestampMillis(l) => l.to_string(),
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => {
            chrono::DateTime::from_timestamp_micros(*us)
                .map_or_else(|| us.to_string(), |t| t.to_rfc3339())
        }
        Value::TimestampMillis(ms) => chrono::DateTime::from_timestamp_millis(*ms)
            .map_or_else(|| ms.to_string(), |t| t.to_rfc3339()),
        Value::Float(f) => f.to_string(),
        Value::Double(d) => d.to_string(),
        Value::String(s) => s.clone(),
        Value::Uuid(u) => u.to_string(),
        Value::Enum(_, symbol) => symbol.clone(),
        Value::Union(_, inner) => text(inner),
        Value::Bytes(b) | Value::Fixed(_, b) => format!("(sealed, {} bytes)", b.len()),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(text).collect::<Vec<_>>().join(", ")
        ),
        Value::Map(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{k}: {}", text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Record(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("{k}: {}", text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_show_their_size_only_and_times_read_as_dates() {
        assert_eq!(text(&Value::Bytes(vec![1, 2, 3])), "(sealed, 3 bytes)");
        assert_eq!(
            text(&Value::TimestampMicros(1_764_000_000_000_000)),
            "2025-11-24T16:00:00+00:00"
        );
        assert_eq!(
            text(&Value::Union(1, Box::new(Value::String("x".into())))),
            "x"
        );
        assert_eq!(
            text(&Value::Array(vec![
                Value::String("a".into()),
                Value::String("b".into())
            ])),
            "[a, b]"
        );
    }
}
