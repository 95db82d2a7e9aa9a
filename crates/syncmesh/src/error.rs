//! The library's error type.

use std::sync::Arc;

use syncmesh_store::StoreError;

/// What a [`crate::Node`] or [`crate::Map`] operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation was refused by the map's rules (not found, revision mismatch, limits, ...).
    #[error(transparent)]
    Map(#[from] syncmesh_core::Error),
    /// The store failed; the write was not acknowledged.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// An earlier storage failure stopped writes to keep memory and disk consistent.
    #[error("writes are stopped after a storage failure ({0}); reads still work — fix the cause and reopen the node")]
    WritesStopped(Arc<StoreError>),
    /// The node was closed (or its engine thread ended).
    #[error("the node is closed")]
    Closed,
    /// The node could not start a thread or task it needs (the system refused it).
    #[error("the node could not start its {what}: {why}")]
    Start {
        /// What could not start.
        what: &'static str,
        /// Why, as the system said.
        why: String,
    },
    /// A background task of the node failed (it panicked, or its runtime shut down): a bug or
    /// a runtime stopping under the node.
    #[error("a background task of the node failed: {0}")]
    Task(String),
    /// Streams and waits need a tokio runtime: the call was made outside one.
    #[error("this call needs a tokio runtime (call it from within one)")]
    NoRuntime,
    /// An internal inconsistency (a bug): the operation was not done.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A subscriber asked to resume from an event that is no longer retained.
    #[error("events {from} to {to} (exclusive) of map {map} are no longer retained; re-read the map, then subscribe from the newest event id")]
    EventsPruned {
        /// The map.
        map: String,
        /// First missing event id.
        from: u64,
        /// First retained event id.
        to: u64,
    },
    /// The write was not stored: its map was reloaded from disk because a peer sent data that
    /// could not be merged into it. Nothing else was lost; retry the write.
    #[error("the write to map {map} was not stored: the map was reloaded after a peer sent data that could not be merged; retry")]
    Reloaded {
        /// The map.
        map: String,
    },
    /// The network could not be set up (identity, swarm key, listen address).
    #[error(transparent)]
    Net(Arc<syncmesh_net::NetError>),
    /// A map only peers hold could not be fetched whole in time: no peer that may have it
    /// answered, or only part of it arrived. What arrived is kept and the fetch goes on in the
    /// background; try again. (A map no peer has is [`syncmesh_core::Error::MapNotFound`].)
    #[error("map {map} could not be fetched from peers in time: {why}; what arrived is kept and the fetch goes on — try again")]
    FetchIncomplete {
        /// The map asked for.
        map: String,
        /// What happened.
        why: String,
    },
    /// A network operation on a node opened without a network.
    #[error("this node is not on a network (give it a listen address, a peer, or mDNS)")]
    NoNetwork,
    /// A subscriber asked to resume after an event id this node has not issued for the map
    /// (event ids are per node: it may come from another node, or from before a reset).
    #[error("map {map} has no event {after} on this node (its newest is {newest}); event ids are per node — re-read the map, then subscribe from the newest event id")]
    UnknownEventId {
        /// The map.
        map: String,
        /// The id asked for.
        after: u64,
        /// The newest event id of the map on this node.
        newest: u64,
    },
    /// A trust operation failed (a bad ticket, a refused or unreachable join, a bad peer id).
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    /// A node-wide subscriber fell behind and missed events.
    #[error("the subscriber fell behind and missed {missed} events; resubscribe per map from the last event id seen")]
    Lagged {
        /// How many events were skipped.
        missed: u64,
    },
}

impl From<syncmesh_net::NetError> for Error {
    fn from(e: syncmesh_net::NetError) -> Self {
        Error::Net(Arc::new(e))
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(Arc::new(e))
    }
}

impl Error {
    /// The map's rule this error is, if it is one (match on [`crate::MapError`]).
    pub fn map_error(&self) -> Option<&syncmesh_core::Error> {
        match self {
            Error::Map(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the map (or, for item operations, the item) does not exist here.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Map(
                syncmesh_core::Error::MapNotFound(_)
                    | syncmesh_core::Error::MapRemoved(_)
                    | syncmesh_core::Error::ItemNotFound(_)
            )
        )
    }

    /// The Sync Maps error code, for map errors; 20500 (internal) otherwise.
    pub fn code(&self) -> u32 {
        match self {
            Error::Map(e) => e.code(),
            _ => 20500,
        }
    }
}

/// Shorthand for library results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
