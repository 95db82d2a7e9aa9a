//! The replication protocol without a network: nodes exchange [`Wire`] messages through an
//! in-memory queue that can drop, and every scenario must end with identical maps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use serde_json::json;
use syncmesh_core::replication::{changes_messages, Wire};
use syncmesh_core::{DocAddr, Identity, MapReplica, MapSid, NodeId};

#[path = "support/wire_net.rs"]
mod wire_net;
use wire_net::*;

#[test]
fn a_late_peer_catches_up_and_sees_remote_events() {
    let mut net = Net::new(&["a", "b"], &[]);
    for i in 0..300 {
        write(&mut net, "a", "users", &format!("k_{i}"), json!({"n": i}));
    }
    net.flush();
    // B holds the map (opened it empty) and connects only now.
    net.node("b").host.insert(MapReplica::empty(
        Identity::new(NodeId([2; 16]), b"b"),
        MapSid::for_name("users"),
    ));
    net.connect("a", "b");
    net.run();
    assert_eq!(net.items("a", "users"), net.items("b", "users"));
    assert_eq!(net.items("b", "users").len(), 300);
    assert_eq!(net.digest("a", "users"), net.digest("b", "users"));
    let b_events = &net.node("b").events;
    let added = b_events
        .iter()
        .filter(|e| matches!(e.kind, syncmesh_core::EventKind::ItemAdded { .. }))
        .count();
    assert_eq!(added, 300, "one added event per item, exactly once");
    assert!(b_events.iter().all(|e| !e.is_local));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn a_catch_up_carries_each_change_once() {
    // Both sides open their sessions at once and each answers the other's first message,
    // both saying B holds nothing: Automerge alone would send every change twice.
    let mut net = Net::new(&["a", "b"], &[]);
    for i in 0..200 {
        write(&mut net, "a", "users", &format!("k_{i}"), json!({"n": i}));
    }
    net.flush();
    net.node("b").host.insert(MapReplica::empty(
        Identity::new(NodeId([2; 16]), b"b"),
        MapSid::for_name("users"),
    ));
    net.connect("a", "b");
    net.run();
    assert_eq!(net.items("b", "users").len(), 200);
    let to_b: Vec<_> = net.carried.iter().filter(|(_, to, _)| to == "b").collect();
    let distinct: std::collections::HashSet<_> = to_b.iter().map(|(_, _, h)| h).collect();
    // One change per shard written (the writes were flushed together), and the map document's.
    assert!(distinct.len() > 150, "{} changes carried", distinct.len());
    assert_eq!(to_b.len(), distinct.len(), "a change was carried twice");
}

#[test]
fn gossip_spreads_writes_and_lost_messages_are_fetched() {
    let mut net = Net::new(&["a", "b", "c"], &[]);
    for n in ["a", "b", "c"] {
        write(&mut net, n, "users", &format!("from_{n}"), json!({"x": 1}));
    }
    net.connect("a", "b");
    net.connect("b", "c");
    net.run();
    // Line topology: A's writes reach C through B.
    net.drop_every = 3;
    for i in 0..60 {
        let n = ["a", "b", "c"][i % 3];
        write(
            &mut net,
            n,
            "users",
            &format!("k_{}", i % 7),
            json!({"by": n, "i": i}),
        );
        net.run();
    }
    net.drop_every = 0;
    // Some gossip was lost; missing dependencies were fetched on the next change, and an
    // anti-entropy round repairs whatever is left.
    net.tick();
    let a = net.items("a", "users");
    assert_eq!(a, net.items("b", "users"));
    assert_eq!(a, net.items("c", "users"));
    assert_eq!(a.len(), 10);
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn partition_heals_to_identical_state() {
    let mut net = Net::new(&["a", "b", "c"], &[]);
    write(&mut net, "a", "users", "x", json!({"v": 0}));
    net.connect("a", "b");
    net.connect("b", "c");
    net.connect("a", "c");
    hold(&mut net, "b", "users");
    hold(&mut net, "c", "users");
    net.run();
    assert_eq!(net.items("c", "users").len(), 1);
    net.disconnect("a", "c");
    net.disconnect("b", "c");
    for i in 0..20 {
        write(
            &mut net,
            "a",
            "users",
            &format!("k{i}"),
            json!({"side": "ab", "i": i}),
        );
        write(
            &mut net,
            "c",
            "users",
            &format!("k{i}"),
            json!({"side": "c", "i": i}),
        );
        write(
            &mut net,
            "c",
            "users",
            &format!("c_only{i}"),
            json!({"i": i}),
        );
    }
    net.run();
    assert_ne!(net.items("a", "users"), net.items("c", "users"));
    net.connect("b", "c");
    net.run();
    let a = net.items("a", "users");
    assert_eq!(a, net.items("b", "users"));
    assert_eq!(a, net.items("c", "users"));
    assert_eq!(a.len(), 41);
}

#[test]
fn removal_and_recreation_spread() {
    let mut net = Net::new(&["a", "b"], &[]);
    write(&mut net, "a", "users", "x", json!({"v": 1}));
    net.connect("a", "b");
    // B opens the map by name and receives it.
    hold(&mut net, "b", "users");
    net.run();
    assert_eq!(net.items("b", "users").len(), 1);
    net.node("a")
        .host
        .get_mut("users", now())
        .unwrap()
        .remove_map(now())
        .unwrap();
    net.run();
    let b = net.node("b");
    assert!(b.host.get_mut("users", now()).is_err(), "removed on B too");
    assert!(b
        .events
        .iter()
        .any(|e| matches!(e.kind, syncmesh_core::EventKind::MapRemoved) && !e.is_local));
    write(&mut net, "b", "users", "y", json!({"v": 2}));
    net.run();
    assert_eq!(net.items("a", "users"), net.items("b", "users"));
    assert_eq!(net.items("a", "users").len(), 1);
}

#[test]
fn hold_all_nodes_adopt_every_map() {
    let mut net = Net::new(&["a", "backup"], &["backup"]);
    for m in ["one", "two", "three"] {
        write(&mut net, "a", m, "k", json!({"map": m}));
    }
    net.flush();
    net.connect("a", "backup");
    net.run();
    for m in ["one", "two", "three"] {
        assert_eq!(net.items("backup", m), net.items("a", m));
        assert_eq!(net.items("backup", m).len(), 1);
    }
    // A map created later reaches it through the next anti-entropy round.
    write(&mut net, "a", "four", "k", json!({}));
    net.run();
    net.tick();
    assert_eq!(net.items("backup", "four").len(), 1);
}

#[test]
fn hostile_input_is_a_violation_and_changes_nothing() {
    let mut net = Net::new(&["a", "b"], &[]);
    write(&mut net, "a", "users", "x", json!({"v": 1}));
    net.connect("a", "b");
    net.run();
    let before = net.items("a", "users");
    let sid = MapSid::for_name("users");
    let node = net.node("a");
    // Garbage, truncated and oversized input.
    for bytes in [
        vec![0xff; 10],
        vec![],
        Wire::Hello {
            hold_all: false,
            maps: vec![],
        }
        .encode()[..1]
            .to_vec(),
    ] {
        assert!(
            node.rep
                .receive("b", &bytes, &mut node.host, now())
                .is_err()
                || bytes.len() == 1
        );
    }
    assert!(node
        .rep
        .receive("b", &vec![0; 33 << 20], &mut node.host, now())
        .is_err());
    // A well-formed Automerge change writing a slot that belongs in another shard.
    let mut doc = automerge::AutoCommit::new();
    use automerge::transaction::Transactable;
    let misplaced_key = "m5:david"; // "david" lives in shard 688
    doc.put(automerge::ROOT, misplaced_key, 1).unwrap();
    let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
    let (msgs, _) = changes_messages(
        &sid,
        vec![(
            DocAddr::Shard {
                gen: 0,
                inc: 0,
                index: 3,
            },
            change.clone(),
        )],
        &Default::default(),
    );
    let err = node
        .rep
        .receive("b", &msgs[0], &mut node.host, now())
        .unwrap_err();
    assert!(err.0.contains("does not belong"), "{err}");
    // A change writing an unknown field of the map document.
    let mut meta = automerge::AutoCommit::new();
    meta.put(automerge::ROOT, "owner", "mallory").unwrap();
    let c = meta.get_last_local_change().unwrap().raw_bytes().to_vec();
    let (msgs, _) = changes_messages(&sid, vec![(DocAddr::Meta, c)], &Default::default());
    assert!(node
        .rep
        .receive("b", &msgs[0], &mut node.host, now())
        .is_err());
    // A malformed sid.
    let bad = postcard_bad_sid();
    assert!(node.rep.receive("b", &bad, &mut node.host, now()).is_err());
    assert_eq!(net.items("a", "users"), before);
}

fn postcard_bad_sid() -> Vec<u8> {
    // A Docs message naming a sid that is not of the sid shape.
    let good = Wire::Docs {
        sid: MapSid::for_name("users"),
        docs: vec![],
    }
    .encode();
    let mut bad = good.clone();
    // The sid text starts after the variant tag and the length byte: break its "MP" prefix.
    bad[2] = b'X';
    bad
}

/// A node fetching a map learns at once when no peer has it (each answers "none of it"), but
/// not while a peer that holds it has yet to answer.
#[test]
fn a_fetch_learns_when_no_peer_has_the_map() {
    let mut net = Net::new(&["a", "b", "c"], &[]);
    net.connect("a", "b");
    net.connect("a", "c");
    net.run();
    write(&mut net, "c", "exists", "k", json!({"v": 1}));
    net.run();
    let missing = MapSid::for_name("missing");
    hold(&mut net, "a", "missing");
    net.run();
    assert!(net.node("a").rep.nobody_has(&missing));
    // A map that one peer has: the other's "none" does not end the fetch, the holder syncs it.
    hold(&mut net, "a", "exists");
    net.run();
    assert!(!net.node("a").rep.nobody_has(&MapSid::for_name("exists")));
    assert_eq!(net.items("a", "exists").len(), 1);
    // Asked again later, earlier "none" answers do not count: the question is asked anew
    // (they once ended a second fetch at once, although the map had appeared meanwhile).
    let out = {
        let node = net.node("a");
        node.rep
            .announce(std::slice::from_ref(&missing), &mut node.host)
    };
    assert!(!net.node("a").rep.nobody_has(&missing), "no answer yet");
    net.send("a", out);
    net.run();
    assert!(net.node("a").rep.nobody_has(&missing));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn grants_limit_what_a_peer_receives_and_may_change() {
    use syncmesh_core::replication::Grant;
    // B may read "shared" only and write nothing; C has every map. B holds every map it hears
    // of, so anything named to it would be adopted.
    let mut net = Net::new(&["a", "b", "c"], &["b"]);
    let peer_id = net.id("b");
    net.node("a").rep.set_grant(
        &peer_id,
        Grant {
            maps: Some([MapSid::for_name("shared")].into_iter().collect()),
            write: false,
        },
    );
    write(&mut net, "a", "shared", "a1", json!({"v": 1}));
    write(&mut net, "a", "private", "p", json!({"secret": 1}));
    net.connect("a", "b");
    net.connect("a", "c");
    hold(&mut net, "c", "shared");
    hold(&mut net, "c", "private");
    net.run();
    assert_eq!(
        net.items("b", "shared").len(),
        1,
        "B receives the shared map"
    );
    assert!(
        net.node("b")
            .host
            .by_sid(&MapSid::for_name("private"))
            .is_none(),
        "the private map is never named to B"
    );
    assert_eq!(net.items("c", "private").len(), 1, "C receives everything");
    // B writes: A refuses, so neither A nor C (through A) ever has it.
    write(&mut net, "b", "shared", "b1", json!({"v": 2}));
    write(&mut net, "b", "private", "evil", json!({}));
    net.run();
    net.tick();
    let refusals = net.node("a").rep.take_refusals();
    assert!(
        refusals
            .iter()
            .any(|r| r.peer == net.id("b") && r.changes > 0),
        "{refusals:?}"
    );
    assert_eq!(net.items("a", "shared"), net.items("c", "shared"));
    assert!(net.items("a", "shared").iter().all(|(k, _, _)| k != "b1"));
    assert_eq!(net.items("a", "private").len(), 1);
    assert_eq!(net.items("c", "private").len(), 1);
    // B keeps its own write; A's later writes still reach it.
    write(&mut net, "a", "shared", "a2", json!({"v": 3}));
    net.run();
    let b: Vec<String> = net.items("b", "shared").into_iter().map(|i| i.0).collect();
    assert_eq!(b, vec!["a1", "a2", "b1"]);
    // Revoking read: nothing more of the map reaches B.
    let peer_id = net.id("b");
    net.node("a").rep.set_grant(
        &peer_id,
        Grant {
            maps: Some(Default::default()),
            write: false,
        },
    );
    write(&mut net, "a", "shared", "a3", json!({"v": 4}));
    net.run();
    net.tick();
    assert!(net.items("b", "shared").iter().all(|(k, _, _)| k != "a3"));
    assert!(net.items("c", "shared").iter().any(|(k, _, _)| k == "a3"));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn changes_are_passed_on_along_a_line() {
    // A - B - C: A's pushes reach C through B (B passes on what is new to it).
    let mut net = Net::new(&["a", "b", "c"], &[]);
    for n in ["a", "b", "c"] {
        hold(&mut net, n, "users");
    }
    net.connect("a", "b");
    net.connect("b", "c");
    net.run();
    write(&mut net, "a", "users", "k", json!({"v": 1}));
    // One delivery round, no anti-entropy: only pushes and relays.
    net.run();
    assert_eq!(net.items("c", "users").len(), 1);
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn map_permissions_travel_with_the_map_and_every_node_enforces_them() {
    use syncmesh_core::policy::{Permission, MANAGE, READ, WRITE};
    let perm = |id: &str, f: u8| Permission {
        identity: id.to_string(),
        read: f & READ != 0,
        write: f & WRITE != 0,
        manage: f & MANAGE != 0,
    };
    // A triangle; C holds every map it hears of, so anything named to it would be adopted.
    let mut net = Net::new(&["a", "b", "c"], &["c"]);
    let (a, b, c) = (net.id("a"), net.id("b"), net.id("c"));
    write(&mut net, "a", "m", "a0", json!({"v": 0}));
    let sid = MapSid::for_name("m");
    // Shared with B (read and write) only; A becomes its manager with the first entry.
    net.node("a")
        .host
        .by_sid(&sid)
        .unwrap()
        .set_permission(&perm(&b, READ | WRITE), &a, now())
        .unwrap();
    hold(&mut net, "b", "m");
    net.connect("a", "b");
    net.connect("b", "c");
    net.connect("a", "c");
    net.run();
    net.tick();
    assert_eq!(net.items("b", "m").len(), 1);
    assert!(
        net.node("c").host.by_sid(&sid).is_none(),
        "C is trusted by both but not listed: it never hears of the map"
    );
    // B writes; A accepts it and nothing reaches C through B either.
    write(&mut net, "b", "m", "b0", json!({"v": 1}));
    net.run();
    net.tick();
    assert_eq!(net.items("a", "m"), net.items("b", "m"));
    assert!(net.node("c").host.by_sid(&sid).is_none());
    // B may write but not manage: its own node refuses, and a forged entry is refused by A.
    let e = net
        .node("b")
        .host
        .by_sid(&sid)
        .unwrap()
        .set_permission(&perm(&c, READ | WRITE), &b, now())
        .unwrap_err();
    assert_eq!(e.code(), 20403, "{e}");
    {
        // A hand-made change from B that lists B as a manager is refused by A.
        use automerge::transaction::Transactable;
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, format!("p:{b}"), 7u64).unwrap();
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let msg = Wire::Changes {
            sigs: Vec::new(),
            sid: sid.clone(),
            docs: vec![(
                DocAddr::Meta,
                vec![syncmesh_core::replication::Bytes(change)],
            )],
        }
        .encode();
        let node = net.node("a");
        node.rep.receive(&b, &msg, &mut node.host, now()).unwrap();
        let refusals = node.rep.take_refusals();
        assert!(refusals.iter().any(|r| r.peer == b), "{refusals:?}");
        let pol = node.host.by_sid(&sid).unwrap().policy().clone();
        assert!(!pol.manages(&b), "the forged entry was not applied");
    }
    // C becomes a reader: it receives the map, and its writes stay with it.
    net.node("a")
        .host
        .by_sid(&sid)
        .unwrap()
        .set_permission(&perm(&c, READ), &a, now())
        .unwrap();
    net.run();
    net.tick();
    assert_eq!(net.items("c", "m"), net.items("a", "m"));
    write(&mut net, "c", "m", "c0", json!({"v": 2}));
    net.run();
    net.tick();
    assert!(net.items("a", "m").iter().all(|(k, _, _)| k != "c0"));
    assert!(net.items("b", "m").iter().all(|(k, _, _)| k != "c0"));
    let refused: u64 = ["a", "b"]
        .iter()
        .flat_map(|n| net.node(n).rep.take_refusals())
        .filter(|r| r.peer == c)
        .map(|r| r.changes)
        .sum();
    assert!(refused > 0, "A and B count C's refused changes");
    // Revoking C's read: A's later writes no longer reach it (nor through B).
    net.node("a")
        .host
        .by_sid(&sid)
        .unwrap()
        .remove_permission(&c, &a, now())
        .unwrap();
    net.run();
    net.tick();
    write(&mut net, "a", "m", "a1", json!({"v": 3}));
    net.run();
    net.tick();
    assert!(net.items("b", "m").iter().any(|(k, _, _)| k == "a1"));
    assert!(net.items("c", "m").iter().all(|(k, _, _)| k != "a1"));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

/// Found in review: a pushed change whose dependency was lost waits inside Automerge, and each
/// copy of it was taken as new and passed on again, forever (and stored again each time).
#[test]
fn a_change_waiting_for_its_dependencies_is_not_passed_on_forever() {
    let names = ["a", "b", "c", "d"];
    let mut net = Net::new(&names, &[]);
    write(&mut net, "a", "m", "k", json!({"v": 0}));
    for n in ["b", "c", "d"] {
        hold(&mut net, n, "m");
    }
    for (i, x) in names.iter().enumerate() {
        for y in &names[i + 1..] {
            net.connect(x, y);
        }
    }
    net.run();
    net.tick();
    assert_eq!(net.items("d", "m").len(), 1);
    // c1: every push of it is lost.
    write(&mut net, "a", "m", "k", json!({"v": 1}));
    net.drop_every = 1;
    net.flush();
    while net.queue.pop_front().is_some() {}
    net.drop_every = 0;
    // c2 depends on c1; A pushes it, then goes offline.
    write(&mut net, "a", "m", "k", json!({"v": 2}));
    net.flush();
    let pushes: Vec<Msg> = net.queue.drain(..).collect();
    for m in pushes {
        if let Msg::Push(from, to, bytes) = m {
            let from = net.id(&from);
            let node = net.node(&to);
            let out = node
                .rep
                .receive(&from, &bytes, &mut node.host, now())
                .unwrap();
            net.send(&to, out);
        }
    }
    for n in ["b", "c", "d"] {
        net.disconnect("a", n);
    }
    net.run(); // quiesces (it never did)
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

/// Found in review: a read-only member that made its own map-document change (it created the
/// map itself) never agreed with the writer on the map document, so its shards were never
/// synced; and its refused changes were counted (and logged) again every round.
#[test]
fn a_read_only_member_that_created_the_map_still_gets_its_history_and_is_refused_once() {
    use syncmesh_core::replication::Grant;
    let mut net = Net::new(&["a", "b"], &[]);
    let peer_id = net.id("b");
    net.node("a").rep.set_grant(
        &peer_id,
        Grant {
            maps: None,
            write: false,
        },
    );
    for i in 0..5 {
        write(&mut net, "a", "shared", &format!("a{i}"), json!({"v": i}));
    }
    write(&mut net, "b", "shared", "b0", json!({"v": 0}));
    net.flush();
    net.connect("a", "b");
    net.run();
    for _ in 0..3 {
        net.tick();
    }
    let b: Vec<String> = net.items("b", "shared").into_iter().map(|i| i.0).collect();
    for i in 0..5 {
        assert!(b.contains(&format!("a{i}")), "B lacks a{i}: {b:?}");
    }
    assert!(net.items("a", "shared").iter().all(|(k, _, _)| k != "b0"));
    let refused: u64 = net
        .node("a")
        .rep
        .take_refusals()
        .iter()
        .map(|r| r.changes)
        .sum();
    // B's creation and its write, each counted once although offered every round.
    assert!((1..=3).contains(&refused), "refused {refused}");
    net.tick();
    assert!(net.node("a").rep.take_refusals().is_empty());
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

fn perm(id: &str, f: u8) -> syncmesh_core::Permission {
    use syncmesh_core::policy::{MANAGE, READ, WRITE};
    syncmesh_core::Permission {
        identity: id.to_string(),
        read: f & READ != 0,
        write: f & WRITE != 0,
        manage: f & MANAGE != 0,
    }
}

/// A's map with B (writer), C (writer) and R (reader): their ids, the map, everyone holding it.
fn restricted_map(net: &mut Net) -> MapSid {
    use syncmesh_core::policy::{READ, WRITE};
    let sid = MapSid::for_name("m");
    let a = net.id("a");
    let entries = [
        (net.id("b"), READ | WRITE),
        (net.id("c"), READ | WRITE),
        (net.id("r"), READ),
    ];
    write(net, "a", "m", "a0", json!({"v": 0}));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    for (id, f) in entries {
        m.set_permission(&perm(&id, f), &a, now()).unwrap();
    }
    for n in ["b", "c", "r"] {
        hold(net, n, "m");
    }
    sid
}

#[test]
fn a_readers_change_relayed_by_a_writer_is_refused_by_its_author_rights() {
    // R - B - C and A - B: B is a writer that passes R's change on as its own message.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "b");
    net.connect("b", "c");
    net.connect("b", "r");
    net.run();
    net.tick();
    assert_eq!(net.items("r", "m").len(), 1);
    // R writes; its change and signature are taken before its node sends them.
    write(&mut net, "r", "m", "evil", json!({}));
    let m = net.node("r").host.by_sid(&sid).unwrap();
    m.flush(now()).unwrap();
    let changes = m.take_outgoing();
    let sigs = m.take_signatures();
    assert_eq!(sigs.len(), 1, "a change of a map with entries is signed");
    let (b, r) = (net.id("b"), net.id("r"));
    for (author, label) in [(r.clone(), "its own"), (b.clone(), "a forged")] {
        let msg = Wire::Changes {
            sid: sid.clone(),
            docs: vec![(
                changes[0].doc,
                vec![syncmesh_core::replication::Bytes(changes[0].bytes.clone())],
            )],
            sigs: vec![(
                syncmesh_core::replication::Bytes(sigs[0].0 .0.to_vec()),
                syncmesh_core::Signature {
                    author: author.clone(),
                    sig: sigs[0].1.sig.clone(),
                },
            )],
        }
        .encode();
        for to in ["a", "c"] {
            let node = net.node(to);
            node.rep.receive(&b, &msg, &mut node.host, now()).unwrap();
            // A refused change is counted once per peer, whatever signature came with it.
            let refusals = node.rep.take_refusals();
            assert!(
                author != r || refusals.iter().any(|x| x.peer == b && x.changes == 1),
                "{to} counts R's change: {refusals:?}"
            );
            assert!(
                net.items(to, "m").iter().all(|(k, _, _)| k != "evil"),
                "{to} took R's change with {label} signature"
            );
        }
    }
    net.run();
    net.tick();
    for n in ["a", "b", "c"] {
        assert!(
            net.items(n, "m").iter().all(|(k, _, _)| k != "evil"),
            "{n} holds the reader's write"
        );
    }
    // A writer's change, relayed by the reader, is taken: it is the author that counts.
    net.disconnect("b", "c");
    net.connect("c", "r");
    write(&mut net, "a", "m", "a1", json!({"v": 1}));
    net.disconnect("a", "b");
    net.connect("a", "r");
    net.run();
    net.tick();
    assert!(net.items("c", "m").iter().any(|(k, _, _)| k == "a1"));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn history_from_before_the_first_entry_reaches_later_members() {
    use syncmesh_core::policy::{READ, WRITE};
    // While the map is open, X writes to it; then A restricts it to B, with X a reader.
    let mut net = Net::new(&["a", "x", "b"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({"v": 0}));
    hold(&mut net, "x", "m");
    net.connect("a", "x");
    net.run();
    for i in 0..5 {
        write(&mut net, "x", "m", &format!("x{i}"), json!({"v": i}));
    }
    net.run();
    net.tick();
    assert_eq!(net.items("a", "m").len(), 6);
    let (a, b, x) = (net.id("a"), net.id("b"), net.id("x"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&b, READ | WRITE), &a, now())
        .unwrap();
    m.set_permission(&perm(&x, READ), &a, now()).unwrap();
    assert!(
        !m.endorsed().is_empty(),
        "the first entry endorses the shards' heads"
    );
    // B arrives later and syncs only with X, a reader: it gets the whole history (X's
    // writes from the open era included), and X's new writes stay with X.
    write(&mut net, "x", "m", "late", json!({}));
    net.run();
    net.tick();
    hold(&mut net, "b", "m");
    net.connect("b", "x");
    net.run();
    net.tick();
    let keys: Vec<String> = net.items("b", "m").into_iter().map(|i| i.0).collect();
    assert_eq!(keys, vec!["a0", "x0", "x1", "x2", "x3", "x4"], "B's items");
    assert_eq!(net.items("a", "m"), net.items("b", "m"));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn a_node_fetching_a_map_refuses_permissions_a_member_granted_itself() {
    use automerge::transaction::Transactable;
    use syncmesh_core::replication::Bytes;
    // R, a reader, makes a change that lists itself as a manager, signs it, and hands the map
    // document (history and forgery) to N, which does not hold the map yet.
    let mut net = Net::new(&["a", "b", "c", "r", "n", "n2"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "r");
    net.run();
    net.tick();
    let r = net.id("r");
    let me = net.node("r").host.identity().clone();
    let m = net.node("r").host.by_sid(&sid).unwrap();
    let saved = m.snapshot(DocAddr::Meta, now()).unwrap().unwrap();
    let mut doc = automerge::AutoCommit::load(&saved).unwrap();
    doc.set_actor(automerge::ActorId::from(me.actor.clone()));
    doc.put(automerge::ROOT, format!("p:{r}"), 7u64).unwrap();
    doc.commit();
    let forged = doc.get_last_local_change().unwrap().clone();
    let mut sigs = vec![(
        Bytes(forged.hash().0.to_vec()),
        me.signer.as_ref().unwrap().sign(&forged.hash()).unwrap(),
    )];
    let history: Vec<automerge::Change> = doc.get_changes(&[]).into_iter().cloned().collect();
    for c in &history {
        if let Some(s) = m.signature(&c.hash()) {
            sigs.push((Bytes(c.hash().0.to_vec()), s.clone()));
        }
    }
    let msg = |cs: &[automerge::Change]| {
        Wire::Changes {
            sid: sid.clone(),
            docs: vec![(
                DocAddr::Meta,
                cs.iter().map(|c| Bytes(c.raw_bytes().to_vec())).collect(),
            )],
            sigs: sigs.clone(),
        }
        .encode()
    };
    // In one message, and (found in review) with the map's creation sent ahead alone.
    let whole = vec![msg(&history)];
    let split = vec![msg(&history[..1]), msg(&history[1..])];
    for (n, msgs) in [("n", whole), ("n2", split)] {
        hold(&mut net, n, "m");
        net.connect(n, "r");
        net.disconnect(n, "r"); // N only listens to these messages
        let node = net.node(n);
        for bytes in msgs {
            node.rep.receive(&r, &bytes, &mut node.host, now()).unwrap();
        }
        let m = node.host.by_sid(&sid).unwrap();
        assert!(m.exists(), "{n} took the map's history");
        assert!(!m.policy().is_open());
        assert!(!m.policy().manages(&r), "{n} took R's grant to itself");
        assert!(!m.policy().writes(&r));
        let refusals = node.rep.take_refusals();
        assert!(
            refusals.iter().any(|x| x.peer == r && x.changes == 1),
            "{n}: {refusals:?}"
        );
    }
}

#[test]
fn writes_made_before_a_writer_learnt_of_the_entries_are_signed_then_and_taken() {
    use syncmesh_core::policy::{READ, WRITE};
    // W writes while apart from A; meanwhile A restricts the map to W (and B).
    let mut net = Net::new(&["a", "w", "b"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({"v": 0}));
    hold(&mut net, "w", "m");
    net.connect("a", "w");
    net.run();
    net.tick();
    net.disconnect("a", "w");
    for i in 0..3 {
        write(&mut net, "w", "m", &format!("w{i}"), json!({"v": i}));
    }
    net.run();
    let (a, w, b) = (net.id("a"), net.id("w"), net.id("b"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&w, READ | WRITE), &a, now())
        .unwrap();
    m.set_permission(&perm(&b, READ | WRITE), &a, now())
        .unwrap();
    net.run();
    // They meet again: A takes W's writes once W has signed them.
    net.connect("a", "w");
    net.run();
    net.tick();
    net.tick();
    let keys: Vec<String> = net.items("a", "m").into_iter().map(|i| i.0).collect();
    assert_eq!(keys, vec!["a0", "w0", "w1", "w2"]);
    assert_eq!(net.items("a", "m"), net.items("w", "m"));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

/// R's map document as R holds it, with R's actor, to make changes R's node would refuse.
fn forge_meta(net: &mut Net, who: &str, sid: &MapSid) -> (automerge::AutoCommit, Identity) {
    let me = net.node(who).host.identity().clone();
    let m = net.node(who).host.by_sid(sid).unwrap();
    let saved = m.snapshot(DocAddr::Meta, now()).unwrap().unwrap();
    let mut doc = automerge::AutoCommit::load(&saved).unwrap();
    doc.set_actor(automerge::ActorId::from(me.actor.clone()));
    (doc, me)
}

fn signed_changes(
    me: &Identity,
    sid: &MapSid,
    doc: DocAddr,
    changes: &[automerge::Change],
) -> Vec<u8> {
    use syncmesh_core::replication::Bytes;
    Wire::Changes {
        sid: sid.clone(),
        docs: vec![(
            doc,
            changes
                .iter()
                .map(|c| Bytes(c.raw_bytes().to_vec()))
                .collect(),
        )],
        sigs: changes
            .iter()
            .map(|c| {
                (
                    Bytes(c.hash().0.to_vec()),
                    me.signer.as_ref().unwrap().sign(&c.hash()).unwrap(),
                )
            })
            .collect(),
    }
    .encode()
}

#[test]
fn a_writer_cannot_slip_a_grant_to_itself_under_a_change_it_may_make() {
    use automerge::transaction::Transactable;
    // Found in review: B (a writer) lists itself as a manager (C1), then makes an ordinary
    // change on top (C2), both signed; C2 alone would be taken, and C1 with it as its ancestor.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "b");
    net.run();
    net.tick();
    let b = net.id("b");
    let (mut doc, me) = forge_meta(&mut net, "b", &sid);
    doc.put(automerge::ROOT, format!("p:{b}"), 7u64).unwrap();
    doc.commit();
    let c1 = doc.get_last_local_change().unwrap().clone();
    doc.put(automerge::ROOT, "u0", 5i64).unwrap();
    doc.commit();
    let c2 = doc.get_last_local_change().unwrap().clone();
    for order in [vec![c1.clone(), c2.clone()], vec![c2.clone(), c1.clone()]] {
        for c in order {
            let msg = signed_changes(&me, &sid, DocAddr::Meta, std::slice::from_ref(&c));
            let node = net.node("a");
            node.rep.receive(&b, &msg, &mut node.host, now()).unwrap();
        }
        let msg = signed_changes(&me, &sid, DocAddr::Meta, &[c1.clone(), c2.clone()]);
        let node = net.node("a");
        node.rep.receive(&b, &msg, &mut node.host, now()).unwrap();
        let m = node.host.by_sid(&sid).unwrap();
        assert!(!m.policy().manages(&b), "B made itself a manager");
        assert!(!m.has_change(DocAddr::Meta, &c2.hash()), "C2 rests on C1");
    }
}

#[test]
fn a_node_fetching_a_map_waits_for_its_permissions_before_taking_shard_changes() {
    // Found in review: a reader's shard changes sent to a node that holds the map empty were
    // parked, then applied unchecked once the map document arrived.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "r");
    net.run();
    net.tick();
    write(&mut net, "r", "m", "evil", json!({}));
    let m = net.node("r").host.by_sid(&sid).unwrap();
    m.flush(now()).unwrap();
    let ch = m.take_outgoing().pop().unwrap();
    let sigs = m.take_signatures();
    let msg = Wire::Changes {
        sid: sid.clone(),
        docs: vec![(
            ch.doc,
            vec![syncmesh_core::replication::Bytes(ch.bytes.clone())],
        )],
        sigs: sigs
            .iter()
            .map(|(h, s)| (syncmesh_core::replication::Bytes(h.0.to_vec()), s.clone()))
            .collect(),
    }
    .encode();
    // C is listed, holds the map empty (it is fetching it) and has met nobody yet.
    let r = net.id("r");
    {
        let node = net.node("c");
        node.rep.peer_up(&r, &mut node.host);
        node.rep.receive(&r, &msg, &mut node.host, now()).unwrap();
        assert!(
            node.rep.take_refusals().is_empty(),
            "not judged yet, not blamed"
        );
    }
    net.node("c").rep.peer_down(&r);
    net.queue.clear();
    // C gets the map from A; R's change is nowhere but on R.
    net.connect("c", "a");
    net.run();
    net.tick();
    assert_eq!(net.items("c", "m"), net.items("a", "m"));
    assert!(net.items("c", "m").iter().all(|(k, _, _)| k != "evil"));
}

#[test]
fn a_revoked_writers_earlier_writes_reach_later_members() {
    use syncmesh_core::policy::READ;
    // Found in review: W's writes (signed, taken everywhere) were refused by members that
    // arrived after W lost Write, unless someone had written on top of them since.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "b");
    net.run();
    write(&mut net, "b", "m", "from_b", json!({}));
    net.run();
    net.tick();
    assert!(net.items("a", "m").iter().any(|(k, _, _)| k == "from_b"));
    let (a, b) = (net.id("a"), net.id("b"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&b, READ), &a, now()).unwrap();
    net.disconnect("a", "b");
    net.connect("a", "c");
    net.run();
    net.tick();
    assert_eq!(net.items("c", "m"), net.items("a", "m"));
    assert!(net.items("c", "m").iter().any(|(k, _, _)| k == "from_b"));
}

/// A holds "m" open with W and X; W writes `from_w` while apart from A, and X takes it.
fn w_wrote_while_open() -> (Net, MapSid) {
    let mut net = Net::new(&["a", "w", "x", "c"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({}));
    for n in ["w", "x"] {
        hold(&mut net, n, "m");
    }
    net.connect("a", "w");
    net.connect("w", "x");
    net.run();
    net.tick();
    net.disconnect("a", "w");
    write(&mut net, "w", "m", "from_w", json!({}));
    net.run();
    net.tick();
    assert!(net.items("x", "m").iter().any(|(k, _, _)| k == "from_w"));
    (net, sid)
}

#[test]
fn signatures_made_late_reach_nodes_that_took_the_changes_unsigned() {
    use syncmesh_core::policy::{READ, WRITE};
    // W and X hold the map open and share W's writes; A restricts it (W and X writers) while
    // apart from them. W signs its writes when it learns of the entries, and X must get the
    // signatures too: C, arriving later, meets only X.
    let (mut net, sid) = w_wrote_while_open();
    let (a, w, x, c) = (net.id("a"), net.id("w"), net.id("x"), net.id("c"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    for id in [&w, &x, &c] {
        m.set_permission(&perm(id, READ | WRITE), &a, now())
            .unwrap();
    }
    net.connect("a", "w");
    net.run();
    net.tick();
    net.disconnect("a", "w");
    net.disconnect("w", "x");
    net.connect("x", "a");
    net.run();
    net.tick();
    net.disconnect("x", "a");
    hold(&mut net, "c", "m");
    net.connect("c", "x");
    net.run();
    net.tick();
    let keys: Vec<String> = net.items("c", "m").into_iter().map(|i| i.0).collect();
    assert_eq!(keys, vec!["a0", "from_w"]);
}

#[test]
fn signatures_made_late_are_asked_for_by_nodes_that_took_the_changes_unsigned() {
    use syncmesh_core::policy::{READ, WRITE};
    // As above, but X learns of the entries (from A) before W has signed, and meets W only
    // later: X asks W for the signatures then. C, arriving last, meets only X.
    let (mut net, sid) = w_wrote_while_open();
    net.disconnect("w", "x");
    let (a, w, x, c) = (net.id("a"), net.id("w"), net.id("x"), net.id("c"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    for id in [&w, &x, &c] {
        m.set_permission(&perm(id, READ | WRITE), &a, now())
            .unwrap();
    }
    // X gets the entries first: W's write is unsigned there, and A has not got it.
    net.connect("a", "x");
    net.run();
    net.tick();
    net.disconnect("a", "x");
    assert_eq!(
        net.node("x").host.by_sid(&sid).unwrap().unsigned(10).len(),
        1,
        "X notes the change it lacks a signature for"
    );
    // W learns of them from A, and signs.
    net.connect("a", "w");
    net.run();
    net.tick();
    net.disconnect("a", "w");
    // W and X meet: their maps are equal, yet X asks W for the signature.
    net.connect("w", "x");
    net.run();
    net.tick();
    net.disconnect("w", "x");
    assert!(net
        .node("x")
        .host
        .by_sid(&sid)
        .unwrap()
        .unsigned(10)
        .is_empty());
    hold(&mut net, "c", "m");
    net.connect("c", "x");
    net.run();
    net.tick();
    let keys: Vec<String> = net.items("c", "m").into_iter().map(|i| i.0).collect();
    assert_eq!(keys, vec!["a0", "from_w"]);
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn a_forged_late_signature_is_not_taken() {
    use syncmesh_core::policy::{READ, WRITE};
    use syncmesh_core::replication::Bytes;
    // X holds W's change unsigned; R (a reader) answers X's question with forgeries.
    let mut net = Net::new(&["a", "w", "x", "r"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({}));
    hold(&mut net, "x", "m");
    write(&mut net, "w", "m", "from_w", json!({}));
    net.connect("w", "x");
    net.run();
    net.tick();
    net.disconnect("w", "x");
    let (a, w, x, r) = (net.id("a"), net.id("w"), net.id("x"), net.id("r"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    for id in [&w, &x] {
        m.set_permission(&perm(id, READ | WRITE), &a, now())
            .unwrap();
    }
    m.set_permission(&perm(&r, READ), &a, now()).unwrap();
    net.connect("a", "x");
    net.run();
    net.tick();
    let lacking = net.node("x").host.by_sid(&sid).unwrap().unsigned(10);
    assert!(!lacking.is_empty());
    let me = net.node("r").host.identity().clone();
    let sigs = lacking
        .iter()
        .map(|h| {
            (
                Bytes(h.0.to_vec()),
                me.signer.as_ref().unwrap().sign(h).unwrap(),
            )
        })
        .collect();
    let msg = Wire::Sigs {
        sid: sid.clone(),
        sigs,
    }
    .encode();
    let node = net.node("x");
    node.rep.peer_up(&r, &mut node.host);
    // Not asked of R: not even looked at.
    assert!(node.rep.receive(&r, &msg, &mut node.host, now()).is_ok());
    // Asked (R holds the map): R's own signature, W's with a byte flipped, and W's genuine
    // signature of another change are each a violation, and none is taken.
    let w_sig_of_other = net
        .node("w")
        .host
        .identity()
        .signer
        .clone()
        .unwrap()
        .sign(&syncmesh_core::ChangeHash([9; 32]))
        .unwrap();
    let mut flipped = net
        .node("w")
        .host
        .identity()
        .signer
        .clone()
        .unwrap()
        .sign(&lacking[0])
        .unwrap();
    flipped.sig[0] ^= 1;
    for bad in [msg_sig(&me, &lacking[0]), flipped, w_sig_of_other] {
        let node = net.node("x");
        let hello = Wire::Hello {
            hold_all: false,
            maps: vec![(sid.clone(), 1)],
        }
        .encode();
        node.rep.peer_down(&r);
        node.rep.peer_up(&r, &mut node.host);
        let asked = node.rep.receive(&r, &hello, &mut node.host, now()).unwrap();
        assert!(asked.iter().any(|o| matches!(
            Wire::decode(&o.bytes, usize::MAX),
            Ok(Wire::WantSigs { .. })
        )));
        let msg = Wire::Sigs {
            sid: sid.clone(),
            sigs: vec![(Bytes(lacking[0].0.to_vec()), bad)],
        }
        .encode();
        assert!(node.rep.receive(&r, &msg, &mut node.host, now()).is_err());
    }
    let m = net.node("x").host.by_sid(&sid).unwrap();
    assert_eq!(m.unsigned(10), lacking, "still asked for");
    assert!(lacking.iter().all(|h| m.signature(h).is_none()));
}

fn msg_sig(me: &Identity, h: &syncmesh_core::ChangeHash) -> syncmesh_core::Signature {
    me.signer.as_ref().unwrap().sign(h).unwrap()
}

#[test]
fn shard_changes_for_an_incarnation_not_seen_yet_wait_for_it() {
    use syncmesh_core::policy::{READ, WRITE};
    // Found in review: shard changes addressed to the map's next incarnation were judged by
    // the current one's permissions (here: none, so anyone writes), parked, then applied
    // unchecked once that incarnation arrived with entries that make R a reader.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({"v": 0}));
    for n in ["c", "r"] {
        hold(&mut net, n, "m");
    }
    net.connect("a", "r");
    net.connect("a", "c");
    net.run();
    net.tick();
    write(&mut net, "r", "m", "evil", json!({}));
    let m = net.node("r").host.by_sid(&sid).unwrap();
    m.flush(now()).unwrap();
    let inc = m.incarnation();
    let ch = m.take_outgoing().pop().unwrap();
    let DocAddr::Shard { index, .. } = ch.doc else {
        panic!("a shard change")
    };
    assert!(automerge::Change::from_bytes(ch.bytes.clone())
        .unwrap()
        .deps()
        .is_empty());
    let sigs = m.take_signatures();
    let msg = Wire::Changes {
        sid: sid.clone(),
        docs: vec![(
            DocAddr::Shard {
                gen: 0,
                inc: inc + 1,
                index,
            },
            vec![syncmesh_core::replication::Bytes(ch.bytes.clone())],
        )],
        sigs: sigs
            .iter()
            .map(|(h, s)| (syncmesh_core::replication::Bytes(h.0.to_vec()), s.clone()))
            .collect(),
    }
    .encode();
    let r = net.id("r");
    net.disconnect("a", "r");
    {
        let node = net.node("c");
        node.rep.peer_up(&r, &mut node.host);
        node.rep.receive(&r, &msg, &mut node.host, now()).unwrap();
        node.rep.peer_down(&r);
    }
    net.queue.clear();
    // A removes the map, makes it again and shares it with R as a reader.
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.remove_map(now()).unwrap();
    write(&mut net, "a", "m", "a1", json!({}));
    let (a, c) = (net.id("a"), net.id("c"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    assert_eq!(m.incarnation(), inc + 1);
    m.set_permission(&perm(&c, READ | WRITE), &a, now())
        .unwrap();
    m.set_permission(&perm(&r, READ), &a, now()).unwrap();
    net.run();
    net.tick();
    let keys: Vec<String> = net.items("c", "m").into_iter().map(|i| i.0).collect();
    assert_eq!(keys, vec!["a1"]);
    assert!(!net.node("c").host.by_sid(&sid).unwrap().policy().is_open());
}

#[test]
fn a_gossiped_map_change_whose_parent_was_missed_is_fetched_at_once() {
    use syncmesh_core::policy::{MANAGE, READ, WRITE};
    // B misses one of A's map-document changes; the next one waits for it, and B fetches
    // the missing one from A right away, not at the next anti-entropy round.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "b");
    net.run();
    net.tick();
    let (a, r) = (net.id("a"), net.id("r"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&r, READ | WRITE), &a, now())
        .unwrap();
    net.flush();
    net.queue.clear(); // lost
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&r, READ | WRITE | MANAGE), &a, now())
        .unwrap();
    net.run(); // no anti-entropy round
    let m = net.node("b").host.by_sid(&sid).unwrap();
    assert!(m.policy().manages(&r), "B has both changes");
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn endorsed_history_noted_unsigned_before_it_arrived_is_forgotten() {
    use syncmesh_core::layout::shard_of;
    use syncmesh_core::policy::{READ, WRITE};
    // Found in review: X learns of the entries while missing A's latest write to a shard;
    // A's older changes there looked unendorsed and were asked for forever.
    let mut net = Net::new(&["a", "x"], &[]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({}));
    hold(&mut net, "x", "m");
    net.connect("a", "x");
    net.run();
    net.tick();
    let s = shard_of("a0");
    let k = (0..100_000)
        .map(|i| format!("k{i}"))
        .find(|k| shard_of(k) == s)
        .unwrap();
    write(&mut net, "a", "m", &k, json!({}));
    net.flush();
    net.queue.clear(); // lost
    let (a, x) = (net.id("a"), net.id("x"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    m.set_permission(&perm(&x, READ | WRITE), &a, now())
        .unwrap();
    net.run();
    net.tick();
    net.tick();
    assert!(net.items("x", "m").iter().any(|(key, _, _)| *key == k));
    let m = net.node("x").host.by_sid(&sid).unwrap();
    assert!(
        m.unsigned(10).is_empty(),
        "the endorsed history is not asked for"
    );
    assert!(!m.has_unsigned());
    let marks = m.take_unsigned_marks();
    assert!(
        marks.iter().all(|(_, i)| i.is_none()),
        "what was noted is stored as forgotten: {marks:?}"
    );
    // And nothing is asked on a new connection.
    net.disconnect("a", "x");
    let node = net.node("x");
    node.rep.peer_up(&a, &mut node.host);
    let hello = Wire::Hello {
        hold_all: false,
        maps: vec![(sid.clone(), 1)],
    }
    .encode();
    let out = node.rep.receive(&a, &hello, &mut node.host, now()).unwrap();
    assert!(out.iter().all(|o| !matches!(
        Wire::decode(&o.bytes, usize::MAX),
        Ok(Wire::WantSigs { .. })
    )));
}

#[test]
fn a_refused_change_does_not_make_the_exchange_endless() {
    // Found by the simulator: B removes the map without signing (a removal counts only if
    // signed by a manager), A refuses it. A writer whose changes were refused once in a
    // session was answered on every later message, and the two exchanged sync messages
    // forever (one more endless exchange per anti-entropy round).
    let mut net = Net::new(&["a", "b"], &[]);
    net.node("b").host = syncmesh_core::Catalog::new(Identity::new(NodeId([9; 16]), b"b-unsigned"));
    write(&mut net, "a", "users", "k", json!({"n": 1}));
    write(&mut net, "b", "users", "j", json!({"n": 2}));
    net.connect("a", "b");
    net.run();
    assert_eq!(net.items("a", "users").len(), 2);
    let sid = MapSid::for_name("users");
    net.node("b")
        .host
        .by_sid(&sid)
        .unwrap()
        .remove_map(now())
        .unwrap();
    // `run` fails if the protocol does not quiesce.
    net.run();
    for _ in 0..3 {
        let before = net.gossip_seen + net.carried.len();
        net.tick();
        assert!(net.gossip_seen + net.carried.len() - before < 50);
    }
    assert_eq!(
        net.items("a", "users").len(),
        2,
        "A did not take the removal"
    );
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn a_hold_all_node_names_no_change_of_a_map_to_a_peer_that_may_not_read_it() {
    use syncmesh_core::policy::{READ, WRITE};
    // Found in review: a hold-all node answered a Hello naming a map the peer may not read
    // (as if to adopt it) with its documents and a question naming change hashes.
    let mut net = Net::new(&["a", "w", "x", "r"], &["x"]);
    let sid = MapSid::for_name("m");
    write(&mut net, "a", "m", "a0", json!({}));
    hold(&mut net, "x", "m");
    write(&mut net, "w", "m", "from_w", json!({}));
    net.connect("w", "x");
    net.run();
    net.tick();
    net.disconnect("w", "x");
    let (a, w, x) = (net.id("a"), net.id("w"), net.id("x"));
    let m = net.node("a").host.by_sid(&sid).unwrap();
    for id in [&w, &x] {
        m.set_permission(&perm(id, READ | WRITE), &a, now())
            .unwrap();
    }
    net.connect("a", "x");
    net.run();
    net.tick();
    net.disconnect("a", "x");
    assert!(net.node("x").host.by_sid(&sid).unwrap().has_unsigned());
    let r = net.id("r");
    let node = net.node("x");
    node.rep.peer_up(&r, &mut node.host);
    let hello = Wire::Hello {
        hold_all: false,
        maps: vec![(sid.clone(), 12345)],
    }
    .encode();
    let out = node.rep.receive(&r, &hello, &mut node.host, now()).unwrap();
    assert!(out.is_empty(), "{} messages to a non-reader", out.len());
}

#[test]
fn gossip_for_an_unknown_incarnation_costs_one_map_document_exchange() {
    // Found in review: each such message restarted the map-document sync with its sender.
    let mut net = Net::new(&["a", "c", "h"], &[]);
    let sid = MapSid::for_name("m");
    for i in 0..20 {
        write(&mut net, "a", "m", &format!("x{i}"), json!({}));
    }
    hold(&mut net, "c", "m");
    net.connect("a", "c");
    net.run();
    net.tick();
    write(&mut net, "h", "m", "evil", json!({}));
    let hm = net.node("h").host.by_sid(&sid).unwrap();
    hm.flush(now()).unwrap();
    let ch = hm
        .take_outgoing()
        .into_iter()
        .find(|c| matches!(c.doc, DocAddr::Shard { .. }))
        .unwrap();
    let DocAddr::Shard { index, .. } = ch.doc else {
        panic!("a shard change")
    };
    let h = net.id("h");
    let node = net.node("c");
    let inc = node.host.by_sid(&sid).unwrap().incarnation();
    node.rep.peer_up(&h, &mut node.host);
    let mut replies = 0;
    for i in 0..20u64 {
        let msg = Wire::Changes {
            sid: sid.clone(),
            docs: vec![(
                DocAddr::Shard {
                    gen: 0,
                    inc: inc + 1 + i,
                    index,
                },
                vec![syncmesh_core::replication::Bytes(ch.bytes.clone())],
            )],
            sigs: vec![],
        }
        .encode();
        replies += node
            .rep
            .receive(&h, &msg, &mut node.host, now())
            .unwrap()
            .len();
    }
    assert_eq!(replies, 1, "one exchange, not one per message");
}

#[test]
fn a_permission_change_built_on_nothing_or_an_old_state_is_refused() {
    use automerge::transaction::Transactable;
    // Found in review: a change with no dependencies saw an open map, where anyone manages.
    let mut net = Net::new(&["a", "b", "c", "r"], &[]);
    let sid = restricted_map(&mut net);
    net.connect("a", "b");
    net.run();
    net.tick();
    let (b, r) = (net.id("b"), net.id("r"));
    let me = net.node("b").host.identity().clone();
    let mut doc = automerge::AutoCommit::new();
    let mut actor = me.actor.clone();
    actor.push(1);
    doc.set_actor(automerge::ActorId::from(actor));
    doc.put(automerge::ROOT, format!("p:{r}"), 7u64).unwrap();
    doc.commit();
    let c = doc.get_last_local_change().unwrap().clone();
    let msg = signed_changes(&me, &sid, DocAddr::Meta, std::slice::from_ref(&c));
    let node = net.node("a");
    node.rep.receive(&b, &msg, &mut node.host, now()).unwrap();
    let m = node.host.by_sid(&sid).unwrap();
    assert!(
        !m.policy().manages(&r),
        "a grant built on nothing was taken"
    );
    assert!(!m.has_change(DocAddr::Meta, &c.hash()));
}
