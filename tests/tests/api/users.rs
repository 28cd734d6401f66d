//! Black-box tests of registering users: HTTP in, Avro on Kafka, read model out.

use std::time::Duration;

use apache_avro::Schema;
use newsroom_events::Event as _;
use newsroom_events::personal;
use newsroom_events::users::{UserEvent, UserRegistered};
use newsroom_events::wire;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use newsroom_tests::{TestApp, new_user};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

type TestResult = anyhow::Result<()>;

#[tokio::test]
async fn a_registered_user_can_be_read_from_the_query_api_without_any_password() -> TestResult {
    let app = TestApp::spawn().await?;
    let body = new_user();

    let response = app
        .http
        .post(format!("{}/v1/users", app.command_url))
        .header("X-Request-Id", "round-trip-1")
        .json(&body)
        .send()
        .await?;

    assert_eq!(response.status(), StatusCode::CREATED);
    let headers = response.headers().clone();
    let created: Value = response.json().await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    assert!(Uuid::parse_str(&id).is_ok(), "id is a UUID: {created}");
    assert_eq!(headers["location"], format!("/v1/users/{id}").as_str());
    assert_eq!(headers["etag"], "\"1\"");
    assert_eq!(headers["x-request-id"], "round-trip-1");
    assert!(
        headers["x-consistency-token"]
            .to_str()?
            .starts_with("v1.users~")
    );
    assert_eq!(created["name"], body["name"]);
    assert_eq!(created["email"], body["email"]);
    assert_eq!(created["role"], "reader");
    assert_eq!(created["version"], 1);

    let email = body["email"].as_str().unwrap_or_default();
    let password = body["password"].as_str().unwrap_or_default();
    let token = app
        .login(email, password)
        .await?
        .map_err(|s| anyhow::anyhow!("login: {s}"))?;
    let read = app
        .get_eventually(&format!("/v1/users/{id}"), &token, Duration::from_secs(15))
        .await?;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.headers()["etag"], "\"1\"");
    let user: Value = read.json().await?;
    assert_eq!(
        user, created,
        "the read model shows what the command answered"
    );
    let text = user.to_string();
    assert!(
        !text.contains("password") && !text.contains("argon2"),
        "no secret leaks: {text}"
    );
    app.stop().await
}

#[tokio::test]
async fn an_unknown_user_is_404_problem_json() -> TestResult {
    let app = TestApp::spawn().await?;
    let admin = app.admin().await?;

    for path in [
        format!("/v1/users/{}", Uuid::now_v7()),
        "/v1/users/not-a-uuid".to_owned(),
    ] {
        let response = app
            .http
            .get(format!("{}{path}", app.query_url))
            .bearer_auth(&admin.token)
            .send()
            .await?;

        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await?;
        assert_eq!(problem["code"], "not_found");
        assert_eq!(problem["status"], 404);
    }
    app.stop().await
}

#[tokio::test]
async fn every_invalid_field_is_listed_in_one_422_and_nothing_is_written() -> TestResult {
    let app = TestApp::spawn().await?;
    app.admin().await?; // the bootstrap admin's registration is in the log before we count
    let before = app.committed_records(Stream::Users)?.len();
    let cases = [
        (json!({}), vec!["name", "email", "password"]),
        (
            json!({"name": "  ", "email": "not-an-address", "password": "short"}),
            vec!["name", "email", "password"],
        ),
        (
            json!({"name": "x".repeat(101), "email": format!("{}@example.com", "a".repeat(250)), "password": "p".repeat(129)}),
            vec!["name", "email", "password"],
        ),
        (
            json!({"name": 42, "email": null, "password": ["secret123"]}),
            vec!["name", "email", "password"],
        ),
        (
            json!({"name": "Ada", "email": "ada@example.com", "password": "1234567"}),
            vec!["password"],
        ),
    ];

    for (body, fields) in cases {
        let response = app.post_json("/v1/users", &body).await?;

        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await?;
        assert_eq!(problem["code"], "validation_failed");
        let listed: Vec<&str> = problem["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|f| f["field"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(listed, fields, "{body} -> {problem}");
    }
    assert_eq!(
        app.committed_records(Stream::Users)?.len(),
        before,
        "no event for invalid input"
    );
    app.stop().await
}

#[tokio::test]
async fn malformed_json_is_400_and_a_non_object_too() -> TestResult {
    let app = TestApp::spawn().await?;

    for body in ["{\"name\": ", "not json", "[1, 2]", "\"a string\""] {
        let response = app
            .http
            .post(format!("{}/v1/users", app.command_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;

        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = response.json().await?;
        assert_eq!(problem["code"], "malformed_request", "{body}");
    }
    app.stop().await
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_413() -> TestResult {
    let app = TestApp::spawn().await?;
    let mut body = new_user();
    body["name"] = json!("x".repeat(1 << 20));

    let response = app.post_json("/v1/users", &body).await?;

    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let problem: Value = response.json().await?;
    assert_eq!(problem["code"], "payload_too_large");
    app.stop().await
}

#[tokio::test]
async fn a_body_that_is_not_json_by_content_type_is_415() -> TestResult {
    let app = TestApp::spawn().await?;
    let body = new_user().to_string();

    for content_type in [Some("text/plain"), Some("application/xml"), None] {
        let mut request = app
            .http
            .post(format!("{}/v1/users", app.command_url))
            .body(body.clone());
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await?;

        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        let problem: Value = response.json().await?;
        assert_eq!(problem["code"], "unsupported_media_type");
    }
    app.stop().await
}

#[tokio::test]
async fn the_event_on_the_topic_is_confluent_framed_avro_the_registry_resolves() -> TestResult {
    let app = TestApp::spawn().await?;
    let body = new_user();
    let response = app
        .http
        .post(format!("{}/v1/users", app.command_url))
        .header("X-Request-Id", "framing-check")
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await?;
    let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;

    let records = app.committed_records(Stream::Users)?;

    // The bootstrap admin registers too; the test's record is the one keyed by its id.
    let record = records
        .iter()
        .find(|r| r.key == id.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("no record for {id} among {}", records.len()))?;
    assert_eq!(record.key, id.as_bytes(), "keyed by the user id");
    assert_eq!(record.payload[0], wire::MAGIC);
    let (schema_id, _) = wire::unframe(&record.payload)?;
    // Ask the registry itself, over its Confluent REST API, what that id is.
    let registered: Value = app
        .http
        .get(format!(
            "{}/schemas/ids/{schema_id}",
            app.settings.registry.url
        ))
        .send()
        .await?
        .json()
        .await?;
    let registered = Schema::parse_str(registered["schema"].as_str().unwrap_or_default())?;
    assert_eq!(
        registered.canonical_form(),
        Schema::parse_str(UserRegistered::SCHEMA)?.canonical_form()
    );

    let registry = Registry::connect(&app.settings.registry).await?;
    let decoded = codec::decode(&registry, &record.payload).await?;
    let UserEvent::Registered(event) = UserEvent::from_avro(&decoded.name, decoded.value)? else {
        anyhow::bail!("not a registration");
    };
    assert_eq!(event.metadata.aggregate_id, id);
    assert_eq!(event.metadata.aggregate_version, 1);
    assert_eq!(event.metadata.correlation_id, "framing-check");
    assert_eq!(event.metadata.actor_id, None);
    let key = app
        .user_key(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no key for {id}"))?;
    let personal = personal::open(&key, id, &event.personal)?;
    assert_eq!(personal.email.as_deref(), body["email"].as_str());
    let hash = personal.password_hash.unwrap_or_default();
    assert!(
        hash.starts_with("$argon2id$"),
        "stored only as an Argon2id hash"
    );
    let raw = String::from_utf8_lossy(&record.payload);
    assert!(
        !raw.contains("correct horse battery"),
        "no password in the log"
    );
    assert!(
        !raw.contains(body["email"].as_str().unwrap_or("?")),
        "no clear e-mail in the log"
    );
    app.stop().await
}

#[tokio::test]
async fn ops_endpoints_answer() -> TestResult {
    let app = TestApp::spawn().await?;

    for base in [&app.command_url, &app.query_url] {
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            let response = app.http.get(format!("{base}{path}")).send().await?;
            assert_eq!(response.status(), StatusCode::OK, "{base}{path}");
        }
        let metrics = app
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        assert!(
            metrics.contains("newsroom_http_requests_total"),
            "{metrics}"
        );
    }
    app.stop().await
}

#[tokio::test]
async fn projection_lag_is_published_per_projection_and_partition() -> TestResult {
    let app = TestApp::spawn().await?;
    app.reader().await?;

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = app
            .http
            .get(format!("{}/metrics", app.query_url))
            .send()
            .await?
            .text()
            .await?;
        let has = |name: &str| {
            metrics.lines().any(|l| {
                l.starts_with(name)
                    && l.contains("projection=\"users\"")
                    && l.contains("partition=\"")
            })
        };
        if has("newsroom_projection_lag_events") && has("newsroom_projection_lag_milliseconds") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lag metrics: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await
}

#[tokio::test]
async fn a_password_change_a_role_change_and_an_erasure_revoke_earlier_tokens_on_both_apis()
-> TestResult {
    let app = TestApp::spawn().await?;
    let admin = app.admin().await?;
    let (http, command_url, query_url) =
        (&app.http, app.command_url.as_str(), app.query_url.as_str());
    // Reads carry the consistency token of the last command, so that they see its effect.
    let last = &std::sync::Mutex::new(String::new());
    let command = |method: reqwest::Method, path: String, token: String, body: Value| async move {
        let response = http
            .request(method, format!("{command_url}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        if let Some(written) = response.headers().get("x-consistency-token") {
            *last.lock().unwrap_or_else(|e| e.into_inner()) = written.to_str()?.to_owned();
        }
        anyhow::Ok(response.status())
    };
    let read = |id: uuid::Uuid, token: String| async move {
        let written = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut request = http
            .get(format!("{query_url}/v1/users/{id}"))
            .bearer_auth(token);
        if !written.is_empty() {
            request = request.header("x-consistency-token", written);
        }
        let response = request.send().await?;
        anyhow::Ok(response.status())
    };

    // A demoted admin cannot promote itself again with its old token.
    let user = app.reader().await?;
    let role = format!("/v1/users/{}/role", user.id);
    let status = command(
        reqwest::Method::PUT,
        role.clone(),
        admin.token.clone(),
        json!({"role": "admin"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let as_admin = app
        .login(&user.email, &user.password)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let status = command(
        reqwest::Method::PUT,
        role.clone(),
        admin.token.clone(),
        json!({"role": "reader"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let status = command(
        reqwest::Method::PUT,
        role.clone(),
        as_admin.clone(),
        json!({"role": "admin"}),
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old admin token is revoked"
    );
    let fresh = app
        .login(&user.email, &user.password)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    assert_eq!(
        read(user.id, fresh.clone()).await?,
        StatusCode::OK,
        "a new token works"
    );

    // A password change revokes the tokens issued before it, on both APIs.
    assert_eq!(read(user.id, fresh.clone()).await?, StatusCode::OK);
    let password = format!("/v1/users/{}/password", user.id);
    let change = json!({"current_password": user.password, "new_password": "another password 1"});
    let status = command(reqwest::Method::PUT, password, fresh.clone(), change).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Another process (the query API) trusts what it read of the floor for a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while read(user.id, fresh.clone()).await? != StatusCode::UNAUTHORIZED {
        assert!(
            std::time::Instant::now() < deadline,
            "the query API still takes the token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rename = format!("/v1/users/{}", user.id);
    let status = command(
        reqwest::Method::PATCH,
        rename.clone(),
        fresh,
        json!({"name": "Old token"}),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "command API");
    let newest = app
        .login(&user.email, "another password 1")
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let status = command(
        reqwest::Method::PATCH,
        rename,
        newest.clone(),
        json!({"name": "New token"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);

    // An erased editor's token cannot publish.
    let editor = app.editor().await?;
    let status = command(
        reqwest::Method::DELETE,
        format!("/v1/users/{}", editor.id),
        editor.token.clone(),
        Value::Null,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let article = json!({"category": "sports", "title": "After erasure", "content": "x"});
    let status = command(
        reqwest::Method::POST,
        "/v1/news".into(),
        editor.token,
        article,
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.stop().await
}
