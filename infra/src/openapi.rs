//! What the OpenAPI descriptions of both APIs share: the problem answer, the bearer
//! scheme, the ops endpoints, and the step that turns a description into the served JSON.
//!
//! Each API's description is generated from its handlers (`#[utoipa::path]`), the types
//! it serializes (`ToSchema`) and, for request bodies, the validation code itself; nothing
//! is written by hand apart from the words (ADR 31).

use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, RefOr, Required};
use utoipa::{OpenApi, ToResponse};

use crate::http::{FieldError, Problem};

/// The answer of every error: a problem document (`$ref` to `#/components/responses/Problem`).
pub struct ProblemAnswer;

impl<'s> ToResponse<'s> for ProblemAnswer {
    fn response() -> (&'s str, RefOr<Response>) {
        let content = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build();
        (
            "Problem",
            ResponseBuilder::new()
                .description("An error (RFC 9457)")
                .content("application/problem+json", content)
                .build()
                .into(),
        )
    }
}

#[derive(OpenApi)]
#[openapi(
    paths(crate::http::healthz, crate::http::readyz, crate::http::metrics_text),
    components(schemas(Problem, FieldError), responses(ProblemAnswer))
)]
struct Ops;

/// The `{id}` of a path: the aggregate's id.
pub struct Id;

impl utoipa::IntoParams for Id {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The aggregate's id"))
                .schema(Some(string().format(Some(
                    utoipa::openapi::schema::SchemaFormat::KnownFormat(
                        utoipa::openapi::schema::KnownFormat::Uuid,
                    ),
                ))))
                .build(),
        ]
    }
}

/// An optional request header of type string.
pub fn header(name: &str, description: &str, schema: ObjectBuilder) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// A string schema.
pub fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// `document` with the ops endpoints, the problem answer and the bearer scheme added, as
/// the JSON served at `/openapi.json`.
pub fn finish(mut document: Document) -> anyhow::Result<String> {
    document.merge(Ops::openapi());
    if let Some(components) = document.components.as_mut() {
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
    Ok(document.to_pretty_json()?)
}
