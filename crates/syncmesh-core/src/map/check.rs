//! Validation of what peers send before anything is applied: every root slot a change writes
//! must belong to the document's layout, sync messages are decoded and their bloom filters
//! checked, and which changes need the `Manage` permission.

use super::*;

/// Whether a map-document root key is one this layout writes (`inc`, `name`, or a per-
/// incarnation field letter followed by the incarnation number).
pub(super) fn is_meta_key(k: &str) -> bool {
    if k == "inc" || k == "name" || crate::policy::identity_of_slot(k).is_some() {
        return true;
    }
    let mut chars = k.chars();
    let tag_ok = matches!(chars.next(), Some('c' | 'b' | 'e' | 'r' | 'u' | 'g'));
    let digits = chars.as_str();
    tag_ok
        && !digits.is_empty()
        && digits.len() <= 20
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() > 1 && digits.starts_with('0'))
}

/// Root slots written by changes that passed [`check_changes`], so that applying them
/// ([`MapReplica::apply_checked`]) need not decode them again.
#[derive(Debug, Default)]
pub struct Checked(pub(super) BTreeSet<String>);

/// Checks that a peer's change writes only what the map layout allows in that document: in a
/// shard, root slots of valid keys that belong to it; in the map document, its known fields.
/// Anything else is a broken or hostile peer: the change is refused.
pub fn check_change(doc: DocAddr, change: &Change) -> Result<()> {
    check_changes(doc, std::slice::from_ref(change)).map(|_| ())
}

/// [`check_change`] for several changes of one document.
pub fn check_changes(doc: DocAddr, changes: &[Change]) -> Result<Checked> {
    if let DocAddr::Shard { index, .. } = doc {
        if index >= SHARDS {
            return Err(Error::InvalidChange(format!(
                "shard {index} out of range (0..{SHARDS})"
            )));
        }
    }
    let mut slots = BTreeSet::new();
    for change in changes {
        // Inside an item's object or list value any JSON shape is fine: only root operations.
        let ops = crate::am::root_ops(change).ok_or_else(|| {
            Error::InvalidChange("a change whose operations name actors it does not list".into())
        })?;
        for op in ops {
            let crate::am::RootOp::Key(k) = &op else {
                return Err(Error::InvalidChange(
                    "a sequence operation on a document root".into(),
                ));
            };
            let ok = match doc {
                DocAddr::Meta => is_meta_key(k),
                DocAddr::Shard { index, gen, .. } => {
                    layout::parse_slot(k).is_some_and(|s| layout::belongs(s.key(), index))
                        // A generation's first change records its cut.
                        || (k == crate::generation::CUT_KEY
                            && gen != 0
                            && change.deps().is_empty())
                }
            };
            if !ok {
                return Err(Error::InvalidChange(format!(
                    "root key {k:?} does not belong in {doc:?}"
                )));
            }
            slots.insert(k.to_string());
        }
    }
    Ok(Checked(slots))
}

/// A peer's sync message, decoded and checked: its changes are separated from it (they are
/// merged by [`MapReplica::sync_apply`], with events).
pub struct DecodedSync {
    pub(super) msg: sync::Message,
    pub(super) changes: Vec<Change>,
    pub(super) checked: Checked,
}

impl DecodedSync {
    /// Whether the sender says it holds nothing of the document (no heads).
    pub fn holds_nothing(&self) -> bool {
        self.msg.heads.is_empty()
    }

    /// How many changes the message carries.
    pub fn change_count(&self) -> usize {
        self.changes.len()
    }

    /// The changes the message carries.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// The message without its changes, and without the heads they made (a peer that may
    /// not write keeps its changes; were its heads kept, this node would ask for them again
    /// and again). `known` tells the changes this node has.
    pub fn without_changes(self, mut known: impl FnMut(&ChangeHash) -> bool) -> DecodedSync {
        let mut msg = self.msg;
        msg.heads.retain(|h| known(h));
        DecodedSync {
            msg,
            changes: Vec::new(),
            checked: Checked::default(),
        }
    }

    /// The message with only the changes in `keep`, and without the heads of the others
    /// (see [`Self::without_changes`]). `known` tells the changes this node has.
    pub fn retain_changes(
        self,
        keep: &HashSet<ChangeHash>,
        mut known: impl FnMut(&ChangeHash) -> bool,
    ) -> DecodedSync {
        let mut msg = self.msg;
        msg.heads.retain(|h| keep.contains(h) || known(h));
        let changes = self
            .changes
            .into_iter()
            .filter(|c| keep.contains(&c.hash()))
            .collect();
        DecodedSync {
            msg,
            changes,
            checked: self.checked,
        }
    }
}

/// Decodes a peer's sync message for `doc` and checks everything that does not depend on this
/// replica: the format (version 1 only, so every change can be checked before it is applied),
/// the bloom filters (Automerge trusts their parameters: zero bits would divide by zero, a huge
/// probe count would allocate gigabytes), and every change ([`check_changes`]).
pub fn decode_sync(doc: DocAddr, bytes: &[u8]) -> Result<DecodedSync> {
    let mut msg = sync::Message::decode(bytes)
        .map_err(|e| Error::InvalidChange(format!("sync message: {e}")))?;
    if msg.version != sync::MessageVersion::V1 {
        return Err(Error::InvalidChange(
            "sync messages must be version 1".into(),
        ));
    }
    crate::am::plain_sync_message(&mut msg);
    if msg.have.len() > 16 {
        return Err(Error::InvalidChange("too many bloom filters".into()));
    }
    for h in &msg.have {
        check_bloom(&h.bloom.to_bytes())?;
    }
    let mut changes = Vec::with_capacity(msg.changes.len());
    for (i, chunk) in msg.changes.iter().enumerate() {
        let c = Change::from_bytes(chunk.to_vec())
            .map_err(|e| Error::InvalidChange(format!("sync message change {i}: {e}")))?;
        changes.push(c);
    }
    let checked = check_changes(doc, &changes)?;
    msg.changes = sync::ChunkList::from(Vec::<Vec<u8>>::new());
    Ok(DecodedSync {
        msg,
        changes,
        checked,
    })
}

/// Checks an encoded bloom filter's parameters (entries, bits per entry, probes).
pub(super) fn check_bloom(b: &[u8]) -> Result<()> {
    pub(super) fn leb(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    if b.is_empty() {
        return Ok(()); // an empty filter
    }
    let mut at = 0;
    let bad = || Error::InvalidChange("malformed bloom filter".into());
    let entries = leb(b, &mut at).ok_or_else(bad)?;
    let bits = leb(b, &mut at).ok_or_else(bad)?;
    let probes = leb(b, &mut at).ok_or_else(bad)?;
    if entries > 0 && (!(1..=64).contains(&bits) || !(1..=32).contains(&probes)) {
        return Err(bad());
    }
    Ok(())
}

/// Whether a change of the map document needs the `Manage` permission: it changes permission
/// entries or removes the map. Other map-document changes need `Write`.
pub fn needs_manage(change: &Change) -> bool {
    // A malformed change needs the most (it is refused by `check_changes` anyway).
    let Some(keys) = crate::am::root_map_keys(change) else {
        return true;
    };
    keys.iter().any(|k| {
        k.starts_with(crate::policy::PREFIX)
            || ((k.starts_with('r') || k.starts_with('g'))
                && k.len() > 1
                && k[1..].bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_document_keys() {
        for ok in ["inc", "name", "c1", "r0", "g12", "b7", "e3", "u9"] {
            assert!(is_meta_key(ok), "{ok}");
        }
        for bad in ["", "c", "c01", "x1", "c1a", "m1:k", "incx"] {
            assert!(!is_meta_key(bad), "{bad}");
        }
    }

    #[test]
    fn a_slot_of_another_shard_is_refused() {
        let mut doc = automerge::AutoCommit::new();
        let key = "k";
        let home = layout::shard_of(key);
        doc.put(ROOT, layout::whole_key(key), "{}").unwrap();
        doc.commit();
        let change = crate::am::all_changes(doc.document()).remove(0);
        let here = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: home,
        };
        let elsewhere = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: (home + 1) % SHARDS,
        };
        assert!(check_change(here, &change).is_ok());
        assert!(check_change(elsewhere, &change).is_err());
        assert!(check_change(DocAddr::Meta, &change).is_err());
    }
}
