//! `newsroom dead-letters list|retry|skip`.

use std::time::{Duration, Instant};

use newsroom_infra::Settings;
use newsroom_infra::kafka::CONSUMERS;
use newsroom_projector::dead_letters;

/// What to do.
pub enum Action {
    /// Show the parked aggregates.
    List {
        /// Of one consumer only.
        consumer: Option<String>,
    },
    /// Ask a consumer to retry one aggregate (or all), skipping the failed event first if
    /// `skip`.
    Request {
        /// The consumer.
        consumer: String,
        /// The aggregate; all of the consumer's if `None`.
        aggregate: Option<String>,
        /// Drop the failed event first.
        skip: bool,
    },
}

/// How long `retry` and `skip` wait for the consumer to carry the request out.
const WAIT: Duration = Duration::from_secs(30);

/// Runs `action` and prints its outcome.
pub async fn run(settings: &Settings, action: Action) -> anyhow::Result<()> {
    let pool = newsroom_infra::db::connect(&settings.postgres).await?;
    newsroom_infra::db::migrate(&pool).await?;
    match action {
        Action::List { consumer } => print(&pool, consumer.as_deref()).await,
        Action::Request {
            consumer,
            aggregate,
            skip,
        } => {
            anyhow::ensure!(
                CONSUMERS.contains(&consumer.as_str()),
                "no consumer named {consumer}; choose one of {}",
                CONSUMERS.join(", ")
            );
            let verb = if skip { "skip" } else { "retry" };
            let count = dead_letters::request(&pool, &consumer, aggregate.as_deref(), verb).await?;
            if count == 0 {
                println!(
                    "nothing of {consumer} is parked{}",
                    match &aggregate {
                        Some(a) => format!(" for {a}"),
                        None => String::new(),
                    }
                );
                return Ok(());
            }
            println!("asked {consumer} to {verb} {count} aggregate(s); waiting for it");
            let started = Instant::now();
            while dead_letters::pending(&pool, &consumer).await? > 0 {
                if started.elapsed() > WAIT {
                    anyhow::bail!(
                        "{consumer} has not carried the request out after {} s: is it running? (the request stays recorded)",
                        WAIT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("done; still parked:");
            print(&pool, Some(&consumer)).await
        }
    }
}

async fn print(pool: &sqlx::PgPool, consumer: Option<&str>) -> anyhow::Result<()> {
    let rows = dead_letters::list(pool, consumer).await?;
    if rows.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:<8} {:>3} {:<36} {:<32} {:>9} {:>7} {:>8}  REASON",
        "CONSUMER", "VER", "AGGREGATE", "TOPIC", "PARTITION", "OFFSET", "PARKED"
    );
    for r in rows {
        println!(
            "{:<8} {:>3} {:<36} {:<32} {:>9} {:>7} {:>8}  {}{}",
            r.consumer,
            r.version,
            r.aggregate,
            r.topic,
            r.partition,
            r.offset,
            r.parked,
            r.reason.unwrap_or_else(|| "(waiting)".into()),
            r.action
                .map(|a| format!(" [{a} requested]"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
