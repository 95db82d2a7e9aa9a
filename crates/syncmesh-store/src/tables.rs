//! Every table of the store, each with its key and value. Rows of a map are keyed by its
//! *number* (given out once per sid, never reused: [`MAP_NUMBERS`]) rather than by its 34-byte
//! sid, and the keys are typed redb tuples, ordered element by element: a map's rows are
//! contiguous and in order, and no key is encoded by hand.
//!
//! Values are bytes whose format belongs to whoever writes them: Automerge (snapshots,
//! changes), the core (view entries, signatures), `feed` (event records), the node (trust,
//! invitations, permissions).

use redb::TableDefinition;
use syncmesh_core::DocAddr;

/// Node-level records: `"schema_version"` → u32 LE; `"event-floor:<sid>"` → u64 LE (the id a
/// map's next event stays above after a crash); other keys the node's own (opaque here).
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The catalog: sid (its ASCII bytes) → `encode_catalog` (a flag and i64 LE next TTL expiry,
/// then the unique name, UTF-8, empty for none).
pub(crate) const MAPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("maps");
/// Per map, the digest of its documents' heads as of its last commit, when known: replication
/// announces stored maps with it without loading them. A commit with changes to a map removes
/// its digest in the same transaction, so a stored digest is never stale. Key: the sid.
pub(crate) const DIGESTS: TableDefinition<&[u8], u64> = TableDefinition::new("digests");
/// Peers this node trusts: peer id → the node's record of that trust (opaque here).
pub(crate) const TRUST: TableDefinition<&str, &[u8]> = TableDefinition::new("trust");
/// Invitations this node issued and that are still usable: invitation id → record (opaque).
pub(crate) const INVITES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("invites");
/// Per map with permission entries, its permissions as of its last commit (encoded by the
/// caller): replication checks them for maps it has not loaded. No row: an open map. Key:
/// the sid.
pub(crate) const POLICIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("policies");

/// `feed_bytes`: map number → bytes its event records and item versions take (each value plus
/// a fixed cost per row, `feed::ROW_BYTES`), written in the same transaction as they are, so
/// the feed can be bounded in bytes; absent until the map's first write that counts them.
pub(crate) const FEED_BYTES: TableDefinition<u32, u64> = TableDefinition::new("feed_bytes");

/// Map numbers: sid → its number; the empty key → the next number to give.
pub(crate) const MAP_NUMBERS: TableDefinition<&str, u32> = TableDefinition::new("numbers");
/// The read view: (map number, item key) → the id of the event that wrote this version
/// (LEB128; 0 when unknown: written before schema 7, or with no event), then the view entry
/// (encoded by the core).
pub(crate) const VIEW: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("view_rows");
/// The event feed: (map number, event id) → the event record (`feed::encode_record`).
pub(crate) const FEED: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("event_feed");
/// Versions no longer in the view that retained events name: (map number, id of the event
/// that wrote the version) → its view entry.
pub(crate) const VERSIONS: TableDefinition<(u32, u64), &[u8]> =
    TableDefinition::new("item_versions");
/// A document's saved Automerge bytes: [`DocKey`] → snapshot.
pub(crate) const SNAPSHOTS: TableDefinition<DocKey, &[u8]> = TableDefinition::new("doc_snapshots");
/// Changes since the snapshot: ([`DocKey`]'s fields, then the sequence number, increasing per
/// document) → one Automerge change.
pub(crate) const CHANGES: TableDefinition<ChangeKey, &[u8]> = TableDefinition::new("doc_changes");
/// Signatures of map changes: (map number, change hash) → the encoded signature. Kept apart
/// from the change logs, so compaction into snapshots keeps them.
pub(crate) const SIGS: TableDefinition<(u32, &[u8; 32]), &[u8]> =
    TableDefinition::new("change_sigs");

/// A document of a map: (map number, 0 for the map document or 1 for a shard, incarnation,
/// shard index).
pub(crate) type DocKey = (u32, u8, u64, u16);
/// A change of a document: its [`DocKey`], then the change's sequence number.
pub(crate) type ChangeKey = (u32, u8, u64, u16, u64);

/// The key of a map's document.
pub(crate) fn doc_key(num: u32, doc: DocAddr) -> DocKey {
    match doc {
        DocAddr::Meta => (num, 0, 0, 0),
        DocAddr::Shard { inc, index, .. } => (num, 1, inc, index),
    }
}

/// The document a key names; `None` for a kind this build does not know.
pub(crate) fn doc_of(k: DocKey) -> Option<DocAddr> {
    match k.1 {
        0 => Some(DocAddr::Meta),
        1 => Some(DocAddr::Shard {
            gen: 0,
            inc: k.2,
            index: k.3,
        }),
        _ => None,
    }
}

/// The key of a document's change `seq`.
pub(crate) fn change_key(d: DocKey, seq: u64) -> ChangeKey {
    (d.0, d.1, d.2, d.3, seq)
}

/// Every document key of map `num`, as an inclusive range.
pub(crate) fn docs_of(num: u32) -> std::ops::RangeInclusive<DocKey> {
    (num, 0, 0, 0)..=(num, u8::MAX, u64::MAX, u16::MAX)
}

/// Every change key of map `num`.
pub(crate) fn changes_of(num: u32) -> std::ops::RangeInclusive<ChangeKey> {
    (num, 0, 0, 0, 0)..=(num, u8::MAX, u64::MAX, u16::MAX, u64::MAX)
}

/// Every change key of one document.
pub(crate) fn changes_of_doc(d: DocKey) -> std::ops::RangeInclusive<ChangeKey> {
    change_key(d, 0)..=change_key(d, u64::MAX)
}

/// Every signature key of map `num`.
pub(crate) fn sigs_of(num: u32) -> std::ops::RangeInclusive<(u32, &'static [u8; 32])> {
    (num, &[0u8; 32])..=(num, &[0xffu8; 32])
}

/// Every event (or version) id of map `num` from `from` on.
pub(crate) fn ids_of(num: u32, from: u64) -> std::ops::RangeInclusive<(u32, u64)> {
    (num, from)..=(num, u64::MAX)
}

/// Every view row of map `num`. (Map numbers stay below `u32::MAX`: the counter refuses to
/// give that one.)
pub(crate) fn view_of(num: u32) -> std::ops::Range<(u32, &'static str)> {
    (num, "")..(num.saturating_add(1), "")
}
