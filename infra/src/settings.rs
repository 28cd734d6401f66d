//! Typed settings from `NEWSROOM_*` environment variables (or flags), with local defaults.

use std::net::SocketAddr;
use std::time::Duration;

/// Every setting of every role, grouped by concern.
#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaSettings,
    /// Schema registry.
    #[command(flatten)]
    pub registry: RegistrySettings,
    /// PostgreSQL.
    #[command(flatten)]
    pub postgres: PostgresSettings,
    /// Redis.
    #[command(flatten)]
    pub redis: RedisSettings,
    /// Recommendations.
    #[command(flatten)]
    pub recommend: RecommendSettings,
    /// Notifications and e-mail.
    #[command(flatten)]
    pub notify: NotifySettings,
    /// HTTP listeners.
    #[command(flatten)]
    pub http: HttpSettings,
    /// Password hashing.
    #[command(flatten)]
    pub hashing: HashingSettings,
    /// Authentication and secrets.
    #[command(flatten)]
    pub auth: AuthSettings,
}

/// Tokens, secrets and the bootstrap admin.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthSettings {
    /// HS256 secret of the access tokens (at least 32 bytes). Required unless `--local`.
    #[arg(
        global = true,
        long = "jwt-secret",
        env = "NEWSROOM_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<Secret>,
    /// Secret key of the e-mail claims (keyed hashes of addresses). Must never change once
    /// users exist. Required unless `--local`.
    #[arg(
        global = true,
        long = "email-pepper",
        env = "NEWSROOM_EMAIL_PEPPER",
        hide_env_values = true
    )]
    pub email_pepper: Option<Secret>,
    /// Local mode: generate a token secret and use a fixed development pepper when none
    /// is configured (never in production).
    #[arg(
        global = true,
        long = "local",
        env = "NEWSROOM_LOCAL",
        default_value_t = false
    )]
    pub local: bool,
    /// Lifetime of access tokens in seconds.
    #[arg(
        global = true,
        long = "token-ttl-secs",
        env = "NEWSROOM_TOKEN_TTL_SECS",
        default_value_t = 3600
    )]
    pub token_ttl_secs: u64,
    /// E-mail of the first admin, created at start when no user has it.
    #[arg(global = true, long = "admin-email", env = "NEWSROOM_ADMIN_EMAIL")]
    pub admin_email: Option<String>,
    /// Password of the first admin.
    #[arg(
        global = true,
        long = "admin-password",
        env = "NEWSROOM_ADMIN_PASSWORD",
        hide_env_values = true
    )]
    pub admin_password: Option<Secret>,
}

/// Where Kafka is and how newsroom names and uses its topics.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers.
    #[arg(
        global = true,
        long = "kafka-brokers",
        env = "NEWSROOM_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Prefix of every topic name (`<prefix>.users`, ...), so deployments and tests can share a cluster.
    #[arg(
        global = true,
        long = "topic-prefix",
        env = "NEWSROOM_TOPIC_PREFIX",
        default_value = "newsroom"
    )]
    pub topic_prefix: String,
    /// Partitions of the event topics when newsroom creates them.
    #[arg(
        global = true,
        long = "topic-partitions",
        env = "NEWSROOM_TOPIC_PARTITIONS",
        default_value_t = 6
    )]
    pub partitions: i32,
    /// Replication factor of the topics newsroom creates.
    #[arg(
        global = true,
        long = "topic-replication",
        env = "NEWSROOM_TOPIC_REPLICATION",
        default_value_t = 1
    )]
    pub replication: i32,
    /// How long a write may wait for Kafka before the request fails with 503 (milliseconds).
    #[arg(
        global = true,
        long = "kafka-timeout-ms",
        env = "NEWSROOM_KAFKA_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub timeout_ms: u64,
    /// Events a partition writer applies between two snapshots of its state.
    #[arg(
        global = true,
        long = "snapshot-every",
        env = "NEWSROOM_SNAPSHOT_EVERY",
        default_value_t = 10_000
    )]
    pub snapshot_every: u64,
    /// Consumers of each read model that one process runs side by side, each a member of
    /// the model's consumer group with its share of the partitions (ADR 34). A replay runs
    /// one per core whatever this says.
    #[arg(
        global = true,
        long = "consumer-lanes",
        env = "NEWSROOM_CONSUMER_LANES",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub consumer_lanes: u16,
    /// Identity of this command process; part of its Kafka transactional id.
    #[arg(
        global = true,
        long = "instance-id",
        env = "NEWSROOM_INSTANCE_ID",
        default_value = "0"
    )]
    pub instance_id: String,
    /// How newsroom talks to the brokers: `plaintext`, `ssl`, `sasl_plaintext` or
    /// `sasl_ssl` (librdkafka's `security.protocol`).
    #[arg(
        global = true,
        long = "kafka-security-protocol",
        env = "NEWSROOM_KAFKA_SECURITY_PROTOCOL",
        default_value = "plaintext",
        value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
        ignore_case = true
    )]
    pub security_protocol: String,
    /// PEM file of the CA that signed the brokers' certificates (unset: the system's).
    #[arg(
        global = true,
        long = "kafka-ssl-ca",
        env = "NEWSROOM_KAFKA_SSL_CA_LOCATION"
    )]
    pub ssl_ca_location: Option<String>,
    /// PEM certificate and key files of this client, for brokers that require one.
    #[arg(
        global = true,
        long = "kafka-ssl-certificate",
        env = "NEWSROOM_KAFKA_SSL_CERTIFICATE_LOCATION",
        requires = "ssl_key_location"
    )]
    pub ssl_certificate_location: Option<String>,
    /// The key of `--kafka-ssl-certificate`.
    #[arg(
        global = true,
        long = "kafka-ssl-key",
        env = "NEWSROOM_KAFKA_SSL_KEY_LOCATION",
        requires = "ssl_certificate_location"
    )]
    pub ssl_key_location: Option<String>,
    /// SASL mechanism with `sasl_*` protocols: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[arg(
        global = true,
        long = "kafka-sasl-mechanism",
        env = "NEWSROOM_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512",
        value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    )]
    pub sasl_mechanism: String,
    /// SASL user name.
    #[arg(
        global = true,
        long = "kafka-sasl-username",
        env = "NEWSROOM_KAFKA_SASL_USERNAME"
    )]
    pub sasl_username: Option<String>,
    /// SASL password.
    #[arg(
        global = true,
        long = "kafka-sasl-password",
        env = "NEWSROOM_KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<Secret>,
}

impl KafkaSettings {
    /// The write timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The Confluent-API schema registry.
#[derive(clap::Args, Clone)]
pub struct RegistrySettings {
    /// Base URL of the Confluent-compatible API (Apicurio: `.../apis/ccompat/v7`).
    #[arg(
        global = true,
        id = "registry_url",
        long = "registry-url",
        env = "NEWSROOM_REGISTRY_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8085/apis/ccompat/v7"
    )]
    pub url: String,
}

/// The PostgreSQL read-model store.
#[derive(clap::Args, Clone)]
pub struct PostgresSettings {
    /// Connection URL.
    #[arg(
        global = true,
        id = "database_url",
        long = "database-url",
        env = "NEWSROOM_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://newsroom:newsroom@127.0.0.1:5432/newsroom"
    )]
    pub url: String,
    /// Largest number of connections per process.
    #[arg(
        global = true,
        long = "database-max-connections",
        env = "NEWSROOM_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// Longest a statement of a serving process may run before PostgreSQL cancels it
    /// (milliseconds; 0: no limit). A server that stops answering, or a plan gone wrong,
    /// then fails the request or the batch instead of holding a connection for good.
    /// Migrations, `replay` and `verify` run without it.
    #[arg(
        global = true,
        long = "database-statement-timeout-ms",
        env = "NEWSROOM_DATABASE_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub statement_timeout_ms: u64,
    /// How long a serving role started before its database waits for it (seconds; 0:
    /// not at all), trying every second and saying so in its log every 10 s.
    #[arg(
        global = true,
        long = "database-startup-wait-secs",
        env = "NEWSROOM_DATABASE_STARTUP_WAIT_SECS",
        default_value_t = 120
    )]
    pub startup_wait_secs: u64,
}

/// The Redis read-model store (article cache, trending, counters).
#[derive(clap::Args, Clone)]
pub struct RedisSettings {
    /// Connection URL.
    #[arg(
        global = true,
        id = "redis_url",
        long = "redis-url",
        env = "NEWSROOM_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub url: String,
}

/// The recommender.
#[derive(clap::Args, Debug, Clone)]
pub struct RecommendSettings {
    /// Hours until a read counts half as much in a user's affinities (changing it takes
    /// `newsroom replay recommend`).
    #[arg(
        global = true,
        long = "recommend-half-life-hours",
        env = "NEWSROOM_RECOMMEND_HALF_LIFE_HOURS",
        default_value_t = 168.0
    )]
    pub half_life_hours: f64,
    /// How many of the newest published articles are ranked for a user.
    #[arg(
        global = true,
        long = "recommend-candidates",
        env = "NEWSROOM_RECOMMEND_CANDIDATES",
        default_value_t = 1000
    )]
    pub candidates: u32,
    /// Users whose last ranking each query API process keeps (about 20 KB each), answered
    /// again while nothing it was computed from changed; 0 ranks every request.
    #[arg(
        global = true,
        long = "recommend-kept-users",
        env = "NEWSROOM_RECOMMEND_KEPT_USERS",
        default_value_t = 2000
    )]
    pub kept_users: usize,
}

impl RecommendSettings {
    /// The half-life as a duration (at least a second).
    pub fn half_life(&self) -> Duration {
        Duration::from_secs_f64((self.half_life_hours * 3600.0).max(1.0))
    }
}

/// The notifier's e-mail delivery.
#[derive(clap::Args, Debug, Clone)]
pub struct NotifySettings {
    /// SMTP server, `smtp://host:port` (plain; use a local relay for TLS). It may hold
    /// credentials (`smtp://user:password@host`): logs show it without them.
    #[arg(
        global = true,
        long = "smtp-url",
        env = "NEWSROOM_SMTP_URL",
        default_value = "smtp://127.0.0.1:2525",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub smtp_url: Secret,
    /// Sender of notification e-mails.
    #[arg(
        global = true,
        long = "mail-from",
        env = "NEWSROOM_MAIL_FROM",
        default_value = "newsroom <no-reply@newsroom.local>"
    )]
    pub from: String,
    /// First pause before an e-mail that failed is tried again (doubles each time).
    #[arg(
        global = true,
        long = "mail-retry-ms",
        env = "NEWSROOM_MAIL_RETRY_MS",
        default_value_t = 1000
    )]
    pub retry_ms: u64,
    /// Longest pause between tries of one e-mail.
    #[arg(
        global = true,
        long = "mail-retry-max-ms",
        env = "NEWSROOM_MAIL_RETRY_MAX_MS",
        default_value_t = 300_000
    )]
    pub retry_max_ms: u64,
    /// Failures in a row after which the circuit opens (no tries for a cool-down).
    #[arg(
        global = true,
        long = "mail-breaker-failures",
        env = "NEWSROOM_MAIL_BREAKER_FAILURES",
        default_value_t = 5
    )]
    pub breaker_failures: u32,
    /// How long an open circuit waits before one trial e-mail.
    #[arg(
        global = true,
        long = "mail-breaker-cooldown-ms",
        env = "NEWSROOM_MAIL_BREAKER_COOLDOWN_MS",
        default_value_t = 30_000
    )]
    pub breaker_cooldown_ms: u64,
}

/// The HTTP listeners of the two APIs.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpSettings {
    /// Address of the command API.
    #[arg(
        global = true,
        long = "command-addr",
        env = "NEWSROOM_COMMAND_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub command_addr: SocketAddr,
    /// Address of the query API.
    #[arg(
        global = true,
        long = "query-addr",
        env = "NEWSROOM_QUERY_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub query_addr: SocketAddr,
    /// Address of the operator's web console (`/admin`). Keep it off the public network:
    /// it is for admins only, and serves plain HTTP (put TLS in front of it).
    #[arg(
        global = true,
        long = "console-addr",
        env = "NEWSROOM_CONSOLE_ADDR",
        default_value = "127.0.0.1:8082"
    )]
    pub console_addr: SocketAddr,
    /// The command API the console logs admins in through (default: the command API of
    /// the same process, else `http://<command-addr>`).
    #[arg(
        global = true,
        long = "console-command-url",
        env = "NEWSROOM_CONSOLE_COMMAND_URL"
    )]
    pub console_command_url: Option<String>,
    /// Address other command processes reach this one at (default: the bound address).
    #[arg(
        global = true,
        long = "command-advertise",
        env = "NEWSROOM_COMMAND_ADVERTISE"
    )]
    pub command_advertise: Option<String>,
    /// Worker threads per HTTP server (0: one per core).
    #[arg(
        global = true,
        long = "http-workers",
        env = "NEWSROOM_HTTP_WORKERS",
        default_value_t = 0
    )]
    pub workers: usize,
    /// The header a trusted proxy in front of the APIs puts the client's address in
    /// (e.g. `x-real-ip`; for `x-forwarded-for`, its last entry is taken). Unset: the
    /// connection's peer address. Never set it without such a proxy: clients could name
    /// any address and escape the throttles.
    #[arg(
        global = true,
        long = "client-address-header",
        env = "NEWSROOM_CLIENT_ADDRESS_HEADER"
    )]
    pub client_address_header: Option<String>,
    /// Failed logins per account per minute before that account's logins are refused
    /// with 429 for the rest of the minute (0: no limit).
    #[arg(
        global = true,
        long = "login-failures-per-account",
        env = "NEWSROOM_LOGIN_FAILURES_PER_ACCOUNT",
        default_value_t = 10
    )]
    pub login_failures_per_account: u32,
    /// Failed logins per client address per minute (0: no limit).
    #[arg(
        global = true,
        long = "login-failures-per-address",
        env = "NEWSROOM_LOGIN_FAILURES_PER_ADDRESS",
        default_value_t = 100
    )]
    pub login_failures_per_address: u32,
    /// Registrations and password changes per client address per minute (0: no limit).
    #[arg(
        global = true,
        long = "credential-changes-per-address",
        env = "NEWSROOM_CREDENTIAL_CHANGES_PER_ADDRESS",
        default_value_t = 100
    )]
    pub credential_changes_per_address: u32,
    /// Requests a second per client address, and per user for requests with a valid
    /// token, with bursts of one second's worth, before 429 (0: no limit). Counted per
    /// process, on every endpoint of both APIs.
    #[arg(
        global = true,
        long = "requests-per-second-per-client",
        env = "NEWSROOM_REQUESTS_PER_SECOND_PER_CLIENT",
        default_value_t = 1000
    )]
    pub requests_per_second_per_client: u32,
}

/// Argon2id parameters for password hashes (OWASP's minimum by default).
#[derive(clap::Args, Debug, Clone)]
pub struct HashingSettings {
    /// Memory cost in KiB.
    #[arg(
        global = true,
        long = "argon2-memory-kib",
        env = "NEWSROOM_ARGON2_MEMORY_KIB",
        default_value_t = 19_456
    )]
    pub memory_kib: u32,
    /// Iterations.
    #[arg(
        global = true,
        long = "argon2-iterations",
        env = "NEWSROOM_ARGON2_ITERATIONS",
        default_value_t = 2
    )]
    pub iterations: u32,
    /// Lanes.
    #[arg(
        global = true,
        long = "argon2-parallelism",
        env = "NEWSROOM_ARGON2_PARALLELISM",
        default_value_t = 1
    )]
    pub parallelism: u32,
    /// Passwords hashed at once (0: half the cores, at least one; never more than the
    /// cores). Each holds its memory cost while it runs; the cores left over keep serving
    /// readers during a login flood.
    #[arg(
        global = true,
        long = "hashing-threads",
        env = "NEWSROOM_HASHING_THREADS",
        default_value_t = 0
    )]
    pub threads: usize,
}

impl Settings {
    /// The settings as they are when no variable or flag is given (local defaults).
    pub fn local_defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        // Parsing an empty command line only fails if a default itself is invalid.
        <Wrapper as clap::Parser>::try_parse_from(["newsroom"])
            .map(|w| w.settings)
            .unwrap_or_else(|e| panic!("built-in defaults are invalid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_local_infrastructure() {
        let settings = Settings::local_defaults();
        assert_eq!(settings.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(settings.http.command_addr.port(), 8080);
        assert_eq!(settings.http.query_addr.port(), 8081);
        assert!(settings.registry.url.starts_with("http://127.0.0.1:8085/"));
    }
}

/// A setting that must never show: `Debug` prints `***`; [`Secret::expose`] gives it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret(value.to_owned()))
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

// The store and registry URLs may carry passwords (in the user part, or as a parameter of
// the query: `?password=`): their `Debug` shows them without either.
pub(crate) fn shown(url: &str) -> String {
    let bare = without_credentials(url);
    match bare.split_once('?') {
        Some((base, _)) => format!("{base}?***"),
        None => bare,
    }
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("url", &shown(&self.url))
            .finish()
    }
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &shown(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("startup_wait_secs", &self.startup_wait_secs)
            .finish()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &shown(&self.url))
            .finish()
    }
}

/// `url` without the user and password it may carry (for logs).
pub fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url
            .rsplit_once('@')
            .map_or_else(|| url.to_owned(), |(_, host)| format!("***@{host}")),
    }
}

#[cfg(test)]
mod credential_tests {
    use super::without_credentials;

    #[test]
    fn store_urls_show_without_their_passwords() {
        let mut settings = crate::Settings::local_defaults();
        settings.postgres.url = "postgres://app:pg-hunter2@db.internal:5432/newsroom".into();
        settings.redis.url = "redis://:redis-hunter2@cache.internal:6379/".into();
        settings.registry.url = "https://reg:registry-hunter2@registry.internal/apis".into();
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.internal:5432/newsroom"), "{shown}");
        assert!(shown.contains("cache.internal:6379"), "{shown}");
        assert!(shown.contains("registry.internal/apis"), "{shown}");
        settings.postgres.url =
            "postgres://db.internal/newsroom?user=app&password=q-hunter2".into();
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.internal/newsroom?***"), "{shown}");
    }

    #[test]
    fn a_secret_does_not_show_in_debug() {
        let secret = super::Secret::from("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn credentials_in_a_url_are_not_shown() {
        assert_eq!(
            without_credentials("smtp://user:s3cret@mail.example:25"),
            "smtp://***@mail.example:25"
        );
        assert_eq!(
            without_credentials("smtp://127.0.0.1:2525"),
            "smtp://127.0.0.1:2525"
        );
    }
}
