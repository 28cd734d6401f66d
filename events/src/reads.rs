//! Read facts (topic `<prefix>.reads`, keyed by the reader's user id).

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EventMetadata;
use crate::category::Category;
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
    /// The article's category when it was read (since schema version 2), so that
    /// consumers of reads need no other stream to know what was read.
    #[avro(default = "null")]
    pub category: Option<Category>,
    /// The article's tags when it was read (since schema version 2).
    #[avro(default = "null")]
    pub tags: Option<Vec<String>>,
}

event_family!(
    /// Every event of the reads stream.
    ReadEvent, "reads", "newsroom.reads" {
        Read(NewsRead, 2),
    }
);
