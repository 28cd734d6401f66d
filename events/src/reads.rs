//! Read facts (topic `<prefix>.reads`, keyed by the reader's user id).

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EventMetadata;
use crate::macros::event_family;

/// A user read a published article. `metadata.aggregate_id` is the reader and
/// `aggregate_version` is 0: reads belong to no aggregate's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.reads")]
pub struct NewsRead {
    /// Event metadata; `occurred_at` is when the article was read.
    pub metadata: EventMetadata,
    /// The article.
    #[avro(with = crate::metadata::uuid_schema)]
    pub news_id: Uuid,
}

event_family!(
    /// Every event of the reads stream.
    ReadEvent, "reads", "newsroom.reads" {
        Read(NewsRead, 1),
    }
);
