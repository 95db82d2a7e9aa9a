//! Items, map descriptions and the events a map replica emits.

use crate::ids::{MapSid, NodeId, Revision, Timestamp};
use crate::JsonObject;
use serde::{Deserialize, Serialize};

/// An item as read: its key, data and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The item's key.
    pub key: String,
    /// The item's JSON object.
    pub data: JsonObject,
    /// Opaque; changes on every change to the item; equal on replicas with the same changes.
    pub revision: Revision,
    /// When the item was created (creating writer's clock).
    pub date_created: Timestamp,
    /// When the item was last written (that writer's clock).
    pub date_updated: Timestamp,
    /// When the item expires, if it has a TTL.
    pub date_expires: Option<Timestamp>,
    /// The node that created the item.
    pub created_by: NodeId,
}

/// A map as described by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapInfo {
    /// The map's sid.
    pub sid: MapSid,
    /// The map's unique name, if it has one.
    pub unique_name: Option<String>,
    /// Opaque; changes when the map's own properties change.
    pub revision: Revision,
    /// When the map was created.
    pub date_created: Timestamp,
    /// When the map or one of its items was last changed, as far as this replica knows.
    pub date_updated: Timestamp,
    /// When the map expires, if it has a TTL.
    pub date_expires: Option<Timestamp>,
    /// The node that created the map.
    pub created_by: NodeId,
    /// Live items this replica holds (others may hold changes it has not seen yet).
    #[serde(default)]
    pub items_count: u64,
}

/// What happened, in an [`Event`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// An item appeared.
    ItemAdded {
        /// The item as it is now.
        item: Item,
    },
    /// An item's data or metadata changed.
    ItemUpdated {
        /// The item as it is now.
        item: Item,
        /// Its data before the change.
        previous_data: JsonObject,
    },
    /// An item disappeared (removed, or expired).
    ItemRemoved {
        /// The removed item's key.
        key: String,
        /// Its data before removal.
        previous_data: JsonObject,
    },
    /// The map was removed (or expired); no item events follow for this incarnation.
    MapRemoved,
}

/// One change seen by a replica, local or merged from a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Per-map, per-replica, strictly increasing from 1.
    pub id: u64,
    /// The map the event belongs to.
    pub map: MapSid,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// True when this replica made the change, false when it was merged from a peer.
    pub is_local: bool,
    /// When this replica observed the change.
    pub date: Timestamp,
}

impl EventKind {
    /// The item key the event is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            EventKind::ItemAdded { item } | EventKind::ItemUpdated { item, .. } => Some(&item.key),
            EventKind::ItemRemoved { key, .. } => Some(key),
            EventKind::MapRemoved => None,
        }
    }
}

/// A view rebuilt from an event stream: applying a replica's events to an empty view must
/// reproduce that replica's items exactly.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EventView {
    /// Items by key.
    pub items: std::collections::BTreeMap<String, Item>,
    /// Whether a `MapRemoved` was the last map-level event.
    pub removed: bool,
    /// Id of the last event applied.
    pub last_id: u64,
}

impl EventView {
    /// Applies one event; returns an error text when the stream is inconsistent (an update of
    /// an unknown item, a non-increasing id, a wrong previous value).
    pub fn apply(&mut self, ev: &Event) -> Result<(), String> {
        if ev.id <= self.last_id {
            return Err(format!("event id {} after {}", ev.id, self.last_id));
        }
        self.last_id = ev.id;
        match &ev.kind {
            EventKind::ItemAdded { item } => {
                if self.items.insert(item.key.clone(), item.clone()).is_some() {
                    return Err(format!("added {:?} which already existed", item.key));
                }
                self.removed = false;
            }
            EventKind::ItemUpdated {
                item,
                previous_data,
            } => match self.items.insert(item.key.clone(), item.clone()) {
                None => return Err(format!("updated {:?} which did not exist", item.key)),
                Some(old) if &old.data != previous_data => {
                    return Err(format!("previous data of {:?} does not match", item.key))
                }
                Some(_) => {}
            },
            EventKind::ItemRemoved { key, previous_data } => match self.items.remove(key) {
                None => return Err(format!("removed {key:?} which did not exist")),
                Some(old) if &old.data != previous_data => {
                    return Err(format!("previous data of removed {key:?} does not match"))
                }
                Some(_) => {}
            },
            EventKind::MapRemoved => {
                self.items.clear();
                self.removed = true;
            }
        }
        Ok(())
    }
}
