//! Durable storage for syncmesh on [redb]: one file, `syncmesh.redb`, in the data directory.
//!
//! What is kept, per map:
//!
//! - every Automerge change made or received, appended per document, until a snapshot of that
//!   document replaces them ([`Store::compact_doc`]);
//! - the map's read-view entries ([`syncmesh_core::ViewChanges`]), so reopening a map is one
//!   pass over its entries, not a replay of its documents;
//! - the event feed, by event id, so a subscriber can resume from any retained id; its events
//!   name the item versions they wrote and replaced rather than copying them (`feed`).
//!
//! Every [`Store::commit`] is one redb write transaction: all of a batch or none of it is on
//! disk, and with [`StoreOptions::durable`] (the default) it is fsynced before `commit` returns.
//! Callers group many writes into one batch (group commit) so that fsyncs are shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use syncmesh_core::{DocAddr, Event, MapSid, StoredDoc, ViewChanges};

mod feed;
mod migrations;
mod tables;

pub use feed::{FeedEvent, FeedKind};
use feed::{Op, Sink, Tables};
use tables::{
    change_key, changes_of, changes_of_doc, doc_key, doc_of, docs_of, sigs_of, DocKey, CHANGES,
    DIGESTS, FEED, FEED_BYTES, INVITES, MAPS, MAP_NUMBERS, META, POLICIES, SIGS, SNAPSHOTS, TRUST,
    VERSIONS, VIEW,
};

/// Version of the on-disk layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 8;
/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "syncmesh.redb";

/// Everything that can go wrong with the store, each saying which file and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another running node (or another handle in this process) has the store open.
    #[error("{path} is in use by another running syncmesh node; stop that node or use another data directory")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The store was written by a newer (or unknown) version of syncmesh.
    #[error("{path} has storage schema version {found}, this syncmesh reads version {supported}; use a syncmesh release that supports version {found}")]
    UnknownSchema {
        /// The database file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build reads and writes.
        supported: u32,
    },
    /// The file is damaged or is not a syncmesh store.
    #[error("{path} is damaged or not a syncmesh store ({detail}); restore it from a backup, or move it aside to start with an empty store")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// The directory or file cannot be written.
    #[error("{path} cannot be written ({detail}); check its permissions and that its file system is not mounted read-only")]
    ReadOnly {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's words.
        detail: String,
    },
    /// The disk is full.
    #[error("no space left for {path}; free space on its disk, then reopen the node (nothing acknowledged was lost; the failed write was not acknowledged)")]
    DiskFull {
        /// The database file.
        path: PathBuf,
    },
    /// Any other I/O failure.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A failure inside the database engine.
    #[error("storage engine error on {path}: {detail}")]
    Engine {
        /// The database file.
        path: PathBuf,
        /// What the engine said.
        detail: String,
    },
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Fsync every commit before it returns (default). When false, commits are acknowledged
    /// before they reach the disk: a crash can lose the most recent ones (never corrupt).
    pub durable: bool,
    /// Events kept per map for resuming subscribers; older ones are pruned.
    pub event_retention: u64,
    /// Most bytes a map's retained events take (their records and the item versions only they
    /// still name); past it the oldest are pruned, down to three quarters of it.
    pub event_retention_bytes: u64,
    /// Most memory the database keeps as its page cache (the OS caches the file as well).
    pub cache_bytes: usize,
}

/// Default byte bound of a map's retained events: at 100 writes a second of ~100-byte items,
/// about 8 minutes of them (the count bound, 100,000 events, holds for slower maps).
pub const DEFAULT_EVENT_RETENTION_BYTES: u64 = 8 << 20;

/// Default page cache: redb's own default (a ceiling; the cache grows only with what is read).
/// Measured: 16 MiB instead changes neither throughput nor peak RSS of the replication bench.
pub const DEFAULT_CACHE_BYTES: usize = 1024 * 1024 * 1024;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durable: true,
            event_retention: 100_000,
            event_retention_bytes: DEFAULT_EVENT_RETENTION_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// A map as stored, ready for [`syncmesh_core::MapReplica::restore`].
#[derive(Debug, Default)]
pub struct LoadedMap {
    /// Every stored document of the map.
    pub docs: Vec<(DocAddr, StoredDoc)>,
    /// View entries by item key.
    pub entries: Vec<(String, Vec<u8>)>,
    /// Id of the last stored event (0 if none).
    pub last_event_id: u64,
    /// Stored signatures of its changes: change hash and encoded signature.
    pub sigs: Vec<([u8; 32], Vec<u8>)>,
}

/// Writes for one map inside a [`Batch`].
#[derive(Debug, Default, Clone)]
pub struct MapWrite {
    /// The map.
    pub sid: Option<MapSid>,
    /// Its unique name (`Some("")` for none): when given, the catalog record is (re)written
    /// with it and `next_expiry`.
    pub name: Option<String>,
    /// When the map's next TTL expiry is due (ms since the epoch), so expiry can run for maps
    /// that are not loaded.
    pub next_expiry: Option<i64>,
    /// Automerge changes made or received, in order.
    pub changes: Vec<(DocAddr, Vec<u8>)>,
    /// How its view changed.
    pub view: ViewChanges,
    /// New events, in order.
    pub events: Vec<FeedEvent>,
    /// Signatures of its changes to keep: change hash and encoded signature (empty: forget
    /// what is kept for that hash).
    pub sigs: Vec<([u8; 32], Vec<u8>)>,
}

impl MapWrite {
    /// Takes a later write of the same map in, as if it were committed after this one.
    fn absorb(&mut self, later: MapWrite) {
        if later.name.is_some() {
            self.name = later.name;
            self.next_expiry = later.next_expiry;
        }
        self.changes.extend(later.changes);
        if later.view.reset {
            self.view = later.view;
        } else {
            self.view.entries.extend(later.view.entries);
        }
        self.events.extend(later.events);
        self.sigs.extend(later.sigs);
    }
}

/// The [`Batch::meta`] record that sets a map's event id floor: after a crash, the map's next
/// event id is above it even if the commits of the events up to it were lost. A node that
/// publishes events before they are durable reserves ids this way, durably, ahead of them.
pub fn event_floor_record(sid: &MapSid, floor: u64) -> (String, Vec<u8>) {
    (Store::event_floor_key(sid), floor.to_le_bytes().to_vec())
}

/// One atomic commit.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Per-map writes.
    pub maps: Vec<MapWrite>,
    /// Node-level metadata to set.
    pub meta: Vec<(String, Vec<u8>)>,
    /// Map digests to remember ([`Store::map_digests`]), each describing the map with every
    /// change of this batch applied (they are written after the maps' changes).
    pub digests: Vec<(MapSid, u64)>,
    /// Trust records to write (`Some`) or delete (`None`), by peer id.
    pub trust: Vec<(String, Option<Vec<u8>>)>,
    /// Invitation records to write (`Some`) or delete (`None`), by invitation id.
    pub invites: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Map permissions to remember (`Some`) or forget (`None`: the map is open).
    pub policies: Vec<(MapSid, Option<Vec<u8>>)>,
}

impl Batch {
    /// Appends a later batch, so that committing the result writes what committing both in
    /// order would. (A digest describes its map after the changes of its own batch: one of
    /// this batch for a map the later batch changes is dropped.)
    pub fn append(&mut self, later: Batch) {
        let changed: std::collections::HashSet<&MapSid> = later
            .maps
            .iter()
            .filter(|m| !m.changes.is_empty())
            .filter_map(|m| m.sid.as_ref())
            .collect();
        self.digests.retain(|(sid, _)| !changed.contains(sid));
        // Writes to a map already in the batch join its entry: its catalog record and digest
        // are then written once per commit, not once per merged write.
        for m in later.maps {
            // A write that empties the view stays apart: its reset applies before its own
            // events, not before those of the writes it would join (a removal event in it
            // marks its place, but a reset may come without one).
            let same = m
                .sid
                .as_ref()
                .filter(|_| !m.view.reset)
                .and_then(|sid| self.maps.iter().rposition(|e| e.sid.as_ref() == Some(sid)));
            match same {
                Some(i) => self.maps[i].absorb(m),
                None => self.maps.push(m),
            }
        }
        self.meta.extend(later.meta);
        self.digests.extend(later.digests);
        self.trust.extend(later.trust);
        self.invites.extend(later.invites);
        self.policies.extend(later.policies);
    }

    /// A copy without its views and events, which a file rewrite replays from the writes it
    /// recorded instead.
    fn without_feed(&self) -> Batch {
        let maps = self
            .maps
            .iter()
            .map(|m| MapWrite {
                sid: m.sid.clone(),
                name: m.name.clone(),
                next_expiry: m.next_expiry,
                changes: m.changes.clone(),
                view: ViewChanges::default(),
                events: Vec::new(),
                sigs: m.sigs.clone(),
            })
            .collect();
        Batch {
            maps,
            meta: self.meta.clone(),
            digests: self.digests.clone(),
            trust: self.trust.clone(),
            invites: self.invites.clone(),
            policies: self.policies.clone(),
        }
    }

    /// Bytes the batch carries (changes, view entries, events), roughly.
    pub fn bytes(&self) -> usize {
        self.maps
            .iter()
            .map(|m| {
                m.changes.iter().map(|(_, b)| b.len()).sum::<usize>()
                    + m.view
                        .entries
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
                    + m.events.iter().map(FeedEvent::bytes).sum::<usize>()
            })
            .sum()
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
            && self.digests.is_empty()
            && self.trust.is_empty()
            && self.invites.is_empty()
            && self.policies.is_empty()
            && self.maps.iter().all(|m| {
                m.changes.is_empty()
                    && m.sigs.is_empty()
                    && m.view.entries.is_empty()
                    && !m.view.reset
                    && m.events.is_empty()
                    && m.name.is_none()
            })
    }
}

/// A document's stored change log replaced by a snapshot, or the document forgotten
/// ([`Store::replace_docs`]).
#[derive(Debug, Clone)]
pub struct DocReplacement {
    /// The map.
    pub sid: MapSid,
    /// The document.
    pub doc: DocAddr,
    /// Its snapshot; `None` forgets the document (e.g. a shard of a removed incarnation).
    pub snapshot: Option<Vec<u8>>,
    /// The last stored change the snapshot covers ([`Store::last_change_seq`] when it was
    /// taken): changes up to it are deleted, later ones stay, so a replacement may be stored
    /// after commits of changes it does not include.
    pub through: u64,
}

/// A write recorded while the file is rewritten, replayed into the new file. Replaying is
/// idempotent (a commit's change records keep the sequence numbers they were stored under), so
/// it may be replayed over a copy that already holds some of it.
enum Rewritten {
    /// A batch, the sequence numbers its changes took, and its writes to the feed's tables.
    Commit(Batch, Vec<u64>, Vec<Op>),
    /// Replacements, and the writes that gave their maps a number.
    Replace(Vec<DocReplacement>, Vec<Op>),
}

/// Where a committed batch's change records take their sequence numbers from, and how its
/// view and events are written.
enum Seqs<'a> {
    /// The next of each document (cached per document key), recording each one taken; the
    /// feed's writes are derived from the stored state, and recorded when a vector is given.
    Next(
        &'a mut HashMap<DocKey, u64>,
        &'a mut Vec<u64>,
        Option<&'a mut Vec<Op>>,
    ),
    /// Those recorded when the batch was first committed, in order, and its feed writes.
    Recorded(&'a [u64], &'a [Op]),
}

/// Writes committed since a file rewrite took its snapshot.
#[derive(Default)]
struct RewriteLog {
    ops: Vec<(Rewritten, usize)>,
    bytes: usize,
    /// More than [`MAX_REWRITE_LOG_BYTES`] were written: the rewrite gives up.
    overflow: bool,
}

impl RewriteLog {
    fn record(&mut self, op: Rewritten, bytes: usize) {
        if self.overflow {
            return;
        }
        if self.bytes + bytes > MAX_REWRITE_LOG_BYTES {
            self.overflow = true;
            self.ops = Vec::new();
            self.bytes = 0;
            return;
        }
        self.bytes += bytes;
        self.ops.push((op, bytes));
    }
}

/// Most bytes of writes kept for replay while the file is rewritten; a rewrite outpaced by
/// more gives up (the file stays as it was) rather than hold more memory.
const MAX_REWRITE_LOG_BYTES: usize = 128 * 1024 * 1024;
/// Bytes copied per transaction of a file rewrite.
const REWRITE_CHUNK_BYTES: usize = 1 << 20;
/// Replayed writes small enough to be caught up with writes held back.
const REWRITE_FINAL_BYTES: usize = 256 * 1024;

/// What [`Store::compact_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCompaction {
    /// Free space was given back to the file system.
    Done,
    /// There was nothing to give back.
    Nothing,
    /// The file was left as it was (writes outpaced the rewrite, the disk lacks room for a
    /// copy, or the store is closing): try again later.
    Busy,
}

/// The store. Cheap to share behind an `Arc`; commits are serialised by redb.
pub struct Store {
    /// Behind a lock only so that [`Store::compact_file`] can swap in the rewritten file.
    /// Every use holds its own reference until its transaction ends: redb ends every
    /// transaction of a database that is dropped, and the file replaced by a rewrite is
    /// dropped once its last reader is done.
    db: std::sync::RwLock<std::sync::Arc<Database>>,
    path: PathBuf,
    opts: StoreOptions,
    /// Next change sequence number per document key.
    seqs: Mutex<HashMap<DocKey, u64>>,
    /// Held across every write transaction; while the file is rewritten, it records what each
    /// one wrote, for replay into the new file.
    writes: Mutex<Option<RewriteLog>>,
    /// One file rewrite at a time.
    rewriting: Mutex<()>,
    /// Makes a running rewrite give up (the store is closing).
    abort_rewrite: std::sync::atomic::AtomicBool,
    /// A rewrite renamed its file into place but could not fsync the directory: the next
    /// durable commit must, or fail (acknowledging it would rest on a rename a crash may undo).
    dir_unsynced: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn classify_io(path: &Path, e: std::io::Error) -> StoreError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => StoreError::ReadOnly {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        K::StorageFull => StoreError::DiskFull {
            path: path.to_path_buf(),
        },
        K::UnexpectedEof | K::InvalidData => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

fn classify(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_path_buf(),
        },
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail,
        },
        redb::Error::UpgradeRequired(v) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("redb file format {v} needs an upgrade"),
        },
        redb::Error::Io(io) => classify_io(path, io),
        other => StoreError::Engine {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// A map in the catalog: what is known of it without loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The map's sid.
    pub sid: MapSid,
    /// Its unique name, if it has one.
    pub name: Option<String>,
    /// When its next TTL expiry is due (ms since the epoch).
    pub next_expiry: Option<i64>,
}

/// Catalog record: a flag byte, the expiry (i64 LE), then the name.
fn encode_catalog(name: &str, next_expiry: Option<i64>) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + name.len());
    b.push(u8::from(next_expiry.is_some()));
    b.extend_from_slice(&next_expiry.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

fn decode_catalog(b: &[u8]) -> Option<(Option<String>, Option<i64>)> {
    let flag = *b.first()?;
    let exp = i64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
    let name = std::str::from_utf8(b.get(9..)?).ok()?;
    let next_expiry = match flag {
        0 => None,
        1 => Some(exp),
        _ => return None,
    };
    Some(((!name.is_empty()).then(|| name.to_string()), next_expiry))
}

/// Where a file rewrite builds the new file, beside the store's.
fn rewrite_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".rewrite");
    PathBuf::from(p)
}

/// Ends a file rewrite however it ends: recording stops, and an unfinished copy is deleted.
struct RewriteCleanup<'a> {
    store: &'a Store,
    tmp: Option<PathBuf>,
}

impl Drop for RewriteCleanup<'_> {
    fn drop(&mut self) {
        *self.store.writes.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Shrinks a file no longer named (its last user closed) to nothing in 8 MiB steps, a few
/// milliseconds apart, before it is closed and deleted.
fn release_gradually(f: &std::fs::File) {
    const STEP: u64 = 8 << 20;
    let Ok(mut len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    while len > 0 {
        len = len.saturating_sub(STEP);
        if f.set_len(len).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| classify_io(dir, e))?;
        let path = dir.join(DB_FILE);
        let db = Database::builder()
            .set_cache_size(opts.cache_bytes)
            .create(&path)
            .map_err(|e| classify(&path, e))?;
        // A rewrite cut short by a crash left its unfinished copy: the store itself is whole.
        // (Only now that the file is ours: another node's rewrite may be running until then.)
        let _ = std::fs::remove_file(rewrite_path(&path));
        Store::init(db, path, opts)
    }

    /// A store held in memory only (tests, ephemeral nodes).
    pub fn in_memory(opts: StoreOptions) -> Result<Store> {
        let path = PathBuf::from(":memory:");
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| classify(&path, e))?;
        Store::init(db, path, opts)
    }

    fn init(db: Database, path: PathBuf, opts: StoreOptions) -> Result<Store> {
        let store = Store {
            db: std::sync::RwLock::new(std::sync::Arc::new(db)),
            path,
            opts,
            seqs: Mutex::new(HashMap::new()),
            writes: Mutex::new(None),
            rewriting: Mutex::new(()),
            abort_rewrite: std::sync::atomic::AtomicBool::new(false),
            dir_unsynced: std::sync::atomic::AtomicBool::new(false),
        };
        let tx = store.begin_write()?;
        migrations::upgrade(&store, &tx)?;
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Whether every commit is fsynced ([`StoreOptions::durable`]).
    pub fn is_durable(&self) -> bool {
        self.opts.durable
    }

    /// The database file (or `:memory:`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        classify(&self.path, e)
    }

    fn begin_write(&self) -> Result<WriteTransaction> {
        self.begin_write_with(self.opts.durable)
    }

    /// A write transaction. Callers hold [`Self::writes`] until it ends, so no rewrite swaps
    /// the database under it (the `Arc` taken here need not outlive this call).
    fn begin_write_with(&self, durable: bool) -> Result<WriteTransaction> {
        let db = self.db();
        let mut tx = db.begin_write().map_err(|e| self.err(e))?;
        let d = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        tx.set_durability(d).map_err(|e| StoreError::Engine {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        Ok(tx)
    }

    /// A node-level metadata value.
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// A table key that must be a map sid.
    fn sid_key(&self, key: &[u8], what: &str) -> Result<MapSid> {
        std::str::from_utf8(key)
            .ok()
            .and_then(MapSid::parse)
            .ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("{what} is not a map sid"),
            })
    }

    /// Every map in the catalog.
    pub fn list_maps(&self) -> Result<Vec<CatalogEntry>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(MAPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let sid = self.sid_key(k.value(), "a map catalog key")?;
            let (name, next_expiry) =
                decode_catalog(v.value()).ok_or_else(|| self.corrupt("map catalog record"))?;
            out.push(CatalogEntry {
                sid,
                name,
                next_expiry,
            });
        }
        Ok(out)
    }

    /// The stored digests of maps ([`Batch::digests`]); a map without one changed since its
    /// digest was last stored.
    pub fn map_digests(&self) -> Result<Vec<(MapSid, u64)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(DIGESTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let sid = self.sid_key(k.value(), "a map digest key")?;
            out.push((sid, v.value()));
        }
        Ok(out)
    }

    /// Every trust record ([`Batch::trust`]), by peer id.
    pub fn trust_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(TRUST).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The remembered permissions of maps ([`Batch::policies`]).
    pub fn map_policies(&self) -> Result<Vec<(MapSid, Vec<u8>)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(POLICIES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let sid = self.sid_key(k.value(), "a map policy key")?;
            out.push((sid, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Every invitation record ([`Batch::invites`]), by invitation id.
    pub fn invite_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(INVITES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The metadata key of a map's event id floor ([`event_floor_record`]).
    fn event_floor_key(sid: &MapSid) -> String {
        format!("event-floor:{sid}")
    }

    /// Everything stored for one map, or `None` if the catalog does not hold it.
    pub fn load_map(&self, sid: &MapSid) -> Result<Option<LoadedMap>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let maps = tx.open_table(MAPS).map_err(|e| self.err(e))?;
        if maps
            .get(sid.as_str().as_bytes())
            .map_err(|e| self.err(e))?
            .is_none()
        {
            return Ok(None);
        }
        let num = {
            let numbers = tx.open_table(MAP_NUMBERS).map_err(|e| self.err(e))?;
            self.number_of(&numbers, sid)?
        };
        // A map in the catalog without a number has no rows yet (no number is ever 0).
        let num_or_none = num.unwrap_or(0);
        let mut docs: std::collections::BTreeMap<DocAddr, StoredDoc> = Default::default();
        let snaps = tx.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        for row in snaps.range(docs_of(num_or_none)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let addr = doc_of(k.value()).ok_or_else(|| self.corrupt("snapshot key"))?;
            docs.entry(addr).or_default().snapshot = Some(v.value().to_vec());
        }
        let changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
        for row in changes
            .range(changes_of(num_or_none))
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (n, kind, inc, index, _) = k.value();
            let addr = doc_of((n, kind, inc, index)).ok_or_else(|| self.corrupt("change key"))?;
            docs.entry(addr)
                .or_default()
                .changes
                .push(v.value().to_vec());
        }
        let entries = match num {
            Some(num) => self.read_view(&tx, num)?,
            None => Vec::new(),
        };
        // Ids up to the floor may have been published by commits a crash took back: the
        // next event comes after it, so none is reused.
        let meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let floor = meta
            .get(Self::event_floor_key(sid).as_str())
            .map_err(|e| self.err(e))?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_le_bytes);
        let last_event_id = self.feed_end(&tx, sid, true)?.unwrap_or(0).max(floor);
        let mut sigs = Vec::new();
        let table = tx.open_table(SIGS).map_err(|e| self.err(e))?;
        for row in table.range(sigs_of(num_or_none)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            sigs.push((*k.value().1, v.value().to_vec()));
        }
        Ok(Some(LoadedMap {
            docs: docs.into_iter().collect(),
            entries,
            last_event_id,
            sigs,
        }))
    }

    fn corrupt(&self, what: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("malformed {what}"),
        }
    }

    /// Stored events of a map with ids after `after`, oldest first, at most `limit`.
    pub fn events_after(&self, sid: &MapSid, after: u64, limit: usize) -> Result<Vec<Event>> {
        Ok(self
            .events_after_within(sid, after, limit, usize::MAX)?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// [`Self::events_after`], stopping once the events read reach `max_bytes` (at least one
    /// event is read), so a page costs bounded memory whatever the events' size. Each event
    /// comes with the bytes read for it.
    pub fn events_after_within(
        &self,
        sid: &MapSid,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Event, usize)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        self.read_events(&tx, sid, after, limit, max_bytes)
    }

    /// The newest stored event id of a map (0 if none).
    pub fn last_event_id(&self, sid: &MapSid) -> Result<u64> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        Ok(self.feed_end(&tx, sid, true)?.unwrap_or(0))
    }

    /// The oldest retained event id of a map (events before it were pruned), if any.
    pub fn first_event_id(&self, sid: &MapSid) -> Result<Option<u64>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        self.feed_end(&tx, sid, false)
    }

    fn next_seq(
        &self,
        seqs: &mut HashMap<DocKey, u64>,
        changes: &redb::Table<tables::ChangeKey, &[u8]>,
        dk: DocKey,
    ) -> Result<u64> {
        if let Some(s) = seqs.get_mut(&dk) {
            *s += 1;
            return Ok(*s);
        }
        let last = self.stored_last_seq(changes, dk)?;
        seqs.insert(dk, last + 1);
        Ok(last + 1)
    }

    /// Writes a batch atomically (and, when durable, fsyncs it) before returning.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.commit_with(batch, self.opts.durable)
    }

    /// Commits a batch without fsync whatever the store's durability: it is on disk at the
    /// next durable commit ([`Self::commit_durable`]), and a crash before that loses it (and
    /// nothing else: the store is as of the last durable commit).
    pub fn commit_relaxed(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.commit_with(batch, false)
    }

    /// Commits a batch (possibly empty) with fsync whatever the store's durability: with
    /// `durable: false` stores this also makes every earlier commit durable.
    pub fn commit_durable(&self, batch: &Batch) -> Result<()> {
        self.commit_with(batch, true)
    }

    fn commit_with(&self, batch: &Batch, durable: bool) -> Result<()> {
        let mut log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if durable && self.dir_unsynced.load(std::sync::atomic::Ordering::Acquire) {
            self.sync_dir()?;
            self.dir_unsynced
                .store(false, std::sync::atomic::Ordering::Release);
        }
        let tx = self.begin_write_with(durable)?;
        let mut seqs = self
            .seqs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut taken = Vec::new();
        let mut ops = Vec::new();
        let record = log.as_ref().is_some_and(|l| !l.overflow);
        let result = self.write_batch(
            &tx,
            batch,
            Seqs::Next(&mut seqs, &mut taken, record.then_some(&mut ops)),
        );
        let result = result.and_then(|()| tx.commit().map_err(|e| self.err(e)));
        if result.is_err() {
            // Nothing was written: the cached sequence numbers may be ahead of the table;
            // they are read back from it when next needed.
            seqs.clear();
        } else if let Some(log) = log.as_mut() {
            // The view and events are replayed from `ops`: the batch is kept without them.
            let rest = batch.without_feed();
            let bytes = rest.bytes() + ops.iter().map(Op::bytes).sum::<usize>() + 64;
            log.record(Rewritten::Commit(rest, taken, ops), bytes);
        }
        result
    }

    fn write_batch(&self, tx: &WriteTransaction, batch: &Batch, mut seqs: Seqs<'_>) -> Result<()> {
        let mut recorded = 0;
        let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
        for (k, v) in &batch.meta {
            meta.insert(k.as_str(), v.as_slice())
                .map_err(|e| self.err(e))?;
        }
        let mut maps = tx.open_table(MAPS).map_err(|e| self.err(e))?;
        let mut changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
        let mut feed = Tables::open(tx).map_err(|e| self.err(e))?;
        let mut digests = tx.open_table(DIGESTS).map_err(|e| self.err(e))?;
        let mut sigs = tx.open_table(SIGS).map_err(|e| self.err(e))?;
        if let Seqs::Recorded(_, ops) = &seqs {
            // Recorded first: they give the numbers of maps first stored by this batch.
            for op in ops.iter() {
                feed.apply(op).map_err(|e| self.err(e))?;
            }
        }
        for m in &batch.maps {
            let Some(sid) = &m.sid else { continue };
            let sid_bytes = sid.as_str().as_bytes();
            let num = match &mut seqs {
                Seqs::Next(_, _, record) => {
                    self.number_for(&mut Sink::new(&mut feed, record.as_deref_mut()), sid)?
                }
                Seqs::Recorded(..) => self
                    .number_of(feed.numbers(), sid)?
                    .ok_or_else(|| self.corrupt("replayed write of a map without a number"))?,
            };
            for (hash, sig) in &m.sigs {
                if sig.is_empty() {
                    sigs.remove((num, hash)).map_err(|e| self.err(e))?;
                } else {
                    sigs.insert((num, hash), sig.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            if m.name.is_some() || maps.get(sid_bytes).map_err(|e| self.err(e))?.is_none() {
                let rec = encode_catalog(m.name.as_deref().unwrap_or(""), m.next_expiry);
                maps.insert(sid_bytes, rec.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            if !m.changes.is_empty() {
                digests.remove(sid_bytes).map_err(|e| self.err(e))?;
            }
            for (doc, bytes) in &m.changes {
                let dk = doc_key(num, *doc);
                let seq = match &mut seqs {
                    Seqs::Next(next, taken, _) => {
                        let seq = self.next_seq(next, &changes, dk)?;
                        taken.push(seq);
                        seq
                    }
                    Seqs::Recorded(given, _) => {
                        let seq =
                            given
                                .get(recorded)
                                .copied()
                                .ok_or_else(|| StoreError::Engine {
                                    path: self.path.clone(),
                                    detail: "a replayed commit lacks a sequence number".into(),
                                })?;
                        recorded += 1;
                        seq
                    }
                };
                changes
                    .insert(change_key(dk, seq), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            if let Seqs::Next(_, _, record) = &mut seqs {
                let mut sink = Sink::new(&mut feed, record.as_deref_mut());
                self.write_feed(&mut sink, num, &m.view, &m.events)?;
            }
        }
        for (sid, digest) in &batch.digests {
            digests
                .insert(sid.as_str().as_bytes(), *digest)
                .map_err(|e| self.err(e))?;
        }
        if !batch.trust.is_empty() {
            let mut trust = tx.open_table(TRUST).map_err(|e| self.err(e))?;
            for (peer, rec) in &batch.trust {
                match rec {
                    Some(r) => trust.insert(peer.as_str(), r.as_slice()).map(|_| ()),
                    None => trust.remove(peer.as_str()).map(|_| ()),
                }
                .map_err(|e| self.err(e))?;
            }
        }
        if !batch.policies.is_empty() {
            let mut policies = tx.open_table(POLICIES).map_err(|e| self.err(e))?;
            for (sid, rec) in &batch.policies {
                let k = sid.as_str().as_bytes();
                match rec {
                    Some(r) => policies.insert(k, r.as_slice()).map(|_| ()),
                    None => policies.remove(k).map(|_| ()),
                }
                .map_err(|e| self.err(e))?;
            }
        }
        if !batch.invites.is_empty() {
            let mut invites = tx.open_table(INVITES).map_err(|e| self.err(e))?;
            for (id, rec) in &batch.invites {
                match rec {
                    Some(r) => invites.insert(id.as_slice(), r.as_slice()).map(|_| ()),
                    None => invites.remove(id.as_slice()).map(|_| ()),
                }
                .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Replaces a document's stored changes by a snapshot that contains them all. Must be
    /// ordered after every commit whose changes the snapshot includes (changes stored after
    /// those stay).
    pub fn compact_doc(&self, sid: &MapSid, doc: DocAddr, snapshot: &[u8]) -> Result<()> {
        let through = self.last_change_seq(sid, doc)?;
        self.replace_docs(&[DocReplacement {
            sid: sid.clone(),
            doc,
            snapshot: Some(snapshot.to_vec()),
            through,
        }])
    }

    /// The sequence number of a document's last stored change (0 if none): what a snapshot
    /// taken now covers ([`DocReplacement::through`]).
    pub fn last_change_seq(&self, sid: &MapSid, doc: DocAddr) -> Result<u64> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let numbers = tx.open_table(MAP_NUMBERS).map_err(|e| self.err(e))?;
        let Some(num) = self.number_of(&numbers, sid)? else {
            return Ok(0);
        };
        let dk = doc_key(num, doc);
        if let Some(s) = self.seqs.lock().unwrap_or_else(|p| p.into_inner()).get(&dk) {
            return Ok(*s);
        }
        let changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
        self.stored_last_seq(&changes, dk)
    }

    /// The highest sequence number among a document's stored changes (0 if none).
    fn stored_last_seq(
        &self,
        changes: &impl ReadableTable<tables::ChangeKey, &'static [u8]>,
        dk: DocKey,
    ) -> Result<u64> {
        Ok(changes
            .range(changes_of_doc(dk))
            .map_err(|e| self.err(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.err(e))?
            .map_or(0, |(k, _)| k.value().4))
    }

    /// Deletes documents' stored changes up to [`DocReplacement::through`] and sets or
    /// removes their snapshots, all in one transaction: compacting every document of a node
    /// costs a few commits, not one per document.
    pub fn replace_docs(&self, docs: &[DocReplacement]) -> Result<()> {
        let mut log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.begin_write()?;
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut ops = Vec::new();
        let record = log.as_ref().is_some_and(|l| !l.overflow);
        let nums = self.doc_numbers(&tx, docs, Some(record.then_some(&mut ops)))?;
        // Sequence numbers never go back below what a replacement covers: a change stored
        // after it, numbered from an emptied log, would otherwise fall under a later
        // replacement of the same document queued before that change existed.
        {
            let changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
            for (d, num) in docs.iter().zip(&nums) {
                let Some(num) = num else { continue };
                let dk = doc_key(*num, d.doc);
                let last = match seqs.get(&dk) {
                    Some(s) => *s,
                    None => self.stored_last_seq(&changes, dk)?,
                };
                seqs.insert(dk, last.max(d.through));
            }
        }
        let result = self
            .write_replacements(&tx, docs, &nums)
            .and_then(|()| tx.commit().map_err(|e| self.err(e)));
        if result.is_err() {
            seqs.clear();
        }
        result?;
        if let Some(log) = log.as_mut() {
            let bytes = docs
                .iter()
                .map(|d| d.snapshot.as_ref().map_or(0, Vec::len) + 64)
                .sum::<usize>()
                + ops.iter().map(Op::bytes).sum::<usize>();
            log.record(Rewritten::Replace(docs.to_vec(), ops), bytes);
        }
        Ok(())
    }

    /// The number of each replaced document's map: given out for a snapshot of a map that has
    /// none yet when `allocate` is given (its writes recorded in the inner vector, if any),
    /// else `None` (nothing of that map is stored).
    fn doc_numbers(
        &self,
        tx: &WriteTransaction,
        docs: &[DocReplacement],
        allocate: Option<Option<&mut Vec<Op>>>,
    ) -> Result<Vec<Option<u32>>> {
        let mut tables = Tables::open(tx).map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(docs.len());
        let mut record = allocate;
        for d in docs {
            let num = match (&mut record, &d.snapshot) {
                (Some(rec), Some(_)) => {
                    Some(self.number_for(&mut Sink::new(&mut tables, rec.as_deref_mut()), &d.sid)?)
                }
                _ => self.number_of(tables.numbers(), &d.sid)?,
            };
            out.push(num);
        }
        Ok(out)
    }

    fn write_replacements(
        &self,
        tx: &WriteTransaction,
        docs: &[DocReplacement],
        nums: &[Option<u32>],
    ) -> Result<()> {
        let mut snaps = tx.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        let mut changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
        for (d, num) in docs.iter().zip(nums) {
            let Some(num) = num else { continue };
            let dk = doc_key(*num, d.doc);
            match &d.snapshot {
                Some(s) => snaps.insert(dk, s.as_slice()).map(|_| ()),
                None => snaps.remove(dk).map(|_| ()),
            }
            .map_err(|e| self.err(e))?;
            changes
                .retain_in(change_key(dk, 0)..=change_key(dk, d.through), |_, _| false)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Bytes of live data in the database (keys and values plus B-tree metadata), as opposed
    /// to the file's size, which redb grows in large steps and reuses from free pages.
    pub fn used_bytes(&self) -> Result<u64> {
        let db = self.db();
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        let st = tx.stats().map_err(|e| self.err(e))?;
        let used = st.stored_bytes() + st.metadata_bytes();
        tx.abort().map_err(|e| self.err(e))?;
        Ok(used)
    }

    /// Per table: its name, the bytes of its keys and values, and the bytes of its B-tree
    /// pages beyond them (metadata and unused space in its pages). Walks every table: for
    /// measurements, not for a hot path.
    pub fn table_bytes(&self) -> Result<Vec<(String, u64, u64)>> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        macro_rules! measure {
            ($($t:expr),*) => {$({
                use redb::ReadableTableMetadata;
                let t = tx.open_table($t).map_err(|e| self.err(e))?;
                let st = t.stats().map_err(|e| self.err(e))?;
                out.push((
                    $t.name().to_string(),
                    st.stored_bytes(),
                    st.metadata_bytes() + st.fragmented_bytes(),
                ));
            })*};
        }
        measure!(META, TRUST, MAPS, SNAPSHOTS, CHANGES, INVITES, POLICIES, SIGS);
        measure!(MAP_NUMBERS, VIEW, FEED, VERSIONS, FEED_BYTES, DIGESTS);
        Ok(out)
    }

    /// Bytes used on disk by the database file (0 in memory).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Rewrites the file so that space freed by compacted change logs and pruned events goes
    /// back to the file system, without stopping the store: the live data of a snapshot is
    /// copied into a new file while commits go on (and are recorded), the recorded commits
    /// are replayed into it, and only the last few are replayed with writes held back, just
    /// before the new file takes the old one's name (an atomic rename: a crash at any point
    /// leaves one whole store). Readers are never held. [`FileCompaction::Busy`] when writes
    /// outpaced the copy or the store is closing.
    pub fn compact_file(&self) -> Result<FileCompaction> {
        if self.path == Path::new(":memory:") {
            return Ok(FileCompaction::Nothing);
        }
        let _one = self.rewriting.lock().unwrap_or_else(|p| p.into_inner());
        if !self.room_for_copy() {
            tracing::warn!(
                "file compaction skipped: the disk holding {} lacks room for a copy of the data",
                self.path.display()
            );
            return Ok(FileCompaction::Busy);
        }
        let tmp = rewrite_path(&self.path);
        let _ = std::fs::remove_file(&tmp);
        let before = self.disk_bytes();
        // Recording starts before anything is copied: every write the copy may have missed
        // is replayed (replay is idempotent, so one it did not miss does no harm).
        *self.writes.lock().unwrap_or_else(|p| p.into_inner()) = Some(RewriteLog::default());
        // Whatever happens next, recording stops and an unfinished copy goes.
        let mut cleanup = RewriteCleanup {
            store: self,
            tmp: Some(tmp.clone()),
        };
        let Some(new) = self.copy_into(&tmp)? else {
            return Ok(FileCompaction::Busy);
        };
        // Catch up without holding anyone back until what is left is small. Each replay is
        // fsynced, so the copy's pages reach the disk now, not while writes are held back.
        let mut first = true;
        let mut replayed = 0;
        loop {
            if self
                .abort_rewrite
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return Ok(FileCompaction::Busy);
            }
            let ops = {
                let mut log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
                let Some(l) = log.as_mut() else {
                    return Ok(FileCompaction::Busy);
                };
                if l.overflow {
                    tracing::info!("file rewrite given up: writes outpaced it");
                    return Ok(FileCompaction::Busy);
                }
                if l.bytes <= REWRITE_FINAL_BYTES && !first {
                    break;
                }
                replayed += l.bytes;
                if replayed > MAX_REWRITE_LOG_BYTES {
                    // Writes keep outpacing the replay: this is not the time.
                    tracing::info!("file rewrite given up: writes outpaced its catch-up");
                    return Ok(FileCompaction::Busy);
                }
                l.bytes = 0;
                std::mem::take(&mut l.ops)
            };
            self.replay(&new, ops)?;
            first = false;
        }
        // The last writes, with writes held back: then the new file takes the old one's place.
        let mut log = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rest) = log.take() else {
            return Ok(FileCompaction::Busy);
        };
        if rest.overflow {
            return Ok(FileCompaction::Busy);
        }
        self.replay(&new, rest.ops)?;
        // Held past the old database's close, so that its blocks are freed a slice at a
        // time below rather than all at once (a whole large file deleted in one go stalls
        // every fsync of the file system for a while).
        let old_file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .ok();
        std::fs::rename(&tmp, &self.path).map_err(|e| classify_io(&self.path, e))?;
        cleanup.tmp = None;
        // The rename itself must survive a crash (the new file's contents already do). The
        // new file is the store's from here on, whatever happens; if the directory cannot be
        // synced now, the next durable commit must sync it or fail.
        if let Err(e) = self.sync_dir() {
            tracing::warn!("{e}");
            self.dir_unsynced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let old = std::mem::replace(
            &mut *self.db.write().unwrap_or_else(|p| p.into_inner()),
            std::sync::Arc::new(new),
        );
        drop(log);
        // Its file no longer has a name; it is closed once its last reader is done (readers
        // hold it only for one call, so a little waiting covers them).
        for _ in 0..1000 {
            if std::sync::Arc::strong_count(&old) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let alone = std::sync::Arc::strong_count(&old) == 1;
        drop(old);
        if let Some(f) = old_file.filter(|_| alone) {
            release_gradually(&f);
        }
        let after = self.disk_bytes();
        Ok(if after < before {
            FileCompaction::Done
        } else {
            FileCompaction::Nothing
        })
    }

    /// Makes a running [`Self::compact_file`] give up soon (before closing the store).
    pub fn abort_compaction(&self) {
        self.abort_rewrite
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Copies every table into a new file at `tmp`, a chunk per transaction, each chunk read
    /// in a read transaction of its own (a long one would keep every page the store frees
    /// meanwhile, and the commit after it would pay for freeing them all); `None` when the
    /// rewrite is to give up.
    fn copy_into(&self, tmp: &Path) -> Result<Option<Database>> {
        let new = Database::builder()
            .set_cache_size(self.opts.cache_bytes)
            .create(tmp)
            .map_err(|e| classify(tmp, e))?;
        // A table this code does not know of would be lost by the copy: refuse instead.
        let known = [
            META.name(),
            TRUST.name(),
            MAPS.name(),
            SNAPSHOTS.name(),
            CHANGES.name(),
            MAP_NUMBERS.name(),
            VIEW.name(),
            FEED.name(),
            VERSIONS.name(),
            FEED_BYTES.name(),
            INVITES.name(),
            POLICIES.name(),
            SIGS.name(),
            DIGESTS.name(),
        ];
        let tables = {
            let db = self.db();
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let names: Vec<String> = tx
                .list_tables()
                .map_err(|e| self.err(e))?
                .map(|t| t.name().to_string())
                .collect();
            names
        };
        if let Some(t) = tables.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(StoreError::Engine {
                path: self.path.clone(),
                detail: format!(
                    "the file holds a table ({t}) a rewrite would not copy; it is left as it is"
                ),
            });
        }
        macro_rules! copy {
            ($($t:expr),*) => {$(
                if !self.copy_table($t, &new)? {
                    return Ok(None);
                }
            )*};
        }
        copy!(META, TRUST);
        copy!(MAPS, SNAPSHOTS, CHANGES, INVITES, POLICIES, SIGS);
        copy!(MAP_NUMBERS, VIEW, FEED, VERSIONS, FEED_BYTES);
        copy!(DIGESTS);
        Ok(Some(new))
    }

    /// Copies one table; false when the rewrite is to give up.
    fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
        new: &Database,
    ) -> Result<bool> {
        use std::ops::Bound;
        // The last key copied, as bytes: the next chunk starts after it.
        let mut after: Option<Vec<u8>> = None;
        loop {
            if self
                .abort_rewrite
                .load(std::sync::atomic::Ordering::Acquire)
                || self
                    .writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_none_or(|l| l.overflow)
            {
                return Ok(false);
            }
            let db = self.db();
            let rtx = db.begin_read().map_err(|e| self.err(e))?;
            let src = match rtx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(true),
                Err(e) => return Err(self.err(e)),
            };
            let rows = match &after {
                None => src.iter(),
                Some(k) => src.range::<K::SelfType<'_>>((
                    Bound::Excluded(K::from_bytes(k)),
                    Bound::Unbounded,
                )),
            }
            .map_err(|e| self.err(e))?;
            // Each chunk is fsynced: the copy never piles up dirty pages whose writeback
            // would make the store's own fsyncs (every acknowledged write) wait.
            let tx = new.begin_write().map_err(|e| self.err(e))?;
            let mut done = true;
            {
                let mut dst = tx.open_table(def).map_err(|e| self.err(e))?;
                let mut bytes = 0;
                for row in rows {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let (k, v) = (k.value(), v.value());
                    let kb = K::as_bytes(&k);
                    bytes += kb.as_ref().len() + V::as_bytes(&v).as_ref().len();
                    dst.insert(&k, &v).map_err(|e| self.err(e))?;
                    if bytes >= REWRITE_CHUNK_BYTES {
                        after = Some(kb.as_ref().to_vec());
                        done = false;
                        break;
                    }
                }
            }
            drop(src);
            drop(rtx);
            drop(db);
            tx.commit().map_err(|e| self.err(e))?;
            if done {
                return Ok(true);
            }
        }
    }

    /// Replays recorded writes into the new file, in fsynced transactions of about
    /// [`REWRITE_CHUNK_BYTES`] (small fsyncs do not hold up the store's own).
    fn replay(&self, new: &Database, ops: Vec<(Rewritten, usize)>) -> Result<()> {
        let mut ops = ops.into_iter().peekable();
        loop {
            let tx = new.begin_write().map_err(|e| self.err(e))?;
            let mut bytes = 0;
            while bytes < REWRITE_CHUNK_BYTES {
                let Some((op, n)) = ops.next() else { break };
                match &op {
                    Rewritten::Commit(b, given, feed) => {
                        self.write_batch(&tx, b, Seqs::Recorded(given, feed))?
                    }
                    Rewritten::Replace(docs, feed) => {
                        {
                            let mut t = Tables::open(&tx).map_err(|e| self.err(e))?;
                            for op in feed {
                                t.apply(op).map_err(|e| self.err(e))?;
                            }
                        }
                        let nums = self.doc_numbers(&tx, docs, None)?;
                        self.write_replacements(&tx, docs, &nums)?
                    }
                }
                bytes += n;
            }
            tx.commit().map_err(|e| self.err(e))?;
            if ops.peek().is_none() {
                return Ok(());
            }
        }
    }

    /// Fsyncs the directory holding the store file (its entries: a rename).
    fn sync_dir(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| classify_io(dir, e))
    }

    /// Whether the file system has room for a copy as large as the whole file, and 64 MiB to
    /// spare: a rewrite must never be what fills the disk under the store's own commits.
    /// (The file's size bounds the copy's; measuring the live data would walk every page.)
    fn room_for_copy(&self) -> bool {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let Ok(st) = rustix::fs::statvfs(dir) else {
            return true; // unknown: a full disk fails the copy's own commit first
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        free >= self.disk_bytes().saturating_add(64 << 20)
    }

    fn db(&self) -> std::sync::Arc<Database> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncmesh_core::ViewChanges;

    fn sid() -> MapSid {
        MapSid::for_name("users")
    }

    /// An event that names no item: tests of other tables need only its id.
    fn filler_event(id: u64) -> FeedEvent {
        FeedEvent {
            id,
            is_local: false,
            date: id as i64,
            kind: FeedKind::MapRemoved,
        }
    }

    fn write(
        store: &Store,
        changes: Vec<(DocAddr, Vec<u8>)>,
        entries: Vec<(&str, Option<&[u8]>)>,
        events: Vec<u64>,
    ) {
        let batch = Batch {
            maps: vec![MapWrite {
                sid: Some(sid()),
                name: Some("users".into()),
                next_expiry: None,
                changes,
                view: ViewChanges {
                    reset: false,
                    entries: entries
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.map(|v| v.to_vec())))
                        .collect(),
                },
                events: events.into_iter().map(filler_event).collect(),
                sigs: Vec::new(),
            }],
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }

    #[test]
    fn roundtrip_on_disk_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 7,
        };
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(
                &s,
                vec![(DocAddr::Meta, b"m1".to_vec()), (shard, b"c1".to_vec())],
                vec![("a", Some(b"A")), ("b", Some(b"B"))],
                vec![1, 2],
            );
            write(
                &s,
                vec![(shard, b"c2".to_vec())],
                vec![("a", None)],
                vec![3],
            );
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(
            s.list_maps().unwrap(),
            vec![CatalogEntry {
                sid: sid(),
                name: Some("users".to_string()),
                next_expiry: None
            }]
        );
        let m = s.load_map(&sid()).unwrap().unwrap();
        assert_eq!(m.entries, vec![("b".to_string(), b"B".to_vec())]);
        assert_eq!(m.last_event_id, 3);
        let docs: std::collections::BTreeMap<_, _> = m.docs.into_iter().collect();
        assert_eq!(docs[&shard].changes, vec![b"c1".to_vec(), b"c2".to_vec()]);
        assert_eq!(docs[&DocAddr::Meta].changes, vec![b"m1".to_vec()]);
        // sequence numbers continue after reopen
        write(&s, vec![(shard, b"c3".to_vec())], vec![], vec![]);
        let m = s.load_map(&sid()).unwrap().unwrap();
        let docs: std::collections::BTreeMap<_, _> = m.docs.into_iter().collect();
        assert_eq!(docs[&shard].changes.len(), 3);
        assert_eq!(
            s.events_after(&sid(), 1, 10)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        // compaction replaces the changes with a snapshot
        s.compact_doc(&sid(), shard, b"SNAP").unwrap();
        write(&s, vec![(shard, b"c4".to_vec())], vec![], vec![]);
        let m = s.load_map(&sid()).unwrap().unwrap();
        let docs: std::collections::BTreeMap<_, _> = m.docs.into_iter().collect();
        assert_eq!(docs[&shard].snapshot.as_deref(), Some(b"SNAP".as_slice()));
        assert_eq!(docs[&shard].changes, vec![b"c4".to_vec()]);
        assert!(s.load_map(&MapSid::for_name("other")).unwrap().is_none());
    }

    fn map_write(
        sid: MapSid,
        name: &str,
        changes: Vec<&[u8]>,
        entries: Vec<(&str, Option<&[u8]>)>,
        reset: bool,
        events: Vec<u64>,
    ) -> MapWrite {
        MapWrite {
            sid: Some(sid),
            name: Some(name.into()),
            next_expiry: Some(events.first().copied().unwrap_or(0) as i64),
            changes: changes
                .into_iter()
                .map(|c| {
                    (
                        DocAddr::Shard {
                            gen: 0,
                            inc: 0,
                            index: 1,
                        },
                        c.to_vec(),
                    )
                })
                .collect(),
            view: ViewChanges {
                reset,
                entries: entries
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
                    .collect(),
            },
            events: events.into_iter().map(filler_event).collect(),
            sigs: Vec::new(),
        }
    }

    type Contents = (Vec<CatalogEntry>, String, Vec<Event>);

    /// Everything a store holds of a map, to compare two stores.
    fn contents(s: &Store, sid: &MapSid) -> Contents {
        let m = s.load_map(sid).unwrap().unwrap();
        let mut docs = m.docs;
        docs.sort_by_key(|(d, _)| *d);
        let shape = format!("{:?} {:?} {}", m.entries, docs, m.last_event_id);
        (
            s.list_maps().unwrap(),
            shape,
            s.events_after(sid, 0, 100).unwrap(),
        )
    }

    #[test]
    fn merged_batches_commit_what_the_batches_commit_one_after_the_other() {
        let (a, b) = (sid(), MapSid::for_name("other"));
        let batches = || {
            vec![
                Batch {
                    maps: vec![
                        map_write(
                            a.clone(),
                            "users",
                            vec![b"c1"],
                            vec![("x", Some(b"1"))],
                            false,
                            vec![1],
                        ),
                        map_write(
                            b.clone(),
                            "other",
                            vec![b"o1"],
                            vec![("y", Some(b"1"))],
                            false,
                            vec![1],
                        ),
                    ],
                    ..Batch::default()
                },
                Batch {
                    maps: vec![map_write(
                        a.clone(),
                        "users",
                        vec![b"c2", b"c3"],
                        vec![("x", None), ("z", Some(b"2"))],
                        false,
                        vec![2, 3],
                    )],
                    ..Batch::default()
                },
                Batch {
                    maps: vec![
                        map_write(
                            b.clone(),
                            "renamed",
                            vec![b"o2"],
                            vec![("w", Some(b"3"))],
                            true,
                            vec![2],
                        ),
                        map_write(
                            a.clone(),
                            "users",
                            vec![b"c4"],
                            vec![("x", Some(b"4"))],
                            false,
                            vec![4],
                        ),
                    ],
                    ..Batch::default()
                },
            ]
        };
        let one_by_one = Store::in_memory(StoreOptions::default()).unwrap();
        for batch in batches() {
            one_by_one.commit(&batch).unwrap();
        }
        let merged_store = Store::in_memory(StoreOptions::default()).unwrap();
        let mut merged = Batch::default();
        for batch in batches() {
            merged.append(batch);
        }
        // One entry per map, but the write that resets b's view stays apart.
        assert_eq!(merged.maps.len(), 3);
        merged_store.commit(&merged).unwrap();
        for sid in [&a, &b] {
            assert_eq!(contents(&one_by_one, sid), contents(&merged_store, sid));
        }
        let (catalog, _, _) = contents(&merged_store, &b);
        assert!(catalog.iter().any(|c| c.name.as_deref() == Some("renamed")));
    }

    #[test]
    fn a_merged_write_that_resets_the_view_keeps_the_versions_of_earlier_events() {
        let mut model = feed::tests::Model::new("m", 5);
        let first = model.batch(3, 10);
        let mut reset = model.batch(0, 10);
        reset.view.reset = true;
        model.items.clear();
        let third = model.batch(2, 10);
        let mut merged = Batch {
            maps: vec![first],
            ..Batch::default()
        };
        for w in [reset, third] {
            merged.append(Batch {
                maps: vec![w],
                ..Batch::default()
            });
        }
        let s = Store::in_memory(StoreOptions::default()).unwrap();
        s.commit(&merged).unwrap();
        model.check(&s);
    }

    #[test]
    fn a_maps_next_event_id_comes_after_its_floor() {
        let s = Store::in_memory(StoreOptions::default()).unwrap();
        write(&s, vec![], vec![], vec![1, 2, 3]);
        let floor = |f: u64| Batch {
            meta: vec![event_floor_record(&sid(), f)],
            ..Batch::default()
        };
        s.commit(&floor(100)).unwrap();
        assert_eq!(s.load_map(&sid()).unwrap().unwrap().last_event_id, 100);
        // A floor below the stored events (written back at a clean close) takes nothing away.
        write(&s, vec![], vec![], vec![101]);
        s.commit(&floor(50)).unwrap();
        assert_eq!(s.load_map(&sid()).unwrap().unwrap().last_event_id, 101);
        let other = MapSid::for_name("other");
        assert!(s.load_map(&other).unwrap().is_none());
    }

    #[test]
    fn compacting_the_file_gives_freed_space_back_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let big = vec![7u8; 4000];
        for round in 0..50u16 {
            let changes = (0..50u16)
                .map(|i| {
                    (
                        DocAddr::Shard {
                            gen: 0,
                            inc: 0,
                            index: i,
                        },
                        big.clone(),
                    )
                })
                .collect();
            write(
                &s,
                changes,
                vec![("a", Some(b"A"))],
                vec![u64::from(round) + 1],
            );
        }
        for i in 0..50u16 {
            s.compact_doc(
                &sid(),
                DocAddr::Shard {
                    gen: 0,
                    inc: 0,
                    index: i,
                },
                b"snap",
            )
            .unwrap();
        }
        let before = s.disk_bytes();
        // A reader holding a transaction neither stops the rewrite nor loses its snapshot.
        let db = s.db();
        let tx = db.begin_read().unwrap();
        assert_eq!(s.compact_file().unwrap(), FileCompaction::Done);
        let held = tx.open_table(VIEW).unwrap();
        assert!(held.iter().unwrap().next().is_some());
        drop(held);
        drop(tx);
        drop(db);
        assert!(!rewrite_path(&s.path).exists());
        let after = s.disk_bytes();
        assert!(
            after * 2 < before,
            "file {before} bytes before compaction, {after} after"
        );
        let m = s.load_map(&sid()).unwrap().unwrap();
        assert_eq!(m.docs.len(), 50);
        assert!(m
            .docs
            .iter()
            .all(|(_, d)| d.snapshot.as_deref() == Some(&b"snap"[..]) && d.changes.is_empty()));
        assert_eq!(m.entries, vec![("a".to_string(), b"A".to_vec())]);
        drop(s);
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.last_event_id(&sid()).unwrap(), 50);
    }

    /// Changes of one document, in stored order.
    fn doc_changes(s: &Store, doc: DocAddr) -> Vec<Vec<u8>> {
        let m = s.load_map(&sid()).unwrap().unwrap();
        m.docs
            .into_iter()
            .find(|(d, _)| *d == doc)
            .map(|(_, d)| d.changes)
            .unwrap_or_default()
    }

    #[test]
    fn commits_made_while_the_file_is_rewritten_are_in_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(
            Store::open(
                dir.path(),
                StoreOptions {
                    durable: false,
                    ..StoreOptions::default()
                },
            )
            .unwrap(),
        );
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 1,
        };
        let big = vec![1u8; 2000];
        for i in 0..3000u32 {
            write(
                &s,
                vec![(shard, big.clone())],
                vec![],
                vec![u64::from(i) + 1],
            );
        }
        // Free space to give back, and a snapshot that leaves later changes in place.
        s.compact_doc(&sid(), shard, b"snap").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                // Another map's items and events as well: the feed's derived writes (versions
                // moved, events pruned) must reach the new file as they were made.
                let mut model = feed::tests::Model::new("feed", 7);
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Acquire) || n < 200 {
                    let key = format!("w{n}");
                    write(
                        &s,
                        vec![(shard, n.to_be_bytes().to_vec())],
                        vec![(key.as_str(), Some(b"v"))],
                        vec![3001 + u64::from(n)],
                    );
                    s.commit(&Batch {
                        maps: vec![model.batch(3, 50)],
                        ..Batch::default()
                    })
                    .unwrap();
                    n += 1;
                }
                (n, model)
            })
        };
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            outcomes.push(s.compact_file().unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (written, model) = writer.join().unwrap();
        assert_eq!(outcomes[0], FileCompaction::Done, "{outcomes:?}");
        let check = |s: &Store| {
            let changes = doc_changes(s, shard);
            let expected: Vec<Vec<u8>> = (0..written).map(|n| n.to_be_bytes().to_vec()).collect();
            assert_eq!(changes, expected);
            let m = s.load_map(&sid()).unwrap().unwrap();
            assert_eq!(m.entries.len(), written as usize);
            assert_eq!(m.last_event_id, 3000 + u64::from(written));
            model.check(s);
        };
        check(&s);
        let s = std::sync::Arc::into_inner(s).unwrap();
        drop(s);
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        check(&s);
        // Sequence numbers go on after the rewrite: a later change sorts last.
        write(&s, vec![(shard, b"last".to_vec())], vec![], vec![]);
        assert_eq!(doc_changes(&s, shard).last().unwrap(), b"last");
    }

    #[test]
    fn a_snapshot_stored_after_later_changes_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 2,
        };
        write(
            &s,
            vec![(shard, b"c1".to_vec()), (shard, b"c2".to_vec())],
            vec![],
            vec![],
        );
        let through = s.last_change_seq(&sid(), shard).unwrap();
        assert_eq!(through, 2);
        write(&s, vec![(shard, b"c3".to_vec())], vec![], vec![]);
        s.replace_docs(&[DocReplacement {
            sid: sid(),
            doc: shard,
            snapshot: Some(b"snap".to_vec()),
            through,
        }])
        .unwrap();
        let m = s.load_map(&sid()).unwrap().unwrap();
        let (_, d) = m.docs.iter().find(|(d, _)| *d == shard).unwrap();
        assert_eq!(d.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!(d.changes, vec![b"c3".to_vec()]);
    }

    #[test]
    fn a_change_stored_after_an_emptied_log_survives_a_replacement_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 4,
        };
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(
                &s,
                vec![(shard, b"c1".to_vec()), (shard, b"c2".to_vec())],
                vec![],
                vec![],
            );
        }
        // Reopened: nothing cached. Two replacements of the document are queued at once.
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let through = s.last_change_seq(&sid(), shard).unwrap();
        let replace = || DocReplacement {
            sid: sid(),
            doc: shard,
            snapshot: Some(b"snap".to_vec()),
            through,
        };
        s.replace_docs(&[replace()]).unwrap();
        write(&s, vec![(shard, b"c3".to_vec())], vec![], vec![]);
        s.replace_docs(&[replace()]).unwrap();
        assert_eq!(doc_changes(&s, shard), vec![b"c3".to_vec()]);
    }

    #[test]
    fn an_unfinished_rewrite_is_discarded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(&s, vec![], vec![("a", Some(b"A"))], vec![1]);
        }
        let leftover = rewrite_path(&dir.path().join(DB_FILE));
        std::fs::write(&leftover, b"half a copy").unwrap();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(s.load_map(&sid()).unwrap().unwrap().entries.len(), 1);
    }

    #[test]
    fn a_second_open_is_refused_while_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("syncmesh.redb"));
    }

    #[test]
    fn a_digest_is_kept_until_the_map_changes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 3,
        };
        write(&s, vec![(shard, b"c1".to_vec())], vec![], vec![]);
        assert!(s.map_digests().unwrap().is_empty());
        // Changes and the digest of the state with them, in one batch: the digest stays.
        let batch = Batch {
            maps: vec![MapWrite {
                sid: Some(sid()),
                changes: vec![(shard, b"c2".to_vec())],
                ..MapWrite::default()
            }],
            digests: vec![(sid(), 42)],
            ..Batch::default()
        };
        s.commit(&batch).unwrap();
        assert_eq!(s.map_digests().unwrap(), vec![(sid(), 42)]);
        // A view-only write keeps it; any change drops it.
        write(&s, vec![], vec![("k", Some(b"v".as_slice()))], vec![]);
        assert_eq!(s.map_digests().unwrap(), vec![(sid(), 42)]);
        write(&s, vec![(shard, b"c3".to_vec())], vec![], vec![]);
        assert!(s.map_digests().unwrap().is_empty());
    }

    #[test]
    fn trust_and_invitation_records_are_kept_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.commit(&Batch {
                trust: vec![
                    ("peerA".into(), Some(b"a".to_vec())),
                    ("peerB".into(), Some(b"b".to_vec())),
                ],
                invites: vec![(vec![1; 8], Some(b"i".to_vec()))],
                ..Batch::default()
            })
            .unwrap();
            s.commit(&Batch {
                trust: vec![("peerA".into(), None)],
                ..Batch::default()
            })
            .unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(
            s.trust_records().unwrap(),
            vec![("peerB".to_string(), b"b".to_vec())]
        );
        assert_eq!(
            s.invite_records().unwrap(),
            vec![(vec![1; 8], b"i".to_vec())]
        );
        s.commit(&Batch {
            invites: vec![(vec![1; 8], None)],
            ..Batch::default()
        })
        .unwrap();
        assert!(s.invite_records().unwrap().is_empty());
        let m = MapSid::for_name("m");
        s.commit(&Batch {
            policies: vec![(m.clone(), Some(b"p".to_vec()))],
            ..Batch::default()
        })
        .unwrap();
        assert_eq!(s.map_policies().unwrap(), vec![(m.clone(), b"p".to_vec())]);
        s.commit(&Batch {
            policies: vec![(m, None)],
            ..Batch::default()
        })
        .unwrap();
        assert!(s.map_policies().unwrap().is_empty());
    }

    #[test]
    fn a_schema_3_store_is_upgraded_and_keeps_its_maps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(&s, vec![(DocAddr::Meta, b"m".to_vec())], vec![], vec![]);
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 3u32.to_le_bytes().as_slice())
                .unwrap();
            tx.delete_table(TRUST).unwrap();
            tx.delete_table(INVITES).unwrap();
            tx.delete_table(POLICIES).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(s.trust_records().unwrap().is_empty());
        assert!(s.load_map(&sid()).unwrap().is_some());
        let v = s.get_meta("schema_version").unwrap().unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
    }

    #[test]
    fn a_schema_5_store_is_upgraded_and_keeps_its_maps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(&s, vec![(DocAddr::Meta, b"m".to_vec())], vec![], vec![]);
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 5u32.to_le_bytes().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(s.load_map(&sid()).unwrap().is_some());
        let v = s.get_meta("schema_version").unwrap().unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
    }

    #[test]
    fn a_schema_6_feed_of_json_events_is_rewritten_with_every_event_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions {
            event_retention: 1500,
            ..StoreOptions::default()
        };
        let mut model = feed::tests::Model::new("old", 3);
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            // The history as schema 6 stored it: whole events as JSON, pruned to retention.
            for round in 0..600 {
                let w = model.batch(1 + round % 5, 40);
                s.commit(&Batch {
                    maps: vec![MapWrite {
                        events: Vec::new(),
                        view: ViewChanges::default(),
                        ..w
                    }],
                    ..Batch::default()
                })
                .unwrap();
            }
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 6u32.to_le_bytes().as_slice())
                .unwrap();
            {
                let old_items: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
                let old_events: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
                let mut items = tx.open_table(old_items).unwrap();
                for (k, item) in &model.items {
                    let mut key = model.sid.as_str().as_bytes().to_vec();
                    key.extend_from_slice(k.as_bytes());
                    let e = syncmesh_core::version_entry(item).unwrap();
                    items.insert(key.as_slice(), e.as_slice()).unwrap();
                }
                let mut events = tx.open_table(old_events).unwrap();
                let last = model.events.last().unwrap().id;
                for e in model.events.iter().filter(|e| e.id + 1000 > last) {
                    let mut key = model.sid.as_str().as_bytes().to_vec();
                    key.extend_from_slice(&e.id.to_be_bytes());
                    let json = serde_json::to_vec(e).unwrap();
                    events.insert(key.as_slice(), json.as_slice()).unwrap();
                }
            }
            // Documents and signatures as schema 6 keyed them: by sid.
            let mut dk = model.sid.as_str().as_bytes().to_vec();
            dk.push(1);
            dk.extend_from_slice(&0u64.to_be_bytes());
            dk.extend_from_slice(&5u16.to_be_bytes());
            let mut ck = dk.clone();
            ck.extend_from_slice(&1u64.to_be_bytes());
            let mut sk = model.sid.as_str().as_bytes().to_vec();
            sk.extend_from_slice(&[7; 32]);
            for (t, k, v) in [
                ("snapshots", dk, b"old-snap".as_slice()),
                ("changes", ck, b"old-change"),
                ("sigs", sk, b"sig"),
            ] {
                let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new(t);
                tx.open_table(def).unwrap().insert(k.as_slice(), v).unwrap();
            }
            for t in [SNAPSHOTS.name(), CHANGES.name(), SIGS.name()] {
                tx.delete_table(TableDefinition::<&[u8], &[u8]>::new(t))
                    .unwrap();
            }
            tx.delete_table(VIEW).unwrap();
            tx.delete_table(FEED).unwrap();
            tx.delete_table(VERSIONS).unwrap();
            tx.delete_table(FEED_BYTES).unwrap();
            tx.delete_table(MAP_NUMBERS).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.get_meta("schema_version").unwrap().unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
        model.check(&s);
        let m = s.load_map(&model.sid).unwrap().unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 0,
            index: 5,
        };
        let doc = &m.docs.iter().find(|(d, _)| *d == shard).unwrap().1;
        assert_eq!(doc.snapshot.as_deref(), Some(b"old-snap".as_slice()));
        assert_eq!(doc.changes, vec![b"old-change".to_vec()]);
        assert_eq!(m.sigs, vec![([7; 32], b"sig".to_vec())]);
        assert_eq!(s.last_change_seq(&model.sid, shard).unwrap(), 1);
        // The feed goes on from there, and old events are pruned with their versions.
        model.commit_rounds(&s, 600, 4);
        model.check(&s);
        drop(s);
        let s = Store::open(dir.path(), opts()).unwrap();
        model.check(&s);
    }

    #[test]
    fn a_schema_7_store_with_byte_keys_is_read_back_exactly_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions {
            event_retention: 1500,
            ..StoreOptions::default()
        };
        let mut model = feed::tests::Model::new("seven", 3);
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 2,
            index: 9,
        };
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            model.commit_rounds(&s, 400, 3);
            s.commit(&Batch {
                maps: vec![MapWrite {
                    sid: Some(model.sid.clone()),
                    changes: vec![(shard, b"c1".to_vec()), (shard, b"c2".to_vec())],
                    sigs: vec![([7; 32], b"sig7".to_vec())],
                    ..MapWrite::default()
                }],
                ..Batch::default()
            })
            .unwrap();
            s.compact_doc(&model.sid, shard, b"snap").unwrap();
            s.commit(&Batch {
                maps: vec![MapWrite {
                    sid: Some(model.sid.clone()),
                    changes: vec![(shard, b"c3".to_vec())],
                    ..MapWrite::default()
                }],
                ..Batch::default()
            })
            .unwrap();
            // Every typed row back into schema 7's byte-keyed tables, as that schema wrote
            // them (a damaged row among them).
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 7u32.to_le_bytes().as_slice())
                .unwrap();
            let bytes = |n: &'static str| TableDefinition::<&[u8], &[u8]>::new(n);
            {
                let mut rows: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::new();
                for r in tx.open_table(MAP_NUMBERS).unwrap().iter().unwrap() {
                    let (k, v) = r.unwrap();
                    rows.push((
                        "map_numbers",
                        k.value().as_bytes().to_vec(),
                        v.value().to_be_bytes().to_vec(),
                    ));
                }
                for r in tx.open_table(VIEW).unwrap().iter().unwrap() {
                    let (k, v) = r.unwrap();
                    let (n, key) = k.value();
                    let mut kb = n.to_be_bytes().to_vec();
                    kb.extend_from_slice(key.as_bytes());
                    rows.push(("view", kb, v.value().to_vec()));
                }
                for (name, t) in [("feed", FEED), ("versions", VERSIONS)] {
                    for r in tx.open_table(t).unwrap().iter().unwrap() {
                        let (k, v) = r.unwrap();
                        let (n, id) = k.value();
                        let mut kb = n.to_be_bytes().to_vec();
                        kb.extend_from_slice(&id.to_be_bytes());
                        rows.push((name, kb, v.value().to_vec()));
                    }
                }
                let doc_bytes = |(n, kind, inc, index): DocKey| {
                    let mut kb = n.to_be_bytes().to_vec();
                    kb.push(kind);
                    kb.extend_from_slice(&inc.to_be_bytes());
                    kb.extend_from_slice(&index.to_be_bytes());
                    kb
                };
                for r in tx.open_table(SNAPSHOTS).unwrap().iter().unwrap() {
                    let (k, v) = r.unwrap();
                    rows.push(("snapshots", doc_bytes(k.value()), v.value().to_vec()));
                }
                for r in tx.open_table(CHANGES).unwrap().iter().unwrap() {
                    let (k, v) = r.unwrap();
                    let (n, kind, inc, index, seq) = k.value();
                    let mut kb = doc_bytes((n, kind, inc, index));
                    kb.extend_from_slice(&seq.to_be_bytes());
                    rows.push(("changes", kb, v.value().to_vec()));
                }
                for r in tx.open_table(SIGS).unwrap().iter().unwrap() {
                    let (k, v) = r.unwrap();
                    let (n, hash) = k.value();
                    let mut kb = n.to_be_bytes().to_vec();
                    kb.extend_from_slice(hash);
                    rows.push(("sigs", kb, v.value().to_vec()));
                }
                rows.push(("changes", vec![1, 2, 3], b"damaged".to_vec()));
                for (name, k, v) in rows {
                    tx.open_table(bytes(name))
                        .unwrap()
                        .insert(k.as_slice(), v.as_slice())
                        .unwrap();
                }
            }
            tx.delete_table(MAP_NUMBERS).unwrap();
            tx.delete_table(VIEW).unwrap();
            tx.delete_table(FEED).unwrap();
            tx.delete_table(VERSIONS).unwrap();
            tx.delete_table(FEED_BYTES).unwrap();
            tx.delete_table(SNAPSHOTS).unwrap();
            tx.delete_table(CHANGES).unwrap();
            tx.delete_table(SIGS).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.get_meta("schema_version").unwrap().unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
        model.check(&s);
        let m = s.load_map(&model.sid).unwrap().unwrap();
        let doc = &m.docs.iter().find(|(d, _)| *d == shard).unwrap().1;
        assert_eq!(doc.snapshot.as_deref(), Some(b"snap".as_slice()));
        assert_eq!(doc.changes, vec![b"c3".to_vec()]);
        assert_eq!(m.sigs, vec![([7; 32], b"sig7".to_vec())]);
        assert_eq!(s.last_change_seq(&model.sid, shard).unwrap(), 3);
        {
            let tx = s.db().begin_read().unwrap();
            let names: Vec<String> = tx
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_string())
                .collect();
            for old in [
                "map_numbers",
                "view",
                "feed",
                "versions",
                "snapshots",
                "changes",
                "sigs",
            ] {
                assert!(!names.iter().any(|n| n == old), "{old} is left: {names:?}");
            }
        }
        // And it goes on: new maps get new numbers, the feed prunes, a reopen reads the same.
        model.commit_rounds(&s, 400, 3);
        model.check(&s);
        drop(s);
        let s = Store::open(dir.path(), opts()).unwrap();
        model.check(&s);
    }

    #[test]
    fn a_schema_2_store_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(&s, vec![(DocAddr::Meta, b"m".to_vec())], vec![], vec![]);
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 2u32.to_le_bytes().as_slice())
                .unwrap();
            tx.delete_table(DIGESTS).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(s.map_digests().unwrap().is_empty());
        assert!(s.load_map(&sid()).unwrap().is_some());
        let v = s.get_meta("schema_version").unwrap().unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
    }

    #[test]
    fn signatures_are_kept_through_compaction_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let shard = DocAddr::Shard {
            gen: 0,
            inc: 1,
            index: 3,
        };
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            let batch = Batch {
                maps: vec![MapWrite {
                    sid: Some(sid()),
                    changes: vec![(shard, b"c1".to_vec())],
                    sigs: vec![([7; 32], b"sig7".to_vec()), ([9; 32], b"sig9".to_vec())],
                    ..MapWrite::default()
                }],
                ..Batch::default()
            };
            s.commit(&batch).unwrap();
            s.compact_doc(&sid(), shard, b"snapshot").unwrap();
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let m = s.load_map(&sid()).unwrap().unwrap();
        assert_eq!(
            m.sigs,
            vec![([7; 32], b"sig7".to_vec()), ([9; 32], b"sig9".to_vec())]
        );
        assert!(m.docs[0].1.changes.is_empty(), "compacted");
    }

    #[test]
    fn unknown_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            let tx = s.db().begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 99u32.to_le_bytes().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UnknownSchema {
                    found: 99,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_truncated_files_give_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DB_FILE),
            b"this is not a database at all, just text",
        )
        .unwrap();
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains(DB_FILE), "{err}");
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            write(
                &s,
                vec![(DocAddr::Meta, vec![7; 10_000])],
                vec![("a", Some(b"A"))],
                vec![1],
            );
        }
        let path = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        match Store::open(dir.path(), StoreOptions::default()) {
            Err(e) => assert!(e.to_string().contains(DB_FILE), "{e}"),
            // redb may recover an older consistent state; then it must be readable
            Ok(s) => {
                let _ = s.list_maps().unwrap();
            }
        }
    }

    #[test]
    fn in_memory_store_works() {
        let s = Store::in_memory(StoreOptions::default()).unwrap();
        write(&s, vec![], vec![("k", Some(b"v"))], vec![1]);
        assert_eq!(s.load_map(&sid()).unwrap().unwrap().entries.len(), 1);
    }

    #[test]
    fn events_are_pruned_past_retention() {
        let s = Store::in_memory(StoreOptions {
            durable: true,
            event_retention: 1000,
            ..StoreOptions::default()
        })
        .unwrap();
        write(&s, vec![], vec![], (1..=2048).collect());
        let first = s.first_event_id(&sid()).unwrap().unwrap();
        assert_eq!(first, 1048);
    }
}
