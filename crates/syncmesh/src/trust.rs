//! Who this node exchanges maps with: trusted peers, invitations and tickets.
//!
//! Pure logic (time and randomness are passed in); the engine persists what [`TrustBook`]
//! decides and tells the network. The model:
//!
//! - A node exchanges map data only with peers it trusts. Trust comes from a stored record
//!   (made by an invitation, a join, or [`crate::Node::trust`]), from the node's
//!   configuration ([`crate::NodeBuilder::trust`], not stored), from a swarm key (every
//!   holder is trusted) or from `trust_all` (everyone; an isolated lab network).
//! - An invitation is a secret with an expiry, a number of uses and a scope (the maps the
//!   invitee may receive, and whether it may change them). Its [`Ticket`] carries the inviter's
//!   peer id, addresses, the invitation id and the secret. The invitee dials the inviter (the
//!   transport authenticates the inviter's peer id) and sends a [`JoinRequest`] with a proof
//!   bound to both peer ids; the inviter checks it against the invitation, and both sides
//!   store each other as trusted with the invitation's scope.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use syncmesh_core::replication::Grant;
use syncmesh_core::{MapRef, MapSid, Timestamp};
use syncmesh_net::{Multiaddr, PeerId};

/// The prefix of every ticket (and its format version).
pub const TICKET_PREFIX: &str = "smt1";
/// Most addresses a ticket carries.
const MAX_TICKET_ADDRS: usize = 8;
/// Most invitations outstanding at once (expired ones are dropped first).
pub const MAX_INVITES: usize = 1024;
/// Most maps one invitation names.
pub const MAX_INVITE_MAPS: usize = 1024;

/// Why a trust operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The ticket is not one this version of syncmesh can read.
    #[error("not a valid ticket: {0}")]
    BadTicket(String),
    /// The inviter refused the join (unknown, used up, expired or forged invitation).
    #[error("the inviter refused the join: {0}")]
    Refused(String),
    /// The inviter could not be reached or did not answer.
    #[error("could not reach the inviter: {0}")]
    Unreachable(String),
    /// A peer id that does not parse.
    #[error("not a peer id: {0:?}")]
    BadPeerId(String),
    /// A parameter out of range (TTL, uses, maps).
    #[error("{0}")]
    Invalid(String),
    /// The ticket is this node's own.
    #[error("this ticket was issued by this node; give it to another node")]
    OwnTicket,
    /// A join with the same inviter is under way: wait for its answer.
    #[error("a join with this inviter is already under way; wait for its answer")]
    JoinUnderWay,
}

/// What an invitation allows. `Default`: every map, read and write, 10 minutes, one use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteOptions {
    /// Maps the invitee may receive, by unique name or sid; empty for every map.
    pub maps: Vec<String>,
    /// Whether the invitee may change them.
    pub write: bool,
    /// How long the ticket stays valid.
    pub ttl: std::time::Duration,
    /// How many nodes may join with it.
    pub uses: u32,
}

impl Default for InviteOptions {
    fn default() -> Self {
        InviteOptions {
            maps: Vec::new(),
            write: true,
            ttl: std::time::Duration::from_secs(600),
            uses: 1,
        }
    }
}

/// An invitation issued by [`crate::Node::invite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// The ticket to give to the invitee (one copy-pasteable string).
    pub ticket: String,
    /// When it stops being valid.
    pub expires: Timestamp,
    /// The maps it shares (`None`: every map).
    pub maps: Option<Vec<MapSid>>,
    /// Whether the invitee may change them.
    pub write: bool,
    /// How many nodes may join with it.
    pub uses: u32,
}

/// How a peer came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustSource {
    /// It joined with a ticket this node issued.
    Invited,
    /// This node joined it with its ticket.
    Joined,
    /// Trusted by hand ([`crate::Node::trust`], `POST /v1/Node/Peers/{id}`).
    Manual,
    /// In the node's configuration (`--trust`, [`crate::NodeBuilder::trust`]); not stored.
    Config,
}

impl TrustSource {
    /// The source as a word (`invited`, `joined`, `manual`, `config`).
    pub fn as_str(self) -> &'static str {
        match self {
            TrustSource::Invited => "invited",
            TrustSource::Joined => "joined",
            TrustSource::Manual => "manual",
            TrustSource::Config => "config",
        }
    }
}

/// A trusted peer, as this node records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRecord {
    /// Its peer id.
    pub peer_id: String,
    /// Addresses to dial it at (kept dialed, with backoff).
    pub addrs: Vec<String>,
    /// Since when (ms since the epoch).
    pub since_ms: i64,
    /// How.
    pub source: TrustSource,
    /// The maps it may receive (sids); `None` for every map.
    pub maps: Option<Vec<String>>,
    /// Whether it may change them.
    pub write: bool,
    /// Not trusted although everyone else is (untrusted by hand in a `trust_all` or swarm-key
    /// mesh): a record that denies.
    #[serde(default)]
    pub denied: bool,
    /// Whether that peer takes this node's changes, as it answered when this node joined it
    /// with a ticket (`None`: not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takes_our_writes: Option<bool>,
}

impl TrustRecord {
    /// What the record allows, for replication.
    pub fn grant(&self) -> Grant {
        Grant {
            maps: self.maps.as_ref().map(|m| {
                m.iter()
                    .filter_map(|s| MapSid::parse(s))
                    .collect::<BTreeSet<_>>()
            }),
            write: self.write,
        }
    }

    /// The record's addresses that parse.
    pub fn multiaddrs(&self) -> Vec<Multiaddr> {
        self.addrs.iter().filter_map(|a| a.parse().ok()).collect()
    }
}

/// A trusted peer, as [`crate::Node::peers`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedPeer {
    /// Its peer id.
    pub peer_id: String,
    /// Addresses it is dialed at.
    pub addrs: Vec<String>,
    /// Since when it is trusted (0 for configured peers).
    pub since: Timestamp,
    /// How it came to be trusted.
    pub source: TrustSource,
    /// The maps it may receive (`None`: every map).
    pub maps: Option<Vec<MapSid>>,
    /// Whether it may change them.
    pub write: bool,
    /// Whether it is connected now.
    pub connected: bool,
    /// Changes it sent that were refused (it may not write the map) since this node started.
    pub refused_changes: u64,
    /// Whether it takes this node's changes, as it answered when this node joined it with a
    /// ticket (`Some(false)`: a read-only invitation, so this node's writes stay here); `None`
    /// when not known.
    pub takes_our_writes: Option<bool>,
}

/// A peer found on the local network (mDNS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredPeer {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses it announced.
    pub addrs: Vec<String>,
    /// When it was last seen.
    pub last_seen: Timestamp,
    /// Whether it is trusted (then it is dialed; otherwise only listed).
    pub trusted: bool,
}

/// The latest reason a peer (or address) is not exchanging data with this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProblem {
    /// The peer, when known.
    pub peer_id: Option<String>,
    /// The address, when that is what failed.
    pub addr: Option<String>,
    /// What happened (not trusted, unreachable, wrong swarm key, refused change, ...).
    pub reason: String,
    /// When.
    pub at: Timestamp,
}

/// Who this node exchanges data with, and why not with the others ([`crate::Node::peers`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Peers {
    /// Whether the node is on a network at all.
    pub networked: bool,
    /// Whether every peer that connects is trusted (`trust_all`, or a swarm key).
    pub trusts_everyone: bool,
    /// Trusted peers (stored and configured).
    pub trusted: Vec<TrustedPeer>,
    /// Trusted peers connected now (the ones data is exchanged with).
    pub connected: Vec<String>,
    /// Peers connected now that are not trusted (nothing is exchanged with them).
    pub untrusted: Vec<String>,
    /// Peers found by mDNS.
    pub discovered: Vec<DiscoveredPeer>,
    /// The latest problem per peer or address, newest first.
    pub problems: Vec<PeerProblem>,
    /// Changes refused from peers without write access since this node started.
    pub refused_changes: u64,
}

/// An invitation as the inviter stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteRecord {
    /// Its id (also in the ticket).
    pub id: [u8; 8],
    /// Its secret (also in the ticket).
    pub secret: [u8; 16],
    /// When it expires (ms since the epoch).
    pub expires_ms: i64,
    /// Joins left.
    pub uses_left: u32,
    /// The maps it shares (sids); `None` for every map.
    pub maps: Option<Vec<String>>,
    /// Whether the invitee may change them.
    pub write: bool,
}

/// A ticket: how to reach the inviter, and the invitation's id and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The inviter.
    pub peer: PeerId,
    /// Where to dial it.
    pub addrs: Vec<Multiaddr>,
    /// The invitation.
    pub id: [u8; 8],
    /// Its secret.
    pub secret: [u8; 16],
}

impl Ticket {
    /// The ticket as one copy-pasteable string (`smt1` then lowercase base32).
    pub fn encode(&self) -> String {
        let mut b = vec![1u8];
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.secret);
        let peer = self.peer.to_bytes();
        b.push(u8::try_from(peer.len()).unwrap_or(0));
        b.extend_from_slice(&peer);
        let addrs: Vec<Vec<u8>> = self
            .addrs
            .iter()
            .map(|a| a.to_vec())
            .filter(|a| a.len() <= 255)
            .take(MAX_TICKET_ADDRS)
            .collect();
        b.push(u8::try_from(addrs.len()).unwrap_or(0));
        for a in addrs {
            b.push(u8::try_from(a.len()).unwrap_or(0));
            b.extend_from_slice(&a);
        }
        format!(
            "{TICKET_PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
        )
    }

    /// Reads a ticket; surrounding white space is ignored.
    pub fn parse(s: &str) -> Result<Ticket, TrustError> {
        let bad = |w: &str| TrustError::BadTicket(w.to_string());
        let s = s.trim();
        let body = s
            .strip_prefix(TICKET_PREFIX)
            .ok_or_else(|| bad("a ticket starts with \"smt1\""))?;
        if body.len() > 4096 {
            return Err(bad("too long"));
        }
        let b = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad("damaged (not base32): was it copied whole?"))?;
        let mut r = Reader { b: &b, at: 0 };
        if r.take(1).ok_or_else(|| bad("truncated"))? != [1] {
            return Err(bad("an unknown ticket version"));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(r.take(8).ok_or_else(|| bad("truncated"))?);
        let mut secret = [0u8; 16];
        secret.copy_from_slice(r.take(16).ok_or_else(|| bad("truncated"))?);
        let n = usize::from(r.byte().ok_or_else(|| bad("truncated"))?);
        let peer = PeerId::from_bytes(r.take(n).ok_or_else(|| bad("truncated"))?)
            .map_err(|_| bad("its peer id is malformed"))?;
        let count = usize::from(r.byte().ok_or_else(|| bad("truncated"))?);
        if count > MAX_TICKET_ADDRS {
            return Err(bad("too many addresses"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let n = usize::from(r.byte().ok_or_else(|| bad("truncated"))?);
            let a = r.take(n).ok_or_else(|| bad("truncated"))?;
            addrs
                .push(Multiaddr::try_from(a.to_vec()).map_err(|_| bad("an address is malformed"))?);
        }
        if r.at != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Ticket {
            peer,
            addrs,
            id,
            secret,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
}

/// Proves knowledge of an invitation's secret, bound to both peers (a proof overheard or
/// replayed by another peer is worthless).
pub fn join_proof(secret: &[u8; 16], joiner: &PeerId, inviter: &PeerId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"syncmesh-join/1");
    h.update(secret);
    h.update(joiner.to_bytes());
    h.update(inviter.to_bytes());
    h.finalize().into()
}

/// What an invitee sends the inviter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The invitation id.
    #[serde(with = "hexbytes8")]
    pub invite: [u8; 8],
    /// [`join_proof`], hex.
    pub proof: String,
    /// Where the invitee can be dialed.
    pub addrs: Vec<String>,
}

/// What the inviter answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinResponse {
    /// Trusted: the maps shared (sids; `None` for every map) and whether the invitee may write.
    Accepted {
        /// The maps shared.
        maps: Option<Vec<String>>,
        /// Whether the invitee may change them.
        write: bool,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
    },
}

mod hexbytes8 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 8], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; 8]>::try_from(v.as_slice()).map_err(|_| serde::de::Error::custom("8 bytes"))
    }
}

/// What to store after a trust decision: records to write or delete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TrustWrites {
    /// Trust records by peer id (`None`: delete).
    pub trust: Vec<(String, Option<TrustRecord>)>,
    /// Invitation records by id (`None`: delete).
    pub invites: Vec<([u8; 8], Option<InviteRecord>)>,
}

/// The trust state of a node: stored records, configured peers, invitations.
#[derive(Debug, Default, Clone)]
pub struct TrustBook {
    records: BTreeMap<String, TrustRecord>,
    config: BTreeSet<String>,
    invites: BTreeMap<[u8; 8], InviteRecord>,
}

impl TrustBook {
    /// A book from stored records and configured peer ids.
    pub fn new(
        records: Vec<TrustRecord>,
        invites: Vec<InviteRecord>,
        config: impl IntoIterator<Item = String>,
    ) -> TrustBook {
        TrustBook {
            records: records
                .into_iter()
                .map(|r| (r.peer_id.clone(), r))
                .collect(),
            config: config.into_iter().collect(),
            invites: invites.into_iter().map(|i| (i.id, i)).collect(),
        }
    }

    /// Whether `peer` is trusted (by a record or the configuration).
    pub fn trusts(&self, peer: &str) -> bool {
        match self.records.get(peer) {
            Some(r) => !r.denied,
            None => self.config.contains(peer),
        }
    }

    /// Whether `peer` is denied (untrusted by hand where everyone else is trusted).
    pub fn denies(&self, peer: &str) -> bool {
        self.records.get(peer).is_some_and(|r| r.denied)
    }

    /// Peers denied by hand (see [`TrustRecord::denied`]).
    pub fn denied(&self) -> Vec<String> {
        self.records
            .values()
            .filter(|r| r.denied)
            .map(|r| r.peer_id.clone())
            .collect()
    }

    /// Every trusted peer: stored records, then configured peers without one.
    pub fn trusted(&self) -> Vec<TrustRecord> {
        let mut out: Vec<TrustRecord> = self
            .records
            .values()
            .filter(|r| !r.denied)
            .cloned()
            .collect();
        for p in &self.config {
            if !self.records.contains_key(p) {
                out.push(TrustRecord {
                    peer_id: p.clone(),
                    addrs: Vec::new(),
                    since_ms: 0,
                    source: TrustSource::Config,
                    maps: None,
                    write: true,
                    denied: false,
                    takes_our_writes: None,
                });
            }
        }
        out
    }

    /// What `peer` may do (full access for a configured peer without a record).
    pub fn grant(&self, peer: &str) -> Option<Grant> {
        match self.records.get(peer) {
            Some(r) if r.denied => None,
            Some(r) => Some(r.grant()),
            None => self.config.contains(peer).then(Grant::full),
        }
    }

    /// Trusts `peer` by hand (every map, read and write, unless a record says otherwise: an
    /// existing record keeps its scope and gains the addresses).
    pub fn trust(&mut self, peer: &PeerId, addrs: Vec<String>, now: Timestamp) -> TrustWrites {
        let key = peer.to_string();
        let rec = match self.records.get(&key).filter(|r| !r.denied) {
            Some(r) => {
                let mut r = r.clone();
                for a in addrs {
                    if !r.addrs.contains(&a) {
                        r.addrs.push(a);
                    }
                }
                r
            }
            None => TrustRecord {
                peer_id: key.clone(),
                addrs,
                since_ms: now.millis(),
                source: TrustSource::Manual,
                maps: None,
                write: true,
                denied: false,
                takes_our_writes: None,
            },
        };
        self.records.insert(key.clone(), rec.clone());
        TrustWrites {
            trust: vec![(key, Some(rec))],
            invites: Vec::new(),
        }
    }

    /// Stops trusting `peer` (its record, and its configured trust until restart). Where
    /// everyone is trusted (`everyone`: `trust_all` or a swarm key) a record that denies it is
    /// stored instead. Returns whether it was trusted.
    pub fn untrust(&mut self, peer: &str, everyone: bool, now: Timestamp) -> (bool, TrustWrites) {
        let was = if everyone {
            !self.denies(peer)
        } else {
            self.trusts(peer)
        };
        let stored = self.records.remove(peer).is_some();
        self.config.remove(peer);
        let mut writes = TrustWrites::default();
        if everyone {
            let rec = TrustRecord {
                peer_id: peer.to_string(),
                addrs: Vec::new(),
                since_ms: now.millis(),
                source: TrustSource::Manual,
                maps: Some(Vec::new()),
                write: false,
                denied: true,
                takes_our_writes: None,
            };
            self.records.insert(peer.to_string(), rec.clone());
            writes.trust.push((peer.to_string(), Some(rec)));
        } else if stored {
            writes.trust.push((peer.to_string(), None));
        }
        (was, writes)
    }

    /// A new invitation (the id and secret come from the caller's randomness).
    pub fn invite(
        &mut self,
        opts: &InviteOptions,
        id: [u8; 8],
        secret: [u8; 16],
        now: Timestamp,
    ) -> Result<(InviteRecord, TrustWrites), TrustError> {
        if opts.uses == 0 {
            return Err(TrustError::Invalid("Uses must be at least 1".into()));
        }
        let ttl_ms = i64::try_from(opts.ttl.as_millis()).unwrap_or(i64::MAX);
        if !(1000..=365 * 24 * 3600 * 1000).contains(&ttl_ms) {
            return Err(TrustError::Invalid(
                "Ttl must be between 1 second and 365 days".into(),
            ));
        }
        if opts.maps.len() > MAX_INVITE_MAPS {
            return Err(TrustError::Invalid(format!(
                "an invitation names at most {MAX_INVITE_MAPS} maps"
            )));
        }
        let maps = if opts.maps.is_empty() {
            None
        } else {
            let mut sids = BTreeSet::new();
            for m in &opts.maps {
                let r = MapRef::parse(m).map_err(|e| TrustError::Invalid(e.to_string()))?;
                sids.insert(r.sid().to_string());
            }
            Some(sids.into_iter().collect())
        };
        let mut writes = TrustWrites::default();
        // Expired invitations go first; then, if still full, the oldest to expire.
        let expired: Vec<[u8; 8]> = self
            .invites
            .values()
            .filter(|i| i.expires_ms <= now.millis())
            .map(|i| i.id)
            .collect();
        for id in expired {
            self.invites.remove(&id);
            writes.invites.push((id, None));
        }
        while self.invites.len() >= MAX_INVITES {
            let Some(oldest) = self
                .invites
                .values()
                .min_by_key(|i| i.expires_ms)
                .map(|i| i.id)
            else {
                break;
            };
            self.invites.remove(&oldest);
            writes.invites.push((oldest, None));
        }
        let rec = InviteRecord {
            id,
            secret,
            expires_ms: now.millis().saturating_add(ttl_ms),
            uses_left: opts.uses,
            maps,
            write: opts.write,
        };
        self.invites.insert(id, rec.clone());
        writes.invites.push((id, Some(rec.clone())));
        Ok((rec, writes))
    }

    /// Checks a join request from `joiner` against this node's invitations. On success the
    /// joiner is trusted with the invitation's scope and one use is spent.
    pub fn accept_join(
        &mut self,
        req: &JoinRequest,
        joiner: &PeerId,
        me: &PeerId,
        now: Timestamp,
    ) -> Result<(TrustRecord, TrustWrites), TrustError> {
        let refused = |w: &str| TrustError::Refused(w.to_string());
        let Some(inv) = self.invites.get(&req.invite).cloned() else {
            return Err(refused(
                "unknown invitation (used up, expired and removed, or never issued here)",
            ));
        };
        let expected = join_proof(&inv.secret, joiner, me);
        let given = hex::decode(&req.proof).unwrap_or_default();
        if given.len() != expected.len() || !constant_time_eq(&given, &expected) {
            return Err(refused(
                "the ticket's secret does not match (a forged ticket?)",
            ));
        }
        let mut writes = TrustWrites::default();
        if inv.expires_ms <= now.millis() {
            self.invites.remove(&inv.id);
            writes.invites.push((inv.id, None));
            return Err(refused("the ticket has expired"));
        }
        let mut inv2 = inv.clone();
        inv2.uses_left = inv2.uses_left.saturating_sub(1);
        if inv2.uses_left == 0 {
            self.invites.remove(&inv.id);
            writes.invites.push((inv.id, None));
        } else {
            self.invites.insert(inv.id, inv2.clone());
            writes.invites.push((inv.id, Some(inv2)));
        }
        let key = joiner.to_string();
        let mut addrs: Vec<String> = req
            .addrs
            .iter()
            .filter(|a| a.len() <= 256 && a.parse::<Multiaddr>().is_ok())
            .take(MAX_TICKET_ADDRS)
            .cloned()
            .collect();
        addrs.dedup();
        let configured = self.config.contains(&key) && !self.records.contains_key(&key);
        let rec = match self.records.get(&key).filter(|r| !r.denied) {
            // Already trusted: widen to the union of what the invitations allow.
            Some(old) => TrustRecord {
                addrs,
                maps: match (&old.maps, &inv.maps) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => {
                        let u: BTreeSet<String> = a.iter().chain(b).cloned().collect();
                        Some(u.into_iter().collect())
                    }
                },
                write: old.write || inv.write,
                ..old.clone()
            },
            None => TrustRecord {
                peer_id: key.clone(),
                addrs,
                since_ms: now.millis(),
                source: TrustSource::Invited,
                // A configured peer already has every map: a ticket does not narrow that.
                maps: if configured { None } else { inv.maps.clone() },
                write: inv.write || configured,
                denied: false,
                takes_our_writes: None,
            },
        };
        self.records.insert(key.clone(), rec.clone());
        writes.trust.push((key, Some(rec.clone())));
        Ok((rec, writes))
    }

    /// Records the inviter as trusted after it accepted this node's join.
    pub fn joined(
        &mut self,
        ticket: &Ticket,
        maps: Option<Vec<String>>,
        takes_our_writes: bool,
        now: Timestamp,
    ) -> (TrustRecord, TrustWrites) {
        let key = ticket.peer.to_string();
        // The inviter gets the same scope back: what the invitation shares is shared both ways,
        // and the invitee accepts the inviter's changes to it. Trust it had already is not
        // narrowed.
        let scoped: Option<Vec<String>> = maps.map(|m| {
            m.into_iter()
                .filter(|s| MapSid::parse(s).is_some())
                .take(MAX_INVITE_MAPS)
                .collect()
        });
        let old = self.records.get(&key).filter(|r| !r.denied);
        let full_before = self.config.contains(&key) || old.is_some_and(|r| r.maps.is_none());
        let maps = match (full_before, old.and_then(|r| r.maps.clone()), scoped) {
            (true, _, _) | (_, _, None) => None,
            (false, Some(a), Some(b)) => {
                let u: BTreeSet<String> = a.into_iter().chain(b).collect();
                Some(u.into_iter().collect())
            }
            (false, None, Some(b)) => Some(b),
        };
        let rec = TrustRecord {
            peer_id: key.clone(),
            addrs: ticket.addrs.iter().map(ToString::to_string).collect(),
            since_ms: old.map_or(now.millis(), |r| r.since_ms),
            source: TrustSource::Joined,
            maps,
            write: true,
            denied: false,
            takes_our_writes: Some(takes_our_writes),
        };
        self.records.insert(key.clone(), rec.clone());
        (
            rec.clone(),
            TrustWrites {
                trust: vec![(key, Some(rec))],
                invites: Vec::new(),
            },
        )
    }

    /// Invitations still outstanding (not expired at `now`).
    pub fn invites(&self, now: Timestamp) -> Vec<&InviteRecord> {
        self.invites
            .values()
            .filter(|i| i.expires_ms > now.millis())
            .collect()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn peer() -> PeerId {
        syncmesh_net::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn tickets_round_trip_and_damaged_ones_are_refused() {
        let tk = Ticket {
            peer: peer(),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/7701".parse().unwrap(),
                "/ip6/::1/udp/7701/quic-v1".parse().unwrap(),
            ],
            id: [1; 8],
            secret: [2; 16],
        };
        let s = tk.encode();
        assert!(s.starts_with("smt1"));
        assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        assert_eq!(Ticket::parse(&format!("  {s}\n")).unwrap(), tk);
        assert_eq!(
            Ticket::parse(&s.to_uppercase().replacen("SMT1", "smt1", 1)).unwrap(),
            tk
        );
        for bad in [
            String::new(),
            "smt1".to_string(),
            s[..s.len() - 5].to_string(),
            format!("{s}aa"),
            s.replacen("smt1", "smt2", 1),
            format!("smt1{}", "!".repeat(20)),
            format!("smt1{}", "a".repeat(5000)),
        ] {
            assert!(
                matches!(Ticket::parse(&bad), Err(TrustError::BadTicket(_))),
                "{bad:?}"
            );
        }
    }

    fn book_with_invite(opts: &InviteOptions) -> (TrustBook, InviteRecord) {
        let mut b = TrustBook::default();
        let (rec, w) = b.invite(opts, [7; 8], [9; 16], t(1_000)).unwrap();
        assert_eq!(w.invites.len(), 1);
        (b, rec)
    }

    fn request(rec: &InviteRecord, joiner: &PeerId, me: &PeerId) -> JoinRequest {
        JoinRequest {
            invite: rec.id,
            proof: hex::encode(join_proof(&rec.secret, joiner, me)),
            addrs: vec!["/ip4/10.0.0.2/tcp/7701".into(), "not an address".into()],
        }
    }

    #[test]
    fn an_invitation_works_for_its_uses_then_is_used_up() {
        let me = peer();
        let (mut b, rec) = book_with_invite(&InviteOptions {
            uses: 2,
            maps: vec!["users".into()],
            write: false,
            ..InviteOptions::default()
        });
        let (j1, j2, j3) = (peer(), peer(), peer());
        let (r1, w1) = b
            .accept_join(&request(&rec, &j1, &me), &j1, &me, t(2_000))
            .unwrap();
        assert_eq!(r1.source, TrustSource::Invited);
        assert_eq!(r1.maps, Some(vec![MapSid::for_name("users").to_string()]));
        assert!(!r1.write);
        assert_eq!(r1.addrs, vec!["/ip4/10.0.0.2/tcp/7701".to_string()]);
        assert_eq!(w1.invites[0].1.as_ref().unwrap().uses_left, 1);
        assert!(b.trusts(&j1.to_string()));
        let g = b.grant(&j1.to_string()).unwrap();
        assert!(g.reads(&MapSid::for_name("users")) && !g.writes(&MapSid::for_name("users")));
        assert!(!g.reads(&MapSid::for_name("other")));
        let (_, w2) = b
            .accept_join(&request(&rec, &j2, &me), &j2, &me, t(2_000))
            .unwrap();
        assert_eq!(w2.invites, vec![(rec.id, None)], "the last use removes it");
        let e = b.accept_join(&request(&rec, &j3, &me), &j3, &me, t(2_000));
        assert!(matches!(e, Err(TrustError::Refused(_))), "{e:?}");
        assert!(!b.trusts(&j3.to_string()));
    }

    #[test]
    fn expired_forged_and_stolen_proofs_are_refused_and_trust_nobody() {
        let me = peer();
        let (mut b, rec) = book_with_invite(&InviteOptions::default());
        let j = peer();
        // Forged: the right id, a wrong secret.
        let mut forged = rec.clone();
        forged.secret = [0; 16];
        let e = b.accept_join(&request(&forged, &j, &me), &j, &me, t(2_000));
        assert!(
            matches!(e, Err(TrustError::Refused(ref r)) if r.contains("forged")),
            "{e:?}"
        );
        // A proof made for another joiner does not work for this one.
        let other = peer();
        let e = b.accept_join(&request(&rec, &other, &me), &j, &me, t(2_000));
        assert!(e.is_err());
        // Expired (the TTL is 600 s from t=1 s).
        let e = b.accept_join(&request(&rec, &j, &me), &j, &me, t(601_001));
        assert!(
            matches!(e, Err(TrustError::Refused(ref r)) if r.contains("expired")),
            "{e:?}"
        );
        assert!(!b.trusts(&j.to_string()));
        // And it is gone.
        let e = b.accept_join(&request(&rec, &j, &me), &j, &me, t(2_000));
        assert!(
            matches!(e, Err(TrustError::Refused(ref r)) if r.contains("unknown")),
            "{e:?}"
        );
    }

    #[test]
    fn invitation_parameters_are_checked() {
        let mut b = TrustBook::default();
        for opts in [
            InviteOptions {
                uses: 0,
                ..InviteOptions::default()
            },
            InviteOptions {
                ttl: std::time::Duration::from_millis(10),
                ..InviteOptions::default()
            },
            InviteOptions {
                maps: vec![String::new()],
                ..InviteOptions::default()
            },
        ] {
            assert!(matches!(
                b.invite(&opts, [1; 8], [1; 16], t(0)),
                Err(TrustError::Invalid(_))
            ));
        }
        assert!(b.invites(t(0)).is_empty());
    }

    #[test]
    fn manual_and_configured_trust_and_untrust() {
        let p = peer();
        let q = peer();
        let mut b = TrustBook::new(Vec::new(), Vec::new(), [q.to_string()]);
        assert!(b.trusts(&q.to_string()) && !b.trusts(&p.to_string()));
        let w = b.trust(&p, vec!["/ip4/1.2.3.4/tcp/1".into()], t(5));
        assert_eq!(w.trust.len(), 1);
        assert_eq!(b.trusted().len(), 2);
        assert_eq!(b.grant(&p.to_string()), Some(Grant::full()));
        let (was, w) = b.untrust(&p.to_string(), false, t(6));
        assert!(was);
        assert_eq!(w.trust, vec![(p.to_string(), None)]);
        let (was, w) = b.untrust(&q.to_string(), false, t(6));
        assert!(was && w.trust.is_empty(), "configured trust is not stored");
        assert!(b.trusted().is_empty());
        let (was, _) = b.untrust(&q.to_string(), false, t(6));
        assert!(!was);
        // Where everyone is trusted, untrusting stores a denial; trusting lifts it.
        let (was, w) = b.untrust(&p.to_string(), true, t(7));
        assert!(was && b.denies(&p.to_string()) && !b.trusts(&p.to_string()));
        assert!(w.trust[0].1.as_ref().is_some_and(|r| r.denied));
        assert_eq!(b.denied(), vec![p.to_string()]);
        assert!(b.grant(&p.to_string()).is_none() && b.trusted().is_empty());
        b.trust(&p, vec![], t(8));
        assert!(b.trusts(&p.to_string()) && !b.denies(&p.to_string()));
    }

    #[test]
    fn join_messages_are_json() {
        let r = JoinRequest {
            invite: [1, 2, 3, 4, 5, 6, 7, 8],
            proof: "ab".into(),
            addrs: vec![],
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("0102030405060708"), "{s}");
        assert_eq!(serde_json::from_str::<JoinRequest>(&s).unwrap(), r);
        let a = JoinResponse::Accepted {
            maps: None,
            write: true,
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<JoinResponse>(&s).unwrap(), a);
    }
}
