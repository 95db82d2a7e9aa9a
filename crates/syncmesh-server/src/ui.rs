//! The JavaScript client (`/sdk/syncmesh.js` and its types) and the inspector page (`/`),
//! embedded in the binary so a node needs no files beside it.
//!
//! The client and the page's code are public (they hold no data); the page itself is behind
//! the token when the node has one. A browser cannot send a bearer header when it navigates, so
//! the page is opened with `/?access_token=…` (which then redirects to `/`, so the token leaves
//! the address bar) or through the login form, which posts the token so that typing it never
//! puts it in a URL (history, logs). Either starts a **page session**: a random id in a cookie
//! (`HttpOnly`, `SameSite=Strict`, named after this node's port so two nodes on one host keep
//! theirs apart), and a page key, handed to the page once (in the redirect's fragment, which
//! browsers never send to a server) and kept in the origin's storage, which the page's client
//! sends as its bearer value. The API takes a page key only together with its session's cookie,
//! and `/` never writes the key into the page for a cookie: whoever holds only the cookie
//! (another service on the same host receives it) gets neither the key nor the node's token.
//! Sessions live in memory: a restart ends them all, and one unused for 12 hours ends.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

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

/// The value of this node's page cookie in a request, if it has one.
pub(crate) fn page_cookie(st: &AppState, headers: &HeaderMap) -> Option<String> {
    let name = cookie_name(st);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim().to_string())
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
    /// No token needed.
    Open,
    /// A live page session: the page (its key is kept by the page itself).
    Session,
    /// A valid token in the header: a new session, and the page.
    Bearer,
    /// A valid `?access_token=`: a new session, and a redirect to `/`.
    SetCookie,
    /// A token was given and is wrong.
    Wrong,
    /// None given.
    Missing,
}

fn admission(st: &AppState, headers: &HeaderMap, query: Option<&str>) -> Admission {
    if !st.token_required() {
        return Admission::Open;
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
    let cookie = page_cookie(st, headers);
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(t) = from_query {
        return if st.token_matches(&t) {
            Admission::SetCookie
        } else {
            Admission::Wrong
        };
    }
    if let Some(t) = bearer {
        return if st.token_matches(&t) {
            Admission::Bearer
        } else {
            Admission::Wrong
        };
    }
    match cookie.and_then(|c| st.page_key(&c)) {
        Some(_) => Admission::Session,
        // An ended session (a restart, or unused too long): ask again, blaming no one.
        None => Admission::Missing,
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
        Some(t) if st.token_matches(&t) => admitted(&st),
        Some(_) => login(Some("That is not the token of this node.")),
        None => login(None),
    }
}

/// A new page session: its `Set-Cookie` value and its page key.
fn new_session(st: &AppState) -> (String, String) {
    let id = st.new_page_session();
    let key = st.page_key(&id).unwrap_or_default();
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict",
        cookie_name(st)
    );
    (cookie, key)
}

/// Starts a page session and sends the browser to `/`, handing the page its key once, in the
/// fragment (which browsers never send to a server).
fn admitted(st: &AppState) -> Response {
    let (cookie, key) = new_session(st);
    let location = format!("/#k={key}");
    let mut r = (
        StatusCode::SEE_OTHER,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn index(State(st): State<AppState>, req: Request) -> Response {
    match admission(&st, req.headers(), req.uri().query()) {
        Admission::Open => page(None),
        // The key is not in the page: a holder of the cookie alone (another service on this
        // host) must not get it. The page keeps the key it was handed at sign-in.
        Admission::Session => page(None),
        Admission::Bearer => {
            let (cookie, key) = new_session(&st);
            let mut r = page(Some(&key));
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Admission::SetCookie => admitted(&st),
        Admission::Wrong => login(Some("That is not the token of this node.")),
        Admission::Missing => login(None),
    }
}

/// The page, with the page key its client sends (none on a node without a token).
fn page(key: Option<&str>) -> Response {
    let html = INDEX_HTML.replace(TOKEN_SLOT, &escape_html(key.unwrap_or("")));
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(HTML)),
            // The page may carry a page key: never cache it, never frame it.
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
