//! What the API sends and accepts, in the field names of the hosted Sync Maps REST API.
//!
//! Request parameters use the hosted API's PascalCase names (`UniqueName`, `Key`, `Data`,
//! `Ttl`); resources use its snake_case field names. Each type is also an OpenAPI schema.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use syncmesh::{Event, EventKind, Item, JsonObject, MapInfo, Timestamp};
use utoipa::{IntoParams, ToSchema};

use crate::urls::Urls;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Sync Maps error code (54xxx) or server error code (20xxx).
    pub code: u32,
    /// What went wrong and what to do.
    pub message: String,
    /// Where the code is explained.
    pub more_info: String,
    /// The HTTP status, repeated.
    pub status: u16,
}

/// Links of a map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MapLinks {
    /// The map's items.
    pub items: String,
    /// The map's live event stream (WebSocket or Server-Sent Events).
    pub events: String,
}

/// A map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MapResource {
    /// System id: `MP` + 32 hex digits.
    pub sid: String,
    /// The unique name, if the map has one.
    pub unique_name: Option<String>,
    /// Opaque; changes when the map's own properties change.
    pub revision: String,
    /// RFC 3339, UTC.
    pub date_created: String,
    /// RFC 3339, UTC: the last change to the map or one of its items known here.
    pub date_updated: String,
    /// RFC 3339, UTC; `null` if the map never expires.
    pub date_expires: Option<String>,
    /// Id of the node that created the map.
    pub created_by: String,
    /// Live items this node holds (peers may hold changes it has not received yet).
    pub items_count: u64,
    /// This resource.
    pub url: String,
    /// Related resources.
    pub links: MapLinks,
}

impl MapResource {
    /// The resource for `info`.
    pub fn new(info: &MapInfo, urls: &Urls) -> Self {
        let sid = info.sid.as_str();
        MapResource {
            sid: sid.to_string(),
            unique_name: info.unique_name.clone(),
            revision: info.revision.to_string(),
            date_created: rfc3339(info.date_created),
            date_updated: rfc3339(info.date_updated),
            date_expires: info.date_expires.map(rfc3339),
            created_by: info.created_by.to_string(),
            items_count: info.items_count,
            url: urls.map(sid),
            links: MapLinks {
                items: urls.items(sid),
                events: urls.events(sid),
            },
        }
    }
}

/// An item's concurrent values: what the merge kept besides the visible data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictsResource {
    /// The item's key.
    pub key: String,
    /// The map's sid.
    pub map_sid: String,
    /// Whole values written concurrently on several nodes (by set, mutate or create) that no
    /// later write resolved: all of them, the visible (winning) one first. Empty unless there
    /// are at least two.
    #[schema(value_type = Vec<Object>)]
    pub values: Vec<JsonObject>,
    /// For each field updated concurrently on several nodes: every value still current, the
    /// visible (winning) one first. Empty when nothing conflicts.
    #[schema(value_type = Object)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Ids of the nodes whose concurrent writes to the item are all still current, the
    /// winner first (one when there is no conflict).
    pub writers: Vec<String>,
    /// This resource.
    pub url: String,
}

/// An item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ItemResource {
    /// The item's key.
    pub key: String,
    /// The map's sid.
    pub map_sid: String,
    /// The item's JSON object.
    #[schema(value_type = Object)]
    pub data: JsonObject,
    /// Opaque; changes on every change to the item (also sent as `ETag`).
    pub revision: String,
    /// RFC 3339, UTC.
    pub date_created: String,
    /// RFC 3339, UTC.
    pub date_updated: String,
    /// RFC 3339, UTC; `null` if the item never expires.
    pub date_expires: Option<String>,
    /// Id of the node that created the item.
    pub created_by: String,
    /// This resource (the key percent-encoded).
    pub url: String,
}

impl ItemResource {
    /// The resource for `item` of map `sid`.
    pub fn new(item: Item, sid: &str, urls: &Urls) -> Self {
        ItemResource {
            url: urls.item(sid, &item.key),
            key: item.key,
            map_sid: sid.to_string(),
            data: item.data,
            revision: item.revision.to_string(),
            date_created: rfc3339(item.date_created),
            date_updated: rfc3339(item.date_updated),
            date_expires: item.date_expires.map(rfc3339),
            created_by: item.created_by.to_string(),
        }
    }
}

/// Paging information of a list, as in the hosted API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PageMeta {
    /// Page number, from 0 (informational: pages are found by `PageToken`).
    pub page: u64,
    /// Items per page.
    pub page_size: u64,
    /// The first page of this listing.
    pub first_page_url: String,
    /// The page before this one, if any.
    pub previous_page_url: Option<String>,
    /// The page after this one, if any.
    pub next_page_url: Option<String>,
    /// This page.
    pub url: String,
    /// Name of the list field: `maps` or `items`.
    pub key: String,
    /// Item listings only: the id of the newest event of the map this page reflects (0: none
    /// yet). The map's events after it (`?after=` on its events route) are exactly the changes
    /// this page does not show for the keys it covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<u64>,
}

/// A page of maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MapList {
    /// The maps, in sid order.
    pub maps: Vec<MapResource>,
    /// Paging.
    pub meta: PageMeta,
}

/// A page of items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ItemList {
    /// The items, in key order.
    pub items: Vec<ItemResource>,
    /// Paging.
    pub meta: PageMeta,
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// An item appeared.
    MapItemAdded,
    /// An item changed.
    MapItemUpdated,
    /// An item was removed or expired.
    MapItemRemoved,
    /// The map was removed or expired.
    MapRemoved,
}

/// One live event of a map, as sent over WebSocket and Server-Sent Events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventBody {
    /// Per map and node, strictly increasing; resume after it with `Last-Event-ID` or `after`.
    pub id: u64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The map's sid.
    pub map_sid: String,
    /// The item's key (`null` for `map_removed`).
    pub item_key: Option<String>,
    /// The item's data now (`null` for removals).
    #[schema(value_type = Option<Object>)]
    pub item_data: Option<JsonObject>,
    /// The item's data before (`null` for additions and `map_removed`).
    #[schema(value_type = Option<Object>)]
    pub previous_item_data: Option<JsonObject>,
    /// The item's revision now (`null` for removals).
    pub item_revision: Option<String>,
    /// RFC 3339, UTC: when the item was created (`null` for removals).
    #[serde(default)]
    pub item_date_created: Option<String>,
    /// RFC 3339, UTC: when the item was last written (`null` for removals).
    #[serde(default)]
    pub item_date_updated: Option<String>,
    /// RFC 3339, UTC: when the item expires (`null` if it never does, and for removals).
    #[serde(default)]
    pub item_date_expires: Option<String>,
    /// Id of the node that created the item (`null` for removals).
    #[serde(default)]
    pub item_created_by: Option<String>,
    /// True if this node made the change, false if it came from a peer.
    pub is_local: bool,
    /// RFC 3339, UTC: when this node observed the change.
    pub date_created: String,
}

impl From<Event> for EventBody {
    fn from(e: Event) -> Self {
        let (kind, key, item, prev) = match e.kind {
            EventKind::ItemAdded { item } => (EventType::MapItemAdded, None, Some(item), None),
            EventKind::ItemUpdated {
                item,
                previous_data,
            } => (
                EventType::MapItemUpdated,
                None,
                Some(item),
                Some(previous_data),
            ),
            EventKind::ItemRemoved { key, previous_data } => (
                EventType::MapItemRemoved,
                Some(key),
                None,
                Some(previous_data),
            ),
            EventKind::MapRemoved => (EventType::MapRemoved, None, None, None),
        };
        let mut body = EventBody {
            id: e.id,
            kind,
            map_sid: e.map.to_string(),
            item_key: key,
            item_data: None,
            previous_item_data: prev,
            item_revision: None,
            item_date_created: None,
            item_date_updated: None,
            item_date_expires: None,
            item_created_by: None,
            is_local: e.is_local,
            date_created: rfc3339(e.date),
        };
        if let Some(item) = item {
            body.item_revision = Some(item.revision.to_string());
            body.item_date_created = Some(rfc3339(item.date_created));
            body.item_date_updated = Some(rfc3339(item.date_updated));
            body.item_date_expires = item.date_expires.map(rfc3339);
            body.item_created_by = Some(item.created_by.to_string());
            body.item_key = Some(item.key);
            body.item_data = Some(item.data);
        }
        body
    }
}

/// The message that ends an event stream that cannot go on (e.g. events were pruned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamError {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Error code, as in [`ErrorBody`].
    pub code: u32,
    /// What went wrong and what to do.
    pub message: String,
    /// HTTP status the error would have had.
    pub status: u16,
}

/// This node: its identity, addresses, peers and number of maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The node's peer id on the network (`null` for a node not on a network).
    pub peer_id: Option<String>,
    /// Full multiaddrs the node listens on, with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// The address the HTTP API is bound to.
    pub http_addr: String,
    /// Peer ids of trusted peers connected now (the ones maps are exchanged with).
    pub connected_peers: Vec<String>,
    /// Number of live maps.
    pub maps: u64,
    /// The node's id (`created_by` of what it creates).
    pub node_id: String,
    /// The server's version.
    pub version: String,
    /// Why the node stopped taking writes (a failed commit: full disk, I/O error; reopen it
    /// once fixed), or `null` while writes work.
    pub writes_stopped: Option<String>,
    /// Whether every peer that connects is trusted (`--trust-all`, or a swarm key: every
    /// holder of the key).
    pub trust_all: bool,
    /// Peers this node exchanges maps with (stored and configured).
    pub trusted_peers: Vec<TrustedPeerResource>,
    /// Peer ids of peers connected now that are not trusted (nothing is exchanged with them).
    pub untrusted_peers: Vec<String>,
    /// Peers found on the local network (mDNS); only trusted ones are dialed.
    pub discovered_peers: Vec<DiscoveredPeerResource>,
    /// The latest reason per peer (or address) that it is not exchanging data, newest first.
    pub problems: Vec<PeerProblemResource>,
    /// Changes refused from peers that may not write a map, since the node started.
    pub refused_changes: u64,
    /// What clients may take of this node (see docs/http-api.md, "Limits").
    pub limits: LimitsResource,
    /// Live event subscriptions now.
    pub subscribers: u64,
}

/// A node's limits on clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LimitsResource {
    /// HTTP connections at once (WebSockets included).
    pub max_connections: u64,
    /// Live event subscriptions at once.
    pub max_subscribers: u64,
    /// Live event subscriptions at once on one map.
    pub max_subscribers_per_map: u64,
    /// Seconds for a request head to arrive (and for a keep-alive connection to idle).
    pub header_timeout: u64,
    /// Seconds for a request body to arrive.
    pub body_timeout: u64,
    /// Largest WebSocket message a client may send, in bytes.
    pub ws_max_message: u64,
    /// Seconds a write to a client that stopped reading may wait before it is dropped.
    pub send_timeout: u64,
    /// The process's limit on open files (descriptors), when known.
    pub open_files: Option<u64>,
}

/// How a peer came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrustSourceName {
    /// It joined with a ticket this node issued.
    Invited,
    /// This node joined it with its ticket.
    Joined,
    /// Trusted by peer id (`POST /v1/Node/Peers/{peer_id}`).
    Manual,
    /// In the node's configuration (`--trust`); not stored.
    Config,
}

impl From<syncmesh::trust::TrustSource> for TrustSourceName {
    fn from(s: syncmesh::trust::TrustSource) -> Self {
        use syncmesh::trust::TrustSource;
        match s {
            TrustSource::Invited => TrustSourceName::Invited,
            TrustSource::Joined => TrustSourceName::Joined,
            TrustSource::Manual => TrustSourceName::Manual,
            TrustSource::Config => TrustSourceName::Config,
        }
    }
}

/// A trusted peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrustedPeerResource {
    /// Its peer id.
    pub peer_id: String,
    /// Addresses it is dialed at (kept dialed, with backoff).
    pub addrs: Vec<String>,
    /// RFC 3339, UTC: since when it is trusted (`null` for a configured peer).
    pub since: Option<String>,
    /// How it came to be trusted.
    pub source: TrustSourceName,
    /// Sids of the maps it may receive; `null` for every map.
    pub maps: Option<Vec<String>>,
    /// Whether its changes to those maps are accepted.
    pub write: bool,
    /// Whether it is connected now.
    pub connected: bool,
    /// Changes it sent that were refused (it may not write the map) since the node started.
    pub refused_changes: u64,
    /// Whether it takes this node's changes, as it answered when this node joined it with a
    /// ticket (`false`: a read-only invitation); `null` when not known.
    pub takes_our_writes: Option<bool>,
}

impl From<syncmesh::trust::TrustedPeer> for TrustedPeerResource {
    fn from(p: syncmesh::trust::TrustedPeer) -> Self {
        let configured = p.source == syncmesh::trust::TrustSource::Config;
        TrustedPeerResource {
            peer_id: p.peer_id,
            addrs: p.addrs,
            since: (!configured || p.since.millis() != 0).then(|| rfc3339(p.since)),
            source: p.source.into(),
            maps: p
                .maps
                .map(|m| m.iter().map(|s| s.as_str().to_string()).collect()),
            write: p.write,
            connected: p.connected,
            refused_changes: p.refused_changes,
            takes_our_writes: p.takes_our_writes,
        }
    }
}

/// A peer found on the local network (mDNS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiscoveredPeerResource {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses it announced.
    pub addrs: Vec<String>,
    /// RFC 3339, UTC: when it was last announced.
    pub last_seen: String,
    /// Whether it is trusted (then it is dialed; otherwise only listed).
    pub trusted: bool,
}

impl From<syncmesh::trust::DiscoveredPeer> for DiscoveredPeerResource {
    fn from(d: syncmesh::trust::DiscoveredPeer) -> Self {
        DiscoveredPeerResource {
            peer_id: d.peer_id,
            addrs: d.addrs,
            last_seen: rfc3339(d.last_seen),
            trusted: d.trusted,
        }
    }
}

/// The latest reason a peer (or an address) is not exchanging data with this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerProblemResource {
    /// The peer, when known.
    pub peer_id: Option<String>,
    /// The address, when that is what failed.
    pub addr: Option<String>,
    /// What happened: not trusted, unreachable, wrong swarm key, a refused join or change, ...
    pub reason: String,
    /// RFC 3339, UTC: when.
    pub at: String,
}

impl From<syncmesh::trust::PeerProblem> for PeerProblemResource {
    fn from(p: syncmesh::trust::PeerProblem) -> Self {
        PeerProblemResource {
            peer_id: p.peer_id,
            addr: p.addr,
            reason: p.reason,
            at: rfc3339(p.at),
        }
    }
}

/// Whom this node exchanges maps with, and why not with the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeersResource {
    /// Whether every peer that connects is trusted (`--trust-all`, or a swarm key).
    pub trusts_everyone: bool,
    /// Trusted peers (stored and configured).
    pub trusted_peers: Vec<TrustedPeerResource>,
    /// Peer ids of trusted peers connected now (the ones maps are exchanged with).
    pub connected_peers: Vec<String>,
    /// Peer ids of peers connected now that are not trusted (nothing is exchanged with them).
    pub untrusted_peers: Vec<String>,
    /// Peers found on the local network (mDNS).
    pub discovered_peers: Vec<DiscoveredPeerResource>,
    /// The latest problem per peer or address, newest first.
    pub problems: Vec<PeerProblemResource>,
    /// Changes refused from peers that may not write a map, since the node started.
    pub refused_changes: u64,
}

impl From<syncmesh::trust::Peers> for PeersResource {
    fn from(p: syncmesh::trust::Peers) -> Self {
        PeersResource {
            trusts_everyone: p.trusts_everyone,
            trusted_peers: p.trusted.into_iter().map(Into::into).collect(),
            connected_peers: p.connected,
            untrusted_peers: p.untrusted,
            discovered_peers: p.discovered.into_iter().map(Into::into).collect(),
            problems: p.problems.into_iter().map(Into::into).collect(),
            refused_changes: p.refused_changes,
        }
    }
}

/// An invitation: give its ticket to the node that should join (`POST /v1/Node/Join`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InviteResource {
    /// The ticket: one copy-pasteable string (`smt1…`). It is a secret until used or expired.
    pub ticket: String,
    /// RFC 3339, UTC: when the ticket stops being valid.
    pub expires: String,
    /// Sids of the maps it shares; `null` for every map.
    pub maps: Option<Vec<String>>,
    /// Whether the invitee's changes to them are accepted.
    pub write: bool,
    /// How many nodes may join with it.
    pub uses: u32,
}

impl From<syncmesh::trust::Invite> for InviteResource {
    fn from(i: syncmesh::trust::Invite) -> Self {
        InviteResource {
            ticket: i.ticket,
            expires: rfc3339(i.expires),
            maps: i
                .maps
                .map(|m| m.iter().map(|s| s.as_str().to_string()).collect()),
            write: i.write,
            uses: i.uses,
        }
    }
}

/// Parameters of `POST /v1/Node/Invites`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteParams {
    /// Maps the invitee may receive, by unique name or sid (repeat the parameter, or give a
    /// JSON array); omitted for every map.
    #[serde(rename = "Maps")]
    #[schema(value_type = Option<Vec<String>>)]
    pub maps: Option<Value>,
    /// Whether the invitee may change them (default `true`).
    #[serde(rename = "Write")]
    #[schema(value_type = Option<bool>)]
    pub write: Option<Value>,
    /// Seconds the ticket stays valid, 1 to 31,536,000 (default 600).
    #[serde(rename = "Ttl")]
    #[schema(value_type = Option<i64>)]
    pub ttl: Option<Value>,
    /// How many nodes may join with the ticket, 1 or more (default 1).
    #[serde(rename = "Uses")]
    #[schema(value_type = Option<i64>)]
    pub uses: Option<Value>,
}

/// Parameters of `POST /v1/Node/Join`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinParams {
    /// The ticket another node's `POST /v1/Node/Invites` (or `syncmesh invite`) issued.
    #[serde(rename = "Ticket")]
    pub ticket: Option<String>,
}

/// Parameters of `POST /v1/Node/Peers/{peer_id}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustPeerParams {
    /// Multiaddrs to dial the peer at, kept dialed (repeat the parameter, or give a JSON
    /// array); omitted when the peer dials this node, or is found by mDNS.
    #[serde(rename = "Addr")]
    #[schema(value_type = Option<Vec<String>>)]
    pub addr: Option<Value>,
}

/// What `POST /v1/Node/Compact` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompactionReport {
    /// Size of the database file before, in bytes (0 for a node in memory).
    pub file_bytes_before: u64,
    /// Size of the database file after, in bytes.
    pub file_bytes_after: u64,
    /// Bytes of live data in the store after compaction.
    pub used_bytes: u64,
    /// How long it took, in seconds.
    pub seconds: f64,
    /// What compacting the file did: `done`, `nothing` (no free space to give back), or
    /// `busy` (writes outpaced the rewrite, the disk lacked room for a copy, or the node was
    /// closing; the file is left as it
    /// was until the next call).
    pub file: String,
}

/// Parameters of `POST /Maps`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMapParams {
    /// Unique name (1 to 320 characters, not shaped like a sid); omit for an unnamed map.
    #[serde(rename = "UniqueName")]
    pub unique_name: Option<String>,
    /// Seconds until the map expires, 0 to 31,536,000 (0 = never).
    #[serde(rename = "Ttl", alias = "CollectionTtl")]
    #[schema(value_type = Option<i64>)]
    pub ttl: Option<Value>,
}

/// Parameters of `POST /Maps/{map}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMapParams {
    /// Seconds from now until the map expires, 0 to 31,536,000 (0 = never).
    #[serde(rename = "Ttl", alias = "CollectionTtl")]
    #[schema(value_type = Option<i64>)]
    pub ttl: Option<Value>,
}

/// Parameters of `POST /Maps/{map}/Items`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItemParams {
    /// The key: 1 to 320 characters, any characters.
    #[serde(rename = "Key")]
    pub key: Option<String>,
    /// A JSON object of at most 16 KiB (in a form-encoded body: its JSON text).
    #[serde(rename = "Data")]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
    /// Seconds until the item expires, 0 to 31,536,000 (0 = never).
    #[serde(rename = "Ttl", alias = "ItemTtl")]
    #[schema(value_type = Option<i64>)]
    pub ttl: Option<Value>,
}

/// Parameters of `POST` and `PATCH /Maps/{map}/Items/{key}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteItemParams {
    /// A JSON object of at most 16 KiB (in a form-encoded body: its JSON text). `POST`
    /// replaces the data with it, `PATCH` merges its top-level fields into the data.
    #[serde(rename = "Data")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// Seconds from now until the item expires, 0 to 31,536,000 (0 = never); omitted keeps the
    /// current expiry.
    #[serde(rename = "Ttl", alias = "ItemTtl")]
    #[schema(value_type = Option<i64>)]
    pub ttl: Option<Value>,
}

/// Query of `GET /Maps`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MapsQuery {
    /// Maps per page, 1 to 100 (default 50).
    #[serde(rename = "PageSize")]
    #[param(value_type = Option<i64>)]
    pub page_size: Option<String>,
    /// A page token from `meta` of an earlier page.
    #[serde(rename = "PageToken")]
    pub page_token: Option<String>,
    /// Page number carried by page URLs (informational).
    #[serde(rename = "Page")]
    #[param(value_type = Option<u64>)]
    pub page: Option<String>,
}

/// Query of `GET /Maps/{map}/Items`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ItemsQuery {
    /// `asc` (default) or `desc` by key.
    #[serde(rename = "Order")]
    #[param(value_type = Option<String>, pattern = "^(asc|desc)$")]
    pub order: Option<String>,
    /// Key to start from.
    #[serde(rename = "From")]
    pub from: Option<String>,
    /// `inclusive` (default: start at `From`) or `exclusive` (start after it).
    #[serde(rename = "Bounds")]
    #[param(value_type = Option<String>, pattern = "^(inclusive|exclusive)$")]
    pub bounds: Option<String>,
    /// Items per page, 1 to 100 (default 50).
    #[serde(rename = "PageSize")]
    #[param(value_type = Option<i64>)]
    pub page_size: Option<String>,
    /// A page token from `meta` of an earlier page (`Order`, `From` and `Bounds` are then
    /// taken from the token).
    #[serde(rename = "PageToken")]
    pub page_token: Option<String>,
    /// Page number carried by page URLs (informational).
    #[serde(rename = "Page")]
    #[param(value_type = Option<u64>)]
    pub page: Option<String>,
}

/// Query of `GET /Maps/{map}/Events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this event id (0 = from the first retained event); `Last-Event-ID`
    /// takes precedence. Without either, the stream starts with the next change.
    #[param(value_type = Option<u64>)]
    pub after: Option<String>,
    /// The bearer token, for browsers' `EventSource` and `WebSocket`, which cannot set headers.
    pub access_token: Option<String>,
}

/// Formats a timestamp as RFC 3339 in UTC with milliseconds, e.g. `2026-11-28T06:13:00.000Z`.
pub fn rfc3339(t: Timestamp) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    // Peers' clocks are not trusted to be sane: out-of-range instants are clamped, never a panic.
    let nanos = i128::from(t.millis()) * 1_000_000;
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(if nanos < 0 {
        time::OffsetDateTime::UNIX_EPOCH
    } else {
        time::macros::datetime!(9999-12-31 23:59:59.999 UTC)
    });
    dt.format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc_and_never_panic() {
        assert_eq!(
            rfc3339(Timestamp::from_millis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_millis(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_millis(i64::MIN)),
            "1970-01-01T00:00:00.000Z"
        );
        assert!(rfc3339(Timestamp::from_millis(i64::MAX)).starts_with("9999-12-31"));
    }
}
