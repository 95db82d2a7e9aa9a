//! Seeded property test: random operations on 3 to 5 replicas, changes delivered in random
//! order with duplicates, delays and partitions; once everything is delivered every replica
//! must hold identical items, revisions and conflicts, and each replica's event stream must
//! rebuild its items exactly. In a quarter of the cases replicas only write items whole
//! (`set`, `mutate`, `create_item`, `remove`): then every converged item must equal one of
//! the values some replica wrote, never a mix of several.
//!
//! `SYNCMESH_SEED=<n>` replays one case; `SYNCMESH_CASES=<n>` sets how many run (default 2000).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

mod support;

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};
use support::*;
use syncmesh_core::{
    MapReplica, MapSid, MapSpec, OpenMode, OutgoingChange, PageRequest, Revision, Timestamp, Ttl,
    WriteOptions,
};

use syncmesh_core::testing::Rng;

const MAP: &str = "prop";
const KEYS: &[&str] = &["a", "b", "c/d", "e:f", "ü", "k5"];
const FIELDS: &[&str] = &["x", "y", "z", "w"];

fn value(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!(rng.below(5)),
        1 => json!(["s", "t", "u"][rng.below(3) as usize]),
        2 => json!(null),
        3 => json!([rng.below(3), {"n": rng.below(3)}]),
        4 => json!({"deep": {"v": rng.below(3)}}),
        _ => json!(rng.chance(50)),
    }
}

fn data(rng: &mut Rng) -> syncmesh_core::JsonObject {
    let mut d = syncmesh_core::JsonObject::new();
    for f in FIELDS {
        if rng.chance(50) {
            d.insert((*f).to_string(), value(rng));
        }
    }
    d
}

fn opts(rng: &mut Rng, m: &MapReplica, key: &str, now: Timestamp) -> WriteOptions {
    let mut o = WriteOptions::default();
    if rng.chance(15) {
        o.ttl = Some(Ttl::from_secs(rng.below(40) as i64).expect("ttl in range"));
    }
    if rng.chance(15) {
        o.if_match = Some(match m.get(key, now) {
            Ok(i) if rng.chance(70) => i.revision,
            _ => Revision::from_client("0000000000000000"),
        });
    }
    o
}

/// One random operation on one replica. Errors are expected outcomes (removed map, missing
/// item, stale revision) and only need to leave the replica consistent. With `whole_only`,
/// items are only written whole. Returns the key and data of a successful whole write.
fn random_op(
    rng: &mut Rng,
    p: &mut Peer,
    now: Timestamp,
    whole_only: bool,
) -> Option<(String, syncmesh_core::JsonObject)> {
    let sid = MapSid::for_name(MAP);
    if p.cat.by_sid(&sid).is_none_or(|m| !m.is_live(now)) {
        if rng.chance(30) {
            let _ = p.cat.open(
                &MapSpec::named(MAP).mode(OpenMode::OpenOrCreate),
                [0; 16],
                now,
            );
        }
        return None;
    }
    let m = p.map(MAP);
    let key = *rng.pick(KEYS);
    let o = opts(rng, m, key, now);
    let whole = |r: syncmesh_core::Result<syncmesh_core::Item>| r.ok().map(|i| (i.key, i.data));
    let mut op = rng.below(100);
    if whole_only && (25..=49).contains(&op) {
        op -= 25; // a set instead of an update
    }
    if whole_only && (80..=84).contains(&op) {
        op = 99; // a flush instead of an item TTL (which is fine, but keeps cases focused)
    }
    match op {
        0..=24 => return whole(m.set(key, data(rng), &o, now)),
        25..=49 => drop(m.update(key, data(rng), &o, now)),
        50..=61 => {
            let f = *rng.pick(FIELDS);
            let v = value(rng);
            let cancel = rng.chance(10);
            let r = m.mutate(key, &o, now, |cur| {
                if cancel {
                    return None;
                }
                let mut d = cur.cloned().unwrap_or_default();
                if d.contains_key(f) && v.is_null() {
                    d.remove(f);
                } else {
                    d.insert(f.to_string(), v);
                }
                Some(d)
            });
            return r.ok().flatten().map(|i| (i.key, i.data));
        }
        62..=73 => drop(m.remove(key, o.if_match.as_ref(), now)),
        74..=79 => return whole(m.create_item(key, data(rng), o.ttl, now)),
        80..=84 => {
            drop(m.set_item_ttl(key, Ttl::from_secs(rng.below(30) as i64).expect("ttl"), now))
        }
        85..=88 => drop(m.expire(now)),
        89..=90 => drop(m.set_ttl(Ttl::from_secs(rng.below(3) as i64 * 50).expect("ttl"), now)),
        91 => drop(m.remove_map(now)),
        92..=94 => drop(m.conflicts(key, now)),
        95..=96 => drop(m.unload_idle(rng.below(4) as usize, now)),
        _ => drop(m.flush(now)),
    }
    None
}

/// A change from an actor no replica knows, with slots that are garbage, misplaced or valid.
fn foreign_change(rng: &mut Rng, inc: u64) -> OutgoingChange {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    let mut actor = vec![0xF0u8; 8];
    actor.extend_from_slice(&rng.next().to_le_bytes());
    doc.set_actor(automerge::ActorId::from(actor));
    let key = *rng.pick(KEYS);
    let home = syncmesh_core::layout::shard_of(key);
    let index = if rng.chance(60) {
        home
    } else {
        rng.below(u64::from(syncmesh_core::layout::SHARDS)) as u16
    };
    let meta_key = format!("m{}:{key}", key.len());
    let whole_key = format!("w{}:{key}", key.len());
    let field = format!("f{}:{key}{}", key.len(), rng.pick(FIELDS));
    let mut valid_meta = vec![1u8];
    for v in [rng.next(), 1_700_000_000_000, 1_700_000_000_000] {
        valid_meta.extend_from_slice(&v.to_le_bytes());
    }
    valid_meta.push(0);
    valid_meta.extend_from_slice(&0u64.to_le_bytes());
    valid_meta.extend_from_slice(&[0xF0; 32]);
    let puts: Vec<(String, automerge::ScalarValue)> = match rng.below(7) {
        5 => vec![(whole_key, automerge::ScalarValue::Str("not json".into()))],
        6 => vec![
            (meta_key, automerge::ScalarValue::Bytes(valid_meta.clone())),
            (whole_key, automerge::ScalarValue::Str("{\"x\": 1}".into())),
        ],
        0 => vec![(field, automerge::ScalarValue::Int(7))],
        1 => vec![(meta_key, automerge::ScalarValue::Bytes(vec![9; 5]))],
        2 => vec![
            (meta_key, automerge::ScalarValue::Bytes(valid_meta)),
            (field, automerge::ScalarValue::Str("x".into())),
        ],
        3 => vec![
            ("é1:a".to_string(), automerge::ScalarValue::Int(1)),
            ("junk".to_string(), automerge::ScalarValue::Null),
        ],
        _ => vec![(meta_key, automerge::ScalarValue::Int(3))],
    };
    for (k, v) in puts {
        doc.put(automerge::ROOT, k, v)
            .expect("put on a fresh document");
    }
    let bytes = doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .next()
        .expect("one change");
    OutgoingChange {
        map: MapSid::for_name(MAP),
        doc: syncmesh_core::DocAddr::Shard { gen: 0, inc, index },
        bytes,
    }
}

struct Net {
    /// queue[from][to]: changes in flight.
    queues: Vec<Vec<VecDeque<OutgoingChange>>>,
    /// Everything ever sent by each replica (a later anti-entropy pass redelivers it all).
    history: Vec<Vec<OutgoingChange>>,
    /// `group[i]`: replicas in different groups cannot reach each other.
    group: Vec<u8>,
}

impl Net {
    fn collect(&mut self, peers: &mut [Peer], rng: &mut Rng, now: Timestamp) {
        for (i, p) in peers.iter_mut().enumerate() {
            if rng.chance(70) {
                p.pump(now); // flush may lag behind writes, as under group commit
            } else {
                p.collect_events();
            }
            for c in p.sent.drain(..) {
                self.history[i].push(c.clone());
                for j in 0..self.queues[i].len() {
                    if j != i && !rng.chance(10) {
                        // 10 % of sends are lost outright; anti-entropy repairs them
                        self.queues[i][j].push_back(c.clone());
                    }
                }
            }
        }
    }

    /// What each step does after its operation: collect what was sent, deliver some of it.
    fn round(&mut self, peers: &mut [Peer], rng: &mut Rng, now: Timestamp) {
        self.collect(peers, rng, now);
        self.deliver_some(peers, rng, now);
    }

    fn deliver_some(&mut self, peers: &mut [Peer], rng: &mut Rng, now: Timestamp) {
        let n = peers.len();
        for _ in 0..rng.below(6) {
            let (i, j) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
            if i == j || self.group[i] != self.group[j] || self.queues[i][j].is_empty() {
                continue;
            }
            // out of order: any message in the queue, not just the oldest
            let k = rng.below(self.queues[i][j].len() as u64) as usize;
            let msg = if rng.chance(15) {
                self.queues[i][j][k].clone() // duplicate: deliver and keep it queued
            } else {
                match self.queues[i][j].remove(k) {
                    Some(m) => m,
                    None => continue,
                }
            };
            peers[j].receive(std::slice::from_ref(&msg), now);
        }
    }
}

fn snapshot(
    m: &mut MapReplica,
    now: Timestamp,
) -> (
    bool,
    u64,
    Vec<syncmesh_core::Item>,
    BTreeMap<String, syncmesh_core::ItemConflicts>,
) {
    let live = m.is_live(now);
    let items = m.all_items(now);
    let mut conflicts = BTreeMap::new();
    if live {
        for i in &items {
            conflicts.insert(
                i.key.clone(),
                m.conflicts(&i.key, now).expect("conflicts of a live item"),
            );
        }
    }
    (live, m.incarnation(), items, conflicts)
}

fn run_case(seed: u64) {
    let mut rng = Rng(seed);
    let n = 3 + rng.below(3) as usize;
    let mut peers: Vec<Peer> = (0..n).map(|i| Peer::new(i as u8 + 1)).collect();
    let mut net = Net {
        queues: (0..n)
            .map(|_| (0..n).map(|_| VecDeque::new()).collect())
            .collect(),
        history: vec![Vec::new(); n],
        group: vec![0; n],
    };
    // replica clocks are skewed by up to ±5 s
    let skew: Vec<i64> = (0..n).map(|_| rng.below(10_000) as i64 - 5_000).collect();
    let mut time = 0i64;
    // Everyone starts from replica 0's creation, or some create the same name apart.
    peers[0].open(MAP, t(0));
    for (i, p) in peers.iter_mut().enumerate().skip(1) {
        if rng.chance(30) {
            p.open(MAP, t(skew[i]));
        }
    }
    let whole_only = rng.chance(25);
    // Every value written whole, per key (checked against the converged items).
    let mut written: BTreeMap<String, Vec<syncmesh_core::JsonObject>> = BTreeMap::new();
    let steps = 20 + rng.below(60);
    for _ in 0..steps {
        time += rng.below(3_000) as i64;
        if rng.chance(8) {
            // new partition layout
            for g in net.group.iter_mut() {
                *g = if rng.chance(30) {
                    rng.below(2) as u8
                } else {
                    0
                };
            }
        }
        let who = rng.below(n as u64) as usize;
        if !whole_only && rng.chance(3) {
            // A foreign writer's well-formed but hostile change, delivered to some now and to
            // everyone at the end: replicas must still converge (and never panic).
            let inc = peers[0]
                .cat
                .by_sid(&MapSid::for_name(MAP))
                .map_or(0, |m| m.incarnation());
            let c = foreign_change(&mut rng, inc);
            net.history[0].push(c.clone());
            for p in peers.iter_mut() {
                if rng.chance(50) {
                    p.receive(std::slice::from_ref(&c), t(time));
                }
            }
        } else {
            if let Some((k, d)) =
                random_op(&mut rng, &mut peers[who], t(time + skew[who]), whole_only)
            {
                written.entry(k).or_default().push(d);
            }
        }
        net.round(&mut peers, &mut rng, t(time));
    }
    let end = t(time + 200_000);
    heal(&mut peers, &mut net, &mut rng, end);
    let snaps = check(&mut peers, &written, whole_only, end);

    // History cuts: every replica cuts every shard at the heads they now share. Nothing a
    // reader sees changes, no event is emitted, and the replicas go on writing and merging
    // on the new generations (and reopen from what a store keeps of them).
    if rng.chance(50) {
        let sid = MapSid::for_name(MAP);
        // (A replica may hold an empty document of a shard the others never made.)
        let cuts: Vec<Vec<_>> = peers
            .iter_mut()
            .map(|p| {
                p.cut_all(&sid, end)
                    .into_iter()
                    .filter(|(_, g)| g.is_some())
                    .collect()
            })
            .collect();
        for (i, c) in cuts.iter().enumerate() {
            assert_eq!(c, &cuts[0], "replica {i} cut otherwise than replica 0");
            let after = snapshot(peers[i].map(MAP), end);
            assert_eq!(
                after, snaps[i],
                "replica {i}: the cut changed what it shows"
            );
        }
        // Changes of the old generations are never sent again.
        net.history = vec![Vec::new(); n];
        for q in net.queues.iter_mut().flatten() {
            q.clear();
        }
        net.group = vec![0; n];
        let mut time = time + 200_000;
        for _ in 0..5 + rng.below(25) {
            time += rng.below(3_000) as i64;
            let who = rng.below(n as u64) as usize;
            if let Some((k, d)) =
                random_op(&mut rng, &mut peers[who], t(time + skew[who]), whole_only)
            {
                written.entry(k).or_default().push(d);
            }
            net.round(&mut peers, &mut rng, t(time));
        }
        let end = t(time + 200_000);
        heal(&mut peers, &mut net, &mut rng, end);
        check(&mut peers, &written, whole_only, end);
    }
}

/// Heal: every replica gets everything ever sent, in a shuffled order, until quiet.
fn heal(peers: &mut [Peer], net: &mut Net, rng: &mut Rng, end: Timestamp) {
    for _ in 0..4 {
        for p in peers.iter_mut() {
            for m in p.cat.maps_mut() {
                m.expire(end);
            }
        }
        net.collect(peers, rng, end);
        for p in peers.iter_mut() {
            p.pump(end);
        }
        net.collect(peers, rng, end);
        let mut all: Vec<OutgoingChange> = net.history.iter().flatten().cloned().collect();
        for i in (1..all.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            all.swap(i, j);
        }
        for p in peers.iter_mut() {
            p.receive(&all, end);
        }
    }
    net.collect(peers, rng, end);
}

type Snapshot = (
    bool,
    u64,
    Vec<syncmesh_core::Item>,
    BTreeMap<String, syncmesh_core::ItemConflicts>,
);

/// Every replica holds the same items, revisions and conflicts; in whole-only cases each item
/// is one value written whole; each replica's events rebuild its items; what it saves and
/// what a store kept reopen to the same state. Returns each replica's snapshot.
fn check(
    peers: &mut [Peer],
    written: &BTreeMap<String, Vec<syncmesh_core::JsonObject>>,
    whole_only: bool,
    end: Timestamp,
) -> Vec<Snapshot> {
    let sid = MapSid::for_name(MAP);
    let mut snaps = Vec::new();
    for (i, p) in peers.iter_mut().enumerate() {
        let Some(m) = p.cat.by_sid(&sid) else {
            panic!("replica {i} never heard of the map")
        };
        assert!(!m.has_pending(), "replica {i} still has queued writes");
        snaps.push(snapshot(m, end));
    }
    for (i, s) in snaps.iter().enumerate().skip(1) {
        assert_eq!(
            s.0, snaps[0].0,
            "liveness differs between replica 0 and {i}"
        );
        assert_eq!(
            s.1, snaps[0].1,
            "incarnation differs between replica 0 and {i}"
        );
        assert_eq!(s.2, snaps[0].2, "items differ between replica 0 and {i}");
        assert_eq!(
            s.3, snaps[0].3,
            "conflicts differ between replica 0 and {i}"
        );
    }
    if whole_only {
        for item in &snaps[0].2 {
            let values = written.get(&item.key).map_or(&[][..], |v| v.as_slice());
            assert!(
                values.contains(&item.data),
                "item {:?} = {:?} is none of the values written whole: {values:?}",
                item.key,
                item.data
            );
        }
    }
    for (i, p) in peers.iter_mut().enumerate() {
        p.collect_events();
        let view = p.event_view(MAP);
        let items: Vec<_> = view.items.into_values().collect();
        assert_eq!(
            items, snaps[i].2,
            "replica {i}: events do not rebuild its items"
        );
        // what is on disk is what is in memory
        let m = p.map(MAP);
        let docs = m.save_all(end).expect("save");
        let id = p.cat.identity().clone();
        let loaded = MapReplica::load(id, sid.clone(), &docs, end).expect("load");
        let m = p.map(MAP);
        assert_eq!(
            loaded.all_items(end),
            m.all_items(end),
            "replica {i}: reload differs"
        );
        assert_eq!(loaded.is_live(end), m.is_live(end));
        // what a store kept (change logs and view entries) reopens to the same state
        let live_items = m.all_items(end);
        let live = m.is_live(end);
        let mut restored = p.restore(&sid);
        assert_eq!(
            restored.all_items(end),
            live_items,
            "replica {i}: restore differs"
        );
        assert_eq!(restored.is_live(end), live);
        if live {
            for it in &live_items {
                restored
                    .conflicts(&it.key, end)
                    .expect("restored shard documents load");
            }
        }
        let m = p.map(MAP);
        if m.is_live(end) {
            let page = m
                .items(
                    &PageRequest {
                        page_size: Some(100),
                        ..Default::default()
                    },
                    end,
                )
                .expect("page");
            assert_eq!(page.items, snaps[i].2);
        }
    }
    snaps
}

#[test]
fn replicas_converge_under_random_schedules() {
    if let Some(seed) = std::env::var("SYNCMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_case(seed);
        return;
    }
    let cases: u64 = std::env::var("SYNCMESH_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let base: u64 = 0x5eed_0000;
    for c in 0..cases {
        let seed = base + c;
        let r = std::panic::catch_unwind(|| run_case(seed));
        if let Err(e) = r {
            eprintln!("convergence case failed; replay with SYNCMESH_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}
