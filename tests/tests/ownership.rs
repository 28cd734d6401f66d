//! Two command processes (real OS processes of the `newsroom` binary) share the
//! partitions; one killed → the other takes over with correct versions (and the test
//! prints how long the takeover took); one frozen with SIGSTOP in the middle of a
//! transaction while it loses its partitions → once resumed it cannot append (the group
//! generation fences its transaction), and nothing acknowledged is lost or duplicated.
//! Also what a takeover stands on: partitions' ends read past a stale metadata cache.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use newsroom::Roles;
use newsroom_events::news::NewsEvent;
use newsroom_events::partition::partition_of;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use newsroom_tests::{ADMIN_PASSWORD, Cut, TestApp, new_user, token_subject};
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use uuid::Uuid;

/// A `newsroom command-api` child process.
struct Process {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Process {
    fn start(app: &TestApp, name: &str) -> anyhow::Result<Process> {
        Process::start_with(app, name, &[])
    }

    fn start_with(app: &TestApp, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log_path = std::env::temp_dir().join(format!("newsroom-{name}-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = app
            .newsroom(name)?
            .arg("command-api")
            .env("NEWSROOM_COMMAND_ADDR", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Process {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log_path,
        })
    }

    /// Each JSON line it logged so far.
    fn logged(&self) -> anyhow::Result<Vec<Value>> {
        Ok(std::fs::read_to_string(&self.log)?
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Partitions this process writes, from its metrics (None while it does not answer).
    async fn owned(&self, http: &reqwest::Client) -> Option<i64> {
        let text = http
            .get(format!("{}/metrics", self.url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("newsroom_command_partitions_owned "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
    if_match: Option<i64>,
) -> anyhow::Result<(S, Value)> {
    let request = http.request(method, url).timeout(Duration::from_secs(60));
    let response = newsroom_tests::command_parts(request, token, body.as_ref(), if_match)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Every user's event versions in the log, in log order.
async fn versions_in_log(app: &TestApp) -> anyhow::Result<HashMap<Uuid, Vec<i64>>> {
    let registry = Registry::connect(&app.settings.registry).await?;
    let mut versions: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for record in app.committed_records(Stream::Users)? {
        let decoded = codec::decode(&registry, &record.payload).await?;
        let event = UserEvent::from_avro(&decoded.name, decoded.value)?;
        let meta = event.metadata();
        versions
            .entry(meta.aggregate_id)
            .or_default()
            .push(meta.aggregate_version);
    }
    Ok(versions)
}

async fn login(
    http: &reqwest::Client,
    url: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let (status, body) = call(
        http,
        reqwest::Method::POST,
        format!("{url}/v1/auth/token"),
        None,
        Some(json!({"email": email, "password": password})),
        None,
    )
    .await?;
    anyhow::ensure!(status == S::OK, "login: {status} {body}");
    Ok(body["access_token"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn failed_logins_on_one_account_count_across_command_processes() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(Roles::NONE).await?;
    let http = newsroom_tests::client();
    let (a, b) = (Process::start(&app, "a")?, Process::start(&app, "b")?);
    split_between(&app, &http, &a, &b).await?;
    let user = new_user();
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        format!("{}/v1/users", a.url),
        None,
        Some(user.clone()),
        None,
    )
    .await?;
    assert_eq!(status, S::CREATED, "{body}");
    let guess = |url: &str| {
        let (http, url) = (http.clone(), format!("{url}/v1/auth/token"));
        let body = json!({"email": user["email"], "password": "not the password"});
        async move { anyhow::Ok(http.post(url).json(&body).send().await?) }
    };
    // The limit is 10 failures a minute per account: five on each process use it up.
    for url in [&a.url, &b.url] {
        for _ in 0..5 {
            assert_eq!(guess(url).await?.status(), S::UNAUTHORIZED);
        }
    }
    // Each process saw five (under the limit), but the account's count is shared.
    for url in [&a.url, &b.url] {
        let refused = guess(url).await?;
        assert_eq!(refused.status(), S::TOO_MANY_REQUESTS, "at {url}");
        assert!(refused.headers().contains_key("retry-after"));
    }
    Ok(())
}

#[tokio::test]
async fn two_processes_share_partitions_take_over_from_a_dead_one_and_fence_a_frozen_one()
-> anyhow::Result<()> {
    let app = TestApp::spawn_with(Roles {
        query_api: true,
        projector: true,
        ..Roles::NONE
    })
    .await?;
    let http = newsroom_tests::client();
    let a = Process::start(&app, "a")?;
    let b = Process::start(&app, "b")?;

    // The partitions are split between the two.
    split_between(&app, &http, &a, &b).await?;

    // Users created through A land in A's partitions; commands sent to B for them are
    // forwarded to A.
    let admin_email = app.settings.auth.admin_email.clone().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin_token = loop {
        if let Ok(token) = login(&http, &a.url, &admin_email, ADMIN_PASSWORD).await {
            break token;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bootstrap admin never appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let admin_id = token_subject(&admin_token)?;
    let mut users = Vec::new();
    for _ in 0..6 {
        let (status, body) = call(
            &http,
            reqwest::Method::POST,
            format!("{}/v1/users", a.url),
            None,
            Some(new_user()),
            None,
        )
        .await?;
        assert_eq!(status, S::CREATED, "{body}");
        users.push(Uuid::parse_str(body["id"].as_str().unwrap_or_default())?);
    }
    let mut version: HashMap<Uuid, i64> = users.iter().map(|u| (*u, 1)).collect();
    for user in &users {
        let (status, body) = call(
            &http,
            reqwest::Method::PATCH,
            format!("{}/v1/users/{user}", b.url),
            Some(&admin_token),
            Some(json!({"name": "Through B"})),
            Some(1),
        )
        .await?;
        assert_eq!(status, S::OK, "forwarded from B to A: {body}");
        assert_eq!(body["version"], 2);
        version.insert(*user, 2);
    }

    // Kill A: B takes every partition and serves A's users at their right versions. The
    // first of them is retried from the kill on, which measures the takeover.
    let mut a = a;
    a.child.kill()?;
    let killed = Instant::now();
    a.child.wait()?;
    let first = users[0];
    loop {
        let (status, body) = call(
            &http,
            reqwest::Method::PATCH,
            format!("{}/v1/users/{first}", b.url),
            Some(&admin_token),
            Some(json!({"name": "After takeover"})),
            Some(version[&first]),
        )
        .await?;
        if status == S::OK {
            assert_eq!(body["version"], json!(version[&first] + 1), "{body}");
            break;
        }
        assert_eq!(
            status,
            S::SERVICE_UNAVAILABLE,
            "while A's partitions move: {body}"
        );
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "B never served A's partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "takeover: kill -9 of the owner to the first 2xx on its partitions: {:.2} s",
        killed.elapsed().as_secs_f64()
    );
    *version.get_mut(&first).unwrap_or(&mut 0) += 1;
    until(
        "B writes every partition",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(i64::from(app.settings.kafka.partitions)) },
    )
    .await?;
    for user in &users[1..] {
        let v = version[user];
        let (status, body) = call(
            &http,
            reqwest::Method::PATCH,
            format!("{}/v1/users/{user}", b.url),
            Some(&admin_token),
            Some(json!({"name": "After takeover"})),
            Some(v),
        )
        .await?;
        assert_eq!(
            (status, body["version"].clone()),
            (S::OK, json!(v + 1)),
            "{body}"
        );
        version.insert(*user, v + 1);
    }

    // Start C, whose every transaction pauses for a while after it began (commands
    // decided, nothing produced yet). Once it writes some partitions, send it a command,
    // freeze it inside that transaction, and let the group give its partitions back to B.
    let c = Process::start_with(&app, "c", &[("NEWSROOM_TEST_HOLD_TRANSACTION_MS", "2500")])?;
    until(
        "C writes some partitions",
        Duration::from_secs(60),
        || async { matches!(c.owned(&http).await, Some(n) if n > 0) },
    )
    .await?;
    let c_user = loop {
        let (status, body) = call(
            &http,
            reqwest::Method::POST,
            format!("{}/v1/users", c.url),
            None,
            Some(new_user()),
            None,
        )
        .await?;
        if status == S::CREATED {
            break Uuid::parse_str(body["id"].as_str().unwrap_or_default())?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    version.insert(c_user, 1);
    let in_flight = {
        let (http, url, token) = (http.clone(), c.url.clone(), admin_token.clone());
        tokio::spawn(async move {
            call(
                &http,
                reqwest::Method::PATCH,
                format!("{url}/v1/users/{c_user}"),
                Some(&token),
                Some(json!({"name": "Decided by a zombie"})),
                Some(1),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.signal("-STOP")?;
    until(
        "B writes every partition again",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(i64::from(app.settings.kafka.partitions)) },
    )
    .await?;
    let (status, body) = call(
        &http,
        reqwest::Method::PATCH,
        format!("{}/v1/users/{c_user}", b.url),
        Some(&admin_token),
        Some(json!({"name": "Through B"})),
        Some(1),
    )
    .await?;
    assert_eq!(
        (status, body["version"].clone()),
        (S::OK, json!(2)),
        "B serves C's user: {body}"
    );
    version.insert(c_user, 2);
    // Resumed, C finishes the transaction it was frozen in: it produces the version 2 it
    // decided on its old state, but the group coordinator refuses the commit of a member
    // of an old generation, so it aborts and answers 503.
    c.signal("-CONT")?;
    let (status, body) = in_flight.await??;
    assert_ne!(
        status,
        S::OK,
        "the frozen transaction must not commit: {body}"
    );
    // A command reaching C now must not append either: it is fenced (or it forwards).
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let (status, body) = call(
        &fresh,
        reqwest::Method::PATCH,
        format!("{}/v1/users/{c_user}", c.url),
        Some(&admin_token),
        Some(json!({"name": "From a zombie"})),
        Some(1),
    )
    .await?;
    assert_ne!(status, S::OK, "the resumed process must not append: {body}");

    // Nothing acknowledged is lost, nothing is duplicated: per user, versions 1..=n once each.
    let log = versions_in_log(&app).await?;
    for (user, expected) in &version {
        let found = log.get(user).cloned().unwrap_or_default();
        assert_eq!(
            found,
            (1..=*expected).collect::<Vec<_>>(),
            "events of {user}"
        );
    }
    assert!(log.contains_key(&admin_id));
    drop(c);
    drop(b);
    app.stop().await
}

/// A command with an `Idempotency-Key`.
#[derive(Clone)]
struct Keyed {
    method: reqwest::Method,
    path: String,
    token: Option<String>,
    key: &'static str,
    body: Value,
    if_match: Option<i64>,
}

impl Keyed {
    fn new(method: reqwest::Method, path: impl Into<String>, key: &'static str) -> Self {
        Keyed {
            method,
            path: path.into(),
            token: None,
            key,
            body: json!({}),
            if_match: None,
        }
    }

    fn by(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    fn body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }

    fn if_match(mut self, version: i64) -> Self {
        self.if_match = Some(version);
        self
    }

    /// Sends it once: the status, headers and body (`None` when no answer came).
    async fn send(
        &self,
        http: &reqwest::Client,
        url: &str,
    ) -> Option<(S, reqwest::header::HeaderMap, String)> {
        let mut request = http
            .request(self.method.clone(), format!("{url}{}", self.path))
            .timeout(Duration::from_secs(30))
            .header("idempotency-key", self.key)
            .json(&self.body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(v) = self.if_match {
            request = request.header("if-match", format!("\"{v}\""));
        }
        let response = request.send().await.ok()?;
        let (status, headers) = (response.status(), response.headers().clone());
        Some((status, headers, response.text().await.ok()?))
    }

    /// Sent in the background (its answer, if one ever comes).
    fn in_flight(&self, http: &reqwest::Client, url: &str) -> tokio::task::JoinHandle<Option<S>> {
        let (command, http, url) = (self.clone(), http.clone(), url.to_owned());
        tokio::spawn(async move { command.send(&http, &url).await.map(|(s, ..)| s) })
    }

    /// Sent until it gets an answer other than 503 (an answer that never came counts as a
    /// 503: the client cannot tell): the status, the consistency token and the body.
    async fn retried(
        &self,
        http: &reqwest::Client,
        url: &str,
    ) -> anyhow::Result<(S, Option<String>, Value)> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((status, headers, text)) = self.send(http, url).await
                && status != S::SERVICE_UNAVAILABLE
            {
                let token = headers
                    .get("x-consistency-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                return Ok((
                    status,
                    token,
                    serde_json::from_str(&text).unwrap_or(Value::Null),
                ));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} never answered but 503",
                self.path
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every news event in the log: (aggregate, version, event type, actor).
async fn news_in_log(app: &TestApp) -> anyhow::Result<Vec<(Uuid, i64, String, Option<Uuid>)>> {
    let registry = Registry::connect(&app.settings.registry).await?;
    let mut events = Vec::new();
    for record in app.committed_records(Stream::News)? {
        let decoded = codec::decode(&registry, &record.payload).await?;
        let name = decoded
            .name
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let event = NewsEvent::from_avro(&decoded.name, decoded.value)?;
        let meta = event.metadata();
        events.push((
            meta.aggregate_id,
            meta.aggregate_version,
            name,
            meta.actor_id,
        ));
    }
    Ok(events)
}

/// Registers a new user through the command process at `url` and logs them in: their id
/// and token.
async fn registered(http: &reqwest::Client, url: &str) -> anyhow::Result<(Uuid, String)> {
    let body = new_user();
    let (status, created) = call(
        http,
        reqwest::Method::POST,
        format!("{url}/v1/users"),
        None,
        Some(body.clone()),
        None,
    )
    .await?;
    anyhow::ensure!(status == S::CREATED, "registration: {status} {created}");
    let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
    let email = body["email"].as_str().unwrap_or_default();
    let password = body["password"].as_str().unwrap_or_default();
    Ok((id, login(http, url, email, password).await?))
}

/// Waits until `a` and `b` each write some partitions and together all of them.
async fn split_between(
    app: &TestApp,
    http: &reqwest::Client,
    a: &Process,
    b: &Process,
) -> anyhow::Result<()> {
    until(
        "both processes write partitions that add up to all of them",
        Duration::from_secs(60),
        || async {
            match (a.owned(http).await, b.owned(http).await) {
                (Some(x), Some(y)) => {
                    x > 0 && y > 0 && x + y == i64::from(app.settings.kafka.partitions)
                }
                _ => false,
            }
        },
    )
    .await
}

/// Starts a command process that writes every partition, and points `app` at it.
async fn only(
    app: &mut TestApp,
    http: &reqwest::Client,
    name: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let process = Process::start_with(app, name, env)?;
    let all = i64::from(app.settings.kafka.partitions);
    until(
        &format!("{name} writes every partition"),
        Duration::from_secs(60),
        || async { process.owned(http).await == Some(all) },
    )
    .await?;
    app.command_url = process.url.clone();
    Ok(process)
}

#[tokio::test]
async fn a_retry_after_a_crash_or_an_unknown_outcome_gets_the_first_answer_and_writes_nothing()
-> anyhow::Result<()> {
    use reqwest::Method as M;
    let mut app = TestApp::spawn_with(Roles {
        query_api: true,
        projector: true,
        ..Roles::NONE
    })
    .await?;
    let http = newsroom_tests::client();

    // A answers a keyed command that committed only after 60 s: it is killed before, with
    // the commands in the log and the clients without their answers.
    let mut a = only(
        &mut app,
        &http,
        "a",
        &[("NEWSROOM_TEST_HOLD_ANSWER_MS", "60000")],
    )
    .await?;
    let editor = app.editor().await?;
    let reader = app.reader().await?;
    let draft = |title: &str| json!({"category": "sports", "title": title, "content": "body"});
    let (status, article) = call(
        &http,
        M::POST,
        format!("{}/v1/news", a.url),
        Some(&editor.token),
        Some(draft("to publish")),
        None,
    )
    .await?;
    assert_eq!(status, S::CREATED, "{article}");
    let article = article["id"].as_str().unwrap_or_default().to_owned();
    let users_before = versions_in_log(&app).await?.len();
    let newcomer = new_user();
    let publish = Keyed::new(M::POST, format!("/v1/news/{article}/publish"), "publish-1")
        .by(&editor.token)
        .if_match(1);
    let create = Keyed::new(M::POST, "/v1/news", "draft-1")
        .by(&editor.token)
        .body(draft("drafted once"));
    let register = Keyed::new(M::POST, "/v1/users", "register-1").body(newcomer.clone());
    let password = Keyed::new(M::PUT, format!("/v1/users/{}/password", reader.id), "pw-1")
        .by(&reader.token)
        .body(json!({"current_password": reader.password, "new_password": "a new password 1"}));
    let first = [&publish, &create, &register, &password].map(|c| c.in_flight(&http, &a.url));
    until(
        "every keyed command is in the log",
        Duration::from_secs(30),
        || async {
            let news = news_in_log(&app).await.unwrap_or_default();
            let published = news
                .iter()
                .any(|e| e.0.to_string() == article && e.2 == "NewsPublished");
            let drafts = news.iter().filter(|e| e.2 == "NewsDrafted").count();
            let users = versions_in_log(&app).await.unwrap_or_default();
            let changed = users.get(&reader.id).is_some_and(|v| v.len() == 2);
            published && drafts == 2 && users.len() == users_before + 1 && changed
        },
    )
    .await?;
    a.child.kill()?;
    a.child.wait()?;
    for answer in first {
        assert_eq!(
            answer.await?,
            None,
            "a first request was answered before the kill"
        );
    }

    // B takes over: each retry gets the answer the first request would have had.
    let b = only(&mut app, &http, "b", &[]).await?;
    let (status, token, published) = publish.retried(&http, &b.url).await?;
    assert_eq!(status, S::OK, "{published}");
    assert_eq!(
        (
            published["id"].as_str(),
            published["status"].as_str(),
            published["version"].as_i64()
        ),
        (Some(article.as_str()), Some("published"), Some(2)),
        "{published}"
    );
    // Its consistency token names the first write: the query API answers with it.
    let seen = http
        .get(format!("{}/v1/news/{article}", app.query_url))
        .header("x-consistency-token", token.unwrap_or_default())
        .send()
        .await?;
    assert_eq!(seen.status(), S::OK);
    assert_eq!(seen.json::<Value>().await?["status"], "published");
    let (status, _, drafted) = create.retried(&http, &b.url).await?;
    assert_eq!(status, S::CREATED, "{drafted}");
    assert_eq!(drafted["title"], "drafted once", "{drafted}");
    let drafted_id = drafted["id"].as_str().unwrap_or_default().to_owned();
    let (status, _, registered) = register.retried(&http, &b.url).await?;
    assert_eq!(status, S::CREATED, "{registered}");
    assert_eq!(registered["email"], newcomer["email"], "{registered}");
    let (status, _, _) = password.retried(&http, &b.url).await?;
    // The change revoked the token that made it (ADR 18), so its retry is not even
    // authenticated: 401, not a second change and not 422 for the old password; the new
    // password logs in (below), and the log holds the one change.
    assert_eq!(
        status,
        S::UNAUTHORIZED,
        "the token the password change revoked"
    );

    let events = news_in_log(&app).await?;
    let of = |id: &str, kind: &str| {
        events
            .iter()
            .filter(|e| e.0.to_string() == id && e.2 == kind)
            .count()
    };
    assert_eq!(of(&article, "NewsPublished"), 1, "published once");
    assert_eq!(
        of(&drafted_id, "NewsDrafted"),
        1,
        "the retried draft is the first one"
    );
    let drafts_by_editor = events
        .iter()
        .filter(|e| e.2 == "NewsDrafted" && e.3 == Some(editor.id))
        .count();
    assert_eq!(drafts_by_editor, 2, "no second article");
    let users = versions_in_log(&app).await?;
    assert_eq!(users.len(), users_before + 1, "registered once");
    assert_eq!(
        users.get(&reader.id).map(Vec::len),
        Some(2),
        "password changed once"
    );
    // The registered user's key and e-mail claim are intact: they log in, and the address
    // is still taken.
    let email = newcomer["email"].as_str().unwrap_or_default();
    let password_of = newcomer["password"].as_str().unwrap_or_default();
    login(&http, &b.url, email, password_of).await?;
    login(&http, &b.url, &reader.email, "a new password 1").await?;
    let (status, _) = call(
        &http,
        M::POST,
        format!("{}/v1/users", b.url),
        None,
        Some(newcomer.clone()),
        None,
    )
    .await?;
    assert_eq!(status, S::CONFLICT, "the e-mail stays claimed");
    // The same key with another request is refused.
    let (status, _, reused) = Keyed::new(M::POST, "/v1/news", "draft-1")
        .by(&editor.token)
        .body(draft("another"))
        .retried(&http, &b.url)
        .await?;
    assert_eq!(
        (status, reused["code"].as_str()),
        (S::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")),
        "{reused}"
    );
    drop(b);

    // C reports every transaction that recorded a keyed outcome as one whose commit Kafka
    // did not confirm: 503, outcome unknown; it rebuilds the partition from the log, and
    // the retry finds the outcome there.
    let c = only(
        &mut app,
        &http,
        "c",
        &[("NEWSROOM_TEST_UNCERTAIN_KEYED", "1")],
    )
    .await?;
    let create = Keyed::new(M::POST, "/v1/news", "draft-2")
        .by(&editor.token)
        .body(draft("unknown outcome"));
    let (status, _, text) = create.send(&http, &c.url).await.unwrap_or_default();
    assert_eq!(status, S::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("unknown"), "{text}");
    let (status, _, drafted) = create.retried(&http, &c.url).await?;
    assert_eq!(status, S::CREATED, "{drafted}");
    let second = drafted["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(drafted["version"], 1, "{drafted}");

    // A keyed refusal is recorded too: If-Match 2 on the draft at version 1 is refused
    // (412); once an edit made it version 2, the retry still gets that 412.
    let publish = Keyed::new(M::POST, format!("/v1/news/{second}/publish"), "publish-2")
        .by(&editor.token)
        .if_match(2);
    let (status, _, text) = publish.send(&http, &c.url).await.unwrap_or_default();
    assert_eq!(status, S::SERVICE_UNAVAILABLE, "{text}");
    let edit = Keyed::new(M::PATCH, format!("/v1/news/{second}"), "edit-2")
        .by(&editor.token)
        .body(json!({"title": "edited"}))
        .if_match(1);
    // Unkeyed in effect: its outcome is reported unknown, and its retry finds it.
    let (status, _, edited) = edit.retried(&http, &c.url).await?;
    assert_eq!(
        (status, edited["version"].as_i64()),
        (S::OK, Some(2)),
        "{edited}"
    );
    let (status, _, refused) = publish.retried(&http, &c.url).await?;
    assert_eq!(
        (status, refused["code"].as_str()),
        (S::PRECONDITION_FAILED, Some("version_mismatch")),
        "the first answer, not a new decision: {refused}"
    );
    let events = news_in_log(&app).await?;
    let second_events = events.iter().filter(|e| e.0.to_string() == second).count();
    assert_eq!(
        second_events, 2,
        "drafted once, edited once, never published"
    );
    Ok(())
}

#[tokio::test]
async fn a_partition_with_an_event_that_cannot_be_decoded_is_not_served_from_a_partial_state()
-> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut app = TestApp::spawn_with(Roles {
        query_api: true,
        ..Roles::NONE
    })
    .await?;
    let http = newsroom_tests::client();
    let partitions = app.settings.kafka.partitions;
    let mut a = only(&mut app, &http, "a", &[]).await?;
    // Two users of different partitions, logged in.
    let mut users: Vec<(Uuid, String)> = Vec::new();
    while users.len() < 2 {
        let (id, token) = registered(&http, &a.url).await?;
        let partition_of = |id: &Uuid| partition_of(id.as_bytes(), partitions);
        if users
            .iter()
            .all(|(u, _)| partition_of(u) != partition_of(&id))
        {
            users.push((id, token));
        }
    }
    a.child.kill()?;
    a.child.wait()?;

    // Bytes that are no event, in the first user's partition of the users topic.
    let poisoned = partition_of(users[0].0.as_bytes(), partitions);
    let producer: FutureProducer =
        newsroom_infra::kafka::best_effort_producer(&app.settings.kafka).create()?;
    producer
        .send(
            FutureRecord::to(&Stream::Users.topic(&app.settings.kafka))
                .partition(poisoned)
                .key(users[0].0.as_bytes().as_slice())
                .payload(&b"\x00\x00\x0f\x42\x40not an event"[..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    // B serves every other partition, never that one: it does not rebuild past the event.
    let b = Process::start(&app, "b")?;
    let others = i64::from(partitions - 1);
    until(
        "B serves the other partitions",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(others) },
    )
    .await?;
    let rename = |user: Uuid, token: &str| {
        let (http, url, token) = (http.clone(), b.url.clone(), token.to_owned());
        async move {
            call(
                &http,
                reqwest::Method::PATCH,
                format!("{url}/v1/users/{user}"),
                Some(&token),
                Some(json!({"name": "Renamed"})),
                None,
            )
            .await
        }
    };
    let (status, body) = rename(users[1].0, &users[1].1).await?;
    assert_eq!(status, S::OK, "another partition is served: {body}");
    for _ in 0..5 {
        let (status, body) = rename(users[0].0, &users[0].1).await?;
        assert_eq!(
            status,
            S::SERVICE_UNAVAILABLE,
            "a partition rebuilt without one of its events must not be served: {body}"
        );
        assert_eq!(b.owned(&http).await, Some(others));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// A regression test of the chaos run (ADR 22): a writer's rebuild read its partition to
/// the last stable offset, which stops before an open transaction. A transaction whose
/// commit was still under way (the writer's own after its commit timed out, or a dead
/// owner's) committed after the rebuild, and retried commands were decided again against
/// a state without it: two events at one version.
#[tokio::test]
async fn a_takeover_waits_for_a_transaction_left_open_on_its_partition() -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let mut app = TestApp::spawn_with(Roles::NONE).await?;
    let http = newsroom_tests::client();
    let partitions = app.settings.kafka.partitions;
    let a = only(&mut app, &http, "a", &[]).await?;
    let (id, token) = registered(&http, &a.url).await?;
    drop(a);

    // A transaction of another writer, open on the user's partition with a copy of the
    // registration in it, as a writer killed or cut off between its records and its
    // commit leaves it.
    let registered = app
        .committed_records(Stream::Users)?
        .into_iter()
        .find(|r| r.key == id.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("the registration is not in the log"))?;
    let partition = partition_of(id.as_bytes(), partitions);
    let kafka = app.settings.kafka.clone();
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<BaseProducer> {
        let producer: BaseProducer = newsroom_infra::kafka::transactional_producer(
            &kafka,
            &format!("{}.test-open", kafka.topic_prefix),
        )
        // Open for longer than the test takes (a dead writer's is aborted after 6 s).
        .set("transaction.timeout.ms", "120000")
        .create()?;
        newsroom_infra::kafka::init_transactions(Duration::from_secs(30), |t| {
            producer.init_transactions(t)
        })?;
        producer.begin_transaction()?;
        producer
            .send(
                BaseRecord::to(&Stream::Users.topic(&kafka))
                    .partition(partition)
                    .key(registered.key.as_slice())
                    .payload(registered.payload.as_slice()),
            )
            .map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(30))?;
        Ok(producer)
    })
    .await??;

    // B serves every other partition, and that one only once the transaction is settled.
    let b = Process::start(&app, "b")?;
    let others = i64::from(partitions - 1);
    until(
        "B serves the other partitions",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(others) },
    )
    .await?;
    let follow = || {
        call(
            &http,
            reqwest::Method::PATCH,
            format!("{}/v1/users/{id}", b.url),
            Some(&token),
            Some(json!({"followed_categories": ["sports"]})),
            None,
        )
    };
    for _ in 0..4 {
        let (status, body) = follow().await?;
        assert_eq!(
            status,
            S::SERVICE_UNAVAILABLE,
            "a partition with a transaction open is not served before it is settled: {body}"
        );
        assert_eq!(b.owned(&http).await, Some(others));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(30)))
        .await??;
    let all = i64::from(partitions);
    until(
        "B serves every partition once the transaction is aborted",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(all) },
    )
    .await?;
    let (status, body) = follow().await?;
    assert_eq!(status, S::OK, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(versions_in_log(&app).await?.get(&id), Some(&vec![1, 2]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_while_the_registry_is_unreachable_fails_and_is_retried_until_it_serves_the_whole_state()
-> anyhow::Result<()> {
    let app = TestApp::spawn_with(Roles {
        query_api: true,
        ..Roles::NONE
    })
    .await?;
    let http = newsroom_tests::client();
    let partitions = app.settings.kafka.partitions;
    let a = Process::start(&app, "a")?;
    // B reaches the registry through a proxy the test cuts.
    let registry = reqwest::Url::parse(&app.settings.registry.url)?;
    let cut = Cut::to(format!(
        "{}:{}",
        registry.host_str().unwrap_or("127.0.0.1"),
        registry.port_or_known_default().unwrap_or(80)
    ))
    .await?;
    let mut through_cut = registry.clone();
    through_cut
        .set_port(Some(cut.port))
        .map_err(|()| anyhow::anyhow!("no port"))?;
    let b = Process::start_with(
        &app,
        "b",
        &[("NEWSROOM_REGISTRY_URL", through_cut.as_str())],
    )?;
    until(
        "A and B share the partitions",
        Duration::from_secs(90),
        || async {
            let (x, y) = (a.owned(&http).await, b.owned(&http).await);
            matches!((x, y), (Some(x), Some(y)) if x > 0 && y > 0 && x + y == i64::from(partitions))
        },
    )
    .await?;
    let pool = app.pool().await?;
    let a_address = a.url.trim_start_matches("http://").to_owned();
    let of_a: Vec<i32> =
        sqlx::query_scalar("SELECT partition FROM cmd_partition_owners WHERE address = $1")
            .bind(&a_address)
            .fetch_all(&pool)
            .await?;
    anyhow::ensure!(!of_a.is_empty(), "the directory names no partition of A");

    // A user of one of A's partitions, renamed: B never decoded such an event, so it has
    // to ask the registry for its schema when it takes the partition over.
    let (user, email, password, token) = loop {
        let body = new_user();
        let (status, created) = call(
            &http,
            reqwest::Method::POST,
            format!("{}/v1/users", a.url),
            None,
            Some(body.clone()),
            None,
        )
        .await?;
        assert_eq!(status, S::CREATED, "{created}");
        let id = Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
        if of_a.contains(&partition_of(id.as_bytes(), partitions)) {
            let email = body["email"].as_str().unwrap_or_default().to_owned();
            let password = body["password"].as_str().unwrap_or_default().to_owned();
            let token = login(&http, &a.url, &email, &password).await?;
            break (id, email, password, token);
        }
    };
    let partition = partition_of(user.as_bytes(), partitions);
    let rename = |url: &str, name: &str| {
        call(
            &http,
            reqwest::Method::PATCH,
            format!("{url}/v1/users/{user}"),
            Some(&token),
            Some(json!({"name": name})),
            None,
        )
    };
    let (status, body) = rename(&a.url, "Renamed once").await?;
    assert_eq!(status, S::OK, "{body}");

    // The registry goes away for B, and A dies: B is given A's partitions.
    cut.set_open(false);
    let mut a = a;
    a.child.kill()?;
    a.child.wait()?;
    let failed = |b: &Process| -> anyhow::Result<bool> {
        Ok(b.logged()?.iter().any(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("takeover failed"))
                && line["partition"] == partition
        }))
    };
    until(
        "B's takeover of the user's partition fails",
        Duration::from_secs(90),
        || async { failed(&b).unwrap_or(false) },
    )
    .await?;
    // Not served from a partial state: every command on it is refused, nothing written.
    for _ in 0..3 {
        let (status, body) = rename(&b.url, "Renamed from a partial state").await?;
        assert_eq!(status, S::SERVICE_UNAVAILABLE, "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let owned = b.owned(&http).await;
    assert!(
        owned.is_some_and(|n| n < i64::from(partitions)),
        "B answers and does not serve the user's partition: {owned:?}"
    );

    // The registry is back: a retry takes the partition over with its whole state.
    cut.set_open(true);
    until(
        "B serves every partition",
        Duration::from_secs(90),
        || async { b.owned(&http).await == Some(i64::from(partitions)) },
    )
    .await?;
    let (status, body) = rename(&b.url, "Renamed twice").await?;
    assert_eq!(status, S::OK, "{body}");
    assert_eq!(body["version"], 3, "registered, renamed, renamed: {body}");
    // The e-mail claim was reconciled from the whole state: the user still logs in, and
    // nobody else can take the address.
    login(&http, &b.url, &email, &password).await?;
    let mut taker = new_user();
    taker["email"] = json!(email);
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        format!("{}/v1/users", b.url),
        None,
        Some(taker),
        None,
    )
    .await?;
    assert_eq!(status, S::CONFLICT, "{body}");
    Ok(())
}

mod writers {
    //! The writer driven directly, against the real Kafka and PostgreSQL, with consumers of
    //! the ownership group made here.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use newsroom::Roles;
    use newsroom_command::aggregate::NewsAggregate;
    use newsroom_command::domain::Actor;
    use newsroom_command::domain::news::{News, NewsCommand};
    use newsroom_command::owner::writer::{Group, Writer, group_metadata_of};
    use newsroom_command::owner::{CommandError, Committed, Request, RequestMeta, Shared};
    use newsroom_command::{claims::Claims, forward::Directory, keys::Keys};
    use newsroom_events::Category;
    use newsroom_events::partition::partition_of;
    use newsroom_events::users::Role;
    use newsroom_infra::codec;
    use newsroom_infra::kafka::Stream;
    use newsroom_infra::registry::Registry;
    use newsroom_tests::TestApp;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use sqlx::PgPool;
    use tokio::sync::oneshot;
    use uuid::Uuid;

    /// Topics and a database, the shared parts of writers, and one article id in `partition`.
    struct Fixture {
        app: TestApp,
        shared: Arc<Shared>,
        pool: PgPool,
        id: Uuid,
        editor: Actor,
        partition: i32,
    }

    /// A member of the ownership group, polled in the background.
    struct Member {
        consumer: Arc<StreamConsumer>,
        _poller: tokio::task::JoinHandle<()>,
    }

    impl Member {
        /// The live group metadata, as a command process uses it.
        fn group(&self) -> Group {
            let group = Group::default();
            group.set(group_metadata_of(self.consumer.clone()));
            group
        }

        /// The group metadata of this moment, kept as it is from now on.
        fn frozen_group(&self) -> anyhow::Result<Group> {
            let metadata = Arc::new(
                self.consumer
                    .group_metadata()
                    .ok_or_else(|| anyhow::anyhow!("no group metadata"))?,
            );
            let group = Group::default();
            group.set(Arc::new(move || Some(metadata.clone())));
            Ok(group)
        }

        /// Leaves the group (still polled, so that the leave completes).
        fn leave(&self) {
            self.consumer.unsubscribe();
        }
    }

    impl Fixture {
        async fn new(partition: i32, snapshot_every: u64) -> anyhow::Result<Fixture> {
            let roles = Roles {
                query_api: true,
                ..Roles::NONE
            };
            let app = TestApp::spawn_with(roles).await?;
            let pool = newsroom_infra::db::connect(&app.settings.postgres).await?;
            let mut kafka = app.settings.kafka.clone();
            kafka.snapshot_every = snapshot_every;
            let shared = Arc::new(Shared {
                ends: Arc::new(newsroom_infra::kafka::PartitionEnds::new(&kafka)?),
                kafka,
                registry: Registry::connect(&app.settings.registry).await?,
                keys: Keys::new(pool.clone()),
                claims: Claims::new(&app.settings.auth, pool.clone())?,
                directory: Directory::new(
                    pool.clone(),
                    "test".into(),
                    "127.0.0.1:1".into(),
                    Duration::from_secs(2),
                    b"test forwarding key".to_vec(),
                )?,
                partitions: app.settings.kafka.partitions,
                pool: pool.clone(),
                kafka_up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            });
            let id = loop {
                let id = Uuid::now_v7();
                if partition_of(id.as_bytes(), app.settings.kafka.partitions) == partition {
                    break id;
                }
            };
            let editor = Actor {
                id: Uuid::now_v7(),
                role: Role::Editor,
            };
            Ok(Fixture {
                app,
                shared,
                pool,
                id,
                editor,
                partition,
            })
        }

        /// Joins the ownership group and waits until the group settled with this member in it.
        async fn member(&self) -> anyhow::Result<Member> {
            let kafka = &self.shared.kafka;
            let consumer: StreamConsumer = newsroom_infra::kafka::read_committed_consumer(
                kafka,
                &format!("{}.command", kafka.topic_prefix),
            )
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()?;
            consumer.subscribe(&[&newsroom_infra::kafka::ownership_topic(kafka)])?;
            let consumer = Arc::new(consumer);
            let task = {
                let consumer = consumer.clone();
                tokio::spawn(async move {
                    loop {
                        let _ = consumer.recv().await;
                    }
                })
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while newsroom_infra::kafka::group_membership(consumer.client()).is_none()
                || consumer.assignment()?.count() == 0
            {
                anyhow::ensure!(Instant::now() < deadline, "never joined the group");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Member {
                consumer,
                _poller: task,
            })
        }

        async fn writer(&self, name: &str, group: Group) -> anyhow::Result<Writer> {
            Writer::start(self.shared.clone(), name, group).await
        }

        /// Has `writer` serve the fixture's partition; the states it starts from.
        async fn take(&self, writer: &Writer) -> anyhow::Result<()> {
            let taken = writer.take(self.partition, Arc::new(|| true)).await?;
            anyhow::ensure!(taken.is_some(), "not installed");
            Ok(())
        }

        async fn send(
            &self,
            writer: &Writer,
            command: NewsCommand,
        ) -> anyhow::Result<Result<Committed<News>, CommandError>> {
            let (reply, answer) = oneshot::channel();
            let meta = RequestMeta::new("writer-test".into(), Some(self.editor.id));
            let request = Request::<NewsAggregate>::Command {
                id: self.id,
                command,
                meta,
                reply,
            };
            writer
                .send(self.partition, request)
                .map_err(|_| anyhow::anyhow!("writer gone"))?;
            Ok(answer.await?)
        }

        async fn read(&self, writer: &Writer) -> anyhow::Result<Option<News>> {
            let (reply, answer) = oneshot::channel();
            writer
                .send(
                    self.partition,
                    Request::<NewsAggregate>::Read { id: self.id, reply },
                )
                .map_err(|_| anyhow::anyhow!("writer gone"))?;
            Ok(answer.await?)
        }

        fn draft(&self, title: &str) -> NewsCommand {
            NewsCommand::Draft {
                actor: self.editor,
                category: Category::Sports,
                title: title.into(),
                content: "c".into(),
                tags: vec![],
            }
        }

        fn publish(&self, expected_version: i64) -> NewsCommand {
            NewsCommand::Publish {
                actor: self.editor,
                expected_version: Some(expected_version),
                at: chrono::Utc::now(),
            }
        }

        /// The versions of the article's events in the log, in order.
        async fn versions_in_log(&self) -> anyhow::Result<Vec<i64>> {
            let registry = Registry::connect(&self.app.settings.registry).await?;
            let mut versions = Vec::new();
            for record in self.app.committed_records(Stream::News)? {
                let decoded = codec::decode(&registry, &record.payload).await?;
                let event =
                    newsroom_events::news::NewsEvent::from_avro(&decoded.name, decoded.value)?;
                if event.metadata().aggregate_id == self.id {
                    versions.push(event.metadata().aggregate_version);
                }
            }
            Ok(versions)
        }
    }

    fn version<E>(outcome: Result<Committed<News>, E>) -> Option<i64> {
        outcome.map(|c| c.state.version).ok()
    }

    fn reason<T: std::fmt::Debug>(outcome: &Result<T, CommandError>) -> String {
        match outcome {
            Err(CommandError::Unavailable {
                reason,
                definitive: true,
            }) => reason.clone(),
            other => format!("not a definitive refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_writer_of_an_old_group_generation_cannot_append() -> anyhow::Result<()> {
        let f = Fixture::new(0, 10_000).await?;
        // The first owner's member, and a writer that keeps that member's metadata as a
        // process frozen since then would.
        let first = f.member().await?;
        let old = f.writer("old", first.frozen_group()?).await?;
        f.take(&old).await?;
        assert_eq!(
            version(f.send(&old, f.draft("t")).await?),
            Some(1),
            "the first owner writes"
        );

        // A second member joins while the first stays: the generation moves on, and the
        // coordinator refuses the old generation even from a member it still has.
        let second = f.member().await?;
        let stale = f.send(&old, f.publish(1)).await?;
        assert!(
            reason(&stale).contains("generation"),
            "the old generation cannot commit: {stale:?}"
        );

        // The first member leaves: it is unknown now.
        first.leave();
        let new = f.writer("new", second.group()).await?;
        f.take(&new).await?;
        let zombie = f.send(&old, f.publish(1)).await?;
        assert!(
            reason(&zombie).contains("member"),
            "a member that left cannot commit: {zombie:?}"
        );
        let current = f.send(&new, f.publish(1)).await?;
        assert_eq!(
            version(current),
            Some(2),
            "the new owner rebuilt the draft and publishes it"
        );
        assert_eq!(
            f.versions_in_log().await?,
            vec![1, 2],
            "one draft, one publication, nothing from the old generation"
        );

        // A writer whose member left (librdkafka resets the membership, which the
        // coordinator would accept) refuses to commit at all.
        second.leave();
        let deadline = Instant::now() + Duration::from_secs(10);
        while newsroom_infra::kafka::group_membership(second.consumer.client()).is_some() {
            anyhow::ensure!(Instant::now() < deadline, "the second member never left");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let orphan = f
            .send(
                &new,
                NewsCommand::Unpublish {
                    actor: f.editor,
                    expected_version: Some(2),
                },
            )
            .await?;
        assert!(
            reason(&orphan).contains("has not joined the ownership group"),
            "a writer outside the group cannot append: {orphan:?}"
        );
        assert_eq!(f.versions_in_log().await?, vec![1, 2]);
        assert_eq!(f.read(&new).await?.map(|n| n.version), Some(2));
        old.stop();
        new.stop();
        f.app.stop().await
    }

    #[tokio::test]
    async fn a_new_writer_starts_from_the_latest_snapshot_and_reads_only_the_rest()
    -> anyhow::Result<()> {
        let f = Fixture::new(1, 2).await?;
        let member = f.member().await?;
        let first = f.writer("first", member.group()).await?;
        f.take(&first).await?;
        assert_eq!(version(f.send(&first, f.draft("Original")).await?), Some(1));
        assert_eq!(version(f.send(&first, f.publish(1)).await?), Some(2));

        // The snapshot (taken after 2 events, off the command path) appears.
        let deadline = Instant::now() + Duration::from_secs(10);
        let next_offset = loop {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT next_offset FROM cmd_snapshots WHERE stream = 'news' AND partition = 1",
            )
            .fetch_optional(&f.pool)
            .await?;
            if let Some((next,)) = row {
                break next;
            }
            anyhow::ensure!(Instant::now() < deadline, "no snapshot was taken");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            next_offset >= 2,
            "the snapshot covers both events: {next_offset}"
        );
        // Mark the snapshot, so that a state that came from it can be told from one read
        // from the log: a writer that used it shows the marked title.
        sqlx::query(
            "UPDATE cmd_snapshots SET state = convert_to(replace(convert_from(state, 'UTF8'), 'Original', \
             'From the snapshot'), 'UTF8') WHERE stream = 'news' AND partition = 1",
        )
        .execute(&f.pool)
        .await?;

        first.stop();
        let second = f.writer("second", member.group()).await?;
        f.take(&second).await?;
        let state = f
            .read(&second)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the article is missing"))?;
        assert_eq!(
            (state.title.as_str(), state.version),
            ("From the snapshot", 2),
            "state comes from the snapshot"
        );
        let unpublished = f
            .send(
                &second,
                NewsCommand::Unpublish {
                    actor: f.editor,
                    expected_version: Some(2),
                },
            )
            .await?;
        assert_eq!(
            version(unpublished),
            Some(3),
            "and the writer goes on from it"
        );
        second.stop();
        member.leave();
        f.app.stop().await
    }
}

/// The chaos run's stall after a broker kill (ADR 22): a takeover read a partition's end
/// from the client's metadata cache, which said "unknown partition" until its periodic
/// refresh. Here the cache goes stale the way a cluster can leave it: the topic gains
/// partitions after the client cached it. The end of a new partition is read at once
/// (before the fix, not for `topic.metadata.refresh.interval.ms`).
#[tokio::test]
async fn the_end_of_a_partition_missing_from_the_clients_metadata_cache_is_read_at_once()
-> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let app = TestApp::spawn_with(Roles::NONE).await?;
    let kafka = &app.settings.kafka;
    let topic = format!("{}.ends-regression", kafka.topic_prefix);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = admin
        .create_topics(
            [&NewTopic::new(
                &topic,
                1,
                TopicReplication::Fixed(kafka.replication),
            )],
            &options,
        )
        .await?;
    anyhow::ensure!(created.iter().all(Result::is_ok), "creating: {created:?}");
    let ends = newsroom_infra::kafka::PartitionEnds::new(kafka)?;
    let timeout = Duration::from_secs(5);
    // The client caches the topic with one partition.
    until("the new topic answers", Duration::from_secs(30), || async {
        ends.end(&topic, 0, timeout).is_ok()
    })
    .await?;
    let grown = admin
        .create_partitions([&NewPartitions::new(&topic, 3)], &options)
        .await?;
    anyhow::ensure!(
        grown.iter().all(Result::is_ok),
        "adding partitions: {grown:?}"
    );
    // Until the cluster serves the new partition: a client of its own reads its end (its
    // leader may take a moment under load; the cache of `ends` still holds one partition).
    let fresh = newsroom_infra::kafka::PartitionEnds::new(kafka)?;
    until(
        "the new partition is served",
        Duration::from_secs(30),
        || async { fresh.end(&topic, 2, timeout).is_ok() },
    )
    .await?;
    let started = Instant::now();
    let end = ends.end(&topic, 2, timeout);
    let took = started.elapsed();
    admin.delete_topics(&[topic.as_str()], &options).await?;
    assert_eq!(end?, 0, "an empty partition ends at 0");
    assert!(took < Duration::from_secs(10), "read in {took:?}");
    app.stop().await
}
