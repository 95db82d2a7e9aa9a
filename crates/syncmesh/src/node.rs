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

/// Builds a [`Node`].
#[derive(Debug, Clone, Default)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    durability: Durability,
    event_retention: Option<u64>,
    cache_bytes: Option<usize>,
    subscriber_buffer: Option<usize>,
    fetch_timeout: Option<std::time::Duration>,
    document_budget: Option<u64>,
    listen: Vec<Multiaddr>,
    peers: Vec<Multiaddr>,
    mdns: Option<bool>,
    swarm_key: Option<SwarmKey>,
    allow: Option<Vec<PeerId>>,
    hold_all: bool,
    trust: Vec<PeerId>,
    trust_all: bool,
}

impl NodeBuilder {
    /// Keep data in `dir` (created if missing).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Keep everything in memory: nothing survives the node (tests, ephemeral use).
    pub fn in_memory(mut self) -> Self {
        self.data_dir = None;
        self
    }

    /// When writes are acknowledged; see [`Durability`].
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Events retained per map for resuming subscribers (default 100,000).
    pub fn event_retention(mut self, n: u64) -> Self {
        self.event_retention = Some(n);
        self
    }

    /// Most memory the store keeps as its page cache (default 1 GiB, a ceiling: it grows only
    /// with what is read; the OS caches the file too). Lower it to bound an embedded app's
    /// memory on a large data set.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_bytes = Some(bytes);
        self
    }

    /// Listen for peers on `addr` (e.g. `/ip4/0.0.0.0/tcp/7701`; port 0 picks one, see
    /// [`Node::network`]). Joins the node to the mesh.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Keep a connection to the peer at `addr` (redialed with backoff whenever it drops).
    /// Joins the node to the mesh.
    pub fn peer(mut self, addr: Multiaddr) -> Self {
        self.peers.push(addr);
        self
    }

    /// Discover peers on the local network with mDNS: on by default once the node is on a
    /// network; `mdns(true)` alone also joins it to the mesh.
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = Some(on);
        self
    }

    /// A private mesh: only nodes with the same pre-shared key can connect (TCP only).
    pub fn swarm_key(mut self, key: SwarmKey) -> Self {
        self.swarm_key = Some(key);
        self
    }

    /// Only these peers may connect (in addition to holding the swarm key, if one is set); they
    /// are trusted.
    pub fn allow_peers(mut self, peers: impl IntoIterator<Item = PeerId>) -> Self {
        self.allow = Some(peers.into_iter().collect());
        self
    }

    /// Bytes of events one subscription holds for a consumer that does not keep up (default
    /// 64 KiB, at least one event). Past it, a map's subscription is fed from storage as its
    /// consumer reads, and the node-wide one ([`Node::subscribe`]) reports a lag: a stalled
    /// consumer costs this much memory, however many events are written.
    pub fn subscriber_buffer(mut self, bytes: usize) -> Self {
        self.subscriber_buffer = Some(bytes);
        self
    }

    /// How long [`Node::open_existing`] waits for a map that only peers hold (default 10 s).
    /// It returns the map only once it holds everything a peer it asked had; past this wait it
    /// fails with [`Error::FetchIncomplete`] (the fetch goes on in the background).
    pub fn fetch_timeout(mut self, wait: std::time::Duration) -> Self {
        self.fetch_timeout = Some(wait);
        self
    }

    /// Memory for live (unpacked) Automerge documents, all maps together (default 64 MiB,
    /// estimated per operation held). Past it the least recently used shard documents are
    /// parked as their saved bytes (~14 bytes per slot) and reloaded when used, so a node's
    /// memory follows this budget and its data size, not how much of it is in use.
    pub fn document_budget(mut self, bytes: u64) -> Self {
        self.document_budget = Some(bytes);
        self
    }

    /// Trust this peer (every map, read and write) for as long as this node runs; not stored
    /// (use [`Node::trust`] or an invitation for trust that survives restarts). A node
    /// exchanges maps only with peers it trusts.
    pub fn trust(mut self, peer: PeerId) -> Self {
        self.trust.push(peer);
        self
    }

    /// Trust every peer that connects: only for an isolated lab network, where anyone who can
    /// reach the node may read and change every map. Logged as a warning at start.
    pub fn trust_all(mut self, on: bool) -> Self {
        self.trust_all = on;
        self
    }

    /// Hold every map any peer has (a cluster or backup node), not only the maps opened here.
    pub fn hold_all_maps(mut self, on: bool) -> Self {
        self.hold_all = on;
        self
    }

    fn networked(&self) -> bool {
        !self.listen.is_empty() || !self.peers.is_empty() || self.mdns == Some(true)
    }

    /// Opens the node: the store, its identity, and the engine thread.
    pub async fn open(self) -> Result<Node> {
        let opts = StoreOptions {
            durable: self.durability == Durability::Fsync,
            event_retention: self
                .event_retention
                .unwrap_or(StoreOptions::default().event_retention),
            cache_bytes: self
                .cache_bytes
                .unwrap_or(StoreOptions::default().cache_bytes),
        };
        let dir = self.data_dir.clone();
        let store = blocking(move || match dir {
            Some(d) => Store::open(&d, opts),
            None => Store::in_memory(opts),
        })
        .await??;
        // Peers on the allow-list were named deliberately: they are trusted too.
        let mut configured = self.trust.clone();
        configured.extend(self.allow.iter().flatten().copied());
        let book = load_trust(&store, &configured)?;
        let mut signer = None;
        let net = if self.networked() {
            let keypair = match &self.data_dir {
                Some(d) => syncmesh_net::load_or_create_identity(&d.join("identity.key"))?,
                None => syncmesh_net::Keypair::generate_ed25519(),
            };
            signer = Some(syncmesh_core::Signer::new(keypair.clone()));
            let mut cfg = NetConfig::new(keypair);
            cfg.listen = self.listen.clone();
            cfg.peers = self.peers.clone();
            cfg.mdns = self.mdns.unwrap_or(true);
            cfg.swarm_key = self.swarm_key.clone();
            cfg.allow = self.allow.clone();
            cfg.trust_all = self.trust_all;
            cfg.trusted = book
                .trusted()
                .iter()
                .filter_map(|r| Some((r.peer_id.parse().ok()?, r.multiaddrs())))
                .collect();
            cfg.denied = book
                .denied()
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            if self.trust_all {
                tracing::warn!(
                    "trusting every peer that connects (trust_all): anyone who can reach this node can read and change every map"
                );
            } else if self.swarm_key.is_none() && cfg.trusted.is_empty() {
                tracing::info!(
                    "no trusted peers yet: maps are exchanged only with peers that join with a ticket or are trusted by id"
                );
            }
            Some(syncmesh_net::start(cfg)?)
        } else {
            None
        };
        let listens = !self.listen.is_empty();
        Node::start(
            store,
            self.data_dir,
            net,
            self.hold_all,
            book,
            listens,
            signer,
            self.subscriber_buffer.unwrap_or(SUBSCRIBER_BUFFER),
            self.fetch_timeout.unwrap_or(crate::engine::FETCH_TIMEOUT),
            self.document_budget
                .unwrap_or(crate::engine::DOCUMENT_BUDGET),
        )
    }
}

/// Reads the stored trust records and invitations (a record that does not decode is skipped
/// with a warning: it trusts nobody).
fn load_trust(store: &Store, config: &[PeerId]) -> Result<crate::trust::TrustBook> {
    let mut records = Vec::new();
    for (peer, bytes) in store.trust_records()? {
        match serde_json::from_slice::<crate::trust::TrustRecord>(&bytes) {
            Ok(r) if r.peer_id == peer => records.push(r),
            _ => tracing::warn!(%peer, "a stored trust record is unreadable: ignoring it"),
        }
    }
    let mut invites = Vec::new();
    for (_, bytes) in store.invite_records()? {
        match serde_json::from_slice::<crate::trust::InviteRecord>(&bytes) {
            Ok(i) => invites.push(i),
            Err(_) => tracing::warn!("a stored invitation is unreadable: ignoring it"),
        }
    }
    Ok(crate::trust::TrustBook::new(
        records,
        invites,
        config.iter().map(ToString::to_string),
    ))
}

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
        let engine =
            Engine::new(identity, shared.clone(), net, book)?.document_budget(document_budget);
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
    /// compaction does after 1,000 changes to a document), then rewrites the database file
    /// so the space this and earlier pruning freed goes back to the file system (the file
    /// otherwise keeps its largest size and reuses free space inside). Resolves when that is
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

    /// Live events of every map from now on. A subscriber that falls behind receives
    /// [`Error::Lagged`] once and continues with newer events; to miss nothing, subscribe per
    /// map with [`Map::subscribe_from`].
    pub fn subscribe(&self) -> Result<EventStream> {
        // Checked first: outside a runtime nothing would ever be delivered.
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let mut live = self.inner.shared.events.subscribe();
        let mut closed = self.inner.shared.closed.subscribe();
        let (tx, rx) = queue(self.inner.shared.subscriber_buffer);
        spawn(async move {
            loop {
                let r = tokio::select! {
                    r = live.recv() => r,
                    _ = closed.wait_for(|c| *c) => return,
                    _ = tx.closed() => return,
                };
                let (item, bytes) = match r {
                    Ok(e) => (Ok(e.event.clone()), e.bytes),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        (Err(Error::Lagged { missed: n }), 0)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(item, bytes).await.is_err() {
                    return;
                }
            }
        })?;
        Ok(EventStream {
            rx,
            resume_point: None,
        })
    }

    /// The estimated memory of the live (unpacked) shard documents of every map, and how many
    /// there are; [`NodeBuilder::document_budget`] bounds the first.
    pub async fn live_documents(&self) -> Result<(u64, usize)> {
        self.call(|reply| Cmd::LiveDocuments { reply }).await
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

/// What [`Node::map`] accepts: a name or sid (open-or-create) or a [`MapSpec`].
#[derive(Debug, Clone)]
pub struct MapOpen(MapSpec);

impl From<&str> for MapOpen {
    fn from(s: &str) -> Self {
        MapOpen(MapSpec::named(s))
    }
}

impl From<String> for MapOpen {
    fn from(s: String) -> Self {
        MapOpen(MapSpec::named(s))
    }
}

impl From<MapSpec> for MapOpen {
    fn from(s: MapSpec) -> Self {
        MapOpen(s)
    }
}

/// A handle on one map. Cheap to clone; use it from any number of tasks.
#[derive(Clone)]
pub struct Map {
    node: Node,
    sid: MapSid,
    id: String,
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").field("sid", &self.sid).finish()
    }
}

fn object(v: Value) -> Result<JsonObject> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(Error::Map(syncmesh_core::Error::InvalidData(format!(
            "expected a JSON object, got {other}"
        )))),
    }
}

impl Map {
    /// The map's sid.
    pub fn sid(&self) -> &MapSid {
        &self.sid
    }

    async fn op<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let id = self.id.clone();
        self.node
            .call(|reply| Cmd::Op {
                id,
                op: make(reply),
            })
            .await
    }

    /// The map's description.
    pub async fn info(&self) -> Result<MapInfo> {
        self.op(Op::Info).await
    }

    /// Replaces an item's data (creating it). `data` must be a JSON object.
    pub async fn set(&self, key: &str, data: Value) -> Result<Item> {
        self.set_with(key, data, WriteOptions::default()).await
    }

    /// [`Map::set`] with a TTL and/or an If-Match revision.
    pub async fn set_with(&self, key: &str, data: Value, opts: WriteOptions) -> Result<Item> {
        let d = object(data)?;
        self.op(|r| Op::Set(key.into(), d, opts, r)).await
    }

    /// Creates an item; 409/54208 if the key exists.
    pub async fn create_item(&self, key: &str, data: Value, ttl: Option<Ttl>) -> Result<Item> {
        let opts = WriteOptions {
            ttl,
            ..WriteOptions::default()
        };
        self.create_item_with(key, data, opts).await
    }

    /// [`Map::create_item`] with options: a TTL, a durability. (`if_match` is not used: a
    /// create already requires the key to be absent.)
    pub async fn create_item_with(
        &self,
        key: &str,
        data: Value,
        opts: WriteOptions,
    ) -> Result<Item> {
        let d = object(data)?;
        self.op(|r| Op::Create(key.into(), d, opts, r)).await
    }

    /// Shallow-merges `patch` into the item (creating it).
    pub async fn update(&self, key: &str, patch: Value) -> Result<Item> {
        self.update_with(key, patch, WriteOptions::default()).await
    }

    /// [`Map::update`] with a TTL and/or an If-Match revision.
    pub async fn update_with(&self, key: &str, patch: Value, opts: WriteOptions) -> Result<Item> {
        let d = object(patch)?;
        self.op(|r| Op::Update(key.into(), d, opts, r)).await
    }

    /// Runs `f` on the current data (`None` if absent) and writes what it returns; returning
    /// `None` cancels (`Ok(None)`). `f` runs on the node's engine thread: keep it quick and pure.
    pub async fn mutate<F>(&self, key: &str, f: F) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send + 'static,
    {
        self.op(|r| Op::Mutate(key.into(), WriteOptions::default(), Box::new(f), r))
            .await
    }

    /// [`Map::mutate`] with a TTL and/or an If-Match revision.
    pub async fn mutate_with<F>(&self, key: &str, opts: WriteOptions, f: F) -> Result<Option<Item>>
    where
        F: FnOnce(Option<&JsonObject>) -> Option<JsonObject> + Send + 'static,
    {
        self.op(|r| Op::Mutate(key.into(), opts, Box::new(f), r))
            .await
    }

    /// Reads an item; 404/54201 if absent or expired.
    pub async fn get(&self, key: &str) -> Result<Item> {
        self.op(|r| Op::Get(key.into(), r)).await
    }

    /// Removes an item; 404/54201 if absent.
    pub async fn remove(&self, key: &str) -> Result<()> {
        self.op(|r| Op::Remove(key.into(), None, r)).await
    }

    /// Removes an item only if its revision is `rev` (412/54205 otherwise).
    pub async fn remove_if(&self, key: &str, rev: Revision) -> Result<()> {
        self.op(|r| Op::Remove(key.into(), Some(rev), r)).await
    }

    /// A page of items in key order.
    pub async fn items(&self, req: PageRequest) -> Result<Page> {
        self.op(|r| Op::Items(req, r)).await
    }

    /// Every live item and the event stream that continues exactly after them: each change
    /// the items do not show arrives on the stream, and none they show does. This is the way
    /// to mirror a map (read it, then follow it) without missing or repeating anything. The
    /// items are copied in one step of the engine (other maps' operations wait meanwhile), so
    /// for a very large map prefer paging with [`Map::items`], whose pages carry
    /// [`Page::last_event_id`].
    pub async fn snapshot_and_subscribe(&self) -> Result<(Snapshot, EventStream)> {
        let (items, last_event_id) = self.op(Op::Listing).await?;
        let events = self.stream(Some(last_event_id)).await?;
        Ok((
            Snapshot {
                items,
                last_event_id,
            },
            events,
        ))
    }

    /// Every concurrent value of an item's fields.
    pub async fn conflicts(&self, key: &str) -> Result<ItemConflicts> {
        self.op(|r| Op::Conflicts(key.into(), r)).await
    }

    /// The map's permission entries (empty: the map is shared with every trusted peer, read
    /// and write). See [`Map::set_permission`].
    pub async fn permissions(&self) -> Result<Vec<Permission>> {
        self.op(Op::Permissions).await
    }

    /// One identity's permission entry (404/20404 if it has none).
    pub async fn permission(&self, identity: &str) -> Result<Permission> {
        self.permissions()
            .await?
            .into_iter()
            .find(|p| p.identity == identity)
            .ok_or_else(|| {
                Error::Map(syncmesh_core::Error::PermissionNotFound(
                    identity.to_string(),
                ))
            })
    }

    /// Sets a peer's permissions on the map (its identity is its peer id). Once a map has
    /// entries, only the listed peers receive it, only those with `write` can change it, and
    /// only those with `manage` can change its permissions or remove it — on every node that
    /// holds the map, since the entries travel with it. The first entry also lists this node
    /// as a manager. Needs a network (entries name peers) and, on a map with entries,
    /// `manage` for this node (403/20403 otherwise).
    pub async fn set_permission(&self, p: Permission) -> Result<Permission> {
        self.op(|r| Op::SetPermission(p, r)).await
    }

    /// Removes a peer's entry (404/20404 if it has none). Removing the last entry shares the
    /// map with every trusted peer again.
    pub async fn remove_permission(&self, identity: &str) -> Result<()> {
        self.op(|r| Op::RemovePermission(identity.into(), r)).await
    }

    /// Sets the map's TTL from now (0 clears it).
    pub async fn set_ttl(&self, ttl: Ttl) -> Result<MapInfo> {
        self.op(|r| Op::SetTtl(ttl, r)).await
    }

    /// Sets an item's TTL from now (0 clears it).
    pub async fn set_item_ttl(&self, key: &str, ttl: Ttl) -> Result<Item> {
        self.op(|r| Op::SetItemTtl(key.into(), ttl, r)).await
    }

    /// Removes the map (a replicated tombstone); later writes fail with 54200.
    pub async fn remove_map(&self) -> Result<()> {
        self.op(Op::RemoveMap).await
    }

    /// Live events of this map from now on (a consumer that falls behind is caught up from
    /// storage, so it misses nothing after subscribing).
    pub async fn subscribe(&self) -> Result<EventStream> {
        self.stream(None).await
    }

    /// Every event of this map after event id `after` (0 = from the first retained event),
    /// replayed from storage, then live: a consumer that restarts and resumes from the last
    /// id it processed misses nothing and sees nothing twice. A slow consumer never holds up
    /// writers; when it falls behind the live feed it is caught up from storage.
    pub async fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        self.stream(Some(after)).await
    }

    async fn stream(&self, after: Option<u64>) -> Result<EventStream> {
        let shared = self.node.inner.shared.clone();
        // Subscribe to the live feed first, so nothing falls between replay and live.
        let mut live = shared.events.subscribe();
        // Events of writes answered before this call may still be on their way to the live
        // feed (relaxed writes are answered before their commit): a live subscription starts
        // after the newest event the map has, published or not.
        let issued = self.op(Op::LastEventId).await.unwrap_or(0);
        let floor = if after.is_none() { issued } else { 0 };
        let budget = shared.subscriber_buffer;
        let (tx, rx) = queue(budget);
        let sid = self.sid.clone();
        let store = shared.store()?;
        // Where a live-only subscriber resumes from storage if it lags: the newest stored id.
        let lagged_from = {
            let (s2, sid2) = (store.clone(), sid.clone());
            blocking(move || s2.last_event_id(&sid2)).await??
        };
        // An id this node never issued (ids are per node; a client may come from another node
        // or a reset data directory) would silently skip every event up to it.
        if let Some(after) = after {
            let newest = lagged_from.max(issued);
            if after > newest {
                return Err(Error::UnknownEventId {
                    map: sid.to_string(),
                    after,
                    newest,
                });
            }
        }
        // 0 means "from the first retained event"; any other id must still be retained.
        if let Some(after) = after.filter(|a| *a > 0) {
            let (s2, sid2) = (store.clone(), sid.clone());
            let first = blocking(move || s2.first_event_id(&sid2)).await??;
            if let Some(first) = first {
                if first > after.saturating_add(1) {
                    return Err(Error::EventsPruned {
                        map: sid.to_string(),
                        from: after.saturating_add(1),
                        to: first,
                    });
                }
            }
        }
        drop(store);
        let resume_point = after.unwrap_or(lagged_from.max(floor));
        let mut closed = shared.closed.subscribe();
        spawn(async move {
            // `last`: id of the last event delivered; `None` = live only, nothing to replay.
            let mut last = after;
            // Only a subscription from 0 may start wherever retention starts.
            let mut gap_allowed = after == Some(0);
            loop {
                if let Some(mut from) = last {
                    // Replay from storage until it has nothing newer.
                    loop {
                        // Fetched per page: a subscriber must not keep a closed node's file open.
                        let Ok(s2) = shared.store() else { return };
                        let sid2 = sid.clone();
                        // A page costs at most about one buffer of memory, however large
                        // the events.
                        let page = tokio::task::spawn_blocking(move || {
                            s2.events_after_within(&sid2, from, REPLAY_PAGE, budget)
                        })
                        .await;
                        let page = match page {
                            Ok(Ok(p)) => p,
                            Ok(Err(e)) => {
                                let _ = tx.send(Err(e.into()), 0).await;
                                return;
                            }
                            Err(_) => return,
                        };
                        // Cut by count or by bytes: read on until a page comes back empty.
                        let full = !page.is_empty();
                        if let Some(first) = page.first().map(|(e, _)| e.id) {
                            if first > from.saturating_add(1) && !gap_allowed {
                                // Pruned while this subscriber was behind: say so and stop,
                                // rather than silently skip.
                                let _ = tx
                                    .send(
                                        Err(Error::EventsPruned {
                                            map: sid.to_string(),
                                            from: from.saturating_add(1),
                                            to: first,
                                        }),
                                        0,
                                    )
                                    .await;
                                return;
                            }
                        }
                        gap_allowed = false;
                        for (ev, bytes) in page {
                            from = ev.id;
                            if tx.send(Ok(ev), bytes).await.is_err() {
                                return;
                            }
                        }
                        last = Some(from);
                        if !full {
                            break;
                        }
                    }
                }
                // Live, skipping what replay already delivered; ends when the node closes or
                // the consumer drops the stream.
                loop {
                    let r = tokio::select! {
                        r = live.recv() => r,
                        _ = closed.wait_for(|c| *c) => return,
                        _ = tx.closed() => return,
                    };
                    match r {
                        Ok(p) if p.event.map == sid => {
                            if last.is_some_and(|l| p.event.id <= l) || p.event.id <= floor {
                                continue;
                            }
                            last = Some(p.event.id);
                            // Waits while the consumer's buffer is full; the live feed moves
                            // on meanwhile, and a lag sends this subscription to storage.
                            if tx.send(Ok(p.event.clone()), p.bytes).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Fell behind the live feed: what it missed is in storage.
                            last = Some(last.unwrap_or(lagged_from.max(floor)));
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        })?;
        Ok(EventStream {
            rx,
            resume_point: Some(resume_point),
        })
    }
}

/// Every live item of a map at one moment, from [`Map::snapshot_and_subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The items, in key order.
    pub items: Vec<syncmesh_core::Item>,
    /// The id of the newest event of the map the items reflect (0: none yet); the stream
    /// returned with them starts after it.
    pub last_event_id: u64,
}

/// An event in a subscription's buffer, with its share of the buffer's byte budget.
type Queued = (Result<Event>, Option<OwnedSemaphorePermit>);

/// The sending half of a subscription's buffer: bounded in events and in bytes (each event
/// holds its share of the byte budget until its consumer takes it).
struct QueueTx {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    max: usize,
}

impl QueueTx {
    /// Queues `item`, charged `bytes` (capped at the whole budget, so any event fits);
    /// waits while the buffer is full. `Err` once the consumer is gone.
    async fn send(&self, item: Result<Event>, bytes: usize) -> std::result::Result<(), ()> {
        let cost = u32::try_from(bytes.clamp(1, self.max)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(cost) => p.ok(),
            _ = self.tx.closed() => return Err(()),
        };
        self.tx.send((item, permit)).await.map_err(|_| ())
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A subscription's buffer of at most [`SUBSCRIBER_QUEUE`] events and `bytes` bytes.
fn queue(bytes: usize) -> (QueueTx, mpsc::Receiver<Queued>) {
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let max = bytes.clamp(1, u32::MAX as usize);
    (
        QueueTx {
            tx,
            budget: Arc::new(Semaphore::new(max)),
            max,
        },
        rx,
    )
}

/// A stream of events (`futures_core::Stream`), ending when the node closes.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Queued>,
    resume_point: Option<u64>,
}

impl EventStream {
    /// For a map's stream, the event id it starts after: every event with a larger id is
    /// delivered. For a live-only stream it is the map's newest event when it was created, so
    /// a consumer that has not seen an event yet can still resume ([`Map::subscribe_from`])
    /// without a gap. `None` for the node-wide stream (event ids are per map).
    pub fn resume_point(&self) -> Option<u64> {
        self.resume_point
    }

    /// The next event, or `None` once the node is closed.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        // The permit goes here: the event's bytes leave the buffer's budget.
        self.rx.recv().await.map(|(e, _)| e)
    }
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(|(e, _)| e))
    }
}
