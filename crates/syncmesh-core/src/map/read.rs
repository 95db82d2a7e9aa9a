//! Reads of the Automerge layout (`crate::layout`): an item from its meta, whole and field
//! slots; the map document's state, endorsements and policy.

use super::*;

pub(super) fn decode_meta_value(v: &Value<'_>) -> Option<ItemMeta> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) => ItemMeta::decode(b),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// The visible whole value among concurrent ones (`get_all` of the whole slot): Automerge's
/// winner (the last), garbage skipped; with the operation that wrote it.
pub(super) fn visible_whole<'a>(
    wholes: &'a [(Value<'_>, automerge::ObjId)],
) -> Option<(JsonObject, &'a automerge::ObjId)> {
    wholes
        .iter()
        .rev()
        .find_map(|(v, id)| decode_whole(v).map(|d| (d, id)))
}

/// The visible meta record among concurrent ones (`get_all` of the meta slot) and its
/// position: the one written with the visible whole value (same actor: concurrent values of
/// one slot never share one), so an item's data, dates and TTL come from one write; else
/// Automerge's winner (the whole value's own record was overwritten by an update that saw it,
/// or there is none). Undecodable records are skipped.
pub(super) fn visible_meta(
    metas: &[(Value<'_>, automerge::ObjId)],
    whole_op: Option<&automerge::ObjId>,
) -> Option<(ItemMeta, usize)> {
    let decoded = || {
        metas
            .iter()
            .enumerate()
            .rev()
            .filter_map(|(i, (v, id))| decode_meta_value(v).map(|m| (m, i, id)))
    };
    whole_op
        .and_then(|w| decoded().find(|(_, _, id)| crate::am::same_actor(id, w)))
        .or_else(|| decoded().next())
        .map(|(m, i, _)| (m, i))
}

/// An item's whole data from its slot value; `None` unless it is the JSON text of an object.
pub(super) fn decode_whole(v: &Value<'_>) -> Option<JsonObject> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(t) => serde_json::from_str(t).ok(),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

pub(super) fn raw_meta(v: &Value<'_>) -> Option<Vec<u8>> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) if ItemMeta::decode(b).is_some() => Some(b.clone()),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// Root keys of every field slot in a shard document, from one pass over its keys. (0.6's
/// `map_range` walks every key of the object, so looking up one item's fields by range costs
/// as much as this whole pass: callers keep this index and look items up in it.)
pub(super) fn field_index(doc: &Automerge) -> BTreeSet<String> {
    doc.keys(ROOT).filter(|k| k.starts_with('f')).collect()
}

/// The field slots of `key` listed in an index of a shard document's field slots.
pub(super) fn indexed_fields(index: &BTreeSet<String>, key: &str) -> Vec<String> {
    let prefix = layout::field_prefix(key);
    index
        .range(prefix.clone()..)
        .take_while(|k| k.starts_with(&prefix))
        .cloned()
        .collect()
}

/// Keys of every item with a meta slot in shard document `index` (that belongs there).
pub(super) fn item_keys(doc: &Automerge, index: u16) -> Vec<String> {
    doc.keys(ROOT)
        .filter_map(|k| match layout::parse_slot(&k) {
            Some(Slot::Meta(key)) if layout::belongs(key, index) => Some(key.to_string()),
            _ => None,
        })
        .collect()
}

/// Reads an item's state straight from its shard document.
/// `fields` lists (at least) the field slots the document holds ([`field_index`]); `None`
/// trusts the caller that it holds none for the item (see `ViewMeta::no_fields`).
pub(super) fn read_item(
    doc: &Automerge,
    key: &str,
    fields: Option<&BTreeSet<String>>,
) -> Option<RawItem> {
    let mk = layout::meta_key(key);
    let all = doc.get_all(ROOT, mk.as_str()).ok()?;
    let mut raws: Vec<Vec<u8>> = all.iter().filter_map(|(v, _)| raw_meta(v)).collect();
    if raws.is_empty() {
        return None;
    }
    // The whole data: Automerge's winner among concurrent whole writes if it decodes (a
    // peer's garbage is ignored), then the fields updates wrote on top of it; the visible
    // meta record is that write's.
    let wholes = doc
        .get_all(ROOT, layout::whole_key(key).as_str())
        .unwrap_or_default();
    let whole = visible_whole(&wholes);
    let (meta, _) = visible_meta(&all, whole.as_ref().map(|(_, id)| *id))?;
    let mut conflicted = wholes.len() > 1;
    let mut data = whole.map(|(d, _)| d).unwrap_or_default();
    let max_stamp = raws
        .iter()
        .filter_map(|b| ItemMeta::decode(b))
        .map(|m| m.stamp)
        .max()
        .unwrap_or(0);
    raws.sort();
    let revision = hash64(raws.iter().map(|r| r.as_slice()));
    let prefix_len = layout::field_prefix(key).len();
    // (`map_range`'s own `conflict` flag does not say whether concurrent values are current on
    // the 0.6 line: `get_all` per field does.)
    let fields = fields.map_or_else(Vec::new, |idx| indexed_fields(idx, key));
    let mut no_fields = true;
    for slot in fields {
        let Ok(all) = doc.get_all(ROOT, slot.as_str()) else {
            continue;
        };
        if all.is_empty() {
            continue; // deleted since it was indexed
        }
        no_fields = false;
        conflicted |= all.len() > 1;
        // get_all is in operation order; the last is the visible (winning) value.
        if let (Some((v, id)), Some(field)) = (all.last(), slot.get(prefix_len..)) {
            data.insert(field.to_string(), json::read(doc, v, id));
        }
    }
    Some(RawItem {
        data,
        meta,
        max_stamp,
        revision,
        conflicted,
        no_fields,
    })
}

pub(super) fn read_i64(doc: &Automerge, key: &str) -> Option<i64> {
    match doc.get(ROOT, key).ok()??.0 {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Int(i) => Some(*i),
            ScalarValue::Uint(u) => i64::try_from(*u).ok(),
            ScalarValue::Timestamp(t) => Some(*t),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

pub(super) fn heads_digest(mut heads: Vec<ChangeHash>) -> u64 {
    heads.sort_unstable();
    hash64(heads.iter().map(|h| h.0.as_slice()))
}

pub(super) fn read_map_state(doc: &Automerge) -> MapState {
    // The incarnation is the largest ever written: re-creations only ever move it forward.
    let inc = doc
        .get_all(ROOT, "inc")
        .unwrap_or_default()
        .iter()
        .filter_map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Uint(u) => Some(*u),
                ScalarValue::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            },
            Value::Object(_) => None,
        })
        .max()
        .unwrap_or(0);
    let name = match doc.get(ROOT, "name").ok().flatten() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(n) => Some(n.to_string()),
            _ => None,
        },
        _ => None,
    };
    let created = read_i64(doc, &format!("c{inc}")).map(Timestamp::from_millis);
    let created_by = match doc.get(ROOT, format!("b{inc}").as_str()).ok().flatten() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Bytes(b) => NodeId::from_slice(b),
            _ => None,
        },
        _ => None,
    }
    .unwrap_or(NodeId([0; 16]));
    let expires = read_i64(doc, &format!("e{inc}")).map(Timestamp::from_millis);
    let removed = read_i64(doc, &format!("r{inc}")).map(Timestamp::from_millis);
    let updated = read_i64(doc, &format!("u{inc}"))
        .map(Timestamp::from_millis)
        .or(created)
        .unwrap_or(Timestamp::from_millis(0));
    let mut heads = doc.get_heads();
    heads.sort();
    let revision = Revision::from_hash(hash64(heads.iter().map(|h| h.0.as_slice())));
    let policy = read_policy(doc);
    let endorsed_by_shard = read_endorsed(doc);
    let endorsed = endorsed_by_shard.values().flatten().copied().collect();
    MapState {
        name,
        inc,
        created,
        created_by,
        expires,
        removed,
        updated,
        revision,
        policy,
        endorsed,
        endorsed_by_shard,
    }
}

/// The shard heads endorsed when the map got its first permission entry or a writer lost
/// `Write` (`g<shard>` slots; concurrent endorsements all count).
pub(super) fn read_endorsed(doc: &Automerge) -> BTreeMap<u16, Vec<ChangeHash>> {
    let mut out: BTreeMap<u16, Vec<ChangeHash>> = BTreeMap::new();
    for k in doc.keys(ROOT) {
        let Some(index) = k.strip_prefix('g').and_then(|i| i.parse::<u16>().ok()) else {
            continue;
        };
        for (v, _) in doc.get_all(ROOT, k.as_str()).unwrap_or_default() {
            if let Value::Scalar(s) = v {
                if let ScalarValue::Bytes(b) = s.as_ref() {
                    let list = out.entry(index).or_default();
                    for h in b.chunks_exact(32) {
                        if let Ok(h) = ChangeHash::try_from(h) {
                            if !list.contains(&h) {
                                list.push(h);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The permissions a map document says, at its heads or at `at`.
pub(crate) fn policy_at(doc: &Automerge, at: Option<&[ChangeHash]>) -> crate::policy::Policy {
    match at {
        None => read_policy(doc),
        Some(heads) => match doc.fork_at(heads) {
            Ok(d) => read_policy(&d),
            // Unknown dependencies: nobody may do anything there.
            Err(_) => crate::policy::Policy::from_entries([(String::new(), 0)]),
        },
    }
}

pub(super) fn read_policy(doc: &Automerge) -> crate::policy::Policy {
    let mut entries = Vec::new();
    for k in doc.keys(ROOT) {
        let Some(id) = crate::policy::identity_of_slot(&k) else {
            continue;
        };
        let flags = match doc.get(ROOT, k.as_str()).ok().flatten() {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Uint(u) => u8::try_from(*u & 7).ok(),
                ScalarValue::Int(i) => u8::try_from(*i & 7).ok(),
                _ => None,
            },
            _ => None,
        };
        if let Some(f) = flags {
            entries.push((id.to_string(), f));
        }
    }
    crate::policy::Policy::from_entries(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_bytes(stamp: u64, writer: u8) -> Vec<u8> {
        ItemMeta {
            stamp,
            created: Timestamp::from_millis(1),
            updated: Timestamp::from_millis(2),
            expires: None,
            created_by: NodeId([1; 16]),
            writer: NodeId([writer; 16]),
        }
        .encode()
    }

    #[test]
    fn an_item_is_its_whole_value_with_update_fields_on_top() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(
            ROOT,
            layout::meta_key("k"),
            ScalarValue::Bytes(meta_bytes(5, 2)),
        )
        .unwrap();
        tx.put(ROOT, layout::whole_key("k"), r#"{"a":1,"b":2}"#)
            .unwrap();
        tx.put(ROOT, layout::field_key("k", "b"), 3).unwrap();
        tx.put(ROOT, layout::field_key("k", "c"), "x").unwrap();
        tx.commit();
        let raw = read_item(&doc, "k", Some(&field_index(&doc))).unwrap();
        assert_eq!(
            Json::Object(raw.data),
            serde_json::json!({"a": 1, "b": 3, "c": "x"})
        );
        assert_eq!(raw.meta.stamp, 5);
        assert!(!raw.conflicted);
        assert!(read_item(&doc, "other", Some(&field_index(&doc))).is_none());
    }

    #[test]
    fn garbage_in_a_whole_slot_reads_as_no_whole_value() {
        for garbage in [
            ScalarValue::Str("not json".into()),
            ScalarValue::Str("[1,2]".into()),
            ScalarValue::Int(7),
        ] {
            let mut doc = Automerge::new();
            let mut tx = doc.transaction();
            tx.put(
                ROOT,
                layout::meta_key("k"),
                ScalarValue::Bytes(meta_bytes(1, 2)),
            )
            .unwrap();
            tx.put(ROOT, layout::whole_key("k"), garbage).unwrap();
            tx.put(ROOT, layout::field_key("k", "f"), 1).unwrap();
            tx.commit();
            let raw = read_item(&doc, "k", Some(&field_index(&doc))).unwrap();
            assert_eq!(Json::Object(raw.data), serde_json::json!({"f": 1}));
        }
    }

    #[test]
    fn concurrent_whole_values_pick_one_and_say_so() {
        let mut a = Automerge::new();
        let mut b = Automerge::new();
        for (doc, v, w) in [(&mut a, r#"{"x":1}"#, 2), (&mut b, r#"{"y":2}"#, 3)] {
            let mut tx = doc.transaction();
            tx.put(
                ROOT,
                layout::meta_key("k"),
                ScalarValue::Bytes(meta_bytes(1, w)),
            )
            .unwrap();
            tx.put(ROOT, layout::whole_key("k"), v).unwrap();
            tx.commit();
        }
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        let (ra, rb) = (
            read_item(&a, "k", Some(&field_index(&a))).unwrap(),
            read_item(&b, "k", Some(&field_index(&b))).unwrap(),
        );
        assert_eq!(ra.data, rb.data);
        assert!(ra.conflicted && rb.conflicted);
        let d = Json::Object(ra.data);
        assert!(d == serde_json::json!({"x": 1}) || d == serde_json::json!({"y": 2}));
    }
}
