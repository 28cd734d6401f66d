//! Shared plumbing of every newsroom role: typed settings, telemetry, the Kafka client
//! factory, the schema registry client and event codec, Postgres, and the HTTP pieces
//! (problem+json errors, request ids, ops endpoints) both APIs share.
//!
//! The local infrastructure scripts (Kafka, registry, Postgres, Redis) live beside this
//! crate in `infra/local.sh`.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod codec;
pub mod db;
pub mod http;
pub mod kafka;
pub mod limit;
pub mod metrics;
pub mod openapi;
pub mod producer;
pub mod read_models;
pub mod redis;
pub mod registry;
pub mod retry;
pub mod settings;
pub mod telemetry;
pub mod trace;
pub mod views;

pub use settings::Settings;
