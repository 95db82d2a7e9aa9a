//! The engine's side of trust: invitations, joins, trusting and untrusting peers. Decisions
//! come from the pure [`TrustBook`]; this module stores them (durably, before answering) and
//! tells the network and the replicator.

use std::collections::HashMap;
use std::time::Instant;

use syncmesh_core::Timestamp;
use syncmesh_net::{JoinId, Multiaddr, PeerId};
use syncmesh_store::Batch;
use tokio::sync::oneshot;

use super::Engine;
use crate::error::{Error, Result};
use crate::trust::{
    join_proof, DiscoveredPeer, Invite, InviteOptions, JoinRequest, JoinResponse, PeerProblem,
    Peers, Ticket, TrustError, TrustRecord, TrustWrites, TrustedPeer,
};

/// How long a join waits for the inviter's answer.
/// Longer than the network's own limits (a dial, then a 30 s request): the network reports an
/// outcome first, and the answer is never dropped while the inviter may still accept.
pub(crate) const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// How long a successful join waits for the inviter to come up before answering anyway.
pub(crate) const JOINED_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A successful join waiting for the inviter to come up: its caller, and what to answer.
pub(crate) type Joined = (
    PeerId,
    oneshot::Sender<Result<TrustedPeer>>,
    TrustedPeer,
    Instant,
);

/// A join this node asked for, waiting for the inviter's answer.
pub(crate) struct PendingJoin {
    ticket: Ticket,
    reply: oneshot::Sender<Result<TrustedPeer>>,
    pub(crate) deadline: Instant,
}

impl PendingJoin {
    /// Answers the join with `e` (it will not be carried out).
    pub(crate) fn fail(self, e: Error) {
        let _ = self.reply.send(Err(e));
    }
}

/// Trust commands.
pub(crate) enum TrustCmd {
    Invite(InviteOptions, oneshot::Sender<Result<Invite>>),
    Join(Ticket, oneshot::Sender<Result<TrustedPeer>>),
    Trust(PeerId, Vec<Multiaddr>, oneshot::Sender<Result<TrustedPeer>>),
    Untrust(PeerId, oneshot::Sender<Result<bool>>),
    Peers(oneshot::Sender<Result<Peers>>),
}

fn to_ts(t: std::time::SystemTime) -> Timestamp {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp::from_millis(ms)
}

impl Engine {
    fn persist_trust(&self, w: TrustWrites) -> Result<()> {
        let batch = Batch {
            trust: w
                .trust
                .into_iter()
                .map(|(p, r)| (p, r.and_then(|r| serde_json::to_vec(&r).ok())))
                .collect(),
            invites: w
                .invites
                .into_iter()
                .map(|(id, r)| (id.to_vec(), r.and_then(|r| serde_json::to_vec(&r).ok())))
                .collect(),
            ..Batch::default()
        };
        if batch.is_empty() {
            return Ok(());
        }
        // Trust decisions are durable before anyone is told of them.
        self.store.commit_durable(&batch).map_err(Error::from)
    }

    fn trusted_peer(&self, rec: &TrustRecord) -> TrustedPeer {
        let connected = self
            .net
            .as_ref()
            .is_some_and(|n| n.peers.contains_key(&rec.peer_id));
        TrustedPeer {
            peer_id: rec.peer_id.clone(),
            addrs: rec.addrs.clone(),
            since: Timestamp::from_millis(rec.since_ms),
            source: rec.source,
            maps: rec.maps.as_ref().map(|m| {
                m.iter()
                    .filter_map(|s| syncmesh_core::MapSid::parse(s))
                    .collect()
            }),
            write: rec.write,
            connected,
            refused_changes: self.refused.get(&rec.peer_id).copied().unwrap_or(0),
            takes_our_writes: rec.takes_our_writes,
        }
    }

    /// Applies a trust decision to the replicator and the network.
    fn adopt_trust(&mut self, rec: &TrustRecord) {
        let grant = rec.grant();
        let addrs = rec.multiaddrs();
        if self.net.is_none() {
            return;
        }
        let input = syncmesh_core::replication::Input::SetGrant {
            peer: rec.peer_id.clone(),
            grant,
        };
        self.drive(input, super::now());
        let Some(n) = self.net.as_mut() else { return };
        if let Ok(p) = rec.peer_id.parse::<PeerId>() {
            n.handle.trust(p, addrs);
        }
    }

    pub(super) fn on_trust_cmd(&mut self, cmd: TrustCmd, now: Timestamp) {
        match cmd {
            TrustCmd::Invite(opts, reply) => {
                let _ = reply.send(self.invite(&opts, now));
            }
            TrustCmd::Join(ticket, reply) => self.join(ticket, reply),
            TrustCmd::Trust(peer, _, reply)
                if self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.handle.status().peer_id == peer) =>
            {
                let _ = reply.send(Err(Error::Trust(TrustError::Invalid(
                    "that is this node's own peer id".into(),
                ))));
            }
            TrustCmd::Trust(peer, addrs, reply) => {
                let addrs = addrs.iter().map(ToString::to_string).collect();
                let mut book = self.trust.clone();
                let w = book.trust(&peer, addrs, now);
                let r = self.persist_trust(w).map(|()| {
                    self.trust = book;
                    self.problems.remove(&peer.to_string());
                    let rec = self
                        .trust
                        .trusted()
                        .into_iter()
                        .find(|r| r.peer_id == peer.to_string());
                    if let Some(rec) = &rec {
                        tracing::info!(%peer, "peer trusted");
                        self.adopt_trust(rec);
                    }
                    rec
                });
                let _ = reply.send(r.and_then(|rec| {
                    rec.map(|r| self.trusted_peer(&r))
                        .ok_or(Error::Internal("a trusted peer has no record"))
                }));
            }
            TrustCmd::Untrust(peer, reply) => {
                let key = peer.to_string();
                let everyone = self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.handle.status().trusts_everyone);
                let mut book = self.trust.clone();
                let (was, w) = book.untrust(&key, everyone, now);
                let r = self.persist_trust(w).map(|()| {
                    self.trust = book;
                    if was {
                        tracing::info!(%peer, "peer no longer trusted: disconnecting it");
                        if let Some(n) = self.net.as_mut() {
                            n.peers.remove(&key);
                            n.handle.untrust(peer);
                        }
                        self.drive(syncmesh_core::replication::Input::Forget(key), now);
                    }
                    was
                });
                let _ = reply.send(r);
            }
            TrustCmd::Peers(reply) => {
                let _ = reply.send(Ok(self.peers_report()));
            }
        }
    }

    fn invite(&mut self, opts: &InviteOptions, now: Timestamp) -> Result<Invite> {
        let Some(n) = self.net.as_ref() else {
            return Err(Error::NoNetwork);
        };
        let st = n.handle.status();
        let me: PeerId = st.peer_id;
        let addrs: Vec<Multiaddr> = st
            .listen_addrs
            .iter()
            .cloned()
            .map(|a| {
                // The ticket carries the peer id once; addresses go without it.
                let mut a = a;
                if matches!(a.iter().last(), Some(syncmesh_net::Protocol::P2p(_))) {
                    a.pop();
                }
                a
            })
            .collect();
        if addrs.is_empty() {
            return Err(Error::Trust(TrustError::Invalid(
                "this node listens on no address, so no one could use a ticket to reach it: start it with a listen address".into(),
            )));
        }
        let r = super::random16();
        let mut id = [0u8; 8];
        id.copy_from_slice(&r[..8]);
        let secret = super::random16();
        let (rec, w) = self
            .trust
            .invite(opts, id, secret, now)
            .map_err(Error::Trust)?;
        self.persist_trust(w)?;
        let ticket = Ticket {
            peer: me,
            addrs,
            id,
            secret,
        };
        tracing::info!(
            maps = ?rec.maps,
            write = rec.write,
            uses = rec.uses_left,
            "invitation issued"
        );
        Ok(Invite {
            ticket: ticket.encode(),
            expires: Timestamp::from_millis(rec.expires_ms),
            maps: rec.maps.map(|m| {
                m.iter()
                    .filter_map(|s| syncmesh_core::MapSid::parse(s))
                    .collect()
            }),
            write: rec.write,
            uses: rec.uses_left,
        })
    }

    fn join(&mut self, ticket: Ticket, reply: oneshot::Sender<Result<TrustedPeer>>) {
        let Some(n) = self.net.as_mut() else {
            let _ = reply.send(Err(Error::NoNetwork));
            return;
        };
        let st = n.handle.status();
        let me = st.peer_id;
        if ticket.peer == me {
            let _ = reply.send(Err(Error::Trust(TrustError::OwnTicket)));
            return;
        }
        if n.joins.iter().any(|j| j.ticket.peer == ticket.peer) {
            let _ = reply.send(Err(Error::Trust(TrustError::JoinUnderWay)));
            return;
        }
        let req = JoinRequest {
            invite: ticket.id,
            proof: hex::encode(join_proof(&ticket.secret, &me, &ticket.peer)),
            addrs: st
                .listen_addrs
                .iter()
                .cloned()
                .map(|mut a| {
                    if matches!(a.iter().last(), Some(syncmesh_net::Protocol::P2p(_))) {
                        a.pop();
                    }
                    a.to_string()
                })
                .collect(),
        };
        let Ok(bytes) = serde_json::to_vec(&req) else {
            let _ = reply.send(Err(Error::Internal("a join request could not be encoded")));
            return;
        };
        tracing::info!(inviter = %ticket.peer, "joining with a ticket");
        n.handle.join(ticket.peer, ticket.addrs.clone(), bytes);
        n.joins.push(PendingJoin {
            ticket,
            reply,
            deadline: Instant::now() + JOIN_TIMEOUT,
        });
    }

    /// A peer presents a join request.
    pub(super) fn on_join_request(
        &mut self,
        peer: PeerId,
        id: JoinId,
        request: &[u8],
        now: Timestamp,
    ) {
        let Some(n) = self.net.as_ref() else { return };
        let me = n.handle.status().peer_id;
        let mut book = self.trust.clone();
        let result = serde_json::from_slice::<JoinRequest>(request)
            .map_err(|_| TrustError::Refused("a malformed join request".into()))
            .and_then(|req| book.accept_join(&req, &peer, &me, now));
        let (answer, close) = match result {
            Ok((rec, w)) => match self.persist_trust(w) {
                Ok(()) => {
                    self.trust = book;
                    self.problems.remove(&peer.to_string());
                    tracing::info!(%peer, maps = ?rec.maps, write = rec.write, "a peer joined with a ticket: trusted");
                    self.list_in_permissions(&rec, &me.to_string(), now);
                    self.adopt_trust(&rec);
                    (
                        JoinResponse::Accepted {
                            maps: rec.maps.clone(),
                            write: rec.write,
                        },
                        false,
                    )
                }
                Err(e) => {
                    tracing::error!(%peer, "a join could not be stored: {e}");
                    (
                        JoinResponse::Refused {
                            reason: "the inviter could not store the join; try again".into(),
                        },
                        true,
                    )
                }
            },
            Err(e) => {
                // A refused join may still have changed the book (an expired invitation is
                // forgotten): kept only once stored.
                if book.invites(now).len() != self.trust.invites(now).len() {
                    let gone: Vec<[u8; 8]> = self
                        .trust
                        .invites(now)
                        .iter()
                        .map(|i| i.id)
                        .filter(|id| !book.invites(now).iter().any(|j| j.id == *id))
                        .collect();
                    let w = TrustWrites {
                        trust: Vec::new(),
                        invites: gone.into_iter().map(|id| (id, None)).collect(),
                    };
                    if self.persist_trust(w).is_ok() {
                        self.trust = book;
                    }
                }
                let reason = match &e {
                    TrustError::Refused(r) => r.clone(),
                    other => other.to_string(),
                };
                let problem = format!("join refused: {reason}");
                if self
                    .problems
                    .get(&peer.to_string())
                    .is_none_or(|(p, _)| *p != problem)
                {
                    tracing::warn!(%peer, "join refused: {reason}");
                }
                self.note_problem(&peer.to_string(), problem, now);
                (JoinResponse::Refused { reason }, true)
            }
        };
        let bytes = serde_json::to_vec(&answer).unwrap_or_default();
        if let Some(n) = self.net.as_ref() {
            n.handle.answer_join(id, bytes, close);
        }
    }

    /// An invitation naming maps adds the invitee to the permissions of those of them that have
    /// entries (a map without entries is shared with every trusted peer already).
    fn list_in_permissions(&mut self, rec: &TrustRecord, me: &str, now: Timestamp) {
        let Some(maps) = &rec.maps else { return };
        for s in maps {
            let Some(sid) = syncmesh_core::MapSid::parse(s) else {
                continue;
            };
            if let Err(e) = self.ensure_loaded(&sid) {
                tracing::warn!(map = %sid, "cannot load a map to list an invitee: {e}");
                continue;
            }
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            if m.policy().is_open() || !m.exists() {
                continue;
            }
            let p = syncmesh_core::Permission {
                identity: rec.peer_id.clone(),
                read: true,
                write: rec.write,
                manage: false,
            };
            match m.set_permission(&p, me, now) {
                Ok(_) => {
                    self.dirty.insert(sid);
                }
                Err(e) => tracing::warn!(
                    map = %sid,
                    peer = %rec.peer_id,
                    "the invitee could not be added to the map's permissions: {e}"
                ),
            }
        }
    }

    /// The inviter answered (or could not be reached).
    pub(super) fn on_join_answer(
        &mut self,
        peer: PeerId,
        answer: std::result::Result<Vec<u8>, String>,
        now: Timestamp,
    ) {
        let Some(n) = self.net.as_mut() else { return };
        let Some(i) = n.joins.iter().position(|j| j.ticket.peer == peer) else {
            return;
        };
        let pending = n.joins.swap_remove(i);
        let r = match answer {
            Err(e) => Err(Error::Trust(TrustError::Unreachable(e))),
            Ok(bytes) => match serde_json::from_slice::<JoinResponse>(&bytes) {
                Err(_) => Err(Error::Trust(TrustError::Refused(
                    "the inviter sent a malformed answer".into(),
                ))),
                Ok(JoinResponse::Refused { reason }) => {
                    Err(Error::Trust(TrustError::Refused(reason)))
                }
                Ok(JoinResponse::Accepted { maps, write }) => {
                    let mut book = self.trust.clone();
                    let (rec, w) = book.joined(&pending.ticket, maps, write, now);
                    self.persist_trust(w).map(|()| {
                        self.trust = book;
                        self.problems.remove(&peer.to_string());
                        if write {
                            tracing::info!(%peer, "joined: the inviter is trusted");
                        } else {
                            tracing::warn!(
                                %peer,
                                "joined read-only: the inviter is trusted, but it does not take this node's changes (they stay here)"
                            );
                        }
                        self.adopt_trust(&rec);
                        self.trusted_peer(&rec)
                    })
                }
            },
        };
        match r {
            Err(e) => {
                tracing::warn!(inviter = %peer, "join failed: {e}");
                self.note_problem(&peer.to_string(), format!("join failed: {e}"), now);
                let _ = pending.reply.send(Err(e));
            }
            Ok(t) => {
                // Answered once the inviter is up here, so the caller can use it at once
                // (open a map only it has, say).
                let up = self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.peers.contains_key(&peer.to_string()));
                if up {
                    let _ = pending.reply.send(Ok(t));
                } else if let Some(n) = self.net.as_mut() {
                    n.joined
                        .push((peer, pending.reply, t, Instant::now() + JOINED_UP_WAIT));
                }
            }
        }
    }

    /// Answers successful joins whose inviter is up (or that waited long enough).
    pub(super) fn settle_joined(&mut self) {
        let Some(n) = self.net.as_mut() else { return };
        if n.joined.is_empty() {
            return;
        }
        let now = Instant::now();
        let (done, keep): (Vec<Joined>, Vec<Joined>) = std::mem::take(&mut n.joined)
            .into_iter()
            .partition(|(p, _, _, until)| n.peers.contains_key(&p.to_string()) || now >= *until);
        n.joined = keep;
        for (_, reply, mut t, _) in done {
            t.connected = n.peers.contains_key(&t.peer_id);
            let _ = reply.send(Ok(t));
        }
    }

    /// Joins whose inviter never answered.
    pub(super) fn expire_joins(&mut self) {
        self.settle_joined();
        let Some(n) = self.net.as_mut() else { return };
        let now = Instant::now();
        let (late, keep): (Vec<PendingJoin>, Vec<PendingJoin>) = std::mem::take(&mut n.joins)
            .into_iter()
            // A caller that gave up does not end the join: the inviter may still accept, and
            // its acceptance must be recorded here too.
            .partition(|j| now >= j.deadline);
        n.joins = keep;
        for j in late {
            let _ = j
                .reply
                .send(Err(Error::Trust(TrustError::Unreachable(format!(
                    "no answer from {} within {} s",
                    j.ticket.peer,
                    JOIN_TIMEOUT.as_secs()
                )))));
        }
    }

    /// Counts and logs changes refused from peers without write access.
    /// Counts and reports changes refused from a peer that may not write a map.
    pub(super) fn note_refusal(
        &mut self,
        r: syncmesh_core::replication::Refusal<String>,
        now: Timestamp,
    ) {
        *self.refused.entry(r.peer.clone()).or_default() += r.changes;
        tracing::warn!(
            peer = %r.peer,
            map = %r.sid,
            changes = r.changes,
            "refused changes from a peer that may not write this map"
        );
        self.note_problem(
            &r.peer,
            format!(
                "refused {} change(s) to map {}: the peer may not write it",
                r.changes, r.sid
            ),
            now,
        );
    }

    fn note_problem(&mut self, peer: &str, reason: String, now: Timestamp) {
        if self.problems.len() >= 256 && !self.problems.contains_key(peer) {
            // The list shows what is recent: the oldest goes.
            if let Some(old) = self
                .problems
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                self.problems.remove(&old);
            }
        }
        self.problems.insert(peer.to_string(), (reason, now));
    }

    fn peers_report(&self) -> Peers {
        let trusted: Vec<TrustedPeer> = self
            .trust
            .trusted()
            .iter()
            .map(|r| self.trusted_peer(r))
            .collect();
        let st = self.net.as_ref().map(|n| n.handle.status());
        let (net_problems, trusts_everyone, connected, untrusted, discovered) = match &st {
            Some(st) => (
                st.problems.as_slice(),
                st.trusts_everyone,
                st.connected.iter().map(ToString::to_string).collect(),
                st.untrusted.iter().map(ToString::to_string).collect(),
                st.discovered.as_slice(),
            ),
            None => (&[][..], false, Vec::new(), Vec::new(), &[][..]),
        };
        // The latest reason per peer: the network's and the engine's, whichever is newer.
        let mut problems: HashMap<String, PeerProblem> = HashMap::new();
        for p in net_problems {
            let key = p
                .peer_id
                .map(|x| x.to_string())
                .or_else(|| p.addr.as_ref().map(ToString::to_string))
                .unwrap_or_default();
            problems.insert(
                key,
                PeerProblem {
                    peer_id: p.peer_id.map(|x| x.to_string()),
                    addr: p.addr.as_ref().map(ToString::to_string),
                    reason: p.reason.clone(),
                    at: to_ts(p.at),
                },
            );
        }
        for (peer, (reason, at)) in &self.problems {
            let newer = problems.get(peer).is_none_or(|p| p.at <= *at);
            if newer {
                problems.insert(
                    peer.clone(),
                    PeerProblem {
                        peer_id: Some(peer.clone()),
                        addr: None,
                        reason: reason.clone(),
                        at: *at,
                    },
                );
            }
        }
        let mut problems: Vec<PeerProblem> = problems.into_values().collect();
        problems.sort_by_key(|p| std::cmp::Reverse(p.at));
        Peers {
            networked: self.net.is_some(),
            trusts_everyone,
            trusted,
            connected,
            untrusted,
            discovered: discovered
                .iter()
                .map(|d| DiscoveredPeer {
                    peer_id: d.peer_id.to_string(),
                    addrs: d.addrs.iter().map(ToString::to_string).collect(),
                    last_seen: to_ts(d.last_seen),
                    trusted: self.trust.trusts(&d.peer_id.to_string()) || trusts_everyone,
                })
                .collect(),
            problems,
            refused_changes: self.refused.values().sum(),
        }
    }
}
