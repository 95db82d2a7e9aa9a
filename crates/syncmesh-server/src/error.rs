//! The API's error body and how every failure maps to a Sync Maps code and HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::model::ErrorBody;

/// Where an error's `more_info` points: the error table of the HTTP API document, as a path
/// in the syncmesh source tree (the project has no web site to link to).
pub const MORE_INFO: &str = "docs/http-api.md#errors";

/// Codes this server answers with besides the Sync Maps ones of [`syncmesh::Error::code`].
pub mod codes {
    /// A parameter, header or body is malformed (400).
    pub const INVALID_PARAMETER: u32 = 20001;
    /// A token is required, or the one given is wrong (401).
    pub const UNAUTHORIZED: u32 = 20003;
    /// The route exists but not with this method (405).
    pub const METHOD_NOT_ALLOWED: u32 = 20004;
    /// No such route (404).
    pub const NOT_FOUND: u32 = 20404;
    /// The event route was asked for neither a WebSocket nor `text/event-stream` (406).
    pub const NOT_ACCEPTABLE: u32 = 20406;
    /// The events asked for are no longer retained (410).
    pub const EVENTS_PRUNED: u32 = 20410;
    /// The body's content type is neither JSON nor form-encoded (415).
    pub const UNSUPPORTED_MEDIA_TYPE: u32 = 20415;
    /// The node failed (storage); nothing was acknowledged (500).
    pub const INTERNAL: u32 = 20500;
    /// The node is closed or has stopped writes after a storage failure (503).
    pub const UNAVAILABLE: u32 = 20503;
    /// The ticket is malformed (not one this version can read, or damaged in copying) (400).
    pub const BAD_TICKET: u32 = 20301;
    /// The inviter refused the join: the ticket is used up, expired or forged (403).
    pub const JOIN_REFUSED: u32 = 20302;
    /// The inviter could not be reached or did not answer in time (504).
    pub const INVITER_UNREACHABLE: u32 = 20303;
    /// A peer id that does not parse (400).
    pub const BAD_PEER_ID: u32 = 20304;
    /// The peer is not trusted by this node (404).
    pub const PEER_NOT_TRUSTED: u32 = 20305;
    /// The node is not on a network, so it cannot invite or join (409).
    pub const NO_NETWORK: u32 = 20306;
    /// The ticket was issued by this node; it is for another node (400).
    pub const OWN_TICKET: u32 = 20307;
    /// A join with the same inviter is already under way (409).
    pub const JOIN_UNDER_WAY: u32 = 20308;
    /// A limit of this node is reached (connections: 503, event subscribers: 429); retry after
    /// the `Retry-After` seconds.
    pub const OVERLOADED: u32 = 20429;
    /// A map only peers hold could not be fetched whole in time; the fetch goes on (503,
    /// `Retry-After`).
    pub const MAP_INCOMPLETE: u32 = 20513;
    /// The request body did not arrive in time (408).
    pub const REQUEST_TIMEOUT: u32 = 20408;
    /// A cross-site request that would change something, or a `Host` this node does not
    /// answer to (403).
    pub const FORBIDDEN: u32 = 20403;
}

/// An error answered as `{"code", "message", "more_info", "status"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} ({code}): {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Sync Maps (54xxx) or server (20xxx) error code.
    pub code: u32,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 / 20001: a malformed parameter, header or body.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::INVALID_PARAMETER, message)
    }

    /// The body this error is answered with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
            more_info: MORE_INFO.to_string(),
            status: self.status.as_u16(),
        }
    }
}

impl From<syncmesh::Error> for ApiError {
    fn from(e: syncmesh::Error) -> Self {
        let (status, code) = match &e {
            syncmesh::Error::Map(m) => (map_status(m), m.code()),
            syncmesh::Error::EventsPruned { .. } | syncmesh::Error::UnknownEventId { .. } => {
                (StatusCode::GONE, codes::EVENTS_PRUNED)
            }
            syncmesh::Error::Reloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE)
            }
            syncmesh::Error::Closed | syncmesh::Error::WritesStopped(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE)
            }
            syncmesh::Error::Trust(t) => {
                use syncmesh::trust::TrustError;
                let code = match t {
                    TrustError::BadTicket(_) => codes::BAD_TICKET,
                    TrustError::Refused(_) => codes::JOIN_REFUSED,
                    TrustError::Unreachable(_) => codes::INVITER_UNREACHABLE,
                    TrustError::BadPeerId(_) => codes::BAD_PEER_ID,
                    TrustError::OwnTicket => codes::OWN_TICKET,
                    TrustError::JoinUnderWay => codes::JOIN_UNDER_WAY,
                    _ => codes::INVALID_PARAMETER,
                };
                let status = match t {
                    TrustError::Refused(_) => StatusCode::FORBIDDEN,
                    TrustError::Unreachable(_) => StatusCode::GATEWAY_TIMEOUT,
                    TrustError::JoinUnderWay => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                (status, code)
            }
            syncmesh::Error::NoNetwork => (StatusCode::CONFLICT, codes::NO_NETWORK),
            syncmesh::Error::FetchIncomplete { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::MAP_INCOMPLETE)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL),
        };
        if status.is_server_error() && code != codes::MAP_INCOMPLETE {
            tracing::error!("request failed: {e}");
        }
        ApiError::new(status, code, e.to_string())
    }
}

/// The HTTP status of a broken map rule (docs/http-api.md, ../shared/reference: the Sync Maps
/// statuses). Only this crate knows HTTP.
fn map_status(e: &syncmesh::MapError) -> StatusCode {
    use syncmesh::MapError as E;
    match e {
        E::MapNotFound(_) | E::MapRemoved(_) | E::ItemNotFound(_) => StatusCode::NOT_FOUND,
        E::RevisionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
        E::ItemExists(_) | E::MapNameTaken(_) => StatusCode::CONFLICT,
        E::DataTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        E::InvalidChange(_) | E::PermissionDenied(_) => StatusCode::FORBIDDEN,
        E::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
        E::PermissionNotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl From<syncmesh::MapError> for ApiError {
    fn from(e: syncmesh::MapError) -> Self {
        ApiError::from(syncmesh::Error::Map(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"syncmesh\""),
            );
        }
        if self.code == codes::OVERLOADED || self.code == codes::MAP_INCOMPLETE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;
    use syncmesh::MapError as E;

    #[test]
    fn codes_and_statuses_follow_the_reference() {
        let table: &[(E, u32, u16)] = &[
            (E::MapNotFound("m".into()), 54200, 404),
            (E::MapRemoved("m".into()), 54200, 404),
            (E::ItemNotFound("k".into()), 54201, 404),
            (
                E::RevisionMismatch {
                    key: "k".into(),
                    expected: "a".into(),
                    current: "b".into(),
                },
                54205,
                412,
            ),
            (E::InvalidData("x".into()), 54206, 400),
            (E::ItemExists("k".into()), 54208, 409),
            (E::InvalidKey("k".into()), 54209, 400),
            (E::MapNameTaken("n".into()), 54301, 409),
            (E::InvalidName("n".into()), 54302, 400),
            (E::DataTooLarge { size: 20000 }, 54006, 413),
            (E::InvalidTtl(-1), 54011, 400),
            (E::InvalidPageSize(0), 54455, 400),
            (E::InvalidPageToken, 54455, 400),
            (E::InvalidChange("x".into()), 54007, 403),
            (E::PermissionDenied("x".into()), 20403, 403),
            (E::InvalidPermission("x".into()), 20001, 400),
            (E::PermissionNotFound("x".into()), 20404, 404),
        ];
        for (err, code, status) in table {
            let api = ApiError::from(err.clone());
            assert_eq!((api.code, api.status.as_u16()), (*code, *status), "{err}");
        }
        let closed = ApiError::from(syncmesh::Error::Closed);
        assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
        let incomplete = ApiError::from(syncmesh::Error::FetchIncomplete {
            map: "m".into(),
            why: "cut off".into(),
        });
        assert_eq!(incomplete.status, StatusCode::SERVICE_UNAVAILABLE);
        let refused = ApiError::from(syncmesh::Error::Trust(
            syncmesh::trust::TrustError::JoinUnderWay,
        ));
        assert_eq!(refused.status, StatusCode::CONFLICT);
    }
}
