//! Turning what a round changed into one batch for the store writer (group commit).

use super::*;

/// What the `sigs` table holds for a change this node has unsigned and asks peers to sign
/// ([`MapReplica::unsigned`]): a marker and the change's shard, never a valid
/// [`Signature`] encoding (those are longer), overwritten once the signature comes.
fn unsigned_mark(shard: u16) -> Vec<u8> {
    let [a, b] = shard.to_be_bytes();
    vec![UNSIGNED_MARK, a, b]
}

/// The shard of an [`unsigned_mark`].
pub(super) fn read_unsigned_mark(b: &[u8]) -> Option<u16> {
    match b {
        [UNSIGNED_MARK, a, b] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

const UNSIGNED_MARK: u8 = 0xff;

impl Engine {
    /// Turns everything the handled commands changed into one batch for the store writer.
    pub(super) fn commit(
        &mut self,
        now: Timestamp,
        mut acks: Vec<Ack>,
        barriers: Vec<oneshot::Sender<Result<()>>>,
    ) {
        // Opens of maps fetched from peers are answered with this batch.
        if let Some(n) = self.net.as_mut() {
            let fetched = std::mem::take(&mut n.fetched);
            for (sid, info, reply) in fetched {
                let map = Some((sid.clone(), self.epoch(&sid)));
                acks.push(Ack::open(map, reply, info));
            }
        }
        let mut batch = Batch::default();
        let mut events = Vec::new();
        let mut compactions = Vec::new();
        let mut flush_failed = None;
        let mut received = false;
        let mut to_gossip = Vec::new();
        let mut to_ask: Vec<MapSid> = std::mem::take(&mut self.signatures_wanted)
            .into_iter()
            .collect();
        let dirty = std::mem::take(&mut self.dirty);
        for sid in dirty {
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // View entries first: this flushes queued writes, whose changes are taken next.
            let view = match m.take_view_changes(now) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(map = %sid, "flush failed, stopping writes: {e}");
                    flush_failed = Some(e);
                    Default::default()
                }
            };
            let mut changes: Vec<(DocAddr, Vec<u8>)> = m
                .take_outgoing()
                .into_iter()
                .map(|c| (c.doc, c.bytes))
                .collect();
            let local = changes.len();
            changes.extend(m.take_received());
            received |= changes.len() > local;
            let sigs = m.take_signatures();
            let unsigned = m.take_unsigned_marks();
            if !unsigned.is_empty() {
                to_ask.push(sid.clone());
            }
            // Changes this node signed after the fact go out again (they are stored already).
            let resend = m.take_resend();
            if !m.exists()
                && changes.is_empty()
                && view.entries.is_empty()
                && !self.on_disk.contains_key(&sid)
            {
                // A map waited for that has not arrived: nothing to store yet.
                continue;
            }
            if (local > 0 || !resend.is_empty()) && self.net.is_some() {
                let sigs: std::collections::HashMap<_, _> = sigs.iter().cloned().collect();
                let mut out = changes[..local].to_vec();
                out.extend(resend);
                to_gossip.push((sid.clone(), out, sigs));
            }
            for (doc, bytes) in &changes {
                let n = self
                    .changes_since_snapshot
                    .entry((sid.clone(), stored_doc(*doc)))
                    .or_insert((0, 0));
                if stored_one(n, bytes.len()) {
                    compactions.push(*doc);
                }
            }
            let evs = m.take_events();
            let mut encoded = Vec::with_capacity(evs.len());
            for e in evs {
                let bytes = match FeedEvent::from_event(&e) {
                    Some(f) => {
                        let n = f.bytes();
                        encoded.push(f);
                        n
                    }
                    None => {
                        tracing::error!("event {} cannot be stored", e.id);
                        0
                    }
                };
                events.push(Arc::new(Published { event: e, bytes }));
            }
            // The catalog record goes with every batch of the map: it carries the next expiry.
            self.on_disk
                .insert(sid.clone(), m.unique_name().map(str::to_string));
            let name = Some(m.unique_name().unwrap_or("").to_string());
            let next_expiry = m.next_expiry().map(Timestamp::millis);
            // A shard cut or moved to a peer's generation: the store keeps the new one alone.
            for doc in m.take_replaced().into_iter().map(stored_doc) {
                self.changes_since_snapshot.remove(&(sid.clone(), doc));
                if !compactions.contains(&doc) {
                    compactions.push(doc);
                }
            }
            let mut snapshots = Vec::new();
            for doc in compactions.drain(..) {
                match m.snapshot(doc, now) {
                    Ok(Some(s)) => snapshots.push((doc, s)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(map = %sid, "snapshot for compaction failed: {e}"),
                }
            }
            // Permissions are remembered for replication while the map is not loaded.
            let policy = m.policy().clone();
            let known = self.policies.get(&sid);
            if known != Some(&policy) && !(known.is_none() && policy.is_open()) {
                if policy.is_open() {
                    self.policies.remove(&sid);
                    batch.policies.push((sid.clone(), None));
                } else {
                    batch.policies.push((sid.clone(), Some(policy.encode())));
                    self.policies.insert(sid.clone(), policy);
                }
            }
            batch.maps.push(MapWrite {
                sid: Some(sid.clone()),
                name,
                next_expiry,
                changes,
                view,
                events: encoded,
                sigs: sigs
                    .into_iter()
                    .map(|(h, s)| (h.0, s.encode()))
                    .chain(
                        unsigned
                            .into_iter()
                            .map(|(h, i)| (h.0, i.map(unsigned_mark).unwrap_or_default())),
                    )
                    .collect(),
            });
            // Compactions follow the commit of every change they include.
            for (doc, snapshot) in snapshots {
                let job = StoreJob::Compact {
                    sid: sid.clone(),
                    doc,
                    snapshot,
                };
                self.pending_compactions.push(job);
            }
        }
        self.snapshot_queued(now);
        for sid in std::mem::take(&mut self.digests_wanted) {
            if !self.on_disk.contains_key(&sid) {
                continue;
            }
            if let Some(Ok(d)) = self.catalog.by_sid(&sid).map(MapReplica::digest) {
                batch.digests.push((sid, d));
            }
        }
        if let Some(e) = flush_failed {
            // Writes of this batch cannot all be stored: acknowledge none, stop writing.
            let err = Arc::new(StoreError::Engine {
                path: self.store.path().to_path_buf(),
                detail: format!("a document could not be committed: {e}"),
            });
            *self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.clone());
            for a in acks {
                a.send(Err(Error::Store(err.clone())));
            }
            for b in barriers {
                let _ = b.send(Err(Error::Store(err.clone())));
            }
            // Snapshots taken for this batch include changes that were just dropped.
            self.pending_compactions.clear();
            return;
        }
        // Writes to a map dropped for reloading since they were made are not stored.
        let (acks, stale): (Vec<Ack>, Vec<Ack>) = acks
            .into_iter()
            .partition(|a| a.map.as_ref().is_none_or(|(sid, e)| self.epoch(sid) == *e));
        for a in stale {
            let map = a
                .map
                .as_ref()
                .map(|(s, _)| s.to_string())
                .unwrap_or_default();
            a.send(Err(Error::Reloaded { map }));
        }
        // Peers get the changes while they are being fsynced here: each process writes as a
        // fresh Automerge actor, so a change lost to a crash is never re-made differently,
        // and peers hand it back on the next sync.
        for (sid, changes, sigs) in to_gossip {
            self.gossip(&sid, &changes, &sigs);
        }
        for sid in to_ask {
            self.ask_signatures(&sid);
        }
        // Acknowledged now: writes that chose (or whose node defaults to) relaxed durability.
        // Everything else waits for the commit: durable writes, opens of fetched maps (their
        // events are published with it) and reads held for it.
        let (relaxed, acks): (Vec<Ack>, Vec<Ack>) = acks.into_iter().partition(|a| a.relaxed);
        let durable_writes = acks.iter().any(|a| a.write);
        // Fsync if asked to (sync, compact, close), for a durable write, or when relaxed
        // writes have waited long enough. A node whose default is fsync skips it only for
        // batches of relaxed writes and peers' changes: a peer's change is durable at its
        // author and comes back by sync after a crash, so its events need not wait for this
        // node's fsync (they come back with new ids: see the event floors below).
        let may_skip = (!relaxed.is_empty() || received)
            && !durable_writes
            && batch.trust.is_empty()
            && batch.invites.is_empty();
        let mut durable = !barriers.is_empty()
            || self.shutdown.is_some()
            || durable_writes
            || (self.store.is_durable() && !may_skip)
            || self.last_durable.elapsed() >= RELAXED_WINDOW;
        if !durable {
            let mut raised = Vec::new();
            // Events published before their fsync may be lost to a crash, and their ids
            // issued again to other events. Ids are reserved durably ahead, a block at a time
            // (the commit that reserves is fsynced, so it is durable before any event past the
            // old floor is published); after a crash a map goes on past its floor.
            for w in &batch.maps {
                let (Some(sid), Some(last)) = (&w.sid, w.events.last().map(|e| e.id)) else {
                    continue;
                };
                let floor = self.event_floors.entry(sid.clone()).or_insert(0);
                if last > *floor {
                    *floor = last + EVENT_ID_BLOCK;
                    raised.push(syncmesh_store::event_floor_record(sid, *floor));
                }
            }
            durable = !raised.is_empty();
            batch.meta.extend(raised);
        }
        if self.shutdown.is_some() {
            // A clean close: the stored events are all there, and the next ids follow them.
            for (sid, _) in std::mem::take(&mut self.event_floors) {
                if let Some(m) = self.catalog.by_sid(&sid) {
                    let last = m.last_event_id();
                    batch
                        .meta
                        .push(syncmesh_store::event_floor_record(&sid, last));
                }
            }
        }
        let idle = batch.is_empty()
            && acks.is_empty()
            && relaxed.is_empty()
            && barriers.is_empty()
            && events.is_empty();
        if idle && !(self.needs_fsync && durable) {
            self.send_compactions();
            return;
        }
        if durable {
            self.last_durable = std::time::Instant::now();
            self.needs_fsync = false;
        } else {
            self.needs_fsync = true;
        }
        self.commit_seq += 1;
        let seq = self.commit_seq;
        let committed = self.shared.committed.load(Ordering::Acquire);
        self.last_commit.retain(|_, s| *s > committed);
        for w in &batch.maps {
            if let Some(sid) = &w.sid {
                self.last_commit.insert(sid.clone(), seq);
            }
        }
        for a in relaxed {
            a.send(Ok(()));
        }
        // The batch, and its events again as they are published (decoded and encoded).
        let bytes = batch.bytes() + events.iter().map(|e| e.bytes).sum::<usize>();
        if self.shared.queued_bytes.load(Ordering::Acquire) > MAX_QUEUED_BYTES {
            // The store writer is far behind: wait for it rather than queue more memory.
            let (tx, rx) = std::sync::mpsc::channel();
            if self.jobs.send(StoreJob::Fence(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
        self.shared.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let job = StoreJob::Commit {
            batch,
            acks,
            barriers,
            events,
            durable,
            seq,
            bytes,
        };
        if self.jobs.send(job).is_err() {
            tracing::error!("the store writer has stopped");
        }
        self.send_compactions();
    }

    /// Hands snapshots (and forgotten documents) to the store writer, which stores them after
    /// every commit queued so far; then, once no snapshot asked for is left to take, the
    /// file rewrite `Node::compact` waits for.
    pub(super) fn send_compactions(&mut self) {
        for job in self.pending_compactions.drain(..) {
            if let StoreJob::Compact { snapshot, .. } = &job {
                self.shared
                    .snapshot_bytes
                    .fetch_add(snapshot.len(), Ordering::AcqRel);
            }
            let _ = self.jobs.send(job);
        }
        // The file is rewritten once every snapshot asked for before is taken.
        if self.compact_queue.is_empty() {
            let waiting = std::mem::take(&mut self.compact_file);
            if !waiting.is_empty() {
                let _ = self.jobs.send(StoreJob::CompactFile(waiting));
            }
        }
    }
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    #[test]
    fn an_unsigned_mark_is_never_a_signature() {
        for shard in [0u16, 7, 255, u16::MAX] {
            let m = unsigned_mark(shard);
            assert_eq!(read_unsigned_mark(&m), Some(shard));
            assert!(Signature::decode(&m).is_none());
        }
        let signer = syncmesh_core::Signer::new(syncmesh_net::Keypair::generate_ed25519());
        let sig = signer.sign(&syncmesh_core::ChangeHash([3; 32])).unwrap();
        assert_eq!(read_unsigned_mark(&sig.encode()), None);
    }
}

/// A document as the store keys it: a shard by incarnation and index, one generation at a
/// time (a new one replaces what is stored).
pub(super) fn stored_doc(doc: DocAddr) -> DocAddr {
    match doc {
        DocAddr::Shard { inc, index, .. } => DocAddr::Shard { inc, index, gen: 0 },
        d => d,
    }
}

/// Counts one more change of `bytes` stored for a document (changes, bytes since its
/// snapshot); true when the document is due for a snapshot, and then counts from zero.
fn stored_one(n: &mut (u32, u64), bytes: usize) -> bool {
    n.0 += 1;
    n.1 += bytes as u64;
    let due = n.0 >= COMPACT_AFTER_CHANGES || n.1 >= COMPACT_AFTER_BYTES;
    if due {
        *n = (0, 0);
    }
    due
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    #[test]
    fn a_document_is_snapshotted_after_a_thousand_changes_or_a_mebibyte_of_them() {
        let count = |size: usize| {
            let mut n = (0, 0);
            (1..=2_000).find(|_| stored_one(&mut n, size)).unwrap_or(0)
        };
        assert_eq!(count(100), 1000);
        assert_eq!(
            count(16 << 10),
            64,
            "16 KiB changes: 1 MiB after 64 of them"
        );
        assert_eq!(count(2 << 20), 1, "one change past the bound");
        let mut n = (0, 0);
        for _ in 0..999 {
            assert!(!stored_one(&mut n, 10));
        }
        assert!(stored_one(&mut n, 10));
        assert_eq!(n, (0, 0), "counting starts afresh");
    }
}
