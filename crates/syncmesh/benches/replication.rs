//! Replication benchmark: nodes as separate processes on 127.0.0.1, durable storage on each.
//!
//! `cargo bench -p syncmesh --bench replication` (or name sections: `-- w1 w2 w2seq w3 ten`);
//! `SYNCMESH_BENCH_DURABILITY=relaxed` runs every node with `Durability::Relaxed`.
//!
//! - W1 latency: 1,000 single writes on A, each waiting until B's subscription sees it.
//! - W2 throughput: A writes 10,000 items as fast as it can (64 writers; `w2seq`: one writer
//!   awaiting each write); time until B has all of them.
//! - W3 catch-up: A holds 10,000 items; B starts with an empty data directory; time from B's
//!   start until it has all of them.
//! - ten: one writer, nine readers; time until all nine have 10,000 items.
//!
//! Item i is key `k_i`, value `{"phone_number": i, "country": "UK", "n": i}`. The same
//! executable is each node: the orchestrator starts it again with `SYNCMESH_BENCH_ROLE=node`
//! and drives it with line commands on stdin; times are read from the system clock, which
//! every process on the machine shares.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is the report

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use syncmesh::{EventKind, Multiaddr, Node};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn item(i: u64) -> serde_json::Value {
    json!({"phone_number": i, "country": "UK", "n": i})
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- the node process

fn node_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(node_role());
}

async fn node_role() {
    let dir = std::env::var("SYNCMESH_BENCH_DIR").unwrap();
    let started = now_ns();
    let mut b = Node::builder()
        .data_dir(&dir)
        .mdns(false)
        // The bench's processes form an isolated mesh on loopback.
        .trust_all(true)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap());
    if let Ok(peers) = std::env::var("SYNCMESH_BENCH_PEERS") {
        for p in peers.split(',').filter(|p| !p.is_empty()) {
            b = b.peer(p.parse::<Multiaddr>().unwrap());
        }
    }
    // `SYNCMESH_BENCH_DURABILITY=relaxed`: acknowledged before fsync (inherited by every node).
    if std::env::var("SYNCMESH_BENCH_DURABILITY").is_ok_and(|d| d == "relaxed") {
        b = b.durability(syncmesh::Durability::Relaxed);
    }
    // The store's page cache, to measure its part in RSS (`SYNCMESH_BENCH_CACHE=bytes`).
    if let Ok(c) = std::env::var("SYNCMESH_BENCH_CACHE") {
        b = b.cache_size(c.parse().unwrap());
    }
    let node = b.open().await.unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let say = {
        let out = out.clone();
        move |s: String| {
            let mut o = out.lock().unwrap();
            writeln!(o, "{s}").unwrap();
            o.flush().unwrap();
        }
    };
    let addrs = node.listening().await.unwrap();
    say(format!(
        "addr {} {}",
        addrs[0],
        node.network().unwrap().peer_id
    ));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            if tx.blocking_send(l).is_err() {
                break;
            }
        }
    });
    let mut map = None;
    while let Some(line) = rx.recv().await {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["peers", n] => {
                let n: usize = n.parse().unwrap();
                node.peers_connected(n).await.unwrap();
                say("ok".into());
            }
            ["open"] => {
                map = Some(node.map("users").await.unwrap());
                say("ok".into());
            }
            ["share", peer] => {
                // The map gets permission entries: every change to it is signed and checked.
                let m = map.as_ref().unwrap();
                m.set_permission(syncmesh::Permission {
                    identity: peer.to_string(),
                    read: true,
                    write: true,
                    manage: false,
                })
                .await
                .unwrap();
                say("ok".into());
            }
            ["fetch"] => {
                // W3: B started empty; everything from its start counts.
                let m = loop {
                    match node.open_existing("users").await {
                        Ok(m) => break m,
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                };
                map = Some(m);
                say("ok".into());
            }
            ["watch", n] => {
                // Reports each key's first arrival (W1), or only the moment all n arrived.
                let n: usize = n.parse().unwrap();
                let each = n <= 2000;
                let m = map.clone().unwrap();
                let tell = say.clone();
                let mut s = m.subscribe_from(0).await.unwrap();
                tokio::spawn(async move {
                    let mut seen = HashSet::new();
                    while let Some(Ok(e)) = s.next().await {
                        if let EventKind::ItemAdded { item } = &e.kind {
                            let t = now_ns();
                            if seen.insert(item.key.clone()) && each {
                                tell(format!("seen {} {t}", item.key));
                            }
                            if seen.len() == n {
                                tell(format!("all {t}"));
                                return;
                            }
                        }
                    }
                });
                say("ok".into());
            }
            ["write", i] => {
                let i: u64 = i.parse().unwrap();
                let m = map.as_ref().unwrap();
                let t0 = now_ns();
                m.set(&format!("k_{i}"), item(i)).await.unwrap();
                say(format!("wrote {i} {t0} {}", now_ns()));
            }
            ["burst", n, conc] => {
                let n: u64 = n.parse().unwrap();
                let conc: u64 = conc.parse().unwrap();
                let m = map.clone().unwrap();
                let t0 = now_ns();
                let mut tasks = Vec::new();
                for w in 0..conc {
                    let m = m.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut i = w;
                        while i < n {
                            m.set(&format!("k_{i}"), item(i)).await.unwrap();
                            i += conc;
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                say(format!("burst {t0} {}", now_ns()));
            }
            ["started"] => say(format!("started {started}")),
            ["quit"] => {
                let rss = peak_rss_kib();
                node.close().await.unwrap();
                say(format!("rss {rss}"));
                return;
            }
            other => panic!("unknown command {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- the orchestrator

struct Proc {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    addr: String,
    id: String,
}

impl Proc {
    fn start(name: &str, dir: &std::path::Path, peers: &[&str]) -> Proc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("SYNCMESH_BENCH_ROLE", "node")
            .env("SYNCMESH_BENCH_DIR", dir)
            .env("SYNCMESH_BENCH_PEERS", peers.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            name: name.into(),
            child,
            stdin,
            lines,
            addr: String::new(),
            id: String::new(),
        };
        let a = p.expect("addr");
        p.addr = a[0].clone();
        p.id = a[1].clone();
        p
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next line starting with `word`, split after it.
    fn expect(&mut self, word: &str) -> Vec<String> {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(600))
                .unwrap_or_else(|_| panic!("{}: no '{word}' line", self.name));
            let mut it = l.split_whitespace();
            if it.next() == Some(word) {
                return it.map(str::to_string).collect();
            }
        }
    }

    fn call(&mut self, cmd: &str) {
        self.send(cmd);
        self.expect("ok");
    }

    fn quit(mut self) -> u64 {
        self.send("quit");
        let rss = self.expect("rss")[0].parse().unwrap();
        let _ = self.child.wait();
        rss
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// A and B connected, each holding "users"; with `shared`, the map has permission entries
/// (B may write), so every change is signed and checked against its author.
fn pair(d: &std::path::Path, shared: bool) -> (Proc, Proc) {
    let mut a = Proc::start("A", &d.join("a"), &[]);
    let mut b = Proc::start("B", &d.join("b"), &[&a.addr.clone()]);
    a.call("peers 1");
    b.call("peers 1");
    a.call("open");
    if shared {
        a.call(&format!("share {}", b.id));
        b.call("fetch");
    } else {
        b.call("open");
    }
    (a, b)
}

fn label(shared: bool) -> &'static str {
    if shared {
        " (map with permission entries: signed changes)"
    } else {
        ""
    }
}

fn w1(shared: bool) {
    let d = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(d.path(), shared);
    let warm = 100u64;
    let n = 1000u64;
    b.call(&format!("watch {}", warm + n));
    let mut lat = Vec::new();
    for i in 0..warm + n {
        a.send(&format!("write {i}"));
        let w = a.expect("wrote");
        let t0: u128 = w[1].parse().unwrap();
        let s = b.expect("seen");
        assert_eq!(s[0], format!("k_{i}"));
        let t1: u128 = s[1].parse().unwrap();
        if i >= warm {
            lat.push((t1 - t0) as f64 / 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let (ra, rb) = (a.quit(), b.quit());
    println!(
        "W1{} latency (A's write call to B's event), {n} writes after {warm} warm-up: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; peak RSS A {} MiB, B {} MiB",
        label(shared),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1],
        ra / 1024,
        rb / 1024
    );
}

fn w2(shared: bool, writers: usize) {
    let d = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(d.path(), shared);
    let n = 10_000;
    b.call(&format!("watch {n}"));
    a.send(&format!("burst {n} {writers}"));
    let burst = a.expect("burst");
    let all = b.expect("all");
    let t0: u128 = burst[0].parse().unwrap();
    let ta: u128 = burst[1].parse().unwrap();
    let tb: u128 = all[0].parse().unwrap();
    let secs = (tb - t0) as f64 / 1e9;
    let (ra, rb) = (a.quit(), b.quit());
    println!(
        "W2{} throughput: {n} items written on A ({writers} concurrent writer(s), each awaiting its writes; {}) in {:.2} s; B had all of them after {secs:.2} s: {:.0} items/s end to end; peak RSS A {} MiB, B {} MiB",
        label(shared),
        durability(),
        (ta - t0) as f64 / 1e9,
        n as f64 / secs,
        ra / 1024,
        rb / 1024
    );
}

fn w3() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Proc::start("A", &d.path().join("a"), &[]);
    a.call("open");
    let n = 10_000;
    a.send(&format!("burst {n} 64"));
    a.expect("burst");
    let mut b = Proc::start("B", &d.path().join("b"), &[&a.addr.clone()]);
    b.send("started");
    let t0: u128 = b.expect("started")[0].parse().unwrap();
    b.call("fetch");
    b.call(&format!("watch {n}"));
    let t1: u128 = b.expect("all")[0].parse().unwrap();
    let (ra, rb) = (a.quit(), b.quit());
    println!(
        "W3 catch-up: B started empty and had all {n} items after {:.0} ms (process start of its node to the last item's event); peak RSS A {} MiB, B {} MiB",
        (t1 - t0) as f64 / 1e6,
        ra / 1024,
        rb / 1024
    );
}

fn ten() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Proc::start("A", &d.path().join("a"), &[]);
    let addr = a.addr.clone();
    let mut readers: Vec<Proc> = (0..9)
        .map(|i| Proc::start(&format!("R{i}"), &d.path().join(format!("r{i}")), &[&addr]))
        .collect();
    a.call("peers 9");
    a.call("open");
    let n = 10_000;
    for r in &mut readers {
        r.call("open");
        r.call(&format!("watch {n}"));
    }
    a.send(&format!("burst {n} 64"));
    let t0: u128 = a.expect("burst")[0].parse().unwrap();
    let mut last = 0u128;
    for r in &mut readers {
        let t: u128 = r.expect("all")[0].parse().unwrap();
        last = last.max(t);
    }
    let mut rss = vec![a.quit()];
    rss.extend(readers.into_iter().map(Proc::quit));
    println!(
        "10 nodes: all nine readers had {n} items {:.2} s after the writer started ({:.0} items/s); peak RSS max {} MiB",
        (last - t0) as f64 / 1e9,
        n as f64 / ((last - t0) as f64 / 1e9),
        rss.iter().max().unwrap() / 1024
    );
}

/// The durability every node of this run uses.
fn durability() -> &'static str {
    if std::env::var("SYNCMESH_BENCH_DURABILITY").is_ok_and(|d| d == "relaxed") {
        "relaxed"
    } else {
        "fsync"
    }
}

fn main() {
    if std::env::var("SYNCMESH_BENCH_ROLE").is_ok() {
        node_main();
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = args.is_empty();
    let want = |s: &str| all || args.iter().any(|a| a == s);
    println!(
        "syncmesh replication bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("w1") {
        w1(false);
    }
    if want("w1s") {
        w1(true);
    }
    if want("w2") {
        w2(false, 64);
    }
    if want("w2seq") {
        w2(false, 1);
    }
    if want("w2s") {
        w2(true, 64);
    }
    if want("w3") {
        w3();
    }
    if want("ten") {
        ten();
    }
}
