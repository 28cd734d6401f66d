//! Turning JSON bodies into validated input, collecting every invalid field at once.

use newsroom_infra::http::{ApiError, FieldError};
use serde_json::{Map, Value};

/// Collects field errors while reading a JSON object.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    /// Starts reading `body`, which must be a JSON object.
    pub fn of(body: &'a Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(object) => Ok(Fields {
                object,
                errors: Vec::new(),
            }),
            _ => Err(ApiError::Malformed("the body must be a JSON object".into())),
        }
    }

    /// A required string, trimmed, whose length in characters is within `min..=max`.
    pub fn trimmed_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        let raw = self.raw_string(field)?;
        let trimmed = raw.trim();
        self.check_length(field, trimmed, min, max)
            .then(|| trimmed.to_owned())
    }

    /// A required string taken as is (passwords: spaces count), length within `min..=max`.
    pub fn exact_string(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        let raw = self.raw_string(field)?;
        self.check_length(field, raw, min, max)
            .then(|| raw.to_owned())
    }

    /// A required e-mail address (trimmed).
    pub fn email(&mut self, field: &str) -> Option<String> {
        let raw = self.raw_string(field)?;
        let email = raw.trim();
        if email.len() > 254 {
            self.error(field, "must be at most 254 characters");
            return None;
        }
        if !is_valid_email(email) {
            self.error(field, "must be a valid e-mail address");
            return None;
        }
        Some(email.to_owned())
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

    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }
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
