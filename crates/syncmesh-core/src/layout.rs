//! How a map is laid out across Automerge documents.
//!
//! A map is one small *map document* (its name, incarnation, creation, TTL and removal) and
//! [`SHARDS`] *shard documents*; an item lives in the shard chosen by a stable hash of its key.
//! Automerge's cost per operation and per applied change grows with the document's size, so
//! many small documents keep every write and merge cheap (see `docs/ARCHITECTURE.md`).
//!
//! Inside a shard document everything sits in the root map, as scalars or fresh objects, so no
//! two replicas ever create a shared container independently (Automerge would keep only one):
//!
//! - `m<len>:<key>` → the item's meta record (`ItemMeta`, bytes). The item exists iff present.
//! - `w<len>:<key>` → the item's *whole* data as written by the last `set`, `mutate` or
//!   `create_item` (compact JSON text of an object, one string scalar). Concurrent whole
//!   writes are concurrent values of this one slot, so Automerge picks one of them whole.
//! - `f<len>:<key><field>` → one top-level field written by an `update` after that whole
//!   write, encoded by [`crate::json`]; it is read on top of the whole data. A whole write
//!   deletes every field slot it saw, so only updates it did not see (concurrent ones) stay.
//!
//! Data written before whole slots existed (layout 1) has field slots only and reads the same.
//!
//! `<len>` is the key's length in bytes, so any key (including `:` or NUL) and any field name
//! parse back unambiguously.

use crate::ids::{hash64, NodeId, Timestamp};

/// Number of shard documents per map. Part of the on-disk and on-wire format.
pub const SHARDS: u16 = 1024;

/// The shard holding `key`.
pub fn shard_of(key: &str) -> u16 {
    (hash64([key.as_bytes()]) % u64::from(SHARDS)) as u16
}

/// Whether `key` is a valid item key that lives in shard `index` (slots anywhere else are a
/// peer's garbage and are ignored).
pub(crate) fn belongs(key: &str, index: u16) -> bool {
    crate::limits::validate_key(key).is_ok() && shard_of(key) == index
}

/// Root key of an item's meta record.
pub(crate) fn meta_key(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 6);
    s.push('m');
    push_len_key(&mut s, key);
    s
}

/// Prefix shared by every field slot of an item.
pub(crate) fn field_prefix(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 6);
    s.push('f');
    push_len_key(&mut s, key);
    s
}

/// Root key of an item's whole-data slot.
pub(crate) fn whole_key(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 6);
    s.push('w');
    push_len_key(&mut s, key);
    s
}

/// Root key of one field of an item.
pub(crate) fn field_key(key: &str, field: &str) -> String {
    let mut s = field_prefix(key);
    s.push_str(field);
    s
}

fn push_len_key(s: &mut String, key: &str) {
    use std::fmt::Write;
    let _ = write!(s, "{}:", key.len());
    s.push_str(key);
}

/// What a root key of a shard document denotes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Slot<'a> {
    /// The meta record of the item with this key.
    Meta(&'a str),
    /// The whole data of the item with this key.
    Whole(&'a str),
    /// A field of the item with this key.
    Field(&'a str, &'a str),
}

impl<'a> Slot<'a> {
    /// The item key the slot belongs to.
    pub(crate) fn key(&self) -> &'a str {
        match self {
            Slot::Meta(k) | Slot::Whole(k) | Slot::Field(k, _) => k,
        }
    }
}

/// Parses a shard root key; `None` for anything not written by this layout.
pub(crate) fn parse_slot(root_key: &str) -> Option<Slot<'_>> {
    let tag = root_key.as_bytes().first()?;
    // A peer may send any root key; one starting with a multi-byte character is not ours.
    let rest = root_key.get(1..)?;
    let colon = rest.find(':')?;
    let len: usize = rest[..colon].parse().ok()?;
    if rest[..colon].starts_with('0') && colon > 1 {
        return None;
    }
    let body = &rest[colon + 1..];
    let key = body.get(..len)?;
    let tail = body.get(len..)?;
    if key.is_empty() {
        return None;
    }
    match tag {
        b'm' if tail.is_empty() => Some(Slot::Meta(key)),
        b'w' if tail.is_empty() => Some(Slot::Whole(key)),
        b'f' => Some(Slot::Field(key, tail)),
        _ => None,
    }
}

/// An item's replicated metadata, rewritten by every write to the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ItemMeta {
    /// Per-item write stamp: larger than every stamp the writer had seen on the item.
    pub stamp: u64,
    /// When the item was first created (writer's clock).
    pub created: Timestamp,
    /// When this write happened (writer's clock).
    pub updated: Timestamp,
    /// When the item expires, if it has a TTL.
    pub expires: Option<Timestamp>,
    /// The node that created the item.
    pub created_by: NodeId,
    /// The node that made this write.
    pub writer: NodeId,
}

const META_VERSION: u8 = 1;
const META_LEN: usize = 1 + 8 + 8 + 8 + 1 + 8 + 16 + 16;

impl ItemMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(META_LEN);
        b.push(META_VERSION);
        b.extend_from_slice(&self.stamp.to_le_bytes());
        b.extend_from_slice(&self.created.millis().to_le_bytes());
        b.extend_from_slice(&self.updated.millis().to_le_bytes());
        b.push(u8::from(self.expires.is_some()));
        b.extend_from_slice(&self.expires.map_or(0, |t| t.millis()).to_le_bytes());
        b.extend_from_slice(&self.created_by.0);
        b.extend_from_slice(&self.writer.0);
        b
    }

    /// Decodes a meta record; `None` if it is not one (a peer's garbage is ignored, not trusted).
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != META_LEN || b[0] != META_VERSION {
            return None;
        }
        let u = |i: usize| -> Option<[u8; 8]> { b.get(i..i + 8)?.try_into().ok() };
        let stamp = u64::from_le_bytes(u(1)?);
        let created = Timestamp::from_millis(i64::from_le_bytes(u(9)?));
        let updated = Timestamp::from_millis(i64::from_le_bytes(u(17)?));
        let has_exp = match b[25] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let exp = Timestamp::from_millis(i64::from_le_bytes(u(26)?));
        let created_by = NodeId::from_slice(b.get(34..50)?)?;
        let writer = NodeId::from_slice(b.get(50..66)?)?;
        Some(ItemMeta {
            stamp,
            created,
            updated,
            expires: has_exp.then_some(exp),
            created_by,
            writer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse_back_for_awkward_keys() {
        for key in ["a", "a:b", "1:x", "m5:david", "\0", "ü/🎉", "with space"] {
            assert_eq!(parse_slot(&meta_key(key)), Some(Slot::Meta(key)));
            assert_eq!(parse_slot(&whole_key(key)), Some(Slot::Whole(key)));
            for field in ["", "x", ":", "f1:a", "ü"] {
                assert_eq!(
                    parse_slot(&field_key(key, field)),
                    Some(Slot::Field(key, field))
                );
            }
        }
        for bad in [
            "", "m", "m:", "m0:", "x1:a", "m2:a", "m1:ab", "m01:a", "mx:a", "w1:ab", "w0:",
        ] {
            assert_eq!(parse_slot(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn meta_roundtrip_and_garbage() {
        let m = ItemMeta {
            stamp: 42,
            created: Timestamp::from_millis(1),
            updated: Timestamp::from_millis(2),
            expires: Some(Timestamp::from_millis(3)),
            created_by: NodeId([1; 16]),
            writer: NodeId([2; 16]),
        };
        assert_eq!(ItemMeta::decode(&m.encode()), Some(m.clone()));
        let m2 = ItemMeta { expires: None, ..m };
        assert_eq!(ItemMeta::decode(&m2.encode()), Some(m2.clone()));
        assert_eq!(ItemMeta::decode(&[]), None);
        let mut bad = m2.encode();
        bad[25] = 7;
        assert_eq!(ItemMeta::decode(&bad), None);
        bad[0] = 9;
        assert_eq!(ItemMeta::decode(&bad), None);
    }

    /// Where "david" lives; changing the hash or [`SHARDS`] breaks every stored map.
    const PINNED_DAVID: u16 = 688;

    #[test]
    fn shards_are_stable_and_spread() {
        // A format constant: this value must never change between releases.
        assert_eq!(shard_of("david"), PINNED_DAVID);
        let mut used = std::collections::HashSet::new();
        for i in 0..20_000 {
            used.insert(shard_of(&format!("k_{i}")));
        }
        assert_eq!(used.len(), usize::from(SHARDS));
    }
}
