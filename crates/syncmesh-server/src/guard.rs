//! What every request passes before a handler sees it: browser safety (no cross-site request
//! may change anything or open an event WebSocket, and a node without a token answers only
//! to loopback host names, so DNS rebinding gets nowhere) and a deadline for the body.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use crate::error::{codes, ApiError};
use crate::params::BODY_LIMIT;
use crate::state::AppState;

/// Refuses cross-site writes and WebSockets, and (on a node without a token) host names that
/// do not name this machine. Runs before the token check, which runs before [`body`].
pub async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Err(e) = check_host(&st, req.headers()) {
        return e.into_response();
    }
    if let Err(e) = check_site(&st, req.method(), req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

/// Reads the body within the deadline, after the token check (a client without the token
/// never gets to send one). While it arrives the connection counts as idle, so a client that
/// sends slowly is the first closed when connections run out.
pub async fn body(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let idle = req
        .extensions()
        .get::<crate::serve::ConnActivity>()
        .cloned();
    let read = {
        let _waiting = idle.as_ref().map(crate::serve::ConnActivity::waiting);
        read_body(&st, req).await
    };
    match read {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A node without a token is reachable only on loopback, by anyone on this machine: a page
/// elsewhere that makes its own host name resolve to 127.0.0.1 (DNS rebinding) sends that
/// name as `Host`, and is refused here.
fn check_host(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if st.token_required() {
        return Ok(());
    }
    let Some(host) = headers.get(header::HOST) else {
        return Ok(()); // HTTP/1.0 without a host: not a browser
    };
    let host = host.to_str().unwrap_or("");
    let name = host_name(host);
    if is_loopback_name(name)
        || st
            .allowed_hosts()
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        codes::FORBIDDEN,
        format!(
            "this node has no token, so it answers only to loopback host names (localhost, 127.0.0.1, [::1]), not {host:?}; allow a name with --allow-host, or give the node a token"
        ),
    ))
}

/// The host name of a `Host` value, without the port (and without brackets for IPv6).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn is_loopback_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser tells where a request comes from (`Sec-Fetch-Site`, `Origin`). A page of
/// another site may make simple requests (a form post) without asking first; those that
/// would change something, and WebSocket upgrades (which no CORS rule guards), are refused
/// unless that origin was allowed with `--cors-origin`.
fn check_site(st: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !changes && !upgrade {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Some(o) = origin {
        if st.origin_allowed(o) {
            return Ok(());
        }
    }
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let cross = match (site.as_deref(), origin) {
        // The browser says so: only its own pages and what the user typed pass.
        (Some(s), _) => !matches!(s, "same-origin" | "none"),
        // No fetch metadata (an older browser): the origin must be this node's own.
        (None, Some(o)) => !same_origin(o, headers),
        // Neither: not a browser (curl, the CLI, the SDK in Node.js).
        (None, None) => false,
    };
    if !cross {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        codes::FORBIDDEN,
        format!(
            "a page of another site ({}) may not change this node or follow its events; start the node with --cors-origin for that origin to allow it",
            origin.unwrap_or("unknown origin")
        ),
    ))
}

/// Whether `origin` is the origin the request was sent to (`http://` + its `Host`).
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

/// Reads a request's body whole within [`crate::Limits::body_timeout`] (a client sending
/// it byte by byte, or announcing more than it sends, is cut off) and at most
/// [`BODY_LIMIT`] bytes; handlers then get it at once.
async fn read_body(st: &AppState, req: Request) -> Result<Request, ApiError> {
    let (parts, body) = req.into_parts();
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return Ok(Request::from_parts(parts, body));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            54006,
            format!(
                "the request body is over {BODY_LIMIT} bytes; item data is at most {} bytes",
                syncmesh::limits::MAX_DATA_BYTES
            ),
        )
    };
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, BODY_LIMIT);
    let deadline = st.limits().body_timeout;
    let bytes: Bytes = match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) => {
            return Err(if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::invalid(format!("could not read the request body: {e}"))
            })
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            ))
        }
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_name("[::1]:7700"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        assert!(is_loopback_name("127.0.0.1"));
        assert!(is_loopback_name("127.8.0.1"));
        assert!(is_loopback_name("::1"));
        assert!(is_loopback_name("LocalHost"));
        assert!(is_loopback_name("app.localhost"));
        assert!(!is_loopback_name("rebind.attacker.example"));
        assert!(!is_loopback_name("localhost.attacker.example"));
        assert!(!is_loopback_name("192.168.1.5"));
    }

    #[test]
    fn same_origin_compares_with_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:7700".parse().unwrap());
        assert!(same_origin("http://127.0.0.1:7700", &h));
        assert!(!same_origin("http://127.0.0.1:7701", &h));
        assert!(!same_origin("http://evil.example", &h));
        assert!(!same_origin("null", &h));
    }
}
