//! Helpers shared by the network tests: waiting on conditions, and a raw libp2p peer.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use syncmesh::Multiaddr;

/// Generous: these machines are shared and slow; tests wait on conditions, never on time.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Polls `f` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if f().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback TCP address on a port that was free a moment ago: a node that restarts on it
/// keeps the address its peers dial.
pub fn fixed_local_addr() -> Multiaddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    format!("/ip4/127.0.0.1/tcp/{port}")
        .parse()
        .expect("a multiaddr")
}

/// A raw libp2p peer speaking the syncmesh protocols, to send what a real node never would.
pub async fn raw_peer(
    to: &Multiaddr,
) -> (
    syncmesh_net::NetHandle,
    syncmesh_net::NetEvents,
    syncmesh::PeerId,
) {
    let mut cfg = syncmesh_net::NetConfig::new(
        syncmesh_net::Keypair::generate_ed25519(),
        syncmesh::wire_limits(),
    );
    cfg.peers = vec![to.clone()];
    cfg.mdns = false;
    // The raw peer talks to whoever it reaches; the node under test decides whom it trusts.
    cfg.trust_all = true;
    let (h, mut rx) = syncmesh_net::start(cfg).unwrap();
    let peer = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(syncmesh_net::NetEvent::PeerUp(p)) = rx.recv().await {
                return p;
            }
        }
    })
    .await
    .unwrap();
    (h, rx, peer)
}
