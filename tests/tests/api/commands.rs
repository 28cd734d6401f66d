//! Black-box tests of the command API: every endpoint, its errors, the auth matrix, and
//! the consistency guarantees (unique e-mail, If-Match under races, erasure).

use std::collections::HashMap;

use futures::future::join_all;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use newsroom_tests::{TestApp, TestUser, new_user};
use reqwest::Method;
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use sqlx::Connection as _;
use uuid::Uuid;

type TestResult = anyhow::Result<()>;

fn article() -> Value {
    json!({"category": "sports", "title": "Derby day", "content": "A match report.", "tags": ["Football", " football ", "Derby"]})
}

async fn draft(app: &TestApp, editor: &TestUser) -> anyhow::Result<Uuid> {
    Ok(app.draft(&editor.token, &article()).await?.0)
}

#[tokio::test]
async fn drafting_normalises_tags_and_answers_the_article_with_its_author() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;

    let (status, body) = app
        .command(
            Method::POST,
            "/v1/news",
            Some(&editor.token),
            Some(&article()),
            None,
        )
        .await?;

    assert_eq!(status, S::CREATED, "{body}");
    assert_eq!(body["status"], "draft");
    assert_eq!(body["version"], 1);
    assert_eq!(body["tags"], json!(["football", "derby"]));
    assert_eq!(body["author"]["id"], json!(editor.id));
    assert_eq!(body["published_at"], Value::Null);
    app.stop().await
}

#[tokio::test]
async fn the_news_lifecycle_follows_its_transitions_with_409_and_412() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let id = draft(&app, &editor).await?;
    let t = Some(editor.token.as_str());
    let path = |action: &str| format!("/v1/news/{id}/{action}");

    let (status, _) = app
        .command(Method::POST, &path("unpublish"), t, None, None)
        .await?;
    assert_eq!(status, S::CONFLICT, "a draft cannot be unpublished");
    let (status, body) = app
        .command(Method::POST, &path("publish"), t, None, Some(1))
        .await?;
    assert_eq!(
        (status, body["status"].clone(), body["version"].clone()),
        (S::OK, json!("published"), json!(2))
    );
    assert!(body["published_at"].is_string());
    let (status, body) = app
        .command(Method::POST, &path("publish"), t, None, None)
        .await?;
    assert_eq!(
        (status, body["code"].clone()),
        (S::CONFLICT, json!("invalid_transition"))
    );
    let (status, body) = app
        .command(Method::POST, &path("archive"), t, None, Some(1))
        .await?;
    assert_eq!(
        (status, body["code"].clone()),
        (S::PRECONDITION_FAILED, json!("version_mismatch"))
    );
    assert_eq!(
        (body["expected"].clone(), body["actual"].clone()),
        (json!(1), json!(2))
    );
    let (status, body) = app
        .command(Method::POST, &path("unpublish"), t, None, Some(2))
        .await?;
    assert_eq!(
        (status, body["status"].clone(), body["published_at"].clone()),
        (S::OK, json!("draft"), Value::Null)
    );
    app.command(Method::POST, &path("publish"), t, None, None)
        .await?;
    let (status, body) = app
        .command(Method::POST, &path("archive"), t, None, None)
        .await?;
    assert_eq!((status, body["status"].clone()), (S::OK, json!("archived")));
    let (status, _) = app
        .command(Method::POST, &path("publish"), t, None, None)
        .await?;
    assert_eq!(
        status,
        S::CONFLICT,
        "an archived article cannot be published"
    );
    let (status, _) = app
        .command(
            Method::PATCH,
            &format!("/v1/news/{id}"),
            t,
            Some(&json!({"title": "x"})),
            None,
        )
        .await?;
    assert_eq!(status, S::CONFLICT, "an archived article cannot be edited");
    let (status, _) = app
        .command(Method::DELETE, &format!("/v1/news/{id}"), t, None, None)
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    for action in ["publish", "unpublish", "archive"] {
        let (status, _) = app
            .command(Method::POST, &path(action), t, None, None)
            .await?;
        assert_eq!(status, S::NOT_FOUND, "{action} after delete");
    }
    let (status, _) = app
        .command(
            Method::POST,
            &format!("/v1/news/{}/publish", Uuid::now_v7()),
            t,
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NOT_FOUND, "unknown id");
    app.stop().await
}

#[tokio::test]
async fn news_commands_follow_the_auth_matrix() -> TestResult {
    let app = TestApp::spawn().await?;
    let (author, other, reader, admin) = (
        app.editor().await?,
        app.editor().await?,
        app.reader().await?,
        app.admin().await?,
    );
    let id = draft(&app, &author).await?;
    let edit = json!({"title": "Edited"});
    let news = format!("/v1/news/{id}");
    let tok = |u: &TestUser| Some(u.token.clone());

    // Creating.
    for (who, token, expected) in [
        ("anonymous", None, S::UNAUTHORIZED),
        ("reader", tok(&reader), S::FORBIDDEN),
        ("editor", tok(&other), S::CREATED),
        ("admin", tok(&admin), S::CREATED),
    ] {
        let (status, _) = app
            .command(
                Method::POST,
                "/v1/news",
                token.as_deref(),
                Some(&article()),
                None,
            )
            .await?;
        assert_eq!(status, expected, "POST /v1/news as {who}");
    }
    // A draft does not exist for other editors; a published article is theirs to read, not to change.
    for (who, token, on_draft) in [
        ("anonymous", None, S::UNAUTHORIZED),
        ("reader", tok(&reader), S::FORBIDDEN),
        ("other editor", tok(&other), S::NOT_FOUND),
    ] {
        let (status, _) = app
            .command(Method::PATCH, &news, token.as_deref(), Some(&edit), None)
            .await?;
        assert_eq!(status, on_draft, "PATCH draft as {who}");
        let (status, _) = app
            .command(
                Method::POST,
                &format!("{news}/publish"),
                token.as_deref(),
                None,
                None,
            )
            .await?;
        assert_eq!(status, on_draft, "publish draft as {who}");
    }
    let (status, _) = app
        .command(
            Method::PATCH,
            &news,
            tok(&author).as_deref(),
            Some(&edit),
            None,
        )
        .await?;
    assert_eq!(status, S::OK, "the author edits");
    let (status, _) = app
        .command(
            Method::POST,
            &format!("{news}/publish"),
            tok(&admin).as_deref(),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::OK, "an admin publishes anyone's draft");
    for (who, token, expected) in [
        ("anonymous", None, S::UNAUTHORIZED),
        ("reader", tok(&reader), S::FORBIDDEN),
        ("other editor", tok(&other), S::FORBIDDEN),
    ] {
        for (method, path) in [
            (Method::PATCH, news.clone()),
            (Method::POST, format!("{news}/unpublish")),
            (Method::POST, format!("{news}/archive")),
            (Method::DELETE, news.clone()),
        ] {
            let body = (method == Method::PATCH).then_some(&edit);
            let (status, _) = app
                .command(method.clone(), &path, token.as_deref(), body, None)
                .await?;
            assert_eq!(
                status, expected,
                "{method} {path} as {who} on a published article"
            );
        }
    }
    let (status, _) = app
        .command(
            Method::POST,
            &format!("{news}/archive"),
            tok(&author).as_deref(),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::OK, "the author archives");
    let (status, _) = app
        .command(Method::DELETE, &news, tok(&other).as_deref(), None, None)
        .await?;
    assert_eq!(
        status,
        S::NOT_FOUND,
        "an archived article does not exist for other editors"
    );
    let (status, _) = app
        .command(Method::DELETE, &news, tok(&admin).as_deref(), None, None)
        .await?;
    assert_eq!(status, S::NO_CONTENT, "an admin deletes");
    app.stop().await
}

#[tokio::test]
async fn user_commands_follow_the_auth_matrix() -> TestResult {
    let app = TestApp::spawn().await?;
    let (me, other, editor, admin) = (
        app.reader().await?,
        app.reader().await?,
        app.editor().await?,
        app.admin().await?,
    );
    let user = format!("/v1/users/{}", me.id);
    let tok = |u: &TestUser| Some(u.token.clone());
    let cases: Vec<(Method, String, Option<Value>, [S; 5])> = vec![
        // anonymous, self, other reader, editor, admin
        (
            Method::PATCH,
            user.clone(),
            Some(json!({"name": "Renamed"})),
            [S::UNAUTHORIZED, S::OK, S::FORBIDDEN, S::FORBIDDEN, S::OK],
        ),
        (
            Method::PUT,
            format!("{user}/role"),
            Some(json!({"role": "reader"})),
            [
                S::UNAUTHORIZED,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::OK,
            ],
        ),
        (
            Method::POST,
            format!("{user}/notifications/read"),
            None,
            [
                S::UNAUTHORIZED,
                S::NO_CONTENT,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::FORBIDDEN,
            ],
        ),
        (
            Method::PUT,
            format!("{user}/password"),
            Some(json!({"current_password": me.password, "new_password": me.password})),
            [
                S::UNAUTHORIZED,
                S::NO_CONTENT,
                S::FORBIDDEN,
                S::FORBIDDEN,
                S::FORBIDDEN,
            ],
        ),
    ];
    let mut me = me;
    for (method, path, body, expected) in cases {
        // A role change (the admin's, in the case before) revokes the user's tokens.
        me.token = app
            .login(&me.email, &me.password)
            .await?
            .map_err(|s| anyhow::anyhow!("login: {s}"))?;
        let callers = [
            ("anonymous", None),
            ("self", tok(&me)),
            ("other", tok(&other)),
            ("editor", tok(&editor)),
            ("admin", tok(&admin)),
        ];
        for ((who, token), expected) in callers.into_iter().zip(expected) {
            let (status, answer) = app
                .command(method.clone(), &path, token.as_deref(), body.as_ref(), None)
                .await?;
            assert_eq!(status, expected, "{method} {path} as {who}: {answer}");
        }
    }
    let (status, _) = app
        .command(Method::DELETE, &user, tok(&other).as_deref(), None, None)
        .await?;
    assert_eq!(status, S::FORBIDDEN, "another reader may not erase");
    let (status, _) = app.command(Method::DELETE, &user, None, None, None).await?;
    assert_eq!(status, S::UNAUTHORIZED);
    let (status, _) = app
        .command(Method::DELETE, &user, tok(&admin).as_deref(), None, None)
        .await?;
    assert_eq!(status, S::NO_CONTENT, "an admin erases");
    let (status, _) = app
        .command(Method::DELETE, &user, tok(&me).as_deref(), None, None)
        .await?;
    assert_eq!(status, S::UNAUTHORIZED, "an erased user's token is revoked");
    let (status, _) = app
        .command(Method::DELETE, &user, tok(&admin).as_deref(), None, None)
        .await?;
    assert_eq!(status, S::NOT_FOUND, "an erased user is gone");
    let (status, _) = app
        .command(
            Method::PATCH,
            &format!("/v1/users/{}", Uuid::now_v7()),
            tok(&admin).as_deref(),
            Some(&json!({"name": "x"})),
            None,
        )
        .await?;
    assert_eq!(status, S::NOT_FOUND, "unknown user");
    app.stop().await
}

#[tokio::test]
async fn login_answers_401_for_wrong_credentials_and_tokens_are_checked() -> TestResult {
    let app = TestApp::spawn().await?;
    let user = app.reader().await?;

    assert_eq!(
        app.login(&user.email, "wrong password").await?,
        Err(S::UNAUTHORIZED)
    );
    assert_eq!(
        app.login("nobody@example.com", "whatever1").await?,
        Err(S::UNAUTHORIZED)
    );
    assert!(
        app.login(&user.email.to_uppercase(), &user.password)
            .await?
            .is_ok(),
        "e-mail is case-insensitive"
    );
    let (status, body) = app
        .command(
            Method::PATCH,
            &format!("/v1/users/{}", user.id),
            Some("not-a-token"),
            Some(&json!({"name": "x"})),
            None,
        )
        .await?;
    assert_eq!(
        (status, body["code"].clone()),
        (S::UNAUTHORIZED, json!("unauthenticated"))
    );
    app.stop().await
}

#[tokio::test]
async fn a_password_change_needs_the_current_password_and_then_the_new_one_logs_in() -> TestResult {
    let app = TestApp::spawn().await?;
    let user = app.reader().await?;
    let path = format!("/v1/users/{}/password", user.id);

    let wrong = json!({"current_password": "not it at all", "new_password": "brand new secret"});
    let (status, body) = app
        .command(Method::PUT, &path, Some(&user.token), Some(&wrong), None)
        .await?;
    assert_eq!(
        (status, body["errors"][0]["field"].clone()),
        (S::UNPROCESSABLE_ENTITY, json!("current_password"))
    );
    let short = json!({"current_password": user.password, "new_password": "short"});
    let (status, _) = app
        .command(Method::PUT, &path, Some(&user.token), Some(&short), None)
        .await?;
    assert_eq!(status, S::UNPROCESSABLE_ENTITY);
    let right = json!({"current_password": user.password, "new_password": "brand new secret"});
    let (status, _) = app
        .command(Method::PUT, &path, Some(&user.token), Some(&right), None)
        .await?;
    assert_eq!(status, S::NO_CONTENT);

    assert_eq!(
        app.login(&user.email, &user.password).await?,
        Err(S::UNAUTHORIZED)
    );
    assert!(app.login(&user.email, "brand new secret").await?.is_ok());
    app.stop().await
}

#[tokio::test]
async fn fifty_racing_registrations_of_one_email_give_one_201_and_49_409() -> TestResult {
    let app = TestApp::spawn().await?;
    let email = format!("race.{}@Example.com", Uuid::now_v7().simple());

    let attempts = (0..50).map(|i| {
        let body = json!({"name": format!("Racer {i}"), "email": if i % 2 == 0 { email.clone() } else { email.to_lowercase() }, "password": "racing password"});
        let app = &app;
        async move { app.post_json("/v1/users", &body).await.map(|r| r.status()) }
    });
    let statuses = join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let mut counts: HashMap<S, usize> = HashMap::new();
    for status in statuses {
        *counts.entry(status).or_default() += 1;
    }
    assert_eq!(counts.get(&S::CREATED), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&S::CONFLICT), Some(&49), "{counts:?}");
    app.stop().await
}

#[tokio::test]
async fn a_hundred_racing_patches_with_one_if_match_give_one_200_and_one_event() -> TestResult {
    let app = TestApp::spawn().await?;
    let user = app.reader().await?;
    let path = format!("/v1/users/{}", user.id);
    let events_before = app
        .committed_records(Stream::Users)?
        .iter()
        .filter(|r| r.key == user.id.as_bytes())
        .count();

    let attempts = (0..100).map(|i| {
        let body = json!({"name": format!("Name {i}")});
        let (app, path, token) = (&app, &path, &user.token);
        async move {
            app.command(Method::PATCH, path, Some(token), Some(&body), Some(1))
                .await
                .map(|(s, _)| s)
        }
    });
    let statuses = join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    assert_eq!(
        statuses.iter().filter(|s| **s == S::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == S::PRECONDITION_FAILED)
            .count(),
        99,
        "{statuses:?}"
    );
    let events_after = app
        .committed_records(Stream::Users)?
        .iter()
        .filter(|r| r.key == user.id.as_bytes())
        .count();
    assert_eq!(events_after, events_before + 1, "exactly one new event");
    app.stop().await
}

#[tokio::test]
async fn an_email_change_moves_the_claim_and_a_taken_address_is_409() -> TestResult {
    let app = TestApp::spawn().await?;
    let (first, second) = (app.reader().await?, app.reader().await?);
    let path = format!("/v1/users/{}", first.id);

    let taken = json!({"email": second.email});
    let (status, body) = app
        .command(Method::PATCH, &path, Some(&first.token), Some(&taken), None)
        .await?;
    assert_eq!(
        (status, body["code"].clone()),
        (S::CONFLICT, json!("email_taken"))
    );
    let fresh = new_user()["email"].clone();
    let (status, body) = app
        .command(
            Method::PATCH,
            &path,
            Some(&first.token),
            Some(&json!({"email": fresh})),
            None,
        )
        .await?;
    assert_eq!((status, body["email"].clone()), (S::OK, fresh.clone()));

    assert!(
        app.login(fresh.as_str().unwrap_or_default(), &first.password)
            .await?
            .is_ok(),
        "the new address logs in"
    );
    assert_eq!(
        app.login(&first.email, &first.password).await?,
        Err(S::UNAUTHORIZED)
    );
    let reuse = json!({"name": "Someone", "email": first.email, "password": "another password"});
    assert_eq!(
        app.post_json("/v1/users", &reuse).await?.status(),
        S::CREATED,
        "the old address is free again"
    );
    app.stop().await
}

#[tokio::test]
async fn after_erasure_the_raw_events_no_longer_yield_name_or_email() -> TestResult {
    let app = TestApp::spawn().await?;
    let user = app.reader().await?;
    let registry = Registry::connect(&app.settings.registry).await?;
    let personal_in_log = |records: Vec<newsroom_tests::RawRecord>| {
        let registry = registry.clone();
        let app = &app;
        async move {
            let mut found = Vec::new();
            for record in records.iter().filter(|r| r.key == user.id.as_bytes()) {
                let decoded = codec::decode(&registry, &record.payload).await?;
                let event = UserEvent::from_avro(&decoded.name, decoded.value)?;
                let key = app.user_key(user.id).await?;
                if let (UserEvent::Registered(e), Some(key)) = (event, key) {
                    found.push(newsroom_events::personal::open(&key, user.id, &e.personal)?);
                }
            }
            anyhow::Ok(found)
        }
    };
    let before = personal_in_log(app.committed_records(Stream::Users)?).await?;
    assert_eq!(before.len(), 1);
    assert_eq!(
        before[0].email.as_deref(),
        Some(user.email.as_str()),
        "readable before erasure"
    );

    let (status, _) = app
        .command(
            Method::DELETE,
            &format!("/v1/users/{}", user.id),
            Some(&user.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NO_CONTENT);

    let records = app.committed_records(Stream::Users)?;
    assert!(
        app.user_key(user.id).await?.is_none(),
        "the key is destroyed"
    );
    assert!(
        personal_in_log(records).await?.is_empty(),
        "nothing of the user can be decrypted"
    );
    for record in app.committed_records(Stream::Users)? {
        let raw = String::from_utf8_lossy(&record.payload);
        assert!(
            !raw.contains(&user.email) && !raw.contains("Ada Lovelace"),
            "no personal data in clear"
        );
    }
    assert_eq!(
        app.login(&user.email, &user.password).await?,
        Err(S::UNAUTHORIZED)
    );
    // The erasure forces a snapshot of the writer's state: none keeps the user's data.
    let mut db = sqlx::PgConnection::connect(&app.settings.postgres.url).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rows: Vec<(Vec<u8>,)> =
            sqlx::query_as("SELECT state FROM cmd_snapshots WHERE stream = 'users'")
                .fetch_all(&mut db)
                .await?;
        let clean = rows
            .iter()
            .all(|(s,)| !String::from_utf8_lossy(s).contains(&user.email));
        if !rows.is_empty() && clean {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no clean snapshot after erasure"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await
}

/// The user rows of `users` snapshots that hold `text`.
async fn snapshots_holding(db: &sqlx::PgPool, text: &str) -> anyhow::Result<usize> {
    let rows: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT state FROM cmd_snapshots WHERE stream = 'users'")
            .fetch_all(db)
            .await?;
    Ok(rows
        .iter()
        .filter(|(s,)| String::from_utf8_lossy(s).contains(text))
        .count())
}

#[tokio::test]
async fn when_the_snapshot_after_an_erasure_cannot_be_written_the_older_one_goes() -> TestResult {
    // A snapshot after every batch: the registration leaves one that holds the e-mail.
    let app = TestApp::spawn_adjusted(newsroom::Roles::ALL, |s| s.kafka.snapshot_every = 1).await?;
    let user = app.reader().await?;
    let db = sqlx::PgPool::connect(&app.settings.postgres.url).await?;
    newsroom_tests::until(
        "a snapshot holding the user",
        std::time::Duration::from_secs(10),
        || async { Ok(snapshots_holding(&db, &user.email).await? > 0) },
    )
    .await?;
    // From now on no snapshot can be written (deleting one still works).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_snapshots() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'snapshots refused by the test'; END $$; \
         CREATE TRIGGER refuse_snapshots BEFORE INSERT OR UPDATE ON cmd_snapshots \
           FOR EACH ROW EXECUTE FUNCTION refuse_snapshots();",
    )
    .execute(&db)
    .await?;
    let (status, _) = app
        .command(
            Method::DELETE,
            &format!("/v1/users/{}", user.id),
            Some(&user.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    newsroom_tests::until(
        "no snapshot holding the erased user",
        std::time::Duration::from_secs(15),
        || async { Ok(snapshots_holding(&db, &user.email).await? == 0) },
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn a_forged_forwarding_mark_does_not_skip_idempotency() -> TestResult {
    // A request forwarded between command processes skips the idempotency record (the
    // forwarding process keeps it); a caller outside cannot claim to be one.
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let before = app.committed_records(Stream::News)?.len();
    let key = Uuid::now_v7().to_string();
    let mut answers = Vec::new();
    for forged in [
        "",
        "x",
        "1764000000000:0000000000000000000000000000000000000000",
    ] {
        let response = app
            .http
            .post(format!("{}/v1/news", app.command_url))
            .bearer_auth(&editor.token)
            .header("Idempotency-Key", &key)
            .header("x-newsroom-forwarded", forged)
            .json(&article())
            .send()
            .await?;
        let status = response.status();
        answers.push((status, response.json::<Value>().await?["id"].clone()));
    }
    assert_eq!(answers[0].0, S::CREATED, "{answers:?}");
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(
        app.committed_records(Stream::News)?.len(),
        before + 1,
        "one event for three requests"
    );
    app.stop().await
}

#[tokio::test]
async fn one_idempotency_key_sent_ten_times_appends_one_event_with_identical_answers() -> TestResult
{
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let before = app.committed_records(Stream::News)?.len();
    let send = |key: String, body: Value| {
        let (app, token) = (&app, editor.token.clone());
        async move {
            let response = app
                .http
                .post(format!("{}/v1/news", app.command_url))
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let etag = response.headers().get("etag").cloned();
            let token = response.headers().get("x-consistency-token").cloned();
            let body: Value = response.json().await?;
            anyhow::Ok((status, etag, token, body))
        }
    };

    // Concurrently, then one after another.
    let key = Uuid::now_v7().to_string();
    let mut answers = join_all((0..5).map(|_| send(key.clone(), article())))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    for _ in 0..5 {
        answers.push(send(key.clone(), article()).await?);
    }

    assert_eq!(answers[0].0, S::CREATED);
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every answer is the first one: {answers:?}"
    );
    let after = app.committed_records(Stream::News)?.len();
    assert_eq!(after, before + 1, "one event for ten requests");

    let (status, body, ..) = {
        let (s, _, _, b) = send(
            key.clone(),
            json!({"category": "politics", "title": "Other", "content": "x"}),
        )
        .await?;
        (s, b, ())
    };
    assert_eq!(
        (status, body["code"].clone()),
        (S::UNPROCESSABLE_ENTITY, json!("idempotency_key_reused"))
    );
    let (status, ..) = send("x".repeat(256), article()).await?;
    assert_eq!(status, S::BAD_REQUEST, "a key over 255 characters");
    app.stop().await
}

#[tokio::test]
async fn control_characters_and_huge_tag_lists_are_422_and_nothing_is_appended() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let before = app.committed_records(Stream::News)?.len();
    // One tag, repeated: fine once duplicates are dropped, but the list is refused before.
    let many_tags = vec!["same"; 5_000];
    for (body, field) in [
        (
            json!({"category": "sports", "title": "a\u{0}b", "content": "x"}),
            "title",
        ),
        (
            json!({"category": "sports", "title": "t", "content": "nul\u{0}"}),
            "content",
        ),
        (
            json!({"category": "sports", "title": "t\u{1b}[2J", "content": "x"}),
            "title",
        ),
        (
            json!({"category": "sports", "title": "t", "content": "x", "tags": ["b\u{7}"]}),
            "tags",
        ),
        (
            json!({"category": "sports", "title": "t", "content": "x", "tags": many_tags}),
            "tags",
        ),
    ] {
        let (status, answer) = app
            .command(
                Method::POST,
                "/v1/news",
                Some(&editor.token),
                Some(&body),
                None,
            )
            .await?;
        assert_eq!(status, S::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["errors"][0]["field"], field, "{answer}");
    }
    // Line breaks and tabs are text.
    let body = json!({"category": "sports", "title": "t", "content": "one\r\n\ttwo"});
    let (status, answer) = app
        .command(
            Method::POST,
            "/v1/news",
            Some(&editor.token),
            Some(&body),
            None,
        )
        .await?;
    assert_eq!(status, S::CREATED, "{answer}");
    let mut user = new_user();
    user["name"] = json!("null\u{0}byte");
    let (status, answer) = app
        .command(Method::POST, "/v1/users", None, Some(&user), None)
        .await?;
    assert_eq!(status, S::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(app.committed_records(Stream::News)?.len(), before + 1);
    app.stop().await
}

#[tokio::test]
async fn an_article_answer_stored_for_someone_else_leaves_with_its_author() -> TestResult {
    let app = TestApp::spawn().await?;
    let pool = app.pool().await?;
    let (author, admin) = (app.editor().await?, app.admin().await?);
    let id = draft(&app, &author).await?;
    // An admin edits it with a key: the stored answer names the author.
    let key = Uuid::now_v7().to_string();
    let response = app
        .http
        .patch(format!("{}/v1/news/{id}", app.command_url))
        .bearer_auth(&admin.token)
        .header("Idempotency-Key", &key)
        .header("if-match", "\"1\"")
        .json(&json!({"title": "Edited by an admin"}))
        .send()
        .await?;
    assert_eq!(response.status(), S::OK);
    let stored = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM cmd_idempotency WHERE key = $1")
            .bind(&key)
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(n)
    };
    assert_eq!(stored().await?, 1);
    let (status, _) = app
        .command(
            Method::DELETE,
            &format!("/v1/users/{}", author.id),
            Some(&admin.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    assert_eq!(stored().await?, 0, "the author's erasure removed it");
    pool.close().await;
    app.stop().await
}

#[tokio::test]
async fn stored_answers_hold_no_token_and_leave_with_their_user() -> TestResult {
    let app = TestApp::spawn().await?;
    let pool = app.pool().await?;
    let keyed = |method: Method, path: String, token: Option<String>, body: Value| {
        let app = &app;
        async move {
            let mut request = app
                .http
                .request(method, format!("{}{path}", app.command_url))
                .header("Idempotency-Key", Uuid::now_v7().to_string())
                .json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await?;
            anyhow::Ok(response.status())
        }
    };
    // A keyed registration (anonymous: its answer is about the new user), a keyed login
    // and a keyed change by the user themselves.
    let user = new_user();
    let status = keyed(Method::POST, "/v1/users".into(), None, user.clone()).await?;
    assert_eq!(status, S::CREATED);
    let (email, password) = (
        user["email"].as_str().unwrap_or_default(),
        user["password"].as_str().unwrap_or_default(),
    );
    let login = json!({"email": email, "password": password});
    let status = keyed(Method::POST, "/v1/auth/token".into(), None, login).await?;
    assert_eq!(status, S::OK);
    let token = app
        .login(email, password)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let id = newsroom_tests::token_subject(&token)?;
    let path = format!("/v1/users/{id}");
    let status = keyed(
        Method::PATCH,
        path.clone(),
        Some(token.clone()),
        json!({"name": "Kept"}),
    )
    .await?;
    assert_eq!(status, S::OK);

    let rows: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT request_hash, body FROM cmd_idempotency")
            .fetch_all(&pool)
            .await?;
    assert_eq!(rows.len(), 2, "the login's answer is not stored");
    // The registration's hash is not the plain SHA-256 of its request (its body holds the
    // password).
    use sha2::Digest as _;
    let plain: String = sha2::Sha256::new()
        .chain_update(b"POST /v1/users\n")
        .chain_update(serde_json::to_vec(&user)?)
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (hash, body) in &rows {
        let text = String::from_utf8_lossy(body.as_deref().unwrap_or_default());
        assert!(!text.contains("access_token"), "{text}");
        assert_ne!(*hash, plain, "a plain hash of a body with a password");
    }
    assert!(
        rows.iter().any(
            |(_, body)| String::from_utf8_lossy(body.as_deref().unwrap_or_default())
                .contains(email)
        ),
        "stored answers hold the e-mail until the erasure"
    );

    // Erased: no stored answer about them is left.
    let (status, _) = app
        .command(Method::DELETE, &path, Some(&token), None, None)
        .await?;
    assert_eq!(status, S::NO_CONTENT);
    let left: Vec<(Option<Vec<u8>>,)> = sqlx::query_as("SELECT body FROM cmd_idempotency")
        .fetch_all(&pool)
        .await?;
    assert!(
        left.iter().all(
            |(body,)| !String::from_utf8_lossy(body.as_deref().unwrap_or_default()).contains(email)
        ),
        "an answer holding the erased user's e-mail is left"
    );
    assert!(left.is_empty(), "{} rows left", left.len());
    app.stop().await
}

#[tokio::test]
async fn failed_logins_past_the_limit_are_429_with_retry_after_even_with_the_right_password()
-> TestResult {
    let app = TestApp::spawn().await?;
    let victim = app.reader().await?;
    let other = app.reader().await?;
    let attempt = |email: &str, password: &str| {
        let body = json!({"email": email, "password": password});
        let app = &app;
        async move {
            let response = app
                .http
                .post(format!("{}/v1/auth/token", app.command_url))
                .json(&body)
                .send()
                .await?;
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::Ok((status, retry_after, body))
        }
    };
    // Ten wrong passwords (the default allowance per account and minute) are 401.
    for _ in 0..10 {
        let (status, ..) = attempt(&victim.email, "wrong password").await?;
        assert_eq!(status, S::UNAUTHORIZED);
    }
    // Then the account is throttled, the right password included.
    for password in ["wrong password", victim.password.as_str()] {
        let (status, retry_after, body) = attempt(&victim.email, password).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (S::TOO_MANY_REQUESTS, Some("rate_limited")),
            "{body}"
        );
        assert!(
            retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "{retry_after:?}"
        );
    }
    // Another account from the same address is not.
    let (status, ..) = attempt(&other.email, &other.password).await?;
    assert_eq!(status, S::OK);
    app.stop().await
}

#[tokio::test]
async fn every_endpoint_is_limited_per_client_address_and_per_user() -> TestResult {
    const RATE: usize = 20;
    let app = TestApp::spawn_adjusted(newsroom::Roles::ALL, |s| {
        s.http.requests_per_second_per_client = RATE as u32;
        // The addresses come from this header, so that one test can be many clients.
        s.http.client_address_header = Some("x-real-ip".into());
    })
    .await?;
    let reader = app.reader().await?;
    // 60 requests at once, each from `address(i)` (after a forged line, when `forged`),
    // with `token` if any: how many were answered (any status but 429) and how long the
    // burst took; every 429 must be a problem with Retry-After.
    let burst =
        |url: String, address: &'static str, spread: bool, token: Option<String>, forged: bool| {
            let app = &app;
            async move {
                let started = std::time::Instant::now();
                let answers = join_all((0..60).map(|i| {
                    let mut request = app.http.get(&url);
                    if forged {
                        // A client's own line, before the one the proxy appends.
                        request = request.header("x-real-ip", format!("192.0.2.{i}"));
                    }
                    request = request.header(
                        "x-real-ip",
                        if spread {
                            format!("{address}.{i}")
                        } else {
                            format!("{address}.1")
                        },
                    );
                    if let Some(token) = &token {
                        request = request.bearer_auth(token);
                    }
                    async move {
                        let response = request.send().await?;
                        let status = response.status();
                        let retry_after = response.headers().contains_key("retry-after");
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        anyhow::Ok((status, retry_after, body))
                    }
                }))
                .await;
                let elapsed = started.elapsed();
                let mut answered = 0;
                for answer in answers {
                    let (status, retry_after, body) = answer?;
                    if status == S::TOO_MANY_REQUESTS {
                        assert!(retry_after, "a 429 says when to come back");
                        assert_eq!(body["code"], "rate_limited", "{body}");
                    } else {
                        answered += 1;
                    }
                }
                anyhow::Ok((answered, elapsed))
            }
        };
    // One key's burst, and what its rate gave back while the burst lasted.
    let one_key = |(answered, elapsed): (usize, std::time::Duration), what: &str| {
        let most = RATE + (elapsed.as_secs_f64() * RATE as f64).ceil() as usize + 1;
        assert!(
            (RATE..=most).contains(&answered),
            "{what}: {answered} of 60 answered in {elapsed:?} (allowed {RATE} to {most})"
        );
    };
    let trending = format!("{}/v1/news/trending", app.query_url);
    one_key(
        burst(trending.clone(), "10.0.0", false, None, false).await?,
        "one address, anonymous",
    );
    // Sixty addresses, anonymous: each has its own allowance.
    assert_eq!(
        burst(trending.clone(), "10.1.0", true, None, false)
            .await?
            .0,
        60
    );
    // Sixty addresses with one user's token: the user's own allowance.
    let mine = format!("{}/v1/users/{}", app.query_url, reader.id);
    one_key(
        burst(mine, "10.2.0", true, Some(reader.token.clone()), false).await?,
        "one user over many addresses",
    );
    // Lines a client forged before the proxy's own count for nothing.
    one_key(
        burst(trending.clone(), "10.4.0", false, None, true).await?,
        "one address behind forged lines",
    );
    // The command API too (an unknown route is an endpoint like any other).
    one_key(
        burst(
            format!("{}/v1/nothing", app.command_url),
            "10.3.0",
            false,
            None,
            false,
        )
        .await?,
        "the command API",
    );
    // A load balancer's probes are never refused.
    assert_eq!(
        burst(
            format!("{}/readyz", app.command_url),
            "10.5.0",
            false,
            None,
            false
        )
        .await?
        .0,
        60
    );
    // A second later, the address is served again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (answered, _) = burst(trending, "10.0.0", false, None, false).await?;
    assert!(
        answered >= RATE,
        "after a second the address got {answered}"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_refused_with_429_while_readers_are_served() -> TestResult {
    let app = TestApp::spawn_adjusted(newsroom::Roles::ALL, |s| {
        s.http.client_address_header = Some("x-real-ip".into());
    })
    .await?;
    let victim = app.reader().await?;
    let editor = app.editor().await?;
    let id = draft(&app, &editor).await?;
    let (status, body) = app
        .command(
            Method::POST,
            &format!("/v1/news/{id}/publish"),
            Some(&editor.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, S::OK, "{body}");
    // Asked as a reader: the editor sees the draft before its publication is projected,
    // and the anonymous readers below would be answered 404 until it is.
    let response = app
        .get_eventually(
            &format!("/v1/news/{id}"),
            &victim.token,
            std::time::Duration::from_secs(30),
        )
        .await?;
    assert_eq!(response.status(), S::OK);
    let article = format!("{}/v1/news/{id}", app.query_url);
    let rss_mib = || -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0
    };
    let before = rss_mib();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    // Eight clients guessing the victim's password from one address, as fast as they can.
    let guesses = (0..8).map(|n| {
        let (http, url, email) = (
            app.http.clone(),
            format!("{}/v1/auth/token", app.command_url),
            victim.email.clone(),
        );
        tokio::spawn(async move {
            let mut answers: HashMap<u16, u64> = HashMap::new();
            let mut i = 0;
            while tokio::time::Instant::now() < until {
                let response = http
                    .post(&url)
                    .header("x-real-ip", "203.0.113.7")
                    .json(&json!({"email": email, "password": format!("guess {n}.{i}")}))
                    .send()
                    .await?;
                *answers.entry(response.status().as_u16()).or_default() += 1;
                i += 1;
            }
            anyhow::Ok(answers)
        })
    });
    // Four readers, each from an address of its own.
    let readers = (0..4).map(|n| {
        let (http, url) = (app.http.clone(), article.clone());
        tokio::spawn(async move {
            let (mut ok, mut other) = (0u64, Vec::new());
            while tokio::time::Instant::now() < until {
                let response = http
                    .get(&url)
                    .header("x-real-ip", format!("198.51.100.{n}"))
                    .send()
                    .await?;
                if response.status() == S::OK {
                    ok += 1;
                } else {
                    other.push(response.status());
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            anyhow::Ok((ok, other))
        })
    });
    let (guesses, readers) = tokio::join!(join_all(guesses), join_all(readers));
    let mut answers: HashMap<u16, u64> = HashMap::new();
    for guess in guesses {
        for (status, count) in guess?? {
            *answers.entry(status).or_default() += count;
        }
    }
    let refused = answers.get(&429).copied().unwrap_or(0);
    let failed = answers.get(&401).copied().unwrap_or(0);
    assert_eq!(
        answers.len(),
        2,
        "guesses are answered 401 or 429 only: {answers:?}"
    );
    // The account's allowance (10 a minute; the flood may span two of its windows), plus
    // the ones that were already running.
    assert!(failed <= 2 * 10 + 8, "{failed} guesses were checked");
    assert!(
        refused > 100 * failed,
        "{refused} refused, {failed} checked"
    );
    for reader in readers {
        let (ok, other) = reader??;
        assert!(other.is_empty(), "a reader was answered {other:?}");
        assert!(ok > 100, "a reader was served {ok} times in 10 s");
    }
    let grown = rss_mib() - before;
    assert!(grown < 256.0, "memory grew by {grown:.0} MiB");
    // The owner still logs in from elsewhere.
    let response = app
        .http
        .post(format!("{}/v1/auth/token", app.command_url))
        .header("x-real-ip", "192.0.2.1")
        .json(&json!({"email": victim.email, "password": victim.password}))
        .send()
        .await?;
    assert_eq!(response.status(), S::OK);
    app.stop().await
}

#[tokio::test]
async fn a_body_trickled_in_is_refused_after_the_body_deadline() -> TestResult {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = TestApp::spawn_with(newsroom::Roles {
        command_api: true,
        ..newsroom::Roles::NONE
    })
    .await?;
    let address = app.command_url.trim_start_matches("http://").to_owned();
    // Without and with an Idempotency-Key (whose middleware reads the body first).
    for extra in ["", "Idempotency-Key: trickle-1\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(&address).await?;
        // The head and a few bytes of the 100 it announces; then nothing.
        let head = format!(
            "POST /v1/users HTTP/1.1\r\nHost: newsroom\r\nContent-Type: application/json\r\n\
             {extra}Content-Length: 100\r\n\r\n{{\"name\""
        );
        stream.write_all(head.as_bytes()).await?;
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let mut buffer = [0u8; 4096];
            loop {
                let n = stream.read(&mut buffer).await?;
                answer.extend_from_slice(&buffer[..n]);
                if n == 0 || String::from_utf8_lossy(&answer).contains('}') {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
        anyhow::ensure!(read.is_ok(), "no answer within 30 s ({extra:?})");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400"), "{extra:?}: {text}");
        assert!(
            text.contains("did not arrive within 10 s"),
            "{extra:?}: {text}"
        );
        assert!(started.elapsed() >= std::time::Duration::from_secs(9));
    }
    app.stop().await
}
