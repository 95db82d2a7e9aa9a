//! Engine benchmark: set / update / get / page / remote apply on maps of 1k, 100k and 1M items.
//!
//! `cargo bench -p syncmesh-core --bench engine` (all sizes) or
//! `cargo bench -p syncmesh-core --bench engine -- 1000 100000` (chosen sizes).
//! Figures and the machine they were taken on go to `docs/benchmarks.md`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// test and bench code: a panic is the report

// The counting allocator (benches/common) is the only unsafe code in the workspace.
#![allow(unsafe_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::json;
use syncmesh_core::{
    DocAddr, Identity, JsonObject, MapReplica, MapSid, NodeId, PageRequest, Timestamp, WriteOptions,
};

fn item(i: u64) -> JsonObject {
    json!({"phone_number": i, "country": "UK", "n": i})
        .as_object()
        .cloned()
        .unwrap_or_default()
}

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::heap_bytes;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// SplitMix64 for reproducible key choices.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

struct Stats {
    samples: Vec<Duration>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            samples: Vec::new(),
        }
    }
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.samples.push(t.elapsed());
        r
    }
    fn report(&mut self, what: &str) {
        self.samples.sort();
        let n = self.samples.len();
        let pct = |p: f64| self.samples[((n as f64 * p) as usize).min(n - 1)];
        let mean: Duration = self.samples.iter().sum::<Duration>() / n as u32;
        println!(
            "  {what:<44} median {:>9.2} µs   p99 {:>9.2} µs   mean {:>9.2} µs   (n={n})",
            us(pct(0.5)),
            us(pct(0.99)),
            us(mean)
        );
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bench_size(n: u64) {
    println!("map of {n} items");
    let now = Timestamp::from_millis(1_700_000_000_000);
    let sid = MapSid::for_name("users");
    let id_a = Identity::new(NodeId([1; 16]), b"bench-a");
    let rss0 = rss_bytes();
    let heap0 = heap_bytes();
    let build = Instant::now();
    let mut a =
        MapReplica::create(id_a.clone(), sid.clone(), Some("users"), None, now).expect("create");
    let opts = WriteOptions::default();
    for i in 0..n {
        a.set(&format!("k_{i}"), item(i), &opts, now).expect("set");
        a.take_events();
        if i % 4096 == 4095 {
            a.flush(now).expect("flush");
            a.take_outgoing();
        }
    }
    a.flush(now).expect("flush");
    a.take_outgoing();
    let built = build.elapsed();
    let rss1 = rss_bytes();
    println!(
        "  build: {:.2} s ({:.1} µs/item incl. flush); heap {:.0} bytes/item, RSS {:.0} bytes/item",
        built.as_secs_f64(),
        us(built) / n as f64,
        (heap_bytes().saturating_sub(heap0)) as f64 / n as f64,
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );

    // The budget's estimate against the heap measured before parking (the view and the rest
    // of the replica are in the measured figure too).
    let heap_live = heap_bytes().saturating_sub(heap0);
    println!(
        "  live documents: estimated {:.0} bytes/item (budget's estimate), measured heap {:.0} bytes/item all in",
        a.live_bytes() as f64 / n as f64,
        heap_live as f64 / n as f64
    );
    let t = Instant::now();
    let parked = a.unload_idle(0, now).expect("park");
    println!(
        "  parked {parked} idle shard documents in {:.0} ms: heap {:.0} bytes/item",
        us(t.elapsed()) / 1000.0,
        (heap_bytes().saturating_sub(heap0)) as f64 / n as f64
    );

    // A second replica with the same content, to produce remote changes.
    let docs = a.save_all(now).expect("save");
    let saved: usize = docs.iter().map(|(_, b)| b.len()).sum();
    println!(
        "  saved (compacted) size: {:.1} bytes/item",
        saved as f64 / n as f64
    );
    let t = Instant::now();
    let mut b = MapReplica::load(
        Identity::new(NodeId([2; 16]), b"bench-b"),
        sid.clone(),
        &docs,
        now,
    )
    .expect("load");
    println!("  load of all shards: {:.1} ms", us(t.elapsed()) / 1000.0);

    let mut rng = Rng(42);
    let iters = 20_000.min(n as usize * 4).max(2_000);

    // set: the call alone (write-behind), on existing keys
    let mut s = Stats::new();
    for i in 0..iters {
        let k = format!("k_{}", rng.below(n));
        s.time(|| black_box(a.set(&k, item(i as u64 + 7), &opts, now).expect("set")));
        a.take_events();
        if i % 64 == 63 {
            a.flush(now).expect("flush");
            a.take_outgoing();
        }
    }
    s.report("set (call, existing key)");

    // set + flush every write: the full cost with no batching
    let mut s = Stats::new();
    for i in 0..iters.min(5_000) {
        let k = format!("k_{}", rng.below(n));
        s.time(|| {
            a.set(&k, item(i as u64 + 11), &opts, now).expect("set");
            a.flush(now).expect("flush")
        });
        a.take_events();
        a.take_outgoing();
    }
    s.report("set + flush (one change per write)");

    // set + flush in groups of 64 (a group commit), cost per write
    let mut s = Stats::new();
    for g in 0..(iters / 64).max(20) {
        let keys: Vec<String> = (0..64).map(|_| format!("k_{}", rng.below(n))).collect();
        let t = Instant::now();
        for (j, k) in keys.iter().enumerate() {
            a.set(k, item((g * 64 + j) as u64), &opts, now)
                .expect("set");
        }
        a.flush(now).expect("flush");
        s.samples.push(t.elapsed() / 64);
        a.take_events();
        a.take_outgoing();
    }
    s.report("set + flush in groups of 64, per write");

    // new keys (insert) with group flush
    let mut s = Stats::new();
    for g in 0..(iters / 64).max(20) {
        let t = Instant::now();
        for j in 0..64 {
            a.set(&format!("new_{g}_{j}"), item(j), &opts, now)
                .expect("set");
        }
        a.flush(now).expect("flush");
        s.samples.push(t.elapsed() / 64);
        a.take_events();
        a.take_outgoing();
    }
    s.report("insert + flush in groups of 64, per write");

    // update one field
    let mut s = Stats::new();
    for i in 0..iters {
        let k = format!("k_{}", rng.below(n));
        let patch = json!({"country": if i % 2 == 0 { "IRL" } else { "USA" }})
            .as_object()
            .cloned()
            .unwrap_or_default();
        s.time(|| black_box(a.update(&k, patch, &opts, now).expect("update")));
        a.take_events();
        if i % 64 == 63 {
            a.flush(now).expect("flush");
            a.take_outgoing();
        }
    }
    s.report("update 1 field (call)");
    a.flush(now).expect("flush");
    a.take_outgoing();

    let mut s = Stats::new();
    for _ in 0..iters * 5 {
        let k = format!("k_{}", rng.below(n));
        s.time(|| black_box(a.get(&k, now).expect("get")));
    }
    s.report("get");

    let mut s = Stats::new();
    for _ in 0..iters / 10 {
        let req = PageRequest {
            from: Some(format!("k_{}", rng.below(n))),
            ..Default::default()
        };
        s.time(|| black_box(a.items(&req, now).expect("page")));
    }
    s.report("page of 50 from a random key");

    // remote: b writes single items, a applies each change
    let mut changes = Vec::new();
    for i in 0..iters.min(3_000) {
        let k = format!("k_{}", rng.below(n));
        let patch = json!({"n": i}).as_object().cloned().unwrap_or_default();
        b.update(&k, patch, &opts, now).expect("update");
        b.flush(now).expect("flush");
        changes.extend(b.take_outgoing());
        b.take_events();
    }
    let mut s = Stats::new();
    for c in &changes {
        let DocAddr::Shard { .. } = c.doc else {
            continue;
        };
        s.time(|| {
            a.apply_changes(c.doc, std::slice::from_ref(&c.bytes), now)
                .expect("apply")
        });
        a.take_events();
        a.take_outgoing();
    }
    s.report("apply remote single-item change");
    let live = a.live_shards();
    let estimate = a.live_bytes();
    drop(b);
    drop(changes);
    // What a node's default document budget (64 MiB) leaves: every shard was used above; the
    // engine parks the least recently used down to 3/4 of the budget.
    const BUDGET: u64 = 64 << 20;
    if estimate > BUDGET {
        let heap_all = heap_bytes().saturating_sub(heap0);
        let mark = a.use_mark();
        a.park_lru(estimate - BUDGET / 4 * 3, mark, now)
            .expect("park to the budget");
        println!(
            "  with a 64 MiB document budget: {} live shards, estimated {:.0} MiB live; heap {:.0} bytes/item (all live: {:.0})",
            a.live_shards(),
            a.live_bytes() as f64 / f64::from(1u32 << 20),
            heap_bytes().saturating_sub(heap0) as f64 / n as f64,
            heap_all as f64 / n as f64
        );
    }
    let before = heap_bytes().saturating_sub(heap0);
    a.unload_idle(0, now).expect("park");
    let after = heap_bytes().saturating_sub(heap0);
    println!(
        "  after the run: {live} live shards, estimated {:.0} bytes/item, parking freed {:.0} bytes/item; parked again: heap {:.0} bytes/item",
        estimate as f64 / n as f64,
        before.saturating_sub(after) as f64 / n as f64,
        after as f64 / n as f64
    );
    println!();
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 100_000, 1_000_000]
    } else {
        sizes
    };
    println!(
        "syncmesh-core engine benchmark ({} shards per map)",
        syncmesh_core::layout::SHARDS
    );
    for n in sizes {
        bench_size(n);
    }
}
