//! Password hashing with Argon2id, off the async threads (it is CPU-bound on purpose).

use anyhow::Context as _;
use argon2::password_hash::{
    PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};
use newsroom_infra::settings::HashingSettings;

/// Hashes passwords with fixed Argon2id parameters.
#[derive(Clone)]
pub struct Hasher {
    params: Params,
}

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
        Ok(Hasher { params })
    }

    /// The PHC string of `password` with a fresh random salt.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
        })
        .await
        .context("the hashing task panicked")?
    }

    /// Whether `password` matches the PHC string `hash` (an empty or invalid hash never does).
    pub async fn verify(&self, hash: &str, password: String) -> anyhow::Result<bool> {
        let hash = hash.to_owned();
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .context("the verifying task panicked")
    }

    /// Spends the time of one hash, so that an unknown e-mail and a wrong password take
    /// as long to refuse.
    pub async fn waste_time(&self, password: String) {
        let _ = self.hash(password).await;
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
