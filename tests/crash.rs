//! SIGKILL in the middle of a stream of writes loses no acknowledged write.
//!
//! The test runs this same test binary as a child (`crash_child`, which does nothing unless
//! `SYNCMESH_CRASH_DIR` is set): the child writes from several tasks and prints `ack <key>`
//! after each write returns Ok. The parent kills it with SIGKILL after a random number of
//! acknowledgements, reopens the data directory and checks that every acknowledged write is
//! there, in several rounds on the same directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use syncmesh::{Durability, Node, WriteOptions};

const ROUNDS: u64 = 5;

/// The runtime of a child process (the node under test runs there and is killed).
fn child_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A child's data directory (from `dir_var`) and round, or `None` in a normal test run.
fn child_args(dir_var: &str) -> Option<(String, u64)> {
    let dir = std::env::var(dir_var).ok()?;
    let round = std::env::var("SYNCMESH_CRASH_ROUND").ok()?.parse().ok()?;
    Some((dir, round))
}

/// The kill points' seed: `SYNCMESH_SEED`, else the clock (printed, so a failure replays).
fn kill_seed(what: &str) -> u64 {
    let seed = std::env::var("SYNCMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("{what} seed {seed} (set SYNCMESH_SEED to replay the kill points)");
    seed
}

/// The writer. A no-op in a normal test run; the crash test starts it in a child process.
#[test]
fn crash_child() {
    let Some((dir, round)) = child_args("SYNCMESH_CRASH_DIR") else {
        return;
    };
    child_runtime().block_on(async move {
        let node = Node::open(&dir).await.unwrap();
        let m = node.map("crash").await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let m = m.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let key = format!("r{round}_w{w}_{i}");
                        m.set(&key, json!({"round": round, "w": w, "i": i}))
                            .await
                            .unwrap();
                        // One line per acknowledged write; the parent counts these.
                        println!("ack {key}");
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = kill_seed("crash test");
    let mut rng = seed;
    let mut all_acked: Vec<(u64, String)> = Vec::new();
    for round in 0..ROUNDS {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kill_after = 20 + (rng >> 33) % 400;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("SYNCMESH_CRASH_DIR", dir.path())
            .env("SYNCMESH_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acked = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("ack ") {
                    acked.push(k.to_string());
                    if acked.len() as u64 >= kill_after {
                        break;
                    }
                }
            }
            acked
        })
        .await
        .unwrap();
        // SIGKILL: no destructor, no flush, no goodbye.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            acked.len() as u64 >= kill_after,
            "the child died before {kill_after} acks"
        );
        all_acked.extend(acked.into_iter().map(|k| (round, k)));

        let node = Node::open(dir.path())
            .await
            .expect("reopens cleanly after SIGKILL");
        let m = node.map("crash").await.unwrap();
        for (r, key) in &all_acked {
            let item = m
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("acknowledged write {key} (round {r}) lost: {e}"));
            assert_eq!(item.data["round"], *r);
        }
        node.close().await.unwrap();
    }
    assert!(all_acked.len() as u64 >= ROUNDS * 20);
}

/// Relaxed writes (the node's default, or chosen per write on a node that fsyncs) are durable
/// once `sync()` resolved; a write that chose fsync on a relaxed node is durable once
/// acknowledged. Both survive SIGKILL.
#[test]
fn relaxed_child() {
    let Ok(dir) = std::env::var("SYNCMESH_RELAXED_DIR") else {
        return;
    };
    // "node": relaxed by default, some writes choose fsync; "write": the node fsyncs by
    // default, the writes choose relaxed.
    let per_write = std::env::var("SYNCMESH_RELAXED_MODE").is_ok_and(|m| m == "write");
    child_runtime().block_on(async move {
        let (node_default, relaxed, durable) = if per_write {
            (Durability::Fsync, Some(Durability::Relaxed), None)
        } else {
            (Durability::Relaxed, None, Some(Durability::Fsync))
        };
        let node = Node::builder()
            .data_dir(&dir)
            .durability(node_default)
            .open()
            .await
            .unwrap();
        let m = node.map("relaxed").await.unwrap();
        let relaxed_opts = WriteOptions {
            durability: relaxed,
            ..WriteOptions::default()
        };
        for i in 0..200 {
            m.set_with(&format!("k{i}"), json!({"i": i}), relaxed_opts.clone())
                .await
                .unwrap();
        }
        node.sync().await.unwrap();
        println!("synced");
        // Keep writing until killed: the relaxed ones may be lost, the 200 above and every
        // durable one acknowledged may not.
        for i in 200.. {
            m.set_with(&format!("k{i}"), json!({"i": i}), relaxed_opts.clone())
                .await
                .unwrap();
            if i % 20 == 0 {
                let opts = WriteOptions {
                    durability: durable,
                    ..WriteOptions::default()
                };
                m.set_with(&format!("d{i}"), json!({"i": i}), opts)
                    .await
                    .unwrap();
                println!("durable {i}");
            }
        }
    });
}

async fn relaxed_writes_survive(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "relaxed_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SYNCMESH_RELAXED_DIR", dir.path())
        .env("SYNCMESH_RELAXED_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    // Killed after the fifth durable write was acknowledged.
    let (synced, durable) = tokio::task::spawn_blocking(move || {
        let mut synced = false;
        let mut durable = Vec::new();
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if l.contains("synced") {
                synced = true;
            }
            if let Some(i) = l.strip_prefix("durable ") {
                durable.push(i.trim().parse::<u64>().unwrap());
                if durable.len() == 5 {
                    break;
                }
            }
        }
        (synced, durable)
    })
    .await
    .unwrap();
    assert!(synced);
    assert_eq!(durable.len(), 5);
    child.kill().unwrap();
    child.wait().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.open_existing("relaxed").await.unwrap();
    for i in 0..200 {
        assert_eq!(m.get(&format!("k{i}")).await.unwrap().data["i"], i);
    }
    for i in durable {
        assert_eq!(
            m.get(&format!("d{i}")).await.unwrap().data["i"],
            i,
            "{mode}"
        );
    }
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_writes_are_durable_once_synced() {
    relaxed_writes_survive("node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_choose_relaxed_on_an_fsync_node_are_durable_once_synced() {
    relaxed_writes_survive("write").await;
}

/// Two nodes in one process: A writes (each write fsynced), B prints `event <id> <key>` for
/// every item it receives from A, until the test kills the process.
#[test]
fn event_child() {
    let Ok(dirs) = std::env::var("SYNCMESH_EVENT_DIRS") else {
        return;
    };
    let (a_dir, b_dir) = dirs.split_once(',').unwrap();
    child_runtime().block_on(async move {
        let a = net_node(a_dir, None).await;
        let b = net_node(b_dir, Some(addr(&a).await)).await;
        let ma = a.map("users").await.unwrap();
        let mb = b.map("users").await.unwrap();
        let mut events = mb.subscribe().await.unwrap();
        tokio::spawn(async move {
            for i in 0.. {
                ma.set(&format!("k{i:05}"), json!({"i": i})).await.unwrap();
            }
        });
        while let Some(Ok(e)) = events.next().await {
            if let syncmesh::EventKind::ItemAdded { item } = &e.kind {
                println!("event {} {}", e.id, item.key);
            }
        }
    });
}

async fn net_node(dir: &str, peer: Option<syncmesh::Multiaddr>) -> Node {
    let mut b = Node::builder()
        .data_dir(dir)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .trust_all(true);
    if let Some(p) = peer {
        b = b.peer(p);
    }
    b.open().await.unwrap()
}

async fn addr(n: &Node) -> syncmesh::Multiaddr {
    n.listening().await.unwrap()[0].clone()
}

/// A peer's changes reach B's subscribers before B's fsync. A crash can take such events
/// back; B then receives the changes again by sync and publishes them again with new ids:
/// an id a subscriber saw is never given to another event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_seen_before_a_crash_are_never_reused() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "event_child", "--nocapture", "--test-threads=1"])
        .env(
            "SYNCMESH_EVENT_DIRS",
            format!("{},{}", a_dir.path().display(), b_dir.path().display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::BTreeMap::new();
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if let Some(rest) = l.strip_prefix("event ") {
                let (id, key) = rest.split_once(' ').unwrap();
                seen.insert(id.parse::<u64>().unwrap(), key.to_string());
                if seen.len() == 300 {
                    break;
                }
            }
        }
        seen
    })
    .await
    .unwrap();
    assert_eq!(seen.len(), 300);
    child.kill().unwrap();
    child.wait().unwrap();
    // Both back; B catches up with everything A acknowledged.
    let a = net_node(a_dir.path().to_str().unwrap(), None).await;
    let b = net_node(b_dir.path().to_str().unwrap(), Some(addr(&a).await)).await;
    let ma = a.open_existing("users").await.unwrap();
    let mb = b.open_existing("users").await.unwrap();
    let keys: std::collections::BTreeSet<String> = all_keys(&ma).await;
    assert!(keys.len() >= 300);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while all_keys(&mb).await != keys {
        assert!(std::time::Instant::now() < deadline, "B never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B's events from the start: every key A wrote has one; an id seen before the crash
    // still names the same item's event, or is gone, never another's.
    let mut stream = mb.subscribe_from(0).await.unwrap();
    let mut by_id = std::collections::BTreeMap::new();
    let mut added = std::collections::BTreeSet::new();
    while added != keys {
        let e = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("B's events")
            .unwrap()
            .unwrap();
        if let syncmesh::EventKind::ItemAdded { item } = &e.kind {
            added.insert(item.key.clone());
            by_id.insert(e.id, item.key.clone());
        }
    }
    for (id, key) in &seen {
        if let Some(now) = by_id.get(id) {
            assert_eq!(now, key, "event {id} was {key} before the crash");
        }
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

async fn all_keys(m: &syncmesh::Map) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    let mut req = syncmesh::PageRequest {
        page_size: Some(100),
        ..Default::default()
    };
    loop {
        let page = m.items(req.clone()).await.unwrap();
        keys.extend(page.items.iter().map(|i| i.key.clone()));
        match page.next_token {
            Some(t) => req.token = Some(t),
            None => return keys,
        }
    }
}

/// Writes, events and compactions back to back until killed: prints `ack <key>` per
/// acknowledged write, `event <id> <key>` per item-added event, `compacting` before each
/// `Node::compact`.
#[test]
fn compact_child() {
    let Some((dir, round)) = child_args("SYNCMESH_COMPACT_DIR") else {
        return;
    };
    child_runtime().block_on(async move {
        let node = Node::builder()
            .data_dir(&dir)
            .event_retention(100_000)
            .open()
            .await
            .unwrap();
        let m = node.map("crash").await.unwrap();
        let mut events = m.subscribe().await.unwrap();
        tokio::spawn(async move {
            while let Some(Ok(e)) = events.next().await {
                if let syncmesh::EventKind::ItemAdded { item } = &e.kind {
                    println!("event {} {}", e.id, item.key);
                }
            }
        });
        for w in 0..4 {
            let m = m.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("r{round}_w{w}_{i}");
                    m.set(&key, json!({"round": round, "pad": "x".repeat(200)}))
                        .await
                        .unwrap();
                    println!("ack {key}");
                }
            });
        }
        loop {
            println!("compacting");
            node.compact().await.unwrap();
        }
    });
}

/// SIGKILL while the node compacts (snapshots stored between commits, the file rewritten
/// beside the store and swapped in) loses no acknowledged write, and an event id seen before
/// the crash still names the same event after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_compaction_loses_nothing_and_repeats_no_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let seed = kill_seed("compaction crash test");
    let mut rng = seed;
    let mut acked: Vec<String> = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    let mut compactions = 0;
    for round in 0..4u64 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kill_after = 50 + (rng >> 33) % 600;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "compact_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SYNCMESH_COMPACT_DIR", dir.path())
            .env("SYNCMESH_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (a, s, c) = tokio::task::spawn_blocking(move || {
            let (mut acked, mut seen, mut compactions) = (Vec::new(), Vec::new(), 0);
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if let Some(k) = l.strip_prefix("ack ") {
                    acked.push(k.to_string());
                } else if let Some(rest) = l.strip_prefix("event ") {
                    let (id, key) = rest.split_once(' ').unwrap();
                    seen.push((id.parse::<u64>().unwrap(), key.to_string()));
                } else if l == "compacting" {
                    compactions += 1;
                }
                // Killed while a compaction runs: one has begun since the last ack counted.
                if acked.len() as u64 >= kill_after && compactions >= 2 {
                    break;
                }
            }
            (acked, seen, compactions)
        })
        .await
        .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(c >= 2, "the child died before compacting");
        compactions += c;
        acked.extend(a);
        for (id, key) in s {
            if let Some(before) = seen.insert(id, key.clone()) {
                assert_eq!(before, key, "event id {id} named two items");
            }
        }
        let node = Node::open(dir.path())
            .await
            .expect("reopens cleanly after SIGKILL during compaction");
        assert!(!dir.path().join("syncmesh.redb.rewrite").exists());
        let m = node.map("crash").await.unwrap();
        for key in &acked {
            m.get(key)
                .await
                .unwrap_or_else(|e| panic!("acknowledged write {key} lost: {e}"));
        }
        // The stored feed from its start: every id a subscriber saw names the same item.
        let last_seen = *seen.keys().next_back().unwrap();
        let mut stream = m.subscribe_from(0).await.unwrap();
        let mut by_id = std::collections::BTreeMap::new();
        while by_id.keys().next_back().is_none_or(|id| *id < last_seen) {
            let e = tokio::time::timeout(Duration::from_secs(60), stream.next())
                .await
                .expect("the stored events")
                .unwrap()
                .unwrap();
            if let syncmesh::EventKind::ItemAdded { item } = &e.kind {
                by_id.insert(e.id, item.key.clone());
            }
        }
        for (id, key) in &seen {
            assert_eq!(by_id.get(id), Some(key), "event {id} before the crash");
        }
        node.close().await.unwrap();
    }
    eprintln!(
        "{} acknowledged writes, {} events seen, {compactions} compactions begun",
        acked.len(),
        seen.len()
    );
}
