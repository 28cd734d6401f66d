//! `/v1/users` commands.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use anyhow::Context as _;
use chrono::Utc;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec;
use newsroom_infra::http::{ApiError, RequestId};
use newsroom_infra::kafka::Stream;
use newsroom_infra::views::UserView;
use serde_json::Value;
use uuid::Uuid;

use crate::State;
use crate::domain::user::{self, Context, RegisterUser, User};
use crate::log::OutRecord;
use crate::routes::{X_CONSISTENCY_TOKEN, token_for};
use crate::validation::Fields;

/// `POST /v1/users`: register a reader.
#[tracing::instrument(skip_all)]
pub async fn register(
    req: HttpRequest,
    body: web::Json<Value>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let mut fields = Fields::of(&body)?;
    let name = fields.trimmed_string("name", 1, 100);
    let email = fields.email("email");
    let password = fields.exact_string("password", 8, 128);
    fields.finish()?;
    let (Some(name), Some(email), Some(password)) = (name, email, password) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };

    let password_hash = state.hasher.hash(password).await?;
    let request_id = RequestId::of(&req);
    let ctx = Context {
        now: Utc::now(),
        correlation_id: request_id,
        command_id: Uuid::now_v7().to_string(),
        actor_id: None,
    };
    let command = RegisterUser {
        user_id: Uuid::now_v7(),
        name,
        email,
        password_hash,
    };
    let user_id = command.user_id;
    let events = user::register(None, command, &ctx).map_err(|e| ApiError::Internal(e.into()))?;
    let records = events
        .iter()
        .map(|event| {
            let payload = match event {
                UserEvent::Registered(e) => codec::encode(&state.registry, e),
            }
            .context("encoding a user event")?;
            Ok(OutRecord {
                stream: Stream::Users,
                key: user_id,
                payload,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let positions = state.log.append(records).await?;

    let created = events
        .iter()
        .fold(None, user::apply)
        .ok_or_else(|| anyhow::anyhow!("registration produced no user"))?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/users/{user_id}")))
        .insert_header((header::ETAG, format!("\"{}\"", created.version)))
        .insert_header((X_CONSISTENCY_TOKEN, token_for(&positions)))
        .json(user_body(&created)))
}

fn user_body(user: &User) -> UserView {
    UserView {
        id: user.id,
        name: user.name.clone(),
        email: user.email.clone(),
        role: user.role.as_str().to_owned(),
        followed_categories: Vec::new(),
        email_notifications: false,
        version: user.version,
        created_at: user.created_at,
    }
}
