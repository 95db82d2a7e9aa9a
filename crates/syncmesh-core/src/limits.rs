//! The limits of the Sync Maps API and the validation of every input against them.

use crate::error::{Error, Result};
use crate::ids::MapSid;
use crate::JsonObject;

/// Largest item data, serialized as UTF-8 JSON.
pub const MAX_DATA_BYTES: usize = 16 * 1024;
/// Longest item key, in characters.
pub const MAX_KEY_CHARS: usize = 320;
/// Longest unique name, in characters.
pub const MAX_NAME_CHARS: usize = 320;
/// Largest TTL in seconds (365 days); 0 means no expiry.
pub const MAX_TTL_SECS: i64 = 31_536_000;
/// Largest page of a listing.
pub const MAX_PAGE_SIZE: i64 = 100;
/// Page size when none is given.
pub const DEFAULT_PAGE_SIZE: usize = 50;

/// Checks an item key: 1 to 320 characters, any characters at all.
pub fn validate_key(key: &str) -> Result<()> {
    let n = key.chars().count();
    if n == 0 {
        return Err(Error::InvalidKey("a key must not be empty".into()));
    }
    if n > MAX_KEY_CHARS {
        return Err(Error::InvalidKey(format!(
            "a key is at most {MAX_KEY_CHARS} characters; this one has {n}"
        )));
    }
    if is_dot_segment(key) {
        return Err(Error::InvalidKey(format!(
            "{key:?} cannot be a key: URLs resolve it away, so no HTTP client could address it"
        )));
    }
    Ok(())
}

/// `.` and `..` are removed from URL paths by every URL parser (also percent-encoded), so an
/// item or map so named could never be reached through the REST API.
fn is_dot_segment(s: &str) -> bool {
    s == "." || s == ".."
}

/// Checks a unique name: 1 to 320 characters and never shaped like a map sid.
pub fn validate_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    if n == 0 {
        return Err(Error::InvalidName("a unique name must not be empty".into()));
    }
    if n > MAX_NAME_CHARS {
        return Err(Error::InvalidName(format!(
            "a unique name is at most {MAX_NAME_CHARS} characters; this one has {n}"
        )));
    }
    if is_dot_segment(name) {
        return Err(Error::InvalidName(format!(
            "{name:?} cannot be a unique name: URLs resolve it away, so no HTTP client could address it"
        )));
    }
    if MapSid::looks_like_sid(name) {
        return Err(Error::InvalidName(format!(
            "{name:?} is shaped like a map sid (MP + 32 hex digits); choose another name"
        )));
    }
    Ok(())
}

/// Checks item data against the size limit and returns its serialized size.
pub fn validate_data(data: &JsonObject) -> Result<usize> {
    let size = serialized_len(data);
    if size > MAX_DATA_BYTES {
        return Err(Error::DataTooLarge { size });
    }
    Ok(size)
}

/// Parses item data from JSON text: it must be an object within the size limit.
pub fn parse_data(text: &str) -> Result<JsonObject> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidData(format!("not valid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(map) => {
            validate_data(&map)?;
            Ok(map)
        }
        other => Err(Error::InvalidData(format!(
            "expected a JSON object, got {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A validated time-to-live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ttl(u32);

impl Ttl {
    /// Validates seconds in 0..=31,536,000; 0 means "never expires".
    pub fn from_secs(secs: i64) -> Result<Ttl> {
        if (0..=MAX_TTL_SECS).contains(&secs) {
            Ok(Ttl(secs as u32))
        } else {
            Err(Error::InvalidTtl(secs))
        }
    }

    /// The TTL in seconds.
    pub fn secs(self) -> u32 {
        self.0
    }

    /// The expiry instant for a write at `now`, or `None` for a TTL of 0.
    pub fn expires_at(self, now: crate::Timestamp) -> Option<crate::Timestamp> {
        (self.0 > 0).then(|| now.plus_millis(i64::from(self.0) * 1000))
    }
}

/// Checks a requested page size (1..=100).
pub fn validate_page_size(size: i64) -> Result<usize> {
    if (1..=MAX_PAGE_SIZE).contains(&size) {
        Ok(size as usize)
    } else {
        Err(Error::InvalidPageSize(size))
    }
}

/// Length of the compact JSON serialization, without building the string.
pub(crate) fn serialized_len(data: &JsonObject) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    // Writing to a counter cannot fail and a Map always serializes.
    let _ = serde_json::to_writer(&mut c, data);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys() {
        assert!(validate_key("").is_err());
        assert!(validate_key("a").is_ok());
        assert!(validate_key("path/with:colons and spaces ü 🎉").is_ok());
        assert!(validate_key(&"é".repeat(320)).is_ok());
        assert_eq!(validate_key(&"x".repeat(321)).unwrap_err().code(), 54209);
        assert!(validate_key("\0nul").is_ok());
        assert_eq!(validate_key(".").unwrap_err().code(), 54209);
        assert_eq!(validate_key("..").unwrap_err().code(), 54209);
        assert!(validate_key("...").is_ok());
    }

    #[test]
    fn names() {
        assert!(validate_name("users").is_ok());
        assert_eq!(validate_name("").unwrap_err().code(), 54302);
        assert!(validate_name(&"n".repeat(320)).is_ok());
        assert!(validate_name(&"n".repeat(321)).is_err());
        let sid_like = format!("MP{}", "0123456789abcdef0123456789abcdef");
        assert_eq!(validate_name(&sid_like).unwrap_err().code(), 54302);
        assert!(validate_name("MPnot-a-sid").is_ok());
        assert_eq!(validate_name("..").unwrap_err().code(), 54302);
    }

    #[test]
    fn ttls() {
        assert!(Ttl::from_secs(0).is_ok());
        assert!(Ttl::from_secs(MAX_TTL_SECS).is_ok());
        assert_eq!(Ttl::from_secs(-1).unwrap_err().code(), 54011);
        assert!(Ttl::from_secs(MAX_TTL_SECS + 1).is_err());
        let now = crate::Timestamp::from_millis(1_000);
        assert_eq!(Ttl::from_secs(0).unwrap().expires_at(now), None);
        assert_eq!(
            Ttl::from_secs(2).unwrap().expires_at(now),
            Some(crate::Timestamp::from_millis(3_000))
        );
    }

    #[test]
    fn data() {
        assert!(parse_data(r#"{"a":1}"#).is_ok());
        assert_eq!(parse_data("null").unwrap_err().code(), 54206);
        assert_eq!(parse_data("[1]").unwrap_err().code(), 54206);
        assert_eq!(parse_data("{bad").unwrap_err().code(), 54206);
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_DATA_BYTES));
        assert_eq!(parse_data(&big).unwrap_err().code(), 54006);
        // exactly at the limit is allowed
        let overhead = r#"{"a":""}"#.len();
        let exact = json!({ "a": "x".repeat(MAX_DATA_BYTES - overhead) });
        let exact = exact.as_object().unwrap();
        assert_eq!(serialized_len(exact), MAX_DATA_BYTES);
        assert!(validate_data(exact).is_ok());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(validate_page_size(1).unwrap(), 1);
        assert_eq!(validate_page_size(100).unwrap(), 100);
        assert_eq!(validate_page_size(0).unwrap_err().code(), 54455);
        assert!(validate_page_size(101).is_err());
    }
}
