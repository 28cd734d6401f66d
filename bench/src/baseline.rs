//! The raw parts newsroom is built on, measured the same way: a bare actix-web handler,
//! Redis reads, transactional produce with rdkafka, batched PostgreSQL inserts; and the
//! projection of a backlog.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use newsroom_events::Category;
use newsroom_events::news::{NewsDrafted, NewsEvent};
use newsroom_events::{EventMetadata, metadata::micros};
use newsroom_infra::Settings;
use newsroom_infra::kafka::{Stream, transactional_producer};
use newsroom_infra::read_models::field;
use newsroom_infra::registry::Registry;
use newsroom_projector::consumer::{self, Context, Mode, Progress};
use newsroom_projector::postgres::Tables;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::load::{self, Stats};

/// A running bare actix-web server.
pub struct Bare {
    /// Its base URL.
    pub url: String,
    handle: actix_web::dev::ServerHandle,
}

impl Bare {
    /// Stops it.
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

/// An actix-web server with one handler answering `body` as JSON, as many workers as the
/// query API has.
pub async fn bare_actix(body: String) -> anyhow::Result<Bare> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let body = actix_web::web::Data::new(body);
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new().app_data(body.clone()).route(
            "/article",
            actix_web::web::get().to(|body: actix_web::web::Data<String>| async move {
                actix_web::HttpResponse::Ok()
                    .content_type("application/json")
                    .body(body.get_ref().clone())
            }),
        )
    })
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(Bare { url, handle })
}

/// `clients` loops of HGETALL on the cached articles of `ids`.
pub async fn redis_hgetall(
    settings: &Settings,
    ids: &[Uuid],
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let root = newsroom_infra::redis::root(&settings.kafka, "cache");
    let active: Option<String> = redis::cmd("GET")
        .arg(format!("{root}:active"))
        .query_async(&mut connection)
        .await?;
    let prefix = format!("{root}:v{}:news:", active.unwrap_or_else(|| "1".into()));
    let keys: std::sync::Arc<Vec<String>> =
        std::sync::Arc::new(ids.iter().map(|id| format!("{prefix}{id}")).collect());
    Ok(load::closed(clients, duration, None, move |i| {
        let mut connection = connection.clone();
        let key = keys[i % keys.len()].clone();
        async move {
            let fields: Vec<String> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut connection)
                .await?;
            anyhow::ensure!(!fields.is_empty(), "no such article in Redis");
            Ok(())
        }
    })
    .await)
}

/// `user`'s recommendations (20) ranked on every request, as the query API ranks them when
/// it keeps no ranking (ADR 20): in this process, without HTTP.
pub async fn recommendations_ranked(
    settings: &Settings,
    user: Uuid,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let cache = newsroom_query::cache::Cache::new(
        &settings.redis,
        newsroom_infra::redis::root(&settings.kafka, "cache"),
        newsroom_infra::redis::root(&settings.kafka, "recommend"),
        0,
    )?;
    let candidates = settings.recommend.candidates;
    Ok(load::closed(clients, duration, None, move |_| {
        let cache = cache.clone();
        async move {
            let items = cache
                .recommendations(user, 20, candidates, None)
                .await
                .context("Redis did not answer")?;
            anyhow::ensure!(items.len() == 20, "{} recommendations", items.len());
            Ok(())
        }
    })
    .await)
}

/// What producing the backlog measured.
pub struct Produced {
    /// Events per second.
    pub per_second: f64,
}

/// Appends `count` NewsDrafted events to the news topic in Kafka transactions of 500.
pub async fn produce_backlog(settings: &Settings, count: usize) -> anyhow::Result<Produced> {
    let registry = Registry::connect(&settings.registry).await?;
    let topic = Stream::News.topic(&settings.kafka);
    let producer: FutureProducer = transactional_producer(
        &settings.kafka,
        &format!("{}.bench", settings.kafka.topic_prefix),
    )
    .create()
    .context("creating the producer")?;
    newsroom_infra::kafka::init_transactions(Duration::from_secs(30), |t| {
        producer.init_transactions(t)
    })?;
    let author = Uuid::now_v7();
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        producer.begin_transaction()?;
        let batch = (count - sent).min(500);
        let mut deliveries = Vec::with_capacity(batch);
        for i in sent..sent + batch {
            let id = Uuid::now_v7();
            let event = NewsEvent::Drafted(NewsDrafted {
                metadata: EventMetadata {
                    event_id: Uuid::now_v7(),
                    aggregate_id: id,
                    aggregate_version: 1,
                    occurred_at: micros(chrono::Utc::now()),
                    correlation_id: "bench".into(),
                    causation_id: "bench".into(),
                    actor_id: Some(author),
                    schema_version: 0,
                },
                author_id: author,
                category: [Category::Famous, Category::Politics, Category::Sports][i % 3],
                title: format!("Backlog article {i}"),
                content:
                    "A short body of text, about the size of a news teaser, for the benchmark. "
                        .repeat(4),
                tags: vec!["bench".into(), format!("t{}", i % 10)],
            })
            .with_schema_version();
            let payload = event.encode(|name| registry.id_of(name))?;
            let key = id.as_bytes().to_vec();
            deliveries.push(
                producer
                    .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                    .map_err(|(e, _)| e)?,
            );
        }
        for delivery in deliveries {
            delivery.await?.map_err(|(e, _)| e)?;
        }
        producer.commit_transaction(Duration::from_secs(30))?;
        sent += batch;
    }
    Ok(Produced {
        per_second: count as f64 / started.elapsed().as_secs_f64(),
    })
}

/// Runs the news projection (PostgreSQL) and the cache (Redis), one after the other, over
/// the backlog of `count` events; their rates.
pub async fn project_backlog(
    settings: &Settings,
    count: usize,
) -> anyhow::Result<Vec<(String, f64)>> {
    let pool = newsroom_infra::db::connect(&settings.postgres).await?;
    let context = Context {
        kafka: settings.kafka.clone(),
        pool: pool.clone(),
        registry: Registry::connect(&settings.registry).await?,
        lanes: usize::from(settings.kafka.consumer_lanes),
    };
    let mut rates = Vec::new();
    let news = Tables::new(
        newsroom_projector::news::NewsProjection {
            topic: Stream::News.topic(&settings.kafka),
        },
        pool.clone(),
    );
    rates.push((
        "news (PostgreSQL)".to_owned(),
        until_applied(news, &context, count).await?,
    ));
    let cache = newsroom_projector::redis_store::RedisStore::new(
        newsroom_projector::cache::Cache {
            pool: pool.clone(),
            topics: Stream::ALL
                .iter()
                .map(|s| s.topic(&settings.kafka))
                .collect(),
        },
        newsroom_infra::redis::connect(&settings.redis)?,
        newsroom_infra::redis::root(&settings.kafka, "cache"),
    );
    rates.push((
        "cache (Redis)".to_owned(),
        until_applied(cache, &context, count).await?,
    ));
    Ok(rates)
}

async fn until_applied<S: consumer::Store + 'static>(
    store: S,
    context: &Context,
    count: usize,
) -> anyhow::Result<f64> {
    let (progress, mut watch) = watch::channel(Progress::default());
    let (stop, stopped) = watch::channel(false);
    let context = context.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let mut stopped = stopped;
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        consumer::run(store, Mode::Live, context, progress, shutdown).await
    });
    let applied = loop {
        let events = watch.borrow().events;
        if events as usize >= count {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the projection stalled at {events}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
    };
    let _ = stop.send(true);
    task.await??;
    Ok(count as f64 / applied.as_secs_f64())
}

/// Inserts `count` rows shaped like the news read model's into a scratch table, 1,000 per
/// statement; rows per second.
pub async fn postgres_inserts(settings: &Settings, count: usize) -> anyhow::Result<f64> {
    let pool = newsroom_infra::db::connect(&settings.postgres).await?;
    sqlx::query("CREATE TABLE bench_rows (LIKE news_v1.news INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let started = Instant::now();
    let author = Uuid::now_v7();
    let mut done = 0;
    while done < count {
        let batch = (count - done).min(1000);
        let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
        let titles: Vec<String> = (done..done + batch)
            .map(|i| format!("Backlog article {i}"))
            .collect();
        let categories: Vec<&str> = (done..done + batch)
            .map(|i| ["famous", "politics", "sports"][i % 3])
            .collect();
        let content =
            "A short body of text, about the size of a news teaser, for the benchmark. ".repeat(4);
        sqlx::query(
            "INSERT INTO bench_rows (id, author_id, category, title, content, tags, status, version, created_at, updated_at) \
             SELECT id, $2, category, title, $5, ARRAY['bench'], 'draft', 1, now(), now() \
             FROM unnest($1::uuid[], $3::text[], $4::text[]) AS r(id, category, title)",
        )
        .bind(&ids)
        .bind(author)
        .bind(&categories)
        .bind(&titles)
        .bind(&content)
        .execute(&pool)
        .await?;
        done += batch;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// How many writers the raw Redis baseline runs at once: one building its next pipeline
/// while Redis applies the other's, so that Redis rather than the client bounds it.
pub const REDIS_WRITERS: usize = 2;

/// Writes `count` hashes shaped like the cache model's articles (the same twelve fields)
/// under a scratch prefix, each article's key added to its author's set as the model does,
/// 1,000 articles per pipelined MULTI/EXEC from [`REDIS_WRITERS`] writers at once, with
/// no script, guard or offsets; articles per second. The keys are removed afterwards (not
/// timed).
pub async fn redis_writes(settings: &Settings, count: usize) -> anyhow::Result<f64> {
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let connection = client.get_multiplexed_async_connection().await?;
    let prefix = format!("{}:bench-writes:", settings.kafka.topic_prefix);
    let author = Uuid::now_v7().to_string();
    let started = Instant::now();
    let writers: Vec<_> = (0..REDIS_WRITERS)
        .map(|w| {
            let share = count * w / REDIS_WRITERS..count * (w + 1) / REDIS_WRITERS;
            let (connection, prefix, author) = (connection.clone(), prefix.clone(), author.clone());
            tokio::spawn(async move { write_articles(connection, &prefix, &author, share).await })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    remove_keys(settings, &format!("{prefix}*")).await?;
    Ok(rate)
}

/// The articles numbered `range` of [`redis_writes`], 1,000 per MULTI/EXEC.
async fn write_articles(
    mut connection: redis::aio::MultiplexedConnection,
    prefix: &str,
    author: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let authored = format!("{prefix}authored:{author}");
    let content =
        "A short body of text, about the size of a news teaser, for the benchmark. ".repeat(4);
    let mut done = range.start;
    while done < range.end {
        let batch = (range.end - done).min(1000);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for i in done..done + batch {
            let id = Uuid::now_v7().to_string();
            let key = format!("{prefix}news:{id}");
            let at = chrono::Utc::now().timestamp_micros().to_string();
            pipe.cmd("HSET")
                .arg(&key)
                .arg(
                    &[
                        (field::VERSION, "1"),
                        (field::ID, &id),
                        (field::CATEGORY, ["famous", "politics", "sports"][i % 3]),
                        (field::TITLE, &format!("Backlog article {i}")),
                        (field::CONTENT, &content),
                        (field::TAGS, &format!("[\"bench\",\"t{}\"]", i % 10)),
                        (field::AUTHOR, author),
                        (field::STATUS, "draft"),
                        (field::CREATED, &at),
                        (field::UPDATED, &at),
                        (field::PUBLISHED, ""),
                        (field::AUTHOR_NAME, "Bench Author"),
                    ][..],
                )
                .ignore();
            pipe.cmd("SADD").arg(&authored).arg(&key).ignore();
        }
        let (): () = pipe.query_async(&mut connection).await?;
        done += batch;
    }
    Ok(())
}

/// The machine the figures come from.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_owned()))
        .unwrap_or_default();
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": memory,
        "os": std::env::consts::OS,
    })
}

/// Unlinks every Redis key matching `pattern`.
pub async fn remove_keys(settings: &Settings, pattern: &str) -> anyhow::Result<()> {
    // Redis may still be busy with what the run queued (recommendation scripts), and
    // scanning a large keyspace takes longer than the client's default timeouts.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(60)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let mut redis = redis::Client::open(settings.redis.url.as_str())?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    newsroom_infra::redis::unlink_matching(&mut redis, pattern).await
}

/// Deletes the deployment's topics (events, ownership, dead letters).
pub async fn delete_topics(settings: &Settings) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .create()?;
    let mut topics: Vec<String> = Stream::ALL
        .iter()
        .map(|s| s.topic(&settings.kafka))
        .collect();
    topics.push(newsroom_infra::kafka::ownership_topic(&settings.kafka));
    topics.extend(
        newsroom_infra::kafka::CONSUMERS
            .iter()
            .map(|c| newsroom_infra::kafka::dead_letter_topic(&settings.kafka, c)),
    );
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    admin
        .delete_topics(
            &names,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("deleting the benchmark's topics")?;
    Ok(())
}
