//! Durable node benchmark: fsynced `set` throughput and latency with 1, 8 and 64 writers,
//! disk bytes per item, open time of large data directories, memory per item.
//!
//! `cargo bench -p syncmesh --bench durable` (or name sections: `-- throughput pipelined maps
//! 100k 1m`; `-- stall` and `-- stall1m`, the longest write during `Node::compact` at 100k and
//! 1M items, run only when named).
//! Data goes to a temporary directory on the disk holding the system temp dir.

// Bench code: a panic is the report. The shared counting allocator is the only unsafe code.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(unsafe_code)]

#[path = "../../syncmesh-core/benches/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::heap_bytes as heap;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

use std::time::{Duration, Instant};

use serde_json::json;
use syncmesh::{Durability, Node, PageRequest, WriteOptions};

fn item(i: u64) -> serde_json::Value {
    json!({"phone_number": i, "country": "UK", "n": i})
}

/// Bytes the files of a directory take on disk (allocated blocks, as `du` counts them: a file
/// grown by redb but not yet written is sparse).
fn dir_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

async fn throughput(writers: usize, total: usize) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("users").await.unwrap();
    let per = total / writers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let m = m.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let n = (w * per + i) as u64;
                    let t = Instant::now();
                    m.set(&format!("k_{n}"), item(n)).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "  {writers:>2} writers: {:>8.0} durable writes/s   latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} writes)",
        lat.len() as f64 / secs,
        p(0.5),
        p(0.99),
        p(1.0),
        lat.len()
    );
    node.close().await.unwrap();
}

/// One writer on a node that fsyncs by default, its writes asking for relaxed durability,
/// awaiting a durability barrier (`Node::sync`) every `every` writes: everything is on disk
/// at the end, with one fsync per barrier instead of one per write.
async fn pipelined(total: usize, every: usize) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("users").await.unwrap();
    let opts = WriteOptions::default().with_durability(Durability::Relaxed);
    let mut barriers = Vec::new();
    let start = Instant::now();
    for n in 0..total as u64 {
        m.set_with(&format!("k_{n}"), item(n), opts.clone())
            .await
            .unwrap();
        if (n + 1) % every as u64 == 0 {
            let t = Instant::now();
            node.sync().await.unwrap();
            barriers.push(t.elapsed());
        }
    }
    node.sync().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    barriers.sort();
    println!(
        "   1 writer, relaxed writes + a barrier every {every}: {:>8.0} durable writes/s   barrier p50 {:.2} ms  max {:.2} ms  ({total} writes)",
        total as f64 / secs,
        barriers[barriers.len() / 2].as_secs_f64() * 1e3,
        barriers[barriers.len() - 1].as_secs_f64() * 1e3,
    );
    node.close().await.unwrap();
}

/// Fills a data directory with `maps` maps of `items` items, using 64 writers.
async fn fill(dir: &std::path::Path, maps: usize, items: usize) -> Fill {
    let node = Node::open(dir).await.unwrap();
    let start = Instant::now();
    let mut json_bytes = 0u64;
    for mi in 0..maps {
        let m = node.map(format!("map{mi}").as_str()).await.unwrap();
        let per = items.div_ceil(64);
        let tasks: Vec<_> = (0..64)
            .map(|w| {
                let m = m.clone();
                tokio::spawn(async move {
                    let mut bytes = 0u64;
                    for i in (w * per)..((w + 1) * per).min(items) {
                        let key = format!("k_{i}");
                        let v = item(i as u64);
                        bytes += (key.len() + v.to_string().len()) as u64;
                        m.set(&key, v).await.unwrap();
                    }
                    bytes
                })
            })
            .collect();
        for t in tasks {
            json_bytes += t.await.unwrap();
        }
    }
    let took = start.elapsed();
    let t = Instant::now();
    node.compact().await.unwrap();
    let compact_secs = t.elapsed().as_secs_f64();
    let used = node.used_bytes().await.unwrap();
    let file = dir_bytes(dir);
    node.close().await.unwrap();
    Fill {
        took,
        json_bytes,
        used,
        file,
        compact_secs,
    }
}

/// What [`fill`] measured.
struct Fill {
    took: Duration,
    json_bytes: u64,
    /// Live data after compaction (redb's stored + metadata bytes).
    used: u64,
    /// Disk taken right after compaction (allocated blocks).
    file: u64,
    compact_secs: f64,
}

/// A closed store's bytes per table, values then the pages around them, each divided by
/// `per` and shown with `digits` decimals.
fn table_parts(dir: &std::path::Path, per: f64, digits: usize) -> Vec<String> {
    let store = syncmesh_store::Store::open(dir, syncmesh_store::StoreOptions::default()).unwrap();
    store
        .table_bytes()
        .unwrap()
        .into_iter()
        .filter(|(_, stored, _)| *stored > 0)
        .map(|(name, stored, pages)| {
            format!(
                "{name} {:.digits$}+{:.digits$}",
                stored as f64 / per,
                pages as f64 / per
            )
        })
        .collect()
}

/// Issue 17's overwrite run on one node: `keys` items written once, then `rounds` more times
/// each (64 writers); disk after `Node::compact` and heap, after the first round and at the end.
async fn overwrite(keys: usize, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .data_dir(dir.path())
        .history(16)
        .open()
        .await
        .unwrap();
    let m = node.map("users").await.unwrap();
    let mut at = Vec::new();
    for round in 0..=rounds {
        let per = keys.div_ceil(64);
        let tasks: Vec<_> = (0..64)
            .map(|w| {
                let m = m.clone();
                tokio::spawn(async move {
                    for i in (w * per)..((w + 1) * per).min(keys) {
                        let v = item((round * keys + i) as u64);
                        m.set(&format!("k_{i}"), v).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        if round == rounds {
            // Cuts run every few seconds: let the last round's history be cut (at most 30 s).
            let settled = || async {
                node.history()
                    .await
                    .unwrap()
                    .iter()
                    .all(|h| h.ops <= h.slots * 2 + 64 * h.shards as u64)
            };
            let start = std::time::Instant::now();
            while !settled().await && start.elapsed() < std::time::Duration::from_secs(30) {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        if round == 0 || round == rounds {
            node.compact().await.unwrap();
            at.push((round, dir_bytes(dir.path()), heap()));
        }
    }
    for (round, disk, heap) in at {
        println!(
            "  {keys} keys after {} writes each: disk {:.1} MB after Node::compact, heap {:.1} MB",
            round + 1,
            disk as f64 / 1e6,
            heap as f64 / 1e6
        );
    }
    node.close().await.unwrap();
    // Where the bytes are at the end: stored bytes per table.
    println!(
        "  per table, MB stored + pages: {}",
        table_parts(dir.path(), 1e6, 2).join(", ")
    );
}

async fn open_time(label: &str, maps: usize, items: usize) {
    let dir = tempfile::tempdir().unwrap();
    let f = fill(dir.path(), maps, items).await;
    let n = (maps * items) as u64;
    let disk = dir_bytes(dir.path());
    println!(
        "  {label}: filled in {:.1} s; Node::compact {:.1} s; after it {:.1} bytes/item live ({:.2}x the JSON of {:.1} bytes/item), on disk {:.1} bytes/item ({:.2}x; {:.1} MB), {:.1} MB after close",
        f.took.as_secs_f64(),
        f.compact_secs,
        f.used as f64 / n as f64,
        f.used as f64 / f.json_bytes as f64,
        f.json_bytes as f64 / n as f64,
        f.file as f64 / n as f64,
        f.file as f64 / f.json_bytes as f64,
        f.file as f64 / 1e6,
        disk as f64 / 1e6
    );
    {
        // Where the bytes are: per table, keys and values, then the pages around them.
        let parts = table_parts(dir.path(), n as f64, 0);
        println!(
            "  {label}: bytes/item per table (data+pages): {}",
            parts.join(", ")
        );
    }
    let heap0 = heap();
    let t = Instant::now();
    let node = Node::open(dir.path()).await.unwrap();
    let opened = t.elapsed();
    let t = Instant::now();
    let m = node.map("map0").await.unwrap();
    m.get("k_1").await.unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    let page = m.items(PageRequest::default()).await.unwrap();
    assert!(!page.items.is_empty());
    println!(
        "  {label}: Node::open {:.1} ms; first map opened and read in {:.1} ms; a page {:.2} ms; heap after: {:.0} bytes/item of that map",
        opened.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3,
        heap().saturating_sub(heap0) as f64 / items as f64
    );
    node.close().await.unwrap();
}

/// The longest a write waits while the node compacts: fills `items` items (64 writers), then
/// 8 writers keep updating items (each awaiting its fsynced write) before, during and after
/// `Node::compact`. Reports the longest write latency in each phase.
async fn stall(items: usize) {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut b = Node::builder().data_dir(dir.path());
    if let Ok(v) = std::env::var("SYNCMESH_BENCH_BUDGET") {
        b = b.document_budget(v.parse().unwrap());
    }
    let node = b.open().await.unwrap();
    let m = node.map("map0").await.unwrap();
    let per = items.div_ceil(64);
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let m = m.clone();
            tokio::spawn(async move {
                for i in (w * per)..((w + 1) * per).min(items) {
                    m.set(&format!("k_{i}"), item(i as u64)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // 0: before, 1: during, 2: after, 3: stop.
    let phase = Arc::new(AtomicU8::new(0));
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let m = m.clone();
            let phase = phase.clone();
            tokio::spawn(async move {
                let mut lat: [Vec<Duration>; 3] = Default::default();
                let mut n = w;
                loop {
                    if phase.load(Ordering::Acquire) == 3 {
                        return lat;
                    }
                    let t = Instant::now();
                    let k = n % items as u64;
                    m.set(&format!("k_{k}"), item(n)).await.unwrap();
                    // A write that straddles two phases counts in the later one.
                    let p = phase.load(Ordering::Acquire).min(2) as usize;
                    lat[p].push(t.elapsed());
                    n += 8 * 7919;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase.store(1, Ordering::Release);
    let t = Instant::now();
    let outcome = node.compact().await.unwrap();
    let took = t.elapsed();
    phase.store(2, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase.store(3, Ordering::Release);
    let mut lat: [Vec<Duration>; 3] = Default::default();
    for w in writers {
        for (all, l) in lat.iter_mut().zip(w.await.unwrap()) {
            all.extend(l);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let show = |l: &mut Vec<Duration>| {
        l.sort();
        let q = |f: f64| ms(l[((l.len() as f64 * f) as usize).min(l.len() - 1)]);
        format!(
            "{} writes, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, longest {:.1} ms",
            l.len(),
            q(0.5),
            q(0.99),
            q(0.999),
            q(1.0)
        )
    };
    println!(
        "  {items} items, 8 writers: Node::compact {:.2} s ({outcome:?}); file {:.1} MB after\n    before (3 s): {}\n    during:       {}\n    after (3 s):  {}",
        took.as_secs_f64(),
        dir_bytes(dir.path()) as f64 / 1e6,
        show(&mut lat[0]),
        show(&mut lat[1]),
        show(&mut lat[2]),
    );
    node.close().await.unwrap();
}

fn main() {
    // Sections to run: `throughput`, `pipelined`, `maps`, `100k`, `1m`, `stall`, `stall1m`,
    // `overwrite`; none named = all but the stall and overwrite ones.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if want("throughput") {
            println!(
                "durable set (fsync on every acknowledged write; concurrent writers share fsyncs)"
            );
            throughput(1, 2_000).await;
            throughput(8, 8_000).await;
            throughput(64, 32_000).await;
        }
        if want("pipelined") {
            println!("one writer pipelining: writes acknowledged before their fsync, a barrier per 1,000");
            pipelined(20_000, 1_000).await;
        }
        if args.iter().any(|a| a == "stall") {
            println!("writes during compaction");
            stall(100_000).await;
        }
        if args.iter().any(|a| a == "overwrite") {
            println!("overwrites (issue 17): history kept by every write");
            overwrite(5_000, 30).await;
        }
        if args.iter().any(|a| a == "stall1m") {
            println!("writes during compaction");
            stall(1_000_000).await;
        }
        println!("data directories");
        if want("maps") {
            open_time("1,000 maps x 100 items", 1000, 100).await;
        }
        if want("100k") {
            open_time("1 map x 100,000 items", 1, 100_000).await;
        }
        if want("1m") {
            open_time("1 map x 1,000,000 items", 1, 1_000_000).await;
        }
    });
}
