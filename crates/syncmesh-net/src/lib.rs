//! The libp2p transport of syncmesh: a node's identity, who it trusts (a trust list, a swarm
//! key, or everyone on an isolated network), discovery (mDNS lists peers; static and trusted
//! peers are dialed with reconnect backoff), direct messages to one trusted peer, and the join
//! protocol by which a peer holding a ticket asks to be trusted.
//!
//! Closed by default: a peer that is not trusted may connect (to present a ticket) but never
//! comes up to the node, nothing it sends is delivered, and nothing is sent to it. This crate
//! moves opaque bytes; what they mean (and whether a peer misbehaves) is decided by the node,
//! which reports violators back through [`NetHandle::punish`]. The swarm runs on its own thread; [`NetHandle`] is a cheap clone
//! that sends it commands over a bounded channel, and [`NetEvent`]s come out of another.

#![warn(missing_docs)]

mod codec;
mod swarm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use libp2p::identity::Keypair;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

pub use codec::{Limits, MAX_JOIN_MESSAGE};

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
    /// Peers to dial and keep dialing (with backoff) whenever the connection is lost. Dialing
    /// a peer does not make it trusted.
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS. Discovered peers are only listed; the
    /// trusted ones among them are dialed.
    pub mdns: bool,
    /// Only nodes with this key can connect (TCP only: QUIC addresses are refused). Every
    /// holder of the key is trusted.
    pub swarm_key: Option<SwarmKey>,
    /// If set, only these peers may connect at all.
    pub allow: Option<Vec<PeerId>>,
    /// Trust every peer that connects (an isolated lab network).
    pub trust_all: bool,
    /// Peers trusted from the start, with addresses to keep dialing them at.
    pub trusted: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Peers not trusted although everyone else is (`trust_all` or a swarm key): untrusted by
    /// hand in such a mesh.
    pub denied: Vec<PeerId>,
    /// How long a connection from a peer that is not trusted may stay open (to present a
    /// ticket) before it is closed.
    pub untrusted_grace: Duration,
    /// Size limits of direct messages.
    pub limits: Limits,
    /// How long a peer that broke the protocol stays blocked.
    pub block_for: Duration,
}

impl NetConfig {
    /// A configuration with no listeners, no peers, nobody trusted and mDNS on. `limits` are
    /// the protocol's (the replication protocol owns them: syncmesh-core's `replication::wire`).
    pub fn new(keypair: Keypair, limits: Limits) -> NetConfig {
        NetConfig {
            keypair,
            listen: Vec::new(),
            peers: Vec::new(),
            mdns: true,
            swarm_key: None,
            allow: None,
            trust_all: false,
            trusted: Vec::new(),
            denied: Vec::new(),
            untrusted_grace: Duration::from_secs(30),
            // A peer sends one request at a time (two streams at most are accepted), so
            // these bound what one peer can make a node buffer.
            limits,
            block_for: Duration::from_secs(60),
        }
    }

    /// Whether every peer that can connect is trusted (`trust_all`, or a swarm key).
    pub fn trusts_everyone(&self) -> bool {
        self.trust_all || self.swarm_key.is_some()
    }
}

/// What the network tells the node. Only trusted peers come up, and only their messages are
/// delivered; everyone else is visible in [`NetStatus`] alone.
#[derive(Debug)]
pub enum NetEvent {
    /// A trusted peer connected (its first connection, or it became trusted while connected).
    PeerUp(PeerId),
    /// A trusted peer's last connection closed, or it is no longer trusted.
    PeerDown(PeerId),
    /// Direct messages from a trusted peer, in the order it sent them.
    Direct {
        /// The sender.
        peer: PeerId,
        /// The messages.
        msgs: Vec<Vec<u8>>,
    },
    /// A peer (trusted or not) presents a join request; answer with [`NetHandle::answer_join`].
    JoinRequest {
        /// The peer (authenticated by the transport).
        peer: PeerId,
        /// Which request, for the answer.
        id: JoinId,
        /// The request, as the peer sent it (the node decodes it).
        request: Vec<u8>,
        /// The address the peer connected from.
        addr: Option<Multiaddr>,
    },
    /// What came of a join this node asked for with [`NetHandle::join`].
    JoinAnswer {
        /// The peer asked.
        peer: PeerId,
        /// Its answer, or why there was none (unreachable, older protocol, timeout).
        answer: Result<Vec<u8>, String>,
    },
}

/// Identifies an inbound join request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JoinId(pub(crate) u64);

/// A peer seen through mDNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Its peer id.
    pub peer_id: PeerId,
    /// The addresses it announced.
    pub addrs: Vec<Multiaddr>,
    /// When it was last announced.
    pub last_seen: SystemTime,
}

impl NetStatus {
    fn new(peer_id: PeerId, trusts_everyone: bool) -> Self {
        NetStatus {
            peer_id,
            listen_addrs: Vec::new(),
            connected: Vec::new(),
            untrusted: Vec::new(),
            discovered: Vec::new(),
            problems: Vec::new(),
            trusts_everyone,
            stopped: false,
        }
    }
}

/// The network's status, shared by the network thread (which updates it) and the handles
/// (which read it, or wait for it to change).
pub(crate) type StatusCell = Arc<tokio::sync::watch::Sender<NetStatus>>;

/// Why a peer is not exchanging data with this node (the latest reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProblem {
    /// The peer, when known (a failed dial of an address may not know it).
    pub peer_id: Option<PeerId>,
    /// The address involved, if any.
    pub addr: Option<Multiaddr>,
    /// What happened, in words.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

/// What the node can see of the network.
#[derive(Debug, Clone)]
pub struct NetStatus {
    /// This node's peer id.
    pub peer_id: PeerId,
    /// Addresses it listens on, each ending in `/p2p/<peer id>`.
    pub listen_addrs: Vec<Multiaddr>,
    /// Trusted peers connected now (the ones data is exchanged with), in id order.
    pub connected: Vec<PeerId>,
    /// Peers connected now that are not trusted (nothing is exchanged with them; they are
    /// disconnected after a short grace period unless they present a ticket).
    pub untrusted: Vec<PeerId>,
    /// Peers found by mDNS (listed, never synced unless trusted).
    pub discovered: Vec<Discovered>,
    /// The latest problem per peer or address (not trusted, unreachable, wrong key, ...).
    pub problems: Vec<PeerProblem>,
    /// Whether every peer that connects is trusted (`trust_all` or a swarm key).
    pub trusts_everyone: bool,
    /// The network has stopped (the node closed, or left the mesh): nothing will change.
    pub stopped: bool,
}

pub(crate) enum Command {
    Send {
        peer: PeerId,
        msg: Vec<u8>,
    },
    Punish {
        peer: PeerId,
        reason: String,
    },
    Dial(Multiaddr),
    Trust {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Untrust(PeerId),
    Join {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Vec<u8>,
    },
    AnswerJoin {
        id: JoinId,
        answer: Vec<u8>,
        /// Disconnect the peer after answering (a refused join).
        close: bool,
    },
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

impl Command {
    /// What the command is, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Command::Send { .. } => "a message",
            Command::Punish { .. } => "a disconnection",
            Command::Dial(_) => "a dial",
            Command::Trust { .. } => "a trust decision",
            Command::Untrust(_) => "an untrust decision",
            Command::Join { .. } => "a join request",
            Command::AnswerJoin { .. } => "a join answer",
            Command::Shutdown(_) => "a shutdown",
        }
    }
}

/// A handle on the running network (cheap to clone).
#[derive(Clone)]
pub struct NetHandle {
    /// Data (direct messages): bounded in count and in bytes ([`MAX_QUEUED_SEND_BYTES`]),
    /// dropped when full.
    tx: mpsc::Sender<Command>,
    /// Bytes of direct messages queued for the network thread, not taken yet.
    queued: Arc<AtomicUsize>,
    /// Control (trust, joins, disconnects, dials): apart from data, so a full data queue
    /// never holds them up. One per user action or misbehaving peer, not per message; bounded
    /// ([`CONTROL_QUEUE`]) all the same.
    ctl: mpsc::Sender<Command>,
    status: StatusCell,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").finish_non_exhaustive()
    }
}

/// Network events waiting for the node: a node that falls behind slows the network thread
/// (which stops reading from peers) rather than growing memory.
const EVENT_QUEUE: usize = 4096;
/// Commands waiting for the network thread; beyond this, direct messages are dropped
/// (replication repairs what is lost) rather than block the node.
const COMMAND_QUEUE: usize = 16_384;
/// Control commands waiting for the network thread. Only a network thread that has stalled
/// fills it: the command is then dropped with an error in the log rather than block the node.
pub const CONTROL_QUEUE: usize = 1024;
/// Bytes of direct messages that may wait for the network thread: a message would make it
/// more is dropped (and repaired by replication), so a stalled network thread holds at most
/// this much, whatever the messages' sizes.
pub const MAX_QUEUED_SEND_BYTES: usize = 64 << 20;

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
        match self.ctl.try_send(c) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(c)) => tracing::error!(
                "network control queue full ({CONTROL_QUEUE} waiting): dropping {}",
                c.kind()
            ),
            // The network thread has stopped: nothing to control.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Sends a direct message to a connected, trusted peer (best effort, in order per peer).
    pub fn send(&self, peer: PeerId, msg: Vec<u8>) -> bool {
        let n = msg.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > MAX_QUEUED_SEND_BYTES {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            tracing::debug!(
                "network send queue over {MAX_QUEUED_SEND_BYTES} bytes: dropping a message"
            );
            return false;
        }
        let sent = self.cmd(Command::Send { peer, msg });
        if !sent {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
        sent
    }

    /// Disconnects a peer that broke the protocol, and refuses it for a while.
    pub fn punish(&self, peer: PeerId, reason: String) {
        self.control(Command::Punish { peer, reason });
    }

    /// Dials an address once (static peers given in the config are redialed on their own).
    pub fn dial(&self, addr: Multiaddr) {
        self.control(Command::Dial(addr));
    }

    /// Trusts a peer from now on (it comes up at once if connected), and keeps dialing it at
    /// `addrs`.
    pub fn trust(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        self.control(Command::Trust { peer, addrs });
    }

    /// Stops trusting a peer: it goes down and is disconnected at once.
    pub fn untrust(&self, peer: PeerId) {
        // Not listed as connected from now on, although the network thread closes the
        // connection a moment later.
        self.status
            .send_modify(|st| st.connected.retain(|p| *p != peer));
        self.control(Command::Untrust(peer));
    }

    /// Dials `peer` at `addrs` and sends it a join request; the answer comes back as
    /// [`NetEvent::JoinAnswer`].
    pub fn join(&self, peer: PeerId, addrs: Vec<Multiaddr>, request: Vec<u8>) {
        self.control(Command::Join {
            peer,
            addrs,
            request,
        });
    }

    /// Answers a [`NetEvent::JoinRequest`]; `close` disconnects the peer afterwards.
    pub fn answer_join(&self, id: JoinId, answer: Vec<u8>, close: bool) {
        self.control(Command::AnswerJoin { id, answer, close });
    }

    /// What the network looks like now.
    pub fn status(&self) -> NetStatus {
        self.status.borrow().clone()
    }

    /// Waits until the status satisfies `ready` (checked now and at every change), then
    /// returns it; `None` once the network has stopped.
    pub async fn wait_for(&self, mut ready: impl FnMut(&NetStatus) -> bool) -> Option<NetStatus> {
        let mut rx = self.status.subscribe();
        let st = rx.wait_for(|st| st.stopped || ready(st)).await.ok()?;
        (!st.stopped).then(|| st.clone())
    }

    /// Stops the network thread (connections close).
    pub async fn shutdown(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.status.send_modify(|st| {
            st.stopped = true;
            st.listen_addrs.clear();
            st.connected.clear();
            st.untrusted.clear();
        });
    }
}

/// Bytes of peers' messages that may wait for the node ([`NetEvents`]): past them the network
/// thread waits (and reads nothing more from peers) until the node has taken some.
pub const MAX_QUEUED_RECEIVED_BYTES: usize = 128 << 20;

/// Bytes of received messages queued for the node, shared by the network thread (which waits
/// while they are over [`MAX_QUEUED_RECEIVED_BYTES`]) and [`NetEvents`] (which frees them).
#[derive(Default)]
pub(crate) struct Received {
    pub(crate) queued: AtomicUsize,
    pub(crate) freed: tokio::sync::Notify,
}

impl Received {
    /// Bytes an event holds of peers' data.
    pub(crate) fn bytes(ev: &NetEvent) -> usize {
        match ev {
            NetEvent::Direct { msgs, .. } => msgs.iter().map(Vec::len).sum(),
            NetEvent::JoinRequest { request, .. } => request.len(),
            _ => 0,
        }
    }

    /// Waits until `n` more bytes fit (at once when nothing is queued), then counts them.
    pub(crate) async fn reserve(&self, n: usize) {
        if n == 0 {
            return;
        }
        loop {
            let queued = self.queued.load(Ordering::Acquire);
            if queued == 0 || queued.saturating_add(n) <= MAX_QUEUED_RECEIVED_BYTES {
                break;
            }
            self.freed.notified().await;
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_one();
        }
    }
}

/// The network's events for the node: bounded in count (`EVENT_QUEUE`, 4,096) and in bytes of
/// peers' data ([`MAX_QUEUED_RECEIVED_BYTES`]).
pub struct NetEvents {
    rx: mpsc::Receiver<NetEvent>,
    received: Arc<Received>,
}

impl std::fmt::Debug for NetEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetEvents").finish_non_exhaustive()
    }
}

impl NetEvents {
    /// The next event; `None` once the network has stopped.
    pub async fn recv(&mut self) -> Option<NetEvent> {
        let ev = self.rx.recv().await?;
        self.received.release(Received::bytes(&ev));
        Some(ev)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<NetEvent, mpsc::error::TryRecvError> {
        let ev = self.rx.try_recv()?;
        self.received.release(Received::bytes(&ev));
        Ok(ev)
    }
}

/// Starts the network on its own thread. Events arrive on the returned [`NetEvents`] (bounded:
/// a slow node slows the network down rather than growing memory).
pub fn start(cfg: NetConfig) -> Result<(NetHandle, NetEvents), NetError> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ctl, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let received = Arc::new(Received::default());
    let me = cfg.keypair.public().to_peer_id();
    let status = Arc::new(tokio::sync::watch::Sender::new(NetStatus::new(
        me,
        cfg.trusts_everyone(),
    )));
    let queued = Arc::new(AtomicUsize::new(0));
    let runner = swarm::Runner::new(cfg, status.clone(), ev_tx, received.clone(), queued.clone())?;
    std::thread::Builder::new()
        .name("syncmesh-net".into())
        .spawn(move || runner.run(rx, ctl_rx))
        .map_err(|e| NetError::Setup(e.to_string()))?;
    Ok((
        NetHandle {
            tx,
            ctl,
            status,
            queued,
        },
        NetEvents {
            rx: ev_rx,
            received,
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the report

    use super::*;

    #[test]
    fn direct_messages_wait_for_the_network_thread_up_to_a_byte_bound() {
        // A network thread that takes nothing: what the handle queues is bounded in bytes
        // however few the messages.
        let (tx, _rx) = mpsc::channel(COMMAND_QUEUE);
        let (ctl, _ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let me = PeerId::random();
        let h = NetHandle {
            tx,
            ctl,
            status: Arc::new(tokio::sync::watch::Sender::new(NetStatus::new(me, false))),
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let big = MAX_QUEUED_SEND_BYTES / 4 + 1;
        let sent: Vec<bool> = (0..5).map(|_| h.send(me, vec![0; big])).collect();
        assert_eq!(sent, vec![true, true, true, false, false]);
        assert_eq!(h.queued.load(Ordering::Acquire), 3 * big);
        // Small messages still fit in what is left.
        assert!(h.send(me, vec![0; 1024]));
    }

    #[test]
    fn received_messages_wait_for_the_node_past_a_byte_bound() {
        use futures::FutureExt;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let received = Arc::new(Received::default());
        let mut events = NetEvents {
            rx,
            received: received.clone(),
        };
        let direct = |n: usize| NetEvent::Direct {
            peer: PeerId::random(),
            msgs: vec![vec![0; n]],
        };
        // One message larger than the bound passes when nothing is queued.
        let big = MAX_QUEUED_RECEIVED_BYTES / 2 + 1;
        assert!(received.reserve(big).now_or_never().is_some());
        tx.try_send(direct(big)).unwrap();
        // A second one waits, however few events are queued...
        let mut next = Box::pin(received.reserve(big));
        assert!((&mut next).now_or_never().is_none());
        // ...until the node takes the first.
        assert!(events.try_recv().is_ok());
        assert!(next.now_or_never().is_some());
        assert_eq!(received.queued.load(Ordering::Acquire), big);
    }
}
