//! Access tokens (JWT, HS256) and the caller of a request.

use std::future::{Ready, ready};

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
}

/// A token as `POST /v1/auth/token` answers it.
#[derive(Debug, Serialize)]
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
                    secret.len() >= 32,
                    "NEWSROOM_JWT_SECRET must be at least 32 bytes long"
                );
                secret.as_bytes().to_vec()
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
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: actor.id,
            role: actor.role,
            iss: ISSUER.into(),
            iat: now,
            exp: now + self.ttl_secs,
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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|data| Actor {
                id: data.claims.sub,
                role: data.claims.role,
            })
    }
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
