//! The sans-IO engine of syncmesh: Sync Maps semantics on Automerge documents.
//!
//! A [`MapReplica`] is one map as held by one replica. Operations take `now` (the engine never
//! reads a clock), update the replica's read view at once, emit [`Event`]s and queue Automerge
//! writes that [`MapReplica::flush`] commits as changes for storage and peers. Changes from peers
//! go in through [`MapReplica::apply_changes`] and come out as events with `is_local == false`.
//!
//! ```
//! use syncmesh_core::{Catalog, Identity, MapSpec, NodeId, Timestamp, WriteOptions};
//! use serde_json::json;
//!
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
//!
//! let mut a = Catalog::new(Identity::new(NodeId([1; 16]), b"a"));
//! let mut b = Catalog::new(Identity::new(NodeId([2; 16]), b"b"));
//! let (users_a, _) = a.open(&MapSpec::named("users"), [0; 16], now)?;
//! users_a.set("david", obj(json!({"phone_number": 12345678, "country": "UK"})), &WriteOptions::default(), now)?;
//! users_a.flush(now)?;
//!
//! // Ship A's changes to B (a network would do this).
//! for c in users_a.take_outgoing() {
//!     b.apply_changes(&c.map, c.doc, &[c.bytes], now)?;
//! }
//! let users_b = b.get_mut("users", now)?;
//! assert_eq!(users_b.get("david", now)?.data["country"], "UK");
//! let events = users_b.take_events();
//! assert!(!events.last().unwrap().is_local);
//! # Ok::<(), syncmesh_core::Error>(())
//! ```
//!
//! The JSON encoding is documented in [`json`] (module docs) and the document
//! layout in [`layout`]; the semantics of concurrent writes in `docs/semantics.md`.

#![warn(missing_docs)]

mod am;
pub mod authorship;
mod catalog;
mod error;
mod event;
pub mod generation;
mod ids;
pub mod json;
pub mod layout;
pub mod limits;
mod map;
pub mod paging;
pub mod policy;
pub mod replication;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod varint;

pub use authorship::{Signature, Signer};
/// A change's hash (Automerge's).
pub use automerge::ChangeHash;
pub use catalog::{Catalog, MapRef, MapSpec, OpenMode};
pub use error::{Error, Result};
pub use event::{Event, EventKind, EventView, Item, MapInfo};
pub use ids::{MapSid, NodeId, Revision, Timestamp};
pub use limits::Ttl;
pub use map::{
    check_change, check_changes, decode_sync, entry_data, entry_item, needs_manage, version_entry,
    Checked, DecodedSync, DocAddr, Durability, Identity, ItemConflicts, MapReplica, OutgoingChange,
    ShardHistory, StoredDoc, ViewChanges, WriteOptions, MAX_ITEMS_PER_CHANGE,
};
pub use paging::{Bounds, Order, Page, PageRequest};
pub use policy::{Permission, Policy};

/// A JSON object: the data of an item.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;
