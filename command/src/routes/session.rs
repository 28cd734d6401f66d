//! `POST /v1/auth/token`: log in.

use actix_web::{HttpRequest, HttpResponse, web};
use newsroom_infra::http::{ApiError, JsonBody};

use super::{Placement, place};
use crate::State;
use crate::aggregate::UserAggregate;
use crate::domain::Actor;
use crate::owner;
use crate::validation::Fields;

/// Exchanges e-mail and password for an access token; wrong credentials are 401 (the same
/// answer, after the same hashing work, whether or not the address is known). Failed
/// logins are counted per account and per client address: past the limit, 429 before any
/// hashing, the right password included, until the minute ends.
#[tracing::instrument(skip_all)]
#[utoipa::path(post, path = "/v1/auth/token",
    summary = "Log in",
    params(crate::openapi::Keyed),
    request_body = crate::openapi::Credentials,
    responses(
        (status = 200, description = "A bearer token", body = newsroom_infra::auth::IssuedToken),
        (status = 400, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 401, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 413, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 415, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 422, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 429, response = newsroom_infra::openapi::ProblemAnswer),
        (status = 503, response = newsroom_infra::openapi::ProblemAnswer),
    ),
)]
pub async fn token(
    req: HttpRequest,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    // A forwarded login was throttled by the process that received it.
    if state.shared.directory.forwarded(req.head()) {
        return log_in(&req, &body, &state).await;
    }
    let throttles = &state.throttles;
    let address = throttles.address(&req);
    let account = body.value["email"]
        .as_str()
        .map(|email| state.shared.claims.claim_of(email))
        .unwrap_or_default();
    let shared_over = state.login_failures.over(&account).await;
    let attempt = throttles.login(&format!("account:{account}"), &address, shared_over)?;
    let answer = log_in(&req, &body, &state).await;
    let failed = match &answer {
        Err(ApiError::Unauthenticated) => true,
        Ok(response) => response.status() == actix_web::http::StatusCode::UNAUTHORIZED,
        Err(_) => false,
    };
    attempt.end(failed);
    if failed {
        state.login_failures.failed(&account).await;
    }
    answer
}

/// The body of `POST /v1/auth/token`: e-mail and password.
pub fn read_credentials(fields: &mut Fields<'_>) -> (Option<String>, Option<String>) {
    let email = fields.exact_string("email", 1, 254);
    let password = fields.secret_string("password", 1, 128);
    (email, password)
}

async fn log_in(
    req: &HttpRequest,
    body: &JsonBody,
    state: &State,
) -> Result<HttpResponse, ApiError> {
    let mut fields = Fields::of(&body.value)?;
    let (email, password) = read_credentials(&mut fields);
    fields.finish()?;
    let (Some(email), Some(password)) = (email, password) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };
    let claim = state.shared.claims.claim_of(&email);
    let Some(id) = state.shared.claims.holder(&claim).await? else {
        state.hasher.waste_time(password).await?;
        return Err(ApiError::Unauthenticated);
    };
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(state, req, &body.raw, partition).await? {
        return Ok(response);
    }
    let user = owner::read::<UserAggregate>(&state.owners, id)
        .await?
        .filter(|u| !u.erased);
    let Some(user) = user else {
        state.hasher.waste_time(password).await?;
        return Err(ApiError::Unauthenticated);
    };
    if !state.hasher.verify(&user.password_hash, password).await? {
        return Err(ApiError::Unauthenticated);
    }
    let issued = state.tokens.issue(Actor {
        id: user.id,
        role: user.role,
    })?;
    Ok(HttpResponse::Ok().json(issued))
}
