//! The node's two threads: the engine (owns every map, runs operations, builds batches) and
//! the store writer (commits batches, then acknowledges writes and publishes their events).
//!
//! Group commit: the engine handles every command already queued, turns what they changed
//! into one [`Batch`], and hands it to the store writer; while that batch is being fsynced the
//! engine goes on with the next commands, which form the next batch. A write is acknowledged
//! only after its batch is on disk, and its events are published only then, so a subscriber
//! never sees an event that a crash could take back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use syncmesh_core::{
    Catalog, DocAddr, Durability, Event, Identity, Item, ItemConflicts, JsonObject, MapInfo,
    MapRef, MapReplica, MapSid, MapSpec, Page, PageRequest, Revision, Signature, Timestamp, Ttl,
    WriteOptions,
};
use syncmesh_store::{Batch, FeedEvent, FileCompaction, MapWrite, Store, StoreError};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::node::MapHistory;

mod batch;
mod commands;
mod housekeeping;
mod replication;
mod trust;
mod writer;
use batch::read_unsigned_mark;
use commands::Ack;
pub(crate) use commands::{Cmd, Op, Reply};
pub(crate) use replication::{Net, FETCH_TIMEOUT};
pub(crate) use trust::TrustCmd;

/// Commands queued for the engine; the capacity bounds memory under load.
pub(crate) const COMMAND_QUEUE: usize = 4096;
/// Most commands handled before a batch is committed.
const MAX_BATCH_COMMANDS: usize = 512;
/// With relaxed durability, the longest time an acknowledged write waits for an fsync.
const RELAXED_WINDOW: Duration = Duration::from_millis(100);
/// Commits a relaxed engine may hand to the store writer ahead of it.
const RELAXED_QUEUE_JOBS: usize = 64;
/// Bytes of commits queued for the store writer beyond which the engine waits for it.
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Event ids a map reserves at a time for events published before they are durable.
const EVENT_ID_BLOCK: u64 = 4096;
/// Stored changes of one document after which it is replaced by a snapshot.
const COMPACT_AFTER_CHANGES: u32 = 1000;
/// Bytes of stored changes of one document after which it is replaced by a snapshot, however
/// few they are (a log of large changes would otherwise grow to 1,000 of them).
const COMPACT_AFTER_BYTES: u64 = 1 << 20;
/// How often idle shard documents are parked: a shard untouched for a whole period leaves
/// memory (kept as its saved bytes) and is reloaded on next use.
const PARK_PERIOD: Duration = Duration::from_secs(30);
/// Default memory for live shard documents ([`crate::NodeBuilder::document_budget`]).
pub(crate) const DOCUMENT_BUDGET: u64 = 64 * 1024 * 1024;
/// How often loaded shard documents are measured against [`Engine::history`].
const HISTORY_CHECK: Duration = Duration::from_secs(5);
/// How often the live documents are measured against the budget.
const BUDGET_CHECK: Duration = Duration::from_millis(50);
/// Time an engine round spends at most on parking shards over the budget.
const PARK_ROUND_BUDGET: Duration = Duration::from_millis(4);
/// Snapshot bytes queued for the store writer past which the engine takes no more.
const MAX_QUEUED_SNAPSHOT_BYTES: usize = 16 << 20;
/// Time an engine round spends at most on snapshots `Node::compact` asked for; the rest
/// waits for the next rounds, so commands are answered in between.
const COMPACT_ROUND_BUDGET: Duration = Duration::from_millis(4);

/// What replication may know of the stored maps before they are loaded.
fn parked_maps(
    on_disk: &BTreeMap<MapSid, Option<String>>,
    digests: &HashMap<MapSid, u64>,
    policies: &HashMap<MapSid, syncmesh_core::Policy>,
) -> syncmesh_core::replication::Parked {
    on_disk
        .keys()
        .map(|sid| {
            let m = syncmesh_core::replication::ParkedMap {
                digest: digests.get(sid).copied(),
                policy: policies.get(sid).cloned().unwrap_or_default(),
            };
            (sid.clone(), m)
        })
        .collect()
}

pub(crate) fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp::from_millis(ms)
}

pub(crate) fn random16() -> [u8; 16] {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: fall back to time and address entropy (ids must only be unique).
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&t.to_le_bytes());
        let addr = &b as *const _ as usize as u64;
        for (i, x) in addr.to_le_bytes().iter().enumerate() {
            b[i] ^= x;
        }
    }
    b
}

enum StoreJob {
    Commit {
        batch: Batch,
        acks: Vec<Ack>,
        barriers: Vec<oneshot::Sender<Result<()>>>,
        events: Vec<Arc<Published>>,
        /// Force an fsync (relaxed stores otherwise commit without one).
        durable: bool,
        /// This commit's number ([`Shared::committed`] once it is stored).
        seq: u64,
        /// What the batch carries, counted in [`Shared::queued_bytes`] until stored.
        bytes: usize,
    },
    Compact {
        sid: MapSid,
        doc: DocAddr,
        snapshot: Vec<u8>,
    },
    /// Forget a dead document (an earlier incarnation's shard).
    Drop { sid: MapSid, doc: DocAddr },
    /// Give the file's free space back to the file system (after the compactions before it),
    /// then tell each waiter what it did. The file is rewritten on a thread of its own.
    CompactFile(Vec<oneshot::Sender<Result<FileCompaction>>>),
    /// Answered once every earlier commit is stored (snapshots may still be queued: they
    /// change no content).
    Fence(std::sync::mpsc::Sender<()>),
}

impl Shared {
    /// The open store, or [`Error::Closed`].
    pub(crate) fn store(&self) -> Result<Arc<Store>> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed)
    }
}

/// An event as published to live subscribers, with the size of its stored encoding (what a
/// subscriber's buffer is charged for holding it).
#[derive(Debug)]
pub(crate) struct Published {
    pub event: Event,
    pub bytes: usize,
}

/// What the engine shares with the rest of the node.
pub(crate) struct Shared {
    /// The store while the node is open; `None` once closed, so the file is released even
    /// while handles remain.
    pub store: Mutex<Option<Arc<Store>>>,
    pub events: broadcast::Sender<Arc<Published>>,
    /// Bytes of events one subscription may hold for a consumer that does not read.
    pub subscriber_buffer: usize,
    /// Becomes true when the node has closed: subscription tasks end on it.
    pub closed: tokio::sync::watch::Sender<bool>,
    /// Set by the store writer when a commit fails; writes are refused from then on.
    pub failed: Mutex<Option<Arc<StoreError>>>,
    /// The number of the last commit stored (see [`Engine::unsettled`]).
    pub committed: std::sync::atomic::AtomicU64,
    /// Bytes of commits handed to the store writer and not stored yet.
    pub queued_bytes: std::sync::atomic::AtomicUsize,
    /// Bytes of snapshots handed to the store writer and not stored yet: the engine takes
    /// no more while this is over [`MAX_QUEUED_SNAPSHOT_BYTES`].
    pub snapshot_bytes: std::sync::atomic::AtomicUsize,
    /// Trusted peers the engine exchanges maps with now, in id order.
    pub peers: tokio::sync::watch::Sender<Vec<syncmesh_net::PeerId>>,
}

pub(crate) struct Engine {
    store: Arc<Store>,
    catalog: Catalog,
    shared: Arc<Shared>,
    /// Maps the store holds, with their names; loaded into the catalog on first use.
    on_disk: BTreeMap<MapSid, Option<String>>,
    /// Next TTL expiry of stored maps that are not loaded: they are loaded when it is due.
    unloaded_expiry: BTreeMap<MapSid, Timestamp>,
    /// Stored maps that are not loaded, with the digests and permissions the store remembers:
    /// anti-entropy announces them without loading them.
    pub(crate) parked: syncmesh_core::replication::Parked,
    /// Loaded maps whose digest the next commit stores (computed after its changes).
    pub(crate) digests_wanted: BTreeSet<MapSid>,
    /// Maps loaded with changes whose signatures peers are asked for (at the next commit).
    signatures_wanted: BTreeSet<MapSid>,
    /// Whether [`Engine::forget_uncommitted`] ran.
    forgot_uncommitted: bool,
    dirty: BTreeSet<MapSid>,
    /// Number of the last commit sent to the store writer.
    commit_seq: u64,
    /// Per map changed lately, the number of the commit that carries its last change.
    last_commit: HashMap<MapSid, u64>,
    /// Per document, the changes stored since its snapshot and their bytes.
    changes_since_snapshot: HashMap<(MapSid, DocAddr), (u32, u64)>,
    pending_compactions: Vec<StoreJob>,
    shutdown: Option<oneshot::Sender<Result<()>>>,
    /// Documents to snapshot at the next commit (from [`Cmd::Compact`]).
    compact_queue: Vec<(MapSid, DocAddr)>,
    /// Callers waiting for the file to be compacted after the next commit's snapshots (from
    /// [`Cmd::Compact`]).
    compact_file: Vec<oneshot::Sender<Result<FileCompaction>>>,
    /// Use marks taken at the last parking round, per map.
    park_marks: HashMap<MapSid, u64>,
    next_park: std::time::Instant,
    /// History a shard document keeps before it is cut ([`crate::NodeBuilder::history`];
    /// `None`: never cut).
    history: Option<u64>,
    next_history_check: std::time::Instant,
    /// Memory for live shard documents, all maps together.
    budget: u64,
    next_budget_check: std::time::Instant,
    /// Use marks of every loaded map at the previous budget check.
    budget_marks: HashMap<MapSid, u64>,
    /// Whether "in use over the budget" was logged since the node was last under it.
    over_budget_warned: bool,
    /// The live documents were over the budget at the last check (check again when idle).
    over_budget: bool,
    last_durable: std::time::Instant,
    /// Per map, the event id below which ids are durably reserved ([`EVENT_ID_BLOCK`]).
    event_floors: HashMap<MapSid, u64>,
    /// A relaxed (not fsynced) commit went out since the last fsync.
    needs_fsync: bool,
    jobs: std::sync::mpsc::SyncSender<StoreJob>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Replication, when the node is on a network.
    net: Option<Net>,
    /// Bumped when a map is dropped from memory to be reloaded (a peer's data damaged it):
    /// writes made before that are not acknowledged.
    epochs: HashMap<MapSid, u64>,
    /// Who this node trusts, and its invitations.
    trust: crate::trust::TrustBook,
    /// Changes refused per peer since start (it may not write the map).
    refused: HashMap<String, u64>,
    /// The latest trust problem per peer seen by the engine (refused joins and changes).
    problems: HashMap<String, (String, Timestamp)>,
    /// Permissions of maps that have entries, as last committed (maps not loaded are checked
    /// against these; a loaded map answers itself).
    pub(crate) policies: HashMap<MapSid, syncmesh_core::Policy>,
}

impl Engine {
    pub(crate) fn new(
        id: Identity,
        shared: Arc<Shared>,
        net: Option<Net>,
        trust: crate::trust::TrustBook,
    ) -> Result<Engine> {
        let store = shared.store()?;
        let catalog_entries = store.list_maps()?;
        let unloaded_expiry = catalog_entries
            .iter()
            .filter_map(|e| {
                e.next_expiry
                    .map(|t| (e.sid.clone(), Timestamp::from_millis(t)))
            })
            .collect();
        let on_disk: BTreeMap<MapSid, Option<String>> = catalog_entries
            .into_iter()
            .map(|e| (e.sid, e.name))
            .collect();
        let stored_digests: HashMap<MapSid, u64> = store.map_digests()?.into_iter().collect();
        let policies = store
            .map_policies()?
            .into_iter()
            .map(|(sid, b)| {
                let p = syncmesh_core::Policy::decode(&b).unwrap_or_else(|| {
                    // Unreadable: nobody is sent the map until it is loaded (its own document
                    // then answers).
                    tracing::warn!(map = %sid, "stored permissions are unreadable");
                    syncmesh_core::Policy::from_entries([(String::new(), 0)])
                });
                (sid, p)
            })
            .collect();
        let parked = parked_maps(&on_disk, &stored_digests, &policies);
        // With fsync, the engine waits while one commit is queued and gathers the commands that
        // arrive meanwhile into the next (group commit). Relaxed writes are acknowledged at
        // hand-off, so the engine runs ahead instead and the store writer merges what is queued.
        let queue = if store.is_durable() {
            1
        } else {
            RELAXED_QUEUE_JOBS
        };
        let (jobs, jobs_rx) = std::sync::mpsc::sync_channel::<StoreJob>(queue);
        let (shared2, store2) = (shared.clone(), store.clone());
        let writer = std::thread::Builder::new()
            .name("syncmesh-store".into())
            .spawn(move || writer::store_writer(shared2, store2, jobs_rx))
            .map_err(|e| Error::Start {
                what: "storage thread",
                why: e.to_string(),
            })?;
        Ok(Engine {
            store,
            catalog: Catalog::new(id),
            shared,
            on_disk,
            unloaded_expiry,
            parked,
            digests_wanted: BTreeSet::new(),
            signatures_wanted: BTreeSet::new(),
            forgot_uncommitted: false,
            dirty: BTreeSet::new(),
            commit_seq: 0,
            last_commit: HashMap::new(),
            changes_since_snapshot: HashMap::new(),
            pending_compactions: Vec::new(),
            shutdown: None,
            compact_queue: Vec::new(),
            compact_file: Vec::new(),
            park_marks: HashMap::new(),
            next_park: std::time::Instant::now() + PARK_PERIOD,
            budget: DOCUMENT_BUDGET,
            history: None,
            next_history_check: std::time::Instant::now() + HISTORY_CHECK,
            next_budget_check: std::time::Instant::now(),
            budget_marks: HashMap::new(),
            over_budget_warned: false,
            over_budget: false,
            last_durable: std::time::Instant::now(),
            needs_fsync: false,
            event_floors: HashMap::new(),
            jobs,
            writer: Some(writer),
            net,
            epochs: HashMap::new(),
            trust,
            refused: HashMap::new(),
            problems: HashMap::new(),
            policies,
        })
    }

    /// Runs until every handle is dropped, then commits what is left.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("syncmesh engine cannot start its runtime: {e}");
                return;
            }
        };
        rt.block_on(async {
            loop {
                // Wake for TTLs, for parking, for the network's timers, and for the fsync
                // that relaxed writes wait on.
                let mut wake = self.next_park.min(self.next_history_check);
                if let Some(n) = &self.net {
                    wake = wake.min(n.next_wake());
                }
                if self.over_budget {
                    // Shards in use at the last check may be parked at the next one.
                    wake = wake.min(self.next_budget_check);
                }
                let mut wait = self
                    .next_expiry_wait()
                    .min(wake.saturating_duration_since(std::time::Instant::now()));
                if self.needs_fsync {
                    wait = wait.min(RELAXED_WINDOW);
                }
                if !self.compact_queue.is_empty() {
                    // Snapshots asked for by `Node::compact` go on between commands.
                    wait = wait.min(Duration::from_millis(2));
                }
                let wait = wait.max(Duration::from_millis(1));
                let first = tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => Some(Input::Cmd(c)),
                        None => break,
                    },
                    ev = net_recv(&mut self.net) => ev.map(Input::Net),
                    _ = tokio::time::sleep(wait) => None,
                };
                let mut acks = Vec::new();
                let mut barriers = Vec::new();
                if let Some(n) = self.net.as_mut() {
                    n.round_bytes = 0;
                }
                let now = now();
                // Before anything is read: a refused write must not be.
                self.forget_uncommitted();
                self.expire_due(now);
                match first {
                    Some(Input::Cmd(c)) => self.handle(c, now, &mut acks, &mut barriers),
                    Some(Input::Net(ev)) => self.on_net(ev, now),
                    None => {}
                }
                // Every handled command counts, reads too, so a stream of reads cannot hold
                // back the commit (and the acknowledgement) of the writes before them.
                let mut handled = 1;
                while handled < MAX_BATCH_COMMANDS {
                    let mut any = false;
                    if let Ok(c) = rx.try_recv() {
                        self.forget_uncommitted();
                        self.handle(c, now, &mut acks, &mut barriers);
                        any = true;
                    }
                    if let Some(ev) = self.net.as_mut().and_then(Net::try_next) {
                        self.on_net(ev, now);
                        any = true;
                    }
                    if !any {
                        break;
                    }
                    handled += 1;
                }
                self.net_housekeeping(now);
                self.commit(now, acks, barriers);
                if self.forgot_uncommitted && self.net.is_some() {
                    // It can store nothing peers send, nor answer them honestly: it leaves
                    // the mesh until it is reopened (peers keep their changes).
                    tracing::warn!(
                        "writes are stopped: leaving the mesh until the node is reopened"
                    );
                    self.stop_net_for_stopped_writes().await;
                }
                if self.shutdown.is_some() {
                    break;
                }
                if std::time::Instant::now() >= self.next_park {
                    self.park_idle(now);
                }
                if std::time::Instant::now() >= self.next_history_check {
                    self.next_history_check = std::time::Instant::now() + HISTORY_CHECK;
                    if self.write_stop().is_none() {
                        self.cut_history(now);
                    }
                }
                if std::time::Instant::now() >= self.next_budget_check {
                    self.next_budget_check = std::time::Instant::now() + BUDGET_CHECK;
                    self.keep_to_budget(now);
                }
            }
            self.stop_net().await;
        });
        // Refuse what is still queued, then commit and stop. Loaded maps' digests go with
        // that commit, so the next start announces them to peers without loading them.
        rx.close();
        let loaded: Vec<MapSid> = self
            .catalog
            .maps()
            .map(|m| m.sid().clone())
            .filter(|s| self.on_disk.contains_key(s))
            .collect();
        self.digests_wanted.extend(loaded);
        self.commit(now(), Vec::new(), Vec::new());
        let Engine {
            jobs,
            writer,
            shutdown,
            shared,
            store,
            ..
        } = self;
        drop(jobs);
        if let Some(w) = writer {
            let _ = w.join();
        }
        // Release the database file: only transient readers may still hold it.
        *shared.store.lock().unwrap_or_else(|p| p.into_inner()) = None;
        drop(store);
        shared.closed.send_replace(true);
        if let Some(reply) = shutdown {
            let _ = reply.send(Ok(()));
        }
    }

    /// Sets the memory for live shard documents.
    pub(crate) fn document_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Sets the history a shard document keeps before it is cut (`None`: never cut).
    pub(crate) fn history(mut self, ops: Option<u64>) -> Self {
        self.history = ops;
        self
    }

    /// Whether a read of `sid` could see changes that are not stored yet (made this round,
    /// or in a commit the store writer has not finished).
    fn unsettled(&self, sid: &MapSid) -> bool {
        // After a failed commit memory is what the store holds (nothing changes it any more).
        if self.forgot_uncommitted {
            return false;
        }
        let committed = self.shared.committed.load(Ordering::Acquire);
        self.dirty.contains(sid) || self.last_commit.get(sid).is_some_and(|s| *s > committed)
    }

    /// Whether any map could be read with changes not stored yet.
    fn any_unsettled(&self) -> bool {
        if self.forgot_uncommitted {
            return false;
        }
        let committed = self.shared.committed.load(Ordering::Acquire);
        !self.dirty.is_empty() || self.last_commit.values().any(|s| *s > committed)
    }

    fn epoch(&self, sid: &MapSid) -> u64 {
        self.epochs.get(sid).copied().unwrap_or(0)
    }

    /// Waits until the store thread has finished every job queued so far.
    fn fence(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.jobs.send(StoreJob::Fence(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// After a commit failed: forgets every map in memory and what the engine remembered of
    /// the store, so that from now on readers see only what the store holds (a write or a
    /// map that was refused is never read, before or after a restart). Runs once.
    fn forget_uncommitted(&mut self) {
        if self.forgot_uncommitted || self.write_stop().is_none() {
            return;
        }
        self.forgot_uncommitted = true;
        // Whatever was queued failed too (writes stop at the first failure).
        self.fence();
        let sids: Vec<MapSid> = self.catalog.maps().map(|m| m.sid().clone()).collect();
        for sid in sids {
            self.catalog.remove(&sid);
            *self.epochs.entry(sid).or_insert(0) += 1;
        }
        self.dirty.clear();
        self.last_commit.clear();
        self.compact_queue.clear();
        self.pending_compactions.clear();
        match self.store.list_maps() {
            Ok(entries) => {
                self.on_disk = entries.into_iter().map(|e| (e.sid, e.name)).collect();
            }
            Err(e) => tracing::error!("cannot list the stored maps after a failed commit: {e}"),
        }
        let digests: HashMap<MapSid, u64> = self
            .store
            .map_digests()
            .map(|d| d.into_iter().collect())
            .unwrap_or_default();
        self.parked = parked_maps(&self.on_disk, &digests, &self.policies);
        tracing::warn!(
            "a commit failed: maps are read from storage from now on, without what was not stored"
        );
    }

    pub(crate) fn write_stop(&self) -> Option<Error> {
        let f = self.shared.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.as_ref().map(|e| Error::WritesStopped(e.clone()))
    }

    /// Brings a stored map into the catalog if it is not there yet.
    fn ensure_loaded(&mut self, sid: &MapSid) -> Result<()> {
        if self.catalog.contains(sid) || !self.on_disk.contains_key(sid) {
            return Ok(());
        }
        // Loaded, its digest is computed live (and the stored one dropped with its next
        // change); a map that fails to load stays parked, so it is neither forgotten by
        // replication nor replaced by an empty one.
        let parked = self.parked.remove(sid);
        let r = self.load_stored(sid);
        if !self.catalog.contains(sid) {
            if let Some(p) = parked {
                self.parked.insert(sid.clone(), p);
            }
        }
        r
    }

    fn load_stored(&mut self, sid: &MapSid) -> Result<()> {
        self.unloaded_expiry.remove(sid);
        let Some(stored) = self.store.load_map(sid)? else {
            return Ok(());
        };
        let addrs: Vec<DocAddr> = stored.docs.iter().map(|(a, _)| *a).collect();
        // Stored change logs count toward compaction, also across restarts.
        for (addr, doc) in &stored.docs {
            let n = u32::try_from(doc.changes.len()).unwrap_or(u32::MAX);
            if n > 0 {
                let bytes = doc.changes.iter().map(|c| c.len() as u64).sum();
                self.changes_since_snapshot
                    .insert((sid.clone(), *addr), (n, bytes));
            }
        }
        let mut m = MapReplica::restore(
            self.catalog.identity().clone(),
            sid.clone(),
            stored.docs,
            stored.entries,
            stored.last_event_id,
        )?;
        m.restore_signatures(
            stored
                .sigs
                .iter()
                .filter_map(|(h, b)| Some((syncmesh_core::ChangeHash(*h), Signature::decode(b)?))),
        );
        m.restore_unsigned(
            stored
                .sigs
                .iter()
                .filter_map(|(h, b)| Some((syncmesh_core::ChangeHash(*h), read_unsigned_mark(b)?))),
        );
        if m.has_unsigned() {
            self.signatures_wanted.insert(sid.clone());
        }
        // Documents of earlier incarnations (the map was removed and created again) are dead
        // weight: forget them, after the commits already queued.
        let inc = m.incarnation();
        for a in addrs {
            if matches!(a, DocAddr::Shard { inc: i, .. } if i < inc) {
                self.pending_compactions.push(StoreJob::Drop {
                    sid: sid.clone(),
                    doc: a,
                });
            }
        }
        self.catalog.insert(m);
        Ok(())
    }
}

/// What woke the engine.
enum Input {
    Cmd(Cmd),
    Net(syncmesh_net::NetEvent),
}

/// The next network event, or never when the node has no network.
async fn net_recv(net: &mut Option<Net>) -> Option<syncmesh_net::NetEvent> {
    match net {
        Some(n) => n.next().await,
        None => std::future::pending().await,
    }
}
