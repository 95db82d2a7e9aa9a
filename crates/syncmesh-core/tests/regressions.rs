//! Regression tests for bugs found in review: peer input that panicked or diverged replicas,
//! values that did not round-trip, restore losing early changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use automerge::transaction::Transactable;
use serde_json::json;
use support::*;
use syncmesh_core::layout::shard_of;
use syncmesh_core::*;

fn none() -> WriteOptions {
    WriteOptions::default()
}

/// Encoded changes of a foreign document holding `puts` at the root.
fn foreign_change(puts: &[(&str, automerge::ScalarValue)]) -> Vec<Vec<u8>> {
    let mut d = automerge::AutoCommit::new();
    for (k, v) in puts {
        d.put(automerge::ROOT, *k, v.clone()).unwrap();
    }
    d.get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

fn meta_bytes(stamp: u64, created: i64, updated: i64, expires: Option<i64>, by: u8) -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&stamp.to_le_bytes());
    b.extend_from_slice(&created.to_le_bytes());
    b.extend_from_slice(&updated.to_le_bytes());
    b.push(u8::from(expires.is_some()));
    b.extend_from_slice(&expires.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&[by; 16]);
    b.extend_from_slice(&[by; 16]);
    b
}

#[test]
fn r1_peer_root_key_with_multibyte_first_char_panics() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let bytes = foreign_change(&[("é1:a", automerge::ScalarValue::Int(1))]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.apply_changes(
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 0,
            },
            &bytes,
            t(1),
        )
    }));
    assert!(r.is_ok(), "apply_changes panicked on a peer's root key");
}

#[test]
fn r2_unique_name_with_multibyte_char_at_byte_2_panics() {
    let name = format!("日{}", "a".repeat(31)); // 34 bytes, byte 2 inside '日'
    assert_eq!(name.len(), 34);
    let r = std::panic::catch_unwind(|| {
        let mut c = Catalog::new(Identity::new(NodeId([1; 16]), b"s"));
        c.open(&MapSpec::named(name.clone()), [0; 16], t(0))
            .map(|_| ())
    });
    assert!(
        r.is_ok(),
        "Catalog::open panicked on a client's unique name"
    );
}

#[test]
fn r3_if_match_empty_revision_creates_a_missing_item() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let opts = WriteOptions::if_match(Revision::from_client("\"\""));
    let r = m.set("absent", obj(json!({"v": 1})), &opts, t(1));
    assert!(r.is_err(), "If-Match on a missing item matched: {r:?}");
}

#[test]
fn r4_named_map_created_after_early_shard_changes_has_no_name() {
    let mut a = Peer::new(1);
    let mut b = Peer::new(2);
    a.open("users", t(0));
    a.map("users")
        .set("k", obj(json!({"v": 1})), &none(), t(1))
        .unwrap();
    a.pump(t(1));
    // b hears only the shard change (the meta change is delayed/lost)
    let shard_only: Vec<_> = a
        .sent
        .iter()
        .filter(|c| c.doc != DocAddr::Meta)
        .cloned()
        .collect();
    b.receive(&shard_only, t(2));
    let (m, created) = b.cat.open(&MapSpec::named("users"), [0; 16], t(3)).unwrap();
    assert!(created);
    assert_eq!(
        m.unique_name(),
        Some("users"),
        "map opened by name lost its name"
    );
}

/// Two keys in the same shard.
fn same_shard_keys() -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0.. {
        let k = format!("k{i}");
        if let Some(o) = seen.insert(shard_of(&k), k.clone()) {
            return (o, k);
        }
    }
    unreachable!()
}

#[test]
fn r5_meta_slot_in_the_wrong_shard_diverges_replicas() {
    // A peer (buggy or hostile) writes item "david"'s meta into shard 0 (its shard is 688).
    let sid = MapSid::for_name("m");
    let mut a = Peer::new(1);
    let mut b = Peer::new(2);
    a.open("m", t(0));
    a.pump(t(0));
    b.receive(&a.sent.clone(), t(0));
    a.sent.clear();
    a.map("m")
        .set("david", obj(json!({"real": 1})), &none(), t(1))
        .unwrap();
    a.pump(t(1));
    let real = a.sent.clone();
    let stray = foreign_change(&[
        (
            "m5:david",
            automerge::ScalarValue::Bytes(meta_bytes(1, T0, T0, None, 9)),
        ),
        ("f5:davidstray", automerge::ScalarValue::Int(1)),
    ]);
    // replica A: real change first (it made it), then the stray one
    a.cat
        .apply_changes(
            &sid,
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 0,
            },
            &stray,
            t(2),
        )
        .unwrap();
    // replica B: stray first, then the real one
    b.cat
        .apply_changes(
            &sid,
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 0,
            },
            &stray,
            t(2),
        )
        .unwrap();
    b.receive(&real, t(2));
    let ga = a.map("m").get("david", t(3)).map(|i| i.data);
    let gb = b.map("m").get("david", t(3)).map(|i| i.data);
    assert_eq!(ga, gb, "same changes, different items");
}

#[test]
fn r5b_wrong_shard_duplicate_makes_expire_loop_forever_after_reload() {
    let sid = MapSid::for_name("m");
    let mut a = Peer::new(1);
    a.open("m", t(0));
    a.map("m")
        .set(
            "david",
            obj(json!({"v": 1})),
            &WriteOptions::ttl(Ttl::from_secs(10).unwrap()),
            t(0),
        )
        .unwrap();
    a.pump(t(0));
    let stray = foreign_change(&[(
        "m5:david",
        automerge::ScalarValue::Bytes(meta_bytes(1, T0, T0, Some(T0 + 5_000), 9)),
    )]);
    a.cat
        .apply_changes(
            &sid,
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 0,
            },
            &stray,
            t(1),
        )
        .unwrap();
    let docs = a.map("m").save_all(t(1)).unwrap();
    let mut loaded = MapReplica::load(a.cat.identity().clone(), sid, &docs, t(1)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        loaded.expire(t(60_000));
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(),
        "expire() did not return (infinite loop)"
    );
}

#[test]
fn r6_orphan_field_slot_from_a_peer_diverges_after_a_local_create() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    sync_all(&mut peers, t(0));
    let sid = MapSid::for_name("m");
    let idx = shard_of("z");
    let orphan = foreign_change(&[("f1:zghost", automerge::ScalarValue::Int(1))]);
    for p in peers.iter_mut() {
        p.cat
            .apply_changes(
                &sid,
                DocAddr::Shard {
                    gen: 0,
                    inc: 0,
                    index: idx,
                },
                &orphan,
                t(1),
            )
            .unwrap();
    }
    peers[0]
        .map("m")
        .set("z", obj(json!({"a": 1})), &none(), t(2))
        .unwrap();
    sync_all(&mut peers, t(2));
    let a = peers[0].map("m").get("z", t(3)).unwrap().data;
    let b = peers[1].map("m").get("z", t(3)).unwrap().data;
    assert_eq!(a, b, "writer and receiver disagree on the item");
}

#[test]
fn r7_float_values_do_not_round_trip_through_the_view() {
    // find an f64 whose compact text does not parse back exactly with serde_json defaults
    let mut x: u64 = 0x3ff0_0000_0000_0001;
    let mut bad = None;
    for _ in 0..2_000_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let f = f64::from_bits((x >> 12) | 0x3ff0_0000_0000_0000) * 1e-300_f64.powi(0) * 123.456;
        if !f.is_finite() {
            continue;
        }
        let s = serde_json::to_string(&json!(f)).unwrap();
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        if back != json!(f) {
            bad = Some(f);
            break;
        }
    }
    let Some(f) = bad else { return };
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let written = m.set("k", obj(json!({"x": f})), &none(), t(1)).unwrap();
    let read = m.get("k", t(1)).unwrap();
    assert_eq!(
        written.data, read.data,
        "set returned {f:?}, get returns something else"
    );
}

#[test]
fn r8_queued_losing_meta_value_leaves_a_stale_revision() {
    let (k1, k2) = same_shard_keys();
    let mut p: Vec<Peer> = (1..=4).map(Peer::new).collect();
    p[3].open("m", t(0));
    p[3].map("m")
        .set(&k1, obj(json!({"v": 0})), &none(), t(0))
        .unwrap();
    p[3].map("m")
        .set(&k2, obj(json!({"v": 0})), &none(), t(0))
        .unwrap();
    sync_all(&mut p, t(0));
    for q in p.iter_mut() {
        q.sent.clear();
    }
    // B: many writes to k2 (high Lamport counter)
    for i in 0..5 {
        p[1].map("m")
            .set(&k2, obj(json!({"b": i})), &none(), t(1 + i))
            .unwrap();
        p[1].pump(t(1 + i));
    }
    // C: one concurrent write to k2
    p[2].map("m")
        .set(&k2, obj(json!({"c": 1})), &none(), t(1))
        .unwrap();
    p[2].pump(t(1));
    // A: k1 then k2, as two changes
    p[0].map("m")
        .set(&k1, obj(json!({"a": 1})), &none(), t(1))
        .unwrap();
    p[0].pump(t(1));
    p[0].map("m")
        .set(&k2, obj(json!({"a": 2})), &none(), t(2))
        .unwrap();
    p[0].pump(t(2));
    let (b, c, a) = (p[1].sent.clone(), p[2].sent.clone(), p[0].sent.clone());
    assert_eq!(a.len(), 2);
    // D: B's and C's writes (k2 now in conflict), then A2 before A1
    p[3].receive(&b, t(10));
    p[3].receive(&c, t(10));
    p[3].receive(&a[1..], t(10));
    p[3].receive(&a[..1], t(10));
    let live = p[3].map("m").get(&k2, t(10)).unwrap();
    let docs = p[3].map("m").save_all(t(10)).unwrap();
    let loaded = MapReplica::load(
        p[3].cat.identity().clone(),
        MapSid::for_name("m"),
        &docs,
        t(10),
    )
    .unwrap();
    assert_eq!(
        live,
        loaded.get(&k2, t(10)).unwrap(),
        "view differs from the documents"
    );
}

#[test]
fn r9_writing_the_visible_value_does_not_resolve_a_field_conflict() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    sync_all(&mut peers, t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"f": 1})), &none(), t(1))
        .unwrap();
    peers[1]
        .map("m")
        .set("k", obj(json!({"f": 2})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    let m = peers[0].map("m");
    let c = m.conflicts("k", t(2)).unwrap();
    assert_eq!(c.values.len(), 2, "{c:?}");
    let winner = c.values[0].clone();
    assert_eq!(m.get("k", t(2)).unwrap().data, winner);
    // the user picks the visible value to resolve the conflict
    m.set("k", winner, &none(), t(3)).unwrap();
    let c = m.conflicts("k", t(3)).unwrap();
    assert!(
        c.values.is_empty() && c.fields.is_empty(),
        "conflict still there after writing the item: {c:?}"
    );
    // the same with concurrent updates of one field, resolved by an update
    peers[0]
        .map("m")
        .update("k", obj(json!({"g": 1})), &none(), t(4))
        .unwrap();
    peers[1]
        .map("m")
        .update("k", obj(json!({"g": 2})), &none(), t(4))
        .unwrap();
    sync_all(&mut peers, t(5));
    let m = peers[0].map("m");
    let c = m.conflicts("k", t(5)).unwrap();
    assert_eq!(c.fields["g"].len(), 2, "{c:?}");
    let visible = c.fields["g"][0].clone();
    let mut patch = serde_json::Map::new();
    patch.insert("g".into(), visible);
    m.update("k", patch, &none(), t(6)).unwrap();
    let c = m.conflicts("k", t(6)).unwrap();
    assert!(c.fields.is_empty(), "field conflict still there: {c:?}");
}

#[test]
fn r10_restore_loses_changes_that_arrived_before_the_map_document() {
    let mut a = Peer::new(1);
    let mut b = Peer::new(2);
    a.open("users", t(0));
    a.map("users")
        .set("k", obj(json!({"v": 1})), &none(), t(1))
        .unwrap();
    a.pump(t(1));
    let (meta, shard): (Vec<_>, Vec<_>) =
        a.sent.iter().cloned().partition(|c| c.doc == DocAddr::Meta);
    b.receive(&shard, t(2)); // buffered in `future`; the store (support) keeps it too
                             // b restarts: reopen from its store, then the map document arrives
    let sid = MapSid::for_name("users");
    let mut restored = b.restore(&sid);
    for c in &meta {
        restored
            .apply_changes(c.doc, std::slice::from_ref(&c.bytes), t(3))
            .unwrap();
    }
    // without the restart b would show the item:
    b.receive(&meta, t(3));
    assert!(b.map("users").get("k", t(3)).is_ok());
    assert!(restored.get("k", t(3)).is_ok(), "item lost across restore");
}

#[test]
fn r11_peer_incarnation_near_u64_max_overflows_on_recreate() {
    let mut a = Peer::new(1);
    a.open("m", t(0));
    a.pump(t(0));
    let sid = MapSid::for_name("m");
    let meta = a.map("m").save_all(t(0)).unwrap().remove(0).1;
    let mut evil = automerge::AutoCommit::load(&meta).unwrap();
    evil.set_actor(automerge::ActorId::from(vec![7u8; 16]));
    let heads = evil.get_heads();
    evil.put(
        automerge::ROOT,
        "inc",
        automerge::ScalarValue::Uint(u64::MAX),
    )
    .unwrap();
    evil.put(automerge::ROOT, format!("c{}", u64::MAX), T0)
        .unwrap();
    let ch: Vec<Vec<u8>> = evil
        .get_changes(&heads)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    a.cat.apply_changes(&sid, DocAddr::Meta, &ch, t(1)).unwrap();
    a.map("m").remove_map(t(2)).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.cat.open(&MapSpec::named("m"), [0; 16], t(3)).map(|_| ())
    }));
    assert!(r.is_ok(), "recreate panicked (inc + 1 overflow)");
}

#[test]
fn r12_changes_of_a_dead_incarnation_or_repeated_waiting_changes_are_stored_again() {
    let mut a = Peer::new(1);
    let mut b = Peer::new(2);
    a.open("m", t(0));
    a.map("m")
        .set("old", obj(json!({"v": 1})), &none(), t(0))
        .unwrap();
    a.pump(t(0));
    let (meta, old_shard): (Vec<_>, Vec<_>) =
        a.sent.drain(..).partition(|c| c.doc == DocAddr::Meta);
    // b hears of the removal and the next incarnation before the old incarnation's items
    a.map("m").remove_map(t(1)).unwrap();
    a.pump(t(1));
    a.cat.open(&MapSpec::named("m"), [0; 16], t(2)).unwrap();
    a.map("m")
        .set("new", obj(json!({"v": 2})), &none(), t(2))
        .unwrap();
    a.pump(t(2));
    let (meta2, new_shard): (Vec<_>, Vec<_>) =
        a.sent.drain(..).partition(|c| c.doc == DocAddr::Meta);
    let sid = MapSid::for_name("m");
    let received = |b: &mut Peer, cs: &[OutgoingChange]| {
        for c in cs {
            b.cat
                .apply_changes(&sid, c.doc, std::slice::from_ref(&c.bytes), t(3))
                .unwrap();
        }
        b.cat.by_sid(&sid).unwrap().take_received()
    };
    // shard changes before any map document wait, and are to be stored once
    assert_eq!(received(&mut b, &new_shard).len(), new_shard.len());
    assert!(
        received(&mut b, &new_shard).is_empty(),
        "a waiting change sent again was taken for storage again"
    );
    let mut all_meta = meta.clone();
    all_meta.extend(meta2);
    assert!(!received(&mut b, &all_meta).is_empty());
    assert!(b.map("m").get("new", t(3)).is_ok());
    // the first incarnation's items are gone for good: nothing of them is to be stored
    assert!(
        received(&mut b, &old_shard).is_empty(),
        "changes of a removed incarnation were taken for storage"
    );
    assert!(b.map("m").get("old", t(3)).is_err());
}

#[test]
fn r13_one_shard_written_many_large_items_in_one_batch_made_one_huge_change() {
    let mut a = Peer::new(1);
    let b = Peer::new(2);
    a.open("m", t(0));
    // The longest keys and values that do not compress (Automerge compresses its columns).
    let keys: Vec<String> = (0..)
        .map(|i| format!("{i:0>320}"))
        .filter(|k| shard_of(k) == 7)
        .take(100)
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        (0..16_300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'#' + (x % 57) as u8) // no quote or backslash to escape
            })
            .collect::<String>()
    };
    for k in &keys {
        let v = json!({"a": noise(), "b": 1});
        a.map("m").set(k, obj(v), &none(), t(1)).unwrap();
    }
    a.pump(t(1));
    let shard: Vec<_> = a
        .sent
        .iter()
        .filter(|c| c.doc != DocAddr::Meta)
        .cloned()
        .collect();
    assert!(
        shard.len() >= 100 / MAX_ITEMS_PER_CHANGE,
        "{} changes",
        shard.len()
    );
    for c in &shard {
        assert!(
            c.bytes.len() + 64 <= replication::MAX_GOSSIP_MESSAGE,
            "a change of {} bytes",
            c.bytes.len()
        );
    }
    let mut peers = [a, b];
    sync_all(&mut peers, t(2));
    for k in &keys {
        let want = peers[0].map("m").get(k, t(2)).unwrap();
        let got = peers[1].map("m").get(k, t(2)).unwrap();
        assert_eq!((got.data, got.revision), (want.data, want.revision));
    }
}

#[test]
fn r14_a_change_sent_for_another_document_hid_the_genuine_one() {
    let mut a = Peer::new(1);
    let mut b = Peer::new(2);
    a.open("m", t(0));
    a.map("m")
        .set("k", obj(json!({"v": 1})), &none(), t(0))
        .unwrap();
    a.pump(t(0));
    let (meta, shard): (Vec<_>, Vec<_>) = a.sent.drain(..).partition(|c| c.doc == DocAddr::Meta);
    let sid = MapSid::for_name("m");
    for c in &shard {
        let DocAddr::Shard { index, .. } = c.doc else {
            unreachable!()
        };
        // a peer addresses the change to a later incarnation of the same shard first
        let elsewhere = DocAddr::Shard {
            gen: 0,
            inc: 5,
            index,
        };
        b.cat
            .apply_changes(&sid, elsewhere, std::slice::from_ref(&c.bytes), t(1))
            .unwrap();
        b.cat.by_sid(&sid).unwrap().take_received();
        b.cat
            .apply_changes(&sid, c.doc, std::slice::from_ref(&c.bytes), t(1))
            .unwrap();
        assert_eq!(
            b.cat.by_sid(&sid).unwrap().take_received().len(),
            1,
            "the genuine change was taken for one already waiting"
        );
    }
    for c in &meta {
        b.cat
            .apply_changes(&sid, c.doc, std::slice::from_ref(&c.bytes), t(2))
            .unwrap();
    }
    assert!(b.map("m").get("k", t(2)).is_ok());
}

/// A key in the same shard as `k` whose slots sort after k's (its operations in a change
/// come after k's, which shifts op counters).
fn sibling_after(k: &str) -> String {
    let order = |key: &str| format!("{}:{}", key.len(), key);
    let s = shard_of(k);
    (0..100_000)
        .map(|i| format!("z{i}"))
        .find(|z| shard_of(z) == s && order(z) > order(k))
        .unwrap()
}

/// Used to: Automerge picks the winner of the meta slot and of the whole slot independently
/// (by op id, which depends on what else a change wrote before them), so every replica showed
/// A's data with B's TTL, date and writer.
#[test]
fn r11_data_and_metadata_of_an_item_come_from_the_same_write() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"v": "init"})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    let z = sibling_after("k");
    peers[0]
        .map("m")
        .set("k", obj(json!({"v": "A"})), &none(), t(1))
        .unwrap();
    peers[0]
        .map("m")
        .set(&z, obj(json!({"v": 0})), &none(), t(1))
        .unwrap();
    let ttl = WriteOptions::ttl(Ttl::from_secs(5).unwrap());
    peers[1]
        .map("m")
        .set("k", obj(json!({"v": "B"})), &ttl, t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    let a = peers[0].map("m").get("k", t(2)).unwrap();
    assert_eq!(a, peers[1].map("m").get("k", t(2)).unwrap());
    let data_from_b = a.data["v"] == json!("B");
    assert_eq!(
        data_from_b,
        a.date_expires.is_some(),
        "data from one write, TTL from the other: {a:?}"
    );
    let c = peers[0].map("m").conflicts("k", t(2)).unwrap();
    assert_eq!(c.values[0], a.data, "the visible value first");
    assert_eq!(c.writers[0], NodeId([if data_from_b { 2 } else { 1 }; 16]));
}

/// Used to: Automerge applies a batch change by change; when it refused a later change (a
/// reused sequence number) the earlier ones were in the document but their field slots never
/// entered the shard's field index, their items were not re-read and they were not stored: a
/// later whole write on that replica left the update's field in place while its view said it
/// was gone, and replicas holding the same changes differed.
#[test]
fn r12_a_batch_applied_in_part_leaves_nothing_stale() {
    let mut peers = [Peer::new(1), Peer::new(2), Peer::new(3)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"v": 1})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    let sid = MapSid::for_name("m");
    // A clone of replica 0 writing as the same actor makes a change with the same sequence
    // number as replica 0's next one.
    let docs = peers[0].map("m").save_all(t(0)).unwrap();
    let mut clone =
        MapReplica::load(peers[0].cat.identity().clone(), sid.clone(), &docs, t(0)).unwrap();
    let z = sibling_after("k");
    peers[0]
        .map("m")
        .update("k", obj(json!({"f": 1})), &none(), t(1))
        .unwrap();
    peers[0].map("m").flush(t(1)).unwrap();
    let c1 = peers[0].map("m").take_outgoing();
    clone.set(&z, obj(json!({"g": 2})), &none(), t(1)).unwrap();
    clone.flush(t(1)).unwrap();
    let c2 = clone.take_outgoing();
    assert_eq!((c1.len(), c2.len()), (1, 1));
    assert_eq!(c1[0].doc, c2[0].doc);
    let doc = c1[0].doc;
    peers[2].receive(&c1, t(1));
    let r = peers[1]
        .map("m")
        .apply_changes(doc, &[c1[0].bytes.clone(), c2[0].bytes.clone()], t(1));
    assert!(r.is_err(), "the reused sequence number is refused");
    // What was taken is visible and stored like any merged change.
    assert_eq!(
        peers[1].map("m").get("k", t(1)).unwrap().data,
        obj(json!({"v": 1, "f": 1}))
    );
    assert!(peers[1]
        .map("m")
        .take_received()
        .iter()
        .any(|(_, b)| *b == c1[0].bytes));
    peers[1]
        .map("m")
        .set("k", obj(json!({"v": 2})), &none(), t(2))
        .unwrap();
    peers[1].pump(t(2));
    let out = std::mem::take(&mut peers[1].sent);
    peers[2].receive(&out, t(2));
    let p1 = peers[1].map("m").get("k", t(3)).unwrap();
    let p2 = peers[2].map("m").get("k", t(3)).unwrap();
    let docs1 = peers[1].map("m").save_all(t(3)).unwrap();
    let reloaded = MapReplica::load(peers[1].cat.identity().clone(), sid, &docs1, t(3)).unwrap();
    assert_eq!(p1.data, obj(json!({"v": 2})));
    assert_eq!(p1, p2, "replicas holding the same changes differ");
    assert_eq!(
        reloaded.get("k", t(3)).unwrap(),
        p1,
        "view differs from the documents"
    );
}
