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

mod replication;
mod trust;
mod writer;
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
/// How often idle shard documents are parked: a shard untouched for a whole period leaves
/// memory (kept as its saved bytes) and is reloaded on next use.
const PARK_PERIOD: Duration = Duration::from_secs(30);
/// Default memory for live shard documents ([`crate::NodeBuilder::document_budget`]).
pub(crate) const DOCUMENT_BUDGET: u64 = 64 * 1024 * 1024;
/// How often the live documents are measured against the budget.
const BUDGET_CHECK: Duration = Duration::from_millis(50);
/// Time an engine round spends at most on parking shards over the budget.
const PARK_ROUND_BUDGET: Duration = Duration::from_millis(4);
/// Snapshot bytes queued for the store writer past which the engine takes no more.
const MAX_QUEUED_SNAPSHOT_BYTES: usize = 16 << 20;
/// Time an engine round spends at most on snapshots `Node::compact` asked for; the rest
/// waits for the next rounds, so commands are answered in between.
const COMPACT_ROUND_BUDGET: Duration = Duration::from_millis(4);

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

/// A user's mutation function, run on the engine thread.
pub(crate) type Mutator = Box<dyn FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send>;

/// Where the answer to a command goes: each command names its own answer's type.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// An operation on one map, with the channel its answer goes to.
pub(crate) enum Op {
    Info(Reply<MapInfo>),
    Get(String, Reply<Item>),
    Items(PageRequest, Reply<Page>),
    Listing(Reply<(Vec<Item>, u64)>),
    Conflicts(String, Reply<ItemConflicts>),
    Set(String, JsonObject, WriteOptions, Reply<Item>),
    Create(String, JsonObject, WriteOptions, Reply<Item>),
    Update(String, JsonObject, WriteOptions, Reply<Item>),
    Mutate(String, WriteOptions, Mutator, Reply<Option<Item>>),
    Remove(String, Option<Revision>, Reply<()>),
    SetTtl(Ttl, Reply<MapInfo>),
    SetItemTtl(String, Ttl, Reply<Item>),
    RemoveMap(Reply<()>),
    Permissions(Reply<Vec<syncmesh_core::Permission>>),
    SetPermission(syncmesh_core::Permission, Reply<syncmesh_core::Permission>),
    RemovePermission(String, Reply<()>),
    /// The id of the map's newest event, published or not.
    LastEventId(Reply<u64>),
}

impl Op {
    /// The durability the write asked for (`None`: the node's).
    fn durability(&self) -> Option<Durability> {
        match self {
            Op::Set(_, _, o, _)
            | Op::Create(_, _, o, _)
            | Op::Update(_, _, o, _)
            | Op::Mutate(_, o, _, _) => o.durability,
            _ => None,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(
            self,
            Op::Info(_)
                | Op::Get(..)
                | Op::Items(..)
                | Op::Listing(_)
                | Op::Conflicts(..)
                | Op::Permissions(_)
                | Op::LastEventId(_)
        )
    }

    /// Answers with `e` without running.
    fn fail(self, e: Error) -> Answer {
        match self {
            Op::Info(r) | Op::SetTtl(_, r) => answer(r, Err(e)),
            Op::Get(_, r)
            | Op::Set(_, _, _, r)
            | Op::Create(_, _, _, r)
            | Op::Update(_, _, _, r)
            | Op::SetItemTtl(_, _, r) => answer(r, Err(e)),
            Op::Items(_, r) => answer(r, Err(e)),
            Op::Listing(r) => answer(r, Err(e)),
            Op::Conflicts(_, r) => answer(r, Err(e)),
            Op::Mutate(_, _, _, r) => answer(r, Err(e)),
            Op::Remove(_, _, r) | Op::RemoveMap(r) | Op::RemovePermission(_, r) => {
                answer(r, Err(e))
            }
            Op::Permissions(r) => answer(r, Err(e)),
            Op::SetPermission(_, r) => answer(r, Err(e)),
            Op::LastEventId(r) => answer(r, Err(e)),
        }
    }
}

/// An operation's outcome, to be sent once the commit it waits for (if any) is done: the
/// commit's failure replaces a success.
pub(crate) struct Answer {
    send: Box<dyn FnOnce(Result<()>) + Send>,
    ok: bool,
}

impl Answer {
    fn send(self, commit: Result<()>) {
        (self.send)(commit)
    }
}

fn answer<T: Send + 'static>(reply: Reply<T>, r: Result<T>) -> Answer {
    Answer {
        ok: r.is_ok(),
        send: Box::new(move |commit: Result<()>| {
            let _ = reply.send(commit.and(r));
        }),
    }
}

pub(crate) enum Cmd {
    Open {
        spec: MapSpec,
        reply: oneshot::Sender<Result<MapInfo>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<MapInfo>>>,
    },
    Op {
        id: String,
        op: Op,
    },
    /// Replies once every earlier write is on disk.
    Sync {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Replaces every stored change log by a snapshot of its document, then replies.
    Compact {
        reply: oneshot::Sender<Result<()>>,
        /// Told what compacting the file did, once it is done.
        file: oneshot::Sender<Result<FileCompaction>>,
    },
    /// Commits what is queued, stops both threads, then replies.
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
    /// How many maps are loaded in memory.
    Loaded {
        reply: oneshot::Sender<Result<usize>>,
    },
    /// The estimated memory of live shard documents and how many there are.
    LiveDocuments {
        reply: oneshot::Sender<Result<(u64, usize)>>,
    },
    /// Invitations, joins, trust.
    Trust(TrustCmd),
}

/// Someone waiting for a commit: a write's acknowledgement, an open, or a read that saw
/// what the commit stores.
struct Ack {
    answer: Answer,
    /// A write (or an open that created a map) rather than a read held for the commit.
    write: bool,
    /// The map written and its epoch then: a map reloaded since (see `epochs`) lost the write.
    map: Option<(MapSid, u64)>,
    /// A write acknowledged before its commit ([`Durability::Relaxed`]).
    relaxed: bool,
}

impl Ack {
    /// A read answered by `answer` with the outcome of the commit it waits for.
    fn read(map: Option<(MapSid, u64)>, answer: impl FnOnce(Result<()>) + Send + 'static) -> Ack {
        Ack {
            answer: Answer {
                send: Box::new(answer),
                ok: true,
            },
            write: false,
            map,
            relaxed: false,
        }
    }

    /// An open of a map that this round created or fetched: answered with the commit.
    fn open(map: Option<(MapSid, u64)>, reply: Reply<MapInfo>, info: MapInfo) -> Ack {
        Ack {
            answer: answer(reply, Ok(info)),
            write: false,
            map,
            relaxed: false,
        }
    }

    fn send(self, r: Result<()>) {
        self.answer.send(r)
    }
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
    /// Digests of stored maps that are not loaded, as the store remembers them: anti-entropy
    /// announces those maps without loading them.
    pub(crate) stored_digests: HashMap<MapSid, u64>,
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
    changes_since_snapshot: HashMap<(MapSid, DocAddr), u32>,
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
        let on_disk = catalog_entries
            .into_iter()
            .map(|e| (e.sid, e.name))
            .collect();
        let stored_digests = store.map_digests()?.into_iter().collect();
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
            stored_digests,
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
                let mut wake = self.next_park;
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

    /// How long to sleep before the next TTL expiry among loaded maps.
    fn next_expiry_wait(&self) -> Duration {
        if self.write_stop().is_some() {
            // Expiry writes are refused now; waking for them would only spin.
            return Duration::from_secs(3600);
        }
        let now = now();
        let next = self
            .catalog
            .maps()
            .filter_map(MapReplica::next_expiry)
            .chain(self.unloaded_expiry.values().copied())
            .min();
        match next {
            Some(t) => Duration::from_millis(
                u64::try_from(t.millis().saturating_sub(now.millis())).unwrap_or(0),
            ),
            None => Duration::from_secs(3600),
        }
    }

    /// Parks shard documents no command touched since the previous round.
    fn park_idle(&mut self, now: Timestamp) {
        self.next_park = std::time::Instant::now() + PARK_PERIOD;
        if self.write_stop().is_some() {
            return; // parking commits what it flushes: nothing can be committed now
        }
        for m in self.catalog.maps_mut() {
            let mark = m.use_mark();
            if let Some(prev) = self.park_marks.insert(m.sid().clone(), mark) {
                if let Err(e) = m.park_unused_since(prev, now) {
                    tracing::warn!(map = %m.sid(), "parking idle shards failed: {e}");
                }
            }
        }
        // Parking flushes: anything it committed goes out with the next batch.
        let sids: Vec<MapSid> = self.catalog.maps().map(|m| m.sid().clone()).collect();
        self.dirty
            .extend(sids.into_iter().filter(|s| self.park_marks.contains_key(s)));
    }

    /// Sets the memory for live shard documents.
    pub(crate) fn document_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Parks the least recently used shard documents of the largest maps while the live ones
    /// take more than the budget, down to 3/4 of it (so this does not run every round).
    fn keep_to_budget(&mut self, now: Timestamp) {
        if self.write_stop().is_some() {
            return;
        }
        // Shards used since the previous check are in use: never parked for the budget.
        let marks = std::mem::take(&mut self.budget_marks);
        self.budget_marks = self
            .catalog
            .maps()
            .map(|m| (m.sid().clone(), m.use_mark()))
            .collect();
        let total: u64 = self.catalog.maps().map(MapReplica::live_bytes).sum();
        let target = self.budget - self.budget / 4;
        // Once over, parking goes on (a few shards per round) down to the target.
        self.over_budget = total > self.budget || (self.over_budget && total > target);
        if !self.over_budget {
            self.over_budget_warned = false;
            return;
        }
        let mut sizes: Vec<(u64, MapSid)> = self
            .catalog
            .maps()
            .map(|m| (m.live_bytes(), m.sid().clone()))
            .collect();
        let mut excess = total - target;
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let start = std::time::Instant::now();
        let mut out_of_time = false;
        for (bytes, sid) in sizes {
            if excess == 0 || out_of_time {
                break;
            }
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // Parking flushes first: whatever that commits goes out with the next batch (after
            // a commit nothing is queued, so this is rare).
            match m.flush(now) {
                Ok(0) => {}
                Ok(_) => {
                    self.dirty.insert(sid.clone());
                }
                Err(e) => {
                    tracing::warn!(map = %sid, "flushing before parking failed: {e}");
                    continue;
                }
            }
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // A map loaded since the previous check: all of it is in use.
            let Some(mark) = marks.get(&sid).copied() else {
                continue;
            };
            // A shard at a time, for a few milliseconds a round: parking saves each one, and
            // the commands queued behind this round wait for it.
            let mut left = excess.min(bytes);
            while left > 0 {
                if start.elapsed() >= PARK_ROUND_BUDGET {
                    out_of_time = true;
                    break;
                }
                match m.park_lru_at_most(left, mark, now, 1) {
                    Ok(0) => break,
                    Ok(freed) => {
                        left = left.saturating_sub(freed);
                        excess = excess.saturating_sub(freed);
                    }
                    Err(e) => {
                        tracing::warn!(map = %sid, "parking shards over the budget failed: {e}");
                        break;
                    }
                }
            }
        }
        if out_of_time {
            // The rest in the next rounds, at once rather than at the next check.
            self.next_budget_check = std::time::Instant::now();
            return;
        }
        if excess > 0 && !self.over_budget_warned {
            self.over_budget_warned = true;
            tracing::warn!(
                budget = self.budget,
                live = total,
                "the shard documents in use take more than the document budget; raise --document-budget"
            );
        }
    }

    /// Removes everything whose TTL has passed, with replicated deletes.
    fn expire_due(&mut self, now: Timestamp) {
        if self.write_stop().is_some() {
            return;
        }
        let due: Vec<MapSid> = self
            .unloaded_expiry
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for sid in due {
            if let Err(e) = self.ensure_loaded(&sid) {
                tracing::warn!(map = %sid, "loading a map for TTL expiry failed: {e}");
                self.unloaded_expiry.remove(&sid);
            }
        }
        for m in self.catalog.maps_mut() {
            if m.next_expiry().is_some_and(|t| t <= now) {
                m.expire(now);
                self.dirty.insert(m.sid().clone());
            }
        }
    }

    fn handle(
        &mut self,
        cmd: Cmd,
        now: Timestamp,
        acks: &mut Vec<Ack>,
        barriers: &mut Vec<oneshot::Sender<Result<()>>>,
    ) {
        match cmd {
            Cmd::Sync { reply } => barriers.push(reply),
            Cmd::Loaded { reply } => {
                let _ = reply.send(Ok(self.catalog.maps().count()));
            }
            Cmd::LiveDocuments { reply } => {
                let bytes = self.catalog.maps().map(MapReplica::live_bytes).sum();
                let docs = self.catalog.maps().map(MapReplica::live_shards).sum();
                let _ = reply.send(Ok((bytes, docs)));
            }
            Cmd::Shutdown { reply } => self.shutdown = Some(reply),
            Cmd::Trust(c) => self.on_trust_cmd(c, now),
            Cmd::Compact { reply, file } => {
                if let Some(e) = self.write_stop() {
                    let _ = reply.send(Err(e.clone()));
                    let _ = file.send(Err(e));
                    return;
                }
                for ((sid, doc), n) in self.changes_since_snapshot.iter_mut() {
                    if *n > 0 {
                        *n = 0;
                        self.compact_queue.push((sid.clone(), *doc));
                    }
                }
                self.compact_file.push(file);
                barriers.push(reply);
            }
            Cmd::List { reply } => {
                let r = self.list(now);
                if self.any_unsettled() {
                    acks.push(Ack::read(None, move |c| {
                        let _ = reply.send(c.and(r));
                    }));
                } else {
                    let _ = reply.send(r);
                }
            }
            Cmd::Open { spec, reply } => {
                let r = self.open(&spec, now);
                if let Err(Error::Map(syncmesh_core::Error::MapNotFound(_))) = &r {
                    if let Some(sid) = self.should_fetch(&spec) {
                        self.fetch(sid, spec, reply);
                        return;
                    }
                }
                match r {
                    Ok((info, true)) => {
                        let map = Some((info.sid.clone(), self.epoch(&info.sid)));
                        acks.push(Ack::open(map, reply, info))
                    }
                    Ok((info, false)) if self.unsettled(&info.sid) => {
                        let map = Some((info.sid.clone(), self.epoch(&info.sid)));
                        acks.push(Ack::read(map, move |c| {
                            let _ = reply.send(c.map(|()| info));
                        }));
                    }
                    Ok((info, false)) => {
                        let _ = reply.send(Ok(info));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Cmd::Op { id, op } => {
                let write = op.is_write();
                let relaxed =
                    op.durability().unwrap_or(self.default_durability()) == Durability::Relaxed;
                if write {
                    if let Some(e) = self.write_stop() {
                        op.fail(e).send(Ok(()));
                        return;
                    }
                }
                let done = self.op(&id, op, now);
                let sid = MapRef::parse(&id).ok().map(|r| r.sid());
                if write && done.ok {
                    let map = sid.map(|sid| {
                        let e = self.epoch(&sid);
                        (sid, e)
                    });
                    acks.push(Ack {
                        answer: done,
                        write: true,
                        map,
                        relaxed,
                    });
                    return;
                }
                match sid {
                    Some(sid) if self.unsettled(&sid) => {
                        let map = Some((sid.clone(), self.epoch(&sid)));
                        acks.push(Ack::read(map, move |c| done.send(c)));
                    }
                    _ => done.send(Ok(())),
                }
            }
        }
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

    /// Takes snapshots of documents `Node::compact` queued, for a few milliseconds at most
    /// and while the store writer is not far behind with earlier ones; the rest waits for the
    /// next rounds. Runs after the round's maps are flushed, so a snapshot holds every change
    /// of a commit queued before it.
    fn snapshot_queued(&mut self, now: Timestamp) {
        let start = std::time::Instant::now();
        let mut taken = 0;
        while let Some((sid, doc)) = self.compact_queue.last().cloned() {
            let queued = self.shared.snapshot_bytes.load(Ordering::Acquire) + taken;
            if start.elapsed() >= COMPACT_ROUND_BUDGET || queued >= MAX_QUEUED_SNAPSHOT_BYTES {
                return;
            }
            self.compact_queue.pop();
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            match m.snapshot(doc, now) {
                Ok(Some(snapshot)) => {
                    taken += snapshot.len();
                    self.pending_compactions
                        .push(StoreJob::Compact { sid, doc, snapshot });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(map = %sid, "snapshot for compaction failed: {e}"),
            }
        }
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
        if let Ok(d) = self.store.map_digests() {
            self.stored_digests = d.into_iter().collect();
        }
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
        self.unloaded_expiry.remove(sid);
        // Loaded, its digest is computed live (and the stored one dropped with its next change).
        self.stored_digests.remove(sid);
        let Some(stored) = self.store.load_map(sid)? else {
            return Ok(());
        };
        let addrs: Vec<DocAddr> = stored.docs.iter().map(|(a, _)| *a).collect();
        // Stored change logs count toward compaction, also across restarts.
        for (addr, doc) in &stored.docs {
            let n = u32::try_from(doc.changes.len()).unwrap_or(u32::MAX);
            if n > 0 {
                self.changes_since_snapshot.insert((sid.clone(), *addr), n);
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

    fn open(&mut self, spec: &MapSpec, now: Timestamp) -> Result<(MapInfo, bool)> {
        if let Some(id) = &spec.id {
            let sid = MapRef::parse(id)?.sid();
            self.ensure_loaded(&sid)?;
        }
        // Permissions given for a new map are checked first: they must all apply before any
        // peer hears of it.
        let me = if spec.permissions.is_empty() {
            String::new()
        } else {
            if spec.permissions.len() >= syncmesh_core::policy::MAX_ENTRIES {
                return Err(syncmesh_core::Error::InvalidPermission(format!(
                    "a map has at most {} permission entries",
                    syncmesh_core::policy::MAX_ENTRIES
                ))
                .into());
            }
            if let Some(bad) = spec
                .permissions
                .iter()
                .find(|p| !syncmesh_core::policy::valid_identity(&p.identity))
            {
                return Err(syncmesh_core::Error::InvalidPermission(format!(
                    "identity {:?} is not a peer id",
                    bad.identity
                ))
                .into());
            }
            self.net
                .as_ref()
                .map(|n| n.handle.status().peer_id.to_string())
                .ok_or(Error::NoNetwork)?
        };
        let stopped = self.write_stop();
        let (m, created) = self.catalog.open(spec, random16(), now)?;
        if created {
            for p in &spec.permissions {
                m.set_permission(p, &me, now)?;
            }
        }
        let info = m.info(now)?;
        if created {
            if let Some(e) = stopped {
                // Not stored, not acknowledged: not kept either (no reader may see it).
                self.catalog.remove(&info.sid);
                return Err(e);
            }
            self.dirty.insert(info.sid.clone());
            self.announce(&info.sid);
        }
        Ok((info, created))
    }

    fn list(&mut self, now: Timestamp) -> Result<Vec<MapInfo>> {
        let sids: Vec<MapSid> = self.on_disk.keys().cloned().collect();
        for sid in sids {
            self.ensure_loaded(&sid)?;
        }
        Ok(self.catalog.list(now))
    }

    /// Runs one operation; its answer, to be sent now or once the commit it waits for ends.
    fn op(&mut self, id: &str, op: Op, now: Timestamp) -> Answer {
        let sid = match MapRef::parse(id) {
            Ok(r) => r.sid(),
            Err(e) => return op.fail(e.into()),
        };
        if let Err(e) = self.ensure_loaded(&sid) {
            return op.fail(e);
        }
        // Permission entries name peers: changing them needs this node's own peer id.
        let me = match &op {
            Op::SetPermission(..) | Op::RemovePermission(..) => match self.net.as_ref() {
                Some(n) => n.handle.status().peer_id.to_string(),
                None => return op.fail(Error::NoNetwork),
            },
            _ => String::new(),
        };
        let stopped = self.write_stop().is_some();
        let write = op.is_write();
        let m = match self.catalog.get_mut(id, now) {
            Ok(m) => m,
            Err(e) => return op.fail(e.into()),
        };
        // What is due to expire is removed (with its events) before anything is read, so a
        // read and the events after it agree (a map just loaded has not been through
        // `expire_due` yet).
        if !stopped && m.next_expiry().is_some_and(|t| t <= now) {
            m.expire(now);
            self.dirty.insert(sid.clone());
        }
        let m = match self.catalog.get_mut(id, now) {
            Ok(m) => m,
            Err(e) => return op.fail(e.into()),
        };
        fn a<T: Send + 'static>(r: Reply<T>, v: syncmesh_core::Result<T>) -> Answer {
            answer(r, v.map_err(Error::from))
        }
        let done = match op {
            Op::Info(r) => a(r, m.info(now)),
            Op::Get(k, r) => a(r, m.get(&k, now)),
            Op::Items(req, r) => a(r, m.items(&req, now)),
            Op::Listing(r) => a(r, m.listing(now)),
            Op::LastEventId(r) => a(r, Ok(m.last_event_id())),
            Op::Conflicts(k, r) => a(r, m.conflicts(&k, now)),
            Op::Set(k, d, o, r) => a(r, m.set(&k, d, &o, now)),
            Op::Create(k, d, o, r) => a(r, m.create_item(&k, d, o.ttl, now)),
            Op::Update(k, d, o, r) => a(r, m.update(&k, d, &o, now)),
            Op::Mutate(k, o, f, r) => {
                // A panicking closure is the caller's bug: it must not take the node down.
                let guarded = |cur: Option<&JsonObject>| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(cur)))
                        .map_err(|_| ())
                };
                let mut panicked = false;
                let out = m.mutate(&k, &o, now, |cur| match guarded(cur) {
                    Ok(v) => v,
                    Err(()) => {
                        panicked = true;
                        None
                    }
                });
                if panicked {
                    a(
                        r,
                        Err(syncmesh_core::Error::InvalidData(
                            "the mutate function panicked; nothing was written".into(),
                        )),
                    )
                } else {
                    a(r, out)
                }
            }
            Op::Remove(k, rev, r) => a(r, m.remove(&k, rev.as_ref(), now)),
            Op::SetTtl(t, r) => a(r, m.set_ttl(t, now)),
            Op::SetItemTtl(k, t, r) => a(r, m.set_item_ttl(&k, t, now)),
            Op::RemoveMap(r) => a(r, m.remove_map(now)),
            Op::Permissions(r) => a(r, m.info(now).map(|_| m.policy().permissions())),
            Op::SetPermission(p, r) => a(r, m.set_permission(&p, &me, now)),
            Op::RemovePermission(who, r) => a(r, m.remove_permission(&who, &me, now)),
        };
        if write {
            self.dirty.insert(sid);
        }
        done
    }

    /// How writes that do not choose are acknowledged: as the store was opened.
    fn default_durability(&self) -> Durability {
        if self.store.is_durable() {
            Durability::Fsync
        } else {
            Durability::Relaxed
        }
    }

    /// Turns everything the handled commands changed into one batch for the store writer.
    fn commit(
        &mut self,
        now: Timestamp,
        mut acks: Vec<Ack>,
        barriers: Vec<oneshot::Sender<Result<()>>>,
    ) {
        // Opens of maps fetched from peers are answered with this batch.
        if let Some(n) = self.net.as_mut() {
            let fetched = std::mem::take(&mut n.fetched);
            for (sid, info, reply) in fetched {
                let map = Some((sid.clone(), self.epoch(&sid)));
                acks.push(Ack::open(map, reply, info));
            }
        }
        let mut batch = Batch::default();
        let mut events = Vec::new();
        let mut compactions = Vec::new();
        let mut flush_failed = None;
        let mut received = false;
        let mut to_gossip = Vec::new();
        let mut to_ask: Vec<MapSid> = std::mem::take(&mut self.signatures_wanted)
            .into_iter()
            .collect();
        let dirty = std::mem::take(&mut self.dirty);
        for sid in dirty {
            let Some(m) = self.catalog.by_sid(&sid) else {
                continue;
            };
            // View entries first: this flushes queued writes, whose changes are taken next.
            let view = match m.take_view_changes(now) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(map = %sid, "flush failed, stopping writes: {e}");
                    flush_failed = Some(e);
                    Default::default()
                }
            };
            let mut changes: Vec<(DocAddr, Vec<u8>)> = m
                .take_outgoing()
                .into_iter()
                .map(|c| (c.doc, c.bytes))
                .collect();
            let local = changes.len();
            changes.extend(m.take_received());
            received |= changes.len() > local;
            let sigs = m.take_signatures();
            let unsigned = m.take_unsigned_marks();
            if !unsigned.is_empty() {
                to_ask.push(sid.clone());
            }
            // Changes this node signed after the fact go out again (they are stored already).
            let resend = m.take_resend();
            if !m.exists()
                && changes.is_empty()
                && view.entries.is_empty()
                && !self.on_disk.contains_key(&sid)
            {
                // A map waited for that has not arrived: nothing to store yet.
                continue;
            }
            if (local > 0 || !resend.is_empty()) && self.net.is_some() {
                let sigs: std::collections::HashMap<_, _> = sigs.iter().cloned().collect();
                let mut out = changes[..local].to_vec();
                out.extend(resend);
                to_gossip.push((sid.clone(), out, sigs));
            }
            for (doc, _) in &changes {
                let n = self
                    .changes_since_snapshot
                    .entry((sid.clone(), *doc))
                    .or_insert(0);
                *n += 1;
                if *n >= COMPACT_AFTER_CHANGES {
                    *n = 0;
                    compactions.push(*doc);
                }
            }
            let evs = m.take_events();
            let mut encoded = Vec::with_capacity(evs.len());
            for e in evs {
                let bytes = match FeedEvent::from_event(&e) {
                    Some(f) => {
                        let n = f.bytes();
                        encoded.push(f);
                        n
                    }
                    None => {
                        tracing::error!("event {} cannot be stored", e.id);
                        0
                    }
                };
                events.push(Arc::new(Published { event: e, bytes }));
            }
            // The catalog record goes with every batch of the map: it carries the next expiry.
            self.on_disk
                .insert(sid.clone(), m.unique_name().map(str::to_string));
            let name = Some(m.unique_name().unwrap_or("").to_string());
            let next_expiry = m.next_expiry().map(Timestamp::millis);
            let mut snapshots = Vec::new();
            for doc in compactions.drain(..) {
                match m.snapshot(doc, now) {
                    Ok(Some(s)) => snapshots.push((doc, s)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(map = %sid, "snapshot for compaction failed: {e}"),
                }
            }
            // Permissions are remembered for replication while the map is not loaded.
            let policy = m.policy().clone();
            let known = self.policies.get(&sid);
            if known != Some(&policy) && !(known.is_none() && policy.is_open()) {
                if policy.is_open() {
                    self.policies.remove(&sid);
                    batch.policies.push((sid.clone(), None));
                } else {
                    batch.policies.push((sid.clone(), Some(policy.encode())));
                    self.policies.insert(sid.clone(), policy);
                }
            }
            batch.maps.push(MapWrite {
                sid: Some(sid.clone()),
                name,
                next_expiry,
                changes,
                view,
                events: encoded,
                sigs: sigs
                    .into_iter()
                    .map(|(h, s)| (h.0, s.encode()))
                    .chain(
                        unsigned
                            .into_iter()
                            .map(|(h, i)| (h.0, i.map(unsigned_mark).unwrap_or_default())),
                    )
                    .collect(),
            });
            // Compactions follow the commit of every change they include.
            for (doc, snapshot) in snapshots {
                let job = StoreJob::Compact {
                    sid: sid.clone(),
                    doc,
                    snapshot,
                };
                self.pending_compactions.push(job);
            }
        }
        self.snapshot_queued(now);
        for sid in std::mem::take(&mut self.digests_wanted) {
            if !self.on_disk.contains_key(&sid) {
                continue;
            }
            if let Some(Ok(d)) = self.catalog.by_sid(&sid).map(MapReplica::digest) {
                batch.digests.push((sid, d));
            }
        }
        if let Some(e) = flush_failed {
            // Writes of this batch cannot all be stored: acknowledge none, stop writing.
            let err = Arc::new(StoreError::Engine {
                path: self.store.path().to_path_buf(),
                detail: format!("a document could not be committed: {e}"),
            });
            *self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.clone());
            for a in acks {
                a.send(Err(Error::Store(err.clone())));
            }
            for b in barriers {
                let _ = b.send(Err(Error::Store(err.clone())));
            }
            // Snapshots taken for this batch include changes that were just dropped.
            self.pending_compactions.clear();
            return;
        }
        // Writes to a map dropped for reloading since they were made are not stored.
        let (acks, stale): (Vec<Ack>, Vec<Ack>) = acks
            .into_iter()
            .partition(|a| a.map.as_ref().is_none_or(|(sid, e)| self.epoch(sid) == *e));
        for a in stale {
            let map = a
                .map
                .as_ref()
                .map(|(s, _)| s.to_string())
                .unwrap_or_default();
            a.send(Err(Error::Reloaded { map }));
        }
        // Peers get the changes while they are being fsynced here: each process writes as a
        // fresh Automerge actor, so a change lost to a crash is never re-made differently,
        // and peers hand it back on the next sync.
        for (sid, changes, sigs) in to_gossip {
            self.gossip(&sid, &changes, &sigs);
        }
        for sid in to_ask {
            self.ask_signatures(&sid);
        }
        // Acknowledged now: writes that chose (or whose node defaults to) relaxed durability.
        // Everything else waits for the commit: durable writes, opens of fetched maps (their
        // events are published with it) and reads held for it.
        let (relaxed, acks): (Vec<Ack>, Vec<Ack>) = acks.into_iter().partition(|a| a.relaxed);
        let durable_writes = acks.iter().any(|a| a.write);
        // Fsync if asked to (sync, compact, close), for a durable write, or when relaxed
        // writes have waited long enough. A node whose default is fsync skips it only for
        // batches of relaxed writes and peers' changes: a peer's change is durable at its
        // author and comes back by sync after a crash, so its events need not wait for this
        // node's fsync (they come back with new ids: see the event floors below).
        let may_skip = (!relaxed.is_empty() || received)
            && !durable_writes
            && batch.trust.is_empty()
            && batch.invites.is_empty();
        let mut durable = !barriers.is_empty()
            || self.shutdown.is_some()
            || durable_writes
            || (self.store.is_durable() && !may_skip)
            || self.last_durable.elapsed() >= RELAXED_WINDOW;
        if !durable {
            let mut raised = Vec::new();
            // Events published before their fsync may be lost to a crash, and their ids
            // issued again to other events. Ids are reserved durably ahead, a block at a time
            // (the commit that reserves is fsynced, so it is durable before any event past the
            // old floor is published); after a crash a map goes on past its floor.
            for w in &batch.maps {
                let (Some(sid), Some(last)) = (&w.sid, w.events.last().map(|e| e.id)) else {
                    continue;
                };
                let floor = self.event_floors.entry(sid.clone()).or_insert(0);
                if last > *floor {
                    *floor = last + EVENT_ID_BLOCK;
                    raised.push(syncmesh_store::event_floor_record(sid, *floor));
                }
            }
            durable = !raised.is_empty();
            batch.meta.extend(raised);
        }
        if self.shutdown.is_some() {
            // A clean close: the stored events are all there, and the next ids follow them.
            for (sid, _) in std::mem::take(&mut self.event_floors) {
                if let Some(m) = self.catalog.by_sid(&sid) {
                    let last = m.last_event_id();
                    batch
                        .meta
                        .push(syncmesh_store::event_floor_record(&sid, last));
                }
            }
        }
        let idle = batch.is_empty()
            && acks.is_empty()
            && relaxed.is_empty()
            && barriers.is_empty()
            && events.is_empty();
        if idle && !(self.needs_fsync && durable) {
            self.send_compactions();
            return;
        }
        if durable {
            self.last_durable = std::time::Instant::now();
            self.needs_fsync = false;
        } else {
            self.needs_fsync = true;
        }
        self.commit_seq += 1;
        let seq = self.commit_seq;
        let committed = self.shared.committed.load(Ordering::Acquire);
        self.last_commit.retain(|_, s| *s > committed);
        for w in &batch.maps {
            if let Some(sid) = &w.sid {
                self.last_commit.insert(sid.clone(), seq);
            }
        }
        for a in relaxed {
            a.send(Ok(()));
        }
        // The batch, and its events again as they are published (decoded and encoded).
        let bytes = batch.bytes() + events.iter().map(|e| e.bytes).sum::<usize>();
        if self.shared.queued_bytes.load(Ordering::Acquire) > MAX_QUEUED_BYTES {
            // The store writer is far behind: wait for it rather than queue more memory.
            let (tx, rx) = std::sync::mpsc::channel();
            if self.jobs.send(StoreJob::Fence(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
        self.shared.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let job = StoreJob::Commit {
            batch,
            acks,
            barriers,
            events,
            durable,
            seq,
            bytes,
        };
        if self.jobs.send(job).is_err() {
            tracing::error!("the store writer has stopped");
        }
        self.send_compactions();
    }

    /// Hands snapshots (and forgotten documents) to the store writer, which stores them after
    /// every commit queued so far; then, once no snapshot asked for is left to take, the
    /// file rewrite `Node::compact` waits for.
    fn send_compactions(&mut self) {
        for job in self.pending_compactions.drain(..) {
            if let StoreJob::Compact { snapshot, .. } = &job {
                self.shared
                    .snapshot_bytes
                    .fetch_add(snapshot.len(), Ordering::AcqRel);
            }
            let _ = self.jobs.send(job);
        }
        // The file is rewritten once every snapshot asked for before is taken.
        if self.compact_queue.is_empty() {
            let waiting = std::mem::take(&mut self.compact_file);
            if !waiting.is_empty() {
                let _ = self.jobs.send(StoreJob::CompactFile(waiting));
            }
        }
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

/// What the `sigs` table holds for a change this node has unsigned and asks peers to sign
/// ([`MapReplica::unsigned`]): a marker and the change's shard, never a valid
/// [`Signature`] encoding (those are longer), overwritten once the signature comes.
fn unsigned_mark(shard: u16) -> Vec<u8> {
    let [a, b] = shard.to_be_bytes();
    vec![UNSIGNED_MARK, a, b]
}

/// The shard of an [`unsigned_mark`].
fn read_unsigned_mark(b: &[u8]) -> Option<u16> {
    match b {
        [UNSIGNED_MARK, a, b] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

const UNSIGNED_MARK: u8 = 0xff;

#[cfg(test)]
mod mark_tests {
    use super::*;

    #[test]
    fn an_unsigned_mark_is_never_a_signature() {
        for shard in [0u16, 7, 255, u16::MAX] {
            let m = unsigned_mark(shard);
            assert_eq!(read_unsigned_mark(&m), Some(shard));
            assert!(Signature::decode(&m).is_none());
        }
        let signer = syncmesh_core::Signer::new(syncmesh_net::Keypair::generate_ed25519());
        let sig = signer.sign(&syncmesh_core::ChangeHash([3; 32])).unwrap();
        assert_eq!(read_unsigned_mark(&sig.encode()), None);
    }
}
