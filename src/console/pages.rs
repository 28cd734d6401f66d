//! The console's pages and forms.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use newsroom_infra::kafka::CONSUMERS;
use newsroom_projector::dead_letters;
use serde::Deserialize;

use super::watch::{self, Consumer, Point};
use super::{
    COOKIE, Console, Job, Refused, SESSION, admin, browse, close_session, open_session, same_origin,
};

/// Renders a template as a page.
fn page(template: &impl Template) -> Result<HttpResponse, Refused> {
    let body = template
        .render()
        .map_err(|e| Refused::Failed(anyhow::anyhow!("rendering a page: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(body))
}

#[derive(Template)]
#[template(path = "problem.html")]
struct Problem<'a> {
    message: &'a str,
}

/// A page that only says what went wrong.
pub(super) fn problem(status: StatusCode, message: &str) -> HttpResponse {
    let body = Problem { message }
        .render()
        .unwrap_or_else(|_| message.to_owned());
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

pub(super) async fn not_found() -> HttpResponse {
    problem(StatusCode::NOT_FOUND, "No such page.")
}

pub(super) async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(include_str!("assets/console.css"))
}

pub(super) async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(include_str!("assets/console.js"))
}

pub(super) async fn home() -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/admin/consumers"))
        .finish()
}

// --- login ---------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "login.html")]
struct Login {
    error: Option<String>,
}

pub(super) async fn login_form() -> Result<HttpResponse, Refused> {
    page(&Login { error: None })
}

#[derive(Deserialize)]
pub(super) struct Credentials {
    email: String,
    password: String,
}

/// Logs in through the command API; only an admin's token opens a session.
pub(super) async fn login(
    req: HttpRequest,
    form: web::Form<Credentials>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    same_origin(&req)?;
    let refuse = |status: StatusCode, error: &str| {
        let body = Login {
            error: Some(error.to_owned()),
        }
        .render()
        .map_err(|e| Refused::Failed(anyhow::anyhow!("rendering a page: {e}")))?;
        Ok(HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(body))
    };
    // Throttled here per client address and account, as the command API would if the
    // client called it directly.
    let address = console.throttles.address(&req);
    let account = format!("account:{}", form.email.trim().to_lowercase());
    let Ok(attempt) = console.throttles.login(&account, &address, None) else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins: wait a minute.",
        );
    };
    let answer = console
        .http
        .post(&console.login_url)
        .json(&serde_json::json!({"email": form.email, "password": form.password}))
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "console: the command API did not answer a login");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "The command API does not answer; try again in a moment.",
            );
        }
    };
    attempt.end(answer.status().as_u16() == 401 || answer.status().as_u16() == 400);
    match answer.status().as_u16() {
        200 => {}
        401 | 400 | 422 => {
            return refuse(StatusCode::UNAUTHORIZED, "Wrong e-mail or password.");
        }
        429 => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed logins: wait a minute.",
            );
        }
        status => {
            tracing::warn!(status, "console: the command API refused a login");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "The command API cannot log anyone in right now; try again in a moment.",
            );
        }
    }
    #[derive(Deserialize)]
    struct Issued {
        access_token: String,
        expires_in: u64,
    }
    let issued: Issued = answer
        .json()
        .await
        .map_err(|e| Refused::Failed(anyhow::anyhow!("reading the command API's token: {e}")))?;
    let admin = match console.tokens.verify(&issued.access_token) {
        Some(actor) if actor.is_admin() => actor.id,
        Some(_) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "This account is not an admin's: the console is for admins only.",
            );
        }
        None => {
            tracing::warn!(
                "console: a token from the command API does not verify here (is NEWSROOM_JWT_SECRET the same?)"
            );
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "The console cannot check the command API's tokens (their secrets differ).",
            );
        }
    };
    // The API's token is not kept: the console's own session stands for it.
    let lasts = std::time::Duration::from_secs(issued.expires_in).min(SESSION);
    let secret = open_session(&console, admin, lasts).await?;
    tracing::info!(admin = %admin, "console: session opened");
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/admin/consumers"))
        .insert_header((
            header::SET_COOKIE,
            format!(
                "{COOKIE}={secret}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}",
                lasts.as_secs()
            ),
        ))
        .finish())
}

pub(super) async fn logout(
    req: HttpRequest,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    same_origin(&req)?;
    close_session(&req, &console).await?;
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/admin/login"))
        .insert_header((
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0"),
        ))
        .finish())
}

// --- consumers -----------------------------------------------------------------------

/// The lines' colours, as the legend's classes c0..c5 in console.css.
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// A graph: one line per consumer.
struct Graph {
    title: &'static str,
    svg: String,
}

fn graph(
    title: &'static str,
    names: &[&'static str],
    history: &[Point],
    value: impl Fn(&Point, &Point, usize) -> f64,
) -> Graph {
    const W: f64 = 560.0;
    const H: f64 = 140.0;
    let mut lines = Vec::new();
    let mut top = 0.0_f64;
    for (i, _) in names.iter().enumerate() {
        let points: Vec<(f64, f64)> = history
            .windows(2)
            .map(|w| (w[1].at, value(&w[0], &w[1], i)))
            .collect();
        top = top.max(points.iter().map(|p| p.1).fold(0.0, f64::max));
        lines.push(points);
    }
    // One scale for every line.
    let scale = top.max(1.0);
    let mut svg = format!(
        "<svg class=\"graph\" viewBox=\"-2 -12 {} {}\" role=\"img\" aria-label=\"{title}\">",
        W + 60.0,
        H + 24.0
    );
    svg.push_str(&format!(
        "<line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" class=\"axis\"/>\
         <text x=\"{}\" y=\"4\" class=\"label\">{}</text><text x=\"{}\" y=\"{H}\" class=\"label\">0</text>",
        W + 4.0,
        human(scale),
        W + 4.0
    ));
    for (i, points) in lines.iter().enumerate() {
        let line = watch::polyline(points, W, H, scale);
        if !line.is_empty() {
            svg.push_str(&format!(
                "<polyline points=\"{line}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>",
                COLORS[i % COLORS.len()]
            ));
        }
    }
    svg.push_str("</svg>");
    Graph { title, svg }
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[derive(Template)]
#[template(path = "consumers_live.html")]
struct ConsumersLive {
    at: String,
    /// Seconds since the sample was taken.
    age: i64,
    consumers: Vec<Consumer>,
    kafka_error: Option<String>,
    graphs: Vec<Graph>,
    legend: Vec<&'static str>,
}

#[derive(Template)]
#[template(path = "consumers.html")]
struct Consumers {
    admin: String,
    live: ConsumersLive,
}

fn consumers_now(console: &Console) -> ConsumersLive {
    let (sample, history) = console.watch.look();
    let names = console.watch.names();
    let graphs = vec![
        graph("events applied a second", &names, &history, |a, b, i| {
            let dt = (b.at - a.at).max(0.001);
            match (a.values.get(i), b.values.get(i)) {
                (Some(x), Some(y)) => ((y.0 - x.0).max(0) as f64) / dt,
                _ => 0.0,
            }
        }),
        graph("lag (offsets)", &names, &history, |_, b, i| {
            b.values.get(i).map_or(0.0, |v| v.1 as f64)
        }),
    ];
    ConsumersLive {
        at: sample.at.map_or_else(
            || "sampling…".to_owned(),
            |at| at.format("%H:%M:%S UTC").to_string(),
        ),
        age: sample
            .at
            .map_or(0, |at| (chrono::Utc::now() - at).num_seconds().max(0)),
        consumers: sample.consumers.clone(),
        kafka_error: sample.kafka_error.clone(),
        graphs,
        legend: names,
    }
}

pub(super) async fn consumers(
    req: HttpRequest,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    let actor = admin(&req, &console).await?;
    if console.watch.look().0.at.is_none() {
        // The first look: wait for the first sample rather than show an empty page.
        console.watch.fresh(std::time::Duration::from_secs(5)).await;
    }
    page(&Consumers {
        admin: actor.id.to_string(),
        live: consumers_now(&console),
    })
}

pub(super) async fn consumers_live(
    req: HttpRequest,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    admin(&req, &console).await?;
    page(&consumers_now(&console))
}

// --- dead letters --------------------------------------------------------------------

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLetters {
    admin: String,
    rows: Vec<dead_letters::Summary>,
    notice: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Notice {
    asked: Option<String>,
}

pub(super) async fn dead_letters(
    req: HttpRequest,
    notice: web::Query<Notice>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    let actor = admin(&req, &console).await?;
    let rows = dead_letters::list(&console.pool, None).await?;
    // Only a consumer's name comes back in the notice: nothing a link could inject.
    let notice = notice.asked.as_deref().and_then(|asked| {
        let (verb, consumer) = asked.split_once(':')?;
        let (consumer, count) = consumer.split_once(':')?;
        let consumer = CONSUMERS.iter().find(|c| **c == consumer)?;
        let verb = ["retry", "skip"].into_iter().find(|v| *v == verb)?;
        Some(if count == "0" {
            format!("Nothing of {consumer} is parked for that aggregate any more.")
        } else {
            format!("Asked {consumer} to {verb}: it carries the request out between two batches.")
        })
    });
    page(&DeadLetters {
        admin: actor.id.to_string(),
        rows,
        notice,
    })
}

#[derive(Deserialize)]
pub(super) struct DeadLetterRequest {
    consumer: String,
    aggregate: String,
    action: String,
}

/// Records a retry or skip for one parked aggregate, as `newsroom dead-letters` does.
pub(super) async fn dead_letter_request(
    req: HttpRequest,
    form: web::Form<DeadLetterRequest>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    same_origin(&req)?;
    let actor = admin(&req, &console).await?;
    let Some(consumer) = CONSUMERS.iter().find(|c| **c == form.consumer) else {
        return Ok(problem(StatusCode::BAD_REQUEST, "No such consumer."));
    };
    if !matches!(form.action.as_str(), "retry" | "skip") || form.aggregate.len() > 200 {
        return Ok(problem(
            StatusCode::BAD_REQUEST,
            "Ask for retry or skip of one aggregate.",
        ));
    }
    let count =
        dead_letters::request(&console.pool, consumer, Some(&form.aggregate), &form.action).await?;
    tracing::info!(
        admin = %actor.id,
        consumer,
        aggregate = %form.aggregate,
        action = %form.action,
        aggregates = count,
        "console: dead-letter request recorded"
    );
    Ok(HttpResponse::SeeOther()
        .insert_header((
            header::LOCATION,
            format!(
                "/admin/dead-letters?asked={}:{consumer}:{}",
                form.action,
                u64::from(count > 0)
            ),
        ))
        .finish())
}

// --- replay --------------------------------------------------------------------------

struct ReplayRow {
    name: &'static str,
    active: i32,
    building: Option<watch::Building>,
    job: Option<String>,
    running: bool,
}

#[derive(Template)]
#[template(path = "replay_live.html")]
struct ReplayLive {
    rows: Vec<ReplayRow>,
}

#[derive(Template)]
#[template(path = "replay.html")]
struct Replay {
    admin: String,
    live: ReplayLive,
    notice: Option<String>,
}

fn replay_now(console: &Console) -> ReplayLive {
    let (sample, _) = console.watch.look();
    let jobs = console
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let rows = sample
        .consumers
        .iter()
        .map(|c| {
            let job = jobs.get(c.name);
            ReplayRow {
                name: c.name,
                active: c.active,
                building: c.building.clone(),
                running: matches!(job, Some(Job::Running(_))),
                job: job.map(|j| match j {
                    Job::Running(at) => format!("started here at {}", at.format("%H:%M:%S")),
                    Job::Done(at, Ok(what)) => format!("{what} at {}", at.format("%H:%M:%S")),
                    Job::Done(at, Err(why)) => {
                        format!("failed at {}: {why}", at.format("%H:%M:%S"))
                    }
                }),
            }
        })
        .collect();
    ReplayLive { rows }
}

pub(super) async fn replays(
    req: HttpRequest,
    notice: web::Query<Notice>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    let actor = admin(&req, &console).await?;
    if console.watch.look().0.at.is_none() {
        console.watch.fresh(std::time::Duration::from_secs(5)).await;
    }
    let notice = notice
        .asked
        .as_deref()
        .and_then(|m| CONSUMERS.iter().find(|c| **c == m))
        .map(|m| {
            format!("Replay of {m} started: the bar follows the new version until the switch.")
        });
    page(&Replay {
        admin: actor.id.to_string(),
        live: replay_now(&console),
        notice,
    })
}

pub(super) async fn replays_live(
    req: HttpRequest,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    admin(&req, &console).await?;
    page(&replay_now(&console))
}

#[derive(Deserialize)]
pub(super) struct ReplayRequest {
    model: String,
}

/// Starts `newsroom replay <model>` in this process: the model is rebuilt into a new version
/// and the query side switched to it.
pub(super) async fn start_replay(
    req: HttpRequest,
    form: web::Form<ReplayRequest>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    same_origin(&req)?;
    let actor = admin(&req, &console).await?;
    let Some(&model) = crate::PROJECTIONS.iter().find(|p| **p == form.model) else {
        return Ok(problem(StatusCode::BAD_REQUEST, "No such read model."));
    };
    // A build already under way (here, or by `newsroom replay` elsewhere) would be dropped
    // by a new one: refuse.
    let sample = console.watch.fresh(std::time::Duration::from_secs(5)).await;
    if let Some(b) = sample
        .consumers
        .iter()
        .find(|c| c.name == model)
        .and_then(|c| c.building.as_ref())
    {
        return Ok(problem(
            StatusCode::CONFLICT,
            &format!(
                "Version {} of {model} is being built already (or an interrupted replay left it): \
                 wait for it, or start over with `newsroom replay {model}`, which drops it.",
                b.version
            ),
        ));
    }
    {
        let mut jobs = console.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(jobs.get(model), Some(Job::Running(_))) {
            return Ok(problem(
                StatusCode::CONFLICT,
                &format!("A replay of {model} is running already."),
            ));
        }
        jobs.insert(model.to_owned(), Job::Running(chrono::Utc::now()));
    }
    tracing::info!(admin = %actor.id, model, "console: replay started");
    let (settings, console_ref) = (console.settings.clone(), console.clone());
    // The replay's future is not provably `Send` (a compiler limit on futures of trait
    // methods): a blocking thread drives it instead of a worker.
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        use futures::FutureExt as _;
        // A panic ends the job as failed, not as running forever.
        let outcome = runtime
            .block_on(
                std::panic::AssertUnwindSafe(crate::replay(&settings, model, true)).catch_unwind(),
            )
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the replay panicked (see the log)")));
        let done = match outcome {
            Ok(report) => {
                tracing::info!(
                    model,
                    old = report.old,
                    new = report.new,
                    events = report.events,
                    "console: replay switched"
                );
                Ok(format!(
                    "switched from version {} to {} ({} events, {:.0}/s)",
                    report.old,
                    report.new,
                    report.events,
                    report.rate()
                ))
            }
            Err(e) => {
                tracing::error!(model, error = format!("{e:#}"), "console: replay failed");
                Err(format!("{e:#}"))
            }
        };
        console_ref
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_owned(), Job::Done(chrono::Utc::now(), done));
    });
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, format!("/admin/replay?asked={model}")))
        .finish())
}

// --- events --------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "events.html")]
struct Events {
    admin: String,
    aggregate: String,
    found: Option<browse::Found>,
    error: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Search {
    aggregate: Option<String>,
}

pub(super) async fn events(
    req: HttpRequest,
    search: web::Query<Search>,
    console: web::Data<Console>,
) -> Result<HttpResponse, Refused> {
    let actor = admin(&req, &console).await?;
    let asked = search
        .aggregate
        .as_deref()
        .map(str::trim)
        .unwrap_or_default();
    let mut shown = Events {
        admin: actor.id.to_string(),
        aggregate: asked.chars().take(64).collect(),
        found: None,
        error: None,
    };
    if asked.is_empty() {
        return page(&shown);
    }
    let Ok(id) = uuid::Uuid::parse_str(asked) else {
        shown.error = Some("An aggregate id is a UUID (a user's, an article's).".into());
        return page(&shown);
    };
    // One search at a time: each reads whole partitions.
    let Ok(permit) = console.browsing.clone().try_acquire_owned() else {
        shown.error = Some("Another search is running; try again in a moment.".into());
        return page(&shown);
    };
    match browse::search(&console.settings.kafka, &console.registry, id, permit).await {
        Ok(found) => shown.found = Some(found),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "console: event search failed");
            shown.error = Some("The log could not be read; try again.".into());
        }
    }
    page(&shown)
}
