//! Work between commands: TTL expiry, parking idle shard documents, the document budget,
//! snapshots for compaction.

use super::*;

impl Engine {
    /// How long to sleep before the next TTL expiry among loaded maps.
    pub(super) fn next_expiry_wait(&self) -> Duration {
        if self.write_stop().is_some() {
            // Expiry writes are refused now; waking for them would only spin.
            return Duration::from_secs(3600);
        }
        let now = now();
        let next = self
            .catalog
            .maps()
            .filter_map(MapReplica::next_expiry)
            .chain(self.unloaded_expiry.values().copied())
            .min();
        match next {
            Some(t) => Duration::from_millis(
                u64::try_from(t.millis().saturating_sub(now.millis())).unwrap_or(0),
            ),
            None => Duration::from_secs(3600),
        }
    }

    /// Cuts the history of loaded shard documents holding more than [`Engine::history`]
    /// beyond their live items: at once without a network; with one, only while every
    /// trusted peer is connected, and then where the connected peers agree on the shard
    /// (`Input::Cut`). What a cut changes is committed with the next batch.
    pub(super) fn cut_history(&mut self, now: Timestamp) {
        let Some(history) = self.history else {
            return;
        };
        let wanted: Vec<(MapSid, Vec<u16>)> = self
            .catalog
            .maps_mut()
            .filter_map(|m| {
                let shards = m.shards_with_history(history);
                (!shards.is_empty()).then(|| (m.sid().clone(), shards))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let Some(n) = &self.net else {
            for (sid, shards) in wanted {
                let Some(m) = self.catalog.by_sid(&sid) else {
                    continue;
                };
                for index in shards {
                    if let Err(e) = m.cut_shard(index, None, now) {
                        tracing::warn!(map = %sid, "cutting shard {index}'s history failed: {e}");
                    }
                }
                self.dirty.insert(sid);
            }
            return;
        };
        let away: Vec<String> = self
            .trust
            .trusted()
            .iter()
            .filter(|r| !n.peers.contains_key(&r.peer_id))
            .map(|r| r.peer_id.clone())
            .collect();
        if !away.is_empty() {
            tracing::debug!(
                "history not cut while trusted peers are away ({})",
                away.join(", ")
            );
            return;
        }
        for (sid, shards) in wanted {
            self.drive(syncmesh_core::replication::Input::Cut { sid, shards }, now);
        }
    }

    /// Parks shard documents no command touched since the previous round.
    pub(super) fn park_idle(&mut self, now: Timestamp) {
        self.next_park = std::time::Instant::now() + PARK_PERIOD;
        if self.write_stop().is_some() {
            return; // parking commits what it flushes: nothing can be committed now
        }
        for m in self.catalog.maps_mut() {
            let mark = m.use_mark();
            if let Some(prev) = self.park_marks.insert(m.sid().clone(), mark) {
                if let Err(e) = m.park_unused_since(prev, now) {
                    tracing::warn!(map = %m.sid(), "parking idle shards failed: {e}");
                }
            }
        }
        // Parking flushes: anything it committed goes out with the next batch.
        let sids: Vec<MapSid> = self.catalog.maps().map(|m| m.sid().clone()).collect();
        self.dirty
            .extend(sids.into_iter().filter(|s| self.park_marks.contains_key(s)));
    }

    /// Parks the least recently used shard documents of the largest maps while the live ones
    /// take more than the budget, down to 3/4 of it (so this does not run every round).
    pub(super) fn keep_to_budget(&mut self, now: Timestamp) {
        if self.write_stop().is_some() {
            return;
        }
        // Shards used since the previous check are in use: never parked for the budget.
        let marks = std::mem::take(&mut self.budget_marks);
        self.budget_marks = self
            .catalog
            .maps()
            .map(|m| (m.sid().clone(), m.use_mark()))
            .collect();
        let total: u64 = self.catalog.maps().map(MapReplica::live_bytes).sum();
        let target = self.budget - self.budget / 4;
        // Once over, parking goes on (a few shards per round) down to the target.
        self.over_budget = total > self.budget || (self.over_budget && total > target);
        if !self.over_budget {
            self.over_budget_warned = false;
            return;
        }
        let mut sizes: Vec<(u64, MapSid)> = self
            .catalog
            .maps()
            .map(|m| (m.live_bytes(), m.sid().clone()))
            .collect();
        let mut excess = total - target;
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let start = std::time::Instant::now();
        let mut out_of_time = false;
        for (bytes, sid) in sizes {
            if excess == 0 || out_of_time {
                break;
            }
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // Parking flushes first: whatever that commits goes out with the next batch (after
            // a commit nothing is queued, so this is rare).
            match m.flush(now) {
                Ok(0) => {}
                Ok(_) => {
                    self.dirty.insert(sid.clone());
                }
                Err(e) => {
                    tracing::warn!(map = %sid, "flushing before parking failed: {e}");
                    continue;
                }
            }
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // A map loaded since the previous check: all of it is in use.
            let Some(mark) = marks.get(&sid).copied() else {
                continue;
            };
            // A shard at a time, for a few milliseconds a round: parking saves each one, and
            // the commands queued behind this round wait for it.
            let mut left = excess.min(bytes);
            while left > 0 {
                if start.elapsed() >= PARK_ROUND_BUDGET {
                    out_of_time = true;
                    break;
                }
                match m.park_lru_at_most(left, mark, now, 1) {
                    Ok(0) => break,
                    Ok(freed) => {
                        left = left.saturating_sub(freed);
                        excess = excess.saturating_sub(freed);
                    }
                    Err(e) => {
                        tracing::warn!(map = %sid, "parking shards over the budget failed: {e}");
                        break;
                    }
                }
            }
        }
        if out_of_time {
            // The rest in the next rounds, at once rather than at the next check.
            self.next_budget_check = std::time::Instant::now();
            return;
        }
        if excess > 0 && !self.over_budget_warned {
            self.over_budget_warned = true;
            tracing::warn!(
                budget = self.budget,
                live = total,
                "the shard documents in use take more than the document budget; raise --document-budget"
            );
        }
    }

    /// Removes everything whose TTL has passed, with replicated deletes.
    pub(super) fn expire_due(&mut self, now: Timestamp) {
        if self.write_stop().is_some() {
            return;
        }
        let due: Vec<MapSid> = self
            .unloaded_expiry
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for sid in due {
            if let Err(e) = self.ensure_loaded(&sid) {
                tracing::warn!(map = %sid, "loading a map for TTL expiry failed: {e}");
                self.unloaded_expiry.remove(&sid);
            }
        }
        for m in self.catalog.maps_mut() {
            if m.next_expiry().is_some_and(|t| t <= now) {
                m.expire(now);
                self.dirty.insert(m.sid().clone());
            }
        }
    }

    /// Takes snapshots of documents `Node::compact` queued, for a few milliseconds at most
    /// and while the store writer is not far behind with earlier ones; the rest waits for the
    /// next rounds. Runs after the round's maps are flushed, so a snapshot holds every change
    /// of a commit queued before it.
    pub(super) fn snapshot_queued(&mut self, now: Timestamp) {
        let start = std::time::Instant::now();
        let mut taken = 0;
        while let Some((sid, doc)) = self.compact_queue.last().cloned() {
            let queued = self.shared.snapshot_bytes.load(Ordering::Acquire) + taken;
            if start.elapsed() >= COMPACT_ROUND_BUDGET || queued >= MAX_QUEUED_SNAPSHOT_BYTES {
                return;
            }
            self.compact_queue.pop();
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            match m.snapshot(doc, now) {
                Ok(Some(snapshot)) => {
                    taken += snapshot.len();
                    self.pending_compactions
                        .push(StoreJob::Compact { sid, doc, snapshot });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(map = %sid, "snapshot for compaction failed: {e}"),
            }
        }
    }
}
