//! The command API: validates commands, routes each to the one writer of its aggregate's
//! partition ([`owner`]), where the pure aggregates of [`domain`] decide the events, which
//! are committed to Kafka in transactions before the answer is sent.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod aggregate;
pub mod claims;
pub mod digest;
pub mod domain;
pub mod forward;
pub mod idempotency;
pub mod keys;
pub mod openapi;
pub mod owner;
pub mod password;
pub mod routes;
pub mod throttle;
pub mod validation;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use newsroom_events::users::Role;
use newsroom_infra::Settings;
use newsroom_infra::auth::Tokens;
use newsroom_infra::http::{self, Ops};
use newsroom_infra::registry::Registry;
use sqlx::PgPool;

use crate::claims::Claims;
use crate::forward::Directory;
use crate::keys::Keys;
use crate::owner::{Membership, Owners, RequestMeta, Shared};
use crate::password::Hasher;

/// What every handler shares.
pub struct State {
    /// The partitions this process writes.
    pub owners: Arc<Owners>,
    /// Registry, keys, claims, directory.
    pub shared: Arc<Shared>,
    /// Password hashing.
    pub hasher: Hasher,
    /// Access tokens.
    pub tokens: Tokens,
    /// The database (command-side tables and, for author names, the users read model).
    pub pool: PgPool,
    /// Recently read author names.
    pub authors: routes::news::AuthorNames,
    /// Throttles of the endpoints that hash passwords.
    pub throttles: throttle::Throttles,
    /// Failed logins per account, shared by the deployment's command processes.
    pub login_failures: Arc<throttle::SharedFailures>,
    /// Token floors (revocations).
    pub revocations: newsroom_infra::auth::Revocations,
}

/// A running command API.
pub struct CommandApi {
    /// The HTTP server.
    pub server: Server,
    /// Membership in the ownership group (leave it on shutdown).
    pub membership: Membership,
}

/// Builds the command API on `listener`: joins the ownership group (partitions are taken
/// over in the background) and starts serving.
pub async fn build(
    settings: &Settings,
    listener: TcpListener,
    pool: PgPool,
    tokens: Tokens,
) -> anyhow::Result<CommandApi> {
    let registry = Registry::connect(&settings.registry).await?;
    let address = match &settings.http.command_advertise {
        Some(address) => address.clone(),
        None => listener.local_addr()?.to_string(),
    };
    let instance = format!(
        "{}-{}",
        settings.kafka.instance_id,
        uuid::Uuid::now_v7().simple()
    );
    let partitions = settings.kafka.partitions;
    let claims = Claims::new(&settings.auth, pool.clone())?;
    let shared = Arc::new(Shared {
        kafka: settings.kafka.clone(),
        registry,
        keys: Keys::new(pool.clone()),
        directory: Directory::new(
            pool.clone(),
            instance.clone(),
            address,
            settings.kafka.timeout(),
            claims.subkey("forwarding"),
        )?,
        claims,
        partitions,
        pool: pool.clone(),
        ends: Arc::new(newsroom_infra::kafka::PartitionEnds::new(&settings.kafka)?),
        kafka_up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    });
    let group = owner::writer::Group::default();
    let writer = owner::writer::Writer::start(shared.clone(), &instance, group.clone()).await?;
    let owners = Arc::new(Owners::new(partitions, writer));
    let membership = match Membership::join(shared.clone(), owners.clone(), &instance, &group) {
        Ok(membership) => membership,
        Err(e) => {
            owners.writer.stop();
            return Err(e);
        }
    };
    let revocations = newsroom_infra::auth::Revocations::new(pool.clone());
    let login_failures =
        throttle::SharedFailures::start(pool.clone(), settings.http.login_failures_per_account);
    let state = web::Data::new(State {
        owners: owners.clone(),
        shared,
        hasher: Hasher::new(&settings.hashing)?,
        tokens,
        pool,
        authors: routes::news::AuthorNames::default(),
        throttles: throttle::Throttles::new(&settings.http)?,
        login_failures,
        revocations,
    });
    if let (Some(email), Some(password)) =
        (&settings.auth.admin_email, &settings.auth.admin_password)
    {
        tokio::spawn(bootstrap_admin(
            state.clone(),
            email.clone(),
            password.expose().to_owned(),
        ));
    }
    let tokens = web::Data::new(state.tokens.clone());
    let revocations = web::Data::new(state.revocations.clone());
    let idempotency = web::Data::new(idempotency::Idempotency::new(
        state.pool.clone(),
        state.shared.claims.subkey("idempotency"),
    ));
    tokio::spawn(expire_idempotency_keys(idempotency.clone()));
    // Requests forwarded by another command process were counted where they came in.
    let directory = state.shared.directory.clone();
    let limiter = web::Data::new(newsroom_infra::limit::Limiter::new(
        &settings.http,
        Some(Box::new(move |head| directory.forwarded(head))),
    )?);
    let directory = web::Data::new(state.shared.directory.clone());
    let ready_state = state.clone();
    let ops = Ops {
        service: "command-api",
        openapi: openapi::document()?.into(),
        optional: &[],
        readiness: Arc::new(move || {
            let state = ready_state.clone();
            Box::pin(async move {
                let kafka = state
                    .shared
                    .kafka_up
                    .load(std::sync::atomic::Ordering::Relaxed);
                vec![
                    ("kafka", kafka),
                    ("partitions", state.owners.all_ready()),
                    ("registry", state.shared.registry.ping().await),
                ]
            })
        }),
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(idempotency::middleware))
            .wrap(from_fn(newsroom_infra::limit::middleware))
            .wrap(from_fn(forward::check_body))
            .wrap(from_fn(newsroom_infra::auth::authenticate))
            .wrap(from_fn(http::request_id))
            .app_data(state.clone())
            .app_data(tokens.clone())
            .app_data(revocations.clone())
            .app_data(idempotency.clone())
            .app_data(limiter.clone())
            .app_data(directory.clone())
            .app_data(http::path_config())
            .configure(|cfg| http::ops_routes(cfg, ops.clone()))
            .route("/v1/users", web::post().to(routes::users::register))
            .route("/v1/auth/token", web::post().to(routes::session::token))
            .route("/v1/users/{id}", web::patch().to(routes::users::update))
            .route("/v1/users/{id}", web::delete().to(routes::users::erase))
            .route(
                "/v1/users/{id}/password",
                web::put().to(routes::users::change_password),
            )
            .route(
                "/v1/users/{id}/role",
                web::put().to(routes::users::change_role),
            )
            .route(
                "/v1/users/{id}/notifications/read",
                web::post().to(routes::users::notifications_read),
            )
            .route("/v1/news", web::post().to(routes::news::create))
            .route("/v1/news/{id}", web::patch().to(routes::news::update))
            .route("/v1/news/{id}", web::delete().to(routes::news::delete))
            .route(
                "/v1/news/{id}/publish",
                web::post().to(routes::news::publish),
            )
            .route(
                "/v1/news/{id}/unpublish",
                web::post().to(routes::news::unpublish),
            )
            .route(
                "/v1/news/{id}/archive",
                web::post().to(routes::news::archive),
            )
            .default_service(web::to(http::not_found))
    })
    .listen(listener)
    .context("listening for the command API")?;
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(CommandApi {
        server: server.shutdown_timeout(10).run(),
        membership,
    })
}

/// Drops idempotency records older than 24 hours, hourly.
async fn expire_idempotency_keys(store: web::Data<idempotency::Idempotency>) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        match store.expire().await {
            Ok(n) if n > 0 => tracing::info!(expired = n, "idempotency records expired"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "expiring idempotency records"),
        }
    }
}

/// Creates the first admin from `NEWSROOM_ADMIN_EMAIL` / `NEWSROOM_ADMIN_PASSWORD` when no
/// user has that e-mail yet, retrying until this process writes a partition.
async fn bootstrap_admin(state: web::Data<State>, email: String, password: String) {
    let claim = state.shared.claims.claim_of(&email);
    for _ in 0..600 {
        match state.shared.claims.holder(&claim).await {
            Ok(Some(_)) => return,
            Ok(None) if !state.owners.ready().is_empty() => {
                let meta = RequestMeta::new("bootstrap-admin".into(), None);
                let name = "Administrator".to_owned();
                match routes::users::register_user(
                    &state,
                    name,
                    email.clone(),
                    password.clone(),
                    Role::Admin,
                    meta,
                )
                .await
                {
                    Ok(committed) => {
                        tracing::info!(user = %committed.state.id, "created the first admin");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "creating the first admin failed; retrying")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "checking for the first admin"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::error!("gave up creating the first admin");
}
