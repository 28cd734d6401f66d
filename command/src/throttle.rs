//! Throttles of the endpoints that spend a password hash (ADR 17): failed logins per
//! account and per client address, registrations and password changes per client
//! address. Counted in fixed one-minute windows, in memory, per process (a client spread
//! over several processes gets each one's allowance). Over a limit → 429 `rate_limited`
//! with `Retry-After`, before any hashing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use newsroom_infra::http::ApiError;
use newsroom_infra::settings::HttpSettings;

/// The length of a window.
const WINDOW: Duration = Duration::from_secs(60);
/// Keys counted at most per throttle (an address-spraying client cannot grow it further:
/// past it, windows that ended are dropped, then new keys are refused).
const MAX_KEYS: usize = 100_000;

/// Counts per key in the current window.
pub struct Throttle {
    limit: u32,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Throttle {
    /// A throttle allowing `limit` per key per window (0: no limit).
    pub fn new(limit: u32) -> Self {
        Throttle {
            limit,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// 429 if `key` used its allowance in the current window.
    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        if self.limit == 0 {
            return Ok(());
        }
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get(key) {
            Some((start, count)) if *count >= self.limit && start.elapsed() < WINDOW => Err(
                ApiError::RateLimited((WINDOW - start.elapsed()).as_secs() + 1),
            ),
            _ => Ok(()),
        }
    }

    /// Counts one for `key`.
    pub fn hit(&self, key: &str) {
        if self.limit == 0 {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_KEYS && !counts.contains_key(key) {
            counts.retain(|_, (start, _)| start.elapsed() < WINDOW);
            if counts.len() >= MAX_KEYS {
                return;
            }
        }
        let entry = counts.entry(key.to_owned()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Checks, then counts one.
    pub fn take(&self, key: &str) -> Result<(), ApiError> {
        self.check(key)?;
        self.hit(key);
        Ok(())
    }
}

/// The command API's throttles, and where the client's address comes from.
pub struct Throttles {
    /// Failed logins per account.
    pub login_account: Throttle,
    /// Failed logins per client address.
    pub login_address: Throttle,
    /// Registrations and password changes per client address.
    pub credentials: Throttle,
    address_header: Option<actix_web::http::header::HeaderName>,
}

impl Throttles {
    /// The throttles `settings` configure.
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let address_header = settings
            .client_address_header
            .as_deref()
            .map(actix_web::http::header::HeaderName::try_from)
            .transpose()
            .map_err(|e| anyhow::anyhow!("NEWSROOM_CLIENT_ADDRESS_HEADER: {e}"))?;
        Ok(Throttles {
            login_account: Throttle::new(settings.login_failures_per_account),
            login_address: Throttle::new(settings.login_failures_per_address),
            credentials: Throttle::new(settings.credential_changes_per_address),
            address_header,
        })
    }

    /// The client's address: from the trusted proxy's header if one is configured (its
    /// last entry), else the connection's peer.
    pub fn address(&self, req: &HttpRequest) -> String {
        let from_header = self.address_header.as_ref().and_then(|name| {
            let value = req.headers().get(name)?.to_str().ok()?;
            Some(value.rsplit(',').next()?.trim().to_owned())
        });
        let address = from_header
            .or_else(|| req.peer_addr().map(|a| a.ip().to_string()))
            .unwrap_or_default();
        format!("address:{address}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_allowance_is_refused_until_the_window_ends() {
        let throttle = Throttle::new(3);
        for _ in 0..3 {
            assert!(throttle.take("a").is_ok());
        }
        let Err(ApiError::RateLimited(seconds)) = throttle.take("a") else {
            panic!("the fourth is refused");
        };
        assert!((1..=60).contains(&seconds));
        assert!(throttle.check("b").is_ok(), "another key has its own");
        assert!(Throttle::new(0).take("a").is_ok(), "0: no limit");
    }
}
