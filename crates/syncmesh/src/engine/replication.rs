//! The engine's side of replication: it hosts the maps for the sans-IO [`Replicator`], feeds
//! it what the network delivers, and hands what it says to the network thread.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use syncmesh_core::replication::{MapHost, Outgoing, Replicator};
use syncmesh_core::{DocAddr, MapInfo, MapRef, MapReplica, MapSid, MapSpec, OpenMode, Timestamp};
use syncmesh_net::{NetEvent, NetHandle, PeerId};
use tokio::sync::oneshot;

use super::Engine;
use crate::error::{Error, Result};

/// How often every peer is sent a Hello with every map's digest (anti-entropy).
const ANTI_ENTROPY: Duration = Duration::from_secs(10);
/// How long opening a map that only peers have waits for it to arrive.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// An `open` waiting for a map to arrive from peers.
struct Want {
    sid: MapSid,
    spec: MapSpec,
    reply: oneshot::Sender<Result<MapInfo>>,
    deadline: Instant,
}

/// The network part of an engine.
pub(crate) struct Net {
    pub handle: NetHandle,
    pub rx: syncmesh_net::NetEvents,
    pub(crate) rep: Option<Replicator>,
    /// Trusted peers that are up.
    pub(crate) peers: HashMap<String, PeerId>,
    next_tick: Instant,
    wants: Vec<Want>,
    /// Joins this node asked for, waiting for the inviter.
    pub(crate) joins: Vec<super::trust::PendingJoin>,
    /// Successful joins waiting for the inviter to come up before answering.
    pub(crate) joined: Vec<super::trust::Joined>,
    /// How long an open waits for a map only peers hold.
    fetch_timeout: Duration,
    /// Fetched maps whose opens are answered with the next commit (after their data is on
    /// disk and their events are published).
    pub(crate) fetched: Vec<(MapSid, MapInfo, oneshot::Sender<Result<MapInfo>>)>,
    /// Peers' messages received but left for the next rounds ([`ROUND_PEER_BYTES`]).
    backlog: VecDeque<NetEvent>,
    /// Bytes of peers' messages handled in the current round.
    pub(crate) round_bytes: usize,
}

/// Bytes of peers' messages one engine round handles before it commits. A catch-up arrives as
/// megabytes of changes: merged a slice per round, each slice is stored (on the store thread)
/// and its events published while the next is merged, and commands are answered in between.
pub(crate) const ROUND_PEER_BYTES: usize = 256 << 10;

impl Net {
    pub(crate) fn new(
        handle: NetHandle,
        rx: syncmesh_net::NetEvents,
        hold_all: bool,
        fetch_timeout: Duration,
    ) -> Net {
        Net {
            fetch_timeout,
            fetched: Vec::new(),
            handle,
            rx,
            rep: Some(Replicator::new(hold_all)),
            peers: HashMap::new(),
            next_tick: Instant::now() + ANTI_ENTROPY,
            wants: Vec::new(),
            joins: Vec::new(),
            joined: Vec::new(),
            backlog: VecDeque::new(),
            round_bytes: 0,
        }
    }

    /// The next peer event to handle: what an earlier round left first. `None` when the round
    /// has had its share of peers' bytes or nothing is waiting.
    pub(crate) fn try_next(&mut self) -> Option<NetEvent> {
        if self.round_bytes >= ROUND_PEER_BYTES {
            return None;
        }
        self.backlog.pop_front().or_else(|| self.rx.try_recv().ok())
    }

    /// Waits for the next peer event (at once if an earlier round left some).
    pub(crate) async fn next(&mut self) -> Option<NetEvent> {
        match self.backlog.pop_front() {
            Some(ev) => Some(ev),
            None => self.rx.recv().await,
        }
    }

    /// When the engine must wake next for the network (anti-entropy, open deadlines).
    pub(crate) fn next_wake(&self) -> Instant {
        self.wants
            .iter()
            .map(|w| w.deadline)
            .chain(self.joins.iter().map(|j| j.deadline))
            .chain(self.joined.iter().map(|j| j.3))
            .chain(std::iter::once(self.next_tick))
            .min()
            .unwrap_or(self.next_tick)
    }
}

impl MapHost for Engine {
    fn held(&mut self) -> Vec<MapSid> {
        let mut all: Vec<MapSid> = self.on_disk.keys().cloned().collect();
        all.extend(
            self.catalog
                .maps()
                .map(|m| m.sid().clone())
                .filter(|s| !self.on_disk.contains_key(s)),
        );
        all
    }

    fn get(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        if !self.catalog.contains(sid) && !self.on_disk.contains_key(sid) {
            return None;
        }
        if let Err(e) = self.ensure_loaded(sid) {
            tracing::warn!(map = %sid, "cannot load the map for replication: {e}");
            return None;
        }
        self.catalog.by_sid(sid)
    }

    fn adopt(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        if !self.catalog.contains(sid) {
            let id = self.catalog.identity().clone();
            self.catalog.insert(MapReplica::empty(id, sid.clone()));
        }
        self.catalog.by_sid(sid)
    }

    fn touched(&mut self, sid: &MapSid) {
        self.dirty.insert(sid.clone());
    }

    fn policy(&mut self, sid: &MapSid) -> Option<syncmesh_core::Policy> {
        if let Some(m) = self.catalog.get(sid) {
            return Some(m.policy().clone());
        }
        if !self.on_disk.contains_key(sid) {
            return None;
        }
        Some(self.policies.get(sid).cloned().unwrap_or_default())
    }

    fn unsigned(&mut self, sid: &MapSid) -> Option<Vec<syncmesh_core::ChangeHash>> {
        // Only loaded maps are asked about: loading every map for this would make each
        // Hello cost a full load (a map with unsigned changes asks once it is used again).
        let m = self.catalog.by_sid(sid)?;
        if !m.has_unsigned() {
            return None;
        }
        let h = m.unsigned(syncmesh_core::replication::MAX_SIGS_ASKED);
        // What it forgot on the way is stored as gone with the next commit.
        self.dirty.insert(sid.clone());
        (!h.is_empty()).then_some(h)
    }

    fn digest(&mut self, sid: &MapSid) -> Option<syncmesh_core::Result<u64>> {
        if !self.catalog.contains(sid) {
            if let Some(d) = self.stored_digests.get(sid) {
                return Some(Ok(*d));
            }
            if self.on_disk.contains_key(sid) {
                // Unknown (changed since last stored, or never stored): load it once, and keep
                // its digest for the next start.
                self.digests_wanted.insert(sid.clone());
            }
        }
        self.get(sid).map(MapReplica::digest)
    }
}

impl Engine {
    /// Runs `f` with the replicator taken out of the engine (it needs the engine as host).
    fn with_rep<T>(&mut self, f: impl FnOnce(&mut Replicator, &mut Engine) -> T) -> Option<T> {
        let mut rep = self.net.as_mut()?.rep.take()?;
        let r = f(&mut rep, self);
        if let Some(n) = self.net.as_mut() {
            n.rep = Some(rep);
        }
        Some(r)
    }

    fn send_all(&mut self, out: Vec<Outgoing>) {
        let Some(n) = &self.net else { return };
        for o in out {
            if let Some(p) = n.peers.get(&o.peer) {
                n.handle.send(*p, o.bytes);
            }
        }
    }

    /// A map this node just started holding: subscribe, and tell the peers.
    pub(super) fn announce(&mut self, sid: &MapSid) {
        if self.net.is_none() {
            return;
        }
        let sid = sid.clone();
        if let Some(out) = self.with_rep(|rep, host| rep.announce(&[sid], host)) {
            self.send_all(out);
        }
    }

    /// Asks peers for the signatures of a map's changes this node holds unsigned.
    pub(super) fn ask_signatures(&mut self, sid: &MapSid) {
        if let Some(out) = self.with_rep(|rep, host| rep.ask_signatures(sid, host)) {
            self.send_all(out);
        }
    }

    /// Pushes the local changes of one commit of a map to every peer holding it (and allowed
    /// to read it).
    pub(super) fn gossip(
        &mut self,
        sid: &MapSid,
        changes: &[(DocAddr, Vec<u8>)],
        sigs: &std::collections::HashMap<syncmesh_core::ChangeHash, syncmesh_core::Signature>,
    ) {
        let Some(n) = &self.net else { return };
        if changes.is_empty() || n.peers.is_empty() {
            return;
        }
        let (msgs, too_large) = Replicator::gossip(sid, changes.to_vec(), sigs);
        let out = self
            .with_rep(|rep, host| rep.push(sid, &msgs, None, host))
            .unwrap_or_default();
        self.send_all(out);
        if too_large {
            let sid = sid.clone();
            if let Some(out) = self.with_rep(|rep, host| rep.nudge(&sid, host)) {
                self.send_all(out);
            }
        }
    }

    /// Handles one network event.
    pub(super) fn on_net(&mut self, ev: NetEvent, now: Timestamp) {
        match ev {
            NetEvent::PeerUp(p) => {
                let key = p.to_string();
                // Configured or stored trust gives the record's scope; in a mesh that trusts
                // everyone (trust_all, swarm key) a peer without a record gets every map. A peer
                // the book does not trust (an untrust that raced this event) is not heard.
                let everyone = self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.handle.status().trusts_everyone);
                let grant = match self.trust.grant(&key) {
                    Some(g) => g,
                    None if everyone && !self.trust.denies(&key) => {
                        syncmesh_core::replication::Grant::full()
                    }
                    None => {
                        tracing::debug!(peer = %key, "a peer came up that is no longer trusted");
                        return;
                    }
                };
                self.problems.remove(&key);
                if let Some(n) = self.net.as_mut() {
                    n.peers.insert(key.clone(), p);
                    if let Some(rep) = n.rep.as_mut() {
                        // Configured, stored or swarm-wide trust: the network only brings up
                        // trusted peers; a peer without a record (trust_all, swarm key) gets
                        // every map.
                        rep.set_grant(&key, grant);
                    }
                }
                if let Some(out) = self.with_rep(|rep, host| rep.peer_up(&key, host)) {
                    self.send_all(out);
                }
                self.settle_joined();
            }
            NetEvent::PeerDown(p) => {
                let key = p.to_string();
                if let Some(n) = self.net.as_mut() {
                    n.peers.remove(&key);
                    if let Some(rep) = n.rep.as_mut() {
                        rep.peer_down(&key);
                    }
                }
            }
            NetEvent::Direct { peer, msgs } => {
                let key = peer.to_string();
                // Only peers that are up (trusted) are heard; an untrusted one raced here.
                if !self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.peers.contains_key(&key))
                {
                    return;
                }
                if self.write_stop().is_some() {
                    // What this node cannot store it must not take (it leaves the mesh at
                    // the end of this round): peers keep their changes.
                    return;
                }
                let mut msgs = VecDeque::from(msgs);
                while let Some(bytes) = msgs.pop_front() {
                    if let Some(n) = self.net.as_mut() {
                        if n.round_bytes >= ROUND_PEER_BYTES {
                            // The rest waits for the next round (ahead of anything newer).
                            msgs.push_front(bytes);
                            n.backlog.push_front(NetEvent::Direct {
                                peer,
                                msgs: msgs.into(),
                            });
                            break;
                        }
                        n.round_bytes += bytes.len();
                    }
                    let r = self.with_rep(|rep, host| rep.receive(&key, &bytes, host, now));
                    self.reload_poisoned();
                    match r {
                        Some(Ok(out)) => self.send_all(out),
                        Some(Err(v)) => {
                            self.punish(peer, v.0);
                            break;
                        }
                        None => break,
                    }
                }
            }
            NetEvent::JoinRequest {
                peer, id, request, ..
            } => self.on_join_request(peer, id, &request, now),
            NetEvent::JoinAnswer { peer, answer } => self.on_join_answer(peer, answer, now),
        }
        self.note_refusals(now);
    }

    fn punish(&mut self, peer: PeerId, reason: String) {
        if let Some(n) = self.net.as_mut() {
            n.handle.punish(peer, reason);
            n.peers.remove(&peer.to_string());
            if let Some(rep) = n.rep.as_mut() {
                rep.peer_down(&peer.to_string());
            }
        }
    }

    /// After a batch of work: spread what sync brought, run anti-entropy when due, and
    /// settle opens waiting for maps from peers.
    pub(super) fn net_housekeeping(&mut self, now: Timestamp) {
        let Some(n) = self.net.as_ref() else {
            return;
        };
        let mut up: Vec<PeerId> = n.peers.values().copied().collect();
        up.sort_by_key(ToString::to_string);
        self.shared.peers.send_if_modified(|p| {
            let changed = *p != up;
            if changed {
                *p = up;
            }
            changed
        });
        self.expire_joins();
        if let Some(out) = self.with_rep(|rep, host| rep.take_nudges(host)) {
            self.send_all(out);
        }
        let due = self
            .net
            .as_ref()
            .is_some_and(|n| Instant::now() >= n.next_tick);
        if due {
            if let Some(n) = self.net.as_mut() {
                n.next_tick = Instant::now() + ANTI_ENTROPY;
            }
            if let Some(out) = self.with_rep(|rep, host| rep.tick(host)) {
                self.send_all(out);
            }
        }
        self.settle_wants(now);
    }

    /// Whether an open that found nothing should wait for peers to send the map.
    pub(super) fn should_fetch(&self, spec: &MapSpec) -> Option<MapSid> {
        let n = self.net.as_ref()?;
        // Peers the network has connected and whose arrival the engine has not handled yet
        // count too: a caller that saw them connected must not get "not found".
        let pending = self.peers_pending();
        if n.peers.is_empty() && !pending {
            return None;
        }
        let id = spec.id.as_ref()?;
        let r = MapRef::parse(id).ok()?;
        let by_sid = matches!(r, MapRef::Sid(_));
        if spec.mode != OpenMode::OpenExisting && !by_sid {
            return None;
        }
        let sid = r.sid();
        // Only peers that may give it to this node are asked.
        let someone = pending
            || n.rep
                .as_ref()
                .is_some_and(|rep| n.peers.keys().any(|p| rep.grant(p).reads(&sid)));
        if !someone {
            return None;
        }
        // A map known here and removed is not fetched again.
        let known = self.catalog.get(&sid).is_some_and(MapReplica::exists);
        (!known && !self.on_disk.contains_key(&sid)).then_some(sid)
    }

    /// Whether the network has trusted peers connected that the engine has not been told of
    /// yet (their `PeerUp` is still queued).
    fn peers_pending(&self) -> bool {
        self.net.as_ref().is_some_and(|n| {
            n.handle
                .status()
                .connected
                .iter()
                .any(|p| !n.peers.contains_key(&p.to_string()))
        })
    }

    /// Waits (up to the fetch timeout, [`FETCH_TIMEOUT`] unless the node was given another)
    /// for peers to send a map this node does not have.
    pub(super) fn fetch(
        &mut self,
        sid: MapSid,
        spec: MapSpec,
        reply: oneshot::Sender<Result<MapInfo>>,
    ) {
        if !self.catalog.contains(&sid) {
            let id = self.catalog.identity().clone();
            self.catalog.insert(MapReplica::empty(id, sid.clone()));
        }
        self.announce(&sid);
        if let Some(n) = self.net.as_mut() {
            let deadline = Instant::now() + n.fetch_timeout;
            n.wants.push(Want {
                sid,
                spec,
                reply,
                deadline,
            });
        }
    }

    fn settle_wants(&mut self, now: Timestamp) {
        let Some(n) = self.net.as_mut() else { return };
        if n.wants.is_empty() {
            return;
        }
        let wants = std::mem::take(&mut n.wants);
        let mut keep = Vec::new();
        for w in wants {
            let exists = self.catalog.get(&w.sid).is_some_and(MapReplica::exists);
            let sid = w.sid.clone();
            let complete = exists
                && self
                    .with_rep(|rep, host| rep.caught_up(&sid, host))
                    .unwrap_or(false);
            // Every peer said it has none of it: no use waiting for the deadline.
            let nobody = !exists
                && !self.peers_pending()
                && self
                    .with_rep(|rep, _| rep.nobody_has(&sid))
                    .unwrap_or(false);
            let past = Instant::now() >= w.deadline;
            let id = w.spec.id.clone().unwrap_or_default();
            if complete {
                // Whole as a peer described it: answered once it is committed and its events
                // are published, so a subscriber that starts after the answer sees none of it
                // again.
                match self.open(&w.spec, now) {
                    Ok((info, _)) => {
                        self.dirty.insert(w.sid.clone());
                        if let Some(n) = self.net.as_mut() {
                            n.fetched.push((w.sid.clone(), info, w.reply));
                        }
                    }
                    Err(e) => {
                        let _ = w.reply.send(Err(e));
                    }
                }
            } else if nobody || past || w.reply.is_closed() {
                if self
                    .catalog
                    .by_sid(&w.sid)
                    .is_some_and(|m| !m.exists() && m.doc_digests().is_ok_and(|d| d.is_empty()))
                {
                    self.catalog.remove(&w.sid);
                }
                let e = if nobody {
                    Error::Map(syncmesh_core::Error::MapNotFound(id))
                } else {
                    // Never a part of a map as if it were all of it.
                    Error::FetchIncomplete {
                        map: id,
                        why: if exists {
                            "only part of it arrived".into()
                        } else {
                            "no peer that may have it answered".into()
                        },
                    }
                };
                let _ = w.reply.send(Err(e));
            } else {
                keep.push(w);
            }
        }
        if let Some(n) = self.net.as_mut() {
            n.wants.extend(keep);
        }
    }

    /// Drops maps whose documents a peer's data may have damaged (Automerge panicked while
    /// merging it). What the store holds is intact: once every queued commit is on disk, the
    /// map is forgotten in memory and reloads from the store on next use. Writes to it since
    /// the last commit are not acknowledged (their epoch is stale).
    fn reload_poisoned(&mut self) {
        let Some(sids) = self
            .net
            .as_mut()
            .and_then(|n| n.rep.as_mut())
            .map(Replicator::take_poisoned)
        else {
            return;
        };
        if sids.is_empty() {
            return;
        }
        self.fence();
        for sid in sids {
            tracing::warn!(map = %sid, "reloading the map from storage after a peer's bad data");
            self.catalog.remove(&sid);
            self.dirty.remove(&sid);
            *self.epochs.entry(sid).or_insert(0) += 1;
        }
    }

    /// Shuts the network thread down. Its events are dropped first, so a network thread
    /// waiting to deliver one is never stuck.
    /// After a failed commit: answers every open and join waiting on peers with the failure,
    /// then stops the network.
    pub(super) async fn stop_net_for_stopped_writes(&mut self) {
        let Some(e) = self.write_stop() else { return };
        if let Some(n) = self.net.as_mut() {
            for w in n.wants.drain(..) {
                let _ = w.reply.send(Err(e.clone()));
            }
            for j in n.joins.drain(..) {
                j.fail(e.clone());
            }
        }
        self.stop_net().await;
    }

    pub(super) async fn stop_net(&mut self) {
        if let Some(n) = self.net.take() {
            let Net { handle, rx, .. } = n;
            drop(rx);
            handle.shutdown().await;
        }
    }
}
