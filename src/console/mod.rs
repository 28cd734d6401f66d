//! The operator's web console at `/admin` (ADR 29): the consumers and their lag, dead
//! letters with retry and skip, replays with their progress, and an event browser.
//! Server-rendered HTML (askama templates), one small script that refreshes the live parts,
//! assets in the binary: it works without any outside network.
//!
//! Admins only. The login form goes through the command API's `POST /v1/auth/token` (its
//! throttles included); once the answered token verifies as an admin's, it is dropped and a
//! console session opens: a random secret in an HttpOnly, SameSite=Strict cookie scoped to
//! `/admin` (never in a URL), its hash in `console_sessions`. Every request checks the
//! session (unexpired, the user still an admin, opened after their revocation floor);
//! logging out deletes it.

mod browse;
mod pages;
pub mod watch;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::middleware::{DefaultHeaders, from_fn};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use newsroom_infra::Settings;
use newsroom_infra::auth::{Actor, Revocations, Tokens};
use newsroom_infra::registry::Registry;
use newsroom_infra::settings::HttpSettings;
use sqlx::PgPool;

use crate::Stores;

/// The console's cookie.
const COOKIE: &str = "newsroom_console";

/// What every console handler shares.
pub struct Console {
    watch: Arc<watch::Watch>,
    pool: PgPool,
    settings: Settings,
    registry: Registry,
    tokens: Tokens,
    revocations: Revocations,
    login_url: String,
    http: reqwest::Client,
    jobs: Mutex<BTreeMap<String, Job>>,
    browsing: Arc<tokio::sync::Semaphore>,
    throttles: newsroom_command::throttle::Throttles,
}

/// Failed console logins per client address per minute (at most): every console login
/// reaches the command API from the console's own address, whose budget there all of the
/// console's clients share.
const LOGIN_FAILURES_PER_ADDRESS: u32 = 10;

/// A replay this console started.
#[derive(Debug, Clone)]
pub enum Job {
    /// Still building.
    Running(chrono::DateTime<chrono::Utc>),
    /// Switched (what it did) or failed (why).
    Done(chrono::DateTime<chrono::Utc>, Result<String, String>),
}

/// Builds the console on `listener`; it logs admins in through the command API at
/// `command_url`.
pub async fn build(
    settings: &Settings,
    listener: TcpListener,
    pool: PgPool,
    tokens: Tokens,
    command_url: &str,
) -> anyhow::Result<Server> {
    let stores = Stores {
        settings,
        pool: &pool,
    };
    let models: Vec<Box<dyn watch::Model>> = vec![
        Box::new(stores.users()),
        Box::new(stores.news()),
        Box::new(stores.reads()),
        Box::new(stores.cache()?),
        Box::new(stores.recommend()?),
        Box::new(stores.notify()),
    ];
    let watch = Arc::new(watch::Watch::new(
        models,
        pool.clone(),
        settings.kafka.clone(),
    ));
    tokio::spawn(watch.clone().run());
    let console = web::Data::new(Console {
        watch,
        registry: Registry::connect(&settings.registry).await?,
        revocations: Revocations::new(pool.clone()),
        pool,
        settings: settings.clone(),
        tokens,
        login_url: format!("{}/v1/auth/token", command_url.trim_end_matches('/')),
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("creating the console's HTTP client")?,
        jobs: Mutex::new(BTreeMap::new()),
        browsing: Arc::new(tokio::sync::Semaphore::new(1)),
        throttles: newsroom_command::throttle::Throttles::new(&HttpSettings {
            login_failures_per_address: match settings.http.login_failures_per_address {
                0 => 0,
                n => n.min(LOGIN_FAILURES_PER_ADDRESS),
            },
            ..settings.http.clone()
        })?,
    });
    let limiter = web::Data::new(newsroom_infra::limit::Limiter::new(&settings.http, None)?);
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(
                DefaultHeaders::new()
                    .add((
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                    ))
                    .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                    // Not no-referrer: with it, browsers send `Origin: null` on the console's own forms.
                    .add((header::REFERRER_POLICY, "same-origin"))
                    .add((header::X_FRAME_OPTIONS, "DENY"))
                    .add((header::CACHE_CONTROL, "no-store")),
            )
            .wrap(from_fn(newsroom_infra::limit::middleware))
            .wrap(from_fn(newsroom_infra::http::request_id))
            .app_data(console.clone())
            .app_data(limiter.clone())
            .app_data(web::FormConfig::default().limit(4096))
            .route("/admin", web::get().to(pages::home))
            .route("/admin/", web::get().to(pages::home))
            .route("/admin/login", web::get().to(pages::login_form))
            .route("/admin/login", web::post().to(pages::login))
            .route("/admin/logout", web::post().to(pages::logout))
            .route("/admin/consumers", web::get().to(pages::consumers))
            .route("/admin/consumers/live", web::get().to(pages::consumers_live))
            .route("/admin/dead-letters", web::get().to(pages::dead_letters))
            .route("/admin/dead-letters", web::post().to(pages::dead_letter_request))
            .route("/admin/replay", web::get().to(pages::replays))
            .route("/admin/replay/live", web::get().to(pages::replays_live))
            .route("/admin/replay", web::post().to(pages::start_replay))
            .route("/admin/events", web::get().to(pages::events))
            .route("/admin/assets/console.css", web::get().to(pages::css))
            .route("/admin/assets/console.js", web::get().to(pages::js))
            .route("/healthz", web::get().to(HttpResponse::NoContent))
            .default_service(web::to(pages::not_found))
    })
    .listen(listener)
    .context("listening for the console")?;
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(server.shutdown_timeout(10).run())
}

/// Why a console request was refused.
#[derive(Debug)]
enum Refused {
    /// No valid admin session: to the login page.
    LogIn,
    /// A cross-site form post.
    CrossSite,
    /// Something failed.
    Failed(anyhow::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::LogIn => write!(f, "log in first"),
            Refused::CrossSite => write!(f, "a form from another site"),
            Refused::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        Refused::Failed(e)
    }
}

impl actix_web::ResponseError for Refused {
    fn status_code(&self) -> actix_web::http::StatusCode {
        use actix_web::http::StatusCode;
        match self {
            Refused::LogIn => StatusCode::SEE_OTHER,
            Refused::CrossSite => StatusCode::FORBIDDEN,
            Refused::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Refused::LogIn => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/admin/login"))
                .finish(),
            Refused::CrossSite => pages::problem(
                actix_web::http::StatusCode::FORBIDDEN,
                "Refused: this form was not sent from the console itself.",
            ),
            Refused::Failed(e) => {
                tracing::warn!(error = format!("{e:#}"), "console request failed");
                pages::problem(
                    actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                    "The console cannot read what it needs right now (see its log); try again.",
                )
            }
        }
    }
}

/// How long a console session lasts at most.
const SESSION: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// A session's secret as the table keeps it.
fn secret_hash(secret: &str) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret.as_bytes()).to_vec()
}

/// Opens a session for `admin` lasting `lasts`; the cookie's secret.
async fn open_session(
    console: &Console,
    admin: uuid::Uuid,
    lasts: std::time::Duration,
) -> anyhow::Result<String> {
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    sqlx::query!("DELETE FROM console_sessions WHERE expires_at < now()")
        .execute(&console.pool)
        .await
        .context("dropping expired console sessions")?;
    sqlx::query!(
        "INSERT INTO console_sessions (secret_hash, user_id, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3))",
        secret_hash(&secret),
        admin,
        lasts.min(SESSION).as_secs_f64(),
    )
    .execute(&console.pool)
    .await
    .context("opening a console session")?;
    Ok(secret)
}

/// Ends the request's session, if it has one.
async fn close_session(req: &HttpRequest, console: &Console) -> anyhow::Result<()> {
    if let Some(secret) = cookie(req) {
        sqlx::query!(
            "DELETE FROM console_sessions WHERE secret_hash = $1",
            secret_hash(&secret),
        )
        .execute(&console.pool)
        .await
        .context("closing a console session")?;
    }
    Ok(())
}

/// The admin whose session the request's cookie opens: unexpired (it lasts as long as the
/// API's token it was opened with), not demoted as far as the users read model knows, and
/// opened after the user's revocation floor (a password change, an erasure). Fails closed
/// when any of it cannot be read.
async fn admin(req: &HttpRequest, console: &Console) -> Result<Actor, Refused> {
    let secret = cookie(req).ok_or(Refused::LogIn)?;
    if secret.len() != 64 {
        return Err(Refused::LogIn);
    }
    let session = sqlx::query!(
        "SELECT s.user_id, s.created_at FROM console_sessions s \
         LEFT JOIN users u ON u.id = s.user_id \
         WHERE s.secret_hash = $1 AND s.expires_at > now() AND coalesce(u.role = 'admin', true)",
        secret_hash(&secret),
    )
    .fetch_optional(&console.pool)
    .await
    .context("reading the console session")?
    .ok_or(Refused::LogIn)?;
    let (id, opened) = (session.user_id, session.created_at);
    if console
        .revocations
        .revoked(id, opened.timestamp_millis())
        .await?
    {
        return Err(Refused::LogIn);
    }
    Ok(Actor {
        id,
        role: newsroom_events::users::Role::Admin,
    })
}

/// The session cookie's value.
fn cookie(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// A form post from another site is refused: the cookie is SameSite=Strict already, and
/// the browser's Origin (or Sec-Fetch-Site) must name the console's own.
fn same_origin(req: &HttpRequest) -> Result<(), Refused> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return Err(Refused::CrossSite);
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let own = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if own != Some(host) {
            return Err(Refused::CrossSite);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "a=1; newsroom_console=tok.en; b=2"))
            .to_http_request();
        assert_eq!(cookie(&req).as_deref(), Some("tok.en"));
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "newsroom_console_x=1"))
            .to_http_request();
        assert_eq!(cookie(&req), None);
    }

    #[test]
    fn a_form_from_another_site_is_refused() {
        let own = TestRequest::default()
            .insert_header((header::HOST, "127.0.0.1:8082"))
            .insert_header((header::ORIGIN, "http://127.0.0.1:8082"))
            .insert_header(("sec-fetch-site", "same-origin"))
            .to_http_request();
        assert!(same_origin(&own).is_ok());
        let other = TestRequest::default()
            .insert_header((header::HOST, "127.0.0.1:8082"))
            .insert_header((header::ORIGIN, "http://evil.example"))
            .to_http_request();
        assert!(matches!(same_origin(&other), Err(Refused::CrossSite)));
        let fetched = TestRequest::default()
            .insert_header(("sec-fetch-site", "cross-site"))
            .to_http_request();
        assert!(matches!(same_origin(&fetched), Err(Refused::CrossSite)));
    }
}
