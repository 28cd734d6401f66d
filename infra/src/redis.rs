//! Redis connections. Redis holds read models that can always be rebuilt from the log, so
//! a client never waits long for it: short timeouts, and callers fall back or retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use anyhow::Context as _;

use crate::settings::{KafkaSettings, RedisSettings};

/// A connection that reconnects by itself; made without contacting Redis, so that a role
/// starts while Redis is down.
pub fn connect(settings: &RedisSettings) -> anyhow::Result<ConnectionManager> {
    let client = ::redis::Client::open(settings.url.as_str()).context("parsing the Redis URL")?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(1000)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// The root of every key of one of the deployment's Redis read models: `<prefix>:<model>`.
pub fn root(kafka: &KafkaSettings, model: &str) -> String {
    format!("{}:{model}", kafka.topic_prefix)
}

/// Whether Redis answered lately. Readers skip Redis while it is marked down, and a
/// watcher marks it up again once it answers a PING.
#[derive(Clone)]
pub struct Health {
    up: Arc<AtomicBool>,
}

impl Health {
    /// Starts the watcher over `connection` (checks every `every`).
    pub fn watch(mut connection: ConnectionManager, every: Duration) -> Self {
        let health = Health {
            up: Arc::new(AtomicBool::new(true)),
        };
        let flag = health.up.clone();
        tokio::spawn(async move {
            loop {
                let answered = ::redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok();
                if answered != flag.swap(answered, Ordering::Relaxed) {
                    if answered {
                        tracing::info!("Redis answers again; serving from it");
                    } else {
                        tracing::warn!("Redis does not answer; serving from PostgreSQL");
                    }
                }
                // Stop once every handle but this task's is gone.
                if Arc::strong_count(&flag) == 1 {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        health
    }

    /// Whether Redis is believed up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Marks Redis down after a failed call (the watcher marks it up again).
    pub fn failed(&self, error: &::redis::RedisError) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %error, "Redis failed; serving from PostgreSQL");
        }
    }
}

/// One SCAN step over the keys matching `pattern`: the next cursor (0 at the end) and keys.
async fn scan(
    redis: &mut impl ::redis::aio::ConnectionLike,
    pattern: &str,
    cursor: u64,
) -> anyhow::Result<(u64, Vec<String>)> {
    Ok(::redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000)
        .query_async(redis)
        .await?)
}

/// Unlinks every key matching `pattern`, a thousand at a time.
pub async fn unlink_matching(
    redis: &mut impl ::redis::aio::ConnectionLike,
    pattern: &str,
) -> anyhow::Result<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = scan(redis, pattern, cursor).await?;
        if !keys.is_empty() {
            let (): () = ::redis::cmd("UNLINK").arg(&keys).query_async(redis).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Every key under `prefix` (named without it) with its value in a canonical form that two
/// copies of a read model agree on: a hash as sorted `field=value`, a sorted set as
/// `member`, `score` pairs in rank order, a set sorted, a list in order, a string alone.
pub async fn dump(
    redis: &mut impl ::redis::aio::ConnectionLike,
    prefix: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch) = scan(redis, &pattern, cursor).await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut dumped = std::collections::BTreeMap::new();
    for chunk in keys.chunks(500) {
        let mut types = ::redis::pipe();
        for key in chunk {
            types.cmd("TYPE").arg(key);
        }
        let kinds: Vec<String> = types.query_async(redis).await?;
        let mut values = ::redis::pipe();
        for (key, kind) in chunk.iter().zip(&kinds) {
            match kind.as_str() {
                "hash" => values.cmd("HGETALL").arg(key),
                "zset" => values
                    .cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
                "set" => values.cmd("SMEMBERS").arg(key),
                "list" => values.cmd("LRANGE").arg(key).arg(0).arg(-1),
                _ => values.cmd("GET").arg(key),
            };
        }
        let answers: Vec<::redis::Value> = values.query_async(redis).await?;
        for ((key, kind), answer) in chunk.iter().zip(&kinds).zip(answers) {
            let value: Vec<String> = match kind.as_str() {
                "hash" => {
                    let map: std::collections::BTreeMap<String, String> =
                        ::redis::from_redis_value(answer)?;
                    map.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
                }
                "set" => {
                    let mut members: Vec<String> = ::redis::from_redis_value(answer)?;
                    members.sort();
                    members
                }
                // A key deleted between SCAN and TYPE reads as none.
                "none" => continue,
                "zset" | "list" => ::redis::from_redis_value(answer)?,
                _ => vec![::redis::from_redis_value(answer)?],
            };
            dumped.insert(key[prefix.len()..].to_owned(), value);
        }
    }
    Ok(dumped)
}
