//! The read view: one compact entry per item (JSON text plus metadata), how a store encodes it,
//! and how an item read from the documents enters it.

use super::*;

/// How a map's read view changed, for a store that keeps a copy of it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewChanges {
    /// The view was emptied first (the map was removed or created again).
    pub reset: bool,
    /// Entries to write (`Some`) or delete (`None`), by item key, in key order.
    pub entries: Vec<(String, Option<Vec<u8>>)>,
}

/// Entries written before schema 7: fixed-width fields.
const ENTRY_V1: u8 = 1;
const ENTRY_V1_HEADER: usize = 1 + 8 * 5 + 16 + 1;
/// Entries since: variable-width fields.
const ENTRY_V2: u8 = 2;
const CONFLICTED: u8 = 1;
const NO_FIELDS: u8 = 2;
const EXPIRES: u8 = 4;

/// A view entry as stored: version, flags, the item's clock (LEB128), revision (8 bytes),
/// creation (zigzag LEB128), last update and expiry (each relative to creation), creator
/// (16 bytes), then the JSON text.
pub(super) fn encode_entry(st: &ItemState, nodes: &Nodes) -> Vec<u8> {
    write_entry(st, &nodes.get(st.meta.created_by))
}

/// [`encode_entry`] with the creator given (the state's interned one is not read).
fn write_entry(st: &ItemState, creator: &NodeId) -> Vec<u8> {
    use crate::varint;
    let mut b = Vec::with_capacity(48 + st.data.len());
    b.push(ENTRY_V2);
    let expires = st.meta.expires != i64::MIN;
    let mut flags = 0;
    for (on, flag) in [
        (st.meta.conflicted, CONFLICTED),
        (st.meta.no_fields, NO_FIELDS),
        (expires, EXPIRES),
    ] {
        if on {
            flags |= flag;
        }
    }
    b.push(flags);
    varint::put(&mut b, st.max_stamp);
    b.extend_from_slice(&st.revision.to_le_bytes());
    varint::put_signed(&mut b, st.meta.created);
    varint::put_signed(&mut b, st.meta.updated.wrapping_sub(st.meta.created));
    if expires {
        varint::put_signed(&mut b, st.meta.expires.wrapping_sub(st.meta.created));
    }
    b.extend_from_slice(&creator.0);
    b.extend_from_slice(st.data.as_bytes());
    b
}

/// An entry's header: its state but the data (empty) and the creator (not interned: 0), the
/// creator, and where the JSON text starts.
type Header = (ItemState, NodeId, usize);

fn parse_header(b: &[u8]) -> Option<Header> {
    match *b.first()? {
        ENTRY_V1 => header_v1(b),
        ENTRY_V2 => header_v2(b),
        _ => None,
    }
}

pub(super) fn decode_entry(b: &[u8], nodes: &mut Nodes) -> Option<ItemState> {
    let (mut st, creator, at) = parse_header(b)?;
    st.data = entry_text(b, at)?.into();
    st.meta.created_by = nodes.intern(creator);
    Some(st)
}

/// The text after the header: not parsed here, as reopening a 1M-item map must stay one
/// cheap pass; the store's checksums guard the bytes, and serde_json wrote it from an object.
fn entry_text(b: &[u8], at: usize) -> Option<&str> {
    let data = std::str::from_utf8(b.get(at..)?).ok()?;
    (data.starts_with('{') && data.ends_with('}')).then_some(data)
}

fn header_v2(b: &[u8]) -> Option<Header> {
    use crate::varint;
    let flags = *b.get(1)?;
    if flags & !(CONFLICTED | NO_FIELDS | EXPIRES) != 0 {
        return None;
    }
    let mut at = 2;
    let max_stamp = varint::get(b, &mut at)?;
    let revision = u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
    at += 8;
    let created = varint::get_signed(b, &mut at)?;
    let updated = created.wrapping_add(varint::get_signed(b, &mut at)?);
    let expires = if flags & EXPIRES != 0 {
        created.wrapping_add(varint::get_signed(b, &mut at)?)
    } else {
        i64::MIN
    };
    let creator = NodeId::from_slice(b.get(at..at + 16)?)?;
    at += 16;
    let st = ItemState {
        data: Box::default(),
        meta: ViewMeta {
            created,
            updated,
            expires,
            created_by: 0,
            conflicted: flags & CONFLICTED != 0,
            no_fields: flags & NO_FIELDS != 0,
        },
        max_stamp,
        revision,
    };
    Some((st, creator, at))
}

fn header_v1(b: &[u8]) -> Option<Header> {
    if b.len() < ENTRY_V1_HEADER {
        return None;
    }
    let w = |i: usize| -> Option<[u8; 8]> { b.get(i..i + 8)?.try_into().ok() };
    let st = ItemState {
        data: Box::default(),
        meta: ViewMeta {
            created: i64::from_le_bytes(w(17)?),
            updated: i64::from_le_bytes(w(25)?),
            expires: i64::from_le_bytes(w(33)?),
            created_by: 0,
            conflicted: *b.get(57)? & 1 == 1,
            // Entries written before this flag existed say nothing: fields are scanned.
            no_fields: *b.get(57)? & 2 == 2,
        },
        max_stamp: u64::from_le_bytes(w(1)?),
        revision: u64::from_le_bytes(w(9)?),
    };
    Some((st, NodeId::from_slice(b.get(41..57)?)?, ENTRY_V1_HEADER))
}

/// The view entry of an item as an event carries it: the form in which a store keeps an item
/// version its event feed refers to, interchangeable with the entries of [`ViewChanges`] (the
/// bookkeeping only the view uses is left empty). `None` for a revision this crate did not
/// make.
pub fn version_entry(item: &Item) -> Option<Vec<u8>> {
    let revision = u64::from_str_radix(item.revision.as_str(), 16).ok()?;
    let st = ItemState {
        data: serde_json::to_string(&item.data).ok()?.into_boxed_str(),
        meta: ViewMeta {
            created: item.date_created.millis(),
            updated: item.date_updated.millis(),
            expires: item
                .date_expires
                .map_or(i64::MIN, |e| e.millis().max(i64::MIN + 1)),
            created_by: 0,
            conflicted: false,
            no_fields: false,
        },
        max_stamp: 0,
        revision,
    };
    Some(write_entry(&st, &item.created_by))
}

/// The item a view entry (or [`version_entry`]) holds, under `key`; `None` for bytes that are
/// not an entry.
pub fn entry_item(key: &str, entry: &[u8]) -> Option<Item> {
    let (st, creator, at) = parse_header(entry)?;
    Some(Item {
        key: key.to_string(),
        // As the view reads it (`ItemState::data`): the text was written from an object.
        data: serde_json::from_str(entry_text(entry, at)?).unwrap_or_default(),
        revision: st.revision(),
        date_created: st.meta.created(),
        date_updated: st.meta.updated(),
        date_expires: st.meta.expires(),
        created_by: creator,
    })
}

/// The JSON text of the data a view entry holds.
pub fn entry_data(entry: &[u8]) -> Option<&str> {
    let (_, _, at) = parse_header(entry)?;
    entry_text(entry, at)
}

/// One item in the read view. The data is kept as compact JSON text: a parsed
/// `serde_json::Map` costs several times more memory per item than its text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ItemState {
    pub(super) data: Box<str>,
    pub(super) meta: ViewMeta,
    pub(super) max_stamp: u64,
    pub(super) revision: u64,
}

/// The winning meta record as the view keeps it: node ids interned, no option tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ViewMeta {
    pub(super) created: i64,
    pub(super) updated: i64,
    /// `i64::MIN` when the item has no TTL.
    pub(super) expires: i64,
    pub(super) created_by: u32,
    /// Some field has concurrent values (set from the documents, cleared by full writes).
    pub(super) conflicted: bool,
    /// The shard document is known to hold no update field slots for the item, so a re-read
    /// after a peer's change that writes none can skip scanning for them.
    pub(super) no_fields: bool,
}

impl ViewMeta {
    /// Equal in everything a reader sees (`no_fields` is bookkeeping).
    pub(super) fn same_visible(self, other: ViewMeta) -> bool {
        ViewMeta {
            no_fields: other.no_fields,
            ..self
        } == other
    }
}

impl ViewMeta {
    pub(super) fn created(self) -> Timestamp {
        Timestamp::from_millis(self.created)
    }
    pub(super) fn updated(self) -> Timestamp {
        Timestamp::from_millis(self.updated)
    }
    pub(super) fn expires(self) -> Option<Timestamp> {
        (self.expires != i64::MIN).then(|| Timestamp::from_millis(self.expires))
    }
}

/// Node ids seen in a map, interned so each view entry stores 4 bytes instead of 16.
#[derive(Debug, Default)]
pub(super) struct Nodes {
    pub(super) list: Vec<NodeId>,
    pub(super) index: std::collections::HashMap<NodeId, u32>,
}

impl Nodes {
    pub(super) fn intern(&mut self, n: NodeId) -> u32 {
        if let Some(i) = self.index.get(&n) {
            return *i;
        }
        let i = self.list.len() as u32;
        self.list.push(n);
        self.index.insert(n, i);
        i
    }
    pub(super) fn get(&self, i: u32) -> NodeId {
        self.list
            .get(i as usize)
            .copied()
            .unwrap_or(NodeId([0; 16]))
    }
}

/// An item as read from a shard document, before it enters the view.
pub(super) struct RawItem {
    pub(super) data: JsonObject,
    pub(super) meta: ItemMeta,
    pub(super) max_stamp: u64,
    pub(super) revision: u64,
    pub(super) conflicted: bool,
    /// No update field slot was found (or looked for: see `read_item`).
    pub(super) no_fields: bool,
}

impl ItemState {
    pub(super) fn new(
        data: &JsonObject,
        meta: &ItemMeta,
        max_stamp: u64,
        revision: u64,
        nodes: &mut Nodes,
    ) -> Self {
        ItemState {
            data: serde_json::to_string(data)
                .unwrap_or_default()
                .into_boxed_str(),
            meta: ViewMeta {
                created: meta.created.millis(),
                updated: meta.updated.millis(),
                expires: meta
                    .expires
                    .map_or(i64::MIN, |e| e.millis().max(i64::MIN + 1)),
                created_by: nodes.intern(meta.created_by),
                conflicted: false,
                no_fields: false,
            },
            max_stamp,
            revision,
        }
    }

    pub(super) fn from_raw(raw: RawItem, nodes: &mut Nodes) -> Self {
        let mut st = ItemState::new(&raw.data, &raw.meta, raw.max_stamp, raw.revision, nodes);
        st.meta.conflicted = raw.conflicted;
        st.meta.no_fields = raw.no_fields;
        st
    }

    pub(super) fn data(&self) -> JsonObject {
        // The text was produced by serde_json from a Map, so it always parses back.
        serde_json::from_str(&self.data).unwrap_or_default()
    }

    pub(super) fn revision(&self) -> Revision {
        Revision::from_hash(self.revision)
    }

    pub(super) fn to_item(&self, key: &str, nodes: &Nodes) -> Item {
        Item {
            key: key.to_string(),
            data: self.data(),
            revision: self.revision(),
            date_created: self.meta.created(),
            date_updated: self.meta.updated(),
            date_expires: self.meta.expires(),
            created_by: nodes.get(self.meta.created_by),
        }
    }

    pub(super) fn expired(&self, now: Timestamp) -> bool {
        self.meta.expires().is_some_and(|e| e <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let mut nodes = Nodes::default();
        let data: JsonObject = serde_json::from_str(r#"{"a":1,"b":{"c":[true,null]}}"#).unwrap();
        let meta = ItemMeta {
            stamp: 9,
            created: Timestamp::from_millis(1),
            updated: Timestamp::from_millis(2),
            expires: Some(Timestamp::from_millis(3)),
            created_by: NodeId([4; 16]),
            writer: NodeId([5; 16]),
        };
        let mut st = ItemState::new(&data, &meta, 9, 77, &mut nodes);
        st.meta.conflicted = true;
        st.meta.no_fields = true;
        let b = encode_entry(&st, &nodes);
        let mut fresh = Nodes::default();
        let back = decode_entry(&b, &mut fresh).unwrap();
        assert_eq!(back.data(), data);
        assert_eq!(back.revision, 77);
        assert_eq!(back.max_stamp, 9);
        assert!(back.meta.conflicted && back.meta.no_fields);
        assert_eq!(back.meta.expires(), Some(Timestamp::from_millis(3)));
        assert_eq!(fresh.get(back.meta.created_by), NodeId([4; 16]));
        assert!(decode_entry(&b[..10], &mut fresh).is_none());
        let mut bad = b.clone();
        bad[0] = 9;
        assert!(decode_entry(&bad, &mut fresh).is_none());
        let header = b.len() - st.data.len();
        let mut not_object = b[..header].to_vec();
        not_object.extend_from_slice(b"[1]");
        assert!(decode_entry(&not_object, &mut fresh).is_none());
        // Entries stored before schema 7 (fixed-width fields) still read.
        let mut v1 = vec![ENTRY_V1];
        for x in [9u64, 77, 1, 2, 3] {
            v1.extend_from_slice(&x.to_le_bytes());
        }
        v1.extend_from_slice(&[4; 16]);
        v1.push(3);
        v1.extend_from_slice(st.data.as_bytes());
        let old = decode_entry(&v1, &mut fresh).unwrap();
        assert_eq!(old, back);
        assert!(decode_entry(&v1[..30], &mut fresh).is_none());
        // Negative and far-apart dates survive their relative encoding.
        let mut far = st.clone();
        far.meta.created = i64::MIN + 1;
        far.meta.updated = i64::MAX;
        far.meta.expires = i64::MIN;
        let f = decode_entry(&encode_entry(&far, &nodes), &mut fresh).unwrap();
        assert_eq!(f.meta, far.meta);
        // and the new form is smaller
        assert!(b.len() + 15 < v1.len(), "{} vs {}", b.len(), v1.len());
    }

    #[test]
    fn an_item_survives_its_version_entry() {
        let mut nodes = Nodes::default();
        let data: JsonObject = serde_json::from_str(r#"{"a":1,"b":"x"}"#).unwrap();
        let meta = ItemMeta {
            stamp: 3,
            created: Timestamp::from_millis(10),
            updated: Timestamp::from_millis(20),
            expires: None,
            created_by: NodeId([7; 16]),
            writer: NodeId([7; 16]),
        };
        let st = ItemState::new(&data, &meta, 3, 0xfeed, &mut nodes);
        let item = st.to_item("k", &nodes);
        let e = version_entry(&item).unwrap();
        assert_eq!(entry_item("k", &e).unwrap(), item);
        assert_eq!(entry_data(&e), Some(r#"{"a":1,"b":"x"}"#));
        // a view entry serves as well
        let v = encode_entry(&st, &nodes);
        assert_eq!(entry_item("k", &v).unwrap(), item);
        assert!(entry_item("k", &e[..5]).is_none());
        assert!(entry_data(b"garbage").is_none());
        let mut odd = item.clone();
        odd.revision = Revision::from_client("not-hex");
        assert!(version_entry(&odd).is_none());
    }
}
