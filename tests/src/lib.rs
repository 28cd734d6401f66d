//! Harness of the black-box tests: starts every newsroom role in this process against the
//! real local infrastructure (`infra/local.sh up`), each test with its own topic prefix
//! and its own PostgreSQL database, so tests run in parallel without seeing each other.
#![forbid(unsafe_code)]

pub mod chaos;

use std::time::Duration;

use anyhow::Context as _;
use newsroom::{Roles, Running};
use newsroom_infra::Settings;
use newsroom_infra::kafka::{Stream, read_committed_consumer};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::Connection as _;
use uuid::Uuid;

/// The token secret every test process shares (child processes too).
pub const TEST_JWT_SECRET: &str = "newsroom-test-secret-0123456789abcdef";
/// The bootstrap admin's password in tests.
pub const ADMIN_PASSWORD: &str = "admin password 123";

/// A registered user with a token.
#[derive(Debug, Clone)]
pub struct TestUser {
    /// Id.
    pub id: Uuid,
    /// E-mail.
    pub email: String,
    /// Password.
    pub password: String,
    /// Bearer token.
    pub token: String,
}

/// The consistency token of a write `what` answered 200 by `response`; fails on any other
/// status.
pub fn consistency_token(response: &reqwest::Response, what: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::OK,
        "{what}: {}",
        response.status()
    );
    Ok(response
        .headers()
        .get("x-consistency-token")
        .with_context(|| format!("{what}: no consistency token"))?
        .to_str()?
        .to_owned())
}

/// A running newsroom with its own topics and database.
pub struct TestApp {
    /// Base URL of the command API.
    pub command_url: String,
    /// Base URL of the query API.
    pub query_url: String,
    /// Base URL of the web console (`/admin` is under it), if it runs.
    pub console_url: String,
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
    /// Record headers (name, value as text).
    pub headers: Vec<(String, String)>,
}

impl TestApp {
    /// Starts every role on fresh topics and a fresh database.
    pub async fn spawn() -> anyhow::Result<TestApp> {
        Self::spawn_with(Roles::ALL).await
    }

    /// Starts `roles` on fresh topics and a fresh database.
    pub async fn spawn_with(roles: Roles) -> anyhow::Result<TestApp> {
        Self::spawn_adjusted(roles, |_| {}).await
    }

    /// Starts `roles` on fresh topics and a fresh database, with the test settings as
    /// `adjust` leaves them (`Roles::NONE`: a deployment for child processes only).
    pub async fn spawn_adjusted(
        roles: Roles,
        adjust: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<TestApp> {
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
        settings.http.console_addr = "127.0.0.1:0".parse()?;
        settings.http.workers = 1;
        settings.postgres.max_connections = 4;
        // Cheap hashing keeps the suite fast; the parameters are the product's, not the tests'.
        settings.hashing.memory_kib = 1024;
        settings.hashing.iterations = 1;
        settings.auth.jwt_secret = Some(TEST_JWT_SECRET.into());
        settings.auth.email_pepper = Some(format!("pepper-{id}").into());
        settings.auth.admin_email = Some(format!("admin.{id}@example.com"));
        settings.auth.admin_password = Some(ADMIN_PASSWORD.into());
        // E-mail retries on a test's time scale.
        settings.notify.retry_ms = 200;
        settings.notify.retry_max_ms = 1000;
        settings.notify.breaker_failures = 3;
        settings.notify.breaker_cooldown_ms = 1000;

        adjust(&mut settings);
        let admin_url = settings.postgres.url.clone();
        let database = format!("t_{id}");
        settings.postgres.url = newsroom_infra::db::create_database(&admin_url, &database).await?;

        let running = newsroom::start(&settings, roles).await?;
        let url = |addr: Option<std::net::SocketAddr>| {
            addr.map(|a| format!("http://{a}")).unwrap_or_default()
        };
        let app = TestApp {
            command_url: url(running.command_addr),
            query_url: url(running.query_addr),
            console_url: url(running.console_addr),
            settings,
            http: client(),
            database,
            admin_url,
            running: Some(running),
        };
        app.wait_until_ready().await?;
        Ok(app)
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let base = if self.command_url.is_empty() {
            &self.query_url
        } else {
            &self.command_url
        };
        if base.is_empty() {
            return Ok(());
        }
        let url = format!("{base}/readyz");
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

    /// Logs in; the token, or the error status.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
    ) -> anyhow::Result<Result<String, reqwest::StatusCode>> {
        let response = self
            .http
            .post(format!("{}/v1/auth/token", self.command_url))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await?;
        if !response.status().is_success() {
            return Ok(Err(response.status()));
        }
        let body: Value = response.json().await?;
        Ok(Ok(body["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned()))
    }

    /// The bootstrap admin (created at start), logged in.
    pub async fn admin(&self) -> anyhow::Result<TestUser> {
        let email = self
            .settings
            .auth
            .admin_email
            .clone()
            .context("no admin configured")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(token) = self.login(&email, ADMIN_PASSWORD).await? {
                let id = token_subject(&token)?;
                return Ok(TestUser {
                    id,
                    email,
                    password: ADMIN_PASSWORD.into(),
                    token,
                });
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the bootstrap admin never appeared"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers a new reader and logs them in.
    pub async fn reader(&self) -> anyhow::Result<TestUser> {
        let body = new_user();
        let response = self.post_json("/v1/users", &body).await?;
        anyhow::ensure!(
            response.status() == reqwest::StatusCode::CREATED,
            "registration: {}",
            response.status()
        );
        let created: Value = response.json().await?;
        let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
        let email = body["email"].as_str().unwrap_or_default().to_owned();
        let password = body["password"].as_str().unwrap_or_default().to_owned();
        let token = self
            .login(&email, &password)
            .await?
            .map_err(|s| anyhow::anyhow!("login failed: {s}"))?;
        Ok(TestUser {
            id,
            email,
            password,
            token,
        })
    }

    /// Registers a user and makes them an editor (through the admin), logged in again so
    /// that the token carries the role.
    pub async fn editor(&self) -> anyhow::Result<TestUser> {
        let user = self.reader().await?;
        let admin = self.admin().await?;
        let response = self
            .http
            .put(format!("{}/v1/users/{}/role", self.command_url, user.id))
            .bearer_auth(&admin.token)
            .json(&serde_json::json!({"role": "editor"}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "making an editor: {}",
            response.status()
        );
        let token = self
            .login(&user.email, &user.password)
            .await?
            .map_err(|s| anyhow::anyhow!("login failed: {s}"))?;
        Ok(TestUser { token, ..user })
    }

    /// `user` follows `categories` with e-mail on; the consistency token of the change.
    pub async fn follow(&self, user: &TestUser, categories: &[&str]) -> anyhow::Result<String> {
        let response = self
            .http
            .patch(format!("{}/v1/users/{}", self.command_url, user.id))
            .bearer_auth(&user.token)
            .json(&serde_json::json!({"followed_categories": categories, "email_notifications": true}))
            .send()
            .await?;
        consistency_token(&response, "follow")
    }

    /// The data key of `user` as stored by the command side, if it still exists.
    pub async fn user_key(
        &self,
        user: Uuid,
    ) -> anyhow::Result<Option<newsroom_events::personal::UserKey>> {
        let mut db = sqlx::PgConnection::connect(&self.settings.postgres.url).await?;
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT key FROM cmd_user_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&mut db)
                .await?;
        Ok(row.and_then(|(k,)| newsroom_events::personal::UserKey::from_slice(&k)))
    }

    /// How many answers of `endpoint` the query API gave from `store` (`redis`,
    /// `postgres`), from its metrics.
    pub async fn query_answers(&self, endpoint: &str, store: &str) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.query_url))
            .send()
            .await?
            .text()
            .await?;
        let needle =
            format!("newsroom_query_answers_total{{endpoint=\"{endpoint}\",store=\"{store}\"}} ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Sends a command: `method` on `path` of the command API, with an optional bearer
    /// token, JSON body and `If-Match` version; the status and the JSON body (null if none).
    pub async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        if_match: Option<i64>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let request = self
            .http
            .request(method, format!("{}{path}", self.command_url));
        let response = command_parts(request, token, body, if_match).send().await?;
        let status = response.status();
        let text = response.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        };
        Ok((status, value))
    }

    /// Drafts the article `body` as the holder of `token`; fails unless it is created. Its
    /// id and the command API's answer.
    pub async fn draft(&self, token: &str, body: &Value) -> anyhow::Result<(Uuid, Value)> {
        let (status, created) = self
            .command(
                reqwest::Method::POST,
                "/v1/news",
                Some(token),
                Some(body),
                None,
            )
            .await?;
        anyhow::ensure!(
            status == reqwest::StatusCode::CREATED,
            "drafting: {status} {created}"
        );
        let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
        Ok((id, created))
    }

    /// Publishes the article `id` as the holder of `token`; fails unless it is published.
    /// The publication's consistency token.
    pub async fn publish(&self, token: &str, id: Uuid) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("{}/v1/news/{id}/publish", self.command_url))
            .bearer_auth(token)
            .send()
            .await?;
        consistency_token(&response, "publish")
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
        token: &str,
        timeout: Duration,
    ) -> anyhow::Result<reqwest::Response> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let response = self
                .http
                .get(format!("{}{path}", self.query_url))
                .bearer_auth(token)
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
        self.records_of(&stream.topic(&self.settings.kafka))
    }

    /// Every committed record of `topic`, read from the beginning until the end offsets
    /// as they are now.
    pub fn records_of(&self, topic: &str) -> anyhow::Result<Vec<RawRecord>> {
        let topic = topic.to_owned();
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
            ends.iter().map(|(p, _)| (*p, -1)).collect();
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
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
                    let headers = message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    let value = h.value.unwrap_or_default();
                                    (
                                        h.key.to_owned(),
                                        String::from_utf8_lossy(value).into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    records.push(RawRecord {
                        key: message.key().unwrap_or_default().to_vec(),
                        payload: message.payload().unwrap_or_default().to_vec(),
                        headers,
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

    /// Stops every role, drops the test database and deletes the test's topics and Redis
    /// keys (a broker that keeps every test's topics runs out of open files).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.stop().await?;
        }
        newsroom_infra::db::drop_database(&self.admin_url, &self.database).await?;
        // Clearing up is best effort: a test that passed does not fail for it.
        if let Err(e) = newsroom_infra::kafka::delete_topics(&self.settings.kafka).await {
            eprintln!("deleting the test's topics: {e:#}");
        }
        let prefix = format!("{}:*", self.settings.kafka.topic_prefix);
        let cleared = async {
            let mut redis = redis::Client::open(self.settings.redis.url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            newsroom_infra::redis::unlink_matching(&mut redis, &prefix).await
        };
        if let Err(e) = cleared.await {
            eprintln!("deleting the test's Redis keys: {e:#}");
        }
        Ok(())
    }
}

impl TestApp {
    /// A `newsroom` command (the binary beside the test binaries) with this app's
    /// settings in its environment; `instance` names it in Kafka and in logs.
    pub fn newsroom(&self, instance: &str) -> anyhow::Result<std::process::Command> {
        // Beside a binary (target/debug/chaos), or one folder up from a test (deps/).
        let exe = std::env::current_exe()?;
        let binary = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("newsroom"))
            .find(|b| b.exists())
            .unwrap_or_else(|| exe.with_file_name("newsroom"));
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: run `cargo build --bin newsroom` first",
            binary.display()
        );
        let s = &self.settings;
        let mut command = std::process::Command::new(binary);
        command
            .env("NEWSROOM_KAFKA_BROKERS", &s.kafka.brokers)
            .env(
                "NEWSROOM_KAFKA_SECURITY_PROTOCOL",
                &s.kafka.security_protocol,
            )
            .env("NEWSROOM_KAFKA_SASL_MECHANISM", &s.kafka.sasl_mechanism)
            .env(
                "NEWSROOM_TOPIC_REPLICATION",
                s.kafka.replication.to_string(),
            )
            .env("NEWSROOM_TOPIC_PREFIX", &s.kafka.topic_prefix)
            .env("NEWSROOM_TOPIC_PARTITIONS", s.kafka.partitions.to_string())
            .env("NEWSROOM_INSTANCE_ID", instance)
            .env("NEWSROOM_DATABASE_URL", &s.postgres.url)
            .env("NEWSROOM_DATABASE_MAX_CONNECTIONS", "8")
            .env("NEWSROOM_REDIS_URL", &s.redis.url)
            .env("NEWSROOM_HTTP_WORKERS", "1")
            // Several processes of a test may run at once: none takes a fixed port.
            .env("NEWSROOM_CONSOLE_ADDR", "127.0.0.1:0")
            .env(
                "NEWSROOM_JWT_SECRET",
                s.auth.jwt_secret.clone().unwrap_or_default().expose(),
            )
            .env(
                "NEWSROOM_EMAIL_PEPPER",
                s.auth.email_pepper.clone().unwrap_or_default().expose(),
            )
            .env(
                "NEWSROOM_ADMIN_EMAIL",
                s.auth.admin_email.clone().unwrap_or_default(),
            )
            .env("NEWSROOM_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("NEWSROOM_ARGON2_MEMORY_KIB", "1024")
            .env("NEWSROOM_ARGON2_ITERATIONS", "1")
            .env("NEWSROOM_SMTP_URL", s.notify.smtp_url.expose())
            .env("NEWSROOM_MAIL_RETRY_MS", s.notify.retry_ms.to_string())
            .env(
                "NEWSROOM_MAIL_RETRY_MAX_MS",
                s.notify.retry_max_ms.to_string(),
            )
            .env(
                "NEWSROOM_MAIL_BREAKER_FAILURES",
                s.notify.breaker_failures.to_string(),
            )
            .env(
                "NEWSROOM_MAIL_BREAKER_COOLDOWN_MS",
                s.notify.breaker_cooldown_ms.to_string(),
            );
        let password = s
            .kafka
            .sasl_password
            .as_ref()
            .map(|p| p.expose().to_owned());
        for (name, value) in [
            ("NEWSROOM_KAFKA_SSL_CA_LOCATION", &s.kafka.ssl_ca_location),
            (
                "NEWSROOM_KAFKA_SSL_CERTIFICATE_LOCATION",
                &s.kafka.ssl_certificate_location,
            ),
            ("NEWSROOM_KAFKA_SSL_KEY_LOCATION", &s.kafka.ssl_key_location),
            ("NEWSROOM_KAFKA_SASL_USERNAME", &s.kafka.sasl_username),
            ("NEWSROOM_KAFKA_SASL_PASSWORD", &password),
        ] {
            if let Some(value) = value {
                command.env(name, value);
            }
        }
        Ok(command)
    }

    /// Runs `newsroom <args>` to completion; its stdout, or its stderr as the error.
    pub async fn newsroom_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = self.newsroom("cli")?;
        command.args(args);
        let output = tokio::task::spawn_blocking(move || command.output()).await??;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        anyhow::ensure!(
            output.status.success(),
            "newsroom {args:?} failed: {}\n{stdout}\n{stderr}",
            output.status
        );
        Ok(stdout)
    }

    /// A connection pool on the app's database.
    pub async fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::PgPool::connect(&self.settings.postgres.url).await?)
    }

    /// Every row of every read model the query side serves (PostgreSQL views of the
    /// active versions) and every key of the active Redis version with its value, as
    /// comparable text; keys are named without their version.
    pub async fn read_models(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
        let pool = self.pool().await?;
        let mut models = std::collections::BTreeMap::new();
        for view in [
            "users",
            "news",
            "reading_history",
            "news_reads_hourly",
            "news_read_counts",
            "notify_follows",
            "notify_articles",
            "notify_subscribers",
            "notify_inbox",
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT to_jsonb(t)::text FROM {view} t ORDER BY 1"
            )))
            .fetch_all(&pool)
            .await?;
            models.insert(
                format!("pg:{view}"),
                rows.into_iter().map(|(r,)| r).collect(),
            );
        }
        pool.close().await;
        let mut redis = redis::Client::open(self.settings.redis.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        for model in ["cache", "recommend"] {
            let root = newsroom_infra::redis::root(&self.settings.kafka, model);
            let active: Option<String> = redis::cmd("GET")
                .arg(format!("{root}:active"))
                .query_async(&mut redis)
                .await?;
            let prefix = format!("{root}:v{}:", active.unwrap_or_default());
            for (key, value) in newsroom_infra::redis::dump(&mut redis, &prefix).await? {
                models.insert(format!("redis:{model}:{key}"), value);
            }
        }
        Ok(models)
    }

    /// Waits until the read models stop changing (two snapshots a second apart agree),
    /// and returns them.
    pub async fn settled_read_models(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = self.read_models().await?;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.read_models().await?;
            if now == last {
                return Ok(now);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the read models kept changing for {timeout:?}"
            );
            last = now;
        }
    }
}

/// Polls `check` every 100 ms until it says true; fails after `timeout` naming `what`.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A `newsroom <role>` child process with a test app's settings, killed when dropped.
pub struct ChildRole {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl ChildRole {
    /// Starts `newsroom <role>`; `run` tells its log files apart.
    pub fn start(app: &TestApp, role: &str, run: usize) -> anyhow::Result<ChildRole> {
        ChildRole::start_with(app, role, run, &[])
    }

    /// [`ChildRole::start`] with more arguments after the role.
    pub fn start_with(
        app: &TestApp,
        role: &str,
        run: usize,
        args: &[&str],
    ) -> anyhow::Result<ChildRole> {
        ChildRole::start_with_env(app, role, run, args, &[])
    }

    /// [`ChildRole::start_with`] with more environment variables.
    pub fn start_with_env(
        app: &TestApp,
        role: &str,
        run: usize,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ChildRole> {
        let log = std::env::temp_dir().join(format!(
            "newsroom-{role}-{}-{run}.log",
            app.settings.kafka.topic_prefix
        ));
        let child = app
            .newsroom(&format!("{role}-{run}"))?
            .arg(role)
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(ChildRole { child, log })
    }

    /// The last `lines` lines of its log, as written.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Each JSON line it logged so far.
    pub fn logged(&self) -> anyhow::Result<Vec<Value>> {
        Ok(std::fs::read_to_string(&self.log)?
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect())
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ChildRole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `request` with what a command may carry: the caller's token, a JSON body and an
/// `If-Match` version, each when given.
pub fn command_parts(
    mut request: reqwest::RequestBuilder,
    token: Option<&str>,
    body: Option<&Value>,
    if_match: Option<i64>,
) -> reqwest::RequestBuilder {
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(version) = if_match {
        request = request.header("if-match", format!("\"{version}\""));
    }
    request
}

/// A number from 0 to `bound` (exclusive), different on each call.
pub fn random_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Uuid::now_v7().as_u128());
    hasher.finish() % bound.max(1)
}

/// A message the local SMTP server received (`infra/local.sh`, service `smtp`).
#[derive(Debug, Clone)]
pub struct Mail {
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The Subject header.
    pub subject: String,
    /// The Message-ID header.
    pub message_id: String,
    /// The body as sent.
    pub body: String,
}

/// Every message the local SMTP server received for `address`.
pub fn mails_to(address: &str) -> anyhow::Result<Vec<Mail>> {
    Ok(mails()?
        .into_iter()
        .filter(|m| m.to.iter().any(|t| t.eq_ignore_ascii_case(address)))
        .collect())
}

/// Where infra/local.sh keeps its state (captured mail, the TLS files, the fuzzer).
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("NEWSROOM_STATE_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.local"),
        std::path::PathBuf::from,
    )
}

/// Every message the local SMTP server received, oldest first.
pub fn mails() -> anyhow::Result<Vec<Mail>> {
    let dir = state_dir().join("smtp/mail");
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    names.sort();
    let mut mails = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .or_else(|| text.split_once("\n\n"))
            .unwrap_or((text.as_str(), ""));
        let mut to = Vec::new();
        let (mut subject, mut message_id) = (String::new(), String::new());
        for line in head.lines() {
            if let Some(rcpt) = line.strip_prefix("X-Envelope-To: ") {
                to.push(rcpt.trim().to_owned());
            } else if let Some(s) = line.strip_prefix("Subject: ") {
                subject = s.trim().to_owned();
            } else if let Some((name, value)) = line.split_once(": ")
                && name.eq_ignore_ascii_case("message-id")
            {
                message_id = value.trim().to_owned();
            }
        }
        mails.push(Mail {
            to,
            subject,
            message_id,
            body: body.replace("=\r\n", "").replace("\r\n", "\n"),
        });
    }
    Ok(mails)
}

/// An HTTP client whose idle connections expire before the servers' keep-alive (5 s), so
/// that no request is sent on a connection the server is closing.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_else(|e| panic!("building the HTTP client: {e}"))
}

/// One consistency token naming every position of `tokens` (a query that must see the
/// effects of writes to several streams).
pub fn merge_tokens(tokens: &[&str]) -> anyhow::Result<String> {
    use newsroom_events::consistency::ConsistencyToken;
    let mut merged = ConsistencyToken::default();
    for token in tokens {
        let token = ConsistencyToken::parse(token)?;
        for (stream, position) in token.positions() {
            merged.add(stream, position);
        }
    }
    Ok(merged.to_string())
}

/// The user id a token names (its `sub`), read without verifying it.
pub fn token_subject(token: &str) -> anyhow::Result<Uuid> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    let claims: Value = serde_json::from_slice(&bytes)?;
    Ok(Uuid::parse_str(claims["sub"].as_str().unwrap_or_default())?)
}

/// The path of `infra/local.sh`, which tests use to stop and start services.
pub fn infra_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/local.sh")
}

/// Runs `infra/local.sh <args>` and fails if it fails; what it prints goes to stderr.
pub fn infra(args: &[&str]) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let status = std::process::Command::new("bash")
        .arg(infra_script())
        .args(args)
        .stdout(stderr)
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

/// A TCP proxy the test can cut: while cut, every connection is dropped, those already
/// open included (as when the machine behind it goes away).
pub struct Cut {
    /// The port it listens on (loopback).
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cut {
    /// A proxy to `target` (`host:port`), open.
    pub async fn to(target: String) -> anyhow::Result<Cut> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                if !*watch.borrow() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Cut { port, open, task })
    }

    /// Opens or cuts it.
    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}
