//! Replication between real nodes over libp2p on 127.0.0.1: fan-out, convergence of
//! concurrent writes, catch-up after a restart, a healed partition, relaying along a line,
//! maps only a peer has, hold-all nodes, and a private mesh that strangers cannot enter.
//!
//! No test waits a fixed time: each waits for a condition, with a generous deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::path::Path;
use std::time::Duration;

#[path = "support/net.rs"]
mod support;
use support::{fixed_local_addr, raw_peer, wait_for, DEADLINE};

use serde_json::json;
use syncmesh::{EventKind, Map, MapSpec, Multiaddr, Node, OpenMode, PageRequest, SwarmKey};

fn local() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

/// A node on 127.0.0.1 (mDNS off: tests must not find strangers on the LAN).
async fn node(dir: Option<&Path>, peers: &[Multiaddr]) -> Node {
    // These tests are about replication, not trust: every node trusts every peer.
    let mut b = Node::builder().listen(local()).mdns(false).trust_all(true);
    if let Some(d) = dir {
        b = b.data_dir(d);
    }
    for p in peers {
        b = b.peer(p.clone());
    }
    b.open().await.unwrap()
}

/// The node's first listen address (with `/p2p/`), once it is listening.
async fn addr(n: &Node) -> Multiaddr {
    let addrs = tokio::time::timeout(DEADLINE, n.listening())
        .await
        .expect("listening within the deadline")
        .unwrap();
    addrs[0].clone()
}

/// Waits until the node exchanges maps with `count` peers.
async fn connected(n: &Node, count: usize) {
    tokio::time::timeout(DEADLINE, n.peers_connected(count))
        .await
        .unwrap_or_else(|_| panic!("{count} connected peers within the deadline"))
        .unwrap();
}

async fn items(m: &Map) -> Vec<(String, serde_json::Value, String)> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let req = PageRequest {
            page_size: Some(100),
            token: token.take(),
            ..PageRequest::default()
        };
        let page = m.items(req).await.unwrap();
        for i in page.items {
            out.push((
                i.key,
                serde_json::Value::Object(i.data),
                i.revision.to_string(),
            ));
        }
        match page.next_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

async fn same_items(maps: &[&Map], count: usize) {
    wait_for(&format!("identical maps of {count} items"), || async {
        let first = items(maps[0]).await;
        if first.len() != count {
            return false;
        }
        for m in &maps[1..] {
            if items(m).await != first {
                return false;
            }
        }
        true
    })
    .await;
}

async fn has(m: &Map, key: &str) -> bool {
    m.get(key).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_see_each_others_writes_as_remote_events() {
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let b = node(None, std::slice::from_ref(&a_addr)).await;
    let b_addr = addr(&b).await;
    let c = node(None, &[a_addr, b_addr]).await;
    connected(&a, 2).await;
    connected(&c, 2).await;
    let (ma, mb, mc) = (
        a.map("users").await.unwrap(),
        b.map("users").await.unwrap(),
        c.map("users").await.unwrap(),
    );
    let mut events_b = mb.subscribe().await.unwrap();
    ma.set("from_a", json!({"n": 1})).await.unwrap();
    mb.set("from_b", json!({"n": 2})).await.unwrap();
    mc.set("from_c", json!({"n": 3})).await.unwrap();
    for m in [&ma, &mb, &mc] {
        for k in ["from_a", "from_b", "from_c"] {
            wait_for(&format!("{k} everywhere"), || has(m, k)).await;
        }
    }
    same_items(&[&ma, &mb, &mc], 3).await;
    // B's subscription: its own write local, the others remote, each exactly once.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(DEADLINE, events_b.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let EventKind::ItemAdded { item } = &e.kind {
            seen.push((item.key.clone(), e.is_local));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("from_a".to_string(), false),
            ("from_b".to_string(), true),
            ("from_c".to_string(), false)
        ]
    );
    // Nothing more arrives for those keys (exactly once), even after anti-entropy rounds.
    mb.set("marker", json!({})).await.unwrap();
    let e = tokio::time::timeout(DEADLINE, events_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        e.kind.key(),
        Some("marker"),
        "no extra event before the marker"
    );
    for n in [a, b, c] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_the_same_keys_converge() {
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let b = node(None, std::slice::from_ref(&a_addr)).await;
    let c = node(None, &[a_addr]).await;
    connected(&a, 2).await;
    let maps = [
        a.map("users").await.unwrap(),
        b.map("users").await.unwrap(),
        c.map("users").await.unwrap(),
    ];
    let mut tasks = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..30 {
                let key = format!("k{}", r % 5);
                m.update(
                    &key,
                    json!({"country": format!("n{i}"), format!("f{i}"): r}),
                )
                .await
                .unwrap();
                if r % 7 == 0 {
                    m.set(&key, json!({"phone_number": r, "by": i}))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    same_items(&[&maps[0], &maps[1], &maps[2]], 5).await;
    for n in [a, b, c] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_a_partition_heals() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(Some(dirs[0].path()), &[]).await;
    let a_addr = addr(&a).await;
    let b = node(Some(dirs[1].path()), std::slice::from_ref(&a_addr)).await;
    let c = node(Some(dirs[2].path()), std::slice::from_ref(&a_addr)).await;
    connected(&a, 2).await;
    let (ma, mb, mc) = (
        a.map("users").await.unwrap(),
        b.map("users").await.unwrap(),
        c.map("users").await.unwrap(),
    );
    for i in 0..50 {
        ma.set(&format!("k{i}"), json!({"n": i})).await.unwrap();
    }
    wait_for("C has the first writes", || has(&mc, "k49")).await;
    // C stops while A keeps writing.
    let writer = {
        let ma = ma.clone();
        tokio::spawn(async move {
            for i in 50..400 {
                ma.set(&format!("k{i}"), json!({"n": i})).await.unwrap();
            }
        })
    };
    drop(mc);
    c.close().await.unwrap();
    writer.await.unwrap();
    // Partition {A, B} | {C}: C writes offline, A and B write too, some keys on both sides.
    let c = Node::open(dirs[2].path()).await.unwrap();
    let mc = c.open_existing("users").await.unwrap();
    for i in 0..20 {
        mc.set(&format!("c{i}"), json!({"side": "c"}))
            .await
            .unwrap();
        mc.update(&format!("k{i}"), json!({"side": "c"}))
            .await
            .unwrap();
        mb.update(&format!("k{i}"), json!({"side": "ab", "other": i}))
            .await
            .unwrap();
    }
    c.close().await.unwrap();
    // C comes back on the network: it catches up and the sides merge.
    let c = node(Some(dirs[2].path()), &[a_addr]).await;
    let mc = c.open_existing("users").await.unwrap();
    same_items(&[&ma, &mb, &mc], 420).await;
    let k3 = mc.get("k3").await.unwrap();
    assert_eq!(k3.data["other"], 3, "fields written on both sides merge");
    for n in [a, b, c] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_relays_and_maps_only_a_peer_has_can_be_opened() {
    // A - B - C: A and C are not connected.
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let b = node(None, &[a_addr]).await;
    let b_addr = addr(&b).await;
    let c = node(None, &[b_addr]).await;
    connected(&b, 2).await;
    let ma = a.map("users").await.unwrap();
    ma.set("before", json!({"v": 1})).await.unwrap();
    // B and C open the map that only A has, by name and by sid.
    let mb = b
        .map(MapSpec::named("users").mode(OpenMode::OpenExisting))
        .await
        .unwrap();
    let mc = c.map(ma.sid().as_str()).await.unwrap();
    wait_for("B has A's item", || has(&mb, "before")).await;
    wait_for("C has A's item", || has(&mc, "before")).await;
    assert!(!c
        .network()
        .unwrap()
        .connected
        .contains(&a.network().unwrap().peer_id));
    let mut events_c = mc.subscribe().await.unwrap();
    ma.set("relayed", json!({"v": 2})).await.unwrap();
    let e = loop {
        let e = tokio::time::timeout(DEADLINE, events_c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if e.kind.key() == Some("relayed") {
            break e;
        }
    };
    assert!(!e.is_local);
    // A map no peer has is not found (after asking).
    let err = c
        .map(MapSpec::named("nobody-has-it").mode(OpenMode::OpenExisting))
        .await
        .unwrap_err();
    assert_eq!(err.code(), 54200);
    // Removing the map spreads along the line.
    ma.remove_map().await.unwrap();
    wait_for("removal reaches C", || async { mc.info().await.is_err() }).await;
    for n in [a, b, c] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_all_node_keeps_every_map() {
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let backup = Node::builder()
        .listen(local())
        .mdns(false)
        .peer(a_addr)
        .trust_all(true)
        .hold_all_maps(true)
        .open()
        .await
        .unwrap();
    connected(&a, 1).await;
    for name in ["one", "two", "three"] {
        a.map(name)
            .await
            .unwrap()
            .set("k", json!({"map": name}))
            .await
            .unwrap();
    }
    wait_for("the backup holds all three maps", || async {
        backup.maps().await.unwrap().len() == 3
    })
    .await;
    let two = backup.open_existing("two").await.unwrap();
    wait_for("the backup has the item", || has(&two, "k")).await;
    a.close().await.unwrap();
    backup.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_without_the_key_or_off_the_list_get_nothing() {
    let key = SwarmKey::parse(&SwarmKey::generate().unwrap()).unwrap();
    let other_key = SwarmKey::parse(&SwarmKey::generate().unwrap()).unwrap();
    let with = |k: &SwarmKey| {
        Node::builder()
            .listen(local())
            .mdns(false)
            .swarm_key(k.clone())
    };
    let a = with(&key).open().await.unwrap();
    let a_addr = addr(&a).await;
    let b = with(&key).peer(a_addr.clone()).open().await.unwrap();
    let stranger = with(&other_key).peer(a_addr.clone()).open().await.unwrap();
    let keyless = node(None, std::slice::from_ref(&a_addr)).await;
    let ma = a.map("secret").await.unwrap();
    ma.set("k", json!({"v": 1})).await.unwrap();
    let mb = b.map("secret").await.unwrap();
    let ms = stranger.map("secret").await.unwrap();
    let mk = keyless.map("secret").await.unwrap();
    wait_for("B (with the key) syncs", || has(&mb, "k")).await;
    // The strangers wrote too; nothing of theirs reaches A, nothing of A's reaches them.
    ms.set("evil", json!({})).await.unwrap();
    mk.set("evil2", json!({})).await.unwrap();
    mb.set("after", json!({})).await.unwrap();
    wait_for("A has B's later write", || has(&ma, "after")).await;
    assert!(!has(&ms, "k").await && !has(&mk, "k").await);
    assert!(!has(&ma, "evil").await && !has(&ma, "evil2").await);
    assert!(stranger.network().unwrap().connected.is_empty());
    assert!(keyless.network().unwrap().connected.is_empty());

    // An allow-list: only B may connect to D.
    let b_id: syncmesh::PeerId = b.network().unwrap().peer_id;
    let d = with(&key).allow_peers([b_id]).open().await.unwrap();
    let d_addr = addr(&d).await;
    let off_list = with(&key).peer(d_addr.clone()).open().await.unwrap();
    b.dial(d_addr).unwrap();
    connected(&d, 1).await;
    let md = d.map("secret").await.unwrap();
    wait_for("D syncs with B", || has(&md, "k")).await;
    let mo = off_list.map("secret").await.unwrap();
    mo.set("evil3", json!({})).await.unwrap();
    md.set("after-d", json!({})).await.unwrap();
    wait_for("B has D's write", || has(&mb, "after-d")).await;
    assert!(!has(&mo, "k").await && !has(&md, "evil3").await);
    assert_eq!(d.network().unwrap().connected.len(), 1);
    for n in [a, b, stranger, keyless, d, off_list] {
        n.close().await.unwrap();
    }
}

/// Waits until `rx` reports that `peer` disconnected, running `poke` until then.
async fn dropped(
    rx: &mut syncmesh_net::NetEvents,
    peer: syncmesh::PeerId,
    mut poke: impl FnMut(u32),
) {
    let start = std::time::Instant::now();
    let mut i = 0;
    loop {
        poke(i);
        i += 1;
        let r = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        if let Ok(Some(syncmesh_net::NetEvent::PeerDown(p))) = r {
            if p == peer {
                return;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the hostile peer was not dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_sending_garbage_are_dropped_while_the_others_keep_syncing() {
    use syncmesh_core::replication::changes_messages;
    use syncmesh_core::{DocAddr, MapSid};
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let b = node(None, std::slice::from_ref(&a_addr)).await;
    let ma = a.map("users").await.unwrap();
    let mb = b.map("users").await.unwrap();
    ma.set("first", json!({})).await.unwrap();
    wait_for("B syncs", || has(&mb, "first")).await;

    // Garbage on the direct protocol.
    let (h, mut rx, a_peer) = raw_peer(&a_addr).await;
    dropped(&mut rx, a_peer, |i| {
        if i == 0 {
            h.send(a_peer, b"\xff\x00garbage".to_vec());
        }
    })
    .await;

    // Well-formed changes carrying a well-formed Automerge change that breaks the map's
    // layout (a slot in the wrong shard).
    let (h2, mut rx2, a_peer2) = raw_peer(&a_addr).await;
    let sid = MapSid::for_name("users");
    dropped(&mut rx2, a_peer2, |i| {
        use automerge::transaction::Transactable;
        let mut doc = automerge::AutoCommit::new();
        doc.put(
            automerge::ROOT,
            format!("m{}:evil{i}", 4 + i.to_string().len()),
            1,
        )
        .unwrap();
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        // Shard 0 is not where these keys live.
        let (msgs, _) = changes_messages(
            &sid,
            vec![(
                DocAddr::Shard {
                    gen: 0,
                    inc: 0,
                    index: 0,
                },
                change,
            )],
            &Default::default(),
        );
        h2.send(a_peer2, msgs[0].clone());
    })
    .await;

    // The honest pair never stopped.
    ma.set("after", json!({})).await.unwrap();
    wait_for("B still syncs", || has(&mb, "after")).await;
    assert!(!a.network().unwrap().connected.contains(&a_peer2));
    assert_eq!(
        items(&ma).await.len(),
        2,
        "nothing of the garbage was applied"
    );
    same_items(&[&ma, &mb], 2).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_is_redialed_after_it_restarts_with_the_same_identity() {
    // B listens on a fixed port so A's static address stays right across B's restart.
    let b_listen = fixed_local_addr();
    let b_dir = tempfile::tempdir().unwrap();
    let open_b = || {
        Node::builder()
            .data_dir(b_dir.path())
            .listen(b_listen.clone())
            .mdns(false)
            .trust_all(true)
            .open()
    };
    let b = open_b().await.unwrap();
    let b_id = b.network().unwrap().peer_id;
    let a = node(None, std::slice::from_ref(&b_listen)).await;
    connected(&a, 1).await;
    let ma = a.map("users").await.unwrap();
    let mb = b.map("users").await.unwrap();
    mb.set("before", json!({})).await.unwrap();
    wait_for("A has B's write", || has(&ma, "before")).await;
    drop(mb);
    b.close().await.unwrap();
    wait_for("A sees B gone", || {
        let c = a.network().unwrap().connected.len();
        async move { c == 0 }
    })
    .await;
    // B comes back: same data directory, so the same peer id; A redials it on its own.
    let b = open_b().await.unwrap();
    assert_eq!(
        b.network().unwrap().peer_id,
        b_id,
        "the identity key is kept"
    );
    connected(&a, 1).await;
    let mb = b.open_existing("users").await.unwrap();
    mb.set("after", json!({})).await.unwrap();
    wait_for("A has B's write after the restart", || has(&ma, "after")).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sync_over_quic_and_a_swarm_key_refuses_quic() {
    let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
    let a = Node::builder()
        .listen(quic.clone())
        .mdns(false)
        .trust_all(true)
        .open()
        .await
        .unwrap();
    let a_addr = addr(&a).await;
    assert!(a_addr.to_string().contains("/quic-v1"), "{a_addr}");
    let b = Node::builder()
        .listen(quic.clone())
        .peer(a_addr)
        .mdns(false)
        .trust_all(true)
        .open()
        .await
        .unwrap();
    connected(&a, 1).await;
    let ma = a.map("users").await.unwrap();
    let mb = b.map("users").await.unwrap();
    ma.set("over-quic", json!({})).await.unwrap();
    wait_for("B has A's write over QUIC", || has(&mb, "over-quic")).await;
    // A private network is enforced by a TCP handshake: QUIC would bypass it, so it is refused.
    let key = SwarmKey::parse(&SwarmKey::generate().unwrap()).unwrap();
    let err = Node::builder()
        .listen(quic)
        .swarm_key(key)
        .mdns(false)
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("QUIC"), "{err}");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A node that restarts announces the maps it holds by the digests it stored at close, so
/// anti-entropy loads only the maps that differ from a peer's, not every stored map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_loads_only_the_maps_that_changed() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(Some(dirs[0].path()), &[]).await;
    let a_addr = addr(&a).await;
    let b = node(Some(dirs[1].path()), std::slice::from_ref(&a_addr)).await;
    connected(&a, 1).await;
    let names: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let mut on_a = Vec::new();
    for n in &names {
        let m = a.map(n.as_str()).await.unwrap();
        for k in 0..3 {
            m.set(&format!("k{k}"), json!({"map": n})).await.unwrap();
        }
        on_a.push(m);
    }
    for (n, ma) in names.iter().zip(&on_a) {
        let mb = b.open_existing(n).await.unwrap();
        same_items(&[ma, &mb], 3).await;
    }
    b.close().await.unwrap();
    // While B is away, one map changes.
    on_a[0].set("new", json!({"while": "away"})).await.unwrap();
    let b = node(Some(dirs[1].path()), &[a_addr]).await;
    assert_eq!(b.loaded_maps().await.unwrap(), 0, "maps load lazily");
    let m0 = b.open_existing("m0").await.unwrap();
    wait_for("B catches up on the changed map", || has(&m0, "new")).await;
    // A's hello (every map's digest) came before the sync it led to: by now B has compared
    // all twenty, and loaded none of the nineteen that are equal.
    assert_eq!(b.loaded_maps().await.unwrap(), 1);
    // The others still follow A.
    on_a[7].set("later", json!({})).await.unwrap();
    let m7 = b.open_existing("m7").await.unwrap();
    wait_for("B gets a later change to an unloaded map", || {
        has(&m7, "later")
    })
    .await;
    for n in [a, b] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_map_is_whole_or_an_error_and_its_events_come_before_the_answer() {
    let a = node(None, &[]).await;
    let ma = a.map("big").await.unwrap();
    const N: usize = 10_000;
    let batch: Vec<(String, serde_json::Value)> = (0..N)
        .map(|i| (format!("k{i:05}"), json!({"n": i})))
        .collect();
    for chunk in batch.chunks(500) {
        for (k, v) in chunk {
            ma.set(k, v.clone()).await.unwrap();
        }
    }
    let a_addr = addr(&a).await;
    // B asks with a wait far too short for 10,000 items: an error, or all of it.
    let b = Node::builder()
        .listen(local())
        .mdns(false)
        .trust_all(true)
        .peer(a_addr.clone())
        .fetch_timeout(Duration::from_millis(1))
        .open()
        .await
        .unwrap();
    connected(&b, 1).await;
    match b.open_existing("big").await {
        Ok(m) => assert_eq!(items(&m).await.len(), N, "a map returned whole"),
        Err(syncmesh::Error::FetchIncomplete { map, why }) => {
            assert_eq!(map, "big");
            assert!(!why.is_empty());
        }
        Err(e) => panic!("{e}"),
    }
    // C cut off half-way (A stops trusting it while it fetches): never a part as if whole.
    let c = Node::builder()
        .listen(local())
        .mdns(false)
        .peer(a_addr.clone())
        .trust(a.network().unwrap().peer_id)
        .open()
        .await
        .unwrap();
    let c_id: syncmesh::PeerId = c.network().unwrap().peer_id;
    a.trust(c_id, vec![]).await.unwrap();
    connected(&c, 1).await;
    let fetch = {
        let c = c.clone();
        tokio::spawn(async move { c.open_existing("big").await })
    };
    a.untrust(c_id).await.unwrap();
    match fetch.await.unwrap() {
        Ok(m) => assert_eq!(items(&m).await.len(), N, "a map returned whole"),
        Err(syncmesh::Error::FetchIncomplete { .. }) => {}
        // Cut before it asked: nobody to ask.
        Err(e @ syncmesh::Error::Map(_)) if e.code() == 54200 => {}
        Err(e) => panic!("{e}"),
    }
    // D, with the default wait: the whole map, and its events were published before the
    // answer, so a subscription made after it starts with what comes next.
    let d = node(None, &[a_addr]).await;
    connected(&d, 1).await;
    let md = d.open_existing("big").await.unwrap();
    assert_eq!(items(&md).await.len(), N);
    // The catch-up took several engine rounds (its changes are megabytes): every item has
    // exactly one event.
    let mut all = md.subscribe_from(0).await.unwrap();
    let mut added = std::collections::HashSet::new();
    while added.len() < N {
        let e = tokio::time::timeout(DEADLINE, all.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        assert!(
            matches!(e.kind, syncmesh::EventKind::ItemAdded { .. }),
            "{e:?}"
        );
        assert!(added.insert(e.kind.key().unwrap().to_string()), "{e:?}");
    }
    drop(all);
    let mut events = md.subscribe().await.unwrap();
    ma.set("after", json!({})).await.unwrap();
    let first = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    assert_eq!(first.kind.key(), Some("after"), "{first:?}");
    for n in [a, b, c, d] {
        n.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_its_stream_show_every_key_exactly_once_under_concurrent_writes() {
    let a = node(None, &[]).await;
    let a_addr = addr(&a).await;
    let b = node(None, &[a_addr]).await;
    connected(&a, 1).await;
    connected(&b, 1).await;
    let ma = a.map("feed").await.unwrap();
    let mb = b.map("feed").await.unwrap();
    const HALF: usize = 1_000;
    const LOCAL: usize = 300;
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    // B writes half its keys, then the other half once A has its snapshot (so the stream
    // surely has work); A writes its own keys meanwhile.
    let remote = tokio::spawn(async move {
        for i in 0..HALF {
            mb.set(&format!("b{i:05}"), json!({"i": i})).await.unwrap();
        }
        taken_rx.await.unwrap();
        for i in HALF..2 * HALF {
            mb.set(&format!("b{i:05}"), json!({"i": i})).await.unwrap();
        }
    });
    let local = {
        let ma = ma.clone();
        tokio::spawn(async move {
            for i in 0..LOCAL {
                ma.set(&format!("a{i:05}"), json!({"i": i})).await.unwrap();
            }
        })
    };
    wait_for("some of B's writes on A", || {
        let ma = ma.clone();
        async move { ma.info().await.unwrap().items_count >= 100 }
    })
    .await;
    let (snap, mut events) = ma.snapshot_and_subscribe().await.unwrap();
    taken_tx.send(()).unwrap();
    let total = 2 * HALF + LOCAL;
    assert!(snap.items.len() <= HALF + LOCAL);
    let mut seen: std::collections::BTreeMap<String, usize> =
        snap.items.iter().map(|i| (i.key.clone(), 1)).collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while seen.len() < total {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {total} keys seen", seen.len()))
            .unwrap()
            .unwrap();
        assert!(ev.id > snap.last_event_id);
        match ev.kind {
            EventKind::ItemAdded { item } => *seen.entry(item.key).or_insert(0) += 1,
            other => panic!("every key is written once: {other:?}"),
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "keys seen more than once: {twice:?}");
    let info = ma.info().await.unwrap();
    assert_eq!(info.items_count, total as u64);
    remote.await.unwrap();
    local.await.unwrap();
    eprintln!(
        "snapshot of {} items at event {}, then {} events",
        snap.items.len(),
        snap.last_event_id,
        total - snap.items.len()
    );
}

/// The highest history generation of map `name` on a node (0: never cut).
async fn generation(n: &Node, name: &str) -> u64 {
    n.history()
        .await
        .unwrap()
        .iter()
        .find(|m| m.name.as_deref() == Some(name))
        .map_or(0, |m| m.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_cut_history_together_then_keep_writing_and_merging() {
    let dir = tempfile::tempdir().unwrap();
    let builder = || {
        Node::builder()
            .listen(local())
            .mdns(false)
            .trust_all(true)
            .history(8)
    };
    let a = builder().data_dir(dir.path()).open().await.unwrap();
    let a_addr = addr(&a).await;
    let b = builder().peer(a_addr).open().await.unwrap();
    connected(&a, 1).await;
    let ma = a.map("m").await.unwrap();
    let mb = b.map("m").await.unwrap();
    for r in 0..40 {
        ma.set("k", json!({ "r": r })).await.unwrap();
        mb.set("j", json!({ "r": r })).await.unwrap();
    }
    same_items(&[&ma, &mb], 2).await;
    // Far past 8 operations of history: once they agree on the shards, both end on a cut
    // generation (one cuts, the other takes it).
    wait_for("both nodes cut the map's history", || async {
        generation(&a, "m").await >= 1 && generation(&b, "m").await >= 1
    })
    .await;
    for n in [&a, &b] {
        let h = n.history().await.unwrap();
        let m = h.iter().find(|m| m.name.as_deref() == Some("m")).unwrap();
        assert!(m.ops < 40, "history was cut: {m:?}");
    }
    assert_eq!(ma.get("k").await.unwrap().data["r"], 39);
    assert_eq!(mb.get("j").await.unwrap().data["r"], 39);
    // Writes go on, on both, concurrently, and merge on the new generation.
    let (x, y) = tokio::join!(
        ma.set("k", json!({"after": "a"})),
        mb.set("j", json!({"after": "b"}))
    );
    x.unwrap();
    y.unwrap();
    same_items(&[&ma, &mb], 2).await;
    assert_eq!(mb.get("k").await.unwrap().data["after"], "a");
    assert_eq!(ma.get("j").await.unwrap().data["after"], "b");
    b.close().await.unwrap();
    // What the store keeps of a cut map reopens to the same items.
    let before = items(&ma).await;
    a.close().await.unwrap();
    let a = Node::open(dir.path()).await.unwrap();
    let ma = a.open_existing("m").await.unwrap();
    assert_eq!(items(&ma).await, before);
    // (A write loads the shard documents it touches.)
    ma.update("k", json!({"again": true})).await.unwrap();
    ma.update("j", json!({"again": true})).await.unwrap();
    assert!(
        generation(&a, "m").await >= 1,
        "the cut generation was stored"
    );
    a.close().await.unwrap();
}
