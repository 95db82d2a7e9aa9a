//! `/Maps/{map}/Permissions` and `/Maps/{map}/Permissions/{identity}`: who may read, write and
//! manage a map. The identity is a peer id; the entries travel with the map, so every node that
//! holds it applies them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use syncmesh::Permission;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model::{ErrorBody, PageMeta};
use crate::params::{Params, Path};
use crate::state::AppState;
use crate::urls::{encode_segment, Urls};

/// One identity's permissions on a map (the Sync Maps Permission resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PermissionResource {
    /// The map's sid.
    pub map_sid: String,
    /// Who: a peer id.
    pub identity: String,
    /// May receive the map (subscribe and query).
    pub read: bool,
    /// May change its items.
    pub write: bool,
    /// May change its permissions and remove it.
    pub manage: bool,
    /// This resource.
    pub url: String,
}

impl PermissionResource {
    fn new(p: &Permission, sid: &str, urls: &Urls) -> Self {
        PermissionResource {
            map_sid: sid.to_string(),
            identity: p.identity.clone(),
            read: p.read,
            write: p.write,
            manage: p.manage,
            url: format!(
                "{}/{}",
                permissions_url(urls, sid),
                encode_segment(&p.identity)
            ),
        }
    }
}

fn permissions_url(urls: &Urls, sid: &str) -> String {
    format!("{}/Permissions", urls.map(sid))
}

/// A map's permission entries (one page: a map has at most 1,024).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PermissionList {
    /// The entries, by identity. Empty: the map is shared with every trusted peer.
    pub permissions: Vec<PermissionResource>,
    /// Paging (always one page).
    pub meta: PageMeta,
}

/// Parameters of `POST .../Permissions/{identity}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionParams {
    /// May receive the map.
    #[serde(rename = "Read", default, deserialize_with = "flag")]
    pub read: Option<bool>,
    /// May change its items.
    #[serde(rename = "Write", default, deserialize_with = "flag")]
    pub write: Option<bool>,
    /// May change its permissions and remove it.
    #[serde(rename = "Manage", default, deserialize_with = "flag")]
    pub manage: Option<bool>,
}

/// `true`/`false` as JSON booleans or as form text (any case).
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Bool(bool),
        Text(String),
    }
    match B::deserialize(d)? {
        B::Bool(b) => Ok(Some(b)),
        B::Text(t) => match t.to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "{t:?} is not a boolean (true or false)"
            ))),
        },
    }
}

/// Lists a map's permission entries.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Permissions",
    tag = "permissions",
    params(("map" = String, Path, description = "Sid or unique name, percent-encoded")),
    responses(
        (status = 200, description = "The entries (empty: shared with every trusted peer)", body = PermissionList),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
    ),
)]
pub async fn list_permissions(
    State(st): State<AppState>,
    urls: Urls,
    Path(id): Path<String>,
) -> Result<Json<PermissionList>, ApiError> {
    let map = st.map(&id).await?;
    let sid = map.sid().as_str().to_string();
    let all = map.permissions().await?;
    let url = permissions_url(&urls, &sid);
    Ok(Json(PermissionList {
        meta: PageMeta {
            page: 0,
            page_size: all.len() as u64,
            first_page_url: url.clone(),
            previous_page_url: None,
            next_page_url: None,
            url,
            key: "permissions".into(),
            last_event_id: None,
        },
        permissions: all
            .iter()
            .map(|p| PermissionResource::new(p, &sid, &urls))
            .collect(),
    }))
}

/// Fetches one identity's entry.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Permissions/{identity}",
    tag = "permissions",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("identity" = String, Path, description = "A peer id"),
    ),
    responses(
        (status = 200, description = "The entry", body = PermissionResource),
        (status = 404, description = "No such map (54200) or entry (20404)", body = ErrorBody),
    ),
)]
pub async fn fetch_permission(
    State(st): State<AppState>,
    urls: Urls,
    Path((id, identity)): Path<(String, String)>,
) -> Result<Json<PermissionResource>, ApiError> {
    let map = st.map(&id).await?;
    let p = map.permission(&identity).await?;
    Ok(Json(PermissionResource::new(&p, map.sid().as_str(), &urls)))
}

/// Sets one identity's entry: `Read`, `Write` and `Manage` (each `true` or `false`; all three
/// are required, as in the hosted API). The first entry of a map also lists this node as a
/// manager; on a map with entries this node must have `Manage` (403/20403).
#[utoipa::path(
    post,
    path = "/v1/Services/default/Maps/{map}/Permissions/{identity}",
    tag = "permissions",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("identity" = String, Path, description = "A peer id"),
    ),
    request_body(content(
        (PermissionParams = "application/json"),
        (PermissionParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "The entry", body = PermissionResource),
        (status = 400, description = "Invalid identity or flags (20001)", body = ErrorBody),
        (status = 403, description = "This node may not manage the map (20403)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
        (status = 409, description = "This node is not on a network (20306)", body = ErrorBody),
    ),
)]
pub async fn set_permission(
    State(st): State<AppState>,
    urls: Urls,
    Path((id, identity)): Path<(String, String)>,
    Params { value: p, .. }: Params<PermissionParams>,
) -> Result<Json<PermissionResource>, ApiError> {
    let (Some(read), Some(write), Some(manage)) = (p.read, p.write, p.manage) else {
        return Err(ApiError::invalid(
            "Read, Write and Manage are required (true or false)",
        ));
    };
    let map = st.map(&id).await?;
    let p = map
        .set_permission(Permission {
            identity,
            read,
            write,
            manage,
        })
        .await?;
    Ok(Json(PermissionResource::new(&p, map.sid().as_str(), &urls)))
}

/// Removes one identity's entry (removing the last one shares the map with every trusted peer
/// again).
#[utoipa::path(
    delete,
    path = "/v1/Services/default/Maps/{map}/Permissions/{identity}",
    tag = "permissions",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("identity" = String, Path, description = "A peer id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "This node may not manage the map (20403)", body = ErrorBody),
        (status = 404, description = "No such map (54200) or entry (20404)", body = ErrorBody),
        (status = 409, description = "This node is not on a network (20306)", body = ErrorBody),
    ),
)]
pub async fn delete_permission(
    State(st): State<AppState>,
    Path((id, identity)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let map = st.map(&id).await?;
    map.remove_permission(&identity).await?;
    Ok(StatusCode::NO_CONTENT)
}
