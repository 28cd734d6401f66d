//! Turning JSON bodies into validated input, collecting every invalid field at once.
//!
//! The same reading code also describes the body: [`Fields::describe`] runs it over no
//! input and records the JSON Schema of every field it reads, so that the OpenAPI
//! description of a request body is the validation itself.

use newsroom_infra::http::{ApiError, FieldError};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};

/// Collects field errors while reading a JSON object.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
    errors: Vec<FieldError>,
    /// When describing: the schema of the body so far, and the fields in it.
    described: Option<(ObjectBuilder, Vec<String>)>,
}

/// The empty object a description reads.
static NOTHING: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl<'a> Fields<'a> {
    /// Starts reading `body`, which must be a JSON object.
    pub fn of(body: &'a Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(object) => Ok(Fields {
                object,
                errors: Vec::new(),
                described: None,
            }),
            _ => Err(ApiError::Malformed("the body must be a JSON object".into())),
        }
    }

    /// The JSON Schema of the body that `read` reads: every field it asks for, with its
    /// type and limits, required unless read as optional.
    pub fn describe(read: impl FnOnce(&mut Fields<'_>)) -> Schema {
        let mut fields = Fields {
            object: &NOTHING,
            errors: Vec::new(),
            described: Some((ObjectBuilder::new().schema_type(Type::Object), Vec::new())),
        };
        read(&mut fields);
        Schema::Object(fields.described.unwrap_or_default().0.build())
    }

    /// Records `field` in the description, if describing (the first reading counts).
    fn note(&mut self, field: &str, required: bool, schema: impl Into<RefOr<Schema>>) {
        let Some((object, noted)) = self.described.take() else {
            return;
        };
        if noted.iter().any(|f| f == field) {
            self.described = Some((object, noted));
            return;
        }
        let object = object.property(field, schema);
        let object = if required {
            object.required(field)
        } else {
            object
        };
        let mut noted = noted;
        noted.push(field.to_owned());
        self.described = Some((object, noted));
    }

    /// A required string, trimmed, whose length in characters is within `min..=max`.
    /// A one-line text: no control characters at all.
    pub fn trimmed_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        self.note(field, true, text(min, max));
        let raw = self.raw_string(field)?;
        let trimmed = raw.trim();
        (self.check_length(field, trimmed, min, max) && self.check_controls(field, trimmed, ""))
            .then(|| trimmed.to_owned())
    }

    /// A required text taken as is (contents: lines), length within `min..=max`; tabs and
    /// line breaks are the only control characters allowed.
    pub fn exact_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        self.note(field, true, text(min, max));
        let raw = self.raw_string(field)?;
        (self.check_length(field, raw, min, max) && self.check_controls(field, raw, "\t\n\r"))
            .then(|| raw.to_owned())
    }

    /// A required secret taken as is, any character counting (a password is only ever
    /// hashed; one set before control characters were refused must still log in).
    pub fn secret_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        self.note(field, true, text(min, max));
        let raw = self.raw_string(field)?;
        self.check_length(field, raw, min, max)
            .then(|| raw.to_owned())
    }

    /// A required e-mail address (trimmed).
    pub fn email(&mut self, field: &str) -> Option<String> {
        self.note(field, true, email_schema());
        let raw = self.raw_string(field)?;
        let email = raw.trim();
        if email.len() > MAX_EMAIL {
            self.error(field, format!("must be at most {MAX_EMAIL} characters"));
            return None;
        }
        if !is_valid_email(email) {
            self.error(field, "must be a valid e-mail address");
            return None;
        }
        Some(email.to_owned())
    }

    /// Whether the body has `field` (null counts as absent).
    pub fn has(&self, field: &str) -> bool {
        self.object.get(field).is_some_and(|v| !v.is_null())
    }

    /// An optional trimmed string (absent or null: `None`).
    pub fn optional_trimmed_string(
        &mut self,
        field: &str,
        min: usize,
        max: usize,
    ) -> Option<String> {
        self.note(field, false, text(min, max));
        if !self.has(field) {
            return None;
        }
        self.trimmed_string(field, min, max)
    }

    /// An optional text taken as is (see [`Fields::exact_string`]).
    pub fn optional_exact_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        self.note(field, false, text(min, max));
        if !self.has(field) {
            return None;
        }
        self.exact_string(field, min, max)
    }

    /// An optional e-mail address.
    pub fn optional_email(&mut self, field: &str) -> Option<String> {
        self.note(field, false, email_schema());
        if !self.has(field) {
            return None;
        }
        self.email(field)
    }

    /// An optional boolean.
    pub fn optional_bool(&mut self, field: &str) -> Option<bool> {
        self.note(
            field,
            false,
            ObjectBuilder::new().schema_type(Type::Boolean),
        );
        match self.object.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.error(field, "must be true or false");
                None
            }
        }
    }

    /// A required value of a fixed set (`parse` gives `None` for the others).
    pub fn one_of<T>(
        &mut self,
        field: &str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        self.note(field, true, choice(allowed, &parse));
        let raw = self.raw_string(field)?;
        let parsed = parse(raw);
        if parsed.is_none() {
            self.error(field, format!("must be one of {allowed}"));
        }
        parsed
    }

    /// An optional value of a fixed set.
    pub fn optional_one_of<T>(
        &mut self,
        field: &str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        self.note(field, false, choice(allowed, &parse));
        if !self.has(field) {
            return None;
        }
        self.one_of(field, allowed, parse)
    }

    /// An optional array of values of a fixed set, without duplicates, in canonical order.
    pub fn optional_set_of<T: Ord>(
        &mut self,
        field: &str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<Vec<T>> {
        self.note(
            field,
            false,
            ArrayBuilder::new().items(choice(allowed, &parse)),
        );
        let items = match self.object.get(field) {
            None | Some(Value::Null) => return None,
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error(field, "must be an array");
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.as_str().and_then(&parse) {
                Some(value) => out.push(value),
                None => {
                    self.error(field, format!("every item must be one of {allowed}"));
                    return None;
                }
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// Tags: an array of at most `max_items` strings, each trimmed, lower-cased and
    /// `1..=max_len` characters, duplicates removed, order kept.
    pub fn optional_tags(
        &mut self,
        field: &str,
        max_items: usize,
        max_len: usize,
    ) -> Option<Vec<String>> {
        self.note(
            field,
            false,
            ArrayBuilder::new()
                .items(text(1, max_len))
                .max_items(Some(max_items)),
        );
        let items = match self.object.get(field) {
            None | Some(Value::Null) => return None,
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error(field, "must be an array of strings");
                return None;
            }
        };
        // Bounded before anything is looked at: a 1 MiB body holds ~130,000 tags.
        if items.len() > max_items * MAX_TAG_REPEATS {
            self.error(field, format!("at most {max_items} distinct tags"));
            return None;
        }
        let mut tags: Vec<String> = Vec::with_capacity(items.len());
        for item in items {
            let Some(text) = item.as_str() else {
                self.error(field, "must be an array of strings");
                return None;
            };
            let tag = text.trim().to_lowercase();
            let chars = tag.chars().count();
            if chars == 0 || chars > max_len {
                self.error(
                    field,
                    format!("each tag must be 1 to {max_len} characters long"),
                );
                return None;
            }
            if !self.check_controls(field, &tag, "") {
                return None;
            }
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        if tags.len() > max_items {
            self.error(field, format!("at most {max_items} distinct tags"));
            return None;
        }
        Some(tags)
    }

    /// Requires at least one of `names` (present and not null); the error names `body`.
    pub fn require_any(&mut self, names: &[&str]) {
        if let Some((object, noted)) = self.described.take() {
            self.described = Some((object.min_properties(Some(1)), noted));
            return;
        }
        if !names.iter().any(|f| self.has(f)) {
            self.error("body", format!("give at least one of {}", names.join(", ")));
        }
    }

    /// Ends reading: the errors, if any, as one 422.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }

    fn raw_string(&mut self, field: &str) -> Option<&'a str> {
        match self.object.get(field) {
            None | Some(Value::Null) => {
                self.error(field, "is required");
                None
            }
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => {
                self.error(field, "must be a string");
                None
            }
        }
    }

    fn check_length(&mut self, field: &str, value: &str, min: usize, max: usize) -> bool {
        let chars = value.chars().count();
        if chars < min || chars > max {
            let message = if min == 1 && chars == 0 {
                "must not be empty".to_owned()
            } else {
                format!("must be {min} to {max} characters long")
            };
            self.error(field, message);
            return false;
        }
        true
    }

    /// Refuses control characters other than `allowed` (NUL and the like reach the log and
    /// no read model can store them).
    fn check_controls(&mut self, field: &str, value: &str, allowed: &str) -> bool {
        // Also the characters that reorder or break a line of text when shown: bidi
        // overrides and isolates, line and paragraph separators.
        let hostile = |c: char| {
            (c.is_control() && !allowed.contains(c))
                || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
                || (allowed.is_empty() && matches!(c, '\u{2028}' | '\u{2029}'))
        };
        if value.chars().any(hostile) {
            let message = if allowed.is_empty() {
                "must not contain control characters"
            } else {
                "must not contain control characters other than tabs and line breaks"
            };
            self.error(field, message);
            return false;
        }
        true
    }

    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }
}

/// How many times the tag limit a tag list may hold before duplicates are removed.
const MAX_TAG_REPEATS: usize = 5;

/// The longest e-mail address taken.
const MAX_EMAIL: usize = 254;

/// A string of `min..=max` characters.
fn text(min: usize, max: usize) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
}

/// An e-mail address.
fn email_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
        .max_length(Some(MAX_EMAIL))
}

/// One of the values listed in `allowed` (`a, b, c`) that `parse` takes.
fn choice<T>(allowed: &str, parse: impl Fn(&str) -> Option<T>) -> ObjectBuilder {
    let values: Vec<&str> = allowed
        .split(", ")
        .filter(|value| parse(value).is_some())
        .collect();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
}

/// A pragmatic check of an addr-spec: `local@domain`, a dot-separated domain of letters,
/// digits and hyphens with a top-level label of two or more letters, no spaces or controls.
pub fn is_valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    let local_ok = (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || "!#$%&'*+/=?^_`{|}~.-".contains(c)
                || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
        });
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && domain_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plausible_addresses_are_accepted() {
        for ok in [
            "a@b.co",
            "first.last+tag@example.com",
            "x_y@sub.domain.org",
            "Ünï@example.de",
        ] {
            assert!(is_valid_email(ok), "{ok}");
        }
    }

    #[test]
    fn implausible_addresses_are_refused() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a b@example.com",
            "a@-x.com",
            "a@x.c0m",
            "a..b@x.com",
            ".a@x.com",
            "a@x..com",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn control_characters_are_refused_except_line_breaks_in_texts() {
        let body = json!({
            "title": "a\u{0}b",
            "name": "x\u{1b}[31m",
            "bidi": "abc\u{202E}gpj.exe",
            "password": "pass\u{7f}word",
            "content": "line one\r\n\tline two",
            "bad_content": "nul\u{0}",
            "tags": ["ok", "b\u{7}ell"],
        });
        let mut fields = Fields::of(&body).expect("an object");
        assert_eq!(fields.trimmed_string("title", 1, 200), None);
        assert_eq!(fields.trimmed_string("name", 1, 100), None);
        assert_eq!(fields.trimmed_string("bidi", 1, 100), None);
        assert!(fields.secret_string("password", 8, 128).is_some());
        assert!(fields.exact_string("content", 1, 100).is_some());
        assert_eq!(fields.exact_string("bad_content", 1, 100), None);
        assert_eq!(fields.optional_tags("tags", 20, 50), None);
        let Err(ApiError::Validation(errors)) = fields.finish() else {
            panic!("refused");
        };
        let named: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(named, ["title", "name", "bidi", "bad_content", "tags"]);
    }

    #[test]
    fn a_huge_tag_list_is_refused_before_it_is_read() {
        let body = json!({"tags": vec!["same"; 20 * MAX_TAG_REPEATS + 1]});
        let mut fields = Fields::of(&body).expect("an object");
        assert_eq!(fields.optional_tags("tags", 20, 50), None);
        let body = json!({"tags": vec!["same"; 20 * MAX_TAG_REPEATS]});
        let mut fields = Fields::of(&body).expect("an object");
        assert_eq!(
            fields.optional_tags("tags", 20, 50),
            Some(vec!["same".to_owned()])
        );
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let body = json!({"name": "  ", "email": 3, "password": "short"});
        let mut fields = Fields::of(&body).expect("an object");
        assert_eq!(fields.trimmed_string("name", 1, 100), None);
        assert_eq!(fields.email("email"), None);
        assert_eq!(fields.exact_string("password", 8, 128), None);
        assert_eq!(fields.email("missing"), None);
        let Err(ApiError::Validation(errors)) = fields.finish() else {
            panic!("expected a validation error");
        };
        let names: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(names, ["name", "email", "password", "missing"]);
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let body = json!({"name": "é".repeat(100)});
        let mut fields = Fields::of(&body).expect("an object");
        assert_eq!(
            fields
                .trimmed_string("name", 1, 100)
                .map(|n| n.chars().count()),
            Some(100)
        );
        assert!(fields.finish().is_ok());
    }
}
