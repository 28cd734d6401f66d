//! A load generator: closed loop (a fixed number of clients, each sending its next request
//! when the previous answered) or open loop (a fixed rate), with latency percentiles.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Successes per second.
    pub per_second: f64,
    /// Latency percentiles and maximum, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Stats {
    /// Stats of `latencies` (microseconds of the successes) over `elapsed`.
    pub fn of(mut latencies: Vec<u64>, errors: u64, elapsed: Duration) -> Stats {
        latencies.sort_unstable();
        let at = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i] as f64 / 1000.0
        };
        Stats {
            ok: latencies.len() as u64,
            errors,
            per_second: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: latencies.last().map_or(0.0, |m| *m as f64 / 1000.0),
        }
    }
}

/// `clients` loops calling `request(i)` (i counts requests across clients) for `duration`,
/// or until `limit` requests were started.
pub async fn closed<F, Fut>(
    clients: usize,
    duration: Duration,
    limit: Option<usize>,
    request: F,
) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (request, next, stop) = (request.clone(), next.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) && started.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|l| i >= l) {
                    break;
                }
                let t = Instant::now();
                match request(i).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        if let Ok((latencies, e)) = task.await {
            all.extend(latencies);
            errors += e;
        }
    }
    stop.store(true, Ordering::Relaxed);
    Stats::of(all, errors, started.elapsed())
}

/// Starts `request(i)` `rate` times a second for `duration`, whatever the answers take;
/// each request reports its own measured duration (microseconds).
pub async fn open<F, Fut>(rate: u32, duration: Duration, request: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        tasks.push(tokio::spawn(request(i)));
        i += 1;
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await {
            Ok(Ok(micros)) => latencies.push(micros),
            _ => errors += 1,
        }
    }
    Stats::of(latencies, errors, duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_read_from_the_sorted_latencies() {
        let stats = Stats::of(
            (1..=100).map(|ms| ms * 1000).collect(),
            2,
            Duration::from_secs(2),
        );
        assert_eq!((stats.ok, stats.errors, stats.per_second), (100, 2, 50.0));
        assert_eq!(
            (stats.p50_ms, stats.p90_ms, stats.p99_ms, stats.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
    }
}
