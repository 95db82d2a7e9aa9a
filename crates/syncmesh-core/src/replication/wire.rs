//! What travels between two nodes: the messages, their encoding, and every size limit of the
//! protocol. The network crate takes its frame limits from here ([`MAX_DIRECT_MESSAGE`],
//! [`MAX_DIRECT_BATCH`], [`MAX_DIRECT_COUNT`]), so the two cannot disagree.

use std::collections::HashMap;

use automerge::{Change, ChangeHash};
use serde::{Deserialize, Serialize};

use crate::authorship::Signature;
use crate::ids::MapSid;
use crate::map::DocAddr;

/// Largest direct message a peer may send (a batch of sync messages of one map).
pub const MAX_DIRECT_MESSAGE: usize = 16 << 20;
/// Largest gossip message (the changes of one commit of one map); larger commits are
/// announced with [`Wire::Docs`] instead and travel by sync.
pub const MAX_GOSSIP_MESSAGE: usize = 1 << 20;
/// Largest batch of direct messages one request carries (the network delivers a peer's
/// messages in batches).
pub const MAX_DIRECT_BATCH: usize = 2 * MAX_DIRECT_MESSAGE;
/// Most direct messages in one batch.
pub const MAX_DIRECT_COUNT: usize = 4096;
/// Sync messages are batched up to about this many bytes per direct message: small enough
/// that a node catching up merges, stores and publishes in slices (its engine takes about
/// this much of peers' messages per round) rather than one pause of the whole catch-up.
pub const SYNC_BATCH_BYTES: usize = 256 << 10;
/// Maps a hold-all node starts holding per Hello (the rest follow in later rounds), so one
/// message cannot make it create unbounded replicas.
pub const MAX_ADOPT_PER_HELLO: usize = 64;
/// "Not here" answers sent for one Hello: a node fetching maps asks for a few at a time, and
/// a Hello naming many unknown maps must not make this node send as many messages.
pub const MAX_NOT_HERE_PER_HELLO: usize = 64;

/// A message between two nodes. Encoded with `postcard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// Maps the sender holds, each with its [`crate::MapReplica::digest`] (0: holds nothing yet).
    Hello {
        /// Whether the sender holds every map it hears of.
        hold_all: bool,
        /// `(map, digest)` pairs.
        maps: Vec<(MapSid, u64)>,
    },
    /// The sender's document digests of one map ([`crate::MapReplica::doc_digests`]).
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
    /// ([`crate::MapReplica::unsigned`]): at most [`MAX_SIGS_ASKED`] hashes.
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

/// Changes remembered per map as offered to a peer that may not write it (so a reply goes
/// only with something new); past this the memory starts afresh rather than growing with
/// every write of a long session.
pub const MAX_OFFERED_REMEMBERED: usize = 16_384;

/// Most signatures asked for in one [`Wire::WantSigs`].
pub const MAX_SIGS_ASKED: usize = 1024;

/// `(change hash, signature)` pairs carried with changes.
pub type Sigs = Vec<(Bytes, Signature)>;

/// The signatures of a message by change hash; `None` if one is malformed.
pub(crate) fn sig_map(sigs: Sigs) -> Option<HashMap<ChangeHash, Signature>> {
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

/// A [`Wire::WantSigs`] for `hashes`; `None` if there are none.
pub(crate) fn want_sigs(sid: &MapSid, hashes: Vec<ChangeHash>) -> Option<Vec<u8>> {
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

/// The maps a message is about.
pub(crate) fn msg_sids(w: &Wire) -> Vec<MapSid> {
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

/// Whether a document list names each document at most once, within the map's layout.
pub(crate) fn docs_well_formed(docs: &[(DocAddr, u64)]) -> bool {
    docs.len() <= usize::from(crate::layout::SHARDS) + 1
        && docs.iter().all(|(d, _)| match d {
            DocAddr::Meta => true,
            DocAddr::Shard { index, .. } => *index < crate::layout::SHARDS,
        })
}

/// Milliseconds between two fetches of a map document from one peer caused by deferred
/// gossip.
pub const META_FETCH_INTERVAL: i64 = 1000;

/// Encodes local changes of one map as [`Wire::Changes`] messages (each at most
/// [`MAX_GOSSIP_MESSAGE`]), each change with its signature if `sigs` has it. Returns the
/// messages, and whether some change was too large for one (it travels by sync instead).
pub fn changes_messages(
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
