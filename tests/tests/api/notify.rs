//! Black-box tests of the recommender and the notifier: ranked recommendations with their
//! reasons, inbox entries and e-mails (over the local SMTP server), replays, erasure.

use std::time::Duration;

use newsroom_tests::{TestApp, TestUser, consistency_token, mails_to, until};
use reqwest::Method;
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::queries::query;

/// How long a test waits for what happens asynchronously.
const WAIT: Duration = Duration::from_secs(30);

type TestResult = anyhow::Result<()>;

/// Drafts and publishes an article; its id and the publication's consistency token.
async fn publish(
    app: &TestApp,
    editor: &TestUser,
    category: &str,
    title: &str,
    tags: &[&str],
) -> anyhow::Result<(String, String)> {
    let body = json!({"category": category, "title": title, "content": "Text.", "tags": tags});
    let (id, _) = app.draft(&editor.token, &body).await?;
    let token = app.publish(&editor.token, id).await?;
    Ok((id.to_string(), token))
}

/// POSTs `/v1/news/{id}/{action}`; the consistency token.
async fn transition(
    app: &TestApp,
    editor: &TestUser,
    id: &str,
    action: &str,
) -> anyhow::Result<String> {
    let response = app
        .http
        .post(format!("{}/v1/news/{id}/{action}", app.command_url))
        .bearer_auth(&editor.token)
        .send()
        .await?;
    consistency_token(&response, action)
}

async fn recommendations(
    app: &TestApp,
    user: &TestUser,
    consistency: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let path = format!("/v1/users/{}/recommendations?limit=50", user.id);
    let (status, body) = query(app, &path, Some(&user.token), consistency).await?;
    anyhow::ensure!(status == S::OK, "recommendations: {status} {body}");
    Ok(body["items"].as_array().cloned().unwrap_or_default())
}

async fn inbox(app: &TestApp, user: &TestUser, consistency: Option<&str>) -> anyhow::Result<Value> {
    let path = format!("/v1/users/{}/notifications?limit=100", user.id);
    let (status, body) = query(app, &path, Some(&user.token), consistency).await?;
    anyhow::ensure!(status == S::OK, "notifications: {status} {body}");
    Ok(body)
}

#[tokio::test]
async fn recommendations_rank_unread_articles_by_the_tags_and_category_a_reader_reads() -> TestResult
{
    let app = TestApp::spawn().await?;
    let (editor, reader, other) = (
        app.editor().await?,
        app.reader().await?,
        app.reader().await?,
    );
    let mut read = Vec::new();
    for i in 0..3 {
        read.push(
            publish(
                &app,
                &editor,
                "sports",
                &format!("Match {i}"),
                &["football"],
            )
            .await?
            .0,
        );
    }
    let (football_sports, _) =
        publish(&app, &editor, "sports", "Cup final", &["football", "cup"]).await?;
    let (football_politics, _) =
        publish(&app, &editor, "politics", "Stadium vote", &["football"]).await?;
    let (tennis, _) = publish(&app, &editor, "sports", "Open", &["tennis"]).await?;
    let (unrelated, last) = publish(&app, &editor, "famous", "Gala", &["cinema"]).await?;
    for id in &read {
        let response = app
            .http
            .get(format!("{}/v1/news/{id}", app.query_url))
            .bearer_auth(&reader.token)
            .header("x-consistency-token", &last)
            .send()
            .await?;
        assert_eq!(response.status(), S::OK);
    }
    // Reads are recorded asynchronously: wait until the three show.
    until("the reads to reach the recommender", WAIT, || async {
        let items = recommendations(&app, &reader, None).await?;
        Ok(items
            .first()
            .is_some_and(|i| i["reasons"].as_array().is_some_and(|r| r.len() == 2))
            && items
                .iter()
                .all(|i| !read.contains(&i["news"]["id"].as_str().unwrap_or_default().to_owned())))
    })
    .await?;
    let items = recommendations(&app, &reader, None).await?;
    let ids: Vec<&str> = items
        .iter()
        .map(|i| i["news"]["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids.len(), 4, "every unread published article: {items:#?}");
    assert_eq!(ids[0], football_sports, "football and sports first");
    // Football and sports weigh the same (three reads each): the newer publication first.
    assert_eq!(ids[1..3], [tennis.as_str(), football_politics.as_str()]);
    assert_eq!(ids[3], unrelated, "nothing in common last");
    let reasons = |i: usize| -> Vec<&str> {
        items[i]["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let mut first = reasons(0);
    first.sort_unstable();
    assert_eq!(first, ["football", "sports"]);
    assert_eq!(reasons(1), ["sports"]);
    assert_eq!(reasons(2), ["football"]);
    assert!(reasons(3).is_empty());
    let score = |i: usize| items[i]["score"].as_f64().unwrap_or_default();
    assert!(
        (score(0) - 6.0).abs() < 0.01,
        "three fresh reads of each: {}",
        score(0)
    );
    assert!((score(1) - 3.0).abs() < 0.01 && score(3) == 0.0);
    assert_eq!(items[0]["news"]["title"], "Cup final");
    assert!(
        items[0]["news"].get("content").is_none(),
        "lists leave content out"
    );

    // Unpublishing removes an article at once (with the command's token).
    let from_postgres = app.query_answers("recommendations", "postgres").await?;
    let token = transition(&app, &editor, &football_sports, "unpublish").await?;
    let items = recommendations(&app, &reader, Some(&token)).await?;
    assert!(
        items
            .iter()
            .all(|i| i["news"]["id"] != football_sports.as_str())
    );
    assert_eq!(items.len(), 3);

    // A further read leaves the list as soon as the recommender has it (the ranking this
    // process kept is for the reads before it).
    let response = app
        .http
        .get(format!("{}/v1/news/{tennis}", app.query_url))
        .bearer_auth(&reader.token)
        .send()
        .await?;
    assert_eq!(response.status(), S::OK);
    until(
        "the further read to leave the recommendations",
        WAIT,
        || async {
            let items = recommendations(&app, &reader, None).await?;
            Ok(items.len() == 2 && items.iter().all(|i| i["news"]["id"] != tennis.as_str()))
        },
    )
    .await?;
    // Every ranking since came from Redis.
    assert!(app.query_answers("recommendations", "redis").await? > 0);
    assert_eq!(
        app.query_answers("recommendations", "postgres").await?,
        from_postgres
    );

    // Self or admin only; another user is refused; unknown parameters are checked.
    let path = format!("/v1/users/{}/recommendations", reader.id);
    assert_eq!(
        query(&app, &path, Some(&other.token), None).await?.0,
        S::FORBIDDEN
    );
    assert_eq!(query(&app, &path, None, None).await?.0, S::UNAUTHORIZED);
    let admin = app.admin().await?;
    assert_eq!(query(&app, &path, Some(&admin.token), None).await?.0, S::OK);
    let bad = format!("{path}?limit=0");
    assert_eq!(
        query(&app, &bad, Some(&reader.token), None).await?.0,
        S::BAD_REQUEST
    );
    app.stop().await
}

#[tokio::test]
async fn a_follower_gets_one_inbox_entry_and_one_email_per_article_of_their_category_and_none_on_replay()
-> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, follower, bystander) = (
        app.editor().await?,
        app.reader().await?,
        app.reader().await?,
    );
    let followed = app.follow(&follower, &["politics"]).await?;
    let body = inbox(&app, &follower, Some(&followed)).await?;
    assert_eq!(
        (
            body["items"].as_array().map(Vec::len),
            &body["unread_count"]
        ),
        (Some(0), &json!(0))
    );

    let title = format!("Budget vote {}", Uuid::now_v7().simple());
    let (politics, token) = publish(&app, &editor, "politics", &title, &[]).await?;
    let body = inbox(&app, &follower, Some(&token)).await?;
    let items = body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["news_id"], politics.as_str());
    assert_eq!(items[0]["title"], title.as_str());
    assert_eq!(items[0]["category"], "politics");
    assert_eq!(body["unread_count"], 1);
    until("the e-mail", WAIT, || async {
        Ok(mails_to(&follower.email)?.len() == 1)
    })
    .await?;
    let mail = &mails_to(&follower.email)?[0];
    assert!(mail.subject.contains(&title), "{mail:?}");
    assert!(
        mail.body.contains(&title) && mail.body.contains(&politics),
        "{mail:?}"
    );

    // Another category: nothing. Unpublish and publish again: no second notification.
    let (_, token) = publish(&app, &editor, "sports", "Derby", &[]).await?;
    transition(&app, &editor, &politics, "unpublish").await?;
    let republished = transition(&app, &editor, &politics, "publish").await?;
    for consistency in [&token, &republished] {
        let body = inbox(&app, &follower, Some(consistency)).await?;
        assert_eq!(body["items"].as_array().map(Vec::len), Some(1), "{body}");
    }
    let body = inbox(&app, &bystander, Some(&republished)).await?;
    assert_eq!(
        body["items"].as_array().map(Vec::len),
        Some(0),
        "a user who follows nothing"
    );

    // Marking read zeroes the count.
    let response = app
        .http
        .post(format!(
            "{}/v1/users/{}/notifications/read",
            app.command_url, follower.id
        ))
        .bearer_auth(&follower.token)
        .send()
        .await?;
    assert_eq!(response.status(), S::NO_CONTENT);
    let read = response.headers()["x-consistency-token"]
        .to_str()?
        .to_owned();
    let body = inbox(&app, &follower, Some(&read)).await?;
    assert_eq!(
        (
            body["unread_count"].as_i64(),
            body["items"].as_array().map(Vec::len)
        ),
        (Some(0), Some(1))
    );

    // A replay of the notifier rebuilds the same inbox and sends nothing.
    let before = inbox(&app, &follower, None).await?;
    app.newsroom_cli(&["replay", "notify", "--quiet"]).await?;
    assert_eq!(inbox(&app, &follower, None).await?, before);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mails_to(&follower.email)?.len(), 1, "one e-mail in all");
    assert!(mails_to(&bystander.email)?.is_empty());

    // Only the user or an admin sees an inbox.
    let path = format!("/v1/users/{}/notifications", follower.id);
    assert_eq!(
        query(&app, &path, Some(&bystander.token), None).await?.0,
        S::FORBIDDEN
    );
    app.stop().await
}

#[tokio::test]
async fn an_erased_user_gets_nothing_more_and_their_inbox_is_removed() -> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, follower, admin) = (app.editor().await?, app.reader().await?, app.admin().await?);
    let followed = app.follow(&follower, &["sports"]).await?;
    let (_, published) = publish(&app, &editor, "sports", "Before erasure", &[]).await?;
    // The follow is on the users stream, the publication on the news stream.
    let token = newsroom_tests::merge_tokens(&[&followed, &published])?;
    assert_eq!(
        inbox(&app, &follower, Some(&token)).await?["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let (status, _) = app
        .command(
            Method::DELETE,
            &format!("/v1/users/{}", follower.id),
            Some(&follower.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    let (_, token) = publish(&app, &editor, "sports", "After erasure", &[]).await?;
    let pool = app.pool().await?;
    let path = format!("/v1/users/{}/notifications", follower.id);
    // The publication's token covers the news stream; the erasure is on the users stream,
    // which the users projection may apply a moment later.
    until("the erasure to reach the read side", WAIT, || async {
        let (status, _) = query(&app, &path, Some(&admin.token), Some(&token)).await?;
        Ok(status == S::NOT_FOUND)
    })
    .await?;
    // The notifier reads the users stream apart from the news stream too.
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql)
                .bind(follower.id)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(n)
        }
    };
    until("their inbox entries to be gone", WAIT, || async {
        Ok(count("SELECT count(*) FROM notify_inbox WHERE user_id = $1").await? == 0)
    })
    .await?;
    until("no e-mail to wait for them", WAIT, || async {
        Ok(
            count("SELECT count(*) FROM email_outbox WHERE user_id = $1 AND sent_at IS NULL")
                .await?
                == 0,
        )
    })
    .await?;
    pool.close().await;
    app.stop().await
}

#[tokio::test]
async fn a_notifier_killed_ten_times_while_articles_are_published_leaves_one_entry_per_follower_and_article()
-> TestResult {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use newsroom_tests::{ChildRole, random_below};
    let app = TestApp::spawn_with(newsroom::Roles {
        command_api: true,
        query_api: true,
        projector: true,
        ..newsroom::Roles::NONE
    })
    .await?;
    let editor = app.editor().await?;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let user = app.reader().await?;
        app.follow(&user, &["politics"]).await?;
        followers.push(user);
    }
    let mut notifier = ChildRole::start(&app, "notify", 0)?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let (app_http, command, token) = (
            app.http.clone(),
            app.command_url.clone(),
            editor.token.clone(),
        );
        tokio::spawn(async move {
            let mut published = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"category": "politics", "title": format!("Session {}", published.len()), "content": "Text."});
                let created: Value = app_http
                    .post(format!("{command}/v1/news"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await?
                    .json()
                    .await?;
                let id = created["id"].as_str().unwrap_or_default().to_owned();
                let response = app_http
                    .post(format!("{command}/v1/news/{id}/publish"))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == S::OK, "publish: {}", response.status());
                published.push(id);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(published)
        })
    };
    for run in 1..=10 {
        tokio::time::sleep(Duration::from_millis(200 + random_below(500))).await;
        notifier.kill()?;
        notifier = ChildRole::start(&app, "notify", run)?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let published: HashSet<String> = load.await??.into_iter().collect();
    assert!(
        published.len() > 10,
        "articles were published during the kills: {}",
        published.len()
    );
    for user in &followers {
        until("every notification", WAIT, || async {
            let body = inbox(&app, user, None).await?;
            Ok(body["items"].as_array().map(Vec::len) == Some(published.len().min(100)))
        })
        .await?;
    }
    let pool = app.pool().await?;
    for user in &followers {
        let rows: Vec<(Uuid,)> =
            sqlx::query_as("SELECT news_id FROM notify_inbox WHERE user_id = $1")
                .bind(user.id)
                .fetch_all(&pool)
                .await?;
        let got: HashSet<String> = rows.iter().map(|(id,)| id.to_string()).collect();
        assert_eq!(rows.len(), got.len(), "no entry twice");
        assert_eq!(got, published, "one entry per article");
    }
    // Every e-mail goes out once the last notifier runs.
    until("every e-mail", WAIT, || async {
        let (pending,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM email_outbox WHERE sent_at IS NULL")
                .fetch_one(&pool)
                .await?;
        Ok(pending == 0)
    })
    .await?;
    let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM email_outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        outbox as usize,
        published.len() * followers.len(),
        "one e-mail per follower and article"
    );
    for user in &followers {
        let subjects: HashSet<String> = mails_to(&user.email)?
            .into_iter()
            .map(|m| m.subject)
            .collect();
        assert_eq!(
            subjects.len(),
            published.len(),
            "every article e-mailed to {}",
            user.email
        );
    }
    pool.close().await;
    drop(notifier);
    app.stop().await
}

/// Where `needles` occur (as text, or as the hex of their bytes, as a `bytea` column shows
/// them) in every row of every table of the database, every Redis key of the deployment and
/// every record (key, value, headers) of every topic of the deployment.
async fn personal_data_left(app: &TestApp, needles: &[String]) -> anyhow::Result<Vec<String>> {
    let patterns: Vec<String> = needles
        .iter()
        .flat_map(|n| {
            let hex: String = n.bytes().map(|b| format!("{b:02x}")).collect();
            [n.to_lowercase(), hex]
        })
        .collect();
    let hit = |text: &str| {
        let text = text.to_lowercase();
        patterns.iter().any(|p| text.contains(p.as_str()))
    };
    let mut found = Vec::new();
    let pool = app.pool().await?;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(&pool)
    .await?;
    for (schema, table) in tables {
        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT to_jsonb(t)::text FROM \"{schema}\".\"{table}\" t"
        )))
        .fetch_all(&pool)
        .await?;
        found.extend(
            rows.into_iter()
                .filter(|(row,)| hit(row))
                .map(|(row,)| format!("postgres {schema}.{table}: {row}")),
        );
    }
    pool.close().await;
    let mut redis = redis::Client::open(app.settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let prefix = format!("{}:", app.settings.kafka.topic_prefix);
    for (key, values) in newsroom_infra::redis::dump(&mut redis, &prefix).await? {
        if hit(&key) || values.iter().any(|v| hit(v)) {
            found.push(format!("redis {key}: {values:?}"));
        }
    }
    for topic in newsroom_infra::kafka::deployment_topics(&app.settings.kafka) {
        // A blocking read: the app's tasks go on on the runtime's other worker.
        for record in tokio::task::block_in_place(|| app.records_of(&topic))? {
            let text = format!(
                "{} {} {:?}",
                String::from_utf8_lossy(&record.key),
                String::from_utf8_lossy(&record.payload),
                record.headers
            );
            let hex: String = record.payload.iter().map(|b| format!("{b:02x}")).collect();
            if hit(&text) || hit(&hex) {
                found.push(format!("kafka {topic}: {text}"));
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_erasure_no_store_yields_the_name_or_the_email() -> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, admin) = (app.editor().await?, app.admin().await?);
    let tag = Uuid::now_v7().simple().to_string();
    let name = format!("Zebulon Quirk {}", &tag[20..]);
    let email = format!("zebulon.{tag}@example.com");
    let password = "a long enough password";
    // Registered with an Idempotency-Key, so that its outcome is recorded in the log too.
    let response = app
        .http
        .post(format!("{}/v1/users", app.command_url))
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .json(&json!({"name": name, "email": email, "password": password}))
        .send()
        .await?;
    anyhow::ensure!(response.status() == S::CREATED, "{}", response.status());
    let created: Value = response.json().await?;
    let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
    let token = app
        .login(&email, password)
        .await?
        .map_err(|s| anyhow::anyhow!("login: {s}"))?;
    let user = TestUser {
        id,
        email: email.clone(),
        password: password.into(),
        token,
    };
    // Everything a user leaves behind: follows, an inbox entry and an e-mail, reads.
    app.follow(&user, &["sports"]).await?;
    let title = format!("Before erasure {tag}");
    let (article, published) = publish(&app, &editor, "sports", &title, &["erasure"]).await?;
    let (status, _) = query(
        &app,
        &format!("/v1/news/{article}"),
        Some(&user.token),
        Some(&published),
    )
    .await?;
    anyhow::ensure!(status == S::OK, "read: {status}");
    until("the e-mail to go out", WAIT, || async {
        Ok(!mails_to(&email)?.is_empty())
    })
    .await?;
    // The recommender keeps the user's reads and affinities under keys named by their id.
    until("the recommender to hold the user's reads", WAIT, || async {
        Ok(recommender_keys_of(&app, id).await?.len() == 2)
    })
    .await?;
    // The scan finds what is there: the address (in PostgreSQL), and the article's title
    // in every kind of store.
    anyhow::ensure!(
        !personal_data_left(&app, std::slice::from_ref(&email))
            .await?
            .is_empty(),
        "the scan finds the address before erasure"
    );
    let titled = personal_data_left(&app, std::slice::from_ref(&title)).await?;
    for store in ["postgres ", "redis ", "kafka "] {
        anyhow::ensure!(
            titled.iter().any(|hit| hit.starts_with(store)),
            "the scan finds the title in {store}: {titled:#?}"
        );
    }

    let (status, _) = app
        .command(
            Method::DELETE,
            &format!("/v1/users/{id}"),
            Some(&user.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    let path = format!("/v1/users/{id}");
    until("the erasure to reach the read side", WAIT, || async {
        let (status, _) = query(&app, &path, Some(&admin.token), None).await?;
        Ok(status == S::NOT_FOUND)
    })
    .await?;
    // The read models settle; the writer's forced snapshot is written in the background.
    app.settled_read_models(WAIT).await?;
    let needles = [email.clone(), name.clone()];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = personal_data_left(&app, &needles).await?;
        if left.is_empty() {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the erased user's name or e-mail is still in: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nor their reading history, nor a replay of the recommender, which may apply the
    // user's reads after the erasure.
    let left = recommender_keys_of(&app, id).await?;
    assert!(left.is_empty(), "the recommender still holds {left:?}");
    app.newsroom_cli(&["replay", "recommend", "--quiet"])
        .await?;
    let left = recommender_keys_of(&app, id).await?;
    assert!(left.is_empty(), "a replay of the recommender made {left:?}");
    app.stop().await
}

/// The recommender's keys named by `user`'s id (any version).
async fn recommender_keys_of(app: &TestApp, user: Uuid) -> anyhow::Result<Vec<String>> {
    let mut redis = redis::Client::open(app.settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let root = newsroom_infra::redis::root(&app.settings.kafka, "recommend");
    Ok(redis::cmd("KEYS")
        .arg(format!("{root}:*{user}"))
        .query_async(&mut redis)
        .await?)
}
