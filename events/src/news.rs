//! Events of the News aggregate (topic `<prefix>.news`, keyed by news id).

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::macros::event_family;
use crate::{Category, EventMetadata};

/// An editor drafted an article.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsDrafted {
    /// Event metadata; `aggregate_id` is the news id.
    pub metadata: EventMetadata,
    /// The editor who drafted it.
    #[avro(with = crate::metadata::uuid_schema)]
    pub author_id: Uuid,
    /// Category.
    pub category: Category,
    /// Title, 1..=200 characters.
    pub title: String,
    /// Body, 1..=100000 characters.
    pub content: String,
    /// Normalised tags.
    pub tags: Vec<String>,
}

/// An article was edited; `None` means unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsEdited {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// New category.
    #[avro(default = "null")]
    pub category: Option<Category>,
    /// New title.
    #[avro(default = "null")]
    pub title: Option<String>,
    /// New content.
    #[avro(default = "null")]
    pub content: Option<String>,
    /// New tags.
    #[avro(default = "null")]
    pub tags: Option<Vec<String>>,
}

/// An article was published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsPublished {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// Publication time, microseconds since the epoch.
    #[avro(with = || apache_avro::Schema::TimestampMicros)]
    pub published_at: i64,
}

/// A published article went back to draft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsUnpublished {
    /// Event metadata.
    pub metadata: EventMetadata,
}

/// An article was archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsArchived {
    /// Event metadata.
    pub metadata: EventMetadata,
}

/// An article was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.news")]
pub struct NewsDeleted {
    /// Event metadata.
    pub metadata: EventMetadata,
}

event_family!(
    /// Every event of the News aggregate.
    NewsEvent, "news", "newsroom.news" {
        Drafted(NewsDrafted, 1),
        Edited(NewsEdited, 1),
        Published(NewsPublished, 1),
        Unpublished(NewsUnpublished, 1),
        Archived(NewsArchived, 1),
        Deleted(NewsDeleted, 1),
    }
);
