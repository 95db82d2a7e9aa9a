//! Resource and page URLs, absolute like the hosted API's, with keys percent-encoded.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::state::AppState;

/// The API's path prefix.
pub const PREFIX: &str = "/v1/Services/default";

/// Everything but RFC 3986 unreserved characters is encoded, so a key with `/`, `?`, `#`, `%`
/// or spaces stays one path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Builds absolute URLs for the host the client addressed (its `Host` header), or the bound
/// address when the header is missing or not a plain host name.
#[derive(Debug, Clone)]
pub struct Urls {
    base: String,
}

impl Urls {
    /// URLs under `http://{authority}`.
    pub fn new(authority: &str) -> Self {
        Urls {
            base: format!("http://{authority}{PREFIX}"),
        }
    }

    /// The list of maps.
    pub fn maps(&self) -> String {
        format!("{}/Maps", self.base)
    }

    /// A map.
    pub fn map(&self, sid: &str) -> String {
        format!("{}/Maps/{}", self.base, encode_segment(sid))
    }

    /// A map's items.
    pub fn items(&self, sid: &str) -> String {
        format!("{}/Items", self.map(sid))
    }

    /// A map's events.
    pub fn events(&self, sid: &str) -> String {
        format!("{}/Events", self.map(sid))
    }

    /// An item.
    pub fn item(&self, sid: &str, key: &str) -> String {
        format!("{}/{}", self.items(sid), encode_segment(key))
    }
}

/// Whether a `Host` value is safe to reflect into URLs: host name, IPv4, `[IPv6]`, port.
fn plausible_authority(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

impl FromRequestParts<AppState> for Urls {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| plausible_authority(h));
        Ok(match host {
            Some(h) => Urls::new(h),
            None => Urls::new(&state.http_addr().to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_one_segment() {
        let u = Urls::new("127.0.0.1:7700");
        assert_eq!(
            u.item("MP00", "a/b:c d?é%"),
            "http://127.0.0.1:7700/v1/Services/default/Maps/MP00/Items/a%2Fb%3Ac%20d%3F%C3%A9%25"
        );
        assert!(plausible_authority("[::1]:80"));
        assert!(!plausible_authority("evil/path"));
    }
}
