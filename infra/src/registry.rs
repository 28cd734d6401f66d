//! The schema registry (any Confluent-API registry; Apicurio locally): registers the event
//! schemas under the record-name strategy and resolves schema ids found in records.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_schema_by_id, post_schema,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::settings::RegistrySettings;

/// An event type's full name and the reader of its bodies.
pub type Readable = (Arc<str>, Arc<newsroom_events::wire::BodyReader>);

/// A registry client with the ids of newsroom's own schemas and a cache of writer schemas.
#[derive(Clone)]
pub struct Registry {
    settings: Arc<SrSettings>,
    own: Arc<HashMap<&'static str, u32>>,
    by_id: Arc<RwLock<HashMap<u32, Arc<Schema>>>>,
    /// The reader of each writer schema's bodies, with its record's full name.
    readers: Arc<RwLock<HashMap<u32, Readable>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("own", &self.own).finish()
    }
}

/// The compatibility every event schema must keep: a new version reads all older ones.
pub const COMPATIBILITY: &str = "BACKWARD_TRANSITIVE";

/// Sets the subject's compatibility level (Confluent API `PUT /config/{subject}`), so
/// that the registry refuses any later version that could not read every earlier one.
async fn require_backward_transitive(base: &str, subject: &str) -> anyhow::Result<()> {
    let url = format!("{}/config/{subject}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let current: Option<serde_json::Value> = match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => r.json().await.ok(),
        _ => None,
    };
    if current.is_some_and(|c| c["compatibilityLevel"] == COMPATIBILITY) {
        return Ok(());
    }
    let response = client
        .put(&url)
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(format!("{{\"compatibility\":\"{COMPATIBILITY}\"}}"))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "registry answered {}",
        response.status()
    );
    Ok(())
}

impl Registry {
    /// Connects to the registry and registers every event schema of `newsroom-events`
    /// under its record full name; a schema that breaks compatibility fails here.
    pub async fn connect(settings: &RegistrySettings) -> anyhow::Result<Self> {
        let sr = SrSettings::new_builder(settings.url.clone())
            .set_timeout(Duration::from_secs(5))
            .build()
            .context("building the schema registry client")?;
        let mut own = HashMap::new();
        for (name, text) in newsroom_events::schemas::all() {
            let supplied = SuppliedSchema::new(
                Some((*name).to_owned()),
                SchemaType::Avro,
                (*text).to_owned(),
            );
            let what = format!(
                "registering the schema of {name} at {}",
                crate::settings::shown(&settings.url)
            );
            let registered = crate::retry::with_retries(&what, || {
                let supplied = supplied.clone();
                let sr = &sr;
                async move { Ok(post_schema(sr, (*name).to_owned(), supplied).await?) }
            })
            .await?;
            own.insert(*name, registered.id);
            let what = format!("setting the compatibility of {name}");
            crate::retry::with_retries(&what, || require_backward_transitive(&settings.url, name))
                .await?;
        }
        Ok(Registry {
            settings: Arc::new(sr),
            own: Arc::new(own),
            by_id: Arc::new(RwLock::new(HashMap::new())),
            readers: Arc::new(RwLock::new(HashMap::new())),
        })
    }

    /// The registry id of one of newsroom's own event schemas.
    pub fn id_of(&self, full_name: &str) -> Option<u32> {
        self.own.get(full_name).copied()
    }

    /// The schema registered under `id` (cached: ids are immutable).
    pub async fn schema(&self, id: u32) -> anyhow::Result<Arc<Schema>> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let registered = get_schema_by_id(id, &self.settings)
            .await
            .with_context(|| format!("fetching schema {id} from the registry"))?;
        let schema = Arc::new(
            Schema::parse_str(&registered.schema)
                .with_context(|| format!("parsing schema {id}"))?,
        );
        if let Ok(mut cache) = self.by_id.write() {
            cache.insert(id, schema.clone());
        }
        Ok(schema)
    }

    /// The full name of the event type registered under `id` and the reader of its bodies
    /// (built once per id).
    pub async fn body_reader(&self, id: u32) -> anyhow::Result<Readable> {
        let known = self
            .readers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(known) = known {
            return Ok(known);
        }
        let schema = self.schema(id).await?;
        let (name, reader) = crate::codec::body_reader(id, &schema)?;
        tracing::info!(
            id,
            name,
            resolved = reader.resolves(),
            "reading a writer schema (resolved: to the schema of this build)"
        );
        let readable: Readable = (Arc::from(name), Arc::new(reader));
        // A reader built meanwhile by another task stays (a differing writer schema is
        // leaked either way: at most once per task racing on a new id).
        Ok(self
            .readers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id)
            .or_insert(readable)
            .clone())
    }

    fn cached(&self, id: u32) -> Option<Arc<Schema>> {
        self.by_id.read().ok().and_then(|c| c.get(&id).cloned())
    }

    /// Whether the registry answers.
    pub async fn ping(&self) -> bool {
        match self.own.values().next() {
            Some(id) => get_schema_by_id(*id, &self.settings).await.is_ok(),
            None => true,
        }
    }
}

/// Whether `error` (from [`Registry::body_reader`] or [`Registry::schema`]) is the registry
/// not answering (a failed connection, a timeout, 502 or 503: the client's `retriable`; or
/// an answer cut short), which says nothing of the schema asked for: such a read is tried
/// again, never taken for a record that cannot be decoded, even if the registry answers
/// the next moment.
pub fn unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<schema_registry_converter::error::SRCError>()
            .is_some_and(|e| e.retriable)
            || cause
                .downcast_ref::<reqwest::Error>()
                .is_some_and(|e| e.is_timeout() || e.is_connect() || e.is_body())
    })
}

#[cfg(test)]
mod tests {
    use schema_registry_converter::error::SRCError;

    use super::unavailable;

    fn fetched(error: SRCError) -> anyhow::Error {
        anyhow::Error::new(error).context("fetching schema 7 from the registry")
    }

    #[test]
    fn a_registry_that_times_out_is_unavailable_and_an_unknown_id_is_not() {
        let timeout = SRCError::retryable_with_cause(
            std::io::Error::from(std::io::ErrorKind::TimedOut),
            "http call to schema registry failed",
        );
        assert!(unavailable(&fetched(timeout)));
        let not_found = SRCError::new(
            "HTTP request to schema registry failed with status 404 Not Found",
            None,
            false,
        );
        assert!(!unavailable(&fetched(not_found)));
        assert!(!unavailable(&anyhow::anyhow!("unknown event type x")));
    }
}
