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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_recreated_map_starts_empty_and_late_changes_to_the_old_one_are_dropped() {
        let mut a = replica(1);
        let mut b = blank(2);
        send(&mut a, &mut b, t(0));
        let opts = WriteOptions::default();
        a.set("k", obj(serde_json::json!({"v": 1})), &opts, t(1))
            .unwrap();
        a.flush(t(1)).unwrap();
        let late = a.take_outgoing();
        b.set("k", obj(serde_json::json!({"v": 2})), &opts, t(1))
            .unwrap();
        let first = b.incarnation();
        b.remove_map(t(2)).unwrap();
        b.recreate(Some("m"), None, t(3)).unwrap();
        assert_eq!(b.incarnation(), first + 1);
        assert!(b.all_items(t(3)).is_empty());
        // A's write to the first incarnation arrives after the re-creation: it is dropped.
        for c in late {
            b.apply_changes(c.doc, &[c.bytes], t(4)).unwrap();
        }
        assert!(b.all_items(t(4)).is_empty());
        // and A, told of it all, joins the new incarnation empty too
        send(&mut b, &mut a, t(5));
        assert_eq!(a.incarnation(), first + 1);
        assert!(a.all_items(t(5)).is_empty());
    }
}
