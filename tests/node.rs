//! The durable node through the library API: persistence, open modes, concurrency, the
//! resumable event feed, slow subscribers, and clear errors for unusable data directories.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use syncmesh::{
    Error, EventKind, FileCompaction, MapError, MapSpec, Node, OpenMode, PageRequest, StoreError,
    Ttl, WriteOptions,
};

/// Generous: these machines are shared and slow; tests wait on conditions, never on time.
const DEADLINE: Duration = Duration::from_secs(60);

async fn next_event(s: &mut syncmesh::EventStream) -> syncmesh::Event {
    tokio::time::timeout(DEADLINE, s.next())
        .await
        .expect("an event within the deadline")
        .expect("stream open")
        .expect("event, not error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let id = node.id();
    let users = node.map("users").await.unwrap();
    let a = users
        .set("david", json!({"phone_number": 12345678, "country": "UK"}))
        .await
        .unwrap();
    let b = users
        .update("eve", json!({"x": [1, {"y": null}], "f": 0.1}))
        .await
        .unwrap();
    users.set("gone", json!({})).await.unwrap();
    users.remove("gone").await.unwrap();
    let ttl = users
        .set_with(
            "temp",
            json!({}),
            WriteOptions::ttl(Ttl::from_secs(3600).unwrap()),
        )
        .await
        .unwrap();
    node.close().await.unwrap();

    let node = Node::open(dir.path()).await.unwrap();
    assert_eq!(node.id(), id, "the node id is kept in the data directory");
    let users = node.open_existing("users").await.unwrap();
    assert_eq!(users.get("david").await.unwrap(), a);
    assert_eq!(users.get("eve").await.unwrap(), b);
    assert_eq!(
        users.get("temp").await.unwrap().date_expires,
        ttl.date_expires
    );
    assert_eq!(users.get("gone").await.unwrap_err().code(), 54201);
    let page = users.items(PageRequest::default()).await.unwrap();
    let keys: Vec<_> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["david", "eve", "temp"]);
    // writes go on after a reopen, with new revisions
    let a2 = users
        .update("david", json!({"country": "IRL"}))
        .await
        .unwrap();
    assert_ne!(a2.revision, a.revision);
    assert_eq!(node.maps().await.unwrap().len(), 1);
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_node_and_open_modes() {
    let node = Node::in_memory().await.unwrap();
    let err = node.open_existing("nope").await.unwrap_err();
    assert_eq!(err.code(), 54200);
    node.map(MapSpec::named("m").mode(OpenMode::CreateNew))
        .await
        .unwrap();
    let err = node
        .map(MapSpec::named("m").mode(OpenMode::CreateNew))
        .await
        .unwrap_err();
    assert_eq!(err.code(), 54301);
    let m = node.map("m").await.unwrap();
    let by_sid = node.open_existing(m.sid().as_str()).await.unwrap();
    assert_eq!(
        by_sid.info().await.unwrap().unique_name.as_deref(),
        Some("m")
    );
    let anon = node.map(MapSpec::default()).await.unwrap();
    assert_ne!(anon.sid(), m.sid());
    assert_eq!(m.set("k", json!([1])).await.unwrap_err().code(), 54206);
    assert_eq!(m.get("missing").await.unwrap_err().code(), 54201);
    m.remove_map().await.unwrap();
    assert_eq!(m.set("k", json!({})).await.unwrap_err().code(), 54200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writers_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("load").await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                m.set(&format!("w{w}_{i}"), json!({"w": w, "i": i}))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("load").await.unwrap();
    let mut n = 0;
    let mut req = PageRequest {
        page_size: Some(100),
        ..Default::default()
    };
    loop {
        let page = m.items(req.clone()).await.unwrap();
        n += page.items.len();
        match page.next_token {
            Some(t) => req.token = Some(t),
            None => break,
        }
    }
    assert_eq!(n, 64 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_live_and_resumable_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("feed").await.unwrap();
    let mut live = m.subscribe().await.unwrap();
    m.set("a", json!({"v": 1})).await.unwrap();
    m.update("a", json!({"v": 2})).await.unwrap();
    m.remove("a").await.unwrap();
    let e1 = next_event(&mut live).await;
    let e2 = next_event(&mut live).await;
    let e3 = next_event(&mut live).await;
    assert!(matches!(e1.kind, EventKind::ItemAdded { .. }) && e1.is_local);
    assert!(
        matches!(e2.kind, EventKind::ItemUpdated { ref previous_data, .. } if previous_data["v"] == 1)
    );
    assert!(matches!(e3.kind, EventKind::ItemRemoved { .. }));
    assert_eq!((e1.id, e2.id, e3.id), (1, 2, 3));
    // A consumer that processed up to event 1 restarts ...
    drop(live);
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("feed").await.unwrap();
    m.set("b", json!({})).await.unwrap();
    let mut resumed = m.subscribe_from(1).await.unwrap();
    let ids: Vec<u64> = vec![
        next_event(&mut resumed).await.id,
        next_event(&mut resumed).await.id,
        next_event(&mut resumed).await.id,
    ];
    assert_eq!(
        ids,
        [2, 3, 4],
        "replay from storage, in order, numbering continued"
    );
    // ... and then keeps receiving live events, each once
    m.set("c", json!({})).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.id, 5);
    let mut all = m.subscribe_from(0).await.unwrap();
    for want in 1..=5 {
        assert_eq!(next_event(&mut all).await.id, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_blocks_nobody_and_misses_nothing() {
    let node = Node::in_memory().await.unwrap();
    let m = node.map("busy").await.unwrap();
    let mut slow = m.subscribe_from(0).await.unwrap();
    let mut node_wide = node.subscribe().unwrap();
    // Far more events than any buffer holds, written while nobody reads.
    let n = 6_000u64;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let m = m.clone();
            tokio::spawn(async move {
                for i in 0..n / 8 {
                    m.set(&format!("k{w}_{i}"), json!({"i": i})).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        tokio::time::timeout(DEADLINE, w)
            .await
            .expect("writers finish")
            .unwrap();
    }
    for want in 1..=n {
        assert_eq!(next_event(&mut slow).await.id, want, "no gap, no repeat");
    }
    // The node-wide stream is told it lagged rather than holding writers up.
    let mut lagged = false;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(200), node_wide.next()).await
    {
        if let Err(Error::Lagged { missed }) = r {
            assert!(missed > 0);
            lagged = true;
            break;
        }
    }
    assert!(
        lagged,
        "a node-wide subscriber that never read must be told it lagged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_ttl_expires_with_an_event() {
    let node = Node::in_memory().await.unwrap();
    let m = node.map("ttl").await.unwrap();
    let mut ev = m.subscribe().await.unwrap();
    m.set_with(
        "soon",
        json!({"a": 1}),
        WriteOptions::ttl(Ttl::from_secs(1).unwrap()),
    )
    .await
    .unwrap();
    assert!(matches!(
        next_event(&mut ev).await.kind,
        EventKind::ItemAdded { .. }
    ));
    // The engine removes it on its own once the TTL passes (waits on the event, not a timer).
    let removed = next_event(&mut ev).await;
    assert!(matches!(removed.kind, EventKind::ItemRemoved { ref key, .. } if key == "soon"));
    assert_eq!(m.get("soon").await.unwrap_err().code(), 54201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _node = Node::open(dir.path()).await.unwrap();
    let err = Node::open(dir.path()).await.unwrap_err();
    let Error::Store(e) = &err else {
        panic!("unexpected {err}")
    };
    assert!(matches!(**e, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("syncmesh.redb") && err.to_string().contains("in use"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_directory_gives_a_clear_error() {
    // /sys refuses new entries even to root.
    let err = Node::open("/sys/syncmesh-test-dir").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/sys/syncmesh-test-dir"), "{text}");
    assert!(
        text.contains("cannot be written") || text.contains("I/O error"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("syncmesh.redb"), vec![0xAB; 64 * 1024]).unwrap();
    let err = Node::open(dir.path()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("syncmesh.redb"), "{text}");
    // nothing was overwritten
    assert_eq!(
        std::fs::read(dir.path().join("syncmesh.redb")).unwrap(),
        vec![0xAB; 64 * 1024]
    );
}

/// A 3 MiB tmpfs under `dir`, unmounted when dropped; `None` (after saying so) where `mount`
/// is not allowed (it needs root, as on CI).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, test: &str) -> Option<SmallDisk> {
        let mnt = dir.join("small");
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED {test}: cannot mount a tmpfs here");
            return None;
        }
        Some(SmallDisk(mnt))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk: a 3 MiB tmpfs. Needs `mount` (root, as on CI); elsewhere it says so and skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path(), "a_full_disk_loses_no_acknowledged_write") else {
        return;
    };
    let mnt = disk.0.clone();
    let data = mnt.join("data");
    let node = Node::open(&data).await.unwrap();
    assert_eq!(node.writes_stopped(), None);
    let m = node.map("big").await.unwrap();
    let blob = "x".repeat(8 * 1024);
    let mut acked = Vec::new();
    let mut failure = None;
    // A reader keeps asking for the item being written: it may see it only once acknowledged
    // (never while its commit is under way, which is when the refused one fails).
    let writing = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (m, writing, done) = (m.clone(), writing.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::Acquire) {
                let i = writing.load(Ordering::Acquire);
                if m.get(&format!("k{i:05}")).await.is_ok() {
                    seen.push(i);
                }
            }
            seen
        })
    };
    for i in 0..10_000 {
        writing.store(i, Ordering::Release);
        match m
            .set(&format!("k{i:05}"), json!({ "blob": blob, "i": i }))
            .await
        {
            Ok(_) => acked.push(i),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 3 MiB disk fills up");
    let refused = acked.last().map_or(0, |i| i + 1);
    done.store(true, Ordering::Release);
    let seen = reader.await.unwrap();
    assert!(
        seen.iter().all(|i| *i < refused),
        "a reader saw the refused write k{refused:05} while it was being committed"
    );
    eprintln!(
        "the concurrent reader read {} acknowledged items, none refused",
        seen.len()
    );
    let text = failure.to_string();
    assert!(
        text.contains("no space") || text.contains("stopped"),
        "{text}"
    );
    // After the failure, writes are refused clearly rather than half-done, and the node says
    // so when asked; reads go on.
    let why = node.writes_stopped().expect("writes stopped");
    assert!(why.contains("syncmesh.redb"), "{why}");
    assert_eq!(m.get("k00000").await.unwrap().data["i"], 0);
    // No phantom: the write that was refused is not read, nor is a map whose creation was.
    let phantom = m.get(&format!("k{refused:05}")).await;
    assert!(
        phantom.is_err(),
        "the refused write k{refused:05} is readable"
    );
    assert!(node.map("never").await.is_err());
    let names: Vec<Option<String>> = node
        .maps()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.unique_name)
        .collect();
    assert_eq!(names, vec![Some("big".to_string())]);
    // Compaction and parking cannot store anything either; reads still go on after them.
    assert!(node.compact().await.is_err());
    assert_eq!(m.get("k00000").await.unwrap().data["i"], 0);
    assert_eq!(node.maps().await.unwrap().len(), 1);
    assert!(m.items(PageRequest::default()).await.is_ok());
    let again = m.set("after", json!({})).await.unwrap_err();
    assert!(
        again.to_string().contains("storage failure") || again.to_string().contains("no space"),
        "{again}"
    );
    drop(m);
    let _ = node.close().await;
    // Make room, reopen: every acknowledged write is there.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(grown.success());
    let node = Node::open(&data).await.unwrap();
    assert_eq!(node.writes_stopped(), None, "a reopened node writes again");
    let m = node.map("big").await.unwrap();
    for i in &acked {
        assert_eq!(m.get(&format!("k{i:05}")).await.unwrap().data["i"], *i);
    }
    m.set("after", json!({})).await.unwrap();
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_everything_and_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("c").await.unwrap();
    for i in 0..300 {
        m.set(&format!("k{}", i % 50), json!({"i": i}))
            .await
            .unwrap();
    }
    let before = node.used_bytes().await.unwrap();
    node.compact().await.unwrap();
    let after = node.used_bytes().await.unwrap();
    assert!(
        after < before,
        "snapshots replace change logs: {before} -> {after} bytes"
    );
    // writes after the snapshot land in the change log again
    m.update("k1", json!({"after": true})).await.unwrap();
    m.remove("k2").await.unwrap();
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("c").await.unwrap();
    let k1 = m.get("k1").await.unwrap();
    assert_eq!(
        k1.data,
        *json!({"i": 251, "after": true}).as_object().unwrap()
    );
    assert_eq!(m.get("k2").await.unwrap_err().code(), 54201);
    assert_eq!(m.get("k49").await.unwrap().data["i"], 299);
    // the documents (not only the view) hold it all: conflicts reads them
    assert!(m.conflicts("k1").await.unwrap().fields.is_empty());
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_the_files_free_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syncmesh.redb");
    let node = Node::builder()
        .data_dir(dir.path())
        .event_retention(100)
        .open()
        .await
        .unwrap();
    let m = node.map("c").await.unwrap();
    let filler = "x".repeat(1000);
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let m = m.clone();
            let filler = filler.clone();
            tokio::spawn(async move {
                for round in 0..25 {
                    for k in 0..8 {
                        let v = json!({"round": round, "f": filler});
                        m.set(&format!("k{w}_{k}"), v).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let before = std::fs::metadata(&file).unwrap().len();
    assert_eq!(node.compact().await.unwrap(), FileCompaction::Done);
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(
        after * 2 < before,
        "the file was {before} bytes before compaction and {after} after"
    );
    m.set("after", json!({})).await.unwrap();
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("c").await.unwrap();
    assert_eq!(m.get("k15_7").await.unwrap().data["round"], 24);
    assert!(m.get("after").await.is_ok());
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_from_zero_starts_at_the_first_retained_event_and_gaps_are_reported() {
    let node = Node::builder()
        .in_memory()
        .event_retention(1000)
        .open()
        .await
        .unwrap();
    let m = node.map("p").await.unwrap();
    for i in 0..2048 {
        m.set(&format!("k{}", i % 10), json!({"i": i}))
            .await
            .unwrap();
    }
    let mut all = m.subscribe_from(0).await.unwrap();
    let first = next_event(&mut all).await.id;
    assert!(first > 1, "pruned events are not replayed");
    let mut prev = first;
    for _ in 0..100 {
        let id = next_event(&mut all).await.id;
        assert_eq!(id, prev + 1);
        prev = id;
    }
    let err = m.subscribe_from(5).await.unwrap_err();
    assert!(matches!(err, Error::EventsPruned { from: 6, .. }), "{err}");
    // A subscriber that falls behind past retention is told, not silently skipped ahead.
    let mut slow = m.subscribe_from(first).await.unwrap();
    for i in 0..8192 {
        m.set(&format!("j{}", i % 10), json!({"i": i}))
            .await
            .unwrap();
    }
    let mut saw_gap_error = false;
    let mut prev = first;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match r {
            Ok(ev) => {
                assert_eq!(ev.id, prev + 1, "no silent gap");
                prev = ev.id;
            }
            Err(Error::EventsPruned { .. }) => {
                saw_gap_error = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        saw_gap_error || prev == 2048 + 8192,
        "either every event or an explicit gap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_node_closes() {
    let node = Node::in_memory().await.unwrap();
    let m = node.map("m").await.unwrap();
    let mut a = m.subscribe_from(0).await.unwrap();
    let mut b = m.subscribe().await.unwrap();
    let mut c = node.subscribe().unwrap();
    m.set("a", json!({})).await.unwrap();
    next_event(&mut a).await;
    next_event(&mut b).await;
    tokio::time::timeout(DEADLINE, c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(m);
    node.close().await.unwrap();
    for s in [&mut a, &mut b, &mut c] {
        let end = tokio::time::timeout(DEADLINE, s.next())
            .await
            .expect("ends within the deadline");
        assert!(end.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_mutate_function_does_not_take_the_node_down() {
    let node = Node::in_memory().await.unwrap();
    let m = node.map("m").await.unwrap();
    m.set("a", json!({"v": 1})).await.unwrap();
    let err = m
        .mutate("a", |_| panic!("a bug in the caller"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), 54206, "{err}");
    assert_eq!(m.get("a").await.unwrap().data["v"], 1);
    m.set("b", json!({})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_after_a_restart_covers_stored_change_logs() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("c").await.unwrap();
    for i in 0..300 {
        m.set(&format!("k{}", i % 50), json!({"i": i}))
            .await
            .unwrap();
    }
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("c").await.unwrap();
    let before = node.used_bytes().await.unwrap();
    node.compact().await.unwrap();
    assert!(node.used_bytes().await.unwrap() < before);
    assert_eq!(m.get("k7").await.unwrap().data["i"], 257);
    let r = m.get("k7").await.unwrap().revision;
    let out = m
        .mutate_with("k7", WriteOptions::if_match(r), |d| d.cloned())
        .await
        .unwrap();
    assert!(out.is_some());
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_map_forgets_its_old_incarnation_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("x").await.unwrap();
    for i in 0..200 {
        m.set(&format!("k{i}"), json!({"i": i})).await.unwrap();
    }
    m.remove_map().await.unwrap();
    let m = node.map("x").await.unwrap();
    m.set("fresh", json!({})).await.unwrap();
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let before = node.used_bytes().await.unwrap();
    let m = node.map("x").await.unwrap();
    assert_eq!(
        m.items(PageRequest::default()).await.unwrap().items.len(),
        1
    );
    node.sync().await.unwrap();
    node.sync().await.unwrap();
    let after = node.used_bytes().await.unwrap();
    assert!(
        after < before,
        "old incarnation's shards are dropped: {before} -> {after}"
    );
    // two closes at once both return only when the file is free
    let (a, b) = (node.clone(), node.clone());
    drop(m);
    let (ra, rb) = tokio::join!(a.close(), b.close());
    ra.unwrap();
    rb.unwrap();
    drop(node);
    Node::open(dir.path()).await.unwrap().close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_expire_in_maps_nobody_has_opened_since_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.map("lazy").await.unwrap();
    m.set_with(
        "soon",
        json!({}),
        WriteOptions::ttl(Ttl::from_secs(2).unwrap()),
    )
    .await
    .unwrap();
    m.set("stays", json!({})).await.unwrap();
    node.close().await.unwrap();
    // Reopen and never touch the map: the node loads it on its own when the TTL is due.
    let node = Node::open(dir.path()).await.unwrap();
    let mut all = node.subscribe().unwrap();
    let removed = loop {
        let ev = tokio::time::timeout(DEADLINE, all.next())
            .await
            .expect("the expiry happens within the deadline")
            .expect("stream open")
            .expect("event");
        if let EventKind::ItemRemoved { key, .. } = &ev.kind {
            break key.clone();
        }
    };
    assert_eq!(removed, "soon");
    let m = node.map("lazy").await.unwrap();
    assert_eq!(m.get("soon").await.unwrap_err().code(), 54201);
    m.get("stays").await.unwrap();
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_matchable_and_say_what_happened() {
    let node = Node::in_memory().await.unwrap();
    let e = node
        .map(MapSpec {
            id: Some("missing".into()),
            mode: OpenMode::OpenExisting,
            ..MapSpec::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Map(MapError::MapNotFound(name)) if name == "missing"),
        "{e:?}"
    );
    assert!(e.is_not_found());
    let m = node.map("m").await.unwrap();
    let e = m.get("nope").await.unwrap_err();
    assert!(
        matches!(e.map_error(), Some(MapError::ItemNotFound(_))),
        "{e:?}"
    );
    // Network calls on a node without a network say so.
    assert!(matches!(node.listening().await, Err(Error::NoNetwork)));
    assert!(matches!(
        node.peers_connected(1).await,
        Err(Error::NoNetwork)
    ));
    // Subscribing outside a tokio runtime is an error, not a silent stream.
    let n2 = node.clone();
    let outside = std::thread::spawn(move || n2.subscribe().map(|_| ()))
        .join()
        .unwrap();
    assert!(matches!(outside, Err(Error::NoRuntime)), "{outside:?}");
    assert!(node.subscribe().is_ok());
    // A closed node answers Closed.
    node.clone().close().await.unwrap();
    assert!(matches!(m.get("x").await, Err(Error::Closed)));
    assert!(matches!(node.maps().await, Err(Error::Closed)));
}

/// A builder for a node of an isolated loopback mesh (no mDNS; every peer trusted).
fn mesh_node() -> syncmesh::NodeBuilder {
    Node::builder().mdns(false).trust_all(true)
}

/// The node's first listen address, once it listens.
async fn first_addr(n: &Node) -> syncmesh::Multiaddr {
    tokio::time::timeout(DEADLINE, n.listening())
        .await
        .unwrap()
        .unwrap()[0]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_awaited_not_polled() {
    let a = mesh_node()
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .open()
        .await
        .unwrap();
    let a_addr = first_addr(&a).await;
    assert!(a_addr.to_string().contains("/p2p/"), "{a_addr}");
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.peers_connected(1).await })
    };
    let b = mesh_node().peer(a_addr).open().await.unwrap();
    let b_id = b.network().unwrap().peer_id;
    let up = tokio::time::timeout(DEADLINE, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(up, vec![b_id]);
    // Once a node is up for B, B's maps are found from A.
    let mb = b.map("only-on-b").await.unwrap();
    mb.set("k", json!({"v": 1})).await.unwrap();
    let found = a.open_existing("only-on-b").await.unwrap();
    assert_eq!(found.get("k").await.unwrap().data["v"], 1);
    // Waiting on a node that closes ends with Closed.
    let stuck = {
        let a = a.clone();
        tokio::spawn(async move { a.peers_connected(5).await })
    };
    a.close().await.unwrap();
    let r = tokio::time::timeout(DEADLINE, stuck)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(Error::Closed)), "{r:?}");
    b.close().await.unwrap();
}

/// A networked node whose disk fills up leaves the mesh (it could store nothing peers send)
/// and answers waits at once; its peer sees it go. Needs `mount` (root, as on CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_writes_stopped_leaves_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path(), "a_node_whose_writes_stopped_leaves_the_mesh")
    else {
        return;
    };
    let mnt = disk.0.clone();
    let a = mesh_node()
        .data_dir(mnt.join("data"))
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .open()
        .await
        .unwrap();
    let a_addr = first_addr(&a).await;
    let b = mesh_node().peer(a_addr).open().await.unwrap();
    tokio::time::timeout(DEADLINE, b.peers_connected(1))
        .await
        .unwrap()
        .unwrap();
    let m = a.map("big").await.unwrap();
    let blob = "x".repeat(8 * 1024);
    let mut i = 0;
    while m
        .set(&format!("k{i:05}"), json!({ "blob": blob }))
        .await
        .is_ok()
    {
        i += 1;
        assert!(i < 10_000, "a 3 MiB disk fills up");
    }
    // A leaves: B sees it go, A's network says it stopped, and waiting on it ends.
    let gone = async {
        while !b.network().unwrap().connected.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, gone).await.unwrap();
    assert!(a.network().unwrap().stopped);
    assert!(matches!(a.listening().await, Err(Error::NoNetwork)));
    // Reads on A go on.
    assert!(m.get("k00000").await.is_ok());
    b.close().await.unwrap();
    drop(m);
    let _ = a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_documents_stay_within_the_budget_and_parked_ones_come_back() {
    let budget = 2 * 1024 * 1024;
    let node = Node::builder()
        .in_memory()
        .document_budget(budget)
        .open()
        .await
        .unwrap();
    let maps = [node.map("a").await.unwrap(), node.map("b").await.unwrap()];
    for i in 0..3_000 {
        let m = &maps[i % 2];
        m.set(&format!("k{i}"), json!({"i": i, "s": "some text"}))
            .await
            .unwrap();
    }
    // Checked every 50 ms after a round: wait for it (no fixed sleep).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (bytes, docs) = loop {
        let (bytes, docs) = node.live_documents().await.unwrap();
        if bytes <= budget {
            break (bytes, docs);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live documents at {bytes} bytes over a {budget}-byte budget"
        );
        let _ = maps[0].get("k0").await; // a command: the engine runs a round
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("live documents: ~{bytes} bytes in {docs} shard documents");
    assert!(
        docs < 2 * 1024,
        "some shard documents were parked ({docs} live)"
    );
    // Everything is still there, parked or not, and writes to parked shards work.
    for i in (0..3_000).step_by(7) {
        let m = &maps[i % 2];
        assert_eq!(m.get(&format!("k{i}")).await.unwrap().data["i"], i);
    }
    maps[1].set("k1", json!({"i": -1})).await.unwrap();
    assert_eq!(maps[1].get("k1").await.unwrap().data["i"], -1);
    node.close().await.unwrap();
}

/// Every item's data, by key (one page: the maps here hold at most 100 items).
async fn all_data(m: &syncmesh::Map) -> std::collections::BTreeMap<String, syncmesh::JsonObject> {
    let page = m
        .items(PageRequest {
            page_size: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    page.items.into_iter().map(|i| (i.key, i.data)).collect()
}

/// Relaxed writes are acknowledged before their commit and many share one; what a reader,
/// the event feed and a reopened node see is exactly what was written, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_writes_share_commits_and_lose_nothing_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .data_dir(dir.path())
        .durability(syncmesh::Durability::Relaxed)
        .open()
        .await
        .unwrap();
    let m = node.map("relaxed").await.unwrap();
    let mut live = m.subscribe().await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..1_500u64 {
        let key = format!("k{}", i % 97);
        if i % 11 == 0 && expected.contains_key(&key) {
            m.remove(&key).await.unwrap();
            expected.remove(&key);
        } else if i % 3 == 0 {
            let item = m.update(&key, json!({"u": i})).await.unwrap();
            expected.insert(key.clone(), item.data);
        } else {
            let item = m.set(&key, json!({"i": i})).await.unwrap();
            expected.insert(key.clone(), item.data);
        }
        if i % 250 == 0 {
            // a read right after a write shows it (it waits for the commit, not for an fsync)
            let got = m.get(&key).await.map(|i| i.data).ok();
            assert_eq!(got.as_ref(), expected.get(&key));
        }
    }
    // Every event arrives once, in order, numbered without gaps.
    let mut last = 0;
    while last < 1_500 {
        let e = next_event(&mut live).await;
        assert_eq!(e.id, last + 1);
        last = e.id;
    }
    assert_eq!(all_data(&m).await, expected);
    node.close().await.unwrap();

    let node = Node::open(dir.path()).await.unwrap();
    let m = node.open_existing("relaxed").await.unwrap();
    assert_eq!(
        all_data(&m).await,
        expected,
        "a clean close keeps every acknowledged write"
    );
    let mut all = m.subscribe_from(0).await.unwrap();
    for want in 1..=1_500 {
        assert_eq!(next_event(&mut all).await.id, want);
    }
    node.close().await.unwrap();
}

/// Used to: relaxed writes are answered before their commit, and events are published with
/// the commit, so a live subscription made right after a write was answered received that
/// write's event (43 of 50 rounds in a review; 0 with fsync). It now starts after the newest
/// event the map has, published or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscription_starts_after_every_answered_write() {
    for durability in [syncmesh::Durability::Relaxed, syncmesh::Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::builder()
            .data_dir(dir.path())
            .durability(durability)
            .open()
            .await
            .unwrap();
        let m = node.map("r").await.unwrap();
        for i in 0..50 {
            m.set(&format!("before{i}"), json!({"i": i})).await.unwrap();
            let mut live = m.subscribe().await.unwrap();
            m.set(&format!("after{i}"), json!({"i": i})).await.unwrap();
            let e = next_event(&mut live).await;
            match &e.kind {
                EventKind::ItemAdded { item } => {
                    assert_eq!(item.key, format!("after{i}"), "{durability:?}")
                }
                other => panic!("{other:?}"),
            }
            // and it resumes from where it started
            let resumed = m.subscribe_from(e.id - 1).await.unwrap();
            drop(resumed);
        }
        node.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_alone_cuts_history_and_keeps_its_items() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .data_dir(dir.path())
        .history(8)
        .open()
        .await
        .unwrap();
    let m = node.map("m").await.unwrap();
    for r in 0..50 {
        m.set("k", json!({ "r": r })).await.unwrap();
    }
    let history = || async {
        let h = node.history().await.unwrap();
        h.into_iter()
            .find(|m| m.name.as_deref() == Some("m"))
            .unwrap()
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while history().await.generation == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no cut within the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = history().await;
    assert!(h.ops < 20, "{h:?}");
    assert_eq!(m.get("k").await.unwrap().data["r"], 49);
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.open_existing("m").await.unwrap();
    assert_eq!(m.get("k").await.unwrap().data["r"], 49);
    m.update("k", json!({"more": 1})).await.unwrap();
    assert_eq!(m.get("k").await.unwrap().data["r"], 49);
    node.close().await.unwrap();
}
