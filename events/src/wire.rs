//! The Confluent wire format: `0x00`, a 4-byte big-endian schema id, the Avro binary body.
//! The only place in newsroom that knows how events look as bytes.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::Event;

/// The first byte of every framed record.
pub const MAGIC: u8 = 0;
const HEADER_LEN: usize = 5;

/// Why bytes could not be framed or read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Shorter than the header, or not starting with the magic byte.
    #[error("not a Confluent-framed record (missing magic byte or schema id)")]
    NotFramed,
    /// The Avro body does not fit the writer schema, or resolution to the reader failed.
    #[error("avro: {0}")]
    Avro(#[from] apache_avro::Error),
    /// The event type has no (registered) schema.
    #[error("no registered schema for {0}")]
    Unregistered(&'static str),
    /// Bytes were left after the body.
    #[error("{0} bytes left after the Avro body")]
    TrailingBytes(usize),
}

/// Encodes `event` with `schema` (registered under `schema_id`) into a framed record.
pub fn encode<E: Event>(schema_id: u32, schema: &Schema, event: &E) -> Result<Vec<u8>, WireError> {
    let writer = GenericDatumWriter::builder(schema)
        .human_readable(true)
        .build()?;
    framed(schema_id, &writer, event)
}

/// The framed record of `event`, written by `writer` under `schema_id`.
fn framed<E: Event>(
    schema_id: u32,
    writer: &GenericDatumWriter<'_>,
    event: &E,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(256);
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    writer.write_ser(&mut out, event)?;
    Ok(out)
}

/// Encodes `event` with its own schema and the id `id_of` gives for its full name, with a
/// datum writer built once per event type (building one resolves the schema's names).
pub fn encode_event<E: Event>(
    event: &E,
    id_of: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<u8>, WireError> {
    type Writers = HashMap<&'static str, Arc<GenericDatumWriter<'static>>>;
    static WRITERS: LazyLock<RwLock<Writers>> = LazyLock::new(RwLock::default);
    let id = id_of(E::FULL_NAME).ok_or(WireError::Unregistered(E::FULL_NAME))?;
    let known = WRITERS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(E::FULL_NAME)
        .cloned();
    let writer = match known {
        Some(writer) => writer,
        None => {
            let schema = crate::schemas::schema_of(E::FULL_NAME)
                .ok_or(WireError::Unregistered(E::FULL_NAME))?;
            let built = Arc::new(
                GenericDatumWriter::builder(schema)
                    .human_readable(true)
                    .build()?,
            );
            WRITERS
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(E::FULL_NAME)
                .or_insert(built)
                .clone()
        }
    };
    framed(id, &writer, event)
}

/// Splits a framed record into its schema id and Avro body.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if bytes.len() < HEADER_LEN || bytes[0] != MAGIC {
        return Err(WireError::NotFramed);
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

/// Reads the bodies written with one writer schema: built once per schema (its names
/// resolved, and whether its values need resolving to the reader schema at all), then used
/// for every record of it. Building a datum reader per record resolved both schemas' names
/// each time, and resolving a value to an identical schema copies it whole: together half
/// of the CPU a consumer spent decoding.
pub struct BodyReader {
    reader: GenericDatumReader<'static>,
    resolves: bool,
}

impl BodyReader {
    /// A reader of bodies written with `writer`, resolved to `reader` unless the two are the
    /// same schema (every attribute alike, not only their canonical forms). A writer schema
    /// that differs is leaked: the caller builds one reader per schema id it ever reads.
    pub fn new(writer: Schema, reader: &'static Schema) -> Result<Self, WireError> {
        let same = match (serde_json::to_value(&writer), serde_json::to_value(reader)) {
            (Ok(w), Ok(r)) => w == r,
            _ => false,
        };
        let reader = if same {
            GenericDatumReader::builder(reader)
                .human_readable(true)
                .build()?
        } else {
            let writer: &'static Schema = Box::leak(Box::new(writer));
            GenericDatumReader::builder(writer)
                .reader_schema(reader)
                .human_readable(true)
                .build()?
        };
        Ok(BodyReader {
            reader,
            resolves: !same,
        })
    }

    /// Whether values are resolved to the reader schema (the writer schema differs).
    pub fn resolves(&self) -> bool {
        self.resolves
    }

    /// Reads one body.
    pub fn read(&self, body: &[u8]) -> Result<Value, WireError> {
        let mut rest = body;
        let value = self.reader.read_value(&mut rest)?;
        if !rest.is_empty() {
            return Err(WireError::TrailingBytes(rest.len()));
        }
        Ok(value)
    }
}

/// Reads an Avro body written with `writer` and resolves it to the `reader` schema.
pub fn decode(writer: &Schema, reader: &Schema, body: &[u8]) -> Result<Value, WireError> {
    let mut rest = body;
    let value = GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .human_readable(true)
        .build()?
        .read_value(&mut rest)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventMetadata;
    use crate::schemas::{EventDecodeError, schema_of};
    use crate::users::{Role, UserEvent, UserRegistered};
    use uuid::Uuid;

    fn registered() -> UserRegistered {
        let id = Uuid::now_v7();
        UserRegistered {
            metadata: EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_id: id,
                aggregate_version: 1,
                occurred_at: 1_764_000_000_123_456,
                correlation_id: "req-1".into(),
                causation_id: "cmd-1".into(),
                actor_id: None,
                schema_version: UserRegistered::SCHEMA_VERSION,
            },
            personal: vec![1, 2, 3, 0, 255],
            email_claim: "c1a1m".into(),
            role: Role::Reader,
        }
    }

    #[test]
    fn an_event_survives_the_avro_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let schema = schema_of(UserRegistered::FULL_NAME).ok_or("no schema")?;
        let event = registered();

        let bytes = encode(42, schema, &event)?;
        let (id, body) = unframe(&bytes)?;
        let value = decode(schema, schema, body)?;
        let decoded = UserEvent::from_avro(UserRegistered::FULL_NAME, value)?;

        assert_eq!(bytes[0], MAGIC);
        assert_eq!(id, 42);
        assert_eq!(decoded, UserEvent::Registered(event));
        Ok(())
    }

    #[test]
    fn a_body_reader_of_the_same_schema_reads_what_resolution_reads()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::users::UserUpdated;
        let cases: Vec<(&'static Schema, Vec<u8>)> = vec![
            (
                schema_of(UserRegistered::FULL_NAME).ok_or("no schema")?,
                encode(
                    1,
                    schema_of(UserRegistered::FULL_NAME).ok_or("no")?,
                    &registered(),
                )?,
            ),
            (
                schema_of(UserUpdated::FULL_NAME).ok_or("no schema")?,
                encode(
                    2,
                    schema_of(UserUpdated::FULL_NAME).ok_or("no")?,
                    &UserUpdated {
                        metadata: registered().metadata,
                        personal: Some(vec![7u8; 12]),
                        email_claim: None,
                        followed_categories: Some(vec![crate::Category::Famous]),
                        email_notifications: Some(false),
                    },
                )?,
            ),
        ];
        for (schema, framed) in cases {
            // As the registry hands it back: parsed from its JSON.
            let writer = Schema::parse_str(&serde_json::to_string(schema)?)?;
            let body = unframe(&framed)?.1;
            let reader = BodyReader::new(writer.clone(), schema)?;
            assert!(!reader.resolves(), "the same schema is read as written");
            assert_eq!(reader.read(body)?, decode(&writer, schema, body)?);
            let mut longer = body.to_vec();
            longer.push(0);
            assert!(matches!(
                reader.read(&longer),
                Err(WireError::TrailingBytes(1))
            ));
        }
        Ok(())
    }

    #[test]
    fn a_cached_writer_writes_what_a_fresh_one_writes() -> Result<(), Box<dyn std::error::Error>> {
        let schema = schema_of(UserRegistered::FULL_NAME).ok_or("no schema")?;
        for _ in 0..2 {
            let event = registered();
            assert_eq!(
                encode_event(&event, |_| Some(9))?,
                encode(9, schema, &event)?
            );
        }
        assert!(matches!(
            encode_event(&registered(), |_| None),
            Err(WireError::Unregistered(_))
        ));
        Ok(())
    }

    #[test]
    fn an_actor_id_survives_the_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let schema = schema_of(UserRegistered::FULL_NAME).ok_or("no schema")?;
        let mut event = registered();
        event.metadata.actor_id = Some(Uuid::now_v7());
        event.role = Role::Admin;

        let bytes = encode(1, schema, &event)?;
        let value = decode(schema, schema, unframe(&bytes)?.1)?;

        assert_eq!(
            UserEvent::from_avro(UserRegistered::FULL_NAME, value)?,
            UserEvent::Registered(event)
        );
        Ok(())
    }

    #[test]
    fn optional_fields_and_enums_survive_the_round_trip() -> Result<(), Box<dyn std::error::Error>>
    {
        use crate::Category;
        use crate::users::UserUpdated;
        let schema = schema_of(UserUpdated::FULL_NAME).ok_or("no schema")?;
        let mut event = UserUpdated {
            metadata: registered().metadata,
            personal: None,
            email_claim: Some("claim".into()),
            followed_categories: Some(vec![Category::Sports, Category::Politics]),
            email_notifications: Some(true),
        };
        for personal in [None, Some(vec![9u8; 40])] {
            event.personal = personal;
            let bytes = encode(3, schema, &event)?;
            let value = decode(schema, schema, unframe(&bytes)?.1)?;
            assert_eq!(
                UserEvent::from_avro(UserUpdated::FULL_NAME, value)?,
                UserEvent::Updated(event.clone())
            );
        }
        Ok(())
    }

    #[test]
    fn unframed_or_truncated_bytes_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let schema = schema_of(UserRegistered::FULL_NAME).ok_or("no schema")?;
        let bytes = encode(7, schema, &registered())?;

        assert!(matches!(unframe(b"garbage"), Err(WireError::NotFramed)));
        assert!(matches!(unframe(&[0, 0, 0]), Err(WireError::NotFramed)));
        let truncated = &bytes[HEADER_LEN..bytes.len() - 3];
        assert!(decode(schema, schema, truncated).is_err());
        let mut longer = bytes[HEADER_LEN..].to_vec();
        longer.push(0);
        assert!(matches!(
            decode(schema, schema, &longer),
            Err(WireError::TrailingBytes(1))
        ));
        Ok(())
    }

    #[test]
    fn an_unknown_record_name_is_an_unknown_type() {
        let result = UserEvent::from_avro("newsroom.users.Nope", Value::Null);
        assert!(matches!(result, Err(EventDecodeError::UnknownType(_))));
    }
}
