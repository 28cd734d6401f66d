//! Access tokens (JWT, HS256) and the caller of a request.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::time::{Duration, Instant};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use newsroom_events::users::Role;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::http::ApiError;
use crate::settings::AuthSettings;

const ISSUER: &str = "newsroom";

/// An authenticated caller: who, and with which role the token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// User id.
    pub id: Uuid,
    /// Role when the token was issued.
    pub role: Role,
}

impl Actor {
    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Issues and checks tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    iss: String,
    iat: u64,
    exp: u64,
    /// When it was issued, in milliseconds (revocations are that precise; tokens from
    /// before it existed fall back to `iat`).
    #[serde(default)]
    iat_ms: Option<u64>,
}

/// A token as `POST /v1/auth/token` answers it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Token)]
pub struct IssuedToken {
    /// The JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

impl Tokens {
    /// From settings: the configured secret, or in local mode a generated one.
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        let secret = match (&settings.jwt_secret, settings.local) {
            (Some(secret), _) => {
                anyhow::ensure!(
                    secret.expose().len() >= 32,
                    "NEWSROOM_JWT_SECRET must be at least 32 bytes long"
                );
                secret.expose().as_bytes().to_vec()
            }
            (None, true) => {
                tracing::warn!(
                    "local mode: no NEWSROOM_JWT_SECRET set, generated a random one (tokens end with this process)"
                );
                let mut secret = vec![0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut secret);
                secret
            }
            (None, false) => anyhow::bail!(
                "NEWSROOM_JWT_SECRET is not set (use --local / NEWSROOM_LOCAL=true for development)"
            ),
        };
        Ok(Tokens {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            ttl_secs: settings.token_ttl_secs,
        })
    }

    /// A token for `actor`.
    pub fn issue(&self, actor: Actor) -> anyhow::Result<IssuedToken> {
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let now = now_ms / 1000;
        let claims = Claims {
            sub: actor.id,
            role: actor.role,
            iss: ISSUER.into(),
            iat: now,
            exp: now + self.ttl_secs,
            iat_ms: Some(now_ms),
        };
        let access_token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok(IssuedToken {
            access_token,
            token_type: "Bearer",
            expires_in: self.ttl_secs,
        })
    }

    /// The actor a token names, if it is valid and unexpired.
    pub fn verify(&self, token: &str) -> Option<Actor> {
        self.verify_issued(token).map(|(actor, _)| actor)
    }

    /// The actor a token names and when it was issued (Unix milliseconds).
    pub fn verify_issued(&self, token: &str) -> Option<(Actor, i64)> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|data| {
                let issued = data.claims.iat_ms.unwrap_or(data.claims.iat * 1000);
                let actor = Actor {
                    id: data.claims.sub,
                    role: data.claims.role,
                };
                (actor, i64::try_from(issued).unwrap_or(i64::MAX))
            })
    }
}

/// Tokens revoked by what happened to their user since they were issued (ADR 18): a
/// password change, a role change or an erasure sets the user's floor in
/// `cmd_token_floors`, and a token issued before it is refused with 401 by both APIs.
/// Floors are cached per process for up to `FLOOR_FRESH`; the process that sets one knows
/// it at once.
#[derive(Clone)]
pub struct Revocations {
    pool: sqlx::PgPool,
    floors: std::sync::Arc<std::sync::RwLock<Floors>>,
}

/// Each user's floor (none: never revoked) and when it was read.
type Floors = HashMap<Uuid, (Option<i64>, Instant)>;

/// How long a cached floor is trusted.
const FLOOR_FRESH: Duration = Duration::from_secs(1);
/// Users whose floors are cached at most.
const MAX_FLOORS: usize = 100_000;

impl Revocations {
    /// The floors in `pool`.
    pub fn new(pool: sqlx::PgPool) -> Self {
        Revocations {
            pool,
            floors: std::sync::Arc::default(),
        }
    }

    /// Revokes the tokens of `user` issued before `at` (Unix milliseconds).
    pub async fn revoke(&self, user: Uuid, at: i64) -> anyhow::Result<()> {
        self.remember(user, Some(at));
        let at = chrono::DateTime::from_timestamp_millis(at).unwrap_or_default();
        self.restore(&[(user, at)]).await
    }

    /// Sets the floors of many users at once (a new owner of their partition, from their
    /// committed states: what a crashed process may not have written).
    pub async fn restore(
        &self,
        floors: &[(Uuid, chrono::DateTime<chrono::Utc>)],
    ) -> anyhow::Result<()> {
        let (users, ats): (Vec<Uuid>, Vec<chrono::DateTime<chrono::Utc>>) =
            floors.iter().copied().unzip();
        sqlx::query!(
            "INSERT INTO cmd_token_floors (user_id, valid_from) \
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[]) \
             ON CONFLICT (user_id) DO UPDATE SET valid_from = EXCLUDED.valid_from \
             WHERE cmd_token_floors.valid_from < EXCLUDED.valid_from",
            &users,
            &ats,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn remember(&self, user: Uuid, floor: Option<i64>) {
        let mut floors = self.floors.write().unwrap_or_else(|e| e.into_inner());
        if floors.len() >= MAX_FLOORS {
            floors.retain(|_, (_, at)| at.elapsed() < FLOOR_FRESH);
            if floors.len() >= MAX_FLOORS {
                floors.clear();
            }
        }
        let keep = floors.get(&user).and_then(|(f, _)| *f).max(floor);
        floors.insert(user, (keep, Instant::now()));
    }

    /// Whether a token of `user` issued at `issued` (Unix milliseconds) was revoked.
    pub async fn revoked(&self, user: Uuid, issued: i64) -> anyhow::Result<bool> {
        let cached = {
            let floors = self.floors.read().unwrap_or_else(|e| e.into_inner());
            floors
                .get(&user)
                .filter(|(_, at)| at.elapsed() < FLOOR_FRESH)
                .map(|(floor, _)| *floor)
        };
        let floor = match cached {
            Some(floor) => floor,
            None => {
                let valid_from = sqlx::query_scalar!(
                    "SELECT valid_from FROM cmd_token_floors WHERE user_id = $1",
                    user,
                )
                .fetch_optional(&self.pool)
                .await?;
                let floor = valid_from.map(|at| at.timestamp_millis());
                self.remember(user, floor);
                floor
            }
        };
        Ok(floor.is_some_and(|floor| issued < floor))
    }
}

/// What [`authenticate`] found of a request's token, for [`Caller`] to take.
#[derive(Debug, Clone, Copy)]
enum Checked {
    /// Valid and not revoked.
    Valid(Actor),
    /// Valid; whether it was revoked is not known (the floors could not be read).
    Unverified(Actor),
    /// Valid, but issued before its user's floor.
    Revoked,
}

/// Whether the request's token was checked against its user's floor and found current
/// (so its user exists and was not erased, as of the floors' cache).
pub fn verified(req: &HttpRequest) -> bool {
    use actix_web::HttpMessage as _;
    matches!(req.extensions().get::<Checked>(), Some(Checked::Valid(_)))
}

/// Middleware of both APIs: checks a valid bearer token against its user's floor, so that
/// a handler that needs the caller refuses a revoked token with 401 (as an invalid or
/// expired one). Public endpoints stay public. If the floors cannot be read the token is
/// taken as it is (and the failure logged): reads go on while PostgreSQL is away.
pub async fn authenticate(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::HttpMessage as _;
    let services = (
        req.app_data::<web::Data<Tokens>>().cloned(),
        req.app_data::<web::Data<Revocations>>().cloned(),
    );
    if let (Some(token), (Some(tokens), Some(revocations))) = (bearer(req.request()), services)
        && let Some((actor, issued)) = tokens.verify_issued(&token)
    {
        let checked = match revocations.revoked(actor.id, issued).await {
            Ok(false) => Checked::Valid(actor),
            Ok(true) => Checked::Revoked,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "token floors unreadable; token taken as valid"
                );
                Checked::Unverified(actor)
            }
        };
        req.extensions_mut().insert(checked);
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// The user whose valid token the request carries (revoked or not checked yet: `None`).
pub fn caller_id(req: &HttpRequest) -> Option<Uuid> {
    use actix_web::HttpMessage as _;
    match req.extensions().get::<Checked>() {
        Some(Checked::Valid(actor) | Checked::Unverified(actor)) => Some(actor.id),
        _ => None,
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

/// The caller of a request: `None` when anonymous. A present but invalid or expired
/// token is refused with 401 right away.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Option<Actor>);

impl Caller {
    /// The actor, or 401.
    pub fn required(self) -> Result<Actor, ApiError> {
        self.0.ok_or(ApiError::Unauthenticated)
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        use actix_web::HttpMessage as _;
        match req.extensions().get::<Checked>().copied() {
            Some(Checked::Valid(actor) | Checked::Unverified(actor)) => {
                return ready(Ok(Caller(Some(actor))));
            }
            Some(Checked::Revoked) => return ready(Err(ApiError::Unauthenticated)),
            None => {}
        }
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return ready(Ok(Caller(None)));
        };
        let Some(tokens) = req.app_data::<web::Data<Tokens>>() else {
            return ready(Err(ApiError::Internal(anyhow::anyhow!(
                "token service missing"
            ))));
        };
        let token = value.to_str().ok().and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
        ready(match token.and_then(|t| tokens.verify(t.trim())) {
            Some(actor) => Ok(Caller(Some(actor))),
            None => Err(ApiError::Unauthenticated),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            email_pepper: None,
            local: false,
            token_ttl_secs: 60,
            admin_email: None,
            admin_password: None,
        }
    }

    #[test]
    fn an_issued_token_names_its_actor_and_only_verifies_with_its_secret() -> anyhow::Result<()> {
        let tokens = Tokens::from_settings(&settings())?;
        let actor = Actor {
            id: Uuid::now_v7(),
            role: Role::Editor,
        };
        let issued = tokens.issue(actor)?;

        assert_eq!(tokens.verify(&issued.access_token), Some(actor));
        let mut other = settings();
        other.jwt_secret = Some("another secret that is long enough!!".into());
        assert_eq!(
            Tokens::from_settings(&other)?.verify(&issued.access_token),
            None
        );
        assert_eq!(tokens.verify("not.a.token"), None);
        Ok(())
    }

    #[test]
    fn without_a_secret_only_local_mode_starts() {
        let mut s = settings();
        s.jwt_secret = None;
        assert!(Tokens::from_settings(&s).is_err());
        s.local = true;
        assert!(Tokens::from_settings(&s).is_ok());
        s.jwt_secret = Some("short".into());
        assert!(Tokens::from_settings(&s).is_err());
    }
}
