//! Metadata carried by every event.

use apache_avro::AvroSchema;
use apache_avro::Schema;
use apache_avro::schema::{UnionSchema, UuidSchema};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who, when, why and where in its aggregate's history an event happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom")]
pub struct EventMetadata {
    /// Unique id of this event (UUID v7).
    #[avro(with = uuid_schema)]
    pub event_id: Uuid,
    /// The aggregate the event belongs to; also the Kafka record key.
    #[avro(with = uuid_schema)]
    pub aggregate_id: Uuid,
    /// The aggregate's version after this event: 1 for the creating event.
    pub aggregate_version: i64,
    /// Microseconds since the Unix epoch, UTC.
    #[avro(with = || Schema::TimestampMicros)]
    pub occurred_at: i64,
    /// The request id (`X-Request-Id`) of the request that caused the event.
    pub correlation_id: String,
    /// The id of the command or event that caused this one.
    pub causation_id: String,
    /// The authenticated caller, `None` for anonymous ones.
    #[avro(with = optional_uuid_schema)]
    pub actor_id: Option<Uuid>,
    /// The version of the event type's schema the writer used.
    pub schema_version: i32,
}

impl EventMetadata {
    /// When the event happened.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        Utc.timestamp_micros(self.occurred_at)
            .single()
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }
}

/// Microseconds since the epoch of `at`, the unit events store time in.
pub fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// Avro schema of a UUID field: a string with logical type `uuid` (portable to every
/// Avro implementation, unlike the derive's default `fixed(16)`).
pub fn uuid_schema(
    _: &mut std::collections::HashSet<apache_avro::schema::Name>,
    _: apache_avro::schema::NamespaceRef,
) -> Schema {
    Schema::Uuid(UuidSchema::String)
}

/// Avro schema of an optional UUID field: `["null", uuid-string]`.
pub fn optional_uuid_schema(
    _: &mut std::collections::HashSet<apache_avro::schema::Name>,
    _: apache_avro::schema::NamespaceRef,
) -> Schema {
    let union = UnionSchema::new(vec![Schema::Null, Schema::Uuid(UuidSchema::String)]);
    Schema::Union(union.unwrap_or_else(|e| panic!("a null/uuid union is valid: {e}")))
}
