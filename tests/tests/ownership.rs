//! Two command processes (real OS processes of the `newsroom` binary) share the
//! partitions; one killed → the other takes over with correct versions; one frozen with
//! SIGSTOP while it loses its partitions → once resumed it cannot append (fenced), and
//! nothing acknowledged is lost or duplicated.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use newsroom::Roles;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::kafka::Stream;
use newsroom_infra::registry::Registry;
use newsroom_tests::{ADMIN_PASSWORD, TestApp, new_user, token_subject};
use reqwest::StatusCode as S;
use serde_json::{Value, json};
use uuid::Uuid;

/// A `newsroom command-api` child process.
struct Process {
    child: Child,
    url: String,
}

impl Process {
    fn start(app: &TestApp, name: &str) -> anyhow::Result<Process> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("newsroom-{name}-{port}.log")),
        )?;
        let child = app
            .newsroom(name)?
            .arg("command-api")
            .env("NEWSROOM_COMMAND_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Process {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
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
    let mut request = http.request(method, url).timeout(Duration::from_secs(60));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(v) = if_match {
        request = request.header("if-match", format!("\"{v}\""));
    }
    let response = request.send().await?;
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
    until(
        "both processes write partitions that add up to all of them",
        Duration::from_secs(60),
        || async {
            match (a.owned(&http).await, b.owned(&http).await) {
                (Some(x), Some(y)) => {
                    x > 0 && y > 0 && x + y == i64::from(app.settings.kafka.partitions)
                }
                _ => false,
            }
        },
    )
    .await?;

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

    // Kill A: B takes every partition and serves A's users at their right versions.
    let mut a = a;
    a.child.kill()?;
    a.child.wait()?;
    until(
        "B writes every partition",
        Duration::from_secs(60),
        || async { b.owned(&http).await == Some(i64::from(app.settings.kafka.partitions)) },
    )
    .await?;
    for user in &users {
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

    // Start C; once it writes some partitions, freeze it, and send it a command that
    // waits in its socket while the group gives its partitions back to B.
    let c = Process::start(&app, "c")?;
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
    // Resumed, C still holds its old state (version 1) until it notices the rebalance; a
    // command reaching it now must not append: its writer is fenced (or it forwards).
    c.signal("-CONT")?;
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

mod writers {
    //! Partition writers driven directly, against the real Kafka and PostgreSQL.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use newsroom::Roles;
    use newsroom_command::aggregate::NewsAggregate;
    use newsroom_command::domain::Actor;
    use newsroom_command::domain::news::NewsCommand;
    use newsroom_command::owner::{CommandError, Committed, Request, RequestMeta, Shared, writer};
    use newsroom_command::{claims::Claims, forward::Directory, keys::Keys};
    use newsroom_events::Category;
    use newsroom_events::partition::partition_of;
    use newsroom_events::users::Role;
    use newsroom_infra::codec;
    use newsroom_infra::kafka::Stream;
    use newsroom_infra::registry::Registry;
    use newsroom_tests::TestApp;
    use sqlx::PgPool;
    use tokio::sync::{mpsc, oneshot};
    use uuid::Uuid;

    type Queue = mpsc::Sender<Request<NewsAggregate>>;

    /// Topics and a database, the shared parts of writers, and one article id in `partition`.
    struct Fixture {
        app: TestApp,
        shared: Arc<Shared>,
        pool: PgPool,
        id: Uuid,
        editor: Actor,
        partition: i32,
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
                kafka,
                registry: Registry::connect(&app.settings.registry).await?,
                keys: Keys::new(pool.clone()),
                claims: Claims::new(&app.settings.auth, pool.clone())?,
                directory: Directory::new(
                    pool.clone(),
                    "test".into(),
                    "127.0.0.1:1".into(),
                    Duration::from_secs(2),
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

        async fn writer(
            &self,
        ) -> anyhow::Result<(
            Queue,
            std::collections::HashMap<Uuid, newsroom_command::domain::news::News>,
        )> {
            // Driven by hand, a writer owns nothing: once fenced it stays fenced.
            writer::start::<NewsAggregate>(self.shared.clone(), self.partition, Arc::new(|| false))
                .await
        }

        async fn send(
            &self,
            queue: &Queue,
            command: NewsCommand,
        ) -> anyhow::Result<Result<Committed<newsroom_command::domain::news::News>, CommandError>>
        {
            let (reply, answer) = oneshot::channel();
            let meta = RequestMeta::new("writer-test".into(), Some(self.editor.id));
            let request = Request::Command {
                id: self.id,
                command,
                meta,
                reply,
            };
            queue
                .send(request)
                .await
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

    fn version<E>(
        outcome: Result<Committed<newsroom_command::domain::news::News>, E>,
    ) -> Option<i64> {
        outcome.map(|c| c.state.version).ok()
    }

    #[tokio::test]
    async fn a_writer_fenced_by_a_new_owner_of_its_partition_cannot_append() -> anyhow::Result<()> {
        let f = Fixture::new(0, 10_000).await?;
        let (old, _) = f.writer().await?;
        assert_eq!(
            version(f.send(&old, f.draft("t")).await?),
            Some(1),
            "the first owner writes"
        );

        let (new, _) = f.writer().await?;
        let zombie = f.send(&old, f.publish(1)).await?;
        assert!(
            matches!(zombie, Err(CommandError::Unavailable { .. })),
            "the fenced writer cannot append: {zombie:?}"
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
            "one draft, one publication, nothing from the zombie"
        );
        f.app.stop().await
    }

    #[tokio::test]
    async fn a_new_writer_starts_from_the_latest_snapshot_and_reads_only_the_rest()
    -> anyhow::Result<()> {
        let f = Fixture::new(1, 2).await?;
        let (first, _) = f.writer().await?;
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

        let (second, initial) = f.writer().await?;
        let state = initial
            .get(&f.id)
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
        drop(first);
        f.app.stop().await
    }
}
