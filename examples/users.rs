//! The Sync Maps "users" walkthrough on a durable syncmesh node, with no network at all:
//! open map `users`, set `david`, update his country, mutate it, list items, watch events,
//! remove the item, remove the map.
//!
//! `cargo run --example users` (data in a temporary directory) or
//! `cargo run --example users -- ./my-data` (data kept in `./my-data`).

use serde_json::json;
use syncmesh::{EventKind, Node, PageRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let node = Node::open(&dir).await?;
    println!("node {} with data in {}", node.id(), dir.display());

    let users = node.map("users").await?;
    // Watch events from another task, as an app's UI would.
    let mut events = users.subscribe().await?;
    let watcher = tokio::spawn(async move {
        while let Some(Ok(e)) = events.next().await {
            let what = match &e.kind {
                EventKind::ItemAdded { item } => {
                    format!("itemAdded   {} {}", item.key, json!(item.data))
                }
                EventKind::ItemUpdated { item, .. } => {
                    format!("itemUpdated {} {}", item.key, json!(item.data))
                }
                EventKind::ItemRemoved { key, .. } => format!("itemRemoved {key}"),
                EventKind::MapRemoved => {
                    println!("  event #{}: removed", e.id);
                    break;
                }
            };
            println!("  event #{}: {what} (local: {})", e.id, e.is_local);
        }
    });

    let item = users
        .set("david", json!({"phone_number": 12345678, "country": "UK"}))
        .await?;
    println!("Added: {} (revision {})", item.key, item.revision);
    users.update("david", json!({"country": "IRL"})).await?;
    users
        .mutate("david", |data| {
            let mut d = data.cloned().unwrap_or_default();
            d.insert("country".into(), json!("USA"));
            Some(d)
        })
        .await?;
    let page = users.items(PageRequest::default()).await?;
    println!(
        "show first item: {} {}",
        page.items[0].key,
        json!(page.items[0].data)
    );
    println!("get: {}", json!(users.get("david").await?.data));
    users.remove("david").await?;
    println!("item deleted");
    users.remove_map().await?;
    println!("map deleted");
    watcher.await?;
    node.close().await?;
    Ok(())
}
