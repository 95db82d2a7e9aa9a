//! `/v1/Node/Invites`, `/v1/Node/Join` and `/v1/Node/Peers`: whom this node exchanges maps
//! with. A node trusts no one until told: an invitation's ticket joined from another node, a
//! peer trusted by id, or the daemon's `--trust` / `--trust-all`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use syncmesh::trust::{InviteOptions, TrustError};
use syncmesh::{Multiaddr, PeerId};

use crate::error::{codes, ApiError};
use crate::model::{
    ErrorBody, InviteParams, InviteResource, JoinParams, PeersResource, TrustPeerParams,
    TrustedPeerResource,
};
use crate::params::{self, Params, Path};
use crate::state::AppState;

/// Longest invitation: a year, as the library allows.
const MAX_INVITE_TTL_SECS: u64 = 31_536_000;

/// Issues an invitation: a ticket another node joins with (`POST /v1/Node/Join`), after which
/// both trust each other. The node must listen on an address the invitee can reach.
#[utoipa::path(
    post,
    path = "/v1/Node/Invites",
    tag = "peers",
    request_body(content(
        (InviteParams = "application/json"),
        (InviteParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 201, description = "The invitation and its ticket", body = InviteResource),
        (status = 400, description = "Invalid parameters, an invalid map name, or a node that listens on no address (20001)", body = ErrorBody),
        (status = 409, description = "The node is not on a network (20306)", body = ErrorBody),
    ),
)]
pub async fn invite(
    State(st): State<AppState>,
    Params { value: p, .. }: Params<InviteParams>,
) -> Result<Response, ApiError> {
    let defaults = InviteOptions::default();
    let ttl = params::integer(p.ttl, "Ttl", 1, MAX_INVITE_TTL_SECS)?
        .map_or(defaults.ttl, Duration::from_secs);
    let uses = params::integer(p.uses, "Uses", 1, u64::from(u32::MAX))?
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(defaults.uses);
    let opts = InviteOptions {
        maps: params::strings(p.maps, "Maps")?,
        write: params::boolean(p.write, "Write")?.unwrap_or(defaults.write),
        ttl,
        uses,
    };
    let invite = st.node().invite(opts).await?;
    Ok((StatusCode::CREATED, Json(InviteResource::from(invite))).into_response())
}

/// Joins the node that issued `Ticket`: dials it, proves the ticket, and on success both nodes
/// trust each other (stored). Waits up to 45 s for the inviter.
#[utoipa::path(
    post,
    path = "/v1/Node/Join",
    tag = "peers",
    request_body(content(
        (JoinParams = "application/json"),
        (JoinParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 201, description = "Joined: the inviter, now trusted", body = TrustedPeerResource),
        (status = 400, description = "No ticket (20001), a malformed ticket (20301), or this node's own ticket (20307)", body = ErrorBody),
        (status = 403, description = "The inviter refused: the ticket is used up, expired or forged (20302)", body = ErrorBody),
        (status = 409, description = "The node is not on a network (20306), or a join with this inviter is already under way (20308)", body = ErrorBody),
        (status = 504, description = "The inviter could not be reached or did not answer (20303)", body = ErrorBody),
    ),
)]
pub async fn join(
    State(st): State<AppState>,
    Params { value: p, .. }: Params<JoinParams>,
) -> Result<Response, ApiError> {
    let ticket = p
        .ticket
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("the Ticket parameter is required"))?;
    let peer = st.node().join(&ticket).await?;
    Ok((StatusCode::CREATED, Json(TrustedPeerResource::from(peer))).into_response())
}

/// Trusted, connected, untrusted and discovered peers, and the latest problem of each.
#[utoipa::path(
    get,
    path = "/v1/Node/Peers",
    tag = "peers",
    responses(
        (status = 200, description = "The node's peers", body = PeersResource),
        (status = 503, description = "The node is closed (20503)", body = ErrorBody),
    ),
)]
pub async fn peers(State(st): State<AppState>) -> Result<Json<PeersResource>, ApiError> {
    Ok(Json(st.node().peers().await?.into()))
}

fn peer_id(text: &str) -> Result<PeerId, ApiError> {
    text.parse::<PeerId>()
        .map_err(|_| ApiError::from(syncmesh::Error::Trust(TrustError::BadPeerId(text.into()))))
}

/// Trusts a peer by id (every map, read and write; stored), dialing it at `Addr` if given. An
/// already trusted peer keeps its scope and gains the addresses.
#[utoipa::path(
    post,
    path = "/v1/Node/Peers/{peer_id}",
    tag = "peers",
    params(("peer_id" = String, Path, description = "The peer's id (`12D3KooW…`)")),
    request_body(content(
        (TrustPeerParams = "application/json"),
        (TrustPeerParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "It was already trusted: its record", body = TrustedPeerResource),
        (status = 201, description = "Now trusted: its record", body = TrustedPeerResource),
        (status = 400, description = "Not a peer id (20304), this node's own id or an address that is not a multiaddr (20001)", body = ErrorBody),
    ),
)]
pub async fn trust(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Params { value: p, .. }: Params<TrustPeerParams>,
) -> Result<Response, ApiError> {
    let peer = peer_id(&id)?;
    let node = st.node();
    if node.network().is_some_and(|n| n.peer_id == peer) {
        return Err(ApiError::invalid(
            "this is this node's own peer id: trust the other node's",
        ));
    }
    let addrs = params::strings(p.addr, "Addr")?
        .iter()
        .map(|a| {
            a.trim().parse::<Multiaddr>().map_err(|_| {
                ApiError::invalid(format!(
                    "Addr {a:?} is not a multiaddr (e.g. /ip4/192.0.2.7/tcp/7701)"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let before = node.peers().await?;
    let was = before.trusted.iter().any(|t| t.peer_id == peer.to_string());
    let rec = node.trust(peer, addrs).await?;
    let status = if was {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(TrustedPeerResource::from(rec))).into_response())
}

/// Stops trusting a peer: it is disconnected at once and nothing more is exchanged with it.
/// (A peer trusted by `--trust` is trusted again at the node's next start.)
#[utoipa::path(
    delete,
    path = "/v1/Node/Peers/{peer_id}",
    tag = "peers",
    params(("peer_id" = String, Path, description = "The peer's id")),
    responses(
        (status = 204, description = "No longer trusted"),
        (status = 400, description = "Not a peer id (20304)", body = ErrorBody),
        (status = 404, description = "The peer was not trusted (20305)", body = ErrorBody),
    ),
)]
pub async fn untrust(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let peer = peer_id(&id)?;
    if st.node().untrust(peer).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            codes::PEER_NOT_TRUSTED,
            format!("peer {peer} is not trusted by this node"),
        ))
    }
}
