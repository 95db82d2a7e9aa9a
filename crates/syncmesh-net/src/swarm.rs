//! The swarm and its event loop, on the network thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, gossipsub, mdns, noise, ping, pnet, quic, request_response, tcp, yamux,
    Multiaddr, PeerId, Swarm, Transport,
};
use tokio::sync::mpsc;

use crate::codec::{Codec, PROTOCOL};
use crate::{Command, MessageId, NetConfig, NetError, NetEvent, NetStatus, Verdict};

#[derive(NetworkBehaviour)]
struct Behaviour {
    allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    gossipsub: gossipsub::Behaviour,
    direct: request_response::Behaviour<Codec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    ping: ping::Behaviour,
}

/// A static peer and when to dial it next.
struct StaticPeer {
    addr: Multiaddr,
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
    swarm: Swarm<Behaviour>,
    status: Arc<Mutex<NetStatus>>,
    events: mpsc::Sender<NetEvent>,
    statics: Vec<StaticPeer>,
    /// Direct messages waiting per peer; one request in flight per peer keeps them in order.
    outbox: HashMap<PeerId, VecDeque<Vec<u8>>>,
    in_flight: HashSet<PeerId>,
    max_batch: usize,
    blocked_until: Vec<(PeerId, Instant)>,
    block_for: Duration,
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
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        // Small meshes (2 nodes) and large ones (50) alike: a node keeps 1..8 mesh peers,
        // aims for 4, and publishes its own messages to every subscribed peer at once.
        .mesh_n_low(1)
        .mesh_n(4)
        .mesh_n_high(8)
        .mesh_outbound_min(1)
        .flood_publish(true)
        .heartbeat_interval(Duration::from_millis(500))
        .max_transmit_size(cfg.max_gossip + 4096)
        // Peers are authenticated by the transport (and the swarm key / allow-list):
        // unsigned messages, identified by their content so relayed copies de-duplicate.
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|m: &gossipsub::Message| {
            use sha2::Digest;
            let d = sha2::Sha256::digest(&m.data);
            gossipsub::MessageId::from(d[..20].to_vec())
        })
        .validate_messages()
        .build()
        .map_err(setup)?;
    let gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)
            .map_err(setup)?;
    let direct = request_response::Behaviour::with_codec(
        Codec::new(cfg.limits),
        [(PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
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
        gossipsub,
        direct,
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

impl Runner {
    pub(crate) fn new(
        cfg: NetConfig,
        status: Arc<Mutex<NetStatus>>,
        events: mpsc::Sender<NetEvent>,
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
        let peer_id = cfg.keypair.public().to_peer_id();
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
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.to_string(),
                    detail: e.to_string(),
                })?;
        }
        status.lock().unwrap_or_else(|p| p.into_inner()).peer_id = peer_id.to_string();
        let now = Instant::now();
        let statics = cfg
            .peers
            .iter()
            .map(|a| StaticPeer {
                addr: a.clone(),
                peer: peer_of(a),
                dialing: None,
                next: now,
                backoff: BACKOFF_MIN,
            })
            .collect();
        drop(_guard);
        Ok(Runner {
            rt,
            swarm,
            status,
            events,
            statics,
            outbox: HashMap::new(),
            in_flight: HashSet::new(),
            max_batch: cfg.limits.max_batch,
            blocked_until: Vec::new(),
            block_for: cfg.block_for,
        })
    }

    pub(crate) fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut ctl: mpsc::UnboundedReceiver<Command>,
    ) {
        let Some(rt) = self.rt.0.take() else {
            return;
        };
        rt.block_on(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                    Some(c) = ctl.recv() => self.on_command(c),
                    cmd = rx.recv() => match cmd {
                        Some(Command::Shutdown(done)) => {
                            let _ = done.send(());
                            break;
                        }
                        Some(c) => self.on_command(c),
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
    }

    fn backoff(&mut self, i: usize, now: Instant) {
        let s = &mut self.statics[i];
        s.dialing = None;
        // Jitter spreads the redials of many nodes that lost the same peer.
        let jitter = Duration::from_millis(u64::from(now.elapsed().subsec_nanos() % 100));
        s.next = now + s.backoff + jitter;
        s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
    }

    fn set_status(&mut self) {
        let connected: Vec<String> = self
            .swarm
            .connected_peers()
            .map(ToString::to_string)
            .collect();
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.connected = connected;
    }

    async fn emit(&self, ev: NetEvent) {
        // The node is gone when this fails: the thread is about to be told to stop.
        let _ = self.events.send(ev).await;
    }

    async fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = address.with_p2p(me).unwrap_or_else(|a| a);
                tracing::info!("listening on {full}");
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                st.listen_addrs.push(full.to_string());
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let s = address.to_string();
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                st.listen_addrs.retain(|a| !a.starts_with(&s));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                for s in &mut self.statics {
                    if s.dialing == Some(connection_id) || s.peer == Some(peer_id) {
                        s.dialing = None;
                        s.peer = Some(peer_id);
                        s.backoff = BACKOFF_MIN;
                    }
                }
                self.set_status();
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, "peer connected");
                    self.emit(NetEvent::PeerUp(peer_id)).await;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                self.set_status();
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, "peer disconnected ({cause:?})");
                    self.outbox.remove(&peer_id);
                    self.in_flight.remove(&peer_id);
                    let now = Instant::now();
                    for i in 0..self.statics.len() {
                        if self.statics[i].peer == Some(peer_id) {
                            self.backoff(i, now);
                        }
                    }
                    self.emit(NetEvent::PeerDown(peer_id)).await;
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let now = Instant::now();
                for i in 0..self.statics.len() {
                    if self.statics[i].dialing == Some(connection_id) {
                        tracing::debug!(addr = %self.statics[i].addr, "dial failed: {error}");
                        self.backoff(i, now);
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection failed: {error}");
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b).await,
            _ => {}
        }
    }

    async fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.emit(NetEvent::Gossip {
                    peer: propagation_source,
                    id: MessageId(message_id),
                    topic: message.topic.into_string(),
                    data: message.data,
                })
                .await;
            }
            BehaviourEvent::Direct(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let _ = self.swarm.behaviour_mut().direct.send_response(channel, ());
                        self.emit(NetEvent::Direct {
                            peer,
                            msgs: request,
                        })
                        .await;
                    }
                    request_response::Message::Response { .. } => {
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
                // The batch is lost; anti-entropy repairs it. Go on with the next one.
                tracing::debug!(%peer, "direct message failed: {error}");
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
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    if !self.swarm.is_connected(&peer) {
                        tracing::debug!(%peer, %addr, "discovered by mDNS");
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Subscribe(t) => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&gossipsub::IdentTopic::new(t))
                {
                    tracing::warn!("gossip subscription failed: {e}");
                }
            }
            Command::Unsubscribe(t) => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .unsubscribe(&gossipsub::IdentTopic::new(t));
            }
            Command::Publish { topic, data } => {
                match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic), data)
                {
                    Ok(_) => {}
                    // Nobody holds the map yet, or the same bytes went out already: a sync
                    // delivers the change when a peer comes.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
                    | Err(gossipsub::PublishError::Duplicate) => {}
                    Err(e) => tracing::debug!("gossip publish failed: {e}"),
                }
            }
            Command::Send { peer, msg } => {
                if !self.swarm.is_connected(&peer) {
                    return;
                }
                self.outbox.entry(peer).or_default().push_back(msg);
                self.flush_outbox(peer);
            }
            Command::Verdict { id, peer, verdict } => {
                let acceptance = match verdict {
                    Verdict::Accept => gossipsub::MessageAcceptance::Accept,
                    Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                    Verdict::Reject => gossipsub::MessageAcceptance::Reject,
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id.0, &peer, acceptance);
            }
            Command::Punish { peer, reason } => self.punish(peer, reason),
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, "dial failed: {e}");
                }
            }
            Command::Shutdown(_) => {}
        }
    }

    fn punish(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, "disconnecting a peer that broke the protocol: {reason}");
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
        let Some(q) = self.outbox.get_mut(&peer) else {
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
