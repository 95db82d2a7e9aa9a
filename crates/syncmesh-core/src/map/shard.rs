//! Shard documents, live or parked as saved bytes, and the budget that parks the least recently
//! used ones.

use super::*;

/// A shard document is either in memory or kept as its saved (compressed) bytes: Automerge
/// holds ~300 bytes per item plus ~10 KiB per document in memory against ~25 bytes per item
/// saved, so idle shards are parked ([`MapReplica::unload_idle`]) and reloaded on use.
pub(super) enum Body {
    /// Boxed: an `Automerge` is ~3.5 KiB inline, which a parked shard should not pay.
    Live(Box<Automerge>),
    Cold(StoredDoc),
}

/// A document as a store keeps it: a saved snapshot (Automerge's `save`) and the changes made
/// or received after it, in any order (changes whose dependencies are missing wait inside
/// Automerge until those arrive, as they do when received from a peer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// Output of `save()`, if a snapshot was taken.
    pub snapshot: Option<Vec<u8>>,
    /// Encoded changes after the snapshot.
    pub changes: Vec<Vec<u8>>,
}

impl StoredDoc {
    /// Every change it holds, decoded (including ones whose dependencies are missing).
    pub(super) fn decode_changes(&self, what: &str) -> Result<Vec<Change>> {
        let mut out = match &self.snapshot {
            Some(s) => crate::am::all_changes(
                &Automerge::load(s)
                    .map_err(|e| Error::Corrupt(format!("{what}: snapshot: {e}")))?,
            ),
            None => Vec::new(),
        };
        for (i, c) in self.changes.iter().enumerate() {
            out.push(
                Change::from_bytes(c.clone())
                    .map_err(|e| Error::Corrupt(format!("{what}: change {i}: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Rebuilds the document; `what` names it in errors.
    pub(super) fn load(&self, actor: &ActorId, what: &str) -> Result<Automerge> {
        let mut d = match &self.snapshot {
            Some(s) => {
                Automerge::load(s).map_err(|e| Error::Corrupt(format!("{what}: snapshot: {e}")))?
            }
            None => Automerge::new(),
        };
        let mut changes = Vec::with_capacity(self.changes.len());
        for (i, c) in self.changes.iter().enumerate() {
            changes.push(
                Change::from_bytes(c.clone())
                    .map_err(|e| Error::Corrupt(format!("{what}: change {i}: {e}")))?,
            );
        }
        d.apply_changes(changes)
            .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
        d.set_actor(actor.clone());
        Ok(d)
    }
}

/// Estimated heap of a live shard document: per operation it holds (history included) and
/// per document (Automerge 0.6; calibrated with `benches/engine.rs`, which prints the estimate
/// next to the measured heap: ~570 B per operation at 100k and at 1M items with whole values,
/// whose one operation per write carries the item's JSON text).
pub const LIVE_OP_BYTES: u64 = 560;
/// See [`LIVE_OP_BYTES`].
pub const LIVE_DOC_BYTES: u64 = 12 * 1024;

pub(super) struct Shard {
    pub(super) body: Body,
    pub(super) actor: ActorId,
    pub(super) pending: BTreeMap<String, Pending>,
    pub(super) last_used: u64,
    /// Operations the live document holds (0 while parked), for [`MapReplica::live_bytes`].
    pub(super) ops: u64,
    /// Heads of a parked document, so digests for replication need not load it.
    pub(super) cold_heads: Option<Vec<ChangeHash>>,
    /// Root keys of the field slots the live document may hold (a superset: deleted ones stay
    /// until it is parked), built on first use ([`field_index`]) and kept up to date by
    /// flushes and merges.
    pub(super) fields: Option<BTreeSet<String>>,
    /// The document's history generation ([`crate::generation`]), once known: read from its
    /// genesis when it is first loaded.
    pub(super) gen: Option<u64>,
    /// Operations the document held when it became this generation or was loaded (what
    /// history is counted from); `None` for a document never cut nor loaded.
    pub(super) base_ops: Option<u64>,
}

impl Shard {
    pub(super) fn new(actor: &ActorId) -> Self {
        let mut doc = Automerge::new();
        doc.set_actor(actor.clone());
        Shard::with_body(Body::Live(Box::new(doc)), actor)
    }

    /// A parked shard: its document stays as stored until first used.
    pub(super) fn cold(stored: StoredDoc, actor: &ActorId) -> Self {
        Shard::with_body(Body::Cold(stored), actor)
    }

    fn with_body(body: Body, actor: &ActorId) -> Self {
        Shard {
            body,
            actor: actor.clone(),
            pending: BTreeMap::new(),
            last_used: 0,
            ops: 0,
            cold_heads: None,
            fields: None,
            gen: None,
            base_ops: None,
        }
    }

    /// Estimated heap of the document while live; 0 when parked.
    pub(super) fn live_bytes(&self) -> u64 {
        match self.body {
            Body::Live(_) => LIVE_DOC_BYTES + self.ops * LIVE_OP_BYTES,
            Body::Cold(_) => 0,
        }
    }

    /// The document's heads (a parked one is loaded only if its heads are not known).
    pub(super) fn heads(&mut self) -> Result<Vec<ChangeHash>> {
        if let (Body::Cold(_), Some(h)) = (&self.body, &self.cold_heads) {
            return Ok(h.clone());
        }
        Ok(self.doc()?.get_heads())
    }

    /// The document, loading it if it was parked.
    pub(super) fn doc(&mut self) -> Result<&mut Automerge> {
        if let Body::Cold(stored) = &self.body {
            let d = stored.load(&self.actor, "shard document")?;
            self.ops = crate::am::op_count(&d);
            self.gen = Some(crate::generation::gen_id(&d));
            if self.gen != Some(0) {
                self.base_ops.get_or_insert(self.ops);
            }
            self.body = Body::Live(Box::new(d));
        }
        match &mut self.body {
            Body::Live(d) => Ok(d),
            Body::Cold(_) => Err(Error::Corrupt("shard document failed to load".into())),
        }
    }

    /// The live document (loaded if parked) and its field-slot index.
    pub(super) fn parts(&mut self) -> Result<(&mut Automerge, &mut BTreeSet<String>)> {
        self.doc()?;
        let Body::Live(d) = &mut self.body else {
            return Err(Error::Corrupt("shard document failed to load".into()));
        };
        let idx = self.fields.get_or_insert_with(|| field_index(d));
        Ok((d, idx))
    }

    /// Records root keys the document was just given (those of field slots enter the index).
    pub(super) fn note_slots<'a>(&mut self, slots: impl IntoIterator<Item = &'a String>) {
        if let Some(idx) = &mut self.fields {
            idx.extend(slots.into_iter().filter(|s| s.starts_with('f')).cloned());
        }
    }

    /// Replaces a live document by its saved bytes; false if it was already parked.
    pub(super) fn park(&mut self) -> bool {
        let Body::Live(d) = &self.body else {
            return false;
        };
        let mut saved = d.save();
        // save() over-allocates; parked bytes are kept for a long time.
        saved.shrink_to_fit();
        self.cold_heads = Some(d.get_heads());
        self.ops = 0;
        self.fields = None;
        self.body = Body::Cold(StoredDoc {
            snapshot: Some(saved),
            changes: Vec::new(),
        });
        true
    }

    pub(super) fn saved(&mut self) -> Result<Vec<u8>> {
        match &self.body {
            Body::Live(d) => Ok(d.save()),
            Body::Cold(StoredDoc {
                snapshot: Some(s),
                changes,
            }) if changes.is_empty() => Ok(s.clone()),
            Body::Cold(_) => Ok(self.doc()?.save()),
        }
    }
}

impl MapReplica {
    pub(super) fn shard_mut(&mut self, index: u16) -> &mut Shard {
        let actor = &self.actor;
        self.use_counter += 1;
        let sh = self
            .shards
            .entry(index)
            .or_insert_with(|| Shard::new(actor));
        sh.last_used = self.use_counter;
        sh
    }

    /// Parks every idle shard document except the `keep` most recently used ones, as saved
    /// bytes (see `Body`). Returns how many were parked. Queued writes are flushed first.
    pub fn unload_idle(&mut self, keep: usize, now: Timestamp) -> Result<usize> {
        self.flush(now)?;
        let mut live: Vec<(u64, u16)> = self
            .shards
            .iter()
            .filter_map(|(i, s)| match s {
                Shard {
                    body: Body::Live(_),
                    last_used,
                    ..
                } => Some((*last_used, *i)),
                _ => None,
            })
            .collect();
        live.sort_unstable_by(|a, b| b.cmp(a));
        let mut parked = 0;
        for (_, i) in live.into_iter().skip(keep) {
            if self.shards.get_mut(&i).is_some_and(Shard::park) {
                parked += 1;
            }
        }
        Ok(parked)
    }

    /// A mark of how far use has gone: shards not used after a mark is taken can later be
    /// parked with [`Self::park_unused_since`].
    pub fn use_mark(&self) -> u64 {
        self.use_counter
    }

    /// Parks every shard document not used since `mark` (from [`Self::use_mark`]). A shell calls
    /// this periodically so that idle shards leave memory while busy ones stay loaded.
    pub fn park_unused_since(&mut self, mark: u64, now: Timestamp) -> Result<usize> {
        self.flush(now)?;
        let mut parked = 0;
        for sh in self.shards.values_mut() {
            if sh.last_used <= mark && sh.park() {
                parked += 1;
            }
        }
        Ok(parked)
    }

    /// Estimated heap of the shard documents held in memory (`LIVE_OP_BYTES`).
    pub fn live_bytes(&self) -> u64 {
        self.shards.values().map(Shard::live_bytes).sum()
    }

    /// Parks the least recently used shard documents not used since `mark` (a
    /// [`Self::use_mark`]) until about `bytes` of estimated heap is freed (or none is left);
    /// returns the estimate freed. Shards in use are never parked, so a working set larger
    /// than the budget is not reloaded on every use. Queued writes are flushed first.
    pub fn park_lru(&mut self, bytes: u64, mark: u64, now: Timestamp) -> Result<u64> {
        self.park_lru_at_most(bytes, mark, now, usize::MAX)
    }

    /// [`Self::park_lru`], parking at most `shards` documents: each costs a save, so a caller
    /// that must stay responsive parks a few at a time.
    pub fn park_lru_at_most(
        &mut self,
        bytes: u64,
        mark: u64,
        now: Timestamp,
        shards: usize,
    ) -> Result<u64> {
        self.flush(now)?;
        let mut live: Vec<(u64, u16, u64)> = self
            .shards
            .iter()
            .filter(|(_, s)| s.last_used <= mark)
            .map(|(i, s)| (s.last_used, *i, s.live_bytes()))
            .filter(|(_, _, b)| *b > 0)
            .collect();
        live.sort_unstable();
        let mut freed = 0;
        let mut parked = 0;
        for (_, i, b) in live {
            if freed >= bytes || parked >= shards {
                break;
            }
            if self.shards.get_mut(&i).is_some_and(Shard::park) {
                freed += b;
                parked += 1;
            }
        }
        Ok(freed)
    }

    /// Number of shard documents held in memory (not parked).
    pub fn live_shards(&self) -> usize {
        self.shards
            .values()
            .filter(|s| matches!(s.body, Body::Live(_)))
            .count()
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    pub(super) fn parking_for_the_budget_spares_shards_in_use_and_counts_operations() {
        let now = Timestamp::from_millis(1);
        let id = Identity::new(NodeId([1; 16]), &[1; 8]);
        let mut m = MapReplica::create(id, MapSid::for_name("b"), Some("b"), None, now).unwrap();
        let data = |i: i64| {
            serde_json::json!({ "i": i })
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
        for i in 0..200 {
            m.set(&format!("k{i}"), data(i), &WriteOptions::default(), now)
                .unwrap();
        }
        m.flush(now).unwrap();
        let live = m.live_bytes();
        assert!(live >= 200 * 2 * LIVE_OP_BYTES, "{live}");
        let mark = m.use_mark();
        m.set("k1", data(-1), &WriteOptions::default(), now)
            .unwrap();
        // A few at a time when asked: one shard per call here.
        let shards = m.live_shards();
        let one = m.park_lru_at_most(u64::MAX, mark, now, 1).unwrap();
        assert!(one > 0);
        assert_eq!(m.live_shards(), shards - 1);
        let freed = one + m.park_lru(u64::MAX, mark, now).unwrap();
        assert!(freed > 0);
        assert_eq!(
            m.live_shards(),
            1,
            "only the shard used after the mark stays"
        );
        assert_eq!(m.get("k1", now).unwrap().data["i"], -1);
        // What is left is that one small shard (its flushed write included).
        let left = m.live_bytes();
        assert!(
            left > live - freed && left < LIVE_DOC_BYTES + 16 * LIVE_OP_BYTES,
            "{left}"
        );
    }
}
