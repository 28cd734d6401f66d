//! `bench`: drives a newsroom deployment of its own (fresh topics and database, every role
//! in this process, real Kafka, registry, PostgreSQL and Redis) over HTTP and reports
//! commands, visibility lag, projection and replay rates and queries, each beside the raw
//! part it is built on, measured in the same run on the same machine.
#![forbid(unsafe_code)]

mod baseline;
mod load;
mod peer;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use load::Stats;
use newsroom::{Roles, Running};
use newsroom_infra::Settings;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// mimalloc instead of the system allocator: glibc's malloc and free were a third of the
/// query API's CPU when it answers lists (per-thread arenas, consolidation; ADR 20).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// newsroom's benchmark: throughput, latency and lag, side by side with the raw parts.
///
/// Needs the local infrastructure (`infra/local.sh up`); creates topics and a database of
/// its own and drops the database at the end.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Args {
    /// A smoke run: short phases and a small backlog (finishes within two minutes).
    #[arg(long)]
    quick: bool,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events in the backlog the projection and the replay are measured on.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// Commands per second while the visibility lag is measured.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench-results.json")]
    out: std::path::PathBuf,
    /// Run only these phases (comma-separated; default: all, and without `--quick` the
    /// peer too). `lag` and `queries` create and publish the articles they need; handy
    /// under a profiler.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
    /// The peer (a PostgreSQL event store) the `peer` phase compares with.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/peers/cqrs-es-news"))]
    peer_dir: std::path::PathBuf,
    /// Seconds of commands on a throwaway deployment before anything is measured: the
    /// broker's JVM compiles its hot paths for a minute or so after it starts, and a cold
    /// broker halves the command figures (0 with `--quick`).
    #[arg(long, default_value_t = 30)]
    warmup: u64,
    /// Where the peer is built (out of its read-only tree).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/peer"))]
    peer_target: std::path::PathBuf,
    #[command(flatten)]
    settings: Settings,
}

/// The target of each news command.
const COMMAND_TARGET: &str = ">= 10,000/s, p99 <= 25 ms";

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// The peer's load generator against the peer, newsroom with every role, and the
    /// command API alone, interleaved (builds the peer first; not part of `--quick`).
    Peer,
    /// Register, create, edit, publish.
    Commands,
    /// Command → query visibility lag.
    Lag,
    /// GET article, list, recommendations and their baselines.
    Queries,
    /// Produce, project and replay a backlog, with the produce and INSERT baselines.
    Backlog,
    /// Readers' latency while one client floods logins with wrong passwords, on a
    /// deployment with the product's limits.
    Flood,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    stats: Option<Stats>,
    baseline: Option<String>,
    ratio: Option<f64>,
    target: Option<String>,
}

impl Figure {
    fn rate(name: &str, stats: &Stats, target: Option<&str>) -> Figure {
        Figure {
            name: name.to_owned(),
            value: stats.per_second,
            unit: "/s",
            stats: Some(stats.clone()),
            baseline: None,
            ratio: None,
            target: target.map(str::to_owned),
        }
    }

    fn against(mut self, baseline: &Figure) -> Figure {
        self.baseline = Some(baseline.name.clone());
        self.ratio = Some(self.value / baseline.value.max(1e-9));
        self
    }
}

/// A deployment of every role on fresh topics and a fresh database.
struct Deployment {
    settings: Settings,
    running: Option<Running>,
    command: String,
    query: String,
    database: String,
    admin_url: String,
}

const ADMIN_PASSWORD: &str = "bench admin password";

impl Deployment {
    async fn start(base: &Settings, roles: Roles) -> anyhow::Result<Deployment> {
        Self::start_with(base, roles, |_| {}).await
    }

    /// Starts `roles` with the bench's settings as `adjust` leaves them.
    async fn start_with(
        base: &Settings,
        roles: Roles,
        adjust: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Deployment> {
        let id = Uuid::now_v7().simple().to_string();
        let mut settings = base.clone();
        settings.kafka.topic_prefix = format!("bench_{id}");
        settings.kafka.instance_id = format!("bench-{id}");
        settings.http.command_addr = "127.0.0.1:0".parse()?;
        settings.http.query_addr = "127.0.0.1:0".parse()?;
        settings.http.console_addr = "127.0.0.1:0".parse()?;
        // The load generators register from one address, far above what a person does.
        settings.http.credential_changes_per_address = 0;
        // And every request too (one address, one token for thousands a second).
        settings.http.requests_per_second_per_client = 0;
        settings.auth.local = true;
        settings.auth.admin_email = Some(format!("admin.{id}@bench.local"));
        settings.auth.admin_password = Some(ADMIN_PASSWORD.into());
        adjust(&mut settings);
        let admin_url = settings.postgres.url.clone();
        let database = format!("bench_{id}");
        settings.postgres.url = newsroom_infra::db::create_database(&admin_url, &database).await?;
        let running = newsroom::start(&settings, roles).await?;
        let url =
            |a: Option<std::net::SocketAddr>| a.map(|a| format!("http://{a}")).unwrap_or_default();
        // Ready means the command API owns its partitions and the query API its stores.
        let http = reqwest::Client::new();
        for base in [url(running.command_addr), url(running.query_addr)] {
            if base.is_empty() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while !http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                anyhow::ensure!(Instant::now() < deadline, "{base} never became ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(Deployment {
            command: url(running.command_addr),
            query: url(running.query_addr),
            running: Some(running),
            settings,
            database,
            admin_url,
        })
    }

    /// Stops the roles and removes what the run created: database, Redis keys, topics.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.stop().await?;
        }
        baseline::remove_keys(
            &self.settings,
            &format!("{}:*", self.settings.kafka.topic_prefix),
        )
        .await?;
        baseline::delete_topics(&self.settings).await?;
        newsroom_infra::db::drop_database(&self.admin_url, &self.database).await?;
        Ok(())
    }

    /// Logs in; the first admin is created in the background once the command API owns
    /// its partitions, so a 401 is retried for a while.
    async fn token(
        &self,
        http: &reqwest::Client,
        email: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = http
                .post(format!("{}/v1/auth/token", self.command))
                .json(&json!({"email": email, "password": password}))
                .send()
                .await?;
            if response.status() == StatusCode::UNAUTHORIZED && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let answer: Value = response.error_for_status()?.json().await?;
            return Ok(answer["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned());
        }
    }
}

fn client(clients: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?)
}

/// Succeeds on the expected status.
async fn expect(
    response: reqwest::Response,
    status: StatusCode,
) -> anyhow::Result<reqwest::Response> {
    anyhow::ensure!(
        response.status() == status,
        "{} instead of {status}",
        response.status()
    );
    Ok(response)
}

/// Sends `request`, expects 200 and reads the whole body.
async fn read_ok(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    expect(request.send().await?, StatusCode::OK)
        .await?
        .bytes()
        .await?;
    Ok(())
}

fn article(i: usize) -> Value {
    let category = ["famous", "politics", "sports"][i % 3];
    json!({
        "category": category,
        "title": format!("Benchmark article {i}"),
        "content": "A short body of text, about the size of a news teaser, for the benchmark. ".repeat(4),
        "tags": ["bench", format!("t{}", i % 11)],
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // The figures go to stdout and the progress to stderr; logs only when asked for.
    if std::env::var_os("NEWSROOM_LOG").is_some() {
        newsroom_infra::telemetry::init();
    }
    if args.quick {
        args.seconds = args.seconds.min(3);
        args.backlog = args.backlog.min(20_000);
        args.rate = args.rate.min(500);
        args.clients = args.clients.min(32);
    }
    let phase = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut figures: Vec<Figure> = Vec::new();
    let http = client(args.clients)?;
    let wants = |phase: Phase| {
        args.only.contains(&phase)
            || (args.only.is_empty() && !(args.quick && phase == Phase::Peer))
    };
    let mut create_stats = None;

    if args.warmup > 0
        && !args.quick
        && [Phase::Peer, Phase::Commands, Phase::Lag]
            .into_iter()
            .any(wants)
    {
        warm_up(&args, &http).await?;
    }
    if wants(Phase::Peer) {
        figures.extend(against_peer(&args).await?);
    }

    if wants(Phase::Commands) || wants(Phase::Lag) || wants(Phase::Queries) {
        eprintln!("bench: starting a deployment (all roles in this process)");
        let system = Deployment::start(&args.settings, Roles::ALL).await?;
        let admin_email = system.settings.auth.admin_email.clone().unwrap_or_default();
        let admin = Arc::new(system.token(&http, &admin_email, ADMIN_PASSWORD).await?);
        let run = Uuid::now_v7().simple().to_string();

        // 1. Commands.
        let hashing = &system.settings.hashing;
        if wants(Phase::Commands) {
            let register = {
                let (http, url, run) = (http.clone(), system.command.clone(), run.clone());
                load::closed(args.clients.min(16), phase, None, move |i| {
            let request = http.post(format!("{url}/v1/users")).json(&json!({
                "name": format!("User {i}"), "email": format!("u{i}.{run}@bench.local"), "password": "correct horse battery"}));
            async move { expect(request.send().await?, StatusCode::CREATED).await.map(|_| ()) }
        })
        .await
            };
            let register_name = format!(
                "register user (Argon2id {} KiB, t={}, p={})",
                hashing.memory_kib, hashing.iterations, hashing.parallelism
            );
            figures.push(Figure::rate(
                &register_name,
                &register,
                Some("bounded by hashing"),
            ));
            eprintln!("bench: {register_name}: {:.0}/s", register.per_second);
        }

        let ids = Arc::new(Mutex::new(Vec::<Uuid>::new()));
        let create = {
            let (http, url, admin, ids) = (
                http.clone(),
                system.command.clone(),
                admin.clone(),
                ids.clone(),
            );
            load::closed(args.clients, phase, None, move |i| {
                let request = http
                    .post(format!("{url}/v1/news"))
                    .bearer_auth(admin.as_str())
                    .json(&article(i));
                let ids = ids.clone();
                async move {
                    let created: Value = expect(request.send().await?, StatusCode::CREATED)
                        .await?
                        .json()
                        .await?;
                    let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
                    ids.lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(id);
                    Ok(())
                }
            })
            .await
        };
        if wants(Phase::Commands) {
            figures.push(Figure::rate("create news", &create, Some(COMMAND_TARGET)));
        }
        eprintln!("bench: create news: {:.0}/s", create.per_second);
        let ids: Arc<Vec<Uuid>> =
            Arc::new(ids.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone());
        anyhow::ensure!(
            !ids.is_empty(),
            "no article was created ({} errors): is the command API healthy?",
            create.errors
        );

        if wants(Phase::Commands) {
            let edit = {
                let (http, url, admin, ids) = (
                    http.clone(),
                    system.command.clone(),
                    admin.clone(),
                    ids.clone(),
                );
                load::closed(args.clients, phase, Some(ids.len()), move |i| {
                    let request = http
                        .patch(format!("{url}/v1/news/{}", ids[i]))
                        .bearer_auth(admin.as_str())
                        .json(&json!({"title": format!("Benchmark article {i}, edited")}));
                    async move {
                        expect(request.send().await?, StatusCode::OK)
                            .await
                            .map(|_| ())
                    }
                })
                .await
            };
            figures.push(Figure::rate("edit news", &edit, Some(COMMAND_TARGET)));
            eprintln!("bench: edit {:.0}/s", edit.per_second);
        }
        let publish = {
            let (http, url, admin, ids) = (
                http.clone(),
                system.command.clone(),
                admin.clone(),
                ids.clone(),
            );
            load::closed(args.clients, phase, Some(ids.len()), move |i| {
                let request = http
                    .post(format!("{url}/v1/news/{}/publish", ids[i]))
                    .bearer_auth(admin.as_str());
                async move {
                    expect(request.send().await?, StatusCode::OK)
                        .await
                        .map(|_| ())
                }
            })
            .await
        };
        if wants(Phase::Commands) {
            figures.push(Figure::rate("publish news", &publish, Some(COMMAND_TARGET)));
        }
        eprintln!("bench: publish {:.0}/s", publish.per_second);
        let published = (publish.ok as usize).min(ids.len());
        anyhow::ensure!(
            published > 0,
            "no article was published ({} errors)",
            publish.errors
        );

        // 2. Visibility lag at a fixed command rate: from the command's 2xx to the query API
        // answering with the write (a GET that names the command's consistency token). At the
        // target rate, and at half the create rate just measured (a rate this deployment
        // sustains: above its capacity the lag measures queues, not the pipeline), that one
        // first so that the queues of the other do not spill into it.
        let sustainable = ((create.per_second / 2.0) as u32).max(1);
        for rate in [sustainable, args.rate]
            .into_iter()
            .filter(|_| wants(Phase::Lag))
        {
            settle(Duration::from_secs(120)).await;
            let lag = visibility_lag(&http, &system, &admin, rate, phase).await;
            figures.push(Figure {
                name: format!("visibility lag at {rate} commands/s (p99)"),
                value: lag.p99_ms,
                unit: "ms",
                stats: Some(lag.clone()),
                baseline: None,
                ratio: None,
                target: Some("p99 <= 50 ms at 5,000/s".into()),
            });
            eprintln!(
                "bench: visibility lag at {rate}/s: p50 {:.1} ms p99 {:.1} ms",
                lag.p50_ms, lag.p99_ms
            );
        }

        // 5. Queries, beside a bare actix-web handler and Redis itself.
        if wants(Phase::Queries) {
            settle(Duration::from_secs(120)).await;
            let sample: Value = http
                .get(format!("{}/v1/news/{}", system.query, ids[0]))
                .send()
                .await?
                .json()
                .await?;
            let bare = baseline::bare_actix(sample.to_string()).await?;
            let bare_stats = {
                let (http, url) = (http.clone(), bare.url.clone());
                load::closed(args.clients, phase, None, move |_| {
                    let request = http.get(format!("{url}/article"));
                    read_ok(request)
                })
                .await
            };
            let bare_figure = Figure::rate(
                "baseline: bare actix-web handler (same JSON)",
                &bare_stats,
                None,
            );
            bare.stop().await;
            let get_article = {
                let (http, url, ids) = (http.clone(), system.query.clone(), ids.clone());
                load::closed(args.clients, phase, None, move |i| {
                    let request = http.get(format!("{url}/v1/news/{}", ids[i % published.max(1)]));
                    read_ok(request)
                })
                .await
            };
            let redis_stats = baseline::redis_hgetall(
                &system.settings,
                &ids[..published.max(1)],
                args.clients,
                phase,
            )
            .await?;
            let redis_figure = Figure::rate(
                "baseline: Redis HGETALL of the cached article",
                &redis_stats,
                None,
            );
            figures.push(
                Figure::rate(
                    "GET /v1/news/{id} (Redis)",
                    &get_article,
                    Some(">= 30,000/s, p99 <= 5 ms, >= 3/4 of baseline (issue 12)"),
                )
                .against(&bare_figure),
            );
            figures.push(bare_figure.clone());
            figures.push(redis_figure);
            // Lists: each of one filter (or none) from the cache model's indexes in Redis;
            // two filters from PostgreSQL, for reference.
            let author = subject(&admin)?;
            let mut second_pages = Vec::new();
            for category in ["famous", "politics", "sports"] {
                let first: Value = http
                    .get(format!(
                        "{}/v1/news?category={category}&limit=20",
                        system.query
                    ))
                    .send()
                    .await?
                    .json()
                    .await?;
                if let Some(cursor) = first["next_cursor"].as_str() {
                    second_pages.push(format!("category={category}&limit=20&cursor={cursor}"));
                }
            }
            let paged = !second_pages.is_empty();
            let second_pages = Arc::new(second_pages);
            type Query = Arc<dyn Fn(usize) -> String + Send + Sync>;
            let lists: [(&str, Query); 5] = [
                (
                    "GET /v1/news?category= (Redis)",
                    Arc::new(|i| {
                        let category = ["famous", "politics", "sports"][i % 3];
                        format!("category={category}&limit=20")
                    }),
                ),
                (
                    "GET /v1/news?category=&cursor= (Redis, second page)",
                    Arc::new(move |i| {
                        second_pages
                            .get(i % second_pages.len().max(1))
                            .cloned()
                            .unwrap_or_default()
                    }),
                ),
                (
                    "GET /v1/news?tag= (Redis)",
                    Arc::new(|i| format!("tag=t{}&limit=20", i % 11)),
                ),
                (
                    "GET /v1/news?author_id= (Redis)",
                    Arc::new(move |_| format!("author_id={author}&limit=20")),
                ),
                (
                    "reference: GET /v1/news?category=&tag= (PostgreSQL, two filters)",
                    Arc::new(|i| {
                        let category = ["famous", "politics", "sports"][i % 3];
                        format!("category={category}&tag=bench&limit=20")
                    }),
                ),
            ];
            let mut list_rates = Vec::new();
            for (name, query) in lists {
                if name.contains("second page") && !paged {
                    // Too few articles for a second page.
                    continue;
                }
                let (http, url) = (http.clone(), system.query.clone());
                let stats = load::closed(args.clients, phase, None, move |i| {
                    read_ok(http.get(format!("{url}/v1/news?{}", query(i))))
                })
                .await;
                list_rates.push(stats.per_second);
                let target =
                    (!name.starts_with("reference")).then_some(">= 10,000/s, p99 <= 10 ms");
                figures.push(Figure::rate(name, &stats, target).against(&bare_figure));
            }
            let list = list_rates[0];
            // A reader with history, for recommendations: 50 reads over 12 tags.
            let reader_email = format!("reader.{run}@bench.local");
            expect(
        http.post(format!("{}/v1/users", system.command))
            .json(&json!({"name": "Reader", "email": reader_email, "password": "correct horse battery"}))
            .send()
            .await?,
        StatusCode::CREATED,
    )
    .await?;
            let reader = Arc::new(
                system
                    .token(&http, &reader_email, "correct horse battery")
                    .await?,
            );
            let reader_id = subject(&reader)?;
            for id in ids.iter().take(50.min(published)) {
                http.get(format!("{}/v1/news/{id}", system.query))
                    .bearer_auth(reader.as_str())
                    .send()
                    .await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let fallbacks = || {
                newsroom_infra::metrics::QUERY_ANSWERS
                    .with_label_values(&["recommendations", "postgres"])
                    .get()
            };
            let fallbacks_before = fallbacks();
            let recommendations = {
                let (http, url, reader) = (http.clone(), system.query.clone(), reader.clone());
                load::closed(args.clients, phase, None, move |_| {
                    let request = http
                        .get(format!(
                            "{url}/v1/users/{reader_id}/recommendations?limit=20"
                        ))
                        .bearer_auth(reader.as_str());
                    read_ok(request)
                })
                .await
            };
            figures.push(Figure::rate(
                "GET /v1/users/{id}/recommendations (Redis)",
                &recommendations,
                Some(">= 5,000/s, p99 <= 20 ms, answered by Redis"),
            ));
            figures.push(Figure {
                name: "recommendations answered by PostgreSQL (fallbacks) under that load".into(),
                value: (fallbacks() - fallbacks_before) as f64,
                unit: "",
                stats: None,
                baseline: None,
                ratio: None,
                target: Some("0".into()),
            });
            // As many at once as the query API ranks at once (one per core).
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            let ranked =
                baseline::recommendations_ranked(&system.settings, reader_id, cores, phase).await?;
            figures.push(Figure::rate(
                "recommendations ranked on every request (in process, no HTTP, none kept, one per core)",
                &ranked,
                None,
            ));
            // Trending, over the reads just made (computed at most once a second per
            // process and list; ADR 28).
            let trending = {
                let (http, url) = (http.clone(), system.query.clone());
                load::closed(args.clients, phase, None, move |i| {
                    let query = ["", "?category=sports", "?category=politics"][i % 3];
                    read_ok(http.get(format!("{url}/v1/news/trending{query}")))
                })
                .await
            };
            figures.push(
                Figure::rate(
                    "GET /v1/news/trending (Redis)",
                    &trending,
                    Some(">= 10,000/s, p99 <= 10 ms"),
                )
                .against(&bare_figure),
            );
            eprintln!(
                "bench: GET article {:.0}/s, list {:.0}/s, recommendations {:.0}/s (ranked each time {:.0}/s), trending {:.0}/s, bare {:.0}/s, Redis {:.0}/s",
                get_article.per_second,
                list,
                recommendations.per_second,
                ranked.per_second,
                trending.per_second,
                bare_stats.per_second,
                redis_stats.per_second
            );
        }
        system.stop().await?;
        create_stats = Some(create);
    }

    if wants(Phase::Flood) {
        figures.extend(login_flood(&args, &http, phase).await?);
    }

    if wants(Phase::Backlog) {
        // 3, 4 and 6: a backlog produced with rdkafka transactions (the raw produce baseline),
        // projected and replayed; PostgreSQL batched inserts of the same rows beside them.
        eprintln!("bench: producing a backlog of {} events", args.backlog);
        let backlog = Deployment::start(&args.settings, Roles::NONE).await?;
        let produced = baseline::produce_backlog(&backlog.settings, args.backlog).await?;
        let produce_figure = Figure {
            name: "baseline: transactional produce of the same Avro events (rdkafka)".into(),
            value: produced.per_second,
            unit: "/s",
            stats: None,
            baseline: None,
            ratio: None,
            target: None,
        };
        if let Some(create) = &create_stats {
            figures.push(
                Figure::rate("create news", create, None)
                    .against(&produce_figure)
                    .renamed("create news vs raw produce"),
            );
        }
        figures.push(produce_figure);
        let projection = baseline::project_backlog(&backlog.settings, args.backlog).await?;
        let insert =
            baseline::postgres_inserts(&backlog.settings, args.backlog.min(200_000)).await?;
        let insert_figure = Figure {
            name: "baseline: batched INSERT of the same rows (PostgreSQL)".into(),
            value: insert,
            unit: "rows/s",
            stats: None,
            baseline: None,
            ratio: None,
            target: None,
        };
        let redis_writes =
            baseline::redis_writes(&backlog.settings, args.backlog.min(200_000)).await?;
        let redis_figure = Figure {
            name: format!(
                "baseline: pipelined HSET + SADD of articles of the same shape (Redis, MULTI/EXEC of 1,000, {} writers)",
                baseline::REDIS_WRITERS
            ),
            value: redis_writes,
            unit: "articles/s",
            stats: None,
            baseline: None,
            ratio: None,
            target: None,
        };
        for (name, rate) in &projection {
            let raw = if name.contains("Redis") {
                &redis_figure
            } else {
                &insert_figure
            };
            figures.push(
                Figure {
                    name: format!("projection {name} on a backlog of {}", args.backlog),
                    value: *rate,
                    unit: "events/s",
                    stats: None,
                    baseline: None,
                    ratio: None,
                    target: Some(">= 100,000/s (issue 12)".into()),
                }
                .against(raw),
            );
        }
        figures.push(insert_figure);
        figures.push(redis_figure);
        for name in ["news", "cache"] {
            let report = newsroom::replay(&backlog.settings, name, true).await?;
            figures.push(Figure {
                name: format!(
                    "replay {name}: {} events in {:.1} s",
                    report.events,
                    report.elapsed.as_secs_f64()
                ),
                value: report.rate(),
                unit: "events/s",
                stats: None,
                baseline: None,
                ratio: None,
                target: Some(">= 200,000/s (issue 12)".into()),
            });
        }
        backlog.stop().await?;
    }

    print_table(&figures);
    let report = json!({
        "machine": baseline::machine(),
        "started_at": chrono::Utc::now().to_rfc3339(),
        "quick": args.quick,
        "clients": args.clients,
        "seconds_per_phase": args.seconds,
        "backlog": args.backlog,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "figures": figures,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "bench: done in {:.0} s; report in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Runs commands on a deployment of the command API alone for `--warmup` seconds, and
/// throws it away.
async fn warm_up(args: &Args, http: &reqwest::Client) -> anyhow::Result<()> {
    eprintln!("bench: warming up Kafka for {} s", args.warmup);
    let roles = Roles {
        command_api: true,
        ..Roles::NONE
    };
    let system = Deployment::start(&args.settings, roles).await?;
    let admin_email = system.settings.auth.admin_email.clone().unwrap_or_default();
    let admin = Arc::new(system.token(http, &admin_email, ADMIN_PASSWORD).await?);
    let (client, url) = (http.clone(), system.command.clone());
    let warm = load::closed(
        args.clients,
        Duration::from_secs(args.warmup),
        None,
        move |i| {
            let request = client
                .post(format!("{url}/v1/news"))
                .bearer_auth(admin.as_str())
                .json(&article(i));
            async move {
                expect(request.send().await?, StatusCode::CREATED)
                    .await
                    .map(|_| ())
            }
        },
    )
    .await;
    eprintln!("bench: warm-up: {:.0} commands/s", warm.per_second);
    system.stop().await
}

/// The peer's load generator, 64 clients, against the peer, newsroom with every role, and
/// newsroom's command API alone: create-news and create-and-publish, each scenario run on
/// the peer right before newsroom.
async fn against_peer(args: &Args) -> anyhow::Result<Vec<Figure>> {
    const TARGET: &str = ">= 5x the peer, p99 <= 25 ms, 0 errors";
    let tools = peer::build(&args.peer_dir, &args.peer_target).await?;
    let http = client(args.clients)?;
    let scenarios = ["create-news", "create-and-publish"];
    let mut figures = Vec::new();
    let mut peer_figures = Vec::new();
    let figure = |name: String, m: &peer::Measured, target: Option<&str>| Figure {
        name,
        value: m.rps,
        unit: "/s",
        stats: Some(Stats {
            ok: m.requests.saturating_sub(m.errors),
            errors: m.errors,
            per_second: m.rps,
            p50_ms: m.p50_ms,
            p90_ms: 0.0,
            p99_ms: m.p99_ms,
            max_ms: m.max_ms,
        }),
        baseline: None,
        ratio: None,
        target: target.map(str::to_owned),
    };
    for (roles, label) in [
        (Roles::ALL, "every role"),
        (
            Roles {
                command_api: true,
                ..Roles::NONE
            },
            "command API alone",
        ),
    ] {
        eprintln!("bench: peer comparison, newsroom with {label}");
        let system = Deployment::start(&args.settings, roles).await?;
        let admin_email = system.settings.auth.admin_email.clone().unwrap_or_default();
        let admin = system.token(&http, &admin_email, ADMIN_PASSWORD).await?;
        for (i, scenario) in scenarios.iter().enumerate() {
            let baseline = if roles == Roles::ALL {
                let database = format!("bench_peer_{}", Uuid::now_v7().simple());
                let running = peer::Peer::start(&tools, &system.admin_url, &database).await?;
                let measured = peer::load(
                    &tools,
                    &running.url,
                    scenario,
                    args.clients,
                    args.seconds,
                    None,
                )
                .await;
                running.stop().await?;
                let measured = measured?;
                eprintln!(
                    "bench: peer {scenario}: {:.0}/s, p99 {:.1} ms, {} errors",
                    measured.rps, measured.p99_ms, measured.errors
                );
                let baseline = figure(
                    format!("baseline: peer (cqrs-es + postgres-es) {scenario}"),
                    &measured,
                    None,
                );
                peer_figures.push(baseline.clone());
                baseline
            } else {
                peer_figures[i].clone()
            };
            let measured = peer::load(
                &tools,
                &system.command,
                scenario,
                args.clients,
                args.seconds,
                Some(&admin),
            )
            .await?;
            eprintln!(
                "bench: newsroom ({label}) {scenario}: {:.0}/s, p99 {:.1} ms, {} errors",
                measured.rps, measured.p99_ms, measured.errors
            );
            figures.push(
                figure(
                    format!("{scenario}, peer's load generator, newsroom {label}"),
                    &measured,
                    Some(TARGET),
                )
                .against(&baseline),
            );
            if roles == Roles::ALL {
                figures.push(baseline);
                settle(Duration::from_secs(120)).await;
            }
        }
        system.stop().await?;
    }
    Ok(figures)
}

/// Readers at a fixed rate, each from an address of their own, alone and then while one
/// client floods logins with wrong passwords from another address, at a fixed rate twice
/// the per-client request limit (a closed loop on this machine would measure how its
/// cores are shared with the attacker's own client): the readers' p99 both times, what
/// the flood was answered, and this process's peak memory. On a deployment with the product's throttles and request limit (the
/// addresses come from a trusted header, so that one machine can be many clients).
async fn login_flood(
    args: &Args,
    http: &reqwest::Client,
    phase: Duration,
) -> anyhow::Result<Vec<Figure>> {
    const READERS_PER_SECOND: u32 = 1_000;
    const GUESSES_PER_SECOND: u32 = 2_000;
    eprintln!("bench: login flood (a deployment with the product's limits)");
    let defaults = Settings::local_defaults().http;
    let system = Deployment::start_with(&args.settings, Roles::ALL, |s| {
        s.http.requests_per_second_per_client = defaults.requests_per_second_per_client;
        s.http.credential_changes_per_address = defaults.credential_changes_per_address;
        s.http.client_address_header = Some("x-real-ip".into());
    })
    .await?;
    let admin_email = system.settings.auth.admin_email.clone().unwrap_or_default();
    let admin = system.token(http, &admin_email, ADMIN_PASSWORD).await?;
    let created: Value = expect(
        http.post(format!("{}/v1/news", system.command))
            .bearer_auth(&admin)
            .json(&article(0))
            .send()
            .await?,
        StatusCode::CREATED,
    )
    .await?
    .json()
    .await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    expect(
        http.post(format!("{}/v1/news/{id}/publish", system.command))
            .bearer_auth(&admin)
            .send()
            .await?,
        StatusCode::OK,
    )
    .await?;
    let victim = format!("victim.{}@bench.local", Uuid::now_v7().simple());
    expect(
        http.post(format!("{}/v1/users", system.command))
            .json(&json!({"name": "Victim", "email": victim, "password": "correct horse battery"}))
            .send()
            .await?,
        StatusCode::CREATED,
    )
    .await?;
    settle(Duration::from_secs(60)).await;
    let readers = || {
        let (http, url) = (http.clone(), format!("{}/v1/news/{id}", system.query));
        load::open(READERS_PER_SECOND, phase, move |i| {
            let request = http
                .get(&url)
                .header("x-real-ip", format!("198.51.{}.{}", i % 200 / 100, i % 100));
            async move {
                let started = Instant::now();
                read_ok(request).await?;
                Ok(started.elapsed().as_micros() as u64)
            }
        })
    };
    let quiet = readers().await;
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (http, url, refused) = (
            http.clone(),
            format!("{}/v1/auth/token", system.command),
            refused.clone(),
        );
        load::open(GUESSES_PER_SECOND, phase, move |i| {
            let request = http
                .post(&url)
                .header("x-real-ip", "203.0.113.7")
                .json(&json!({"email": victim, "password": format!("guess {i}")}));
            let refused = refused.clone();
            async move {
                let started = Instant::now();
                let status = request.send().await?.status();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                anyhow::ensure!(
                    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::UNAUTHORIZED,
                    "a guess was answered {status}"
                );
                Ok(started.elapsed().as_micros() as u64)
            }
        })
    };
    // The peak from here on (Linux resets the high-water mark on this write).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before_mib = memory_mib("VmRSS:");
    let (flooded, flood) = tokio::join!(readers(), flood);
    let peak_mib = memory_mib("VmHWM:");
    system.stop().await?;
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "bench: readers p99 {:.1} ms alone, {:.1} ms under a login flood ({:.0} guesses/s, {refused} refused with 429, {} other errors); memory {before_mib:.0} MiB before, peak {peak_mib:.0} MiB",
        quiet.p99_ms, flooded.p99_ms, flood.per_second, flood.errors
    );
    let quiet_figure = Figure {
        name: format!("readers alone, {READERS_PER_SECOND}/s (p99)"),
        value: quiet.p99_ms,
        unit: "ms",
        stats: Some(quiet.clone()),
        baseline: None,
        ratio: None,
        target: None,
    };
    Ok(vec![
        Figure {
            name: format!(
                "readers, {READERS_PER_SECOND}/s, while one client guesses passwords {GUESSES_PER_SECOND}/s (p99)"
            ),
            value: flooded.p99_ms,
            unit: "ms",
            stats: Some(flooded),
            baseline: None,
            ratio: None,
            target: Some("<= 2x alone, 0 errors".into()),
        }
        .against(&quiet_figure),
        quiet_figure,
        Figure {
            name: "wrong-password logins answered 429 (share)".into(),
            value: refused as f64 / (flood.ok + flood.errors).max(1) as f64,
            unit: "",
            stats: Some(flood),
            baseline: None,
            ratio: None,
            target: Some("all but the allowance".into()),
        },
        Figure {
            name: "peak memory during the flood (the bench process, every role in it)".into(),
            value: peak_mib,
            unit: "MiB",
            stats: None,
            baseline: None,
            ratio: None,
            target: Some(format!("bounded ({before_mib:.0} MiB before)")),
        },
    ])
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:`, `VmHWM:`), MiB.
fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Waits (at most `limit`) until every consumer of this process has applied the whole log,
/// so that what one phase queued does not run during the next.
async fn settle(limit: Duration) {
    let started = Instant::now();
    loop {
        // The gauges follow librdkafka's statistics, once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let behind: f64 = newsroom_infra::metrics::REGISTRY
            .gather()
            .iter()
            .filter(|family| family.name() == "newsroom_projection_lag_events")
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_gauge().get_value())
            .sum();
        if behind <= 0.0 {
            eprintln!(
                "bench: consumers caught up after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return;
        }
        if started.elapsed() > limit {
            eprintln!("bench: consumers still {behind} events behind; going on");
            return;
        }
    }
}

async fn visibility_lag(
    http: &reqwest::Client,
    system: &Deployment,
    admin: &Arc<String>,
    rate: u32,
    phase: Duration,
) -> Stats {
    let (http, command, query, admin) = (
        http.clone(),
        system.command.clone(),
        system.query.clone(),
        admin.clone(),
    );
    load::open(rate, phase, move |i| {
        let (http, command, query, admin) =
            (http.clone(), command.clone(), query.clone(), admin.clone());
        async move {
            let response = http
                .post(format!("{command}/v1/news"))
                .bearer_auth(admin.as_str())
                .json(&article(i))
                .send()
                .await?;
            let response = expect(response, StatusCode::CREATED).await?;
            let acked = Instant::now();
            let token = response
                .headers()
                .get("x-consistency-token")
                .context("no token")?
                .to_str()?
                .to_owned();
            let created: Value = response.json().await?;
            let id = created["id"].as_str().unwrap_or_default().to_owned();
            let seen = http
                .get(format!("{query}/v1/news/{id}"))
                .bearer_auth(admin.as_str())
                .header("x-consistency-token", token)
                .header("x-consistency-timeout-ms", "10000")
                .send()
                .await?;
            expect(seen, StatusCode::OK).await?;
            Ok(acked.elapsed().as_micros() as u64)
        }
    })
    .await
}

impl Figure {
    fn renamed(mut self, name: &str) -> Figure {
        self.name = name.to_owned();
        self
    }
}

/// The user id a token names (its `sub`).
fn subject(token: &str) -> anyhow::Result<Uuid> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    let claims: Value = serde_json::from_slice(&bytes)?;
    Ok(Uuid::parse_str(claims["sub"].as_str().unwrap_or_default())?)
}

fn print_table(figures: &[Figure]) {
    println!(
        "{:<66} {:>12} {:<9} {:>8} {:>8} {:>8} {:>7}  TARGET",
        "FIGURE", "VALUE", "UNIT", "P50 ms", "P99 ms", "MAX ms", "RATIO"
    );
    for f in figures {
        let (p50, p99, max) = f
            .stats
            .as_ref()
            .map(|s| {
                (
                    format!("{:.1}", s.p50_ms),
                    format!("{:.1}", s.p99_ms),
                    format!("{:.1}", s.max_ms),
                )
            })
            .unwrap_or_default();
        println!(
            "{:<66} {:>12.1} {:<9} {:>8} {:>8} {:>8} {:>7}  {}",
            f.name,
            f.value,
            f.unit,
            p50,
            p99,
            max,
            f.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            f.target.clone().unwrap_or_default()
        );
    }
}
