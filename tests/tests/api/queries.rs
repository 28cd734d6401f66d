//! Black-box tests of the query API over the news and users read models: visibility,
//! ETags, lists with filters and cursors, and consistency tokens.

use std::collections::HashSet;

use anyhow::Context as _;
use futures::StreamExt as _;
use newsroom_tests::{TestApp, TestUser, consistency_token};
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use uuid::Uuid;

type TestResult = anyhow::Result<()>;

pub(crate) struct Published {
    pub(crate) id: Uuid,
    pub(crate) token: String,
}

/// Gives article `id` of `editor` a new `title`; the edit's consistency token.
async fn retitle(
    app: &TestApp,
    editor: &TestUser,
    id: Uuid,
    title: &str,
) -> anyhow::Result<String> {
    let response = app
        .http
        .patch(format!("{}/v1/news/{id}", app.command_url))
        .bearer_auth(&editor.token)
        .json(&json!({"title": title}))
        .send()
        .await?;
    consistency_token(&response, "edit")
}

/// Drafts and publishes an article; returns its id and the publication's consistency token.
pub(crate) async fn publish(
    app: &TestApp,
    editor: &TestUser,
    category: &str,
    tags: &[&str],
) -> anyhow::Result<Published> {
    let body = json!({"category": category, "title": format!("A {category} story"), "content": "Text.", "tags": tags});
    let (id, _) = app.draft(&editor.token, &body).await?;
    let token = app.publish(&editor.token, id).await?;
    Ok(Published { id, token })
}

pub(crate) async fn query(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    consistency: Option<&str>,
) -> anyhow::Result<(S, Value)> {
    let mut request = app.http.get(format!("{}{path}", app.query_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(consistency) = consistency {
        request = request.header("x-consistency-token", consistency);
    }
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn a_published_article_is_public_and_a_draft_exists_only_for_its_author_and_admins()
-> TestResult {
    let app = TestApp::spawn().await?;
    let (author, other, admin) = (app.editor().await?, app.editor().await?, app.admin().await?);
    let live = publish(&app, &author, "sports", &["football"]).await?;
    let (draft_id, _) = app
        .draft(
            &author.token,
            &json!({"category": "famous", "title": "Secret", "content": "x"}),
        )
        .await?;

    let (status, body) = query(
        &app,
        &format!("/v1/news/{}", live.id),
        None,
        Some(&live.token),
    )
    .await?;
    assert_eq!(
        (status, body["status"].clone()),
        (S::OK, json!("published"))
    );
    assert_eq!(body["content"], "Text.");
    assert_eq!(body["author"]["id"], json!(author.id));
    // Wait until the draft is projected (through the author's own view), then check who sees it.
    let mut seen = S::NOT_FOUND;
    for _ in 0..100 {
        seen = query(
            &app,
            &format!("/v1/news/{draft_id}"),
            Some(&author.token),
            None,
        )
        .await?
        .0;
        if seen == S::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, S::OK, "the author sees the draft");
    assert_eq!(
        query(
            &app,
            &format!("/v1/news/{draft_id}"),
            Some(&admin.token),
            None
        )
        .await?
        .0,
        S::OK
    );
    assert_eq!(
        query(
            &app,
            &format!("/v1/news/{draft_id}"),
            Some(&other.token),
            None
        )
        .await?
        .0,
        S::NOT_FOUND
    );
    assert_eq!(
        query(&app, &format!("/v1/news/{draft_id}"), None, None)
            .await?
            .0,
        S::NOT_FOUND
    );
    assert_eq!(
        query(&app, &format!("/v1/news/{}", Uuid::now_v7()), None, None)
            .await?
            .0,
        S::NOT_FOUND
    );
    assert_eq!(
        query(&app, "/v1/news/not-a-uuid", None, None).await?.0,
        S::NOT_FOUND
    );
    assert_eq!(
        query(
            &app,
            &format!("/v1/news/{}", live.id),
            Some("bad-token"),
            None
        )
        .await?
        .0,
        S::UNAUTHORIZED
    );
    app.stop().await
}

#[tokio::test]
async fn an_article_served_from_redis_names_its_author_as_they_are_now() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let articles = [
        publish(&app, &editor, "sports", &[]).await?.id,
        publish(&app, &editor, "politics", &[]).await?.id,
    ];
    let author_of = |body: &Value| {
        body["author"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (_, before) = query(&app, &format!("/v1/news/{}", articles[0]), None, None).await?;
    let original = author_of(&before);
    assert!(!original.is_empty(), "the author is named: {before}");

    // A new name, then an erasure: each shows on every article of theirs, from Redis.
    let path = format!("{}/v1/users/{}", app.command_url, editor.id);
    for name in ["Renamed Editor", "[deleted]"] {
        let request = if name == "[deleted]" {
            app.http.delete(&path)
        } else {
            app.http.patch(&path).json(&json!({"name": name}))
        };
        let response = request.bearer_auth(&editor.token).send().await?;
        assert!(response.status().is_success(), "{}", response.status());
        let token = response.headers()["x-consistency-token"]
            .to_str()?
            .to_owned();
        let from_redis = app.query_answers("article", "redis").await?;
        for id in articles {
            let (status, body) = query(&app, &format!("/v1/news/{id}"), None, Some(&token)).await?;
            assert_eq!(status, S::OK);
            assert_eq!(author_of(&body), name, "{body}");
        }
        assert_eq!(
            app.query_answers("article", "redis").await?,
            from_redis + 2,
            "Redis answered both"
        );
    }
    app.stop().await
}

/// Asks for `path` without a token until `done` holds of the answer, for up to five
/// seconds: half of what an article is kept for without an announcement (ADR 33), so that
/// a change that was not announced fails the test.
async fn announced_within(
    app: &TestApp,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (status, body) = query(app, path, None, None).await?;
        anyhow::ensure!(status == S::OK, "{path}: {status}");
        if done(&body) {
            return Ok(body);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{path} still answers {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_article_kept_by_the_query_process_is_given_up_when_a_change_is_announced() -> TestResult
{
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let reader = app.reader().await?;
    let live = publish(&app, &editor, "sports", &["kept"]).await?;
    let path = format!("/v1/news/{}", live.id);
    let (_, first) = query(&app, &path, None, Some(&live.token)).await?;
    assert_eq!(first["status"], "published");
    // Without a token it is read from Redis once, then answered from what was kept: a
    // title written into Redis behind the projection's back (not announced) is not seen.
    let mut redis = redis::Client::open(app.settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let root = newsroom_infra::redis::root(&app.settings.kafka, "cache");
    let active: String = redis::cmd("GET")
        .arg(format!("{root}:active"))
        .query_async(&mut redis)
        .await?;
    let key = format!(
        "{root}:v{active}:{}",
        newsroom_infra::read_models::key(newsroom_infra::read_models::cache::ARTICLE, live.id)
    );
    let title = |title: &str| {
        redis::cmd("HSET")
            .arg(&key)
            .arg(newsroom_infra::read_models::field::TITLE)
            .arg(title)
            .to_owned()
    };
    let mut kept = false;
    for _ in 0..20 {
        let (_, again) = query(&app, &path, None, None).await?;
        assert_eq!(again, first);
        let (): () = title("Behind its back").query_async(&mut redis).await?;
        let (_, again) = query(&app, &path, None, None).await?;
        let (): () = title(first["title"].as_str().unwrap_or_default())
            .query_async(&mut redis)
            .await?;
        if again == first {
            kept = true;
            break;
        }
        // Read while an announcement came in: not kept; again.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(kept, "an article answered from what was kept");

    // An edit: the next answers without a token show it (the batch that wrote it announced
    // its key), well before the kept copy would be read again anyway.
    retitle(&app, &editor, live.id, "A kept story, retitled").await?;
    announced_within(&app, &path, |b| b["title"] == "A kept story, retitled").await?;
    // A read changes the read count only (not the version): announced the same way.
    let (status, _) = query(&app, &path, Some(&reader.token), None).await?;
    assert_eq!(status, S::OK);
    let read = announced_within(&app, &path, |b| b["read_count"] == 1).await?;
    // With a token, a newer copy replaces the kept one at once.
    let token = retitle(&app, &editor, live.id, "Retitled once more").await?;
    let (_, with_token) = query(&app, &path, None, Some(&token)).await?;
    assert_eq!(with_token["title"], "Retitled once more");
    let (_, without) = query(&app, &path, None, None).await?;
    assert_eq!(without["title"], "Retitled once more", "{read}");

    // A replay switches versions and announces the new one alone (what makes a query
    // process forget every article it kept: `kept.rs` tests).
    let mut announcements = redis::Client::open(app.settings.redis.url.as_str())?
        .get_async_pubsub()
        .await?;
    announcements
        .subscribe(format!("{root}:{}", newsroom_infra::read_models::CHANGED))
        .await?;
    app.newsroom_cli(&["replay", "cache", "--quiet"]).await?;
    let active: String = redis::cmd("GET")
        .arg(format!("{root}:active"))
        .query_async(&mut redis)
        .await?;
    let switched = async {
        let mut messages = announcements.on_message();
        while let Some(message) = messages.next().await {
            if message.get_payload::<String>()? == active {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the subscription ended")
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), switched)
        .await
        .context("the switch to the replayed version was not announced")??;
    let (_, body) = query(&app, &path, None, None).await?;
    assert_eq!(body, without, "the replayed version answers the same");
    app.stop().await
}

#[tokio::test]
async fn an_unchanged_article_answers_304_to_its_etag() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let live = publish(&app, &editor, "politics", &[]).await?;
    query(
        &app,
        &format!("/v1/news/{}", live.id),
        None,
        Some(&live.token),
    )
    .await?;
    let url = format!("{}/v1/news/{}", app.query_url, live.id);

    let first = app.http.get(&url).send().await?;
    let etag = first.headers()["etag"].to_str()?.to_owned();
    assert_eq!(etag, "\"2\"");
    let again = app
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(again.status(), S::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag.as_str());
    let stale = app
        .http
        .get(&url)
        .header("if-none-match", "\"1\"")
        .send()
        .await?;
    assert_eq!(stale.status(), S::OK);
    app.stop().await
}

#[tokio::test]
async fn lists_show_published_news_newest_first_with_filters_and_cursors() -> TestResult {
    let app = TestApp::spawn().await?;
    let (alice, bob) = (app.editor().await?, app.editor().await?);
    let mut published = Vec::new();
    for i in 0..7 {
        let (editor, category, tags): (&TestUser, &str, &[&str]) = match i % 3 {
            0 => (&alice, "sports", &["football"]),
            1 => (&bob, "politics", &["election"]),
            _ => (&alice, "famous", &["football", "gala"]),
        };
        published.push(publish(&app, editor, category, tags).await?);
    }
    let last = &published[published.len() - 1].token;
    // A draft never shows up in lists.
    app.draft(
        &alice.token,
        &json!({"category": "sports", "title": "Draft", "content": "x"}),
    )
    .await?;

    // The last publication's token covers its partition; the others are projected too once
    // the list holds all seven.
    let mut all = Value::Null;
    for _ in 0..200 {
        let (status, page) = query(&app, "/v1/news?limit=100", None, Some(last)).await?;
        assert_eq!(status, S::OK);
        all = page;
        if all["items"].as_array().map_or(0, Vec::len) == published.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let ids: Vec<&str> = all["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["id"].as_str()).collect())
        .unwrap_or_default();
    let mut expected: Vec<String> = published.iter().map(|p| p.id.to_string()).collect();
    expected.reverse();
    assert_eq!(ids, expected, "published only, newest first");
    assert_eq!(all["next_cursor"], Value::Null);
    assert!(
        all["items"][0].get("content").is_none(),
        "lists leave the content out"
    );

    let count = |v: &Value| v["items"].as_array().map_or(0, Vec::len);
    assert_eq!(
        count(&query(&app, "/v1/news?category=sports", None, None).await?.1),
        3
    );
    assert_eq!(
        count(&query(&app, "/v1/news?tag=FOOTBALL", None, None).await?.1),
        5
    );
    assert_eq!(
        count(
            &query(&app, &format!("/v1/news?author_id={}", bob.id), None, None)
                .await?
                .1
        ),
        2
    );
    assert_eq!(
        count(
            &query(
                &app,
                "/v1/news?category=famous&tag=gala&unknown=ignored",
                None,
                None
            )
            .await?
            .1
        ),
        2
    );

    // Page by 3 while new articles are published: no item is skipped or repeated.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/news?limit=3&cursor={c}"),
            None => "/v1/news?limit=3".to_owned(),
        };
        let (status, page) = query(&app, &path, None, None).await?;
        assert_eq!(status, S::OK);
        seen.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["id"].as_str().map(str::to_owned)),
        );
        publish(&app, &bob, "sports", &[]).await?;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen, expected,
        "every article of the first snapshot once, in order"
    );
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());

    for bad in [
        "limit=0",
        "limit=101",
        "limit=x",
        "category=weather",
        "author_id=nope",
        "cursor=garbage",
        "tag=",
    ] {
        let (status, body) = query(&app, &format!("/v1/news?{bad}"), None, None).await?;
        assert_eq!(
            (status, body["code"].clone()),
            (S::BAD_REQUEST, json!("malformed_request")),
            "{bad}"
        );
    }

    // A first page is answered again for a moment (ADR 28), but never once a publication
    // or an edit changed its list: right after a read with the write's token, a read
    // without one shows the write too.
    let path = "/v1/news?category=famous&limit=50";
    let (status, before) = query(&app, path, None, None).await?;
    assert_eq!(status, S::OK);
    let fresh = publish(&app, &alice, "famous", &[]).await?;
    let (_, with_token) = query(&app, path, None, Some(&fresh.token)).await?;
    assert_eq!(with_token["items"][0]["id"], fresh.id.to_string());
    assert_ne!(with_token, before);
    let (_, without) = query(&app, path, None, None).await?;
    assert_eq!(without, with_token, "the publication, at once");
    let token = retitle(&app, &alice, fresh.id, "A retitled story").await?;
    let (_, with_token) = query(&app, path, None, Some(&token)).await?;
    assert_eq!(with_token["items"][0]["title"], "A retitled story");
    let (_, without) = query(&app, path, None, None).await?;
    assert_eq!(without, with_token, "the edit, at once");

    // So is a page after a cursor: kept for a moment, given up at once when its list
    // changes.
    let older = publish(&app, &alice, "famous", &[]).await?;
    let newer = publish(&app, &alice, "famous", &[]).await?;
    let first = "/v1/news?category=famous&limit=1";
    // The two publications may be on two partitions: each one's token, once.
    let (_, page) = query(&app, first, None, Some(&newer.token)).await?;
    assert_eq!(page["items"][0]["id"], newer.id.to_string());
    let cursor = page["next_cursor"]
        .as_str()
        .context("a next page")?
        .to_owned();
    let second = format!("{first}&cursor={cursor}");
    let (_, page) = query(&app, &second, None, Some(&older.token)).await?;
    assert_eq!(page["items"][0]["id"], older.id.to_string());
    // Without a token: the first page, kept, and the second under a key of its own.
    let (_, page) = query(&app, first, None, None).await?;
    assert_eq!(page["items"][0]["id"], newer.id.to_string());
    let (status, before) = query(&app, &second, None, None).await?;
    assert_eq!(status, S::OK);
    assert_eq!(
        before["items"][0]["id"],
        older.id.to_string(),
        "the second page, not the kept first one"
    );
    // Asked again within the second it is kept for, it is answered from what was kept (a
    // slow machine may let the second pass: a few tries).
    let mut kept = false;
    for _ in 0..5 {
        let memo = app.query_answers("list", "memo").await?;
        let (_, again) = query(&app, &second, None, None).await?;
        assert_eq!(again, before);
        if app.query_answers("list", "memo").await? > memo {
            kept = true;
            break;
        }
    }
    assert!(kept, "a second page answered from what was kept");
    let token = retitle(&app, &alice, older.id, "An older story, retitled").await?;
    let (_, with_token) = query(&app, &second, None, Some(&token)).await?;
    assert_eq!(with_token["items"][0]["title"], "An older story, retitled");
    let (_, without) = query(&app, &second, None, None).await?;
    assert_eq!(
        without, with_token,
        "the edit of a second page's article, at once"
    );
    app.stop().await
}

#[tokio::test]
async fn two_hundred_times_a_command_then_its_token_on_a_query_always_shows_the_write() -> TestResult
{
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let live = publish(&app, &editor, "sports", &[]).await?;
    let path = format!("/v1/news/{}", live.id);

    for i in 0..200 {
        let token = retitle(&app, &editor, live.id, &format!("Title {i}")).await?;
        let (status, body) = query(&app, &path, None, Some(&token)).await?;
        assert_eq!(
            (status, body["title"].clone()),
            (S::OK, json!(format!("Title {i}"))),
            "round {i}"
        );
    }
    app.stop().await
}

#[tokio::test]
async fn consistency_tokens_are_checked_and_a_lagging_read_model_is_503() -> TestResult {
    // No projector: the read models never include a write.
    let app = TestApp::spawn_with(newsroom::Roles {
        command_api: true,
        query_api: true,
        ..newsroom::Roles::NONE
    })
    .await?;
    let admin = app.admin().await?;
    let article = json!({"category": "sports", "title": "Unseen", "content": "x"});
    let response = app
        .http
        .post(format!("{}/v1/news", app.command_url))
        .bearer_auth(&admin.token)
        .json(&article)
        .send()
        .await?;
    assert_eq!(response.status(), S::CREATED);
    let ahead = response.headers()["x-consistency-token"]
        .to_str()?
        .to_owned();
    let ahead = ahead.as_str();

    let response = app
        .http
        .get(format!("{}/v1/news", app.query_url))
        .header("x-consistency-token", ahead)
        .header("x-consistency-timeout-ms", "50")
        .send()
        .await?;
    assert_eq!(response.status(), S::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await?;
    assert_eq!(body["code"], "projection_lagging");

    for (token, timeout) in [("garbage", "10"), (ahead, "30001"), (ahead, "soon")] {
        let response = app
            .http
            .get(format!("{}/v1/news", app.query_url))
            .header("x-consistency-token", token)
            .header("x-consistency-timeout-ms", timeout)
            .send()
            .await?;
        assert_eq!(response.status(), S::BAD_REQUEST, "{token} {timeout}");
    }
    app.stop().await
}

#[tokio::test]
async fn authenticated_reads_are_counted_and_make_up_the_readers_history() -> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, reader, other) = (
        app.editor().await?,
        app.reader().await?,
        app.reader().await?,
    );
    let mut articles = Vec::new();
    for _ in 0..3 {
        articles.push(publish(&app, &editor, "sports", &["football"]).await?);
    }
    for article in &articles {
        let (status, _) = query(
            &app,
            &format!("/v1/news/{}", article.id),
            Some(&reader.token),
            Some(&article.token),
        )
        .await?;
        assert_eq!(status, S::OK);
    }
    // An anonymous read is not recorded.
    query(&app, &format!("/v1/news/{}", articles[0].id), None, None).await?;

    let history_path = format!("/v1/users/{}/history?limit=2", reader.id);
    let mut history = Value::Null;
    for _ in 0..200 {
        history = query(&app, &history_path, Some(&reader.token), None)
            .await?
            .1;
        if history["next_cursor"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let first_page: Vec<&str> = history["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["news_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        first_page,
        vec![articles[2].id.to_string(), articles[1].id.to_string()],
        "newest read first"
    );
    assert_eq!(history["items"][0]["title"], "A sports story");
    let cursor = history["next_cursor"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (_, rest) = query(
        &app,
        &format!("{history_path}&cursor={cursor}"),
        Some(&reader.token),
        None,
    )
    .await?;
    assert_eq!(rest["items"][0]["news_id"], json!(articles[0].id));
    assert_eq!(rest["next_cursor"], Value::Null);

    let mut count = Value::Null;
    for _ in 0..200 {
        count = query(&app, &format!("/v1/news/{}", articles[0].id), None, None)
            .await?
            .1["read_count"]
            .clone();
        if count == json!(1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        count,
        json!(1),
        "one authenticated read of the first article"
    );

    assert_eq!(
        query(&app, &history_path, Some(&other.token), None)
            .await?
            .0,
        S::FORBIDDEN
    );
    assert_eq!(
        query(&app, &history_path, None, None).await?.0,
        S::UNAUTHORIZED
    );
    let (status, _) = query(
        &app,
        &format!("{history_path}&cursor=garbage"),
        Some(&reader.token),
        None,
    )
    .await?;
    assert_eq!(status, S::BAD_REQUEST);
    app.stop().await
}

#[tokio::test]
async fn trending_ranks_published_articles_by_their_reads_of_the_last_day() -> TestResult {
    let app = TestApp::spawn().await?;
    let (editor, reader) = (app.editor().await?, app.reader().await?);
    let a = publish(&app, &editor, "sports", &[]).await?;
    let b = publish(&app, &editor, "sports", &[]).await?;
    let c = publish(&app, &editor, "politics", &[]).await?;
    for (article, reads) in [(&a, 3), (&b, 2), (&c, 1)] {
        for _ in 0..reads {
            let (status, _) = query(
                &app,
                &format!("/v1/news/{}", article.id),
                Some(&reader.token),
                Some(&article.token),
            )
            .await?;
            assert_eq!(status, S::OK);
        }
    }
    let ranking = |v: &Value| -> Vec<(String, i64)> {
        v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        (
                            i["news"]["id"].as_str().unwrap_or_default().to_owned(),
                            i["reads"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let expected = vec![
        (a.id.to_string(), 3),
        (b.id.to_string(), 2),
        (c.id.to_string(), 1),
    ];
    let mut all = Value::Null;
    for _ in 0..200 {
        all = query(&app, "/v1/news/trending", None, None).await?.1;
        if ranking(&all) == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(ranking(&all), expected, "most reads first: {all}");
    let (_, sports) = query(
        &app,
        "/v1/news/trending?category=sports&limit=1",
        None,
        None,
    )
    .await?;
    assert_eq!(ranking(&sports), vec![(a.id.to_string(), 3)]);

    let unpublished = app
        .http
        .post(format!("{}/v1/news/{}/unpublish", app.command_url, a.id))
        .bearer_auth(&editor.token)
        .send()
        .await?;
    let token = unpublished.headers()["x-consistency-token"]
        .to_str()?
        .to_owned();
    let (_, after) = query(&app, "/v1/news/trending", None, Some(&token)).await?;
    assert_eq!(
        ranking(&after),
        expected[1..].to_vec(),
        "an unpublished article leaves the list"
    );
    for bad in ["limit=0", "category=weather"] {
        assert_eq!(
            query(&app, &format!("/v1/news/trending?{bad}"), None, None)
                .await?
                .0,
            S::BAD_REQUEST,
            "{bad}"
        );
    }
    app.stop().await
}

#[tokio::test]
async fn a_forged_consistency_token_or_cursor_is_400_at_once() -> TestResult {
    let app = TestApp::spawn().await?;
    let editor = app.editor().await?;
    let live = publish(&app, &editor, "sports", &[]).await?;
    let article = format!("/v1/news/{}", live.id);
    let (status, _) = query(&app, &article, None, Some(&live.token)).await?;
    assert_eq!(
        status,
        S::OK,
        "a token the command API issued is waited for"
    );

    // Positions no command answered: past the end of a partition, a partition the topic
    // does not have. Each used to hold the request for the whole wait, then answer 503.
    for forged in [
        "v1.news~0~999999999",
        "v1.news~9999~0",
        "v1.users~0~4611686018427387904",
    ] {
        let (status, body) = query(&app, &article, None, Some(forged)).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (S::BAD_REQUEST, Some("malformed_request")),
            "{forged}: {body}"
        );
    }

    // A cursor whose time PostgreSQL cannot compare with.
    use base64::Engine as _;
    let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("n1:-8000000000000000:{}", Uuid::now_v7()));
    let (status, body) = query(&app, &format!("/v1/news?cursor={cursor}"), None, None).await?;
    assert_eq!(status, S::BAD_REQUEST, "{body}");
    app.stop().await
}
