//! What this node knows of and allows each connected peer.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{sync, ChangeHash};

use crate::ids::{MapSid, Timestamp};
use crate::map::DocAddr;

/// How the replication machine names a peer: any cheap-to-clone ordered key whose text
/// ([`AsRef<str>`]) is the peer's id as maps' permissions name it.
pub trait PeerKey: Clone + Ord + std::hash::Hash + std::fmt::Debug + AsRef<str> {}

impl<T: Clone + Ord + std::hash::Hash + std::fmt::Debug + AsRef<str>> PeerKey for T {}

/// What one peer may do with this node's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The maps it may receive; `None` for every map.
    pub maps: Option<BTreeSet<MapSid>>,
    /// Whether it may change the maps it receives.
    pub write: bool,
}

impl Grant {
    /// Every map, read and write.
    pub fn full() -> Grant {
        Grant {
            maps: None,
            write: true,
        }
    }

    /// Whether the peer may receive `sid`.
    pub fn reads(&self, sid: &MapSid) -> bool {
        self.maps.as_ref().is_none_or(|m| m.contains(sid))
    }

    /// Whether the peer may change `sid`.
    pub fn writes(&self, sid: &MapSid) -> bool {
        self.write && self.reads(sid)
    }
}

impl Default for Grant {
    fn default() -> Self {
        Grant::full()
    }
}

/// Changes a peer sent that were not applied because it may not write the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal<P> {
    /// The peer.
    pub peer: P,
    /// The map.
    pub sid: MapSid,
    /// How many changes were refused.
    pub changes: u64,
}

/// Replication state with one connected peer.
#[derive(Default)]
pub(crate) struct PeerState {
    pub(crate) grant: Grant,
    /// Per map, changes offered to this peer by sync while it may not write the map.
    pub(crate) offered: HashMap<MapSid, HashSet<ChangeHash>>,
    pub(crate) hold_all: bool,
    /// Maps the peer said it holds.
    pub(crate) held: BTreeSet<MapSid>,
    pub(crate) sessions: HashMap<(MapSid, DocAddr), sync::State>,
    /// Sessions in which this node refused some of the peer's changes: the peer keeps them,
    /// so the two never agree on heads, and Automerge would answer every message forever.
    /// Until the session restarts, a reply goes only with changes not offered before.
    pub(crate) refusing: HashSet<(MapSid, DocAddr)>,
    /// Sessions in which a repeated "I hold nothing" was taken as the crossing of both sides'
    /// first messages (see `on_sync`); once per session.
    pub(crate) crossed: HashSet<(MapSid, DocAddr)>,
    /// The peer's latest document digests per map.
    pub(crate) their_docs: HashMap<MapSid, Vec<(DocAddr, u64)>>,
    /// The peer's latest digest of each map it holds (from its Hello).
    pub(crate) their_digest: HashMap<MapSid, u64>,
    /// Whether its Hello (the maps it holds) has come on this connection.
    pub(crate) greeted: bool,
    /// Maps whose unsigned changes' signatures were asked of the peer on this connection.
    pub(crate) asked_sigs: BTreeSet<MapSid>,
    /// Maps whose [`Wire::Sigs`](super::Wire::Sigs) answer is awaited from the peer (one answer per ask).
    pub(crate) awaiting_sigs: BTreeSet<MapSid>,
    /// When the map document of each map was last fetched from the peer because its gossip
    /// was deferred (at most once per [`META_FETCH_INTERVAL`](super::wire::META_FETCH_INTERVAL)).
    pub(crate) meta_fetched: HashMap<MapSid, Timestamp>,
}
