//! History cuts of shard documents (issue 17): a shard's document is replaced by its next
//! generation ([`crate::generation`]), which holds its state at the cut heads and, carried onto
//! it, every change the cut did not include, so memory and disk follow the live items rather
//! than the number of writes the shard has seen.
//!
//! What a cut keeps is what a reader sees: every item's value, meta record (dates, TTL,
//! creator) and revision, and every unresolved conflict with the same winner. A cut at the
//! shard's own heads changes nothing visible and emits no event; changes carried onto a cut
//! made at earlier heads are re-read like a peer's changes (events where an item changed).

use super::*;
use crate::generation;
use automerge::ObjId;

/// What a shard document holds of its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardHistory {
    /// Its generation: how many times its history was cut (0: never).
    pub gen: u64,
    /// Operations it holds, history included.
    pub ops: u64,
    /// Root slots it shows now (an item's meta record, whole value and updated fields): what
    /// a cut brings the operations back to, plus one for the cut record.
    pub slots: u64,
}

/// Which of a shard slot's concurrent values a new generation writes as the winner: the one
/// readers show. An item's visible meta record is the one written with its visible whole value
/// (same actor, see `visible_meta`), which need not be the meta slot's own winner: written
/// by the genesis's first change, both keep sharing an actor.
fn shard_chooser(doc: &Automerge, key: &str, values: &[(Value<'_>, ObjId)]) -> Option<usize> {
    match layout::parse_slot(key)? {
        Slot::Meta(item) => {
            let wholes = doc.get_all(ROOT, layout::whole_key(item).as_str()).ok()?;
            let whole = visible_whole(&wholes).map(|(_, id)| id.clone());
            visible_meta(values, whole.as_ref()).map(|(_, i)| i)
        }
        Slot::Whole(_) => values.iter().rposition(|(v, _)| decode_whole(v).is_some()),
        Slot::Field(..) => None,
    }
}

impl Shard {
    /// The document's generation ([`generation::gen_id`]), loading it if it is parked and its
    /// generation unknown.
    pub(super) fn generation(&mut self) -> Result<u64> {
        if let Some(g) = self.gen {
            return Ok(g);
        }
        let g = generation::gen_id(self.doc()?);
        self.gen = Some(g);
        Ok(g)
    }
}

impl MapReplica {
    /// The generation of shard `index` ([`generation::gen_id`]; 0 for a shard never cut or
    /// not held).
    pub fn shard_gen(&mut self, index: u16) -> Result<u64> {
        match self.shards.get_mut(&index) {
            Some(sh) => sh.generation(),
            None => Ok(0),
        }
    }
}

impl MapReplica {
    /// Names shard `index` of the current incarnation among every document of every map, so
    /// that generations of different documents never share an actor.
    fn shard_seed(&self, index: u16) -> Vec<u8> {
        let mut seed = self.sid.as_str().as_bytes().to_vec();
        seed.push(0);
        seed.extend_from_slice(&self.state.inc.to_be_bytes());
        seed.extend_from_slice(&index.to_be_bytes());
        seed
    }

    /// Indices of the shard documents the map holds (of its current incarnation).
    pub fn shard_indices(&self) -> Vec<u16> {
        self.shards.keys().copied().collect()
    }

    /// The history shard `index` holds; `None` if the map has no such shard document. Loads a
    /// parked shard.
    pub fn shard_history(&mut self, index: u16) -> Result<Option<ShardHistory>> {
        let Some(sh) = self.shards.get_mut(&index) else {
            return Ok(None);
        };
        let gen = generation::gen_number(sh.generation()?);
        let doc = sh.doc()?;
        Ok(Some(ShardHistory {
            gen,
            ops: crate::am::op_count(doc),
            slots: doc.length(ROOT) as u64,
        }))
    }

    /// Cuts the history of shard `index` at `heads` (its own heads if `None`): its document
    /// becomes the next generation, holding the state at `heads` with every change made or
    /// received since carried onto it. Returns the new generation, or `None` if the shard
    /// cannot be cut now: the map holds no such shard, some of its changes wait for
    /// dependencies, changes of it are still to be taken for storage
    /// ([`Self::take_outgoing`], [`Self::take_received`]: the store must hold the whole old
    /// generation when the new one replaces it), or the map has permission entries (whose
    /// signed history a cut would drop; not supported yet).
    ///
    /// The shell then stores [`Self::snapshot`] of the shard in place of every change it
    /// stored for it.
    pub fn cut_shard(
        &mut self,
        index: u16,
        heads: Option<&[ChangeHash]>,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        if index >= SHARDS
            || !self.state.live_or_expired()
            || !self.state.policy.is_open()
            || !self.shards.contains_key(&index)
        {
            return Ok(None);
        }
        self.flush_shard(index, now)?;
        let of_shard = |d: &DocAddr| matches!(d, DocAddr::Shard { index: i, .. } if *i == index);
        if self.outbox.iter().any(|c| of_shard(&c.doc))
            || self.received.iter().any(|(d, _)| of_shard(d))
        {
            return Ok(None);
        }
        let seed = self.shard_seed(index);
        let actor = self.actor.clone();
        let sh = self.shard_mut(index);
        let gen = generation::gen_number(sh.generation()?);
        let doc = sh.doc()?;
        if !doc.get_missing_deps(&[]).is_empty() {
            return Ok(None);
        }
        let heads = heads.map_or_else(|| doc.get_heads(), <[ChangeHash]>::to_vec);
        if heads.is_empty() {
            return Ok(None);
        }
        let (mut new, record) = generation::rebase(&seed, gen + 1, doc, &heads, &shard_chooser)?;
        new.set_actor(actor);
        // Items that changes carried onto the new generation wrote: they may read otherwise
        // now (a carried change replaces what the cut held rather than conflicting with it).
        let mut touched: BTreeSet<String> = BTreeSet::new();
        crate::am::for_each_change_since(&new, &[], |c| {
            if c.deps().is_empty() {
                return;
            }
            for k in crate::am::root_map_keys(c).unwrap_or_default() {
                if let Some(slot) = layout::parse_slot(&k) {
                    touched.insert(slot.key().to_string());
                }
            }
        });
        sh.ops = crate::am::op_count(&new);
        let id = generation::gen_id(&new);
        sh.body = Body::Live(Box::new(new));
        sh.fields = None;
        sh.cold_heads = None;
        sh.gen = Some(id);
        // What was kept about single changes of the old generation means nothing now.
        self.queued_hashes.retain(|(d, _)| !of_shard(d));
        self.wanted.retain(|(d, _)| !of_shard(d));
        for key in touched {
            if layout::belongs(&key, index) {
                self.reread_item(index, key, true, now)?;
            }
        }
        Ok(Some(record.gen))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// Everything a reader sees of a map: items (value, dates, revision, TTL) and conflicts.
    fn seen(m: &mut MapReplica, now: Timestamp) -> Vec<(Item, ItemConflicts)> {
        m.all_items(now)
            .into_iter()
            .map(|i| {
                let c = m.conflicts(&i.key, now).unwrap();
                (i, c)
            })
            .collect()
    }

    fn cut_all(m: &mut MapReplica, now: Timestamp) -> u64 {
        m.flush(now).unwrap();
        m.take_outgoing();
        m.take_received();
        let shards: Vec<u16> = m.shards.keys().copied().collect();
        let mut cut = 0;
        for i in shards {
            if m.cut_shard(i, None, now).unwrap().is_some() {
                cut += 1;
            }
        }
        cut
    }

    #[test]
    fn a_cut_keeps_every_item_revision_ttl_and_conflict_and_emits_nothing() {
        let mut a = replica(1);
        let mut b = blank(2);
        send(&mut a, &mut b, t(0));
        let opts = WriteOptions::default();
        for round in 0..20 {
            for k in ["x", "y", "z"] {
                a.set(
                    k,
                    obj(serde_json::json!({ "v": round, "k": k })),
                    &opts,
                    t(round),
                )
                .unwrap();
            }
            a.flush(t(round)).unwrap();
        }
        a.set(
            "ttl",
            obj(serde_json::json!({"v": 1})),
            &WriteOptions::ttl(crate::limits::Ttl::from_secs(3600).unwrap()),
            t(30),
        )
        .unwrap();
        send(&mut a, &mut b, t(31));
        // Concurrent whole writes of x and updates of y: conflicts.
        a.set("x", obj(serde_json::json!({"v": "a"})), &opts, t(40))
            .unwrap();
        b.set("x", obj(serde_json::json!({"v": "b"})), &opts, t(40))
            .unwrap();
        a.update("y", obj(serde_json::json!({"f": "a"})), &opts, t(41))
            .unwrap();
        b.update("y", obj(serde_json::json!({"f": "b"})), &opts, t(41))
            .unwrap();
        send(&mut a, &mut b, t(42));
        send(&mut b, &mut a, t(42));
        a.take_events();
        let before = seen(&mut a, t(50));
        assert_eq!(before, seen(&mut b, t(50)));
        assert!(
            before.iter().any(|(_, c)| c.values.len() == 2),
            "{before:?}"
        );
        let x = layout::shard_of("x");
        let z = layout::shard_of("z");
        assert!(z != x && z != layout::shard_of("y"));
        let held = a.shard_history(x).unwrap().unwrap();
        assert!(cut_all(&mut a, t(50)) > 0);
        let after = a.shard_history(x).unwrap().unwrap();
        assert_eq!(after.gen, held.gen + 1);
        assert!(after.ops < held.ops / 4, "{held:?} -> {after:?}");
        let z_after = a.shard_history(z).unwrap().unwrap();
        assert_eq!(
            z_after.ops, z_after.slots,
            "one operation per slot: {z_after:?}"
        );
        assert_eq!(seen(&mut a, t(50)), before);
        assert!(a.take_events().is_empty(), "nothing visible changed");
        // Cut again: the next generation, the same items.
        assert!(cut_all(&mut a, t(51)) > 0);
        assert_eq!(a.shard_history(x).unwrap().unwrap().gen, held.gen + 2);
        assert_eq!(seen(&mut a, t(51)), before);
        // Writes go on after the cut, and the map reloads from what a store would keep.
        a.set("x", obj(serde_json::json!({"v": "after"})), &opts, t(60))
            .unwrap();
        a.flush(t(60)).unwrap();
        let saved = a.save_all(t(60)).unwrap();
        let mut back = MapReplica::load(
            Identity::new(NodeId([1; 16]), &[9]),
            MapSid::for_name("m"),
            &saved,
            t(61),
        )
        .unwrap();
        assert_eq!(seen(&mut back, t(61)), seen(&mut a, t(61)));
        assert_eq!(back.shard_history(x).unwrap().unwrap().gen, held.gen + 2);
    }

    #[test]
    fn a_cut_at_earlier_heads_carries_what_came_after_with_its_events() {
        let mut a = replica(1);
        let mut b = blank(2);
        let opts = WriteOptions::default();
        a.set("k", obj(serde_json::json!({"v": 0})), &opts, t(1))
            .unwrap();
        send(&mut a, &mut b, t(1));
        let index = layout::shard_of("k");
        let cut_heads = a.shards.get_mut(&index).unwrap().heads().unwrap();
        // B writes k after the cut point; A takes it before cutting.
        b.set("k", obj(serde_json::json!({"v": "late"})), &opts, t(2))
            .unwrap();
        send(&mut b, &mut a, t(2));
        a.take_received();
        a.take_events();
        let before = a.get("k", t(3)).unwrap();
        assert_eq!(a.cut_shard(index, Some(&cut_heads), t(3)).unwrap(), Some(1));
        assert_eq!(
            a.get("k", t(3)).unwrap(),
            before,
            "the late write still wins"
        );
        assert!(a.take_events().is_empty());
        // Changes waiting to be stored, or for dependencies, hold a cut back.
        a.set("k", obj(serde_json::json!({"v": 9})), &opts, t(4))
            .unwrap();
        assert_eq!(a.cut_shard(index, None, t(4)).unwrap(), None);
        a.take_outgoing();
        assert_eq!(a.cut_shard(index, None, t(4)).unwrap(), Some(2));
        assert_eq!(a.cut_shard(SHARDS, None, t(4)).unwrap(), None);
    }
}
