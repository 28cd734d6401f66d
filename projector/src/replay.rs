//! `newsroom replay <projection>`: rebuilds a read model from offset 0 into a new version
//! beside the live one, which keeps serving; once the new version has caught up with the
//! live consumer, holds the live consumer for a moment, lets the new version reach exactly
//! the live offsets, switches the query side over in one atomic step, and drops the old
//! version (ADR 8).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use newsroom_infra::kafka::read_committed_consumer;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::consumer::{self, Context, Mode, Offsets, Progress, Store};
use crate::postgres::{Projection, Tables, schema};

/// How long a switch may hold the live consumer.
pub const HOLD: Duration = Duration::from_secs(30);

/// A store whose read model can be rebuilt into a new version.
pub trait Versioned: Store + Sized + 'static {
    /// Drops what an interrupted replay left, then creates the next version (empty) and
    /// marks it as being built; returns (active version, new version).
    fn prepare(&self) -> impl Future<Output = anyhow::Result<(i32, i32)>> + Send;
    /// The version a replay is building (or an interrupted one left), if any.
    fn building(&self) -> impl Future<Output = anyhow::Result<Option<i32>>> + Send;
    /// Holds the live consumer's writes (for at most [`HOLD`]).
    fn hold_live(&self, new: i32) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Lets the live consumer write again.
    fn release_live(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Makes `new` the active version, atomically, if the hold still stands.
    fn switch(&self, old: i32, new: i32) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Removes a version's data, offsets and dead letters.
    fn drop_version(&self, version: i32) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Compares versions `a` and `b` row by row (key by key).
    fn differences(
        &self,
        a: i32,
        b: i32,
    ) -> impl Future<Output = anyhow::Result<Differences>> + Send;
}

/// How many differences a comparison names (it counts them all).
const NAMED: usize = 50;

/// What a comparison of two versions of a read model found.
#[derive(Debug, Default, Clone)]
pub struct Differences {
    /// Rows (keys) compared, counted in the first version.
    pub compared: u64,
    /// Rows (keys) in one version and not, or not the same, in the other.
    pub count: u64,
    /// The first [`NAMED`] of them, each in a line.
    pub named: Vec<String>,
}

impl Differences {
    /// Counts `count` differences, naming those of `named` there is room for.
    pub fn note(&mut self, count: u64, named: impl IntoIterator<Item = String>) {
        self.count += count;
        let room = NAMED.saturating_sub(self.named.len());
        self.named.extend(named.into_iter().take(room));
    }
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The version replaced.
    pub old: i32,
    /// The version built.
    pub new: i32,
    /// Events applied to the new version.
    pub events: u64,
    /// Time from start to switch.
    pub elapsed: Duration,
}

impl Report {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn covers(progress: &Offsets, live: &Offsets) -> bool {
    live.iter()
        .all(|(position, next)| progress.get(position).is_some_and(|p| p >= next))
}

/// The last offsets of `topics` (what a full replay reads up to, about).
fn log_end(context: &Context, topics: &[String]) -> anyhow::Result<i64> {
    let consumer: BaseConsumer =
        read_committed_consumer(&context.kafka, "newsroom-replay-watermarks")
            .create()
            .context("creating a metadata consumer")?;
    let mut total = 0;
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .context("reading topic metadata")?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .context("reading watermarks")?;
                total += high - low;
            }
        }
    }
    Ok(total)
}

/// How a replay shows its progress: nothing (`--quiet`), a bar on a terminal, or one plain
/// line a second when stderr is a file or a pipe (logs, CI).
enum Shown {
    Nothing,
    Bar(indicatif::ProgressBar, &'static str),
    Lines(Instant, &'static str),
}

impl Shown {
    /// `verb` names the work: replay or verify.
    fn new(quiet: bool, total: i64, verb: &'static str) -> Self {
        use std::io::IsTerminal as _;
        if quiet {
            Shown::Nothing
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total.max(0) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {percent:>3}% {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Shown::Bar(bar, verb)
        } else {
            // The first line comes after a second, like every other.
            Shown::Lines(Instant::now(), verb)
        }
    }

    /// Shows where the replay stands (a line at most once a second; the bar always).
    fn update(&mut self, name: &str, new: i32, progress: &Progress, total: i64, started: Instant) {
        match self {
            Shown::Nothing => {}
            Shown::Bar(bar, verb) => {
                let (done, rate, _) = measure(progress, total, started);
                bar.set_prefix(format!("{verb} {name} v{new}"));
                bar.set_position(done.clamp(0, total.max(0)) as u64);
                bar.set_message(format!("{} events, {rate:.0} events/s", progress.events));
            }
            Shown::Lines(last, verb) => {
                if last.elapsed() >= Duration::from_secs(1) {
                    line(verb, name, new, progress, total, started);
                    *last = Instant::now();
                }
            }
        }
    }

    /// The last word: the bar is cleared and one plain line stays either way.
    fn finish(self, name: &str, new: i32, progress: &Progress, total: i64, started: Instant) {
        let verb = match self {
            Shown::Nothing => return,
            Shown::Bar(bar, verb) => {
                bar.finish_and_clear();
                verb
            }
            Shown::Lines(_, verb) => verb,
        };
        line(verb, name, new, progress, total, started);
    }

    /// Clears a bar, leaving the terminal as it was.
    fn clear(&self) {
        if let Shown::Bar(bar, _) = self {
            bar.finish_and_clear();
        }
    }
}

/// (offsets done, events per second, seconds left if known).
fn measure(progress: &Progress, total: i64, started: Instant) -> (i64, f64, Option<f64>) {
    let elapsed = started.elapsed().as_secs_f64().max(1e-3);
    let rate = progress.events as f64 / elapsed;
    let done: i64 = progress.offsets.values().sum();
    let left = (total - done).max(0);
    let eta = (rate > 0.0).then(|| left as f64 / rate);
    (done, rate, eta)
}

fn line(verb: &str, name: &str, new: i32, progress: &Progress, total: i64, started: Instant) {
    let (done, rate, eta) = measure(progress, total, started);
    let eta = eta.map_or_else(|| "unknown".to_owned(), |s| format!("{s:.0} s"));
    let percent = if total > 0 {
        (done as f64 * 100.0 / total as f64).min(100.0)
    } else {
        100.0
    };
    eprintln!(
        "{verb} {name} v{new}: {} events, {percent:.0}% of the log, {rate:.0} events/s, ETA {eta}",
        progress.events
    );
}

/// The session lock that keeps two rebuilds (replay or verify) of one read model apart; it
/// is held while the connection is, which is taken out of the pool and closed when dropped.
async fn lock(pool: &PgPool, name: &str) -> anyhow::Result<sqlx::PgConnection> {
    let mut lock = pool.acquire().await.context("connecting to PostgreSQL")?;
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock(hashtext('newsroom replay ' || $1)) AS "locked!""#,
        name
    )
    .fetch_one(&mut *lock)
    .await
    .context("taking the replay lock")?;
    anyhow::ensure!(locked, "another replay or verify of {name} is running");
    Ok(lock.detach())
}

/// Replays `store`'s read model into a new version and switches to it. `pool` holds the
/// lock that keeps two replays of one read model apart.
pub async fn replay<S: Versioned>(
    store: S,
    context: Context,
    pool: &PgPool,
    quiet: bool,
) -> anyhow::Result<Report> {
    let name = store.name();
    let _lock = lock(pool, name).await?;
    let (old, new) = store.prepare().await?;
    tracing::info!(projection = name, old, new, "replay started");
    let total = log_end(&context, &store.topics())?;
    let started = Instant::now();
    let store = std::sync::Arc::new(store);
    let (progress_tx, mut progress) = watch::channel(Progress::default());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let worker = {
        let (store, context) = (store.clone(), context.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            consumer::run(Shared(store), Mode::Replay(new), context, progress_tx, stop).await
        })
    };
    let mut shown = Shown::new(quiet, total, "replay");
    let outcome: anyhow::Result<()> = async {
        loop {
            // Catch up with the live consumer first, while it keeps serving.
            loop {
                if worker.is_finished() {
                    anyhow::bail!("the replay consumer stopped");
                }
                let (_, live) = store.open(Mode::Live).await?;
                if covers(&progress.borrow().offsets, &live) {
                    break;
                }
                shown.update(name, new, &progress.borrow(), total, started);
                let _ = tokio::time::timeout(Duration::from_millis(100), progress.changed()).await;
            }
            // Hold the live consumer, reach exactly its offsets, switch.
            store.hold_live(new).await?;
            let held = Instant::now();
            let (_, live) = store.open(Mode::Live).await?;
            while !covers(&progress.borrow().offsets, &live) && held.elapsed() < HOLD / 2 {
                let _ = tokio::time::timeout(Duration::from_millis(50), progress.changed()).await;
            }
            if covers(&progress.borrow().offsets, &live) {
                return Ok(());
            }
            store.release_live().await?;
        }
    }
    .await;
    let _ = stop_tx.send(true);
    let stopped = worker.await.context("joining the replay consumer")?;
    let finished = outcome.and(stopped);
    let finished = match finished {
        Ok(()) => store.switch(old, new).await,
        Err(e) => Err(e),
    };
    if let Err(e) = finished {
        if let Shown::Bar(bar, _) = &shown {
            bar.abandon();
        }
        let _ = store.release_live().await;
        let _ = store.drop_version(new).await;
        return Err(e.context(format!(
            "replay of {name} failed; version {old} still serves"
        )));
    }
    let report = Report {
        old,
        new,
        events: progress.borrow().events,
        elapsed: started.elapsed(),
    };
    store.drop_version(old).await?;
    shown.finish(name, new, &progress.borrow(), total, started);
    if !quiet {
        eprintln!(
            "replay {name}: version {new} serves now ({} events in {:.1} s, {:.0} events/s); version {old} dropped",
            report.events,
            report.elapsed.as_secs_f64(),
            report.rate()
        );
    }
    tracing::info!(
        projection = name,
        old,
        new,
        events = report.events,
        "replay switched"
    );
    Ok(report)
}

/// What `newsroom verify` found.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The version that serves, which was checked.
    pub active: i32,
    /// Records the fresh build read (fetched again by each round, so an upper bound).
    pub events: u64,
    /// The comparison at the live consumer's offsets.
    pub differences: Differences,
    /// Time from start to verdict.
    pub elapsed: Duration,
}

/// A round of the fresh build shorter than this ends the rounds run beside the live
/// consumer; the last one runs while the live consumer is held.
const SHORT_ROUND: Duration = Duration::from_secs(1);

/// At most this many rounds beside the live consumer (one that outpaces the build keeps
/// every round long); the held round then covers what is left.
const ROUNDS: usize = 10;

/// Builds a fresh copy of `store`'s read model from the log into a shadow version and
/// compares it with the version that serves, at exactly the offsets the live consumer has
/// applied; the shadow is dropped whatever happens. The live consumer keeps serving while
/// the shadow catches up in rounds (each stops below what the live consumer had applied
/// when it began), and is held only for the last short round and the comparison.
pub async fn verify<S: Versioned>(
    store: S,
    context: Context,
    pool: &PgPool,
    quiet: bool,
) -> anyhow::Result<Verdict> {
    let name = store.name();
    let _lock = lock(pool, name).await?;
    let (active, shadow) = store.prepare().await?;
    tracing::info!(projection = name, active, shadow, "verify started");
    let total = log_end(&context, &store.topics())?;
    let started = Instant::now();
    let store = std::sync::Arc::new(store);
    let mut shown = Shown::new(quiet, total, "verify");
    let mut events = 0;
    let outcome: anyhow::Result<Differences> = async {
        for _ in 0..ROUNDS {
            let (_, live) = store.open(Mode::Live).await?;
            let round = Instant::now();
            events += build_below(&store, shadow, &live, &context, &mut |p| {
                shown.update(name, shadow, p, total, started);
            })
            .await?;
            if round.elapsed() < SHORT_ROUND {
                break;
            }
        }
        store.hold_live(shadow).await?;
        let (version, live) = store.open(Mode::Live).await?;
        anyhow::ensure!(
            version == active,
            "{name} switched to version {version} while it was verified"
        );
        // The held round is bounded as a replay's is; then a fresh hold for the
        // comparison, and the live consumer must not have moved under either.
        events += tokio::time::timeout(
            HOLD / 2,
            build_below(&store, shadow, &live, &context, &mut |_| {}),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the last round outlasted {} s while the live consumer was held; run verify again",
                (HOLD / 2).as_secs()
            )
        })??;
        store.hold_live(shadow).await?;
        let (_, held) = store.open(Mode::Live).await?;
        anyhow::ensure!(
            held == live,
            "the live consumer moved while it was held; run verify again"
        );
        let differences = store.differences(active, shadow).await?;
        let (_, after) = store.open(Mode::Live).await?;
        anyhow::ensure!(
            after == live,
            "the live consumer moved during the comparison (it outlasted the hold of {} s); run verify again",
            HOLD.as_secs()
        );
        Ok(differences)
    }
    .await;
    let released = store.release_live().await;
    let dropped = store.drop_version(shadow).await;
    shown.clear();
    let differences = outcome.context(format!("verify of {name} failed"))?;
    released?;
    dropped?;
    let verdict = Verdict {
        active,
        events,
        differences,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        projection = name,
        active,
        events,
        compared = verdict.differences.compared,
        differences = verdict.differences.count,
        "verify finished"
    );
    Ok(verdict)
}

/// Runs the shadow's consumer from its stored offsets until it has applied everything
/// below `ceiling`; returns the events it applied.
async fn build_below<S: Versioned>(
    store: &std::sync::Arc<S>,
    shadow: i32,
    ceiling: &Offsets,
    context: &Context,
    shown: &mut impl FnMut(&Progress),
) -> anyhow::Result<u64> {
    let (tx, mut progress) = watch::channel(Progress::default());
    let mut watched = progress.clone();
    let reached = async move {
        let _ = watched.wait_for(|p| covers(&p.offsets, ceiling)).await;
    };
    let run = consumer::run_below(
        Shared(store.clone()),
        shadow,
        ceiling,
        context.clone(),
        tx,
        reached,
    );
    tokio::pin!(run);
    loop {
        tokio::select! {
            finished = &mut run => {
                finished?;
                return Ok(progress.borrow().events);
            }
            _ = progress.changed() => shown(&progress.borrow_and_update()),
        }
    }
}

/// A store shared between the replay's consumer and its driver.
struct Shared<S>(std::sync::Arc<S>);

impl<S: Store> Store for Shared<S> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn topics(&self) -> Vec<String> {
        self.0.topics()
    }
    fn open(&self, mode: Mode) -> impl Future<Output = anyhow::Result<(i32, Offsets)>> + Send {
        self.0.open(mode)
    }
    fn commit(
        &self,
        mode: Mode,
        version: i32,
        batch: consumer::Batch<'_>,
    ) -> impl Future<Output = Result<consumer::Committed, consumer::Failure>> + Send {
        self.0.commit(mode, version, batch)
    }
}

/// The base tables of a schema.
async fn tables_of(pool: &PgPool, schema: &str) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"SELECT table_name::text AS "table!" FROM information_schema.tables
           WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY 1"#,
        schema
    )
    .fetch_all(pool)
    .await
    .context("listing a version's tables")
}

/// Identifiers built here come from information_schema and static names; quoting keeps
/// them identifiers whatever they hold.
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

async fn execute(pool: impl sqlx::PgExecutor<'_>, statement: String) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
        .execute(pool)
        .await
        .with_context(|| format!("running {statement}"))?;
    Ok(())
}

impl<P: Projection + 'static> Versioned for Tables<P> {
    async fn building(&self) -> anyhow::Result<Option<i32>> {
        let building = sqlx::query_scalar!(
            "SELECT building FROM projection_versions WHERE projection = $1",
            self.name()
        )
        .fetch_one(self.pool())
        .await
        .context("reading the projection's versions")?;
        Ok(building)
    }

    async fn prepare(&self) -> anyhow::Result<(i32, i32)> {
        let pool = self.pool();
        let versions = sqlx::query!(
            "SELECT active, building FROM projection_versions WHERE projection = $1",
            self.name()
        )
        .fetch_one(pool)
        .await
        .context("reading the projection's versions")?;
        let (active, building) = (versions.active, versions.building);
        if let Some(left) = building {
            tracing::warn!(
                projection = self.name(),
                version = left,
                "dropping what an interrupted replay left"
            );
            self.drop_version(left).await?;
        }
        let new = active + 1;
        self.drop_version(new).await?;
        let (old_schema, new_schema) = (schema(self.name(), active), schema(self.name(), new));
        let mut tx = pool.begin().await?;
        execute(&mut *tx, format!("CREATE SCHEMA {}", quoted(&new_schema))).await?;
        for table in tables_of(pool, &old_schema).await? {
            execute(
                &mut *tx,
                format!(
                    "CREATE TABLE {}.{} (LIKE {}.{} INCLUDING ALL)",
                    quoted(&new_schema),
                    quoted(&table),
                    quoted(&old_schema),
                    quoted(&table)
                ),
            )
            .await?;
        }
        sqlx::query!(
            "UPDATE projection_versions SET building = $2, switching_until = NULL WHERE projection = $1",
            self.name(),
            new,
        )
            .execute(&mut *tx)
            .await?;
        tx.commit().await.context("creating the new version")?;
        Ok((active, new))
    }

    async fn hold_live(&self, new: i32) -> anyhow::Result<()> {
        // Waits for the live batch in flight (it shares this row), then holds the next ones.
        let held = sqlx::query!(
            "UPDATE projection_versions SET switching_until = now() + make_interval(secs => $3) \
             WHERE projection = $1 AND building = $2",
            self.name(),
            new,
            HOLD.as_secs_f64(),
        )
        .execute(self.pool())
        .await
        .context("holding the live consumer")?
        .rows_affected();
        anyhow::ensure!(
            held == 1,
            "version {new} of {} is no longer being built",
            self.name()
        );
        Ok(())
    }

    async fn release_live(&self) -> anyhow::Result<()> {
        sqlx::query!(
            "UPDATE projection_versions SET switching_until = NULL WHERE projection = $1",
            self.name(),
        )
        .execute(self.pool())
        .await
        .context("releasing the live consumer")?;
        Ok(())
    }

    async fn switch(&self, old: i32, new: i32) -> anyhow::Result<()> {
        let pool = self.pool();
        let mut tx = pool.begin().await?;
        let versions = sqlx::query!(
            r#"SELECT active, building, coalesce(switching_until > now(), false) AS "held!"
               FROM projection_versions WHERE projection = $1 FOR UPDATE"#,
            self.name()
        )
        .fetch_one(&mut *tx)
        .await?;
        anyhow::ensure!(
            versions.active == old && versions.building == Some(new) && versions.held,
            "the switch of {} lost its hold on the live consumer",
            self.name()
        );
        let new_schema = schema(self.name(), new);
        for table in tables_of(pool, &new_schema).await? {
            execute(
                &mut *tx,
                format!(
                    "CREATE OR REPLACE VIEW public.{} AS SELECT * FROM {}.{}",
                    quoted(&table),
                    quoted(&new_schema),
                    quoted(&table)
                ),
            )
            .await?;
        }
        sqlx::query!(
            "UPDATE projection_versions SET active = $2, building = NULL, switching_until = NULL WHERE projection = $1",
            self.name(),
            new,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await.context("switching versions")?;
        Ok(())
    }

    async fn differences(&self, a: i32, b: i32) -> anyhow::Result<Differences> {
        let pool = self.pool();
        let (first, second) = (schema(self.name(), a), schema(self.name(), b));
        let (in_first, in_second) = (
            tables_of(pool, &first).await?,
            tables_of(pool, &second).await?,
        );
        let mut found = Differences::default();
        for table in in_second.iter().filter(|t| !in_first.contains(t)) {
            found.note(1, [format!("table {table}: only in version {b}")]);
        }
        for table in &in_first {
            if !in_second.contains(table) {
                found.note(1, [format!("table {table}: only in version {a}")]);
                continue;
            }
            let (rows,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {}.{}",
                quoted(&first),
                quoted(table)
            )))
            .fetch_one(pool)
            .await
            .context("counting rows")?;
            found.compared += rows as u64;
            // One pass over both: whole rows as JSON, so every column counts, each row
            // +1 in the first version and -1 in the second; what does not sum to zero
            // differs (n > 0: only in the first, n times; n < 0: only in the second).
            let differing: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "WITH d AS (SELECT r, sum(n)::bigint AS n FROM ( \
                   SELECT to_jsonb(t) AS r, 1 AS n FROM {first}.{table} t \
                   UNION ALL SELECT to_jsonb(t), -1 FROM {second}.{table} t) x \
                 GROUP BY r HAVING sum(n) <> 0) \
                 SELECT r::text, n, sum(abs(n)) OVER ()::bigint FROM d ORDER BY r LIMIT {NAMED}",
                first = quoted(&first),
                second = quoted(&second),
                table = quoted(table)
            )))
            .fetch_all(pool)
            .await
            .context("comparing a table")?;
            let total = differing.first().map_or(0, |(_, _, total)| *total);
            found.note(
                total as u64,
                differing.into_iter().map(|(row, n, _)| {
                    let version = if n > 0 { a } else { b };
                    format!("{table}: only in version {version} ({}x): {row}", n.abs())
                }),
            );
        }
        Ok(found)
    }

    async fn drop_version(&self, version: i32) -> anyhow::Result<()> {
        let pool = self.pool();
        let active = sqlx::query_scalar!(
            "SELECT active FROM projection_versions WHERE projection = $1",
            self.name()
        )
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(
            version != active,
            "refusing to drop the active version of {}",
            self.name()
        );
        let mut tx = pool.begin().await?;
        execute(
            &mut *tx,
            format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quoted(&schema(self.name(), version))
            ),
        )
        .await?;
        sqlx::query!(
            "DELETE FROM projection_offsets WHERE projection = $1 AND version = $2",
            self.name(),
            version,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM dead_letters WHERE consumer = $1 AND version = $2",
            self.name(),
            version,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE projection_versions SET building = NULL WHERE projection = $1 AND building = $2",
            self.name(),
            version,
        )
            .execute(&mut *tx)
            .await?;
        tx.commit().await.context("dropping a version")?;
        Ok(())
    }
}
