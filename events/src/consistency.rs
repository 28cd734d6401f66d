//! Consistency tokens: the log positions a command wrote, handed back by clients so that
//! the query side answers only from read models that include them.
//!
//! Format (opaque to clients, URL-safe): `v1.` followed by `-`-separated entries
//! `<stream>~<partition>~<offset>`, where `stream` is the topic name without the
//! deployment prefix (`users`, `news`, `reads`), and `offset` is the offset of the last
//! record written to that partition.

use std::collections::BTreeMap;

/// One position in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Partition of the topic.
    pub partition: i32,
    /// Offset of the record within the partition.
    pub offset: i64,
}

/// The positions a request wrote, per stream and partition (highest offset kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsistencyToken {
    positions: BTreeMap<(String, i32), i64>,
}

/// A token the server did not issue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed consistency token")]
pub struct MalformedToken;

const PREFIX: &str = "v1.";

impl ConsistencyToken {
    /// Records that `stream` holds a write at `position`.
    pub fn add(&mut self, stream: &str, position: Position) {
        let entry = self
            .positions
            .entry((stream.to_owned(), position.partition))
            .or_insert(position.offset);
        *entry = (*entry).max(position.offset);
    }

    /// Every `(stream, partition, offset)` the token names.
    pub fn positions(&self) -> impl Iterator<Item = (&str, Position)> {
        self.positions.iter().map(|((s, p), o)| {
            (
                s.as_str(),
                Position {
                    partition: *p,
                    offset: *o,
                },
            )
        })
    }

    /// Parses a token as issued by [`ConsistencyToken::to_string`].
    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let body = text.strip_prefix(PREFIX).ok_or(MalformedToken)?;
        let mut token = ConsistencyToken::default();
        for entry in body.split('-') {
            let mut parts = entry.split('~');
            let (Some(stream), Some(partition), Some(offset), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(MalformedToken);
            };
            let valid_stream = !stream.is_empty()
                && stream
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            let partition: i32 = partition.parse().map_err(|_| MalformedToken)?;
            let offset: i64 = offset.parse().map_err(|_| MalformedToken)?;
            if !valid_stream || partition < 0 || offset < 0 {
                return Err(MalformedToken);
            }
            token.add(stream, Position { partition, offset });
        }
        Ok(token)
    }
}

impl std::fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(PREFIX)?;
        for (i, ((stream, partition), offset)) in self.positions.iter().enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            write!(f, "{stream}~{partition}~{offset}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_survives_its_text_form() {
        let mut token = ConsistencyToken::default();
        token.add(
            "users",
            Position {
                partition: 2,
                offset: 41,
            },
        );
        token.add(
            "users",
            Position {
                partition: 2,
                offset: 7,
            },
        );
        token.add(
            "news",
            Position {
                partition: 0,
                offset: 3,
            },
        );
        let text = token.to_string();
        assert_eq!(text, "v1.news~0~3-users~2~41");
        assert_eq!(ConsistencyToken::parse(&text), Ok(token));
    }

    #[test]
    fn tokens_the_server_did_not_issue_are_refused() {
        for bad in [
            "",
            "v1.",
            "v2.users~0~1",
            "v1.users~0",
            "v1.users~x~1",
            "v1.Users~0~1",
            "v1.users~0~-1",
            "v1.users~0~1~2",
        ] {
            assert_eq!(ConsistencyToken::parse(bad), Err(MalformedToken), "{bad}");
        }
    }
}
