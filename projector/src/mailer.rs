//! Delivers the notification e-mails the live notifier put in `email_outbox`: each row is
//! leased, sent over SMTP and marked sent; a failure is retried with exponential backoff,
//! and after several failures in a row a circuit breaker stops trying for a cool-down, then
//! lets one trial through. A crash between sending and marking can send one e-mail twice;
//! nothing else does (ADR 11).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use newsroom_infra::metrics::EMAILS;
use newsroom_infra::settings::NotifySettings;
use sqlx::PgPool;
use tracing::Instrument as _;
use uuid::Uuid;

/// Rows leased per round.
const LEASE: i64 = 200;
/// E-mails in flight at once.
const SENDING: usize = 16;
/// How long a leased row is left alone by other mailers (and, after a crash, by the next
/// one).
const LEASE_SECS: f64 = 10.0;
/// Pause when nothing is due.
const IDLE: Duration = Duration::from_millis(200);

struct Due {
    user_id: Uuid,
    news_id: Uuid,
    title: String,
    category: String,
    attempts: i32,
    email: Option<String>,
    name: Option<String>,
    /// The publication's trace context (when traces are exported).
    trace: Option<String>,
}

/// Consecutive failures open the circuit for a cool-down; then one trial decides.
struct Breaker {
    failures: u32,
    threshold: u32,
    cooldown: Duration,
    open_until: Option<Instant>,
}

impl Breaker {
    fn allows(&self) -> bool {
        self.open_until.is_none_or(|until| Instant::now() >= until)
    }

    /// Whether the circuit is half-open: only one trial goes out.
    fn trial(&self) -> bool {
        self.open_until.is_some()
    }

    fn succeeded(&mut self) {
        if self.open_until.take().is_some() {
            tracing::info!("SMTP answers again; circuit closed");
        }
        self.failures = 0;
    }

    fn failed(&mut self) {
        self.failures += 1;
        if self.failures >= self.threshold {
            if self.open_until.is_none() {
                tracing::warn!(
                    failures = self.failures,
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "SMTP keeps failing; circuit open"
                );
            }
            self.open_until = Some(Instant::now() + self.cooldown);
        }
    }
}

/// The pause before try `attempts + 1` of an e-mail.
pub fn backoff(settings: &NotifySettings, attempts: i32) -> Duration {
    let factor = 1u64 << attempts.clamp(0, 30);
    Duration::from_millis(
        settings
            .retry_ms
            .saturating_mul(factor)
            .min(settings.retry_max_ms),
    )
}

/// Sends due e-mails until `shutdown` resolves.
pub async fn run(
    pool: PgPool,
    settings: NotifySettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(settings.smtp_url.expose())
        .context("parsing NEWSROOM_SMTP_URL")?
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let from: Mailbox = settings
        .from
        .parse()
        .context("parsing NEWSROOM_MAIL_FROM")?;
    let mut breaker = Breaker {
        failures: 0,
        threshold: settings.breaker_failures.max(1),
        cooldown: Duration::from_millis(settings.breaker_cooldown_ms),
        open_until: None,
    };
    tokio::pin!(shutdown);
    tracing::info!(
        smtp = newsroom_infra::settings::without_credentials(settings.smtp_url.expose()),
        "mailer started"
    );
    loop {
        let pause = if breaker.allows() {
            let limit = if breaker.trial() { 1 } else { LEASE };
            match round(&pool, &settings, &transport, &from, &mut breaker, limit).await {
                Ok(0) => IDLE,
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!(
                        error = without_addresses(&format!("{e:#}")),
                        "mailer round failed"
                    );
                    IDLE * 5
                }
            }
        } else {
            IDLE
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!("mailer stopped");
    Ok(())
}

/// Leases up to `limit` due e-mails and tries each; how many were due.
async fn round(
    pool: &PgPool,
    settings: &NotifySettings,
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    from: &Mailbox,
    breaker: &mut Breaker,
    limit: i64,
) -> anyhow::Result<usize> {
    let due: Vec<Due> = sqlx::query_as!(
        Due,
        r#"WITH leased AS (UPDATE email_outbox SET next_attempt_at = now() + make_interval(secs => $2)
           WHERE (user_id, news_id) IN (SELECT user_id, news_id FROM email_outbox
             WHERE sent_at IS NULL AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING user_id, news_id, title, category, attempts, trace)
         SELECT l.user_id AS "user_id!", l.news_id AS "news_id!", l.title AS "title!",
           l.category AS "category!", l.attempts AS "attempts!",
           CASE WHEN u.erased THEN NULL ELSE nullif(u.email, '') END AS "email?",
           u.name AS "name?", l.trace AS "trace?"
         FROM leased l LEFT JOIN users u ON u.id = l.user_id"#,
        limit,
        LEASE_SECS,
    )
    .fetch_all(pool)
    .await
    .context("leasing due e-mails")?;
    let leased_at = Instant::now();
    let count = due.len();
    // Compose each, then send up to SENDING at once over the transport's pooled
    // connections; outcomes are handled as they come.
    let mut sendable = Vec::with_capacity(count);
    for mail in due {
        let Some(address) = mail.email.clone() else {
            // Erased, or no address known: nothing to send, ever.
            mark(pool, &mail, None, "no address").await?;
            EMAILS.with_label_values(&["skipped"]).inc();
            continue;
        };
        match compose(from, &address, mail.name.as_deref(), &mail) {
            Ok(message) => sendable.push((mail, message)),
            Err(e) => {
                mark(pool, &mail, None, &without_addresses(&format!("{e:#}"))).await?;
                EMAILS.with_label_values(&["skipped"]).inc();
            }
        }
    }
    let mut outcomes = futures::stream::iter(sendable)
        .map(|(mail, message)| async move {
            // The send is a span of the publication's trace.
            let span = tracing::info_span!("send e-mail", news = %mail.news_id);
            if let Some(trace) = &mail.trace {
                newsroom_infra::trace::continue_from(&span, trace);
            }
            let outcome = transport
                .send(message)
                .instrument(span)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from);
            (mail, outcome)
        })
        .buffer_unordered(SENDING);
    while let Some((mail, outcome)) = outcomes.next().await {
        match outcome {
            Ok(()) => {
                breaker.succeeded();
                EMAILS.with_label_values(&["sent"]).inc();
                // The others sent in this round are marked all the same.
                if let Err(e) = mark_sent(pool, &mail, leased_at).await {
                    tracing::error!(user = %mail.user_id, news = %mail.news_id, error = format!("{e:#}"),
                        "a sent e-mail could not be marked; it will be sent again");
                }
            }
            Err(e) => {
                breaker.failed();
                let pause = backoff(settings, mail.attempts);
                // An SMTP server's reply may name the address: neither the log nor the
                // outbox keeps it.
                let error = without_addresses(&format!("{e:#}"));
                tracing::warn!(user = %mail.user_id, news = %mail.news_id, attempts = mail.attempts + 1,
                    retry_in_ms = pause.as_millis() as u64, error, "e-mail failed");
                sqlx::query!(
                    "UPDATE email_outbox SET attempts = attempts + 1, last_error = $3, \
                     next_attempt_at = now() + make_interval(secs => $4) WHERE user_id = $1 AND news_id = $2",
                    mail.user_id,
                    mail.news_id,
                    error,
                    pause.as_secs_f64(),
                )
                .execute(pool)
                .await
                .context("recording a failed e-mail")?;
                EMAILS.with_label_values(&["failed"]).inc();
            }
        }
    }
    Ok(count)
}

/// `text` with every word that holds an `@` (an e-mail address, as SMTP servers quote
/// them in their replies) replaced by `[address]`.
fn without_addresses(text: &str) -> String {
    let delimiter = |c: char| c.is_whitespace() || "<>()[]{},;:\"'".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if delimiter(c) {
            out.push_str(if word.contains('@') {
                "[address]"
            } else {
                &word
            });
            word.clear();
            out.push(c);
        } else {
            word.push(c);
        }
    }
    out.pop();
    out
}

fn compose(
    from: &Mailbox,
    address: &str,
    name: Option<&str>,
    mail: &Due,
) -> anyhow::Result<Message> {
    let to = Mailbox::new(
        name.map(str::to_owned),
        address.parse().context("the address")?,
    );
    Message::builder()
        .message_id(Some(message_id(mail)))
        .from(from.clone())
        .to(to)
        .subject(format!("New in {}: {}", mail.category, mail.title))
        .body(format!(
            "A new {} article was published: \"{}\".\n\nRead it at /v1/news/{}\n\nYou get this e-mail because you follow {} and turned e-mail notifications on.\n",
            mail.category, mail.title, mail.news_id, mail.category
        ))
        .context("composing the e-mail")
}

/// Marks a sent e-mail, retrying while PostgreSQL does not answer until most of the lease
/// taken at `leased_at` is used: giving up at once would leave the row due, and the e-mail
/// would be sent again once the lease ran out (by this or another notifier). Only a crash
/// between the SMTP server's acceptance and this mark, or an outage longer than the lease,
/// can send an e-mail twice; both copies carry the same Message-ID, so receivers can fold
/// them.
async fn mark_sent(pool: &PgPool, mail: &Due, leased_at: Instant) -> anyhow::Result<()> {
    let deadline = leased_at + Duration::from_secs_f64(LEASE_SECS * 0.8);
    loop {
        match mark(pool, mail, Some(()), "").await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(user = %mail.user_id, news = %mail.news_id, error = format!("{e:#}"),
                    "marking a sent e-mail failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.context("the e-mail was sent; it may be sent again")),
        }
    }
}

/// The Message-ID of the one e-mail about `news` to `user`: the same on every attempt.
fn message_id(mail: &Due) -> String {
    format!(
        "<{}.{}@newsroom>",
        mail.news_id.simple(),
        mail.user_id.simple()
    )
}

/// Marks an e-mail done: sent, or given up with `why`.
async fn mark(pool: &PgPool, mail: &Due, sent: Option<()>, why: &str) -> anyhow::Result<()> {
    sqlx::query!(
        "UPDATE email_outbox SET sent_at = now(), attempts = attempts + $3, last_error = nullif($4, '') \
         WHERE user_id = $1 AND news_id = $2",
        mail.user_id,
        mail.news_id,
        i32::from(sent.is_some()),
        why,
    )
    .execute(pool)
    .await
    .context("marking an e-mail")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_smtp_replies_are_left_out() {
        assert_eq!(
            without_addresses(
                "permanent error (550): 5.1.1 <ada@example.com>: Recipient address rejected"
            ),
            "permanent error (550): 5.1.1 <[address]>: Recipient address rejected"
        );
        assert_eq!(
            without_addresses("bob.x+news@mail.example rejected, \"eve@x.y\""),
            "[address] rejected, \"[address]\""
        );
        assert_eq!(
            without_addresses("connection refused "),
            "connection refused "
        );
        assert_eq!(without_addresses(""), "");
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let settings = NotifySettings {
            smtp_url: Default::default(),
            from: String::new(),
            retry_ms: 100,
            retry_max_ms: 1000,
            breaker_failures: 3,
            breaker_cooldown_ms: 10,
        };
        let ms: Vec<u128> = (0..6).map(|a| backoff(&settings, a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_a_success_closes_it() {
        let mut breaker = Breaker {
            failures: 0,
            threshold: 2,
            cooldown: Duration::from_secs(60),
            open_until: None,
        };
        breaker.failed();
        assert!(breaker.allows());
        breaker.failed();
        assert!(!breaker.allows(), "open after two failures in a row");
        breaker.open_until = Some(Instant::now());
        assert!(
            breaker.allows() && breaker.trial(),
            "half-open after the cool-down"
        );
        breaker.succeeded();
        assert!(
            breaker.allows() && !breaker.trial(),
            "closed after a success"
        );
    }
}
