//! `Node` (a data directory and its engine) and `Map` handles.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde_json::Value;
use syncmesh_core::{
    Event, Identity, Item, ItemConflicts, JsonObject, MapInfo, MapSid, MapSpec, NodeId, OpenMode,
    Page, PageRequest, Permission, Revision, Ttl, WriteOptions,
};
use syncmesh_store::{Batch, FileCompaction, Store, StoreOptions};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use syncmesh_net::{Multiaddr, NetConfig, NetHandle, NetStatus, PeerId, SwarmKey};

use crate::engine::{random16, Cmd, Engine, Net, Op, Reply, Shared, TrustCmd, COMMAND_QUEUE};
use crate::error::{Error, Result};
use crate::trust::{Invite, InviteOptions, Peers, Ticket, TrustedPeer};

/// Events buffered for live subscribers before a slow one is told it lagged (then a map's
/// subscription reads on from storage). Kept small: an event of a 16 KiB item with its
/// previous data takes ~100 KB in memory, so this is ~100 MB at worst.
const EVENT_BUFFER: usize = 1024;
/// Events a subscription holds for its consumer (at most [`SUBSCRIBER_BUFFER`] bytes of them).
const SUBSCRIBER_QUEUE: usize = 256;
/// Default bytes of events a subscription holds for its consumer.
const SUBSCRIBER_BUFFER: usize = 64 * 1024;
/// Stored events read per replay step.
const REPLAY_PAGE: usize = 512;

pub use syncmesh_core::Durability;

mod builder;
mod map;
mod subscription;

pub use builder::NodeBuilder;
pub use map::{Map, MapOpen, Snapshot};
pub use subscription::EventStream;

/// A syncmesh node: a data directory, its maps and their events. Cheap to clone.
///
/// Dropping every clone (and every [`Map`]) commits what is queued and stops the engine;
/// [`Node::close`] does the same and waits for it.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    cmds: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    id: NodeId,
    data_dir: Option<PathBuf>,
    engine: Mutex<Option<std::thread::JoinHandle<()>>>,
    net: Option<NetHandle>,
    /// Whether listen addresses were configured (they appear a moment after opening).
    listens: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

impl Node {
    /// A builder with the defaults: in memory until [`NodeBuilder::data_dir`] is set, fsync on.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Opens a node on `dir` with the defaults.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Node> {
        Node::builder().data_dir(dir).open().await
    }

    /// A node held in memory only.
    pub async fn in_memory() -> Result<Node> {
        Node::builder().in_memory().open().await
    }

    // Private, called once from `NodeBuilder::open` with what it resolved.
    #[allow(clippy::too_many_arguments)]
    fn start(
        store: Store,
        data_dir: Option<PathBuf>,
        net: Option<(NetHandle, syncmesh_net::NetEvents)>,
        hold_all: bool,
        book: crate::trust::TrustBook,
        listens: bool,
        signer: Option<syncmesh_core::Signer>,
        subscriber_buffer: usize,
        fetch_timeout: std::time::Duration,
        document_budget: u64,
        history: Option<u64>,
    ) -> Result<Node> {
        let stored_id = match store.get_meta("node_id")? {
            Some(b) => Some(NodeId::from_slice(&b).ok_or_else(|| {
                Error::from(syncmesh_store::StoreError::Corrupt {
                    path: store.path().to_path_buf(),
                    detail: "the node id record is malformed".into(),
                })
            })?),
            None => None,
        };
        let id = match stored_id {
            Some(id) => id,
            None => {
                let id = NodeId(random16());
                store.commit(&Batch {
                    meta: vec![("node_id".into(), id.0.to_vec())],
                    ..Batch::default()
                })?;
                id
            }
        };
        // A fresh actor per process: Automerge must never see one actor reuse a sequence number,
        // which a node restored from an older copy of its data directory would otherwise do.
        // A node with a key writes as an actor bound to it and signs what it writes.
        let session = random16();
        let identity = match signer {
            Some(k) => Identity::signed(id, k, &session[..8]),
            None => Identity::new(id, &session[..8]),
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (closed, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            closed,
            store: Mutex::new(Some(Arc::new(store))),
            events,
            subscriber_buffer: subscriber_buffer.clamp(1, u32::MAX as usize),
            failed: Mutex::new(None),
            committed: std::sync::atomic::AtomicU64::new(0),
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            snapshot_bytes: std::sync::atomic::AtomicUsize::new(0),
            peers: tokio::sync::watch::Sender::new(Vec::new()),
        });
        let handle = net.as_ref().map(|(h, _)| h.clone());
        let net = net.map(|(h, rx)| Net::new(h, rx, hold_all, fetch_timeout));
        let engine = Engine::new(identity, shared.clone(), net, book)?
            .document_budget(document_budget)
            .history(history);
        let (cmds, rx) = mpsc::channel(COMMAND_QUEUE);
        let thread = std::thread::Builder::new()
            .name("syncmesh-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| Error::Start {
                what: "engine thread",
                why: e.to_string(),
            })?;
        Ok(Node {
            inner: Arc::new(Inner {
                cmds,
                shared,
                id,
                data_dir,
                engine: Mutex::new(Some(thread)),
                net: handle,
                listens,
            }),
        })
    }

    /// This node's id (`created_by` of what it creates).
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The node's network: its peer id, listen addresses (with `/p2p/<peer id>`) and
    /// connected peers; `None` for a node not on a network.
    pub fn network(&self) -> Option<NetStatus> {
        self.inner.net.as_ref().map(NetHandle::status)
    }

    /// Waits until the node listens, and returns its listen addresses (each ending in
    /// `/p2p/<peer id>`). [`Error::NoNetwork`] for a node that has no listen address.
    pub async fn listening(&self) -> Result<Vec<Multiaddr>> {
        let net = self.inner.net.as_ref().ok_or(Error::NoNetwork)?;
        if !self.inner.listens {
            return Err(Error::NoNetwork);
        }
        let mut closed = self.inner.shared.closed.subscribe();
        tokio::select! {
            st = net.wait_for(|st| !st.listen_addrs.is_empty()) => {
                st.map(|st| st.listen_addrs).ok_or(Error::NoNetwork)
            }
            _ = closed.wait_for(|c| *c) => Err(Error::Closed),
        }
    }

    /// Waits until at least `n` trusted peers are connected and the node exchanges maps with
    /// them (opening a map only they hold finds it from then on); returns those peers.
    /// [`Error::NoNetwork`] for a node not on a network, [`Error::Closed`] once it closes.
    pub async fn peers_connected(&self, n: usize) -> Result<Vec<PeerId>> {
        if self.inner.net.is_none() {
            return Err(Error::NoNetwork);
        }
        let mut peers = self.inner.shared.peers.subscribe();
        let mut closed = self.inner.shared.closed.subscribe();
        tokio::select! {
            r = peers.wait_for(|p| p.len() >= n) => r.map(|p| p.clone()).map_err(|_| Error::Closed),
            _ = closed.wait_for(|c| *c) => Err(Error::Closed),
        }
    }

    /// Dials a peer once (peers given to [`NodeBuilder::peer`] are redialed on their own).
    pub fn dial(&self, addr: Multiaddr) -> Result<()> {
        match &self.inner.net {
            Some(n) => {
                n.dial(addr);
                Ok(())
            }
            None => Err(Error::NoNetwork),
        }
    }

    /// Issues an invitation: a ticket another node passes to [`Node::join`] to become trusted
    /// by this one (and to trust it), with the scope `opts` gives. The node must listen on an
    /// address the invitee can reach.
    pub async fn invite(&self, opts: InviteOptions) -> Result<Invite> {
        // Listeners report their addresses a moment after the node opens: an invitation made
        // right away waits for them (a ticket without addresses would be useless).
        if self.inner.listens {
            let wait = std::time::Duration::from_secs(10);
            let _ = tokio::time::timeout(wait, self.listening()).await;
        }
        self.call(|reply| Cmd::Trust(TrustCmd::Invite(opts, reply)))
            .await
    }

    /// Joins the node that issued `ticket`: dials it, proves the ticket's secret, and on
    /// success both nodes trust each other (stored; survives restarts). Fails with
    /// [`crate::trust::TrustError`] for a malformed, used-up, expired or forged ticket, or an
    /// unreachable inviter.
    pub async fn join(&self, ticket: &str) -> Result<TrustedPeer> {
        let t = Ticket::parse(ticket)?;
        self.call(|reply| Cmd::Trust(TrustCmd::Join(t, reply)))
            .await
    }

    /// Trusts a peer by id (every map, read and write; stored). `addrs` are dialed and kept
    /// dialed. An already trusted peer keeps its scope and gains the addresses.
    pub async fn trust(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<TrustedPeer> {
        self.call(|reply| Cmd::Trust(TrustCmd::Trust(peer, addrs, reply)))
            .await
    }

    /// Stops trusting a peer: it is disconnected and nothing more is exchanged with it, at
    /// once. Returns whether it was trusted. (A peer trusted by the configuration is trusted
    /// again at the next start unless removed from it.)
    pub async fn untrust(&self, peer: PeerId) -> Result<bool> {
        self.call(|reply| Cmd::Trust(TrustCmd::Untrust(peer, reply)))
            .await
    }

    /// Trusted, connected, discovered and refused peers, with the latest problem of each.
    pub async fn peers(&self) -> Result<Peers> {
        self.call(|reply| Cmd::Trust(TrustCmd::Peers(reply))).await
    }

    /// The data directory, or `None` in memory.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.inner.data_dir.as_deref()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmds
            .send(make(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Opens a map by unique name or sid (open-or-create), or with a full [`MapSpec`]
    /// (`create_new` / `open_existing` / `open_or_create`, TTL on creation).
    pub async fn map(&self, spec: impl Into<MapOpen>) -> Result<Map> {
        let spec = spec.into().0;
        let info = self.call(|reply| Cmd::Open { spec, reply }).await?;
        Ok(Map {
            node: self.clone(),
            sid: info.sid.clone(),
            id: info.sid.to_string(),
        })
    }

    /// Opens an existing map only. A map this node does not hold is fetched from the peers
    /// that may give it (also peers the network has connected and the node has not set up
    /// yet): the call returns once it holds everything one of them had, committed, with its
    /// events published (a subscription made after it starts with what comes next). Fails
    /// with [`syncmesh_core::Error::MapNotFound`] (54200) when no peer has it, and with
    /// [`Error::FetchIncomplete`] when it could not be fetched whole within
    /// [`NodeBuilder::fetch_timeout`] (what arrived is kept; the fetch goes on).
    pub async fn open_existing(&self, id: &str) -> Result<Map> {
        self.map(MapSpec::named(id).mode(OpenMode::OpenExisting))
            .await
    }

    /// Every live map.
    pub async fn maps(&self) -> Result<Vec<MapInfo>> {
        self.call(|reply| Cmd::List { reply }).await
    }

    /// Why this node stopped taking writes, if it did: after a failed commit (a full disk, an
    /// I/O error) every write is refused until the node is reopened, so that memory and disk
    /// never disagree about what was acknowledged. Reads go on. `None` while writes work.
    pub fn writes_stopped(&self) -> Option<String> {
        let f = self
            .inner
            .shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.as_ref().map(|e| e.to_string())
    }

    /// How many maps are loaded in memory. Maps load on first use (an operation, a TTL that
    /// falls due, or a peer with changes to them); a diagnostic for memory use.
    pub async fn loaded_maps(&self) -> Result<usize> {
        self.call(|reply| Cmd::Loaded { reply }).await
    }

    /// Resolves once every write acknowledged so far — and every write queued before this call
    /// — is on disk.
    pub async fn sync(&self) -> Result<()> {
        self.call(|reply| Cmd::Sync { reply }).await
    }

    /// Bytes of live data in the store (keys, values and B-tree overhead; not the file size).
    pub async fn used_bytes(&self) -> Result<u64> {
        let store = self.inner.shared.store()?;
        blocking(move || store.used_bytes())
            .await?
            .map_err(Error::from)
    }

    /// Size of the database file in bytes (0 for a node in memory).
    pub async fn file_bytes(&self) -> Result<u64> {
        let store = self.inner.shared.store()?;
        Ok(store.disk_bytes())
    }

    /// Replaces every document's stored change log by a snapshot (what a background
    /// compaction does after 1,000 changes or 1 MiB of them to a document), then rewrites the
    /// database file so the space this and earlier pruning freed goes back to the file system
    /// (the file otherwise keeps its largest size and reuses free space inside). Resolves when that is
    /// on disk, with what the file compaction did: [`FileCompaction::Busy`] when writes
    /// outpaced the rewrite, the disk lacked room for a copy, or the node was closing (the
    /// file is left as it is until the next call).
    ///
    /// The node keeps serving meanwhile: snapshots are taken and stored between commands and
    /// commits, and the file is copied beside itself while writes go on; writes wait only
    /// while the last few are copied (docs/benchmarks.md has the longest waits measured).
    pub async fn compact(&self) -> Result<FileCompaction> {
        let (file, done) = oneshot::channel();
        self.call(|reply| Cmd::Compact { reply, file }).await?;
        let outcome = done.await.map_err(|_| Error::Closed)?;
        // On a relaxed node the snapshots were committed without fsync.
        self.sync().await?;
        outcome
    }

    /// The estimated memory of the live (unpacked) shard documents of every map, and how many
    /// there are; [`NodeBuilder::document_budget`] bounds the first.
    pub async fn live_documents(&self) -> Result<(u64, usize)> {
        self.call(|reply| Cmd::LiveDocuments { reply }).await
    }

    /// The history each loaded map holds in memory ([`NodeBuilder::history`] bounds it).
    pub async fn history(&self) -> Result<Vec<MapHistory>> {
        self.call(|reply| Cmd::History { reply }).await
    }

    /// Commits everything queued, stops the engine and waits for it. Every clone of this
    /// node and every [`Map`] handle sees [`Error::Closed`] afterwards.
    pub async fn close(self) -> Result<()> {
        let r = self.call(|reply| Cmd::Shutdown { reply }).await;
        let handle = self
            .inner
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            blocking(move || {
                let _ = h.join();
            })
            .await?;
        } else {
            // Another close is joining the engine: return only once the file is released.
            let mut closed = self.inner.shared.closed.subscribe();
            let _ = closed.wait_for(|c| *c).await;
        }
        match r {
            Err(Error::Closed) => Ok(()), // already closed by another clone
            other => other,
        }
    }
}

/// A blocking task that did not finish (it panicked, or the runtime is shutting down).
fn task_failed(e: tokio::task::JoinError) -> Error {
    Error::Task(e.to_string())
}

/// Runs `f` on the runtime's blocking pool; [`Error::NoRuntime`] outside a tokio runtime
/// (where spawning would panic).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let h = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    h.spawn_blocking(f).await.map_err(task_failed)
}

/// Runs `f` on the caller's tokio runtime ([`Error::NoRuntime`] outside one).
fn spawn<F>(f: F) -> Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let h = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    h.spawn(f);
    Ok(())
}

/// The history one loaded map holds in memory ([`Node::history`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHistory {
    /// The map.
    pub sid: MapSid,
    /// Its unique name, if it has one.
    pub name: Option<String>,
    /// The highest history generation of its shards in memory (0: never cut).
    pub generation: u64,
    /// Its shard documents in memory.
    pub shards: usize,
    /// Automerge operations they hold, history included.
    pub ops: u64,
    /// Slots they show now (what a cut brings the operations back to).
    pub slots: u64,
}
