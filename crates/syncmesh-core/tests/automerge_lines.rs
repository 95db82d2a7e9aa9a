//! syncmesh runs on Automerge's 0.6 line; data directories and peers of earlier syncmesh
//! versions used the 0.12 line. Both lines share one format: each reads the other's saved
//! documents and changes, and the same edits give the same bytes. Checked here with real
//! shard documents of a map.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use automerge::ReadDoc as _;
use automerge012::transaction::Transactable as _;
use automerge012::ReadDoc as _;
use serde_json::json;
use syncmesh_core::{DocAddr, Identity, MapReplica, MapSid, NodeId, Timestamp, WriteOptions};

fn now() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

#[test]
fn documents_and_changes_cross_between_the_lines() {
    // A map written by this version: every shard document saved on the 0.6 line.
    let id = Identity::new(NodeId([1; 16]), &[1; 8]);
    let mut m =
        MapReplica::create(id, MapSid::for_name("lines"), Some("lines"), None, now()).unwrap();
    for i in 0..200 {
        m.set(
            &format!("k{i}"),
            json!({"n": i, "nested": {"a": [1, 2, {"b": "c"}]}, "s": "text"})
                .as_object()
                .cloned()
                .unwrap(),
            &WriteOptions::default(),
            now(),
        )
        .unwrap();
    }
    m.flush(now()).unwrap();
    let mut docs = 0;
    for index in 0..syncmesh_core::layout::SHARDS {
        let addr = DocAddr::Shard {
            gen: 0,
            index,
            inc: 0,
        };
        let Ok(Some(saved)) = m.snapshot(addr, now()) else {
            continue;
        };
        docs += 1;
        // 0.12 reads it, and saves the same bytes back.
        let old = automerge012::Automerge::load(&saved).unwrap();
        let new = automerge::Automerge::load(&saved).unwrap();
        assert_eq!(old.save(), new.save());
        let old_keys: Vec<String> = old.keys(automerge012::ROOT).collect();
        let new_keys: Vec<String> = new.keys(automerge::ROOT).collect();
        assert_eq!(old_keys, new_keys);
    }
    assert!(docs > 50, "{docs} shard documents");

    // A change made on 0.12 applies on 0.6 and the other way round, with equal results.
    let mut a = automerge012::Automerge::new();
    a.set_actor(automerge012::ActorId::from(vec![7u8; 16]));
    let mut tx = a.transaction();
    tx.put(automerge012::ROOT, "x", 1).unwrap();
    let obj = tx
        .put_object(automerge012::ROOT, "o", automerge012::ObjType::Map)
        .unwrap();
    tx.put(&obj, "inner", "v").unwrap();
    tx.commit();
    let from_old = a.get_last_local_change().unwrap().raw_bytes().to_vec();
    let mut b = automerge::Automerge::new();
    b.apply_changes([automerge::Change::from_bytes(from_old).unwrap()])
        .unwrap();
    b.set_actor(automerge::ActorId::from(vec![8u8; 16]));
    let mut tx = b.transaction();
    automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "y", 2).unwrap();
    tx.commit();
    let from_new = b.get_last_local_change().unwrap().raw_bytes().to_vec();
    a.apply_changes([automerge012::Change::from_bytes(from_new).unwrap()])
        .unwrap();
    assert_eq!(a.save(), b.save());
    assert_eq!(
        a.get_heads().iter().map(|h| h.0).collect::<Vec<_>>(),
        b.get_heads().iter().map(|h| h.0).collect::<Vec<_>>()
    );
}
