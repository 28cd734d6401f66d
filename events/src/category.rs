//! The three news categories.

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

/// A news category.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, AvroSchema,
)]
#[avro(namespace = "newsroom")]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)] // the AvroSchema derive refuses doc comments on unit variants
pub enum Category {
    Famous,
    Politics,
    Sports,
}

impl Category {
    /// Every category.
    pub const ALL: [Category; 3] = [Category::Famous, Category::Politics, Category::Sports];

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Famous => "famous",
            Category::Politics => "politics",
            Category::Sports => "sports",
        }
    }

    /// Parses the API spelling.
    pub fn parse(text: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == text)
    }
}
