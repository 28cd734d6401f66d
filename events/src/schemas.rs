//! The event types' Avro schemas, parsed once from the `.avsc` files in `avro/`.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::{AvroSchema, Schema};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::EventMetadata;
use crate::news::NewsEvent;
use crate::reads::ReadEvent;
use crate::users::UserEvent;

/// A domain event type with its schema.
pub trait Event: Serialize + DeserializeOwned + AvroSchema {
    /// The Avro full name of the record: the registry subject (record-name strategy).
    const FULL_NAME: &'static str;
    /// The `.avsc` text, the wire contract.
    const SCHEMA: &'static str;
    /// The schema version this code writes; goes into [`EventMetadata::schema_version`].
    const SCHEMA_VERSION: i32;
    /// The event's metadata.
    fn metadata(&self) -> &EventMetadata;
}

/// Why an Avro value could not become a domain event.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    /// The record's name belongs to no event type this code knows.
    #[error("unknown event type {0}")]
    UnknownType(String),
    /// The value does not have the shape of the event type.
    #[error("event does not match its type: {0}")]
    Shape(#[from] apache_avro::Error),
}

/// Turns a (resolved) Avro value into the event type `E`.
pub fn decode_as<E: Event>(value: apache_avro::types::Value) -> Result<E, EventDecodeError> {
    Ok(apache_avro::from_value::<E>(&value)?)
}

/// `(full name, .avsc text)` of every event type, in the order they are registered.
pub fn all() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    UserEvent::SCHEMAS
        .iter()
        .chain(NewsEvent::SCHEMAS)
        .chain(ReadEvent::SCHEMAS)
}

static PARSED: LazyLock<HashMap<&'static str, Schema>> = LazyLock::new(|| {
    all()
        .map(|(name, text)| {
            let schema = Schema::parse_str(text)
                .unwrap_or_else(|e| panic!("avro/ schema of {name} does not parse: {e}"));
            (*name, schema)
        })
        .collect()
});

/// The current (reader) schema of the event type with Avro full name `name`.
pub fn schema_of(name: &str) -> Option<&'static Schema> {
    PARSED.get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_parses_and_is_named_as_its_type() {
        for (name, _) in all() {
            let schema = schema_of(name).expect("schema is parsed");
            let Schema::Record(record) = schema else {
                panic!("{name} is not a record schema");
            };
            assert_eq!(record.name.fullname(None), *name);
        }
    }

    /// Fails when the Rust type and its `.avsc` drift apart (fields, types, logical
    /// types, order, names; documentation may differ).
    fn assert_same_shape<E: Event>() {
        let from_rust = E::get_schema();
        let from_file = Schema::parse_str(E::SCHEMA).expect("schema parses");
        assert!(
            from_rust == from_file,
            "the Rust type of {} and its .avsc differ:\n rust: {}\n file: {}",
            E::FULL_NAME,
            from_rust.canonical_form(),
            from_file.canonical_form()
        );
    }

    #[test]
    fn rust_event_types_match_their_avsc_files() {
        use crate::news::*;
        use crate::users::*;
        assert_same_shape::<UserRegistered>();
        assert_same_shape::<UserUpdated>();
        assert_same_shape::<UserPasswordChanged>();
        assert_same_shape::<UserRoleChanged>();
        assert_same_shape::<UserErased>();
        assert_same_shape::<UserNotificationsRead>();
        assert_same_shape::<NewsDrafted>();
        assert_same_shape::<NewsEdited>();
        assert_same_shape::<NewsPublished>();
        assert_same_shape::<NewsUnpublished>();
        assert_same_shape::<NewsArchived>();
        assert_same_shape::<NewsDeleted>();
        assert_same_shape::<crate::reads::NewsRead>();
    }

    #[test]
    fn every_family_lists_every_schema_once() {
        let names: std::collections::HashSet<_> = all().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), 13);
        assert_eq!(all().count(), 13);
    }
}
