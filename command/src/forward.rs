//! Requests for a partition this process does not own go to its owner: the ownership
//! directory (`cmd_partition_owners`) says where, and the request is replayed there as
//! it came. A forwarded request is never forwarded again: if it reaches a non-owner
//! (ownership moved meanwhile), it is answered 503 with `Retry-After`.

use std::time::Duration;

use actix_web::http::{StatusCode, header::HeaderName};
use actix_web::{HttpRequest, HttpResponse};
use anyhow::Context as _;
use newsroom_infra::http::ApiError;
use sqlx::PgPool;

/// Marks a request as forwarded once: `<unix seconds>.<SHA-256 of the body>.<HMAC>` with a
/// key every process of the deployment derives from its secrets, valid for
/// `MARK_LIFETIME`, so that no outside caller can pass a request off as forwarded (a
/// forwarded request skips the idempotency table and the throttles). The HMAC covers the
/// time, method and path, the caller's `Authorization`, `Idempotency-Key` and `If-Match`,
/// and the body's hash, which [`check_body`] compares with the bytes that came: a mark seen
/// on the wire cannot carry another caller's token, key, precondition or body. (Within its
/// lifetime it can still be sent again as it was, by someone who can watch the traffic
/// between processes: the same command once more, straight to the owner, which its
/// logged outcomes (under an Idempotency-Key) and version checks answer.)
pub const FORWARDED: &str = "x-newsroom-forwarded";

/// How long a forwarding mark is valid (clocks of the deployment's machines agree closer).
const MARK_LIFETIME: Duration = Duration::from_secs(30);

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Headers of the original request a forwarding mark vouches for.
const BOUND_HEADERS: [&str; 3] = ["authorization", "idempotency-key", "if-match"];

/// Headers copied from the original request to the owner, and back.
const REQUEST_HEADERS: [&str; 6] = [
    "authorization",
    "content-type",
    "if-match",
    "idempotency-key",
    "x-request-id",
    "accept",
];
const RESPONSE_HEADERS: [&str; 6] = [
    "content-type",
    "location",
    "etag",
    "x-consistency-token",
    "retry-after",
    "x-request-id",
];

/// The ownership directory and the client that forwards.
#[derive(Clone)]
pub struct Directory {
    pool: PgPool,
    instance: String,
    address: String,
    client: reqwest::Client,
    key: Vec<u8>,
}

impl Directory {
    /// This process is `instance`, reachable at `address` (`host:port`); `key` marks
    /// forwarded requests.
    pub fn new(
        pool: PgPool,
        instance: String,
        address: String,
        timeout: Duration,
        key: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout + Duration::from_secs(5))
            .build()
            .context("building the forwarding client")?;
        Ok(Directory {
            pool,
            instance,
            address,
            client,
            key,
        })
    }

    fn mark(
        &self,
        at: u64,
        method: &str,
        path: &str,
        headers: &actix_web::http::header::HeaderMap,
        body_hash: &str,
    ) -> String {
        let at_text = at.to_string();
        let mut parts: Vec<&[u8]> = vec![
            at_text.as_bytes(),
            b" ",
            method.as_bytes(),
            b" ",
            path.as_bytes(),
            b" ",
            body_hash.as_bytes(),
        ];
        // Header values hold no line breaks: the parts cannot run into each other; a
        // missing header and an empty one differ.
        for name in BOUND_HEADERS {
            match headers.get(name) {
                Some(value) => parts.extend([&b"\n+"[..], value.as_bytes()]),
                None => parts.push(b"\n-"),
            }
        }
        format!(
            "{at}.{body_hash}.{}",
            crate::digest::hex(&crate::digest::hmac(&self.key, &parts))
        )
    }

    /// Whether `req` was forwarded by a process of this deployment (its mark is valid;
    /// [`check_body`], ahead of every step that asks, refused it if its body is not the
    /// one the mark vouches for).
    pub fn forwarded(&self, req: &actix_web::dev::RequestHead) -> bool {
        self.vouched_body(req).is_some()
    }

    /// The hash of the body a valid forwarding mark on `req` vouches for.
    fn vouched_body(&self, req: &actix_web::dev::RequestHead) -> Option<String> {
        let mark = req.headers.get(FORWARDED)?.to_str().ok()?;
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut fields = mark.splitn(3, '.');
        let (at, body_hash) = (fields.next()?.parse::<u64>().ok()?, fields.next()?);
        if now_secs().abs_diff(at) > MARK_LIFETIME.as_secs() {
            return None;
        }
        let expected = self.mark(at, req.method.as_str(), path, &req.headers, body_hash);
        // Compared in constant time.
        let valid = mark.len() == expected.len()
            && mark
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        valid.then(|| body_hash.to_owned())
    }

    /// Records that this process now writes `partition`.
    pub async fn announce(&self, partition: i32) -> anyhow::Result<()> {
        sqlx::query!(
            "INSERT INTO cmd_partition_owners (partition, owner, address) VALUES ($1, $2, $3) \
             ON CONFLICT (partition) DO UPDATE SET owner = EXCLUDED.owner, address = EXCLUDED.address, since = now()",
            partition,
            self.instance,
            self.address,
        )
        .execute(&self.pool)
        .await
        .context("announcing partition ownership")?;
        Ok(())
    }

    async fn owner_address(&self, partition: i32) -> anyhow::Result<Option<String>> {
        let row = sqlx::query!(
            "SELECT owner, address FROM cmd_partition_owners WHERE partition = $1",
            partition,
        )
        .fetch_optional(&self.pool)
        .await
        .context("reading the ownership directory")?;
        Ok(row
            .filter(|row| row.owner != self.instance)
            .map(|row| row.address))
    }

    /// Replays `req` with `body` at the owner of `partition`.
    pub async fn forward(
        &self,
        req: &HttpRequest,
        body: &[u8],
        partition: i32,
    ) -> Result<HttpResponse, ApiError> {
        let moving = || {
            ApiError::Unavailable(format!(
                "partition {partition} is changing owner; retry shortly"
            ))
        };
        if self.forwarded(req.head()) {
            return Err(moving());
        }
        let Some(address) = self.owner_address(partition).await? else {
            return Err(moving());
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let url = format!("http://{address}{path}");
        let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
            .unwrap_or(reqwest::Method::GET);
        let mut outgoing = self
            .client
            .request(method, &url)
            .header(
                FORWARDED,
                self.mark(
                    now_secs(),
                    req.method().as_str(),
                    path,
                    req.headers(),
                    &body_hash(body),
                ),
            )
            .body(body.to_vec());
        for name in REQUEST_HEADERS {
            if let Some(value) = req.headers().get(name) {
                outgoing = outgoing.header(name, value.as_bytes());
            }
        }
        // The owner's work continues this request's trace (it is not part of the mark:
        // a forged one only misplaces spans).
        if let Some(trace) = newsroom_infra::trace::traceparent(&tracing::Span::current()) {
            outgoing = outgoing.header(newsroom_infra::trace::HEADER, trace);
        }
        let answer = outgoing.send().await.map_err(|e| {
            tracing::warn!(%address, partition, error = %e, "forwarding failed");
            moving()
        })?;
        let status =
            StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut response = HttpResponse::build(status);
        for name in RESPONSE_HEADERS {
            if let Some(value) = answer.headers().get(name) {
                response.insert_header((HeaderName::from_static(name), value.as_bytes()));
            }
        }
        let bytes = answer.bytes().await.map_err(|_| moving())?;
        Ok(response.body(bytes))
    }
}

fn body_hash(body: &[u8]) -> String {
    crate::digest::hex(&crate::digest::sha256(&[body]))
}

/// Refuses a request whose valid forwarding mark vouches for other bytes than its body
/// (before the throttles and the idempotency table trust the mark).
pub async fn check_body(
    mut req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::{HttpMessage as _, ResponseError as _};
    let vouched = req
        .app_data::<actix_web::web::Data<Directory>>()
        .and_then(|directory| directory.vouched_body(req.head()));
    let Some(vouched) = vouched else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let mut payload = req.take_payload();
    let body = match newsroom_infra::http::read_body(&mut payload).await {
        Ok(body) => body,
        Err(refused) => return Ok(req.into_response(refused.error_response())),
    };
    if body_hash(&body) != vouched {
        tracing::warn!(
            path = req.path(),
            "a forwarding mark that does not match its body"
        );
        let refused = ApiError::Malformed("the forwarding mark does not match the body".into());
        return Ok(req.into_response(refused.error_response()));
    }
    req.set_payload(actix_web::dev::Payload::from(body));
    Ok(next.call(req).await?.map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn directory() -> Directory {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        Directory::new(
            pool,
            "a".into(),
            "127.0.0.1:1".into(),
            Duration::from_secs(1),
            b"forwarding key".to_vec(),
        )
        .expect("a directory")
    }

    /// A request to the owner as `forward` builds it: the mark and the copied headers.
    fn forwarded(
        directory: &Directory,
        token: &str,
        key: &str,
        body: &str,
    ) -> (String, TestRequest) {
        let original = TestRequest::post()
            .uri("/v1/news")
            .insert_header(("authorization", token))
            .insert_header(("idempotency-key", key))
            .to_http_request();
        let mark = directory.mark(
            now_secs(),
            "POST",
            "/v1/news",
            original.headers(),
            &body_hash(body.as_bytes()),
        );
        let request = TestRequest::post()
            .uri("/v1/news")
            .insert_header((FORWARDED, mark.as_str()))
            .insert_header(("authorization", token))
            .insert_header(("idempotency-key", key));
        (mark, request)
    }

    #[actix_web::test]
    async fn a_mark_vouches_for_its_caller_key_and_body() {
        let directory = directory();
        let (mark, request) = forwarded(&directory, "Bearer a", "k1", "{\"x\":1}");
        assert_eq!(
            directory.vouched_body(request.to_http_request().head()),
            Some(body_hash(b"{\"x\":1}"))
        );
        // The same mark on a request of another caller or key: not forwarded.
        for (token, key) in [("Bearer b", "k1"), ("Bearer a", "k2")] {
            let replayed = TestRequest::post()
                .uri("/v1/news")
                .insert_header((FORWARDED, mark.as_str()))
                .insert_header(("authorization", token))
                .insert_header(("idempotency-key", key))
                .to_http_request();
            assert!(
                directory.vouched_body(replayed.head()).is_none(),
                "{token} {key}"
            );
        }
        // Nor with another body's hash put in its place.
        let (at, rest) = mark.split_once('.').expect("a mark");
        let (_, hmac) = rest.split_once('.').expect("a mark");
        let swapped = format!("{at}.{}.{hmac}", body_hash(b"{\"x\":2}"));
        let replayed = TestRequest::post()
            .uri("/v1/news")
            .insert_header((FORWARDED, swapped.as_str()))
            .insert_header(("authorization", "Bearer a"))
            .insert_header(("idempotency-key", "k1"))
            .to_http_request();
        assert!(directory.vouched_body(replayed.head()).is_none());
        // Nor one from a deployment with another key.
        let other = Directory {
            key: b"another key".to_vec(),
            ..directory.clone()
        };
        let (_, request) = forwarded(&directory, "Bearer a", "k1", "{}");
        assert!(
            other
                .vouched_body(request.to_http_request().head())
                .is_none()
        );
    }

    #[actix_web::test]
    async fn a_forwarded_request_passes_only_with_the_body_its_mark_vouches_for() {
        use actix_web::{App, HttpRequest, HttpResponse, test, web};
        let directory = directory();
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(directory.clone()))
                .wrap(actix_web::middleware::from_fn(check_body))
                .route(
                    "/v1/news",
                    web::post().to(|req: HttpRequest, body: web::Bytes| async move {
                        let forwarded = req
                            .app_data::<web::Data<Directory>>()
                            .is_some_and(|d| d.forwarded(req.head()));
                        HttpResponse::Ok()
                            .insert_header(("x-forwarded", forwarded.to_string()))
                            .body(body)
                    }),
                ),
        )
        .await;
        let body = "{\"x\":1}";
        let seen = |response: &actix_web::dev::ServiceResponse| {
            response
                .headers()
                .get("x-forwarded")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        // The bytes it vouches for: forwarded, and the handler reads them whole.
        let (_, request) = forwarded(&directory, "Bearer a", "k1", body);
        let response = test::call_service(&app, request.set_payload(body).to_request()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(seen(&response), "true");
        assert_eq!(test::read_body(response).await, body.as_bytes());
        // Other bytes under the same mark: refused before anything trusts it.
        let (_, request) = forwarded(&directory, "Bearer a", "k1", body);
        let response =
            test::call_service(&app, request.set_payload("{\"x\":2}").to_request()).await;
        assert_eq!(response.status(), 400);
        // No mark: an outside request, served as one.
        let request = TestRequest::post().uri("/v1/news").set_payload(body);
        let response = test::call_service(&app, request.to_request()).await;
        assert_eq!(seen(&response), "false");
    }
}
