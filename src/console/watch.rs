//! What the console shows of the consumers, sampled every [`EVERY`] while someone looks:
//! each read model's active version and the offsets it has applied (read from its store,
//! where they are committed with its data), the ends of the partitions, the lag in events
//! and in milliseconds (the age of the oldest event not applied yet), whether its group
//! has members, and how many aggregates it has parked. Pages read the last sample: a
//! request never costs a round trip to Kafka, PostgreSQL or Redis.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use newsroom_infra::kafka::read_committed_consumer;
use newsroom_infra::settings::KafkaSettings;
use newsroom_projector::consumer::{Mode, Offsets};
use newsroom_projector::dead_letters;
use newsroom_projector::replay::Versioned;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;

/// How often the consumers are sampled while the console is looked at.
pub const EVERY: Duration = Duration::from_secs(2);
/// Samples kept for the graphs (ten minutes).
const KEPT: usize = 300;
/// How long sampling goes on after the last page was asked for.
const IDLE: Duration = Duration::from_secs(600);
/// How long a store's offsets may take to read.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one Kafka request of a sample may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);

/// A read model's versions and applied offsets.
pub struct Versions {
    /// The version that serves.
    pub active: i32,
    /// Its applied offsets.
    pub offsets: Offsets,
    /// The version a replay builds, with its offsets.
    pub building: Option<(i32, Offsets)>,
}

type Reading<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Versions>> + Send + 'a>>;

/// A read model as the console reads it (any store).
pub trait Model: Send + Sync {
    /// Its consumer's name.
    fn name(&self) -> &'static str;
    /// The topics it consumes.
    fn topics(&self) -> Vec<String>;
    /// Its versions and offsets now.
    fn versions(&self) -> Reading<'_>;
}

impl<S: Versioned> Model for S {
    fn name(&self) -> &'static str {
        newsroom_projector::consumer::Store::name(self)
    }

    fn topics(&self) -> Vec<String> {
        newsroom_projector::consumer::Store::topics(self)
    }

    fn versions(&self) -> Reading<'_> {
        Box::pin(async move {
            let (active, offsets) = self.open(Mode::Live).await?;
            let building = match self.building().await? {
                // Between the two reads the build may have ended: then there is none.
                Some(v) => self.open(Mode::Replay(v)).await.ok().map(|(_, o)| (v, o)),
                None => None,
            };
            Ok(Versions {
                active,
                offsets,
                building,
            })
        })
    }
}

/// One partition of a consumer.
#[derive(Debug, Clone)]
pub struct Partition {
    /// `topic/partition`.
    pub name: String,
    /// Next offset to apply.
    pub next: i64,
    /// The partition's end.
    pub end: i64,
    /// Offsets from the first record not applied yet to the end (`None`: not known).
    pub lag: Option<i64>,
}

impl Partition {
    /// The lag as the page shows it.
    pub fn lag_text(&self) -> String {
        self.lag.map_or_else(|| "?".into(), |l| l.to_string())
    }
}

/// A build in progress.
#[derive(Debug, Clone)]
pub struct Building {
    /// The version being built.
    pub version: i32,
    /// Offsets it has reached, summed over its partitions.
    pub applied: i64,
    /// The ends it goes to, summed.
    pub total: i64,
}

impl Building {
    /// How far it is, 0 to 100.
    pub fn percent(&self) -> u32 {
        if self.total <= 0 {
            return 100;
        }
        ((self.applied as f64 / self.total as f64) * 100.0).clamp(0.0, 100.0) as u32
    }
}

/// One consumer in a sample.
#[derive(Debug, Clone)]
pub struct Consumer {
    /// Its name.
    pub name: &'static str,
    /// Active version (0 when unreadable).
    pub active: i32,
    /// Its partitions.
    pub partitions: Vec<Partition>,
    /// Offsets not applied yet, in all (`None`: not known for every partition).
    pub lag: Option<i64>,
    /// Age of the oldest event not applied yet, in milliseconds (`None`: not known).
    pub lag_ms: Option<i64>,
    /// Members of its group (`None`: unknown).
    pub members: Option<usize>,
    /// Aggregates parked in its active version.
    pub parked: usize,
    /// Offsets applied, summed (for the throughput graph).
    pub applied: i64,
    /// A replay building a new version.
    pub building: Option<Building>,
    /// What could not be read.
    pub error: Option<String>,
}

impl Consumer {
    /// `running`, `parked` or `stopped`, as the page shows it.
    pub fn state(&self) -> &'static str {
        match (self.members, self.parked) {
            (Some(0), _) => "stopped",
            (_, p) if p > 0 => "parked",
            (Some(_), _) => "running",
            (None, _) => "unknown",
        }
    }

    /// The lag as the page shows it.
    pub fn lag_text(&self) -> String {
        self.lag.map_or_else(|| "?".into(), |l| l.to_string())
    }

    /// The lag's age as text.
    pub fn lag_age(&self) -> String {
        match self.lag_ms {
            Some(ms) => format!("{ms} ms"),
            None => "?".into(),
        }
    }
}

/// The consumers at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When it was taken.
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// Every consumer.
    pub consumers: Vec<Consumer>,
    /// What could not be read from Kafka.
    pub kafka_error: Option<String>,
}

/// One point of the graphs: per consumer, offsets applied and lag.
#[derive(Debug, Clone)]
pub struct Point {
    /// Seconds since the watch started.
    pub at: f64,
    /// Per consumer (in the models' order): applied, lag, build progress.
    pub values: Vec<(i64, i64, Option<i64>)>,
}

/// Samples the consumers while the console is looked at.
pub struct Watch {
    models: Vec<Box<dyn Model>>,
    pool: PgPool,
    kafka: KafkaSettings,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    started: Instant,
}

struct State {
    latest: Arc<Sample>,
    history: VecDeque<Point>,
    looked_at: Option<Instant>,
}

impl Watch {
    /// A watch over `models`.
    pub fn new(models: Vec<Box<dyn Model>>, pool: PgPool, kafka: KafkaSettings) -> Self {
        Watch {
            models,
            pool,
            kafka,
            state: Mutex::new(State {
                latest: Arc::new(Sample::default()),
                history: VecDeque::new(),
                looked_at: None,
            }),
            wake: tokio::sync::Notify::new(),
            started: Instant::now(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last sample (and the history of the graphs); wakes the sampler.
    pub fn look(&self) -> (Arc<Sample>, Vec<Point>) {
        let mut state = self.state();
        if state
            .looked_at
            .is_none_or(|at| at.elapsed() > IDLE.saturating_sub(EVERY))
        {
            self.wake.notify_one();
        }
        state.looked_at = Some(Instant::now());
        (
            state.latest.clone(),
            state.history.iter().cloned().collect(),
        )
    }

    /// The names of the models, in the order of the samples.
    pub fn names(&self) -> Vec<&'static str> {
        self.models.iter().map(|m| m.name()).collect()
    }

    /// Waits for the next sample to be taken (at most `timeout`).
    pub async fn fresh(&self, timeout: Duration) -> Arc<Sample> {
        let before = self.state().latest.at;
        self.look();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let latest = self.state().latest.clone();
            if latest.at != before {
                return latest;
            }
        }
        self.state().latest.clone()
    }

    /// Samples every [`EVERY`] while pages are asked for, then sleeps until one is.
    pub async fn run(self: Arc<Self>) {
        // Made when a page is first looked at (a console nobody opens holds no Kafka
        // connection), and again after a failure to make it.
        let mut kafka: Option<Arc<BaseConsumer>> = None;
        loop {
            let idle = self.state().looked_at.is_none_or(|at| at.elapsed() > IDLE);
            if idle {
                // Nobody looks: no Kafka connection held.
                kafka = None;
                self.wake.notified().await;
                // The graphs show the minutes since sampling resumed, not a gap.
                self.state().history.clear();
                continue;
            }
            let started = Instant::now();
            if kafka.is_none() {
                // One record is all it reads of a partition: no prefetching of more.
                match read_committed_consumer(&self.kafka, "newsroom-console")
                    .set("enable.partition.eof", "false")
                    .set("queued.min.messages", "1")
                    .set("max.partition.fetch.bytes", "65536")
                    .create::<BaseConsumer>()
                {
                    Ok(consumer) => kafka = Some(Arc::new(consumer)),
                    Err(e) => {
                        tracing::warn!(error = %e, "the console cannot create its Kafka client")
                    }
                }
            }
            let sample = self.sample(kafka.clone()).await;
            let point = Point {
                at: self.started.elapsed().as_secs_f64(),
                values: sample
                    .consumers
                    .iter()
                    .map(|c| {
                        let lag = c.lag.unwrap_or(0);
                        (c.applied, lag, c.building.as_ref().map(|b| b.applied))
                    })
                    .collect(),
            };
            {
                let mut state = self.state();
                state.latest = Arc::new(sample);
                state.history.push_back(point);
                while state.history.len() > KEPT {
                    state.history.pop_front();
                }
            }
            tokio::time::sleep(EVERY.saturating_sub(started.elapsed())).await;
        }
    }

    /// Without a Kafka client, the stores' side alone, with the lag unknown.
    async fn sample(&self, kafka: Option<Arc<BaseConsumer>>) -> Sample {
        // A store that does not answer is reported, not waited for.
        let readings = futures::future::join_all(self.models.iter().map(|m| async move {
            tokio::time::timeout(READ_TIMEOUT, m.versions())
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "its store did not answer within {READ_TIMEOUT:?}"
                    ))
                })
        }))
        .await;
        let parked = match dead_letters::parked(&self.pool).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "console: reading dead letters");
                Vec::new()
            }
        };
        // Partition ends, the first unapplied record's time, and group members.
        let topics: BTreeSet<String> = self.models.iter().flat_map(|m| m.topics()).collect();
        // Each model's topics with the offsets it has applied (none yet: from 0).
        let applied: Vec<(Vec<String>, Offsets)> = self
            .models
            .iter()
            .zip(&readings)
            .filter_map(|(m, r)| r.as_ref().ok().map(|v| (m.topics(), v.offsets.clone())))
            .collect();
        let groups: Vec<String> = self
            .models
            .iter()
            .map(|m| format!("{}.{}", self.kafka.topic_prefix, m.name()))
            .collect();
        let read = tokio::task::spawn_blocking(move || {
            let client = kafka.context("no Kafka client could be made")?;
            let ends = ends(&client, &topics)?;
            // Offsets at or past the end have nothing to wait for.
            let mut waiting = BTreeSet::new();
            for (topics, offsets) in &applied {
                for ((t, p), end) in &ends {
                    let next = offsets.get(&(t.clone(), *p)).copied().unwrap_or(0);
                    if topics.contains(t) && next < *end {
                        waiting.insert((t.clone(), *p, next, *end));
                    }
                }
            }
            let waiting: Vec<(String, i32, i64, i64)> = waiting.into_iter().collect();
            let firsts = first_records(&client, &waiting);
            let members: Vec<Option<usize>> = groups
                .iter()
                .map(|g| {
                    // A group nobody ever joined is not listed: no members.
                    client
                        .fetch_group_list(Some(g), KAFKA_TIMEOUT)
                        .ok()
                        .map(|list| list.groups().first().map_or(0, |g| g.members().len()))
                })
                .collect();
            anyhow::Ok((ends, firsts, members))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        let (ends, firsts, members, kafka_error) = match read {
            Ok((ends, firsts, members)) => (ends, firsts, members, None),
            Err(e) => (
                BTreeMap::new(),
                BTreeMap::new(),
                vec![None; self.models.len()],
                Some(format!("{e:#}")),
            ),
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let consumers = self
            .models
            .iter()
            .zip(readings)
            .zip(members)
            .map(|((model, reading), members)| {
                let name = model.name();
                let versions = match reading {
                    Ok(v) => v,
                    Err(e) => {
                        return Consumer {
                            name,
                            active: 0,
                            partitions: Vec::new(),
                            lag: None,
                            lag_ms: None,
                            members,
                            parked: 0,
                            applied: 0,
                            building: None,
                            error: Some(format!("{e:#}")),
                        };
                    }
                };
                let mut partitions = Vec::new();
                // Unknown when Kafka could not be read at all.
                let mut lag = kafka_error.is_none().then_some(0);
                let (mut oldest, mut aged) = (None::<i64>, true);
                for topic in model.topics() {
                    for ((t, p), end) in ends.range((topic.clone(), 0)..=(topic.clone(), i32::MAX))
                    {
                        let next = versions.offsets.get(&(t.clone(), *p)).copied().unwrap_or(0);
                        // Lag counts from the first record still to apply (commit markers
                        // of transactions sit between records and at the end).
                        let behind = if next >= *end {
                            Some(0)
                        } else {
                            match firsts.get(&(t.clone(), *p, next)) {
                                Some(First::At { offset, appended }) => {
                                    match appended {
                                        Some(at) => {
                                            oldest = Some(oldest.map_or(*at, |o| o.min(*at)));
                                        }
                                        None => aged = false,
                                    }
                                    Some((end - offset).max(1))
                                }
                                Some(First::Past) => Some(0),
                                // Not read in time: not known.
                                None => None,
                            }
                        };
                        lag = lag.zip(behind).map(|(a, b)| a + b);
                        partitions.push(Partition {
                            name: format!("{t}/{p}"),
                            next,
                            end: *end,
                            lag: behind,
                        });
                    }
                }
                let building = versions.building.map(|(version, offsets)| Building {
                    version,
                    applied: offsets.values().sum(),
                    total: partitions.iter().map(|p| p.end).sum(),
                });
                let parked_here = parked
                    .iter()
                    .filter(|(consumer, version, _)| {
                        consumer == name && *version == versions.active
                    })
                    .map(|(_, _, count)| usize::try_from(*count).unwrap_or(0))
                    .sum();
                Consumer {
                    name,
                    active: versions.active,
                    lag,
                    lag_ms: match lag {
                        Some(0) => Some(0),
                        Some(_) if aged => oldest.map(|at| (now_ms - at).max(0)),
                        _ => None,
                    },
                    members,
                    parked: parked_here,
                    applied: versions.offsets.values().sum(),
                    partitions,
                    building,
                    error: None,
                }
            })
            .collect();
        Sample {
            at: Some(chrono::Utc::now()),
            consumers,
            kafka_error,
        }
    }
}

/// The end (high watermark) of every partition of `topics`.
fn ends(
    client: &BaseConsumer,
    topics: &BTreeSet<String>,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let mut ends = BTreeMap::new();
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = client
                    .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
                    .with_context(|| format!("reading the end of {topic}/{}", p.id()))?;
                ends.insert((topic.clone(), p.id()), high);
            }
        }
    }
    Ok(ends)
}

/// The first committed record at or after an offset.
#[derive(Debug, Clone, Copy)]
enum First {
    /// Its offset and append time (milliseconds), if the broker gave one.
    At { offset: i64, appended: Option<i64> },
    /// None: only commit markers or aborted records lie past the offset.
    Past,
}

/// For each (topic, partition, offset, end): the first committed record at or after the
/// offset. Offsets of the same partition are read in rounds, one each; what is not read in
/// time is left out (not known).
fn first_records(
    client: &BaseConsumer,
    wanted: &[(String, i32, i64, i64)],
) -> BTreeMap<(String, i32, i64), First> {
    let mut found = BTreeMap::new();
    let mut rounds: Vec<Vec<&(String, i32, i64, i64)>> = Vec::new();
    let mut seen: BTreeMap<(&str, i32), usize> = BTreeMap::new();
    for w in wanted {
        let round = seen.entry((w.0.as_str(), w.1)).or_default();
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(w);
        *round += 1;
    }
    // A handful of rounds at most: consumers far apart on one partition are rare (the
    // others stay unknown).
    for round in rounds.into_iter().take(4) {
        let mut list = TopicPartitionList::new();
        for (t, p, o, _) in &round {
            let _ = list.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if client.assign(&list).is_err() {
            continue;
        }
        let mut missing: BTreeMap<(String, i32), (i64, i64)> = round
            .iter()
            .map(|(t, p, o, end)| ((t.clone(), *p), (*o, *end)))
            .collect();
        let deadline = Instant::now() + Duration::from_millis(500);
        while !missing.is_empty() && Instant::now() < deadline {
            let Some(Ok(message)) = client.poll(Duration::from_millis(50)) else {
                continue;
            };
            let position = (message.topic().to_owned(), message.partition());
            if let Some((from, _)) = missing.remove(&position) {
                let appended = message.timestamp().to_millis();
                found.insert(
                    (position.0, position.1, from),
                    First::At {
                        offset: message.offset(),
                        appended,
                    },
                );
            }
        }
        // A partition whose reader went past the end without a record has none to apply.
        if let Ok(positions) = client.position() {
            for ((t, p), (from, end)) in missing {
                let past = positions
                    .find_partition(&t, p)
                    .and_then(|e| e.offset().to_raw())
                    .is_some_and(|at| at >= end);
                if past {
                    found.insert((t, p, from), First::Past);
                }
            }
        }
    }
    let _ = client.unassign();
    found
}

/// The points of a graph line, `(seconds, value)`, as an SVG polyline in a `width` by
/// `height` box whose top stands for `top`.
pub fn polyline(points: &[(f64, f64)], width: f64, height: f64, top: f64) -> String {
    let Some(first) = points.first() else {
        return String::new();
    };
    let last = points.last().map_or(first.0, |p| p.0);
    let span = (last - first.0).max(1.0);
    let top = top.max(1.0);
    points
        .iter()
        .map(|(at, v)| {
            format!(
                "{:.1},{:.1}",
                (at - first.0) / span * width,
                height - v.min(top) / top * height
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_polyline_spans_the_box_under_its_top() {
        let line = polyline(
            &[(10.0, 0.0), (12.0, 50.0), (14.0, 100.0)],
            200.0,
            100.0,
            100.0,
        );
        assert_eq!(line, "0.0,100.0 100.0,50.0 200.0,0.0");
        let line = polyline(&[(10.0, 0.0), (12.0, 50.0)], 200.0, 100.0, 200.0);
        assert_eq!(line, "0.0,100.0 200.0,75.0");
        assert_eq!(polyline(&[], 200.0, 100.0, 1.0), "");
    }

    #[test]
    fn a_build_s_progress_is_bounded() {
        let b = |applied, total| Building {
            version: 2,
            applied,
            total,
        };
        assert_eq!(b(50, 200).percent(), 25);
        assert_eq!(b(300, 200).percent(), 100);
        assert_eq!(b(0, 0).percent(), 100);
    }
}
