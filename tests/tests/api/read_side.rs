//! Black-box tests of the read side's machinery: dead letters and parking, replay into a
//! new version while the query API serves, and the Redis and PostgreSQL paths agreeing.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use newsroom_infra::kafka::{Stream, best_effort_producer, dead_letter_topic};
use newsroom_tests::{ChildRole, TestApp, random_below, until};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::Method;
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::queries::{publish, query};

type TestResult = anyhow::Result<()>;

/// The ids of the published list (first page of 100).
async fn listed(app: &TestApp, consistency: Option<&str>) -> anyhow::Result<HashSet<String>> {
    let (status, page) = query(app, "/v1/news?limit=100", None, consistency).await?;
    anyhow::ensure!(status == S::OK, "list: {status} {page}");
    Ok(page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str().map(str::to_owned))
        .collect())
}

/// The ids of the published articles in the `news` read model (PostgreSQL); the lists are
/// answered from the `cache` model in Redis, a model of its own that parks nothing here.
async fn published_in_news_model(pool: &sqlx::PgPool) -> anyhow::Result<HashSet<String>> {
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id::text FROM news WHERE status = 'published'")
            .fetch_all(pool)
            .await?;
    Ok(ids.into_iter().map(|(id,)| id).collect())
}

#[tokio::test]
async fn a_garbage_record_and_an_event_that_fails_to_apply_are_dead_lettered_and_the_parked_aggregate_resumes_in_order_after_retry()
-> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let pool = app.pool().await?;
    // The operator's mistake this test makes: the news read model refuses a title.
    sqlx::query("ALTER TABLE news_v1.news ADD CONSTRAINT no_poison CHECK (title <> 'poison')")
        .execute(&pool)
        .await?;

    // Garbage on the news topic, under an aggregate key of its own.
    let garbage_key = Uuid::now_v7().to_string();
    let producer: FutureProducer = best_effort_producer(&app.settings.kafka).create()?;
    producer
        .send(
            FutureRecord::to(&Stream::News.topic(&app.settings.kafka))
                .key(&garbage_key)
                .payload(&b"\x00not avro at all"[..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    // An article whose creation the read model refuses, then edited and published.
    let body = json!({"category": "politics", "title": "poison", "content": "Text.", "tags": []});
    let poisoned = app.draft(&editor.token, &body).await?.0.to_string();
    let (status, _) = app
        .command(
            Method::PATCH,
            &format!("/v1/news/{poisoned}"),
            Some(&editor.token),
            Some(&json!({"title": "An honest title"})),
            Some(1),
        )
        .await?;
    assert_eq!(status, S::OK);
    let (status, _) = app
        .command(
            Method::POST,
            &format!("/v1/news/{poisoned}/publish"),
            Some(&editor.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::OK);

    // Other aggregates keep flowing, the parked one stays out.
    let healthy = publish(&app, &editor, "sports", &[]).await?;
    until(
        "a healthy article projected",
        Duration::from_secs(20),
        || async {
            Ok(published_in_news_model(&pool)
                .await?
                .contains(&healthy.id.to_string()))
        },
    )
    .await?;
    assert!(
        !published_in_news_model(&pool).await?.contains(&poisoned),
        "the parked article is not"
    );

    let listing = app
        .newsroom_cli(&["dead-letters", "list", "--consumer", "news"])
        .await?;
    let poisoned_line = listing
        .lines()
        .find(|l| l.contains(&poisoned))
        .unwrap_or_else(|| panic!("the failed article is listed:\n{listing}"));
    assert!(poisoned_line.contains("no_poison"), "{poisoned_line}");
    let parked: Vec<&str> = poisoned_line.split_whitespace().collect();
    assert_eq!(
        parked[6], "3",
        "drafted, edited and published are parked: {poisoned_line}"
    );
    let garbage_line = listing
        .lines()
        .find(|l| l.contains(&garbage_key))
        .unwrap_or_else(|| panic!("the garbage is listed:\n{listing}"));
    assert!(garbage_line.contains("cannot decode"), "{garbage_line}");

    // Each failure is also on the consumer's dead-letter topic, with its reason.
    let dead = app.records_of(&dead_letter_topic(&app.settings.kafka, "news"))?;
    let reasons: Vec<&str> = dead
        .iter()
        .flat_map(|r| r.headers.iter())
        .filter(|(k, _)| k == "newsroom.reason")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(dead.len(), 2, "one record per failure: {reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("no_poison")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("cannot decode")),
        "{reasons:?}"
    );

    // While the cause stands, a retry parks it again.
    let out = app
        .newsroom_cli(&["dead-letters", "retry", "news", "--aggregate", &poisoned])
        .await?;
    assert!(
        out.contains(&poisoned),
        "still parked after a failed retry:\n{out}"
    );

    // The operator fixes the cause and retries: the aggregate resumes, in order.
    sqlx::query("ALTER TABLE news_v1.news DROP CONSTRAINT no_poison")
        .execute(&pool)
        .await?;
    let out = app
        .newsroom_cli(&["dead-letters", "retry", "news", "--aggregate", &poisoned])
        .await?;
    assert!(!out.contains(&poisoned), "resumed:\n{out}");
    let (status, article) = query(&app, &format!("/v1/news/{poisoned}"), None, None).await?;
    assert_eq!(status, S::OK);
    assert_eq!(article["title"], "An honest title");
    assert_eq!(article["version"], 3);
    assert!(
        published_in_news_model(&pool).await?.contains(&poisoned),
        "in the news model once resumed"
    );
    let (version, status): (i64, String) =
        sqlx::query_as("SELECT version, status FROM news WHERE id = $1::uuid")
            .bind(&poisoned)
            .fetch_one(&pool)
            .await?;
    assert_eq!((version, status.as_str()), (3, "published"));

    // Garbage cannot be fixed: skipping it clears it.
    let out = app
        .newsroom_cli(&["dead-letters", "skip", "news", "--aggregate", &garbage_key])
        .await?;
    assert!(!out.contains(&garbage_key), "skipped:\n{out}");

    // Events of the resumed aggregate after the retry are applied as usual.
    let (status, _) = app
        .command(
            Method::POST,
            &format!("/v1/news/{poisoned}/archive"),
            Some(&editor.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status,): (String,) = sqlx::query_as("SELECT status FROM news WHERE id = $1::uuid")
            .bind(&poisoned)
            .fetch_one(&pool)
            .await?;
        if status == "archived" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "archive never projected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    app.stop().await
}

#[tokio::test]
async fn a_replay_builds_identical_read_models_while_readers_see_no_error_and_no_missing_article()
-> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, reader) = (app.editor().await?, app.reader().await?);
    let mut ids = Vec::new();
    let mut last = String::new();
    for i in 0..12 {
        let category = ["famous", "politics", "sports"][i % 3];
        let published = publish(&app, &editor, category, &["replayed"]).await?;
        ids.push(published.id.to_string());
        last = published.token;
    }
    // Reads, for history, counts and trending.
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..(i % 4) {
            let response = app
                .http
                .get(format!("{}/v1/news/{id}", app.query_url))
                .bearer_auth(&reader.token)
                .header("x-consistency-token", &last)
                .send()
                .await?;
            assert_eq!(response.status(), S::OK);
        }
    }
    let before = app.settled_read_models(Duration::from_secs(30)).await?;
    assert!(
        before
            .keys()
            .any(|k| k.starts_with("redis:cache:trending:")),
        "the snapshot covers Redis: {:?}",
        before.keys().collect::<Vec<_>>()
    );

    // Anonymous readers (no reads recorded) poll every query while the replays run.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = {
        let (stop, polls) = (stop.clone(), polls.clone());
        let (http, base, ids) = (app.http.clone(), app.query_url.clone(), ids.clone());
        let expected: HashSet<String> = ids.iter().cloned().collect();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                i += 1;
                for path in [
                    format!("/v1/news/{id}"),
                    "/v1/news?limit=100&tag=replayed".to_owned(),
                    "/v1/news/trending?limit=100".to_owned(),
                ] {
                    match http.get(format!("{base}{path}")).send().await {
                        Ok(r) if r.status() == S::OK => {
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            if path.contains("tag=replayed") {
                                let seen: HashSet<String> = body["items"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|n| n["id"].as_str().map(str::to_owned))
                                    .collect();
                                if seen != expected {
                                    failures.push(format!(
                                        "{path}: {} of {} listed",
                                        seen.len(),
                                        expected.len()
                                    ));
                                }
                            }
                        }
                        Ok(r) => failures.push(format!("{path}: {}", r.status())),
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            }
            failures
        })
    };
    for projection in newsroom::PROJECTIONS {
        app.newsroom_cli(&["replay", projection, "--quiet"]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = poller.await?;
    assert!(
        failures.is_empty(),
        "readers saw {} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(polls.load(Ordering::Relaxed) > 10, "the readers polled");

    let pool = app.pool().await?;
    let versions: Vec<(String, i32, Option<i32>)> =
        sqlx::query_as("SELECT projection, active, building FROM projection_versions ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        versions,
        vec![
            ("news".to_owned(), 2, None),
            ("notify".to_owned(), 2, None),
            ("reads".to_owned(), 2, None),
            ("users".to_owned(), 2, None)
        ]
    );
    let (old_schemas,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE '%\\_v1'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(old_schemas, 0, "the old versions are dropped");
    pool.close().await;

    let after = app.read_models().await?;
    assert_eq!(before.len(), after.len(), "the same tables and keys");
    for (key, rows) in &before {
        assert_eq!(Some(rows), after.get(key), "{key} differs after the replay");
    }
    // The replayed models keep serving and keep being fed.
    let fresh = publish(&app, &editor, "sports", &["replayed"]).await?;
    assert!(
        listed(&app, Some(&fresh.token))
            .await?
            .contains(&fresh.id.to_string())
    );
    let (status, _) = query(
        &app,
        &format!("/v1/news/{}", fresh.id),
        None,
        Some(&fresh.token),
    )
    .await?;
    assert_eq!(status, S::OK);
    app.stop().await
}

/// An editor drafting, editing and publishing, and a reader reading what was published,
/// until stopped; counts the reads the query API answered.
struct EditorialLoad {
    stop: Arc<AtomicBool>,
    found: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl EditorialLoad {
    async fn start(app: &TestApp) -> anyhow::Result<EditorialLoad> {
        let (editor, reader) = (app.editor().await?, app.reader().await?);
        let stop = Arc::new(AtomicBool::new(false));
        let found = Arc::new(AtomicU64::new(0));
        let (http, command, query) = (
            app.http.clone(),
            app.command_url.clone(),
            app.query_url.clone(),
        );
        let (editor, reader) = (editor.token.clone(), reader.token.clone());
        let task = {
            let (stop, found) = (stop.clone(), found.clone());
            tokio::spawn(async move {
                let mut drafted = 0u64;
                let mut published: Vec<String> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"category": "sports", "title": format!("Match {drafted}"), "content": "Text.", "tags": ["live"]});
                    let created: Value = http
                        .post(format!("{command}/v1/news"))
                        .bearer_auth(&editor)
                        .json(&body)
                        .send()
                        .await?
                        .json()
                        .await?;
                    let id = created["id"].as_str().unwrap_or_default().to_owned();
                    drafted += 1;
                    let edited = http
                        .patch(format!("{command}/v1/news/{id}"))
                        .bearer_auth(&editor)
                        .json(&json!({"title": format!("Match {drafted}, updated")}))
                        .send()
                        .await?;
                    anyhow::ensure!(edited.status() == S::OK, "edit: {}", edited.status());
                    let publication = http
                        .post(format!("{command}/v1/news/{id}/publish"))
                        .bearer_auth(&editor)
                        .send()
                        .await?;
                    anyhow::ensure!(
                        publication.status() == S::OK,
                        "publish: {}",
                        publication.status()
                    );
                    published.push(id);
                    for _ in 0..3 {
                        let id = &published[random_below(published.len() as u64) as usize];
                        // 404 while no projector is up is fine; a read is recorded on 200.
                        let read = http
                            .get(format!("{query}/v1/news/{id}"))
                            .bearer_auth(&reader)
                            .send()
                            .await?;
                        if read.status() == S::OK {
                            found.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(drafted)
            })
        };
        Ok(EditorialLoad { stop, found, task })
    }

    /// Some more load, until readers found articles (under a loaded test run the last
    /// projector may take a while to catch up); then stops, and says how many articles
    /// were drafted.
    async fn finish(self) -> anyhow::Result<u64> {
        let since = self.found.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        tokio::time::sleep(Duration::from_secs(3)).await;
        while self.found.load(Ordering::Relaxed) < since + 10
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let drafted = self.task.await??;
        anyhow::ensure!(drafted > 10, "too little load ({drafted} drafts)");
        Ok(drafted)
    }
}

/// Every read counted once (PostgreSQL and Redis), every article there, and the same read
/// models as a replay from scratch builds, row for row and key for key (the live
/// projector keeps running during the replays).
async fn read_models_equal_a_fresh_replay(app: &TestApp, drafted: u64) -> TestResult {
    let before = app.settled_read_models(Duration::from_secs(60)).await?;
    let reads = app.committed_records(Stream::Reads)?.len();
    assert!(reads > 0, "reads were recorded");
    let pool = app.pool().await?;
    let (counted, history, news): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(reads), 0)::bigint FROM news_read_counts), \
         (SELECT count(*) FROM reading_history), (SELECT count(*) FROM news)",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    eprintln!("{drafted} articles, {reads} reads");
    assert_eq!(counted as usize, reads, "read counts in PostgreSQL");
    assert_eq!(history as usize, reads, "reading history");
    assert_eq!(news as u64, drafted, "articles");
    let redis_counted: usize = before
        .iter()
        .filter(|(k, _)| k.starts_with("redis:cache:reads:"))
        .map(|(_, v)| v[0].parse::<usize>().unwrap_or(0))
        .sum();
    assert_eq!(redis_counted, reads, "read counts in Redis");
    // `newsroom verify` agrees, with the live projector running.
    for projection in ["users", "news", "reads", "cache"] {
        let said = app.newsroom_cli(&["verify", projection, "--quiet"]).await?;
        assert!(said.contains(" equals a fresh build"), "{said}");
    }
    for projection in ["users", "news", "reads", "cache"] {
        app.newsroom_cli(&["replay", projection, "--quiet"]).await?;
    }
    let after = app.read_models().await?;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same tables and keys"
    );
    for (key, rows) in &before {
        assert_eq!(
            Some(rows),
            after.get(key),
            "{key} differs from a fresh replay"
        );
    }
    Ok(())
}

#[tokio::test]
async fn verify_names_a_row_and_a_key_that_differ_from_a_fresh_build_and_leaves_nothing_behind()
-> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let mut last = None;
    for i in 0..4 {
        let category = ["famous", "politics", "sports"][i % 3];
        last = Some(publish(&app, &editor, category, &["verified"]).await?);
    }
    let last = last.expect("published");
    let (status, _) = query(
        &app,
        &format!("/v1/news/{}", last.id),
        None,
        Some(&last.token),
    )
    .await?;
    assert_eq!(status, S::OK);
    app.settled_read_models(Duration::from_secs(30)).await?;
    for projection in ["news", "cache"] {
        let said = app.newsroom_cli(&["verify", projection, "--quiet"]).await?;
        assert!(said.contains("version 1 equals a fresh build"), "{said}");
    }

    // Someone edits the read models by hand.
    let pool = app.pool().await?;
    let tampered = sqlx::query("UPDATE news SET title = 'tampered' WHERE id = $1")
        .bind(last.id)
        .execute(&pool)
        .await?
        .rows_affected();
    assert_eq!(tampered, 1);
    let mut redis = redis::Client::open(app.settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let root = newsroom_infra::redis::root(&app.settings.kafka, "cache");
    let (): () = redis::cmd("SET")
        .arg(format!("{root}:v1:stray"))
        .arg("left by hand")
        .query_async(&mut redis)
        .await?;

    for (projection, named) in [("news", "tampered"), ("cache", "stray: only in version 1")] {
        let mut command = app.newsroom("cli")?;
        command.args(["verify", projection, "--quiet"]);
        let output = tokio::task::spawn_blocking(move || command.output()).await??;
        let said = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "verify {projection}: {said}");
        assert!(
            said.contains(named),
            "verify {projection} names the difference: {said}"
        );
        assert!(
            said.contains("version 1 differs from a fresh build"),
            "{said}"
        );
    }
    // Nothing of the fresh builds is left, and version 1 still serves.
    let (building,): (Option<i32>,) =
        sqlx::query_as("SELECT building FROM projection_versions WHERE projection = 'news'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(building, None);
    let (schemas,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'news\\_v%'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(schemas, 1, "only news_v1 remains");
    let shadow_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{root}:v2:*"))
        .query_async(&mut redis)
        .await?;
    assert!(shadow_keys.is_empty(), "{shadow_keys:?}");
    let building: Option<String> = redis::cmd("GET")
        .arg(format!("{root}:building"))
        .query_async(&mut redis)
        .await?;
    assert_eq!(building, None);
    pool.close().await;
    app.stop().await
}

/// Tags of any spelling (quotes, backslashes, braces, commas, the word null) read back as
/// drafted: one event at a time (the live projector) and in runs of creations, whose
/// statement carries each row's tags as the text of an array (`postgres::text_array`).
#[tokio::test]
async fn tags_of_any_spelling_are_projected_as_drafted_one_at_a_time_and_in_runs() -> TestResult {
    use newsroom_events::news::{NewsDrafted, NewsEvent};
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let tricky = [
        r#"say "hi""#,
        r"back\slash",
        "a,b",
        "{brace}",
        "null",
        "two words",
        "ünï",
    ];
    let tricky: Vec<String> = tricky.map(str::to_owned).to_vec();
    // Rows of different tags, of different counts, none among them.
    let mut reversed = tricky.clone();
    reversed.reverse();
    let per_row: Vec<Vec<String>> = vec![tricky.clone(), Vec::new(), vec!["only".into()], reversed];
    let pool = app.pool().await?;

    // A run of creations in one statement, as the projector writes it (rolled back).
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL search_path TO news_v1, public")
        .execute(&mut *tx)
        .await?;
    let author = Uuid::now_v7();
    let run: Vec<NewsEvent> = per_row
        .iter()
        .map(|tags| {
            NewsEvent::Drafted(NewsDrafted {
                metadata: newsroom_events::EventMetadata {
                    event_id: Uuid::now_v7(),
                    aggregate_id: Uuid::now_v7(),
                    aggregate_version: 1,
                    occurred_at: newsroom_events::metadata::micros(chrono::Utc::now()),
                    correlation_id: "test".into(),
                    causation_id: "test".into(),
                    actor_id: Some(author),
                    schema_version: 0,
                },
                author_id: author,
                category: newsroom_events::Category::Sports,
                title: "Tagged".into(),
                content: "Text.".into(),
                tags: tags.clone(),
            })
        })
        .collect();
    newsroom_projector::news::insert_drafts(&mut tx, &run).await?;
    for (event, tags) in run.iter().zip(&per_row) {
        let (stored,): (Vec<String>,) = sqlx::query_as("SELECT tags FROM news WHERE id = $1")
            .bind(event.metadata().aggregate_id)
            .fetch_one(&mut *tx)
            .await?;
        assert_eq!(&stored, tags);
    }
    tx.rollback().await?;

    // Drafts through the API: the live projector applies them as they come, a fresh
    // build (verify) reads them back to back, in runs.
    let mut drafted = Vec::new();
    for (i, tags) in per_row.iter().cycle().take(8).enumerate() {
        let body = json!({"category": "politics", "title": format!("Tagged {i}"), "content": "Text.", "tags": tags});
        let (id, _) = app.draft(&editor.token, &body).await?;
        drafted.push((id, tags.clone()));
    }
    let ids: Vec<Uuid> = drafted.iter().map(|(id, _)| *id).collect();
    until(
        "the drafts in the news model",
        Duration::from_secs(30),
        || {
            let (pool, ids) = (pool.clone(), ids.clone());
            async move {
                let (count,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM news WHERE id = ANY($1)")
                        .bind(&ids)
                        .fetch_one(&pool)
                        .await?;
                Ok(count as usize == ids.len())
            }
        },
    )
    .await?;
    for (id, tags) in &drafted {
        let (stored,): (Vec<String>,) = sqlx::query_as("SELECT tags FROM news WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
        assert_eq!(&stored, tags);
    }
    let said = app.newsroom_cli(&["verify", "news", "--quiet"]).await?;
    assert!(said.contains("version 1 equals a fresh build"), "{said}");
    pool.close().await;
    app.stop().await
}

/// The projector's even runs, the last one among them, apply each model's partitions in
/// two lanes (two group members in one process, ADR 34): runs of one and of two lanes
/// hand their partitions to each other.
#[tokio::test]
async fn a_projector_killed_ten_times_while_events_flow_leaves_read_models_equal_to_a_fresh_replay()
-> TestResult {
    let app = TestApp::spawn_with(newsroom::Roles {
        command_api: true,
        query_api: true,
        ..newsroom::Roles::NONE
    })
    .await?;
    let lanes = |run: usize| if run.is_multiple_of(2) { "2" } else { "1" };
    let start =
        |run| ChildRole::start_with(&app, "project", run, &["--consumer-lanes", lanes(run)]);
    let mut projector = start(0)?;
    let load = EditorialLoad::start(&app).await?;
    for run in 1..=10 {
        tokio::time::sleep(Duration::from_millis(300 + random_below(700))).await;
        projector.kill()?;
        projector = start(run)?;
    }
    let drafted = load.finish().await?;
    read_models_equal_a_fresh_replay(&app, drafted).await?;
    // The last run's lanes share each model's partitions (a lane may join its group after
    // the other took everything: its share comes with the next rebalance).
    for consumer in ["users", "news", "reads", "cache"] {
        newsroom_tests::until(
            &format!("both lanes of the last run holding {consumer} partitions"),
            Duration::from_secs(60),
            || async {
                let lanes: HashSet<i64> = projector
                    .logged()?
                    .iter()
                    .filter(|f| {
                        f["consumer"] == consumer
                            && f["holding"].as_str().is_some_and(|h| !h.is_empty())
                    })
                    .filter_map(|f| f["lane"].as_i64())
                    .collect();
                Ok(lanes == HashSet::from([0, 1]))
            },
        )
        .await?;
    }
    drop(projector);
    app.stop().await
}

/// The partitions of `consumer` that `projector` said it holds last, if it said.
fn holding(projector: &ChildRole, consumer: &str) -> anyhow::Result<Option<Vec<String>>> {
    Ok(projector
        .logged()?
        .iter()
        .rfind(|f| f["consumer"] == consumer && f["holding"].is_string())
        .map(|f| {
            f["holding"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        }))
}

#[tokio::test]
async fn two_projectors_share_the_partitions_and_one_takes_all_when_the_other_is_killed()
-> TestResult {
    let app = TestApp::spawn_with(newsroom::Roles {
        command_api: true,
        query_api: true,
        ..newsroom::Roles::NONE
    })
    .await?;
    let partitions = app.settings.kafka.partitions as usize;
    let load = EditorialLoad::start(&app).await?;
    // librdkafka's consumer-group log in each projector's, for the failure's message.
    let start = |run| {
        ChildRole::start_with_env(
            &app,
            "project",
            run,
            &[],
            &[
                ("NEWSROOM_KAFKA_DEBUG", "cgrp"),
                (
                    "NEWSROOM_LOG",
                    "info,librdkafka=debug,rdkafka=warn,sqlx=warn",
                ),
            ],
        )
    };
    let (first, second) = (start(0)?, start(1)?);
    // Each model's group shares out its partitions: both hold some, none is held twice.
    for consumer in ["users", "news", "reads", "cache"] {
        let shared = newsroom_tests::until(
            &format!("the {consumer} partitions shared by two projectors"),
            Duration::from_secs(60),
            || async {
                let (Some(a), Some(b)) = (holding(&first, consumer)?, holding(&second, consumer)?)
                else {
                    return Ok(false);
                };
                let all: HashSet<&String> = a.iter().chain(&b).collect();
                Ok(!a.is_empty() && !b.is_empty() && all.len() == a.len() + b.len())
            },
        )
        .await;
        if shared.is_err() {
            for (run, projector) in [(0, &first), (1, &second)] {
                eprintln!(
                    "projector {run}, the end of its log:\n{}",
                    projector.log_tail(80)
                );
            }
        }
        shared?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.kill()?;
    // The group notices the silence and gives the survivor every partition.
    for (consumer, topics) in [("users", 1), ("news", 1), ("reads", 1), ("cache", 3)] {
        newsroom_tests::until(
            &format!("the survivor holding every {consumer} partition"),
            Duration::from_secs(60),
            || async {
                Ok(holding(&second, consumer)?.is_some_and(|h| h.len() == topics * partitions))
            },
        )
        .await?;
    }
    let drafted = load.finish().await?;
    read_models_equal_a_fresh_replay(&app, drafted).await?;
    drop(second);
    app.stop().await
}

#[tokio::test]
async fn a_statement_that_outlasts_the_statement_timeout_is_cancelled_but_a_migration_is_not_bound_by_it()
-> TestResult {
    let mut postgres = newsroom_infra::Settings::local_defaults().postgres;
    let admin_url = postgres.url.clone();
    let database = format!("test_timeout_{}", Uuid::now_v7().simple());
    postgres.url = newsroom_infra::db::create_database(&admin_url, &database).await?;
    let checked = async {
        // Migrations run on a connection of their own, without the limit: under a limit of
        // 2 ms, creating every table of this empty database would be cancelled otherwise.
        postgres.statement_timeout_ms = 2;
        let tight = newsroom_infra::db::connect(&postgres).await?;
        newsroom_infra::db::migrate(&tight).await?;
        tight.close().await;
        postgres.statement_timeout_ms = 300;
        let pool = newsroom_infra::db::connect(&postgres).await?;
        let (limit,): (String,) = sqlx::query_as("SHOW statement_timeout")
            .fetch_one(&pool)
            .await?;
        anyhow::ensure!(limit == "300ms", "statement_timeout is {limit}");
        let started = std::time::Instant::now();
        let slow = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await;
        let Err(sqlx::Error::Database(error)) = slow else {
            anyhow::bail!("a 5 s statement was not cancelled: {slow:?}");
        };
        anyhow::ensure!(
            error.code().as_deref() == Some("57014"),
            "cancelled with {:?}: {error}",
            error.code()
        );
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3),
            "the cancellation took {:?}",
            started.elapsed()
        );
        // The pool goes on serving after a cancellation.
        let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&pool).await?;
        anyhow::ensure!(one == 1);
        pool.close().await;
        Ok(())
    }
    .await;
    newsroom_infra::db::drop_database(&admin_url, &database).await?;
    checked
}

/// A model whose writes are spelled by the events' names: `c <doc>` creates `doc` joined
/// to author `a`'s name, `r <doc>` counts a read of it, `name <text>` renames author `a`
/// (creating the name at version 1, changing it after).
struct Spelled;

impl newsroom_projector::redis_store::Model for Spelled {
    fn name(&self) -> &'static str {
        "spelled"
    }

    fn topics(&self) -> Vec<String> {
        Vec::new()
    }

    fn announces(&self) -> bool {
        true
    }

    async fn writes(
        &self,
        event: newsroom_infra::codec::Decoded,
        out: &mut newsroom_projector::redis_store::Writes,
    ) -> anyhow::Result<()> {
        use newsroom_infra::read_models::field;
        match event.name.split_once(' ') {
            Some(("c", doc)) => out.create_joined(
                doc,
                1,
                &[(field::TITLE, format!("title of {doc}"))],
                &newsroom_projector::redis_store::Join {
                    field: field::AUTHOR_NAME,
                    from: "name:a",
                    from_field: field::NAME,
                    members: "authored:a",
                },
            ),
            Some(("r", doc)) => out.incr(&format!("reads:{doc}")),
            Some(("name", text)) => {
                let version = if text == "first" { 1 } else { 2 };
                out.hash(
                    "name:a",
                    version,
                    version == 1,
                    &[(field::NAME, text.into())],
                );
                out.propagate("name:a", field::NAME, field::AUTHOR_NAME, "authored:a");
            }
            _ => anyhow::bail!("unspelled event {}", event.name),
        }
        Ok(())
    }
}

#[tokio::test]
async fn the_batch_script_joins_creations_in_log_order_and_announces_only_documents_that_were_there()
-> TestResult {
    use newsroom_projector::consumer::{Batch, Committed, Mode, Offsets, Store as _};
    use redis::AsyncCommands as _;

    let settings = newsroom_infra::Settings::local_defaults();
    let root = format!("test_{}:spelled", Uuid::now_v7().simple());
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let mut redis = client.get_connection_manager().await?;
    let store =
        newsroom_projector::redis_store::RedisStore::new(Spelled, redis.clone(), root.clone());
    let mut offsets = Offsets::new();
    let commit = |mode: Mode, from: Offsets, names: &[&str]| {
        let to: Offsets = [(
            ("spelled".to_owned(), 0),
            from.values().sum::<i64>() + names.len() as i64,
        )]
        .into_iter()
        .collect();
        let events = names
            .iter()
            .map(|n| newsroom_infra::codec::Decoded {
                name: (*n).to_owned(),
                value: apache_avro::types::Value::Null,
                trace: None,
            })
            .collect();
        let store = &store;
        async move {
            let committed = store
                .commit(
                    mode,
                    1,
                    Batch {
                        events,
                        from: &from,
                        to: &to,
                        caught_up: true,
                    },
                )
                .await
                .map_err(|_| anyhow::anyhow!("the batch failed"))?;
            anyhow::ensure!(
                matches!(committed, Committed::Done),
                "the batch was refused"
            );
            Ok::<_, anyhow::Error>(to)
        }
    };
    let doc = |d: &str| format!("{root}:v1:{d}");
    let outcome = async {
        use newsroom_infra::read_models::field;
        // A replay's batches: a rename in the middle of one reaches the documents created
        // before it (in this batch and the one before), one created after it reads the new
        // name, and a counter written between creations changes neither.
        let _: () = redis.set(format!("{root}:building"), 1).await?;
        offsets = commit(Mode::Replay(1), offsets, &["name first", "c d1", "c d2"]).await?;
        offsets = commit(
            Mode::Replay(1),
            offsets,
            &["c d3", "r d3", "c d4", "name second", "c d5"],
        )
        .await?;
        // More documents for one set in one batch than one SADD takes.
        let bulk: Vec<String> = (0..1100).map(|i| format!("c b{i}")).collect();
        let bulk: Vec<&str> = bulk.iter().map(String::as_str).collect();
        offsets = commit(Mode::Replay(1), offsets, &bulk).await?;
        for d in ["d1", "d2", "d3", "d4", "d5", "b0", "b511", "b512", "b1099"] {
            let (title, version, name): (Option<String>, Option<String>, Option<String>) =
                redis::cmd("HMGET")
                    .arg(doc(d))
                    .arg(field::TITLE)
                    .arg(field::VERSION)
                    .arg(field::AUTHOR_NAME)
                    .query_async(&mut redis)
                    .await?;
            anyhow::ensure!(
                title == Some(format!("title of {d}"))
                    && version.as_deref() == Some("1")
                    && name.as_deref() == Some("second"),
                "{d}: {title:?} {version:?} {name:?}"
            );
        }
        let reads: Option<i64> = redis.get(doc("reads:d3")).await?;
        anyhow::ensure!(reads == Some(1), "reads of d3: {reads:?}");
        let members: Vec<String> = redis.smembers(doc("authored:a")).await?;
        let members: HashSet<String> = members.into_iter().collect();
        anyhow::ensure!(
            members.len() == 1105
                && ["d1", "d5", "b0", "b1099"]
                    .iter()
                    .all(|d| members.contains(*d)),
            "the author's set holds {} documents",
            members.len()
        );

        // A live batch announces a document written again (here: the name copied into
        // it), not one it creates: no query process can have kept that one.
        let _: () = redis.set(format!("{root}:active"), 1).await?;
        let mut subscription = client.get_async_pubsub().await?;
        subscription.subscribe(format!("{root}:changed")).await?;
        commit(Mode::Live, offsets.clone(), &["c d6", "c d1"]).await?;
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut subscription.on_message()),
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("no announcement"))?;
        let announced: String = message.get_payload()?;
        anyhow::ensure!(announced == "1 d1", "announced {announced:?}");
        let created: Option<String> = redis.hget(doc("d6"), field::AUTHOR_NAME).await?;
        anyhow::ensure!(created.as_deref() == Some("second"), "d6: {created:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let keys: Vec<String> = redis.keys(format!("{root}:*")).await?;
    if !keys.is_empty() {
        let _: () = redis.del(keys).await?;
    }
    outcome
}
