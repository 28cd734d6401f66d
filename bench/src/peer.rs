//! The peer: a plain PostgreSQL event store (cqrs-es + postgres-es behind actix-web, in
//! `../shared/peers/cqrs-es-news`), built out of tree from its read-only folder, run on its
//! own database of the local PostgreSQL, and its load generator, which drives the peer and
//! newsroom alike so that both are measured by the same client with the same settings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The peer's binaries.
pub struct Tools {
    peer: PathBuf,
    loadgen: PathBuf,
    init_sql: PathBuf,
}

/// Builds the peer and its load generator (release, pinned by its lock file) into
/// `target_dir`; a no-op when they are up to date.
pub async fn build(dir: &Path, target_dir: &Path) -> anyhow::Result<Tools> {
    let manifest = dir.join("Cargo.toml");
    anyhow::ensure!(
        manifest.exists(),
        "no peer at {} (set --peer-dir)",
        dir.display()
    );
    eprintln!(
        "bench: building the peer from {} (release, out of tree)",
        dir.display()
    );
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .status()
        .await
        .context("running cargo for the peer")?;
    anyhow::ensure!(status.success(), "building the peer failed: {status}");
    let release = target_dir.join("release");
    Ok(Tools {
        peer: release.join("peer"),
        loadgen: release.join("loadgen"),
        init_sql: dir.join("sql").join("init.sql"),
    })
}

/// A running peer on a database of its own.
pub struct Peer {
    child: Child,
    /// Its base URL.
    pub url: String,
    admin_url: String,
    database: String,
}

impl Peer {
    /// Creates the database `database` (through `admin_url`'s server), loads the peer's
    /// schema and starts the peer on a free loopback port.
    pub async fn start(tools: &Tools, admin_url: &str, database: &str) -> anyhow::Result<Peer> {
        let url = newsroom_infra::db::create_database(admin_url, database).await?;
        let schema = std::fs::read_to_string(&tools.init_sql)
            .with_context(|| format!("reading {}", tools.init_sql.display()))?;
        {
            use sqlx::Connection as _;
            let mut connection = sqlx::PgConnection::connect(&url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
                .execute(&mut connection)
                .await
                .context("loading the peer's schema")?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&tools.peer)
            .env("DATABASE_URL", &url)
            .env("PEER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", tools.peer.display()))?;
        let peer = Peer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: admin_url.to_owned(),
            database: database.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "the peer never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(peer)
    }

    /// Stops the peer and drops its database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.kill().await;
        newsroom_infra::db::drop_database(&self.admin_url, &self.database).await
    }
}

/// What the load generator printed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Scenario.
    pub scenario: String,
    /// Clients.
    pub concurrency: u64,
    /// Requests measured (successes and failures).
    pub requests: u64,
    /// Requests per second (every HTTP request counts, successes and failures).
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Failed requests.
    pub errors: u64,
}

/// Runs the load generator's `scenario` against `url` with `clients` for `seconds` after a
/// warm-up, as the peer's README runs it.
pub async fn load(
    tools: &Tools,
    url: &str,
    scenario: &str,
    clients: usize,
    seconds: u64,
    bearer: Option<&str>,
) -> anyhow::Result<Measured> {
    let mut command = Command::new(&tools.loadgen);
    command
        .args(["--url", url, "--scenario", scenario])
        .args(["--concurrency", &clients.to_string()])
        .args(["--duration", &seconds.to_string()])
        .args(["--warmup", &seconds.div_ceil(4).to_string()]);
    if let Some(token) = bearer {
        command.args(["--bearer", token]);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .context("running the load generator")?;
    anyhow::ensure!(
        output.status.success(),
        "the load generator failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("reading the load generator's {line}"))
}
