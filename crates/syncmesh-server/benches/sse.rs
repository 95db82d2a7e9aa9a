//! Event delivery to Server-Sent Events subscribers under a steady write load: 4 nodes on
//! 127.0.0.1 (one process, each with its own data directory, durable storage and HTTP
//! server, peered over libp2p), 20 SSE subscribers spread over them (5 each), one writer
//! setting an item 100 times a second on the nodes in turn. Each event's delay is the time
//! from the start of the `set` call to the moment its `data:` line reaches the subscriber's
//! socket (the item carries the write's timestamp; the process has one clock).
//!
//! `cargo bench -p syncmesh-server --bench sse` (`-- <seconds>`, default 30).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is the report

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use syncmesh::{Multiaddr, Node};
use syncmesh_server::{router, serve, ServerOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NODES: usize = 4;
const SUBSCRIBERS: usize = 20;
const RATE: u64 = 100;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn node(dir: &std::path::Path, peers: &[Multiaddr]) -> Node {
    let mut b = Node::builder()
        .data_dir(dir)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .trust_all(true);
    for p in peers {
        b = b.peer(p.clone());
    }
    b.open().await.unwrap()
}

/// Serves `node`'s HTTP API on a free port of 127.0.0.1; its address.
async fn http(node: Node) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = ServerOptions::new(addr);
    let app = router(node, opts.clone());
    tokio::spawn(async move { serve(listener, app, &opts).await });
    addr
}

/// One SSE subscriber: the delay of every `item_added` / `item_updated` it receives, until
/// `until`. Reads the raw stream (chunked transfer encoding included: a `data:` line is
/// recognised wherever a chunk boundary falls, because the reader looks for whole lines and
/// chunk-size lines never start with `data:`).
async fn subscribe(addr: std::net::SocketAddr, until: Instant) -> Vec<u64> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "GET /v1/Services/default/Maps/load/Events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut delays = Vec::new();
    let mut partial = String::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return delays;
        }
        let Ok(Ok(Some(line))) = tokio::time::timeout(left, lines.next_line()).await else {
            return delays;
        };
        let at = now_us();
        // A data line split by a chunk boundary: its head, a chunk-size line, its tail.
        let line = if !partial.is_empty() {
            if u64::from_str_radix(line.trim(), 16).is_ok() {
                continue;
            }
            std::mem::take(&mut partial) + &line
        } else {
            line
        };
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        match serde_json::from_str::<serde_json::Value>(data.trim()) {
            Ok(v) => {
                if let Some(t) = v["item_data"]["t"].as_u64() {
                    delays.push(at.saturating_sub(t));
                }
            }
            Err(_) => partial = line,
        }
    }
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dirs: Vec<_> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
        let first = node(dirs[0].path(), &[]).await;
        let first_addr = first.listening().await.unwrap()[0].clone();
        let mut nodes = vec![first];
        for d in &dirs[1..] {
            nodes.push(node(d.path(), std::slice::from_ref(&first_addr)).await);
        }
        for n in &nodes[1..] {
            n.peers_connected(1).await.unwrap();
        }
        nodes[0].peers_connected(NODES - 1).await.unwrap();
        let maps: Vec<_> = futures_util::future::join_all(nodes.iter().map(|n| n.map("load")))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut addrs = Vec::new();
        for n in &nodes {
            addrs.push(http(n.clone()).await);
        }
        let until = Instant::now() + Duration::from_secs(secs + 5);
        let subs: Vec<_> = (0..SUBSCRIBERS)
            .map(|i| tokio::spawn(subscribe(addrs[i % NODES], until)))
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let total = secs * RATE;
        for k in 0..total {
            let due = start + Duration::from_micros(k * 1_000_000 / RATE);
            tokio::time::sleep_until(due.into()).await;
            let m = &maps[(k as usize) % NODES];
            let key = format!("k{}", k % 2000);
            m.set(&key, json!({"t": now_us(), "n": k, "pad": "x".repeat(64)}))
                .await
                .unwrap();
        }
        let mut all = Vec::new();
        let mut per: Vec<usize> = Vec::new();
        for s in subs {
            let d = s.await.unwrap();
            per.push(d.len());
            all.extend(d);
        }
        all.sort_unstable();
        let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1e3;
        let late = all.iter().filter(|d| **d > 30_000).count();
        println!(
            "{NODES} nodes, {SUBSCRIBERS} SSE subscribers, {RATE} writes/s for {secs} s: {} events delivered (per subscriber {}..{} of {total}); delay p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; over 30 ms: {:.2} %",
            all.len(),
            per.iter().min().unwrap(),
            per.iter().max().unwrap(),
            q(0.5),
            q(0.99),
            q(1.0),
            late as f64 * 100.0 / all.len() as f64
        );
        for n in nodes {
            n.close().await.unwrap();
        }
    });
}
