//! Retrying a step that may fail for a moment.

use std::time::Duration;

/// Runs `attempt` until it succeeds, at most six times, waiting 100 ms more before each
/// retry (1.5 s in all); the last error, with `what` as its context, if none succeeds.
/// For steps that fail for a moment: processes starting together racing to create the
/// same registry subjects (some registries answer one of them 409 meanwhile), a store
/// that drops a connection.
pub async fn with_retries<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::debug!(what, error = format!("{e:#}"), "a step failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(e) => return Err(e.context(what.to_owned())),
        }
    }
}
