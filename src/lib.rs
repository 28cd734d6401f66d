//! newsroom: an event-sourced CQRS news portal back end on Apache Kafka.
//!
//! This crate wires the roles together: [`start`] brings up any subset of them in one
//! process, which is what `newsroom run` (every role) and the black-box tests use.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod console;
pub mod dead_letters;

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::ServerHandle;
use anyhow::Context as _;
use newsroom_infra::Settings;
use newsroom_infra::auth::Tokens;
use newsroom_infra::kafka::{Stream, ensure_topics};
use newsroom_infra::registry::Registry;
use newsroom_projector as projector;
use projector::consumer::{Context, Mode, Progress, Store};
use projector::postgres::Tables;
use projector::redis_store::RedisStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which roles to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The command API.
    pub command_api: bool,
    /// The query API.
    pub query_api: bool,
    /// The projector (read-model consumers: users, news, reads, cache).
    pub projector: bool,
    /// The recommender (affinities and published articles in Redis).
    pub recommender: bool,
    /// The notifier (inbox) and its mailer.
    pub notifier: bool,
    /// The operator's web console.
    pub console: bool,
}

impl Roles {
    /// Every role.
    pub const ALL: Roles = Roles {
        command_api: true,
        query_api: true,
        projector: true,
        recommender: true,
        notifier: true,
        console: true,
    };

    /// No role (a base to name some with `..Roles::NONE`).
    pub const NONE: Roles = Roles {
        command_api: false,
        query_api: false,
        projector: false,
        recommender: false,
        notifier: false,
        console: false,
    };
}

/// Roles running in this process.
pub struct Running {
    /// Where the command API listens, if it runs.
    pub command_addr: Option<SocketAddr>,
    /// Where the query API listens, if it runs.
    pub query_addr: Option<SocketAddr>,
    /// Where the console listens, if it runs.
    pub console_addr: Option<SocketAddr>,
    servers: Vec<(ServerHandle, JoinHandle<std::io::Result<()>>)>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    membership: Option<newsroom_command::owner::Membership>,
    stop: watch::Sender<bool>,
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
}

/// Starts `roles`: creates the topics if needed, applies migrations, starts the servers
/// and consumers, and returns once every listener is bound.
pub async fn start(settings: &Settings, roles: Roles) -> anyhow::Result<Running> {
    ensure_topics(&settings.kafka).await?;
    let (stop, stopped) = watch::channel(false);
    let mut running = Running {
        command_addr: None,
        query_addr: None,
        console_addr: None,
        servers: Vec::new(),
        workers: Vec::new(),
        membership: None,
        stop,
    };
    let pool = newsroom_infra::db::connect_waiting(&settings.postgres).await?;
    newsroom_infra::db::migrate(&pool).await?;
    newsroom_infra::db::check_deployment(&pool, &settings.kafka.topic_prefix).await?;
    // One token service for every API of the process (in local mode its secret is random).
    let tokens = Tokens::from_settings(&settings.auth)?;
    if roles.command_api {
        let listener = bind(settings.http.command_addr)?;
        running.command_addr = Some(listener.local_addr()?);
        let api = newsroom_command::build(settings, listener, pool.clone(), tokens.clone()).await?;
        running
            .servers
            .push((api.server.handle(), tokio::spawn(api.server)));
        running.membership = Some(api.membership);
        tracing::info!(addr = ?running.command_addr, "command API listening");
    }
    if roles.query_api {
        let listener = bind(settings.http.query_addr)?;
        running.query_addr = Some(listener.local_addr()?);
        let server =
            newsroom_query::build(settings, listener, pool.clone(), tokens.clone()).await?;
        running
            .servers
            .push((server.handle(), tokio::spawn(server)));
        tracing::info!(addr = ?running.query_addr, "query API listening");
    }
    if roles.console {
        let listener = bind(settings.http.console_addr)?;
        running.console_addr = Some(listener.local_addr()?);
        // Admins log in through the command API: this process's, or the configured one.
        let command_url = match (&settings.http.console_command_url, running.command_addr) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => format!("http://{}", settings.http.command_addr),
        };
        let server = console::build(settings, listener, pool.clone(), tokens, &command_url).await?;
        running
            .servers
            .push((server.handle(), tokio::spawn(server)));
        tracing::info!(addr = ?running.console_addr, "console listening at /admin");
    }
    if roles.projector {
        let context = consumer_context(settings, &pool).await?;
        let stores = Stores {
            settings,
            pool: &pool,
        };
        running
            .workers
            .push(consume(stores.users(), &context, &stopped));
        running
            .workers
            .push(consume(stores.news(), &context, &stopped));
        running
            .workers
            .push(consume(stores.reads(), &context, &stopped));
        running
            .workers
            .push(consume(stores.cache()?, &context, &stopped));
    }
    let stores = Stores {
        settings,
        pool: &pool,
    };
    if roles.recommender {
        let context = consumer_context(settings, &pool).await?;
        running
            .workers
            .push(consume(stores.recommend()?, &context, &stopped));
    }
    if roles.notifier {
        let context = consumer_context(settings, &pool).await?;
        running
            .workers
            .push(consume(stores.notify(), &context, &stopped));
        let (pool, mail, mut stopped) = (pool.clone(), settings.notify.clone(), stopped.clone());
        running.workers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            projector::mailer::run(pool, mail, stop).await
        }));
    }
    Ok(running)
}

/// The read models of a deployment, each over its store.
struct Stores<'a> {
    settings: &'a Settings,
    pool: &'a sqlx::PgPool,
}

impl Stores<'_> {
    fn topic(&self, stream: Stream) -> String {
        stream.topic(&self.settings.kafka)
    }

    fn users(&self) -> Tables<projector::users::UsersProjection> {
        let topic = self.topic(Stream::Users);
        Tables::new(
            projector::users::UsersProjection { topic },
            self.pool.clone(),
        )
    }

    fn news(&self) -> Tables<projector::news::NewsProjection> {
        let topic = self.topic(Stream::News);
        Tables::new(projector::news::NewsProjection { topic }, self.pool.clone())
    }

    fn reads(&self) -> Tables<projector::reads::ReadsProjection> {
        let topic = self.topic(Stream::Reads);
        Tables::new(
            projector::reads::ReadsProjection { topic },
            self.pool.clone(),
        )
    }

    fn cache(&self) -> anyhow::Result<RedisStore<projector::cache::Cache>> {
        let model = projector::cache::Cache {
            pool: self.pool.clone(),
            topics: Stream::ALL.iter().map(|s| self.topic(*s)).collect(),
        };
        self.redis(model)
    }

    fn recommend(&self) -> anyhow::Result<RedisStore<projector::recommend::Recommender>> {
        let model = projector::recommend::Recommender {
            half_life: self.settings.recommend.half_life(),
            topics: vec![
                self.topic(Stream::News),
                self.topic(Stream::Reads),
                self.topic(Stream::Users),
            ],
        };
        self.redis(model)
    }

    fn notify(&self) -> Tables<projector::notify::Notifier> {
        let topics = vec![self.topic(Stream::Users), self.topic(Stream::News)];
        Tables::new(projector::notify::Notifier { topics }, self.pool.clone())
    }

    fn redis<M: projector::redis_store::Model>(&self, model: M) -> anyhow::Result<RedisStore<M>> {
        let root = newsroom_infra::redis::root(&self.settings.kafka, model.name());
        let redis = newsroom_infra::redis::connect(&self.settings.redis)?;
        Ok(RedisStore::new(model, redis, root))
    }
}

async fn consumer_context(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Context> {
    Ok(Context {
        kafka: settings.kafka.clone(),
        pool: pool.clone(),
        registry: Registry::connect(&settings.registry).await?,
        lanes: usize::from(settings.kafka.consumer_lanes),
    })
}

/// Runs a live consumer over `store` until the stop signal.
fn consume<S: Store + 'static>(
    store: S,
    context: &Context,
    stopped: &watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    let (context, mut stopped) = (context.clone(), stopped.clone());
    tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let (progress, _) = watch::channel(Progress::default());
        projector::consumer::run(store, Mode::Live, context, progress, stop).await
    })
}

/// The read models `newsroom replay` rebuilds.
pub const PROJECTIONS: [&str; 6] = ["users", "news", "reads", "cache", "recommend", "notify"];

/// Rebuilds read model `name` into a new version and switches the query side to it
/// (`quiet` leaves out the progress lines).
pub async fn replay(
    settings: &Settings,
    name: &str,
    quiet: bool,
) -> anyhow::Result<projector::replay::Report> {
    match rebuild(settings, name, quiet, Rebuild::Replay).await? {
        Rebuilt::Replayed(report) => Ok(report),
        Rebuilt::Verified(_) => unreachable!("a replay was asked for"),
    }
}

/// Builds read model `name` afresh from the log beside the version that serves and
/// compares the two at the live consumer's offsets; the fresh copy is dropped.
pub async fn verify(
    settings: &Settings,
    name: &str,
    quiet: bool,
) -> anyhow::Result<projector::replay::Verdict> {
    match rebuild(settings, name, quiet, Rebuild::Verify).await? {
        Rebuilt::Verified(verdict) => Ok(verdict),
        Rebuilt::Replayed(_) => unreachable!("a verify was asked for"),
    }
}

#[derive(Clone, Copy)]
enum Rebuild {
    Replay,
    Verify,
}

enum Rebuilt {
    Replayed(projector::replay::Report),
    Verified(projector::replay::Verdict),
}

async fn rebuild(
    settings: &Settings,
    name: &str,
    quiet: bool,
    how: Rebuild,
) -> anyhow::Result<Rebuilt> {
    ensure_topics(&settings.kafka).await?;
    // A rebuild's statements (a comparison over a whole read model) may outlast the
    // serving processes' statement timeout.
    let mut postgres = settings.postgres.clone();
    postgres.statement_timeout_ms = 0;
    let pool = newsroom_infra::db::connect(&postgres).await?;
    newsroom_infra::db::migrate(&pool).await?;
    newsroom_infra::db::check_deployment(&pool, &settings.kafka.topic_prefix).await?;
    let context = consumer_context(settings, &pool).await?;
    let stores = Stores {
        settings,
        pool: &pool,
    };
    async fn one<S: projector::replay::Versioned>(
        store: S,
        context: projector::consumer::Context,
        pool: &sqlx::PgPool,
        quiet: bool,
        how: Rebuild,
    ) -> anyhow::Result<Rebuilt> {
        use projector::replay;
        Ok(match how {
            Rebuild::Replay => {
                Rebuilt::Replayed(replay::replay(store, context, pool, quiet).await?)
            }
            Rebuild::Verify => {
                Rebuilt::Verified(replay::verify(store, context, pool, quiet).await?)
            }
        })
    }
    match name {
        "users" => one(stores.users(), context, &pool, quiet, how).await,
        "news" => one(stores.news(), context, &pool, quiet, how).await,
        "reads" => one(stores.reads(), context, &pool, quiet, how).await,
        "cache" => one(stores.cache()?, context, &pool, quiet, how).await,
        "recommend" => one(stores.recommend()?, context, &pool, quiet, how).await,
        "notify" => one(stores.notify(), context, &pool, quiet, how).await,
        other => anyhow::bail!(
            "no read model named {other}; choose one of {}",
            PROJECTIONS.join(", ")
        ),
    }
}

impl Running {
    /// Runs until Ctrl-C or SIGTERM, or until a role fails; then stops every role.
    pub async fn until_signal(self) -> anyhow::Result<()> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
            _ = terminate.recv() => tracing::info!("terminated; shutting down"),
        }
        self.stop().await
    }

    /// Stops every role gracefully: servers finish in-flight requests, consumers their batch.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some(membership) = self.membership {
            membership.leave().await;
        }
        for (handle, _) in &self.servers {
            handle.stop(true).await;
        }
        for (_, task) in self.servers {
            task.await
                .context("joining a server")?
                .context("server failed")?;
        }
        for worker in self.workers {
            worker.await.context("joining a consumer")??;
        }
        Ok(())
    }
}
