//! The JavaScript client (`/sdk/syncmesh.js` and its types) and the inspector page (`/`),
//! embedded in the binary so a node needs no files beside it.
//!
//! The client and the page's code are public (they hold no data); the page itself is behind
//! the token when the node has one. A browser cannot send a bearer header when it navigates, so
//! `/` also accepts a cookie, set by `/?access_token=…` (which then redirects to `/`, so the
//! token leaves the address bar) or by the login form, which posts the token so that typing it
//! never puts it in a URL (history, logs). The cookie is honoured on `/` only: accepting it on
//! the API would let any page on the same host forge writes with it.
//!
//! Browsers send a host's cookies to every port of it, so the cookie is named after this
//! node's port (two nodes on one host keep theirs apart) and holds a key derived from the token
//! rather than the token itself (another service on that host, which receives it, does not
//! learn a token the user may have used elsewhere; it can still open this node's page, as
//! anyone holding the cookie can: run nodes on a host name of their own where that matters).

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::AppState;

const CLIENT_JS: &str = include_str!("../sdk/syncmesh.js");
const CLIENT_TYPES: &str = include_str!("../sdk/syncmesh.d.ts");
const INDEX_HTML: &str = include_str!("../web/index.html");
const INSPECTOR_JS: &str = include_str!("../web/inspector.js");
const INSPECTOR_CSS: &str = include_str!("../web/inspector.css");

/// Where the page finds the token it passes to the client.
const TOKEN_SLOT: &str = "__SYNCMESH_TOKEN__";
/// The prefix of the cookie that admits a browser to `/` (then the node's HTTP port).
pub const COOKIE_PREFIX: &str = "syncmesh_page_";

/// The name of this node's page cookie.
fn cookie_name(st: &AppState) -> String {
    format!("{COOKIE_PREFIX}{}", st.http_addr().port())
}

/// The cookie's value for `token`: a key derived from it, in hex.
fn page_key(token: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"syncmesh inspector page\0")
        .chain_update(token.as_bytes())
        .finalize();
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Paths served without the token: static code, no data.
pub fn is_public(path: &str) -> bool {
    path.starts_with("/sdk/") || path.starts_with("/ui/") || path == "/"
}

/// The client, its types and the inspector page.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index).post(sign_in))
        .route("/sdk/syncmesh.js", get(|| asset(CLIENT_JS, JS)))
        .route("/sdk/syncmesh.d.ts", get(|| asset(CLIENT_TYPES, TS)))
        .route("/ui/inspector.js", get(|| asset(INSPECTOR_JS, JS)))
        .route("/ui/inspector.css", get(|| asset(INSPECTOR_CSS, CSS)))
}

const JS: &str = "text/javascript; charset=utf-8";
const TS: &str = "application/typescript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Short: a node upgraded in place must not leave browsers on the old client.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=60"),
            ),
            (
                header::HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// What a request to `/` proved about the token.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// No token needed, or a valid one in the header or cookie.
    In,
    /// A valid `?access_token=`: set the cookie and redirect to `/`.
    SetCookie(String),
    /// A token was given and is wrong.
    Wrong,
    /// None given.
    Missing,
}

fn admission(st: &AppState, headers: &HeaderMap, query: Option<&str>) -> Admission {
    if !st.token_required() {
        return Admission::In;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    let name = cookie_name(st);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim().to_string());
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(t) = from_query {
        return if st.token_matches(&t) {
            Admission::SetCookie(t)
        } else {
            Admission::Wrong
        };
    }
    if let Some(t) = bearer {
        return if st.token_matches(&t) {
            Admission::In
        } else {
            Admission::Wrong
        };
    }
    match (cookie, st.token()) {
        (Some(c), Some(t)) if bool::from(c.as_bytes().ct_eq(page_key(t).as_bytes())) => {
            Admission::In
        }
        // A stale cookie (the token changed): ask again, without blaming anyone.
        _ => Admission::Missing,
    }
}

/// The login form: `access_token` in a form body. A right token sets the cookie and redirects
/// to `/`; anything else is the login page again. Nothing else is done through it.
async fn sign_in(State(st): State<AppState>, body: Bytes) -> Response {
    let given = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned());
    if !st.token_required() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    match given {
        Some(t) if st.token_matches(&t) => admitted(&st, &t),
        Some(_) => login(Some("That is not the token of this node.")),
        None => login(None),
    }
}

/// Sets the cookie that admits a browser to `/`, and sends it there.
fn admitted(st: &AppState, token: &str) -> Response {
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict",
        cookie_name(st),
        page_key(token)
    );
    let mut r = (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn index(State(st): State<AppState>, req: Request) -> Response {
    match admission(&st, req.headers(), req.uri().query()) {
        Admission::In => page(st.token()),
        Admission::SetCookie(token) => admitted(&st, &token),
        Admission::Wrong => login(Some("That is not the token of this node.")),
        Admission::Missing => login(None),
    }
}

fn page(token: Option<&str>) -> Response {
    let html = INDEX_HTML.replace(TOKEN_SLOT, &escape_html(token.unwrap_or("")));
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(HTML)),
            // The page may carry the token: never cache it, never frame it.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
            (
                header::HeaderName::from_static("content-security-policy"),
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                ),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        html,
    )
        .into_response()
}

fn login(error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape_html(e)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>syncmesh — token required</title><link rel=\"stylesheet\" href=\"/ui/inspector.css\"></head>\
<body class=\"login\"><main><h1>syncmesh</h1><p>This node requires its token.</p>{error}\
<form method=\"post\" action=\"/\"><label for=\"access_token\">Token</label> \
<input id=\"access_token\" name=\"access_token\" type=\"password\" autocomplete=\"current-password\" autofocus required> \
<button type=\"submit\">Open</button></form></main></body></html>"
    );
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(HTML)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            // A wrong token may sit in this page's address (`/?access_token=`).
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                header::HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
        ],
        html,
    )
        .into_response()
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escaping() {
        assert_eq!(escape_html("a<b>\"&'"), "a&lt;b&gt;&quot;&amp;&#39;");
    }

    #[test]
    fn the_page_has_a_token_slot() {
        assert!(INDEX_HTML.contains(TOKEN_SLOT));
    }
}
