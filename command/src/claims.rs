//! E-mail uniqueness across users: a claim per normalised address, keyed by an HMAC of it
//! (the address itself is personal data and never stored here). The primary key of
//! `cmd_email_claims` decides races; a claim is `pending` while its command is in flight
//! and `held` once the command committed.

use std::collections::HashMap;

use anyhow::Context as _;
use newsroom_infra::settings::AuthSettings;
use sqlx::PgPool;
use uuid::Uuid;

use crate::digest;
use crate::domain::user::User;
use crate::keys::Keys;

/// The fixed pepper of local mode (development data only).
const LOCAL_PEPPER: &str = "newsroom-local-development-pepper";

/// The claim store.
#[derive(Clone)]
pub struct Claims {
    pool: PgPool,
    pepper: Vec<u8>,
}

/// The outcome of trying to claim an address.
#[derive(Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The caller's user holds it now (pending until confirmed).
    Ours,
    /// Another user holds it, or is claiming it right now.
    Taken {
        /// The holder.
        holder: Uuid,
        /// Whether the holder's claim is still pending.
        pending: bool,
        /// The holder's partition.
        partition: i32,
    },
}

/// How to compare addresses: trimmed and lower-cased.
pub fn normalize(email: &str) -> String {
    email.trim().to_lowercase()
}

impl Claims {
    /// A store over `pool` with the configured pepper.
    pub fn new(settings: &AuthSettings, pool: PgPool) -> anyhow::Result<Self> {
        let pepper = match (&settings.email_pepper, settings.local) {
            (Some(pepper), _) => pepper.expose().as_bytes().to_vec(),
            (None, true) => LOCAL_PEPPER.as_bytes().to_vec(),
            (None, false) => anyhow::bail!(
                "NEWSROOM_EMAIL_PEPPER is not set (use --local / NEWSROOM_LOCAL=true for development)"
            ),
        };
        Ok(Claims { pool, pepper })
    }

    /// A key for another purpose, derived from the pepper (every process of a deployment
    /// has the same).
    pub fn subkey(&self, purpose: &str) -> Vec<u8> {
        digest::hmac(&self.pepper, &[b"newsroom subkey: ", purpose.as_bytes()]).to_vec()
    }

    /// The claim of an address (hex HMAC-SHA256 of the normalised address).
    pub fn claim_of(&self, email: &str) -> String {
        digest::hex(&digest::hmac(&self.pepper, &[normalize(email).as_bytes()]))
    }

    /// Claims `claim` for `user` (of `partition`), pending until [`Claims::confirm`].
    /// `releases` is the user's previous claim, dropped on confirmation.
    pub async fn try_claim(
        &self,
        claim: &str,
        user: Uuid,
        partition: i32,
        event_id: Uuid,
        releases: Option<&str>,
    ) -> anyhow::Result<Claimed> {
        let inserted = sqlx::query!(
            "INSERT INTO cmd_email_claims (claim, user_id, partition, event_id, state, releases) \
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT (claim) DO NOTHING",
            claim,
            user,
            partition,
            event_id,
            releases,
        )
        .execute(&self.pool)
        .await
        .context("claiming an e-mail")?;
        if inserted.rows_affected() == 1 {
            return Ok(Claimed::Ours);
        }
        let row = sqlx::query!(
            "SELECT user_id, state, partition FROM cmd_email_claims WHERE claim = $1",
            claim,
        )
        .fetch_optional(&self.pool)
        .await
        .context("reading an e-mail claim")?
        .map(|r| (r.user_id, r.state, r.partition));
        Ok(match row {
            Some((holder, _, _)) if holder == user => Claimed::Ours,
            Some((holder, state, partition)) => Claimed::Taken {
                holder,
                pending: state == "pending",
                partition,
            },
            // Released between the two statements: try once more.
            None => Box::pin(self.try_claim(claim, user, partition, event_id, releases)).await?,
        })
    }

    /// The command committed: the claim is held, the previous one released.
    pub async fn confirm(&self, claim: &str, user: Uuid) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query!(
            "SELECT releases FROM cmd_email_claims WHERE claim = $1 AND user_id = $2 FOR UPDATE",
            claim,
            user,
        )
        .fetch_optional(&mut *tx)
        .await
        .context("reading an e-mail claim")?;
        let Some(row) = row else {
            return Ok(());
        };
        sqlx::query!(
            "UPDATE cmd_email_claims SET state = 'held', releases = NULL, updated_at = now() WHERE claim = $1",
            claim,
        )
        .execute(&mut *tx)
        .await
        .context("confirming an e-mail claim")?;
        if let Some(old) = row.releases.filter(|old| old != claim) {
            sqlx::query!(
                "DELETE FROM cmd_email_claims WHERE claim = $1 AND user_id = $2",
                old,
                user,
            )
            .execute(&mut *tx)
            .await
            .context("releasing the previous e-mail claim")?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The command failed (nothing written): drop the pending claim.
    pub async fn abandon(&self, claim: &str, user: Uuid) -> anyhow::Result<()> {
        sqlx::query!(
            "DELETE FROM cmd_email_claims WHERE claim = $1 AND user_id = $2 AND state = 'pending'",
            claim,
            user,
        )
        .execute(&self.pool)
        .await
        .context("abandoning an e-mail claim")?;
        Ok(())
    }

    /// Releases every claim of an erased user.
    pub async fn release_all(&self, user: Uuid) -> anyhow::Result<()> {
        sqlx::query!("DELETE FROM cmd_email_claims WHERE user_id = $1", user)
            .execute(&self.pool)
            .await
            .context("releasing e-mail claims")?;
        Ok(())
    }

    /// The user holding `claim`.
    pub async fn holder(&self, claim: &str) -> anyhow::Result<Option<Uuid>> {
        let holder = sqlx::query_scalar!(
            "SELECT user_id FROM cmd_email_claims WHERE claim = $1 AND state = 'held'",
            claim,
        )
        .fetch_optional(&self.pool)
        .await
        .context("looking up an e-mail claim")?;
        Ok(holder)
    }

    /// Makes the claims (and keys, and token floors) of `partition` agree with the users'
    /// committed state:
    /// run by a new owner before it serves the partition, this settles what a crashed
    /// process left pending.
    pub async fn reconcile(
        &self,
        partition: i32,
        users: &HashMap<Uuid, User>,
        keys: &Keys,
    ) -> anyhow::Result<()> {
        let rows = sqlx::query!(
            "SELECT claim, user_id, state FROM cmd_email_claims WHERE partition = $1",
            partition,
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the partition's claims")?;
        let mut present = std::collections::HashSet::new();
        for row in rows {
            let (claim, user, state) = (row.claim, row.user_id, row.state);
            let current = users.get(&user).filter(|u| !u.erased);
            let committed = current.is_some_and(|u| u.email_claim == claim);
            if committed {
                present.insert(user);
            }
            match (committed, state.as_str()) {
                (true, "pending") => self.confirm(&claim, user).await?,
                (true, _) => {}
                (false, _) => {
                    sqlx::query!(
                        "DELETE FROM cmd_email_claims WHERE claim = $1 AND user_id = $2",
                        claim,
                        user,
                    )
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        // A committed user whose claim went missing (a request that wrote nothing gave a
        // claim back that a retry of the same key had committed with) gets it again,
        // unless another user holds that address now.
        let (claims, holders): (Vec<String>, Vec<Uuid>) = users
            .values()
            .filter(|u| !u.erased && !u.email_claim.is_empty() && !present.contains(&u.id))
            .map(|u| (u.email_claim.clone(), u.id))
            .unzip();
        if !claims.is_empty() {
            let restored = sqlx::query!(
                "INSERT INTO cmd_email_claims (claim, user_id, partition, event_id, state) \
                 SELECT claim, user_id, $3, user_id, 'held' FROM UNNEST($1::text[], $2::uuid[]) AS c(claim, user_id) \
                 ON CONFLICT (claim) DO NOTHING",
                &claims,
                &holders,
                partition,
            )
            .execute(&self.pool)
            .await
            .context("restoring e-mail claims")?;
            if restored.rows_affected() > 0 {
                tracing::warn!(
                    partition,
                    restored = restored.rows_affected(),
                    "e-mail claims of committed users were missing; restored"
                );
            }
        }
        // Token floors a crashed process may not have written.
        let floors: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> = users
            .values()
            .filter_map(|u| u.tokens_valid_from.map(|at| (u.id, at)))
            .collect();
        if !floors.is_empty() {
            newsroom_infra::auth::Revocations::new(self.pool.clone())
                .restore(&floors)
                .await
                .context("restoring token floors")?;
        }
        for user in users.values().filter(|u| u.erased) {
            if keys.get(user.id).is_some() {
                keys.destroy(user.id).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_compare_trimmed_and_case_insensitively() {
        assert_eq!(normalize("  Ada@Example.COM "), "ada@example.com");
    }
}
