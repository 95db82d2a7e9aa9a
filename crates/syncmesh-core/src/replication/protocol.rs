//! The handlers of the replication machine: one per message and per local event. They work
//! on the maps through [`Host`] and return the direct messages to send; [`Replicator::handle`]
//! turns everything else they note (refusals, damaged maps, changed maps) into outputs.

use std::collections::{BTreeMap, BTreeSet};

use automerge::sync;
use automerge::{Change, ChangeHash};

use super::peer::{Grant, PeerKey, PeerState};
use super::session::{batch_sync, meta_digest, offers_something_new, start_sessions};
use super::validate::{authorize, decode_changes, decode_sync_messages, keep_sigs};
use super::wire::{
    docs_well_formed, msg_sids, sig_map, want_sigs, Bytes, Sigs, Violation, Wire,
    MAX_ADOPT_PER_HELLO, MAX_NOT_HERE_PER_HELLO, MAX_SIGS_ASKED, META_FETCH_INTERVAL,
};
use super::{Host, Outgoing, Replicator};
use crate::ids::{MapSid, Timestamp};
use crate::map::DocAddr;
use crate::policy::Policy;

/// What became of a [`Wire::Changes`] message.
pub(crate) struct ChangesOutcome<P> {
    /// Direct messages to send (a sync to fetch what a change depends on).
    pub out: Vec<Outgoing<P>>,
    /// Whether the message may be relayed on. False when this node could not apply it for
    /// reasons of its own state: not relayed, and the sender is not blamed.
    pub relay: bool,
    /// Whether some change in it was new to this node.
    pub novel: bool,
    /// The message to relay instead of the one received, when some of its changes were
    /// refused (they are not passed on).
    pub rewritten: Option<Vec<u8>>,
}

impl<P: PeerKey> Replicator<P> {
    /// Sets what `peer` may do (every map, read and write, unless set). Takes effect at once:
    /// maps it may no longer read are not named to it again.
    pub(crate) fn set_grant(&mut self, peer: &P, grant: Grant) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.grant = grant.clone();
            let g = &p.grant;
            p.held.retain(|s| g.reads(s));
            p.offered.clear();
            p.sessions.retain(|(s, _), _| g.reads(s));
            p.their_docs.retain(|s, _| g.reads(s));
        }
        self.grants.insert(peer.clone(), grant);
    }

    /// Counts refused changes; one refused before (a peer offers its changes again every
    /// round) is not counted again.
    fn refuse(&mut self, peer: &P, sid: &MapSid, hashes: impl IntoIterator<Item = ChangeHash>) {
        let seen = self.refused_seen.entry(peer.clone()).or_default();
        if seen.len() > 100_000 {
            seen.clear(); // bounded: at worst a refusal is counted twice
        }
        let n = hashes.into_iter().filter(|h| seen.insert(*h)).count();
        if n > 0 {
            *self
                .refusals
                .entry((peer.clone(), sid.clone()))
                .or_default() += n as u64;
        }
    }

    /// Whether `peer` may receive `sid`: its grant here, and the map's own permissions.
    fn reads(&self, peer: &P, sid: &MapSid, host: &mut Host<'_>) -> bool {
        self.peers.get(peer).is_some_and(|p| p.grant.reads(sid))
            && host.policy(sid).is_none_or(|pol| pol.reads(peer.as_ref()))
    }

    /// Direct messages carrying `msgs` (encoded [`Wire::Changes`] of map `sid`, from
    /// [`super::changes_messages`]) to every peer that holds the map and may read it, except `except`.
    pub(crate) fn push(
        &self,
        sid: &MapSid,
        msgs: &[Vec<u8>],
        except: Option<&P>,
        host: &mut Host<'_>,
    ) -> Vec<Outgoing<P>> {
        let mut out = Vec::new();
        let policy = host.policy(sid).unwrap_or_default();
        for (peer, p) in &self.peers {
            if Some(peer) == except
                || !(p.hold_all || p.held.contains(sid))
                || !p.grant.reads(sid)
                || !policy.reads(peer.as_ref())
            {
                continue;
            }
            for m in msgs {
                out.push(Outgoing {
                    peer: peer.clone(),
                    bytes: m.clone(),
                });
            }
        }
        out
    }

    /// A peer connected: greet it with every map this node holds.
    pub(crate) fn peer_up(&mut self, peer: &P, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        let grant = self.grant(peer);
        self.peers.entry(peer.clone()).or_default().grant = grant;
        let hello = self.hello_for(peer, host.held(), host);
        vec![Outgoing {
            peer: peer.clone(),
            bytes: hello.encode(),
        }]
    }

    /// Anti-entropy: a Hello with every held map to every peer.
    pub(crate) fn tick(&mut self, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let held = host.held();
        self.to_each(held, host)
    }

    /// Tells every peer about maps this node started holding (created, opened, or wanted:
    /// a map held empty is announced with digest 0, and peers that have it send it).
    pub(crate) fn announce(&mut self, sids: &[MapSid], host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        if self.peers.is_empty() || sids.is_empty() {
            return Vec::new();
        }
        // Asking anew: earlier answers ("none of it") no longer hold.
        for p in self.peers.values_mut() {
            for sid in sids {
                p.their_docs.remove(sid);
            }
        }
        self.to_each(sids.to_vec(), host)
    }

    /// A map changed in a way gossip could not carry (a commit too large for one gossip
    /// message): send its document digests to every peer holding it, which starts syncs.
    pub(crate) fn nudge(&mut self, sid: &MapSid, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        let Some(m) = host.get(sid) else {
            return Vec::new();
        };
        let Ok(docs) = m.doc_digests() else {
            return Vec::new();
        };
        let bytes = Wire::Docs {
            sid: sid.clone(),
            docs,
        }
        .encode();
        let policy = host.policy(sid).unwrap_or_default();
        let peers: Vec<P> = self
            .peers
            .iter()
            .filter(|(k, p)| {
                (p.hold_all || p.held.contains(sid))
                    && p.grant.reads(sid)
                    && policy.reads(k.as_ref())
            })
            .map(|(k, _)| k.clone())
            .collect();
        peers
            .into_iter()
            .map(|peer| Outgoing {
                peer,
                bytes: bytes.clone(),
            })
            .collect()
    }

    /// Hellos about maps that changed through sync since the last call, to the peers holding
    /// them other than the ones the changes came from (so a node that reconnects spreads
    /// what it brought to the rest of the mesh). Call it after a batch of messages, or on a
    /// short timer: each call costs one small message per peer and map.
    pub(crate) fn take_nudges(&mut self, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        let synced = std::mem::take(&mut self.synced);
        let mut out = Vec::new();
        for (sid, sources) in synced {
            let Some(Ok(digest)) = host.digest(&sid) else {
                continue;
            };
            let bytes = Wire::Hello {
                hold_all: self.hold_all,
                maps: vec![(sid.clone(), digest)],
            }
            .encode();
            let policy = host.policy(&sid).unwrap_or_default();
            for (peer, p) in &self.peers {
                if !sources.contains(peer)
                    && (p.hold_all || p.held.contains(&sid))
                    && p.grant.reads(&sid)
                    && policy.reads(peer.as_ref())
                {
                    out.push(Outgoing {
                        peer: peer.clone(),
                        bytes: bytes.clone(),
                    });
                }
            }
        }
        out
    }

    /// A Hello about `sids` to every peer, each naming only the maps that peer may read
    /// (digests are computed once).
    fn to_each(&self, sids: Vec<MapSid>, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        let Wire::Hello { hold_all, maps } = self.hello(sids, host) else {
            return Vec::new();
        };
        let policies: Vec<Option<Policy>> = maps
            .iter()
            .map(|(s, _)| host.policy(s).filter(|p| !p.is_open()))
            .collect();
        let all_open = policies.iter().all(Option::is_none);
        let mut out = Vec::new();
        let mut everything: Option<Vec<u8>> = None;
        for (peer, p) in &self.peers {
            let bytes = if p.grant.maps.is_none() && all_open {
                everything
                    .get_or_insert_with(|| {
                        Wire::Hello {
                            hold_all,
                            maps: maps.clone(),
                        }
                        .encode()
                    })
                    .clone()
            } else {
                Wire::Hello {
                    hold_all,
                    maps: maps
                        .iter()
                        .zip(&policies)
                        .filter(|((s, _), pol)| {
                            p.grant.reads(s)
                                && pol.as_ref().is_none_or(|pol| pol.reads(peer.as_ref()))
                        })
                        .map(|(m, _)| m.clone())
                        .collect(),
                }
                .encode()
            };
            out.push(Outgoing {
                peer: peer.clone(),
                bytes,
            });
        }
        out
    }

    fn hello_for(&self, peer: &P, sids: Vec<MapSid>, host: &mut Host<'_>) -> Wire {
        let sids = sids
            .into_iter()
            .filter(|s| self.reads(peer, s, host))
            .collect();
        self.hello(sids, host)
    }

    fn hello(&self, sids: Vec<MapSid>, host: &mut Host<'_>) -> Wire {
        let mut maps = Vec::with_capacity(sids.len());
        for sid in sids {
            let d = host.digest(&sid).unwrap_or(Ok(0));
            match d {
                Ok(d) => maps.push((sid, d)),
                Err(e) => tracing::warn!(map = %sid, "cannot compute the map's digest: {e}"),
            }
        }
        Wire::Hello {
            hold_all: self.hold_all,
            maps,
        }
    }

    /// Whether this node has everything some peer had of `sid` when it last described its
    /// documents (each of that peer's document digests equals ours). A map fetched from peers
    /// is complete for the caller once this holds.
    pub(crate) fn caught_up(&self, sid: &MapSid, host: &mut Host<'_>) -> bool {
        let Some(m) = host.get(sid) else {
            return false;
        };
        let Ok(ours) = m.doc_digests() else {
            return false;
        };
        let ours: BTreeMap<DocAddr, u64> = ours.into_iter().collect();
        self.peers.values().any(|p| {
            p.their_docs.get(sid).is_some_and(|theirs| {
                !theirs.is_empty() && theirs.iter().all(|(d, h)| ours.get(d) == Some(h))
            })
        })
    }

    /// Handles a decoded direct message from `peer` (`bytes` as received, for relaying).
    /// Returns what to send back, or the violation for which the peer must be disconnected
    /// (nothing of a refused message is applied).
    pub(crate) fn receive(
        &mut self,
        peer: &P,
        msg: Wire,
        bytes: &[u8],
        host: &mut Host<'_>,
        now: Timestamp,
    ) -> Result<Vec<Outgoing<P>>, Violation> {
        if !self.peers.contains_key(peer) {
            let grant = self.grant(peer);
            self.peers.entry(peer.clone()).or_default().grant = grant;
        }
        let sids = msg_sids(&msg);
        self.guard(sids, |rep| match msg {
            Wire::Hello { hold_all, maps } => Ok(rep.on_hello(peer, hold_all, maps, host)),
            Wire::Docs { sid, docs } => {
                if !docs_well_formed(&docs) {
                    return Err(Violation("malformed document list".into()));
                }
                Ok(rep.on_docs(peer, sid, docs, host, now))
            }
            Wire::Sync { sid, msgs, sigs } => rep.on_sync(peer, sid, msgs, sigs, host, now),
            Wire::WantSigs { sid, hashes } => rep.on_want_sigs(peer, sid, hashes, host),
            Wire::Sigs { sid, sigs } => rep.on_sigs(peer, sid, sigs, host),
            Wire::Changes { sid, docs, sigs } => {
                let g = rep.on_changes(peer, sid.clone(), docs, sigs, host, now)?;
                let mut out = g.out;
                if g.relay && g.novel {
                    // New here: pass the message on to the other peers holding the map.
                    let msg = g.rewritten.unwrap_or_else(|| bytes.to_vec());
                    out.extend(rep.push(&sid, &[msg], Some(peer), host));
                }
                Ok(out)
            }
        })
    }

    /// Runs a handler; a panic inside Automerge on a peer's data becomes a [`Violation`] and
    /// marks the maps involved for reloading ([`super::Output::Reload`]).
    fn guard<T>(
        &mut self,
        sids: Vec<MapSid>,
        f: impl FnOnce(&mut Self) -> Result<T, Violation>,
    ) -> Result<T, Violation> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(
                    "merging a peer's data panicked inside Automerge; reloading the map"
                );
                self.poisoned.extend(sids);
                Err(Violation("data that makes Automerge fail".into()))
            }
        }
    }

    fn on_hello(
        &mut self,
        peer: &P,
        hold_all: bool,
        maps: Vec<(MapSid, u64)>,
        host: &mut Host<'_>,
    ) -> Vec<Outgoing<P>> {
        let mut out = Vec::new();
        let me_all = self.hold_all;
        let Some(p) = self.peers.get_mut(peer) else {
            return out;
        };
        p.hold_all = hold_all;
        p.greeted = true;
        let grant = p.grant.clone();
        let mut adopted = 0;
        let mut not_here = 0;
        for (sid, theirs) in maps {
            // A map the peer may not read is answered as if this node did not hold it.
            let readable =
                grant.reads(&sid) && host.policy(&sid).is_none_or(|pol| pol.reads(peer.as_ref()));
            let ours = if !readable { None } else { host.digest(&sid) };
            // A map not loaded is compared by its remembered digest; it is loaded only when
            // the peer's differs.
            let ours = match ours {
                Some(d) => d,
                None if me_all && theirs != 0 && adopted < MAX_ADOPT_PER_HELLO && readable => {
                    adopted += 1;
                    match host.adopt(&sid) {
                        Some(m) => m.digest(),
                        None => continue,
                    }
                }
                None => {
                    // Digest 0: the sender holds the map empty, i.e. it is fetching it. Say
                    // this node has none of it (an empty document list), so the fetch can end
                    // as soon as every peer has answered instead of at its deadline.
                    if theirs == 0 && not_here < MAX_NOT_HERE_PER_HELLO {
                        not_here += 1;
                        out.push(Outgoing {
                            peer: peer.clone(),
                            bytes: Wire::Docs {
                                sid,
                                docs: Vec::new(),
                            }
                            .encode(),
                        });
                    }
                    continue;
                }
            };
            // Only maps this node holds are remembered: the set is bounded by them.
            p.held.insert(sid.clone());
            p.their_digest.insert(sid.clone(), theirs);
            if readable && theirs != 0 && !p.asked_sigs.contains(&sid) {
                if let Some(ask) = host.unsigned(&sid).and_then(|h| want_sigs(&sid, h)) {
                    p.asked_sigs.insert(sid.clone());
                    p.awaiting_sigs.insert(sid.clone());
                    out.push(Outgoing {
                        peer: peer.clone(),
                        bytes: ask,
                    });
                }
            }
            let ours = match ours {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(map = %sid, "cannot compute the map's digest: {e}");
                    continue;
                }
            };
            if ours == theirs {
                continue;
            }
            let Some(m) = host.get(&sid) else { continue };
            if let Ok(docs) = m.doc_digests() {
                out.push(Outgoing {
                    peer: peer.clone(),
                    bytes: Wire::Docs { sid, docs }.encode(),
                });
            }
        }
        out
    }

    /// Cuts the history of shards of map `sid` where every connected peer holding the map last
    /// said it holds this replica's very generation and heads of the shard (its whole map
    /// equal, or that document): cuts made at heads all holders reported are the same
    /// everywhere, or nested (see `docs/semantics.md`, "History"). The peers are then told of
    /// the new generations, which they take from this node.
    pub(crate) fn cut(
        &mut self,
        sid: &MapSid,
        shards: &[u16],
        host: &mut Host<'_>,
        now: Timestamp,
    ) -> Vec<Outgoing<P>> {
        let Some(m) = host.get(sid) else {
            return Vec::new();
        };
        // A peer whose Hello has not come may hold the map with other heads: no cut yet.
        if self
            .peers
            .values()
            .any(|p| p.grant.reads(sid) && !p.greeted)
        {
            return Vec::new();
        }
        let (Ok(digest), Ok(ours)) = (m.digest(), m.doc_digests()) else {
            return Vec::new();
        };
        let holders: Vec<&PeerState> = self
            .peers
            .values()
            .filter(|p| p.held.contains(sid) || p.their_docs.contains_key(sid))
            .collect();
        let mut cut = false;
        for &index in shards {
            let Some(mine) = ours
                .iter()
                .find(|(d, _)| matches!(d, DocAddr::Shard { index: i, .. } if *i == index))
            else {
                continue;
            };
            let agreed = holders.iter().all(|h| {
                h.their_digest.get(sid) == Some(&digest)
                    || h.their_docs.get(sid).is_some_and(|t| t.contains(mine))
            });
            if !agreed {
                continue;
            }
            match m.cut_shard(index, None, now) {
                Ok(Some(_)) => cut = true,
                Ok(None) => {}
                Err(e) => tracing::warn!(map = %sid, "cutting shard {index}'s history failed: {e}"),
            }
        }
        if !cut {
            return Vec::new();
        }
        let docs = m.doc_digests();
        host.touched(sid);
        let Ok(docs) = docs else {
            return Vec::new();
        };
        let bytes = Wire::Docs {
            sid: sid.clone(),
            docs,
        }
        .encode();
        self.peers
            .iter()
            .filter(|(_, p)| p.held.contains(sid))
            .map(|(peer, _)| Outgoing {
                peer: peer.clone(),
                bytes: bytes.clone(),
            })
            .collect()
    }

    /// Asks every peer holding `sid` (and allowed to read it) for the signatures of the
    /// changes this node holds unsigned ([`MapReplica::unsigned`]), e.g. right after the map
    /// got its first permission entries from a peer.
    pub(crate) fn ask_signatures(&mut self, sid: &MapSid, host: &mut Host<'_>) -> Vec<Outgoing<P>> {
        let Some(ask) = host.unsigned(sid).and_then(|h| want_sigs(sid, h)) else {
            return Vec::new();
        };
        let policy = host.policy(sid);
        let mut out = Vec::new();
        for (peer, p) in self.peers.iter_mut() {
            let reads =
                p.grant.reads(sid) && policy.as_ref().is_none_or(|pol| pol.reads(peer.as_ref()));
            if reads && (p.hold_all || p.held.contains(sid)) {
                p.asked_sigs.insert(sid.clone());
                p.awaiting_sigs.insert(sid.clone());
                out.push(Outgoing {
                    peer: peer.clone(),
                    bytes: ask.clone(),
                });
            }
        }
        out
    }

    fn on_want_sigs(
        &mut self,
        peer: &P,
        sid: MapSid,
        hashes: Vec<Bytes>,
        host: &mut Host<'_>,
    ) -> Result<Vec<Outgoing<P>>, Violation> {
        if hashes.len() > MAX_SIGS_ASKED {
            return Err(Violation("too many signatures asked for".into()));
        }
        if !self.reads(peer, &sid, host) {
            return Ok(Vec::new());
        }
        let Some(m) = host.get(&sid) else {
            return Ok(Vec::new());
        };
        let sigs: Sigs = hashes
            .into_iter()
            .filter_map(|b| {
                let h = ChangeHash::try_from(b.0.as_slice()).ok()?;
                Some((b, m.signature(&h)?.clone()))
            })
            .collect();
        if sigs.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![Outgoing {
            peer: peer.clone(),
            bytes: Wire::Sigs { sid, sigs }.encode(),
        }])
    }

    fn on_sigs(
        &mut self,
        peer: &P,
        sid: MapSid,
        sigs: Sigs,
        host: &mut Host<'_>,
    ) -> Result<Vec<Outgoing<P>>, Violation> {
        if sigs.len() > MAX_SIGS_ASKED {
            return Err(Violation("too many signatures".into()));
        }
        let sigs = sig_map(sigs).ok_or_else(|| Violation("malformed signature list".into()))?;
        // Only an answer to this node's question is looked at, once.
        let asked = self
            .peers
            .get_mut(peer)
            .is_some_and(|p| p.awaiting_sigs.remove(&sid));
        if !asked || !self.reads(peer, &sid, host) {
            return Ok(Vec::new());
        }
        let Some(m) = host.get(&sid) else {
            return Ok(Vec::new());
        };
        match m.take_late_signatures(sigs.into_iter().collect()) {
            Ok(0) => {}
            Ok(_) => host.touched(&sid),
            // An honest node passes on only signatures it checked.
            Err(h) => {
                return Err(Violation(format!(
                    "map {sid}: a signature of change {h} that is not its writer's"
                )))
            }
        }
        Ok(Vec::new())
    }

    fn on_docs(
        &mut self,
        peer: &P,
        sid: MapSid,
        theirs: Vec<(DocAddr, u64)>,
        host: &mut Host<'_>,
        now: Timestamp,
    ) -> Vec<Outgoing<P>> {
        if !self.reads(peer, &sid, host) {
            return Vec::new();
        }
        let m = match host.get(&sid) {
            Some(m) => m,
            None if self.hold_all => match host.adopt(&sid) {
                Some(m) => m,
                None => return Vec::new(),
            },
            None => return Vec::new(),
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return Vec::new();
        };
        p.held.insert(sid.clone());
        p.their_docs.insert(sid.clone(), theirs);
        start_sessions(peer, p, &sid, m, now)
    }

    fn on_sync(
        &mut self,
        peer: &P,
        sid: MapSid,
        msgs: Vec<(DocAddr, Bytes)>,
        sigs: Sigs,
        host: &mut Host<'_>,
        now: Timestamp,
    ) -> Result<Vec<Outgoing<P>>, Violation> {
        if !self.reads(peer, &sid, host) {
            return Ok(Vec::new());
        }
        let sigs = sig_map(sigs).ok_or_else(|| Violation("malformed signature list".into()))?;
        // This node's own decision about the sender; authors' rights are checked per change.
        let may_write = self.peers.get(peer).is_some_and(|p| p.grant.writes(&sid));
        // A peer that may not write keeps changes of its own this node refuses: it never agrees
        // on heads with this node (see the replies below).
        let writer = may_write
            && host
                .policy(&sid)
                .is_none_or(|pol| pol.writes(peer.as_ref()));
        let m = match host.get(&sid) {
            Some(m) => m,
            None if self.hold_all => match host.adopt(&sid) {
                Some(m) => m,
                None => return Ok(Vec::new()),
            },
            None => return Ok(Vec::new()),
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return Ok(Vec::new());
        };
        p.held.insert(sid.clone());
        let before = m.doc_digests().unwrap_or_default();
        let meta_before = meta_digest(&before);
        // Check every message before applying any: a malformed one is the sender's fault.
        let decoded = decode_sync_messages(&sid, msgs)?;
        let mut refused = Vec::new();
        let mut replies = Vec::new();
        for (doc, mut msg) in decoded {
            if !m.syncs(doc) {
                continue; // another incarnation: no session is kept for it
            }
            let refused_before = refused.len();
            let mut missing = Vec::new();
            if msg.change_count() > 0 {
                if !may_write {
                    // A read-only peer: its changes stay with it.
                    refused.extend(msg.changes().iter().map(Change::hash));
                    msg = msg.without_changes(|h| m.has_change(doc, h));
                } else {
                    // Read here, after the documents before it (the map document first).
                    let v = authorize(m, doc, msg.changes(), &sigs);
                    if v.ok.len() < msg.change_count() {
                        refused.extend(
                            msg.changes()
                                .iter()
                                .map(Change::hash)
                                .filter(|h| !v.ok.contains(h) && !v.deferred.contains(h)),
                        );
                        msg = msg.retain_changes(&v.ok, |h| m.has_change(doc, h));
                    }
                    keep_sigs(m, msg.changes(), &sigs, &v.verified);
                    missing.extend(v.missing);
                }
            }
            if refused.len() > refused_before {
                p.refusing.insert((sid.clone(), doc));
            }
            let state = p.sessions.entry((sid.clone(), doc)).or_default();
            // Automerge forgets what it sent when a message says the peer holds nothing (to
            // resend everything to a peer that lost its data). When both sides open a session
            // at once, a peer holding nothing says so twice, once in its first message and
            // once answering ours, and every change would travel twice. The second time is
            // taken as that crossing, once per session; a peer that lost its data comes back
            // on a new connection, and any later repeat resends as Automerge would.
            let crossing = msg.holds_nothing()
                && state.their_heads.as_ref().is_some_and(Vec::is_empty)
                && !state.sent_hashes.is_empty()
                && p.crossed.insert((sid.clone(), doc));
            let sent = crossing.then(|| (state.sent_hashes.clone(), state.last_sent_heads.clone()));
            let applied = m.sync_apply(doc, state, msg, now);
            if let (Ok(()), Some((hashes, heads))) = (&applied, sent) {
                state.sent_hashes = hashes;
                state.last_sent_heads = heads;
            }
            if let Err(e) = applied {
                // Refused against this replica's state (e.g. a change that reuses a sequence
                // number): this document's exchange stops here; the peer is not blamed.
                tracing::warn!(map = %sid, "a sync message for {doc:?} was not applied: {e}");
                continue;
            }
            match m.sync_generate_needing(doc, state, &missing, now) {
                Ok(Some(reply)) => {
                    // A peer whose changes this node refuses (or refused in this session) never
                    // agrees on heads with it, so Automerge's exchange would not end: to such a
                    // peer a reply goes only when it offers changes not offered before (it has
                    // nothing to ask of it).
                    let refusing = p.refusing.contains(&(sid.clone(), doc));
                    if (writer && refused.is_empty() && !refusing)
                        || offers_something_new(&mut p.offered, &sid, &reply)
                    {
                        replies.push((doc, Bytes(reply)));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(map = %sid, "sync message for {doc:?} failed: {e}"),
            }
        }
        let mut out = batch_sync(peer, &sid, replies, m);
        host.touched(&sid);
        self.refuse(peer, &sid, refused);
        // The map document moved (a new incarnation, or the map just arrived): shards are
        // comparable now. Tell the peer our documents and sync the ones that differ.
        let Some(m) = host.get(&sid) else {
            return Ok(out);
        };
        let ours = m.doc_digests().unwrap_or_default();
        if ours != before {
            self.synced
                .entry(sid.clone())
                .or_default()
                .insert(peer.clone());
        }
        if meta_digest(&ours) != meta_before {
            out.push(Outgoing {
                peer: peer.clone(),
                bytes: Wire::Docs {
                    sid: sid.clone(),
                    docs: ours,
                }
                .encode(),
            });
            if let Some(p) = self.peers.get_mut(peer) {
                out.extend(start_sessions(peer, p, &sid, m, now));
            }
        }
        Ok(out)
    }

    fn on_changes(
        &mut self,
        peer: &P,
        sid: MapSid,
        docs: Vec<(DocAddr, Vec<Bytes>)>,
        sigs: Sigs,
        host: &mut Host<'_>,
        now: Timestamp,
    ) -> Result<ChangesOutcome<P>, Violation> {
        let nothing = ChangesOutcome {
            out: Vec::new(),
            relay: false,
            novel: false,
            rewritten: None,
        };
        let grant = self
            .peers
            .get(peer)
            .map(|p| p.grant.clone())
            .unwrap_or_default();
        if !grant.reads(&sid) {
            // Not a map this peer is given: nothing it says about it is taken.
            return Ok(nothing);
        }
        if !grant.writes(&sid) {
            // This node does not take changes from this peer (a read-only invitation).
            let hashes: Vec<ChangeHash> = docs
                .iter()
                .flat_map(|(_, l)| l.iter())
                .filter_map(|b| Change::from_bytes(b.0.clone()).ok().map(|c| c.hash()))
                .collect();
            self.refuse(peer, &sid, hashes);
            return Ok(nothing);
        }
        let sigs = sig_map(sigs).ok_or_else(|| Violation("malformed signature list".into()))?;
        // Check everything before applying anything.
        let decoded = decode_changes(&sid, docs)?;
        let Some(m) = host.get(&sid) else {
            // Not a map this node holds: valid, but nothing to do here.
            return Ok(ChangesOutcome {
                relay: true,
                ..nothing
            });
        };
        let received_before = m.received_len();
        let mut relay = true;
        let mut lagging = Vec::new();
        let mut fetch_meta = false;
        let mut refused = Vec::new();
        let mut kept: Vec<(DocAddr, Vec<Bytes>)> = Vec::new();
        let mut dropped = false;
        for (doc, cs, checked) in decoded {
            // Authors' rights are read per document: a map-document change applied just
            // before may have changed them.
            let v = authorize(m, doc, &cs, &sigs);
            // They wait for map-document changes this node has not got: fetch them now from
            // the sender (the deferred changes come again after them).
            fetch_meta |= !v.deferred.is_empty();
            let n = cs.len();
            let cs: Vec<Change> = if v.ok.len() == n {
                cs
            } else {
                let (ok_cs, bad): (Vec<Change>, Vec<Change>) =
                    cs.into_iter().partition(|c| v.ok.contains(&c.hash()));
                refused.extend(
                    bad.iter()
                        .map(Change::hash)
                        .filter(|h| !v.deferred.contains(h)),
                );
                dropped |= !bad.is_empty();
                ok_cs
            };
            if cs.is_empty() {
                continue;
            }
            kept.push((
                doc,
                cs.iter().map(|c| Bytes(c.raw_bytes().to_vec())).collect(),
            ));
            keep_sigs(m, &cs, &sigs, &v.verified);
            if let Err(e) = m.apply_checked(doc, cs, checked, now) {
                // Refused against this replica's state: not relayed, nobody blamed.
                tracing::warn!(map = %sid, "gossip for {doc:?} was not applied: {e}");
                relay = false;
                continue;
            }
            if m.missing_deps(doc).unwrap_or(false) && !lagging.contains(&doc) {
                lagging.push(doc);
            }
        }
        let novel = m.received_len() > received_before;
        host.touched(&sid);
        // What was refused is not passed on: the rest goes on as a message of its own.
        let rewritten = (dropped && !kept.is_empty()).then(|| {
            let hashes: BTreeSet<ChangeHash> = kept
                .iter()
                .flat_map(|(_, l)| l.iter())
                .filter_map(|b| Change::from_bytes(b.0.clone()).ok().map(|c| c.hash()))
                .collect();
            Wire::Changes {
                sid: sid.clone(),
                docs: kept,
                sigs: sigs
                    .iter()
                    .filter(|(h, _)| hashes.contains(h))
                    .map(|(h, s)| (Bytes(h.0.to_vec()), s.clone()))
                    .collect(),
            }
            .encode()
        });
        let relay = relay && (!dropped || rewritten.is_some());
        self.refuse(peer, &sid, refused);
        if lagging.is_empty() && !fetch_meta {
            return Ok(ChangesOutcome {
                out: Vec::new(),
                relay,
                novel,
                rewritten,
            });
        }
        // A change was missed: sync those documents with the sender.
        let Some(m) = host.get(&sid) else {
            return Ok(ChangesOutcome {
                out: Vec::new(),
                relay,
                novel,
                rewritten,
            });
        };
        let p = self.peers.entry(peer.clone()).or_default();
        let mut msgs = Vec::new();
        for doc in &lagging {
            let state = p.sessions.entry((sid.clone(), *doc)).or_default();
            *state = sync::State::new();
            if let Ok(Some(b)) = m.sync_generate(*doc, state, now) {
                msgs.push((*doc, Bytes(b)));
            }
        }
        let recently = p
            .meta_fetched
            .get(&sid)
            .is_some_and(|t| now.millis().saturating_sub(t.millis()) < META_FETCH_INTERVAL);
        if fetch_meta && !lagging.contains(&DocAddr::Meta) && !recently {
            // A burst of such gossip costs one exchange, not one each.
            if p.meta_fetched.len() >= 4096 {
                p.meta_fetched.clear();
            }
            p.meta_fetched.insert(sid.clone(), now);
            let state = p.sessions.entry((sid.clone(), DocAddr::Meta)).or_default();
            *state = sync::State::new();
            if let Ok(Some(b)) = m.sync_generate(DocAddr::Meta, state, now) {
                msgs.push((DocAddr::Meta, Bytes(b)));
            }
        }
        Ok(ChangesOutcome {
            out: batch_sync(peer, &sid, msgs, m),
            relay,
            novel,
            rewritten,
        })
    }
}
