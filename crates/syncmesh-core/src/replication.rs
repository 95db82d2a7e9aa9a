//! Replication between nodes, sans-IO: what to tell a peer, and what to do with what a peer
//! says. A network shell carries the bytes (direct messages to one peer, and gossip to every
//! peer holding a map) and feeds what arrives back in; time is passed in, nothing here blocks.
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
//! Local changes are also pushed at once to every peer holding the map as [`Wire::Changes`]
//! ([`Replicator::push`]); a node that merges changes new to it from such a message passes the
//! message on to its other peers holding the map (flooding that stops where nothing is new).
//! A change whose dependencies were missed waits inside Automerge, and a sync of that document
//! with the sender fetches what is missing. Hellos are repeated periodically (anti-entropy),
//! so any divergence left over is found and repaired.
//!
//! Each peer has a [`Grant`]: the maps it may receive and whether it may change them. A map
//! outside a peer's grant is never named to it (no Hello entry, digest, document list, sync
//! message or change), and changes from a peer without write access are not applied (they
//! are counted, see [`Replicator::take_refusals`]).
//!
//! Every message is size-limited and checked: a message that does not decode, names a
//! malformed map, or carries a change that breaks the map's layout (`check_change`) is a
//! [`Violation`]; the shell disconnects that peer. Nothing a peer sends can panic the node.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::sync;
use automerge::{Change, ChangeHash};
use serde::{Deserialize, Serialize};

use crate::authorship::Signature;
use crate::ids::{MapSid, Timestamp};
use crate::map::{check_changes, decode_sync, Checked, DocAddr, MapReplica};
use crate::policy::Policy;

/// Largest direct message a peer may send (a batch of sync messages of one map).
pub const MAX_DIRECT_MESSAGE: usize = 16 << 20;
/// Largest gossip message (the changes of one commit of one map); larger commits are
/// announced with [`Wire::Docs`] instead and travel by sync.
pub const MAX_GOSSIP_MESSAGE: usize = 1 << 20;
/// Sync messages are batched up to about this many bytes per direct message: small enough
/// that a node catching up merges, stores and publishes in slices (its engine takes about
/// this much of peers' messages per round) rather than one pause of the whole catch-up.
const SYNC_BATCH_BYTES: usize = 256 << 10;
/// Maps a hold-all node starts holding per Hello (the rest follow in later rounds), so one
/// message cannot make it create unbounded replicas.
const MAX_ADOPT_PER_HELLO: usize = 64;
/// "Not here" answers sent for one Hello: a node fetching maps asks for a few at a time, and
/// a Hello naming many unknown maps must not make this node send as many messages.
const MAX_NOT_HERE_PER_HELLO: usize = 64;

/// A message between two nodes. Encoded with `postcard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// Maps the sender holds, each with its [`MapReplica::digest`] (0: holds nothing yet).
    Hello {
        /// Whether the sender holds every map it hears of.
        hold_all: bool,
        /// `(map, digest)` pairs.
        maps: Vec<(MapSid, u64)>,
    },
    /// The sender's document digests of one map ([`MapReplica::doc_digests`]).
    Docs {
        /// The map.
        sid: MapSid,
        /// `(document, digest)` pairs.
        docs: Vec<(DocAddr, u64)>,
    },
    /// Automerge sync messages for documents of one map.
    Sync {
        /// The map.
        sid: MapSid,
        /// `(document, encoded sync message)` pairs.
        msgs: Vec<(DocAddr, Bytes)>,
        /// Signatures of changes in the messages ([`crate::authorship`]).
        sigs: Sigs,
    },
    /// New changes of one map (gossip).
    Changes {
        /// The map.
        sid: MapSid,
        /// `(document, encoded changes)` pairs.
        docs: Vec<(DocAddr, Vec<Bytes>)>,
        /// Signatures of changes in the message ([`crate::authorship`]).
        sigs: Sigs,
    },
    /// Asks for the signatures of changes of one map that the sender holds unsigned
    /// ([`MapReplica::unsigned`]): at most [`MAX_SIGS_ASKED`] hashes.
    WantSigs {
        /// The map.
        sid: MapSid,
        /// Change hashes.
        hashes: Vec<Bytes>,
    },
    /// The signatures asked for by [`Wire::WantSigs`] that the sender has.
    Sigs {
        /// The map.
        sid: MapSid,
        /// The signatures.
        sigs: Sigs,
    },
}

/// Milliseconds between two fetches of a map document from one peer caused by deferred
/// gossip.
const META_FETCH_INTERVAL: i64 = 1000;

/// Most signatures asked for in one [`Wire::WantSigs`].
pub const MAX_SIGS_ASKED: usize = 1024;

/// `(change hash, signature)` pairs carried with changes.
pub type Sigs = Vec<(Bytes, Signature)>;

/// The signatures of a message by change hash; `None` if one is malformed.
fn sig_map(sigs: Sigs) -> Option<HashMap<ChangeHash, Signature>> {
    sigs.into_iter()
        .map(|(h, s)| Some((ChangeHash::try_from(h.0.as_slice()).ok()?, s)))
        .collect()
}

/// Bytes that encode compactly (serde's default would go element by element).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({})", self.0.len())
    }
}

impl Wire {
    /// The message as bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding into a Vec cannot fail for these types.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes and checks a message from a peer.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Wire, Violation> {
        if bytes.len() > limit {
            return Err(Violation(format!(
                "message of {} bytes exceeds the limit of {limit}",
                bytes.len()
            )));
        }
        let w: Wire = postcard::from_bytes(bytes)
            .map_err(|e| Violation(format!("undecodable message: {e}")))?;
        for s in msg_sids(&w) {
            if MapSid::parse(s.as_str()).as_ref() != Some(&s) {
                return Err(Violation(format!("malformed map sid {:?}", s.as_str())));
            }
        }
        Ok(w)
    }
}

/// A peer broke the protocol (malformed, oversized or hostile input): disconnect it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation: {0}")]
pub struct Violation(pub String);

/// What became of a gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipOutcome {
    /// Direct messages to send (a sync to fetch what a change depends on).
    pub out: Vec<Outgoing>,
    /// Whether the message may be relayed on. False when this node could not apply it for
    /// reasons of its own state: not relayed, and the sender is not blamed.
    pub relay: bool,
    /// Whether some change in it was new to this node.
    pub novel: bool,
    /// The message to relay instead of the one received, when some of its changes were
    /// refused (they are not passed on).
    pub rewritten: Option<Vec<u8>>,
}

/// A direct message to send to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The peer, as the shell names it.
    pub peer: String,
    /// The encoded [`Wire`] message.
    pub bytes: Vec<u8>,
}

/// The maps of a node, as replication needs them. The node's engine implements this over its
/// catalog and storage (maps load lazily).
pub trait MapHost {
    /// Every map this node holds.
    fn held(&mut self) -> Vec<MapSid>;
    /// A held map, loaded; `None` if this node does not hold it (or it cannot be loaded).
    fn get(&mut self, sid: &MapSid) -> Option<&mut MapReplica>;
    /// Starts holding a map a peer has (asked only of nodes that hold every map).
    fn adopt(&mut self, sid: &MapSid) -> Option<&mut MapReplica>;
    /// Replication changed a map: the host commits it (changes, view, events).
    fn touched(&mut self, sid: &MapSid);
    /// A held map's [`MapReplica::digest`]; `None` if this node does not hold it. A host that
    /// remembers the digests of maps it has not loaded answers without loading them, so
    /// anti-entropy over many idle maps stays cheap.
    fn digest(&mut self, sid: &MapSid) -> Option<crate::Result<u64>> {
        self.get(sid).map(MapReplica::digest)
    }
    /// A held map's permissions; `None` if this node does not hold it. A host that remembers
    /// the permissions of maps it has not loaded answers without loading them.
    fn policy(&mut self, sid: &MapSid) -> Option<Policy> {
        self.get(sid).map(|m| m.policy().clone())
    }
    /// Changes of a held map whose signatures this node lacks ([`MapReplica::unsigned`], at
    /// most [`MAX_SIGS_ASKED`]); `None` if none. A host may answer only for loaded maps.
    fn unsigned(&mut self, sid: &MapSid) -> Option<Vec<ChangeHash>> {
        let h = self.get(sid)?.unsigned(MAX_SIGS_ASKED);
        // What it forgot on the way is stored as gone.
        self.touched(sid);
        (!h.is_empty()).then_some(h)
    }
}

/// A catalog hosts its maps in memory (for nodes without storage, and tests): maps a peer
/// has are adopted as empty replicas that fill in by sync.
impl MapHost for crate::Catalog {
    fn held(&mut self) -> Vec<MapSid> {
        self.maps().map(|m| m.sid().clone()).collect()
    }

    fn get(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        self.by_sid(sid)
    }

    fn adopt(&mut self, sid: &MapSid) -> Option<&mut MapReplica> {
        if !self.contains(sid) {
            let id = self.identity().clone();
            self.insert(MapReplica::empty(id, sid.clone()));
        }
        self.by_sid(sid)
    }

    fn touched(&mut self, _sid: &MapSid) {}
}

/// What one peer may do with this node's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The maps it may receive; `None` for every map.
    pub maps: Option<BTreeSet<MapSid>>,
    /// Whether it may change the maps it receives.
    pub write: bool,
}

impl Grant {
    /// Every map, read and write.
    pub fn full() -> Grant {
        Grant {
            maps: None,
            write: true,
        }
    }

    /// Whether the peer may receive `sid`.
    pub fn reads(&self, sid: &MapSid) -> bool {
        self.maps.as_ref().is_none_or(|m| m.contains(sid))
    }

    /// Whether the peer may change `sid`.
    pub fn writes(&self, sid: &MapSid) -> bool {
        self.write && self.reads(sid)
    }
}

impl Default for Grant {
    fn default() -> Self {
        Grant::full()
    }
}

/// Changes a peer sent that were not applied because it may not write the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The peer.
    pub peer: String,
    /// The map.
    pub sid: MapSid,
    /// How many changes were refused.
    pub changes: u64,
}

#[derive(Default)]
struct PeerState {
    grant: Grant,
    /// Per map, changes offered to this peer by sync while it may not write the map.
    offered: HashMap<MapSid, std::collections::HashSet<automerge::ChangeHash>>,
    hold_all: bool,
    /// Maps the peer said it holds.
    held: BTreeSet<MapSid>,
    sessions: HashMap<(MapSid, DocAddr), sync::State>,
    /// Sessions in which this node refused some of the peer's changes: the peer keeps them,
    /// so the two never agree on heads, and Automerge would answer every message forever.
    /// Until the session restarts, a reply goes only with changes not offered before.
    refusing: std::collections::HashSet<(MapSid, DocAddr)>,
    /// Sessions in which a repeated "I hold nothing" was taken as the crossing of both sides'
    /// first messages (see [`Replicator::on_sync`]); once per session.
    crossed: std::collections::HashSet<(MapSid, DocAddr)>,
    /// The peer's latest document digests per map.
    their_docs: HashMap<MapSid, Vec<(DocAddr, u64)>>,
    /// Maps whose unsigned changes' signatures were asked of the peer on this connection.
    asked_sigs: BTreeSet<MapSid>,
    /// Maps whose [`Wire::Sigs`] answer is awaited from the peer (one answer per ask).
    awaiting_sigs: BTreeSet<MapSid>,
    /// When the map document of each map was last fetched from the peer because its gossip
    /// was deferred (at most once per [`META_FETCH_INTERVAL`]).
    meta_fetched: HashMap<MapSid, Timestamp>,
}

/// Replication state with every connected peer.
pub struct Replicator {
    hold_all: bool,
    peers: BTreeMap<String, PeerState>,
    /// Maps that changed through sync, with the peers the changes came from: the other
    /// peers hear of it ([`Self::take_nudges`]), as gossip only relays what was gossiped.
    synced: BTreeMap<MapSid, BTreeSet<String>>,
    /// Maps whose documents may be damaged: Automerge panicked while merging a peer's data.
    poisoned: BTreeSet<MapSid>,
    /// Grants set before (or while) a peer is connected.
    grants: HashMap<String, Grant>,
    /// Changes refused since the last [`Self::take_refusals`].
    refusals: BTreeMap<(String, MapSid), u64>,
    /// Per peer, the changes refused so far (each is counted once).
    refused_seen: HashMap<String, std::collections::HashSet<ChangeHash>>,
}

impl Replicator {
    /// A replicator; `hold_all` makes this node hold every map it hears of (a cluster or
    /// backup node).
    pub fn new(hold_all: bool) -> Self {
        Replicator {
            hold_all,
            peers: BTreeMap::new(),
            synced: BTreeMap::new(),
            poisoned: BTreeSet::new(),
            grants: HashMap::new(),
            refusals: BTreeMap::new(),
            refused_seen: HashMap::new(),
        }
    }

    /// Sets what `peer` may do (every map, read and write, unless set). Takes effect at once:
    /// maps it may no longer read are not named to it again.
    pub fn set_grant(&mut self, peer: &str, grant: Grant) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.grant = grant.clone();
            let g = &p.grant;
            p.held.retain(|s| g.reads(s));
            p.offered.clear();
            p.sessions.retain(|(s, _), _| g.reads(s));
            p.their_docs.retain(|s, _| g.reads(s));
        }
        self.grants.insert(peer.to_string(), grant);
    }

    /// Forgets a peer's grant (it was untrusted).
    pub fn remove_grant(&mut self, peer: &str) {
        self.grants.remove(peer);
    }

    /// What `peer` may do.
    pub fn grant(&self, peer: &str) -> Grant {
        self.grants.get(peer).cloned().unwrap_or_default()
    }

    /// Changes refused since the last call, per peer and map (for logs and counters).
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refusals)
            .into_iter()
            .map(|((peer, sid), changes)| Refusal { peer, sid, changes })
            .collect()
    }

    /// Counts refused changes; one refused before (a peer offers its changes again every
    /// round) is not counted again.
    fn refuse(&mut self, peer: &str, sid: &MapSid, hashes: impl IntoIterator<Item = ChangeHash>) {
        let seen = self.refused_seen.entry(peer.to_string()).or_default();
        if seen.len() > 100_000 {
            seen.clear(); // bounded: at worst a refusal is counted twice
        }
        let n = hashes.into_iter().filter(|h| seen.insert(*h)).count();
        if n > 0 {
            *self
                .refusals
                .entry((peer.to_string(), sid.clone()))
                .or_default() += n as u64;
        }
    }

    /// Whether `peer` may receive `sid`: its grant here, and the map's own permissions.
    fn reads(&self, peer: &str, sid: &MapSid, host: &mut dyn MapHost) -> bool {
        self.peers.get(peer).is_some_and(|p| p.grant.reads(sid))
            && host.policy(sid).is_none_or(|pol| pol.reads(peer))
    }

    /// Direct messages carrying `msgs` (encoded [`Wire::Changes`] of map `sid`, from
    /// [`Self::gossip`]) to every peer that holds the map and may read it, except `except`.
    pub fn push(
        &self,
        sid: &MapSid,
        msgs: &[Vec<u8>],
        except: Option<&str>,
        host: &mut dyn MapHost,
    ) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let policy = host.policy(sid).unwrap_or_default();
        for (peer, p) in &self.peers {
            if Some(peer.as_str()) == except
                || !(p.hold_all || p.held.contains(sid))
                || !p.grant.reads(sid)
                || !policy.reads(peer)
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

    /// Connected peers.
    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// Whether `peer` said it holds `sid`.
    pub fn peer_holds(&self, peer: &str, sid: &MapSid) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.hold_all || p.held.contains(sid))
    }

    /// A peer connected: greet it with every map this node holds.
    pub fn peer_up(&mut self, peer: &str, host: &mut dyn MapHost) -> Vec<Outgoing> {
        let grant = self.grant(peer);
        self.peers.entry(peer.to_string()).or_default().grant = grant;
        let hello = self.hello_for(peer, host.held(), host);
        vec![Outgoing {
            peer: peer.to_string(),
            bytes: hello.encode(),
        }]
    }

    /// A peer disconnected: its sync sessions end (a reconnect starts afresh).
    pub fn peer_down(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Anti-entropy: a Hello with every held map to every peer.
    pub fn tick(&mut self, host: &mut dyn MapHost) -> Vec<Outgoing> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let held = host.held();
        self.to_each(held, host)
    }

    /// Tells every peer about maps this node started holding (created, opened, or wanted:
    /// a map held empty is announced with digest 0, and peers that have it send it).
    pub fn announce(&mut self, sids: &[MapSid], host: &mut dyn MapHost) -> Vec<Outgoing> {
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
    pub fn nudge(&mut self, sid: &MapSid, host: &mut dyn MapHost) -> Vec<Outgoing> {
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
        let peers: Vec<String> = self
            .peers
            .iter()
            .filter(|(k, p)| {
                (p.hold_all || p.held.contains(sid)) && p.grant.reads(sid) && policy.reads(k)
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
    pub fn take_nudges(&mut self, host: &mut dyn MapHost) -> Vec<Outgoing> {
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
                    && policy.reads(peer)
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
    fn to_each(&self, sids: Vec<MapSid>, host: &mut dyn MapHost) -> Vec<Outgoing> {
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
                            p.grant.reads(s) && pol.as_ref().is_none_or(|pol| pol.reads(peer))
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

    fn hello_for(&self, peer: &str, sids: Vec<MapSid>, host: &mut dyn MapHost) -> Wire {
        let sids = sids
            .into_iter()
            .filter(|s| self.reads(peer, s, host))
            .collect();
        self.hello(sids, host)
    }

    fn hello(&self, sids: Vec<MapSid>, host: &mut dyn MapHost) -> Wire {
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

    /// Encodes local changes of one map as gossip messages (each at most
    /// [`MAX_GOSSIP_MESSAGE`]), each change with its signature if `sigs` has it. Returns the
    /// messages, and whether some change was too large for gossip (then call [`Self::nudge`]).
    pub fn gossip(
        sid: &MapSid,
        changes: Vec<(DocAddr, Vec<u8>)>,
        sigs: &HashMap<ChangeHash, Signature>,
    ) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        let mut too_large = false;
        let mut docs: Vec<(DocAddr, Vec<Bytes>)> = Vec::new();
        let mut msg_sigs: Sigs = Vec::new();
        let mut size = 64;
        for (doc, bytes) in changes {
            // A signature is about 200 bytes encoded.
            let sig = if sigs.is_empty() {
                None
            } else {
                Change::from_bytes(bytes.clone())
                    .ok()
                    .and_then(|c| Some((Bytes(c.hash().0.to_vec()), sigs.get(&c.hash())?.clone())))
            };
            let need = bytes.len() + 16 + if sig.is_some() { 256 } else { 0 };
            if need + 64 > MAX_GOSSIP_MESSAGE {
                too_large = true;
                continue;
            }
            if size + need > MAX_GOSSIP_MESSAGE {
                out.push(
                    Wire::Changes {
                        sid: sid.clone(),
                        docs: std::mem::take(&mut docs),
                        sigs: std::mem::take(&mut msg_sigs),
                    }
                    .encode(),
                );
                size = 64;
            }
            size += need;
            msg_sigs.extend(sig);
            match docs.last_mut() {
                Some((d, list)) if *d == doc => list.push(Bytes(bytes)),
                _ => docs.push((doc, vec![Bytes(bytes)])),
            }
        }
        if !docs.is_empty() {
            out.push(
                Wire::Changes {
                    sid: sid.clone(),
                    docs,
                    sigs: msg_sigs,
                }
                .encode(),
            );
        }
        (out, too_large)
    }

    /// Whether this node has everything some peer had of `sid` when it last described its
    /// documents (each of that peer's document digests equals ours). A map fetched from peers
    /// is complete for the caller once this holds.
    pub fn caught_up(&self, sid: &MapSid, host: &mut dyn MapHost) -> bool {
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

    /// Whether every connected peer said it has none of map `sid` (an empty document list):
    /// a node fetching the map can stop waiting for it.
    pub fn nobody_has(&self, sid: &MapSid) -> bool {
        // Peers this node does not share the map with are never asked about it.
        let mut asked = self
            .peers
            .values()
            .filter(|p| p.grant.reads(sid))
            .peekable();
        asked.peek().is_some() && asked.all(|p| p.their_docs.get(sid).is_some_and(Vec::is_empty))
    }

    /// Maps whose in-memory documents must be dropped and reloaded from storage: merging a
    /// peer's data panicked inside Automerge (the message was refused as a [`Violation`],
    /// but the document may be half-changed).
    pub fn take_poisoned(&mut self) -> Vec<MapSid> {
        std::mem::take(&mut self.poisoned).into_iter().collect()
    }

    /// Handles a direct message from `peer`. Returns what to send back, or the violation for
    /// which the peer must be disconnected (nothing of a refused message is applied).
    pub fn receive(
        &mut self,
        peer: &str,
        bytes: &[u8],
        host: &mut dyn MapHost,
        now: Timestamp,
    ) -> Result<Vec<Outgoing>, Violation> {
        let msg = Wire::decode(bytes, MAX_DIRECT_MESSAGE)?;
        if !self.peers.contains_key(peer) {
            let grant = self.grant(peer);
            self.peers.entry(peer.to_string()).or_default().grant = grant;
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

    /// Handles a gossip message relayed by `peer`: only [`Wire::Changes`] travel by gossip.
    pub fn receive_gossip(
        &mut self,
        peer: &str,
        bytes: &[u8],
        host: &mut dyn MapHost,
        now: Timestamp,
    ) -> Result<GossipOutcome, Violation> {
        match Wire::decode(bytes, MAX_GOSSIP_MESSAGE)? {
            Wire::Changes { sid, docs, sigs } => {
                let sids = vec![sid.clone()];
                self.guard(sids, |rep| rep.on_changes(peer, sid, docs, sigs, host, now))
            }
            _ => Err(Violation("only changes travel by gossip".into())),
        }
    }

    /// Runs a handler; a panic inside Automerge on a peer's data becomes a [`Violation`] and
    /// marks the maps involved for reloading ([`Self::take_poisoned`]).
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
        peer: &str,
        hold_all: bool,
        maps: Vec<(MapSid, u64)>,
        host: &mut dyn MapHost,
    ) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let me_all = self.hold_all;
        let Some(p) = self.peers.get_mut(peer) else {
            return out;
        };
        p.hold_all = hold_all;
        let grant = p.grant.clone();
        let mut adopted = 0;
        let mut not_here = 0;
        for (sid, theirs) in maps {
            // A map the peer may not read is answered as if this node did not hold it.
            let readable = grant.reads(&sid) && host.policy(&sid).is_none_or(|pol| pol.reads(peer));
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
                            peer: peer.to_string(),
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
            if readable && theirs != 0 && !p.asked_sigs.contains(&sid) {
                if let Some(ask) = host.unsigned(&sid).and_then(|h| want_sigs(&sid, h)) {
                    p.asked_sigs.insert(sid.clone());
                    p.awaiting_sigs.insert(sid.clone());
                    out.push(Outgoing {
                        peer: peer.to_string(),
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
                    peer: peer.to_string(),
                    bytes: Wire::Docs { sid, docs }.encode(),
                });
            }
        }
        out
    }

    /// Asks every peer holding `sid` (and allowed to read it) for the signatures of the
    /// changes this node holds unsigned ([`MapReplica::unsigned`]), e.g. right after the map
    /// got its first permission entries from a peer.
    pub fn ask_signatures(&mut self, sid: &MapSid, host: &mut dyn MapHost) -> Vec<Outgoing> {
        let Some(ask) = host.unsigned(sid).and_then(|h| want_sigs(sid, h)) else {
            return Vec::new();
        };
        let policy = host.policy(sid);
        let mut out = Vec::new();
        for (peer, p) in self.peers.iter_mut() {
            let reads = p.grant.reads(sid) && policy.as_ref().is_none_or(|pol| pol.reads(peer));
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
        peer: &str,
        sid: MapSid,
        hashes: Vec<Bytes>,
        host: &mut dyn MapHost,
    ) -> Result<Vec<Outgoing>, Violation> {
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
            peer: peer.to_string(),
            bytes: Wire::Sigs { sid, sigs }.encode(),
        }])
    }

    fn on_sigs(
        &mut self,
        peer: &str,
        sid: MapSid,
        sigs: Sigs,
        host: &mut dyn MapHost,
    ) -> Result<Vec<Outgoing>, Violation> {
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
        peer: &str,
        sid: MapSid,
        theirs: Vec<(DocAddr, u64)>,
        host: &mut dyn MapHost,
        now: Timestamp,
    ) -> Vec<Outgoing> {
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
        peer: &str,
        sid: MapSid,
        msgs: Vec<(DocAddr, Bytes)>,
        sigs: Sigs,
        host: &mut dyn MapHost,
        now: Timestamp,
    ) -> Result<Vec<Outgoing>, Violation> {
        if !self.reads(peer, &sid, host) {
            return Ok(Vec::new());
        }
        let sigs = sig_map(sigs).ok_or_else(|| Violation("malformed signature list".into()))?;
        // This node's own decision about the sender; authors' rights are checked per change.
        let may_write = self.peers.get(peer).is_some_and(|p| p.grant.writes(&sid));
        // A peer that may not write keeps changes of its own this node refuses: it never agrees
        // on heads with this node (see the replies below).
        let writer = may_write && host.policy(&sid).is_none_or(|pol| pol.writes(peer));
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
        let mut decoded = Vec::with_capacity(msgs.len());
        for (doc, bytes) in msgs {
            let d = decode_sync(doc, &bytes.0).map_err(|e| Violation(format!("map {sid}: {e}")))?;
            decoded.push((doc, d));
        }
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
                .insert(peer.to_string());
        }
        if meta_digest(&ours) != meta_before {
            out.push(Outgoing {
                peer: peer.to_string(),
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
        peer: &str,
        sid: MapSid,
        docs: Vec<(DocAddr, Vec<Bytes>)>,
        sigs: Sigs,
        host: &mut dyn MapHost,
        now: Timestamp,
    ) -> Result<GossipOutcome, Violation> {
        let nothing = GossipOutcome {
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
        let mut decoded: Vec<(DocAddr, Vec<Change>, Checked)> = Vec::with_capacity(docs.len());
        for (doc, list) in docs {
            let mut cs = Vec::with_capacity(list.len());
            for b in list {
                let c = Change::from_bytes(b.0)
                    .map_err(|e| Violation(format!("map {sid}: undecodable change: {e}")))?;
                cs.push(c);
            }
            let checked =
                check_changes(doc, &cs).map_err(|e| Violation(format!("map {sid}: {e}")))?;
            decoded.push((doc, cs, checked));
        }
        let Some(m) = host.get(&sid) else {
            // Not a map this node holds: valid, but nothing to do here.
            return Ok(GossipOutcome {
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
            return Ok(GossipOutcome {
                out: Vec::new(),
                relay,
                novel,
                rewritten,
            });
        }
        // A change was missed: sync those documents with the sender.
        let Some(m) = host.get(&sid) else {
            return Ok(GossipOutcome {
                out: Vec::new(),
                relay,
                novel,
                rewritten,
            });
        };
        let p = self.peers.entry(peer.to_string()).or_default();
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
        Ok(GossipOutcome {
            out: batch_sync(peer, &sid, msgs, m),
            relay,
            novel,
            rewritten,
        })
    }
}

/// What [`authorize`] decided about a batch of changes of one document.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The changes taken.
    pub ok: std::collections::HashSet<ChangeHash>,
    /// Those whose signature was checked on the way.
    pub verified: std::collections::HashSet<ChangeHash>,
    /// Changes that cannot be judged yet (their history or the map's permissions have not
    /// arrived): not taken, not held against the sender; they come again.
    pub deferred: std::collections::HashSet<ChangeHash>,
    /// What deferred changes depend on and this replica lacks: to be asked for. (A change
    /// not taken is unknown to Automerge, whose sync would otherwise never learn that its
    /// dependencies are missing; the sender, believing them held, e.g. from a false positive
    /// of the receiver's Bloom filter, would never send them.)
    pub missing: std::collections::HashSet<ChangeHash>,
}

/// Most permission changes judged in one batch (each costs a copy of the map document as of
/// its dependencies); the rest are deferred to later batches.
const MAX_JUDGED_PER_BATCH: usize = 64;

/// Which of `changes` (of document `doc` of map `m`) this node takes, by their authors' rights.
///
/// A map without permission entries takes every change (its shell already decided the sender
/// may write). Otherwise a shard change is taken when
/// - it is signed by its author ([`Signature::signs`]) and the map's permissions let the author
///   write, or
/// - it is in the history endorsed when the map got its first entry or a writer lost `Write`
///   ([`MapReplica::endorsed`]), or a change taken earlier depends on it
///   ([`MapReplica::wants`]), or
/// - a change taken here depends on it (its author's change builds on it, which endorses it).
///
/// Map-document changes are judged by [`authorize_meta`]. So a change by a peer without
/// `Write`, or in a writer's name but not signed by it, is refused by every node, whoever
/// passes it on.
pub fn authorize(
    m: &mut MapReplica,
    doc: DocAddr,
    changes: &[Change],
    sigs: &HashMap<ChangeHash, Signature>,
) -> Verdict {
    if doc == DocAddr::Meta {
        return authorize_meta(m, changes, sigs);
    }
    if m.knows_nothing() || m.awaits_incarnation(doc) {
        // The map's permissions (or those of the incarnation the changes belong to) are not
        // known here yet: its shards wait for them, and come again after the map document.
        return Verdict {
            deferred: changes.iter().map(Change::hash).collect(),
            ..Verdict::default()
        };
    }
    let policy = m.policy().clone();
    if policy.is_open() {
        return Verdict {
            ok: changes.iter().map(Change::hash).collect(),
            ..Verdict::default()
        };
    }
    let mut verified = std::collections::HashSet::new();
    let by_hash: HashMap<ChangeHash, &Change> = changes.iter().map(|c| (c.hash(), c)).collect();
    let mut ok = std::collections::HashSet::new();
    let mut stack: Vec<ChangeHash> = Vec::new();
    for c in changes {
        let h = c.hash();
        let root = m.endorsed().contains(&h)
            || m.wants(doc, &h)
            || sigs
                .get(&h)
                .is_some_and(|s| policy.writes(&s.author) && s.signs(c) && verified.insert(h));
        if root && ok.insert(h) {
            stack.push(h);
        }
    }
    take_ancestors(&mut ok, stack, &by_hash);
    // What the taken changes depend on and is missing here is taken when it comes.
    for h in &ok {
        if let Some(c) = by_hash.get(h) {
            for d in c.deps() {
                if !ok.contains(d) && !m.has_change(doc, d) {
                    m.want(doc, *d);
                }
            }
        }
    }
    Verdict {
        ok,
        verified,
        ..Verdict::default()
    }
}

/// [`authorize`] for map-document changes. They are tried on a copy of the map document:
/// - a change of permissions (or a removal) counts only if its signed author could manage the
///   map as of the change's own dependencies, so nobody grants itself rights, whether the
///   change is new or handed over as history; changes built on one that does not count do not
///   count either;
/// - the other changes are judged like shard changes, against the permissions the map has
///   with the batch's counted changes applied (so a batch granting `Write` and using it is
///   taken at once);
/// - a change whose dependencies are missing here is deferred (it comes again with them).
///
/// A replica that has nothing of the map yet judges the first map-document changes it gets
/// the same way, from the permissions those changes give.
pub fn authorize_meta(
    m: &mut MapReplica,
    changes: &[Change],
    sigs: &HashMap<ChangeHash, Signature>,
) -> Verdict {
    let mut v = Verdict::default();
    let mut fresh: Vec<&Change> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in changes {
        let h = c.hash();
        if !seen.insert(h) {
            continue;
        }
        if m.has_change(DocAddr::Meta, &h) {
            v.ok.insert(h); // already here: taking it again changes nothing
        } else {
            fresh.push(c);
        }
    }
    if fresh.is_empty() {
        return v;
    }
    let Some(scratch) = on_fork(m, &fresh) else {
        // Automerge refuses them against this document: applying them would fail too.
        v.deferred.extend(fresh.iter().map(|c| c.hash()));
        return v;
    };
    let (applied, waiting): (Vec<&Change>, Vec<&Change>) = fresh
        .into_iter()
        .partition(|c| crate::am::has_change(&scratch, &c.hash()));
    v.deferred.extend(waiting.iter().map(|c| c.hash()));
    for c in &waiting {
        for d in c.deps() {
            if !crate::am::has_change(&scratch, d) {
                v.missing.insert(*d);
            }
        }
    }
    let signed_by = |c: &Change| {
        sigs.get(&c.hash())
            .filter(|s| s.signs(c))
            .map(|s| &s.author)
    };
    // Permission changes, judged where they were made.
    let mut bad: std::collections::HashSet<ChangeHash> = std::collections::HashSet::new();
    let mut capped = Vec::new();
    let mut judged = 0;
    // A replica holding the map judges by its current permissions too: a change built on an
    // old state (or on none) cannot claim rights its author no longer has.
    let current = (!m.knows_nothing()).then(|| m.policy().clone());
    for c in applied.iter().filter(|c| crate::map::needs_manage(c)) {
        // The cheap checks first: a copy of the document as of the change's dependencies is
        // made only for a signed change whose author manages the map now.
        let author = signed_by(c).filter(|a| current.as_ref().is_none_or(|p| p.manages(a)));
        let Some(a) = author else {
            bad.insert(c.hash());
            continue;
        };
        judged += 1;
        if judged > MAX_JUDGED_PER_BATCH {
            capped.push(c.hash());
            continue;
        }
        if !c.deps().is_empty() && crate::map::policy_at(&scratch, Some(c.deps())).manages(a) {
            v.verified.insert(c.hash());
        } else {
            bad.insert(c.hash());
        }
    }
    // Everything built on a change that does not count does not count either.
    let mut children: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    for c in &applied {
        for d in c.deps() {
            children.entry(*d).or_default().push(c.hash());
        }
    }
    // Over the cap: not judged this time, so neither they nor what rests on them is refused.
    let mut later: std::collections::HashSet<ChangeHash> = capped.iter().copied().collect();
    let mut stack = capped;
    while let Some(h) = stack.pop() {
        for child in children.get(&h).into_iter().flatten() {
            if later.insert(*child) {
                stack.push(*child);
            }
        }
    }
    v.deferred.extend(later.iter().copied());
    let mut stack: Vec<ChangeHash> = bad.iter().copied().collect();
    while let Some(h) = stack.pop() {
        for child in children.get(&h).into_iter().flatten() {
            if bad.insert(*child) {
                stack.push(*child);
            }
        }
    }
    bad.extend(later);
    let kept: Vec<&Change> = applied
        .iter()
        .copied()
        .filter(|c| !bad.contains(&c.hash()))
        .collect();
    let Some(counted) = on_fork(m, &kept) else {
        v.deferred.extend(kept.iter().map(|c| c.hash()));
        return v;
    };
    let policy = crate::map::policy_at(&counted, None);
    let by_hash: HashMap<ChangeHash, &Change> = kept.iter().map(|c| (c.hash(), *c)).collect();
    let mut stack = Vec::new();
    for c in &kept {
        let h = c.hash();
        let root = policy.is_open()
            || v.verified.contains(&h)
            || signed_by(c).is_some_and(|a| policy.writes(a)) && v.verified.insert(h);
        if root && v.ok.insert(h) {
            stack.push(h);
        }
    }
    take_ancestors(&mut v.ok, stack, &by_hash);
    v
}

/// Adds to `ok` every change of the batch (`by_hash`) that the changes in `stack` (taken
/// already) depend on, directly or not.
fn take_ancestors(
    ok: &mut std::collections::HashSet<ChangeHash>,
    mut stack: Vec<ChangeHash>,
    by_hash: &HashMap<ChangeHash, &Change>,
) {
    while let Some(h) = stack.pop() {
        let Some(c) = by_hash.get(&h) else { continue };
        for d in c.deps() {
            if by_hash.contains_key(d) && ok.insert(*d) {
                stack.push(*d);
            }
        }
    }
}

/// A copy of the map document with `changes` applied; `None` if Automerge refuses them.
fn on_fork(m: &MapReplica, changes: &[&Change]) -> Option<automerge::Automerge> {
    let mut d = m.meta_fork();
    d.apply_changes(changes.iter().map(|c| (*c).clone())).ok()?;
    Some(d)
}

/// Keeps the signatures of taken changes that carry one, once checked.
fn keep_sigs(
    m: &mut MapReplica,
    taken: &[Change],
    sigs: &HashMap<ChangeHash, Signature>,
    verified: &std::collections::HashSet<ChangeHash>,
) {
    if sigs.is_empty() {
        return;
    }
    let good: Vec<(ChangeHash, Signature)> = taken
        .iter()
        .filter_map(|c| {
            let h = c.hash();
            let s = sigs.get(&h)?;
            (m.signature(&h).is_none() && (verified.contains(&h) || s.signs(c)))
                .then(|| (h, s.clone()))
        })
        .collect();
    m.keep_signatures(good);
}

/// The signatures this node has of the changes in an encoded sync message.
fn sync_sigs(m: &MapReplica, doc: DocAddr, msg: &[u8]) -> Sigs {
    if doc != DocAddr::Meta && m.policy().is_open() {
        return Vec::new();
    }
    match sync::Message::decode(msg) {
        Ok(msg) => {
            let chunks: Vec<&[u8]> = msg.changes.iter().collect();
            sigs_of(m, doc, &chunks)
        }
        Err(_) => Vec::new(),
    }
}

/// The signatures this node has of the changes in an encoded change list.
/// Only map documents and maps with permission entries carry them (elsewhere no one asks).
fn sigs_of(m: &MapReplica, doc: DocAddr, changes: &[&[u8]]) -> Sigs {
    if doc != DocAddr::Meta && m.policy().is_open() {
        return Vec::new();
    }
    changes
        .iter()
        .filter_map(|b| {
            let c = Change::from_bytes(b.to_vec()).ok()?;
            let s = m.signature(&c.hash())?;
            Some((Bytes(c.hash().0.to_vec()), s.clone()))
        })
        .collect()
}

/// Whether a sync message carries a change not offered to the peer before (and notes them).
fn offers_something_new(
    offered: &mut HashMap<MapSid, std::collections::HashSet<automerge::ChangeHash>>,
    sid: &MapSid,
    msg: &[u8],
) -> bool {
    let Ok(m) = sync::Message::decode(msg) else {
        return false;
    };
    let seen = offered.entry(sid.clone()).or_default();
    let mut new = false;
    for chunk in m.changes.iter() {
        if let Ok(c) = Change::from_bytes(chunk.to_vec()) {
            new |= seen.insert(c.hash());
        }
    }
    new
}

/// A [`Wire::WantSigs`] for `hashes`; `None` if there are none.
fn want_sigs(sid: &MapSid, hashes: Vec<ChangeHash>) -> Option<Vec<u8>> {
    if hashes.is_empty() {
        return None;
    }
    Some(
        Wire::WantSigs {
            sid: sid.clone(),
            hashes: hashes.into_iter().map(|h| Bytes(h.0.to_vec())).collect(),
        }
        .encode(),
    )
}

fn msg_sids(w: &Wire) -> Vec<MapSid> {
    match w {
        Wire::Hello { maps, .. } => maps.iter().map(|(s, _)| s.clone()).collect(),
        Wire::Docs { sid, .. }
        | Wire::Sync { sid, .. }
        | Wire::Changes { sid, .. }
        | Wire::WantSigs { sid, .. }
        | Wire::Sigs { sid, .. } => {
            vec![sid.clone()]
        }
    }
}

fn docs_well_formed(docs: &[(DocAddr, u64)]) -> bool {
    docs.len() <= usize::from(crate::layout::SHARDS) + 1
        && docs.iter().all(|(d, _)| match d {
            DocAddr::Meta => true,
            DocAddr::Shard { index, .. } => *index < crate::layout::SHARDS,
        })
}

fn meta_digest(docs: &[(DocAddr, u64)]) -> Option<u64> {
    docs.iter()
        .find(|(d, _)| *d == DocAddr::Meta)
        .map(|(_, h)| *h)
}

/// Starts (fresh) sync sessions with a peer for every document of `sid` whose digests differ,
/// the map document alone first when it differs.
fn start_sessions(
    peer: &str,
    p: &mut PeerState,
    sid: &MapSid,
    m: &mut MapReplica,
    now: Timestamp,
) -> Vec<Outgoing> {
    // A new session may offer everything again (what was offered may have been lost).
    p.offered.remove(sid);
    let Some(theirs) = p.their_docs.get(sid) else {
        return Vec::new();
    };
    let ours = match m.doc_digests() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(map = %sid, "cannot compute document digests: {e}");
            return Vec::new();
        }
    };
    let ours: BTreeMap<DocAddr, u64> = ours.into_iter().collect();
    let theirs: BTreeMap<DocAddr, u64> = theirs.iter().copied().collect();
    let differs = |d: &DocAddr| ours.get(d) != theirs.get(d);
    // A peer whose changes this node refuses may never agree on the map document (it keeps
    // its own refused changes): its shards are synced without waiting for that.
    let refused_peer = !(p.grant.writes(sid) && m.policy().manages(peer));
    let docs: Vec<DocAddr> = if differs(&DocAddr::Meta) && !refused_peer {
        vec![DocAddr::Meta]
    } else {
        ours.keys()
            .chain(theirs.keys())
            .filter(|d| differs(d) && m.syncs(**d))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let mut msgs = Vec::new();
    for doc in docs {
        let state = p.sessions.entry((sid.clone(), doc)).or_default();
        // A fresh state: an earlier exchange may have stalled (a lost message).
        *state = sync::State::new();
        p.crossed.remove(&(sid.clone(), doc));
        p.refusing.remove(&(sid.clone(), doc));
        match m.sync_generate(doc, state, now) {
            Ok(Some(b)) => msgs.push((doc, Bytes(b))),
            Ok(None) => {}
            Err(e) => tracing::warn!(map = %sid, "sync message for {doc:?} failed: {e}"),
        }
    }
    batch_sync(peer, sid, msgs, m)
}

/// Splits a large sync message into [`Wire::Changes`] messages carrying its changes and the
/// message without them. For a map with permission entries the newest changes go first:
/// a receiver takes a change that the changes it took depend on (see [`authorize`]), so
/// history endorsed by a later change must not arrive before it.
fn split_sync(
    sid: &MapSid,
    doc: DocAddr,
    bytes: &[u8],
    m: &MapReplica,
) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let mut msg = sync::Message::decode(bytes).ok()?;
    let mut chunks: Vec<Vec<u8>> = msg.changes.iter().map(<[u8]>::to_vec).collect();
    msg.changes = sync::ChunkList::from(Vec::<Vec<u8>>::new());
    // (Map-document changes are judged with their history, oldest first.)
    if doc != DocAddr::Meta && !m.policy().is_open() {
        chunks.reverse();
    }
    let mut out = Vec::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let changes_msg = |batch: Vec<Bytes>| {
        let refs: Vec<&[u8]> = batch.iter().map(|b| b.0.as_slice()).collect();
        let sigs = sigs_of(m, doc, &refs);
        Wire::Changes {
            sid: sid.clone(),
            docs: vec![(doc, batch)],
            sigs,
        }
        .encode()
    };
    for c in chunks {
        if c.len() + 4096 > MAX_DIRECT_MESSAGE {
            return None; // one change larger than any message
        }
        if size + c.len() > SYNC_BATCH_BYTES && !batch.is_empty() {
            out.push(changes_msg(std::mem::take(&mut batch)));
            size = 0;
        }
        size += c.len();
        batch.push(Bytes(c));
    }
    if !batch.is_empty() {
        out.push(changes_msg(batch));
    }
    Some((out, msg.encode()))
}

/// Packs sync messages into direct messages of about [`SYNC_BATCH_BYTES`].
fn batch_sync(
    peer: &str,
    sid: &MapSid,
    msgs: Vec<(DocAddr, Bytes)>,
    m: &MapReplica,
) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut sigs = Vec::new();
    let mut size = 0;
    for (doc, mut b) in msgs {
        if b.0.len() > SYNC_BATCH_BYTES {
            // Automerge puts every change a peer lacks into one message: send the changes
            // ahead in batches (direct messages to a peer arrive in order), then the message
            // without them.
            match split_sync(sid, doc, &b.0, m) {
                Some((changes, rest)) => {
                    out.extend(changes.into_iter().map(|bytes| Outgoing {
                        peer: peer.to_string(),
                        bytes,
                    }));
                    b = Bytes(rest);
                }
                None => {
                    tracing::warn!(map = %sid, "a sync message for {doc:?} cannot be split; not sent");
                    continue;
                }
            }
        }
        if size + b.0.len() > SYNC_BATCH_BYTES && !batch.is_empty() {
            out.push(Outgoing {
                peer: peer.to_string(),
                bytes: Wire::Sync {
                    sid: sid.clone(),
                    msgs: std::mem::take(&mut batch),
                    sigs: std::mem::take(&mut sigs),
                }
                .encode(),
            });
            size = 0;
        }
        size += b.0.len();
        sigs.extend(sync_sigs(m, doc, &b.0));
        batch.push((doc, b));
    }
    if !batch.is_empty() {
        out.push(Outgoing {
            peer: peer.to_string(),
            bytes: Wire::Sync {
                sid: sid.clone(),
                msgs: batch,
                sigs,
            }
            .encode(),
        });
    }
    out
}
