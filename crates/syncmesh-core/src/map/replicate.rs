//! What replication asks of a map: document digests, Automerge sync messages in and out, and
//! missing dependencies.

use super::*;

impl MapReplica {
    // ----- replication -----

    /// Digests of every document a peer should compare: the map document and the current
    /// incarnation's non-empty shards. Equal digests mean equal documents (same heads).
    /// Queued writes are not included until flushed.
    pub fn doc_digests(&mut self) -> Result<Vec<(DocAddr, u64)>> {
        let mut out = Vec::new();
        let meta = self.meta_doc.get_heads();
        if !meta.is_empty() {
            out.push((DocAddr::Meta, heads_digest(meta)));
        }
        if self.state.live_or_expired() {
            let inc = self.state.inc;
            for (i, sh) in self.shards.iter_mut() {
                let h = sh.heads()?;
                if !h.is_empty() {
                    let gen = sh.generation()?;
                    out.push((
                        DocAddr::Shard {
                            inc,
                            index: *i,
                            gen,
                        },
                        heads_digest(h),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// One digest of the whole map ([`Self::doc_digests`]); 0 for a replica holding nothing.
    pub fn digest(&mut self) -> Result<u64> {
        let docs = self.doc_digests()?;
        if docs.is_empty() {
            return Ok(0);
        }
        let parts: Vec<[u8; 12]> = docs
            .iter()
            .map(|(a, d)| {
                let mut b = [0u8; 12];
                let tag = match a {
                    DocAddr::Meta => u32::MAX,
                    DocAddr::Shard { index, .. } => u32::from(*index),
                };
                b[..4].copy_from_slice(&tag.to_le_bytes());
                b[4..].copy_from_slice(&d.to_le_bytes());
                b
            })
            .collect();
        Ok(hash64(parts.iter().map(|p| p.as_slice())).max(1))
    }

    /// Whether a document is one this replica syncs now (the map document, or a shard of the
    /// current incarnation of a map not removed, in the shard's current generation as far as
    /// it is known without loading the shard).
    pub fn syncs(&self, doc: DocAddr) -> bool {
        match doc {
            DocAddr::Meta => true,
            DocAddr::Shard { inc, index, gen } => {
                // This shard's generation, or a newer one to take from the peer.
                let ok_gen = match self.shards.get(&index).and_then(|sh| sh.gen) {
                    Some(g) => g == gen || self.may_stage(g, gen),
                    None => true,
                };
                index < SHARDS && inc == self.state.inc && self.state.live_or_expired() && ok_gen
            }
        }
    }

    /// The next Automerge sync message for one document and one peer, encoded; `None` when
    /// there is nothing to say. Messages are version 1 (one change per chunk) so that every
    /// change a peer sends can be checked before it is applied.
    pub fn sync_generate(
        &mut self,
        doc: DocAddr,
        state: &mut sync::State,
        now: Timestamp,
    ) -> Result<Option<Vec<u8>>> {
        self.sync_generate_needing(doc, state, &[], now)
    }

    /// [`Self::sync_generate`], also asking the peer for `need` (changes this replica lacks
    /// that changes it did not take depend on): then a message goes even if Automerge has
    /// nothing new to say.
    pub fn sync_generate_needing(
        &mut self,
        doc: DocAddr,
        state: &mut sync::State,
        need: &[ChangeHash],
        now: Timestamp,
    ) -> Result<Option<Vec<u8>>> {
        if !self.syncs(doc) {
            return Ok(None);
        }
        let d = match doc {
            DocAddr::Meta => &mut self.meta_doc,
            DocAddr::Shard { index, gen, .. } => match self.generation_doc(index, gen, now)? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        if !need.is_empty() {
            state.in_flight = false;
        }
        Ok(d.generate_sync_message(state).map(|mut m| {
            crate::am::plain_sync_message(&mut m);
            if !need.is_empty() {
                // Hashes travel sorted (Automerge's encoding requires it).
                m.need.extend_from_slice(need);
                m.need.sort();
                m.need.dedup();
            }
            m.encode()
        }))
    }

    /// Merges a decoded and checked sync message ([`decode_sync`]) with events, then updates
    /// the sync state. An error here is about this replica's state (a change Automerge refuses
    /// against it), not proof that the sender misbehaves.
    pub fn sync_apply(
        &mut self,
        doc: DocAddr,
        state: &mut sync::State,
        msg: DecodedSync,
        now: Timestamp,
    ) -> Result<()> {
        let DecodedSync {
            msg,
            changes,
            checked,
        } = msg;
        if !self.syncs(doc) {
            // Another incarnation: nothing of it is kept.
            return Ok(());
        }
        if let DocAddr::Shard { index, gen, .. } = doc {
            if self.shards.contains_key(&index) && self.shard_gen(index)? != gen {
                // A newer generation being taken from the peer: filled without events until
                // this replica moves to it.
                let Some(d) = self.generation_doc(index, gen, now)? else {
                    return Ok(());
                };
                d.apply_changes(changes)
                    .map_err(|e| Error::InvalidChange(e.to_string()))?;
                d.receive_sync_message(state, msg)
                    .map_err(|e| Error::InvalidChange(format!("sync message: {e}")))?;
                return self.adopt_staged(index, now);
            }
        }
        self.apply_checked(doc, changes, checked, now)?;
        if !self.syncs(doc) {
            return Ok(()); // the changes moved the map on (removed or re-created)
        }
        let d = match doc {
            DocAddr::Meta => &mut self.meta_doc,
            DocAddr::Shard { index, .. } => self.shard_mut(index).doc()?,
        };
        d.receive_sync_message(state, msg)
            .map_err(|e| Error::InvalidChange(format!("sync message: {e}")))
    }

    /// Whether a document holds changes whose dependencies have not arrived (a change was
    /// missed: a sync with a peer fetches it).
    pub fn missing_deps(&mut self, doc: DocAddr) -> Result<bool> {
        if !self.syncs(doc) {
            return Ok(false);
        }
        Ok(match doc {
            DocAddr::Meta => !self.meta_doc.get_missing_deps(&[]).is_empty(),
            DocAddr::Shard { index, .. } => match self.shards.get_mut(&index) {
                Some(sh) => !sh.doc()?.get_missing_deps(&[]).is_empty(),
                None => false,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn digests_match_once_replicas_hold_the_same_changes() {
        let mut a = replica(1);
        let mut b = blank(2);
        send(&mut a, &mut b, t(0));
        assert_eq!(a.digest().unwrap(), b.digest().unwrap());
        a.set(
            "k",
            obj(serde_json::json!({"v": 1})),
            &WriteOptions::default(),
            t(1),
        )
        .unwrap();
        a.flush(t(1)).unwrap();
        assert_ne!(a.digest().unwrap(), b.digest().unwrap());
        send(&mut a, &mut b, t(1));
        assert_eq!(a.digest().unwrap(), b.digest().unwrap());
        assert_eq!(a.doc_digests().unwrap(), b.doc_digests().unwrap());
        assert!(!b.missing_deps(DocAddr::Meta).unwrap());
    }
}
