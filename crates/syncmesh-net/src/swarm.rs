//! The swarm and its event loop, on the network thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, mdns, noise, ping, pnet, quic, request_response, tcp, yamux, Multiaddr,
    PeerId, Swarm, Transport,
};
use tokio::sync::mpsc;

use crate::codec::{Ack, Codec, JoinCodec, JOIN_PROTOCOL, PROTOCOL};
use crate::{Command, Discovered, JoinId, NetConfig, NetError, NetEvent, PeerProblem};

#[derive(NetworkBehaviour)]
struct Behaviour {
    allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    direct: request_response::Behaviour<Codec>,
    join: request_response::Behaviour<JoinCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    ping: ping::Behaviour,
}

/// Bytes of direct messages queued for one peer; beyond this new messages are dropped
/// (anti-entropy repairs them), so a peer that stops reading cannot take the node's memory.
const MAX_OUTBOX_BYTES: usize = 64 << 20;
/// Connected peers that are not trusted, at most; more are disconnected at once.
const MAX_UNTRUSTED: usize = 32;
/// Peers listed from mDNS, at most.
const MAX_DISCOVERED: usize = 256;
/// Problems remembered (one per peer or address), at most.
const MAX_PROBLEMS: usize = 256;
/// Join requests waiting for the node's answer, at most.
const MAX_PENDING_JOINS: usize = 64;

/// A static peer and when to dial it next.
struct StaticPeer {
    addr: Multiaddr,
    /// Added because the peer is trusted (dropped when it no longer is), not configured.
    from_trust: bool,
    /// The peer id once known (from the address or the first connection).
    peer: Option<PeerId>,
    dialing: Option<ConnectionId>,
    next: Instant,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A runtime that may be dropped anywhere: tokio panics when a runtime is dropped inside an
/// async context (as when a node fails to start from an async `open`), so it is shut down in
/// the background instead.
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) struct Runner {
    /// Taken out by [`Runner::run`] (a runtime must not be dropped inside itself).
    rt: Rt,
    /// Bytes of direct messages the handle queued and this thread has not taken yet.
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    swarm: Swarm<Behaviour>,
    status: crate::StatusCell,
    events: mpsc::Sender<NetEvent>,
    /// Bytes of peers' data queued in `events`.
    received: std::sync::Arc<crate::Received>,
    statics: Vec<StaticPeer>,
    /// Direct messages waiting per peer (and their bytes); one request in flight per peer
    /// keeps them in order.
    outbox: HashMap<PeerId, (VecDeque<Vec<u8>>, usize)>,
    in_flight: HashSet<PeerId>,
    max_batch: usize,
    blocked_until: Vec<(PeerId, Instant)>,
    block_for: Duration,
    trust_all: bool,
    trusted: HashSet<PeerId>,
    /// Peers no longer trusted although everyone else is (`trust_all` or a swarm key).
    denied: HashSet<PeerId>,
    /// Trusted peers the node was told are up.
    up: HashSet<PeerId>,
    /// Connected peers that are not trusted, and when they are disconnected.
    untrusted: HashMap<PeerId, Instant>,
    untrusted_grace: Duration,
    discovered: HashMap<PeerId, Discovered>,
    /// The latest problem per peer (or per address when the peer is unknown).
    problems: HashMap<String, PeerProblem>,
    /// Joins this node asked for, by peer: the request to send once connected, and the dial
    /// made for it (its failure fails the join).
    joining: HashMap<PeerId, (Vec<u8>, Option<ConnectionId>)>,
    /// Where to dial each inviter again, and whether that was done: a join whose connection
    /// closed under it is tried once more on a new connection.
    join_retry: HashMap<PeerId, (Vec<Multiaddr>, bool)>,
    /// Join requests waiting for the node's answer.
    join_channels: HashMap<JoinId, (PeerId, request_response::ResponseChannel<Vec<u8>>)>,
    next_join: u64,
    /// The remote address of each open connection.
    conn_addrs: HashMap<ConnectionId, Multiaddr>,
}

fn setup(e: impl std::fmt::Display) -> NetError {
    NetError::Setup(e.to_string())
}

fn transport(cfg: &NetConfig) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let key = &cfg.keypair;
    let noise = noise::Config::new(key).map_err(setup)?;
    let tcp_cfg = tcp::Config::default().nodelay(true);
    let tcp = match &cfg.swarm_key {
        Some(psk) => {
            let psk = psk.0;
            tcp::tokio::Transport::new(tcp_cfg)
                .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .boxed()
        }
        None => tcp::tokio::Transport::new(tcp_cfg)
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .boxed(),
    };
    if cfg.swarm_key.is_some() {
        // A private network is enforced by the TCP handshake; QUIC would bypass it.
        return Ok(tcp);
    }
    let quic = quic::tokio::Transport::new(quic::Config::new(key))
        .map(|(p, c), _| (p, StreamMuxerBox::new(c)));
    Ok(OrTransport::new(quic, tcp)
        .map(|either, _| either.into_inner())
        .boxed())
}

fn behaviour(cfg: &NetConfig) -> Result<Behaviour, NetError> {
    let direct = request_response::Behaviour::with_codec(
        Codec::new(cfg.limits),
        [(PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(2),
    );
    let join = request_response::Behaviour::with_codec(
        JoinCodec,
        [(JOIN_PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(2),
    );
    let mdns = if cfg.mdns {
        let peer = cfg.keypair.public().to_peer_id();
        match mdns::tokio::Behaviour::new(mdns::Config::default(), peer) {
            Ok(m) => Some(m),
            Err(e) => {
                // No multicast (a container, no interface): the node still works with
                // static peers.
                tracing::warn!("mDNS is unavailable, continuing without it: {e}");
                None
            }
        }
    } else {
        None
    };
    let allowed = cfg.allow.as_ref().map(|peers| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in peers {
            b.allow_peer(*p);
        }
        b
    });
    Ok(Behaviour {
        allowed: allowed.into(),
        blocked: Default::default(),
        direct,
        join,
        mdns: mdns.into(),
        ping: ping::Behaviour::new(ping::Config::new()),
    })
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

fn now_sys() -> SystemTime {
    SystemTime::now()
}

impl Runner {
    pub(crate) fn new(
        cfg: NetConfig,
        status: crate::StatusCell,
        events: mpsc::Sender<NetEvent>,
        received: std::sync::Arc<crate::Received>,
        queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<Runner, NetError> {
        let rt = Rt(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(setup)?,
        ));
        let Some(handle) = rt.0.as_ref().map(|r| r.handle().clone()) else {
            return Err(setup("no runtime"));
        };
        let _guard = handle.enter();
        let transport = transport(&cfg)?;
        let behaviour = behaviour(&cfg)?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
            .with_tokio()
            .with_other_transport(|_| transport)
            .map_err(setup)?
            .with_behaviour(|_| behaviour)
            .map_err(setup)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        for addr in &cfg.listen {
            if cfg.swarm_key.is_some() && is_quic(addr) {
                return Err(NetError::Listen {
                    addr: addr.to_string(),
                    detail: "QUIC cannot carry a private network (swarm key): use TCP".into(),
                });
            }
            if let Some(taken) = tcp_port_taken(addr) {
                return Err(NetError::Listen {
                    addr: addr.to_string(),
                    detail: taken,
                });
            }
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.to_string(),
                    detail: e.to_string(),
                })?;
        }
        let mut runner = Runner {
            rt,
            queued,
            swarm,
            status,
            events,
            received,
            statics: Vec::new(),
            outbox: HashMap::new(),
            in_flight: HashSet::new(),
            max_batch: cfg.limits.max_batch,
            blocked_until: Vec::new(),
            block_for: cfg.block_for,
            trust_all: cfg.trusts_everyone(),
            trusted: HashSet::new(),
            denied: HashSet::new(),
            up: HashSet::new(),
            untrusted: HashMap::new(),
            untrusted_grace: cfg.untrusted_grace,
            discovered: HashMap::new(),
            problems: HashMap::new(),
            joining: HashMap::new(),
            join_retry: HashMap::new(),
            join_channels: HashMap::new(),
            next_join: 0,
            conn_addrs: HashMap::new(),
        };
        for a in &cfg.peers {
            runner.add_static(a.clone(), peer_of(a), false);
        }
        for (p, addrs) in &cfg.trusted {
            runner.trusted.insert(*p);
            for a in addrs {
                runner.add_static(a.clone(), Some(*p), true);
            }
        }
        runner.denied.extend(cfg.denied.iter().copied());
        drop(_guard);
        Ok(runner)
    }

    fn is_trusted(&self, p: &PeerId) -> bool {
        !self.denied.contains(p) && (self.trust_all || self.trusted.contains(p))
    }

    fn add_static(&mut self, addr: Multiaddr, peer: Option<PeerId>, from_trust: bool) {
        if self
            .statics
            .iter()
            .any(|s| s.addr == addr && s.peer == peer)
        {
            return;
        }
        self.statics.push(StaticPeer {
            addr,
            from_trust,
            peer,
            dialing: None,
            next: Instant::now(),
            backoff: BACKOFF_MIN,
        });
    }

    /// Records (and logs once, when it changes) why a peer or address is not exchanging data.
    fn problem(&mut self, peer: Option<PeerId>, addr: Option<Multiaddr>, reason: String) {
        let key = match (&peer, &addr) {
            (Some(p), _) => p.to_string(),
            (None, Some(a)) => a.to_string(),
            (None, None) => return,
        };
        let same = self.problems.get(&key).is_some_and(|p| p.reason == reason);
        if !same {
            match (&peer, &addr) {
                (Some(p), Some(a)) => tracing::warn!(peer = %p, addr = %a, "{reason}"),
                (Some(p), None) => tracing::warn!(peer = %p, "{reason}"),
                (None, Some(a)) => tracing::warn!(addr = %a, "{reason}"),
                (None, None) => {}
            }
        }
        if self.problems.len() >= MAX_PROBLEMS && !self.problems.contains_key(&key) {
            // Forget the oldest: the list shows what is recent.
            if let Some(oldest) = self
                .problems
                .iter()
                .min_by_key(|(_, p)| p.at)
                .map(|(k, _)| k.clone())
            {
                self.problems.remove(&oldest);
            }
        }
        self.problems.insert(
            key,
            PeerProblem {
                peer_id: peer,
                addr,
                reason,
                at: now_sys(),
            },
        );
        self.publish_status();
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>, mut ctl: mpsc::Receiver<Command>) {
        let Some(rt) = self.rt.0.take() else {
            return;
        };
        rt.block_on(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                    Some(c) = ctl.recv() => self.on_command(c).await,
                    cmd = rx.recv() => match cmd {
                        Some(Command::Shutdown(done)) => {
                            let _ = done.send(());
                            break;
                        }
                        Some(c) => self.on_command(c).await,
                        None => break,
                    },
                    _ = tick.tick() => self.on_tick(),
                }
            }
        });
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.statics.len() {
            let s = &self.statics[i];
            let connected = s.peer.is_some_and(|p| self.swarm.is_connected(&p));
            if connected || s.dialing.is_some() || s.next > now {
                continue;
            }
            let opts = match s.peer {
                Some(p) => DialOpts::peer_id(p).addresses(vec![s.addr.clone()]).build(),
                None => DialOpts::unknown_peer_id().address(s.addr.clone()).build(),
            };
            let id = opts.connection_id();
            let addr = s.addr.clone();
            match self.swarm.dial(opts) {
                Ok(()) => self.statics[i].dialing = Some(id),
                Err(e) => {
                    tracing::debug!(%addr, "dial failed: {e}");
                    self.backoff(i, now);
                }
            }
        }
        let mut unblock = Vec::new();
        self.blocked_until.retain(|(p, until)| {
            if *until <= now {
                unblock.push(*p);
                false
            } else {
                true
            }
        });
        for p in unblock {
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
        // Untrusted connections get a grace period to present a ticket, then are closed.
        let waiting: HashSet<PeerId> = self.join_channels.values().map(|(p, _)| *p).collect();
        let expired: Vec<PeerId> = self
            .untrusted
            .iter()
            .filter(|(p, until)| {
                now >= **until && !self.joining.contains_key(p) && !waiting.contains(p)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.untrusted.remove(&p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    fn backoff(&mut self, i: usize, now: Instant) {
        let s = &mut self.statics[i];
        s.dialing = None;
        // Jitter spreads the redials of many nodes that lost the same peer.
        let jitter = Duration::from_millis(u64::from(now.elapsed().subsec_nanos() % 100));
        s.next = now + s.backoff + jitter;
        s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
    }

    fn publish_status(&mut self) {
        let mut connected: Vec<PeerId> = self.up.iter().copied().collect();
        connected.sort_by_key(ToString::to_string);
        let mut untrusted: Vec<PeerId> = self.untrusted.keys().copied().collect();
        untrusted.sort_by_key(ToString::to_string);
        let mut discovered: Vec<Discovered> = self.discovered.values().cloned().collect();
        discovered.sort_by_key(|d| d.peer_id.to_string());
        let mut problems: Vec<PeerProblem> = self.problems.values().cloned().collect();
        problems.sort_by_key(|p| std::cmp::Reverse(p.at));
        self.status.send_modify(|st| {
            st.connected = connected;
            st.untrusted = untrusted;
            st.discovered = discovered;
            st.problems = problems;
        });
    }

    async fn emit(&self, ev: NetEvent) {
        // Peers' data waits for room: a node that falls behind holds at most
        // `MAX_QUEUED_RECEIVED_BYTES` of it, and this thread reads nothing more meanwhile.
        self.received.reserve(crate::Received::bytes(&ev)).await;
        // The node is gone when this fails: the thread is about to be told to stop.
        let _ = self.events.send(ev).await;
    }

    /// Tells the node a trusted, connected peer is up (once).
    async fn bring_up(&mut self, peer: PeerId) {
        if self.up.insert(peer) {
            self.untrusted.remove(&peer);
            self.problems.remove(&peer.to_string());
            tracing::info!(%peer, "trusted peer connected");
            self.publish_status();
            self.emit(NetEvent::PeerUp(peer)).await;
        }
    }

    async fn bring_down(&mut self, peer: PeerId) {
        self.outbox.remove(&peer);
        self.in_flight.remove(&peer);
        if self.up.remove(&peer) {
            self.publish_status();
            self.emit(NetEvent::PeerDown(peer)).await;
        }
    }

    async fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = address.with_p2p(me).unwrap_or_else(|a| a);
                tracing::info!("listening on {full}");
                self.status.send_modify(|st| st.listen_addrs.push(full));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let s = address.to_string();
                self.status
                    .send_modify(|st| st.listen_addrs.retain(|a| !a.to_string().starts_with(&s)));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                self.conn_addrs
                    .insert(connection_id, endpoint.get_remote_address().clone());
                for s in &mut self.statics {
                    if s.dialing == Some(connection_id) || s.peer == Some(peer_id) {
                        s.dialing = None;
                        s.peer = Some(peer_id);
                        s.backoff = BACKOFF_MIN;
                    }
                }
                if num_established.get() == 1 {
                    if self.is_trusted(&peer_id) {
                        self.bring_up(peer_id).await;
                    } else {
                        if self.untrusted.len() >= MAX_UNTRUSTED {
                            // Room for the newcomer (it may bring a ticket): the idle untrusted
                            // peer closest to its deadline goes.
                            let waiting: HashSet<PeerId> =
                                self.join_channels.values().map(|(p, _)| *p).collect();
                            let victim = self
                                .untrusted
                                .iter()
                                .filter(|(p, _)| {
                                    !waiting.contains(p) && !self.joining.contains_key(p)
                                })
                                .min_by_key(|(_, t)| **t)
                                .map(|(p, _)| *p);
                            match victim {
                                Some(v) => {
                                    self.untrusted.remove(&v);
                                    let _ = self.swarm.disconnect_peer_id(v);
                                }
                                None => {
                                    let _ = self.swarm.disconnect_peer_id(peer_id);
                                    return;
                                }
                            }
                        }
                        self.untrusted
                            .insert(peer_id, Instant::now() + self.untrusted_grace);
                        if !self.joining.contains_key(&peer_id) {
                            let addr = endpoint.get_remote_address().clone();
                            self.problem(
                                Some(peer_id),
                                Some(addr),
                                "connected, but not trusted: nothing is exchanged with it (trust its peer id, or have it join with a ticket)".into(),
                            );
                        }
                        self.publish_status();
                    }
                }
                if let Some((req, _)) = self.joining.get(&peer_id).cloned() {
                    self.swarm.behaviour_mut().join.send_request(&peer_id, req);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.conn_addrs.remove(&connection_id);
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, "peer disconnected ({cause:?})");
                    self.untrusted.remove(&peer_id);
                    // Answers to its join requests can no longer reach it.
                    self.join_channels.retain(|_, (p, _)| *p != peer_id);
                    let now = Instant::now();
                    for i in 0..self.statics.len() {
                        if self.statics[i].peer == Some(peer_id) {
                            self.backoff(i, now);
                        }
                    }
                    self.bring_down(peer_id).await;
                    self.publish_status();
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let now = Instant::now();
                let mut addr = None;
                for i in 0..self.statics.len() {
                    if self.statics[i].dialing == Some(connection_id) {
                        addr = Some(self.statics[i].addr.clone());
                        self.backoff(i, now);
                    }
                }
                let reason = dial_reason(&error);
                if let Some(p) = peer_id {
                    let ours = self
                        .joining
                        .get(&p)
                        .is_some_and(|(_, id)| *id == Some(connection_id));
                    if ours && self.joining.remove(&p).is_some() {
                        self.join_retry.remove(&p);
                        self.emit(NetEvent::JoinAnswer {
                            peer: p,
                            answer: Err(reason.clone()),
                        })
                        .await;
                    }
                }
                if peer_id.is_some() || addr.is_some() {
                    self.problem(peer_id, addr, reason);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                let reason = format!(
                    "an incoming connection failed (a wrong swarm key, or not a syncmesh node): {error}"
                );
                tracing::debug!("{reason}");
                self.problem(None, Some(send_back_addr), reason);
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b).await,
            _ => {}
        }
    }

    async fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Direct(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        if !self.up.contains(&peer) {
                            // Not trusted: nothing it sends is delivered, and it is told so.
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .direct
                                .send_response(channel, Ack::NotTrusted);
                            self.problem(
                                Some(peer),
                                None,
                                "sent data but is not trusted: ignored".into(),
                            );
                            return;
                        }
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .direct
                            .send_response(channel, Ack::Accepted);
                        self.emit(NetEvent::Direct {
                            peer,
                            msgs: request,
                        })
                        .await;
                    }
                    request_response::Message::Response { response, .. } => {
                        if response == Ack::Accepted {
                            let stale = self
                                .problems
                                .get(&peer.to_string())
                                .is_some_and(|p| p.reason.starts_with("does not trust this node"));
                            if stale {
                                self.problems.remove(&peer.to_string());
                                self.publish_status();
                            }
                        }
                        if response == Ack::NotTrusted {
                            self.problem(
                                Some(peer),
                                None,
                                "does not trust this node: nothing is exchanged (have it trust this node's peer id, or join with a ticket)".into(),
                            );
                        }
                        self.in_flight.remove(&peer);
                        self.flush_outbox(peer);
                    }
                }
            }
            BehaviourEvent::Direct(request_response::Event::OutboundFailure {
                peer,
                error,
                ..
            }) => {
                if matches!(
                    error,
                    request_response::OutboundFailure::UnsupportedProtocols
                ) {
                    self.problem(
                        Some(peer),
                        None,
                        "speaks an older syncmesh protocol (or is not a syncmesh node): nothing is exchanged".into(),
                    );
                } else {
                    // The batch is lost; anti-entropy repairs it. Go on with the next one.
                    tracing::debug!(%peer, "direct message failed: {error}");
                }
                self.in_flight.remove(&peer);
                self.flush_outbox(peer);
            }
            BehaviourEvent::Direct(request_response::Event::InboundFailure {
                peer, error, ..
            }) => {
                if let request_response::InboundFailure::Io(e) = &error {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        // Oversized or malformed framing: a broken or hostile peer.
                        self.punish(peer, format!("malformed direct message: {e}"));
                        return;
                    }
                }
                tracing::debug!(%peer, "inbound direct message failed: {error}");
            }
            BehaviourEvent::Join(request_response::Event::Message {
                peer,
                message,
                connection_id,
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if self.join_channels.len() >= MAX_PENDING_JOINS {
                        let _ = self.swarm.disconnect_peer_id(peer);
                        return;
                    }
                    let id = JoinId(self.next_join);
                    self.next_join += 1;
                    self.join_channels.insert(id, (peer, channel));
                    if let Some(t) = self.untrusted.get_mut(&peer) {
                        *t = Instant::now() + self.untrusted_grace;
                    }
                    let addr = self.conn_addrs.get(&connection_id).cloned();
                    self.emit(NetEvent::JoinRequest {
                        peer,
                        id,
                        request,
                        addr,
                    })
                    .await;
                }
                request_response::Message::Response { response, .. } => {
                    self.joining.remove(&peer);
                    self.join_retry.remove(&peer);
                    self.emit(NetEvent::JoinAnswer {
                        peer,
                        answer: Ok(response),
                    })
                    .await;
                }
            },
            BehaviourEvent::Join(request_response::Event::OutboundFailure {
                peer, error, ..
            }) => {
                let closed = matches!(error, request_response::OutboundFailure::ConnectionClosed);
                let retry = match self.join_retry.get_mut(&peer) {
                    Some((addrs, done)) if closed && !*done => {
                        *done = true;
                        Some(addrs.clone())
                    }
                    _ => None,
                };
                if let Some(addrs) = retry.filter(|_| self.joining.contains_key(&peer)) {
                    // The inviter closed the connection just then (an idle untrusted one):
                    // once more, on a new connection.
                    tracing::debug!(%peer, "join connection closed: trying once more");
                    let opts = DialOpts::peer_id(peer)
                        .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                        .addresses(addrs)
                        .build();
                    let id = opts.connection_id();
                    if self.swarm.dial(opts).is_ok() {
                        if let Some(j) = self.joining.get_mut(&peer) {
                            j.1 = Some(id);
                        }
                        return;
                    }
                }
                self.join_retry.remove(&peer);
                if self.joining.remove(&peer).is_some() {
                    let reason = match error {
                        request_response::OutboundFailure::UnsupportedProtocols => {
                            "the inviter does not speak the join protocol (an older syncmesh, or not a syncmesh node)".to_string()
                        }
                        e => format!("the join request failed: {e}"),
                    };
                    self.emit(NetEvent::JoinAnswer {
                        peer,
                        answer: Err(reason),
                    })
                    .await;
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let now = now_sys();
                for (peer, addr) in list {
                    if peer == *self.swarm.local_peer_id() {
                        continue;
                    }
                    if !self.discovered.contains_key(&peer)
                        && self.discovered.len() >= MAX_DISCOVERED
                    {
                        // The list shows what is recent: the peer seen longest ago goes.
                        if let Some(old) = self
                            .discovered
                            .values()
                            .min_by_key(|d| d.last_seen)
                            .map(|d| d.peer_id)
                        {
                            self.discovered.remove(&old);
                        }
                    }
                    let d = self.discovered.entry(peer).or_insert_with(|| Discovered {
                        peer_id: peer,
                        addrs: Vec::new(),
                        last_seen: now,
                    });
                    d.last_seen = now;
                    if !d.addrs.contains(&addr) && d.addrs.len() < 8 {
                        d.addrs.push(addr.clone());
                    }
                    // Only trusted peers are dialed; the rest are listed.
                    if self.is_trusted(&peer) && !self.swarm.is_connected(&peer) {
                        tracing::debug!(%peer, %addr, "discovered by mDNS: dialing");
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    } else if !self.is_trusted(&peer) {
                        tracing::debug!(%peer, %addr, "discovered by mDNS (not trusted: listed only)");
                    }
                }
                self.publish_status();
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, addr) in list {
                    if let Some(d) = self.discovered.get_mut(&peer) {
                        d.addrs.retain(|a| *a != addr);
                        if d.addrs.is_empty() {
                            self.discovered.remove(&peer);
                        }
                    }
                }
                self.publish_status();
            }
            _ => {}
        }
    }

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Send { peer, msg } => {
                self.queued
                    .fetch_sub(msg.len(), std::sync::atomic::Ordering::AcqRel);
                if !self.up.contains(&peer) {
                    return;
                }
                let (q, bytes) = self.outbox.entry(peer).or_default();
                if *bytes + msg.len() > MAX_OUTBOX_BYTES {
                    tracing::debug!(%peer, "outbox full: dropping a message");
                    return;
                }
                *bytes += msg.len();
                q.push_back(msg);
                self.flush_outbox(peer);
            }
            Command::Punish { peer, reason } => self.punish(peer, reason),
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    self.problem(peer_of(&addr), Some(addr), format!("cannot dial: {e}"));
                }
            }
            Command::Trust { peer, addrs } => {
                self.trusted.insert(peer);
                self.denied.remove(&peer);
                // A peer found by mDNS is dialed where it was found, at once.
                let found: Vec<Multiaddr> = self
                    .discovered
                    .get(&peer)
                    .map(|d| d.addrs.clone())
                    .unwrap_or_default();
                for a in addrs.into_iter().chain(found) {
                    self.add_static(a, Some(peer), true);
                }
                if self.swarm.is_connected(&peer) {
                    self.bring_up(peer).await;
                }
            }
            Command::Untrust(peer) => {
                self.trusted.remove(&peer);
                if self.trust_all {
                    self.denied.insert(peer);
                }
                // Addresses kept because it was trusted go; configured ones stay (and connect
                // as untrusted).
                self.statics
                    .retain(|s| !(s.from_trust && s.peer == Some(peer)));
                self.bring_down(peer).await;
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Join {
                peer,
                addrs,
                request,
            } => {
                self.joining.insert(peer, (request.clone(), None));
                self.join_retry.insert(peer, (addrs.clone(), false));
                if self.swarm.is_connected(&peer) {
                    self.swarm.behaviour_mut().join.send_request(&peer, request);
                } else {
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    let id = opts.connection_id();
                    match self.swarm.dial(opts) {
                        Ok(()) => {
                            if let Some(j) = self.joining.get_mut(&peer) {
                                j.1 = Some(id);
                            }
                        }
                        // Already being dialed (a static peer): that connection carries it.
                        Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                        Err(e) => {
                            self.joining.remove(&peer);
                            self.emit(NetEvent::JoinAnswer {
                                peer,
                                answer: Err(format!("cannot dial the inviter: {e}")),
                            })
                            .await;
                        }
                    }
                }
            }
            Command::AnswerJoin { id, answer, close } => {
                if let Some((peer, channel)) = self.join_channels.remove(&id) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .join
                        .send_response(channel, answer);
                    if close {
                        // Give the answer a moment to leave: the grace period closes it.
                        self.untrusted.entry(peer).and_modify(|t| {
                            *t = (*t).min(Instant::now() + Duration::from_secs(5));
                        });
                    }
                }
            }
            Command::Shutdown(_) => {}
        }
    }

    fn punish(&mut self, peer: PeerId, reason: String) {
        self.problem(
            Some(peer),
            None,
            format!("disconnected for breaking the protocol: {reason}"),
        );
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        self.blocked_until
            .push((peer, Instant::now() + self.block_for));
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Sends the next batch of queued direct messages to `peer` if none is in flight.
    fn flush_outbox(&mut self, peer: PeerId) {
        if self.in_flight.contains(&peer) {
            return;
        }
        let Some((q, bytes)) = self.outbox.get_mut(&peer) else {
            return;
        };
        let mut batch = Vec::new();
        let mut size = 0;
        while let Some(m) = q.front() {
            if !batch.is_empty() && (size + m.len() > self.max_batch || batch.len() >= 4096) {
                break;
            }
            size += m.len();
            if let Some(m) = q.pop_front() {
                batch.push(m);
            }
        }
        *bytes = bytes.saturating_sub(size);
        if q.is_empty() {
            self.outbox.remove(&peer);
        }
        if batch.is_empty() {
            return;
        }
        self.in_flight.insert(peer);
        self.swarm.behaviour_mut().direct.send_request(&peer, batch);
    }
}

/// Words for a failed dial: unreachable, a wrong swarm key, or another peer at the address.
fn dial_reason(e: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    match e {
        DialError::WrongPeerId { obtained, .. } => {
            format!("a different node ({obtained}) answers at this address")
        }
        DialError::Transport(errs) => {
            let text: Vec<String> = errs.iter().map(|(a, e)| format!("{a}: {e}")).collect();
            let joined = text.join("; ");
            if joined.contains("Handshake") || joined.contains("pnet") || joined.contains("Pnet") {
                format!("the connection handshake failed (a wrong or missing swarm key?): {joined}")
            } else {
                format!("unreachable: {joined}")
            }
        }
        DialError::Denied { cause } => format!("refused by this node's peer lists: {cause}"),
        other => format!("cannot connect: {other}"),
    }
}

/// libp2p's TCP listener sets `SO_REUSEPORT`, so a second process could bind a fixed port a
/// node already listens on, and dialers would reach either. A plain bind first finds the port
/// taken (by anyone, libp2p or not); port 0 and QUIC are left to libp2p.
fn tcp_port_taken(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            Protocol::Udp(_) => return None,
            _ => {}
        }
    }
    let (ip, port) = (ip?, port.filter(|p| *p != 0)?);
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "TCP port {port} is already in use by another process (another node?); pick another --listen port"
        )),
        Err(_) => None, // anything else: libp2p reports it
    }
}
