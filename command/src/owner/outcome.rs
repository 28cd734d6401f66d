//! Outcomes of commands sent with an `Idempotency-Key`, kept in the log (ADR 16).
//!
//! The writer records the outcome of a keyed command — the state it left and where its
//! event landed, or the refusal — on the outcomes topic (`<prefix>.outcomes`, same
//! partition as the aggregate, kept 25 hours) in the same Kafka transaction as the event.
//! A partition's writer indexes the last 24 hours of its outcomes when it takes the
//! partition over, so a retry after any crash finds what the first request did and is
//! answered from it instead of running again.
//!
//! Personal data never goes to that topic in clear: a user's state is sealed with the
//! user's key (destroyed at erasure, like the personal fields of their events).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use newsroom_events::consistency::Position;
use newsroom_events::personal;
use newsroom_infra::kafka::{outcomes_topic, read_committed_consumer};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{CommandError, Committed, Shared};
use crate::aggregate::Aggregate;
use crate::digest;
use crate::domain::DomainError;

/// How long an outcome answers retries.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Outcomes indexed per partition at most (about 20 MB); past it the oldest are forgotten
/// early (the answers of requests that finished stay in `cmd_idempotency` for the whole
/// window), and a takeover reads no more than that many records.
const MAX_PER_PARTITION: usize = 100_000;

/// Record headers: the request hash, the decision time, the event's offset.
const REQUEST_HEADER: &str = "request";
const AT_HEADER: &str = "at";
const EVENT_OFFSET_HEADER: &str = "event-offset";

/// A command's `Idempotency-Key`, as the writer sees it: whose key it is, and which
/// request it was first sent with. Both are keyed hashes (HMAC-SHA-256 with a secret of
/// the deployment): request bodies hold passwords, and a plain hash of one stored in the
/// log or the database could be tested against guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed {
    /// HMAC of the caller and the key.
    pub scope: [u8; 32],
    /// HMAC of the method, path and body.
    pub request: [u8; 32],
}

impl Keyed {
    /// The key `key` of `caller` on the request `method path` with `body`, hashed with
    /// `secret`.
    pub fn new(
        secret: &[u8],
        caller: &str,
        key: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Self {
        let mac = |parts: &[&[u8]]| digest::hmac(secret, parts);
        Keyed {
            scope: mac(&[b"scope\n", caller.as_bytes(), b"\n", key.as_bytes()]),
            request: mac(&[
                b"request\n",
                method.as_bytes(),
                b" ",
                path.as_bytes(),
                b"\n",
                body,
            ]),
        }
    }

    /// The request hash in hex.
    pub fn request_hex(&self) -> String {
        digest::hex(&self.request)
    }

    /// The id of the aggregate a keyed create makes: the same for every retry (key and
    /// request), so that the retry reaches the partition holding the first attempt's
    /// outcome; another request with the key, or another caller, makes another id.
    pub fn new_id(&self) -> Uuid {
        let hash = digest::sha256(&[b"newsroom: created by key\n", &self.scope, &self.request]);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash[..16]);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// The outcome record's value (JSON).
#[derive(Serialize, Deserialize)]
struct Record {
    /// The aggregate.
    aggregate: Uuid,
    outcome: Stored,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stored {
    /// Committed: the state after it (JSON).
    Committed(serde_json::Value),
    /// Committed, the state sealed with the user's key (base64).
    Sealed(String),
    /// Refused.
    Refused(DomainError),
}

/// What a keyed command's outcome is made of.
pub enum Source<'a, S> {
    /// Committed: the state it leaves.
    Committed(&'a S),
    /// Refused.
    Refused(&'a DomainError),
}

/// An outcome record ready to be produced (its event's offset is added then).
pub struct Outcome {
    /// The key scope (the record's key).
    pub keyed: Keyed,
    /// When it was decided (Unix microseconds).
    pub at: i64,
    /// The value.
    pub value: Vec<u8>,
}

impl Outcome {
    /// The record's headers; `event_offset` for a committed command.
    pub fn headers(&self, event_offset: Option<i64>) -> OwnedHeaders {
        let at = self.at.to_be_bytes();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: REQUEST_HEADER,
                value: Some(self.keyed.request.as_slice()),
            })
            .insert(Header {
                key: AT_HEADER,
                value: Some(at.as_slice()),
            });
        match event_offset {
            Some(offset) => headers.insert(Header {
                key: EVENT_OFFSET_HEADER,
                value: Some(offset.to_be_bytes().as_slice()),
            }),
            None => headers,
        }
    }
}

/// The outcome of `keyed` for aggregate `id`, made when the command is decided; an error
/// (the command is then refused, nothing written) when it cannot be recorded.
pub fn record<A: Aggregate>(
    shared: &Shared,
    keyed: Keyed,
    id: Uuid,
    at: i64,
    source: Source<'_, A::State>,
) -> anyhow::Result<Outcome> {
    let outcome = match source {
        Source::Refused(error) => Stored::Refused(error.clone()),
        Source::Committed(state) if A::personal(state) => {
            let key = shared
                .keys
                .get(id)
                .context("the user's key is missing; the outcome would be in clear")?;
            let plain = serde_json::to_vec(state)?;
            let sealed = personal::seal_bytes(&key, id, &plain);
            Stored::Sealed(base64::engine::general_purpose::STANDARD.encode(sealed))
        }
        Source::Committed(state) => Stored::Committed(serde_json::to_value(state)?),
    };
    let value = serde_json::to_vec(&Record {
        aggregate: id,
        outcome,
    })?;
    Ok(Outcome { keyed, at, value })
}

/// An outcome record read back: its value, and its event's offset (committed ones).
pub struct Read {
    value: Vec<u8>,
    event_offset: Option<i64>,
}

/// The answer an outcome record gives a retry: what the first request was answered.
pub fn answer<A: Aggregate>(
    shared: &Shared,
    partition: i32,
    read: &Read,
) -> Result<Committed<A::State>, CommandError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        tracing::error!(partition, error = %e, "an outcome record is unreadable");
        CommandError::Unavailable {
            reason: "the outcome of this request is recorded but cannot be read".into(),
            definitive: false,
        }
    };
    let record: Record = serde_json::from_slice(&read.value).map_err(|e| unreadable(&e))?;
    let state = match record.outcome {
        Stored::Refused(error) => return Err(CommandError::Domain(error)),
        Stored::Committed(state) => serde_json::from_value(state).map_err(|e| unreadable(&e))?,
        Stored::Sealed(state) => {
            let id = record.aggregate;
            // The key is gone once the user is erased: so is what the answer showed.
            let key = shared.keys.get(id).ok_or(DomainError::NotFound)?;
            let blob = base64::engine::general_purpose::STANDARD
                .decode(state)
                .map_err(|e| unreadable(&e))?;
            let plain = personal::open_bytes(&key, id, &blob).map_err(|e| unreadable(&e))?;
            serde_json::from_slice(&plain).map_err(|e| unreadable(&e))?
        }
    };
    let offset = read
        .event_offset
        .ok_or_else(|| unreadable(&"a committed outcome without its event's offset"))?;
    Ok(Committed {
        state,
        position: Position { partition, offset },
    })
}

/// What the index knows of one key.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// [`Keyed::request`] of the first request.
    pub request: [u8; 32],
    /// When it was decided (Unix microseconds).
    pub at: i64,
    /// The offset of its outcome record.
    pub offset: i64,
}

/// The keyed outcomes of one partition in the last [`WINDOW`], by key scope.
#[derive(Default)]
pub struct Recent {
    entries: HashMap<[u8; 32], Entry>,
    order: VecDeque<(i64, [u8; 32])>,
    warned: bool,
}

fn window_start(now: i64) -> i64 {
    now - i64::try_from(WINDOW.as_micros()).unwrap_or(i64::MAX)
}

impl Recent {
    /// The outcome of `scope`, if it is recent.
    pub fn get(&self, scope: &[u8; 32], now: i64) -> Option<Entry> {
        self.entries
            .get(scope)
            .filter(|e| e.at >= window_start(now))
            .copied()
    }

    /// Records an outcome (the first for its scope wins).
    pub fn insert(&mut self, scope: [u8; 32], entry: Entry) {
        let start = window_start(entry.at);
        while let Some(&(at, old)) = self.order.front() {
            let full = self.entries.len() >= MAX_PER_PARTITION;
            if at >= start && !full {
                break;
            }
            if at >= start && !self.warned {
                self.warned = true;
                tracing::warn!(
                    limit = MAX_PER_PARTITION,
                    "idempotency keys of a partition are forgotten before 24 hours: too many"
                );
            }
            self.order.pop_front();
            if self.entries.get(&old).is_some_and(|e| e.at == at) {
                self.entries.remove(&old);
            }
        }
        if self.entries.contains_key(&scope) {
            return;
        }
        self.entries.insert(scope, entry);
        self.order.push_back((entry.at, scope));
    }

    /// How many outcomes it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn header<const N: usize>(message: &BorrowedMessage<'_>, name: &str) -> Option<[u8; N]> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| <[u8; N]>::try_from(v).ok())
}

fn consumer(shared: &Shared) -> anyhow::Result<BaseConsumer> {
    let group = format!("{}.cmd-outcomes", shared.kafka.topic_prefix);
    read_committed_consumer(&shared.kafka, &group)
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("creating the outcomes consumer")
}

/// Indexes the committed outcomes of `partition` of the last [`WINDOW`] (blocking; the
/// headers only, at most the last `MAX_PER_PARTITION` records).
pub fn load(shared: &Shared, partition: i32) -> anyhow::Result<Recent> {
    let topic = outcomes_topic(&shared.kafka);
    let consumer = consumer(shared)?;
    let timeout = shared.kafka.timeout();
    let now = newsroom_events::metadata::micros(chrono::Utc::now());
    // The end counting open transactions, as the events' rebuild reads to (see there).
    let high = shared.ends.end(&topic, partition, timeout)?;
    let mut since = TopicPartitionList::new();
    since.add_partition_offset(&topic, partition, Offset::Offset(window_start(now) / 1000))?;
    let start = consumer
        .offsets_for_times(since, timeout)
        .context("finding the outcomes of the last 24 hours")?
        .find_partition(&topic, partition)
        .and_then(|p| p.offset().to_raw())
        .filter(|o| *o >= 0)
        .unwrap_or(high)
        .max(high - MAX_PER_PARTITION as i64);
    let mut recent = Recent::default();
    if start >= high {
        return Ok(recent);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + super::rebuild::REBUILD_DEADLINE;
    let mut malformed = 0u64;
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "indexing {topic}/{partition} took too long"
        );
        let position = consumer
            .position()?
            .find_partition(&topic, partition)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(start);
        if position >= high {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        // A lost connection or a moving leader is gone past, as the events' rebuild does.
        let message = match message {
            Err(error) if super::rebuild::transient(&error) => continue,
            message => message.context("reading the outcomes")?,
        };
        let offset = message.offset();
        let scope = message.key().and_then(|k| <[u8; 32]>::try_from(k).ok());
        let request = header::<32>(&message, REQUEST_HEADER);
        let at = header::<8>(&message, AT_HEADER).map(i64::from_be_bytes);
        match (scope, request, at) {
            (Some(scope), Some(request), Some(at)) => {
                recent.insert(
                    scope,
                    Entry {
                        request,
                        at,
                        offset,
                    },
                );
            }
            _ => malformed += 1,
        }
        if offset + 1 >= high {
            break;
        }
    }
    if malformed > 0 {
        tracing::error!(%topic, partition, malformed, "malformed outcome records skipped");
    }
    tracing::debug!(%topic, partition, from = start, keys = recent.len(), "outcomes indexed");
    Ok(recent)
}

/// Reads outcome records back by offset: one consumer per process, one read at a time
/// (retries after a crash are few; a flood of them waits here instead of opening
/// connections).
#[derive(Default)]
pub struct Fetcher {
    consumer: Mutex<Option<BaseConsumer>>,
}

impl Fetcher {
    /// The outcome record at `offset` of `partition` (blocking).
    pub fn fetch(&self, shared: &Shared, partition: i32, offset: i64) -> anyhow::Result<Read> {
        let topic = outcomes_topic(&shared.kafka);
        let mut slot = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(consumer(shared)?);
        }
        let Some(consumer) = slot.as_ref() else {
            anyhow::bail!("no outcomes consumer");
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        consumer.assign(&assignment)?;
        let deadline = std::time::Instant::now() + shared.kafka.timeout();
        while std::time::Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.context("reading an outcome")?;
            anyhow::ensure!(
                message.offset() == offset,
                "the outcome at {topic}/{partition}@{offset} is gone (read {})",
                message.offset()
            );
            let value = message
                .payload()
                .map(<[u8]>::to_vec)
                .context("an empty outcome record")?;
            let event_offset = header::<8>(&message, EVENT_OFFSET_HEADER).map(i64::from_be_bytes);
            return Ok(Read {
                value,
                event_offset,
            });
        }
        anyhow::bail!("reading the outcome at {topic}/{partition}@{offset} timed out")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: i64, offset: i64) -> Entry {
        Entry {
            request: [0; 32],
            at,
            offset,
        }
    }

    #[test]
    fn the_first_outcome_of_a_key_wins_and_old_ones_expire() {
        let day = window_start(0).abs();
        let mut recent = Recent::default();
        recent.insert([1; 32], entry(10, 1));
        recent.insert([1; 32], entry(11, 2));
        assert_eq!(recent.get(&[1; 32], 20).map(|e| e.offset), Some(1));
        assert!(recent.get(&[1; 32], 10 + day + 1).is_none(), "expired");
        recent.insert([2; 32], entry(10 + day + 1, 3));
        assert_eq!(recent.len(), 1, "the expired key left the index");
    }

    #[test]
    fn a_retry_of_a_create_makes_the_same_id_and_another_request_another() {
        let key = |caller: &str, body: &[u8]| {
            Keyed::new(b"secret", caller, "k1", "POST", "/v1/news", body)
        };
        let (a, again, other) = (
            key("caller", b"{}"),
            key("caller", b"{\"x\":1}"),
            key("someone else", b"{}"),
        );
        let same = key("caller", b"{}");
        assert_ne!(
            a,
            Keyed::new(b"another secret", "caller", "k1", "POST", "/v1/news", b"{}"),
            "another deployment's secret, other hashes"
        );
        assert_eq!(a.new_id(), same.new_id());
        assert_ne!(a.request, again.request);
        assert_ne!(a.new_id(), again.new_id(), "another request, another id");
        assert_ne!(a.new_id(), other.new_id());
        assert_eq!(a.request_hex().len(), 64);
    }
}
