//! Password hashing with Argon2id, off the async threads (it is CPU-bound on purpose).

use anyhow::Context as _;
use argon2::password_hash::{
    PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};
use newsroom_infra::http::ApiError;
use newsroom_infra::settings::HashingSettings;

/// Hashes passwords with fixed Argon2id parameters, on half the cores by default (the other
/// half keeps serving everything else while logins flood in)
/// (each takes its memory cost, 19 MiB by default, while it runs); a bounded number wait,
/// and past that a request is refused with 503 before it costs anything.
#[derive(Clone)]
pub struct Hasher {
    params: Params,
    running: std::sync::Arc<tokio::sync::Semaphore>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max_waiting: usize,
}

/// Hashes waiting per hashing thread before new ones are refused.
const WAITING_PER_THREAD: usize = 64;

impl Hasher {
    /// A hasher with the configured cost.
    pub fn new(settings: &HashingSettings) -> anyhow::Result<Self> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|e| anyhow::anyhow!("invalid Argon2 parameters: {e}"))?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        // Never more than the cores: each hash holds a core for its whole run.
        let threads = match settings.threads {
            0 => (cores / 2).max(1),
            threads => threads.min(cores),
        };
        Ok(Hasher {
            params,
            running: std::sync::Arc::new(tokio::sync::Semaphore::new(threads)),
            waiting: std::sync::Arc::default(),
            max_waiting: threads * WAITING_PER_THREAD,
        })
    }

    /// Runs `work` when a core is free; refused at once when too many wait already.
    async fn bounded<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        use std::sync::atomic::Ordering;
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::Unavailable(
                "too many password checks are waiting; retry shortly".into(),
            ));
        }
        let waiting = Waiting(&self.waiting);
        let permit = self
            .running
            .clone()
            .acquire_owned()
            .await
            .context("the hashing semaphore closed")?;
        drop(waiting);
        Ok(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .context("the hashing task panicked")?)
    }

    /// The PHC string of `password` with a fresh random salt.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let params = self.params.clone();
        Ok(self
            .bounded(move || {
                let salt = SaltString::generate(&mut OsRng);
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password(password.as_bytes(), &salt)
                    .map(|h| h.to_string())
                    .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
            })
            .await??)
    }

    /// Whether `password` matches the PHC string `hash` (an empty or invalid hash never does).
    pub async fn verify(&self, hash: &str, password: String) -> Result<bool, ApiError> {
        let hash = hash.to_owned();
        self.bounded(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
    }

    /// Spends the time of one hash, so that an unknown e-mail and a wrong password take
    /// as long to refuse.
    /// A full queue is answered as for a known address (503), so that it tells nothing.
    pub async fn waste_time(&self, password: String) -> Result<(), ApiError> {
        self.hash(password).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHash;

    #[tokio::test]
    async fn a_hash_is_argon2id_and_verifies_only_its_password() -> anyhow::Result<()> {
        let settings = HashingSettings {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
            threads: 0,
        };
        let hash = Hasher::new(&settings)?.hash("correct horse".into()).await?;
        let parsed = PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("{e}"))?;
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
        Ok(())
    }
}
