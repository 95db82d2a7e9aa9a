//! `/Maps` and `/Maps/{map}`: create, list, fetch, update (TTL) and delete maps.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use syncmesh::limits;
use syncmesh::{MapInfo, MapSpec, OpenMode};

use crate::error::ApiError;
use crate::model::{
    CreateMapParams, ErrorBody, MapList, MapResource, MapsQuery, PageMeta, UpdateMapParams,
};
use crate::params::{self, Params, Path, Query};
use crate::state::AppState;
use crate::urls::Urls;

/// Creates a map (`create_new`: 409/54301 if the unique name is taken).
#[utoipa::path(
    post,
    path = "/v1/Services/default/Maps",
    tag = "maps",
    request_body(content(
        (CreateMapParams = "application/json"),
        (CreateMapParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 201, description = "The new map", body = MapResource),
        (status = 400, description = "Invalid unique name (54302), TTL (54011) or parameters (20001)", body = ErrorBody),
        (status = 409, description = "The unique name is taken (54301)", body = ErrorBody),
    ),
)]
pub async fn create_map(
    State(st): State<AppState>,
    urls: Urls,
    Params { value: p, .. }: Params<CreateMapParams>,
) -> Result<Response, ApiError> {
    let ttl = params::ttl(p.ttl)?;
    if let Some(n) = &p.unique_name {
        limits::validate_name(n)?;
    }
    let spec = MapSpec {
        id: p.unique_name,
        mode: OpenMode::CreateNew,
        ttl,
        ..MapSpec::default()
    };
    let map = st.node().map(spec).await?;
    let r = MapResource::new(&map.info().await?, &urls);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, r.url.clone())],
        Json(r),
    )
        .into_response())
}

/// Lists live maps in sid order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps",
    tag = "maps",
    params(MapsQuery),
    responses(
        (status = 200, description = "A page of maps", body = MapList),
        (status = 400, description = "Invalid page size or token (54455) or parameter (20001)", body = ErrorBody),
    ),
)]
pub async fn list_maps(
    State(st): State<AppState>,
    urls: Urls,
    Query(q): Query<MapsQuery>,
) -> Result<Json<MapList>, ApiError> {
    let size = params::page_size(q.page_size.as_deref())?
        .map_or(limits::DEFAULT_PAGE_SIZE, |n| n as usize);
    let page_no = params::page_number(q.page.as_deref())?;
    // The number only labels a page found by its token: without one it would mislabel the
    // first page.
    if page_no > 0 && q.page_token.is_none() {
        return Err(ApiError::invalid(
            "Page needs the PageToken of that page (follow next_page_url); without one, omit Page",
        ));
    }
    let all = st.node().maps().await?;
    let token = q.page_token.as_deref().map(MapToken::decode).transpose()?;
    let (picked, next, prev) = page_maps(&all, size, token.as_ref());
    let link = |token: Option<String>, page: u64| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.append_pair("PageSize", &size.to_string());
        s.append_pair("Page", &page.to_string());
        if let Some(t) = &token {
            s.append_pair("PageToken", t);
        }
        format!("{}?{}", urls.maps(), s.finish())
    };
    let meta = PageMeta {
        page: page_no,
        page_size: size as u64,
        first_page_url: link(None, 0),
        previous_page_url: prev.map(|t| link(Some(t.encode()), page_no.saturating_sub(1))),
        next_page_url: next.map(|t| link(Some(t.encode()), page_no.saturating_add(1))),
        url: link(q.page_token.clone(), page_no),
        key: "maps".into(),
        last_event_id: None,
    };
    Ok(Json(MapList {
        maps: picked.iter().map(|m| MapResource::new(m, &urls)).collect(),
        meta,
    }))
}

/// Where a page of maps continues: after (`n`) or before a sid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MapToken {
    /// Always `"maps"`: a token of an item listing is refused here.
    l: String,
    /// The anchor sid (exclusive).
    k: String,
    /// `true`: the page after the anchor; `false`: the page before it.
    n: bool,
}

impl MapToken {
    const LISTING: &'static str = "maps";

    fn new(k: String, n: bool) -> Self {
        MapToken {
            l: Self::LISTING.to_string(),
            k,
            n,
        }
    }

    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(s: &str) -> Result<Self, ApiError> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| serde_json::from_slice::<MapToken>(&b).ok())
            .filter(|t| t.l == Self::LISTING)
            .ok_or_else(|| syncmesh::MapError::InvalidPageToken.into())
    }
}

/// One page of `all` (in sid order) and the tokens of the pages after and before it.
fn page_maps<'a>(
    all: &'a [MapInfo],
    size: usize,
    token: Option<&MapToken>,
) -> (&'a [MapInfo], Option<MapToken>, Option<MapToken>) {
    let (start, end) = match token {
        None => (0, size.min(all.len())),
        Some(t) => {
            let at = all.partition_point(|m| m.sid.as_str() <= t.k.as_str());
            if t.n {
                (at, at.saturating_add(size).min(all.len()))
            } else {
                let before = all.partition_point(|m| m.sid.as_str() < t.k.as_str());
                (before.saturating_sub(size), before)
            }
        }
    };
    let page = &all[start..end];
    let next = (end < all.len())
        .then(|| page.last())
        .flatten()
        .map(|m| MapToken::new(m.sid.to_string(), true));
    let prev = (start > 0)
        .then(|| page.first())
        .flatten()
        .map(|m| MapToken::new(m.sid.to_string(), false));
    (page, next, prev)
}

/// Fetches a map by sid or unique name.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}",
    tag = "maps",
    params(("map" = String, Path, description = "Sid or unique name, percent-encoded")),
    responses(
        (status = 200, description = "The map", body = MapResource),
        (status = 400, description = "Invalid unique name (54302)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
    ),
)]
pub async fn fetch_map(
    State(st): State<AppState>,
    urls: Urls,
    Path(id): Path<String>,
) -> Result<Json<MapResource>, ApiError> {
    let map = st.map(&id).await?;
    Ok(Json(MapResource::new(&map.info().await?, &urls)))
}

/// Updates a map: `Ttl` sets its expiry from now (0 clears it).
#[utoipa::path(
    post,
    path = "/v1/Services/default/Maps/{map}",
    tag = "maps",
    params(("map" = String, Path, description = "Sid or unique name, percent-encoded")),
    request_body(content(
        (UpdateMapParams = "application/json"),
        (UpdateMapParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "The map", body = MapResource),
        (status = 400, description = "Invalid TTL (54011) or parameters (20001)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
    ),
)]
pub async fn update_map(
    State(st): State<AppState>,
    urls: Urls,
    Path(id): Path<String>,
    Params { value: p, .. }: Params<UpdateMapParams>,
) -> Result<Json<MapResource>, ApiError> {
    let ttl = params::ttl(p.ttl)?;
    let map = st.map(&id).await?;
    let info = match ttl {
        Some(t) => map.set_ttl(t).await?,
        None => map.info().await?,
    };
    Ok(Json(MapResource::new(&info, &urls)))
}

/// Deletes a map and all its items.
#[utoipa::path(
    delete,
    path = "/v1/Services/default/Maps/{map}",
    tag = "maps",
    params(("map" = String, Path, description = "Sid or unique name, percent-encoded")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
    ),
)]
pub async fn delete_map(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.map(&id).await?.remove_map().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncmesh::{MapSid, NodeId, Revision, Timestamp};

    fn info(i: u8) -> MapInfo {
        MapInfo {
            sid: MapSid::from_random([i; 16]),
            unique_name: None,
            revision: Revision::from_client("0"),
            date_created: Timestamp::from_millis(0),
            date_updated: Timestamp::from_millis(0),
            date_expires: None,
            created_by: NodeId([0; 16]),
            items_count: 0,
        }
    }

    #[test]
    fn map_pages_walk_both_ways() {
        let all: Vec<_> = (1..=5).map(info).collect();
        let (p1, next, prev) = page_maps(&all, 2, None);
        assert_eq!((p1.len(), prev), (2, None));
        let (p2, next2, prev2) = page_maps(&all, 2, next.as_ref());
        assert_eq!(p2[0].sid, all[2].sid);
        let (back, _, prev1) = page_maps(&all, 2, prev2.as_ref());
        assert_eq!(back, p1);
        assert!(prev1.is_none());
        let (p3, next3, _) = page_maps(&all, 2, next2.as_ref());
        assert_eq!((p3.len(), next3), (1, None));
        let t = MapToken::new("x".into(), true);
        assert_eq!(MapToken::decode(&t.encode()).unwrap(), t);
        assert_eq!(MapToken::decode("!!").unwrap_err().code, 54455);
    }
}
