//! History generations of a document (issue 17): a document's history is cut by replacing it
//! with a new *generation* that starts from the state at agreed heads, and changes the cut did
//! not include (late ones) are *carried* onto the new generation.
//!
//! Everything here is deterministic: every replica that holds the state at the cut heads
//! builds the same first changes of the new generation, byte for byte, and every replica that
//! holds a late change carries it to the same bytes. Replicas therefore need to agree on
//! nothing but the cut heads; a change carried by several replicas is applied once (Automerge
//! takes a change it already has as a no-op).
//!
//! - **Genesis.** Generation `g` of a document begins with one change (actor [`genesis_actor`],
//!   time 0, no dependencies) that writes the winning value of every root key at the cut heads
//!   in key order, and the [`CutRecord`] under [`CUT_KEY`]; each value that lost a conflict at
//!   the cut gets a change of its own, also without dependencies, by an actor that sorts below
//!   the first one and by the loser's rank, so every conflict survives the cut with the same
//!   winner and the same order of the others (Automerge orders concurrent values by operation
//!   counter, then actor).
//! - **Carrying.** A late change is redone on the new generation as one change by an actor
//!   derived from its [`Origin`] (the change it first was, in whatever generation), at the
//!   same time, with the origin in its message; it writes, for every root key the late change
//!   touched, the key's value right after it (or deletes the key). Its dependencies are the
//!   carried forms of the late change's dependencies, and the new generation's first changes
//!   for dependencies the cut included. So a late change supersedes what the cut held for the
//!   keys it wrote (as if made just after the cut), later late changes of one writer still
//!   supersede earlier ones, and a write made on the new generation after the cut is
//!   concurrent with it, as it was.
//!
//! What the cut included is told by a [`Clock`] (each actor's greatest sequence number among
//! the changes the cut heads hold): a change is included iff its actor's clock entry reaches
//! its sequence number. The clock is recorded in the genesis, so a replica that was away can
//! tell its own late changes even when it lacks some of the changes the cut included.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{Error, Result};

/// Root key of a generation's [`CutRecord`], written by its first change. It is not a slot of
/// the map layout: readers of items ignore it.
pub const CUT_KEY: &str = "!cut";

/// Prefix of the message of a carried change, followed by its origin.
const CARRY_PREFIX: &str = "syncmesh-carry/1 ";

fn am_err(what: &str) -> impl Fn(automerge::AutomergeError) -> Error + '_ {
    move |e| Error::Corrupt(format!("{what}: automerge: {e}"))
}

/// A 16-byte actor id: `tag` followed by 15 bytes of a hash of `parts`. The tag orders the
/// kinds of derived actors among themselves and against node actors.
fn derived_actor(tag: u8, parts: &[&[u8]]) -> ActorId {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut a = [0u8; 16];
    a[0] = tag;
    a[1..].copy_from_slice(&d[..15]);
    ActorId::from(&a[..])
}

/// The actor of the first change of generation `gen` of the document named `seed` (the map,
/// incarnation and shard, say). It sorts above every other actor of the generation's genesis,
/// so its values win the conflicts the cut preserves.
pub fn genesis_actor(seed: &[u8], gen: u64) -> ActorId {
    derived_actor(0xff, &[b"genesis", seed, &gen.to_be_bytes()])
}

/// The actor of the genesis change holding the value of `key` that ranked `rank` (0 first)
/// among those that lost a conflict at the cut.
fn loser_actor(seed: &[u8], gen: u64, key: &str, rank: u32) -> ActorId {
    let mut a = derived_actor(0x00, &[b"loser", seed, &gen.to_be_bytes(), key.as_bytes()])
        .to_bytes()
        .to_vec();
    // The rank right after the tag: losers of one key keep their order whatever the hash.
    a[1..5].copy_from_slice(&rank.to_be_bytes());
    ActorId::from(a)
}

/// Each actor's greatest sequence number among a set of changes closed under dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clock(BTreeMap<ActorId, u64>);

impl Clock {
    /// The clock of everything `heads` hold in `doc` (the heads and all their ancestors).
    pub fn at(doc: &Automerge, heads: &[ChangeHash]) -> Result<Clock> {
        let mut clock = BTreeMap::new();
        let mut seen: BTreeSet<ChangeHash> = BTreeSet::new();
        let mut todo: Vec<ChangeHash> = heads.to_vec();
        while let Some(h) = todo.pop() {
            if !seen.insert(h) {
                continue;
            }
            let (actor, seq, deps) = crate::am::with_change(doc, &h, |c| {
                (c.actor_id().clone(), c.seq(), c.deps().to_vec())
            })
            .ok_or_else(|| Error::Corrupt(format!("cut head {h} is not in the document")))?;
            let e = clock.entry(actor).or_insert(0);
            *e = (*e).max(seq);
            todo.extend(deps.into_iter().filter(|d| !seen.contains(d)));
        }
        Ok(Clock(clock))
    }

    /// Whether the change of `actor` with sequence number `seq` is among those counted.
    pub fn includes(&self, actor: &ActorId, seq: u64) -> bool {
        self.0.get(actor).is_some_and(|&s| s >= seq)
    }

    /// Whether every change `other` counts is counted here too.
    pub fn covers(&self, other: &Clock) -> bool {
        other.0.iter().all(|(a, s)| self.includes(a, *s))
    }

    /// Whether `c` is among the changes counted.
    pub fn includes_change(&self, c: &Change) -> bool {
        self.includes(c.actor_id(), c.seq())
    }

    /// Number of actors counted.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no actor is counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a generation's first change records of the cut that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutRecord {
    /// The generation this record begins (1 for the first cut; 0 is the uncut document).
    pub gen: u64,
    /// What the cut included of the previous generation.
    pub clock: Clock,
}

#[derive(Serialize, Deserialize)]
struct CutWire {
    version: u8,
    gen: u64,
    clock: Vec<(serde_bytes::ByteBuf, u64)>,
}

const CUT_VERSION: u8 = 1;

impl CutRecord {
    /// The record's bytes, as the genesis writes them.
    pub fn encode(&self) -> Vec<u8> {
        let wire = CutWire {
            version: CUT_VERSION,
            gen: self.gen,
            clock: self
                .clock
                .0
                .iter()
                .map(|(a, s)| (serde_bytes::ByteBuf::from(a.to_bytes().to_vec()), *s))
                .collect(),
        };
        // Serializing plain integers and byte strings into a Vec cannot fail.
        postcard::to_allocvec(&wire).unwrap_or_default()
    }

    /// Decodes a record; `None` if the bytes are not one.
    pub fn decode(b: &[u8]) -> Option<CutRecord> {
        let w: CutWire = postcard::from_bytes(b).ok()?;
        if w.version != CUT_VERSION || w.gen == 0 {
            return None;
        }
        let clock = w
            .clock
            .into_iter()
            .map(|(a, s)| (ActorId::from(a.into_vec()), s))
            .collect();
        Some(CutRecord {
            gen: w.gen,
            clock: Clock(clock),
        })
    }

    /// The record a document's genesis holds; `None` for a document that was never cut (or
    /// whose record is damaged).
    pub fn of(doc: &Automerge) -> Option<CutRecord> {
        match doc.get(ROOT, CUT_KEY).ok()?? {
            (Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Bytes(b) => CutRecord::decode(b),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Where a change first came from: itself, or for a carried change the change it carries
/// (through any number of generations).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The original change's hash.
    pub hash: ChangeHash,
    /// Its actor.
    pub actor: ActorId,
    /// Its sequence number.
    pub seq: u64,
}

impl Origin {
    /// The origin of `c`: the one its message names if it is a carried change (its actor is
    /// the one derived from that origin and it is that actor's only change), else `c` itself.
    /// A message alone proves nothing: any change may carry any message.
    pub fn of(c: &Change) -> Origin {
        if c.seq() == 1 {
            if let Some(o) = c.message().and_then(|m| Origin::parse(m)) {
                if &o.carrier() == c.actor_id() {
                    return o;
                }
            }
        }
        Origin {
            hash: c.hash(),
            actor: c.actor_id().clone(),
            seq: c.seq(),
        }
    }

    /// The actor that carries this origin onto any generation.
    pub fn carrier(&self) -> ActorId {
        derived_actor(0x01, &[b"carry", &self.hash.0])
    }

    fn message(&self) -> String {
        format!(
            "{CARRY_PREFIX}{} {} {}",
            hex::encode(self.hash.0),
            hex::encode(self.actor.to_bytes()),
            self.seq
        )
    }

    fn parse(m: &str) -> Option<Origin> {
        let mut parts = m.strip_prefix(CARRY_PREFIX)?.split(' ');
        let hash: [u8; 32] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        let actor = ActorId::from(hex::decode(parts.next()?).ok()?);
        let seq = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Origin {
            hash: ChangeHash(hash),
            actor,
            seq,
        })
    }
}

/// Picks which of a root key's concurrent values (`get_all` order) the genesis writes in its
/// first change, so that it stays the one Automerge shows; `None` keeps Automerge's own
/// winner. A document whose readers pair values of different keys by their writer (syncmesh's
/// item meta record and whole value) picks the value its readers show, so the pair is still
/// written by one actor after the cut. Called with the document as it was at the cut heads.
pub type Chooser<'a> = &'a dyn Fn(&Automerge, &str, &[(Value<'_>, ObjId)]) -> Option<usize>;

/// Keeps Automerge's winner for every key.
pub fn automerge_winners(_: &Automerge, _: &str, _: &[(Value<'_>, ObjId)]) -> Option<usize> {
    None
}

/// Generation `gen` of the document named `seed`, built from `source`'s state at `heads`:
/// a new document holding only the genesis (see the module docs). Returns it and the record
/// it holds.
pub fn genesis(
    seed: &[u8],
    gen: u64,
    source: &Automerge,
    heads: &[ChangeHash],
    choose: Chooser<'_>,
) -> Result<(Automerge, CutRecord)> {
    let record = CutRecord {
        gen,
        clock: Clock::at(source, heads)?,
    };
    let err = am_err("genesis");
    let view = at(source, heads)?;
    let source: &Automerge = &view;
    let mut keys: Vec<String> = source.keys(ROOT).filter(|k| k != CUT_KEY).collect();
    keys.sort();
    let mut doc = Automerge::new().with_actor(genesis_actor(seed, gen));
    let mut losers: Vec<(String, u32, Value<'static>, ObjId)> = Vec::new();
    let rec = record.encode();
    commit(&mut doc, 0, None, |tx| {
        tx.put(ROOT, CUT_KEY, ScalarValue::Bytes(rec))?;
        for k in &keys {
            let all = source.get_all(ROOT, k.as_str())?;
            let Some(last) = all.len().checked_sub(1) else {
                continue;
            };
            let win = choose(source, k, &all)
                .filter(|&i| i <= last)
                .unwrap_or(last);
            let mut rank = 0u32;
            let mut winner = None;
            for (i, (v, id)) in all.into_iter().enumerate() {
                if i == win {
                    winner = Some((v, id));
                } else {
                    losers.push((k.clone(), rank, v.into_owned(), id));
                    rank += 1;
                }
            }
            if let Some((v, id)) = winner {
                put_copy(tx, &ROOT, k.as_str().into(), source, v, &id)?;
            }
        }
        Ok(())
    })
    .map_err(&err)?;
    for (k, rank, v, id) in losers {
        let mut one = Automerge::new().with_actor(loser_actor(seed, gen, &k, rank));
        commit(&mut one, 0, None, |tx| {
            put_copy(tx, &ROOT, k.as_str().into(), source, v, &id)
        })
        .map_err(&err)?;
        let c = last_change(&one)?;
        doc.apply_changes([c]).map_err(&err)?;
    }
    Ok((doc, record))
}

/// How a generation is addressed ([`crate::DocAddr`]'s `gen`): its number in the high 32 bits,
/// and 32 bits of a hash of its first changes in the low ones, so that two generations of one
/// number built from different cuts are two documents and never merge. 0: never cut.
pub fn gen_id(doc: &Automerge) -> u64 {
    let Some(record) = CutRecord::of(doc) else {
        return 0;
    };
    let mut h = sha2::Sha256::new();
    for head in genesis_heads(doc) {
        h.update(head.0);
    }
    let d = h.finalize();
    (record.gen << 32) | u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
}

/// The generation number of a [`gen_id`].
pub fn gen_number(id: u64) -> u64 {
    id >> 32
}

/// The first changes of a generation: those without dependencies.
pub fn genesis_heads(doc: &Automerge) -> Vec<ChangeHash> {
    let mut out = Vec::new();
    crate::am::for_each_change_since(doc, &[], |c| {
        if c.deps().is_empty() {
            out.push(c.hash());
        }
    });
    out.sort();
    out
}

/// Carries `late`, a change `source` holds, onto `target` on top of `deps` (target changes
/// standing for the late change's dependencies). Returns the carried change's hash, or `None`
/// if the late change changed nothing (its dependents then stand on `deps`).
pub fn carry(
    target: &mut Automerge,
    source: &Automerge,
    late: &Change,
    deps: &[ChangeHash],
) -> Result<Option<ChangeHash>> {
    let err = am_err("carrying a late change");
    let after = [late.hash()];
    let touched = touched_keys(source, late)?;
    if touched.is_empty() {
        return Ok(None);
    }
    let view = at(source, &after)?;
    let origin = Origin::of(late);
    let mut fork = target.fork_at(deps).map_err(&err)?;
    fork.set_actor(origin.carrier());
    let made = commit(&mut fork, late.timestamp(), Some(origin.message()), |tx| {
        for k in &touched {
            // Automerge leaves out a put of the value a key already holds and a delete of a
            // key it does not hold, which would make what a carried change writes depend on
            // the generation it is carried onto: a placeholder first (NaN equals nothing, so
            // it is never left out) makes every touched key an operation, whatever it held.
            tx.put(ROOT, k.as_str(), ScalarValue::F64(f64::NAN))?;
            match view.get(ROOT, k.as_str())? {
                Some((v, id)) => put_copy(tx, &ROOT, k.as_str().into(), &view, v, &id)?,
                None => tx.delete(ROOT, k.as_str())?,
            }
        }
        Ok(())
    })
    .map_err(&err)?;
    let Some(hash) = made else {
        return Ok(None);
    };
    let c = last_change(&fork)?;
    debug_assert_eq!(c.hash(), hash);
    target.apply_changes([c]).map_err(&err)?;
    Ok(Some(hash))
}

/// Carries onto `target` every change of `source` that `included` says the target does not
/// hold already, dependencies first; `base` are the target's changes that stand for the
/// included ones (its genesis). Returns how many changes were carried.
pub fn carry_all(
    target: &mut Automerge,
    source: &Automerge,
    base: &[ChangeHash],
    included: impl Fn(&Change) -> bool,
) -> Result<usize> {
    // For each source change, the target changes that stand for it.
    let mut stands: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut late: Vec<Change> = Vec::new();
    crate::am::for_each_change_since(source, &[], |c| {
        if included(c) {
            stands.insert(c.hash(), base.to_vec());
        } else {
            late.push(c.clone());
        }
    });
    let mut carried = 0;
    for c in late {
        let mut deps: BTreeSet<ChangeHash> = BTreeSet::new();
        for d in c.deps() {
            match stands.get(d) {
                Some(s) => deps.extend(s.iter().copied()),
                // A dependency the source lacks: the change itself could not be in it.
                None => {
                    return Err(Error::Corrupt(format!(
                        "late change {} lacks {d}",
                        c.hash()
                    )))
                }
            }
        }
        if deps.is_empty() {
            deps.extend(base.iter().copied());
        }
        let deps: Vec<ChangeHash> = deps.into_iter().collect();
        let standing = match carry(target, source, &c, &deps)? {
            Some(h) => {
                carried += 1;
                vec![h]
            }
            None => deps,
        };
        stands.insert(c.hash(), standing);
    }
    Ok(carried)
}

/// Cuts `source` at `heads`: generation `gen` of the document named `seed`, with every change
/// of `source` the cut does not include carried onto it.
pub fn rebase(
    seed: &[u8],
    gen: u64,
    source: &Automerge,
    heads: &[ChangeHash],
    choose: Chooser<'_>,
) -> Result<(Automerge, CutRecord)> {
    let (mut doc, record) = genesis(seed, gen, source, heads, choose)?;
    let base = genesis_heads(&doc);
    carry_all(&mut doc, source, &base, |c| record.clock.includes_change(c))?;
    Ok((doc, record))
}

/// The root keys a change wrote, directly or inside their values, in order.
fn touched_keys(source: &Automerge, c: &Change) -> Result<BTreeSet<String>> {
    let mut touched: BTreeSet<String> = crate::am::root_map_keys(c)
        .ok_or_else(|| Error::Corrupt(format!("late change {} is malformed", c.hash())))?
        .into_iter()
        .collect();
    let text =
        automerge::patches::TextRepresentation::String(automerge::TextEncoding::UnicodeCodePoint);
    // Operations inside a value the change did not create: their root key.
    for p in source.diff(c.deps(), &[c.hash()], text) {
        if let Some((_, Prop::Map(k))) = p.path.first() {
            touched.insert(k.clone());
        }
    }
    touched.remove(CUT_KEY);
    Ok(touched)
}

fn commit(
    doc: &mut Automerge,
    time: i64,
    message: Option<String>,
    f: impl FnOnce(&mut Transaction<'_>) -> std::result::Result<(), automerge::AutomergeError>,
) -> std::result::Result<Option<ChangeHash>, automerge::AutomergeError> {
    let opts = |_: &()| {
        let o = CommitOptions::default().with_time(time);
        match &message {
            Some(m) => o.with_message(m.clone()),
            None => o,
        }
    };
    doc.transact_with(opts, |tx| f(tx))
        .map(|s| s.hash)
        .map_err(|f| f.error)
}

fn last_change(doc: &Automerge) -> Result<Change> {
    crate::am::with_last_local_change(doc, Clone::clone)
        .ok_or_else(|| Error::Corrupt("a commit made no change".into()))
}

/// `doc` as it was at `heads`. Automerge 0.6's reads at given heads (`get_at`, `keys_at`...)
/// hide a counter that was incremented, so the state is read from a fork instead.
fn at<'a>(doc: &'a Automerge, heads: &[ChangeHash]) -> Result<std::borrow::Cow<'a, Automerge>> {
    if doc.get_heads() == heads {
        return Ok(std::borrow::Cow::Borrowed(doc));
    }
    let mut hs = heads.to_vec();
    hs.sort();
    if doc.get_heads() == hs {
        return Ok(std::borrow::Cow::Borrowed(doc));
    }
    Ok(std::borrow::Cow::Owned(
        doc.fork_at(heads).map_err(am_err("reading a past state"))?,
    ))
}

/// Writes at `prop` of `obj` a copy of `value` (object `id` of `source`).
fn put_copy(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    source: &Automerge,
    value: Value<'_>,
    id: &ObjId,
) -> std::result::Result<(), automerge::AutomergeError> {
    match value {
        Value::Scalar(s) => tx.put(obj, prop, plain(s.into_owned())),
        Value::Object(t) => {
            let new = tx.put_object(obj, prop, t)?;
            fill(tx, &new, source, id, t)
        }
    }
}

/// A counter is copied as its current value.
fn plain(s: ScalarValue) -> ScalarValue {
    match s {
        ScalarValue::Counter(c) => ScalarValue::counter(i64::from(&c)),
        s => s,
    }
}

fn fill(
    tx: &mut Transaction<'_>,
    dst: &ObjId,
    source: &Automerge,
    src: &ObjId,
    t: ObjType,
) -> std::result::Result<(), automerge::AutomergeError> {
    match t {
        ObjType::Map | ObjType::Table => {
            let keys: Vec<String> = source.keys(src).collect();
            for k in keys {
                if let Some((v, id)) = source.get(src, k.as_str())? {
                    put_copy(tx, dst, k.as_str().into(), source, v, &id)?;
                }
            }
        }
        ObjType::List => {
            for i in 0..source.length(src) {
                if let Some((v, id)) = source.get(src, i)? {
                    match v {
                        Value::Scalar(s) => tx.insert(dst, i, plain(s.into_owned()))?,
                        Value::Object(t) => {
                            let new = tx.insert_object(dst, i, t)?;
                            fill(tx, &new, source, &id, t)?;
                        }
                    }
                }
            }
        }
        ObjType::Text => {
            let s = source.text(src)?;
            tx.splice_text(dst, 0, 0, &s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
