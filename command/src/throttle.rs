//! Throttles of the endpoints that spend a password hash (ADR 17): failed logins per
//! account and per client address, registrations and password changes per client
//! address. Counted in fixed one-minute windows, in memory, per process (a client spread
//! over several processes gets each one's allowance), and failed logins per account also
//! in PostgreSQL ([`SharedFailures`]), which every process reads: an account's limit holds
//! across processes. Over a limit → 429 `rate_limited` with `Retry-After`, before any
//! hashing. An attempt is counted in memory when it starts (so that concurrent attempts
//! cannot all pass a check first) and given back when it did not fail; the shared count
//! grows when one failed (so concurrent attempts on several processes may pass it by as
//! many as run at once).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use newsroom_infra::http::ApiError;
use newsroom_infra::limit::ClientAddress;
use newsroom_infra::settings::HttpSettings;

/// The length of a window.
const WINDOW: Duration = Duration::from_secs(60);
/// Keys counted at most per throttle. Past it, windows that ended are dropped (at most
/// once a second), and new keys go uncounted rather than growing memory.
const MAX_KEYS: usize = 100_000;
/// Failed logins an address may still try on an account that is over its own limit: the
/// account's owner, from where they usually log in, is not locked out by someone else's
/// guesses elsewhere.
const PER_ACCOUNT_AND_ADDRESS: u32 = 3;

struct Counts {
    keys: HashMap<String, (Instant, u32)>,
    swept: Instant,
}

/// Counts per key in the current window.
pub struct Throttle {
    limit: u32,
    counts: Mutex<Counts>,
}

impl Throttle {
    /// A throttle allowing `limit` per key per window (0: no limit).
    pub fn new(limit: u32) -> Self {
        Throttle {
            limit,
            counts: Mutex::new(Counts {
                keys: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Counts an attempt for `key`; 429 (and nothing counted) if `key` used its allowance
    /// in the current window.
    pub fn attempt(&self, key: &str) -> Result<(), ApiError> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.keys.len() >= MAX_KEYS && !counts.keys.contains_key(key) {
            if counts.swept.elapsed() >= Duration::from_secs(1) {
                counts.swept = Instant::now();
                counts.keys.retain(|_, (start, _)| start.elapsed() < WINDOW);
            }
            if counts.keys.len() >= MAX_KEYS {
                return Ok(());
            }
        }
        let now = Instant::now();
        let entry = counts.keys.entry(key.to_owned()).or_insert((now, 0));
        let age = now.saturating_duration_since(entry.0);
        if age >= WINDOW {
            *entry = (now, 0);
        } else if entry.1 >= self.limit {
            return Err(ApiError::RateLimited(
                WINDOW.saturating_sub(age).as_secs() + 1,
            ));
        }
        entry.1 = entry.1.saturating_add(1);
        Ok(())
    }

    /// Gives back an attempt counted for `key` (it did not fail).
    pub fn refund(&self, key: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = counts.keys.get_mut(key) {
            entry.1 = entry.1.saturating_sub(1);
        }
    }
}

/// The command API's throttles, and where the client's address comes from.
pub struct Throttles {
    /// Failed logins per account.
    login_account: Throttle,
    /// Failed logins per account from one address.
    login_pair: Throttle,
    /// Failed logins per client address.
    login_address: Throttle,
    /// Registrations and password changes per client address.
    pub credentials: Throttle,
    address: ClientAddress,
}

/// The attempts a login counted, given back unless it failed.
pub struct LoginAttempt<'a> {
    keys: Vec<(&'a Throttle, String)>,
}

impl LoginAttempt<'_> {
    /// Ends the attempt: a failed one (wrong credentials) stays counted.
    pub fn end(self, failed: bool) {
        if !failed {
            for (throttle, key) in &self.keys {
                throttle.refund(key);
            }
        }
    }
}

impl Throttles {
    /// The throttles `settings` configure.
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let per_account = settings.login_failures_per_account;
        Ok(Throttles {
            login_account: Throttle::new(per_account),
            login_pair: Throttle::new(if per_account == 0 {
                0
            } else {
                PER_ACCOUNT_AND_ADDRESS
            }),
            login_address: Throttle::new(settings.login_failures_per_address),
            credentials: Throttle::new(settings.credential_changes_per_address),
            address: ClientAddress::new(settings)?,
        })
    }

    /// Starts a login to `account` (a key naming it) from `address`: 429 when the address
    /// is over its limit, or the account is over its limit (here, or across processes:
    /// `shared_over` holds the seconds its window has left) and this address failed on it
    /// a few times already.
    pub fn login(
        &self,
        account: &str,
        address: &str,
        shared_over: Option<u64>,
    ) -> Result<LoginAttempt<'_>, ApiError> {
        self.login_address.attempt(address)?;
        let mut keys = vec![(&self.login_address, address.to_owned())];
        let pair = format!("{account}|{address}");
        let by_account = match shared_over {
            Some(seconds) => Err(ApiError::RateLimited(seconds)),
            None => self.login_account.attempt(account),
        };
        let by_pair = self.login_pair.attempt(&pair);
        if by_account.is_ok() {
            keys.push((&self.login_account, account.to_owned()));
        }
        if by_pair.is_ok() {
            keys.push((&self.login_pair, pair));
        }
        let attempt = LoginAttempt { keys };
        match (by_account, by_pair) {
            (Err(refused), Err(_)) => {
                attempt.end(false);
                Err(refused)
            }
            _ => Ok(attempt),
        }
    }

    /// The client's address (see [`ClientAddress`]).
    pub fn address(&self, req: &HttpRequest) -> String {
        self.address.of(req)
    }
}

/// Failed logins per account (an e-mail claim), counted in PostgreSQL for every command
/// process of the deployment.
pub struct SharedFailures {
    pool: sqlx::PgPool,
    limit: u32,
}

impl SharedFailures {
    /// `limit` failures per account per window (0: none counted); ended windows are
    /// deleted every minute by a task this starts.
    pub fn start(pool: sqlx::PgPool, limit: u32) -> std::sync::Arc<Self> {
        let shared = std::sync::Arc::new(SharedFailures { pool, limit });
        if limit > 0 {
            let weak = std::sync::Arc::downgrade(&shared);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(WINDOW);
                loop {
                    every.tick().await;
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    if let Err(e) = sqlx::query!(
                        "DELETE FROM cmd_login_failures WHERE window_start <= now() - make_interval(secs => $1)",
                        WINDOW.as_secs_f64(),
                    )
                    .execute(&shared.pool)
                    .await
                    {
                        tracing::debug!(error = %e, "deleting ended login-failure windows");
                    }
                }
            });
        }
        shared
    }

    /// The seconds left in the window of `claim` if it failed `limit` times in it. A
    /// database that does not answer counts nothing (the login needs it anyway).
    pub async fn over(&self, claim: &str) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        let row = sqlx::query!(
            r#"SELECT failures, extract(epoch FROM window_start + make_interval(secs => $2) - now())::float8 AS "left!"
               FROM cmd_login_failures WHERE claim = $1 AND window_start > now() - make_interval(secs => $2)"#,
            claim,
            WINDOW.as_secs_f64(),
        )
        .fetch_optional(&self.pool)
        .await;
        match row {
            Ok(Some(row)) if row.failures >= i32::try_from(self.limit).unwrap_or(i32::MAX) => {
                // As the in-memory throttle counts: whole seconds left, plus one.
                Some(row.left.max(0.0) as u64 + 1)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading an account's failed logins");
                None
            }
        }
    }

    /// Counts a failed login on `claim`, if some user holds it.
    pub async fn failed(&self, claim: &str) {
        if self.limit == 0 {
            return;
        }
        let counted = sqlx::query!(
            "INSERT INTO cmd_login_failures (claim, window_start, failures) \
             SELECT $1, now(), 1 WHERE EXISTS (SELECT 1 FROM cmd_email_claims WHERE claim = $1 AND state = 'held') \
             ON CONFLICT (claim) DO UPDATE SET \
               failures = CASE WHEN cmd_login_failures.window_start > now() - make_interval(secs => $2) \
                 THEN cmd_login_failures.failures + 1 ELSE 1 END, \
               window_start = CASE WHEN cmd_login_failures.window_start > now() - make_interval(secs => $2) \
                 THEN cmd_login_failures.window_start ELSE now() END",
            claim,
            WINDOW.as_secs_f64(),
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = counted {
            tracing::warn!(error = %e, "counting a failed login");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_allowance_is_refused_until_the_window_ends() {
        let throttle = Throttle::new(3);
        for _ in 0..3 {
            assert!(throttle.attempt("a").is_ok());
        }
        let Err(ApiError::RateLimited(seconds)) = throttle.attempt("a") else {
            panic!("the fourth is refused");
        };
        assert!((1..=60).contains(&seconds));
        throttle.refund("a");
        assert!(
            throttle.attempt("a").is_ok(),
            "a given back attempt counts no more"
        );
        assert!(throttle.attempt("b").is_ok(), "another key has its own");
        assert!(Throttle::new(0).attempt("a").is_ok(), "0: no limit");
    }

    #[test]
    fn an_account_under_attack_elsewhere_still_lets_its_owner_try() {
        let settings = HttpSettings {
            login_failures_per_account: 10,
            login_failures_per_address: 100,
            credential_changes_per_address: 100,
            requests_per_second_per_client: 0,
            ..newsroom_infra::Settings::local_defaults().http
        };
        let throttles = Throttles::new(&settings).expect("throttles");
        for _ in 0..10 {
            throttles
                .login("acct", "attacker", None)
                .expect("allowed")
                .end(true);
        }
        // The attacker's address is stopped: the account is over its limit, and the
        // address failed on it more than a few times.
        assert!(throttles.login("acct", "attacker", None).is_err());
        // The owner, elsewhere, may still log in.
        throttles
            .login("acct", "owner", None)
            .expect("the owner tries")
            .end(false);
        assert!(throttles.login("acct", "owner", None).is_ok());
    }
}
