//! Encoding and decoding of events with registry-assigned schema ids.

use anyhow::{Context as _, anyhow};
use apache_avro::Schema;
use newsroom_events::Event;
use newsroom_events::schemas::schema_of;
use newsroom_events::wire;

use crate::registry::Registry;

/// Encodes `event` in the Confluent wire format with its registered schema id.
pub fn encode<E: Event>(registry: &Registry, event: &E) -> anyhow::Result<Vec<u8>> {
    Ok(wire::encode_event(event, |name| registry.id_of(name))?)
}

/// A record read back: the event type's full name and its value, resolved to the schema
/// this code reads with.
#[derive(Debug)]
pub struct Decoded {
    /// Avro full name of the record (the event type).
    pub name: String,
    /// The value in the reader's schema.
    pub value: apache_avro::types::Value,
    /// The trace context its record carried (when traces are exported).
    pub trace: Option<String>,
}

/// Decodes a framed record: looks up the writer schema by id, resolves to our reader schema.
pub async fn decode(registry: &Registry, bytes: &[u8]) -> anyhow::Result<Decoded> {
    let (id, body) = wire::unframe(bytes)?;
    let (name, reader) = registry.body_reader(id).await?;
    let value = reader.read(body)?;
    Ok(Decoded {
        name: name.to_string(),
        value,
        trace: None,
    })
}

/// The full name of the record type of `writer` and the reader of its bodies.
pub(crate) fn body_reader(id: u32, writer: &Schema) -> anyhow::Result<(String, wire::BodyReader)> {
    let name = match writer {
        Schema::Record(record) => record.name.fullname(None),
        _ => return Err(anyhow!("schema {id} is not a record")),
    };
    let reader = schema_of(&name).with_context(|| format!("unknown event type {name}"))?;
    let body = wire::BodyReader::new(writer.clone(), reader)?;
    Ok((name, body))
}
