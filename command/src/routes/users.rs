//! `/v1/users` commands.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use newsroom_events::Category;
use newsroom_events::users::Role;
use newsroom_infra::http::{ApiError, FieldError, JsonBody};
use newsroom_infra::kafka::Stream;
use newsroom_infra::openapi::{Id, ProblemAnswer};
use newsroom_infra::views::UserView;
use uuid::Uuid;

use super::{Placement, Target, X_CONSISTENCY_TOKEN, place, token_for};
use crate::State;
use crate::aggregate::UserAggregate;
use crate::claims::Claimed;
use crate::domain::user::{Profile, User, UserCommand};
use crate::domain::{Actor, DomainError};
use crate::owner::{self, Committed, RequestMeta};
use crate::validation::Fields;

/// The user as the API shows it.
pub fn user_view(user: &User) -> UserView {
    UserView {
        id: user.id,
        name: user.name.clone(),
        email: user.email.clone(),
        role: user.role.as_str().to_owned(),
        followed_categories: user
            .followed_categories
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        email_notifications: user.email_notifications,
        version: user.version,
        created_at: user.created_at,
    }
}

fn answer(status: StatusCode, committed: &Committed<User>) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response
        .insert_header((header::ETAG, format!("\"{}\"", committed.state.version)))
        .insert_header((
            X_CONSISTENCY_TOKEN,
            token_for(Stream::Users, committed.position),
        ));
    if status == StatusCode::NO_CONTENT {
        return response.finish();
    }
    if status == StatusCode::CREATED {
        response.insert_header((
            header::LOCATION,
            format!("/v1/users/{}", committed.state.id),
        ));
    }
    response.json(user_view(&committed.state))
}

/// Registers a user with `role`, claiming the e-mail first; shared by `POST /v1/users` and
/// the bootstrap admin. The new id is chosen in a partition this process writes, or, for a
/// keyed request, derived from the key (the caller placed the request on its partition).
pub async fn register_user(
    state: &State,
    name: String,
    email: String,
    password: String,
    role: Role,
    meta: RequestMeta,
) -> Result<Committed<User>, ApiError> {
    let owners = &state.owners;
    let id = match &meta.keyed {
        Some(keyed) => {
            let id = keyed.new_id();
            // A retry of a registration that was decided: the recorded answer, and nothing
            // is claimed, hashed or created again.
            if let Some(committed) = owner::recall::<UserAggregate>(owners, id, &meta).await? {
                return Ok(committed);
            }
            id
        }
        None if owners.ready().is_empty() => {
            return Err(ApiError::Unavailable(
                "this process writes no partition yet; retry shortly".into(),
            ));
        }
        None => owners.new_id(),
    };
    let partition = owners.partition_of(id);
    let claims = &state.shared.claims;
    let claim = claims.claim_of(&email);
    let taken = |holder| {
        tracing::info!(%holder, "e-mail already claimed");
        ApiError::Conflict {
            code: "email_taken",
            detail: "another user has this e-mail address".into(),
        }
    };
    // A taken address costs no hash.
    if let Some(holder) = claims.holder(&claim).await?.filter(|h| *h != id) {
        return Err(taken(holder));
    }
    let password_hash = state.hasher.hash(password).await?;
    state.shared.keys.create(id, partition).await?;
    match claims
        .try_claim(&claim, id, partition, meta.event_id, None)
        .await?
    {
        Claimed::Ours => {}
        Claimed::Taken { holder, .. } => {
            // A keyed registration's id (and key) may be a live user's: its first attempt
            // may have committed meanwhile.
            if meta.keyed.is_none() {
                state.shared.keys.destroy(id).await?;
            }
            return Err(taken(holder));
        }
    }
    let command = UserCommand::Register {
        name,
        email,
        email_claim: claim.clone(),
        password_hash,
        role,
    };
    let keyed = meta.keyed;
    match owner::submit::<UserAggregate>(owners, id, command, meta).await {
        Ok(committed) => {
            claims.confirm(&claim, id).await?;
            Ok(committed)
        }
        Err(failure) => {
            // A keyed registration shares its id, key and claim with every other request
            // of its key, one of which may have committed: it leaves them to the next
            // owner's reconciliation (which drops what no committed user holds).
            if keyed.is_none() && definitive(&failure) {
                claims.abandon(&claim, id).await?;
                state.shared.keys.destroy(id).await?;
            }
            Err(failure.into())
        }
    }
}

fn definitive(failure: &owner::Submitted) -> bool {
    !matches!(
        failure,
        owner::Submitted::Failed(owner::CommandError::Unavailable {
            definitive: false,
            ..
        })
    )
}

/// The body of `POST /v1/users`: name, e-mail and password.
pub fn read_registration(
    fields: &mut Fields<'_>,
) -> (Option<String>, Option<String>, Option<String>) {
    let name = fields.trimmed_string("name", 1, 100);
    let email = fields.email("email");
    let password = fields.secret_string("password", 8, 128);
    (name, email, password)
}

/// The body of `PATCH /v1/users/{id}`: at least one profile field.
pub fn read_profile(fields: &mut Fields<'_>) -> ProfileFields {
    let profile = ProfileFields {
        name: fields.optional_trimmed_string("name", 1, 100),
        email: fields.optional_email("email"),
        followed_categories: fields.optional_set_of(
            "followed_categories",
            "famous, politics, sports",
            Category::parse,
        ),
        email_notifications: fields.optional_bool("email_notifications"),
    };
    fields.require_any(&[
        "name",
        "email",
        "followed_categories",
        "email_notifications",
    ]);
    profile
}

/// The profile fields of `PATCH /v1/users/{id}` that were given.
pub struct ProfileFields {
    /// A new name.
    pub name: Option<String>,
    /// A new e-mail address.
    pub email: Option<String>,
    /// The categories to follow.
    pub followed_categories: Option<Vec<Category>>,
    /// Whether to get e-mails.
    pub email_notifications: Option<bool>,
}

/// The body of `PUT /v1/users/{id}/password`: the current and the new password.
pub fn read_password_change(fields: &mut Fields<'_>) -> (Option<String>, Option<String>) {
    let current_password = fields.secret_string("current_password", 1, 128);
    let new_password = fields.secret_string("new_password", 8, 128);
    (current_password, new_password)
}

/// The body of `PUT /v1/users/{id}/role`: the role.
pub fn read_role(fields: &mut Fields<'_>) -> Option<Role> {
    fields.one_of("role", "reader, editor, admin", Role::parse)
}

/// `POST /v1/users`: register a reader.
#[tracing::instrument(skip_all)]
#[utoipa::path(post, path = "/v1/users",
    summary = "Register a reader",
    params(crate::openapi::Keyed),
    request_body = crate::openapi::RegisterUser,
    responses(
        (status = 201, description = "Registered; the event is committed", body = UserView, headers(("Location" = String), ("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn register(
    req: HttpRequest,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let mut fields = Fields::of(&body.value)?;
    let (name, email, password) = read_registration(&mut fields);
    fields.finish()?;
    let (Some(name), Some(email), Some(password)) = (name, email, password) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };
    if !state.shared.directory.forwarded(req.head()) {
        let address = state.throttles.address(&req);
        state.throttles.credentials.attempt(&address)?;
    }
    let meta = RequestMeta::of(&req, None);
    if let Some(keyed) = &meta.keyed {
        // Every retry of the key goes to the partition of the id it derives.
        let partition = state.owners.partition_of(keyed.new_id());
        if let Placement::Forwarded(response) = place(&state, &req, &body.raw, partition).await? {
            return Ok(response);
        }
    }
    let committed = register_user(&state, name, email, password, Role::Reader, meta).await?;
    Ok(answer(StatusCode::CREATED, &committed))
}

/// Runs a command on an existing user here and answers with `status`, or forwards the
/// request to the user's owner and relays its answer.
async fn run(
    state: &State,
    req: &HttpRequest,
    body: &[u8],
    target: (Uuid, Actor),
    command: UserCommand,
    status: StatusCode,
) -> Result<HttpResponse, ApiError> {
    let (id, actor) = target;
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(state, req, body, partition).await? {
        return Ok(response);
    }
    let committed = submit_here(state, req, id, actor, command).await?;
    Ok(answer(status, &committed))
}

/// Submits a command to the local writer of user `id` (placement already checked).
async fn submit_here(
    state: &State,
    req: &HttpRequest,
    id: Uuid,
    actor: Actor,
    command: UserCommand,
) -> Result<Committed<User>, ApiError> {
    let meta = RequestMeta::of(req, Some(actor.id));
    Ok(owner::submit::<UserAggregate>(&state.owners, id, command, meta).await?)
}

/// `PATCH /v1/users/{id}`: name, e-mail, followed categories, e-mail notifications.
#[tracing::instrument(skip_all, fields(user = %target.id))]
#[utoipa::path(patch, path = "/v1/users/{id}",
    summary = "Change profile fields (self, admin)",
    params(Id, crate::openapi::Writes),
    request_body = crate::openapi::UpdateUser,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed", body = UserView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn update(
    req: HttpRequest,
    target: Target,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let mut fields = Fields::of(&body.value)?;
    let ProfileFields {
        name,
        email,
        followed_categories,
        email_notifications,
    } = read_profile(&mut fields);
    fields.finish()?;
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(&state, &req, &body.raw, partition).await? {
        return Ok(response);
    }
    // The e-mail is claimed before the change and confirmed after its commit.
    let meta = RequestMeta::of(&req, Some(actor.id));
    if let Some(committed) = owner::recall::<UserAggregate>(&state.owners, id, &meta).await? {
        return Ok(answer(StatusCode::OK, &committed));
    }
    let claims = &state.shared.claims;
    let mut new_claim = None;
    if let Some(email) = &email {
        let current = owner::read::<UserAggregate>(&state.owners, id).await?;
        let visible = current.filter(|u| !u.erased);
        if actor.id != id && !actor.is_admin() {
            return Err(ApiError::Forbidden);
        }
        let user = visible.ok_or(ApiError::NotFound)?;
        let claim = claims.claim_of(email);
        if claim != user.email_claim {
            match claims
                .try_claim(
                    &claim,
                    id,
                    partition,
                    meta.event_id,
                    Some(&user.email_claim),
                )
                .await?
            {
                Claimed::Ours => new_claim = Some(claim.clone()),
                Claimed::Taken { .. } => {
                    return Err(ApiError::Conflict {
                        code: "email_taken",
                        detail: "another user has this e-mail address".into(),
                    });
                }
            }
        }
    }
    let profile = Profile {
        name,
        email: email.map(|e| {
            let claim = claims.claim_of(&e);
            (e, claim)
        }),
        followed_categories,
        email_notifications,
    };
    let command = UserCommand::Update {
        actor,
        expected_version,
        profile,
    };
    let outcome = owner::submit::<UserAggregate>(&state.owners, id, command, meta).await;
    if let Some(claim) = &new_claim {
        match &outcome {
            Ok(_) => claims.confirm(claim, id).await?,
            Err(failure) if definitive(failure) => claims.abandon(claim, id).await?,
            Err(_) => {}
        }
    }
    Ok(answer(StatusCode::OK, &outcome?))
}

/// `PUT /v1/users/{id}/password`: self only, with the current password.
#[tracing::instrument(skip_all, fields(user = %target.id))]
#[utoipa::path(put, path = "/v1/users/{id}/password",
    summary = "Set a new password (self)",
    params(Id, crate::openapi::Writes),
    request_body = crate::openapi::ChangePassword,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Changed; tokens issued before are revoked", headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn change_password(
    req: HttpRequest,
    target: Target,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let mut fields = Fields::of(&body.value)?;
    let (current_password, new_password) = read_password_change(&mut fields);
    fields.finish()?;
    let (Some(current_password), Some(new_password)) = (current_password, new_password) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };
    if actor.id != id {
        return Err(ApiError::Forbidden);
    }
    if !state.shared.directory.forwarded(req.head()) {
        state
            .throttles
            .credentials
            .attempt(&state.throttles.address(&req))?;
    }
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(&state, &req, &body.raw, partition).await? {
        return Ok(response);
    }
    let meta = RequestMeta::of(&req, Some(actor.id));
    if let Some(committed) = owner::recall::<UserAggregate>(&state.owners, id, &meta).await? {
        return Ok(answer(StatusCode::NO_CONTENT, &committed));
    }
    let user = owner::read::<UserAggregate>(&state.owners, id)
        .await?
        .filter(|u| !u.erased)
        .ok_or(ApiError::NotFound)?;
    if !state
        .hasher
        .verify(&user.password_hash, current_password)
        .await?
    {
        return Err(DomainError::StalePassword.into());
    }
    let command = UserCommand::ChangePassword {
        actor,
        expected_version,
        verified_hash: user.password_hash.clone(),
        new_hash: state.hasher.hash(new_password).await?,
    };
    let committed = owner::submit::<UserAggregate>(&state.owners, id, command, meta).await?;
    revoke_tokens(&state, &committed).await;
    Ok(answer(StatusCode::NO_CONTENT, &committed))
}

/// Revokes the tokens a committed password change, role change or erasure left behind.
/// A failure is logged: the next owner of the partition sets the floor from the state.
async fn revoke_tokens(state: &State, committed: &Committed<User>) {
    let user = &committed.state;
    if let Some(from) = user.tokens_valid_from
        && let Err(e) = state
            .revocations
            .revoke(user.id, from.timestamp_millis())
            .await
    {
        tracing::error!(user = %user.id, error = format!("{e:#}"), "revoking tokens");
    }
}

/// `PUT /v1/users/{id}/role`: admins only.
#[tracing::instrument(skip_all, fields(user = %target.id))]
#[utoipa::path(put, path = "/v1/users/{id}/role",
    summary = "Give a role (admin)",
    params(Id, crate::openapi::Writes),
    request_body = crate::openapi::ChangeRole,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed", body = UserView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn change_role(
    req: HttpRequest,
    target: Target,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let mut fields = Fields::of(&body.value)?;
    let role = read_role(&mut fields);
    fields.finish()?;
    let role =
        role.ok_or_else(|| ApiError::Validation(vec![FieldError::new("role", "is required")]))?;
    if !actor.is_admin() {
        return Err(ApiError::Forbidden);
    }
    let command = UserCommand::ChangeRole {
        actor,
        expected_version,
        role,
    };
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(&state, &req, &body.raw, partition).await? {
        return Ok(response);
    }
    let committed = submit_here(&state, &req, id, actor, command).await?;
    revoke_tokens(&state, &committed).await;
    Ok(answer(StatusCode::OK, &committed))
}

/// `DELETE /v1/users/{id}`: erasure (self or admin). The user's key is destroyed, so the
/// personal fields of all their events become unreadable.
#[tracing::instrument(skip_all, fields(user = %target.id))]
#[utoipa::path(delete, path = "/v1/users/{id}",
    summary = "Erase the user (self, admin): personal data becomes unreadable everywhere",
    params(Id, crate::openapi::Writes),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Erased", headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn erase(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
    idempotency: web::Data<crate::idempotency::Idempotency>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let command = UserCommand::Erase {
        actor,
        expected_version,
    };
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(&state, &req, &[], partition).await? {
        return Ok(response);
    }
    let committed = submit_here(&state, &req, id, actor, command).await?;
    revoke_tokens(&state, &committed).await;
    // The erasure is committed: each step after it is tried on its own, a few times, and
    // a step that still fails is logged, not answered as if the erasure had failed (a
    // retry would find no user). The key and the claims are also settled at the next
    // takeover of the partition; stored answers expire within 24 h.
    use newsroom_infra::retry::with_retries;
    let steps = [
        (
            "destroying an erased user's key",
            with_retries("destroying the key", || state.shared.keys.destroy(id)).await,
        ),
        (
            "releasing an erased user's claims",
            with_retries("releasing the claims", || {
                state.shared.claims.release_all(id)
            })
            .await,
        ),
        (
            "forgetting an erased user's stored answers",
            with_retries("forgetting stored answers", || idempotency.erase(id)).await,
        ),
    ];
    for (step, outcome) in steps {
        if let Err(e) = outcome {
            tracing::error!(user = %id, error = format!("{e:#}"), "{step}");
        }
    }
    Ok(answer(StatusCode::NO_CONTENT, &committed))
}

/// `POST /v1/users/{id}/notifications/read`: self only.
#[tracing::instrument(skip_all, fields(user = %target.id))]
#[utoipa::path(post, path = "/v1/users/{id}/notifications/read",
    summary = "Mark every notification so far as read (self)",
    params(Id, crate::openapi::Keyed),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Done", headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn notifications_read(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target { actor, id, .. } = target;
    let command = UserCommand::MarkNotificationsRead {
        actor,
        at: chrono::Utc::now(),
    };
    run(
        &state,
        &req,
        &[],
        (id, actor),
        command,
        StatusCode::NO_CONTENT,
    )
    .await
}
