//! The web console in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver), logs in, sees a consumer's lag and its parked aggregate,
//! retries the dead letter and sees it clear, browses the aggregate's events and replays a
//! read model. Each page's screenshot is written to `target/console-screenshots/`.
//!
//! A test binary of its own: Chromium's processes would otherwise share the two cores with
//! the many apps of the API tests, whose timing they disturb.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use newsroom::Roles;
use newsroom_tests::{ChildRole, TestApp};
use reqwest::StatusCode as S;
use serde_json::json;

type TestResult = anyhow::Result<()>;

/// A form body as a browser sends it (application/x-www-form-urlencoded).
fn form(request: reqwest::RequestBuilder, fields: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let encode = |text: &str| {
        text.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let body = fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
}

/// chromedriver on a port of its own, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> anyhow::Result<Driver> {
        let binary =
            std::env::var("NEWSROOM_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
        anyhow::ensure!(
            std::path::Path::new(&binary).exists(),
            "{binary} is missing: `infra/local.sh up` installs Debian's chromium and chromium-driver"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let driver = Driver { child, port };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(driver);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("chromedriver never listened on {port}")
    }

    async fn browser(&self) -> anyhow::Result<Client> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": std::env::var("NEWSROOM_CHROMIUM").unwrap_or("/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }),
        );
        Ok(ClientBuilder::native()
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await?)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn screenshot(browser: &Client, name: &str) -> anyhow::Result<()> {
    let png = browser.screenshot().await?;
    std::fs::write(screenshots()?.join(format!("{name}.png")), png)?;
    Ok(())
}

/// Waits until `check` (on the page as the browser has it) holds; the page is only
/// reloaded when `reload` is set (live parts refresh themselves).
async fn until_page<F, Fut>(
    browser: &Client,
    what: &str,
    reload: bool,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the console never showed {what}:\n{}",
            browser.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        if reload {
            browser.refresh().await?;
        }
    }
}

async fn attr(browser: &Client, css: &str, name: &str) -> anyhow::Result<Option<String>> {
    Ok(browser.find(Locator::Css(css)).await?.attr(name).await?)
}

/// The element `css` names, once the page (perhaps still loading after a click) has it.
async fn find(browser: &Client, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
    match browser
        .wait()
        .at_most(Duration::from_secs(45))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(element) => Ok(element),
        Err(e) => anyhow::bail!(
            "no {css} on {}: {e}\n{}",
            browser.current_url().await?,
            browser.source().await.unwrap_or_default()
        ),
    }
}

#[tokio::test]
async fn an_admin_sees_a_consumer_s_lag_retries_its_dead_letter_and_browses_the_aggregate_s_events_in_a_real_browser()
-> TestResult {
    // No projector in the process: the news consumer starts later, as a child process.
    let app = TestApp::spawn_with(Roles {
        command_api: true,
        query_api: true,
        console: true,
        ..Roles::NONE
    })
    .await?;
    let editor = app.editor().await?;
    let admin = app.admin().await?;
    let pool = app.pool().await?;
    // The operator's mistake: the news read model refuses a title.
    sqlx::query("ALTER TABLE news_v1.news ADD CONSTRAINT no_poison CHECK (title <> 'poison')")
        .execute(&pool)
        .await?;
    let (article, _) = app
        .draft(
            &editor.token,
            &json!({"category": "sports", "title": "poison", "content": "Text.", "tags": ["x"]}),
        )
        .await?;

    let driver = Driver::start()?;
    let browser = driver.browser().await?;
    let outcome = async {
        // A page of the console without a session goes to the login form.
        browser
            .goto(&format!("{}/admin/consumers", app.console_url))
            .await?;
        assert!(
            browser
                .current_url()
                .await?
                .path()
                .ends_with("/admin/login")
        );
        // A reader's (editor's) credentials do not open it.
        find(&browser, "#email")
            .await?
            .send_keys(&editor.email)
            .await?;
        find(&browser, "#password")
            .await?
            .send_keys(&editor.password)
            .await?;
        find(&browser, "#login").await?.click().await?;
        let refused = find(&browser, "#login-error").await?.text().await?;
        assert!(refused.contains("admin"), "{refused}");
        screenshot(&browser, "login").await?;
        find(&browser, "#email")
            .await?
            .send_keys(&admin.email)
            .await?;
        find(&browser, "#password")
            .await?
            .send_keys(&admin.password)
            .await?;
        find(&browser, "#login").await?.click().await?;
        find(&browser, "#consumer-news").await?;
        // No token in the page (a JWT starts with `eyJ`), and the session cookie is HttpOnly.
        let source = browser.source().await?;
        assert!(!source.contains("eyJ"), "no token in the page");
        let script_sees: serde_json::Value =
            browser.execute("return document.cookie", vec![]).await?;
        assert_eq!(script_sees, json!(""), "scripts cannot read the session");

        // No projector runs: the news consumer's group has no member and the article's
        // event waits, its age counted.
        until_page(
            &browser,
            "the news consumer stopped and lagging",
            false,
            || async {
                Ok(attr(&browser, "#consumer-news", "data-state")
                    .await?
                    .as_deref()
                    == Some("stopped")
                    && attr(&browser, "#consumer-news", "data-lag")
                        .await?
                        .and_then(|l| l.parse::<i64>().ok())
                        .is_some_and(|l| l > 0))
            },
        )
        .await?;
        let row = find(&browser, "#consumer-news").await?.text().await?;
        assert!(row.contains(" ms"), "the lag's age is shown: {row}");
        screenshot(&browser, "consumers-lagging").await?;

        // The projector starts: the page (refreshing itself) shows the news consumer
        // caught up and the poisoned article parked.
        let projector = ChildRole::start(&app, "project", 0)?;
        until_page(
            &browser,
            "the news consumer parked, without lag",
            false,
            || async {
                Ok(attr(&browser, "#consumer-news", "data-state")
                    .await?
                    .as_deref()
                    == Some("parked")
                    && attr(&browser, "#consumer-news", "data-lag")
                        .await?
                        .as_deref()
                        == Some("0"))
            },
        )
        .await?;
        screenshot(&browser, "consumers").await?;

        // The dead letter, with its reason.
        browser
            .goto(&format!("{}/admin/dead-letters", app.console_url))
            .await?;
        let row = format!("tr.dead-letter[data-aggregate=\"{article}\"]");
        let reason = browser
            .find(Locator::Css(&format!("{row} .reason")))
            .await?
            .text()
            .await?;
        assert!(reason.contains("no_poison"), "{reason}");
        screenshot(&browser, "dead-letters").await?;

        // The operator fixes the cause and retries from the console: the row clears.
        sqlx::query("ALTER TABLE news_v1.news DROP CONSTRAINT no_poison")
            .execute(&pool)
            .await?;
        find(&browser, &format!("{row} button.retry"))
            .await?
            .click()
            .await?;
        let notice = find(&browser, "#notice").await?.text().await?;
        assert!(notice.contains("Asked news to retry"), "{notice}");
        until_page(&browser, "the dead letter cleared", true, || async {
            Ok(browser.find(Locator::Css("#no-dead-letters")).await.is_ok())
        })
        .await?;
        let (title,): (String,) = sqlx::query_as("SELECT title FROM news WHERE id = $1")
            .bind(article)
            .fetch_one(&pool)
            .await?;
        assert_eq!(title, "poison", "the retried event is in the read model");

        // The article's events, decoded, with their metadata; the actor links to the
        // editor's own events.
        browser
            .goto(&format!("{}/admin/events", app.console_url))
            .await?;
        find(&browser, "#aggregate")
            .await?
            .send_keys(&article.to_string())
            .await?;
        find(&browser, "#browse").await?.click().await?;
        let event = find(&browser, "article.event").await?.text().await?;
        assert!(event.contains("newsroom.news.NewsDrafted"), "{event}");
        assert!(event.contains("poison"), "{event}");
        assert!(event.contains(&editor.id.to_string()), "the actor: {event}");
        screenshot(&browser, "events").await?;
        find(
            &browser,
            &format!("a[href=\"/admin/events?aggregate={}\"]", editor.id),
        )
        .await?
        .click()
        .await?;
        until_page(&browser, "the editor's registration", false, || async {
            Ok(browser
                .find(Locator::Css("article.event h2"))
                .await?
                .text()
                .await?
                .contains("newsroom.users.UserRegistered"))
        })
        .await?;
        let registered = find(&browser, "article.event").await?.text().await?;
        assert!(
            registered.contains("(sealed, "),
            "personal data stays sealed: {registered}"
        );

        // A replay from the console, after the question it asks: the news model moves to
        // version 2 and the page says so.
        browser
            .goto(&format!("{}/admin/replay", app.console_url))
            .await?;
        find(&browser, "#replay-news button").await?.click().await?;
        browser.accept_alert().await?;
        until_page(&browser, "the news model switched", false, || async {
            Ok(browser
                .find(Locator::Css("#replay-news .job"))
                .await?
                .text()
                .await?
                .contains("switched from version 1 to 2"))
        })
        .await?;
        screenshot(&browser, "replay").await?;
        let (active,): (i32,) =
            sqlx::query_as("SELECT active FROM projection_versions WHERE projection = 'news'")
                .fetch_one(&pool)
                .await?;
        assert_eq!(active, 2);

        // Logging out ends the session.
        find(&browser, "#logout").await?.click().await?;
        browser
            .goto(&format!("{}/admin/dead-letters", app.console_url))
            .await?;
        assert!(
            browser
                .current_url()
                .await?
                .path()
                .ends_with("/admin/login")
        );
        projector.kill()?;
        anyhow::Ok(())
    }
    .await;
    let _ = browser.close().await;
    outcome?;
    app.stop().await
}

#[tokio::test]
async fn the_console_refuses_other_sites_forms_and_anonymous_callers() -> TestResult {
    let app = TestApp::spawn_with(Roles {
        command_api: true,
        console: true,
        ..Roles::NONE
    })
    .await?;
    let admin = app.admin().await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    // Anonymous: every page goes to the login form; a fragment too.
    for path in [
        "/admin/consumers/live",
        "/admin/events?aggregate=x",
        "/admin/replay",
    ] {
        let response = http
            .get(format!("{}{path}", app.console_url))
            .send()
            .await?;
        assert_eq!(response.status(), S::SEE_OTHER, "{path}");
    }
    // A bearer token is not a session: the console reads its own cookie only.
    let response = http
        .get(format!("{}/admin/consumers", app.console_url))
        .bearer_auth(&admin.token)
        .send()
        .await?;
    assert_eq!(response.status(), S::SEE_OTHER);
    // Log in as a browser would.
    let response = form(
        http.post(format!("{}/admin/login", app.console_url)),
        &[("email", &admin.email), ("password", &admin.password)],
    )
    .send()
    .await?;
    assert_eq!(response.status(), S::SEE_OTHER);
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap_or_default().to_owned();
    assert!(
        !session.contains("eyJ"),
        "the cookie holds a console session, not the API's token: {session}"
    );
    let live = |session: String| {
        let http = http.clone();
        let url = format!("{}/admin/consumers/live", app.console_url);
        async move {
            anyhow::Ok(
                http.get(url)
                    .header("cookie", session)
                    .send()
                    .await?
                    .status(),
            )
        }
    };
    assert_eq!(live(session.clone()).await?, S::OK);
    // A forged session is no session.
    assert_eq!(
        live(format!("newsroom_console={}", "0".repeat(64))).await?,
        S::SEE_OTHER
    );
    // Another site's form, with the session (a browser would not even send it): refused.
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let response = form(
            http.post(format!("{}/admin/replay", app.console_url))
                .header("cookie", &session)
                .header(name, value),
            &[("model", "news")],
        )
        .send()
        .await?;
        assert_eq!(response.status(), S::FORBIDDEN, "{name}: {value}");
    }
    // The session's own: a read model that does not exist is a clear refusal.
    let response = form(
        http.post(format!("{}/admin/replay", app.console_url))
            .header("cookie", &session),
        &[("model", "nothing")],
    )
    .send()
    .await?;
    assert_eq!(response.status(), S::BAD_REQUEST);
    // Not an id: said so, no search.
    let response = http
        .get(format!(
            "{}/admin/events?aggregate=%3Cscript%3E",
            app.console_url
        ))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(response.status(), S::OK);
    let page = response.text().await?;
    assert!(page.contains("An aggregate id is a UUID"), "{page}");
    assert!(
        page.contains("value=\"&#60;script&#62;\""),
        "what was asked is escaped"
    );
    // Wrong password: the login form again, 401.
    let response = form(
        http.post(format!("{}/admin/login", app.console_url)),
        &[("email", &admin.email), ("password", "not the password")],
    )
    .send()
    .await?;
    assert_eq!(response.status(), S::UNAUTHORIZED);
    // An editor's credentials open no session.
    let editor = app.editor().await?;
    let response = form(
        http.post(format!("{}/admin/login", app.console_url)),
        &[("email", &editor.email), ("password", &editor.password)],
    )
    .send()
    .await?;
    assert_eq!(response.status(), S::FORBIDDEN);
    assert!(response.headers().get("set-cookie").is_none());
    // Logging out ends the session on the server: the old cookie opens nothing.
    let response = http
        .post(format!("{}/admin/logout", app.console_url))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(response.status(), S::SEE_OTHER);
    assert_eq!(live(session.clone()).await?, S::SEE_OTHER);
    app.stop().await
}
