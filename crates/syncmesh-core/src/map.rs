//! One map on one replica: Sync Maps operations in, Automerge changes and events out.
//!
//! Writes are *write-behind*: an operation validates, updates the replica's read view, queues
//! the slot writes it implies and emits its event at once; [`MapReplica::flush`] turns the queued
//! writes into one Automerge change per touched shard. The durable shell flushes once per group
//! commit, so Automerge's per-operation cost is paid once per slot per batch, and reads never
//! touch Automerge at all. Before a remote change is merged into a shard, that shard's queue is
//! flushed, so local writes are ordered exactly as Automerge would have ordered them had they
//! been committed one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, PatchAction, PatchLog, Prop, ReadDoc, ScalarValue,
    Value, ROOT,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::authorship::{Signature, Signer};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, Item, MapInfo};
use crate::ids::{hash64, MapSid, NodeId, Revision, Timestamp};
use crate::json::{self, Encoded};
use crate::layout::{self, ItemMeta, Slot, SHARDS};
use crate::limits::{self, Ttl};
use crate::paging::{self, Page, PageRequest};
use crate::JsonObject;

/// Which Automerge document of a map a change belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DocAddr {
    /// The map document: name, incarnation, creation, TTL, removal.
    Meta,
    /// One shard of one incarnation of the map.
    Shard {
        /// The incarnation (bumped each time a removed map is created again).
        inc: u64,
        /// Shard index, below [`SHARDS`].
        index: u16,
    },
}

/// A change made on this replica, to be stored and sent to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingChange {
    /// The map it belongs to.
    pub map: MapSid,
    /// The document it belongs to.
    pub doc: DocAddr,
    /// The encoded Automerge change.
    pub bytes: Vec<u8>,
}

/// Who is writing: the node (shown as `created_by`), the Automerge actor it writes as, and the
/// key it signs its changes with, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node's id.
    pub node: NodeId,
    /// The Automerge actor id; unique per node *and* per copy of its data (see ARCHITECTURE).
    pub actor: Vec<u8>,
    /// Signs the changes this node makes to maps with permission entries.
    pub signer: Option<Signer>,
}

impl Identity {
    /// An identity without a key, whose actor is the node id followed by `session` bytes.
    pub fn new(node: NodeId, session: &[u8]) -> Self {
        let mut actor = node.0.to_vec();
        actor.extend_from_slice(session);
        Identity {
            node,
            actor,
            signer: None,
        }
    }

    /// An identity that signs with `signer`: its actor is bound to the signer's peer id
    /// ([`crate::authorship::actor_prefix`]) followed by `session` bytes.
    pub fn signed(node: NodeId, signer: Signer, session: &[u8]) -> Self {
        let mut actor = crate::authorship::actor_prefix(signer.peer_id())
            .map(|p| p.to_vec())
            .unwrap_or_else(|| node.0.to_vec());
        actor.extend_from_slice(session);
        Identity {
            node,
            actor,
            signer: Some(signer),
        }
    }
}

/// Options of a write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Set the item's TTL (from now); `None` keeps the current expiry.
    pub ttl: Option<Ttl>,
    /// Only write if the item's current revision is this one (REST `If-Match`).
    pub if_match: Option<Revision>,
}

impl WriteOptions {
    /// Options with a TTL.
    pub fn ttl(ttl: Ttl) -> Self {
        WriteOptions {
            ttl: Some(ttl),
            if_match: None,
        }
    }

    /// Options with an If-Match revision.
    pub fn if_match(rev: Revision) -> Self {
        WriteOptions {
            ttl: None,
            if_match: Some(rev),
        }
    }
}

/// How a map's read view changed, for a store that keeps a copy of it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewChanges {
    /// The view was emptied first (the map was removed or created again).
    pub reset: bool,
    /// Entries to write (`Some`) or delete (`None`), by item key, in key order.
    pub entries: Vec<(String, Option<Vec<u8>>)>,
}

const ENTRY_VERSION: u8 = 1;
const ENTRY_HEADER: usize = 1 + 8 * 5 + 16 + 1;

/// A view entry as stored: version, stamps, revision, dates, creator, then the JSON text.
fn encode_entry(st: &ItemState, nodes: &Nodes) -> Vec<u8> {
    let mut b = Vec::with_capacity(ENTRY_HEADER + st.data.len());
    b.push(ENTRY_VERSION);
    b.extend_from_slice(&st.max_stamp.to_le_bytes());
    b.extend_from_slice(&st.revision.to_le_bytes());
    b.extend_from_slice(&st.meta.created.to_le_bytes());
    b.extend_from_slice(&st.meta.updated.to_le_bytes());
    b.extend_from_slice(&st.meta.expires.to_le_bytes());
    b.extend_from_slice(&nodes.get(st.meta.created_by).0);
    b.push(u8::from(st.meta.conflicted));
    b.extend_from_slice(st.data.as_bytes());
    b
}

fn decode_entry(b: &[u8], nodes: &mut Nodes) -> Option<ItemState> {
    if b.len() < ENTRY_HEADER || b[0] != ENTRY_VERSION {
        return None;
    }
    let w = |i: usize| -> Option<[u8; 8]> { b.get(i..i + 8)?.try_into().ok() };
    // Not parsed here: reopening a 1M-item map must stay one cheap pass; the store's
    // checksums guard the bytes, and the text was written by serde_json from an object.
    let data = std::str::from_utf8(&b[ENTRY_HEADER..]).ok()?;
    if !(data.starts_with('{') && data.ends_with('}')) {
        return None;
    }
    Some(ItemState {
        data: data.into(),
        meta: ViewMeta {
            created: i64::from_le_bytes(w(17)?),
            updated: i64::from_le_bytes(w(25)?),
            expires: i64::from_le_bytes(w(33)?),
            created_by: nodes.intern(NodeId::from_slice(b.get(41..57)?)?),
            conflicted: *b.get(57)? == 1,
        },
        max_stamp: u64::from_le_bytes(w(1)?),
        revision: u64::from_le_bytes(w(9)?),
    })
}

/// Every concurrent value of an item, for the conflicts API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemConflicts {
    /// The item's key.
    pub key: String,
    /// Concurrent whole values (of `set`, `mutate` or `create_item` on several replicas) that
    /// no later write resolved: all of them, the visible (winning) one first; empty when
    /// there is at most one.
    pub values: Vec<JsonObject>,
    /// For each field that concurrent `update`s wrote: all its values, the visible (winning)
    /// one first.
    pub fields: BTreeMap<String, Vec<Json>>,
    /// The nodes whose concurrent writes to the item are all still current, winner first
    /// (one entry when there is no conflict).
    pub writers: Vec<NodeId>,
}

/// One item in the read view. The data is kept as compact JSON text: a parsed
/// `serde_json::Map` costs several times more memory per item than its text.
#[derive(Debug, Clone, PartialEq)]
struct ItemState {
    data: Box<str>,
    meta: ViewMeta,
    max_stamp: u64,
    revision: u64,
}

/// The winning meta record as the view keeps it: node ids interned, no option tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ViewMeta {
    created: i64,
    updated: i64,
    /// `i64::MIN` when the item has no TTL.
    expires: i64,
    created_by: u32,
    /// Some field has concurrent values (set from the documents, cleared by full writes).
    conflicted: bool,
}

impl ViewMeta {
    fn created(self) -> Timestamp {
        Timestamp::from_millis(self.created)
    }
    fn updated(self) -> Timestamp {
        Timestamp::from_millis(self.updated)
    }
    fn expires(self) -> Option<Timestamp> {
        (self.expires != i64::MIN).then(|| Timestamp::from_millis(self.expires))
    }
}

/// Node ids seen in a map, interned so each view entry stores 4 bytes instead of 16.
#[derive(Debug, Default)]
struct Nodes {
    list: Vec<NodeId>,
    index: std::collections::HashMap<NodeId, u32>,
}

impl Nodes {
    fn intern(&mut self, n: NodeId) -> u32 {
        if let Some(i) = self.index.get(&n) {
            return *i;
        }
        let i = self.list.len() as u32;
        self.list.push(n);
        self.index.insert(n, i);
        i
    }
    fn get(&self, i: u32) -> NodeId {
        self.list
            .get(i as usize)
            .copied()
            .unwrap_or(NodeId([0; 16]))
    }
}

/// An item as read from a shard document, before it enters the view.
struct RawItem {
    data: JsonObject,
    meta: ItemMeta,
    max_stamp: u64,
    revision: u64,
    conflicted: bool,
}

impl ItemState {
    fn new(
        data: &JsonObject,
        meta: &ItemMeta,
        max_stamp: u64,
        revision: u64,
        nodes: &mut Nodes,
    ) -> Self {
        ItemState {
            data: serde_json::to_string(data)
                .unwrap_or_default()
                .into_boxed_str(),
            meta: ViewMeta {
                created: meta.created.millis(),
                updated: meta.updated.millis(),
                expires: meta
                    .expires
                    .map_or(i64::MIN, |e| e.millis().max(i64::MIN + 1)),
                created_by: nodes.intern(meta.created_by),
                conflicted: false,
            },
            max_stamp,
            revision,
        }
    }

    fn from_raw(raw: RawItem, nodes: &mut Nodes) -> Self {
        let mut st = ItemState::new(&raw.data, &raw.meta, raw.max_stamp, raw.revision, nodes);
        st.meta.conflicted = raw.conflicted;
        st
    }

    fn data(&self) -> JsonObject {
        // The text was produced by serde_json from a Map, so it always parses back.
        serde_json::from_str(&self.data).unwrap_or_default()
    }

    fn revision(&self) -> Revision {
        Revision::from_hash(self.revision)
    }

    fn to_item(&self, key: &str, nodes: &Nodes) -> Item {
        Item {
            key: key.to_string(),
            data: self.data(),
            revision: self.revision(),
            date_created: self.meta.created(),
            date_updated: self.meta.updated(),
            date_expires: self.meta.expires(),
            created_by: nodes.get(self.meta.created_by),
        }
    }

    fn expired(&self, now: Timestamp) -> bool {
        self.meta.expires().is_some_and(|e| e <= now)
    }
}

#[derive(Debug, Clone)]
enum Pending {
    /// An item's whole data (its JSON text), replacing every field slot the writer saw.
    Whole(Box<str>),
    /// One field written by an update, on top of the whole data.
    Field(Json),
    /// The meta record, and whether the write creates the item.
    Meta(Vec<u8>, bool),
    Delete,
}

/// A shard document is either in memory or kept as its saved (compressed) bytes: Automerge
/// holds ~300 bytes per item plus ~10 KiB per document in memory against ~25 bytes per item
/// saved, so idle shards are parked ([`MapReplica::unload_idle`]) and reloaded on use.
enum Body {
    /// Boxed: an `Automerge` is ~3.5 KiB inline, which a parked shard should not pay.
    Live(Box<Automerge>),
    Cold(StoredDoc),
}

/// A document as a store keeps it: a saved snapshot (Automerge's `save`) and the changes made
/// or received after it, in any order (changes whose dependencies are missing wait inside
/// Automerge until those arrive, as they do when received from a peer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// Output of `save()`, if a snapshot was taken.
    pub snapshot: Option<Vec<u8>>,
    /// Encoded changes after the snapshot.
    pub changes: Vec<Vec<u8>>,
}

impl StoredDoc {
    /// Every change it holds, decoded (including ones whose dependencies are missing).
    fn decode_changes(&self, what: &str) -> Result<Vec<Change>> {
        let mut out = match &self.snapshot {
            Some(s) => Automerge::load(s)
                .map_err(|e| Error::Corrupt(format!("{what}: snapshot: {e}")))?
                .get_changes(&[])
                .into_iter()
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        for (i, c) in self.changes.iter().enumerate() {
            out.push(
                Change::from_bytes(c.clone())
                    .map_err(|e| Error::Corrupt(format!("{what}: change {i}: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Rebuilds the document; `what` names it in errors.
    fn load(&self, actor: &ActorId, what: &str) -> Result<Automerge> {
        let mut d = match &self.snapshot {
            Some(s) => {
                Automerge::load(s).map_err(|e| Error::Corrupt(format!("{what}: snapshot: {e}")))?
            }
            None => Automerge::new(),
        };
        let mut changes = Vec::with_capacity(self.changes.len());
        for (i, c) in self.changes.iter().enumerate() {
            changes.push(
                Change::from_bytes(c.clone())
                    .map_err(|e| Error::Corrupt(format!("{what}: change {i}: {e}")))?,
            );
        }
        d.apply_changes(changes)
            .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
        d.set_actor(actor.clone());
        Ok(d)
    }
}

/// Estimated heap of a live shard document: per operation it holds (history included) and
/// per document (Automerge 0.6; calibrated with `benches/engine.rs`, which prints the estimate
/// next to the measured heap).
pub const LIVE_OP_BYTES: u64 = 480;
/// See [`LIVE_OP_BYTES`].
pub const LIVE_DOC_BYTES: u64 = 12 * 1024;

struct Shard {
    body: Body,
    actor: ActorId,
    pending: BTreeMap<String, Pending>,
    last_used: u64,
    /// Operations the live document holds (0 while parked), for [`MapReplica::live_bytes`].
    ops: u64,
    /// Heads of a parked document, so digests for replication need not load it.
    cold_heads: Option<Vec<ChangeHash>>,
}

impl Shard {
    fn new(actor: &ActorId) -> Self {
        let mut doc = Automerge::new();
        doc.set_actor(actor.clone());
        Shard {
            body: Body::Live(Box::new(doc)),
            actor: actor.clone(),
            pending: BTreeMap::new(),
            last_used: 0,
            ops: 0,
            cold_heads: None,
        }
    }

    /// Estimated heap of the document while live; 0 when parked.
    fn live_bytes(&self) -> u64 {
        match self.body {
            Body::Live(_) => LIVE_DOC_BYTES + self.ops * LIVE_OP_BYTES,
            Body::Cold(_) => 0,
        }
    }

    /// The document's heads (a parked one is loaded only if its heads are not known).
    fn heads(&mut self) -> Result<Vec<ChangeHash>> {
        if let (Body::Cold(_), Some(h)) = (&self.body, &self.cold_heads) {
            return Ok(h.clone());
        }
        Ok(self.doc()?.get_heads())
    }

    /// The document, loading it if it was parked.
    fn doc(&mut self) -> Result<&mut Automerge> {
        if let Body::Cold(stored) = &self.body {
            let d = stored.load(&self.actor, "shard document")?;
            self.ops = crate::am::op_count(&d);
            self.body = Body::Live(Box::new(d));
        }
        match &mut self.body {
            Body::Live(d) => Ok(d),
            Body::Cold(_) => Err(Error::Corrupt("shard document failed to load".into())),
        }
    }

    /// Replaces a live document by its saved bytes; false if it was already parked.
    fn park(&mut self) -> bool {
        let Body::Live(d) = &self.body else {
            return false;
        };
        let mut saved = d.save();
        // save() over-allocates; parked bytes are kept for a long time.
        saved.shrink_to_fit();
        self.cold_heads = Some(d.get_heads());
        self.ops = 0;
        self.body = Body::Cold(StoredDoc {
            snapshot: Some(saved),
            changes: Vec::new(),
        });
        true
    }

    fn saved(&mut self) -> Result<Vec<u8>> {
        match &self.body {
            Body::Live(d) => Ok(d.save()),
            Body::Cold(StoredDoc {
                snapshot: Some(s),
                changes,
            }) if changes.is_empty() => Ok(s.clone()),
            Body::Cold(_) => Ok(self.doc()?.save()),
        }
    }
}

/// The map-level state, decoded from the map document.
#[derive(Debug, Clone, PartialEq)]
struct MapState {
    name: Option<String>,
    inc: u64,
    created: Option<Timestamp>,
    created_by: NodeId,
    expires: Option<Timestamp>,
    removed: Option<Timestamp>,
    updated: Timestamp,
    revision: Revision,
    /// The map's permissions (kept across incarnations: re-creating a map does not open it).
    policy: crate::policy::Policy,
    /// Endorsed shard heads (see [`MapReplica::endorsed`]).
    endorsed: HashSet<ChangeHash>,
    /// The same, by shard (every conflicting value of each `g<shard>` slot).
    endorsed_by_shard: BTreeMap<u16, Vec<ChangeHash>>,
}

impl MapState {
    fn exists(&self) -> bool {
        self.created.is_some()
    }

    /// Exists and was not removed (it may have expired).
    fn live_or_expired(&self) -> bool {
        self.exists() && self.removed.is_none()
    }

    fn live(&self, now: Timestamp) -> bool {
        self.exists() && self.removed.is_none() && self.expires.is_none_or(|e| e > now)
    }
}

/// Upper bound on changes buffered for an incarnation this replica has not seen yet.
const MAX_FUTURE_CHANGES: usize = 100_000;
/// Upper bound on the bytes of those changes (a peer must not park unbounded memory here).
const MAX_FUTURE_BYTES: usize = 2 << 20;

/// One map held by one replica.
pub struct MapReplica {
    id: Identity,
    actor: ActorId,
    sid: MapSid,
    meta_doc: Automerge,
    state: MapState,
    /// Shard documents that exist, by index (a map touches few of them until it is large).
    shards: BTreeMap<u16, Shard>,
    dirty: BTreeSet<u16>,
    view: BTreeMap<String, ItemState>,
    expiry: BTreeSet<(Timestamp, String)>,
    future: Vec<(DocAddr, Change)>,
    /// Documents and hashes of the changes in `future`, so one sent again is neither kept nor
    /// stored twice (by document: the same change sent for another document is not it).
    future_hashes: HashSet<(DocAddr, ChangeHash)>,
    /// Changes merged but waiting inside Automerge for their dependencies: known, so a copy
    /// sent again is neither stored again nor taken as new (and passed on) again.
    queued_hashes: HashSet<(DocAddr, ChangeHash)>,
    events: Vec<Event>,
    next_event_id: u64,
    outbox: Vec<OutgoingChange>,
    /// Changes merged from peers since the last [`MapReplica::take_received`], for storage.
    received: Vec<(DocAddr, Vec<u8>)>,
    /// Root slots of the changes being applied, when the caller already decoded them.
    prescanned: Option<BTreeSet<String>>,
    clock: u64,
    last_change: Timestamp,
    /// Whether a `MapRemoved` event was emitted for the current incarnation.
    removal_announced: bool,
    use_counter: u64,
    nodes: Nodes,
    dirty_keys: BTreeSet<String>,
    view_reset: bool,
    dropped_changes: u64,
    /// Signatures of changes of this map, by change hash (this node's and verified ones).
    sigs: HashMap<ChangeHash, Signature>,
    /// Signatures added since the last [`MapReplica::take_signatures`], for storage.
    new_sigs: Vec<(ChangeHash, Signature)>,
    /// Changes that changes taken from peers depend on and that have not arrived: taken
    /// whoever wrote them ([`crate::replication::authorize`]).
    wanted: HashSet<(DocAddr, ChangeHash)>,
    /// See [`MapReplica::take_resend`].
    resend: Vec<(DocAddr, Vec<u8>)>,
    /// Others' changes this replica took unsigned while the map was open, that the entries do
    /// not endorse (shard index by hash): their signatures are asked of peers
    /// ([`MapReplica::unsigned`]).
    unsigned: HashMap<ChangeHash, u16>,
    /// Changes to `unsigned` since the last [`MapReplica::take_unsigned_marks`], for storage
    /// (`None`: forgotten).
    new_unsigned: Vec<(ChangeHash, Option<u16>)>,
}

impl std::fmt::Debug for MapReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapReplica")
            .field("sid", &self.sid)
            .field("items", &self.view.len())
            .finish_non_exhaustive()
    }
}

fn tx_err(e: automerge::AutomergeError) -> Error {
    Error::Corrupt(format!("automerge: {e}"))
}

impl MapReplica {
    /// A replica that knows nothing of the map yet: it fills in from peers' changes.
    pub fn empty(id: Identity, sid: MapSid) -> Self {
        let actor = ActorId::from(id.actor.clone());
        let mut meta_doc = Automerge::new();
        meta_doc.set_actor(actor.clone());
        let state = read_map_state(&meta_doc);
        MapReplica {
            id,
            actor,
            sid,
            meta_doc,
            state,
            shards: BTreeMap::new(),
            dirty: BTreeSet::new(),
            view: BTreeMap::new(),
            expiry: BTreeSet::new(),
            future: Vec::new(),
            future_hashes: HashSet::new(),
            queued_hashes: HashSet::new(),
            events: Vec::new(),
            next_event_id: 1,
            outbox: Vec::new(),
            received: Vec::new(),
            prescanned: None,
            clock: 0,
            last_change: Timestamp::from_millis(0),
            removal_announced: false,
            use_counter: 0,
            nodes: Nodes::default(),
            dirty_keys: BTreeSet::new(),
            view_reset: false,
            dropped_changes: 0,
            sigs: HashMap::new(),
            new_sigs: Vec::new(),
            wanted: HashSet::new(),
            resend: Vec::new(),
            unsigned: HashMap::new(),
            new_unsigned: Vec::new(),
        }
    }

    /// Creates a map. `name` must already be validated by the caller (see [`crate::Catalog`]);
    /// a named map's `sid` must be [`MapSid::for_name`] of it.
    pub fn create(
        id: Identity,
        sid: MapSid,
        name: Option<&str>,
        ttl: Option<Ttl>,
        now: Timestamp,
    ) -> Result<Self> {
        if let Some(n) = name {
            limits::validate_name(n)?;
        }
        let mut m = MapReplica::empty(id, sid);
        m.write_incarnation(0, name, ttl, now)?;
        Ok(m)
    }

    /// Creates the map again after it was removed: a fresh, empty incarnation.
    /// `name` is used when this replica has not learnt the map's name yet (it only held
    /// changes from peers).
    pub fn recreate(&mut self, name: Option<&str>, ttl: Option<Ttl>, now: Timestamp) -> Result<()> {
        self.expire(now);
        if self.state.live(now) {
            return Err(Error::MapNameTaken(self.display_name()));
        }
        let inc = if self.state.exists() {
            self.state.inc.checked_add(1).ok_or_else(|| {
                Error::Corrupt(format!("map {} has run out of incarnations", self.sid))
            })?
        } else {
            self.state.inc
        };
        let name = self.state.name.clone().or_else(|| name.map(str::to_string));
        self.write_incarnation(inc, name.as_deref(), ttl, now)
    }

    fn write_incarnation(
        &mut self,
        inc: u64,
        name: Option<&str>,
        ttl: Option<Ttl>,
        now: Timestamp,
    ) -> Result<()> {
        let mut tx = self.meta_doc.transaction();
        if let Some(n) = name {
            tx.put(ROOT, "name", n).map_err(tx_err)?;
        }
        if inc > 0 {
            tx.put(ROOT, "inc", ScalarValue::Uint(inc))
                .map_err(tx_err)?;
        }
        tx.put(ROOT, format!("c{inc}"), now.millis())
            .map_err(tx_err)?;
        tx.put(ROOT, format!("b{inc}"), self.id.node.0.to_vec())
            .map_err(tx_err)?;
        if let Some(e) = ttl.and_then(|t| t.expires_at(now)) {
            tx.put(ROOT, format!("e{inc}"), e.millis())
                .map_err(tx_err)?;
        }
        tx.commit_with(commit_opts(now));
        self.after_meta_commit(now);
        Ok(())
    }

    fn commit_meta(
        &mut self,
        now: Timestamp,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<()>,
    ) -> Result<()> {
        // Queued item writes go out first, so peers see them in the order they were made.
        self.flush(now)?;
        let mut tx = self.meta_doc.transaction();
        f(&mut tx)?;
        tx.commit_with(commit_opts(now));
        self.after_meta_commit(now);
        Ok(())
    }

    fn after_meta_commit(&mut self, now: Timestamp) {
        if let Some(ch) = self.meta_doc.get_last_local_change() {
            // Every map-document change is signed: one may be what restricts the map, or opens
            // it again, and its author's rights decide whether peers take it.
            let hash = ch.hash();
            if let Some(sig) = self.id.signer.as_ref().and_then(|k| k.sign(&hash)) {
                self.sigs.insert(hash, sig.clone());
                self.new_sigs.push((hash, sig));
            }
            self.outbox.push(OutgoingChange {
                map: self.sid.clone(),
                doc: DocAddr::Meta,
                bytes: ch.raw_bytes().to_vec(),
            });
        }
        self.refresh_map_state(true, now);
    }

    /// Buffered peer changes that could not be applied when their map document arrived
    /// (a shell logs this; the peer's sync will offer them again).
    pub fn dropped_changes(&self) -> u64 {
        self.dropped_changes
    }

    /// The map's sid.
    pub fn sid(&self) -> &MapSid {
        &self.sid
    }

    /// The map's unique name, if known.
    pub fn unique_name(&self) -> Option<&str> {
        self.state.name.as_deref()
    }

    /// The current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.state.inc
    }

    /// Whether the map exists and is neither removed nor expired at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.state.live(now)
    }

    /// Whether this replica has heard of the map's creation at all.
    pub fn exists(&self) -> bool {
        self.state.exists()
    }

    fn display_name(&self) -> String {
        self.state
            .name
            .clone()
            .unwrap_or_else(|| self.sid.to_string())
    }

    fn check_live(&self, now: Timestamp) -> Result<()> {
        if !self.state.exists() {
            Err(Error::MapNotFound(self.sid.to_string()))
        } else if !self.state.live(now) {
            Err(Error::MapRemoved(self.display_name()))
        } else {
            Ok(())
        }
    }

    /// The map's description.
    pub fn info(&self, now: Timestamp) -> Result<MapInfo> {
        self.check_live(now)?;
        let created = self.state.created.unwrap_or(Timestamp::from_millis(0));
        Ok(MapInfo {
            sid: self.sid.clone(),
            unique_name: self.state.name.clone(),
            revision: self.state.revision.clone(),
            date_created: created,
            date_updated: self.state.updated.max(self.last_change).max(created),
            date_expires: self.state.expires,
            created_by: self.state.created_by,
            items_count: u64::try_from(self.len(now)).unwrap_or(u64::MAX),
        })
    }

    /// Sets (or with a TTL of 0, clears) the map's expiry, counted from `now`.
    pub fn set_ttl(&mut self, ttl: Ttl, now: Timestamp) -> Result<MapInfo> {
        self.expire(now);
        self.check_live(now)?;
        let inc = self.state.inc;
        let exp = ttl.expires_at(now);
        self.commit_meta(now, |tx| {
            match exp {
                Some(e) => tx.put(ROOT, format!("e{inc}"), e.millis()),
                None => tx.delete(ROOT, format!("e{inc}")),
            }
            .map_err(tx_err)?;
            tx.put(ROOT, format!("u{inc}"), now.millis())
                .map_err(tx_err)
        })?;
        self.info(now)
    }

    /// Removes the map: a replicated tombstone. Emits `MapRemoved`; later writes are refused.
    pub fn remove_map(&mut self, now: Timestamp) -> Result<()> {
        self.expire(now);
        self.check_live(now)?;
        let inc = self.state.inc;
        self.commit_meta(now, |tx| {
            tx.put(ROOT, format!("r{inc}"), now.millis())
                .map_err(tx_err)
        })
    }

    // ----- permissions -----

    /// The map's permissions (empty: open to every trusted peer).
    pub fn policy(&self) -> &crate::policy::Policy {
        &self.state.policy
    }

    /// Shard heads whose history peers take whoever wrote it: what the map held when it got
    /// its first permission entry.
    pub fn endorsed(&self) -> &HashSet<ChangeHash> {
        &self.state.endorsed
    }

    /// The signature of a change of this map, if this replica has it.
    pub fn signature(&self, hash: &ChangeHash) -> Option<&Signature> {
        self.sigs.get(hash)
    }

    /// Keeps verified signatures of changes merged from peers (so they can be passed on).
    pub fn keep_signatures(&mut self, sigs: impl IntoIterator<Item = (ChangeHash, Signature)>) {
        for (h, s) in sigs {
            self.unsigned.remove(&h);
            if let std::collections::hash_map::Entry::Vacant(e) = self.sigs.entry(h) {
                e.insert(s.clone());
                self.new_sigs.push((h, s));
            }
        }
    }

    /// Signatures restored from storage (not stored again).
    pub fn restore_signatures(&mut self, sigs: impl IntoIterator<Item = (ChangeHash, Signature)>) {
        self.sigs.extend(sigs);
        self.unsigned.retain(|h, _| !self.sigs.contains_key(h));
    }

    /// Hashes (at most `max`) of changes this replica holds unsigned and that peers joining
    /// later take only with their author's signature: took while the map was open from a
    /// writer, not endorsed by the entries. Asked of peers until they come.
    ///
    /// Forgets first what no longer needs a signature: changes the endorsed history now
    /// covers (a shard whose endorsed heads have not all arrived waits), changes of writers
    /// who lost `Write`, of shards gone with an old incarnation, or of a map open again.
    pub fn unsigned(&mut self, max: usize) -> Vec<ChangeHash> {
        if self.unsigned.is_empty() {
            return Vec::new();
        }
        let mut drop: Vec<ChangeHash> = Vec::new();
        let mut ask = Vec::new();
        if self.state.policy.is_open() {
            drop.extend(self.unsigned.keys().copied());
        } else {
            let writers = self.writer_prefixes();
            let mut by_shard: BTreeMap<u16, Vec<ChangeHash>> = BTreeMap::new();
            for (h, i) in &self.unsigned {
                by_shard.entry(*i).or_default().push(*h);
            }
            for (index, hashes) in by_shard {
                let endorsed = self
                    .state
                    .endorsed_by_shard
                    .get(&index)
                    .cloned()
                    .unwrap_or_default();
                let Some(d) = self.shards.get_mut(&index).and_then(|sh| sh.doc().ok()) else {
                    drop.extend(hashes); // gone with an old incarnation
                    continue;
                };
                if endorsed.iter().any(|h| d.get_change_by_hash(h).is_none()) {
                    continue; // what is endorsed is not all here yet: decide later
                }
                let after: HashSet<ChangeHash> =
                    d.get_changes(&endorsed).iter().map(|c| c.hash()).collect();
                for h in hashes {
                    let needed = after.contains(&h)
                        && d.get_change_by_hash(&h).is_some_and(|c| {
                            let actor = c.actor_id().to_bytes();
                            writers.iter().any(|p| actor.starts_with(p))
                        });
                    if needed {
                        ask.push(h);
                    } else {
                        drop.push(h);
                    }
                }
            }
        }
        for h in drop {
            self.forget_unsigned(h);
        }
        ask.truncate(max);
        ask
    }

    /// Whether [`Self::unsigned`] has entries (before it forgets what is no longer needed).
    pub fn has_unsigned(&self) -> bool {
        !self.unsigned.is_empty()
    }

    fn forget_unsigned(&mut self, h: ChangeHash) {
        if self.unsigned.remove(&h).is_some() {
            self.new_unsigned.push((h, None));
        }
    }

    /// Actor prefixes of the identities the map's entries let write.
    fn writer_prefixes(&self) -> Vec<[u8; 16]> {
        self.state
            .policy
            .permissions()
            .iter()
            .filter(|p| p.write)
            .filter_map(|p| crate::authorship::actor_prefix(&p.identity))
            .collect()
    }

    /// Changes to [`Self::unsigned`] since the last call, for storage: `(hash, Some(shard))`
    /// noted, `(hash, None)` forgotten (or signed: the signature is stored instead).
    pub fn take_unsigned_marks(&mut self) -> Vec<(ChangeHash, Option<u16>)> {
        let marks = std::mem::take(&mut self.new_unsigned);
        marks
            .into_iter()
            .filter(|(h, i)| match i {
                Some(_) => self.unsigned.contains_key(h),
                None => !self.sigs.contains_key(h) && !self.unsigned.contains_key(h),
            })
            .collect()
    }

    /// [`Self::unsigned`] entries restored from storage (those signed since are skipped).
    pub fn restore_unsigned(&mut self, marks: impl IntoIterator<Item = (ChangeHash, u16)>) {
        for (h, index) in marks {
            if self.sigs.contains_key(&h) {
                continue;
            }
            if self.unsigned.len() < MAX_UNSIGNED {
                self.unsigned.insert(h, index);
            } else {
                self.new_unsigned.push((h, None));
            }
        }
    }

    /// Takes signatures a peer sent for [`Self::unsigned`] changes; returns how many were
    /// taken, or `Err` with the first that is not a valid signature of its hash by a writer
    /// of the map (an honest peer holds only signatures it checked). Each signature is checked
    /// before the change is looked at.
    pub fn take_late_signatures(
        &mut self,
        sigs: Vec<(ChangeHash, Signature)>,
    ) -> std::result::Result<usize, ChangeHash> {
        for (h, s) in &sigs {
            if !s.signs_hash(h) || !self.state.policy.writes(&s.author) {
                return Err(*h);
            }
        }
        let mut good = Vec::new();
        for (h, s) in sigs {
            let Some(&index) = self.unsigned.get(&h) else {
                continue;
            };
            let Some(d) = self.shards.get_mut(&index).and_then(|sh| sh.doc().ok()) else {
                continue;
            };
            if d.get_change_by_hash(&h).is_some_and(|c| s.signs(c)) {
                good.push((h, s));
            }
        }
        let n = good.len();
        self.keep_signatures(good);
        Ok(n)
    }

    /// Whether changes of `doc` belong to an incarnation of the map this replica has not
    /// seen yet (its map document has not arrived).
    pub fn awaits_incarnation(&self, doc: DocAddr) -> bool {
        matches!(self.fate(doc), Fate::Waiting)
    }

    /// Whether this replica has nothing of the map document yet (it is fetching the map, and
    /// does not know its permissions).
    pub fn knows_nothing(&self) -> bool {
        self.meta_doc.get_heads().is_empty()
    }

    /// Whether a change taken earlier depends on this missing change.
    pub fn wants(&self, doc: DocAddr, hash: &ChangeHash) -> bool {
        self.wanted.contains(&(doc, *hash))
    }

    /// Notes that a change taken depends on this missing one.
    pub fn want(&mut self, doc: DocAddr, hash: ChangeHash) {
        if self.wanted.len() >= 100_000 {
            // Bounded: at worst such a change is refused once and fetched again with the
            // change that depends on it.
            self.wanted.clear();
        }
        self.wanted.insert((doc, hash));
    }

    /// Signatures made or kept since the last call, for storage.
    pub fn take_signatures(&mut self) -> Vec<(ChangeHash, Signature)> {
        std::mem::take(&mut self.new_sigs)
    }

    /// Sets one identity's permissions. `me` is this node's identity: on a map with entries it
    /// must have `Manage`; the first entry of an open map also lists `me` as a manager (else
    /// this node's own writes would be refused by everyone it shares the map with).
    pub fn set_permission(
        &mut self,
        p: &crate::policy::Permission,
        me: &str,
        now: Timestamp,
    ) -> Result<crate::policy::Permission> {
        self.expire(now);
        self.check_live(now)?;
        if !crate::policy::valid_identity(&p.identity) {
            return Err(Error::InvalidPermission(format!(
                "identity {:?} must be 1 to {} characters of A-Z, a-z, 0-9, '.', '_', '-'",
                p.identity,
                crate::policy::MAX_IDENTITY
            )));
        }
        let policy = self.state.policy.clone();
        if !policy.manages(me) {
            return Err(Error::PermissionDenied(format!(
                "this node ({me}) may not manage map {}",
                self.display_name()
            )));
        }
        if policy.get(&p.identity).is_none() && policy.len() >= crate::policy::MAX_ENTRIES {
            return Err(Error::InvalidPermission(format!(
                "a map has at most {} permission entries",
                crate::policy::MAX_ENTRIES
            )));
        }
        let add_me = policy.is_open() && p.identity != me && crate::policy::valid_identity(me);
        let flags = p.flags();
        // The map's history so far was written while everyone could write (or by a writer who
        // loses `Write` now): this change endorses it, shard by shard (map-document history is
        // endorsed by being this change's ancestors), so peers take it whoever made it.
        let loses_write = policy.get(&p.identity).is_some_and(|o| o.write) && !p.write;
        let endorse = if policy.is_open() || loses_write {
            self.endorsement(now)?
        } else {
            Vec::new()
        };
        self.commit_meta(now, |tx| {
            for (slot, heads) in endorse {
                tx.put(ROOT, slot, heads).map_err(tx_err)?;
            }
            tx.put(
                ROOT,
                format!("{}{}", crate::policy::PREFIX, p.identity),
                u64::from(flags),
            )
            .map_err(tx_err)?;
            if add_me {
                let all = crate::policy::READ | crate::policy::WRITE | crate::policy::MANAGE;
                tx.put(
                    ROOT,
                    format!("{}{me}", crate::policy::PREFIX),
                    u64::from(all),
                )
                .map_err(tx_err)?;
            }
            Ok(())
        })?;
        Ok(p.clone())
    }

    /// Removes one identity's entry; `me` must have `Manage`. Removing the last entry opens the
    /// map to every trusted peer again. Fails with [`Error::PermissionNotFound`] if it had none.
    pub fn remove_permission(&mut self, identity: &str, me: &str, now: Timestamp) -> Result<()> {
        self.expire(now);
        self.check_live(now)?;
        if self.state.policy.get(identity).is_none() {
            return Err(Error::PermissionNotFound(identity.to_string()));
        }
        if !self.state.policy.manages(me) {
            return Err(Error::PermissionDenied(format!(
                "this node ({me}) may not manage map {}",
                self.display_name()
            )));
        }
        let endorse = if self.state.policy.writes(identity) {
            self.endorsement(now)?
        } else {
            Vec::new()
        };
        self.commit_meta(now, |tx| {
            for (slot, heads) in endorse {
                tx.put(ROOT, slot, heads).map_err(tx_err)?;
            }
            tx.delete(ROOT, format!("{}{identity}", crate::policy::PREFIX))
                .map_err(tx_err)
        })
    }

    /// `g<shard>` slots endorsing every shard's history as this replica has it, plus what was
    /// endorsed before and this replica lacks (a slot can be rewritten by a manager that has
    /// not seen everything the last one endorsed).
    fn endorsement(&mut self, now: Timestamp) -> Result<Vec<(String, Vec<u8>)>> {
        self.flush(now)?;
        let mut out = Vec::new();
        let before = self.state.endorsed_by_shard.clone();
        let mut room = MAX_ENDORSED_TOTAL;
        for (index, sh) in self.shards.iter_mut() {
            // This replica's heads first: they endorse all it holds.
            let mut heads = sh.heads()?;
            if let Some(old) = before.get(index) {
                let d = sh.doc()?;
                for h in old {
                    if d.get_change_by_hash(h).is_none() && !heads.contains(h) {
                        heads.push(*h);
                    }
                }
            }
            let cap = MAX_ENDORSED_HEADS.min(room);
            if heads.len() > cap {
                tracing::warn!(
                    map = %self.sid,
                    shard = index,
                    "{} heads to endorse, more than the {cap} that fit: the history of the rest reaches later members only from writers that signed it",
                    heads.len()
                );
                heads.truncate(cap);
            }
            room -= heads.len();
            if !heads.is_empty() {
                let bytes: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
                out.push((format!("g{index}"), bytes));
            }
        }
        Ok(out)
    }

    // ----- items -----

    /// Reads one item.
    pub fn get(&self, key: &str, now: Timestamp) -> Result<Item> {
        self.check_live(now)?;
        match self.view.get(key) {
            Some(st) if !st.expired(now) => Ok(st.to_item(key, &self.nodes)),
            _ => Err(Error::ItemNotFound(key.to_string())),
        }
    }

    /// Number of live items (without a scan: only items already due to expire are looked at).
    pub fn len(&self, now: Timestamp) -> usize {
        let expired: std::collections::BTreeSet<&str> = self
            .expiry
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter(|(_, k)| self.view.get(k).is_some_and(|s| s.expired(now)))
            .map(|(_, k)| k.as_str())
            .collect();
        self.view.len().saturating_sub(expired.len())
    }

    /// Every live item in key order, and the id of the newest event they reflect: the map's
    /// events after that id are exactly the changes not in the list.
    pub fn listing(&self, now: Timestamp) -> Result<(Vec<Item>, u64)> {
        self.check_live(now)?;
        Ok((self.all_items(now), self.last_event_id()))
    }

    /// The id of the newest event this replica made for the map (0: none yet).
    pub fn last_event_id(&self) -> u64 {
        self.next_event_id.saturating_sub(1)
    }

    /// Whether the map has no live items.
    pub fn is_empty(&self, now: Timestamp) -> bool {
        self.len(now) == 0
    }

    /// Replaces an item's data (creating it if absent).
    pub fn set(
        &mut self,
        key: &str,
        data: JsonObject,
        opts: &WriteOptions,
        now: Timestamp,
    ) -> Result<Item> {
        self.write(key, opts, now, Require::Any, Explicit::All, |_| Some(data))
            .and_then(|i| i.ok_or_else(|| Error::ItemNotFound(key.to_string())))
    }

    /// Creates an item; fails with [`Error::ItemExists`] if the key is present.
    pub fn create_item(
        &mut self,
        key: &str,
        data: JsonObject,
        ttl: Option<Ttl>,
        now: Timestamp,
    ) -> Result<Item> {
        let opts = WriteOptions {
            ttl,
            if_match: None,
        };
        self.write(key, &opts, now, Require::Absent, Explicit::All, |_| {
            Some(data)
        })
        .and_then(|i| i.ok_or_else(|| Error::ItemNotFound(key.to_string())))
    }

    /// Shallow-merges `patch` into the item's top level (creating it if absent).
    pub fn update(
        &mut self,
        key: &str,
        patch: JsonObject,
        opts: &WriteOptions,
        now: Timestamp,
    ) -> Result<Item> {
        let fields = Explicit::Fields(patch.keys().cloned().collect());
        self.write(key, opts, now, Require::Any, fields, |cur| {
            let mut d = cur.cloned().unwrap_or_default();
            for (k, v) in patch {
                d.insert(k, v);
            }
            Some(d)
        })
        .and_then(|i| i.ok_or_else(|| Error::ItemNotFound(key.to_string())))
    }

    /// Runs `f` on the current data (or `None`) and writes what it returns; `None` cancels and
    /// returns `Ok(None)`. Like [`Self::set`], the result is written whole.
    pub fn mutate<F>(
        &mut self,
        key: &str,
        opts: &WriteOptions,
        now: Timestamp,
        f: F,
    ) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject>,
    {
        self.write(key, opts, now, Require::Any, Explicit::All, f)
    }

    /// Changes only the item's TTL (counted from now; 0 clears it).
    pub fn set_item_ttl(&mut self, key: &str, ttl: Ttl, now: Timestamp) -> Result<Item> {
        let opts = WriteOptions::ttl(ttl);
        let none = Explicit::Fields(Vec::new());
        self.write(key, &opts, now, Require::Present, none, |cur| cur.cloned())
            .and_then(|i| i.ok_or_else(|| Error::ItemNotFound(key.to_string())))
    }

    /// Removes an item, optionally only if its revision matches.
    pub fn remove(&mut self, key: &str, if_match: Option<&Revision>, now: Timestamp) -> Result<()> {
        self.expire(now);
        self.check_live(now)?;
        limits::validate_key(key)?;
        let Some(cur) = self.view.get(key) else {
            return Err(Error::ItemNotFound(key.to_string()));
        };
        if let Some(rev) = if_match {
            if rev != &cur.revision() {
                return Err(Error::RevisionMismatch {
                    key: key.to_string(),
                    expected: rev.to_string(),
                    current: cur.revision().to_string(),
                });
            }
        }
        self.delete_item(key, true, now);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write<F>(
        &mut self,
        key: &str,
        opts: &WriteOptions,
        now: Timestamp,
        require: Require,
        explicit: Explicit,
        f: F,
    ) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject>,
    {
        self.expire(now);
        self.check_live(now)?;
        limits::validate_key(key)?;
        let cur = self.view.get(key);
        match (require, cur) {
            (Require::Absent, Some(_)) => return Err(Error::ItemExists(key.to_string())),
            (Require::Present, None) => return Err(Error::ItemNotFound(key.to_string())),
            _ => {}
        }
        if let Some(rev) = &opts.if_match {
            // A missing item never matches, whatever revision was given.
            let current = cur.map(ItemState::revision);
            if current.as_ref() != Some(rev) {
                return Err(Error::RevisionMismatch {
                    key: key.to_string(),
                    expected: rev.to_string(),
                    current: current.map(|r| r.to_string()).unwrap_or_default(),
                });
            }
        }
        let cur_data = cur.map(ItemState::data);
        let Some(new_data) = f(cur_data.as_ref()) else {
            return Ok(None);
        };
        limits::validate_data(&new_data)?;
        // `set`, `mutate` and `create_item` write the item whole, so that concurrent ones
        // resolve to one of the values written; `update` (and an update that creates the
        // item) writes only its fields, which merge per field.
        let whole = matches!(explicit, Explicit::All);

        let stamp_floor = cur.map_or(0, |c| c.max_stamp);
        let created = cur.map_or(now, |c| c.meta.created());
        let created_by = cur.map_or(self.id.node, |c| self.nodes.get(c.meta.created_by));
        let old_expires = cur.and_then(|c| c.meta.expires());
        // Fields the caller wrote explicitly are written even if equal to the visible value
        // when the item has concurrent values, so that the write resolves those conflicts.
        let conflicted = cur.is_some_and(|c| c.meta.conflicted);
        let forced: Vec<&String> = if conflicted {
            match &explicit {
                Explicit::All => new_data.keys().collect(),
                Explicit::Fields(f) => f.iter().collect(),
            }
        } else {
            Vec::new()
        };
        let mut slot_ops = if whole {
            Vec::new()
        } else {
            diff_slots(key, cur_data.as_ref(), &new_data)
        };
        if !whole {
            for f in forced {
                if let Some(v) = new_data.get(f) {
                    slot_ops.push((layout::field_key(key, f), Pending::Field(v.clone())));
                }
            }
        }
        let still_conflicted = conflicted && !whole;
        let creates = cur.is_none();

        let stamp = self.next_stamp(stamp_floor, now);
        let meta = ItemMeta {
            stamp,
            created,
            updated: now,
            expires: match opts.ttl {
                Some(t) => t.expires_at(now),
                None => old_expires,
            },
            created_by,
            writer: self.id.node,
        };
        let meta_bytes = meta.encode();
        let revision = hash64([meta_bytes.as_slice()]);

        let mut st = ItemState::new(&new_data, &meta, stamp, revision, &mut self.nodes);
        st.meta.conflicted = still_conflicted;

        let shard = layout::shard_of(key);
        let sh = self.shard_mut(shard);
        if whole {
            // Field writes queued before this one were seen by it: it replaces them.
            drop_pending_fields(&mut sh.pending, key);
            sh.pending
                .insert(layout::whole_key(key), Pending::Whole(st.data.clone()));
        }
        sh.pending.extend(slot_ops);
        let mk = layout::meta_key(key);
        // Creation survives coalescing with later writes queued before the same flush.
        let fresh = creates || matches!(sh.pending.get(&mk), Some(Pending::Meta(_, true)));
        sh.pending.insert(mk, Pending::Meta(meta_bytes, fresh));
        self.dirty.insert(shard);
        let item = Item {
            key: key.to_string(),
            data: new_data,
            revision: st.revision(),
            date_created: meta.created,
            date_updated: meta.updated,
            date_expires: meta.expires,
            created_by: meta.created_by,
        };
        self.replace_view_with(key, Some(st), Some(&item), true, now);
        Ok(Some(item))
    }

    fn next_stamp(&mut self, floor: u64, now: Timestamp) -> u64 {
        let wall = u64::try_from(now.millis())
            .unwrap_or(0)
            .saturating_mul(1024);
        let s = floor
            .saturating_add(1)
            .max(self.clock.saturating_add(1))
            .max(wall);
        self.clock = s;
        s
    }

    fn shard_mut(&mut self, index: u16) -> &mut Shard {
        let actor = &self.actor;
        self.use_counter += 1;
        let sh = self
            .shards
            .entry(index)
            .or_insert_with(|| Shard::new(actor));
        sh.last_used = self.use_counter;
        sh
    }

    /// Parks every idle shard document except the `keep` most recently used ones, as saved
    /// bytes (see [`Body`]). Returns how many were parked. Queued writes are flushed first.
    pub fn unload_idle(&mut self, keep: usize, now: Timestamp) -> Result<usize> {
        self.flush(now)?;
        let mut live: Vec<(u64, u16)> = self
            .shards
            .iter()
            .filter_map(|(i, s)| match s {
                Shard {
                    body: Body::Live(_),
                    last_used,
                    ..
                } => Some((*last_used, *i)),
                _ => None,
            })
            .collect();
        live.sort_unstable_by(|a, b| b.cmp(a));
        let mut parked = 0;
        for (_, i) in live.into_iter().skip(keep) {
            if self.shards.get_mut(&i).is_some_and(Shard::park) {
                parked += 1;
            }
        }
        Ok(parked)
    }

    /// A mark of how far use has gone: shards not used after a mark is taken can later be
    /// parked with [`Self::park_unused_since`].
    pub fn use_mark(&self) -> u64 {
        self.use_counter
    }

    /// Parks every shard document not used since `mark` (from [`Self::use_mark`]). A shell calls
    /// this periodically so that idle shards leave memory while busy ones stay loaded.
    pub fn park_unused_since(&mut self, mark: u64, now: Timestamp) -> Result<usize> {
        self.flush(now)?;
        let mut parked = 0;
        for sh in self.shards.values_mut() {
            if sh.last_used <= mark && sh.park() {
                parked += 1;
            }
        }
        Ok(parked)
    }

    /// Estimated heap of the shard documents held in memory ([`LIVE_OP_BYTES`]).
    pub fn live_bytes(&self) -> u64 {
        self.shards.values().map(Shard::live_bytes).sum()
    }

    /// Parks the least recently used shard documents not used since `mark` (a
    /// [`Self::use_mark`]) until about `bytes` of estimated heap is freed (or none is left);
    /// returns the estimate freed. Shards in use are never parked, so a working set larger
    /// than the budget is not reloaded on every use. Queued writes are flushed first.
    pub fn park_lru(&mut self, bytes: u64, mark: u64, now: Timestamp) -> Result<u64> {
        self.flush(now)?;
        let mut live: Vec<(u64, u16, u64)> = self
            .shards
            .iter()
            .filter(|(_, s)| s.last_used <= mark)
            .map(|(i, s)| (s.last_used, *i, s.live_bytes()))
            .filter(|(_, _, b)| *b > 0)
            .collect();
        live.sort_unstable();
        let mut freed = 0;
        for (_, i, b) in live {
            if freed >= bytes {
                break;
            }
            if self.shards.get_mut(&i).is_some_and(Shard::park) {
                freed += b;
            }
        }
        Ok(freed)
    }

    /// Number of shard documents held in memory (not parked).
    pub fn live_shards(&self) -> usize {
        self.shards
            .values()
            .filter(|s| matches!(s.body, Body::Live(_)))
            .count()
    }

    /// Deletes an item's slots (queued) and drops it from the view with an event.
    fn delete_item(&mut self, key: &str, is_local: bool, now: Timestamp) {
        self.queue_item_delete(key);
        self.replace_view(key, None, is_local, now);
    }

    /// Queues the deletion of every slot of `key` (the flush deletes the whole and field
    /// slots the document holds then, which is what this replica saw).
    fn queue_item_delete(&mut self, key: &str) {
        let shard = layout::shard_of(key);
        let sh = self.shard_mut(shard);
        drop_pending_fields(&mut sh.pending, key);
        sh.pending.remove(&layout::whole_key(key));
        sh.pending.insert(layout::meta_key(key), Pending::Delete);
        self.dirty.insert(shard);
    }

    /// Puts `new` in the view for `key` and emits the event the difference implies.
    fn replace_view(&mut self, key: &str, new: Option<ItemState>, is_local: bool, now: Timestamp) {
        self.replace_view_with(key, new, None, is_local, now);
    }

    /// [`Self::replace_view`] with the new item already built (saves parsing it again).
    fn replace_view_with(
        &mut self,
        key: &str,
        new: Option<ItemState>,
        built: Option<&Item>,
        is_local: bool,
        now: Timestamp,
    ) {
        let old = match &new {
            Some(st) => self.view.insert(key.to_string(), st.clone()),
            None => self.view.remove(key),
        };
        if let Some(o) = &old {
            if let Some(e) = o.meta.expires() {
                self.expiry.remove(&(e, key.to_string()));
            }
        }
        if let Some(n) = &new {
            if let Some(e) = n.meta.expires() {
                self.expiry.insert((e, key.to_string()));
            }
            self.last_change = self.last_change.max(n.meta.updated());
        }
        self.dirty_keys.insert(key.to_string());
        let kind = match (old, new) {
            (None, Some(n)) => EventKind::ItemAdded {
                item: built
                    .cloned()
                    .unwrap_or_else(|| n.to_item(key, &self.nodes)),
            },
            (Some(o), Some(n)) => {
                if o.revision == n.revision && o.data == n.data && o.meta == n.meta {
                    return;
                }
                EventKind::ItemUpdated {
                    item: built
                        .cloned()
                        .unwrap_or_else(|| n.to_item(key, &self.nodes)),
                    previous_data: o.data(),
                }
            }
            (Some(o), None) => EventKind::ItemRemoved {
                key: key.to_string(),
                previous_data: o.data(),
            },
            (None, None) => return,
        };
        self.emit(kind, is_local, now);
    }

    fn emit(&mut self, kind: EventKind, is_local: bool, now: Timestamp) {
        let id = self.next_event_id;
        self.next_event_id += 1;
        self.events.push(Event {
            id,
            map: self.sid.clone(),
            kind,
            is_local,
            date: now,
        });
    }

    /// Removes every item (and the map itself) whose TTL has passed, with replicated deletes.
    /// Returns how many items expired. Reads already hide expired items before this runs.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        if self.state.exists() && self.state.removed.is_none() {
            if let Some(e) = self.state.expires.filter(|e| *e <= now) {
                // Every replica writes the same value, so concurrent expiries cannot diverge.
                let inc = self.state.inc;
                let _ = self.commit_meta(now, |tx| {
                    tx.put(ROOT, format!("r{inc}"), e.millis()).map_err(tx_err)
                });
                return 0;
            }
        }
        let mut n = 0;
        while self.expiry.first().is_some_and(|(t, _)| *t <= now) {
            // pop first so the loop always progresses, whatever delete_item finds
            let Some((_, key)) = self.expiry.pop_first() else {
                break;
            };
            if self.view.contains_key(&key) {
                self.delete_item(&key, true, now);
                n += 1;
            }
        }
        n
    }

    /// The next instant at which [`Self::expire`] has work, so a shell can schedule it.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        let item = self.expiry.first().map(|(t, _)| *t);
        let map = self
            .state
            .expires
            .filter(|_| self.state.removed.is_none() && self.state.exists());
        match (item, map) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A page of items in key order.
    pub fn items(&self, req: &PageRequest, now: Timestamp) -> Result<Page> {
        self.check_live(now)?;
        let mut page = paging::page(
            self.sid.as_str(),
            &self.view,
            req,
            |st| !st.expired(now),
            |k, st| st.to_item(k, &self.nodes),
        )?;
        page.last_event_id = self.last_event_id();
        Ok(page)
    }

    /// Every concurrent value of an item's fields and the writers of its concurrent writes.
    pub fn conflicts(&mut self, key: &str, now: Timestamp) -> Result<ItemConflicts> {
        self.get(key, now)?;
        let shard = layout::shard_of(key);
        self.flush_shard(shard, now)?;
        let Some(sh) = self.shards.get_mut(&shard) else {
            return Err(Error::ItemNotFound(key.to_string()));
        };
        let doc: &Automerge = sh.doc()?;
        let mut values: Vec<JsonObject> = doc
            .get_all(ROOT, layout::whole_key(key).as_str())
            .map_err(tx_err)?
            .iter()
            .rev()
            .filter_map(|(v, _)| decode_whole(v))
            .collect();
        if values.len() < 2 {
            values.clear();
        }
        let mut fields = BTreeMap::new();
        for root_key in field_slots(doc, key) {
            let mut vals: Vec<Json> = doc
                .get_all(ROOT, root_key.as_str())
                .map_err(tx_err)?
                .iter()
                .map(|(v, id)| json::read(doc, v, id))
                .collect();
            if vals.len() > 1 {
                vals.reverse();
                let field = root_key[layout::field_prefix(key).len()..].to_string();
                fields.insert(field, vals);
            }
        }
        let mut writers: Vec<NodeId> = doc
            .get_all(ROOT, layout::meta_key(key))
            .map_err(tx_err)?
            .iter()
            .filter_map(|(v, _)| decode_meta_value(v))
            .map(|m| m.writer)
            .collect();
        writers.reverse();
        Ok(ItemConflicts {
            key: key.to_string(),
            values,
            fields,
            writers,
        })
    }

    // ----- changes in and out -----

    /// Commits every queued write as one Automerge change per touched shard. Returns how many
    /// changes were made; they wait in [`Self::take_outgoing`].
    pub fn flush(&mut self, now: Timestamp) -> Result<usize> {
        let dirty: Vec<u16> = std::mem::take(&mut self.dirty).into_iter().collect();
        let before = self.outbox.len();
        for s in dirty {
            self.flush_shard(s, now)?;
        }
        Ok(self.outbox.len() - before)
    }

    /// Whether writes are queued that [`Self::flush`] would commit.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn flush_shard(&mut self, index: u16, now: Timestamp) -> Result<()> {
        let Some(sh) = self.shards.get_mut(&index) else {
            return Ok(());
        };
        self.dirty.remove(&index);
        if sh.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut sh.pending);
        let doc = match sh.doc() {
            Ok(d) => d,
            Err(e) => {
                // the queued writes stay queued
                sh.pending = pending;
                self.dirty.insert(index);
                return Err(e);
            }
        };
        // One change per group of items keeps every change small enough to gossip whole and
        // cheap to apply, however many writes one shard got in a batch.
        let groups = item_groups(&pending);
        let mut done = 0;
        let mut failed = None;
        let mut added = 0;
        for group in &groups {
            let mut tx = doc.transaction();
            if let Err(e) = write_pending(&mut tx, group, &pending) {
                // Dropping the transaction rolls it back; this group and later ones stay queued.
                drop(tx);
                failed = Some(e);
                break;
            }
            let (hash, _) = tx.commit_with(commit_opts(now));
            if let Some(hash) = hash {
                // Item changes are signed only where authors matter: maps with entries.
                if !self.state.policy.is_open() {
                    if let Some(sig) = self.id.signer.as_ref().and_then(|k| k.sign(&hash)) {
                        self.sigs.insert(hash, sig.clone());
                        self.new_sigs.push((hash, sig));
                    }
                }
                if let Some(ch) = doc.get_last_local_change() {
                    added += ch.len() as u64;
                    self.outbox.push(OutgoingChange {
                        map: self.sid.clone(),
                        doc: DocAddr::Shard {
                            inc: self.state.inc,
                            index,
                        },
                        bytes: ch.raw_bytes().to_vec(),
                    });
                }
            }
            done += 1;
        }
        sh.ops += added;
        if let Some(e) = failed {
            let left: BTreeMap<String, Pending> = groups[done..]
                .iter()
                .flatten()
                .map(|(slot, _)| (slot.to_string(), pending[*slot].clone()))
                .collect();
            sh.pending = left;
            self.dirty.insert(index);
            return Err(e);
        }
        Ok(())
    }

    /// Takes the changes made on this replica since the last call, oldest first.
    pub fn take_outgoing(&mut self) -> Vec<OutgoingChange> {
        std::mem::take(&mut self.outbox)
    }

    /// Takes the events emitted since the last call, in id order.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Id the next event will get (so a shell can resume numbering after a restart).
    pub fn next_event_id(&self) -> u64 {
        self.next_event_id
    }

    /// Continues event numbering after `last` (restored from storage).
    pub fn set_last_event_id(&mut self, last: u64) {
        self.next_event_id = self.next_event_id.max(last.saturating_add(1));
    }

    /// Merges encoded changes from a peer into one document of the map. Duplicates are ignored,
    /// changes whose dependencies are missing wait inside Automerge until those arrive.
    /// Undecodable input is refused as a whole and changes nothing.
    pub fn apply_changes(
        &mut self,
        doc: DocAddr,
        changes: &[Vec<u8>],
        now: Timestamp,
    ) -> Result<()> {
        let mut decoded = Vec::with_capacity(changes.len());
        let mut slots = BTreeSet::new();
        for (i, bytes) in changes.iter().enumerate() {
            let c = Change::from_bytes(bytes.clone())
                .map_err(|e| Error::InvalidChange(format!("change {i}: {e}")))?;
            // Scanned before anything is applied: a malformed change is refused here, and the
            // scan is what applying needs anyway.
            let keys = crate::am::root_map_keys(&c).ok_or_else(|| {
                Error::InvalidChange(format!("change {i}: operations name unlisted actors"))
            })?;
            slots.extend(keys);
            decoded.push(c);
        }
        self.apply_checked(doc, decoded, Checked(slots), now)
    }

    /// Merges decoded changes from a peer that the caller already checked, like
    /// [`Self::apply_changes`]; `checked` comes from [`check_changes`] on the same changes
    /// (it saves decoding them again).
    pub fn apply_checked(
        &mut self,
        doc: DocAddr,
        changes: Vec<Change>,
        checked: Checked,
        now: Timestamp,
    ) -> Result<()> {
        self.prescanned = Some(checked.0);
        let r = self.apply_remote(doc, changes, now);
        self.prescanned = None;
        r
    }

    /// Applies changes from a peer and keeps the new ones for [`Self::take_received`].
    fn apply_remote(&mut self, doc: DocAddr, changes: Vec<Change>, now: Timestamp) -> Result<()> {
        if let DocAddr::Shard { index, .. } = doc {
            if index >= SHARDS {
                return Err(Error::InvalidChange(format!(
                    "shard {index} out of range (0..{SHARDS})"
                )));
            }
        }
        let fate = self.fate(doc);
        if fate == Fate::Dead {
            return Ok(()); // its items are gone for good: nothing to apply or store
        }
        let mut fresh = Vec::with_capacity(changes.len());
        let mut seen = HashSet::with_capacity(changes.len());
        for c in changes {
            let h = c.hash();
            let known = match fate {
                Fate::Waiting => self.future_hashes.contains(&(doc, h)),
                _ => self.knows(doc, &h)?,
            };
            if !known && seen.insert(h) {
                fresh.push(c);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let bytes: Vec<Vec<u8>> = fresh.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let hashes: Vec<ChangeHash> = fresh.iter().map(Change::hash).collect();
        self.apply_decoded(doc, fresh, now)?;
        self.received.extend(bytes.into_iter().map(|b| (doc, b)));
        // Only a document with changes waiting for dependencies can have queued some of these.
        if fate != Fate::Waiting && self.missing_deps(doc)? {
            if self.queued_hashes.len() > 100_000 {
                // Bounded: at worst a queued change sent again is stored once more.
                self.queued_hashes.clear();
            }
            for h in hashes {
                if !self.knows(doc, &h)? {
                    self.queued_hashes.insert((doc, h));
                }
            }
        }
        Ok(())
    }

    /// Whether a document holds a change (a document this replica does not hold has none).
    pub fn has_change(&mut self, doc: DocAddr, hash: &ChangeHash) -> bool {
        self.knows(doc, hash).unwrap_or(false)
    }

    /// Whether a document already holds a change (changes for documents this replica does
    /// not hold yet count as unknown).
    fn knows(&mut self, doc: DocAddr, hash: &ChangeHash) -> Result<bool> {
        if self.queued_hashes.contains(&(doc, *hash)) {
            return Ok(true);
        }
        match doc {
            DocAddr::Meta => Ok(self.meta_doc.get_change_by_hash(hash).is_some()),
            DocAddr::Shard { inc, index } => {
                if inc != self.state.inc || !self.state.exists() {
                    return Ok(false);
                }
                match self.shards.get_mut(&index) {
                    Some(sh) => Ok(sh.doc()?.get_change_by_hash(hash).is_some()),
                    None => Ok(false),
                }
            }
        }
    }

    /// How many merged changes wait for [`Self::take_received`] (a call that raised it merged
    /// something new).
    pub fn received_len(&self) -> usize {
        self.received.len()
    }

    /// Takes the changes merged from peers since the last call, for storage (they are not to
    /// be sent on: the network relays them itself).
    pub fn take_received(&mut self) -> Vec<(DocAddr, Vec<u8>)> {
        std::mem::take(&mut self.received)
    }

    // ----- replication -----

    /// Digests of every document a peer should compare: the map document and the current
    /// incarnation's non-empty shards. Equal digests mean equal documents (same heads).
    /// Queued writes are not included until flushed.
    pub fn doc_digests(&mut self) -> Result<Vec<(DocAddr, u64)>> {
        let mut out = Vec::new();
        let meta = self.meta_doc.get_heads();
        if !meta.is_empty() {
            out.push((DocAddr::Meta, heads_digest(meta)));
        }
        if self.state.live_or_expired() {
            let inc = self.state.inc;
            for (i, sh) in self.shards.iter_mut() {
                let h = sh.heads()?;
                if !h.is_empty() {
                    out.push((DocAddr::Shard { inc, index: *i }, heads_digest(h)));
                }
            }
        }
        Ok(out)
    }

    /// One digest of the whole map ([`Self::doc_digests`]); 0 for a replica holding nothing.
    pub fn digest(&mut self) -> Result<u64> {
        let docs = self.doc_digests()?;
        if docs.is_empty() {
            return Ok(0);
        }
        let parts: Vec<[u8; 12]> = docs
            .iter()
            .map(|(a, d)| {
                let mut b = [0u8; 12];
                let tag = match a {
                    DocAddr::Meta => u32::MAX,
                    DocAddr::Shard { index, .. } => u32::from(*index),
                };
                b[..4].copy_from_slice(&tag.to_le_bytes());
                b[4..].copy_from_slice(&d.to_le_bytes());
                b
            })
            .collect();
        Ok(hash64(parts.iter().map(|p| p.as_slice())).max(1))
    }

    /// Whether a document is one this replica syncs now (the map document, or a shard of the
    /// current incarnation of a map not removed).
    pub fn syncs(&self, doc: DocAddr) -> bool {
        match doc {
            DocAddr::Meta => true,
            DocAddr::Shard { inc, index } => {
                index < SHARDS && inc == self.state.inc && self.state.live_or_expired()
            }
        }
    }

    /// The next Automerge sync message for one document and one peer, encoded; `None` when
    /// there is nothing to say. Messages are version 1 (one change per chunk) so that every
    /// change a peer sends can be checked before it is applied.
    pub fn sync_generate(
        &mut self,
        doc: DocAddr,
        state: &mut sync::State,
        now: Timestamp,
    ) -> Result<Option<Vec<u8>>> {
        if !self.syncs(doc) {
            return Ok(None);
        }
        let d = match doc {
            DocAddr::Meta => &mut self.meta_doc,
            DocAddr::Shard { index, .. } => {
                self.flush_shard(index, now)?;
                self.shard_mut(index).doc()?
            }
        };
        Ok(d.generate_sync_message(state).map(|mut m| {
            // Without flags the peer never learns we could take version 2 messages, whose
            // single chunk (possibly a whole saved document) could not be checked change by
            // change before applying.
            m.supported_capabilities = None;
            m.version = sync::MessageVersion::V1;
            m.encode()
        }))
    }

    /// Merges a decoded and checked sync message ([`decode_sync`]) with events, then updates
    /// the sync state. An error here is about this replica's state (a change Automerge refuses
    /// against it), not proof that the sender misbehaves.
    pub fn sync_apply(
        &mut self,
        doc: DocAddr,
        state: &mut sync::State,
        msg: DecodedSync,
        now: Timestamp,
    ) -> Result<()> {
        let DecodedSync {
            msg,
            changes,
            checked,
        } = msg;
        if !self.syncs(doc) {
            // Another incarnation: nothing of it is kept.
            return Ok(());
        }
        self.apply_checked(doc, changes, checked, now)?;
        if !self.syncs(doc) {
            return Ok(()); // the changes moved the map on (removed or re-created)
        }
        let d = match doc {
            DocAddr::Meta => &mut self.meta_doc,
            DocAddr::Shard { index, .. } => self.shard_mut(index).doc()?,
        };
        d.receive_sync_message(state, msg)
            .map_err(|e| Error::InvalidChange(format!("sync message: {e}")))
    }

    /// Whether a document holds changes whose dependencies have not arrived (a change was
    /// missed: a sync with a peer fetches it).
    pub fn missing_deps(&mut self, doc: DocAddr) -> Result<bool> {
        if !self.syncs(doc) {
            return Ok(false);
        }
        Ok(match doc {
            DocAddr::Meta => !self.meta_doc.get_missing_deps(&[]).is_empty(),
            DocAddr::Shard { index, .. } => match self.shards.get_mut(&index) {
                Some(sh) => !sh.doc()?.get_missing_deps(&[]).is_empty(),
                None => false,
            },
        })
    }

    /// What becomes of changes to `doc`: shards of a removed incarnation are dead, shards of
    /// an incarnation this replica has not seen created yet wait for the map document.
    fn fate(&self, doc: DocAddr) -> Fate {
        match doc {
            DocAddr::Meta => Fate::Current,
            DocAddr::Shard { inc, .. } => {
                if inc < self.state.inc || (inc == self.state.inc && self.state.removed.is_some()) {
                    Fate::Dead
                } else if inc > self.state.inc || !self.state.exists() {
                    Fate::Waiting
                } else {
                    Fate::Current
                }
            }
        }
    }

    fn apply_decoded(&mut self, doc: DocAddr, changes: Vec<Change>, now: Timestamp) -> Result<()> {
        match doc {
            DocAddr::Meta => {
                self.meta_doc
                    .apply_changes(changes)
                    .map_err(|e| Error::InvalidChange(e.to_string()))?;
                self.refresh_map_state(false, now);
                Ok(())
            }
            DocAddr::Shard { index, .. } => {
                if index >= SHARDS {
                    return Err(Error::InvalidChange(format!(
                        "shard {index} out of range (0..{SHARDS})"
                    )));
                }
                match self.fate(doc) {
                    Fate::Dead => return Ok(()), // an old incarnation: its items are gone for good
                    Fate::Current => {}
                    Fate::Waiting => {
                        let bytes: usize = self
                            .future
                            .iter()
                            .map(|(_, c)| c.raw_bytes().len())
                            .chain(changes.iter().map(|c| c.raw_bytes().len()))
                            .sum();
                        if self.future.len() + changes.len() > MAX_FUTURE_CHANGES
                            || bytes > MAX_FUTURE_BYTES
                        {
                            return Err(Error::InvalidChange(format!(
                            "more than {MAX_FUTURE_CHANGES} changes wait for map {}'s document; send it first",
                            self.sid
                        )));
                        }
                        for c in changes {
                            if self.future_hashes.insert((doc, c.hash())) {
                                self.future.push((doc, c));
                            }
                        }
                        return Ok(());
                    }
                }
                self.apply_to_shard(index, changes, now)
            }
        }
    }

    fn apply_to_shard(&mut self, index: u16, changes: Vec<Change>, now: Timestamp) -> Result<()> {
        self.flush_shard(index, now)?;
        // Slots the changes write at the root. Patches alone miss a concurrent value that loses
        // to the current winner (nothing visible changes), yet it changes the revision.
        // Read them from what was applied, not from what was given: a change that waited for
        // a missing dependency is applied together with it.
        let prescanned = self.prescanned.take();
        let added: u64 = changes.iter().map(|c| c.len() as u64).sum();
        let doc = self.shard_mut(index).doc()?;
        // Only a document holding such waiting changes needs the (costlier) exact answer.
        let waiting = !doc.get_missing_deps(&[]).is_empty();
        let before = waiting.then(|| doc.get_heads());
        let mut slots: BTreeSet<String> = match (&before, prescanned) {
            (None, Some(pre)) => pre,
            _ => BTreeSet::new(),
        };
        // A change with no root operation scans to nothing: scanning twice is harmless.
        let scan_now = before.is_none() && slots.is_empty();
        let mut scan = |c: &Change| {
            for k in crate::am::root_map_keys(c).unwrap_or_default() {
                slots.insert(k);
            }
        };
        if scan_now {
            changes.iter().for_each(&mut scan);
        }
        let mut log = PatchLog::active(automerge::patches::TextRepresentation::String(
            automerge::TextEncoding::UnicodeCodePoint,
        ));
        doc.apply_changes_log_patches(changes, &mut log)
            .map_err(|e| Error::InvalidChange(e.to_string()))?;
        let patches = doc.make_patches(&mut log);
        // Counted once applied (a parked shard was loaded above with its own count).
        if let Some(sh) = self.shards.get_mut(&index) {
            sh.ops += added;
        }
        let doc = self.shard_mut(index).doc()?;
        if let Some(before) = before {
            doc.get_changes(&before).into_iter().for_each(&mut scan);
        }
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let nested = patches.iter().map(|p| match p.path.first() {
            Some((_, Prop::Map(k))) => Some(k.as_str()),
            Some(_) => None,
            None => match &p.action {
                PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                    Some(key.as_str())
                }
                PatchAction::Conflict { prop: Prop::Map(k) }
                | PatchAction::Increment {
                    prop: Prop::Map(k), ..
                } => Some(k.as_str()),
                _ => None,
            },
        });
        for root_key in nested.chain(slots.iter().map(|s| Some(s.as_str()))) {
            if let Some(slot) = root_key.and_then(layout::parse_slot) {
                let key = slot.key();
                if layout::belongs(key, index) {
                    touched.insert(key.to_string());
                }
            }
        }
        for key in touched {
            let (fresh, seen_stamp) = {
                let doc = self.shard_mut(index).doc()?;
                let st = read_item(doc, &key);
                let s = st.as_ref().map_or(0, |s| s.max_stamp);
                (st, s)
            };
            self.clock = self.clock.max(seen_stamp);
            let fresh = fresh.map(|raw| ItemState::from_raw(raw, &mut self.nodes));
            match fresh {
                Some(st) if st.expired(now) => {
                    // Already dead here: remove it for everyone rather than show it.
                    self.view_set_for_expired(&key, now);
                }
                other => self.replace_view(&key, other, false, now),
            }
        }
        Ok(())
    }

    /// An item merged in already expired: drop it from the view and delete every slot it has.
    fn view_set_for_expired(&mut self, key: &str, now: Timestamp) {
        let old = self.view.get(key).cloned();
        if let Some(o) = &old {
            if let Some(e) = o.meta.expires() {
                self.expiry.remove(&(e, key.to_string()));
            }
        }
        // The flush deletes every slot the merged document holds for the item.
        self.queue_item_delete(key);
        if old.is_some() {
            self.replace_view(key, None, false, now);
        }
    }

    fn refresh_map_state(&mut self, is_local: bool, now: Timestamp) {
        let new = read_map_state(&self.meta_doc);
        let old = std::mem::replace(&mut self.state, new);
        if !is_local && old.policy.is_open() && !self.state.policy.is_open() {
            self.sign_own_history();
        }
        if self.state.inc != old.inc {
            // A new incarnation: the previous one's items are gone.
            self.reset_items(is_local, now, !self.removal_announced && old.exists());
            self.removal_announced = false;
            self.replay_future(now);
        } else if !old.exists() && self.state.exists() {
            self.replay_future(now);
        }
        if self.state.exists() && self.state.removed.is_some() && !self.removal_announced {
            self.reset_items(is_local, now, true);
            self.removal_announced = true;
        }
    }

    /// A peer gave the map permission entries: this node signs the changes it made while it
    /// held the map open and that the entries do not endorse (made before it learnt of them,
    /// they went out unsigned, and peers holding the entries take them only from a writer that
    /// signed them). A signature over a change hash is as good made later as at commit time.
    /// Others' such changes are noted in [`Self::unsigned`], to get their signatures.
    fn sign_own_history(&mut self) {
        let Some(signer) = self.id.signer.clone() else {
            return;
        };
        let Some(prefix) = crate::authorship::actor_prefix(signer.peer_id()) else {
            return;
        };
        let inc = self.state.inc;
        let writers = self.writer_prefixes();
        let mut docs: Vec<(DocAddr, &mut Automerge)> = vec![(DocAddr::Meta, &mut self.meta_doc)];
        let mut failed = false;
        for (index, sh) in self.shards.iter_mut() {
            match sh.doc() {
                Ok(d) => docs.push((DocAddr::Shard { inc, index: *index }, d)),
                Err(_) => failed = true,
            }
        }
        let mut made = Vec::new();
        let mut resend = Vec::new();
        for (addr, d) in docs {
            // Only what came after the endorsed heads this document has.
            let since: Vec<ChangeHash> = self
                .state
                .endorsed
                .iter()
                .filter(|h| d.get_change_by_hash(h).is_some())
                .copied()
                .collect();
            for c in d.get_changes(&since) {
                let h = c.hash();
                if self.sigs.contains_key(&h) {
                    continue;
                }
                if c.actor_id().to_bytes().starts_with(&prefix) {
                    if let Some(sig) = signer.sign(&h) {
                        made.push((h, sig));
                        resend.push((addr, c.raw_bytes().to_vec()));
                    }
                } else if let DocAddr::Shard { index, .. } = addr {
                    // A writer's: its author signs it when it learns of the entries, and
                    // peers joining later need that signature from here.
                    let actor = c.actor_id().to_bytes();
                    if writers.iter().any(|p| actor.starts_with(p))
                        && self.unsigned.len() < MAX_UNSIGNED
                        && self.unsigned.insert(h, index).is_none()
                    {
                        self.new_unsigned.push((h, Some(index)));
                    }
                }
            }
        }
        if failed {
            tracing::warn!(map = %self.sid, "a shard could not be loaded to sign this node's earlier changes to it");
        }
        for (h, sig) in made {
            self.sigs.insert(h, sig.clone());
            self.new_sigs.push((h, sig));
        }
        // Peers that took these changes unsigned need the signatures too (to pass them on).
        self.resend.extend(resend);
    }

    /// Changes of this node to send to peers again, now with signatures (not to be stored
    /// again: they are stored already).
    pub fn take_resend(&mut self) -> Vec<(DocAddr, Vec<u8>)> {
        std::mem::take(&mut self.resend)
    }

    /// A copy of the map document, to try peers' changes on before taking them.
    pub(crate) fn meta_fork(&self) -> Automerge {
        self.meta_doc.fork()
    }

    /// Applies the changes that were waiting for the map document (or a newer incarnation).
    fn replay_future(&mut self, now: Timestamp) {
        let future = std::mem::take(&mut self.future);
        self.future_hashes.clear();
        let mut by_doc: BTreeMap<DocAddr, Vec<Change>> = BTreeMap::new();
        for (d, c) in future {
            by_doc.entry(d).or_default().push(c);
        }
        for (d, cs) in by_doc {
            if self.apply_decoded(d, cs.clone(), now).is_err() {
                // One bad change must not take the others with it.
                for c in cs {
                    if self.apply_decoded(d, vec![c], now).is_err() {
                        self.dropped_changes += 1;
                    }
                }
            }
        }
    }

    fn reset_items(&mut self, is_local: bool, now: Timestamp, announce: bool) {
        self.view.clear();
        self.view_reset = true;
        self.dirty_keys.clear();
        self.expiry.clear();
        self.dirty.clear();
        self.shards.clear();
        self.last_change = Timestamp::from_millis(0);
        if announce {
            self.emit(EventKind::MapRemoved, is_local, now);
        }
    }

    // ----- persistence -----

    /// A snapshot (Automerge `save`) of one document, queued writes flushed first, so a store
    /// can replace that document's stored changes with it. `None` if the map holds no such
    /// document (another incarnation, or a shard never written).
    pub fn snapshot(&mut self, doc: DocAddr, now: Timestamp) -> Result<Option<Vec<u8>>> {
        match doc {
            DocAddr::Meta => Ok(Some(self.meta_doc.save())),
            DocAddr::Shard { inc, index } => {
                if inc != self.state.inc || index >= SHARDS {
                    return Ok(None);
                }
                self.flush_shard(index, now)?;
                match self.shards.get_mut(&index) {
                    Some(sh) => sh.saved().map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// How the read view changed since the last call, so a store can keep a copy of it and
    /// reopen a map without replaying its Automerge documents ([`Self::restore`]).
    ///
    /// Queued writes are flushed first, so the entries never run ahead of the changes: store
    /// both (and [`Self::take_outgoing`], taken after this) in one atomic commit.
    pub fn take_view_changes(&mut self, now: Timestamp) -> Result<ViewChanges> {
        self.flush(now)?;
        let reset = std::mem::take(&mut self.view_reset);
        let keys = std::mem::take(&mut self.dirty_keys);
        let entries = keys
            .into_iter()
            .map(|k| {
                let e = self.view.get(&k).map(|st| encode_entry(st, &self.nodes));
                (k, e)
            })
            .collect();
        Ok(ViewChanges { reset, entries })
    }

    /// Reopens a map from stored state: its documents ([`StoredDoc`]) and the view entries kept
    /// from [`Self::take_view_changes`]. Shard documents stay parked until first used, so this
    /// costs one pass over the entries. Emits no events; numbering continues after
    /// `last_event_id`.
    pub fn restore(
        id: Identity,
        sid: MapSid,
        docs: Vec<(DocAddr, StoredDoc)>,
        entries: impl IntoIterator<Item = (String, Vec<u8>)>,
        last_event_id: u64,
    ) -> Result<Self> {
        let mut m = MapReplica::empty(id, sid);
        m.set_last_event_id(last_event_id);
        let mut shard_docs = Vec::new();
        for (addr, bytes) in docs {
            match addr {
                DocAddr::Meta => m.meta_doc = bytes.load(&m.actor, "map document")?,
                DocAddr::Shard { inc, index } => shard_docs.push((inc, index, bytes)),
            }
        }
        m.state = read_map_state(&m.meta_doc);
        m.removal_announced = m.state.removed.is_some();
        for (inc, index, bytes) in shard_docs {
            if index >= SHARDS {
                continue;
            }
            let current = m.state.exists() && m.state.removed.is_none() && inc == m.state.inc;
            let waiting = !m.state.exists() || inc > m.state.inc;
            if waiting {
                // Changes that arrived before their map document: they wait again, as they
                // did before the restart.
                let doc = DocAddr::Shard { inc, index };
                for c in bytes.decode_changes("waiting shard document")? {
                    if m.future_hashes.insert((doc, c.hash())) {
                        m.future.push((doc, c));
                    }
                }
                continue;
            }
            if !current {
                continue;
            }
            m.shards.insert(
                index,
                Shard {
                    body: Body::Cold(bytes),
                    actor: m.actor.clone(),
                    pending: BTreeMap::new(),
                    last_used: 0,
                    ops: 0,
                    cold_heads: None,
                },
            );
        }
        if !m.state.live_or_expired() {
            return Ok(m);
        }
        let entries = entries.into_iter();
        let mut view = Vec::with_capacity(entries.size_hint().0);
        for (key, bytes) in entries {
            let st = decode_entry(&bytes, &mut m.nodes)
                .ok_or_else(|| Error::Corrupt(format!("stored view entry of item {key:?}")))?;
            m.clock = m.clock.max(st.max_stamp);
            m.last_change = m.last_change.max(st.meta.updated());
            if let Some(e) = st.meta.expires() {
                m.expiry.insert((e, key.clone()));
            }
            view.push((key, st));
        }
        // Stores hand entries over in key order: collecting builds the tree in one pass.
        m.view = view.into_iter().collect();
        Ok(m)
    }

    /// Every document of the map, saved (compacted) for storage or a full transfer.
    /// Queued writes are flushed first.
    pub fn save_all(&mut self, now: Timestamp) -> Result<Vec<(DocAddr, Vec<u8>)>> {
        self.flush(now)?;
        let mut out = vec![(DocAddr::Meta, self.meta_doc.save())];
        let inc = self.state.inc;
        for (i, s) in self.shards.iter_mut() {
            out.push((DocAddr::Shard { inc, index: *i }, s.saved()?));
        }
        Ok(out)
    }

    /// Rebuilds a replica from saved documents (as from [`Self::save_all`]). Emits no events.
    pub fn load(
        id: Identity,
        sid: MapSid,
        docs: &[(DocAddr, Vec<u8>)],
        now: Timestamp,
    ) -> Result<Self> {
        let mut m = MapReplica::empty(id, sid);
        for (addr, bytes) in docs {
            if *addr == DocAddr::Meta {
                let mut d = Automerge::load(bytes)
                    .map_err(|e| Error::Corrupt(format!("map document: {e}")))?;
                d.set_actor(m.actor.clone());
                m.meta_doc = d;
            }
        }
        m.state = read_map_state(&m.meta_doc);
        m.removal_announced = m.state.removed.is_some();
        if !m.state.live(now) && m.state.removed.is_some() {
            return Ok(m);
        }
        for (addr, bytes) in docs {
            if let DocAddr::Shard { inc, index } = *addr {
                if inc != m.state.inc || index >= SHARDS {
                    continue;
                }
                let mut d = Automerge::load(bytes)
                    .map_err(|e| Error::Corrupt(format!("shard {index}: {e}")))?;
                d.set_actor(m.actor.clone());
                let keys = item_keys(&d, index);
                for k in keys {
                    if let Some(raw) = read_item(&d, &k) {
                        let st = ItemState::from_raw(raw, &mut m.nodes);
                        m.clock = m.clock.max(st.max_stamp);
                        m.last_change = m.last_change.max(st.meta.updated());
                        if let Some(e) = st.meta.expires() {
                            m.expiry.insert((e, k.clone()));
                        }
                        m.view.insert(k, st);
                    }
                }
                // The view is built; the document waits, compressed, until first used.
                m.shards.insert(
                    index,
                    Shard {
                        body: Body::Cold(StoredDoc {
                            snapshot: Some(bytes.clone()),
                            changes: Vec::new(),
                        }),
                        actor: m.actor.clone(),
                        pending: BTreeMap::new(),
                        last_used: 0,
                        ops: 0,
                        cold_heads: None,
                    },
                );
            }
        }
        Ok(m)
    }

    /// Every live item, in key order (for tests and exports).
    pub fn all_items(&self, now: Timestamp) -> Vec<Item> {
        self.view
            .iter()
            .filter(|(_, s)| !s.expired(now))
            .map(|(k, s)| s.to_item(k, &self.nodes))
            .collect()
    }
}

/// Which fields a write names explicitly (see conflict resolution in `write`).
enum Explicit {
    All,
    Fields(Vec<String>),
}

#[derive(Clone, Copy)]
enum Require {
    Any,
    Absent,
    Present,
}

/// What becomes of a peer's changes to one document ([`MapReplica::fate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Current,
    Waiting,
    Dead,
}

/// Most heads endorsed per shard (32 bytes each in the map document). A shard has as many
/// heads as concurrent branches not merged yet, so this is reached only by hundreds of
/// writers' changes that never saw each other.
const MAX_ENDORSED_HEADS: usize = 1024;
/// Most heads endorsed by one change over all shards (256 KiB), so it stays far below the
/// message limits ([`crate::replication::MAX_GOSSIP_MESSAGE`] is 1 MiB).
const MAX_ENDORSED_TOTAL: usize = 8192;

/// Most entries of [`MapReplica::unsigned`], all asked for in one message (beyond, such
/// changes reach later members only from their authors).
const MAX_UNSIGNED: usize = crate::replication::MAX_SIGS_ASKED;

/// Most items one change of a shard document carries. An item's slots hold at most
/// [`limits::MAX_DATA_BYTES`] of data, so a change stays well under the gossip limit
/// ([`crate::replication::MAX_GOSSIP_MESSAGE`]).
pub const MAX_ITEMS_PER_CHANGE: usize = 32;

/// Queued slot writes grouped into changes of at most [`MAX_ITEMS_PER_CHANGE`] items, every
/// slot of one item in the same group (a peer never sees half of a write).
fn item_groups(pending: &BTreeMap<String, Pending>) -> Vec<Vec<(&str, &Pending)>> {
    let metas = pending.keys().filter(|k| k.starts_with('m')).count();
    if metas <= MAX_ITEMS_PER_CHANGE {
        return vec![pending.iter().map(|(k, v)| (k.as_str(), v)).collect()];
    }
    let mut by_item: BTreeMap<&str, Vec<(&str, &Pending)>> = BTreeMap::new();
    for (slot, op) in pending {
        let key = layout::parse_slot(slot).map_or("", |s| s.key());
        by_item.entry(key).or_default().push((slot.as_str(), op));
    }
    let mut groups = Vec::new();
    let mut cur: Vec<(&str, &Pending)> = Vec::new();
    let mut items = 0;
    for (_, slots) in by_item {
        if items == MAX_ITEMS_PER_CHANGE {
            groups.push(std::mem::take(&mut cur));
            items = 0;
        }
        cur.extend(slots);
        items += 1;
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    groups
}

/// Applies queued slot writes to a transaction; `all` is everything queued for the shard.
fn write_pending(
    tx: &mut automerge::transaction::Transaction<'_>,
    group: &[(&str, &Pending)],
    all: &BTreeMap<String, Pending>,
) -> Result<()> {
    for &(slot, op) in group {
        match op {
            Pending::Whole(text) => {
                if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                    clear_item_slots(tx, key, all, false)?;
                }
                tx.put(ROOT, slot, ScalarValue::Str(text.as_ref().into()))
                    .map_err(tx_err)?
            }
            Pending::Field(v) => match json::encode(v) {
                Encoded::Scalar(s) => tx.put(ROOT, slot, s).map_err(tx_err)?,
                Encoded::Object(v) => json::put_object(tx, &ROOT, slot, v).map_err(tx_err)?,
            },
            Pending::Meta(b, fresh) => {
                if *fresh {
                    // A new item: slots left by a foreign writer without a meta slot would
                    // otherwise join it on every other replica.
                    if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                        clear_item_slots(tx, key, all, true)?;
                    }
                }
                tx.put(ROOT, slot, ScalarValue::Bytes(b.clone()))
                    .map_err(tx_err)?
            }
            Pending::Delete => {
                if let Some(key) = layout::parse_slot(slot).map(|s| s.key()) {
                    clear_item_slots(tx, key, all, true)?;
                }
                if tx.get(ROOT, slot).map_err(tx_err)?.is_some() {
                    tx.delete(ROOT, slot).map_err(tx_err)?;
                }
            }
        }
    }
    Ok(())
}

/// Deletes the field slots of `key` the document holds (and its whole slot if `whole`),
/// except those written by the same flush (`all`).
fn clear_item_slots(
    tx: &mut automerge::transaction::Transaction<'_>,
    key: &str,
    all: &BTreeMap<String, Pending>,
    whole: bool,
) -> Result<()> {
    let prefix = layout::field_prefix(key);
    let fields: Vec<String> = tx
        .map_range(ROOT, prefix.clone()..)
        .map(|it| it.key.to_string())
        .take_while(|k| k.starts_with(&prefix))
        .filter(|k| !all.contains_key(k))
        .collect();
    for f in fields {
        tx.delete(ROOT, f.as_str()).map_err(tx_err)?;
    }
    if whole {
        let wk = layout::whole_key(key);
        if !all.contains_key(&wk) && tx.get(ROOT, wk.as_str()).map_err(tx_err)?.is_some() {
            tx.delete(ROOT, wk.as_str()).map_err(tx_err)?;
        }
    }
    Ok(())
}

/// Drops the queued field writes of `key` (a later whole write or delete replaces them).
fn drop_pending_fields(pending: &mut BTreeMap<String, Pending>, key: &str) {
    let prefix = layout::field_prefix(key);
    let queued: Vec<String> = pending
        .range(prefix.clone()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for k in queued {
        pending.remove(&k);
    }
}

/// The slot writes that turn `old` into `new`: only fields whose values changed.
fn diff_slots(key: &str, old: Option<&JsonObject>, new: &JsonObject) -> Vec<(String, Pending)> {
    let mut ops = Vec::new();
    if let Some(old) = old {
        for field in old.keys() {
            if !new.contains_key(field) {
                ops.push((layout::field_key(key, field), Pending::Delete));
            }
        }
    }
    for (field, v) in new {
        if old.and_then(|o| o.get(field)) != Some(v) {
            ops.push((layout::field_key(key, field), Pending::Field(v.clone())));
        }
    }
    ops
}

fn commit_opts(now: Timestamp) -> CommitOptions {
    CommitOptions::default().with_time(now.millis() / 1000)
}

fn decode_meta_value(v: &Value<'_>) -> Option<ItemMeta> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) => ItemMeta::decode(b),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// An item's whole data from its slot value; `None` unless it is the JSON text of an object.
fn decode_whole(v: &Value<'_>) -> Option<JsonObject> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(t) => serde_json::from_str(t).ok(),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

fn raw_meta(v: &Value<'_>) -> Option<Vec<u8>> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) if ItemMeta::decode(b).is_some() => Some(b.clone()),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// Root keys of every field slot of `key` in a shard document.
fn field_slots(doc: &Automerge, key: &str) -> Vec<String> {
    let prefix = layout::field_prefix(key);
    doc.map_range(ROOT, prefix.clone()..)
        .map(|it| it.key.to_string())
        .take_while(|k| k.starts_with(&prefix))
        .collect()
}

/// Keys of every item with a meta slot in shard document `index` (that belongs there).
fn item_keys(doc: &Automerge, index: u16) -> Vec<String> {
    doc.keys(ROOT)
        .filter_map(|k| match layout::parse_slot(&k) {
            Some(Slot::Meta(key)) if layout::belongs(key, index) => Some(key.to_string()),
            _ => None,
        })
        .collect()
}

/// Reads an item's state straight from its shard document.
fn read_item(doc: &Automerge, key: &str) -> Option<RawItem> {
    let mk = layout::meta_key(key);
    let all = doc.get_all(ROOT, mk.as_str()).ok()?;
    let mut raws: Vec<Vec<u8>> = all.iter().filter_map(|(v, _)| raw_meta(v)).collect();
    if raws.is_empty() {
        return None;
    }
    // The visible meta: Automerge's winner (the last of `get_all`, which is in operation
    // order) if it decodes, else the highest decodable one.
    let meta = all.iter().rev().find_map(|(v, _)| decode_meta_value(v))?;
    let max_stamp = raws
        .iter()
        .filter_map(|b| ItemMeta::decode(b))
        .map(|m| m.stamp)
        .max()
        .unwrap_or(0);
    raws.sort();
    let revision = hash64(raws.iter().map(|r| r.as_slice()));
    let prefix_len = layout::field_prefix(key).len();
    // The whole data: Automerge's winner among concurrent whole writes if it decodes (a
    // peer's garbage is ignored), then the fields updates wrote on top of it.
    let wholes = doc
        .get_all(ROOT, layout::whole_key(key).as_str())
        .unwrap_or_default();
    let mut conflicted = wholes.len() > 1;
    let mut data = wholes
        .iter()
        .rev()
        .find_map(|(v, _)| decode_whole(v))
        .unwrap_or_default();
    // (`map_range`'s own `conflict` flag does not say whether concurrent values are current on
    // the 0.6 line: `get_all` per field does.)
    for slot in field_slots(doc, key) {
        let Ok(all) = doc.get_all(ROOT, slot.as_str()) else {
            continue;
        };
        conflicted |= all.len() > 1;
        // get_all is in operation order; the last is the visible (winning) value.
        if let (Some((v, id)), Some(field)) = (all.last(), slot.get(prefix_len..)) {
            data.insert(field.to_string(), json::read(doc, v, id));
        }
    }
    Some(RawItem {
        data,
        meta,
        max_stamp,
        revision,
        conflicted,
    })
}

fn read_i64(doc: &Automerge, key: &str) -> Option<i64> {
    match doc.get(ROOT, key).ok()??.0 {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Int(i) => Some(*i),
            ScalarValue::Uint(u) => i64::try_from(*u).ok(),
            ScalarValue::Timestamp(t) => Some(*t),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

fn heads_digest(mut heads: Vec<ChangeHash>) -> u64 {
    heads.sort_unstable();
    hash64(heads.iter().map(|h| h.0.as_slice()))
}

/// Whether a map-document root key is one this layout writes (`inc`, `name`, or a per-
/// incarnation field letter followed by the incarnation number).
fn is_meta_key(k: &str) -> bool {
    if k == "inc" || k == "name" || crate::policy::identity_of_slot(k).is_some() {
        return true;
    }
    let mut chars = k.chars();
    let tag_ok = matches!(chars.next(), Some('c' | 'b' | 'e' | 'r' | 'u' | 'g'));
    let digits = chars.as_str();
    tag_ok
        && !digits.is_empty()
        && digits.len() <= 20
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() > 1 && digits.starts_with('0'))
}

/// Root slots written by changes that passed [`check_changes`], so that applying them
/// ([`MapReplica::apply_checked`]) need not decode them again.
#[derive(Debug, Default)]
pub struct Checked(BTreeSet<String>);

/// Checks that a peer's change writes only what the map layout allows in that document: in a
/// shard, root slots of valid keys that belong to it; in the map document, its known fields.
/// Anything else is a broken or hostile peer: the change is refused.
pub fn check_change(doc: DocAddr, change: &Change) -> Result<()> {
    check_changes(doc, std::slice::from_ref(change)).map(|_| ())
}

/// [`check_change`] for several changes of one document.
pub fn check_changes(doc: DocAddr, changes: &[Change]) -> Result<Checked> {
    if let DocAddr::Shard { index, .. } = doc {
        if index >= SHARDS {
            return Err(Error::InvalidChange(format!(
                "shard {index} out of range (0..{SHARDS})"
            )));
        }
    }
    let mut slots = BTreeSet::new();
    for change in changes {
        // Inside an item's object or list value any JSON shape is fine: only root operations.
        let ops = crate::am::root_ops(change).ok_or_else(|| {
            Error::InvalidChange("a change whose operations name actors it does not list".into())
        })?;
        for op in ops {
            let crate::am::RootOp::Key(k) = &op else {
                return Err(Error::InvalidChange(
                    "a sequence operation on a document root".into(),
                ));
            };
            let ok = match doc {
                DocAddr::Meta => is_meta_key(k),
                DocAddr::Shard { index, .. } => {
                    layout::parse_slot(k).is_some_and(|s| layout::belongs(s.key(), index))
                }
            };
            if !ok {
                return Err(Error::InvalidChange(format!(
                    "root key {k:?} does not belong in {doc:?}"
                )));
            }
            slots.insert(k.to_string());
        }
    }
    Ok(Checked(slots))
}

/// A peer's sync message, decoded and checked: its changes are separated from it (they are
/// merged by [`MapReplica::sync_apply`], with events).
pub struct DecodedSync {
    msg: sync::Message,
    changes: Vec<Change>,
    checked: Checked,
}

impl DecodedSync {
    /// How many changes the message carries.
    pub fn change_count(&self) -> usize {
        self.changes.len()
    }

    /// The changes the message carries.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// The message without its changes, and without the heads they made (a peer that may
    /// not write keeps its changes; were its heads kept, this node would ask for them again
    /// and again). `known` tells the changes this node has.
    pub fn without_changes(self, mut known: impl FnMut(&ChangeHash) -> bool) -> DecodedSync {
        let mut msg = self.msg;
        msg.heads.retain(|h| known(h));
        DecodedSync {
            msg,
            changes: Vec::new(),
            checked: Checked::default(),
        }
    }

    /// The message with only the changes in `keep`, and without the heads of the others
    /// (see [`Self::without_changes`]). `known` tells the changes this node has.
    pub fn retain_changes(
        self,
        keep: &HashSet<ChangeHash>,
        mut known: impl FnMut(&ChangeHash) -> bool,
    ) -> DecodedSync {
        let mut msg = self.msg;
        msg.heads.retain(|h| keep.contains(h) || known(h));
        let changes = self
            .changes
            .into_iter()
            .filter(|c| keep.contains(&c.hash()))
            .collect();
        DecodedSync {
            msg,
            changes,
            checked: self.checked,
        }
    }
}

/// Decodes a peer's sync message for `doc` and checks everything that does not depend on this
/// replica: the format (version 1 only, so every change can be checked before it is applied),
/// the bloom filters (Automerge trusts their parameters: zero bits would divide by zero, a huge
/// probe count would allocate gigabytes), and every change ([`check_changes`]).
pub fn decode_sync(doc: DocAddr, bytes: &[u8]) -> Result<DecodedSync> {
    let mut msg = sync::Message::decode(bytes)
        .map_err(|e| Error::InvalidChange(format!("sync message: {e}")))?;
    if msg.version != sync::MessageVersion::V1 {
        return Err(Error::InvalidChange(
            "sync messages must be version 1".into(),
        ));
    }
    msg.supported_capabilities = None;
    if msg.have.len() > 16 {
        return Err(Error::InvalidChange("too many bloom filters".into()));
    }
    for h in &msg.have {
        check_bloom(&h.bloom.to_bytes())?;
    }
    let mut changes = Vec::with_capacity(msg.changes.len());
    for (i, chunk) in msg.changes.iter().enumerate() {
        let c = Change::from_bytes(chunk.to_vec())
            .map_err(|e| Error::InvalidChange(format!("sync message change {i}: {e}")))?;
        changes.push(c);
    }
    let checked = check_changes(doc, &changes)?;
    msg.changes = sync::ChunkList::from(Vec::<Vec<u8>>::new());
    Ok(DecodedSync {
        msg,
        changes,
        checked,
    })
}

/// Checks an encoded bloom filter's parameters (entries, bits per entry, probes).
fn check_bloom(b: &[u8]) -> Result<()> {
    fn leb(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    if b.is_empty() {
        return Ok(()); // an empty filter
    }
    let mut at = 0;
    let bad = || Error::InvalidChange("malformed bloom filter".into());
    let entries = leb(b, &mut at).ok_or_else(bad)?;
    let bits = leb(b, &mut at).ok_or_else(bad)?;
    let probes = leb(b, &mut at).ok_or_else(bad)?;
    if entries > 0 && (!(1..=64).contains(&bits) || !(1..=32).contains(&probes)) {
        return Err(bad());
    }
    Ok(())
}

fn read_map_state(doc: &Automerge) -> MapState {
    // The incarnation is the largest ever written: re-creations only ever move it forward.
    let inc = doc
        .get_all(ROOT, "inc")
        .unwrap_or_default()
        .iter()
        .filter_map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Uint(u) => Some(*u),
                ScalarValue::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            },
            Value::Object(_) => None,
        })
        .max()
        .unwrap_or(0);
    let name = match doc.get(ROOT, "name").ok().flatten() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(n) => Some(n.to_string()),
            _ => None,
        },
        _ => None,
    };
    let created = read_i64(doc, &format!("c{inc}")).map(Timestamp::from_millis);
    let created_by = match doc.get(ROOT, format!("b{inc}").as_str()).ok().flatten() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Bytes(b) => NodeId::from_slice(b),
            _ => None,
        },
        _ => None,
    }
    .unwrap_or(NodeId([0; 16]));
    let expires = read_i64(doc, &format!("e{inc}")).map(Timestamp::from_millis);
    let removed = read_i64(doc, &format!("r{inc}")).map(Timestamp::from_millis);
    let updated = read_i64(doc, &format!("u{inc}"))
        .map(Timestamp::from_millis)
        .or(created)
        .unwrap_or(Timestamp::from_millis(0));
    let mut heads = doc.get_heads();
    heads.sort();
    let revision = Revision::from_hash(hash64(heads.iter().map(|h| h.0.as_slice())));
    let policy = read_policy(doc);
    let endorsed_by_shard = read_endorsed(doc);
    let endorsed = endorsed_by_shard.values().flatten().copied().collect();
    MapState {
        name,
        inc,
        created,
        created_by,
        expires,
        removed,
        updated,
        revision,
        policy,
        endorsed,
        endorsed_by_shard,
    }
}

/// The shard heads endorsed when the map got its first permission entry or a writer lost
/// `Write` (`g<shard>` slots; concurrent endorsements all count).
fn read_endorsed(doc: &Automerge) -> BTreeMap<u16, Vec<ChangeHash>> {
    let mut out: BTreeMap<u16, Vec<ChangeHash>> = BTreeMap::new();
    for k in doc.keys(ROOT) {
        let Some(index) = k.strip_prefix('g').and_then(|i| i.parse::<u16>().ok()) else {
            continue;
        };
        for (v, _) in doc.get_all(ROOT, k.as_str()).unwrap_or_default() {
            if let Value::Scalar(s) = v {
                if let ScalarValue::Bytes(b) = s.as_ref() {
                    let list = out.entry(index).or_default();
                    for h in b.chunks_exact(32) {
                        if let Ok(h) = ChangeHash::try_from(h) {
                            if !list.contains(&h) {
                                list.push(h);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The permissions a map document says, at its heads or at `at`.
pub(crate) fn policy_at(doc: &Automerge, at: Option<&[ChangeHash]>) -> crate::policy::Policy {
    match at {
        None => read_policy(doc),
        Some(heads) => match doc.fork_at(heads) {
            Ok(d) => read_policy(&d),
            // Unknown dependencies: nobody may do anything there.
            Err(_) => crate::policy::Policy::from_entries([(String::new(), 0)]),
        },
    }
}

fn read_policy(doc: &Automerge) -> crate::policy::Policy {
    let mut entries = Vec::new();
    for k in doc.keys(ROOT) {
        let Some(id) = crate::policy::identity_of_slot(&k) else {
            continue;
        };
        let flags = match doc.get(ROOT, k.as_str()).ok().flatten() {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Uint(u) => u8::try_from(*u & 7).ok(),
                ScalarValue::Int(i) => u8::try_from(*i & 7).ok(),
                _ => None,
            },
            _ => None,
        };
        if let Some(f) = flags {
            entries.push((id.to_string(), f));
        }
    }
    crate::policy::Policy::from_entries(entries)
}

/// Whether a change of the map document needs the `Manage` permission: it changes permission
/// entries or removes the map. Other map-document changes need `Write`.
pub fn needs_manage(change: &Change) -> bool {
    // A malformed change needs the most (it is refused by `check_changes` anyway).
    let Some(keys) = crate::am::root_map_keys(change) else {
        return true;
    };
    keys.iter().any(|k| {
        k.starts_with(crate::policy::PREFIX)
            || ((k.starts_with('r') || k.starts_with('g'))
                && k.len() > 1
                && k[1..].bytes().all(|b| b.is_ascii_digit()))
    })
}

#[allow(dead_code)]
fn assert_send(m: MapReplica) -> impl Send {
    m
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn parking_for_the_budget_spares_shards_in_use_and_counts_operations() {
        let now = Timestamp::from_millis(1);
        let id = Identity::new(NodeId([1; 16]), &[1; 8]);
        let mut m = MapReplica::create(id, MapSid::for_name("b"), Some("b"), None, now).unwrap();
        let data = |i: i64| {
            serde_json::json!({ "i": i })
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
        for i in 0..200 {
            m.set(&format!("k{i}"), data(i), &WriteOptions::default(), now)
                .unwrap();
        }
        m.flush(now).unwrap();
        let live = m.live_bytes();
        assert!(live >= 200 * 2 * LIVE_OP_BYTES, "{live}");
        let mark = m.use_mark();
        m.set("k1", data(-1), &WriteOptions::default(), now)
            .unwrap();
        let freed = m.park_lru(u64::MAX, mark, now).unwrap();
        assert!(freed > 0);
        assert_eq!(
            m.live_shards(),
            1,
            "only the shard used after the mark stays"
        );
        assert_eq!(m.get("k1", now).unwrap().data["i"], -1);
        // What is left is that one small shard (its flushed write included).
        let left = m.live_bytes();
        assert!(
            left > live - freed && left < LIVE_DOC_BYTES + 16 * LIVE_OP_BYTES,
            "{left}"
        );
    }
}
