//! HTTP handlers of the command API.

pub mod users;

use newsroom_events::consistency::{ConsistencyToken, Position};
use newsroom_infra::kafka::Stream;

use crate::log::AppendError;
use newsroom_infra::http::ApiError;

/// The `X-Consistency-Token` header.
pub const X_CONSISTENCY_TOKEN: &str = "x-consistency-token";

/// The token naming every position a command wrote.
pub fn token_for(positions: &[(Stream, Position)]) -> String {
    let mut token = ConsistencyToken::default();
    for (stream, position) in positions {
        token.add(stream.name(), *position);
    }
    token.to_string()
}

impl From<AppendError> for ApiError {
    fn from(err: AppendError) -> Self {
        match err {
            AppendError::Unavailable(why) => ApiError::Unavailable(format!(
                "the event log is unavailable ({why}); nothing was written"
            )),
        }
    }
}
