//! The aggregates: pure, synchronous decision logic with no I/O, in the shape
//! `handle(&State, Command) -> Result<Change, DomainError>` and
//! `apply(State, &Change) -> State`. Anything from outside (ids, clocks, hashes, the
//! caller) is put into the command before `handle` sees it. One accepted command is one
//! change, so an aggregate's version is the number of changes it has.

pub mod news;
pub mod user;

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use newsroom_infra::auth::Actor;

/// Where a change sits in its aggregate's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The aggregate.
    pub id: Uuid,
    /// Its version after the change.
    pub version: i64,
    /// When the change happened.
    pub at: DateTime<Utc>,
}

/// Why a command was refused. Each maps to one HTTP error of API.md. Serializable: the
/// refusal of a command sent with an `Idempotency-Key` is recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "refused")]
pub enum DomainError {
    /// Unknown, deleted, or invisible to the caller (404).
    #[error("not found")]
    NotFound,
    /// The caller may not do this (403).
    #[error("forbidden")]
    Forbidden,
    /// `If-Match` named another version (412).
    #[error("version mismatch: expected {expected}, actual {actual}")]
    VersionMismatch {
        /// Version the caller expected.
        expected: i64,
        /// Current version.
        actual: i64,
    },
    /// The current status does not allow it (409 `invalid_transition`).
    #[error("cannot {action} an article that is {status}")]
    InvalidTransition {
        /// What was attempted.
        action: Cow<'static, str>,
        /// The status it is in.
        status: Cow<'static, str>,
    },
    /// The aggregate exists already.
    #[error("already exists")]
    AlreadyExists,
    /// The current password given does not match (422 on `current_password`).
    #[error("the current password does not match")]
    StalePassword,
}

/// Checks an optional `If-Match` against the current version.
pub fn check_version(expected: Option<i64>, actual: i64) -> Result<(), DomainError> {
    match expected {
        Some(expected) if expected != actual => {
            Err(DomainError::VersionMismatch { expected, actual })
        }
        _ => Ok(()),
    }
}
