//! `/v1/Node`: what this node is, where it listens, whom it trusts and is connected to.

use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::model::{CompactionReport, ErrorBody, NodeStatus, PeersResource};
use crate::state::AppState;

/// This node's identity, addresses, peers and number of maps.
#[utoipa::path(
    get,
    path = "/v1/Node",
    tag = "node",
    responses(
        (status = 200, description = "The node", body = NodeStatus),
        (status = 503, description = "The node is closed (20503)", body = ErrorBody),
    ),
)]
pub async fn node(State(st): State<AppState>) -> Result<Json<NodeStatus>, ApiError> {
    Ok(Json(node_status(&st).await?))
}

/// A durability barrier: answered once every write acknowledged before it is on disk (writes
/// sent with `Syncmesh-Durability: relaxed` included). A client writing many items relaxed
/// calls this once, rather than waiting for an fsync per write.
#[utoipa::path(
    post,
    path = "/v1/Node/Sync",
    tag = "node",
    responses(
        (status = 204, description = "Everything acknowledged before is on disk"),
        (status = 503, description = "The node is closed (20503), or its writes are stopped", body = ErrorBody),
    ),
)]
pub async fn sync(State(st): State<AppState>) -> Result<axum::http::StatusCode, ApiError> {
    st.node().sync().await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Compacts the node's storage: every document's change log becomes a snapshot and the
/// database file gives the space freed back to the file system. The node keeps serving:
/// writes wait only while the last few are copied into the rewritten file.
#[utoipa::path(
    post,
    path = "/v1/Node/Compact",
    tag = "node",
    responses(
        (status = 200, description = "Compacted", body = CompactionReport),
        (status = 503, description = "The node is closed (20503)", body = ErrorBody),
    ),
)]
pub async fn compact(State(st): State<AppState>) -> Result<Json<CompactionReport>, ApiError> {
    let node = st.node();
    let started = std::time::Instant::now();
    let file_bytes_before = node.file_bytes().await?;
    let file = match node.compact().await? {
        syncmesh::FileCompaction::Done => "done",
        syncmesh::FileCompaction::Nothing => "nothing",
        syncmesh::FileCompaction::Busy => "busy",
    }
    .to_string();
    Ok(Json(CompactionReport {
        file,
        file_bytes_before,
        file_bytes_after: node.file_bytes().await?,
        used_bytes: node.used_bytes().await?,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// Builds the node status: identity, addresses, storage state, and whom the node exchanges
/// maps with (the same lists as `GET /v1/Node/Peers`).
pub async fn node_status(st: &AppState) -> Result<NodeStatus, ApiError> {
    let node = st.node();
    let maps = node.maps().await?.len() as u64;
    let net = node.network();
    let peers = PeersResource::from(node.peers().await?);
    Ok(NodeStatus {
        peer_id: net.as_ref().map(|n| n.peer_id.to_string()),
        listen_addrs: net
            .map(|n| n.listen_addrs.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        http_addr: st.http_addr().to_string(),
        connected_peers: peers.connected_peers,
        maps,
        node_id: node.id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        writes_stopped: node.writes_stopped(),
        trust_all: peers.trusts_everyone,
        trusted_peers: peers.trusted_peers,
        untrusted_peers: peers.untrusted_peers,
        discovered_peers: peers.discovered_peers,
        problems: peers.problems,
        refused_changes: peers.refused_changes,
        limits: {
            let l = st.limits();
            let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
            crate::model::LimitsResource {
                max_connections: n(l.max_connections),
                max_subscribers: n(l.max_subscribers),
                max_subscribers_per_map: n(l.max_subscribers_per_map),
                header_timeout: l.header_timeout.as_secs(),
                body_timeout: l.body_timeout.as_secs(),
                ws_max_message: n(l.ws_max_message),
                send_timeout: l.send_timeout.as_secs(),
                open_files: l.open_files,
            }
        },
        subscribers: st.subscribers() as u64,
    })
}
