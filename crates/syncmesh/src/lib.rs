//! # syncmesh
//!
//! Local-first, peer-to-peer replicated JSON maps with the API of hosted Sync Maps. A [`Node`]
//! keeps its maps in a data directory (or in memory) and works with no network at all; every
//! write is on disk (fsync) when it returns, and every change is an event you can subscribe
//! to — and resume after a restart without missing one.
//!
//! ```
//! use serde_json::json;
//! use syncmesh::{Node, PageRequest, EventKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), syncmesh::Error> {
//! # let dir = tempfile::tempdir().map_err(|_| syncmesh::Error::Closed)?;
//! let node = Node::open(dir.path()).await?;             // or Node::in_memory()
//! let users = node.map("users").await?;                 // open or create by unique name
//! let mut events = users.subscribe().await?;
//!
//! users.set("david", json!({"phone_number": 12345678, "country": "UK"})).await?;
//! users.update("david", json!({"country": "IRL"})).await?;
//! users
//!     .mutate("david", |data| {
//!         let mut d = data.cloned().unwrap_or_default();
//!         d.insert("country".into(), json!("USA"));
//!         Some(d)
//!     })
//!     .await?;
//!
//! let page = users.items(PageRequest::default()).await?;
//! assert_eq!(page.items[0].data["country"], "USA");
//!
//! let first = events.next().await.unwrap()?;            // item_added, is_local = true
//! assert!(matches!(first.kind, EventKind::ItemAdded { .. }));
//!
//! users.remove("david").await?;
//! users.remove_map().await?;
//! node.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Semantics of concurrent writes, TTLs and events are in `docs/semantics.md`; how the node
//! stores and commits in `docs/ARCHITECTURE.md`.

#![warn(missing_docs)]

mod engine;
mod error;
mod node;
pub mod trust;

pub use error::{Error, Result};
pub use node::{Durability, EventStream, Map, MapHistory, MapOpen, Node, NodeBuilder, Snapshot};
/// The Sync Maps limits (sizes, lengths, page sizes) every node enforces.
pub use syncmesh_core::limits;
/// The map rules an operation can break (not found, revision mismatch, limits, ...), inside
/// [`Error::Map`]: match on it rather than on codes.
pub use syncmesh_core::Error as MapError;
pub use syncmesh_core::{
    Bounds, Event, EventKind, Item, ItemConflicts, JsonObject, MapInfo, MapSid, MapSpec, NodeId,
    OpenMode, Order, Page, PageRequest, Permission, Revision, Timestamp, Ttl, WriteOptions,
};
pub use syncmesh_net::{Multiaddr, NetStatus, PeerId, SwarmKey};

/// The network's frame limits, as the replication protocol sets them
/// (`syncmesh_core::replication::wire`): what a node gives its `syncmesh_net::NetConfig`.
pub fn wire_limits() -> syncmesh_net::Limits {
    use syncmesh_core::replication::wire;
    syncmesh_net::Limits {
        max_message: wire::MAX_DIRECT_MESSAGE,
        max_batch: wire::MAX_DIRECT_BATCH,
        max_count: wire::MAX_DIRECT_COUNT,
    }
}
pub use syncmesh_store::{FileCompaction, StoreError};
