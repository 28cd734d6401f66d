//! Personal data inside events, encrypted with a key per user (crypto-shredding): once
//! the key is destroyed, the `personal` fields of that user's events cannot be read by
//! anyone, while the events themselves stay in the log.
//!
//! Blob layout: version byte `1`, 12-byte random nonce, AES-256-GCM ciphertext and tag.
//! The user id is the associated data, so a blob cannot be moved to another user.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// A user's data key (256 bits).
#[derive(Clone, PartialEq, Eq)]
pub struct UserKey(pub [u8; 32]);

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKey(..)")
    }
}

impl UserKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        UserKey(key)
    }

    /// The key from stored bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(UserKey)
    }
}

/// The personal fields an event may carry; absent ones did not change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Personal {
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// E-mail address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Argon2id PHC string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

/// Why a blob could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersonalError {
    /// Wrong key, another user's blob, or tampered bytes.
    #[error("personal data cannot be decrypted")]
    Undecryptable,
    /// Not a blob of a known version.
    #[error("personal data is malformed")]
    Malformed,
}

/// Encrypts `personal` for `user` with `key`.
pub fn seal(key: &UserKey, user: Uuid, personal: &Personal) -> Vec<u8> {
    seal_bytes(key, user, &serde_json::to_vec(personal).unwrap_or_default())
}

/// Decrypts a blob of `user` with `key`.
pub fn open(key: &UserKey, user: Uuid, blob: &[u8]) -> Result<Personal, PersonalError> {
    serde_json::from_slice(&open_bytes(key, user, blob)?).map_err(|_| PersonalError::Malformed)
}

/// Encrypts any bytes of `user` with `key` (the same blob layout).
pub fn seal_bytes(key: &UserKey, user: Uuid, plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipher = Aes256Gcm::new((&key.0).into());
    // Encryption with a valid key and nonce length cannot fail.
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: user.as_bytes(),
            },
        )
        .unwrap_or_default();
    let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    blob.push(VERSION);
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&sealed);
    blob
}

/// Decrypts bytes sealed by [`seal_bytes`] for `user` with `key`.
pub fn open_bytes(key: &UserKey, user: Uuid, blob: &[u8]) -> Result<Vec<u8>, PersonalError> {
    if blob.len() < 1 + NONCE_LEN || blob[0] != VERSION {
        return Err(PersonalError::Malformed);
    }
    let (nonce, sealed) = blob[1..].split_at(NONCE_LEN);
    Aes256Gcm::new((&key.0).into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: user.as_bytes(),
            },
        )
        .map_err(|_| PersonalError::Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> Personal {
        Personal {
            name: Some("Ada".into()),
            email: Some("ada@example.com".into()),
            password_hash: Some("$argon2id$...".into()),
        }
    }

    #[test]
    fn sealed_data_opens_with_its_key_and_user_only() {
        let key = UserKey::generate();
        let user = Uuid::now_v7();
        let blob = seal(&key, user, &ada());

        assert_eq!(open(&key, user, &blob), Ok(ada()));
        assert_eq!(
            open(&UserKey::generate(), user, &blob),
            Err(PersonalError::Undecryptable)
        );
        assert_eq!(
            open(&key, Uuid::now_v7(), &blob),
            Err(PersonalError::Undecryptable)
        );
        assert!(!String::from_utf8_lossy(&blob).contains("ada@example.com"));
    }

    #[test]
    fn tampered_or_foreign_bytes_are_refused() {
        let key = UserKey::generate();
        let user = Uuid::now_v7();
        let mut blob = seal(&key, user, &ada());
        let last = blob.len() - 1;
        blob[last] ^= 1;

        assert_eq!(open(&key, user, &blob), Err(PersonalError::Undecryptable));
        assert_eq!(open(&key, user, b"x"), Err(PersonalError::Malformed));
    }
}
