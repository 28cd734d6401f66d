//! `X-Consistency-Token`: a query that sends one is answered only from read models that
//! include the positions it names, waiting up to `X-Consistency-Timeout-Ms` (default 3000,
//! at most 30000); still behind at the deadline → 503 `projection_lagging`.

use std::time::Duration;

use actix_web::HttpRequest;
use anyhow::Context as _;
use newsroom_events::consistency::ConsistencyToken;
use newsroom_infra::http::ApiError;
use sqlx::PgPool;

/// The request header carrying a token.
pub const TOKEN: &str = "x-consistency-token";
/// The request header bounding the wait.
pub const TIMEOUT: &str = "x-consistency-timeout-ms";
/// How long a request waits for its token unless it says otherwise.
pub const DEFAULT_TIMEOUT_MS: u64 = 3000;
/// The longest wait a request may ask for.
pub const MAX_TIMEOUT_MS: u64 = 30_000;
const POLL: Duration = Duration::from_millis(5);

/// The projection that has applied a stream's events.
fn projection_of(stream: &str) -> Option<&'static str> {
    match stream {
        "users" => Some("users"),
        "news" => Some("news"),
        "reads" => Some("reads"),
        _ => None,
    }
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, ApiError> {
    req.headers()
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::Malformed(format!("{name} must be ASCII")))
        })
        .transpose()
}

/// What a request's token asks for: positions of the log the read models must include,
/// and until when to wait for them.
pub struct Wanted {
    /// (projection, topic, partition, offset of the write).
    pub positions: Vec<(&'static str, String, i32, i64)>,
    /// When to give up.
    pub deadline: tokio::time::Instant,
}

impl Wanted {
    /// The positions of `streams` as Redis offset fields (`topic:partition`) and the least
    /// next offset that includes each (a model answers only for the streams it reads).
    pub fn redis_args(&self, streams: &[&str]) -> Vec<String> {
        self.positions
            .iter()
            .filter(|(projection, ..)| streams.contains(projection))
            .flat_map(|(_, topic, partition, offset)| {
                [
                    format!("{topic}:{partition}"),
                    offset.saturating_add(1).to_string(),
                ]
            })
            .collect()
    }

    /// The same wait, answered by `projection` for the positions of `streams`.
    pub fn served_by(&self, projection: &'static str, streams: &[&str]) -> Wanted {
        Wanted {
            positions: self
                .positions
                .iter()
                .map(|(p, topic, partition, offset)| {
                    let by = if streams.contains(p) { projection } else { p };
                    (by, topic.clone(), *partition, *offset)
                })
                .collect(),
            deadline: self.deadline,
        }
    }
}

/// The request's token, if it has one (400 if it names a position the log does not have).
pub async fn wanted(req: &HttpRequest, state: &crate::State) -> Result<Option<Wanted>, ApiError> {
    let arrived = tokio::time::Instant::now();
    let topic_prefix = &state.topic_prefix;
    let Some(text) = header(req, TOKEN)? else {
        return Ok(None);
    };
    let token = ConsistencyToken::parse(text.trim()).map_err(|_| {
        ApiError::Malformed("X-Consistency-Token is not a token this server issued".into())
    })?;
    let timeout_ms = match header(req, TIMEOUT)? {
        None => DEFAULT_TIMEOUT_MS,
        Some(raw) => raw
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms <= MAX_TIMEOUT_MS)
            .ok_or_else(|| {
                ApiError::Malformed(format!(
                    "X-Consistency-Timeout-Ms must be 0 to {MAX_TIMEOUT_MS}"
                ))
            })?,
    };
    let mut positions = Vec::new();
    for (stream, position) in token.positions() {
        let projection = projection_of(stream).ok_or_else(|| {
            ApiError::Malformed(format!(
                "X-Consistency-Token names an unknown stream {stream}"
            ))
        })?;
        let topic = format!("{topic_prefix}.{stream}");
        positions.push((projection, topic, position.partition, position.offset));
    }
    let named: Vec<(String, i32, i64)> = positions
        .iter()
        .map(|(_, topic, partition, offset)| (topic.clone(), *partition, *offset))
        .collect();
    let confirmed = state.log_ends.check(&named).await?;
    Ok(Some(Wanted {
        positions,
        deadline: arrived + wait_for(timeout_ms, confirmed),
    }))
}

/// How long a token waits for the read models: what the caller asked, or no longer than
/// the default when the log's end could not confirm it (a forged token then holds a
/// request for seconds, not for the 30 s a caller may ask).
fn wait_for(timeout_ms: u64, confirmed: bool) -> Duration {
    let ms = if confirmed {
        timeout_ms
    } else {
        timeout_ms.min(DEFAULT_TIMEOUT_MS)
    };
    Duration::from_millis(ms)
}

/// Waits until the read models include the request's token, if it has one.
pub async fn wait(req: &HttpRequest, state: &crate::State) -> Result<(), ApiError> {
    wait_postgres(&state.pool, wanted(req, state).await?.as_ref()).await
}

/// Waits until the active versions of the PostgreSQL read models include `wanted`.
pub async fn wait_postgres(pool: &PgPool, wanted: Option<&Wanted>) -> Result<(), ApiError> {
    let Some(wanted) = wanted else {
        return Ok(());
    };
    loop {
        let mut behind = false;
        for (projection, topic, partition, offset) in &wanted.positions {
            let next = sqlx::query_scalar!(
                "SELECT o.next_offset FROM projection_offsets o \
                 JOIN projection_versions v ON v.projection = o.projection AND v.active = o.version \
                 WHERE o.projection = $1 AND o.topic = $2 AND o.partition = $3",
                projection,
                topic,
                partition,
            )
            .fetch_optional(pool)
            .await
            .context("reading projection offsets")
            .map_err(|e| {
                tracing::error!(error = format!("{e:#}"), "consistency check");
                ApiError::Unavailable("the read models are unavailable".into())
            })?;
            if next.is_none_or(|next| next <= *offset) {
                behind = true;
                break;
            }
        }
        if !behind {
            return Ok(());
        }
        if tokio::time::Instant::now() >= wanted.deadline {
            return Err(ApiError::ProjectionLagging);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unconfirmed_token_waits_no_longer_than_the_default() {
        assert_eq!(wait_for(MAX_TIMEOUT_MS, true).as_millis(), 30_000);
        assert_eq!(
            wait_for(MAX_TIMEOUT_MS, false).as_millis(),
            u128::from(DEFAULT_TIMEOUT_MS)
        );
        assert_eq!(wait_for(100, false).as_millis(), 100);
    }

    #[test]
    fn the_last_possible_offset_asks_for_no_more_than_it_can() {
        let wanted = Wanted {
            positions: vec![
                ("news", "t.news".into(), 0, i64::MAX),
                ("users", "t.users".into(), 1, 7),
            ],
            deadline: tokio::time::Instant::now(),
        };
        assert_eq!(
            wanted.redis_args(&["news"]),
            ["t.news:0".to_owned(), i64::MAX.to_string()]
        );
        assert_eq!(wanted.redis_args(&["users"]), ["t.users:1", "8"]);
    }
}
