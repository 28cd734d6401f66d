//! newsroom over TLS: Kafka through a SASL_SSL listener, PostgreSQL and Redis through TLS
//! (infra/local.sh's `tls` service; none of the three takes a plain connection there),
//! every role in one child process configured as an operator would.

use std::time::Duration;

use newsroom::Roles;
use newsroom_tests::{TestApp, state_dir, until};
use reqwest::StatusCode as S;
use serde_json::json;

/// The port of a TLS store, as infra/local.sh was told (`variable`) or its default.
fn port(variable: &str, default: u16) -> u16 {
    std::env::var(variable)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_works_over_tls_to_kafka_postgresql_and_redis() -> anyhow::Result<()> {
    let tls = state_dir().join("tls");
    let ca = tls.join("ca.pem").to_string_lossy().into_owned();
    let kafka_password = std::fs::read_to_string(tls.join("kafka-password"))
        .map_err(|e| anyhow::anyhow!("no TLS files ({e}): run infra/local.sh up tls"))?;
    let ca_for_settings = ca.clone();
    let (kafka, postgres, redis) = (
        port("NEWSROOM_KAFKA_SASL_SSL_PORT", 9094),
        port("NEWSROOM_PG_TLS_PORT", 5442),
        port("NEWSROOM_REDIS_TLS_PORT", 6380),
    );
    let mut app = TestApp::spawn_adjusted(Roles::NONE, move |s| {
        s.kafka.brokers = format!("127.0.0.1:{kafka}");
        s.kafka.security_protocol = "sasl_ssl".into();
        s.kafka.sasl_mechanism = "PLAIN".into();
        s.kafka.sasl_username = Some("newsroom".into());
        s.kafka.sasl_password = Some(kafka_password.trim().parse().unwrap_or_default());
        s.kafka.ssl_ca_location = Some(ca_for_settings.clone());
        s.postgres.url = format!(
            "postgres://newsroom:newsroom@127.0.0.1:{postgres}/postgres?sslmode=verify-full&sslrootcert={ca_for_settings}"
        );
        s.redis.url = format!("rediss://127.0.0.1:{redis}/");
    })
    .await?;
    let ports = [0u16; 2].map(|_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0)
    });
    let log = std::env::temp_dir().join(format!("newsroom-tls-{}.log", ports[0]));
    let mut child = app
        .newsroom("tls")?
        .arg("run")
        .env("NEWSROOM_COMMAND_ADDR", format!("127.0.0.1:{}", ports[0]))
        .env("NEWSROOM_QUERY_ADDR", format!("127.0.0.1:{}", ports[1]))
        // Redis's TLS (native-tls, OpenSSL) trusts the system's CAs and this file's.
        .env("SSL_CERT_FILE", &ca)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    app.command_url = format!("http://127.0.0.1:{}", ports[0]);
    app.query_url = format!("http://127.0.0.1:{}", ports[1]);
    let http = newsroom_tests::client();
    let result = async {
        for url in [&app.command_url, &app.query_url] {
            until("the APIs are ready", Duration::from_secs(90), || async {
                anyhow::Ok(
                    http.get(format!("{url}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                )
            })
            .await?;
        }
        // Written through Kafka (SASL_SSL), projected into PostgreSQL and Redis (TLS),
        // answered from Redis.
        let editor = app.editor().await?;
        let (status, created) = app
            .command(
                reqwest::Method::POST,
                "/v1/news",
                Some(&editor.token),
                Some(&json!({"category": "politics", "title": "Over TLS", "content": "Encrypted all the way.", "tags": ["tls"]})),
                None,
            )
            .await?;
        anyhow::ensure!(status == S::CREATED, "{status} {created}");
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        let (status, body) = app
            .command(
                reqwest::Method::POST,
                &format!("/v1/news/{id}/publish"),
                Some(&editor.token),
                None,
                None,
            )
            .await?;
        anyhow::ensure!(status == S::OK, "{status} {body}");
        until("the article is served from Redis", Duration::from_secs(60), || async {
            let served = http
                .get(format!("{}/v1/news/{id}", app.query_url))
                .send()
                .await
                .is_ok_and(|r| r.status() == S::OK);
            anyhow::Ok(served && app.query_answers("article", "redis").await? > 0)
        })
        .await
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = logged.lines().rev().take(20).collect();
        anyhow::bail!(
            "{e:#}\nlast lines of {}:\n{}",
            log.display(),
            tail.join("\n")
        );
    }
    app.stop().await
}
