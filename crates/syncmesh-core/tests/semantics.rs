//! Every operation, limit, error code and concurrency rule of the engine (docs/semantics.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

mod support;

use serde_json::json;
use support::*;
use syncmesh_core::{
    Bounds, Catalog, DocAddr, Error, EventKind, Identity, MapReplica, MapSid, MapSpec, NodeId,
    OpenMode, Order, PageRequest, Revision, Ttl, WriteOptions,
};

fn none() -> WriteOptions {
    WriteOptions::default()
}

#[test]
fn set_get_update_mutate_remove() {
    let mut p = Peer::new(1);
    let m = p.open("users", t(0));
    let item = m
        .set(
            "david",
            obj(json!({"phone_number": 12345678, "country": "UK"})),
            &none(),
            t(1),
        )
        .unwrap();
    assert_eq!(item.key, "david");
    assert_eq!(item.created_by, NodeId([1; 16]));
    assert_eq!(item.date_created, t(1));
    assert_eq!(m.get("david", t(1)).unwrap(), item);

    let up = m
        .update("david", obj(json!({"country": "IRL"})), &none(), t(2))
        .unwrap();
    assert_eq!(
        up.data,
        obj(json!({"phone_number": 12345678, "country": "IRL"}))
    );
    assert_eq!(up.date_created, t(1));
    assert_eq!(up.date_updated, t(2));
    assert_ne!(up.revision, item.revision);

    let mutated = m
        .mutate("david", &none(), t(3), |cur| {
            let mut d = cur.cloned().unwrap();
            d.insert("country".into(), json!("USA"));
            Some(d)
        })
        .unwrap()
        .unwrap();
    assert_eq!(mutated.data["country"], "USA");

    // Cancel: nothing changes, no event.
    m.take_events();
    assert!(m
        .mutate("david", &none(), t(4), |_| None)
        .unwrap()
        .is_none());
    assert!(m.take_events().is_empty());
    assert_eq!(m.get("david", t(4)).unwrap().revision, mutated.revision);

    // update and mutate create when missing
    let created = m
        .update("eve", obj(json!({"a": 1})), &none(), t(5))
        .unwrap();
    assert_eq!(created.data, obj(json!({"a": 1})));
    let seen_none = m
        .mutate("zed", &none(), t(5), |cur| {
            assert!(cur.is_none());
            Some(obj(json!({"z": true})))
        })
        .unwrap();
    assert!(seen_none.is_some());

    // set replaces the whole object
    let replaced = m
        .set("david", obj(json!({"only": 1})), &none(), t(6))
        .unwrap();
    assert_eq!(replaced.data, obj(json!({"only": 1})));

    m.remove("david", None, t(7)).unwrap();
    assert_eq!(m.get("david", t(7)).unwrap_err().code(), 54201);
    assert_eq!(m.remove("david", None, t(7)).unwrap_err().code(), 54201);

    // The flushed document agrees with the view.
    let docs = m.save_all(t(8)).unwrap();
    let again = MapReplica::load(m_identity(1), MapSid::for_name("users"), &docs, t(8)).unwrap();
    assert_eq!(again.all_items(t(8)), m.all_items(t(8)));
}

fn m_identity(n: u8) -> Identity {
    Identity::new(NodeId([n; 16]), &[n, 0xAA])
}

#[test]
fn create_item_refuses_existing_keys() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    m.create_item("k", obj(json!({})), None, t(1)).unwrap();
    let err = m
        .create_item("k", obj(json!({"x": 1})), None, t(2))
        .unwrap_err();
    assert_eq!(err.code(), 54208);
    // the empty object is a real item
    assert_eq!(m.get("k", t(2)).unwrap().data, obj(json!({})));
}

#[test]
fn conditional_writes_check_the_revision() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let r1 = m
        .set("k", obj(json!({"v": 1})), &none(), t(1))
        .unwrap()
        .revision;
    let r2 = m
        .set(
            "k",
            obj(json!({"v": 2})),
            &WriteOptions::if_match(r1.clone()),
            t(2),
        )
        .unwrap()
        .revision;
    let stale = WriteOptions::if_match(r1.clone());
    for err in [
        m.set("k", obj(json!({"v": 3})), &stale, t(3)).unwrap_err(),
        m.update("k", obj(json!({"v": 3})), &stale, t(3))
            .unwrap_err(),
        m.mutate("k", &stale, t(3), |c| c.cloned()).unwrap_err(),
        m.remove("k", Some(&r1), t(3)).unwrap_err(),
    ] {
        assert_eq!(err.code(), 54205, "{err}");
    }
    assert_eq!(m.get("k", t(3)).unwrap().data["v"], 2);
    // quoted ETag form is accepted
    let quoted = Revision::from_client(format!("\"{r2}\""));
    m.remove("k", Some(&quoted), t(4)).unwrap();
    // If-Match on a missing item is a mismatch, not a create
    let err = m
        .set("k", obj(json!({})), &WriteOptions::if_match(r2), t(5))
        .unwrap_err();
    assert_eq!(err.code(), 54205);
}

#[test]
fn set_and_mutate_write_the_item_as_one_value_and_update_only_its_fields() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    m.flush(t(0)).unwrap();
    m.take_outgoing();
    let big = json!({"a": 1, "b": 2, "c": 3, "d": {"nested": [1, 2, 3]}, "e": "text"});
    m.set("k", obj(big), &none(), t(1)).unwrap();
    m.flush(t(1)).unwrap();
    let change = |m: &mut MapReplica| {
        let out = m.take_outgoing();
        assert_eq!(out.len(), 1);
        automerge::Change::from_bytes(out[0].bytes.clone()).unwrap()
    };
    // the whole value and the meta record, however many fields (nested ones included)
    assert_eq!(change(m).len(), 2);
    m.mutate("k", &none(), t(2), |cur| {
        let mut d = cur.cloned().unwrap();
        d.insert("b".into(), json!(20));
        Some(d)
    })
    .unwrap();
    m.flush(t(2)).unwrap();
    assert_eq!(change(m).len(), 2);
    // an update writes only the fields whose values change, and the meta record
    m.update("k", obj(json!({"a": 1, "c": 30})), &none(), t(3))
        .unwrap();
    m.flush(t(3)).unwrap();
    assert_eq!(change(m).len(), 2);
    // a set then replaces the field the update wrote (one delete) and the whole value
    m.set("k", obj(json!({"z": 1})), &none(), t(4)).unwrap();
    m.flush(t(4)).unwrap();
    assert_eq!(change(m).len(), 3);
    assert_eq!(m.get("k", t(4)).unwrap().data, obj(json!({"z": 1})));
}

#[test]
fn limits_give_typed_errors() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let err = m
        .set(&"k".repeat(321), obj(json!({})), &none(), t(1))
        .unwrap_err();
    assert_eq!(err.code(), 54209);
    let err = m.set("", obj(json!({})), &none(), t(1)).unwrap_err();
    assert_eq!(err.code(), 54209);
    let huge = obj(json!({"x": "y".repeat(17 * 1024)}));
    let err = m.set("k", huge.clone(), &none(), t(1)).unwrap_err();
    assert_eq!(err.code(), 54006);
    let err = m.update("k", huge, &none(), t(1)).unwrap_err();
    assert_eq!(err.code(), 54006);
    assert_eq!(Ttl::from_secs(31_536_001).unwrap_err().code(), 54011);
    assert!(m.get("k", t(1)).is_err(), "nothing was written");
    // keys of every shape
    for key in [
        "a/b/c",
        "x:y",
        "with space",
        "ünïcödé",
        "🎉",
        "\0",
        &"é".repeat(320),
    ] {
        m.set(key, obj(json!({"k": key})), &none(), t(2)).unwrap();
        assert_eq!(m.get(key, t(2)).unwrap().data["k"], key);
    }
    let mut cat = Catalog::new(m_identity(2));
    let sid_like = format!("MP{}", "ab".repeat(16));
    let err = cat
        .open(
            &MapSpec::named(sid_like).mode(OpenMode::CreateNew),
            [0; 16],
            t(0),
        )
        .unwrap_err();
    assert_eq!(
        err.code(),
        54200,
        "a sid-shaped id opens by sid, never creates"
    );
    let err = cat.open(&MapSpec::named(""), [0; 16], t(0)).unwrap_err();
    assert_eq!(err.code(), 54302);
    let err = cat
        .open(&MapSpec::named("n".repeat(321)), [0; 16], t(0))
        .unwrap_err();
    assert_eq!(err.code(), 54302);
}

#[test]
fn open_modes() {
    let mut cat = Catalog::new(m_identity(1));
    let err = cat
        .open(
            &MapSpec::named("users").mode(OpenMode::OpenExisting),
            [0; 16],
            t(0),
        )
        .unwrap_err();
    assert_eq!(err.code(), 54200);
    let (m, created) = cat
        .open(
            &MapSpec::named("users").mode(OpenMode::CreateNew),
            [0; 16],
            t(0),
        )
        .unwrap();
    assert!(created);
    let sid = m.sid().clone();
    assert_eq!(sid, MapSid::for_name("users"));
    let err = cat
        .open(
            &MapSpec::named("users").mode(OpenMode::CreateNew),
            [0; 16],
            t(1),
        )
        .unwrap_err();
    assert_eq!(err.code(), 54301);
    let (_, created) = cat.open(&MapSpec::named("users"), [0; 16], t(1)).unwrap();
    assert!(!created);
    let (m, _) = cat
        .open(
            &MapSpec::named(sid.as_str()).mode(OpenMode::OpenExisting),
            [0; 16],
            t(1),
        )
        .unwrap();
    assert_eq!(m.unique_name(), Some("users"));
    // unnamed maps get a random sid
    let (anon, _) = cat.open(&MapSpec::default(), [7; 16], t(1)).unwrap();
    assert_eq!(anon.sid(), &MapSid::from_random([7; 16]));
    assert_eq!(anon.unique_name(), None);
    assert_eq!(cat.list(t(1)).len(), 2);
}

#[test]
fn item_ttl_hides_at_once_and_expires_once() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    let ttl = WriteOptions::ttl(Ttl::from_secs(10).unwrap());
    let item = peers[0]
        .map("m")
        .set("k", obj(json!({"v": 1})), &ttl, t(0))
        .unwrap();
    assert_eq!(item.date_expires, Some(t(10_000)));
    sync_all(&mut peers, t(1));
    assert!(peers[1].map("m").get("k", t(9_999)).is_ok());
    // invisible at once, before anyone runs expire
    for p in peers.iter_mut() {
        let m = p.map("m");
        assert_eq!(m.get("k", t(10_000)).unwrap_err().code(), 54201);
        assert!(m
            .items(&PageRequest::default(), t(10_000))
            .unwrap()
            .items
            .is_empty());
    }
    // both replicas notice the expiry and both write the delete
    assert_eq!(peers[0].map("m").expire(t(10_001)), 1);
    assert_eq!(peers[1].map("m").expire(t(10_002)), 1);
    sync_all(&mut peers, t(10_003));
    for p in peers.iter_mut() {
        let removed = p
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::ItemRemoved { .. }))
            .count();
        assert_eq!(removed, 1, "exactly one removal event per replica");
        let c = p.map("m").take_outgoing();
        assert!(c.is_empty());
    }
    // no conflict left behind: a new write of the key is a plain create
    let again = peers[1]
        .map("m")
        .set("k", obj(json!({"v": 2})), &none(), t(20_000))
        .unwrap();
    sync_all(&mut peers, t(20_000));
    assert_eq!(peers[0].map("m").get("k", t(20_000)).unwrap(), again);
    // a TTL of 0 clears expiry
    let cleared = peers[0]
        .map("m")
        .set_item_ttl("k", Ttl::from_secs(0).unwrap(), t(20_001))
        .unwrap();
    assert_eq!(cleared.date_expires, None);
}

#[test]
fn map_ttl_and_removal() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    let spec = MapSpec::named("tmp").ttl(Ttl::from_secs(5).unwrap());
    peers[0].cat.open(&spec, [0; 16], t(0)).unwrap();
    peers[0]
        .map("tmp")
        .set("a", obj(json!({})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(1));
    assert_eq!(
        peers[1].map("tmp").info(t(1)).unwrap().date_expires,
        Some(t(5_000))
    );
    // expired: invisible at once
    assert!(peers[1].cat.get_mut("tmp", t(5_000)).is_err());
    let err = peers[1]
        .map("tmp")
        .set("b", obj(json!({})), &none(), t(5_000))
        .unwrap_err();
    assert_eq!(err.code(), 54200);
    peers[0].map("tmp").expire(t(5_001));
    peers[1].map("tmp").expire(t(5_002));
    sync_all(&mut peers, t(5_003));
    for p in peers.iter() {
        let n = p
            .events
            .iter()
            .filter(|e| e.kind == EventKind::MapRemoved)
            .count();
        assert_eq!(n, 1);
    }

    // explicit removal replicates and refuses writes
    peers[0].open("users", t(6_000));
    peers[0]
        .map("users")
        .set("a", obj(json!({"x": 1})), &none(), t(6_000))
        .unwrap();
    sync_all(&mut peers, t(6_000));
    peers[1].map("users").remove_map(t(6_001)).unwrap();
    sync_all(&mut peers, t(6_002));
    for p in peers.iter_mut() {
        let err = p
            .map("users")
            .set("b", obj(json!({})), &none(), t(6_003))
            .unwrap_err();
        assert_eq!(err, Error::MapRemoved("users".into()));
        let last = p.events.last().unwrap();
        assert_eq!(last.kind, EventKind::MapRemoved);
    }
    // map removal events: local on the remover, merged on the other
    assert!(peers[1].events.last().unwrap().is_local);
    assert!(!peers[0].events.last().unwrap().is_local);
}

#[test]
fn set_ttl_on_map() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let info = m.set_ttl(Ttl::from_secs(60).unwrap(), t(1_000)).unwrap();
    assert_eq!(info.date_expires, Some(t(61_000)));
    let info = m.set_ttl(Ttl::from_secs(0).unwrap(), t(2_000)).unwrap();
    assert_eq!(info.date_expires, None);
    assert!(m.is_live(t(1_000_000)));
}

#[test]
fn concurrent_updates_of_different_fields_keep_both() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"a": 0, "b": 0})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    peers[0]
        .map("m")
        .update("k", obj(json!({"a": 1})), &none(), t(1))
        .unwrap();
    peers[1]
        .map("m")
        .update("k", obj(json!({"b": 2})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    let a = peers[0].map("m").get("k", t(2)).unwrap();
    let b = peers[1].map("m").get("k", t(2)).unwrap();
    assert_eq!(a.data, obj(json!({"a": 1, "b": 2})));
    assert_eq!(a, b);
}

#[test]
fn concurrent_creates_of_one_item_merge_fields() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    sync_all(&mut peers, t(0));
    peers[0]
        .map("m")
        .update("k", obj(json!({"a": 1})), &none(), t(1))
        .unwrap();
    peers[1]
        .map("m")
        .update("k", obj(json!({"b": 2})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    let a = peers[0].map("m").get("k", t(2)).unwrap();
    assert_eq!(a.data, obj(json!({"a": 1, "b": 2})));
    assert_eq!(a, peers[1].map("m").get("k", t(2)).unwrap());
}

#[test]
fn same_field_converges_and_conflicts_are_readable() {
    let mut peers = [Peer::new(1), Peer::new(2), Peer::new(3)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"c": "UK"})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    for (i, v) in ["FR", "DE", "ES"].iter().enumerate() {
        peers[i]
            .map("m")
            .update("k", obj(json!({"c": v})), &none(), t(1))
            .unwrap();
    }
    sync_all(&mut peers, t(2));
    let items: Vec<_> = peers
        .iter_mut()
        .map(|p| p.map("m").get("k", t(2)).unwrap())
        .collect();
    assert!(items.windows(2).all(|w| w[0] == w[1]), "{items:?}");
    let conflicts: Vec<_> = peers
        .iter_mut()
        .map(|p| p.map("m").conflicts("k", t(2)).unwrap())
        .collect();
    assert!(conflicts.windows(2).all(|w| w[0] == w[1]));
    let vals = &conflicts[0].fields["c"];
    assert_eq!(vals.len(), 3);
    assert_eq!(vals[0], items[0].data["c"], "the visible value comes first");
    assert_eq!(conflicts[0].writers.len(), 3);
    // a later write resolves the conflict everywhere
    peers[0]
        .map("m")
        .update("k", obj(json!({"c": "IT"})), &none(), t(3))
        .unwrap();
    sync_all(&mut peers, t(3));
    for p in peers.iter_mut() {
        let c = p.map("m").conflicts("k", t(3)).unwrap();
        assert!(c.fields.is_empty());
        assert_eq!(c.writers.len(), 1);
    }
}

#[test]
fn concurrent_sets_resolve_as_a_unit() {
    let mut peers = [Peer::new(1), Peer::new(2), Peer::new(3)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set(
            "k",
            obj(json!({"n": 1, "node": 9, "seq": 1, "word": "oak", "old": true})),
            &none(),
            t(0),
        )
        .unwrap();
    sync_all(&mut peers, t(0));
    let written = [
        json!({"n": 673650, "node": 4, "seq": 16, "word": "pine"}),
        json!({"n": 621131, "node": 0, "seq": 49, "word": "elm"}),
        json!({"word": "ash"}),
    ];
    // a set, a mutate and a remove-then-create, concurrently on three replicas
    peers[0]
        .map("m")
        .set("k", obj(written[0].clone()), &none(), t(1))
        .unwrap();
    peers[1]
        .map("m")
        .mutate("k", &none(), t(1), |_| Some(obj(written[1].clone())))
        .unwrap();
    peers[2].map("m").remove("k", None, t(1)).unwrap();
    peers[2]
        .map("m")
        .create_item("k", obj(written[2].clone()), None, t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    let items: Vec<_> = peers
        .iter_mut()
        .map(|p| p.map("m").get("k", t(2)).unwrap())
        .collect();
    assert!(items.windows(2).all(|w| w[0] == w[1]), "{items:?}");
    let data = serde_json::Value::Object(items[0].data.clone());
    assert!(
        written.contains(&data),
        "{data} is none of the values written"
    );
    // the losing values stay readable, the visible one first, the same on every replica
    let conflicts: Vec<_> = peers
        .iter_mut()
        .map(|p| p.map("m").conflicts("k", t(2)).unwrap())
        .collect();
    assert!(conflicts.windows(2).all(|w| w[0] == w[1]));
    let values: Vec<serde_json::Value> = conflicts[0]
        .values
        .iter()
        .map(|v| serde_json::Value::Object(v.clone()))
        .collect();
    assert_eq!(values.len(), 3, "{values:?}");
    assert_eq!(values[0], data);
    assert!(written.iter().all(|w| values.contains(w)));
    // the next whole write resolves it
    peers[1]
        .map("m")
        .set("k", obj(json!({"n": 2})), &none(), t(3))
        .unwrap();
    sync_all(&mut peers, t(3));
    for p in peers.iter_mut() {
        assert_eq!(
            p.map("m").get("k", t(3)).unwrap().data,
            obj(json!({"n": 2}))
        );
        assert!(p.map("m").conflicts("k", t(3)).unwrap().values.is_empty());
    }
}

#[test]
fn an_update_concurrent_with_a_set_is_merged_on_top_and_a_later_set_replaces_it() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"a": 0, "b": 0, "c": 0})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"a": 1})), &none(), t(1))
        .unwrap();
    peers[1]
        .map("m")
        .update("k", obj(json!({"b": 2, "d": 2})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    for p in peers.iter_mut() {
        // the set's value whole (c is gone: the set saw it), the update's fields on top
        assert_eq!(
            p.map("m").get("k", t(2)).unwrap().data,
            obj(json!({"a": 1, "b": 2, "d": 2}))
        );
    }
    // a set that saw the update replaces its fields too
    peers[1]
        .map("m")
        .set("k", obj(json!({"e": 5})), &none(), t(3))
        .unwrap();
    sync_all(&mut peers, t(3));
    for p in peers.iter_mut() {
        assert_eq!(
            p.map("m").get("k", t(3)).unwrap().data,
            obj(json!({"e": 5}))
        );
    }
}

#[test]
fn items_written_by_the_field_per_slot_layout_read_the_same_and_are_upgraded_by_a_set() {
    // What syncmesh wrote before whole values existed: a meta record and one slot per field.
    use automerge::transaction::Transactable;
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    let key = "old";
    let mut meta = vec![1u8];
    for v in [5, t(1_000).millis(), t(2_000).millis()] {
        meta.extend_from_slice(&(v as u64).to_le_bytes());
    }
    meta.push(0);
    meta.extend_from_slice(&0u64.to_le_bytes());
    meta.extend_from_slice(&[7; 32]);
    let mut doc = automerge::AutoCommit::new();
    doc.put(
        automerge::ROOT,
        format!("m3:{key}"),
        automerge::ScalarValue::Bytes(meta),
    )
    .unwrap();
    doc.put(automerge::ROOT, format!("f3:{key}name"), "Ada")
        .unwrap();
    let list = doc
        .put_object(
            automerge::ROOT,
            format!("f3:{key}tags"),
            automerge::ObjType::List,
        )
        .unwrap();
    doc.insert(&list, 0, "x").unwrap();
    let bytes: Vec<Vec<u8>> = doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let index = syncmesh_core::layout::shard_of(key);
    m.apply_changes(
        DocAddr::Shard {
            gen: 0,
            inc: 0,
            index,
        },
        &bytes,
        t(3),
    )
    .unwrap();
    let item = m.get(key, t(3)).unwrap();
    assert_eq!(item.data, obj(json!({"name": "Ada", "tags": ["x"]})));
    assert_eq!(item.date_created, t(1_000));
    // an update adds a field slot; a set turns the item into a whole value
    m.update(key, obj(json!({"age": 36})), &none(), t(4))
        .unwrap();
    assert_eq!(
        m.get(key, t(4)).unwrap().data,
        obj(json!({"name": "Ada", "tags": ["x"], "age": 36}))
    );
    m.set(key, obj(json!({"name": "Grace"})), &none(), t(5))
        .unwrap();
    m.flush(t(5)).unwrap();
    let docs = m.save_all(t(5)).unwrap();
    let loaded = MapReplica::load(m_identity(1), MapSid::for_name("m"), &docs, t(5)).unwrap();
    assert_eq!(
        loaded.get(key, t(5)).unwrap().data,
        obj(json!({"name": "Grace"}))
    );
    assert_eq!(loaded.get(key, t(5)).unwrap(), m.get(key, t(5)).unwrap());
}

#[test]
fn remove_concurrent_with_update_keeps_the_update() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("k", obj(json!({"a": 1, "b": 1})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    peers[0].map("m").remove("k", None, t(1)).unwrap();
    peers[1]
        .map("m")
        .update("k", obj(json!({"b": 2})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    for p in peers.iter_mut() {
        let item = p.map("m").get("k", t(2)).unwrap();
        assert_eq!(
            item.data,
            obj(json!({"b": 2})),
            "the update survives; removed fields stay removed"
        );
    }
}

#[test]
fn remove_map_wins_over_concurrent_writes_and_recreate_starts_fresh() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set("old", obj(json!({})), &none(), t(0))
        .unwrap();
    sync_all(&mut peers, t(0));
    peers[0].map("m").remove_map(t(1)).unwrap();
    peers[1]
        .map("m")
        .set("late", obj(json!({"x": 1})), &none(), t(1))
        .unwrap();
    sync_all(&mut peers, t(2));
    for p in peers.iter_mut() {
        assert!(!p.map("m").is_live(t(2)));
    }
    // re-create under the same name: same sid, new incarnation, nothing of the old one
    let (m, created) = peers[1]
        .cat
        .open(&MapSpec::named("m"), [0; 16], t(3))
        .unwrap();
    assert!(created);
    assert_eq!(m.incarnation(), 1);
    m.set("new", obj(json!({})), &none(), t(3)).unwrap();
    sync_all(&mut peers, t(4));
    for p in peers.iter_mut() {
        let keys: Vec<_> = p
            .map("m")
            .all_items(t(4))
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["new"]);
    }
}

#[test]
fn same_unique_name_created_apart_is_one_map() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("shared", t(0));
    peers[0]
        .map("shared")
        .set("from_a", obj(json!({"a": 1})), &none(), t(0))
        .unwrap();
    peers[1].open("shared", t(5));
    peers[1]
        .map("shared")
        .set("from_b", obj(json!({"b": 1})), &none(), t(5))
        .unwrap();
    sync_all(&mut peers, t(6));
    for p in peers.iter_mut() {
        assert_eq!(p.cat.list(t(6)).len(), 1);
        let keys: Vec<_> = p
            .map("shared")
            .all_items(t(6))
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["from_a", "from_b"]);
    }
    let a = peers[0].map("shared").info(t(6)).unwrap();
    let b = peers[1].map("shared").info(t(6)).unwrap();
    assert_eq!(a.date_created, b.date_created, "one creation wins on both");
}

#[test]
fn clock_skew_dates_come_from_the_writer() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    sync_all(&mut peers, t(0));
    // peer 1's clock is an hour ahead: its TTL runs from its own clock
    let skewed = t(3_600_000);
    let ttl = WriteOptions::ttl(Ttl::from_secs(60).unwrap());
    let item = peers[1]
        .map("m")
        .set("k", obj(json!({})), &ttl, skewed)
        .unwrap();
    assert_eq!(item.date_expires, Some(t(3_660_000)));
    sync_all(&mut peers, t(1));
    let seen = peers[0].map("m").get("k", t(1)).unwrap();
    assert_eq!(seen.date_updated, skewed);
    assert_eq!(seen.date_expires, item.date_expires);
    // a replica whose clock is behind still writes a newer revision
    let older_clock = t(-1_000_000);
    let r = peers[0]
        .map("m")
        .update("k", obj(json!({"v": 1})), &none(), older_clock)
        .unwrap();
    sync_all(&mut peers, t(2));
    assert_eq!(
        peers[1].map("m").get("k", skewed).unwrap().revision,
        r.revision
    );
}

#[test]
fn paging_in_both_orders_with_tokens() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    for i in 0..25 {
        m.set(&format!("k{i:02}"), obj(json!({"i": i})), &none(), t(0))
            .unwrap();
    }
    let keys =
        |items: &[syncmesh_core::Item]| items.iter().map(|i| i.key.clone()).collect::<Vec<_>>();
    let mut req = PageRequest {
        page_size: Some(10),
        ..Default::default()
    };
    let p1 = m.items(&req, t(0)).unwrap();
    assert_eq!(keys(&p1.items)[0], "k00");
    assert_eq!(p1.items.len(), 10);
    assert!(p1.prev_token.is_none());
    req.token = p1.next_token.clone();
    let p2 = m.items(&req, t(0)).unwrap();
    assert_eq!(keys(&p2.items)[0], "k10");
    // the map changes between calls: removals and inserts around the cursor
    m.remove("k20", None, t(1)).unwrap();
    m.set("k195", obj(json!({})), &none(), t(1)).unwrap();
    m.set("k05x", obj(json!({})), &none(), t(1)).unwrap();
    req.token = p2.next_token.clone();
    let p3 = m.items(&req, t(1)).unwrap();
    assert_eq!(keys(&p3.items), ["k195", "k21", "k22", "k23", "k24"]);
    assert!(p3.next_token.is_none());
    // previous page from p3
    req.token = p3.prev_token.clone();
    let back = m.items(&req, t(1)).unwrap();
    assert_eq!(keys(&back.items), keys(&p2.items));

    // descending, from a key, exclusive
    let d = m
        .items(
            &PageRequest {
                order: Order::Desc,
                from: Some("k10".into()),
                bounds: Bounds::Exclusive,
                page_size: Some(3),
                token: None,
            },
            t(1),
        )
        .unwrap();
    assert_eq!(keys(&d.items), ["k09", "k08", "k07"]);
    let d2 = m
        .items(
            &PageRequest {
                token: d.next_token.clone(),
                page_size: Some(3),
                ..Default::default()
            },
            t(1),
        )
        .unwrap();
    assert_eq!(keys(&d2.items), ["k06", "k05x", "k05"]);
    let inc = m
        .items(
            &PageRequest {
                from: Some("k10".into()),
                page_size: Some(1),
                ..Default::default()
            },
            t(1),
        )
        .unwrap();
    assert_eq!(keys(&inc.items), ["k10"]);

    assert_eq!(
        m.items(
            &PageRequest {
                page_size: Some(0),
                ..Default::default()
            },
            t(1)
        )
        .unwrap_err()
        .code(),
        54455
    );
    assert_eq!(
        m.items(
            &PageRequest {
                page_size: Some(101),
                ..Default::default()
            },
            t(1)
        )
        .unwrap_err()
        .code(),
        54455
    );
    assert_eq!(
        m.items(&PageRequest::default(), t(1)).unwrap().items.len(),
        26
    );
    let bad = PageRequest {
        token: Some("not a token".into()),
        ..Default::default()
    };
    assert_eq!(m.items(&bad, t(1)).unwrap_err().code(), 54455);
}

#[test]
fn events_are_exact_and_numbered() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    let m = peers[0].map("m");
    m.set("a", obj(json!({"v": 1})), &none(), t(1)).unwrap();
    m.update("a", obj(json!({"v": 2})), &none(), t(2)).unwrap();
    m.set("b", obj(json!({})), &none(), t(3)).unwrap();
    m.remove("b", None, t(4)).unwrap();
    sync_all(&mut peers, t(5));
    let ev0: Vec<_> = peers[0].events.iter().map(|e| (e.id, e.is_local)).collect();
    assert_eq!(ev0, [(1, true), (2, true), (3, true), (4, true)]);
    match &peers[0].events[1].kind {
        EventKind::ItemUpdated {
            item,
            previous_data,
        } => {
            assert_eq!(previous_data, &obj(json!({"v": 1})));
            assert_eq!(item.data, obj(json!({"v": 2})));
        }
        other => panic!("unexpected {other:?}"),
    }
    // peer 1 received one batch: the net effect, all merged
    assert!(peers[1].events.iter().all(|e| !e.is_local));
    let ids: Vec<_> = peers[1].events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1) && ids[0] == 1);
    for p in peers.iter_mut() {
        let rebuilt = p.event_view("m");
        let items = p.map("m").all_items(t(5));
        assert_eq!(rebuilt.items.into_values().collect::<Vec<_>>(), items);
    }
    // duplicates change nothing and emit nothing
    let again: Vec<_> = peers[0].map("m").save_all(t(6)).unwrap();
    for (doc, bytes) in again {
        let _ = (doc, bytes);
    }
    let before = peers[1].events.len();
    let sent = peers[0].sent.clone();
    peers[1].receive(&sent, t(7));
    assert_eq!(peers[1].events.len(), before);
}

#[test]
fn garbage_from_a_peer_is_refused_and_changes_nothing() {
    let mut p = Peer::new(1);
    let m = p.open("m", t(0));
    m.set("k", obj(json!({"v": 1})), &none(), t(0)).unwrap();
    m.flush(t(0)).unwrap();
    let before = m.all_items(t(0));
    let shard = DocAddr::Shard {
        gen: 0,
        inc: 0,
        index: 3,
    };
    for junk in [vec![], vec![0u8; 10], b"\x85\x6f\x4a\x83garbage".to_vec()] {
        let err = m
            .apply_changes(shard, std::slice::from_ref(&junk), t(1))
            .unwrap_err();
        assert_eq!(err.code(), 54007, "{err}");
        assert!(m.apply_changes(DocAddr::Meta, &[junk], t(1)).is_err());
    }
    let err = m
        .apply_changes(
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 9999,
            },
            &[],
            t(1),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidChange(_)));
    // a well-formed change with slots that are not ours: ignored, nothing breaks
    let mut foreign = automerge::AutoCommit::new();
    use automerge::transaction::Transactable;
    foreign
        .put(automerge::ROOT, "m1:z", "not meta bytes")
        .unwrap();
    foreign.put(automerge::ROOT, "random", 1).unwrap();
    foreign.put(automerge::ROOT, "f1:zfield", 1).unwrap();
    let bytes: Vec<Vec<u8>> = foreign
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let idx = syncmesh_core::layout::shard_of("z");
    m.apply_changes(
        DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: idx,
        },
        &bytes,
        t(1),
    )
    .unwrap();
    assert_eq!(m.all_items(t(1)), before);
    assert!(m.get("z", t(1)).is_err());
}

#[test]
fn revisions_are_identical_across_replicas_and_survive_reload() {
    let mut peers = [Peer::new(1), Peer::new(2)];
    peers[0].open("m", t(0));
    peers[0]
        .map("m")
        .set(
            "k",
            obj(json!({"a": [1, {"b": null}], "s": "x"})),
            &none(),
            t(0),
        )
        .unwrap();
    sync_all(&mut peers, t(0));
    let a = peers[0].map("m").get("k", t(0)).unwrap();
    let b = peers[1].map("m").get("k", t(0)).unwrap();
    assert_eq!(a, b);
    let docs = peers[1].map("m").save_all(t(0)).unwrap();
    let loaded = MapReplica::load(m_identity(2), MapSid::for_name("m"), &docs, t(0)).unwrap();
    assert_eq!(loaded.get("k", t(0)).unwrap(), a);
}
