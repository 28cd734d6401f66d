//! The domain events of newsroom, their metadata and their Avro form.
//!
//! This crate does no I/O: it knows the event types, the `.avsc` schemas they must match
//! (the files in `avro/` are the wire contract) and the Confluent wire format
//! (magic byte, schema id, Avro body). Talking to the schema registry or to Kafka is the
//! business of `newsroom-infra`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod consistency;
pub mod metadata;
pub mod schemas;
pub mod users;
pub mod wire;

pub use metadata::EventMetadata;
pub use schemas::Event;
