//! Shared helpers for the engine's integration tests: replicas and a hand-driven network.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the report

use serde_json::Value;
use syncmesh_core::{
    Catalog, Event, EventView, Identity, JsonObject, MapReplica, MapSid, MapSpec, NodeId,
    OutgoingChange, Timestamp,
};

pub const T0: i64 = 1_700_000_000_000;

pub fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(T0 + ms)
}

pub fn obj(v: Value) -> JsonObject {
    v.as_object().cloned().expect("test data is an object")
}

/// A replica of one catalog plus everything it has sent and every event it has emitted.
pub struct Peer {
    pub cat: Catalog,
    pub sent: Vec<OutgoingChange>,
    pub events: Vec<Event>,
}

impl Peer {
    pub fn new(n: u8) -> Self {
        Peer {
            cat: Catalog::new(Identity::new(NodeId([n; 16]), &[n, 0xAA])),
            sent: Vec::new(),
            events: Vec::new(),
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
            self.sent.extend(m.take_outgoing());
            self.events.extend(m.take_events());
        }
    }

    /// Collects events only (no flush).
    pub fn collect_events(&mut self) {
        for m in self.cat.maps_mut() {
            self.events.extend(m.take_events());
        }
    }

    pub fn receive(&mut self, changes: &[OutgoingChange], now: Timestamp) {
        for c in changes {
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
