//! Per-map permissions, in the Sync Maps shape (`Read`, `Write`, `Manage` per identity), kept
//! in the map document so they travel with the map and every node holding it enforces the same
//! rules. An identity is a node's peer id.
//!
//! A map with no entries is open: every peer this node trusts may read, write and manage it.
//! Once it has entries, only the listed identities receive it, only those with `Write` may
//! change its items and properties, and only those with `Manage` may change its permissions or
//! remove it. Each entry is one root slot of the map document, `p:<identity>`, holding the
//! flags, so concurrent changes of different identities merge and of one identity converge to
//! one winner.

use std::collections::BTreeMap;

/// May receive the map.
pub const READ: u8 = 1;
/// May change its items and properties.
pub const WRITE: u8 = 2;
/// May change its permissions and remove it.
pub const MANAGE: u8 = 4;
/// The map-document slot prefix of a permission entry.
pub const PREFIX: &str = "p:";
/// Most permission entries one map may have.
pub const MAX_ENTRIES: usize = 1024;
/// Longest identity.
pub const MAX_IDENTITY: usize = 128;

/// One identity's permissions on a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// Who (a peer id).
    pub identity: String,
    /// May receive the map (subscribe and query).
    pub read: bool,
    /// May change its items.
    pub write: bool,
    /// May change its permissions and remove it.
    pub manage: bool,
}

impl Permission {
    /// The entry's flags.
    pub fn flags(&self) -> u8 {
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        bit(self.read, READ) | bit(self.write, WRITE) | bit(self.manage, MANAGE)
    }

    fn from_flags(identity: &str, f: u8) -> Permission {
        Permission {
            identity: identity.to_string(),
            read: f & READ != 0,
            write: f & WRITE != 0,
            manage: f & MANAGE != 0,
        }
    }
}

/// Whether `s` can be an identity: 1 to [`MAX_IDENTITY`] characters of `[A-Za-z0-9._-]`
/// (every peer id qualifies).
pub fn valid_identity(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENTITY
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The identity a map-document slot holds the permissions of, if it is a permission slot.
pub fn identity_of_slot(slot: &str) -> Option<&str> {
    slot.strip_prefix(PREFIX).filter(|id| valid_identity(id))
}

/// A map's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    entries: BTreeMap<String, u8>,
}

impl Policy {
    /// A policy from `(identity, flags)` entries.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, u8)>) -> Policy {
        Policy {
            entries: entries.into_iter().collect(),
        }
    }

    /// Whether the map has no entries (open to every trusted peer).
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `id` may receive the map (any permission implies it).
    pub fn reads(&self, id: &str) -> bool {
        self.is_open() || self.entries.get(id).is_some_and(|f| *f != 0)
    }

    /// Whether `id` may change the map's items and properties.
    pub fn writes(&self, id: &str) -> bool {
        self.is_open() || self.entries.get(id).is_some_and(|f| f & WRITE != 0)
    }

    /// Whether `id` may change the map's permissions or remove it.
    pub fn manages(&self, id: &str) -> bool {
        self.is_open() || self.entries.get(id).is_some_and(|f| f & MANAGE != 0)
    }

    /// One identity's entry, if it has one.
    pub fn get(&self, id: &str) -> Option<Permission> {
        self.entries.get(id).map(|f| Permission::from_flags(id, *f))
    }

    /// Every entry, by identity.
    pub fn permissions(&self) -> Vec<Permission> {
        self.entries
            .iter()
            .map(|(id, f)| Permission::from_flags(id, *f))
            .collect()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as bytes (for a store that remembers policies of maps not loaded).
    pub fn encode(&self) -> Vec<u8> {
        let v: Vec<(&String, &u8)> = self.entries.iter().collect();
        postcard::to_allocvec(&v).unwrap_or_default()
    }

    /// Reads [`Self::encode`]d bytes; `None` if they are not a policy.
    pub fn decode(b: &[u8]) -> Option<Policy> {
        let v: Vec<(String, u8)> = postcard::from_bytes(b).ok()?;
        if v.iter().any(|(id, _)| !valid_identity(id)) {
            return None;
        }
        Some(Policy::from_entries(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_map_allows_everyone_and_entries_restrict_it() {
        let open = Policy::default();
        assert!(open.reads("x") && open.writes("x") && open.manages("x"));
        let p = Policy::from_entries([
            ("reader".to_string(), READ),
            ("writer".to_string(), READ | WRITE),
            ("boss".to_string(), READ | WRITE | MANAGE),
            ("denied".to_string(), 0),
        ]);
        assert!(p.reads("reader") && !p.writes("reader") && !p.manages("reader"));
        assert!(p.reads("writer") && p.writes("writer") && !p.manages("writer"));
        assert!(p.manages("boss"));
        assert!(!p.reads("denied") && !p.reads("stranger") && !p.writes("stranger"));
        assert_eq!(Policy::decode(&p.encode()), Some(p.clone()));
        assert_eq!(p.get("writer").map(|x| x.flags()), Some(READ | WRITE));
        assert!(Policy::decode(b"\xff\xff").is_none());
    }

    #[test]
    fn identities_and_slots() {
        assert!(valid_identity(
            "12D3KooWHAeVjaudaaNTP8pnF6U2SwbPZ6QGZNN4YNsR6sJUkCkG"
        ));
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(!valid_identity(bad), "{bad:?}");
        }
        assert_eq!(identity_of_slot("p:abc"), Some("abc"));
        assert_eq!(identity_of_slot("p:"), None);
        assert_eq!(identity_of_slot("c1"), None);
    }
}
