//! An in-memory network of replicators for protocol tests: nodes exchange [`Wire`] messages
//! through a queue that can drop pushed changes; links come and go.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use syncmesh_core::replication::Outgoing;
use syncmesh_core::testing::Driver;
use syncmesh_core::{
    Catalog, DocAddr, Event, Identity, MapReplica, MapSid, MapSpec, NodeId, Timestamp, WriteOptions,
};

pub fn now() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

pub fn obj(v: serde_json::Value) -> syncmesh_core::JsonObject {
    v.as_object().cloned().unwrap()
}

pub struct Node {
    pub host: Catalog,
    pub rep: Driver,
    pub events: Vec<Event>,
}

pub enum Msg {
    Direct(String, String, Vec<u8>),
    /// A node's own changes pushed to a peer (these may be dropped).
    Push(String, String, Vec<u8>),
}

pub struct Net {
    pub nodes: BTreeMap<String, Node>,
    /// Each node's peer id (what replication and permissions name it by), by name.
    pub ids: BTreeMap<String, String>,
    /// Names by peer id.
    pub names: BTreeMap<String, String>,
    pub links: Vec<(String, String)>,
    pub queue: VecDeque<Msg>,
    /// Drop every n-th pushed message (0: none).
    pub drop_every: usize,
    pub gossip_seen: usize,
    pub violations: Vec<(String, String)>,
    /// `(from, to, change hash)` of every change carried in a direct sync message.
    pub carried: Vec<(String, String, syncmesh_core::ChangeHash)>,
}

impl Net {
    pub fn new(names: &[&str], hold_all: &[&str]) -> Net {
        let mut nodes = BTreeMap::new();
        let mut ids = BTreeMap::new();
        let mut by_id = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            // Keys from fixed seeds: a seeded test replays exactly.
            let key = libp2p_identity::Keypair::ed25519_from_bytes([i as u8 + 1; 32]).unwrap();
            let signer = syncmesh_core::Signer::new(key);
            ids.insert(n.to_string(), signer.peer_id().to_string());
            by_id.insert(signer.peer_id().to_string(), n.to_string());
            let id = Identity::signed(NodeId([i as u8 + 1; 16]), signer, n.as_bytes());
            nodes.insert(
                n.to_string(),
                Node {
                    host: Catalog::new(id),
                    rep: Driver::new(hold_all.contains(n)),
                    events: Vec::new(),
                },
            );
        }
        Net {
            nodes,
            ids,
            names: by_id,
            links: Vec::new(),
            queue: VecDeque::new(),
            drop_every: 0,
            gossip_seen: 0,
            violations: Vec::new(),
            carried: Vec::new(),
        }
    }

    /// A node's peer id.
    pub fn id(&self, n: &str) -> String {
        self.ids[n].clone()
    }

    pub fn node(&mut self, n: &str) -> &mut Node {
        self.nodes.get_mut(n).unwrap()
    }

    pub fn linked(&self, a: &str, b: &str) -> bool {
        self.links
            .iter()
            .any(|(x, y)| (x == a && y == b) || (x == b && y == a))
    }

    pub fn connect(&mut self, a: &str, b: &str) {
        self.links.push((a.to_string(), b.to_string()));
        for (x, y) in [(a, b), (b, a)] {
            let y = self.id(y);
            let node = self.nodes.get_mut(x).unwrap();
            let out = node.rep.peer_up(&y, &mut node.host);
            self.send(x, out);
        }
    }

    pub fn disconnect(&mut self, a: &str, b: &str) {
        self.links
            .retain(|(x, y)| !((x == a && y == b) || (x == b && y == a)));
        let (ia, ib) = (self.id(a), self.id(b));
        self.node(a).rep.peer_down(&ib);
        self.node(b).rep.peer_down(&ia);
    }

    pub fn send(&mut self, from: &str, out: Vec<Outgoing<String>>) {
        for o in out {
            let to = self.names[&o.peer].clone();
            for h in sync_changes(&o.bytes) {
                self.carried.push((from.to_string(), to.clone(), h));
            }
            self.queue
                .push_back(Msg::Direct(from.to_string(), to, o.bytes));
        }
    }

    /// Flushes every node's local writes and pushes them to the peers holding each map (who
    /// pass on what is new to them).
    pub fn flush(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let node = self.nodes.get_mut(&n).unwrap();
            let mut by_map: BTreeMap<MapSid, Vec<(DocAddr, Vec<u8>)>> = BTreeMap::new();
            let mut sigs = std::collections::HashMap::new();
            let mut ask = Vec::new();
            for m in node.host.maps_mut() {
                if !m.take_unsigned_marks().is_empty() {
                    ask.push(m.sid().clone());
                }
                m.flush(now()).unwrap();
                for c in m.take_outgoing() {
                    by_map.entry(c.map).or_default().push((c.doc, c.bytes));
                }
                let resend = m.take_resend();
                if !resend.is_empty() {
                    by_map.entry(m.sid().clone()).or_default().extend(resend);
                }
                sigs.extend(m.take_signatures());
                node.events.extend(m.take_events());
                m.take_received();
            }
            for sid in ask {
                let node = self.nodes.get_mut(&n).unwrap();
                let out = node.rep.ask_signatures(&sid, &mut node.host);
                self.send(&n, out);
            }
            for (sid, changes) in by_map {
                let node = self.nodes.get_mut(&n).unwrap();
                let out = node
                    .rep
                    .committed(&sid, changes, sigs.clone(), &mut node.host);
                for o in out {
                    let to = self.names[&o.peer].clone();
                    self.queue.push_back(Msg::Push(n.clone(), to, o.bytes));
                }
            }
        }
    }

    /// Delivers messages until none is left.
    pub fn run(&mut self) {
        let mut steps = 0;
        loop {
            self.flush();
            if self.queue.is_empty() {
                let names: Vec<String> = self.nodes.keys().cloned().collect();
                for n in names {
                    let node = self.nodes.get_mut(&n).unwrap();
                    let out = node.rep.take_nudges(&mut node.host);
                    self.send(&n, out);
                }
            }
            let Some(msg) = self.queue.pop_front() else {
                break;
            };
            steps += 1;
            if steps > 199_980 {
                let (kind, from, to, bytes) = match &msg {
                    Msg::Direct(f, t, b) => ("direct", f, t, b),
                    Msg::Push(f, t, b) => ("push", f, t, b),
                };
                let w = syncmesh_core::replication::Wire::decode(bytes, usize::MAX);
                eprintln!(
                    "{kind} {from} -> {to}: {:?}",
                    w.map(|w| format!("{w:?}").chars().take(300).collect::<String>())
                );
            }
            assert!(steps < 200_000, "the protocol does not quiesce");
            match msg {
                Msg::Direct(from, to, bytes) => {
                    if !self.linked(&from, &to) {
                        continue;
                    }
                    let from_id = self.id(&from);
                    let node = self.nodes.get_mut(&to).unwrap();
                    match node.rep.receive(&from_id, &bytes, &mut node.host, now()) {
                        Ok(out) => self.send(&to, out),
                        Err(v) => self.violations.push((to.clone(), v.0)),
                    }
                }
                Msg::Push(from, to, bytes) => {
                    if !self.linked(&from, &to) {
                        continue;
                    }
                    self.gossip_seen += 1;
                    if self.drop_every > 0 && self.gossip_seen.is_multiple_of(self.drop_every) {
                        continue;
                    }
                    let from_id = self.id(&from);
                    let node = self.nodes.get_mut(&to).unwrap();
                    match node.rep.receive(&from_id, &bytes, &mut node.host, now()) {
                        Ok(out) => self.send(&to, out),
                        Err(v) => self.violations.push((to.clone(), v.0)),
                    }
                }
            }
        }
    }

    /// Anti-entropy round on every node.
    pub fn tick(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let node = self.nodes.get_mut(&n).unwrap();
            let out = node.rep.tick(&mut node.host);
            self.send(&n, out);
        }
        self.run();
    }

    pub fn items(&mut self, n: &str, map: &str) -> Vec<(String, serde_json::Value, String)> {
        let node = self.node(n);
        let sid = syncmesh_core::MapRef::parse(map).unwrap().sid();
        match node.host.by_sid(&sid) {
            Some(m) => m
                .all_items(now())
                .into_iter()
                .map(|i| {
                    (
                        i.key.clone(),
                        serde_json::Value::Object(i.data.clone()),
                        i.revision.to_string(),
                    )
                })
                .collect(),
            None => Vec::new(),
        }
    }

    pub fn digest(&mut self, n: &str, map: &str) -> u64 {
        let sid = syncmesh_core::MapRef::parse(map).unwrap().sid();
        let node = self.node(n);
        node.host.by_sid(&sid).map_or(0, |m| m.digest().unwrap())
    }
}

/// Hashes of the changes a direct message carries (in sync messages or split off them).
fn sync_changes(bytes: &[u8]) -> Vec<syncmesh_core::ChangeHash> {
    use syncmesh_core::replication::Wire;
    match Wire::decode(bytes, usize::MAX) {
        Ok(Wire::Sync { msgs, .. }) => msgs
            .iter()
            .filter_map(|(_, b)| automerge::sync::Message::decode(&b.0).ok())
            .flat_map(|m| {
                m.changes
                    .iter()
                    .filter_map(|c| automerge::Change::from_bytes(c.to_vec()).ok())
                    .map(|c| c.hash())
                    .collect::<Vec<_>>()
            })
            .collect(),
        Ok(Wire::Changes { docs, .. }) => docs
            .iter()
            .flat_map(|(_, cs)| cs.iter())
            .filter_map(|c| automerge::Change::from_bytes(c.0.clone()).ok())
            .map(|c| c.hash())
            .collect(),
        _ => Vec::new(),
    }
}

pub fn write(net: &mut Net, n: &str, map: &str, key: &str, v: serde_json::Value) {
    let node = net.node(n);
    let (m, _) = node
        .host
        .open(&MapSpec::named(map), [7; 16], now())
        .unwrap();
    m.set(key, obj(v), &WriteOptions::default(), now()).unwrap();
}

/// `n` starts holding `map` empty (opening a map that only peers have).
pub fn hold(net: &mut Net, n: &str, map: &str) {
    let sid = MapSid::for_name(map);
    let node = net.node(n);
    let id = node.host.identity().clone();
    node.host.insert(MapReplica::empty(id, sid.clone()));
    let out = node.rep.announce(&[sid], &mut node.host);
    net.send(n, out);
}
