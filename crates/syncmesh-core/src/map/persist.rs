//! Persistence: snapshots and change logs of each document, the read view's entries as a store
//! keeps them, and loading a map back from either.

use super::*;

impl MapReplica {
    // ----- persistence -----

    /// A snapshot (Automerge `save`) of one document, queued writes flushed first, so a store
    /// can replace that document's stored changes with it. `None` if the map holds no such
    /// document (another incarnation, or a shard never written).
    pub fn snapshot(&mut self, doc: DocAddr, now: Timestamp) -> Result<Option<Vec<u8>>> {
        match doc {
            DocAddr::Meta => Ok(Some(self.meta_doc.save())),
            DocAddr::Shard { inc, index, .. } => {
                if inc != self.state.inc || index >= SHARDS {
                    return Ok(None);
                }
                self.flush_shard(index, now)?;
                match self.shards.get_mut(&index) {
                    Some(sh) => sh.saved().map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// How the read view changed since the last call, so a store can keep a copy of it and
    /// reopen a map without replaying its Automerge documents ([`Self::restore`]).
    ///
    /// Queued writes are flushed first, so the entries never run ahead of the changes: store
    /// both (and [`Self::take_outgoing`], taken after this) in one atomic commit.
    pub fn take_view_changes(&mut self, now: Timestamp) -> Result<ViewChanges> {
        self.flush(now)?;
        let reset = std::mem::take(&mut self.view_reset);
        let keys = std::mem::take(&mut self.dirty_keys);
        let entries = keys
            .into_iter()
            .map(|k| {
                let e = self
                    .view
                    .get(k.as_str())
                    .map(|st| encode_entry(st, &self.nodes));
                (k, e)
            })
            .collect();
        Ok(ViewChanges { reset, entries })
    }

    /// Reopens a map from stored state: its documents ([`StoredDoc`]) and the view entries kept
    /// from [`Self::take_view_changes`]. Shard documents stay parked until first used, so this
    /// costs one pass over the entries. Emits no events; numbering continues after
    /// `last_event_id`.
    pub fn restore(
        id: Identity,
        sid: MapSid,
        docs: Vec<(DocAddr, StoredDoc)>,
        entries: impl IntoIterator<Item = (String, Vec<u8>)>,
        last_event_id: u64,
    ) -> Result<Self> {
        let mut m = MapReplica::empty(id, sid);
        m.set_last_event_id(last_event_id);
        let mut shard_docs = Vec::new();
        for (addr, bytes) in docs {
            match addr {
                DocAddr::Meta => m.meta_doc = bytes.load(&m.actor, "map document")?,
                DocAddr::Shard { inc, index, .. } => shard_docs.push((inc, index, bytes)),
            }
        }
        m.state = read_map_state(&m.meta_doc);
        m.removal_announced = m.state.removed.is_some();
        for (inc, index, bytes) in shard_docs {
            if index >= SHARDS {
                continue;
            }
            let current = m.state.exists() && m.state.removed.is_none() && inc == m.state.inc;
            let waiting = !m.state.exists() || inc > m.state.inc;
            if waiting {
                // Changes that arrived before their map document: they wait again, as they
                // did before the restart.
                // Waiting for a map document, so of its first generation.
                let doc = DocAddr::Shard { inc, index, gen: 0 };
                for c in bytes.decode_changes("waiting shard document")? {
                    if m.future_hashes.insert((doc, c.hash())) {
                        m.future.push((doc, c));
                    }
                }
                continue;
            }
            if !current {
                continue;
            }
            m.shards.insert(index, Shard::cold(bytes, &m.actor));
        }
        if !m.state.live_or_expired() {
            return Ok(m);
        }
        let entries = entries.into_iter();
        let mut view = Vec::with_capacity(entries.size_hint().0);
        for (key, bytes) in entries {
            let st = decode_entry(&bytes, &mut m.nodes)
                .ok_or_else(|| Error::Corrupt(format!("stored view entry of item {key:?}")))?;
            m.clock = m.clock.max(st.max_stamp);
            m.last_change = m.last_change.max(st.meta.updated());
            if let Some(e) = st.meta.expires() {
                m.expiry.insert((e, key.clone()));
            }
            view.push((key, st));
        }
        // Stores hand entries over in key order: collecting builds the tree in one pass.
        m.view = view
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v))
            .collect();
        Ok(m)
    }

    /// Every document of the map, saved (compacted) for storage or a full transfer.
    /// Queued writes are flushed first.
    pub fn save_all(&mut self, now: Timestamp) -> Result<Vec<(DocAddr, Vec<u8>)>> {
        self.flush(now)?;
        let mut out = vec![(DocAddr::Meta, self.meta_doc.save())];
        let inc = self.state.inc;
        for (i, s) in self.shards.iter_mut() {
            let gen = s.generation()?;
            out.push((
                DocAddr::Shard {
                    inc,
                    index: *i,
                    gen,
                },
                s.saved()?,
            ));
        }
        Ok(out)
    }

    /// Rebuilds a replica from saved documents (as from [`Self::save_all`]). Emits no events.
    pub fn load(
        id: Identity,
        sid: MapSid,
        docs: &[(DocAddr, Vec<u8>)],
        now: Timestamp,
    ) -> Result<Self> {
        let mut m = MapReplica::empty(id, sid);
        for (addr, bytes) in docs {
            if *addr == DocAddr::Meta {
                let mut d = Automerge::load(bytes)
                    .map_err(|e| Error::Corrupt(format!("map document: {e}")))?;
                d.set_actor(m.actor.clone());
                m.meta_doc = d;
            }
        }
        m.state = read_map_state(&m.meta_doc);
        m.removal_announced = m.state.removed.is_some();
        if !m.state.live(now) && m.state.removed.is_some() {
            return Ok(m);
        }
        for (addr, bytes) in docs {
            if let DocAddr::Shard { inc, index, .. } = *addr {
                if inc != m.state.inc || index >= SHARDS {
                    continue;
                }
                let mut d = Automerge::load(bytes)
                    .map_err(|e| Error::Corrupt(format!("shard {index}: {e}")))?;
                d.set_actor(m.actor.clone());
                let keys = item_keys(&d, index);
                let fields = field_index(&d);
                for k in keys {
                    if let Some(raw) = read_item(&d, &k, Some(&fields)) {
                        let st = ItemState::from_raw(raw, &mut m.nodes);
                        m.clock = m.clock.max(st.max_stamp);
                        m.last_change = m.last_change.max(st.meta.updated());
                        if let Some(e) = st.meta.expires() {
                            m.expiry.insert((e, k.clone()));
                        }
                        m.view.insert(k.into(), st);
                    }
                }
                // The view is built; the document waits, compressed, until first used.
                let stored = StoredDoc {
                    snapshot: Some(bytes.clone()),
                    changes: Vec::new(),
                };
                m.shards.insert(index, Shard::cold(stored, &m.actor));
            }
        }
        Ok(m)
    }

    /// Every live item, in key order (for tests and exports).
    pub fn all_items(&self, now: Timestamp) -> Vec<Item> {
        self.view
            .iter()
            .filter(|(_, s)| !s.expired(now))
            .map(|(k, s)| s.to_item(k, &self.nodes))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn view_changes_are_taken_once_and_saved_documents_load_back_the_same() {
        let mut m = replica(1);
        let opts = WriteOptions::default();
        m.set("a", obj(serde_json::json!({"x": 1})), &opts, t(1))
            .unwrap();
        m.update("b", obj(serde_json::json!({"y": [1, 2]})), &opts, t(1))
            .unwrap();
        m.remove("a", None, t(2)).unwrap();
        let v = m.take_view_changes(t(2)).unwrap();
        let keys: Vec<(&str, bool)> = v
            .entries
            .iter()
            .map(|(k, e)| (k.as_str(), e.is_some()))
            .collect();
        assert_eq!(keys, [("a", false), ("b", true)]);
        assert!(m.take_view_changes(t(2)).unwrap().entries.is_empty());
        let docs = m.save_all(t(2)).unwrap();
        let id = Identity::new(NodeId([1; 16]), &[1]);
        let loaded = MapReplica::load(id, MapSid::for_name("m"), &docs, t(2)).unwrap();
        assert_eq!(loaded.all_items(t(2)), m.all_items(t(2)));
        assert_eq!(loaded.unique_name(), Some("m"));
    }
}
