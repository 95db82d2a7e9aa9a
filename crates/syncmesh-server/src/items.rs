//! `/Maps/{map}/Items` and `/Maps/{map}/Items/{key}`: the item operations.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use syncmesh::limits;
use syncmesh::{Bounds, Item, Order, PageRequest, WriteOptions};

use crate::error::ApiError;
use crate::model::{
    CreateItemParams, ErrorBody, ItemList, ItemResource, ItemsQuery, PageMeta, WriteItemParams,
};
use crate::params::{self, Params, Path, Query};
use crate::state::AppState;
use crate::urls::Urls;

/// An item answer: the resource, its revision as `ETag`, and `Location` when created.
fn item_response(status: StatusCode, item: Item, sid: &str, urls: &Urls) -> Response {
    let r = ItemResource::new(item, sid, urls);
    let etag = HeaderValue::from_str(&format!("\"{}\"", r.revision)).ok();
    let location = (status == StatusCode::CREATED)
        .then(|| HeaderValue::from_str(&r.url).ok())
        .flatten();
    let mut resp = (status, Json(r)).into_response();
    if let Some(v) = etag {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Some(v) = location {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Creates an item; 409/54208 if the key exists.
#[utoipa::path(
    post,
    path = "/v1/Services/default/Maps/{map}/Items",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("Syncmesh-Durability" = Option<String>, Header, description = "`fsync`: answered once the item is on disk; `relaxed`: once applied (on disk within 100 ms, or at `POST /v1/Node/Sync`); absent: the node's default"),
    ),
    request_body(content(
        (CreateItemParams = "application/json"),
        (CreateItemParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 201, description = "The new item", body = ItemResource,
            headers(("ETag" = String, description = "The item's revision, quoted"))),
        (status = 400, description = "Invalid key (54209), data (54206), TTL (54011) or parameters (20001)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
        (status = 409, description = "The key exists (54208)", body = ErrorBody),
        (status = 413, description = "Data over 16 KiB (54006)", body = ErrorBody),
    ),
)]
pub async fn create_item(
    State(st): State<AppState>,
    urls: Urls,
    headers: HeaderMap,
    Path(id): Path<String>,
    Params { value: p, form }: Params<CreateItemParams>,
) -> Result<Response, ApiError> {
    let key = p.key.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            54209,
            "the Key parameter is required",
        )
    })?;
    limits::validate_key(&key)?;
    let data = params::required_data(p.data, form)?;
    let ttl = params::ttl(p.ttl)?;
    let durability = params::durability(&headers)?;
    let map = st.map(&id).await?;
    let opts = WriteOptions {
        ttl,
        durability,
        ..WriteOptions::default()
    };
    let item = map
        .create_item_with(&key, serde_json::Value::Object(data), opts)
        .await?;
    Ok(item_response(
        StatusCode::CREATED,
        item,
        map.sid().as_str(),
        &urls,
    ))
}

/// Lists items in key order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Items",
    tag = "items",
    params(("map" = String, Path, description = "Sid or unique name, percent-encoded"), ItemsQuery),
    responses(
        (status = 200, description = "A page of items", body = ItemList),
        (status = 400, description = "Invalid page size or token (54455) or parameter (20001)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
    ),
)]
pub async fn list_items(
    State(st): State<AppState>,
    urls: Urls,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
) -> Result<Json<ItemList>, ApiError> {
    let order = match q.order.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(o) => {
            return Err(ApiError::invalid(format!(
                "invalid Order {o:?}: asc or desc"
            )))
        }
    };
    let bounds = match q.bounds.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("inclusive") => Bounds::Inclusive,
        Some("exclusive") => Bounds::Exclusive,
        Some(b) => {
            return Err(ApiError::invalid(format!(
                "invalid Bounds {b:?}: inclusive or exclusive"
            )))
        }
    };
    let page_size = params::page_size(q.page_size.as_deref())?;
    let page_no = params::page_number(q.page.as_deref())?;
    // The number only labels a page found by its token: without one it would mislabel the
    // first page.
    if page_no > 0 && q.page_token.is_none() {
        return Err(ApiError::invalid(
            "Page needs the PageToken of that page (follow next_page_url); without one, omit Page",
        ));
    }
    let map = st.map(&id).await?;
    let sid = map.sid().as_str().to_string();
    let page = map
        .items(PageRequest {
            order,
            from: q.from.clone(),
            bounds,
            page_size,
            token: q.page_token.clone(),
        })
        .await?;
    let size = page.page_size;
    let link = |token: Option<&str>, page: u64| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.append_pair("PageSize", &size.to_string());
        s.append_pair("Page", &page.to_string());
        // The listing's Order/From/Bounds ride along on every link (a token overrides them),
        // so the first-page link of any later page still lists from the same place.
        if order == Order::Desc {
            s.append_pair("Order", "desc");
        }
        if let Some(f) = &q.from {
            s.append_pair("From", f);
            if bounds == Bounds::Exclusive {
                s.append_pair("Bounds", "exclusive");
            }
        }
        if let Some(t) = token {
            s.append_pair("PageToken", t);
        }
        format!("{}?{}", urls.items(&sid), s.finish())
    };
    let meta = PageMeta {
        page: page_no,
        page_size: size as u64,
        first_page_url: link(None, 0),
        previous_page_url: page
            .prev_token
            .as_deref()
            .map(|t| link(Some(t), page_no.saturating_sub(1))),
        next_page_url: page
            .next_token
            .as_deref()
            .map(|t| link(Some(t), page_no.saturating_add(1))),
        url: link(q.page_token.as_deref(), page_no),
        key: "items".into(),
        last_event_id: Some(page.last_event_id),
    };
    Ok(Json(ItemList {
        items: page
            .items
            .into_iter()
            .map(|i| ItemResource::new(i, &sid, &urls))
            .collect(),
        meta,
    }))
}

/// Fetches an item; its revision is also the `ETag`.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Items/{key}",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("key" = String, Path, description = "The key, percent-encoded (`/` as `%2F`)"),
    ),
    responses(
        (status = 200, description = "The item", body = ItemResource,
            headers(("ETag" = String, description = "The item's revision, quoted"))),
        (status = 400, description = "Invalid key (54209)", body = ErrorBody),
        (status = 404, description = "No such map (54200) or item (54201)", body = ErrorBody),
    ),
)]
pub async fn fetch_item(
    State(st): State<AppState>,
    urls: Urls,
    Path((id, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    limits::validate_key(&key)?;
    let map = st.map(&id).await?;
    let item = map.get(&key).await?;
    Ok(item_response(
        StatusCode::OK,
        item,
        map.sid().as_str(),
        &urls,
    ))
}

/// An item's conflicts: the whole values nodes wrote concurrently, for each field that nodes
/// updated concurrently every value the merge kept (the visible one first), and the nodes
/// whose concurrent writes are current. This replica's view: a node that has not received a
/// peer's write does not list it.
#[utoipa::path(
    get,
    path = "/v1/Services/default/Maps/{map}/Items/{key}/Conflicts",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("key" = String, Path, description = "The key, percent-encoded (`/` as `%2F`)"),
    ),
    responses(
        (status = 200, description = "The item's concurrent values", body = crate::model::ConflictsResource),
        (status = 400, description = "Invalid key (54209)", body = ErrorBody),
        (status = 404, description = "No such map (54200) or item (54201)", body = ErrorBody),
    ),
)]
pub async fn item_conflicts(
    State(st): State<AppState>,
    urls: Urls,
    Path((id, key)): Path<(String, String)>,
) -> Result<axum::Json<crate::model::ConflictsResource>, ApiError> {
    limits::validate_key(&key)?;
    let map = st.map(&id).await?;
    let c = map.conflicts(&key).await?;
    let sid = map.sid().to_string();
    Ok(axum::Json(crate::model::ConflictsResource {
        url: format!("{}/Conflicts", urls.item(&sid, &key)),
        key: c.key,
        map_sid: sid,
        values: c.values,
        fields: c
            .fields
            .into_iter()
            .map(|(f, values)| (f, serde_json::Value::Array(values)))
            .collect(),
        writers: c.writers.iter().map(ToString::to_string).collect(),
    }))
}

/// Sets an item: `Data` replaces its data (creating the item if missing), `Ttl` sets its
/// expiry from now; `If-Match` makes the write conditional (412/54205).
#[utoipa::path(
    post,
    path = "/v1/Services/default/Maps/{map}/Items/{key}",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("key" = String, Path, description = "The key, percent-encoded (`/` as `%2F`)"),
        ("If-Match" = Option<String>, Header, description = "Write only if the item's revision is this one"),
        ("Syncmesh-Durability" = Option<String>, Header, description = "`fsync`: answered once the write is on disk; `relaxed`: once applied (on disk within 100 ms, or at `POST /v1/Node/Sync`); absent: the node's default"),
    ),
    request_body(content(
        (WriteItemParams = "application/json"),
        (WriteItemParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "The item", body = ItemResource,
            headers(("ETag" = String, description = "The item's revision, quoted"))),
        (status = 400, description = "Invalid key (54209), data (54206), TTL (54011) or parameters (20001)", body = ErrorBody),
        (status = 404, description = "No such map (54200), or a TTL-only write to a missing item (54201)", body = ErrorBody),
        (status = 412, description = "If-Match does not match (54205)", body = ErrorBody),
        (status = 413, description = "Data over 16 KiB (54006)", body = ErrorBody),
    ),
)]
pub async fn set_item(
    State(st): State<AppState>,
    urls: Urls,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
    Params { value: p, form }: Params<WriteItemParams>,
) -> Result<Response, ApiError> {
    limits::validate_key(&key)?;
    let data = params::data(p.data, form)?;
    let ttl = params::ttl(p.ttl)?;
    let map = st.map(&id).await?;
    let if_match = params::if_match_resolved(&headers, &map, &key).await?;
    let durability = params::durability(&headers)?;
    let item = match (data, ttl) {
        (Some(d), ttl) => {
            map.set_with(
                &key,
                serde_json::Value::Object(d),
                WriteOptions {
                    ttl,
                    if_match,
                    durability,
                },
            )
            .await?
        }
        (None, Some(t)) if if_match.is_none() => map.set_item_ttl(&key, t).await?,
        (None, Some(t)) => {
            // A conditional TTL change: rewrite the current data with the new expiry, under
            // the same revision check as any other write.
            let opts = WriteOptions {
                ttl: Some(t),
                if_match,
                durability,
            };
            map.mutate_with(&key, opts, |d| d.cloned())
                .await?
                .ok_or_else(|| syncmesh::MapError::ItemNotFound(key.clone()))?
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "give Data (the item's new JSON object) and/or Ttl",
            ))
        }
    };
    Ok(item_response(
        StatusCode::OK,
        item,
        map.sid().as_str(),
        &urls,
    ))
}

/// Updates an item: `Data` is merged into its data field by field (shallow; creating the item
/// if missing); `If-Match` makes the write conditional (412/54205).
#[utoipa::path(
    patch,
    path = "/v1/Services/default/Maps/{map}/Items/{key}",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("key" = String, Path, description = "The key, percent-encoded (`/` as `%2F`)"),
        ("If-Match" = Option<String>, Header, description = "Write only if the item's revision is this one"),
        ("Syncmesh-Durability" = Option<String>, Header, description = "`fsync`: answered once the write is on disk; `relaxed`: once applied (on disk within 100 ms, or at `POST /v1/Node/Sync`); absent: the node's default"),
    ),
    request_body(content(
        (WriteItemParams = "application/json"),
        (WriteItemParams = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "The item", body = ItemResource,
            headers(("ETag" = String, description = "The item's revision, quoted"))),
        (status = 400, description = "Invalid key (54209), data (54206), TTL (54011) or parameters (20001)", body = ErrorBody),
        (status = 404, description = "No such map (54200)", body = ErrorBody),
        (status = 412, description = "If-Match does not match (54205)", body = ErrorBody),
        (status = 413, description = "Data over 16 KiB (54006)", body = ErrorBody),
    ),
)]
pub async fn update_item(
    State(st): State<AppState>,
    urls: Urls,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
    Params { value: p, form }: Params<WriteItemParams>,
) -> Result<Response, ApiError> {
    limits::validate_key(&key)?;
    let patch = params::required_data(p.data, form)?;
    let ttl = params::ttl(p.ttl)?;
    let map = st.map(&id).await?;
    let if_match = params::if_match_resolved(&headers, &map, &key).await?;
    let durability = params::durability(&headers)?;
    let item = map
        .update_with(
            &key,
            serde_json::Value::Object(patch),
            WriteOptions {
                ttl,
                if_match,
                durability,
            },
        )
        .await?;
    Ok(item_response(
        StatusCode::OK,
        item,
        map.sid().as_str(),
        &urls,
    ))
}

/// Deletes an item; with `If-Match` only at that revision (412/54205).
#[utoipa::path(
    delete,
    path = "/v1/Services/default/Maps/{map}/Items/{key}",
    tag = "items",
    params(
        ("map" = String, Path, description = "Sid or unique name, percent-encoded"),
        ("key" = String, Path, description = "The key, percent-encoded (`/` as `%2F`)"),
        ("If-Match" = Option<String>, Header, description = "Delete only if the item's revision is this one"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such map (54200) or item (54201)", body = ErrorBody),
        (status = 412, description = "If-Match does not match (54205)", body = ErrorBody),
    ),
)]
pub async fn delete_item(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    limits::validate_key(&key)?;
    let map = st.map(&id).await?;
    let if_match = params::if_match_resolved(&headers, &map, &key).await?;
    match if_match {
        Some(rev) => map.remove_if(&key, rev).await?,
        None => map.remove(&key).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}
