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
    ActorId, Automerge, Change, ChangeHash, PatchAction, Prop, ReadDoc, ScalarValue, Value, ROOT,
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

mod apply;
mod authz;
mod check;
mod expiry;
mod history;
mod incarnation;
mod pending;
mod persist;
mod read;
mod replicate;
mod shard;
mod view;

use pending::*;
use read::*;
use shard::*;
use view::*;

pub use check::{check_change, check_changes, decode_sync, needs_manage, Checked, DecodedSync};
pub use history::ShardHistory;
pub use pending::MAX_ITEMS_PER_CHANGE;
pub(crate) use read::policy_at;
pub use shard::StoredDoc;
pub use view::{entry_data, entry_item, version_entry, ViewChanges};

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
        /// The shard's history generation ([`crate::generation::gen_id`]): 0 until its history
        /// is first cut. Two generations are two documents.
        gen: u64,
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

/// When a write is acknowledged: after it is on disk, or as soon as it is applied in memory.
/// A node has a default (`NodeBuilder::durability` in the `syncmesh` crate); a write may
/// choose otherwise ([`WriteOptions::durability`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after fsync (default): an acknowledged write survives a crash.
    #[default]
    Fsync,
    /// Acknowledge a write once it is applied in memory and handed to storage, before it is
    /// committed; the commit follows at once (several writes share one when they come faster
    /// than commits) and an fsync within 100 ms, or at the next durability barrier
    /// (`Node::sync`), durable write, `compact` or `close`. A crash — not a clean close — or a
    /// failed commit (a full disk) can lose writes acknowledged in that window; the store
    /// stays consistent either way, and reads still only show what is committed.
    Relaxed,
}

/// Options of a write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Set the item's TTL (from now); `None` keeps the current expiry.
    pub ttl: Option<Ttl>,
    /// Only write if the item's current revision is this one (REST `If-Match`).
    pub if_match: Option<Revision>,
    /// When this write is acknowledged; `None` follows the node's default. The engine reads
    /// it; the map itself writes the same either way.
    pub durability: Option<Durability>,
}

impl WriteOptions {
    /// Options with a TTL.
    pub fn ttl(ttl: Ttl) -> Self {
        WriteOptions {
            ttl: Some(ttl),
            ..WriteOptions::default()
        }
    }

    /// Options with an If-Match revision.
    pub fn if_match(rev: Revision) -> Self {
        WriteOptions {
            if_match: Some(rev),
            ..WriteOptions::default()
        }
    }

    /// These options, acknowledged as `d` says rather than as the node's default.
    pub fn with_durability(mut self, d: Durability) -> Self {
        self.durability = Some(d);
        self
    }
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
    /// Keys as `Box<str>`: 8 bytes less per item than `String`, with no spare capacity.
    view: BTreeMap<Box<str>, ItemState>,
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
    /// Newer generations of shards learnt from peers, being filled by sync before this
    /// replica moves to them (see `history`): by shard, the generation and its document.
    staged: BTreeMap<u16, (u64, Automerge)>,
    /// Shards whose document was replaced by another generation since the last
    /// [`MapReplica::take_replaced`]: the store must replace what it keeps of them.
    replaced: BTreeSet<u16>,
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
            staged: BTreeMap::new(),
            replaced: BTreeSet::new(),
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
        let last = crate::am::with_last_local_change(&self.meta_doc, |ch| {
            (ch.hash(), ch.raw_bytes().to_vec())
        });
        if let Some((hash, bytes)) = last {
            // Every map-document change is signed: one may be what restricts the map, or opens
            // it again, and its author's rights decide whether peers take it.
            if let Some(sig) = self.id.signer.as_ref().and_then(|k| k.sign(&hash)) {
                self.sigs.insert(hash, sig.clone());
                self.new_sigs.push((hash, sig));
            }
            self.outbox.push(OutgoingChange {
                map: self.sid.clone(),
                doc: DocAddr::Meta,
                bytes,
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
            .filter(|(_, k)| self.view.get(k.as_str()).is_some_and(|s| s.expired(now)))
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
            ..WriteOptions::default()
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
        // A whole write deletes every field slot this replica holds for the item (at its
        // flush, which comes before any peer's change to the shard is merged).
        st.meta.no_fields = whole;

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
            Some(st) => self.view.insert(key.into(), st.clone()),
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
                if o.revision == n.revision && o.data == n.data && o.meta.same_visible(n.meta) {
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
        let (doc, index) = sh.parts()?;
        let doc: &Automerge = doc;
        let wholes = doc
            .get_all(ROOT, layout::whole_key(key).as_str())
            .map_err(tx_err)?;
        let metas = doc.get_all(ROOT, layout::meta_key(key)).map_err(tx_err)?;
        // Visible first (as `read_item` picks them), then the others, newest first.
        let mut values: Vec<JsonObject> = wholes
            .iter()
            .rev()
            .filter_map(|(v, _)| decode_whole(v))
            .collect();
        if values.len() < 2 {
            values.clear();
        }
        let visible_meta = visible_meta(&metas, visible_whole(&wholes).map(|(_, id)| id));
        let mut fields = BTreeMap::new();
        for root_key in indexed_fields(index, key) {
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
        let visible = visible_meta.map(|(_, i)| i);
        let writers: Vec<NodeId> = visible
            .into_iter()
            .chain((0..metas.len()).rev().filter(|i| Some(*i) != visible))
            .filter_map(|i| metas.get(i).and_then(|(v, _)| decode_meta_value(v)))
            .map(|m| m.writer)
            .collect();
        Ok(ItemConflicts {
            key: key.to_string(),
            values,
            fields,
            writers,
        })
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

#[allow(dead_code)]
fn assert_send(m: MapReplica) -> impl Send {
    m
}

/// Helpers for the unit tests of this module's parts.
#[cfg(test)]
pub(super) mod test_support {
    use super::*;

    pub(crate) fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    pub(crate) fn obj(v: Json) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    /// A new map "m" on replica `n`.
    pub(crate) fn replica(n: u8) -> MapReplica {
        let id = Identity::new(NodeId([n; 16]), &[n]);
        MapReplica::create(id, MapSid::for_name("m"), Some("m"), None, t(0)).unwrap()
    }

    /// Replica `n` knowing nothing yet (it learns the map from another's changes).
    pub(crate) fn blank(n: u8) -> MapReplica {
        MapReplica::empty(Identity::new(NodeId([n; 16]), &[n]), MapSid::for_name("m"))
    }

    /// Every change `from` made since the last call, applied to `to`.
    pub(crate) fn send(from: &mut MapReplica, to: &mut MapReplica, now: Timestamp) {
        from.flush(now).unwrap();
        for c in from.take_outgoing() {
            to.apply_changes(c.doc, &[c.bytes], now).unwrap();
        }
    }
}
