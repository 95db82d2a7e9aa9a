//! The libp2p transport of syncmesh: a node's identity, a private mesh (swarm key and peer
//! allow-list), discovery (mDNS, static peers with reconnect backoff), gossip to the peers
//! holding a map, and direct messages to one peer.
//!
//! This crate moves opaque bytes; what they mean (and whether a peer misbehaves) is decided by
//! the node's replication layer, which reports violators back through
//! [`NetHandle::punish`]. The swarm runs on its own thread; [`NetHandle`] is a cheap clone
//! that sends it commands over a bounded channel, and [`NetEvent`]s come out of another.

#![warn(missing_docs)]

mod codec;
mod swarm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

pub use codec::Limits;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The identity key file exists but cannot be read or decoded.
    #[error("identity key {path}: {detail} (delete it to create a new identity, which changes the node's peer id)")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The swarm key file cannot be read or is not in the swarm.key format.
    #[error("swarm key {path}: {detail} (expected three lines: /key/swarm/psk/1.0.0/, /base16/, and 64 hex digits)")]
    SwarmKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A listen address cannot be used.
    #[error("cannot listen on {addr}: {detail}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        detail: String,
    },
    /// The transport or a protocol could not be set up.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// The network thread has stopped.
    #[error("the network has stopped")]
    Stopped,
}

/// A pre-shared swarm key: only nodes holding the same key can connect at all (libp2p
/// private networks; TCP only).
#[derive(Clone)]
pub struct SwarmKey(libp2p::pnet::PreSharedKey);

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwarmKey(fingerprint {})", self.0.fingerprint())
    }
}

impl SwarmKey {
    /// Parses the usual `swarm.key` text.
    pub fn parse(text: &str) -> Result<SwarmKey, String> {
        text.trim_start()
            .parse::<libp2p::pnet::PreSharedKey>()
            .map(SwarmKey)
            .map_err(|e| e.to_string())
    }

    /// Reads a `swarm.key` file.
    pub fn load(path: &Path) -> Result<SwarmKey, NetError> {
        let err = |detail: String| NetError::SwarmKey {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        SwarmKey::parse(&text).map_err(err)
    }

    /// A new random key, in the `swarm.key` text format.
    pub fn generate() -> Result<String, NetError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| NetError::Setup(format!("no randomness: {e}")))?;
        Ok(libp2p::pnet::PreSharedKey::new(k).to_key_file())
    }

    /// A short, non-secret fingerprint (to compare keys in logs).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }
}

/// Loads the node's identity key from `path`, creating it (owner-only permissions) if absent.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, NetError> {
    let err = |detail: String| NetError::Identity {
        path: path.to_path_buf(),
        detail,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            // Write then rename: a crash never leaves a half-written key behind.
            let tmp = path.with_extension("tmp");
            write_private(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(kp)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// How a node joins the mesh.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/0`, `/ip4/127.0.0.1/udp/0/quic-v1`, ...).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial and keep dialing (with backoff) whenever the connection is lost.
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Only nodes with this key can connect (TCP only: QUIC addresses are refused).
    pub swarm_key: Option<SwarmKey>,
    /// If set, only these peers may connect.
    pub allow: Option<Vec<PeerId>>,
    /// Size limits of direct messages.
    pub limits: Limits,
    /// Largest gossip message.
    pub max_gossip: usize,
    /// How long a peer that broke the protocol stays blocked.
    pub block_for: Duration,
}

impl NetConfig {
    /// A configuration with no listeners, no peers and mDNS on.
    pub fn new(keypair: Keypair) -> NetConfig {
        NetConfig {
            keypair,
            listen: Vec::new(),
            peers: Vec::new(),
            mdns: true,
            swarm_key: None,
            allow: None,
            // A peer sends one request at a time (two streams at most are accepted), so
            // this bounds what one peer can make a node buffer.
            limits: Limits {
                max_message: 16 << 20,
                max_batch: 32 << 20,
                max_count: 4096,
            },
            max_gossip: 1 << 20,
            block_for: Duration::from_secs(60),
        }
    }
}

/// What the network tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer connected (its first connection).
    PeerUp(PeerId),
    /// A peer's last connection closed.
    PeerDown(PeerId),
    /// Direct messages from a peer, in the order it sent them.
    Direct {
        /// The sender.
        peer: PeerId,
        /// The messages.
        msgs: Vec<Vec<u8>>,
    },
    /// A gossip message; the node must answer with [`NetHandle::verdict`] so it is relayed
    /// on (valid) or dropped and its sender penalised (invalid).
    Gossip {
        /// The peer it came from (not necessarily its author).
        peer: PeerId,
        /// Its id, for the verdict.
        id: MessageId,
        /// The topic.
        topic: String,
        /// The payload.
        data: Vec<u8>,
    },
}

/// What the node decided about a gossip message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: relay it on.
    Accept,
    /// Not relayed, and its sender is not blamed (this node could not use it).
    Ignore,
    /// Invalid: dropped, and its sender penalised.
    Reject,
}

/// A gossip message id (a hash of the payload, so copies relayed by several peers are one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(pub(crate) libp2p::gossipsub::MessageId);

/// What the node can see of the network.
#[derive(Debug, Clone, Default)]
pub struct NetStatus {
    /// This node's peer id.
    pub peer_id: String,
    /// Addresses it listens on, each ending in `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// Peers connected now.
    pub connected: Vec<String>,
}

pub(crate) enum Command {
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        topic: String,
        data: Vec<u8>,
    },
    Send {
        peer: PeerId,
        msg: Vec<u8>,
    },
    Verdict {
        id: MessageId,
        peer: PeerId,
        verdict: Verdict,
    },
    Punish {
        peer: PeerId,
        reason: String,
    },
    Dial(Multiaddr),
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

/// A handle on the running network (cheap to clone).
#[derive(Clone)]
pub struct NetHandle {
    /// Data (gossip, direct messages): bounded, dropped when full.
    tx: mpsc::Sender<Command>,
    /// Control (subscriptions, verdicts, disconnects, dials): never dropped. Bounded by what
    /// the node does (one per map, per message received, per dial), not by peers' traffic.
    ctl: mpsc::UnboundedSender<Command>,
    status: Arc<Mutex<NetStatus>>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").finish_non_exhaustive()
    }
}

/// Commands waiting for the network thread; beyond this, gossip and direct messages are
/// dropped (replication repairs what is lost) rather than block the node.
const COMMAND_QUEUE: usize = 16_384;

impl NetHandle {
    fn cmd(&self, c: Command) -> bool {
        match self.tx.try_send(c) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("network command queue full: dropping a message");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn control(&self, c: Command) {
        // Fails only once the network thread has stopped.
        let _ = self.ctl.send(c);
    }

    /// Starts receiving gossip on `topic`.
    pub fn subscribe(&self, topic: &str) {
        self.control(Command::Subscribe(topic.to_string()));
    }

    /// Stops receiving gossip on `topic`.
    pub fn unsubscribe(&self, topic: &str) {
        self.control(Command::Unsubscribe(topic.to_string()));
    }

    /// Gossips `data` to the peers subscribed to `topic` (best effort).
    pub fn publish(&self, topic: &str, data: Vec<u8>) -> bool {
        self.cmd(Command::Publish {
            topic: topic.to_string(),
            data,
        })
    }

    /// Sends a direct message to a connected peer (best effort, in order per peer).
    pub fn send(&self, peer: PeerId, msg: Vec<u8>) -> bool {
        self.cmd(Command::Send { peer, msg })
    }

    /// Answers a [`NetEvent::Gossip`]: relay it on, drop it, or drop it and penalise the
    /// sender.
    pub fn verdict(&self, id: MessageId, peer: PeerId, verdict: Verdict) {
        self.control(Command::Verdict { id, peer, verdict });
    }

    /// Disconnects a peer that broke the protocol, and refuses it for a while.
    pub fn punish(&self, peer: PeerId, reason: String) {
        self.control(Command::Punish { peer, reason });
    }

    /// Dials an address once (static peers given in the config are redialed on their own).
    pub fn dial(&self, addr: Multiaddr) {
        self.control(Command::Dial(addr));
    }

    /// What the network looks like now.
    pub fn status(&self) -> NetStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the network thread (connections close).
    pub async fn shutdown(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the network on its own thread. Events arrive on the returned receiver (bounded:
/// a slow node slows the network down rather than growing memory).
pub fn start(cfg: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    let status = Arc::new(Mutex::new(NetStatus::default()));
    let runner = swarm::Runner::new(cfg, status.clone(), ev_tx)?;
    std::thread::Builder::new()
        .name("syncmesh-net".into())
        .spawn(move || runner.run(rx, ctl_rx))
        .map_err(|e| NetError::Setup(e.to_string()))?;
    Ok((NetHandle { tx, ctl, status }, ev_rx))
}
