//! Hostile peers and edge cases found in review, against real nodes on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

#[path = "support/net.rs"]
mod support;
use support::{raw_peer, wait_for, DEADLINE};

use serde_json::json;
use syncmesh::{Multiaddr, Node};
use syncmesh_core::replication::{changes_messages, Bytes, Wire};
use syncmesh_core::{DocAddr, Identity, MapReplica, MapSid, NodeId, Timestamp, WriteOptions};

async fn node() -> (Node, Multiaddr) {
    let n = Node::builder()
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .trust_all(true)
        .open()
        .await
        .unwrap();
    let addrs = tokio::time::timeout(DEADLINE, n.listening())
        .await
        .unwrap()
        .unwrap();
    (n, addrs[0].clone())
}

/// Used to: 17 bytes of sync message from any connected peer kill the node's engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_sync_message_does_not_stop_the_node() {
    let (a, a_addr) = node().await;
    let ma = a.map("users").await.unwrap();
    ma.set("x", json!({"v": 1})).await.unwrap();
    let (h, _rx, a_peer) = raw_peer(&a_addr).await;
    let bloom = automerge::sync::BloomFilter::try_from(&[1u8, 0, 1][..]).unwrap();
    let msg = automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![automerge::sync::Have {
            last_sync: vec![],
            bloom,
        }],
        changes: automerge::sync::ChunkList::from(Vec::<Vec<u8>>::new()),
        supported_capabilities: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let bytes = Wire::Sync {
        sigs: Vec::new(),
        sid: MapSid::for_name("users"),
        msgs: vec![(DocAddr::Meta, Bytes(msg.encode()))],
    }
    .encode();
    h.send(a_peer, bytes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = tokio::time::timeout(Duration::from_secs(10), ma.set("after", json!({"v": 2}))).await;
    assert!(
        matches!(r, Ok(Ok(_))),
        "the node stopped serving after one hostile message: {r:?}"
    );
}

/// Used to: the network thread blocks on a full event channel (`emit(..).await`) and the engine,
/// once shutting down, waits for the network thread (`stop_net`) without draining events:
/// closing a node while a peer's gossip backlog exceeds 4096 events never returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_under_gossip_load() {
    let (a, a_addr) = node().await;
    let ma = a.map("users").await.unwrap();
    ma.set("x", json!({"v": 1})).await.unwrap();
    // A writer (as a raw peer): 6,000 commits of 10 items each of map "users", one gossip
    // message each.
    let sid = MapSid::for_name("users");
    let now = Timestamp::from_millis(1_700_000_000_000);
    let mut w = MapReplica::create(
        Identity::new(NodeId([9; 16]), b"w"),
        sid.clone(),
        Some("users"),
        None,
        now,
    )
    .unwrap();
    w.take_outgoing();
    let mut msgs = Vec::new();
    for i in 0..60_000 {
        w.set(
            &format!("w{i}"),
            json!({"n": i}).as_object().cloned().unwrap(),
            &WriteOptions::default(),
            now,
        )
        .unwrap();
        if i % 10 != 0 {
            continue;
        }
        w.flush(now).unwrap();
        let changes: Vec<(DocAddr, Vec<u8>)> = w
            .take_outgoing()
            .into_iter()
            .map(|c| (c.doc, c.bytes))
            .collect();
        let (m, _) = changes_messages(&sid, changes, &Default::default());
        msgs.extend(m);
    }
    let (h, _rx, a_peer) = raw_peer(&a_addr).await;
    wait_for("A receives the first changes", || {
        h.send(a_peer, msgs[0].clone());
        let ma = ma.clone();
        async move { ma.get("w0").await.is_ok() }
    })
    .await;
    for chunk in msgs[1..].chunks(200) {
        for m in chunk {
            h.send(a_peer, m.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the backlog build on A, then close it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = ma.get("w59990").await.is_ok();
    eprintln!("A has applied the last item when closing: {last}");
    drop(ma);
    let r = tokio::time::timeout(Duration::from_secs(120), a.close()).await;
    assert!(
        r.is_ok(),
        "Node::close did not return within 120 s (engine/network deadlock)"
    );
}

/// Used to: opening a map that only a peer has returns as soon as its map document arrives,
/// before any item: the caller sees an empty map that fills in later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_map_only_a_peer_has_returns_its_contents() {
    let (a, a_addr) = node().await;
    let ma = a.map("users").await.unwrap();
    for i in 0..200 {
        ma.set(&format!("k{i}"), json!({"n": i})).await.unwrap();
    }
    let b = Node::builder()
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .peer(a_addr)
        .trust_all(true)
        .open()
        .await
        .unwrap();
    wait_for("connected", || {
        let c = b.network().unwrap().connected.len();
        async move { c == 1 }
    })
    .await;
    let mb = b.open_existing("users").await.unwrap();
    let page = mb
        .items(syncmesh::PageRequest {
            page_size: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.items.len(),
        100,
        "open_existing returned, first page has {} items",
        page.items.len()
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}
