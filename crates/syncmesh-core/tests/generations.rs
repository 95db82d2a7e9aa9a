//! What issue 17's history cut would rest on, checked against Automerge 0.6 (a design probe:
//! nothing in syncmesh cuts history yet). A new generation of a document is built by every
//! replica on its own from the state at agreed heads, and a change made against the old
//! generation that arrives after the cut is carried onto the new one; both must come out
//! byte-identical on every replica, so that replicas merge without agreeing on anything more
//! and a carried change is applied once however many replicas carry it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Automerge, Change, ChangeHash, ReadDoc, ScalarValue, ROOT};

/// A 16-byte actor derived from `seed`, the same on every replica.
fn actor(seed: &[u8]) -> ActorId {
    use sha2::Digest;
    ActorId::from(&sha2::Sha256::digest(seed)[..16])
}

/// The root scalars of a document: (key, value), in key order (one winner per key).
fn state(doc: &Automerge) -> Vec<(String, ScalarValue)> {
    let mut out: Vec<(String, ScalarValue)> = doc
        .keys(ROOT)
        .filter_map(|k| match doc.get(ROOT, &k).unwrap() {
            Some((automerge::Value::Scalar(s), _)) => Some((k, s.into_owned())),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Commits one change at `time` made by `f`.
fn commit_at(
    doc: &mut Automerge,
    time: i64,
    f: impl FnOnce(
        &mut automerge::transaction::Transaction<'_>,
    ) -> Result<(), automerge::AutomergeError>,
) {
    doc.transact_with(|_| CommitOptions::default().with_time(time), f)
        .unwrap();
}

/// Generation `g` of a document with `state`: one change, by an actor derived from the
/// generation, at time 0, writing the keys in order.
fn genesis(seed: &[u8], g: u64, state: &[(String, ScalarValue)]) -> Automerge {
    let mut doc = Automerge::new().with_actor(actor(&[seed, &g.to_be_bytes()].concat()));
    commit_at(&mut doc, 0, |tx| {
        for (k, v) in state {
            tx.put(ROOT, k, v.clone())?;
        }
        Ok(())
    });
    doc
}

/// A change made against an earlier generation, carried onto `gen`: the same root writes,
/// by an actor derived from the change's hash, on top of the generation's first change only,
/// at the change's time. (The writes are read from the change itself: the old generation's
/// history may be gone.)
fn carry(gen: &Automerge, genesis_head: ChangeHash, c: &Change) -> Change {
    let mut fork = gen.fork_at(&[genesis_head]).unwrap();
    fork.set_actor(actor(&c.hash().0));
    let ops = serde_json::to_value(c.decode()).unwrap();
    commit_at(&mut fork, c.timestamp(), |tx| {
        for op in ops["ops"].as_array().unwrap() {
            let key = op["key"].as_str().unwrap();
            match op["action"].as_str().unwrap() {
                "set" => {
                    let v = op["value"].as_str().unwrap().to_string();
                    tx.put(ROOT, key, v)?
                }
                "del" => tx.delete(ROOT, key)?,
                other => panic!("unexpected op {other}"),
            }
        }
        Ok(())
    });
    fork.get_last_local_change().unwrap().clone()
}

#[test]
fn a_generation_and_a_carried_change_are_the_same_bytes_on_every_replica() {
    // Two replicas reach the same state through different histories.
    let mut a = AutoCommit::new().with_actor(ActorId::from(&[1u8; 16][..]));
    let mut b = AutoCommit::new().with_actor(ActorId::from(&[2u8; 16][..]));
    a.put(ROOT, "x", "1").unwrap();
    a.commit();
    b.put(ROOT, "y", "2").unwrap();
    b.commit();
    b.merge(&mut a).unwrap();
    a.merge(&mut b).unwrap();
    a.put(ROOT, "x", "3").unwrap();
    a.commit();
    b.merge(&mut a).unwrap();
    let cut = a.get_heads();
    assert_eq!(cut, b.get_heads());
    // A change the cut does not hold: made on a fork of A before it saw the last write.
    let mut late = a.document().fork_at(&cut).unwrap();
    late.set_actor(ActorId::from(&[9u8; 16][..]));
    commit_at(&mut late, 1234, |tx| tx.put(ROOT, "y", "late"));
    let c = late.get_last_local_change().unwrap().clone();

    // Each replica builds generation 1 from its own copy of the state at the cut.
    let ga = genesis(b"map/shard-7", 1, &state(a.document()));
    let gb = genesis(b"map/shard-7", 1, &state(b.document()));
    assert_eq!(
        ga.get_heads(),
        gb.get_heads(),
        "the same first change everywhere"
    );
    assert_eq!(ga.save(), gb.save());
    let head = ga.get_heads()[0];

    // Both carry the late change: the same bytes, so applying both applies it once.
    let ca = carry(&ga, head, &c);
    let cb = carry(&gb, head, &c);
    assert_eq!(ca.raw_bytes(), cb.raw_bytes());
    let mut ga = ga;
    let mut gb = gb;
    ga.apply_changes([ca.clone()]).unwrap();
    gb.apply_changes([cb]).unwrap();
    ga.apply_changes([ca]).unwrap(); // again, as if it came from a peer: no effect
    assert_eq!(ga.get_heads(), gb.get_heads());
    assert_eq!(state(&ga), state(&gb));
    let y = state(&ga).into_iter().find(|(k, _)| k == "y").unwrap().1;
    assert_eq!(y, ScalarValue::Str("late".into()));
    // The late write replaced the generation's value rather than conflicting with it.
    assert_eq!(ga.get_all(ROOT, "y").unwrap().len(), 1);
}

#[test]
fn a_carried_change_and_a_write_after_the_cut_resolve_alike_everywhere() {
    let g = genesis(b"m", 1, &[("y".into(), ScalarValue::Str("0".into()))]);
    let head = g.get_heads()[0];
    // A late change of the old generation, and a write made on the new one after the cut:
    // concurrent (neither saw the other), as they were before the cut.
    let mut old = Automerge::new().with_actor(ActorId::from(&[3u8; 16][..]));
    commit_at(&mut old, 5, |tx| tx.put(ROOT, "y", "late"));
    let c = old.get_last_local_change().unwrap().clone();
    let mut a = g.fork_at(&[head]).unwrap();
    a.set_actor(ActorId::from(&[4u8; 16][..]));
    commit_at(&mut a, 6, |tx| tx.put(ROOT, "y", "after"));
    let w = a.get_last_local_change().unwrap().clone();
    let mut b = g.fork_at(&[head]).unwrap();
    let carried = carry(&b, head, &c);
    b.apply_changes([carried.clone()]).unwrap();
    b.apply_changes([w]).unwrap();
    a.apply_changes([carry(&a, head, &c)]).unwrap();
    assert_eq!(a.get_heads(), b.get_heads());
    assert_eq!(state(&a), state(&b), "one winner, the same on both");
    // Both values stay visible as a conflict, as concurrent writes do.
    assert_eq!(a.get_all(ROOT, "y").unwrap().len(), 2);
}
