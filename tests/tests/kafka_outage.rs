//! Kafka stopped: the command API answers 503 at once and writes nothing, then recovers.
//! Its own test binary, because it stops the shared broker (cargo runs test binaries one
//! after another, so no other test sees the outage).

use std::time::{Duration, Instant};

use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use newsroom_tests::{TestApp, infra, new_user};
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn with_kafka_down_registration_is_503_and_nothing_is_appended() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let before = new_user();
    assert_eq!(
        app.post_json("/v1/users", &before).await?.status(),
        StatusCode::CREATED
    );
    // An article to read while Kafka is down.
    let admin = app.admin().await?;
    let article = serde_json::json!({"category": "sports", "title": "Read me", "content": "x"});
    let (news, _) = app.draft(&admin.token, &article).await?;
    let (status, _) = app
        .command(
            reqwest::Method::POST,
            &format!("/v1/news/{news}/publish"),
            Some(&admin.token),
            None,
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let news_path = format!("/v1/news/{news}");
    app.get_eventually(&news_path, &admin.token, Duration::from_secs(15))
        .await?;

    infra(&["down", "kafka"])?;
    let refused = new_user();
    let outcome = async {
        // Let the writer notice; then every request must fail fast.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last;
        loop {
            let started = Instant::now();
            let response = app.post_json("/v1/users", &refused).await?;
            let elapsed = started.elapsed();
            last = response.status();
            if last == StatusCode::SERVICE_UNAVAILABLE {
                assert!(response.headers().contains_key("retry-after"));
                let problem: Value = response.json().await?;
                assert_eq!(problem["code"], "unavailable");
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "never refused while Kafka was down (last {last})"
            );
            let _ = elapsed;
        }
        let started = Instant::now();
        let again = app.post_json("/v1/users", &refused).await?;
        assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "fails fast: {:?}",
            started.elapsed()
        );
        let ready = app
            .http
            .get(format!("{}/readyz", app.command_url))
            .send()
            .await?;
        assert_eq!(
            ready.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "readiness reports Kafka down"
        );
        // Reading still answers at full speed; the reads it records are dropped (counted).
        for _ in 0..20 {
            let started = Instant::now();
            let read = app
                .http
                .get(format!("{}{news_path}", app.query_url))
                .bearer_auth(&admin.token)
                .send()
                .await?;
            assert_eq!(read.status(), StatusCode::OK);
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "a read waits for nothing: {:?}",
                started.elapsed()
            );
        }
        anyhow::Ok(())
    }
    .await;
    // Bring Kafka back whatever happened, so later test binaries find it.
    infra(&["up", "kafka"])?;
    outcome?;

    let after = new_user();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = app.post_json("/v1/users", &after).await?.status();
        if status == StatusCode::CREATED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        anyhow::ensure!(
            Instant::now() < deadline,
            "never recovered after Kafka came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let registry = Registry::connect(&app.settings.registry).await?;
    let mut emails = Vec::new();
    for record in app.committed_records(Stream::Users)? {
        let decoded = codec::decode(&registry, &record.payload).await?;
        let UserEvent::Registered(e) = UserEvent::from_avro(&decoded.name, decoded.value)? else {
            continue;
        };
        let id = e.metadata.aggregate_id;
        let key = app
            .user_key(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no key for {id}"))?;
        let personal = newsroom_events::personal::open(&key, id, &e.personal)?;
        emails.push(personal.email.unwrap_or_default());
    }
    emails.sort();
    let mut expected = vec![
        app.settings.auth.admin_email.clone().unwrap_or_default(),
        before["email"].as_str().unwrap_or_default().to_owned(),
        after["email"].as_str().unwrap_or_default().to_owned(),
    ];
    expected.sort();
    assert_eq!(
        emails, expected,
        "exactly the acknowledged registrations are in the log"
    );
    app.stop().await
}
