//! TTLs: expired items and maps are removed with replicated deletes, once, with one event.

use super::*;

impl MapReplica {
    /// Removes every item (and the map itself) whose TTL has passed, with replicated deletes.
    /// Returns how many items expired. Reads already hide expired items before this runs.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        if self.state.exists() && self.state.removed.is_none() {
            if let Some(e) = self.state.expires.filter(|e| *e <= now) {
                // Every replica writes the same value, so concurrent expiries cannot diverge.
                let inc = self.state.inc;
                let _ = self.commit_meta(now, |tx| {
                    tx.put(ROOT, format!("r{inc}"), e.millis()).map_err(tx_err)
                });
                return 0;
            }
        }
        let mut n = 0;
        while self.expiry.first().is_some_and(|(t, _)| *t <= now) {
            // pop first so the loop always progresses, whatever delete_item finds
            let Some((_, key)) = self.expiry.pop_first() else {
                break;
            };
            if self.view.contains_key(key.as_str()) {
                self.delete_item(&key, true, now);
                n += 1;
            }
        }
        n
    }

    /// The next instant at which [`Self::expire`] has work, so a shell can schedule it.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        let item = self.expiry.first().map(|(t, _)| *t);
        let map = self
            .state
            .expires
            .filter(|_| self.state.removed.is_none() && self.state.exists());
        match (item, map) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl MapReplica {
    /// An item merged in already expired: drop it from the view and delete every slot it has.
    pub(super) fn view_set_for_expired(&mut self, key: &str, now: Timestamp) {
        let old = self.view.get(key).cloned();
        if let Some(o) = &old {
            if let Some(e) = o.meta.expires() {
                self.expiry.remove(&(e, key.to_string()));
            }
        }
        // The flush deletes every slot the merged document holds for the item.
        self.queue_item_delete(key);
        if old.is_some() {
            self.replace_view(key, None, false, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn an_expired_item_is_removed_once_with_one_event() {
        let mut m = replica(1);
        let ttl = WriteOptions::ttl(Ttl::from_secs(10).unwrap());
        m.set("k", obj(serde_json::json!({"a": 1})), &ttl, t(0))
            .unwrap();
        m.set(
            "other",
            obj(serde_json::json!({})),
            &WriteOptions::default(),
            t(0),
        )
        .unwrap();
        m.take_events();
        assert_eq!(m.next_expiry(), Some(t(10_000)));
        assert_eq!(m.expire(t(9_999)), 0);
        assert_eq!(m.expire(t(10_000)), 1);
        let events = m.take_events();
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0].kind, EventKind::ItemRemoved { key, .. } if key == "k"));
        assert_eq!(m.expire(t(20_000)), 0);
        assert!(m.take_events().is_empty());
        assert_eq!(m.next_expiry(), None);
        assert!(m.get("other", t(20_000)).is_ok());
    }
}
