//! Per-map permissions and change signatures: permission entries in the map document, the
//! heads each writer's changes are endorsed at, signing this node's changes and asking for the
//! signatures a change still lacks.

use super::*;

impl MapReplica {
    // ----- permissions -----

    /// The map's permissions (empty: open to every trusted peer).
    pub fn policy(&self) -> &crate::policy::Policy {
        &self.state.policy
    }

    /// Shard heads whose history peers take whoever wrote it: what the map held when it got
    /// its first permission entry.
    pub fn endorsed(&self) -> &HashSet<ChangeHash> {
        &self.state.endorsed
    }

    /// The signature of a change of this map, if this replica has it.
    pub fn signature(&self, hash: &ChangeHash) -> Option<&Signature> {
        self.sigs.get(hash)
    }

    /// Keeps verified signatures of changes merged from peers (so they can be passed on).
    pub fn keep_signatures(&mut self, sigs: impl IntoIterator<Item = (ChangeHash, Signature)>) {
        for (h, s) in sigs {
            self.unsigned.remove(&h);
            if let std::collections::hash_map::Entry::Vacant(e) = self.sigs.entry(h) {
                e.insert(s.clone());
                self.new_sigs.push((h, s));
            }
        }
    }

    /// Signatures restored from storage (not stored again).
    pub fn restore_signatures(&mut self, sigs: impl IntoIterator<Item = (ChangeHash, Signature)>) {
        self.sigs.extend(sigs);
        self.unsigned.retain(|h, _| !self.sigs.contains_key(h));
    }

    /// Hashes (at most `max`) of changes this replica holds unsigned and that peers joining
    /// later take only with their author's signature: took while the map was open from a
    /// writer, not endorsed by the entries. Asked of peers until they come.
    ///
    /// Forgets first what no longer needs a signature: changes the endorsed history now
    /// covers (a shard whose endorsed heads have not all arrived waits), changes of writers
    /// who lost `Write`, of shards gone with an old incarnation, or of a map open again.
    pub fn unsigned(&mut self, max: usize) -> Vec<ChangeHash> {
        if self.unsigned.is_empty() {
            return Vec::new();
        }
        let mut drop: Vec<ChangeHash> = Vec::new();
        let mut ask = Vec::new();
        if self.state.policy.is_open() {
            drop.extend(self.unsigned.keys().copied());
        } else {
            let writers = self.writer_prefixes();
            let mut by_shard: BTreeMap<u16, Vec<ChangeHash>> = BTreeMap::new();
            for (h, i) in &self.unsigned {
                by_shard.entry(*i).or_default().push(*h);
            }
            for (index, hashes) in by_shard {
                let endorsed = self
                    .state
                    .endorsed_by_shard
                    .get(&index)
                    .cloned()
                    .unwrap_or_default();
                let Some(d) = self.shards.get_mut(&index).and_then(|sh| sh.doc().ok()) else {
                    drop.extend(hashes); // gone with an old incarnation
                    continue;
                };
                if endorsed.iter().any(|h| !crate::am::has_change(d, h)) {
                    continue; // what is endorsed is not all here yet: decide later
                }
                let mut after: HashSet<ChangeHash> = HashSet::new();
                crate::am::for_each_change_since(d, &endorsed, |c| {
                    after.insert(c.hash());
                });
                for h in hashes {
                    let needed = after.contains(&h)
                        && crate::am::with_change(d, &h, |c| {
                            let actor = c.actor_id().to_bytes();
                            writers.iter().any(|p| actor.starts_with(p))
                        })
                        .unwrap_or(false);
                    if needed {
                        ask.push(h);
                    } else {
                        drop.push(h);
                    }
                }
            }
        }
        for h in drop {
            self.forget_unsigned(h);
        }
        ask.truncate(max);
        ask
    }

    /// Whether [`Self::unsigned`] has entries (before it forgets what is no longer needed).
    pub fn has_unsigned(&self) -> bool {
        !self.unsigned.is_empty()
    }

    pub(super) fn forget_unsigned(&mut self, h: ChangeHash) {
        if self.unsigned.remove(&h).is_some() {
            self.new_unsigned.push((h, None));
        }
    }

    /// Actor prefixes of the identities the map's entries let write.
    pub(super) fn writer_prefixes(&self) -> Vec<[u8; 16]> {
        self.state
            .policy
            .permissions()
            .iter()
            .filter(|p| p.write)
            .filter_map(|p| crate::authorship::actor_prefix(&p.identity))
            .collect()
    }

    /// Changes to [`Self::unsigned`] since the last call, for storage: `(hash, Some(shard))`
    /// noted, `(hash, None)` forgotten (or signed: the signature is stored instead).
    pub fn take_unsigned_marks(&mut self) -> Vec<(ChangeHash, Option<u16>)> {
        let marks = std::mem::take(&mut self.new_unsigned);
        marks
            .into_iter()
            .filter(|(h, i)| match i {
                Some(_) => self.unsigned.contains_key(h),
                None => !self.sigs.contains_key(h) && !self.unsigned.contains_key(h),
            })
            .collect()
    }

    /// [`Self::unsigned`] entries restored from storage (those signed since are skipped).
    pub fn restore_unsigned(&mut self, marks: impl IntoIterator<Item = (ChangeHash, u16)>) {
        for (h, index) in marks {
            if self.sigs.contains_key(&h) {
                continue;
            }
            if self.unsigned.len() < MAX_UNSIGNED {
                self.unsigned.insert(h, index);
            } else {
                self.new_unsigned.push((h, None));
            }
        }
    }

    /// Takes signatures a peer sent for [`Self::unsigned`] changes; returns how many were
    /// taken, or `Err` with the first that is not a valid signature of its hash by a writer
    /// of the map (an honest peer holds only signatures it checked). Each signature is checked
    /// before the change is looked at.
    pub fn take_late_signatures(
        &mut self,
        sigs: Vec<(ChangeHash, Signature)>,
    ) -> std::result::Result<usize, ChangeHash> {
        for (h, s) in &sigs {
            if !s.signs_hash(h) || !self.state.policy.writes(&s.author) {
                return Err(*h);
            }
        }
        let mut good = Vec::new();
        for (h, s) in sigs {
            let Some(&index) = self.unsigned.get(&h) else {
                continue;
            };
            let Some(d) = self.shards.get_mut(&index).and_then(|sh| sh.doc().ok()) else {
                continue;
            };
            if crate::am::with_change(d, &h, |c| s.signs(c)).unwrap_or(false) {
                good.push((h, s));
            }
        }
        let n = good.len();
        self.keep_signatures(good);
        Ok(n)
    }

    /// Whether changes of `doc` belong to an incarnation of the map this replica has not
    /// seen yet (its map document has not arrived).
    pub fn awaits_incarnation(&self, doc: DocAddr) -> bool {
        matches!(self.fate(doc), Fate::Waiting)
    }

    /// Whether this replica has nothing of the map document yet (it is fetching the map, and
    /// does not know its permissions).
    pub fn knows_nothing(&self) -> bool {
        self.meta_doc.get_heads().is_empty()
    }

    /// Whether a change taken earlier depends on this missing change.
    pub fn wants(&self, doc: DocAddr, hash: &ChangeHash) -> bool {
        self.wanted.contains(&(doc, *hash))
    }

    /// Notes that a change taken depends on this missing one.
    pub fn want(&mut self, doc: DocAddr, hash: ChangeHash) {
        if self.wanted.len() >= 100_000 {
            // Bounded: at worst such a change is refused once and fetched again with the
            // change that depends on it.
            self.wanted.clear();
        }
        self.wanted.insert((doc, hash));
    }

    /// Signatures made or kept since the last call, for storage.
    pub fn take_signatures(&mut self) -> Vec<(ChangeHash, Signature)> {
        std::mem::take(&mut self.new_sigs)
    }

    /// Sets one identity's permissions. `me` is this node's identity: on a map with entries it
    /// must have `Manage`; the first entry of an open map also lists `me` as a manager (else
    /// this node's own writes would be refused by everyone it shares the map with).
    pub fn set_permission(
        &mut self,
        p: &crate::policy::Permission,
        me: &str,
        now: Timestamp,
    ) -> Result<crate::policy::Permission> {
        self.expire(now);
        self.check_live(now)?;
        if !crate::policy::valid_identity(&p.identity) {
            return Err(Error::InvalidPermission(format!(
                "identity {:?} must be 1 to {} characters of A-Z, a-z, 0-9, '.', '_', '-'",
                p.identity,
                crate::policy::MAX_IDENTITY
            )));
        }
        let policy = self.state.policy.clone();
        if !policy.manages(me) {
            return Err(Error::PermissionDenied(format!(
                "this node ({me}) may not manage map {}",
                self.display_name()
            )));
        }
        if policy.get(&p.identity).is_none() && policy.len() >= crate::policy::MAX_ENTRIES {
            return Err(Error::InvalidPermission(format!(
                "a map has at most {} permission entries",
                crate::policy::MAX_ENTRIES
            )));
        }
        let add_me = policy.is_open() && p.identity != me && crate::policy::valid_identity(me);
        let flags = p.flags();
        // The map's history so far was written while everyone could write (or by a writer who
        // loses `Write` now): this change endorses it, shard by shard (map-document history is
        // endorsed by being this change's ancestors), so peers take it whoever made it.
        let loses_write = policy.get(&p.identity).is_some_and(|o| o.write) && !p.write;
        let endorse = if policy.is_open() || loses_write {
            self.endorsement(now)?
        } else {
            Vec::new()
        };
        self.commit_meta(now, |tx| {
            for (slot, heads) in endorse {
                tx.put(ROOT, slot, heads).map_err(tx_err)?;
            }
            tx.put(
                ROOT,
                format!("{}{}", crate::policy::PREFIX, p.identity),
                u64::from(flags),
            )
            .map_err(tx_err)?;
            if add_me {
                let all = crate::policy::READ | crate::policy::WRITE | crate::policy::MANAGE;
                tx.put(
                    ROOT,
                    format!("{}{me}", crate::policy::PREFIX),
                    u64::from(all),
                )
                .map_err(tx_err)?;
            }
            Ok(())
        })?;
        Ok(p.clone())
    }

    /// Removes one identity's entry; `me` must have `Manage`. Removing the last entry opens the
    /// map to every trusted peer again. Fails with [`Error::PermissionNotFound`] if it had none.
    pub fn remove_permission(&mut self, identity: &str, me: &str, now: Timestamp) -> Result<()> {
        self.expire(now);
        self.check_live(now)?;
        if self.state.policy.get(identity).is_none() {
            return Err(Error::PermissionNotFound(identity.to_string()));
        }
        if !self.state.policy.manages(me) {
            return Err(Error::PermissionDenied(format!(
                "this node ({me}) may not manage map {}",
                self.display_name()
            )));
        }
        let endorse = if self.state.policy.writes(identity) {
            self.endorsement(now)?
        } else {
            Vec::new()
        };
        self.commit_meta(now, |tx| {
            for (slot, heads) in endorse {
                tx.put(ROOT, slot, heads).map_err(tx_err)?;
            }
            tx.delete(ROOT, format!("{}{identity}", crate::policy::PREFIX))
                .map_err(tx_err)
        })
    }

    /// `g<shard>` slots endorsing every shard's history as this replica has it, plus what was
    /// endorsed before and this replica lacks (a slot can be rewritten by a manager that has
    /// not seen everything the last one endorsed).
    pub(super) fn endorsement(&mut self, now: Timestamp) -> Result<Vec<(String, Vec<u8>)>> {
        self.flush(now)?;
        let mut out = Vec::new();
        let before = self.state.endorsed_by_shard.clone();
        let mut room = MAX_ENDORSED_TOTAL;
        for (index, sh) in self.shards.iter_mut() {
            // This replica's heads first: they endorse all it holds.
            let mut heads = sh.heads()?;
            if let Some(old) = before.get(index) {
                let d = sh.doc()?;
                for h in old {
                    if !crate::am::has_change(d, h) && !heads.contains(h) {
                        heads.push(*h);
                    }
                }
            }
            let cap = MAX_ENDORSED_HEADS.min(room);
            if heads.len() > cap {
                tracing::warn!(
                    map = %self.sid,
                    shard = index,
                    "{} heads to endorse, more than the {cap} that fit: the history of the rest reaches later members only from writers that signed it",
                    heads.len()
                );
                heads.truncate(cap);
            }
            room -= heads.len();
            if !heads.is_empty() {
                let bytes: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
                out.push((format!("g{index}"), bytes));
            }
        }
        Ok(out)
    }
}

impl MapReplica {
    /// A peer gave the map permission entries: this node signs the changes it made while it
    /// held the map open and that the entries do not endorse (made before it learnt of them,
    /// they went out unsigned, and peers holding the entries take them only from a writer that
    /// signed them). A signature over a change hash is as good made later as at commit time.
    /// Others' such changes are noted in [`Self::unsigned`], to get their signatures.
    pub(super) fn sign_own_history(&mut self) {
        let Some(signer) = self.id.signer.clone() else {
            return;
        };
        let Some(prefix) = crate::authorship::actor_prefix(signer.peer_id()) else {
            return;
        };
        let inc = self.state.inc;
        let writers = self.writer_prefixes();
        let mut docs: Vec<(DocAddr, &mut Automerge)> = vec![(DocAddr::Meta, &mut self.meta_doc)];
        let mut failed = false;
        for (index, sh) in self.shards.iter_mut() {
            let gen = match sh.generation() {
                Ok(g) => g,
                Err(_) => {
                    failed = true;
                    continue;
                }
            };
            match sh.doc() {
                Ok(d) => docs.push((
                    DocAddr::Shard {
                        inc,
                        index: *index,
                        gen,
                    },
                    d,
                )),
                Err(_) => failed = true,
            }
        }
        let mut made = Vec::new();
        let mut resend = Vec::new();
        for (addr, d) in docs {
            // Only what came after the endorsed heads this document has.
            let since: Vec<ChangeHash> = self
                .state
                .endorsed
                .iter()
                .filter(|h| crate::am::has_change(d, h))
                .copied()
                .collect();
            let (sigs, unsigned, new_unsigned) =
                (&self.sigs, &mut self.unsigned, &mut self.new_unsigned);
            crate::am::for_each_change_since(d, &since, |c| {
                let h = c.hash();
                if sigs.contains_key(&h) {
                    return;
                }
                if c.actor_id().to_bytes().starts_with(&prefix) {
                    if let Some(sig) = signer.sign(&h) {
                        made.push((h, sig));
                        resend.push((addr, c.raw_bytes().to_vec()));
                    }
                } else if let DocAddr::Shard { index, .. } = addr {
                    // A writer's: its author signs it when it learns of the entries, and
                    // peers joining later need that signature from here.
                    let actor = c.actor_id().to_bytes();
                    if writers.iter().any(|p| actor.starts_with(p))
                        && unsigned.len() < MAX_UNSIGNED
                        && unsigned.insert(h, index).is_none()
                    {
                        new_unsigned.push((h, Some(index)));
                    }
                }
            });
        }
        if failed {
            tracing::warn!(map = %self.sid, "a shard could not be loaded to sign this node's earlier changes to it");
        }
        for (h, sig) in made {
            self.sigs.insert(h, sig.clone());
            self.new_sigs.push((h, sig));
        }
        // Peers that took these changes unsigned need the signatures too (to pass them on).
        self.resend.extend(resend);
    }

    /// Changes of this node to send to peers again, now with signatures (not to be stored
    /// again: they are stored already).
    pub fn take_resend(&mut self) -> Vec<(DocAddr, Vec<u8>)> {
        std::mem::take(&mut self.resend)
    }

    /// A copy of the map document, to try peers' changes on before taking them.
    pub(crate) fn meta_fork(&self) -> Automerge {
        self.meta_doc.fork()
    }
}

/// Most heads endorsed per shard (32 bytes each in the map document). A shard has as many
/// heads as concurrent branches not merged yet, so this is reached only by hundreds of
/// writers' changes that never saw each other.
pub(super) const MAX_ENDORSED_HEADS: usize = 1024;
/// Most heads endorsed by one change over all shards (256 KiB), so it stays far below the
/// message limits ([`crate::replication::MAX_GOSSIP_MESSAGE`] is 1 MiB).
pub(super) const MAX_ENDORSED_TOTAL: usize = 8192;

/// Most entries of [`MapReplica::unsigned`], all asked for in one message (beyond, such
/// changes reach later members only from their authors).
pub(super) const MAX_UNSIGNED: usize = crate::replication::MAX_SIGS_ASKED;

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::policy::Permission;

    fn reader(id: &str) -> Permission {
        Permission {
            identity: id.into(),
            read: true,
            write: false,
            manage: false,
        }
    }

    #[test]
    fn the_first_entry_closes_the_map_and_keeps_its_manager_and_the_last_reopens_it() {
        let mut m = replica(1);
        assert!(m.policy().is_open());
        m.set_permission(&reader("peerB"), "peerA", t(1)).unwrap();
        // the node that closed the map keeps every right; the other reads only
        assert!(!m.policy().is_open());
        assert!(m.policy().manages("peerA"));
        assert!(!m.policy().manages("peerB"));
        // a reader cannot manage, and identities are checked
        assert!(matches!(
            m.set_permission(&reader("peerC"), "peerB", t(2)),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            m.set_permission(&reader("not an id!"), "peerA", t(2)),
            Err(Error::InvalidPermission(_))
        ));
        m.remove_permission("peerB", "peerA", t(3)).unwrap();
        m.remove_permission("peerA", "peerA", t(4)).unwrap();
        assert!(m.policy().is_open());
        assert!(matches!(
            m.remove_permission("peerA", "peerA", t(5)),
            Err(Error::PermissionNotFound(_))
        ));
    }
}
