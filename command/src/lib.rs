//! The command API: validates commands, decides events with the pure aggregates in
//! [`domain`], and appends them to Kafka through the transactional [`log::EventLog`],
//! answering only after the append committed.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod domain;
pub mod log;
pub mod password;
pub mod routes;
pub mod validation;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use newsroom_infra::Settings;
use newsroom_infra::http::{self, Ops};
use newsroom_infra::registry::Registry;

use crate::log::EventLog;
use crate::password::Hasher;

/// What every handler shares.
pub struct State {
    /// The event log writer.
    pub log: EventLog,
    /// Schema ids for encoding.
    pub registry: Registry,
    /// Password hashing.
    pub hasher: Hasher,
}

/// The OpenAPI document of the command API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Builds the command API on `listener` (bind port 0 to let the OS pick one).
pub async fn build(settings: &Settings, listener: TcpListener) -> anyhow::Result<Server> {
    let registry = Registry::connect(&settings.registry).await?;
    let state = web::Data::new(State {
        log: EventLog::start(&settings.kafka),
        registry,
        hasher: Hasher::new(&settings.hashing)?,
    });
    let ready_state = state.clone();
    let ops = Ops {
        service: "command-api",
        openapi: OPENAPI,
        readiness: Arc::new(move || {
            let state = ready_state.clone();
            Box::pin(async move {
                vec![
                    ("kafka", state.log.is_connected()),
                    ("registry", state.registry.ping().await),
                ]
            })
        }),
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(http::request_id))
            .app_data(state.clone())
            .app_data(http::json_config())
            .app_data(http::path_config())
            .configure(|cfg| http::ops_routes(cfg, ops.clone()))
            .route("/v1/users", web::post().to(routes::users::register))
            .default_service(web::to(http::not_found))
    })
    .listen(listener)
    .context("listening for the command API")?;
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(server.shutdown_timeout(10).run())
}
