//! Redis stopped: the query API answers the same from PostgreSQL, readiness says it is
//! degraded, and Redis serves again once it is back; a Redis that lost its data is rebuilt
//! from the log. Its own test binary, because it stops the shared Redis (cargo runs test
//! binaries one after another, so no other test sees the outage).

use std::time::Duration;

use newsroom_tests::{TestApp, TestUser, infra, until};
use reqwest::StatusCode as S;
use serde_json::{Value, json};

/// How long a test waits for what happens asynchronously.
const WAIT: Duration = Duration::from_secs(20);

async fn get(app: &TestApp, path: &str, consistency: Option<&str>) -> anyhow::Result<(S, Value)> {
    let mut request = app.http.get(format!("{}{path}", app.query_url));
    if let Some(token) = consistency {
        request = request.header("x-consistency-token", token);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// Drafts and publishes; the id and the publication's consistency token.
async fn publish(
    app: &TestApp,
    editor: &TestUser,
    category: &str,
) -> anyhow::Result<(String, String)> {
    let body = json!({"category": category, "title": format!("About {category}"), "content": "Text.", "tags": ["t"]});
    let (id, _) = app.draft(&editor.token, &body).await?;
    let token = app.publish(&editor.token, id).await?;
    Ok((id.to_string(), token))
}

async fn readiness(app: &TestApp) -> anyhow::Result<(S, String)> {
    let response = app
        .http
        .get(format!("{}/readyz", app.query_url))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    Ok((
        status,
        body["status"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test]
async fn with_redis_down_queries_answer_the_same_from_postgres_and_redis_serves_again_once_back()
-> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let (editor, reader) = (app.editor().await?, app.reader().await?);
    let (a, _) = publish(&app, &editor, "politics").await?;
    let (b, _) = publish(&app, &editor, "sports").await?;
    let (c, token) = publish(&app, &editor, "sports").await?;
    for (id, times) in [(&a, 3), (&b, 2), (&c, 1)] {
        for _ in 0..times {
            let response = app
                .http
                .get(format!("{}/v1/news/{id}", app.query_url))
                .bearer_auth(&reader.token)
                .header("x-consistency-token", &token)
                .send()
                .await?;
            assert_eq!(response.status(), S::OK);
        }
    }
    // Wait until Redis holds every read, then keep what it answers.
    until("the reads in the trending list", WAIT, || async {
        let (_, list) = get(&app, "/v1/news/trending", None).await?;
        let reads: Vec<i64> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["reads"].as_i64())
            .collect();
        Ok(reads == [3, 2, 1])
    })
    .await?;
    let mut paths = vec![
        format!("/v1/news/{a}"),
        format!("/v1/news/{b}"),
        "/v1/news/trending".to_owned(),
        "/v1/news/trending?category=sports".to_owned(),
        "/v1/news".to_owned(),
        "/v1/news?category=sports".to_owned(),
        format!("/v1/news?author_id={}&limit=2", editor.id),
        "/v1/news?tag=t&limit=1".to_owned(),
    ];
    let redis_before = app.query_answers("article", "redis").await?;
    let lists_before = app.query_answers("list", "redis").await?;
    let mut from_redis = Vec::new();
    let mut i = 0;
    while let Some(path) = paths.get(i).cloned() {
        let (status, body) = get(&app, &path, None).await?;
        assert_eq!(status, S::OK, "{path}");
        // The next pages of the last list, by their cursors.
        if i + 1 == paths.len()
            && let Some(cursor) = body["next_cursor"].as_str()
        {
            paths.push(format!("/v1/news?tag=t&limit=1&cursor={cursor}"));
        }
        from_redis.push(body);
        i += 1;
    }
    assert!(
        app.query_answers("article", "redis").await? >= redis_before + 2,
        "Redis served the articles"
    );
    assert_eq!(
        app.query_answers("list", "redis").await?,
        lists_before + 4 + 2,
        "Redis served every list and the pages after the first"
    );
    assert_eq!(paths.len(), 4 + 4 + 2, "three pages of one article each");
    assert_eq!(from_redis[4]["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(from_redis[5]["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(from_redis[6]["items"][0]["id"], c.as_str());
    assert_eq!(from_redis[0]["read_count"], 3);
    assert_eq!(readiness(&app).await?, (S::OK, "ready".to_owned()));

    infra(&["down", "redis"])?;
    let result = async {
        until("readiness to report Redis", WAIT, || async {
            Ok(readiness(&app).await? == (S::OK, "degraded".to_owned()))
        })
        .await?;
        let postgres_before = app.query_answers("article", "postgres").await?;
        let lists_before = app.query_answers("list", "postgres").await?;
        for (path, expected) in paths.iter().zip(&from_redis) {
            let (status, body) = get(&app, path, None).await?;
            assert_eq!(status, S::OK, "{path} without Redis");
            assert_eq!(&body, expected, "{path} from PostgreSQL equals Redis");
        }
        assert!(app.query_answers("article", "postgres").await? >= postgres_before + 2);
        assert_eq!(
            app.query_answers("list", "postgres").await?,
            lists_before + 4 + 2
        );
        // Writes and read-your-writes go on.
        let (d, token) = publish(&app, &editor, "famous").await?;
        let (status, body) = get(&app, &format!("/v1/news/{d}"), Some(&token)).await?;
        assert_eq!(status, S::OK);
        assert_eq!(body["status"], "published");
        anyhow::Ok(d)
    }
    .await;
    infra(&["up", "redis"])?;
    let d = result?;

    until("readiness without Redis", WAIT, || async {
        Ok(readiness(&app).await? == (S::OK, "ready".to_owned()))
    })
    .await?;
    // Redis catches up with what happened while it was down, and serves again.
    until(
        "Redis to serve the article published while it was down",
        WAIT,
        || async {
            let before = app.query_answers("article", "redis").await?;
            let (status, _) = get(&app, &format!("/v1/news/{d}"), None).await?;
            Ok(status == S::OK && app.query_answers("article", "redis").await? > before)
        },
    )
    .await?;

    // A Redis that lost its data is rebuilt from the log; PostgreSQL answers meanwhile.
    let mut redis = redis::Client::open(app.settings.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let root = newsroom_infra::redis::root(&app.settings.kafka, "cache");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{root}:*"))
        .query_async(&mut redis)
        .await?;
    assert!(!keys.is_empty());
    let (): () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    let (status, body) = get(&app, &paths[0], None).await?;
    assert_eq!(
        (status, &body),
        (S::OK, &from_redis[0]),
        "answered while Redis is empty"
    );
    until("Redis to be rebuilt", WAIT, || async {
        let before = app.query_answers("trending", "redis").await?;
        let (_, list) = get(&app, &paths[2], None).await?;
        Ok(list == from_redis[2] && app.query_answers("trending", "redis").await? > before)
    })
    .await?;

    // A version built before the list indexes (no layout recorded) serves articles, and
    // lists come from PostgreSQL until a replay builds one with them (ADR 28).
    let active: String = redis::cmd("GET")
        .arg(format!("{root}:active"))
        .query_async(&mut redis)
        .await?;
    let (): () = redis::cmd("DEL")
        .arg(format!("{root}:v{active}:layout"))
        .query_async(&mut redis)
        .await?;
    let lists = |store| app.query_answers("list", store);
    let (postgres, served) = (lists("postgres").await?, lists("redis").await?);
    let (status, from_postgres) = get(&app, &paths[4], None).await?;
    assert_eq!(status, S::OK);
    assert_eq!(
        from_postgres["items"][0]["id"],
        d.as_str(),
        "{from_postgres}"
    );
    assert_eq!(lists("postgres").await?, postgres + 1, "from PostgreSQL");
    assert_eq!(lists("redis").await?, served);
    app.newsroom_cli(&["replay", "cache", "--quiet"]).await?;
    let (status, body) = get(&app, &paths[4], None).await?;
    assert_eq!((status, &body), (S::OK, &from_postgres));
    assert_eq!(
        lists("redis").await?,
        served + 1,
        "from the replayed version"
    );
    app.stop().await
}
