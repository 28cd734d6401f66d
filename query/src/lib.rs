//! The query API: serves the read models the projector builds.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cache;
pub mod consistency;
pub mod kept;
pub mod log_ends;
pub mod openapi;
pub mod reads;
pub mod recommend;
pub mod routes;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use newsroom_infra::Settings;
use newsroom_infra::auth::Tokens;
use newsroom_infra::http::{self, Ops};
use sqlx::PgPool;

/// What every handler shares.
pub struct State {
    /// The read-model database.
    pub pool: PgPool,
    /// The deployment's topic prefix (consistency tokens name streams without it).
    pub topic_prefix: String,
    /// Where reads are handed to the log.
    pub reads: reads::Reads,
    /// The Redis read models.
    pub cache: cache::Cache,
    /// How recommendations are ranked.
    pub recommend: newsroom_infra::settings::RecommendSettings,
    /// Where the log ends (forged consistency tokens are refused).
    pub log_ends: Arc<log_ends::LogEnds>,
}

/// Builds the query API on `listener` over the read models in `pool`.
pub async fn build(
    settings: &Settings,
    listener: TcpListener,
    pool: PgPool,
    tokens: Tokens,
) -> anyhow::Result<Server> {
    let registry = newsroom_infra::registry::Registry::connect(&settings.registry).await?;
    let state = web::Data::new(State {
        pool,
        topic_prefix: settings.kafka.topic_prefix.clone(),
        reads: reads::Reads::start(&settings.kafka, registry)?,
        cache: cache::Cache::new(
            &settings.redis,
            newsroom_infra::redis::root(&settings.kafka, "cache"),
            newsroom_infra::redis::root(&settings.kafka, "recommend"),
            settings.recommend.kept_users,
        )?,
        recommend: settings.recommend.clone(),
        log_ends: log_ends::LogEnds::start(
            &settings.kafka,
            newsroom_infra::kafka::Stream::ALL
                .iter()
                .map(|s| s.topic(&settings.kafka))
                .collect(),
        )?,
    });
    let tokens = web::Data::new(tokens);
    let revocations = web::Data::new(newsroom_infra::auth::Revocations::new(state.pool.clone()));
    let limiter = web::Data::new(newsroom_infra::limit::Limiter::new(&settings.http, None)?);
    let ready_state = state.clone();
    let ops = Ops {
        service: "query-api",
        openapi: openapi::document()?.into(),
        // Without Redis the query API answers from PostgreSQL: degraded, still ready.
        optional: &["redis"],
        readiness: Arc::new(move || {
            let state = ready_state.clone();
            Box::pin(async move {
                let postgres = sqlx::query_scalar!("SELECT 1 AS one")
                    .fetch_one(&state.pool)
                    .await
                    .is_ok();
                vec![("postgres", postgres), ("redis", state.cache.is_up())]
            })
        }),
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(newsroom_infra::limit::middleware))
            .wrap(from_fn(newsroom_infra::auth::authenticate))
            .wrap(from_fn(http::request_id))
            .app_data(state.clone())
            .app_data(tokens.clone())
            .app_data(revocations.clone())
            .app_data(limiter.clone())
            .app_data(http::path_config())
            .configure(|cfg| http::ops_routes(cfg, ops.clone()))
            // Scopes with static prefixes first: a request is matched against the few
            // patterns of its scope only (actix matches dynamic segments with a regex).
            .service(
                web::scope("/v1/news")
                    .route("", web::get().to(routes::news::list))
                    // Before /{id}, which would take "trending" for an id.
                    .route("/trending", web::get().to(routes::news::trending))
                    .route("/{id}", web::get().to(routes::news::get)),
            )
            .service(
                web::scope("/v1/users/{id}")
                    .route("", web::get().to(routes::users::get))
                    .route("/history", web::get().to(routes::users::history))
                    .route(
                        "/recommendations",
                        web::get().to(routes::users::recommendations),
                    )
                    .route(
                        "/notifications",
                        web::get().to(routes::users::notifications),
                    ),
            )
            .default_service(web::to(http::not_found))
    })
    .listen(listener)
    .context("listening for the query API")?;
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(server.shutdown_timeout(10).run())
}
