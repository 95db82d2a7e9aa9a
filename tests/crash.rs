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

use serde_json::json;
use syncmesh::{Durability, Node, WriteOptions};

const ROUNDS: u64 = 5;

/// The writer. A no-op in a normal test run; the crash test starts it in a child process.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("SYNCMESH_CRASH_DIR") else {
        return;
    };
    let round: u64 = std::env::var("SYNCMESH_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
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
    let seed: u64 = std::env::var("SYNCMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("crash test seed {seed} (set SYNCMESH_SEED to replay the kill points)");
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
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
