//! Event delivery to Server-Sent Events subscribers under a steady write load: 4 nodes on
//! 127.0.0.1 (one process, each with its own data directory, durable storage and HTTP
//! server, peered over libp2p), 20 SSE subscribers spread over them (5 each), one writer
//! setting an item 100 times a second on the nodes in turn. Each event's delay is the time
//! from the start of the `set` call to the moment its `data:` line reaches the subscriber's
//! socket (the item carries the write's timestamp; the process has one clock).
//!
//! `cargo bench -p syncmesh-server --bench sse` (`-- <seconds>`, default 30).
//!
//! With `-- processes`, the four nodes are `syncmesh node` daemons instead (a release build:
//! `cargo build --release -p syncmesh-cli` first, or `SYNCMESH_BIN=<path>`), peered over
//! libp2p with `--trust-all` on 127.0.0.1, and the writer goes through their HTTP API too
//! (form-encoded `POST .../Items` then `POST .../Items/<key>`, one keep-alive connection per
//! node): the setup of issue 18's measurement, and of issue 17's soak: each daemon's RSS and
//! data directory are sampled every 10 s, and their second-half slopes printed
//! (`cargo bench -p syncmesh-server --bench sse -- processes 600`).

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

/// A process's resident memory (VmRSS), in bytes; 0 if unknown.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Disk blocks taken by the files under `dir`.
fn tree_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => tree_bytes(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Per node: RSS and disk at the start, half way and the end, and their slopes over the
/// second half (least squares over its samples), in MB and MB/min.
fn soak_report(samples: &[(f64, Vec<(u64, u64)>)]) {
    let Some((end, _)) = samples.last() else {
        return;
    };
    let half: Vec<&(f64, Vec<(u64, u64)>)> =
        samples.iter().filter(|(t, _)| *t >= end / 2.0).collect();
    let slope = |pts: &[(f64, f64)]| {
        let n = pts.len() as f64;
        let (mx, my) = (
            pts.iter().map(|p| p.0).sum::<f64>() / n,
            pts.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let num: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let den: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    };
    for node in 0..NODES {
        let mb = |v: u64| v as f64 / 1e6;
        let at = |i: usize| samples[i].1[node];
        let mid = half.first().map_or((0, 0), |s| s.1[node]);
        let rss: Vec<(f64, f64)> = half.iter().map(|(t, r)| (*t, mb(r[node].0))).collect();
        let disk: Vec<(f64, f64)> = half.iter().map(|(t, r)| (*t, mb(r[node].1))).collect();
        println!(
            "  node {node}: RSS {:.1} -> {:.1} -> {:.1} MB, second-half slope {:.2} MB/min; disk {:.1} -> {:.1} -> {:.1} MB, slope {:.2} MB/min",
            mb(at(0).0),
            mb(mid.0),
            mb(at(samples.len() - 1).0),
            slope(&rss),
            mb(at(0).1),
            mb(mid.1),
            mb(at(samples.len() - 1).1),
            slope(&disk)
        );
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `syncmesh node` daemons, killed when dropped.
struct Daemons(Vec<std::process::Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 keep-alive connection: sends a request, reads the whole answer; its status.
struct Http {
    r: BufReader<tokio::net::TcpStream>,
    addr: std::net::SocketAddr,
}

impl Http {
    async fn connect(addr: std::net::SocketAddr) -> Http {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Http {
            r: BufReader::new(s),
            addr,
        }
    }

    async fn send(&mut self, method: &str, path: &str, form: &str) -> u16 {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            self.addr,
            form.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).await.unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).await.unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        tokio::io::AsyncReadExt::read_exact(&mut self.r, &mut body)
            .await
            .unwrap();
        status
    }
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts four daemons peered with the first, each holding every map; their HTTP addresses.
async fn daemons(dirs: &[tempfile::TempDir]) -> (Daemons, Vec<std::net::SocketAddr>) {
    let bin = std::env::var("SYNCMESH_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/syncmesh").to_string()
    });
    let p2p: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    let mut children = Daemons(Vec::new());
    let mut addrs = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("node")
            .arg("--data-dir")
            .arg(d.path())
            .args(["--http", &http.to_string()])
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", p2p[i])])
            .args([
                "--trust-all",
                "--no-mdns",
                "--hold-all-maps",
                "--history",
                "16",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.path().join("log")).unwrap());
        if i > 0 {
            cmd.args(["--peer", &format!("/ip4/127.0.0.1/tcp/{}", p2p[0])]);
        }
        children.0.push(cmd.spawn().unwrap_or_else(|e| {
            panic!("{bin}: {e} (build it: cargo build --release -p syncmesh-cli)")
        }));
        addrs.push(http);
    }
    // Up when each answers; the map, created on the first, is then held by every node.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conns = Vec::new();
    for a in &addrs {
        loop {
            if Instant::now() >= deadline {
                for d in dirs {
                    let log = std::fs::read_to_string(d.path().join("log")).unwrap_or_default();
                    eprintln!("--- {}:\n{log}", d.path().display());
                }
                panic!("a daemon did not start (its log above)");
            }
            if tokio::net::TcpStream::connect(a).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        conns.push(Http::connect(*a).await);
    }
    let status = conns[0]
        .send("POST", "/v1/Services/default/Maps", "UniqueName=load")
        .await;
    assert!(status == 201 || status == 409, "create map: {status}");
    for c in &mut conns {
        loop {
            assert!(
                Instant::now() < deadline,
                "the map did not reach every node"
            );
            if c.send("GET", "/v1/Services/default/Maps/load", "").await == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (children, addrs)
}

/// The writer of the process mode: the `k`th write, on node `k % NODES`.
async fn write_http(conns: &mut [Http], k: u64) {
    let key = format!("k{}", k % 2000);
    let data = json!({"t": now_us(), "n": k, "pad": "x".repeat(64)}).to_string();
    let c = &mut conns[(k as usize) % NODES];
    let status = if k < 2000 {
        let form = format!("Key={key}&Data={}", form_encode(&data));
        c.send("POST", "/v1/Services/default/Maps/load/Items", &form)
            .await
    } else {
        let form = format!("Data={}", form_encode(&data));
        let path = format!("/v1/Services/default/Maps/load/Items/{key}");
        c.send("POST", &path, &form).await
    };
    assert!(status == 200 || status == 201, "write {k}: {status}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(30);
    let processes = args.iter().any(|a| a == "processes");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dirs: Vec<_> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
        if processes {
            let (daemons, addrs) = daemons(&dirs).await;
            let mut conns = Vec::new();
            for a in &addrs {
                conns.push(Http::connect(*a).await);
            }
            // Each daemon's RSS and data directory, every 10 s while the load runs.
            let pids: Vec<u32> = daemons.0.iter().map(std::process::Child::id).collect();
            let paths: Vec<std::path::PathBuf> =
                dirs.iter().map(|d| d.path().to_path_buf()).collect();
            let sampler = tokio::spawn(async move {
                let start = Instant::now();
                let mut samples: Vec<(f64, Vec<(u64, u64)>)> = Vec::new();
                loop {
                    let at = start.elapsed().as_secs_f64() / 60.0;
                    let row = pids
                        .iter()
                        .zip(&paths)
                        .map(|(pid, dir)| (rss_bytes(*pid), tree_bytes(dir)))
                        .collect();
                    samples.push((at, row));
                    if start.elapsed() >= Duration::from_secs(secs) {
                        return samples;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            });
            measure("4 daemon processes", &addrs, Writer::Http(conns), secs).await;
            let samples = sampler.await.unwrap();
            soak_report(&samples);
            drop(daemons);
            return;
        }
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
        measure("one process", &addrs, Writer::Maps(maps), secs).await;
        for n in nodes {
            n.close().await.unwrap();
        }
    });
}

/// Where the writer's writes go.
enum Writer {
    /// The nodes' maps, in this process.
    Maps(Vec<syncmesh::Map>),
    /// The daemons' HTTP APIs.
    Http(Vec<Http>),
}

impl Writer {
    /// The `k`th write, on node `k % NODES`.
    async fn write(&mut self, k: u64) {
        match self {
            Writer::Maps(maps) => {
                let key = format!("k{}", k % 2000);
                maps[(k as usize) % NODES]
                    .set(&key, json!({"t": now_us(), "n": k, "pad": "x".repeat(64)}))
                    .await
                    .unwrap();
            }
            Writer::Http(conns) => write_http(conns, k).await,
        }
    }
}

/// Subscribes 20 streams over the nodes, writes `RATE` times a second for `secs`, reports.
async fn measure(setup: &str, addrs: &[std::net::SocketAddr], mut writer: Writer, secs: u64) {
    let until = Instant::now() + Duration::from_secs(secs + 5);
    let subs: Vec<_> = (0..SUBSCRIBERS)
        .map(|i| tokio::spawn(subscribe(addrs[i % NODES], until)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    for k in 0..secs * RATE {
        let due = start + Duration::from_micros(k * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        writer.write(k).await;
    }
    report(setup, secs, subs).await;
}

/// Prints the delays the subscribers saw.
async fn report(setup: &str, secs: u64, subs: Vec<tokio::task::JoinHandle<Vec<u64>>>) {
    let total = secs * RATE;
    {
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
            "{setup}: {NODES} nodes, {SUBSCRIBERS} SSE subscribers, {RATE} writes/s for {secs} s: {} events delivered (per subscriber {}..{} of {total}); delay p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; over 30 ms: {:.2} %",
            all.len(),
            per.iter().min().unwrap(),
            per.iter().max().unwrap(),
            q(0.5),
            q(0.99),
            q(1.0),
            late as f64 * 100.0 / all.len() as f64
        );
    }
}
