//! Shared helpers for the engine's integration tests: replicas and a hand-driven network.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

use syncmesh_core::testing::stored_view;

use std::collections::BTreeMap;

use serde_json::Value;
use syncmesh_core::{
    Catalog, DocAddr, Event, EventView, Identity, JsonObject, MapReplica, MapSid, MapSpec, NodeId,
    OutgoingChange, StoredDoc, Timestamp,
};

pub const T0: i64 = 1_700_000_000_000;

pub fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(T0 + ms)
}

pub fn obj(v: Value) -> JsonObject {
    v.as_object().cloned().expect("test data is an object")
}

/// A document as a store keys it: a shard by incarnation and index, whatever its generation
/// (a cut replaces the stored document).
pub fn store_addr(doc: DocAddr) -> DocAddr {
    match doc {
        DocAddr::Shard { inc, index, .. } => DocAddr::Shard { inc, index, gen: 0 },
        d => d,
    }
}

/// A replica of one catalog plus everything it has sent and every event it has emitted, and
/// what a store would hold for it (every change it made or received, per document, and the
/// view entries from `take_view_changes`).
pub struct Peer {
    pub cat: Catalog,
    pub sent: Vec<OutgoingChange>,
    pub events: Vec<Event>,
    pub stored_docs: BTreeMap<(MapSid, DocAddr), StoredDoc>,
    pub stored_view: BTreeMap<MapSid, BTreeMap<String, Vec<u8>>>,
}

impl Peer {
    pub fn new(n: u8) -> Self {
        Peer {
            cat: Catalog::new(Identity::new(NodeId([n; 16]), &[n, 0xAA])),
            sent: Vec::new(),
            events: Vec::new(),
            stored_docs: BTreeMap::new(),
            stored_view: BTreeMap::new(),
        }
    }

    pub fn open(&mut self, name: &str, now: Timestamp) -> &mut MapReplica {
        self.cat
            .open(&MapSpec::named(name), [9; 16], now)
            .expect("open map")
            .0
    }

    pub fn map(&mut self, name: &str) -> &mut MapReplica {
        self.cat
            .by_sid(&MapSid::for_name(name))
            .expect("map held by this peer")
    }

    /// Flushes every map and collects outgoing changes and events.
    pub fn pump(&mut self, now: Timestamp) {
        for m in self.cat.maps_mut() {
            m.flush(now).expect("flush");
            let out = m.take_outgoing();
            for c in &out {
                self.stored_docs
                    .entry((c.map.clone(), store_addr(c.doc)))
                    .or_default()
                    .changes
                    .push(c.bytes.clone());
            }
            self.sent.extend(out);
            self.events.extend(m.take_events());
            let vc = m.take_view_changes(now).expect("view changes");
            let view = self.stored_view.entry(m.sid().clone()).or_default();
            stored_view::apply(view, vc);
        }
    }

    /// Reopens a map from what the store would hold.
    pub fn restore(&self, sid: &MapSid) -> MapReplica {
        let docs: Vec<(DocAddr, StoredDoc)> = self
            .stored_docs
            .iter()
            .filter(|((m, _), _)| m == sid)
            .map(|((_, d), b)| (*d, b.clone()))
            .collect();
        let entries = self
            .stored_view
            .get(sid)
            .cloned()
            .unwrap_or_default()
            .into_iter();
        let last = self
            .events
            .iter()
            .filter(|e| &e.map == sid)
            .map(|e| e.id)
            .max()
            .unwrap_or(0);
        MapReplica::restore(
            self.cat.identity().clone(),
            sid.clone(),
            docs,
            entries,
            last,
        )
        .expect("restore")
    }

    /// Collects events only (no flush).
    /// Cuts the history of every shard of map `sid` at its own heads, and keeps in place of
    /// each cut shard's stored changes its new generation's snapshot, as a store does.
    /// Returns each shard's new generation (`None`: not cut).
    pub fn cut_all(&mut self, sid: &MapSid, now: Timestamp) -> Vec<(u16, Option<u64>)> {
        self.pump(now);
        let m = self.cat.by_sid(sid).expect("map held by this peer");
        // `receive` stored them already.
        m.take_received();
        let inc = m.incarnation();
        let mut out = Vec::new();
        for index in m.shard_indices() {
            let gen = m.cut_shard(index, None, now).expect("cut");
            if gen.is_some() {
                let doc = DocAddr::Shard { gen: 0, inc, index };
                let snapshot = m.snapshot(doc, now).expect("snapshot");
                self.stored_docs.insert(
                    (sid.clone(), doc),
                    StoredDoc {
                        snapshot,
                        changes: Vec::new(),
                    },
                );
            }
            out.push((index, gen));
        }
        self.pump(now);
        out
    }

    pub fn collect_events(&mut self) {
        for m in self.cat.maps_mut() {
            self.events.extend(m.take_events());
        }
    }

    pub fn receive(&mut self, changes: &[OutgoingChange], now: Timestamp) {
        for c in changes {
            self.stored_docs
                .entry((c.map.clone(), store_addr(c.doc)))
                .or_default()
                .changes
                .push(c.bytes.clone());
            self.cat
                .apply_changes(&c.map, c.doc, std::slice::from_ref(&c.bytes), now)
                .expect("apply change");
        }
        self.pump(now);
    }

    /// Rebuilds this peer's view of `name` from its event stream.
    pub fn event_view(&self, name: &str) -> EventView {
        let sid = MapSid::for_name(name);
        let mut v = EventView::default();
        for e in self.events.iter().filter(|e| e.map == sid) {
            v.apply(e)
                .unwrap_or_else(|err| panic!("inconsistent event stream: {err}"));
        }
        v
    }
}

/// Delivers everything every peer has sent to every other peer, until quiet.
pub fn sync_all(peers: &mut [Peer], now: Timestamp) {
    for p in peers.iter_mut() {
        p.pump(now);
    }
    loop {
        let mut moved = false;
        for i in 0..peers.len() {
            let out = std::mem::take(&mut peers[i].sent);
            if out.is_empty() {
                continue;
            }
            moved = true;
            for (j, peer) in peers.iter_mut().enumerate() {
                if i != j {
                    peer.receive(&out, now);
                }
            }
        }
        if !moved {
            break;
        }
    }
}
