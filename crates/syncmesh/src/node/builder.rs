//! [`NodeBuilder`]: what a node is opened with.

use super::*;

/// Builds a [`Node`].
#[derive(Debug, Clone, Default)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    durability: Durability,
    event_retention: Option<u64>,
    event_retention_bytes: Option<u64>,
    cache_bytes: Option<usize>,
    subscriber_buffer: Option<usize>,
    fetch_timeout: Option<std::time::Duration>,
    document_budget: Option<u64>,
    history: Option<u64>,
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

    /// Most bytes a map's retained events take on disk (their records and the item versions
    /// only they still name; default 8 MiB): past it the oldest are pruned, as past
    /// [`Self::event_retention`] events. A subscriber resuming from a pruned event gets the
    /// error it gets for any pruned event.
    pub fn event_retention_bytes(mut self, bytes: u64) -> Self {
        self.event_retention_bytes = Some(bytes);
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

    /// How much history a shard document of a map keeps, in Automerge operations beyond those
    /// of its live items (it may always keep as many as its live items hold): past it the
    /// history is cut (see "History" in `docs/semantics.md`), so memory and disk follow the
    /// live data rather than the number of writes; 16 keeps them close. A node with peers
    /// cuts only while every peer it trusts is connected and all agree on the shard's state.
    ///
    /// Not set, history is kept (the default for now: a crash between a cut and the store
    /// replacing the shard's document can still lose the writes made in between).
    pub fn history(mut self, ops: u64) -> Self {
        self.history = Some(ops);
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
            event_retention_bytes: self
                .event_retention_bytes
                .unwrap_or(StoreOptions::default().event_retention_bytes),
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
            let mut cfg = NetConfig::new(keypair, crate::wire_limits());
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
            self.history,
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
