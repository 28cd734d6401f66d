//! The domain events of newsroom, their metadata and their Avro form.
//!
//! This crate does no I/O: it knows the event types, the `.avsc` schemas they must match
//! (the files in `avro/` are the wire contract), the Confluent wire format (magic byte,
//! schema id, Avro body), how personal data is sealed inside events, consistency tokens,
//! and Kafka's partitioner. Talking to the registry or to Kafka is `newsroom-infra`'s job.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod affinity;
mod category;
pub mod consistency;
mod history;
mod macros;
pub mod metadata;
pub mod news;
pub mod partition;
pub mod personal;
pub mod reads;
pub mod schemas;
pub mod users;
pub mod wire;

pub use category::Category;
pub use metadata::EventMetadata;
pub use schemas::Event;
