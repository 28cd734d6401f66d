//! Consumers of the event log. Each projection reads its topics with `read_committed`,
//! applies events in batches, and writes the read-model rows and the offsets it consumed
//! in one PostgreSQL transaction, so that a restart resumes exactly where the last
//! committed batch ended (its own offsets, not Kafka's).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cache;
pub mod consumer;
pub mod dead_letters;
pub mod mailer;
pub mod news;
pub mod notify;
pub mod postgres;
pub mod reads;
pub mod recommend;
pub mod redis_store;
pub mod replay;
pub mod users;
