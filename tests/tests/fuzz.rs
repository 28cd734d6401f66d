//! The schema-driven fuzzer: schemathesis (installed by `infra/local.sh`) generates
//! requests from each API's own `/openapi.json` — valid ones and broken ones, boundary
//! values, sequences that follow the links between operations — and checks every answer:
//! no 5xx but a documented 503, no undocumented status code, and content type and body as
//! documented. `NEWSROOM_FUZZ_EXAMPLES` (default 10 per operation and phase) and
//! `NEWSROOM_FUZZ_SEED` (default 1) size and vary the run; the README gives a full run's
//! counts.

use std::path::PathBuf;

use newsroom::Roles;
use newsroom_tests::TestApp;
use reqwest::StatusCode as S;
use serde_json::json;

fn state_dir() -> PathBuf {
    std::env::var_os("NEWSROOM_STATE_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.local")),
        PathBuf::from,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_only_documented_answers() -> anyhow::Result<()> {
    let venv = state_dir().join("fuzz/venv/bin");
    anyhow::ensure!(
        venv.join("st").exists(),
        "schemathesis is missing from {}: run infra/local.sh up",
        venv.display()
    );
    let examples = std::env::var("NEWSROOM_FUZZ_EXAMPLES").unwrap_or_else(|_| "10".into());
    let seed = std::env::var("NEWSROOM_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    // The throttles of password endpoints are tested elsewhere; here they would turn most
    // generated logins and registrations into 429s.
    let app = TestApp::spawn_adjusted(Roles::ALL, |s| {
        s.http.login_failures_per_account = 0;
        s.http.login_failures_per_address = 0;
        s.http.credential_changes_per_address = 0;
    })
    .await?;
    // Something for the generated requests to find: a published article.
    let editor = app.editor().await?;
    let (status, body) = app
        .command(
            reqwest::Method::POST,
            "/v1/news",
            Some(&editor.token),
            Some(&json!({"category": "sports", "title": "Fuzzed", "content": "Some text.", "tags": ["fuzz"]})),
            None,
        )
        .await?;
    anyhow::ensure!(status == S::CREATED, "{status} {body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    app.command(
        reqwest::Method::POST,
        &format!("/v1/news/{id}/publish"),
        Some(&editor.token),
        None,
        None,
    )
    .await?;
    let admin = app.admin().await?;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    // Requests both APIs served (one process, one registry of metrics), from /metrics.
    let served = || async {
        let text = app
            .http
            .get(format!("{}/metrics", app.query_url))
            .send()
            .await?
            .text()
            .await?;
        anyhow::Ok(
            text.lines()
                .filter(|l| l.starts_with("newsroom_http_requests_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    };
    let mut failures = Vec::new();
    for (api, url) in [("command", &app.command_url), ("query", &app.query_url)] {
        let reports = std::env::temp_dir().join(format!(
            "newsroom-fuzz-{api}-{}",
            app.settings.kafka.topic_prefix
        ));
        let mut command = tokio::process::Command::new(venv.join("st"));
        command
            .args(["--config-file", config, "run"])
            .arg(format!("{url}/openapi.json"))
            .args(["--url", url])
            .args(["-H", &format!("Authorization: Bearer {}", admin.token)])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--phases", "examples,coverage,fuzzing,stateful"])
            // One worker: with several threads its coverage phase trips over CPython's
            // "AST constructor recursion depth mismatch" (3.11.2 and 3.11.7 alike).
            .args(["--max-examples", &examples, "--seed", &seed, "--workers", "1"])
            .args(["--report", "junit", "--report-dir"])
            .arg(&reports)
            .args(["--generation-database", "none", "--no-color"])
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        let before = served().await?;
        let output = command.output().await?;
        let requests = served().await?.saturating_sub(before + 1);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let cases = stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(" generated"))
            .unwrap_or("no count printed");
        eprintln!(
            "fuzz: {api} API, seed {seed}, {examples} examples: {cases}; {requests} requests (report in {})",
            reports.display()
        );
        if !output.status.success() {
            let tail: Vec<&str> = stdout.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            failures.push(format!(
                "{api} API ({}):\n{}\n{}",
                output.status,
                tail.join("\n"),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    app.stop().await
}
