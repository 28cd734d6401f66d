//! The request limit of both APIs (ADR 24): every request counts against its client
//! address, and an authenticated one against its user too, each allowed a steady rate
//! with a burst of one second's worth (the generic cell rate algorithm: one instant per
//! key, no counters, no windows to reset). Over it → 429 `rate_limited` with
//! `Retry-After`, before the handler runs. Counted in memory, per process.
//!
//! Where the client's address comes from is decided here too, for the command API's
//! login and credential throttles as well.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{RequestHead, ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderName;
use actix_web::middleware::Next;
use actix_web::{HttpRequest, ResponseError as _, web};

use crate::http::ApiError;
use crate::settings::HttpSettings;

/// Where a request's client address comes from.
#[derive(Debug, Clone, Default)]
pub struct ClientAddress {
    header: Option<HeaderName>,
}

impl ClientAddress {
    /// From the trusted proxy's header `settings` name, if any.
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let header = settings
            .client_address_header
            .as_deref()
            .map(HeaderName::try_from)
            .transpose()
            .map_err(|e| anyhow::anyhow!("NEWSROOM_CLIENT_ADDRESS_HEADER: {e}"))?;
        Ok(ClientAddress { header })
    }

    /// The client's address as a key (`address:…`): from the trusted proxy's header if
    /// one is configured (the last entry of its last line: what the nearest proxy wrote,
    /// whatever the client sent before it), else the connection's peer; an IPv6 address
    /// stands for its /64 (one host usually has a whole /64).
    pub fn of(&self, req: &HttpRequest) -> String {
        let from_header = self.header.as_ref().and_then(|name| {
            let value = req.headers().get_all(name).last()?.to_str().ok()?;
            Some(value.rsplit(',').next()?.trim().to_owned())
        });
        let address = from_header
            .or_else(|| req.peer_addr().map(|a| a.ip().to_string()))
            .unwrap_or_default();
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => format!("address:{v4}"),
                None => {
                    let s = v6.segments();
                    format!("address:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
            // Whatever a misconfigured proxy sends, the key stays short.
            _ => format!("address:{}", address.chars().take(64).collect::<String>()),
        }
    }
}

/// Keys tracked at most (a key costs ~100 bytes). Past it, keys whose allowance is whole
/// again are dropped (at most once a second per shard), and new keys go uncounted
/// rather than growing memory.
const MAX_KEYS: usize = 200_000;
/// Shards of the key table: requests of different keys rarely wait on one lock.
const SHARDS: usize = 16;

struct Shard {
    /// Per key, the theoretical arrival time: when its allowance is whole again.
    due: HashMap<String, Instant>,
    swept: Instant,
}

/// A rate per key with a burst, by the generic cell rate algorithm.
pub struct RateLimit {
    /// Time one request uses of the allowance.
    interval: Duration,
    /// How far ahead of now a key's theoretical arrival time may run (the burst).
    tolerance: Duration,
    shards: Vec<Mutex<Shard>>,
}

impl RateLimit {
    /// `per_second` requests a second per key, up to one second's worth at once.
    /// `None` for 0 (no limit).
    pub fn new(per_second: u32) -> Option<Self> {
        if per_second == 0 {
            return None;
        }
        let interval = Duration::from_secs(1) / per_second;
        Some(RateLimit {
            interval,
            tolerance: Duration::from_secs(1).saturating_sub(interval),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        due: HashMap::new(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
        })
    }

    /// Counts a request of each of `keys` at `now`, or of none: the seconds to wait if
    /// one of them is over its rate. (Checked, then counted, one lock at a time: requests
    /// racing on the same keys may pass a check together, each still counted.)
    pub fn admit(&self, keys: &[&str], now: Instant) -> Result<(), u64> {
        for key in keys {
            self.wait(key, now)?;
        }
        for key in keys {
            // A race lost since the check is let through (counted if it fits).
            let _ = self.check(key, now);
        }
        Ok(())
    }

    /// The seconds `key` has to wait at `now` (nothing counted).
    fn wait(&self, key: &str, now: Instant) -> Result<(), u64> {
        let shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match shard.due.get(key) {
            Some(due) if due.saturating_duration_since(now) > self.tolerance => {
                let wait = due.saturating_duration_since(now) - self.tolerance;
                Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
            _ => Ok(()),
        }
    }

    /// Counts a request of `key` at `now`; the seconds to wait if it is over its rate
    /// (nothing counted then).
    pub fn check(&self, key: &str, now: Instant) -> Result<(), u64> {
        let mut shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shard.due.len() >= MAX_KEYS / SHARDS && !shard.due.contains_key(key) {
            if now.saturating_duration_since(shard.swept) >= Duration::from_secs(1) {
                shard.swept = now;
                shard.due.retain(|_, due| *due > now);
            }
            if shard.due.len() >= MAX_KEYS / SHARDS {
                return Ok(());
            }
        }
        let due = shard.due.get(key).copied().unwrap_or(now).max(now);
        let ahead = due - now;
        if ahead > self.tolerance {
            let wait = ahead - self.tolerance;
            return Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        }
        shard.due.insert(key.to_owned(), due + self.interval);
        Ok(())
    }
}

/// The shard of `key` (FNV-1a: cheap, and stable within the process).
fn shard_of(key: &str) -> usize {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    hash as usize % SHARDS
}

/// Requests another process of the deployment sent on a client's behalf (counted where
/// the client sent them), which the limit lets through.
pub type Exempt = Box<dyn Fn(&RequestHead) -> bool + Send + Sync>;

/// The request limit of one API, registered as app data for [`middleware`].
pub struct Limiter {
    rate: Option<RateLimit>,
    address: ClientAddress,
    exempt: Option<Exempt>,
}

impl Limiter {
    /// The limit `settings` configure; `exempt` names requests it lets through.
    pub fn new(settings: &HttpSettings, exempt: Option<Exempt>) -> anyhow::Result<Self> {
        Ok(Limiter {
            rate: RateLimit::new(settings.requests_per_second_per_client),
            address: ClientAddress::new(settings)?,
            exempt,
        })
    }

    /// Counts `req` against its address and its user, or against neither: the seconds
    /// to wait if either is over its rate. The ops endpoints are not counted: a load
    /// balancer's probes must not be refused because its clients are busy.
    fn admit(&self, req: &HttpRequest) -> Result<(), u64> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        if matches!(req.path(), "/healthz" | "/readyz" | "/metrics")
            || self
                .exempt
                .as_ref()
                .is_some_and(|exempt| exempt(req.head()))
        {
            return Ok(());
        }
        let address = self.address.of(req);
        match crate::auth::caller_id(req) {
            Some(user) => rate.admit(&[&address, &format!("user:{user}")], Instant::now()),
            None => rate.admit(&[&address], Instant::now()),
        }
    }
}

/// Middleware of both APIs (inside [`crate::auth::authenticate`], so that a request's
/// user is known): 429 `rate_limited` for a request over its address's or its user's
/// rate.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let refused = req
        .app_data::<web::Data<Limiter>>()
        .and_then(|limiter| limiter.admit(req.request()).err());
    if let Some(seconds) = refused {
        let response = ApiError::RateLimited(seconds).error_response();
        return Ok(req.into_response(response));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let limit = RateLimit::new(10).expect("a limit");
        let start = Instant::now();
        for i in 0..10 {
            assert!(limit.check("a", start).is_ok(), "request {i} of the burst");
        }
        assert_eq!(limit.check("a", start), Err(1), "the eleventh waits");
        assert!(limit.check("b", start).is_ok(), "another key has its own");
        // A tenth of a second later one more is allowed, and only one.
        let later = start + Duration::from_millis(100);
        assert!(limit.check("a", later).is_ok());
        assert!(limit.check("a", later).is_err());
        // After a second of rest, the whole burst again.
        let rested = start + Duration::from_secs(2);
        for _ in 0..10 {
            assert!(limit.check("a", rested).is_ok());
        }
        assert!(limit.check("a", rested).is_err());
        assert!(RateLimit::new(0).is_none(), "0: no limit");
    }

    #[test]
    fn a_refused_request_uses_nothing_of_the_allowance() {
        let limit = RateLimit::new(2).expect("a limit");
        let start = Instant::now();
        assert!(limit.check("a", start).is_ok());
        assert!(limit.check("a", start).is_ok());
        for _ in 0..1000 {
            assert!(limit.check("a", start).is_err());
        }
        // Half a second on, one request's worth came back, whatever was refused.
        assert!(limit.check("a", start + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_request_refused_for_one_key_counts_against_none() {
        let limit = RateLimit::new(2).expect("a limit");
        let start = Instant::now();
        assert!(limit.admit(&["user"], start).is_ok());
        assert!(limit.admit(&["user"], start).is_ok());
        // The user is over; the address it comes from is not charged for the refusal.
        for _ in 0..10 {
            assert!(limit.admit(&["address", "user"], start).is_err());
        }
        assert!(limit.admit(&["address"], start).is_ok());
        assert!(limit.admit(&["address"], start).is_ok());
        assert!(limit.admit(&["address"], start).is_err());
    }

    #[test]
    fn keys_past_the_table_size_go_uncounted_until_old_ones_expire() {
        let limit = RateLimit::new(1).expect("a limit");
        let start = Instant::now();
        // Fill every shard.
        let mut i = 0u64;
        while limit
            .shards
            .iter()
            .any(|s| s.lock().expect("unpoisoned").due.len() < MAX_KEYS / SHARDS)
        {
            let _ = limit.check(&format!("k{i}"), start);
            i += 1;
        }
        // A new key is let through uncounted; the table does not grow.
        for _ in 0..5 {
            assert!(limit.check("new", start).is_ok());
        }
        let size: usize = limit
            .shards
            .iter()
            .map(|s| s.lock().expect("unpoisoned").due.len())
            .sum();
        assert_eq!(size, MAX_KEYS);
        // Once the old keys' allowances are whole again they are swept, and the new key
        // is counted.
        let later = start + Duration::from_secs(3);
        assert!(limit.check("new", later).is_ok());
        assert!(limit.check("new", later).is_err());
    }
}
