//! The engine's side of replication: it feeds the sans-IO [`Replicator`] what the network
//! and the node do, and carries out what it answers (messages to the network thread, maps to
//! load and commit, timers, verdicts on peers, fetches settled).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use syncmesh_core::replication::{
    FetchOutcome, Input, Output, ParkedMap, Replicator, Shelf, Timer,
};
use syncmesh_core::{DocAddr, MapInfo, MapRef, MapReplica, MapSid, MapSpec, OpenMode, Timestamp};
use syncmesh_net::{NetEvent, NetHandle, PeerId};
use tokio::sync::oneshot;

use super::Engine;
use crate::error::{Error, Result};

/// How long opening a map that only peers have waits for it to arrive.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// An `open` waiting for a map to arrive from peers.
struct Want {
    sid: MapSid,
    spec: MapSpec,
    reply: oneshot::Sender<Result<MapInfo>>,
    deadline: Timestamp,
}

/// The network part of an engine.
pub(crate) struct Net {
    pub handle: NetHandle,
    pub rx: syncmesh_net::NetEvents,
    pub(crate) rep: Replicator<String>,
    /// Trusted peers that are up.
    pub(crate) peers: std::collections::HashMap<String, PeerId>,
    /// Timers the replicator asked for, when each is due.
    timers: BTreeMap<Timer, Instant>,
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
            rep: Replicator::new(hold_all),
            peers: std::collections::HashMap::new(),
            timers: BTreeMap::new(),
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

    /// When the engine must wake next for the network (the replicator's timers, joins).
    pub(crate) fn next_wake(&self) -> Instant {
        let later = Instant::now() + Duration::from_secs(3600);
        self.timers
            .values()
            .copied()
            .chain(self.joins.iter().map(|j| j.deadline))
            .chain(self.joined.iter().map(|j| j.3))
            .min()
            .unwrap_or(later)
    }
}

impl Engine {
    /// Feeds one input to the replicator and carries out everything it answers, including
    /// the inputs those answers lead to (maps loaded, a fetch that must keep waiting).
    pub(super) fn drive(&mut self, input: Input<String>, now: Timestamp) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let Some(n) = self.net.as_mut() else { return };
            let shelf = Shelf {
                maps: &mut self.catalog,
                parked: &self.parked,
            };
            let outputs = n.rep.handle(shelf, input, now);
            for o in outputs {
                match o {
                    Output::Send(o) => {
                        if let Some(n) = &self.net {
                            if let Some(p) = n.peers.get(&o.peer) {
                                n.handle.send(*p, o.bytes);
                            }
                        }
                    }
                    Output::Punish { peer, violation } => {
                        if let Some(n) = self.net.as_mut() {
                            if let Some(p) = n.peers.remove(&peer) {
                                n.handle.punish(p, violation.0);
                            }
                        }
                    }
                    Output::Refused(r) => self.note_refusal(r, now),
                    Output::Changed(sid) => {
                        self.dirty.insert(sid);
                    }
                    Output::Reload(sid) => self.reload_poisoned(sid),
                    Output::Load(sids) => {
                        for sid in &sids {
                            if self.parked.get(sid).is_some_and(|p| p.digest.is_none()) {
                                // Unknown until now: kept for the next start.
                                self.digests_wanted.insert(sid.clone());
                            }
                            if let Err(e) = self.ensure_loaded(sid) {
                                tracing::warn!(map = %sid, "cannot load the map for replication: {e}");
                            }
                        }
                        inputs.push_back(Input::Loaded(sids));
                    }
                    Output::Schedule { timer, at } => {
                        let wait =
                            u64::try_from(at.millis().saturating_sub(now.millis())).unwrap_or(0);
                        if let Some(n) = self.net.as_mut() {
                            n.timers
                                .insert(timer, Instant::now() + Duration::from_millis(wait));
                        }
                    }
                    Output::Fetched { sid, outcome } => {
                        if let Some(again) = self.settle_fetch(sid, outcome, now) {
                            inputs.push_back(again);
                        }
                    }
                }
            }
        }
    }

    /// A map this node just started holding: tell the peers.
    pub(super) fn announce(&mut self, sid: &MapSid) {
        self.drive(Input::Announce(vec![sid.clone()]), super::now());
    }

    /// Asks peers for the signatures of a map's changes this node holds unsigned.
    pub(super) fn ask_signatures(&mut self, sid: &MapSid) {
        self.drive(Input::AskSignatures(sid.clone()), super::now());
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
        let input = Input::Committed {
            sid: sid.clone(),
            changes: changes.to_vec(),
            sigs: sigs.clone(),
        };
        self.drive(input, super::now());
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
                }
                self.drive(Input::PeerUp { peer: key, grant }, now);
                self.settle_joined();
            }
            NetEvent::PeerDown(p) => {
                let key = p.to_string();
                if let Some(n) = self.net.as_mut() {
                    n.peers.remove(&key);
                }
                self.drive(Input::PeerDown(key), now);
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
                    let Some(n) = self.net.as_mut() else { break };
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
                    self.drive(
                        Input::Message {
                            peer: key.clone(),
                            bytes,
                        },
                        now,
                    );
                    // A punished peer's other messages are not heard.
                    if !self
                        .net
                        .as_ref()
                        .is_some_and(|n| n.peers.contains_key(&key))
                    {
                        break;
                    }
                }
            }
            NetEvent::JoinRequest {
                peer, id, request, ..
            } => self.on_join_request(peer, id, &request, now),
            NetEvent::JoinAnswer { peer, answer } => self.on_join_answer(peer, answer, now),
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
        // The replicator's timers that are due (the nudge after a round of sync among them).
        let due: Vec<Timer> = self.net.as_mut().map_or_else(Vec::new, |n| {
            let t = Instant::now();
            let due: Vec<Timer> = n
                .timers
                .iter()
                .filter(|(_, at)| **at <= t)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &due {
                n.timers.remove(k);
            }
            due
        });
        for timer in due {
            // Due by the engine's clock: the time fed in is read now, not at the round's
            // start, so the machine sees it due too.
            self.drive(Input::Timer(timer), super::now().max(now));
        }
        // Opens whose caller gave up are not waited for.
        if let Some(n) = self.net.as_mut() {
            n.wants.retain(|w| !w.reply.is_closed());
        }
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
        let someone = pending || n.peers.keys().any(|p| n.rep.grant(p).reads(&sid));
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
        let now = super::now();
        let Some(n) = self.net.as_mut() else { return };
        let wait = i64::try_from(n.fetch_timeout.as_millis()).unwrap_or(i64::MAX);
        let deadline = now.plus_millis(wait);
        n.wants.push(Want {
            sid: sid.clone(),
            spec,
            reply,
            deadline,
        });
        self.drive(Input::Fetch { sid, deadline }, now);
    }

    /// Answers the opens waiting for a map whose fetch ended. A map nobody has while peers
    /// the engine has not heard come up yet are connected keeps waiting: returns the input
    /// that says so.
    fn settle_fetch(
        &mut self,
        sid: MapSid,
        outcome: FetchOutcome,
        now: Timestamp,
    ) -> Option<Input<String>> {
        let n = self.net.as_mut()?;
        let (wants, rest): (Vec<Want>, Vec<Want>) = std::mem::take(&mut n.wants)
            .into_iter()
            .partition(|w| w.sid == sid);
        n.wants = rest;
        if wants.is_empty() {
            self.drop_if_empty(&sid);
            return None;
        }
        if outcome == FetchOutcome::NobodyHas && self.peers_pending() {
            let deadline = wants.iter().map(|w| w.deadline).max()?;
            if let Some(n) = self.net.as_mut() {
                n.wants.extend(wants);
            }
            return Some(Input::KeepFetching { sid, deadline });
        }
        for w in wants {
            let id = w.spec.id.clone().unwrap_or_default();
            let e = match outcome {
                FetchOutcome::Complete => {
                    // Whole as a peer described it: answered once it is committed and its
                    // events are published, so a subscriber that starts after the answer
                    // sees none of it again.
                    match self.open(&w.spec, now) {
                        Ok((info, _)) => {
                            self.dirty.insert(w.sid.clone());
                            if let Some(n) = self.net.as_mut() {
                                n.fetched.push((w.sid.clone(), info, w.reply));
                            }
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                FetchOutcome::NobodyHas => Error::Map(syncmesh_core::Error::MapNotFound(id)),
                // Never a part of a map as if it were all of it.
                FetchOutcome::TimedOut { partial } => Error::FetchIncomplete {
                    map: id,
                    why: if partial {
                        "only part of it arrived".into()
                    } else {
                        "no peer that may have it answered".into()
                    },
                },
            };
            let _ = w.reply.send(Err(e));
        }
        if outcome != FetchOutcome::Complete {
            self.drop_if_empty(&sid);
        }
        None
    }

    /// Forgets the empty replica a fetch that found nothing left behind.
    fn drop_if_empty(&mut self, sid: &MapSid) {
        if self
            .catalog
            .by_sid(sid)
            .is_some_and(|m| !m.exists() && m.doc_digests().is_ok_and(|d| d.is_empty()))
        {
            self.catalog.remove(sid);
        }
    }

    /// Drops a map whose documents a peer's data may have damaged (Automerge panicked while
    /// merging it). What the store holds is intact: once every queued commit is on disk, the
    /// map is forgotten in memory and reloads from the store on next use. Writes to it since
    /// the last commit are not acknowledged (their epoch is stale).
    fn reload_poisoned(&mut self, sid: MapSid) {
        self.fence();
        tracing::warn!(map = %sid, "reloading the map from storage after a peer's bad data");
        self.catalog.remove(&sid);
        self.dirty.remove(&sid);
        if self.on_disk.contains_key(&sid) {
            let policy = self.policies.get(&sid).cloned().unwrap_or_default();
            self.parked.insert(
                sid.clone(),
                ParkedMap {
                    digest: None,
                    policy,
                },
            );
        }
        *self.epochs.entry(sid).or_insert(0) += 1;
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
