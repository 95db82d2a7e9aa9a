//! The engine's error type, with the Sync Maps code and HTTP status of every variant.

use crate::limits;

/// Everything an engine operation can refuse, each with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No live map has this sid or unique name.
    #[error("map not found: {0}")]
    MapNotFound(String),
    /// The map was removed (or expired); it accepts no writes until it is created again.
    #[error("map {0} has been removed; create it again to write to it")]
    MapRemoved(String),
    /// `create_new` was asked for a unique name this replica already holds.
    #[error("a map with unique name {0:?} already exists")]
    MapNameTaken(String),
    /// No item has this key (or it has expired).
    #[error("item not found: {0:?}")]
    ItemNotFound(String),
    /// A create-only write found the key already present.
    #[error("item {0:?} already exists")]
    ItemExists(String),
    /// The conditional write's revision is not the item's current one.
    #[error("revision mismatch for item {key:?}: expected {expected}, {}", now_text(.current))]
    RevisionMismatch {
        /// The item's key.
        key: String,
        /// The revision the caller gave (If-Match).
        expected: String,
        /// The revision the item has now (empty when the item is absent).
        current: String,
    },
    /// Item data must be a JSON object.
    #[error("item data must be a JSON object: {0}")]
    InvalidData(String),
    /// The item data, serialized as UTF-8 JSON, is over the limit.
    #[error(
        "item data is {size} bytes; the limit is {} bytes",
        limits::MAX_DATA_BYTES
    )]
    DataTooLarge {
        /// Serialized size of the refused data.
        size: usize,
    },
    /// The item key is empty or too long.
    #[error("invalid item key: {0}")]
    InvalidKey(String),
    /// The unique name is empty, too long, or shaped like a sid.
    #[error("invalid unique name: {0}")]
    InvalidName(String),
    /// The TTL is outside 0..=31,536,000 seconds.
    #[error("invalid TTL {0}: must be whole seconds from 0 to {max}", max = limits::MAX_TTL_SECS)]
    InvalidTtl(i64),
    /// The page size is outside 1..=100.
    #[error("invalid page size {0}: must be from 1 to {max}", max = limits::MAX_PAGE_SIZE)]
    InvalidPageSize(i64),
    /// The page token is not one this engine produced.
    #[error("invalid page token")]
    InvalidPageToken,
    /// A change from a peer could not be decoded or applied; nothing was applied.
    #[error("invalid change from a peer: {0}")]
    InvalidChange(String),
    /// Stored map state could not be decoded.
    #[error("corrupt map state: {0}")]
    Corrupt(String),
    /// This node may not do that to the map (its permissions do not allow it).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A permission entry names an invalid identity, or the map has too many entries.
    #[error("invalid permission: {0}")]
    InvalidPermission(String),
    /// The identity has no permission entry on the map.
    #[error("no permission entry for identity {0:?}")]
    PermissionNotFound(String),
}

/// Shorthand for results of engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The Sync Maps error code (the `code` field of a REST error body).
    pub fn code(&self) -> u32 {
        match self {
            Error::MapNotFound(_) | Error::MapRemoved(_) => 54200,
            Error::ItemNotFound(_) => 54201,
            Error::RevisionMismatch { .. } => 54205,
            Error::InvalidData(_) => 54206,
            Error::ItemExists(_) => 54208,
            Error::InvalidKey(_) => 54209,
            Error::MapNameTaken(_) => 54301,
            Error::InvalidName(_) => 54302,
            Error::DataTooLarge { .. } => 54006,
            Error::InvalidTtl(_) => 54011,
            Error::InvalidPageSize(_) | Error::InvalidPageToken => 54455,
            Error::InvalidChange(_) => 54007,
            Error::Corrupt(_) => 20500,
            Error::PermissionDenied(_) => 20403,
            Error::InvalidPermission(_) => 20001,
            Error::PermissionNotFound(_) => 20404,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_reference() {
        // (Every variant with its HTTP status: syncmesh-server's error.rs.)
        let e = |s: &str| s.to_string();
        let codes = [
            (Error::MapNotFound(e("m")).code(), 54200),
            (Error::MapRemoved(e("m")).code(), 54200),
            (Error::ItemNotFound(e("k")).code(), 54201),
            (Error::InvalidData(e("x")).code(), 54206),
            (Error::ItemExists(e("k")).code(), 54208),
            (Error::InvalidKey(e("k")).code(), 54209),
            (Error::MapNameTaken(e("n")).code(), 54301),
            (Error::InvalidName(e("n")).code(), 54302),
            (Error::DataTooLarge { size: 20000 }.code(), 54006),
            (Error::InvalidTtl(-1).code(), 54011),
            (Error::InvalidPageSize(0).code(), 54455),
        ];
        for (i, (got, want)) in codes.iter().enumerate() {
            assert_eq!(got, want, "row {i}");
        }
    }
}

/// How [`Error::RevisionMismatch`] states the item's revision now.
fn now_text(current: &str) -> String {
    if current.is_empty() {
        "but the item does not exist".to_string()
    } else {
        format!("current is {current}")
    }
}

#[cfg(test)]
mod mismatch_text {
    use super::*;

    #[test]
    fn a_missing_item_is_said_so() {
        let e = Error::RevisionMismatch {
            key: "k".into(),
            expected: "r1".into(),
            current: String::new(),
        };
        assert!(
            e.to_string().ends_with("but the item does not exist"),
            "{e}"
        );
        let e = Error::RevisionMismatch {
            key: "k".into(),
            expected: "r1".into(),
            current: "r2".into(),
        };
        assert!(e.to_string().ends_with("current is r2"), "{e}");
    }
}
