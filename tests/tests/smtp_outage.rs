//! The SMTP server down while articles are published: the notifier keeps its inbox
//! entries, the mailer retries with backoff behind its circuit breaker, and once the
//! server is back every e-mail is delivered exactly once. Its own test binary, because it
//! stops the shared SMTP server.

use std::time::Duration;

use newsroom_tests::{TestApp, infra, mails_to};
use reqwest::StatusCode as S;
use serde_json::json;

#[tokio::test]
async fn with_smtp_down_emails_wait_and_are_delivered_once_when_it_returns() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let (editor, follower) = (app.editor().await?, app.reader().await?);
    app.follow(&follower, &["politics"]).await?;

    infra(&["down", "smtp"])?;
    let outcome = async {
        let mut titles = Vec::new();
        for i in 0..3 {
            let title = format!("Outage story {i} {}", uuid::Uuid::now_v7().simple());
            let (status, created) = app
                .command(
                    reqwest::Method::POST,
                    "/v1/news",
                    Some(&editor.token),
                    Some(&json!({"category": "politics", "title": title, "content": "Text."})),
                    None,
                )
                .await?;
            anyhow::ensure!(status == S::CREATED, "draft: {status}");
            let id = created["id"].as_str().unwrap_or_default();
            let response = app
                .http
                .post(format!("{}/v1/news/{id}/publish", app.command_url))
                .bearer_auth(&editor.token)
                .send()
                .await?;
            anyhow::ensure!(response.status() == S::OK);
            titles.push(title);
        }
        // The mailer tries, fails, backs off and opens its circuit; nothing is lost.
        let pool = app.pool().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (failing,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM email_outbox WHERE sent_at IS NULL AND attempts > 0 AND last_error IS NOT NULL",
            )
            .fetch_one(&pool)
            .await?;
            if failing == 3 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the e-mails never failed ({failing})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pool.close().await;
        anyhow::Ok(titles)
    }
    .await;
    infra(&["up", "smtp"])?;
    let titles = outcome?;
    assert!(
        mails_to(&follower.email)?.is_empty(),
        "nothing got through while it was down"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while mails_to(&follower.email)?.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the e-mails never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut subjects: Vec<String> = mails_to(&follower.email)?
        .into_iter()
        .map(|m| m.subject)
        .collect();
    subjects.sort();
    assert_eq!(subjects.len(), 3, "each e-mail once: {subjects:?}");
    for title in &titles {
        assert!(
            subjects.iter().any(|s| s.contains(title.as_str())),
            "{title} in {subjects:?}"
        );
    }
    app.stop().await
}
