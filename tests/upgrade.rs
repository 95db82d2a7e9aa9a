//! A data directory written by the previous version (storage schema 5: items one Automerge
//! slot per field) opens, keeps its maps, items, revisions and events, and is upgraded in
//! place: new writes store items whole and the event feed goes on from where it was.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use syncmesh::{EventKind, Node, PageRequest};

const DEADLINE: Duration = Duration::from_secs(60);

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data-schema5");
    for f in ["identity.key", "syncmesh.redb"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

async fn next_event(s: &mut syncmesh::EventStream) -> syncmesh::Event {
    tokio::time::timeout(DEADLINE, s.next())
        .await
        .expect("an event within the deadline")
        .expect("stream open")
        .expect("event, not error")
}

fn key_of(e: &syncmesh::Event) -> (&'static str, String) {
    match &e.kind {
        EventKind::ItemAdded { item } => ("added", item.key.clone()),
        EventKind::ItemUpdated { item, .. } => ("updated", item.key.clone()),
        EventKind::ItemRemoved { key, .. } => ("removed", key.clone()),
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_5_data_directory_opens_with_everything_and_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let node = Node::open(dir.path()).await.unwrap();
    assert_eq!(node.id().to_string(), "4efabe7f43fb409f2db6ae12b107d31c");
    let mut names: Vec<String> = node
        .maps()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| m.unique_name)
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "users"]);

    let users = node.open_existing("users").await.unwrap();
    let david = users.get("david").await.unwrap();
    assert_eq!(
        david.data,
        *json!({"age": 42, "country": "FR", "phone": {"home": "+33 1"}})
            .as_object()
            .unwrap()
    );
    assert_eq!(david.revision.to_string(), "0c5dff4a007c5f63");
    let ada = users.get("ada/lovelace ü").await.unwrap();
    assert_eq!(ada.revision.to_string(), "7052ceeeba2952ef");
    let k7 = users.get("k7").await.unwrap();
    assert_eq!(k7.revision.to_string(), "3d562f5639e84977");
    assert_eq!(k7.data, *json!({"i": 7, "s": "v7"}).as_object().unwrap());
    assert_eq!(users.get("gone").await.unwrap_err().code(), 54201);
    let page = users
        .items(PageRequest {
            page_size: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    // "ttl" expires on 2027-12-01: counted only while it lives.
    let others: Vec<_> = page.items.iter().filter(|i| i.key != "ttl").collect();
    assert_eq!(others.len(), 42);

    // The stored event feed replays from the start, as written.
    let mut all = users.subscribe_from(0).await.unwrap();
    let mut feed = Vec::new();
    for want in 1..=46 {
        let e = next_event(&mut all).await;
        assert_eq!(e.id, want);
        feed.push(key_of(&e));
    }
    assert_eq!(feed[0], ("added", "david".to_string()));
    assert_eq!(feed[3], ("updated", "david".to_string()));
    assert_eq!(feed[4], ("removed", "gone".to_string()));
    assert_eq!(feed[45], ("added", "k40".to_string()));

    // New writes: a set stores the old item whole, an update adds to a field-per-slot item.
    let d2 = users
        .set("david", json!({"country": "IE", "age": 43}))
        .await
        .unwrap();
    let a2 = users
        .update("ada/lovelace ü", json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!(
        a2.data,
        *json!({"country": "UK", "n": 2}).as_object().unwrap()
    );
    let e = next_event(&mut all).await;
    let next = e.id;
    assert!(next > 46);
    assert_eq!(key_of(&e), ("updated", "david".to_string()));
    let e = next_event(&mut all).await;
    assert_eq!(e.id, next + 1);
    node.close().await.unwrap();

    // Reopened: everything stays, old and new.
    let node = Node::open(dir.path()).await.unwrap();
    let users = node.open_existing("users").await.unwrap();
    assert_eq!(users.get("david").await.unwrap(), d2);
    assert_eq!(users.get("ada/lovelace ü").await.unwrap(), a2);
    assert_eq!(users.get("k7").await.unwrap(), k7);
    let mut resumed = users.subscribe_from(next + 1).await.unwrap();
    users.set("k8", json!({})).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.id, next + 2);
    node.close().await.unwrap();
}
