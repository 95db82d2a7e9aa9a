//! A peer running the protocol of the previous release (`/syncmesh/direct/4`, whose nodes write items field by field) is refused with
//! a reason the node shows, and the node keeps working.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, StreamProtocol};
use syncmesh_net::{Keypair, NetConfig};

#[derive(Clone, Default)]
struct OldCodec;

impl request_response::Codec for OldCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Ok(Vec::new())
    }
    async fn read_response<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Ok(Vec::new())
    }
    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Ok(())
    }
    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_on_the_older_protocol_is_refused_with_a_reason() {
    // The node under test trusts everyone, so only the protocol can stand in the way.
    let limits = syncmesh_net::Limits {
        max_message: 1 << 20,
        max_batch: 2 << 20,
        max_count: 64,
    };
    let mut cfg = NetConfig::new(Keypair::generate_ed25519(), limits);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.mdns = false;
    cfg.trust_all = true;
    let (node, mut events) = syncmesh_net::start(cfg).unwrap();
    let st = tokio::time::timeout(
        Duration::from_secs(90),
        node.wait_for(|st| !st.listen_addrs.is_empty()),
    )
    .await
    .expect("a listen address")
    .unwrap();
    let addr = st.listen_addrs[0].clone();
    let deadline = Instant::now() + Duration::from_secs(90);

    // An "old" node: the same transport, the previous direct protocol.
    let mut old = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                OldCodec,
                [(
                    StreamProtocol::new("/syncmesh/direct/4"),
                    ProtocolSupport::Full,
                )],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let old_id = *old.local_peer_id();
    old.dial(addr).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = old.select_next_some().await {
                // Say something the new node cannot understand, as an old node would.
                let peer = node_peer(&old);
                if let Some(p) = peer {
                    old.behaviour_mut().send_request(&p, vec![1, 2, 3]);
                }
            }
        }
    });

    // The node brings the peer up (it trusts everyone) and, sending to it, finds it speaks an
    // older protocol: a problem with that reason, no crash.
    let up = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some(syncmesh_net::NetEvent::PeerUp(p)) = events.recv().await {
                if p == old_id {
                    return;
                }
            }
        }
    })
    .await;
    assert!(up.is_ok(), "the old node never came up");
    loop {
        node.send(old_id, b"hello".to_vec());
        let st = node.status();
        if st
            .problems
            .iter()
            .any(|p| p.peer_id == Some(old_id) && p.reason.contains("older syncmesh protocol"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no problem recorded: {:?}",
            st.problems
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver.abort();
    node.shutdown().await;
}

fn node_peer<B: libp2p::swarm::NetworkBehaviour>(s: &libp2p::Swarm<B>) -> Option<libp2p::PeerId> {
    s.connected_peers().next().copied()
}
