//! The schema-driven fuzzer: schemathesis (installed by `infra/local.sh`) generates
//! requests from each API's own `/openapi.json` — valid ones and broken ones, boundary
//! values, sequences that follow the links between operations — and checks every answer:
//! no 5xx but a documented 503, no undocumented status code, and content type and body as
//! documented. `NEWSROOM_FUZZ_EXAMPLES` (default 10 per operation and phase) and
//! `NEWSROOM_FUZZ_SEED` (default 1) size and vary the run; the README gives a full run's
//! counts.

use std::sync::atomic::{AtomicUsize, Ordering};

use newsroom::Roles;
use newsroom_tests::{TestApp, state_dir};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_only_documented_answers() -> anyhow::Result<()> {
    let venv = state_dir().join("fuzz/venv/bin");
    anyhow::ensure!(
        venv.join("st").exists(),
        "schemathesis is missing from {}: run infra/local.sh up",
        venv.display()
    );
    // The roles run in this process: any panic of theirs (a handler, a consumer, a
    // background task) is counted here, whether or not an answer showed it.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        hook(info);
    }));
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
    let (id, _) = app
        .draft(
            &editor.token,
            &json!({"category": "sports", "title": "Fuzzed", "content": "Some text.", "tags": ["fuzz"]}),
        )
        .await?;
    app.command(
        reqwest::Method::POST,
        &format!("/v1/news/{id}/publish"),
        Some(&editor.token),
        None,
        None,
    )
    .await?;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    // Requests both APIs served, how many of them 2xx and how many 401 (one process, one
    // registry of metrics), from /metrics.
    let served = || async {
        let text = app
            .http
            .get(format!("{}/metrics", app.query_url))
            .send()
            .await?
            .text()
            .await?;
        let (mut all, mut ok, mut unauthorized) = (0u64, 0u64, 0u64);
        for line in text
            .lines()
            .filter(|l| l.starts_with("newsroom_http_requests_total{"))
        {
            let count = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            all += count;
            if line.contains("status=\"2") {
                ok += count;
            }
            if line.contains("status=\"401\"") {
                unauthorized += count;
            }
        }
        anyhow::Ok((all, ok, unauthorized))
    };
    // The operations by which the caller can demote, lock out or erase itself (it learns
    // its own id from the articles it writes) run last: until then it stays an admin.
    const SELF_HARM: [&str; 3] = [
        "PUT /v1/users/{id}/role",
        "PUT /v1/users/{id}/password",
        "DELETE /v1/users/{id}",
    ];
    let filter = |flag: &str| -> Vec<String> {
        SELF_HARM
            .iter()
            .flat_map(|name| [flag.to_owned(), (*name).to_owned()])
            .collect()
    };
    let runs: [(&str, &String, Vec<String>); 3] = [
        ("command", &app.command_url, filter("--exclude-name")),
        ("query", &app.query_url, Vec::new()),
        (
            "command (self-harm)",
            &app.command_url,
            filter("--include-name"),
        ),
    ];
    // One token for all runs (the generated requests may change the admin's e-mail, so
    // it might not log in again).
    let admin = app.admin().await?;
    let mut failures = Vec::new();
    for (api, url, operations) in runs {
        let reports = std::env::temp_dir().join(format!(
            "newsroom-fuzz-{}-{}",
            api.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
            app.settings.kafka.topic_prefix
        ));
        let mut command = tokio::process::Command::new(venv.join("st"));
        command
            // Its own files (.schemathesis/) go beside the reports, not into the tree.
            .current_dir(std::env::temp_dir())
            .args(["--config-file", config, "run"])
            .arg(format!("{url}/openapi.json"))
            .args(["--url", url])
            .args(["-H", &format!("Authorization: Bearer {}", admin.token)])
            .args(&operations)
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
        let after = served().await?;
        // Less the look at the metrics itself.
        let requests = after.0.saturating_sub(before.0 + 1);
        let succeeded = after.1.saturating_sub(before.1 + 1);
        let unauthorized = after.2 - before.2;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let cases = stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(" generated"))
            .unwrap_or("no count printed");
        eprintln!(
            "fuzz: {api} API, seed {seed}, {examples} examples: {cases}; {requests} requests, {succeeded} answered 2xx, {unauthorized} 401 (report in {})",
            reports.display()
        );
        let still = app
            .http
            .get(format!("{}/v1/users/{}", app.query_url, admin.id))
            .bearer_auth(&admin.token)
            .send()
            .await?
            .status();
        eprintln!("fuzz: the admin's token after the {api} API's run: {still}");
        // Generated requests that reach the logic, not only its refusals: some succeed,
        // and the caller stays a caller (an admin that erased itself would leave 401s).
        if operations.iter().all(|o| o != "--include-name")
            && (succeeded == 0 || unauthorized * 2 > requests)
        {
            failures.push(format!(
                "{api} API: {succeeded} of {requests} requests answered 2xx, {unauthorized} 401"
            ));
        }
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
    app.stop().await?;
    let panics = PANICS.load(Ordering::SeqCst);
    anyhow::ensure!(
        panics == 0,
        "{panics} panics in the roles (their messages are above)"
    );
    Ok(())
}

/// Panics of any thread of this test process.
static PANICS: AtomicUsize = AtomicUsize::new(0);
