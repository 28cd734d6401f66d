//! The query API's OpenAPI description, generated from the code: each handler carries its
//! operation (`#[utoipa::path]`), answers are the types the handlers serialize, and the
//! parameters' limits are the constants the handlers check.

use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::{IntoParams, OpenApi};

use crate::consistency::{DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS};
use crate::routes::news::{LIMIT_DEFAULT, LIMIT_MAX, TAG_MAX};
use crate::routes::{news, users};
use newsroom_infra::openapi::{header, string};

fn query(name: &str, description: &str, schema: ObjectBuilder) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

fn limit() -> Parameter {
    query(
        "limit",
        "How many items",
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(LIMIT_MAX))
            .default(Some(LIMIT_DEFAULT.into())),
    )
}

fn category() -> Parameter {
    query(
        "category",
        "Only this category",
        newsroom_infra::views::category_schema(),
    )
}

/// `limit`.
pub struct Limit;

impl IntoParams for Limit {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![limit()]
    }
}

/// `limit` and `cursor`.
pub struct Paging;

impl IntoParams for Paging {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            limit(),
            query("cursor", "The next_cursor of the page before", string()),
        ]
    }
}

/// `category`.
pub struct CategoryFilter;

impl IntoParams for CategoryFilter {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![category()]
    }
}

/// The filters of the news list: `category`, `tag`, `author_id`.
pub struct Filters;

impl IntoParams for Filters {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            category(),
            query(
                "tag",
                "Only articles with this tag",
                string().min_length(Some(1)).max_length(Some(TAG_MAX)),
            ),
            query(
                "author_id",
                "Only articles of this author",
                string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))),
            ),
        ]
    }
}

/// `X-Consistency-Token` and `X-Consistency-Timeout-Ms`.
pub struct Consistency;

impl IntoParams for Consistency {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            header(
                "X-Consistency-Token",
                "Answer only from read models that include the writes of the commands that returned it",
                string(),
            ),
            header(
                "X-Consistency-Timeout-Ms",
                "How long to wait for them before 503 projection_lagging",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(MAX_TIMEOUT_MS))
                    .default(Some(DEFAULT_TIMEOUT_MS.into())),
            ),
        ]
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "newsroom query API",
        description = "Reads of the newsroom back end; see API.md for the contract."
    ),
    paths(
        users::get,
        users::history,
        news::list,
        news::get,
        news::trending,
        users::recommendations,
        users::notifications,
    )
)]
struct QueryApi;

/// The description served at `/openapi.json`.
pub fn document() -> anyhow::Result<String> {
    newsroom_infra::openapi::finish(QueryApi::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_description_has_every_query_with_the_limits_the_handlers_check() -> anyhow::Result<()> {
        let document: Value = serde_json::from_str(&document()?)?;
        assert_eq!(document["openapi"], "3.1.0");
        let operations: usize = document["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .values()
                    .map(|p| p.as_object().map_or(0, |o| o.len()))
                    .sum()
            })
            .unwrap_or(0);
        // Seven queries and the three ops endpoints.
        assert_eq!(operations, 10, "{}", document["paths"]);
        let list = &document["paths"]["/v1/news"]["get"];
        let param = |name: &str| {
            list["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(param("limit")["schema"]["maximum"], LIMIT_MAX);
        assert_eq!(param("tag")["schema"]["maxLength"], TAG_MAX);
        assert_eq!(
            param("category")["schema"]["enum"].as_array().map(Vec::len),
            Some(3)
        );
        assert_eq!(
            list["responses"]["400"]["$ref"],
            "#/components/responses/Problem"
        );
        for schema in ["News", "Author", "User", "Problem"] {
            assert!(
                document["components"]["schemas"][schema].is_object(),
                "{schema}"
            );
        }
        Ok(())
    }
}
