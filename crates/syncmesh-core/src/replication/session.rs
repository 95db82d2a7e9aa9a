//! Automerge sync sessions with one peer: starting them for the documents whose digests
//! differ, and packing their messages into direct messages of a bounded size.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::sync;
use automerge::Change;

use super::peer::{PeerKey, PeerState};
use super::wire::{
    Bytes, Sigs, Wire, MAX_DIRECT_MESSAGE, MAX_OFFERED_REMEMBERED, SYNC_BATCH_BYTES,
};
use super::Outgoing;
use crate::ids::{MapSid, Timestamp};
use crate::map::{DocAddr, MapReplica};

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
pub(crate) fn offers_something_new(
    offered: &mut HashMap<MapSid, HashSet<automerge::ChangeHash>>,
    sid: &MapSid,
    msg: &[u8],
) -> bool {
    let Ok(m) = sync::Message::decode(msg) else {
        return false;
    };
    let hashes = m
        .changes
        .iter()
        .filter_map(|chunk| Change::from_bytes(chunk.to_vec()).ok())
        .map(|c| c.hash());
    note_offered(offered, sid, hashes)
}

/// Notes changes offered to a peer; true if one was not offered before. What is remembered
/// is bounded ([`MAX_OFFERED_REMEMBERED`] per map): past it the memory starts afresh, at the
/// cost of offering a change again, rather than growing with every write of a long session.
fn note_offered(
    offered: &mut HashMap<MapSid, HashSet<automerge::ChangeHash>>,
    sid: &MapSid,
    hashes: impl IntoIterator<Item = automerge::ChangeHash>,
) -> bool {
    let seen = offered.entry(sid.clone()).or_default();
    let mut new = false;
    for h in hashes {
        if seen.len() >= MAX_OFFERED_REMEMBERED && !seen.contains(&h) {
            seen.clear();
        }
        new |= seen.insert(h);
    }
    new
}

/// The map document's digest in a document list.
pub(crate) fn meta_digest(docs: &[(DocAddr, u64)]) -> Option<u64> {
    docs.iter()
        .find(|(d, _)| *d == DocAddr::Meta)
        .map(|(_, h)| *h)
}

/// Starts (fresh) sync sessions with a peer for every document of `sid` whose digests differ,
/// the map document alone first when it differs.
pub(crate) fn start_sessions<P: PeerKey>(
    peer: &P,
    p: &mut PeerState,
    sid: &MapSid,
    m: &mut MapReplica,
    now: Timestamp,
) -> Vec<Outgoing<P>> {
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
    let refused_peer = !(p.grant.writes(sid) && m.policy().manages(peer.as_ref()));
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
/// a receiver takes a change that the changes it took depend on (see [`super::authorize`]), so
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
pub(crate) fn batch_sync<P: PeerKey>(
    peer: &P,
    sid: &MapSid,
    msgs: Vec<(DocAddr, Bytes)>,
    m: &MapReplica,
) -> Vec<Outgoing<P>> {
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
                        peer: peer.clone(),
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
                peer: peer.clone(),
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
            peer: peer.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_offered_to_a_peer_is_remembered_within_a_bound() {
        let mut offered = HashMap::new();
        let sid = MapSid::for_name("m");
        let hash = |i: u32| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            automerge::ChangeHash(h)
        };
        assert!(note_offered(&mut offered, &sid, [hash(1)]));
        assert!(
            !note_offered(&mut offered, &sid, [hash(1)]),
            "offered before"
        );
        for i in 0..(MAX_OFFERED_REMEMBERED as u32 * 3) {
            note_offered(&mut offered, &sid, [hash(i)]);
            assert!(offered[&sid].len() <= MAX_OFFERED_REMEMBERED);
        }
    }
}
