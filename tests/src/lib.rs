//! Harness of the black-box tests: starts every newsroom role in this process against the
//! real local infrastructure (`infra/local.sh up`), each test with its own topic prefix
//! and its own PostgreSQL database, so tests run in parallel without seeing each other.
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context as _;
use newsroom::{Roles, Running};
use newsroom_infra::Settings;
use newsroom_infra::kafka::{Stream, read_committed_consumer};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::Connection as _;
use uuid::Uuid;

/// A running newsroom with its own topics and database.
pub struct TestApp {
    /// Base URL of the command API.
    pub command_url: String,
    /// Base URL of the query API.
    pub query_url: String,
    /// The settings it runs with.
    pub settings: Settings,
    /// An HTTP client.
    pub http: reqwest::Client,
    database: String,
    admin_url: String,
    running: Option<Running>,
}

/// A record read back from a topic.
pub struct RawRecord {
    /// Record key.
    pub key: Vec<u8>,
    /// Record value.
    pub payload: Vec<u8>,
}

impl TestApp {
    /// Starts every role on fresh topics and a fresh database.
    pub async fn spawn() -> anyhow::Result<TestApp> {
        if std::env::var_os("NEWSROOM_LOG").is_some() {
            newsroom_infra::telemetry::init();
        }
        let id = Uuid::now_v7().simple().to_string();
        let mut settings = Settings::local_defaults();
        settings.kafka.topic_prefix = format!("test_{id}");
        settings.kafka.instance_id = id.clone();
        settings.kafka.partitions = 3;
        settings.http.command_addr = "127.0.0.1:0".parse()?;
        settings.http.query_addr = "127.0.0.1:0".parse()?;
        settings.http.workers = 1;
        settings.postgres.max_connections = 4;
        // Cheap hashing keeps the suite fast; the parameters are the product's, not the tests'.
        settings.hashing.memory_kib = 1024;
        settings.hashing.iterations = 1;

        let admin_url = settings.postgres.url.clone();
        let database = format!("t_{id}");
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .context("connecting as admin")?;
        // The name is made of a UUID's hex digits only.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database}\""
        )))
        .execute(&mut admin)
        .await
        .context("creating the test database")?;
        settings.postgres.url = replace_database(&admin_url, &database);

        let running = newsroom::start(&settings, Roles::ALL).await?;
        let command_addr = running.command_addr.context("command API not started")?;
        let query_addr = running.query_addr.context("query API not started")?;
        let app = TestApp {
            command_url: format!("http://{command_addr}"),
            query_url: format!("http://{query_addr}"),
            settings,
            http: reqwest::Client::new(),
            database,
            admin_url,
            running: Some(running),
        };
        app.wait_until_ready().await?;
        Ok(app)
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.command_url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "command API never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// POSTs `body` as JSON to the command API.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .post(format!("{}{path}", self.command_url))
            .json(body)
            .send()
            .await?)
    }

    /// GETs `path` from the query API until it answers 200 (read models are eventually
    /// consistent), or fails after `timeout`.
    pub async fn get_eventually(
        &self,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<reqwest::Response> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let response = self
                .http
                .get(format!("{}{path}", self.query_url))
                .send()
                .await?;
            if response.status().is_success() || tokio::time::Instant::now() >= deadline {
                return Ok(response);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every committed record of `stream`, read from the beginning until the end offsets
    /// as they are now.
    pub fn committed_records(&self, stream: Stream) -> anyhow::Result<Vec<RawRecord>> {
        let topic = stream.topic(&self.settings.kafka);
        let group = format!("test-reader-{}", Uuid::now_v7());
        let consumer: BaseConsumer =
            read_committed_consumer(&self.settings.kafka, &group).create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut assignment = TopicPartitionList::new();
        let mut ends = Vec::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            assignment.add_partition_offset(&topic, partition.id(), Offset::Beginning)?;
            let (_, high) =
                consumer.fetch_watermarks(&topic, partition.id(), Duration::from_secs(10))?;
            ends.push((partition.id(), high));
        }
        consumer.assign(&assignment)?;
        let mut position: std::collections::HashMap<i32, i64> =
            ends.iter().map(|(p, _)| (*p, 0)).collect();
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // With read_committed, transaction markers and aborted records are skipped, so
        // "done" is: every partition's position reached its high watermark, or no message
        // arrives for a while after the log was read.
        let mut idle_polls = 0;
        while ends
            .iter()
            .any(|(p, high)| position.get(p).copied().unwrap_or(0) < high - 1)
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "reading {topic} timed out"
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(message) => {
                    let message = message?;
                    idle_polls = 0;
                    position.insert(message.partition(), message.offset());
                    records.push(RawRecord {
                        key: message.key().unwrap_or_default().to_vec(),
                        payload: message.payload().unwrap_or_default().to_vec(),
                    });
                }
                None => {
                    idle_polls += 1;
                    if idle_polls >= 10 {
                        break;
                    }
                }
            }
        }
        Ok(records)
    }

    /// Stops every role and drops the test database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.stop().await?;
        }
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.database
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

fn replace_database(url: &str, database: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => url.to_owned(),
    }
}

/// The path of `infra/local.sh`, which tests use to stop and start services.
pub fn infra_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/local.sh")
}

/// Runs `infra/local.sh <args>` and fails if it fails.
pub fn infra(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("bash")
        .arg(infra_script())
        .args(args)
        .status()
        .context("running infra/local.sh")?;
    anyhow::ensure!(status.success(), "infra/local.sh {args:?} failed: {status}");
    Ok(())
}

/// A registration body with a unique e-mail address.
pub fn new_user() -> Value {
    serde_json::json!({
        "name": "Ada Lovelace",
        "email": format!("ada.{}@example.com", Uuid::now_v7().simple()),
        "password": "correct horse battery",
    })
}
