//! Replication between nodes as a sans-IO state machine: [`Replicator::handle`] takes one
//! [`Input`] (a peer came up or went, a message arrived, local changes were committed, a timer
//! fired, maps were loaded) and the time, and returns [`Output`]s (messages to send, a verdict
//! on a peer, maps that changed, maps to load, timers to schedule). It never blocks, reads a
//! clock or touches a socket or a disk: the node's engine, the simulator and the tests are
//! shells that carry out the outputs and feed back what happens.
//!
//! The conversation with one connected peer:
//!
//! 1. Each side sends [`Wire::Hello`]: the maps it holds, each with a digest of its documents'
//!    heads. Equal digests mean equal maps: nothing more is said about them.
//! 2. For a map whose digests differ, a side sends [`Wire::Docs`]: one digest per document
//!    (the map document and each non-empty shard).
//! 3. For each document whose digests differ, the sides run Automerge's sync protocol
//!    ([`Wire::Sync`], messages of many documents of a map batched together), which sends
//!    each side exactly the changes it lacks. The map document goes first when it differs:
//!    shards are only comparable once both sides agree on the map's incarnation.
//!
//! Local changes ([`Input::Committed`]) are pushed at once to every peer holding the map as
//! [`Wire::Changes`]; a node that merges changes new to it from such a message passes the
//! message on to its other peers holding the map (flooding that stops where nothing is new).
//! A change whose dependencies were missed waits inside Automerge, and a sync of that document
//! with the sender fetches what is missing. Hellos are repeated on a timer
//! ([`Timer::AntiEntropy`]), so any divergence left over is found and repaired.
//!
//! Each peer has a [`Grant`]: the maps it may receive and whether it may change them. A map
//! outside a peer's grant is never named to it (no Hello entry, digest, document list, sync
//! message or change), and changes from a peer without write access are not applied (they
//! are reported as [`Output::Refused`]).
//!
//! Every message is size-limited and checked ([`wire`], [`validate`]): a message that does not
//! decode, names a malformed map, or carries a change that breaks the map's layout is a
//! [`Violation`], answered with [`Output::Punish`]. Nothing a peer sends can panic the node.
//!
//! The machine works on the maps in memory (a [`Catalog`]) and knows the maps held in
//! storage but not loaded ([`Parked`]: their digests and permissions), so anti-entropy over
//! many idle maps loads none of them. When an input needs a parked map, the machine asks for
//! it ([`Output::Load`]) and keeps that input, and every later one, until the shell answers
//! [`Input::Loaded`]: inputs are always handled in the order they came.

mod peer;
mod protocol;
mod session;
pub mod validate;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use automerge::ChangeHash;

pub use peer::{Grant, PeerKey, Refusal};
pub use validate::{authorize, authorize_meta, Verdict};
pub use wire::{
    changes_messages, Bytes, Sigs, Violation, Wire, MAX_DIRECT_MESSAGE, MAX_GOSSIP_MESSAGE,
    MAX_SIGS_ASKED,
};

use crate::authorship::Signature;
use crate::catalog::Catalog;
use crate::ids::{MapSid, Timestamp};
use crate::map::{DocAddr, MapReplica};
use crate::policy::Policy;
use peer::PeerState;

/// Milliseconds between two rounds of anti-entropy (a Hello with every map to every peer),
/// unless [`Replicator::with_anti_entropy`] says otherwise.
pub const ANTI_ENTROPY_MS: i64 = 10_000;

/// What replication may know of a map held in storage but not loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParkedMap {
    /// Its [`MapReplica::digest`] when last stored; `None` if unknown (the map is loaded to
    /// compare it).
    pub digest: Option<u64>,
    /// Its permissions.
    pub policy: Policy,
}

/// The maps a node holds in storage and has not loaded, by sid.
pub type Parked = BTreeMap<MapSid, ParkedMap>;

/// The maps the machine works on: those in memory, and those only in storage.
pub struct Shelf<'a> {
    /// Loaded maps (replication reads and changes them).
    pub maps: &'a mut Catalog,
    /// Maps held in storage, not loaded (a map in both counts as loaded).
    pub parked: &'a Parked,
}

impl<'a> Shelf<'a> {
    /// A shelf of loaded maps only (nodes without storage, and tests).
    pub fn loaded(maps: &'a mut Catalog) -> Shelf<'a> {
        static NONE: Parked = BTreeMap::new();
        Shelf {
            maps,
            parked: &NONE,
        }
    }
}

/// A timer the machine asks its shell for ([`Output::Schedule`]); the shell feeds it back as
/// [`Input::Timer`] once due. A timer scheduled again replaces the earlier one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Anti-entropy: a Hello with every held map to every peer.
    AntiEntropy,
    /// Tell the other peers about maps that changed through sync (once per round of work).
    Nudge,
    /// A map wanted from peers ([`Input::Fetch`]) has waited long enough.
    FetchDeadline(MapSid),
}

/// What happens to the machine.
#[derive(Debug)]
pub enum Input<P> {
    /// A trusted peer connected, with what it may do.
    PeerUp {
        /// The peer.
        peer: P,
        /// Its grant.
        grant: Grant,
    },
    /// A peer disconnected: its sync sessions end (a reconnect starts afresh).
    PeerDown(P),
    /// What a peer may do changed (takes effect at once; its grant is kept across reconnects).
    SetGrant {
        /// The peer.
        peer: P,
        /// Its grant.
        grant: Grant,
    },
    /// A peer is no longer trusted: it is down, and its grant forgotten.
    Forget(P),
    /// A direct message from a peer.
    Message {
        /// The sender.
        peer: P,
        /// The encoded [`Wire`] message.
        bytes: Vec<u8>,
    },
    /// Local changes of one map were committed: push them to the peers holding it.
    Committed {
        /// The map.
        sid: MapSid,
        /// `(document, encoded change)` pairs.
        changes: Vec<(DocAddr, Vec<u8>)>,
        /// Their signatures.
        sigs: HashMap<ChangeHash, Signature>,
    },
    /// Maps this node started holding (created, opened): tell every peer.
    Announce(Vec<MapSid>),
    /// Ask the peers holding a map for the signatures of changes held here unsigned.
    AskSignatures(MapSid),
    /// A map only peers have is wanted: announce it (held empty), and report with
    /// [`Output::Fetched`] when it is complete, nobody has it, or at `deadline`. The shell has
    /// put an empty replica of it in the catalog.
    Fetch {
        /// The map.
        sid: MapSid,
        /// When to give up.
        deadline: Timestamp,
    },
    /// A fetch that ended with [`FetchOutcome::NobodyHas`] goes on waiting, until `deadline`,
    /// without asking anyone again: the shell knows of peers that connected and are not fed
    /// in yet (their [`Input::PeerUp`] greets them with the map, held empty).
    KeepFetching {
        /// The map.
        sid: MapSid,
        /// When to give up.
        deadline: Timestamp,
    },
    /// Cut the history of these shards of a loaded map ([`MapReplica::cut_shard`]), the shell
    /// having judged that they hold enough history and that every peer it trusts is
    /// connected: each is cut only if every connected peer holding the map last said it holds
    /// this replica's very generation and heads of it; those peers are then told, and take
    /// the new generation from this node.
    Cut {
        /// The map.
        sid: MapSid,
        /// Its shards to cut.
        shards: Vec<u16>,
    },
    /// A timer fired.
    Timer(Timer),
    /// The maps asked for by [`Output::Load`] were loaded (those that could not be stay
    /// parked and are treated as unknown).
    Loaded(Vec<MapSid>),
}

/// How a fetch ([`Input::Fetch`]) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The map is here, as complete as some peer described it.
    Complete,
    /// Every peer asked said it has none of it.
    NobodyHas,
    /// The deadline passed; `partial` if some of the map arrived.
    TimedOut {
        /// Whether part of the map arrived.
        partial: bool,
    },
}

/// What the machine asks of its shell.
#[derive(Debug)]
pub enum Output<P> {
    /// Send a direct message.
    Send(Outgoing<P>),
    /// The peer broke the protocol: disconnect it (the machine has dropped its state and
    /// every message of it still waiting).
    Punish {
        /// The peer.
        peer: P,
        /// What it did.
        violation: Violation,
    },
    /// Changes a peer sent were refused (it may not write the map).
    Refused(Refusal<P>),
    /// A map changed through replication: commit it (changes, view, events).
    Changed(MapSid),
    /// A map's documents may be damaged (merging a peer's data panicked inside Automerge):
    /// drop it from memory and load it again from storage.
    Reload(MapSid),
    /// Load these parked maps into the catalog, then answer [`Input::Loaded`].
    Load(Vec<MapSid>),
    /// Feed [`Input::Timer`] back at `at` (replaces an earlier schedule of the same timer).
    Schedule {
        /// The timer.
        timer: Timer,
        /// When.
        at: Timestamp,
    },
    /// A fetch ended.
    Fetched {
        /// The map.
        sid: MapSid,
        /// How.
        outcome: FetchOutcome,
    },
}

/// A direct message to send to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing<P> {
    /// The peer.
    pub peer: P,
    /// The encoded [`Wire`] message.
    pub bytes: Vec<u8>,
}

/// An input waiting its turn; a message is decoded once, when first met.
enum Pending<P> {
    Input(Input<P>),
    Message { peer: P, msg: Wire, bytes: Vec<u8> },
}

/// The maps as the handlers see them during one [`Replicator::handle`].
pub(crate) struct Host<'a> {
    maps: &'a mut Catalog,
    parked: &'a Parked,
    touched: BTreeSet<MapSid>,
}

impl Host<'_> {
    fn is_parked(&self, sid: &MapSid) -> bool {
        self.parked.contains_key(sid) && !self.maps.contains(sid)
    }

    /// Every map this node holds.
    fn held(&self) -> Vec<MapSid> {
        let mut all: Vec<MapSid> = self.maps.maps().map(|m| m.sid().clone()).collect();
        all.extend(
            self.parked
                .keys()
                .filter(|s| !self.maps.contains(s))
                .cloned(),
        );
        all
    }

    /// A loaded map.
    fn get(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        self.maps.by_sid(sid)
    }

    /// Starts holding a map a peer has (nodes that hold every map). A parked map that could
    /// not be loaded is not replaced by an empty one.
    fn adopt(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        if !self.maps.contains(sid) && !self.parked.contains_key(sid) {
            let id = self.maps.identity().clone();
            self.maps.insert(MapReplica::empty(id, sid.clone()));
        }
        self.maps.by_sid(sid)
    }

    fn touched(&mut self, sid: &MapSid) {
        self.touched.insert(sid.clone());
    }

    /// A held map's digest; `None` if not held or unknown (parked without one).
    fn digest(&mut self, sid: &MapSid) -> Option<crate::Result<u64>> {
        if let Some(m) = self.maps.by_sid(sid) {
            return Some(m.digest());
        }
        self.parked.get(sid)?.digest.map(Ok)
    }

    /// A held map's permissions; `None` if not held.
    fn policy(&mut self, sid: &MapSid) -> Option<Policy> {
        if let Some(m) = self.maps.get(sid) {
            return Some(m.policy().clone());
        }
        self.parked.get(sid).map(|p| p.policy.clone())
    }

    /// Changes of a loaded map whose signatures this node lacks (at most [`MAX_SIGS_ASKED`]);
    /// `None` if none. Maps not loaded are not asked about: a map with unsigned changes asks
    /// once it is used again.
    fn unsigned(&mut self, sid: &MapSid) -> Option<Vec<ChangeHash>> {
        let m = self.maps.by_sid(sid)?;
        if !m.has_unsigned() {
            return None;
        }
        let h = m.unsigned(MAX_SIGS_ASKED);
        // What it forgot on the way is stored as gone.
        self.touched(sid);
        (!h.is_empty()).then_some(h)
    }
}

/// A fetch in progress.
struct Fetch {
    deadline: Timestamp,
    /// "Nobody has it" is not reported until the next peer comes up (the shell knows of
    /// peers connected whose arrival it has not fed in yet: [`Input::KeepFetching`]).
    await_peer: bool,
}

/// Replication state with every connected peer.
pub struct Replicator<P: PeerKey> {
    hold_all: bool,
    peers: BTreeMap<P, PeerState>,
    /// Maps that changed through sync, with the peers the changes came from: the other
    /// peers hear of it ([`Timer::Nudge`]), as gossip only relays what was gossiped.
    synced: BTreeMap<MapSid, BTreeSet<P>>,
    /// Maps whose documents may be damaged: Automerge panicked while merging a peer's data.
    poisoned: BTreeSet<MapSid>,
    /// Grants set before (or while) a peer is connected.
    grants: HashMap<P, Grant>,
    /// Changes refused, reported at the end of the input.
    refusals: BTreeMap<(P, MapSid), u64>,
    /// Per peer, the changes refused so far (each is counted once).
    refused_seen: HashMap<P, std::collections::HashSet<ChangeHash>>,
    anti_entropy_ms: i64,
    /// When anti-entropy is scheduled (only while peers are connected).
    anti_entropy_at: Option<Timestamp>,
    nudge_scheduled: bool,
    fetches: BTreeMap<MapSid, Fetch>,
    /// Inputs waiting for maps to be loaded (the first needs them), in arrival order.
    waiting: VecDeque<Pending<P>>,
    /// Maps the shell was asked to load for the first waiting input and answered about:
    /// not asked again for it (one that failed to load is taken as not held).
    tried: BTreeSet<MapSid>,
}

impl<P: PeerKey> Replicator<P> {
    /// A machine; `hold_all` makes this node hold every map it hears of (a cluster or backup
    /// node).
    pub fn new(hold_all: bool) -> Self {
        Replicator {
            hold_all,
            peers: BTreeMap::new(),
            synced: BTreeMap::new(),
            poisoned: BTreeSet::new(),
            grants: HashMap::new(),
            refusals: BTreeMap::new(),
            refused_seen: HashMap::new(),
            anti_entropy_ms: ANTI_ENTROPY_MS,
            anti_entropy_at: None,
            nudge_scheduled: false,
            fetches: BTreeMap::new(),
            waiting: VecDeque::new(),
            tried: BTreeSet::new(),
        }
    }

    /// Anti-entropy every `ms` milliseconds instead of [`ANTI_ENTROPY_MS`].
    pub fn with_anti_entropy(mut self, ms: i64) -> Self {
        self.anti_entropy_ms = ms.max(1);
        self
    }

    /// Handles one input at `now`; what to do about it comes back in order.
    pub fn handle(&mut self, shelf: Shelf<'_>, input: Input<P>, now: Timestamp) -> Vec<Output<P>> {
        let mut host = Host {
            maps: shelf.maps,
            parked: shelf.parked,
            touched: BTreeSet::new(),
        };
        let mut out = Vec::new();
        match input {
            Input::Loaded(sids) => self.tried.extend(sids),
            input => self.waiting.push_back(Pending::Input(input)),
        }
        while let Some(next) = self.waiting.pop_front() {
            let next = match next {
                Pending::Input(Input::Message { peer, bytes }) => {
                    match Wire::decode(&bytes, MAX_DIRECT_MESSAGE) {
                        Ok(msg) => Pending::Message { peer, msg, bytes },
                        Err(v) => {
                            self.punish(peer, v, &mut out);
                            continue;
                        }
                    }
                }
                other => other,
            };
            let needs: Vec<MapSid> = self
                .needs(&next, &host)
                .into_iter()
                .filter(|s| !self.tried.contains(s))
                .collect();
            if !needs.is_empty() {
                self.waiting.push_front(next);
                out.push(Output::Load(needs));
                break;
            }
            self.tried.clear();
            self.run(next, &mut host, now, &mut out);
        }
        self.settle_fetches(&mut host, now, &mut out);
        for ((peer, sid), changes) in std::mem::take(&mut self.refusals) {
            out.push(Output::Refused(Refusal { peer, sid, changes }));
        }
        for sid in std::mem::take(&mut self.poisoned) {
            host.touched.remove(&sid);
            out.push(Output::Reload(sid));
        }
        out.extend(host.touched.into_iter().map(Output::Changed));
        if !self.synced.is_empty() && !self.nudge_scheduled {
            self.nudge_scheduled = true;
            out.push(Output::Schedule {
                timer: Timer::Nudge,
                at: now,
            });
        }
        out
    }

    /// Parked maps an input needs loaded before it can be handled.
    fn needs(&self, p: &Pending<P>, host: &Host<'_>) -> Vec<MapSid> {
        let unknown = |sids: &mut dyn Iterator<Item = &MapSid>| -> Vec<MapSid> {
            sids.filter(|s| {
                host.is_parked(s) && host.parked.get(*s).is_some_and(|m| m.digest.is_none())
            })
            .cloned()
            .collect()
        };
        let parked = |sid: &MapSid| -> Vec<MapSid> {
            if host.is_parked(sid) {
                vec![sid.clone()]
            } else {
                Vec::new()
            }
        };
        match p {
            Pending::Message { peer, msg, .. } => {
                // Only maps the peer may read are loaded for it: a peer given one map cannot
                // make this node load the others (their permissions are known parked).
                let grant = self
                    .peers
                    .get(peer)
                    .map_or_else(|| self.grant(peer), |p| p.grant.clone());
                let readable = |s: &MapSid| {
                    grant.reads(s)
                        && host
                            .parked
                            .get(s)
                            .is_some_and(|m| m.policy.reads(peer.as_ref()))
                };
                match msg {
                    Wire::Hello { maps, .. } => maps
                        .iter()
                        .filter(|(s, theirs)| {
                            host.is_parked(s)
                                && readable(s)
                                && host
                                    .parked
                                    .get(s)
                                    .is_some_and(|m| m.digest != Some(*theirs))
                        })
                        .map(|(s, _)| s.clone())
                        .collect(),
                    // Changes are looked at only from a peer that may write the map.
                    Wire::Changes { sid, .. } if !grant.writes(sid) => Vec::new(),
                    Wire::Docs { sid, .. }
                    | Wire::Sync { sid, .. }
                    | Wire::Changes { sid, .. }
                    | Wire::WantSigs { sid, .. }
                    | Wire::Sigs { sid, .. } => {
                        if readable(sid) {
                            parked(sid)
                        } else {
                            Vec::new()
                        }
                    }
                }
            }
            Pending::Input(i) => match i {
                Input::PeerUp { .. } | Input::Timer(Timer::AntiEntropy) => {
                    if self.peers.is_empty() && !matches!(i, Input::PeerUp { .. }) {
                        return Vec::new();
                    }
                    unknown(&mut host.parked.keys())
                }
                Input::Announce(sids) => unknown(&mut sids.iter()),
                Input::Committed { sid, .. } | Input::Cut { sid, .. } => parked(sid),
                _ => Vec::new(),
            },
        }
    }

    fn run(
        &mut self,
        p: Pending<P>,
        host: &mut Host<'_>,
        now: Timestamp,
        out: &mut Vec<Output<P>>,
    ) {
        let sent = match p {
            Pending::Message { peer, msg, bytes } => {
                match self.receive(&peer, msg, &bytes, host, now) {
                    Ok(sent) => sent,
                    Err(v) => {
                        self.punish(peer, v, out);
                        return;
                    }
                }
            }
            Pending::Input(input) => match input {
                Input::PeerUp { peer, grant } => {
                    self.set_grant(&peer, grant);
                    for f in self.fetches.values_mut() {
                        f.await_peer = false;
                    }
                    if self.anti_entropy_at.is_none() {
                        let at = now.plus_millis(self.anti_entropy_ms);
                        self.anti_entropy_at = Some(at);
                        out.push(Output::Schedule {
                            timer: Timer::AntiEntropy,
                            at,
                        });
                    }
                    self.peer_up(&peer, host)
                }
                Input::PeerDown(peer) => {
                    self.peers.remove(&peer);
                    Vec::new()
                }
                Input::SetGrant { peer, grant } => {
                    self.set_grant(&peer, grant);
                    Vec::new()
                }
                Input::Forget(peer) => {
                    self.peers.remove(&peer);
                    self.grants.remove(&peer);
                    self.drop_waiting(&peer);
                    Vec::new()
                }
                Input::Message { .. } => Vec::new(), // decoded before it gets here
                Input::Committed { sid, changes, sigs } => {
                    if changes.is_empty() || self.peers.is_empty() {
                        return;
                    }
                    let (msgs, too_large) = changes_messages(&sid, changes, &sigs);
                    let mut sent = self.push(&sid, &msgs, None, host);
                    if too_large {
                        sent.extend(self.nudge(&sid, host));
                    }
                    sent
                }
                Input::Announce(sids) => self.announce(&sids, host),
                Input::Cut { sid, shards } => self.cut(&sid, &shards, host, now),
                Input::AskSignatures(sid) => self.ask_signatures(&sid, host),
                Input::KeepFetching { sid, deadline } => {
                    let f = self.fetches.entry(sid.clone()).or_insert(Fetch {
                        deadline,
                        await_peer: true,
                    });
                    f.deadline = f.deadline.max(deadline);
                    f.await_peer = true;
                    out.push(Output::Schedule {
                        timer: Timer::FetchDeadline(sid),
                        at: f.deadline,
                    });
                    Vec::new()
                }
                Input::Fetch { sid, deadline } => {
                    let f = self.fetches.entry(sid.clone()).or_insert(Fetch {
                        deadline,
                        await_peer: false,
                    });
                    f.deadline = f.deadline.max(deadline);
                    out.push(Output::Schedule {
                        timer: Timer::FetchDeadline(sid.clone()),
                        at: f.deadline,
                    });
                    self.announce(&[sid], host)
                }
                Input::Timer(Timer::AntiEntropy) => {
                    self.anti_entropy_at = None;
                    if self.peers.is_empty() {
                        return;
                    }
                    let at = now.plus_millis(self.anti_entropy_ms);
                    self.anti_entropy_at = Some(at);
                    out.push(Output::Schedule {
                        timer: Timer::AntiEntropy,
                        at,
                    });
                    self.tick(host)
                }
                Input::Timer(Timer::Nudge) => {
                    self.nudge_scheduled = false;
                    self.take_nudges(host)
                }
                // Fetches are settled after every input; a deadline timer that fired early
                // (a shell's clock and this `now` may differ) is asked for again.
                Input::Timer(Timer::FetchDeadline(sid)) => {
                    if let Some(f) = self.fetches.get(&sid).filter(|f| now < f.deadline) {
                        out.push(Output::Schedule {
                            timer: Timer::FetchDeadline(sid),
                            at: f.deadline,
                        });
                    }
                    Vec::new()
                }
                Input::Loaded(_) => Vec::new(),
            },
        };
        out.extend(sent.into_iter().map(Output::Send));
    }

    fn punish(&mut self, peer: P, violation: Violation, out: &mut Vec<Output<P>>) {
        self.peers.remove(&peer);
        self.drop_waiting(&peer);
        out.push(Output::Punish { peer, violation });
    }

    /// Forgets every waiting message of `peer`, decoded or not.
    fn drop_waiting(&mut self, peer: &P) {
        self.waiting.retain(|w| match w {
            Pending::Message { peer: p, .. } | Pending::Input(Input::Message { peer: p, .. }) => {
                p != peer
            }
            Pending::Input(_) => true,
        });
    }

    /// Reports the fetches that ended: complete, refused by every peer, or past deadline.
    fn settle_fetches(&mut self, host: &mut Host<'_>, now: Timestamp, out: &mut Vec<Output<P>>) {
        if self.fetches.is_empty() {
            return;
        }
        let sids: Vec<MapSid> = self.fetches.keys().cloned().collect();
        for sid in sids {
            let exists = host.maps.get(&sid).is_some_and(MapReplica::exists);
            let outcome = if exists && self.caught_up(&sid, host) {
                Some(FetchOutcome::Complete)
            } else if !exists
                && !self.fetches.get(&sid).is_some_and(|f| f.await_peer)
                && self.nobody_has(&sid)
            {
                Some(FetchOutcome::NobodyHas)
            } else if self.fetches.get(&sid).is_some_and(|f| now >= f.deadline) {
                Some(FetchOutcome::TimedOut { partial: exists })
            } else {
                None
            };
            if let Some(outcome) = outcome {
                self.fetches.remove(&sid);
                out.push(Output::Fetched { sid, outcome });
            }
        }
    }

    /// What `peer` may do.
    pub fn grant(&self, peer: &P) -> Grant {
        self.grants.get(peer).cloned().unwrap_or_default()
    }

    /// Connected peers.
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.peers.keys()
    }

    /// Whether `peer` said it holds `sid`.
    pub fn peer_holds(&self, peer: &P, sid: &MapSid) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.hold_all || p.held.contains(sid))
    }

    /// Whether every connected peer that may have map `sid` said it has none of it (an empty
    /// document list).
    pub fn nobody_has(&self, sid: &MapSid) -> bool {
        // Peers this node does not share the map with are never asked about it.
        let mut asked = self
            .peers
            .values()
            .filter(|p| p.grant.reads(sid))
            .peekable();
        asked.peek().is_some() && asked.all(|p| p.their_docs.get(sid).is_some_and(Vec::is_empty))
    }

    /// Whether inputs wait for maps to be loaded.
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}
