//! The command API's OpenAPI description, generated from the code: each handler carries
//! its operation (`#[utoipa::path]`), answers are the types the handlers serialize, and
//! each request body's schema is what its validation reads ([`Fields::describe`]).

use std::borrow::Cow;

use utoipa::openapi::path::Parameter;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};

use crate::routes::{news, session, users};
use crate::validation::Fields;
use newsroom_infra::openapi::{header, string};

/// A request body whose schema is what `read` validates.
macro_rules! body {
    ($name:ident, $doc:literal, $read:path) => {
        #[doc = $doc]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                Fields::describe(|fields| {
                    $read(fields);
                })
                .into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

body!(RegisterUser, "`POST /v1/users`.", users::read_registration);
body!(
    Credentials,
    "`POST /v1/auth/token`.",
    session::read_credentials
);
body!(UpdateUser, "`PATCH /v1/users/{id}`.", users::read_profile);
body!(
    ChangePassword,
    "`PUT /v1/users/{id}/password`.",
    users::read_password_change
);
body!(ChangeRole, "`PUT /v1/users/{id}/role`.", users::read_role);
body!(CreateNews, "`POST /v1/news`.", news::read_draft);
body!(EditNews, "`PATCH /v1/news/{id}`.", news::read_edit);

/// `Idempotency-Key`, which every command takes.
pub struct Keyed;

impl IntoParams for Keyed {
    fn into_params(_: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>) -> Vec<Parameter> {
        vec![header(
            "Idempotency-Key",
            "A retry with the same key and body gets the first answer again, and writes nothing more",
            string().pattern(Some(crate::idempotency::KEY_PATTERN)),
        )]
    }
}

/// `If-Match` and `Idempotency-Key`, which the commands on an existing aggregate take.
pub struct Writes;

impl IntoParams for Writes {
    fn into_params(
        parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<Parameter> {
        let mut params = vec![header(
            "If-Match",
            "\"<version>\" (the ETag): 412 version_mismatch unless it is the current version",
            string().pattern(Some(crate::routes::IF_MATCH_PATTERN)),
        )];
        params.extend(Keyed::into_params(parameter_in));
        params
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "newsroom command API",
        description = "Commands of the newsroom back end; see API.md for the contract. Every success carries X-Consistency-Token and X-Request-Id."
    ),
    paths(
        users::register,
        session::token,
        users::update,
        users::erase,
        users::change_password,
        users::change_role,
        users::notifications_read,
        news::create,
        news::update,
        news::delete,
        news::publish,
        news::unpublish,
        news::archive,
    ),
    components(schemas(
        RegisterUser,
        Credentials,
        UpdateUser,
        ChangePassword,
        ChangeRole,
        CreateNews,
        EditNews,
    ))
)]
struct CommandApi;

/// The description served at `/openapi.json`.
pub fn document() -> anyhow::Result<String> {
    newsroom_infra::openapi::finish(CommandApi::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use newsroom_infra::http::ApiError;
    use serde_json::{Map, Value, json};

    type Read = fn(&mut Fields<'_>);

    fn bodies() -> Vec<(&'static str, Read)> {
        vec![
            ("RegisterUser", |f| {
                let _ = users::read_registration(f);
            }),
            ("Credentials", |f| {
                let _ = session::read_credentials(f);
            }),
            ("UpdateUser", |f| {
                let _ = users::read_profile(f);
            }),
            ("ChangePassword", |f| {
                let _ = users::read_password_change(f);
            }),
            ("ChangeRole", |f| {
                let _ = users::read_role(f);
            }),
            ("CreateNews", |f| {
                let _ = news::read_draft(f);
            }),
            ("EditNews", |f| {
                let _ = news::read_edit(f);
            }),
        ]
    }

    /// The fields the validation refuses in `body`.
    fn refused(read: Read, body: &Map<String, Value>) -> anyhow::Result<Vec<String>> {
        let body = Value::Object(body.clone());
        let mut fields = Fields::of(&body)?;
        read(&mut fields);
        match fields.finish() {
            Ok(()) => Ok(Vec::new()),
            Err(ApiError::Validation(errors)) => Ok(errors.into_iter().map(|e| e.field).collect()),
            Err(other) => anyhow::bail!("not a validation error: {other}"),
        }
    }

    /// A string of `n` characters the schema's kind takes (an address for `email`).
    fn text(schema: &Value, n: usize) -> String {
        if schema["format"] == "email" {
            // A short local part and a domain of labels of at most 63 characters.
            let mut domain = String::from("com");
            while 2 + domain.len() < n {
                let room = n - 2 - domain.len() - 1;
                domain = format!("{}.{domain}", "d".repeat(room.clamp(1, 63)));
            }
            return format!("a@{domain}");
        }
        "a".repeat(n)
    }

    /// A value the schema takes.
    fn example(schema: &Value) -> Value {
        if let Some(first) = schema["enum"].as_array().and_then(|v| v.first()) {
            return first.clone();
        }
        match schema["type"].as_str() {
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            _ => json!(text(
                schema,
                schema["minLength"].as_u64().unwrap_or(1).max(8) as usize
            )),
        }
    }

    /// Whether `read` takes `body` with `field` set to `value` (no error on `field`).
    fn takes(
        read: Read,
        valid: &Map<String, Value>,
        field: &str,
        value: Value,
    ) -> anyhow::Result<bool> {
        let mut body = valid.clone();
        body.insert(field.to_owned(), value);
        Ok(!refused(read, &body)?.iter().any(|f| f == field))
    }

    #[test]
    fn every_body_schema_says_what_its_validation_takes_and_refuses() -> anyhow::Result<()> {
        for (name, read) in bodies() {
            let schema = serde_json::to_value(Fields::describe(read))?;
            let properties = schema["properties"]
                .as_object()
                .ok_or_else(|| anyhow::anyhow!("{name}: no properties"))?;
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            // The smallest valid body: its required fields, or one field when it needs one.
            let mut valid: Map<String, Value> = required
                .iter()
                .map(|f| ((*f).to_owned(), example(&properties[*f])))
                .collect();
            if schema["minProperties"] == 1 && valid.is_empty() {
                let (field, property) = properties
                    .iter()
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("{name}: empty"))?;
                valid.insert(field.clone(), example(property));
            }
            assert_eq!(
                refused(read, &valid)?,
                Vec::<String>::new(),
                "{name}: {valid:?}"
            );
            if schema["minProperties"] == 1 {
                assert!(
                    !refused(read, &Map::new())?.is_empty(),
                    "{name}: an empty body"
                );
            }
            for field in &required {
                let mut body = valid.clone();
                body.remove(*field);
                assert!(
                    refused(read, &body)?.iter().any(|f| f == field),
                    "{name}.{field} is required"
                );
            }
            for (field, p) in properties {
                let at = |n: u64| json!(text(p, n as usize));
                if let Some(max) = p["maxLength"].as_u64() {
                    assert!(
                        takes(read, &valid, field, at(max))?,
                        "{name}.{field}: {max} characters"
                    );
                    assert!(
                        !takes(read, &valid, field, at(max + 1))?,
                        "{name}.{field}: {} characters",
                        max + 1
                    );
                }
                if let Some(min) = p["minLength"].as_u64().filter(|m| *m > 0) {
                    assert!(
                        takes(
                            read,
                            &valid,
                            field,
                            at(min.max(if p["format"] == "email" { 6 } else { 0 }))
                        )?,
                        "{name}.{field}: {min}"
                    );
                    assert!(
                        !takes(read, &valid, field, at(min - 1))?,
                        "{name}.{field}: {} characters",
                        min - 1
                    );
                }
                if let Some(values) = p["enum"].as_array() {
                    for value in values {
                        assert!(
                            takes(read, &valid, field, value.clone())?,
                            "{name}.{field}: {value}"
                        );
                    }
                    assert!(
                        !takes(read, &valid, field, json!("none-of-these"))?,
                        "{name}.{field}"
                    );
                }
                match p["type"].as_str() {
                    Some("boolean") => {
                        assert!(takes(read, &valid, field, json!(false))?, "{name}.{field}");
                        assert!(!takes(read, &valid, field, json!("yes"))?, "{name}.{field}");
                    }
                    Some("array") => {
                        let items = &p["items"];
                        if let Some(values) = items["enum"].as_array() {
                            assert!(takes(read, &valid, field, json!(values))?, "{name}.{field}");
                            assert!(
                                !takes(read, &valid, field, json!(["none-of-these"]))?,
                                "{name}.{field}"
                            );
                        }
                        if let Some(max) = items["maxLength"].as_u64() {
                            assert!(
                                takes(read, &valid, field, json!([text(items, max as usize)]))?,
                                "{name}.{field}[]: {max}"
                            );
                            assert!(
                                !takes(
                                    read,
                                    &valid,
                                    field,
                                    json!([text(items, max as usize + 1)])
                                )?,
                                "{name}.{field}[]: {}",
                                max + 1
                            );
                        }
                        if let Some(max) = p["maxItems"].as_u64() {
                            let distinct =
                                |n: u64| json!((0..n).map(|i| format!("t{i}")).collect::<Vec<_>>());
                            assert!(
                                takes(read, &valid, field, distinct(max))?,
                                "{name}.{field}: {max} items"
                            );
                            assert!(
                                !takes(read, &valid, field, distinct(max + 1))?,
                                "{name}.{field}: {} items",
                                max + 1
                            );
                        }
                        assert!(
                            !takes(read, &valid, field, json!("not an array"))?,
                            "{name}.{field}"
                        );
                    }
                    Some("string") => {
                        assert!(
                            !takes(read, &valid, field, json!(12))?,
                            "{name}.{field}: a number"
                        );
                    }
                    other => anyhow::bail!("{name}.{field}: a schema of type {other:?}"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_description_has_every_command_and_its_bodies() -> anyhow::Result<()> {
        let document: Value = serde_json::from_str(&document()?)?;
        assert_eq!(document["openapi"], "3.1.0");
        let operations: usize = document["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .values()
                    .map(|p| p.as_object().map_or(0, Map::len))
                    .sum()
            })
            .unwrap_or(0);
        // 13 commands and the three ops endpoints.
        assert_eq!(operations, 16, "{}", document["paths"]);
        for (name, _) in bodies() {
            assert!(
                document["components"]["schemas"][name].is_object(),
                "{name}"
            );
        }
        let create = &document["paths"]["/v1/news"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/CreateNews"
        );
        assert_eq!(
            create["responses"]["422"]["$ref"],
            "#/components/responses/Problem"
        );
        Ok(())
    }
}
