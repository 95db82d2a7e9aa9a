//! # syncmesh-server
//!
//! The HTTP API of a syncmesh node, in the shape of the hosted Sync Maps REST API, under
//! `/v1/Services/default/...`: maps, items, live events (WebSocket and Server-Sent Events,
//! resumable), `/v1/Node` (with invitations, joins and trusted peers), and an OpenAPI document at `/v1/openapi.json` generated from the
//! same declarations that build the router, so the two cannot drift.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use syncmesh_server::{router, serve, ServerOptions};
//!
//! let node = syncmesh::Node::open("./data").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
//! let opts = ServerOptions::new(listener.local_addr()?);
//! let app = router(node.clone(), opts.clone());
//! // Serves, within `opts.limits`, until `opts.shutdown` is cancelled (the daemon does that
//! // on SIGINT/SIGTERM), which also ends live event streams; then the node commits.
//! serve(listener, app, &opts).await?;
//! node.close().await?;
//! # Ok(()) }
//! ```
//!
//! Layout: [`maps`], [`items`], [`events`], [`node`] and [`trust`] hold the handlers (each with its
//! OpenAPI declaration); [`ui`] serves the JavaScript client and the inspector page; [`params`] reads requests into typed values or a typed [`ApiError`];
//! [`model`] is what goes over the wire. Only this crate knows HTTP.

#![warn(missing_docs)]

pub mod error;
pub mod events;
pub mod guard;
pub mod items;
pub mod maps;
pub mod model;
pub mod node;
pub mod params;
pub mod permissions;
pub mod serve;
pub mod state;
pub mod trust;
pub mod ui;
pub mod urls;

use std::sync::OnceLock;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;
pub use serve::serve;
pub use state::{AppState, Limits, ServerOptions};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "syncmesh",
        description = "The HTTP API of a syncmesh node: Sync Maps (maps of JSON items) with live events. Request parameters may be sent as JSON or form-encoded (then `Data` is JSON text). Errors are `{code, message, more_info, status}`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    tags(
        (name = "maps", description = "Maps: create, list, fetch, set TTL, delete"),
        (name = "items", description = "Items of a map"),
        (name = "events", description = "A map's live events"),
        (name = "permissions", description = "Who may read, write and manage a map (peer ids)"),
        (name = "node", description = "This node"),
        (name = "peers", description = "Whom this node exchanges maps with: invitations, joins, trusted peers"),
    ),
    components(schemas(model::StreamError)),
    modifiers(&Bearer),
)]
struct ApiDoc;

/// Declares the bearer token scheme and requires it everywhere (when the node has a token).
struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        doc.security = Some(vec![
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new()),
            // An empty requirement: a node started without a token needs none.
            utoipa::openapi::security::SecurityRequirement::default(),
        ]);
    }
}

/// Every route with its OpenAPI declaration: the router and the document both come from here.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(maps::create_map, maps::list_maps))
        .routes(routes!(maps::fetch_map, maps::update_map, maps::delete_map))
        .routes(routes!(items::create_item, items::list_items))
        .routes(routes!(
            items::fetch_item,
            items::set_item,
            items::update_item,
            items::delete_item
        ))
        .routes(routes!(items::item_conflicts))
        .routes(routes!(permissions::list_permissions))
        .routes(routes!(
            permissions::fetch_permission,
            permissions::set_permission,
            permissions::delete_permission
        ))
        .routes(routes!(events::events))
        .routes(routes!(node::node))
        .routes(routes!(node::compact))
        .routes(routes!(node::sync))
        .routes(routes!(trust::invite))
        .routes(routes!(trust::join))
        .routes(routes!(trust::peers))
        .routes(routes!(trust::trust, trust::untrust))
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3 document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().split_for_parts().1
}

fn openapi_text() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| openapi().to_pretty_json().unwrap_or_default())
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "node",
    responses((status = 200, description = "The OpenAPI 3 document of this API", content_type = "application/json")),
)]
async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi_text(),
    )
        .into_response()
}

/// The API over `node`: every route, JSON errors for unknown routes (404) and methods (405),
/// the token check, the body limit and request tracing.
pub fn router(node: syncmesh::Node, opts: ServerOptions) -> Router {
    let cors = cors_layer(&opts.cors_origins);
    let state = AppState::new(node, opts);
    let (routes, _) = api().split_for_parts();
    let app = routes
        .merge(ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(params::BODY_LIMIT))
        // Outermost last: site and host checks, then the token, then the body.
        .layer(middleware::from_fn_with_state(state.clone(), guard::body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(
            // The path only: a query may carry `access_token`, which must never reach a log.
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
                },
            ),
        )
        .with_state(state);
    // Outermost: a preflight carries no token, and refusals need the headers too.
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// CORS for `origins` (`*`: any), or none. Bearer tokens, not cookies, authorize API calls, so
/// credentials are never allowed cross-origin.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::PATCH,
                axum::http::Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::HeaderName::from_static("last-event-id"),
                header::HeaderName::from_static(params::DURABILITY_HEADER),
            ])
            .expose_headers([header::ETAG, header::LOCATION])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path();
    // The likeliest cause under /Items/: a key with a raw `/` spilling into more segments.
    let hint = if path.contains("/Items/") {
        "; percent-encode keys, `/` as %2F"
    } else {
        ""
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        error::codes::NOT_FOUND,
        format!(
            "no route {} {path}: the API is under /v1/Services/default/Maps (see /v1/openapi.json){hint}",
            req.method(),
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        error::codes::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {} (see /v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

/// Requires `Authorization: Bearer <token>` when the node has a token. Browsers cannot set
/// headers on `EventSource` and `WebSocket`, so the events route also takes `access_token`.
async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // The page checks its own admission (it also takes a cookie); client code holds no data.
    if !st.token_required() || ui::is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let from_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .map(str::to_string);
    let from_query = || {
        req.uri()
            .path()
            .ends_with("/Events")
            .then(|| req.uri().query())
            .flatten()
            .and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "access_token")
                    .map(|(_, v)| v.into_owned())
            })
    };
    match from_header.or_else(from_query) {
        // The inspector page's key: good only with its session's cookie (see `ui`).
        Some(t)
            if t.starts_with(state::PAGE_KEY_PREFIX)
                && ui::page_cookie(&st, req.headers())
                    .is_some_and(|c| st.page_key_matches(&c, &t)) =>
        {
            next.run(req).await
        }
        Some(t) if st.token_matches(&t) => next.run(req).await,
        Some(t) if t.starts_with(state::PAGE_KEY_PREFIX) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            error::codes::UNAUTHORIZED,
            "this page's session has ended (the node restarted, or it was unused for 12 hours): reload the page and sign in again",
        )
        .into_response(),
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            error::codes::UNAUTHORIZED,
            "the bearer token is not this node's token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            error::codes::UNAUTHORIZED,
            "this node requires a token: send Authorization: Bearer <token>",
        )
        .into_response(),
    }
}
