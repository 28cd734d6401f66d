//! The chaos run (issue 14): every role as its own OS process against a three-node Kafka
//! cluster, a mixed workload whose every request and answer is recorded, faults injected
//! at random while it runs, and a checker that proves from the log and the stores that
//! nothing acknowledged was lost or doubled and that every read model equals a fresh build.
//!
//! What "lost" and "doubled" mean here, per logical command (one Idempotency-Key, retried
//! with a new `X-Request-Id` on every attempt; the request id is the events' correlation id):
//! - answered 2xx: exactly one event carries one of its request ids, at the aggregate and
//!   version the answer named (none: lost; more: doubled);
//! - answered 4xx: no event carries one of its request ids;
//! - never answered (every attempt failed until the deadline): at most one event.
//!
//! Besides, every aggregate's versions in the log are 1..=n with no gap and no repeat.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use newsroom_events::news::NewsEvent;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{ADMIN_PASSWORD, TestApp, infra, token_subject};

/// How a chaos run is shaped.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the workload and the faults run.
    pub duration: Duration,
    /// Concurrent clients (each with an editor and two readers of its own).
    pub clients: usize,
    /// Mean time between the starts of two faults.
    pub fault_every: Duration,
    /// Faults that may be under way at once (never two brokers down at once).
    pub overlap: usize,
    /// Where the report goes (JSON), besides stdout.
    pub out: Option<PathBuf>,
    /// The fault kinds injected (a subset of [`KINDS`]); every kind when empty.
    pub kinds: Vec<String>,
}

/// What a chaos run found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Logical commands sent (each retried under one Idempotency-Key).
    pub commands: u64,
    /// Answered 2xx.
    pub acknowledged: u64,
    /// Answered 4xx.
    pub rejected: u64,
    /// Never answered before the client gave up.
    pub unanswered: u64,
    /// HTTP attempts, and how many failed (5xx or no answer) before a retry.
    pub attempts: u64,
    /// Attempts that failed and were retried.
    pub failed_attempts: u64,
    /// Articles read (query API, records reads).
    pub reads: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Events of the users and news streams in the log.
    pub events: u64,
    /// 2xx commands whose event is not in the log (or not at the version answered).
    pub lost: u64,
    /// Commands with more than one event, and repeated aggregate versions.
    pub doubled: u64,
    /// 4xx commands that wrote an event.
    pub written_by_rejected: u64,
    /// Missing versions inside an aggregate's history.
    pub gaps: u64,
    /// Events written by a request that was answered 5xx "nothing was written".
    pub written_after_refusal: u64,
    /// Events no recorded request wrote (the bootstrap admin's aside).
    pub unexplained_events: u64,
    /// Whether every read model the query API serves included every acknowledged write.
    pub converged: bool,
    /// Events the consumers parked as dead letters.
    pub dead_letters: u64,
    /// Differences `newsroom verify` found, by read model.
    pub read_model_differences: BTreeMap<String, u64>,
    /// Inbox entries of an e-mail subscriber without exactly one e-mail (one Message-ID).
    pub emails_not_once: u64,
    /// Deliveries of an e-mail beyond its first (the same Message-ID again): SMTP's
    /// at-least-once window, a crash between the server's acceptance and the outbox mark.
    pub email_redeliveries: u64,
    /// E-mails still waiting in the outbox after the run settled.
    pub outbox_pending: u64,
    /// The longest time without any acknowledged command while a fault of each kind was
    /// under way (milliseconds).
    pub longest_unavailability_ms: BTreeMap<String, u64>,
    /// The first problems, described.
    pub problems: Vec<String>,
    /// Seconds the whole run took.
    pub elapsed_s: f64,
}

impl Report {
    /// Whether the checker found nothing wrong.
    pub fn clean(&self) -> bool {
        self.acknowledged > 0
            && self.converged
            && self.written_after_refusal == 0
            && self.unexplained_events == 0
            && self.dead_letters == 0
            && self.lost == 0
            && self.doubled == 0
            && self.written_by_rejected == 0
            && self.gaps == 0
            && self.emails_not_once == 0
            && self.outbox_pending == 0
            && self.read_model_differences.values().all(|d| *d == 0)
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 50 {
            self.problems.push(what);
        }
    }
}

/// The fault kinds, injected in turn (each lane from a random start).
pub const KINDS: [&str; 6] = ["kill", "freeze", "broker", "postgres", "redis", "smtp"];

/// One newsroom process of the run, restarted under the same name and port.
struct Proc {
    name: String,
    role: &'static str,
    port: Option<u16>,
    child: Option<Child>,
    runs: usize,
    logs: PathBuf,
    /// Kept down by a fault until then (the supervisor leaves it alone).
    down_until: Option<Instant>,
}

impl Proc {
    fn new(
        name: &str,
        role: &'static str,
        http: bool,
        logs: &std::path::Path,
    ) -> anyhow::Result<Proc> {
        let port = if http {
            Some(
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
            )
        } else {
            None
        };
        Ok(Proc {
            name: name.to_owned(),
            role,
            port,
            child: None,
            runs: 0,
            logs: logs.to_owned(),
            down_until: None,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port.unwrap_or_default())
    }

    /// Whether the process is not running (never started, killed, or exited by itself).
    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Starts the process unless it runs.
    fn start(&mut self, app: &TestApp) -> anyhow::Result<()> {
        if !self.exited() {
            return Ok(());
        }
        self.down_until = None;
        self.runs += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}.log", self.name, self.runs)))?;
        let mut command = app.newsroom(&self.name)?;
        command
            .arg(self.role)
            // Every client comes from 127.0.0.1: registrations and requests are not throttled here.
            .env("NEWSROOM_CREDENTIAL_CHANGES_PER_ADDRESS", "0")
            .env("NEWSROOM_REQUESTS_PER_SECOND_PER_CLIENT", "0")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(port) = self.port {
            let variable = if self.role == "query-api" {
                "NEWSROOM_QUERY_ADDR"
            } else {
                "NEWSROOM_COMMAND_ADDR"
            };
            command.env(variable, format!("127.0.0.1:{port}"));
        }
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        Ok(())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "kill {signal} {} failed", self.name);
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        self.kill();
    }
}

/// The outcome of one logical command.
#[derive(Debug, Clone)]
enum Outcome {
    Ok { aggregate: Uuid, version: i64 },
    Rejected(u16),
    Unanswered,
}

/// One HTTP attempt of a command: its request id, and what it said about the write.
#[derive(Debug, Clone)]
struct Attempt {
    request_id: String,
    /// Answered 5xx saying "nothing was written".
    refused: bool,
}

#[derive(Debug, Clone)]
struct Cmd {
    what: String,
    attempts: Vec<Attempt>,
    outcome: Outcome,
}

#[derive(Default)]
struct History {
    commands: Vec<Cmd>,
    /// When each acknowledged command was answered.
    acknowledged_at: Vec<Instant>,
    attempts: u64,
    failed_attempts: u64,
    reads: u64,
    /// (kind, started, ended).
    faults: Vec<(String, Instant, Instant)>,
    /// Each registered user's e-mail.
    emails: HashMap<Uuid, String>,
    /// Every position an acknowledged command wrote (merged consistency tokens).
    written: newsroom_events::consistency::ConsistencyToken,
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    command_urls: Vec<String>,
    query_url: String,
    history: Arc<Mutex<History>>,
}

/// A small deterministic generator per client (xorshift), seeded from a UUID.
struct Dice(u64);

impl Dice {
    fn new() -> Dice {
        Dice((Uuid::now_v7().as_u128() as u64) | 1)
    }
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

impl Client {
    /// Sends one logical command, retrying failed attempts (5xx, 429, no answer) with the
    /// same Idempotency-Key on either command process for up to 30 s; records it all.
    async fn command(
        &self,
        what: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        if_match: Option<i64>,
    ) -> (Outcome, Value) {
        let key = Uuid::now_v7().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempts = Vec::new();
        let mut attempt = 0usize;
        let (outcome, answer) = loop {
            let request_id = Uuid::now_v7().to_string();
            let url = &self.command_urls[attempt % self.command_urls.len()];
            attempt += 1;
            let request = self
                .http
                .request(method.clone(), format!("{url}{path}"))
                .timeout(Duration::from_secs(10))
                .header("idempotency-key", &key)
                .header("x-request-id", &request_id);
            let request = crate::command_parts(request, token, body, if_match);
            let answered = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let token = response
                        .headers()
                        .get("x-consistency-token")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|t| {
                            newsroom_events::consistency::ConsistencyToken::parse(t).ok()
                        });
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    Some((status, body, token))
                }
                Err(_) => None,
            };
            attempts.push(Attempt {
                request_id: request_id.clone(),
                refused: answered.as_ref().is_some_and(|(status, body, _)| {
                    status.is_server_error()
                        && body["detail"]
                            .as_str()
                            .is_some_and(|d| d.ends_with("nothing was written"))
                }),
            });
            let decided = {
                let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
                history.attempts += 1;
                match answered {
                    Some((status, body, token)) if status.is_success() => {
                        history.acknowledged_at.push(Instant::now());
                        for (stream, position) in token.iter().flat_map(|t| t.positions()) {
                            history.written.add(stream, position);
                        }
                        let aggregate = body["id"]
                            .as_str()
                            .and_then(|id| Uuid::parse_str(id).ok())
                            .unwrap_or_default();
                        let version = body["version"].as_i64().unwrap_or(-1);
                        Some((Outcome::Ok { aggregate, version }, body))
                    }
                    Some((status, body, _))
                        if status.is_client_error()
                            && status != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                    {
                        Some((Outcome::Rejected(status.as_u16()), body))
                    }
                    _ => {
                        history.failed_attempts += 1;
                        None
                    }
                }
            };
            if let Some(decided) = decided {
                break decided;
            }
            if Instant::now() >= deadline {
                break (Outcome::Unanswered, Value::Null);
            }
            tokio::time::sleep(Duration::from_millis(200 + 100 * attempt.min(8) as u64)).await;
        };
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .commands
            .push(Cmd {
                what: what.to_owned(),
                attempts,
                outcome: outcome.clone(),
            });
        (outcome, answer)
    }

    /// Logs in (not a command: nothing is written), retrying while the API is down.
    async fn login(&self, email: &str, password: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut attempt = 0;
        loop {
            let url = &self.command_urls[attempt % self.command_urls.len()];
            attempt += 1;
            let answer = self
                .http
                .post(format!("{url}/v1/auth/token"))
                .timeout(Duration::from_secs(10))
                .json(&json!({"email": email, "password": password}))
                .send()
                .await;
            if let Ok(response) = answer
                && response.status().is_success()
            {
                let body: Value = response.json().await?;
                return Ok(body["access_token"].as_str().unwrap_or_default().to_owned());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{email} could not log in for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Registers a user (a command); their id and e-mail if it was acknowledged.
    async fn register(&self, name: &str) -> Option<(Uuid, String)> {
        let email = format!("{name}.{}@example.com", Uuid::now_v7().simple());
        let body = json!({"name": name, "email": email, "password": PASSWORD});
        match self
            .command(
                "register",
                Method::POST,
                "/v1/users",
                None,
                Some(&body),
                None,
            )
            .await
        {
            (Outcome::Ok { aggregate, .. }, _) => {
                self.history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .emails
                    .insert(aggregate, email.clone());
                Some((aggregate, email))
            }
            _ => None,
        }
    }
}

/// Every user's password in the run.
const PASSWORD: &str = "chaos password 1";

/// A client's own people and articles.
struct Desk {
    editor: String,
    readers: Vec<(Uuid, String)>,
    /// (article, version as last answered, published).
    articles: Vec<(Uuid, i64, bool)>,
    drafted: u64,
}

/// Runs the whole chaos run and returns its report (also written to `options.out`).
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    // Whatever an interrupted run left stopped comes back first.
    infra(&["up"])?;
    infra(&["cluster", "up"])?;
    let brokers = cluster_brokers()?;
    let app = TestApp::spawn_adjusted(newsroom::Roles::NONE, |s| {
        s.kafka.brokers = brokers.clone();
        s.kafka.replication = 3;
        s.kafka.partitions = 6;
    })
    .await?;
    let logs = std::env::temp_dir().join(format!("newsroom-{}", app.settings.kafka.topic_prefix));
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "[chaos] deployment {} on {brokers}; process logs in {}",
        app.settings.kafka.topic_prefix,
        logs.display()
    );

    let mut procs = vec![
        Proc::new("command-a", "command-api", true, &logs)?,
        Proc::new("command-b", "command-api", true, &logs)?,
        Proc::new("project-a", "project", false, &logs)?,
        Proc::new("project-b", "project", false, &logs)?,
        Proc::new("query", "query-api", true, &logs)?,
        Proc::new("recommend", "recommend", false, &logs)?,
        Proc::new("notify", "notify", false, &logs)?,
    ];
    for proc in &mut procs {
        proc.start(&app)?;
    }
    let client = Client {
        http: crate::client(),
        command_urls: vec![procs[0].url(), procs[1].url()],
        query_url: procs[4].url(),
        history: Arc::new(Mutex::new(History::default())),
    };
    for url in client.command_urls.iter().chain([&client.query_url]) {
        crate::until(
            &format!("{url} ready"),
            Duration::from_secs(120),
            || async {
                Ok(client
                    .http
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()))
            },
        )
        .await?;
    }
    let admin_email = app.settings.auth.admin_email.clone().unwrap_or_default();
    let admin = client.login(&admin_email, ADMIN_PASSWORD).await?;
    eprintln!(
        "[chaos] every process serves; admin {}; setting up {} desks",
        token_subject(&admin)?,
        options.clients
    );

    let mut desks = Vec::new();
    for c in 0..options.clients {
        let Some((editor_id, editor_email)) = client.register(&format!("editor{c}")).await else {
            anyhow::bail!("an editor could not be registered before any fault");
        };
        let (promoted, _) = client
            .command(
                "promote",
                Method::PUT,
                &format!("/v1/users/{editor_id}/role"),
                Some(&admin),
                Some(&json!({"role": "editor"})),
                None,
            )
            .await;
        anyhow::ensure!(
            matches!(promoted, Outcome::Ok { .. }),
            "promoting an editor: {promoted:?}"
        );
        let editor = client.login(&editor_email, PASSWORD).await?;
        let mut readers = Vec::new();
        for r in 0..2 {
            if let Some((id, email)) = client.register(&format!("reader{c}x{r}")).await {
                let token = client.login(&email, PASSWORD).await?;
                let categories = [["famous", "sports"], ["politics", "sports"]][r % 2];
                client
                    .command(
                        "subscribe",
                        Method::PATCH,
                        &format!("/v1/users/{id}"),
                        Some(&token),
                        Some(&json!({"followed_categories": categories, "email_notifications": true})),
                        None,
                    )
                    .await;
                readers.push((id, token));
            }
        }
        desks.push(Desk {
            editor,
            readers,
            articles: Vec::new(),
            drafted: 0,
        });
    }

    // The workload and the faults, side by side, until the duration is over.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (c, desk) in desks.into_iter().enumerate() {
        let (client, stop) = (client.clone(), stop.clone());
        workers.push(tokio::spawn(
            async move { work(c, desk, client, stop).await },
        ));
    }
    let procs = Arc::new(tokio::sync::Mutex::new(procs));
    let app = Arc::new(app);
    let broker_down = Arc::new(tokio::sync::Mutex::new(()));
    let mut injectors = Vec::new();
    for lane in 0..options.overlap.max(1) {
        let (procs, app, stop, history) = (
            procs.clone(),
            app.clone(),
            stop.clone(),
            client.history.clone(),
        );
        let (every, broker_down) = (
            options.fault_every * options.overlap.max(1) as u32,
            broker_down.clone(),
        );
        let kinds: Vec<&'static str> = KINDS
            .into_iter()
            .filter(|k| options.kinds.is_empty() || options.kinds.iter().any(|o| o == k))
            .collect();
        injectors.push(tokio::spawn(async move {
            let mut dice = Dice::new();
            // Every kind in turn, from a random start, so that a short run sees each.
            let mut turn = dice.below(kinds.len() as u64) as usize;
            // The lanes start apart.
            tokio::time::sleep(every * lane as u32 / 2 + Duration::from_secs(2)).await;
            while !stop.load(Ordering::Relaxed) {
                let kind = kinds[turn % kinds.len()];
                turn += 1;
                let began = Instant::now();
                match inject(kind, &mut dice, &procs, &app, &broker_down).await {
                    Ok(()) => history
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .faults
                        .push((kind.to_owned(), began, Instant::now())),
                    // Not counted: a fault that did not happen proves nothing.
                    Err(e) => eprintln!("[chaos] fault {kind} failed to inject: {e:#}"),
                }
                let pause = every.as_millis() as u64 / 2 + dice.below(every.as_millis() as u64 + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    // A supervisor, as a deployment has one: a process that exited by itself (a role
    // refuses to start while PostgreSQL is down, for one) is started again.
    let supervisor = {
        let (procs, app, stop) = (procs.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut procs = procs.lock().await;
                for proc in procs.iter_mut() {
                    let held = proc.down_until.is_some_and(|t| Instant::now() < t);
                    if !held && proc.exited() {
                        eprintln!("[chaos] {} exited by itself; starting it again", proc.name);
                        if let Err(e) = proc.start(&app) {
                            eprintln!("[chaos] starting {} failed: {e:#}", proc.name);
                        }
                    }
                }
            }
        })
    };
    let mut last_note = Instant::now();
    while started.elapsed() < options.duration {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if last_note.elapsed() >= Duration::from_secs(10) {
            last_note = Instant::now();
            let h = client.history.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "[chaos] {:.0} s: {} commands, {} acknowledged, {} faults",
                started.elapsed().as_secs_f64(),
                h.commands.len(),
                h.acknowledged_at.len(),
                h.faults.len()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for injector in injectors {
        injector.await?;
    }
    supervisor.await?;
    for worker in workers {
        worker.await??;
    }
    eprintln!("[chaos] workload stopped; healing everything and letting it settle");

    // Heal: every service and process up, nothing frozen.
    for service in ["postgres", "redis", "smtp"] {
        infra(&["up", service])?;
    }
    infra(&["cluster", "up"])?;
    {
        let mut procs = procs.lock().await;
        for proc in procs.iter_mut() {
            proc.signal("-CONT")?;
            proc.start(&app)?;
        }
    }
    let history = std::mem::take(&mut *client.history.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report = check(&app, &client, &admin, history).await?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &options.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    // Every process stops; a clean run's deployment goes, a failed one stays to be read.
    drop(procs);
    if !report.clean() {
        eprintln!(
            "[chaos] deployment {} (topics, database {}) kept for inspection",
            app.settings.kafka.topic_prefix, app.settings.postgres.url
        );
    } else if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await?;
    }
    Ok(report)
}

/// One client's loop: drafts, edits with If-Match, publications, follows, reads.
async fn work(
    c: usize,
    mut desk: Desk,
    client: Client,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut dice = Dice::new();
    let categories = ["famous", "politics", "sports"];
    while !stop.load(Ordering::Relaxed) {
        let roll = dice.below(100);
        match roll {
            0..=24 => {
                desk.drafted += 1;
                let body = json!({
                    "category": categories[dice.below(3) as usize],
                    // Short enough that the e-mail's subject is never folded.
                    "title": format!("chaos {c}-{}", desk.drafted),
                    "content": "Written while things fail.",
                    "tags": [format!("t{}", dice.below(7))],
                });
                if let (Outcome::Ok { aggregate, version }, _) = client
                    .command(
                        "draft",
                        Method::POST,
                        "/v1/news",
                        Some(&desk.editor),
                        Some(&body),
                        None,
                    )
                    .await
                {
                    desk.articles.push((aggregate, version, false));
                }
            }
            25..=59 if !desk.articles.is_empty() => {
                let i = dice.below(desk.articles.len() as u64) as usize;
                let (id, version, published) = desk.articles[i];
                let (what, method, path, body) = match roll {
                    25..=44 => (
                        "edit",
                        Method::PATCH,
                        format!("/v1/news/{id}"),
                        Some(json!({"content": format!("Edited {}", dice.below(1_000_000))})),
                    ),
                    _ if published => (
                        "unpublish",
                        Method::POST,
                        format!("/v1/news/{id}/unpublish"),
                        None,
                    ),
                    _ => (
                        "publish",
                        Method::POST,
                        format!("/v1/news/{id}/publish"),
                        None,
                    ),
                };
                let (outcome, answer) = client
                    .command(
                        what,
                        method,
                        &path,
                        Some(&desk.editor),
                        body.as_ref(),
                        Some(version),
                    )
                    .await;
                match outcome {
                    Outcome::Ok { version, .. } => {
                        desk.articles[i] = (id, version, answer["status"] == "published");
                    }
                    Outcome::Rejected(412) => {
                        // An earlier answer was lost: take the version the API names.
                        if let Some(actual) = answer["actual"].as_i64() {
                            desk.articles[i].1 = actual;
                        }
                    }
                    // Its fate is unknown: leave the article alone from now on.
                    Outcome::Unanswered | Outcome::Rejected(_) => {
                        desk.articles.swap_remove(i);
                    }
                }
            }
            60..=69 if !desk.readers.is_empty() => {
                let (id, token) = &desk.readers[dice.below(desk.readers.len() as u64) as usize];
                let followed: Vec<&str> = categories
                    .iter()
                    .copied()
                    .filter(|_| dice.below(2) == 0)
                    .collect();
                client
                    .command(
                        "follow",
                        Method::PATCH,
                        &format!("/v1/users/{id}"),
                        Some(token),
                        Some(&json!({"followed_categories": followed})),
                        None,
                    )
                    .await;
            }
            70..=74 => {
                client.register(&format!("walkin{c}")).await;
            }
            _ if !desk.articles.is_empty() && !desk.readers.is_empty() => {
                let (id, _, _) = desk.articles[dice.below(desk.articles.len() as u64) as usize];
                let (_, token) = &desk.readers[dice.below(desk.readers.len() as u64) as usize];
                let read = client
                    .http
                    .get(format!("{}/v1/news/{id}", client.query_url))
                    .bearer_auth(token)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if read {
                    client
                        .history
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .reads += 1;
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    Ok(())
}

/// Injects one fault of `kind` and undoes it after a random while.
async fn inject(
    kind: &str,
    dice: &mut Dice,
    procs: &tokio::sync::Mutex<Vec<Proc>>,
    app: &TestApp,
    broker_down: &tokio::sync::Mutex<()>,
) -> anyhow::Result<()> {
    let pause = |lo: u64, hi: u64, dice: &mut Dice| Duration::from_millis(lo + dice.below(hi - lo));
    match kind {
        "kill" => {
            let wait = pause(200, 2000, dice);
            let i = {
                let mut procs = procs.lock().await;
                let i = dice.below(procs.len() as u64) as usize;
                eprintln!("[chaos] kill -9 {}", procs[i].name);
                procs[i].kill();
                procs[i].down_until = Some(Instant::now() + wait);
                i
            };
            tokio::time::sleep(wait).await;
            procs.lock().await[i].start(app)?;
        }
        "freeze" => {
            let wait = pause(1000, 8000, dice);
            let i = {
                let procs = procs.lock().await;
                let i = dice.below(procs.len() as u64) as usize;
                eprintln!("[chaos] SIGSTOP {} for {wait:?}", procs[i].name);
                procs[i].signal("-STOP")?;
                i
            };
            tokio::time::sleep(wait).await;
            procs.lock().await[i].signal("-CONT")?;
        }
        "broker" => {
            let _one_at_a_time = broker_down.lock().await;
            let node = (1 + dice.below(3)).to_string();
            let wait = pause(2000, 8000, dice);
            eprintln!("[chaos] kill -9 of broker {node} for {wait:?}");
            infra(&["cluster", "kill", &node])?;
            tokio::time::sleep(wait).await;
            tokio::task::block_in_place(|| infra(&["cluster", "start", &node]))?;
        }
        service => {
            let wait = pause(1000, 5000, dice);
            eprintln!("[chaos] {service} down for {wait:?}");
            tokio::task::block_in_place(|| infra(&["down", service]))?;
            tokio::time::sleep(wait).await;
            tokio::task::block_in_place(|| infra(&["up", service]))?;
        }
    }
    Ok(())
}

/// The bootstrap servers of the local three-node cluster (`infra/local.sh cluster brokers`).
pub fn cluster_brokers() -> anyhow::Result<String> {
    let output = Command::new("bash")
        .arg(crate::infra_script())
        .args(["cluster", "brokers"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "infra/local.sh cluster brokers failed"
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// (aggregate, version, correlation id) of every user and news event in the log.
async fn events_in_log(app: &TestApp) -> anyhow::Result<Vec<(Uuid, i64, String)>> {
    let registry = Registry::connect(&app.settings.registry).await?;
    let mut events = Vec::new();
    for stream in [Stream::Users, Stream::News] {
        for record in app.committed_records(stream)? {
            let decoded = codec::decode(&registry, &record.payload).await?;
            let meta = match stream {
                Stream::News => NewsEvent::from_avro(&decoded.name, decoded.value)?
                    .metadata()
                    .clone(),
                _ => UserEvent::from_avro(&decoded.name, decoded.value)?
                    .metadata()
                    .clone(),
            };
            events.push((
                meta.aggregate_id,
                meta.aggregate_version,
                meta.correlation_id,
            ));
        }
    }
    Ok(events)
}

/// The checker: the log against the answers, the read models against fresh builds, the
/// inbox against the e-mails.
async fn check(
    app: &TestApp,
    client: &Client,
    admin: &str,
    history: History,
) -> anyhow::Result<Report> {
    let admin_id = token_subject(admin)?;
    let mut report = Report {
        commands: history.commands.len() as u64,
        attempts: history.attempts,
        failed_attempts: history.failed_attempts,
        reads: history.reads,
        ..Report::default()
    };
    for (kind, _, _) in &history.faults {
        *report.faults.entry(kind.clone()).or_default() += 1;
    }
    // Unavailability: the longest stretch without an acknowledgement overlapping a fault.
    let mut acknowledged = history.acknowledged_at.clone();
    acknowledged.sort();
    for (kind, began, ended) in &history.faults {
        let longest = acknowledged
            .windows(2)
            .filter(|w| w[1] >= *began && w[0] <= *ended)
            .map(|w| w[1].duration_since(w[0]).as_millis() as u64)
            .max()
            .unwrap_or(0);
        let entry = report
            .longest_unavailability_ms
            .entry(kind.clone())
            .or_default();
        *entry = (*entry).max(longest);
    }

    // First every read model the query API serves must include every acknowledged write:
    // the query API waits for the merged consistency token (a stalled consumer would
    // otherwise pass verify, which compares at its own offsets).
    let token = history.written.to_string();
    let converged_by = Instant::now() + Duration::from_secs(180);
    'converging: loop {
        let mut behind = None;
        for path in [
            // One filter: the cache model in Redis; two: the news model in PostgreSQL.
            "/v1/news?limit=1".to_owned(),
            "/v1/news?category=sports&tag=chaos&limit=1".to_owned(),
            "/v1/news/trending?limit=1".to_owned(),
            format!("/v1/users/{admin_id}"),
            format!("/v1/users/{admin_id}/notifications?limit=1"),
            format!("/v1/users/{admin_id}/recommendations?limit=1"),
        ] {
            let answer = client
                .http
                .get(format!("{}{path}", client.query_url))
                .bearer_auth(admin)
                .header("x-consistency-token", &token)
                .header("x-consistency-timeout-ms", "30000")
                .timeout(Duration::from_secs(40))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => behind = Some(format!("{path}: {}", r.status())),
                Err(e) => behind = Some(format!("{path}: {e}")),
            }
        }
        match behind {
            None => {
                report.converged = true;
                break 'converging;
            }
            Some(why) if Instant::now() >= converged_by => {
                report.problem(format!("the read models never included every write: {why}"));
                break 'converging;
            }
            Some(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }

    // Then the consumers' side effects: the outbox drained, no dead letters.
    let pool = app.pool().await?;
    let (dead,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await?;
    report.dead_letters = dead as u64;
    // However long the outbox takes to drain (a long run leaves hundreds of thousands of
    // e-mails), as long as it keeps draining: it fails when nothing was sent for 180 s.
    let (mut least, mut progressed) = (i64::MAX, Instant::now());
    loop {
        let pending: Result<(i64,), _> =
            sqlx::query_as("SELECT count(*) FROM email_outbox WHERE sent_at IS NULL")
                .fetch_one(&pool)
                .await;
        if let Ok((n,)) = pending
            && n < least
        {
            (least, progressed) = (n, Instant::now());
        }
        if matches!(pending, Ok((0,))) || progressed.elapsed() >= Duration::from_secs(180) {
            report.outbox_pending = pending.map_or(u64::MAX, |(n,)| n as u64);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let events = events_in_log(app).await?;
    report.events = events.len() as u64;

    // Versions: 1..=n per aggregate, no repeat, no gap.
    let mut versions: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut by_correlation: HashMap<&str, Vec<(Uuid, i64)>> = HashMap::new();
    for (aggregate, version, correlation) in &events {
        versions.entry(*aggregate).or_default().push(*version);
        by_correlation
            .entry(correlation)
            .or_default()
            .push((*aggregate, *version));
    }
    for (aggregate, list) in &mut versions {
        list.sort_unstable();
        let distinct: HashSet<i64> = list.iter().copied().collect();
        let repeated = (list.len() - distinct.len()) as u64;
        let top = list.last().copied().unwrap_or(0);
        let missing = (1..=top).filter(|v| !distinct.contains(v)).count() as u64;
        if repeated > 0 || missing > 0 {
            report.doubled += repeated;
            report.gaps += missing;
            report.problem(format!("aggregate {aggregate}: versions {list:?}"));
        }
    }
    // Every event is some recorded attempt's (the bootstrap admin's own aggregate aside),
    // and none is an attempt's that was answered "nothing was written".
    let attempts: HashMap<&str, &Attempt> = history
        .commands
        .iter()
        .flat_map(|c| c.attempts.iter().map(|a| (a.request_id.as_str(), a)))
        .collect();
    for (aggregate, version, correlation) in &events {
        match attempts.get(correlation.as_str()) {
            Some(attempt) if attempt.refused => {
                report.written_after_refusal += 1;
                report.problem(format!(
                    "{aggregate} v{version} written by a request answered \"nothing was written\""
                ));
            }
            Some(_) => {}
            None if *aggregate == admin_id => {}
            None => {
                report.unexplained_events += 1;
                report.problem(format!("{aggregate} v{version}: no request wrote it"));
            }
        }
    }
    // Each command against its answer.
    for command in &history.commands {
        let written: Vec<(Uuid, i64)> = command
            .attempts
            .iter()
            .flat_map(|a| {
                by_correlation
                    .get(a.request_id.as_str())
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        match &command.outcome {
            Outcome::Ok { aggregate, version } => {
                report.acknowledged += 1;
                if written.len() > 1 {
                    report.doubled += 1;
                    report.problem(format!(
                        "{} acknowledged, written {} times: {written:?}",
                        command.what,
                        written.len()
                    ));
                } else if written.first() != Some(&(*aggregate, *version)) {
                    report.lost += 1;
                    report.problem(format!(
                        "{} acknowledged as {aggregate} v{version}, the log has {written:?}",
                        command.what
                    ));
                }
            }
            Outcome::Rejected(status) => {
                report.rejected += 1;
                if !written.is_empty() {
                    report.written_by_rejected += 1;
                    report.problem(format!(
                        "{} answered {status}, written: {written:?}",
                        command.what
                    ));
                }
            }
            Outcome::Unanswered => {
                report.unanswered += 1;
                if written.len() > 1 {
                    report.doubled += 1;
                    report.problem(format!(
                        "{} unanswered, written {} times",
                        command.what,
                        written.len()
                    ));
                }
            }
        }
    }

    // Read models: each equals a fresh build at the live offsets.
    for model in newsroom::PROJECTIONS {
        let mut differences = None;
        for _ in 0..3 {
            let output = tokio::task::spawn_blocking({
                let mut command = app.newsroom("chaos-verify")?;
                command.args(["verify", model, "--quiet"]);
                move || command.output()
            })
            .await??;
            let said = String::from_utf8_lossy(&output.stdout).into_owned();
            if let Some(count) = said
                .lines()
                .last()
                .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" differences")))
                .and_then(|n| n.parse::<u64>().ok())
            {
                if count > 0 {
                    for line in said.lines().take(5) {
                        report.problem(format!("verify {model}: {line}"));
                    }
                }
                differences = Some(count);
                break;
            }
            // Verify itself failed (the hold was outlasted, a store hiccup): again.
            eprintln!(
                "[chaos] verify {model} failed; again: {}",
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let count = differences.with_context(|| format!("verify {model} never finished"))?;
        report
            .read_model_differences
            .insert(model.to_owned(), count);
    }

    // Inbox and e-mail: every inbox entry of a subscriber has exactly one e-mail.
    let inbox: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT i.user_id, i.title, i.category FROM notify_inbox i")
            .fetch_all(&pool)
            .await?;
    // (recipient, subject) -> Message-ID -> deliveries.
    let mut sent: HashMap<(String, String), HashMap<String, u64>> = HashMap::new();
    for mail in crate::mails()? {
        for to in &mail.to {
            *sent
                .entry((to.to_ascii_lowercase(), mail.subject.clone()))
                .or_default()
                .entry(mail.message_id.clone())
                .or_default() += 1;
        }
    }
    for (user, title, category) in &inbox {
        let Some(email) = history.emails.get(user) else {
            continue;
        };
        let subject = format!("New in {category}: {title}");
        let delivered = sent.get(&(email.to_ascii_lowercase(), subject.clone()));
        let messages = delivered.map_or(0, HashMap::len);
        let deliveries: u64 = delivered.map_or(0, |d| d.values().sum());
        if messages != 1 {
            report.emails_not_once += 1;
            report.problem(format!(
                "{email}: {messages} distinct e-mails for \"{subject}\""
            ));
        }
        report.email_redeliveries += deliveries.saturating_sub(messages as u64);
    }
    pool.close().await;
    Ok(report)
}
