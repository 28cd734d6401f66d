//! Where the per-user data keys live (crypto-shredding): the `cmd_user_keys` table, with
//! an in-memory cache per process. Deleting a user's row destroys their key; from then on
//! the personal fields of their events cannot be read by anyone.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use newsroom_events::personal::UserKey;
use sqlx::PgPool;
use uuid::Uuid;

/// The key store.
#[derive(Clone)]
pub struct Keys {
    pool: PgPool,
    cache: Arc<RwLock<HashMap<Uuid, UserKey>>>,
}

impl Keys {
    /// A store over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Keys {
            pool,
            cache: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// Creates and stores a key for a new user of `partition`; the key stored already for
    /// `user` if there is one (a keyed registration retried: its id is derived from the key).
    pub async fn create(&self, user: Uuid, partition: i32) -> anyhow::Result<UserKey> {
        let fresh = UserKey::generate();
        let stored = sqlx::query_scalar!(
            "INSERT INTO cmd_user_keys (user_id, key, partition) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id RETURNING key",
            user,
            fresh.0.as_slice(),
            partition,
        )
        .fetch_one(&self.pool)
        .await
        .context("storing a user key")?;
        let key = UserKey::from_slice(&stored).context("a stored user key is malformed")?;
        self.remember(user, key.clone());
        Ok(key)
    }

    /// Loads every key of `partition` into the cache (before its state is rebuilt).
    pub async fn load_partition(&self, partition: i32) -> anyhow::Result<()> {
        let rows = sqlx::query!(
            "SELECT user_id, key FROM cmd_user_keys WHERE partition = $1",
            partition,
        )
        .fetch_all(&self.pool)
        .await
        .context("loading user keys")?;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            if let Some(key) = UserKey::from_slice(&row.key) {
                cache.insert(row.user_id, key);
            }
        }
        Ok(())
    }

    /// The cached key of `user`, if it exists.
    pub fn get(&self, user: Uuid) -> Option<UserKey> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&user)
            .cloned()
    }

    /// Destroys the key of `user`.
    pub async fn destroy(&self, user: Uuid) -> anyhow::Result<()> {
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&user);
        sqlx::query!("DELETE FROM cmd_user_keys WHERE user_id = $1", user)
            .execute(&self.pool)
            .await
            .context("destroying a user key")?;
        Ok(())
    }

    fn remember(&self, user: Uuid, key: UserKey) {
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user, key);
    }
}
