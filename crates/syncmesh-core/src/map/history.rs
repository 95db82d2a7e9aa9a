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
    /// Root slots it shows now (an item's meta record, whole value and updated fields).
    pub slots: u64,
    /// Operations its current generation began with (its state's own, nested values
    /// included): what a cut brings the operations back to.
    pub base: u64,
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
    /// Whether generation `gen` of a shard now at `current` is one to take from a peer: a
    /// higher number, or the same number cut elsewhere (which of the two stays is decided
    /// once its first changes are here, see [`Self::adopt_staged`]). Maps with permission
    /// entries are not cut (their signed history would go), so never take one.
    pub(super) fn may_stage(&self, current: u64, gen: u64) -> bool {
        self.state.policy.is_open()
            && gen != current
            && generation::gen_number(gen) >= generation::gen_number(current)
    }

    /// The document of generation `gen` of shard `index`: the shard's own if it is that
    /// generation (queued writes flushed), else a staged one if `gen` is newer (made empty if
    /// need be), else `None`.
    pub(super) fn generation_doc(
        &mut self,
        index: u16,
        gen: u64,
        now: Timestamp,
    ) -> Result<Option<&mut Automerge>> {
        let current = self.shard_gen(index)?;
        if current == gen || !self.shards.contains_key(&index) {
            if !self.shards.contains_key(&index) && gen != 0 {
                // Nothing here yet: the peer's generation is simply the shard.
                let mut doc = Automerge::new();
                doc.set_actor(self.actor.clone());
                let sh = self.shard_mut(index);
                sh.body = Body::Live(Box::new(doc));
                sh.gen = Some(gen);
            }
            self.flush_shard(index, now)?;
            return Ok(Some(self.shard_mut(index).doc()?));
        }
        if !self.may_stage(current, gen) {
            return Ok(None);
        }
        let actor = self.actor.clone();
        let slot = self
            .staged
            .entry(index)
            .or_insert_with(|| (gen, Automerge::new()));
        if slot.0 != gen {
            *slot = (gen, Automerge::new());
        }
        slot.1.set_actor(actor);
        Ok(Some(&mut slot.1))
    }

    /// Moves shard `index` to the generation staged for it once its first changes are here,
    /// if it is the one to keep: a higher number, or of the same number the one whose cut
    /// included more (two cuts of one number from peers that all agreed on heads are nested;
    /// else the higher id). Every change of the shard's own generation that the new one does
    /// not include is carried onto it and goes out as this replica's change; items are read
    /// again (events where one now reads otherwise).
    pub fn adopt_staged(&mut self, index: u16, now: Timestamp) -> Result<()> {
        let Some((gen, doc)) = self.staged.get(&index) else {
            return Ok(());
        };
        let gen = *gen;
        let Some(theirs) = generation::CutRecord::of(doc) else {
            return Ok(()); // its first changes are not here yet
        };
        // All of its first changes, and the generation it was addressed as: until then the
        // changes carried onto it would stand on other dependencies than elsewhere.
        if generation::gen_id(doc) != gen {
            return Ok(());
        }
        self.flush_shard(index, now)?;
        let current = self.shard_gen(index)?;
        let ours = self
            .shards
            .get_mut(&index)
            .map(|sh| sh.doc().map(|d| generation::CutRecord::of(d)))
            .transpose()?
            .flatten();
        let n = generation::gen_number(current);
        let take = match theirs.gen.cmp(&n) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => match &ours {
                Some(o) if o.clock.covers(&theirs.clock) && o.clock != theirs.clock => false,
                Some(o) if theirs.clock.covers(&o.clock) && o.clock != theirs.clock => true,
                _ => gen > current,
            },
        };
        let Some((_, mut target)) = self.staged.remove(&index) else {
            return Ok(());
        };
        if !take {
            return Ok(());
        }
        if theirs.gen > n + 1 {
            tracing::warn!(
                map = %self.sid,
                "shard {index} moves from generation {n} to {}: changes of its own it made meanwhile cannot be told from those the cuts it missed included, and are not carried",
                theirs.gen
            );
        }
        target.set_actor(self.actor.clone());
        let before: HashSet<ChangeHash> = crate::am::all_changes(&target)
            .iter()
            .map(Change::hash)
            .collect();
        let base = generation::genesis_heads(&target);
        if theirs.gen <= n + 1 {
            let source = self.shard_mut(index).doc()?;
            let same_number = theirs.gen == n;
            generation::carry_all(&mut target, source, &base, |c| {
                if !same_number {
                    return theirs.clock.includes_change(c);
                }
                // Of the same number: our own first changes hold what their cut included
                // too (cuts of one number are nested); a carried change is included if its
                // origin is.
                if c.deps().is_empty() {
                    return true;
                }
                let o = generation::Origin::of(c);
                o.hash != c.hash() && theirs.clock.includes(&o.actor, o.seq)
            })?;
        }
        let inc = self.state.inc;
        for c in crate::am::all_changes(&target) {
            if !before.contains(&c.hash()) {
                self.outbox.push(OutgoingChange {
                    map: self.sid.clone(),
                    doc: DocAddr::Shard { inc, index, gen },
                    bytes: c.raw_bytes().to_vec(),
                });
            }
        }
        let of_shard = |d: &DocAddr| matches!(d, DocAddr::Shard { index: i, .. } if *i == index);
        let sh = self.shard_mut(index);
        sh.ops = crate::am::op_count(&target);
        sh.base_ops = Some(sh.ops);
        sh.body = Body::Live(Box::new(target));
        sh.fields = None;
        sh.cold_heads = None;
        sh.gen = Some(gen);
        self.queued_hashes.retain(|(d, _)| !of_shard(d));
        self.wanted.retain(|(d, _)| !of_shard(d));
        self.replaced.insert(index);
        self.reread_shard(index, now)
    }

    /// Takes the shards whose document became another generation since the last call: a
    /// store replaces everything it keeps of each by [`Self::snapshot`] of it.
    pub fn take_replaced(&mut self) -> Vec<DocAddr> {
        let inc = self.state.inc;
        std::mem::take(&mut self.replaced)
            .into_iter()
            .map(|index| DocAddr::Shard {
                inc,
                index,
                gen: self.shards.get(&index).and_then(|s| s.gen).unwrap_or(0),
            })
            .collect()
    }

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

    /// The history of every shard held in memory (parked ones are not loaded for this).
    pub fn live_history(&mut self) -> Vec<(u16, ShardHistory)> {
        self.shards
            .iter_mut()
            .filter_map(|(i, sh)| {
                let Body::Live(doc) = &sh.body else {
                    return None;
                };
                let slots = doc.length(ROOT) as u64;
                let gen = match sh.gen {
                    Some(g) => g,
                    None => generation::gen_id(doc),
                };
                Some((
                    *i,
                    ShardHistory {
                        gen: generation::gen_number(gen),
                        ops: sh.ops,
                        slots,
                        base: sh.base_ops.unwrap_or(slots),
                    },
                ))
            })
            .collect()
    }

    /// Loaded shards whose documents hold more than `history` operations beyond their live
    /// slots, and at least as many as those (so a shard's history may always be as large as
    /// its state): the shards to cut.
    pub fn shards_with_history(&mut self, history: u64) -> Vec<u16> {
        self.live_history()
            .into_iter()
            .filter(|(_, h)| h.ops > h.base.max(h.slots) + history.max(h.slots))
            .map(|(i, _)| i)
            .collect()
    }

    /// The history shard `index` holds; `None` if the map has no such shard document. Loads a
    /// parked shard.
    pub fn shard_history(&mut self, index: u16) -> Result<Option<ShardHistory>> {
        let Some(sh) = self.shards.get_mut(&index) else {
            return Ok(None);
        };
        let gen = generation::gen_number(sh.generation()?);
        let doc = sh.doc()?;
        let slots = doc.length(ROOT) as u64;
        Ok(Some(ShardHistory {
            gen,
            ops: crate::am::op_count(doc),
            slots,
            base: sh.base_ops.unwrap_or(slots),
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
        let inc_now = self.state.inc;
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
        sh.base_ops = Some(sh.ops);
        let id = generation::gen_id(&new);
        // Carried changes are new to peers: they go out like writes.
        let carried: Vec<Vec<u8>> = crate::am::all_changes(&new)
            .iter()
            .filter(|c| !c.deps().is_empty())
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        sh.body = Body::Live(Box::new(new));
        sh.fields = None;
        sh.cold_heads = None;
        sh.gen = Some(id);
        // A generation staged from a peer is this one, or one this cut decides against
        // again when it is complete (see `adopt_staged`).
        if self.staged.get(&index).is_some_and(|(g, _)| *g == id) {
            self.staged.remove(&index);
        }
        for bytes in carried {
            self.outbox.push(OutgoingChange {
                map: self.sid.clone(),
                doc: DocAddr::Shard {
                    inc: inc_now,
                    index,
                    gen: id,
                },
                bytes,
            });
        }
        self.replaced.insert(index);
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

    /// Runs Automerge sync between two replicas, document by document (as the replication
    /// machine does: every document either lists that the other may sync), until quiet.
    fn sync_pair(a: &mut MapReplica, b: &mut MapReplica, now: Timestamp) {
        let mut states: BTreeMap<(bool, DocAddr), sync::State> = BTreeMap::new();
        for _ in 0..30 {
            let mut docs: BTreeSet<DocAddr> = BTreeSet::new();
            docs.extend(a.doc_digests().unwrap().into_iter().map(|(d, _)| d));
            docs.extend(b.doc_digests().unwrap().into_iter().map(|(d, _)| d));
            let mut quiet = true;
            for doc in docs {
                for from_a in [true, false] {
                    let (x, y) = if from_a {
                        (&mut *a, &mut *b)
                    } else {
                        (&mut *b, &mut *a)
                    };
                    if !x.syncs(doc) || !y.syncs(doc) {
                        continue;
                    }
                    let st = states.entry((from_a, doc)).or_default();
                    if let Some(msg) = x.sync_generate(doc, st, now).unwrap() {
                        quiet = false;
                        let st = states.entry((!from_a, doc)).or_default();
                        let m = decode_sync(doc, &msg).unwrap();
                        y.sync_apply(doc, st, m, now).unwrap();
                    }
                }
            }
            if quiet {
                return;
            }
        }
        panic!("sync did not settle");
    }

    #[test]
    fn a_replica_takes_a_peers_newer_generation_and_carries_its_late_writes_onto_it() {
        let opts = WriteOptions::default();
        let mut a = replica(1);
        let mut b = blank(2);
        for round in 0..10 {
            for k in ["k", "j"] {
                a.set(k, obj(serde_json::json!({ "v": round })), &opts, t(round))
                    .unwrap();
            }
            a.flush(t(round)).unwrap();
        }
        send(&mut a, &mut b, t(10));
        // B writes k while A cuts: B's write is late for A's cut.
        b.set("k", obj(serde_json::json!({"v": "late"})), &opts, t(11))
            .unwrap();
        b.flush(t(11)).unwrap();
        b.take_outgoing();
        b.take_received();
        b.take_events();
        a.take_received();
        let index = layout::shard_of("k");
        assert!(a.cut_shard(index, None, t(12)).unwrap().is_some());
        assert_eq!(a.take_replaced().len(), 1);
        a.take_outgoing();
        let a_gen = a.shard_gen(index).unwrap();
        assert_eq!(generation::gen_number(a_gen), 1);
        sync_pair(&mut a, &mut b, t(13));
        // B moved to A's generation, carried its write, and both converge.
        assert_eq!(b.shard_gen(index).unwrap(), a_gen);
        assert_eq!(b.take_replaced().len(), 1, "the store replaces B's shard");
        let carried = b.take_outgoing();
        assert_eq!(carried.len(), 1, "B's late write, carried, goes out");
        for c in carried {
            a.apply_changes(c.doc, &[c.bytes], t(14)).unwrap();
        }
        assert_eq!(a.get("k", t(14)).unwrap().data["v"], "late");
        assert_eq!(seen(&mut a, t(14)), seen(&mut b, t(14)));
        // What B showed did not change by moving: no event.
        assert!(b.take_events().is_empty());
        a.take_received();
        // The old generation's changes are another document now: not applied, not stored.
        let mut old = replica(3);
        old.set("k", obj(serde_json::json!({"v": "old gen"})), &opts, t(15))
            .unwrap();
        old.flush(t(15)).unwrap();
        for c in old.take_outgoing() {
            if matches!(c.doc, DocAddr::Shard { .. }) {
                a.apply_changes(c.doc, &[c.bytes], t(15)).unwrap();
            }
        }
        assert!(a.take_received().is_empty());
        assert_eq!(a.get("k", t(15)).unwrap().data["v"], "late");
    }

    #[test]
    fn a_shard_of_nested_values_is_not_cut_again_until_it_holds_new_history() {
        let mut a = replica(1);
        let opts = WriteOptions::default();
        let tags: Vec<u32> = (0..40).collect();
        for r in 0..20 {
            a.update(
                "k",
                obj(serde_json::json!({ "tags": tags, "r": r })),
                &opts,
                t(r),
            )
            .unwrap();
            a.flush(t(r)).unwrap();
        }
        a.take_outgoing();
        let index = layout::shard_of("k");
        assert_eq!(a.shards_with_history(16), vec![index]);
        assert!(a.cut_shard(index, None, t(30)).unwrap().is_some());
        // The nested values' own operations are the new generation's state, not history.
        assert!(
            a.shards_with_history(16).is_empty(),
            "{:?}",
            a.live_history()
        );
        for r in 0..20 {
            a.update(
                "k",
                obj(serde_json::json!({ "r": r + 100 })),
                &opts,
                t(40 + r),
            )
            .unwrap();
            a.flush(t(40 + r)).unwrap();
        }
        assert_eq!(a.shards_with_history(16), vec![index], "new history counts");
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
