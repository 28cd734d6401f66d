//! HTTP handlers of the query API.

pub mod news;
pub mod users;
