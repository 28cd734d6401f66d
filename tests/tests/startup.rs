//! A role started before its database: it waits for PostgreSQL (saying so), serves once
//! it answers, and gives up with a clear error after its startup wait. The database is
//! reached through a proxy the test cuts (the chaos run found roles exiting at once).

use std::time::Duration;

use newsroom::Roles;
use newsroom_tests::{Cut, TestApp, until};

/// `newsroom query-api` reaching the test's database through `cut`, with `env`; its
/// address and log file.
fn query_api(
    app: &TestApp,
    cut: &Cut,
    env: &[(&str, &str)],
) -> anyhow::Result<(std::process::Child, String, std::path::PathBuf)> {
    let mut url = reqwest::Url::parse(&app.settings.postgres.url)?;
    url.set_port(Some(cut.port))
        .map_err(|()| anyhow::anyhow!("no port"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::env::temp_dir().join(format!("newsroom-startup-{port}.log"));
    let child = app
        .newsroom("startup")?
        .arg("query-api")
        .env("NEWSROOM_DATABASE_URL", url.as_str())
        .env("NEWSROOM_QUERY_ADDR", format!("127.0.0.1:{port}"))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok((child, format!("http://127.0.0.1:{port}"), log))
}

async fn cut_database(app: &TestApp) -> anyhow::Result<Cut> {
    let url = reqwest::Url::parse(&app.settings.postgres.url)?;
    let cut = Cut::to(format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    ))
    .await?;
    cut.set_open(false);
    Ok(cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_started_before_its_database_waits_and_serves_once_it_answers() -> anyhow::Result<()>
{
    let app = TestApp::spawn_with(Roles::NONE).await?;
    let cut = cut_database(&app).await?;
    let (mut child, url, log) = query_api(&app, &cut, &[])?;
    let http = newsroom_tests::client();
    until(
        "the role says it waits for PostgreSQL",
        Duration::from_secs(30),
        || async {
            Ok(std::fs::read_to_string(&log)?.contains("PostgreSQL cannot be reached yet"))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(child.try_wait()?.is_none(), "the role gave up at once");
    cut.set_open(true);
    until("the role serves", Duration::from_secs(60), || async {
        Ok(http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()))
    })
    .await?;
    child.kill()?;
    child.wait()?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_whose_database_never_answers_gives_up_after_its_startup_wait() -> anyhow::Result<()>
{
    let app = TestApp::spawn_with(Roles::NONE).await?;
    let cut = cut_database(&app).await?;
    let (mut child, _, log) =
        query_api(&app, &cut, &[("NEWSROOM_DATABASE_STARTUP_WAIT_SECS", "2")])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still running 30 s after a 2 s startup wait"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success());
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        logged.contains("PostgreSQL could not be reached within 2 s"),
        "{logged}"
    );
    app.stop().await
}
