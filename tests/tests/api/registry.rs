//! The registry holds newsroom's subjects to BACKWARD_TRANSITIVE compatibility.

use newsroom_events::Event as _;
use newsroom_events::users::UserRegistered;
use newsroom_infra::registry::{COMPATIBILITY, Registry};
use newsroom_tests::TestApp;
use serde_json::{Value, json};

#[tokio::test]
async fn a_schema_change_that_cannot_read_old_events_is_refused_by_the_registry()
-> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let base = &app.settings.registry.url;
    let subject = UserRegistered::FULL_NAME;
    let _registry = Registry::connect(&app.settings.registry).await?;
    let config: Value = app
        .http
        .get(format!("{base}/config/{subject}"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(config["compatibilityLevel"], COMPATIBILITY);

    let mut breaking: Value = serde_json::from_str(UserRegistered::SCHEMA)?;
    let fields = breaking["fields"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no fields"))?;
    fields.push(json!({"name": "required_without_default", "type": "string"}));
    let mut compatible: Value = serde_json::from_str(UserRegistered::SCHEMA)?;
    let fields = compatible["fields"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no fields"))?;
    fields.push(
        json!({"name": "optional_with_default", "type": ["null", "string"], "default": null}),
    );

    let check = |schema: &Value| {
        app.http
            .post(format!(
                "{base}/compatibility/subjects/{subject}/versions/latest"
            ))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({"schema": schema.to_string()}))
            .send()
    };
    let refused: Value = check(&breaking).await?.json().await?;
    let accepted: Value = check(&compatible).await?.json().await?;

    assert_eq!(refused["is_compatible"], false, "{refused}");
    assert_eq!(accepted["is_compatible"], true, "{accepted}");
    app.stop().await
}
