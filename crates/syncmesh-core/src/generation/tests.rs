#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use super::*;
use automerge::transaction::Transactable;

fn actor(n: u8) -> ActorId {
    ActorId::from(&[n; 16][..])
}

fn doc(n: u8) -> Automerge {
    Automerge::new().with_actor(actor(n))
}

/// Commits one change at `time` made by `f`.
fn write(
    d: &mut Automerge,
    time: i64,
    f: impl FnOnce(&mut Transaction<'_>) -> std::result::Result<(), automerge::AutomergeError>,
) -> ChangeHash {
    commit(d, time, None, f).unwrap().unwrap()
}

fn put(d: &mut Automerge, k: &str, v: &str) -> ChangeHash {
    write(d, 1, |tx| tx.put(ROOT, k, v))
}

/// Gives `to` every change of `from`.
fn merge(to: &mut Automerge, from: &Automerge) {
    to.apply_changes(crate::am::all_changes(from)).unwrap();
}

/// Everything a reader can see: per root key, every value (winner last, as Automerge lists
/// them) rendered deeply.
fn seen(d: &Automerge) -> Vec<(String, Vec<String>)> {
    d.keys(ROOT)
        .filter(|k| k != CUT_KEY)
        .map(|k| {
            let vals = d
                .get_all(ROOT, k.as_str())
                .unwrap()
                .into_iter()
                .map(|(v, id)| render(d, v, &id))
                .collect();
            let (wv, wid) = d.get(ROOT, k.as_str()).unwrap().unwrap();
            let mut vals: Vec<String> = vals;
            vals.push(format!("winner={}", render(d, wv, &wid)));
            (k, vals)
        })
        .collect()
}

fn render(d: &Automerge, v: Value<'_>, id: &ObjId) -> String {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(c) => format!("counter({})", i64::from(c)),
            s => format!("{s:?}"),
        },
        Value::Object(ObjType::Text) => format!("text({:?})", d.text(id).unwrap()),
        Value::Object(ObjType::List) => {
            let items: Vec<String> = (0..d.length(id))
                .map(|i| {
                    let (v, cid) = d.get(id, i).unwrap().unwrap();
                    render(d, v, &cid)
                })
                .collect();
            format!("[{}]", items.join(","))
        }
        Value::Object(_) => {
            let items: Vec<String> = d
                .keys(id)
                .map(|k| {
                    let (v, cid) = d.get(id, k.as_str()).unwrap().unwrap();
                    format!("{k}:{}", render(d, v, &cid))
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// A document with nested values of every kind and a three-way conflict, reached by two
/// replicas through different orders of merging.
fn shared_state() -> (Automerge, Automerge) {
    let mut a = doc(1);
    let mut b = doc(2);
    let mut c = doc(3);
    write(&mut a, 1, |tx| {
        let m = tx.put_object(ROOT, "obj", ObjType::Map)?;
        tx.put(&m, "n", 1)?;
        let l = tx.put_object(&m, "list", ObjType::List)?;
        tx.insert(&l, 0, "x")?;
        let inner = tx.insert_object(&l, 1, ObjType::Map)?;
        tx.put(&inner, "deep", true)?;
        let t = tx.put_object(ROOT, "text", ObjType::Text)?;
        tx.splice_text(&t, 0, 0, "héllo")?;
        tx.put(ROOT, "count", ScalarValue::counter(5))?;
        tx.put(ROOT, "gone", "soon")?;
        Ok(())
    });
    merge(&mut b, &a);
    merge(&mut c, &a);
    write(&mut a, 2, |tx| tx.increment(ROOT, "count", 3));
    write(&mut a, 2, |tx| tx.delete(ROOT, "gone"));
    // Three concurrent values of one key, and two of another.
    put(&mut a, "x", "from a");
    put(&mut b, "x", "from b");
    put(&mut c, "x", "from c");
    write(&mut b, 3, |tx| {
        tx.put(ROOT, "bytes", ScalarValue::Bytes(vec![1, 2]))
    });
    write(&mut c, 3, |tx| {
        tx.put(ROOT, "bytes", ScalarValue::Bytes(vec![3]))
    });
    let mut r1 = doc(1);
    merge(&mut r1, &a);
    merge(&mut r1, &b);
    merge(&mut r1, &c);
    let mut r2 = doc(2);
    merge(&mut r2, &c);
    merge(&mut r2, &b);
    merge(&mut r2, &a);
    assert_eq!(r1.get_heads(), r2.get_heads());
    (r1, r2)
}

#[test]
fn a_genesis_is_the_same_bytes_from_any_history_and_keeps_every_value_and_conflict() {
    let (r1, r2) = shared_state();
    let heads = r1.get_heads();
    let (g1, rec1) = genesis(b"map/7", 1, &r1, &heads, &automerge_winners).unwrap();
    let (g2, rec2) = genesis(b"map/7", 1, &r2, &heads, &automerge_winners).unwrap();
    assert_eq!(g1.save(), g2.save(), "the same genesis everywhere");
    assert_eq!(rec1, rec2);
    assert_eq!(CutRecord::of(&g1), Some(rec1.clone()));
    assert_eq!(rec1.clock, Clock::at(&r1, &heads).unwrap());
    assert_eq!(rec1.clock.len(), 3);
    // What a reader sees is unchanged, conflicts included, and their winners and order.
    assert_eq!(seen(&g1), seen(&r1));
    assert_eq!(g1.get_all(ROOT, "x").unwrap().len(), 3);
    // One change for the winners, one per losing value.
    assert_eq!(genesis_heads(&g1).len(), 1 + 2 + 1);
    // Another document or generation gets other actors.
    let (g3, _) = genesis(b"map/8", 1, &r1, &heads, &automerge_winners).unwrap();
    assert_ne!(g3.get_heads(), g1.get_heads());
    let (g4, _) = genesis(b"map/7", 2, &r1, &heads, &automerge_winners).unwrap();
    assert_ne!(g4.get_heads(), g1.get_heads());
}

#[test]
fn a_genesis_of_earlier_heads_shows_the_state_then() {
    let mut a = doc(1);
    put(&mut a, "k", "old");
    let early = a.get_heads();
    put(&mut a, "k", "new");
    put(&mut a, "j", "later");
    let (g, rec) = genesis(b"m", 1, &a, &early, &automerge_winners).unwrap();
    assert_eq!(seen(&g), seen(&a.fork_at(&early).unwrap()));
    assert!(rec.clock.includes(&actor(1), 1));
    assert!(!rec.clock.includes(&actor(1), 2));
}

#[test]
fn late_changes_are_carried_once_in_order_and_alike_by_every_holder() {
    let mut a = doc(1);
    put(&mut a, "k", "0");
    put(&mut a, "j", "0");
    let mut b = doc(2);
    merge(&mut b, &a);
    let cut = a.get_heads();
    // Late: A writes k twice and deletes j; B writes m; B also got A's first late write.
    put(&mut a, "k", "1");
    merge(&mut b, &a);
    put(&mut a, "k", "2");
    write(&mut a, 5, |tx| tx.delete(ROOT, "j"));
    put(&mut b, "m", "b");
    let (mut na, _) = rebase(b"m", 1, &a, &cut, &automerge_winners).unwrap();
    let (mut nb, _) = rebase(b"m", 1, &b, &cut, &automerge_winners).unwrap();
    // A change both carried is the same change.
    let shared: BTreeSet<ChangeHash> = crate::am::all_changes(&na)
        .iter()
        .map(|c| c.hash())
        .collect();
    let nb_hashes: BTreeSet<ChangeHash> = crate::am::all_changes(&nb)
        .iter()
        .map(|c| c.hash())
        .collect();
    assert_eq!(
        shared.intersection(&nb_hashes).count(),
        2,
        "genesis and k=1"
    );
    merge(&mut na, &nb);
    merge(&mut nb, &na);
    assert_eq!(na.get_heads(), nb.get_heads());
    assert_eq!(seen(&na), seen(&nb));
    // The same as if the late changes had been merged before the cut.
    let mut old = a.clone();
    merge(&mut old, &b);
    assert_eq!(seen(&na), seen(&old));
    // k=2 superseded k=1 (not a conflict), j is gone.
    assert_eq!(na.get_all(ROOT, "k").unwrap().len(), 1);
    assert!(na.get(ROOT, "j").unwrap().is_none());
    // Carrying again changes nothing.
    let before = na.get_heads();
    let base = genesis_heads(&na);
    let (_, rec) = genesis(b"m", 1, &a, &cut, &automerge_winners).unwrap();
    carry_all(&mut na, &a, &base, |c| rec.clock.includes_change(c)).unwrap();
    assert_eq!(na.get_heads(), before);
}

#[test]
fn a_carried_change_is_concurrent_with_writes_made_after_the_cut() {
    let mut a = doc(1);
    put(&mut a, "y", "0");
    let cut = a.get_heads();
    let mut late = a.clone();
    late.set_actor(actor(9));
    put(&mut late, "y", "late");
    let (g, _) = genesis(b"m", 1, &a, &cut, &automerge_winners).unwrap();
    // Written on the new generation before the late change arrives.
    let mut after = g.clone();
    after.set_actor(actor(4));
    put(&mut after, "y", "after");
    let base = genesis_heads(&after);
    carry_all(&mut after, &late, &base, |c| c.actor_id() != &actor(9)).unwrap();
    assert_eq!(
        after.get_all(ROOT, "y").unwrap().len(),
        2,
        "a conflict, as before"
    );
    let mut old = a.clone();
    merge(&mut old, &late);
    put(&mut old, "z", "-");
    // A replica that carried first and got the new write later sees the same.
    let mut other = g.clone();
    carry_all(&mut other, &late, &base, |c| c.actor_id() != &actor(9)).unwrap();
    merge(&mut other, &after);
    assert_eq!(other.get_heads(), after.get_heads());
    assert_eq!(seen(&other), seen(&after));
}

#[test]
fn a_carried_change_carried_again_is_the_same_as_carried_once_across_both_cuts() {
    // Generation 0: k written; cut 1 at that; a late write of k and a delete of a key the
    // first generation lacks but the second holds.
    let mut a = doc(1);
    put(&mut a, "k", "0");
    let cut1 = a.get_heads();
    let mut late = a.clone();
    late.set_actor(actor(9));
    write(&mut late, 7, |tx| {
        tx.put(ROOT, "k", "late")?;
        tx.put(ROOT, "j", "late j")?;
        tx.delete(ROOT, "j")
    });
    let (g1, _) = genesis(b"m", 1, &a, &cut1, &automerge_winners).unwrap();
    // On generation 1, before the late change is carried: j written, then cut 2 at that.
    let mut g1w = g1.clone();
    g1w.set_actor(actor(2));
    put(&mut g1w, "j", "on 1");
    put(&mut g1w, "k", "same");
    let cut2 = g1w.get_heads();
    // Path one: carried onto generation 1, then late for cut 2 and carried onto 2.
    let mut via = g1w.clone();
    let base1 = genesis_heads(&via);
    carry_all(&mut via, &late, &base1, |c| c.actor_id() != &actor(9)).unwrap();
    let (mut g2a, rec2) = genesis(b"m", 2, &via, &cut2, &automerge_winners).unwrap();
    let base2 = genesis_heads(&g2a);
    carry_all(&mut g2a, &via, &base2, |c| rec2.clock.includes_change(c)).unwrap();
    // Path two: a replica that was away carries its generation 0 change onto 2 directly.
    let (mut g2b, _) = genesis(b"m", 2, &g1w, &cut2, &automerge_winners).unwrap();
    carry_all(&mut g2b, &late, &base2, |c| c.actor_id() != &actor(9)).unwrap();
    assert_eq!(g2a.get_heads(), g2b.get_heads(), "the same carried change");
    assert_eq!(g2a.save(), g2b.save());
    assert!(
        g2a.get(ROOT, "j").unwrap().is_none(),
        "the late delete holds"
    );
    let carried = crate::am::all_changes(&g2a)
        .into_iter()
        .find(|c| c.message().is_some())
        .unwrap();
    let origin = Origin::of(&carried);
    assert_eq!(origin.actor, actor(9));
    assert_eq!(&origin.carrier(), carried.actor_id());
    assert_eq!(carried.timestamp(), 7);
}

#[test]
fn a_forged_carry_message_is_not_an_origin() {
    let mut a = doc(1);
    let forged = Origin {
        hash: ChangeHash([7; 32]),
        actor: actor(5),
        seq: 3,
    };
    commit(&mut a, 0, Some(forged.message()), |tx| tx.put(ROOT, "k", 1))
        .unwrap()
        .unwrap();
    let c = crate::am::all_changes(&a).pop().unwrap();
    assert_eq!(
        Origin::of(&c).actor,
        actor(1),
        "its actor is not the carrier"
    );
    assert_eq!(Origin::parse(&forged.message()), Some(forged));
    for bad in ["", "syncmesh-carry/1 zz", "syncmesh-carry/1 00 00 1 extra"] {
        assert_eq!(Origin::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn cut_records_roundtrip_and_refuse_garbage() {
    let (r1, _) = shared_state();
    let rec = CutRecord {
        gen: 3,
        clock: Clock::at(&r1, &r1.get_heads()).unwrap(),
    };
    assert_eq!(CutRecord::decode(&rec.encode()), Some(rec.clone()));
    assert_eq!(CutRecord::decode(&[]), None);
    let mut bad = rec.encode();
    bad[0] = 9;
    assert_eq!(CutRecord::decode(&bad), None);
    let zero = CutRecord { gen: 0, ..rec };
    assert_eq!(CutRecord::decode(&zero.encode()), None);
    assert_eq!(CutRecord::of(&r1), None, "an uncut document has none");
}
