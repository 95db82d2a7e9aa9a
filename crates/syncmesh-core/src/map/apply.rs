//! Merging a peer's changes: deduplication, documents waiting for their map document or
//! incarnation, one `apply_changes` per shard with a patch log, and the re-read of every item
//! the changes touched (view updates and events).

use super::*;

impl MapReplica {
    /// Merges encoded changes from a peer into one document of the map. Duplicates are ignored,
    /// changes whose dependencies are missing wait inside Automerge until those arrive.
    /// Undecodable input is refused as a whole and changes nothing.
    pub fn apply_changes(
        &mut self,
        doc: DocAddr,
        changes: &[Vec<u8>],
        now: Timestamp,
    ) -> Result<()> {
        let mut decoded = Vec::with_capacity(changes.len());
        let mut slots = BTreeSet::new();
        for (i, bytes) in changes.iter().enumerate() {
            let c = Change::from_bytes(bytes.clone())
                .map_err(|e| Error::InvalidChange(format!("change {i}: {e}")))?;
            // Scanned before anything is applied: a malformed change is refused here, and the
            // scan is what applying needs anyway.
            let keys = crate::am::root_map_keys(&c).ok_or_else(|| {
                Error::InvalidChange(format!("change {i}: operations name unlisted actors"))
            })?;
            slots.extend(keys);
            decoded.push(c);
        }
        self.apply_checked(doc, decoded, Checked(slots), now)
    }

    /// Merges decoded changes from a peer that the caller already checked, like
    /// [`Self::apply_changes`]; `checked` comes from [`check_changes`] on the same changes
    /// (it saves decoding them again).
    pub fn apply_checked(
        &mut self,
        doc: DocAddr,
        changes: Vec<Change>,
        checked: Checked,
        now: Timestamp,
    ) -> Result<()> {
        self.prescanned = Some(checked.0);
        let r = self.apply_remote(doc, changes, now);
        self.prescanned = None;
        r
    }

    /// Applies changes from a peer and keeps the new ones for [`Self::take_received`].
    pub(super) fn apply_remote(
        &mut self,
        doc: DocAddr,
        changes: Vec<Change>,
        now: Timestamp,
    ) -> Result<()> {
        if let DocAddr::Shard { index, .. } = doc {
            if index >= SHARDS {
                return Err(Error::InvalidChange(format!(
                    "shard {index} out of range (0..{SHARDS})"
                )));
            }
        }
        let fate = self.fate(doc);
        if fate == Fate::Dead {
            return Ok(()); // its items are gone for good: nothing to apply or store
        }
        if let (Fate::Current, DocAddr::Shard { index, gen, .. }) = (fate, doc) {
            if self.shards.contains_key(&index) && self.shard_gen(index)? != gen {
                // Another generation than the shard's: changes of a newer one being taken
                // from a peer go into it (nothing is stored until this replica moves to it);
                // any other is not this replica's document.
                if self.staged.get(&index).is_some_and(|(g, _)| *g == gen) {
                    if let Some(d) = self.generation_doc(index, gen, now)? {
                        d.apply_changes(changes)
                            .map_err(|e| Error::InvalidChange(e.to_string()))?;
                    }
                    return self.adopt_staged(index, now);
                }
                return Ok(());
            }
        }
        let mut fresh = Vec::with_capacity(changes.len());
        let mut seen = HashSet::with_capacity(changes.len());
        for c in changes {
            let h = c.hash();
            let known = match fate {
                Fate::Waiting => self.future_hashes.contains(&(doc, h)),
                _ => self.knows(doc, &h)?,
            };
            if !known && seen.insert(h) {
                fresh.push(c);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let bytes: Vec<Vec<u8>> = fresh.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let hashes: Vec<ChangeHash> = fresh.iter().map(Change::hash).collect();
        if let Err(e) = self.apply_decoded(doc, fresh, now) {
            // Those of a refused batch that Automerge took before the refused one are stored
            // like any other.
            for (b, h) in bytes.into_iter().zip(&hashes) {
                if fate != Fate::Waiting && self.knows(doc, h)? {
                    self.received.push((doc, b));
                }
            }
            return Err(e);
        }
        self.received.extend(bytes.into_iter().map(|b| (doc, b)));
        // Only a document with changes waiting for dependencies can have queued some of these.
        if fate != Fate::Waiting && self.missing_deps(doc)? {
            if self.queued_hashes.len() > 100_000 {
                // Bounded: at worst a queued change sent again is stored once more.
                self.queued_hashes.clear();
            }
            for h in hashes {
                if !self.knows(doc, &h)? {
                    self.queued_hashes.insert((doc, h));
                }
            }
        }
        Ok(())
    }

    /// Whether a document holds a change (a document this replica does not hold has none).
    pub fn has_change(&mut self, doc: DocAddr, hash: &ChangeHash) -> bool {
        self.knows(doc, hash).unwrap_or(false)
    }

    /// Whether a document already holds a change (changes for documents this replica does
    /// not hold yet count as unknown).
    pub(super) fn knows(&mut self, doc: DocAddr, hash: &ChangeHash) -> Result<bool> {
        if self.queued_hashes.contains(&(doc, *hash)) {
            return Ok(true);
        }
        match doc {
            DocAddr::Meta => Ok(crate::am::has_change(&self.meta_doc, hash)),
            DocAddr::Shard { inc, index, gen } => {
                if inc != self.state.inc || !self.state.exists() {
                    return Ok(false);
                }
                match self.shards.get_mut(&index) {
                    Some(sh) => {
                        Ok(sh.generation()? == gen && crate::am::has_change(sh.doc()?, hash))
                    }
                    None => Ok(false),
                }
            }
        }
    }

    /// How many merged changes wait for [`Self::take_received`] (a call that raised it merged
    /// something new).
    pub fn received_len(&self) -> usize {
        self.received.len()
    }

    /// Takes the changes merged from peers since the last call, for storage (they are not to
    /// be sent on: the network relays them itself).
    pub fn take_received(&mut self) -> Vec<(DocAddr, Vec<u8>)> {
        std::mem::take(&mut self.received)
    }
}

impl MapReplica {
    /// What becomes of changes to `doc`: shards of a removed incarnation are dead, shards of
    /// an incarnation this replica has not seen created yet wait for the map document.
    pub(super) fn fate(&self, doc: DocAddr) -> Fate {
        match doc {
            DocAddr::Meta => Fate::Current,
            DocAddr::Shard { inc, .. } => {
                if inc < self.state.inc || (inc == self.state.inc && self.state.removed.is_some()) {
                    Fate::Dead
                } else if inc > self.state.inc || !self.state.exists() {
                    Fate::Waiting
                } else {
                    Fate::Current
                }
            }
        }
    }

    pub(super) fn apply_decoded(
        &mut self,
        doc: DocAddr,
        changes: Vec<Change>,
        now: Timestamp,
    ) -> Result<()> {
        match doc {
            DocAddr::Meta => {
                // Slots scanned for a shard's changes are no use here (nor to a shard this
                // replays).
                self.prescanned = None;
                let r = self
                    .meta_doc
                    .apply_changes(changes)
                    .map_err(|e| Error::InvalidChange(e.to_string()));
                // Automerge applies a batch change by change: after a refused one, those
                // before it are in, and the state must show them.
                self.refresh_map_state(false, now);
                r
            }
            DocAddr::Shard { index, gen, .. } => {
                if index >= SHARDS {
                    return Err(Error::InvalidChange(format!(
                        "shard {index} out of range (0..{SHARDS})"
                    )));
                }
                match self.fate(doc) {
                    Fate::Dead => return Ok(()), // an old incarnation: its items are gone for good
                    Fate::Current => {}
                    Fate::Waiting => {
                        let bytes: usize = self
                            .future
                            .iter()
                            .map(|(_, c)| c.raw_bytes().len())
                            .chain(changes.iter().map(|c| c.raw_bytes().len()))
                            .sum();
                        if self.future.len() + changes.len() > MAX_FUTURE_CHANGES
                            || bytes > MAX_FUTURE_BYTES
                        {
                            return Err(Error::InvalidChange(format!(
                            "more than {MAX_FUTURE_CHANGES} changes wait for map {}'s document; send it first",
                            self.sid
                        )));
                        }
                        for c in changes {
                            if self.future_hashes.insert((doc, c.hash())) {
                                self.future.push((doc, c));
                            }
                        }
                        return Ok(());
                    }
                }
                if !self.shards.contains_key(&index) && gen != 0 {
                    // Nothing held of the shard: the peer's generation is simply the shard.
                    self.generation_doc(index, gen, now)?;
                }
                if self.shard_gen(index)? != gen {
                    // Another generation of the shard: another document (see `apply_remote`).
                    return Ok(());
                }
                self.apply_to_shard(index, changes, now)
            }
        }
    }

    pub(super) fn apply_to_shard(
        &mut self,
        index: u16,
        changes: Vec<Change>,
        now: Timestamp,
    ) -> Result<()> {
        self.flush_shard(index, now)?;
        // Slots the changes write at the root. Patches alone miss a concurrent value that loses
        // to the current winner (nothing visible changes), yet it changes the revision.
        // Read them from what was applied, not from what was given: a change that waited for
        // a missing dependency is applied together with it.
        let prescanned = self.prescanned.take();
        let added: u64 = changes.iter().map(|c| c.len() as u64).sum();
        let doc = self.shard_mut(index).doc()?;
        // Only a document holding such waiting changes needs the (costlier) exact answer.
        let waiting = !doc.get_missing_deps(&[]).is_empty();
        let before = waiting.then(|| doc.get_heads());
        let mut slots: BTreeSet<String> = match (&before, prescanned) {
            (None, Some(pre)) => pre,
            _ => BTreeSet::new(),
        };
        // A change with no root operation scans to nothing: scanning twice is harmless.
        let scan_now = before.is_none() && slots.is_empty();
        let mut scan = |c: &Change| {
            for k in crate::am::root_map_keys(c).unwrap_or_default() {
                slots.insert(k);
            }
        };
        if scan_now {
            changes.iter().for_each(&mut scan);
        }
        let mut log = crate::am::patch_log();
        if let Err(e) = doc.apply_changes_log_patches(changes, &mut log) {
            // Automerge applies a batch change by change (a reused sequence number is found
            // only when its change comes up): those before the refused one are in. Rare, so
            // the whole shard is read again rather than worked out from the patches.
            self.reread_shard(index, now)?;
            return Err(Error::InvalidChange(e.to_string()));
        }
        let patches = doc.make_patches(&mut log);
        // Counted once applied (a parked shard was loaded above with its own count).
        if let Some(sh) = self.shards.get_mut(&index) {
            sh.ops += added;
        }
        let doc = self.shard_mut(index).doc()?;
        if let Some(before) = before {
            crate::am::for_each_change_since(doc, &before, &mut scan);
        }
        // Touched items, and whether the changes touched an update field slot of theirs.
        let mut touched: BTreeMap<String, bool> = BTreeMap::new();
        let nested = patches.iter().map(|p| match p.path.first() {
            Some((_, Prop::Map(k))) => Some(k.as_str()),
            Some(_) => None,
            None => match &p.action {
                PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                    Some(key.as_str())
                }
                PatchAction::Conflict { prop: Prop::Map(k) }
                | PatchAction::Increment {
                    prop: Prop::Map(k), ..
                } => Some(k.as_str()),
                _ => None,
            },
        });
        for root_key in nested.chain(slots.iter().map(|s| Some(s.as_str()))) {
            if let Some(slot) = root_key.and_then(layout::parse_slot) {
                let key = slot.key();
                if layout::belongs(key, index) {
                    let field = matches!(slot, Slot::Field(..));
                    *touched.entry(key.to_string()).or_default() |= field;
                }
            }
        }
        self.shard_mut(index).note_slots(&slots);
        for (key, fields_touched) in touched {
            // Unless the changes wrote field slots of the item, those it had are still there:
            // none if the view knows it had none.
            let scan = fields_touched
                || !self
                    .view
                    .get(key.as_str())
                    .is_some_and(|s| s.meta.no_fields);
            self.reread_item(index, key, scan, now)?;
        }
        Ok(())
    }

    /// Reads an item back from its shard document into the view, with its event.
    pub(super) fn reread_item(
        &mut self,
        index: u16,
        key: String,
        scan: bool,
        now: Timestamp,
    ) -> Result<()> {
        let (fresh, seen_stamp) = {
            let (doc, fields) = self.shard_mut(index).parts()?;
            let st = read_item(doc, &key, scan.then_some(&*fields));
            let s = st.as_ref().map_or(0, |s| s.max_stamp);
            (st, s)
        };
        self.clock = self.clock.max(seen_stamp);
        let Some(raw) = fresh else {
            self.replace_view(&key, None, false, now);
            return Ok(());
        };
        // The event's item is built from what was read (the view keeps it as text).
        let item = Item {
            key: key.clone(),
            data: raw.data.clone(),
            revision: Revision::from_hash(raw.revision),
            date_created: raw.meta.created,
            date_updated: raw.meta.updated,
            // as the view keeps it (see `ItemState::new`)
            date_expires: raw
                .meta
                .expires
                .map(|e| Timestamp::from_millis(e.millis().max(i64::MIN + 1))),
            created_by: raw.meta.created_by,
        };
        let st = ItemState::from_raw(raw, &mut self.nodes);
        if st.expired(now) {
            // Already dead here: remove it for everyone rather than show it.
            self.view_set_for_expired(&key, now);
        } else {
            self.replace_view_with(&key, Some(st), Some(&item), false, now);
        }
        Ok(())
    }

    /// Reads every item of a shard back (after a batch Automerge applied only in part): the
    /// field-slot index is rebuilt, and items the view has there but the document no longer
    /// holds are removed.
    pub(super) fn reread_shard(&mut self, index: u16, now: Timestamp) -> Result<()> {
        let sh = self.shard_mut(index);
        sh.fields = None;
        let (doc, _) = sh.parts()?;
        let mut keys: BTreeSet<String> = item_keys(doc, index).into_iter().collect();
        let ops = crate::am::op_count(doc);
        self.shard_mut(index).ops = ops;
        keys.extend(
            self.view
                .keys()
                .filter(|k| layout::shard_of(k) == index)
                .map(|k| k.to_string()),
        );
        for key in keys {
            self.reread_item(index, key, true, now)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_change_merged_twice_changes_nothing_the_second_time() {
        let mut a = replica(1);
        let mut b = blank(2);
        send(&mut a, &mut b, t(0));
        b.take_events();
        b.take_received();
        a.set(
            "k",
            obj(serde_json::json!({"v": 1})),
            &WriteOptions::default(),
            t(1),
        )
        .unwrap();
        a.flush(t(1)).unwrap();
        let out = a.take_outgoing();
        for _ in 0..2 {
            for c in &out {
                b.apply_changes(c.doc, std::slice::from_ref(&c.bytes), t(1))
                    .unwrap();
            }
        }
        let events = b.take_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            matches!(&events[0].kind, EventKind::ItemAdded { item } if !events[0].is_local && item.key == "k")
        );
        assert_eq!(b.take_received().len(), out.len(), "stored once");
        assert_eq!(b.get("k", t(1)).unwrap(), a.get("k", t(1)).unwrap());
    }
}
