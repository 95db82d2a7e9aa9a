//! Hostile and broken peers against the replication protocol: each test is a way a review
//! found to panic a node, grow its memory without bound, or make honest nodes refuse each
//! other; the comment above each says what used to happen.

#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code, missing_docs)]

#[path = "../benches/common/counting_alloc.rs"]
#[allow(dead_code)]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use serde_json::json;
use syncmesh_core::replication::{changes_messages, Outgoing, Wire};
use syncmesh_core::testing::Driver;
use syncmesh_core::{
    Catalog, DocAddr, Identity, MapReplica, MapSid, MapSpec, NodeId, Timestamp, WriteOptions,
};

/// Some tests measure the heap with a process-wide counter: every test here runs alone.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

fn obj(v: serde_json::Value) -> syncmesh_core::JsonObject {
    v.as_object().cloned().unwrap()
}

struct Node {
    name: String,
    host: Catalog,
    rep: Driver,
}

impl Node {
    fn new(name: &str, n: u8, hold_all: bool) -> Node {
        Node {
            name: name.to_string(),
            host: Catalog::new(Identity::new(NodeId([n; 16]), name.as_bytes())),
            rep: Driver::new(hold_all),
        }
    }

    fn write(&mut self, key: &str, v: serde_json::Value) {
        let (m, _) = self
            .host
            .open(&MapSpec::named("users"), [7; 16], now())
            .unwrap();
        m.set(key, obj(v), &WriteOptions::default(), now()).unwrap();
        m.flush(now()).unwrap();
    }

    fn map(&mut self) -> &mut MapReplica {
        self.host.by_sid(&MapSid::for_name("users")).unwrap()
    }
}

/// Delivers direct messages between two nodes until none is left; returns the violations.
fn pump(a: &mut Node, b: &mut Node, mut queue: Vec<(String, Outgoing<String>)>) -> Vec<String> {
    let mut violations = Vec::new();
    let mut steps = 0;
    while let Some((from, o)) = (!queue.is_empty()).then(|| queue.remove(0)) {
        steps += 1;
        assert!(steps < 10_000, "does not quiesce");
        let (to, from_name) = if o.peer == a.name {
            (&mut *a, from)
        } else {
            (&mut *b, from)
        };
        match to.rep.receive(&from_name, &o.bytes, &mut to.host, now()) {
            Ok(out) => queue.extend(out.into_iter().map(|x| (to.name.clone(), x))),
            Err(v) => {
                violations.push(format!("{} refused {}: {}", to.name, from_name, v.0));
                to.rep.peer_down(&from_name);
            }
        }
    }
    violations
}

fn connect(a: &mut Node, b: &mut Node) -> Vec<String> {
    let mut q: Vec<(String, Outgoing<String>)> = Vec::new();
    let out = a.rep.peer_up(&b.name, &mut a.host);
    q.extend(out.into_iter().map(|o| (a.name.clone(), o)));
    let out = b.rep.peer_up(&a.name, &mut b.host);
    q.extend(out.into_iter().map(|o| (b.name.clone(), o)));
    pump(a, b, q)
}

fn local_shard_changes(m: &mut MapReplica) -> Vec<(DocAddr, Vec<u8>)> {
    m.take_outgoing()
        .into_iter()
        .filter(|c| c.doc != DocAddr::Meta)
        .map(|c| (c.doc, c.bytes))
        .collect()
}

/// Used to: a sync message whose bloom filter has entries but zero bits makes
/// `generate_sync_message` compute `x % 0`: the engine thread panics on one message from any
/// connected peer (Automerge does not validate the filter's parameters).
#[test]
fn a_bloom_filter_with_zero_bits_is_a_violation_not_a_panic() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    a.write("x", json!({"v": 1}));
    let sid = MapSid::for_name("users");
    let bloom = automerge::sync::BloomFilter::try_from(&[1u8, 0, 1][..]).unwrap();
    let msg = automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![automerge::sync::Have {
            last_sync: vec![],
            bloom,
        }],
        changes: automerge::sync::ChunkList::from(Vec::<Vec<u8>>::new()),
        supported_capabilities: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let bytes = Wire::Sync {
        sigs: Vec::new(),
        sid,
        msgs: vec![(
            DocAddr::Meta,
            syncmesh_core::replication::Bytes(msg.encode()),
        )],
    }
    .encode();
    // 17 bytes of hostile input.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.rep.receive("mallory", &bytes, &mut a.host, now())
    }));
    assert!(r.is_ok(), "a peer's sync message panicked the node");
}

/// Used to: one hostile node gives two honest nodes two different changes with the same actor and
/// sequence number. Each honest node accepts its own (and, B, relays it on as valid gossip);
/// the other then refuses it as a Violation and disconnects the *honest* relay. The two can
/// never sync that shard again: every reconnect ends in a mutual violation.
#[test]
fn equivocating_changes_do_not_make_honest_nodes_disconnect_each_other() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    let mut b = Node::new("b", 2, false);
    a.write("x", json!({"v": 1}));
    b.host.insert(MapReplica::empty(
        b.host.identity().clone(),
        MapSid::for_name("users"),
    ));
    let v = connect(&mut a, &mut b);
    assert!(v.is_empty(), "{v:?}");
    assert_eq!(b.map().digest().unwrap(), a.map().digest().unwrap());

    // Mallory: two replicas with the same actor write the same key differently (seq 1 each).
    let sid = MapSid::for_name("users");
    let mallory = Identity::new(NodeId([9; 16]), b"m");
    let mut m1 =
        MapReplica::create(mallory.clone(), sid.clone(), Some("users"), None, now()).unwrap();
    let mut m2 = MapReplica::create(mallory, sid.clone(), Some("users"), None, now()).unwrap();
    m1.set(
        "x",
        obj(json!({"v": "m1"})),
        &WriteOptions::default(),
        now(),
    )
    .unwrap();
    m2.set(
        "x",
        obj(json!({"v": "m2"})),
        &WriteOptions::default(),
        now(),
    )
    .unwrap();
    m1.flush(now()).unwrap();
    m2.flush(now()).unwrap();
    let (g1, _) = changes_messages(&sid, local_shard_changes(&mut m1), &Default::default());
    let (g2, _) = changes_messages(&sid, local_shard_changes(&mut m2), &Default::default());

    // Mallory gossips g1 to A and g2 to B: each is valid where it lands.
    a.rep
        .receive("mallory", &g1[0], &mut a.host, now())
        .unwrap();
    b.rep
        .receive("mallory", &g2[0], &mut b.host, now())
        .unwrap();
    // B relays g2 (it accepted it); A hears it from B, its propagation source.
    let r = a.rep.receive("b", &g2[0], &mut a.host, now());
    // And the honest pair can still sync (anti-entropy / reconnect).
    a.rep.peer_down("b");
    b.rep.peer_down("a");
    let v = connect(&mut a, &mut b);
    assert!(
        r.is_ok() && v.is_empty(),
        "gossip relayed by honest B refused by A: {r:?}; reconnect violations: {v:?}"
    );
}

/// Used to: every Hello adds its map ids to the peer's `held` set, which is only freed on
/// disconnect: a peer can grow a node's memory without bound over one connection.
#[test]
fn hellos_naming_unknown_maps_keep_no_memory() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    a.write("x", json!({"v": 1}));
    a.rep.peer_up("mallory", &mut a.host);
    let base = counting_alloc::heap_bytes();
    for round in 0..20u32 {
        let maps: Vec<(MapSid, u64)> = (0..10_000u32)
            .map(|i| (MapSid::for_name(&format!("n{round}_{i}")), 1))
            .collect();
        let bytes = Wire::Hello {
            hold_all: false,
            maps,
        }
        .encode();
        a.rep
            .receive("mallory", &bytes, &mut a.host, now())
            .unwrap();
    }
    let grown = counting_alloc::heap_bytes().saturating_sub(base);
    assert!(
        grown < 4 << 20,
        "200,000 names of maps nobody holds kept {} MiB on the node",
        grown >> 20
    );
}

/// Used to: `on_sync` creates a sync session for whatever document a peer names before checking
/// that the node syncs it: each distinct (inc, index) leaves a `sync::State` behind.
#[test]
fn sync_messages_for_documents_not_synced_keep_no_sessions() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    a.write("x", json!({"v": 1}));
    a.rep.peer_up("mallory", &mut a.host);
    let sid = MapSid::for_name("users");
    let empty = automerge::Automerge::new();
    let mut st = automerge::sync::State::new();
    let msg = {
        use automerge::sync::SyncDoc;
        let mut m = empty.generate_sync_message(&mut st).unwrap();
        m.supported_capabilities = None;
        m.version = automerge::sync::MessageVersion::V1;
        m.encode()
    };
    let base = counting_alloc::heap_bytes();
    for round in 0..20u64 {
        let msgs: Vec<(DocAddr, syncmesh_core::replication::Bytes)> = (0..10_000u64)
            .map(|i| {
                (
                    DocAddr::Shard {
                        gen: 0,
                        inc: 1_000 + round * 10_000 + i,
                        index: 0,
                    },
                    syncmesh_core::replication::Bytes(msg.clone()),
                )
            })
            .collect();
        let bytes = Wire::Sync {
            sigs: Vec::new(),
            sid: sid.clone(),
            msgs,
        }
        .encode();
        a.rep
            .receive("mallory", &bytes, &mut a.host, now())
            .unwrap();
    }
    let grown = counting_alloc::heap_bytes().saturating_sub(base);
    assert!(
        grown < 4 << 20,
        "200,000 sync messages for documents the node does not sync kept {} MiB",
        grown >> 20
    );
}

/// Used to: changes for a future incarnation are buffered up to 100,000 *changes*, whatever their
/// size (and kept again in `received` until stored): a peer can park gigabytes per map.
#[test]
fn changes_for_a_future_incarnation_are_bounded_in_bytes() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    a.write("x", json!({"v": 1}));
    a.rep.peer_up("mallory", &mut a.host);
    let sid = MapSid::for_name("users");
    // Mallory's changes for incarnation 7 of the map, each ~256 KiB: a field slot of item
    // "k" (check_change looks only at root keys, not at value sizes).
    use automerge::transaction::Transactable;
    let index = syncmesh_core::layout::shard_of("k");
    // Incompressible (Automerge deflates large columns).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut big = || -> String {
        (0..(256 << 10))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .collect()
    };
    let base = counting_alloc::heap_bytes();
    let mut sent = 0usize;
    for _ in 0..64 {
        // A fresh document each time, so this test's own memory does not grow.
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "f1:kb", big()).unwrap();
        let c = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        sent += c.len();
        let bytes = Wire::Changes {
            sigs: Vec::new(),
            sid: sid.clone(),
            docs: vec![(
                DocAddr::Shard {
                    gen: 0,
                    inc: 7,
                    index,
                },
                vec![syncmesh_core::replication::Bytes(c)],
            )],
        }
        .encode();
        a.rep
            .receive("mallory", &bytes, &mut a.host, now())
            .unwrap();
    }
    let grown = counting_alloc::heap_bytes().saturating_sub(base);
    assert!(
        grown < 8 << 20,
        "{} KiB of changes for an incarnation that does not exist kept {} MiB buffered",
        sent >> 10,
        grown >> 20
    );
}

/// Fuzz: mutated but parseable changes from a peer must be refused or applied, never
/// panic the node.
#[test]
fn mutated_changes_never_panic_the_node() {
    let _serial = serial();
    let sid = MapSid::for_name("users");
    let writer = Identity::new(NodeId([9; 16]), b"w");
    let mut w = MapReplica::create(writer, sid.clone(), Some("users"), None, now()).unwrap();
    let meta: Vec<Vec<u8>> = w.take_outgoing().into_iter().map(|c| c.bytes).collect();
    w.set(
        "k",
        obj(json!({"a": {"b": [1, 2, {"c": "d"}]}, "t": "text"})),
        &WriteOptions::default(),
        now(),
    )
    .unwrap();
    w.flush(now()).unwrap();
    let c1 = local_shard_changes(&mut w);
    w.update(
        "k",
        obj(json!({"a": {"b": [3, {"c": "e"}], "x": 1}})),
        &WriteOptions::default(),
        now(),
    )
    .unwrap();
    w.flush(now()).unwrap();
    let c2 = local_shard_changes(&mut w);
    let (doc, base) = c1[0].clone();
    let (_, next) = c2[0].clone();
    std::panic::set_hook(Box::new(|_| {}));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut panics = Vec::new();
    let mut accepted = 0;
    for i in 0..3000 {
        let target = if i % 2 == 0 { &base } else { &next };
        let mut bytes = target.clone();
        for _ in 0..(1 + rnd() % 3) {
            let p = (rnd() as usize) % bytes.len();
            bytes[p] = rnd() as u8;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut a = Node::new("a", 1, false);
            let m = MapReplica::empty(a.host.identity().clone(), sid.clone());
            a.host.insert(m);
            let mut ok = true;
            for c in &meta {
                ok &= a
                    .map()
                    .apply_changes(DocAddr::Meta, std::slice::from_ref(c), now())
                    .is_ok();
            }
            assert!(ok);
            if i % 2 == 1 {
                a.map()
                    .apply_changes(doc, std::slice::from_ref(&base), now())
                    .unwrap();
            }
            let msg = Wire::Changes {
                sigs: Vec::new(),
                sid: sid.clone(),
                docs: vec![(doc, vec![syncmesh_core::replication::Bytes(bytes.clone())])],
            }
            .encode();
            let r = a.rep.receive("p", &msg, &mut a.host, now());
            if r.is_ok() {
                // Read everything back, as a user would.
                let _ = a.map().all_items(now());
                let _ = a.map().conflicts("k", now());
                let _ = a.map().save_all(now());
            }
            r.is_ok()
        }));
        match r {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(e) => {
                let s = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push((i, s, hex::encode(&bytes)));
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!("accepted {accepted}, panics {}", panics.len());
    for p in panics.iter().take(5) {
        eprintln!("{p:?}");
    }
    assert!(
        panics.is_empty(),
        "{} of 3000 mutated changes panicked",
        panics.len()
    );
}

/// Replayed fuzz cases: one mutated change, applied as gossip to a fresh holder of the map.
fn replay(hexed: &str, with_base: bool) {
    let sid = MapSid::for_name("users");
    let writer = Identity::new(NodeId([9; 16]), b"w");
    let mut w = MapReplica::create(writer, sid.clone(), Some("users"), None, now()).unwrap();
    let meta: Vec<Vec<u8>> = w.take_outgoing().into_iter().map(|c| c.bytes).collect();
    w.set(
        "k",
        obj(json!({"a": {"b": [1, 2, {"c": "d"}]}, "t": "text"})),
        &WriteOptions::default(),
        now(),
    )
    .unwrap();
    w.flush(now()).unwrap();
    let (doc, base) = local_shard_changes(&mut w)[0].clone();
    let mut a = Node::new("a", 1, false);
    a.host
        .insert(MapReplica::empty(a.host.identity().clone(), sid.clone()));
    a.map().apply_changes(DocAddr::Meta, &meta, now()).unwrap();
    if with_base {
        a.map()
            .apply_changes(doc, std::slice::from_ref(&base), now())
            .unwrap();
    }
    let msg = Wire::Changes {
        sigs: Vec::new(),
        sid,
        docs: vec![(
            doc,
            vec![syncmesh_core::replication::Bytes(
                hex::decode(hexed).unwrap(),
            )],
        )],
    }
    .encode();
    let _ = a.rep.receive("p", &msg, &mut a.host, now());
}

#[test]
fn a_change_naming_a_missing_object_is_refused() {
    let _serial = serial();
    replay("856f4a83ba1f017e01c90100110909090909090909090909090909090977010180e2cfaa0600000a0106020a11061308151934034209560a5749700200010500000200017f7303027f05000200030200000300027d00030100037e0566313a6b61016200037d01630566313a6b74046d313a6b0203037e000202017f000301020002147c001646a70801026417657874010000a0953f2f06000068e5cf8b0100000068e5cf8b01000000000000000000000009090909090909090909090909090909090909090909090909090909090909090800", false);
}

#[test]
fn a_change_naming_a_missing_actor_is_refused() {
    let _serial = serial();
    replay("856f4a832a6db9a001ec0101ba1f017ed7e4703caa874275e9008eb40fd820bab7c93925130555c4d7c18dff110909090909090909090909090909090777020980e2cfaa0600000c0106020a110613071515340342095609574570067102730300010500000100010209020a7f0d000100047f00000200037e000c00027d0566313a6b610162017800027e0163046d313a6b0302027e000202017f000201020002147d0016a708010365010100a0953f2f06000068e5cf8b0100000068e5cf8b01000000000000000000000009090909090909090909090909090909090909090909090909090909090909097f0105007f0102007e0107", true);
}

/// Used to: Automerge's sync protocol puts every change a peer lacks for one document into one
/// message; `batch_sync` cannot split it, and a message over 32 MiB is a Violation on the
/// receiving side. An honest node whose hot shard has a long history can never sync it to a
/// new peer, and every attempt disconnects it.
#[test]
fn a_long_history_in_one_shard_syncs_in_several_messages() {
    let _serial = serial();
    let mut a = Node::new("a", 1, false);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut text = || -> String {
        (0..(14 << 10))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .filter(|c| *c != '"' && *c != '\\')
            .collect()
    };
    // One hot item updated 3,000 times (each write its own change).
    a.write("hot", json!({"v": text()}));
    for _ in 0..400 {
        let t = text();
        let m = a.map();
        m.set(
            "hot",
            obj(json!({ "v": t })),
            &WriteOptions::default(),
            now(),
        )
        .unwrap();
        m.flush(now()).unwrap();
    }
    a.map().take_outgoing();
    let mut b = Node::new("b", 2, false);
    b.host.insert(MapReplica::empty(
        b.host.identity().clone(),
        MapSid::for_name("users"),
    ));
    let v = connect(&mut a, &mut b);
    assert!(v.is_empty(), "honest peers refused each other: {v:?}");
    assert_eq!(b.map().digest().unwrap(), a.map().digest().unwrap());
}

/// Used to: a hold-all node adopts every map a peer names in a Hello with a non-zero digest, even
/// though nothing of it ever arrives: one message of 3.5 MB creates 100,000 empty replicas
/// (in the engine: also 100,000 gossip subscriptions), and they are never dropped.
#[test]
fn a_hold_all_node_adopts_a_bounded_number_of_maps_per_hello() {
    let _serial = serial();
    let mut backup = Node::new("backup", 1, true);
    backup.rep.peer_up("mallory", &mut backup.host);
    let maps: Vec<(MapSid, u64)> = (0..100_000u32)
        .map(|i| (MapSid::for_name(&format!("ghost{i}")), 42))
        .collect();
    let bytes = Wire::Hello {
        hold_all: false,
        maps,
    }
    .encode();
    let base = counting_alloc::heap_bytes();
    let out = backup
        .rep
        .receive("mallory", &bytes, &mut backup.host, now())
        .unwrap();
    let grown = counting_alloc::heap_bytes().saturating_sub(base);
    let held = backup.host.maps().count();
    assert!(
        held < 1_000,
        "a {} KB Hello made the backup hold {held} maps ({} MiB) and answer with {} messages",
        bytes.len() >> 10,
        grown >> 20,
        out.len()
    );
}

/// A change whose operations name an actor index its actor list does not have. Automerge 0.6
/// parses it (`Change::from_bytes` does not check the indexes) and then panics on the first use
/// of one (`Change::decode`). Used to: the replicator's panic guard caught it, called it data
/// that makes Automerge fail and reloaded the whole map; now it is refused as what it is, before
/// anything touches the map.
fn change_naming_an_unlisted_actor() -> Vec<u8> {
    use automerge::transaction::Transactable;
    use sha2::Digest;
    fn leb(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut s) = (0u64, 0);
        loop {
            let x = b[*at];
            *at += 1;
            v |= u64::from(x & 0x7f) << s;
            s += 7;
            if x & 0x80 == 0 {
                return v;
            }
        }
    }
    fn put_leb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let mut x = (v & 0x7f) as u8;
            v >>= 7;
            if v != 0 {
                x |= 0x80;
            }
            out.push(x);
            if v == 0 {
                return;
            }
        }
    }
    // Actor B writes inside an object actor A created: B's change lists A as its other actor.
    let key = "k";
    let mut a = automerge::AutoCommit::new();
    a.set_actor(automerge::ActorId::from(vec![0xAA; 16]));
    let o = a
        .put_object(
            automerge::ROOT,
            format!("f1:{key}x"),
            automerge::ObjType::Map,
        )
        .unwrap();
    a.put(&o, "in", 1).unwrap();
    a.commit();
    let mut b = a.fork();
    b.set_actor(automerge::ActorId::from(vec![0xBB; 16]));
    b.put(&o, "in", 2).unwrap();
    b.commit();
    let raw = b.get_last_local_change().unwrap().raw_bytes().to_vec();
    // Chunk: magic (4), checksum (4), type (1), length, body. Drop the body's other actors.
    let mut at = 9;
    let len = leb(&raw, &mut at) as usize;
    let body = &raw[at..at + len];
    let mut p = 0;
    let deps = leb(body, &mut p);
    p += 32 * deps as usize;
    let actor = leb(body, &mut p) as usize;
    p += actor;
    for _ in 0..3 {
        leb(body, &mut p); // seq, start op, time
    }
    let msg = leb(body, &mut p) as usize;
    p += msg;
    let others_at = p;
    let others = leb(body, &mut p);
    assert_eq!(others, 1);
    let l = leb(body, &mut p) as usize;
    p += l;
    let mut new_body = body[..others_at].to_vec();
    put_leb(0, &mut new_body);
    new_body.extend_from_slice(&body[p..]);
    let mut head = vec![raw[8]];
    put_leb(new_body.len() as u64, &mut head);
    let mut h = sha2::Sha256::new();
    h.update(&head);
    h.update(&new_body);
    let sum = h.finalize();
    let mut out = raw[..4].to_vec();
    out.extend_from_slice(&sum[..4]);
    out.extend_from_slice(&head);
    out.extend_from_slice(&new_body);
    out
}

#[test]
fn a_change_naming_an_unlisted_actor_is_refused_without_a_panic() {
    let _serial = serial();
    let bytes = change_naming_an_unlisted_actor();
    let change = automerge::Change::from_bytes(bytes.clone()).expect("Automerge parses it");
    let doc = DocAddr::Shard {
        gen: 0,
        inc: 0,
        index: syncmesh_core::layout::shard_of("k"),
    };
    let err = syncmesh_core::check_change(doc, &change).unwrap_err();
    assert!(
        matches!(err, syncmesh_core::Error::InvalidChange(_)),
        "{err}"
    );

    let mut a = Node::new("a", 1, false);
    a.write("other", json!({"v": 1}));
    let err = a
        .map()
        .apply_changes(doc, std::slice::from_ref(&bytes), now())
        .unwrap_err();
    assert!(
        matches!(err, syncmesh_core::Error::InvalidChange(_)),
        "{err}"
    );
    // As gossip from a connected peer: a violation, the map is not reloaded, nothing changed.
    let msg = Wire::Changes {
        sigs: Vec::new(),
        sid: MapSid::for_name("users"),
        docs: vec![(doc, vec![syncmesh_core::replication::Bytes(bytes)])],
    }
    .encode();
    let v = a.rep.receive("p", &msg, &mut a.host, now()).unwrap_err();
    assert!(!v.0.contains("Automerge fail"), "{}", v.0);
    assert!(a.rep.take_poisoned().is_empty());
    assert_eq!(
        a.map().get("other", now()).unwrap().data,
        obj(json!({"v": 1}))
    );
}
