//! Identifiers and time: node ids, map sids, revisions, timestamps.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Milliseconds since the Unix epoch. The engine never reads a clock: callers pass `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// This instant moved by `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// The identity of a replica (a node): 16 bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A node id from bytes, if there are exactly 16 of them.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(NodeId)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// A map's system id: `MP` followed by 32 lowercase hex digits.
///
/// A named map's sid is derived from its unique name, so two replicas that create the same
/// name while apart create the same map and merge it when they meet.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MapSid(String);

impl MapSid {
    /// The sid of the map with this unique name.
    pub fn for_name(name: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"syncmesh/map-name/v1\0");
        h.update(name.as_bytes());
        let digest = h.finalize();
        MapSid(format!("MP{}", hex::encode(&digest[..16])))
    }

    /// A sid for an unnamed map from 16 random bytes supplied by the caller.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        MapSid(format!("MP{}", hex::encode(bytes)))
    }

    /// Parses a sid, if `s` has the sid shape.
    pub fn parse(s: &str) -> Option<Self> {
        Self::looks_like_sid(s).then(|| MapSid(s.to_ascii_lowercase().replacen("mp", "MP", 1)))
    }

    /// Whether `s` is shaped like a sid (`MP` + 32 hex digits, any case).
    pub fn looks_like_sid(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 34
            && b[..2].eq_ignore_ascii_case(b"MP")
            && b[2..].iter().all(u8::is_ascii_hexdigit)
    }

    /// The sid as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MapSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MapSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MapSid({})", self.0)
    }
}

/// An opaque item or map revision: 16 hex digits.
///
/// It is a hash of the item's current write stamps (all of them, when concurrent writes
/// conflict), so it changes on every change and is identical on replicas holding the same
/// changes.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Revision(String);

impl Revision {
    pub(crate) fn from_hash(h: u64) -> Self {
        Revision(format!("{h:016x}"))
    }

    /// A revision given by a client (If-Match / ETag): surrounding quotes are dropped; the
    /// rest is compared as is. A weak tag (`W/"..."`) is kept whole, so it matches no
    /// revision: `If-Match` compares strongly (RFC 9110, 13.1.1).
    pub fn from_client(s: impl Into<String>) -> Self {
        let s = s.into();
        let t = s.trim();
        if t.starts_with("W/") {
            return Revision(t.to_string());
        }
        let t = t
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(t);
        Revision(t.to_string())
    }

    /// The revision as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revision({})", self.0)
    }
}

/// A stable 64-bit hash of byte strings (the first 8 bytes of SHA-256).
pub(crate) fn hash64<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids() {
        let a = MapSid::for_name("users");
        assert_eq!(a, MapSid::for_name("users"));
        assert_ne!(a, MapSid::for_name("users2"));
        assert!(MapSid::looks_like_sid(a.as_str()));
        assert_eq!(MapSid::parse(a.as_str()), Some(a.clone()));
        assert_eq!(MapSid::parse(&a.as_str().to_uppercase()), Some(a));
        assert!(MapSid::parse("users").is_none());
        let r = MapSid::from_random([7; 16]);
        assert_eq!(r.as_str(), format!("MP{}", "07".repeat(16)));
    }

    #[test]
    fn revisions_compare_as_text() {
        assert_eq!(
            Revision::from_client("\"00ff\""),
            Revision::from_client("00ff")
        );
        assert_ne!(
            Revision::from_client("W/\"00ff\""),
            Revision::from_client("00ff"),
            "a weak tag never matches"
        );
        assert_eq!(Revision::from_hash(255).as_str(), "00000000000000ff");
    }

    #[test]
    fn sid_shape_check_never_panics_on_multibyte_text() {
        let name = format!("日{}", "a".repeat(31));
        assert_eq!(name.len(), 34);
        assert!(!MapSid::looks_like_sid(&name));
        assert!(!MapSid::looks_like_sid("é"));
    }
}
