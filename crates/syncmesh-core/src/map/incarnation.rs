//! Incarnations: a removed map re-created under the same name starts empty; changes that
//! arrived for a map document (or incarnation) not known yet wait here and are replayed.

use super::*;

impl MapReplica {
    pub(super) fn refresh_map_state(&mut self, is_local: bool, now: Timestamp) {
        let new = read_map_state(&self.meta_doc);
        let old = std::mem::replace(&mut self.state, new);
        if !is_local && old.policy.is_open() && !self.state.policy.is_open() {
            self.sign_own_history();
        }
        if self.state.inc != old.inc {
            // A new incarnation: the previous one's items are gone.
            self.reset_items(is_local, now, !self.removal_announced && old.exists());
            self.removal_announced = false;
            self.replay_future(now);
        } else if !old.exists() && self.state.exists() {
            self.replay_future(now);
        }
        if self.state.exists() && self.state.removed.is_some() && !self.removal_announced {
            self.reset_items(is_local, now, true);
            self.removal_announced = true;
        }
    }
}

impl MapReplica {
    /// Applies the changes that were waiting for the map document (or a newer incarnation).
    pub(super) fn replay_future(&mut self, now: Timestamp) {
        let future = std::mem::take(&mut self.future);
        self.future_hashes.clear();
        let mut by_doc: BTreeMap<DocAddr, Vec<Change>> = BTreeMap::new();
        for (d, c) in future {
            by_doc.entry(d).or_default().push(c);
        }
        for (d, cs) in by_doc {
            if self.apply_decoded(d, cs.clone(), now).is_err() {
                // One bad change must not take the others with it.
                for c in cs {
                    if self.apply_decoded(d, vec![c], now).is_err() {
                        self.dropped_changes += 1;
                    }
                }
            }
        }
    }

    pub(super) fn reset_items(&mut self, is_local: bool, now: Timestamp, announce: bool) {
        self.view.clear();
        self.view_reset = true;
        self.dirty_keys.clear();
        self.expiry.clear();
        self.dirty.clear();
        self.shards.clear();
        self.last_change = Timestamp::from_millis(0);
        if announce {
            self.emit(EventKind::MapRemoved, is_local, now);
        }
    }
}
