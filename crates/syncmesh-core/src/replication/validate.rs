//! Validation of what peers send: every change is decoded and checked against the map's
//! layout before anything of its message is applied ([`decode_changes`],
//! [`decode_sync_messages`]), then judged by its author's rights ([`authorize`]). A message
//! that fails the first step is the sender's fault (a [`Violation`]); a change that fails the
//! second is refused and counted, and the sender stays connected.

use std::collections::{HashMap, HashSet};

use automerge::{Change, ChangeHash};

use super::wire::{Bytes, Violation};
use crate::authorship::Signature;
use crate::ids::MapSid;
use crate::map::{check_changes, decode_sync, Checked, DecodedSync, DocAddr, MapReplica};

/// Decodes and checks the changes of a [`super::Wire::Changes`] message: each must decode and
/// fit the map's layout (`check_changes`), or the whole message is refused.
pub fn decode_changes(
    sid: &MapSid,
    docs: Vec<(DocAddr, Vec<Bytes>)>,
) -> Result<Vec<(DocAddr, Vec<Change>, Checked)>, Violation> {
    let mut decoded = Vec::with_capacity(docs.len());
    for (doc, list) in docs {
        let mut cs = Vec::with_capacity(list.len());
        for b in list {
            let c = Change::from_bytes(b.0)
                .map_err(|e| Violation(format!("map {sid}: undecodable change: {e}")))?;
            cs.push(c);
        }
        let checked = check_changes(doc, &cs).map_err(|e| Violation(format!("map {sid}: {e}")))?;
        decoded.push((doc, cs, checked));
    }
    Ok(decoded)
}

/// Decodes and checks the sync messages of a [`super::Wire::Sync`] message, every one before
/// any is applied.
pub fn decode_sync_messages(
    sid: &MapSid,
    msgs: Vec<(DocAddr, Bytes)>,
) -> Result<Vec<(DocAddr, DecodedSync)>, Violation> {
    let mut decoded = Vec::with_capacity(msgs.len());
    for (doc, bytes) in msgs {
        let d = decode_sync(doc, &bytes.0).map_err(|e| Violation(format!("map {sid}: {e}")))?;
        decoded.push((doc, d));
    }
    Ok(decoded)
}

/// What [`authorize`] decided about a batch of changes of one document.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The changes taken.
    pub ok: HashSet<ChangeHash>,
    /// Those whose signature was checked on the way.
    pub verified: HashSet<ChangeHash>,
    /// Changes that cannot be judged yet (their history or the map's permissions have not
    /// arrived): not taken, not held against the sender; they come again.
    pub deferred: HashSet<ChangeHash>,
    /// What deferred changes depend on and this replica lacks: to be asked for. (A change
    /// not taken is unknown to Automerge, whose sync would otherwise never learn that its
    /// dependencies are missing; the sender, believing them held, e.g. from a false positive
    /// of the receiver's Bloom filter, would never send them.)
    pub missing: HashSet<ChangeHash>,
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
    let mut verified = HashSet::new();
    let by_hash: HashMap<ChangeHash, &Change> = changes.iter().map(|c| (c.hash(), c)).collect();
    let mut ok = HashSet::new();
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
    let mut seen = HashSet::new();
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
    let mut bad: HashSet<ChangeHash> = HashSet::new();
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
    let mut later: HashSet<ChangeHash> = capped.iter().copied().collect();
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
    ok: &mut HashSet<ChangeHash>,
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
pub(crate) fn keep_sigs(
    m: &mut MapReplica,
    taken: &[Change],
    sigs: &HashMap<ChangeHash, Signature>,
    verified: &HashSet<ChangeHash>,
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
