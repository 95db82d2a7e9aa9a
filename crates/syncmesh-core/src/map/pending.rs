//! The write-behind queue: operations queue slot writes per shard, and a flush commits them as
//! one Automerge change per group of items (a peer never sees half of a write).

use super::*;

#[derive(Debug, Clone)]
pub(super) enum Pending {
    /// An item's whole data (its JSON text), replacing every field slot the writer saw.
    Whole(Box<str>),
    /// One field written by an update, on top of the whole data.
    Field(Json),
    /// The meta record, and whether the write creates the item.
    Meta(Vec<u8>, bool),
    Delete,
}

impl MapReplica {
    // ----- changes in and out -----

    /// Commits every queued write as one Automerge change per touched shard. Returns how many
    /// changes were made; they wait in [`Self::take_outgoing`].
    pub fn flush(&mut self, now: Timestamp) -> Result<usize> {
        let dirty: Vec<u16> = std::mem::take(&mut self.dirty).into_iter().collect();
        let before = self.outbox.len();
        for s in dirty {
            self.flush_shard(s, now)?;
        }
        Ok(self.outbox.len() - before)
    }

    /// Whether writes are queued that [`Self::flush`] would commit.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub(super) fn flush_shard(&mut self, index: u16, now: Timestamp) -> Result<()> {
        let Some(sh) = self.shards.get_mut(&index) else {
            return Ok(());
        };
        self.dirty.remove(&index);
        if sh.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut sh.pending);
        let gen = match sh.generation() {
            Ok(g) => g,
            Err(e) => {
                sh.pending = pending;
                self.dirty.insert(index);
                return Err(e);
            }
        };
        let (doc, fields) = match sh.parts() {
            Ok(d) => d,
            Err(e) => {
                // the queued writes stay queued
                sh.pending = pending;
                self.dirty.insert(index);
                return Err(e);
            }
        };
        // One change per group of items keeps every change small enough to gossip whole and
        // cheap to apply, however many writes one shard got in a batch.
        let groups = item_groups(&pending);
        let mut done = 0;
        let mut failed = None;
        let mut added = 0;
        for group in &groups {
            let mut tx = doc.transaction();
            if let Err(e) = write_pending(&mut tx, group, &pending, fields) {
                // Dropping the transaction rolls it back; this group and later ones stay queued.
                drop(tx);
                failed = Some(e);
                break;
            }
            let (hash, _) = tx.commit_with(commit_opts(now));
            fields.extend(
                group
                    .iter()
                    .filter(|(_, op)| matches!(op, Pending::Field(_)))
                    .map(|(slot, _)| slot.to_string()),
            );
            if let Some(hash) = hash {
                // Item changes are signed only where authors matter: maps with entries.
                if !self.state.policy.is_open() {
                    if let Some(sig) = self.id.signer.as_ref().and_then(|k| k.sign(&hash)) {
                        self.sigs.insert(hash, sig.clone());
                        self.new_sigs.push((hash, sig));
                    }
                }
                if let Some((ops, bytes)) = crate::am::with_last_local_change(doc, |ch| {
                    (ch.len() as u64, ch.raw_bytes().to_vec())
                }) {
                    added += ops;
                    self.outbox.push(OutgoingChange {
                        map: self.sid.clone(),
                        doc: DocAddr::Shard {
                            inc: self.state.inc,
                            index,
                            gen,
                        },
                        bytes,
                    });
                }
            }
            done += 1;
        }
        sh.ops += added;
        if let Some(e) = failed {
            let left: BTreeMap<String, Pending> = groups[done..]
                .iter()
                .flatten()
                .map(|(slot, _)| (slot.to_string(), pending[*slot].clone()))
                .collect();
            sh.pending = left;
            self.dirty.insert(index);
            return Err(e);
        }
        Ok(())
    }
}

/// Most items one change of a shard document carries. An item's slots hold at most
/// [`limits::MAX_DATA_BYTES`] of data, so a change stays well under the gossip limit
/// ([`crate::replication::MAX_GOSSIP_MESSAGE`]).
pub const MAX_ITEMS_PER_CHANGE: usize = 32;

/// Queued slot writes grouped into changes of at most [`MAX_ITEMS_PER_CHANGE`] items, every
/// slot of one item in the same group (a peer never sees half of a write).
pub(super) fn item_groups(pending: &BTreeMap<String, Pending>) -> Vec<Vec<(&str, &Pending)>> {
    let metas = pending.keys().filter(|k| k.starts_with('m')).count();
    if metas <= MAX_ITEMS_PER_CHANGE {
        return vec![pending.iter().map(|(k, v)| (k.as_str(), v)).collect()];
    }
    let mut by_item: BTreeMap<&str, Vec<(&str, &Pending)>> = BTreeMap::new();
    for (slot, op) in pending {
        let key = layout::parse_slot(slot).map_or("", |s| s.key());
        by_item.entry(key).or_default().push((slot.as_str(), op));
    }
    let mut groups = Vec::new();
    let mut cur: Vec<(&str, &Pending)> = Vec::new();
    let mut items = 0;
    for (_, slots) in by_item {
        if items == MAX_ITEMS_PER_CHANGE {
            groups.push(std::mem::take(&mut cur));
            items = 0;
        }
        cur.extend(slots);
        items += 1;
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    groups
}

/// Applies queued slot writes to a transaction; `all` is everything queued for the shard.
/// `fields` indexes the document's field slots ([`field_index`]).
pub(super) fn write_pending(
    tx: &mut automerge::transaction::Transaction<'_>,
    group: &[(&str, &Pending)],
    all: &BTreeMap<String, Pending>,
    fields: &BTreeSet<String>,
) -> Result<()> {
    for &(slot, op) in group {
        match op {
            Pending::Whole(text) => {
                if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                    clear_item_slots(tx, key, all, fields, false)?;
                }
                tx.put(ROOT, slot, ScalarValue::Str(text.as_ref().into()))
                    .map_err(tx_err)?
            }
            Pending::Field(v) => match json::encode(v) {
                Encoded::Scalar(s) => tx.put(ROOT, slot, s).map_err(tx_err)?,
                Encoded::Object(v) => json::put_object(tx, &ROOT, slot, v).map_err(tx_err)?,
            },
            Pending::Meta(b, fresh) => {
                if *fresh {
                    // A new item: slots left by a foreign writer without a meta slot would
                    // otherwise join it on every other replica.
                    if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                        clear_item_slots(tx, key, all, fields, true)?;
                    }
                }
                tx.put(ROOT, slot, ScalarValue::Bytes(b.clone()))
                    .map_err(tx_err)?
            }
            Pending::Delete => {
                if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                    clear_item_slots(tx, key, all, fields, true)?;
                }
                if tx.get(ROOT, slot).map_err(tx_err)?.is_some() {
                    tx.delete(ROOT, slot).map_err(tx_err)?;
                }
            }
        }
    }
    Ok(())
}

/// Deletes the field slots of `key` the document holds (and its whole slot if `whole`),
/// except those written by the same flush (`all`).
pub(super) fn clear_item_slots(
    tx: &mut automerge::transaction::Transaction<'_>,
    key: &str,
    all: &BTreeMap<String, Pending>,
    fields: &BTreeSet<String>,
    whole: bool,
) -> Result<()> {
    for f in indexed_fields(fields, key) {
        if !all.contains_key(&f) && tx.get(ROOT, f.as_str()).map_err(tx_err)?.is_some() {
            tx.delete(ROOT, f.as_str()).map_err(tx_err)?;
        }
    }
    if whole {
        let wk = layout::whole_key(key);
        if !all.contains_key(&wk) && tx.get(ROOT, wk.as_str()).map_err(tx_err)?.is_some() {
            tx.delete(ROOT, wk.as_str()).map_err(tx_err)?;
        }
    }
    Ok(())
}

/// Drops the queued field writes of `key` (a later whole write or delete replaces them).
pub(super) fn drop_pending_fields(pending: &mut BTreeMap<String, Pending>, key: &str) {
    let prefix = layout::field_prefix(key);
    let queued: Vec<String> = pending
        .range(prefix.clone()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for k in queued {
        pending.remove(&k);
    }
}

/// The slot writes that turn `old` into `new`: only fields whose values changed.
pub(super) fn diff_slots(
    key: &str,
    old: Option<&JsonObject>,
    new: &JsonObject,
) -> Vec<(String, Pending)> {
    let mut ops = Vec::new();
    if let Some(old) = old {
        for field in old.keys() {
            if !new.contains_key(field) {
                ops.push((layout::field_key(key, field), Pending::Delete));
            }
        }
    }
    for (field, v) in new {
        if old.and_then(|o| o.get(field)) != Some(v) {
            ops.push((layout::field_key(key, field), Pending::Field(v.clone())));
        }
    }
    ops
}

pub(super) fn commit_opts(now: Timestamp) -> CommitOptions {
    CommitOptions::default().with_time(now.millis() / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Pending {
        Pending::Meta(vec![1], false)
    }

    #[test]
    fn groups_keep_each_item_whole_and_stay_bounded() {
        let mut pending = BTreeMap::new();
        for i in 0..(MAX_ITEMS_PER_CHANGE * 2 + 5) {
            let key = format!("k{i:03}");
            pending.insert(layout::meta_key(&key), meta());
            pending.insert(layout::whole_key(&key), Pending::Whole("{}".into()));
            pending.insert(layout::field_key(&key, "f"), Pending::Field(Json::from(1)));
        }
        let groups = item_groups(&pending);
        assert_eq!(groups.len(), 3);
        let mut seen = 0;
        for g in &groups {
            let keys: BTreeSet<&str> = g
                .iter()
                .filter_map(|(s, _)| layout::parse_slot(s).map(|s| s.key()))
                .collect();
            assert!(keys.len() <= MAX_ITEMS_PER_CHANGE);
            // every slot of an item is in the group that has its meta slot
            assert_eq!(g.len(), keys.len() * 3);
            seen += g.len();
        }
        assert_eq!(seen, pending.len());
        // a small queue is one group
        let small: BTreeMap<String, Pending> = pending.into_iter().take(9).collect();
        assert_eq!(item_groups(&small).len(), 1);
    }

    #[test]
    fn dropping_queued_fields_touches_only_that_key() {
        let mut pending = BTreeMap::new();
        for key in ["a", "ab", "b"] {
            pending.insert(layout::field_key(key, "x"), Pending::Field(Json::from(1)));
            pending.insert(layout::meta_key(key), meta());
        }
        drop_pending_fields(&mut pending, "a");
        assert!(!pending.contains_key(&layout::field_key("a", "x")));
        assert!(pending.contains_key(&layout::meta_key("a")));
        assert!(pending.contains_key(&layout::field_key("ab", "x")));
        assert!(pending.contains_key(&layout::field_key("b", "x")));
    }

    #[test]
    fn an_update_writes_only_changed_fields() {
        let old: JsonObject = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        let new: JsonObject = serde_json::from_str(r#"{"a":1,"b":3,"c":4}"#).unwrap();
        let slots: Vec<String> = diff_slots("k", Some(&old), &new)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            slots,
            [layout::field_key("k", "b"), layout::field_key("k", "c")]
        );
    }
}
