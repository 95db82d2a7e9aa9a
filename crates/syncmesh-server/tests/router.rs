//! In-process tests of the router (`oneshot`): every route, every error code, the token check,
//! the OpenAPI document against the router, and responses against the document's schemas.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the report

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use syncmesh::Node;
use syncmesh_server::{router, ServerOptions};
use tower::ServiceExt;

/// Generous: the machines are shared and slow; this bounds a wait, it is never the criterion.
const DEADLINE: Duration = Duration::from_secs(90);
const P: &str = "/v1/Services/default";

struct Api {
    app: Router,
    token: Option<String>,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Resp {
    /// Asserts an error answer: status, code, and the body's shape.
    fn err(&self, status: u16, code: u64) {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(self.body["code"], code, "{}", self.body);
        assert_eq!(self.body["status"], status, "{}", self.body);
        assert!(self.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(self.body["more_info"].is_string());
        check_schema(
            &self.body,
            &json!({"$ref": "#/components/schemas/ErrorBody"}),
        );
    }

    fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        &self.body
    }
}

fn addr() -> SocketAddr {
    "127.0.0.1:7700".parse().unwrap()
}

async fn api() -> Api {
    let node = Node::in_memory().await.unwrap();
    Api {
        app: router(node, ServerOptions::new(addr())),
        token: None,
    }
}

impl Api {
    async fn send(&self, req: Request<Body>) -> Resp {
        let mut req = req;
        if let Some(t) = &self.token {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        let call = async {
            let r = self.app.clone().oneshot(req).await.unwrap();
            let status = r.status();
            let headers = r.headers().clone();
            let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, headers, bytes)
        };
        let (status, headers, bytes) = tokio::time::timeout(DEADLINE, call)
            .await
            .expect("an answer within the deadline");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(b.body(body).unwrap()).await
    }

    async fn raw(&self, method: Method, uri: &str, ctype: &str, body: &str) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, ctype)
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(req).await
    }

    async fn with_header(
        &self,
        method: Method,
        uri: &str,
        (name, value): (&str, &str),
        body: Option<Value>,
    ) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(name, value)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.map_or(Body::empty(), |v| Body::from(v.to_string())))
            .unwrap();
        self.send(req).await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Value) -> Resp {
        self.call(Method::POST, uri, Some(body)).await
    }

    async fn form(&self, uri: &str, body: &str) -> Resp {
        self.raw(Method::POST, uri, "application/x-www-form-urlencoded", body)
            .await
    }
}

/// Validates `v` against a schema of the OpenAPI document (the subset utoipa emits: `$ref`,
/// `type` (also as a list with "null"), `properties`, `required`, `items`, `oneOf`,
/// `additionalProperties`, `enum`). Extra properties in `v` that the schema does not list are
/// an error too, so the document cannot silently fall behind the code.
fn check_schema(v: &Value, schema: &Value) {
    let doc = serde_json::to_value(syncmesh_server::openapi()).unwrap();
    validate(&doc, v, schema, "$");
}

fn validate(doc: &Value, v: &Value, s: &Value, at: &str) {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(!target.is_null(), "{at}: unknown schema {r}");
        return validate(doc, v, target, at);
    }
    if let Some(alts) = s["oneOf"].as_array() {
        let ok = alts.iter().any(|alt| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| validate(doc, v, alt, at)))
                .is_ok()
        });
        assert!(ok, "{at}: {v} matches none of {s}");
        return;
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return, // any value
    };
    let actual = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let fits = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
    assert!(fits, "{at}: {v} is {actual}, schema says {types:?}");
    if let Some(e) = s["enum"].as_array() {
        assert!(e.contains(v), "{at}: {v} not in {e:?}");
    }
    if let (Value::Object(o), Some(props)) = (v, s["properties"].as_object()) {
        for req in s["required"].as_array().into_iter().flatten() {
            let k = req.as_str().unwrap();
            assert!(o.contains_key(k), "{at}: missing required {k}");
        }
        for (k, val) in o {
            let p = props
                .get(k)
                .unwrap_or_else(|| panic!("{at}: property {k} is not in the schema"));
            validate(doc, val, p, &format!("{at}.{k}"));
        }
    }
    if let (Value::Array(a), Some(items)) = (v, s.get("items")) {
        for (i, x) in a.iter().enumerate() {
            validate(doc, x, items, &format!("{at}[{i}]"));
        }
    }
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

#[tokio::test]
async fn maps_create_list_fetch_update_delete() {
    let api = api().await;
    let r = api
        .post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await;
    let m = r.ok(201).clone();
    check_schema(&m, &schema("MapResource"));
    assert_eq!(m["unique_name"], "users");
    let sid = m["sid"].as_str().unwrap().to_string();
    assert!(sid.starts_with("MP") && sid.len() == 34);
    assert_eq!(
        m["url"],
        format!("http://127.0.0.1:7700{P}/Maps/{sid}").as_str()
    );
    assert_eq!(r.headers[header::LOCATION], m["url"].as_str().unwrap());
    assert!(m["date_expires"].is_null());

    api.post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await
        .err(409, 54301);
    // unnamed map, empty body
    let r = api.call(Method::POST, &format!("{P}/Maps"), None).await;
    assert!(r.ok(201)["unique_name"].is_null());
    // with a TTL, form-encoded
    let r = api
        .raw(
            Method::POST,
            &format!("{P}/Maps"),
            "application/x-www-form-urlencoded",
            "UniqueName=temp%2Fmap&Ttl=60",
        )
        .await;
    assert!(r.ok(201)["date_expires"].is_string());

    for (by, _) in [(sid.as_str(), 0), ("users", 1)] {
        let r = api.get(&format!("{P}/Maps/{by}")).await;
        assert_eq!(r.ok(200)["sid"], sid.as_str());
    }
    assert_eq!(
        api.get(&format!("{P}/Maps/temp%2Fmap")).await.ok(200)["unique_name"],
        "temp/map"
    );
    let list = api.get(&format!("{P}/Maps")).await;
    let list = list.ok(200);
    check_schema(list, &schema("MapList"));
    assert_eq!(list["maps"].as_array().unwrap().len(), 3);
    assert_eq!(list["meta"]["key"], "maps");

    let r = api
        .post(&format!("{P}/Maps/users"), json!({"Ttl": 3600}))
        .await;
    assert!(r.ok(200)["date_expires"].is_string());
    let r = api
        .post(&format!("{P}/Maps/users"), json!({"Ttl": 0}))
        .await;
    assert!(r.ok(200)["date_expires"].is_null());
    let r = api.post(&format!("{P}/Maps/users"), json!({})).await;
    r.ok(200);
    api.post(&format!("{P}/Maps/users"), json!({"Ttl": -1}))
        .await
        .err(400, 54011);
    api.post(&format!("{P}/Maps/users"), json!({"Nope": 1}))
        .await
        .err(400, 20001);
    api.post(&format!("{P}/Maps/nope"), json!({"Ttl": 1}))
        .await
        .err(404, 54200);

    let r = api
        .call(Method::DELETE, &format!("{P}/Maps/users"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    api.get(&format!("{P}/Maps/users")).await.err(404, 54200);
    api.get(&format!("{P}/Maps/{sid}")).await.err(404, 54200);
    api.call(Method::DELETE, &format!("{P}/Maps/users"), None)
        .await
        .err(404, 54200);
    api.get(&format!("{P}/Maps/users/Items/k"))
        .await
        .err(404, 54200);
    // the name is free again
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await
        .ok(201);
}

#[tokio::test]
async fn map_errors() {
    let api = api().await;
    let sid_like = format!("MP{}", "a".repeat(32));
    api.post(&format!("{P}/Maps"), json!({"UniqueName": sid_like}))
        .await
        .err(400, 54302);
    api.post(&format!("{P}/Maps"), json!({"UniqueName": ""}))
        .await
        .err(400, 54302);
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "n".repeat(321)}))
        .await
        .err(400, 54302);
    api.post(
        &format!("{P}/Maps"),
        json!({"UniqueName": "x", "Ttl": 31_536_001}),
    )
    .await
    .err(400, 54011);
    api.post(
        &format!("{P}/Maps"),
        json!({"UniqueName": "x", "Ttl": "soon"}),
    )
    .await
    .err(400, 54011);
    api.post(&format!("{P}/Maps"), json!({"UniqueName": 5}))
        .await
        .err(400, 20001);
    api.get(&format!("{P}/Maps/{}", "n".repeat(321)))
        .await
        .err(400, 54302);
    api.get(&format!("{P}/Maps/nope")).await.err(404, 54200);
    api.get(&format!("{P}/Maps/{sid_like}"))
        .await
        .err(404, 54200);
    for q in ["PageSize=0", "PageSize=101", "PageSize=x"] {
        api.get(&format!("{P}/Maps?{q}")).await.err(400, 54455);
    }
    api.get(&format!("{P}/Maps?PageToken=garbage"))
        .await
        .err(400, 54455);
    api.get(&format!("{P}/Maps?Bogus=1")).await.err(400, 20001);
    api.get(&format!("{P}/Maps?Page=-1")).await.err(400, 20001);
}

#[tokio::test]
async fn map_pages_follow_meta_urls() {
    let api = api().await;
    for i in 0..5 {
        api.post(&format!("{P}/Maps"), json!({"UniqueName": format!("m{i}")}))
            .await
            .ok(201);
    }
    let mut url = format!("{P}/Maps?PageSize=2");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = api.get(&url).await;
        let body = r.ok(200).clone();
        pages += 1;
        assert_eq!(body["meta"]["page_size"], 2);
        for m in body["maps"].as_array().unwrap() {
            seen.push(m["sid"].as_str().unwrap().to_string());
        }
        if pages > 1 {
            assert!(body["meta"]["previous_page_url"].is_string());
        }
        match body["meta"]["next_page_url"].as_str() {
            Some(next) => url = next.trim_start_matches("http://127.0.0.1:7700").to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "every map once, in sid order");
    assert_eq!(seen.len(), 5);
}

#[tokio::test]
async fn items_create_fetch_set_update_delete() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/users/Items");
    let r = api
        .post(
            &items,
            json!({"Key": "david", "Data": {"phone_number": 12345678, "country": "UK"}}),
        )
        .await;
    let it = r.ok(201).clone();
    check_schema(&it, &schema("ItemResource"));
    assert_eq!(it["key"], "david");
    assert_eq!(it["data"]["country"], "UK");
    let rev = it["revision"].as_str().unwrap().to_string();
    assert_eq!(r.headers[header::ETAG], format!("\"{rev}\"").as_str());
    assert_eq!(r.headers[header::LOCATION], it["url"].as_str().unwrap());
    assert_eq!(it["map_sid"].as_str().unwrap().len(), 34);

    api.post(&items, json!({"Key": "david", "Data": {}}))
        .await
        .err(409, 54208);

    let one = format!("{items}/david");
    let r = api.get(&one).await;
    assert_eq!(r.ok(200)["revision"], rev.as_str());
    assert_eq!(r.headers[header::ETAG], format!("\"{rev}\"").as_str());

    // POST replaces, conditional on If-Match
    api.with_header(
        Method::POST,
        &one,
        ("if-match", "\"0000000000000000\""),
        Some(json!({"Data": {"country": "IRL"}})),
    )
    .await
    .err(412, 54205);
    let r = api
        .with_header(
            Method::POST,
            &one,
            ("if-match", &format!("\"{rev}\"")),
            Some(json!({"Data": {"country": "IRL"}})),
        )
        .await;
    let it2 = r.ok(200).clone();
    assert_eq!(it2["data"], json!({"country": "IRL"}));
    assert_ne!(it2["revision"], rev.as_str());
    // PATCH merges
    let r = api
        .call(
            Method::PATCH,
            &one,
            Some(json!({"Data": {"phone_number": 1}, "Ttl": 60})),
        )
        .await;
    let it3 = r.ok(200).clone();
    assert_eq!(it3["data"], json!({"country": "IRL", "phone_number": 1}));
    assert!(it3["date_expires"].is_string());
    api.with_header(
        Method::PATCH,
        &one,
        ("if-match", "nope"),
        Some(json!({"Data": {"a": 1}})),
    )
    .await
    .err(412, 54205);
    // TTL only: clears the expiry, keeps the data
    let r = api.post(&one, json!({"Ttl": 0})).await;
    assert!(r.ok(200)["date_expires"].is_null());
    assert_eq!(r.body["data"]["country"], "IRL");
    let cur = r.body["revision"].as_str().unwrap().to_string();
    let r = api
        .with_header(
            Method::POST,
            &one,
            ("if-match", &cur),
            Some(json!({"Ttl": 5})),
        )
        .await;
    assert!(r.ok(200)["date_expires"].is_string());
    api.with_header(
        Method::POST,
        &one,
        ("if-match", &cur),
        Some(json!({"Ttl": 5})),
    )
    .await
    .err(412, 54205);
    api.post(&format!("{items}/ghost"), json!({"Ttl": 5}))
        .await
        .err(404, 54201);
    // POST with Data creates a missing item (set), PATCH too (update)
    api.post(&format!("{items}/new"), json!({"Data": {"n": 1}}))
        .await
        .ok(200);
    api.call(
        Method::PATCH,
        &format!("{items}/new2"),
        Some(json!({"Data": {"n": 2}})),
    )
    .await
    .ok(200);
    // DELETE, conditional and not
    api.with_header(Method::DELETE, &one, ("if-match", "nope"), None)
        .await
        .err(412, 54205);
    let cur = api.get(&one).await.body["revision"]
        .as_str()
        .unwrap()
        .to_string();
    let r = api
        .with_header(Method::DELETE, &one, ("if-match", &cur), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    api.get(&one).await.err(404, 54201);
    api.call(Method::DELETE, &one, None).await.err(404, 54201);
    let r = api
        .call(Method::DELETE, &format!("{items}/new"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn awkward_keys_round_trip_percent_encoded() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "k"}))
        .await
        .ok(201);
    let keys = [
        "a/b",
        "with:colon",
        "with space",
        "ünï 日本 🎉",
        "100%",
        "q?x=1#frag",
        "+plus",
        "...",
        "a//b/",
    ];
    // `.` and `..` cannot be addressed by any URL (parsers remove them): refused.
    for key in [".", ".."] {
        api.post(
            &format!("{P}/Maps/k/Items"),
            json!({"Key": key, "Data": {}}),
        )
        .await
        .err(400, 54209);
    }
    for key in keys {
        let r = api
            .post(
                &format!("{P}/Maps/k/Items"),
                json!({"Key": key, "Data": {"k": key}}),
            )
            .await;
        let url = r.ok(201)["url"].as_str().unwrap().to_string();
        let path = url.trim_start_matches("http://127.0.0.1:7700");
        let r = api.get(path).await;
        assert_eq!(r.ok(200)["key"], key, "{path}");
        assert_eq!(r.body["data"]["k"], key);
    }
    let list = api.get(&format!("{P}/Maps/k/Items")).await;
    assert_eq!(list.ok(200)["items"].as_array().unwrap().len(), keys.len());
    // invalid UTF-8 in a path is a clear 400, not a 500
    api.get(&format!("{P}/Maps/k/Items/%FF"))
        .await
        .err(400, 20001);
    // an over-long key
    let long = "x".repeat(321);
    api.get(&format!("{P}/Maps/k/Items/{long}"))
        .await
        .err(400, 54209);
    api.post(
        &format!("{P}/Maps/k/Items"),
        json!({"Key": long, "Data": {}}),
    )
    .await
    .err(400, 54209);
    api.post(&format!("{P}/Maps/k/Items"), json!({"Key": "", "Data": {}}))
        .await
        .err(400, 54209);
}

#[tokio::test]
async fn form_encoded_bodies_like_the_hosted_api() {
    let api = api().await;
    api.raw(
        Method::POST,
        &format!("{P}/Maps"),
        "application/x-www-form-urlencoded",
        "UniqueName=f",
    )
    .await
    .ok(201);
    let r = api
        .raw(
            Method::POST,
            &format!("{P}/Maps/f/Items"),
            "application/x-www-form-urlencoded",
            "Key=a%2Fb&Data=%7B%22x%22%3A%5B1%2C2%5D%7D&ItemTtl=100",
        )
        .await;
    assert_eq!(r.ok(201)["data"], json!({"x": [1, 2]}));
    assert!(r.body["date_expires"].is_string());
    let r = api
        .raw(
            Method::POST,
            &format!("{P}/Maps/f/Items/a%2Fb"),
            "application/x-www-form-urlencoded",
            "Data=%7B%22y%22%3Atrue%7D",
        )
        .await;
    assert_eq!(r.ok(200)["data"], json!({"y": true}));
    let r = api
        .raw(
            Method::PATCH,
            &format!("{P}/Maps/f/Items/a%2Fb"),
            "application/x-www-form-urlencoded",
            "Data=%7B%22z%22%3A1%7D",
        )
        .await;
    assert_eq!(r.ok(200)["data"], json!({"y": true, "z": 1}));
    api.raw(
        Method::POST,
        &format!("{P}/Maps/f/Items"),
        "application/x-www-form-urlencoded",
        "Key=b&Data=not-json",
    )
    .await
    .err(400, 54206);
    api.raw(
        Method::POST,
        &format!("{P}/Maps/f/Items"),
        "application/x-www-form-urlencoded",
        "Key=b&Data=%5B1%5D",
    )
    .await
    .err(400, 54206);
}

#[tokio::test]
async fn every_invalid_item_input_is_a_typed_error() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "m"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/m/Items");
    let json = "application/json";
    api.raw(Method::POST, &items, json, "{not json")
        .await
        .err(400, 20001);
    api.raw(Method::POST, &items, json, "[1,2]")
        .await
        .err(400, 20001);
    api.raw(Method::POST, &items, "text/plain", "hi")
        .await
        .err(415, 20415);
    api.post(&items, json!({"Key": "k"})).await.err(400, 54206);
    api.post(&items, json!({"Data": {}})).await.err(400, 54209);
    api.post(&items, json!({"Key": 1, "Data": {}}))
        .await
        .err(400, 20001);
    for bad in [json!(null), json!([1]), json!("{}"), json!(3), json!(true)] {
        api.post(&items, json!({"Key": "k", "Data": bad}))
            .await
            .err(400, 54206);
    }
    api.post(&items, json!({"Key": "k", "Data": {}, "Ttl": -5}))
        .await
        .err(400, 54011);
    api.post(&items, json!({"Key": "k", "Data": {}, "Ttl": 1.5}))
        .await
        .err(400, 54011);
    api.post(&items, json!({"Key": "k", "Data": {}, "Extra": 1}))
        .await
        .err(400, 20001);
    // data over 16 KiB, inside the body limit
    let big = json!({"Key": "k", "Data": {"x": "y".repeat(17 * 1024)}});
    api.post(&items, big).await.err(413, 54006);
    // a body over the limit
    let huge = json!({"Key": "k", "Data": {"x": "y".repeat(200 * 1024)}});
    api.post(&items, huge).await.err(413, 54006);
    // exactly at the limit is fine
    let overhead = r#"{"x":""}"#.len();
    let exact = json!({"Key": "k", "Data": {"x": "y".repeat(16 * 1024 - overhead)}});
    api.post(&items, exact).await.ok(201);
    api.post(&format!("{items}/k"), json!({}))
        .await
        .err(400, 20001);
    api.call(
        Method::PATCH,
        &format!("{items}/k"),
        Some(json!({"Ttl": 1})),
    )
    .await
    .err(400, 54206);
    api.with_header(
        Method::POST,
        &format!("{items}/k"),
        ("if-match", "caf\u{e9}"),
        Some(json!({"Data": {}})),
    )
    .await;
    api.post(
        &format!("{P}/Maps/nope/Items"),
        json!({"Key": "k", "Data": {}}),
    )
    .await
    .err(404, 54200);
    api.get(&format!("{P}/Maps/nope/Items"))
        .await
        .err(404, 54200);
    api.get(&format!("{P}/Maps/nope/Items/k"))
        .await
        .err(404, 54200);
    api.get(&format!("{items}/absent")).await.err(404, 54201);
}

#[tokio::test]
async fn item_listing_order_from_bounds_and_pages() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "l"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/l/Items");
    for i in 0..7 {
        api.post(&items, json!({"Key": format!("k{i}"), "Data": {"i": i}}))
            .await
            .ok(201);
    }
    let keys = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect()
    };
    let r = api.get(&items).await;
    check_schema(r.ok(200), &schema("ItemList"));
    assert_eq!(keys(&r.body).len(), 7);
    assert_eq!(r.body["meta"]["page_size"], 50);
    assert_eq!(r.body["meta"]["key"], "items");
    assert!(r.body["meta"]["next_page_url"].is_null());
    let r = api.get(&format!("{items}?Order=desc&PageSize=3")).await;
    assert_eq!(keys(r.ok(200)), ["k6", "k5", "k4"]);
    let r = api.get(&format!("{items}?From=k2&PageSize=2")).await;
    assert_eq!(keys(r.ok(200)), ["k2", "k3"]);
    let r = api
        .get(&format!("{items}?From=k2&Bounds=exclusive&PageSize=2"))
        .await;
    assert_eq!(keys(r.ok(200)), ["k3", "k4"]);
    // walk forward with next_page_url, then back with previous_page_url
    let strip = |u: &str| u.trim_start_matches("http://127.0.0.1:7700").to_string();
    let mut url = format!("{items}?PageSize=3");
    let mut all = Vec::new();
    let mut last;
    loop {
        let r = api.get(&url).await;
        all.extend(keys(r.ok(200)));
        last = r.body.clone();
        match r.body["meta"]["next_page_url"].as_str() {
            Some(n) => url = strip(n),
            None => break,
        }
    }
    assert_eq!(all, (0..7).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert_eq!(last["meta"]["page"], 2);
    let prev = strip(last["meta"]["previous_page_url"].as_str().unwrap());
    assert_eq!(keys(api.get(&prev).await.ok(200)), ["k3", "k4", "k5"]);
    let first = strip(last["meta"]["first_page_url"].as_str().unwrap());
    assert_eq!(keys(api.get(&first).await.ok(200)), ["k0", "k1", "k2"]);

    api.get(&format!("{items}?Order=sideways"))
        .await
        .err(400, 20001);
    api.get(&format!("{items}?Bounds=maybe"))
        .await
        .err(400, 20001);
    api.get(&format!("{items}?PageSize=0"))
        .await
        .err(400, 54455);
    api.get(&format!("{items}?PageSize=1000"))
        .await
        .err(400, 54455);
    api.get(&format!("{items}?PageToken=%%%"))
        .await
        .err(400, 54455);
    api.get(&format!("{items}?PageToken=bm9wZQ"))
        .await
        .err(400, 54455);
    api.get(&format!("{items}?pagesize=3"))
        .await
        .err(400, 20001);
}

#[tokio::test]
async fn routes_and_methods() {
    let api = api().await;
    api.get("/nope").await.err(404, 20404);
    let r = api.get(&format!("{P}/Maps/m/Items/a/b")).await;
    r.err(404, 20404);
    assert!(r.body["message"].as_str().unwrap().contains("%2F"));
    api.get("/v1/Services/other/Maps").await.err(404, 20404);
    api.call(Method::PUT, &format!("{P}/Maps"), None)
        .await
        .err(405, 20004);
    api.call(Method::DELETE, &format!("{P}/Maps/m/Items"), None)
        .await
        .err(405, 20004);
    api.call(Method::PUT, &format!("{P}/Maps/m/Items/k"), None)
        .await
        .err(405, 20004);
    api.call(Method::POST, "/v1/Node", None)
        .await
        .err(405, 20004);
    let r = api.get("/v1/Node").await;
    let n = r.ok(200);
    check_schema(n, &schema("NodeStatus"));
    assert_eq!(n["http_addr"], "127.0.0.1:7700");
    assert!(n["peer_id"].is_null());
    assert_eq!(n["listen_addrs"], json!([]));
    assert_eq!(n["connected_peers"], json!([]));
    assert_eq!(n["maps"], 0);
    assert!(n["writes_stopped"].is_null(), "writes work");
    assert_eq!(n["trust_all"], false);
    for f in [
        "trusted_peers",
        "untrusted_peers",
        "discovered_peers",
        "problems",
    ] {
        assert_eq!(n[f], json!([]), "{f}");
    }
    assert_eq!(n["refused_changes"], 0);
    api.get("/v1/Node/Compact").await.err(405, 20004);
    let r = api.post("/v1/Node/Compact", json!({})).await;
    let c = r.ok(200);
    check_schema(c, &schema("CompactionReport"));
    assert_eq!(c["file_bytes_before"], 0, "a node in memory has no file");
    assert!(
        ["done", "nothing"].contains(&c["file"].as_str().unwrap()),
        "{c}"
    );
    assert!(c["used_bytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_token_guards_every_route() {
    let node = Node::in_memory().await.unwrap();
    let app = router(
        node,
        ServerOptions::new(addr()).with_token(Some("s3cret".into())),
    );
    let mut api = Api { app, token: None };
    for uri in [
        "/v1/Node".to_string(),
        format!("{P}/Maps"),
        "/v1/openapi.json".into(),
        "/no/such/route".into(),
        format!("{P}/Maps/m/Events"),
    ] {
        let r = api.get(&uri).await;
        r.err(401, 20003);
        assert!(r.headers.contains_key(header::WWW_AUTHENTICATE));
    }
    api.post("/v1/Node/Compact", json!({}))
        .await
        .err(401, 20003);
    for uri in [
        "/v1/Node/Invites",
        "/v1/Node/Join",
        &format!("/v1/Node/Peers/{PEER}"),
    ] {
        api.post(uri, json!({})).await.err(401, 20003);
    }
    api.get("/v1/Node/Peers").await.err(401, 20003);
    api.call(Method::DELETE, &format!("/v1/Node/Peers/{PEER}"), None)
        .await
        .err(401, 20003);
    api.token = Some("wrong".into());
    api.get("/v1/Node").await.err(401, 20003);
    api.post("/v1/Node/Compact", json!({}))
        .await
        .err(401, 20003);
    api.token = Some("s3cret".into());
    api.get("/v1/Node").await.ok(200);
    api.get("/v1/Node/Peers").await.ok(200);
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "m"}))
        .await
        .ok(201);
    // the events route also takes ?access_token= (browsers cannot set headers there)
    api.token = None;
    let r = api
        .with_header(
            Method::GET,
            &format!("{P}/Maps/m/Events?access_token=s3cret"),
            ("accept", "application/json"),
            None,
        )
        .await;
    r.err(406, 20406); // past the token check
    api.get(&format!("{P}/Maps?access_token=s3cret"))
        .await
        .err(401, 20003);
}

#[tokio::test]
async fn openapi_document_matches_the_router() {
    let api = api().await;
    let r = api.get("/v1/openapi.json").await;
    let doc = r.ok(200).clone();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut declared = Vec::new();
    for (path, ops) in paths {
        for m in ["get", "post", "patch", "delete", "put"] {
            if ops.get(m).is_some() {
                declared.push(format!("{} {path}", m.to_uppercase()));
            }
        }
    }
    declared.sort();
    let mut expected = vec![
        "GET /v1/Node",
        "POST /v1/Node/Compact",
        "POST /v1/Node/Sync",
        "GET /v1/openapi.json",
        "GET /v1/Services/default/Maps",
        "POST /v1/Services/default/Maps",
        "GET /v1/Services/default/Maps/{map}",
        "POST /v1/Services/default/Maps/{map}",
        "DELETE /v1/Services/default/Maps/{map}",
        "GET /v1/Services/default/Maps/{map}/Items",
        "POST /v1/Services/default/Maps/{map}/Items",
        "GET /v1/Services/default/Maps/{map}/Items/{key}",
        "POST /v1/Services/default/Maps/{map}/Items/{key}",
        "PATCH /v1/Services/default/Maps/{map}/Items/{key}",
        "DELETE /v1/Services/default/Maps/{map}/Items/{key}",
        "GET /v1/Services/default/Maps/{map}/Items/{key}/Conflicts",
        "GET /v1/Services/default/Maps/{map}/Events",
        "POST /v1/Node/Invites",
        "POST /v1/Node/Join",
        "GET /v1/Services/default/Maps/{map}/Permissions",
        "GET /v1/Services/default/Maps/{map}/Permissions/{identity}",
        "POST /v1/Services/default/Maps/{map}/Permissions/{identity}",
        "DELETE /v1/Services/default/Maps/{map}/Permissions/{identity}",
        "GET /v1/Node/Peers",
        "POST /v1/Node/Peers/{peer_id}",
        "DELETE /v1/Node/Peers/{peer_id}",
    ];
    expected.sort();
    assert_eq!(declared, expected, "the issue's routes, all declared");
    // Every declared route is served (not 404/405), and every undeclared method on a declared
    // path is 405: the router has exactly the document's routes.
    for (path, ops) in paths {
        let concrete = path
            .replace("{map}", "nope")
            .replace("{key}", "k")
            .replace("{peer_id}", "not-a-peer")
            .replace("{identity}", "someone");
        for m in ["GET", "POST", "PATCH", "DELETE", "PUT"] {
            let r = api
                .with_header(
                    Method::from_bytes(m.as_bytes()).unwrap(),
                    &concrete,
                    ("accept", "application/json"),
                    None,
                )
                .await;
            if ops.get(m.to_lowercase()).is_some() {
                assert!(
                    !matches!(r.body["code"].as_u64(), Some(20404 | 20004)),
                    "{m} {path} is declared but not routed: {}",
                    r.body
                );
            } else {
                r.err(405, 20004);
            }
        }
    }
    // every operation documents its error answers with the error schema
    for (path, ops) in paths {
        for (m, op) in ops.as_object().unwrap() {
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') {
                    let s = &resp["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(s, "#/components/schemas/ErrorBody", "{m} {path} {status}");
                }
            }
        }
    }
}

/// Opens an SSE stream; the answer comes once the subscription is registered.
async fn open_sse(api: &Api, uri: &str, headers: &[(&str, &str)]) -> Body {
    let mut b = Request::builder()
        .uri(uri)
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = api
        .app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    resp.into_body()
}

/// Reads `n` SSE frames with data (comments and the id-only resume point skipped).
async fn read_sse(body: Body, n: usize) -> Vec<String> {
    read_frames(body, n, true).await
}

/// Reads `n` SSE frames (comments skipped; `data_only`: frames without data skipped too).
async fn read_frames(body: Body, n: usize, data_only: bool) -> Vec<String> {
    let mut body = body.into_data_stream();
    let mut text = String::new();
    let mut frames: Vec<String> = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while frames.len() < n {
            let chunk = body.next().await.expect("stream open").unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                if !frame.starts_with(':') && (!data_only || frame.contains("data:")) {
                    frames.push(frame);
                }
            }
        }
    })
    .await
    .expect("events within the deadline");
    frames
}

async fn sse_events(api: &Api, uri: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    read_sse(open_sse(api, uri, headers).await, n).await
}

fn sse_data(frame: &str) -> Value {
    let line = frame
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    serde_json::from_str(line).unwrap()
}

/// A live stream starts with its resume point (an id-only frame: the newest event), so a client
/// that reconnects before any event arrives resumes with `Last-Event-ID` and misses nothing.
#[tokio::test]
async fn sse_starts_with_its_resume_point() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "r"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/r/Items");
    for k in ["a", "b"] {
        api.post(&items, json!({"Key": k, "Data": {}}))
            .await
            .ok(201);
    }
    let ev = format!("{P}/Maps/r/Events");
    let first = read_frames(open_sse(&api, &ev, &[]).await, 1, false).await;
    assert_eq!(
        first[0], "id: 2\n\n",
        "the resume point is the newest event id"
    );
    // Written while that client was away: replayed after its resume point.
    api.post(&items, json!({"Key": "c", "Data": {}}))
        .await
        .ok(201);
    let frames = read_frames(
        open_sse(&api, &ev, &[("last-event-id", "2")]).await,
        2,
        false,
    )
    .await;
    assert_eq!(frames[0], "id: 2\n\n");
    let body = sse_data(&frames[1]);
    assert_eq!(
        (body["id"].as_u64(), body["item_key"].as_str()),
        (Some(3), Some("c"))
    );
    assert!(body["item_date_updated"].as_str().unwrap().ends_with('Z'));
    assert!(body["item_date_expires"].is_null());
    assert!(body["item_created_by"].is_string());
}

#[tokio::test]
async fn sse_replays_and_resumes() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "e"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/e/Items");
    api.post(&items, json!({"Key": "a", "Data": {"v": 1}}))
        .await
        .ok(201);
    api.call(
        Method::PATCH,
        &format!("{items}/a"),
        Some(json!({"Data": {"w": 2}})),
    )
    .await
    .ok(200);
    api.call(Method::DELETE, &format!("{items}/a"), None).await;
    let ev = format!("{P}/Maps/e/Events");
    let frames = sse_events(&api, &format!("{ev}?after=0"), &[], 3).await;
    let bodies: Vec<Value> = frames.iter().map(|f| sse_data(f)).collect();
    for (f, b) in frames.iter().zip(&bodies) {
        check_schema(b, &schema("EventBody"));
        assert!(f.contains(&format!("id: {}\n", b["id"])));
    }
    assert_eq!(bodies[0]["type"], "map_item_added");
    assert_eq!(bodies[0]["item_key"], "a");
    assert_eq!(bodies[0]["item_data"], json!({"v": 1}));
    assert!(bodies[0]["previous_item_data"].is_null());
    assert_eq!(bodies[0]["is_local"], true);
    assert_eq!(bodies[1]["type"], "map_item_updated");
    assert_eq!(bodies[1]["previous_item_data"], json!({"v": 1}));
    assert_eq!(bodies[1]["item_revision"].as_str().unwrap().len(), 16);
    assert_eq!(bodies[2]["type"], "map_item_removed");
    assert!(bodies[2]["item_data"].is_null());
    // resume after the first: Last-Event-ID wins over ?after
    let first = bodies[0]["id"].to_string();
    let frames = sse_events(
        &api,
        &format!("{ev}?after=0"),
        &[("last-event-id", &first)],
        2,
    )
    .await;
    assert_eq!(sse_data(&frames[0])["id"], bodies[1]["id"]);
    // live: a stream without a resume point starts with the next change
    let live = open_sse(&api, &ev, &[]).await;
    api.post(&items, json!({"Key": "live", "Data": {}}))
        .await
        .ok(201);
    let frames = read_sse(live, 1).await;
    assert_eq!(sse_data(&frames[0])["item_key"], "live");
    assert_eq!(sse_data(&frames[0])["type"], "map_item_added");
    // bad resume points and a non-event Accept
    api.get(&format!("{ev}?after=x")).await.err(400, 20001);
    api.with_header(Method::GET, &ev, ("last-event-id", "-3"), None)
        .await
        .err(400, 20001);
    api.with_header(Method::GET, &ev, ("accept", "application/json"), None)
        .await
        .err(406, 20406);
    api.get(&format!("{P}/Maps/nope/Events"))
        .await
        .err(404, 54200);
    api.get(&format!("{ev}?from=1")).await.err(400, 20001);
}

#[tokio::test]
async fn resuming_past_retention_is_410() {
    let node = Node::builder()
        .in_memory()
        .event_retention(5)
        .open()
        .await
        .unwrap();
    let api = Api {
        app: router(node, ServerOptions::new(addr())),
        token: None,
    };
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "r"}))
        .await
        .ok(201);
    // The store prunes every 1,024 events.
    for i in 0..1100 {
        api.post(
            &format!("{P}/Maps/r/Items"),
            json!({"Key": format!("k{i}"), "Data": {}}),
        )
        .await
        .ok(201);
    }
    api.get(&format!("{P}/Maps/r/Events?after=1"))
        .await
        .err(410, 20410);
}

#[tokio::test]
async fn subscribers_see_the_map_removed() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "gone"}))
        .await
        .ok(201);
    // The answer comes once the subscription is registered: what follows is seen.
    let req = Request::builder()
        .uri(format!("{P}/Maps/gone/Events"))
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    api.post(
        &format!("{P}/Maps/gone/Items"),
        json!({"Key": "a", "Data": {}}),
    )
    .await
    .ok(201);
    let r = api
        .call(Method::DELETE, &format!("{P}/Maps/gone"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let mut body = resp.into_body().into_data_stream();
    let mut text = String::new();
    let types = tokio::time::timeout(DEADLINE, async {
        loop {
            let chunk = body.next().await.expect("stream open").unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            let types: Vec<String> = text
                .split("\n\n")
                .filter(|f| f.contains("data: "))
                .map(|f| sse_data(f)["type"].as_str().unwrap().to_string())
                .collect();
            if types.len() >= 2 && text.ends_with("\n\n") {
                break types;
            }
        }
    })
    .await
    .expect("events within the deadline");
    assert_eq!(types, ["map_item_added", "map_removed"]);
}

/// Hostile input on every declared route: garbage bodies, content types, path segments and
/// headers. Whatever it is, the answer is a typed error (or a success), never a 500.
#[tokio::test]
async fn garbage_is_never_a_server_error() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "g"}))
        .await
        .ok(201);
    api.post(
        &format!("{P}/Maps/g/Items"),
        json!({"Key": "k", "Data": {}}),
    )
    .await
    .ok(201);
    // A small deterministic generator: the same garbage on every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    };
    let mut bodies: Vec<Vec<u8>> = [
        "",
        "{",
        "[]",
        "null",
        "\"x\"",
        "{\"Data\":\"x\"}",
        "{\"Data\":{\"a\":1e999}}",
        "{\"Ttl\":99999999999999999999}",
        "{\"Key\":\"\\u0000\",\"Data\":{}}",
        "Data=%ZZ&Key=",
        "Key=k&Key=j",
        "Data=%7B%7D&Ttl=1e3",
        "{\"UniqueName\":null}",
        "\u{feff}{}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for len in [1, 7, 64, 1000] {
        bodies.push(noise(len));
    }
    let paths = [
        format!("{P}/Maps"),
        format!("{P}/Maps/g"),
        format!("{P}/Maps/%FF"),
        format!("{P}/Maps/%"),
        format!("{P}/Maps/g/Items"),
        format!("{P}/Maps/g/Items/k"),
        format!("{P}/Maps/g/Items/%00"),
        format!("{P}/Maps/g/Items/%C0%AF"),
        format!("{P}/Maps/g/Items/a%2F..%2F..%2Fetc"),
        format!("{P}/Maps/g/Items?PageSize=%FF&Order=%00"),
        format!("{P}/Maps/g/Events?after=99999999999999999999999"),
        "/v1/Node".to_string(),
        "/v1/Node/Invites".to_string(),
        "/v1/Node/Join".to_string(),
        "/v1/Node/Peers".to_string(),
        "/v1/Node/Peers/%FF%00".to_string(),
    ];
    let ctypes = [
        Some("application/json"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("\u{7f}"),
        None,
    ];
    let mut checked = 0;
    for path in &paths {
        for m in [Method::GET, Method::POST, Method::PATCH, Method::DELETE] {
            if m == Method::DELETE && path.ends_with("/Maps/g") {
                continue; // keeps the map, so later paths reach the item handlers
            }
            for body in &bodies {
                for ct in ctypes {
                    let mut b = Request::builder()
                        .method(m.clone())
                        .uri(path.as_str())
                        .header("if-match", "\"garbage\"")
                        .header("accept", "application/json");
                    if let Some(ct) = ct {
                        if let Ok(v) = axum::http::HeaderValue::from_bytes(ct.as_bytes()) {
                            b = b.header(header::CONTENT_TYPE, v);
                        }
                    }
                    let r = api.send(b.body(Body::from(body.clone())).unwrap()).await;
                    assert!(
                        r.status.as_u16() < 500,
                        "{m} {path} {ct:?} {:?} -> {} {}",
                        String::from_utf8_lossy(body),
                        r.status,
                        r.body
                    );
                    if !r.status.is_success() {
                        assert!(
                            r.body["code"].is_u64(),
                            "{m} {path}: untyped error {}",
                            r.body
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 5000);
    api.get(&format!("{P}/Maps/g/Items/k")).await.ok(200);
}

// ---------------------------------------------------------------- review findings

/// A unique name that was fetched (so its handle is cached), deleted and created again
/// still resolves to the removed map.
#[tokio::test]
async fn a_recreated_name_is_reachable() {
    let api = api().await;
    let r = api
        .post(&format!("{P}/Maps"), json!({"UniqueName": "c"}))
        .await;
    let old = r.ok(201)["sid"].clone();
    api.get(&format!("{P}/Maps/c")).await.ok(200); // caches "c" -> old sid
    assert_eq!(
        api.call(Method::DELETE, &format!("{P}/Maps/c"), None)
            .await
            .status,
        204
    );
    let r = api
        .post(&format!("{P}/Maps"), json!({"UniqueName": "c"}))
        .await;
    let new = r.ok(201)["sid"].clone();
    eprintln!("old {old} new {new}");
    let r = api.get(&format!("{P}/Maps/c")).await;
    assert_eq!(r.ok(200)["sid"], new, "GET /Maps/c after re-create");
    api.post(
        &format!("{P}/Maps/c/Items"),
        json!({"Key": "k", "Data": {}}),
    )
    .await
    .ok(201);
}

/// Following next_page_url of a descending listing: that page's first_page_url must still
/// be the descending listing.
#[tokio::test]
async fn first_page_url_keeps_order_and_from() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "o"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/o/Items");
    for k in ["a", "b", "c", "d"] {
        api.post(&items, json!({"Key": k, "Data": {}}))
            .await
            .ok(201);
    }
    let strip = |u: &str| u.trim_start_matches("http://127.0.0.1:7700").to_string();
    let r = api
        .get(&format!("{items}?Order=desc&From=c&PageSize=1"))
        .await;
    assert_eq!(r.ok(200)["items"][0]["key"], "c");
    let next = strip(r.body["meta"]["next_page_url"].as_str().unwrap());
    let r2 = api.get(&next).await;
    assert_eq!(r2.ok(200)["items"][0]["key"], "b");
    let first = strip(r2.body["meta"]["first_page_url"].as_str().unwrap());
    let r3 = api.get(&first).await;
    assert_eq!(
        r3.ok(200)["items"][0]["key"],
        "c",
        "first_page_url of page 2 is {first}"
    );
}

/// Resuming with an id this node never issued (another node's id, a wiped data dir, a map
/// re-created under the same name) silently drops every later event.
#[tokio::test]
async fn resuming_after_an_unknown_id_is_not_silent() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "f"}))
        .await
        .ok(201);
    let ev = format!("{P}/Maps/f/Events");
    let req = Request::builder()
        .uri(format!("{ev}?after=1000"))
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    // Event ids are per node: an id this node never issued is refused like a pruned one
    // (the client re-reads the map), instead of silently skipping every event up to it.
    assert_eq!(resp.status(), StatusCode::GONE);
}

/// `If-Match: *` and lists of entity tags (RFC 9110): any current revision, or any listed one.
#[tokio::test]
async fn if_match_star_and_lists() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "i"}))
        .await
        .ok(201);
    let it = format!("{P}/Maps/i/Items/k");
    // On a missing item, `*` matches nothing.
    let r = api
        .with_header(
            Method::POST,
            &it,
            ("if-match", "*"),
            Some(json!({"Data": {"a": 1}})),
        )
        .await;
    assert_eq!(r.status, 412, "{}", r.body);
    api.call(Method::POST, &it, Some(json!({"Data": {"a": 0}})))
        .await
        .ok(200);
    let r = api
        .with_header(
            Method::POST,
            &it,
            ("if-match", "*"),
            Some(json!({"Data": {"a": 2}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let etag = api.get(&it).await.headers[header::ETAG]
        .to_str()
        .unwrap()
        .to_string();
    let r = api
        .with_header(
            Method::PATCH,
            &it,
            ("if-match", &format!("\"zzz\", {etag}")),
            Some(json!({"Data": {"b": 3}})),
        )
        .await;
    assert_eq!(r.status, 200, "a list holding the current tag: {}", r.body);
    let r = api
        .with_header(Method::DELETE, &it, ("if-match", "\"x\", \"y\""), None)
        .await;
    assert_eq!(r.status, 412, "a list without it: {}", r.body);
    let r = api
        .with_header(Method::DELETE, &it, ("if-match", "*"), None)
        .await;
    assert_eq!(r.status, 204);
}

/// Events of a removed map: 404/54200, not an idle stream that never ends.
#[tokio::test]
async fn events_of_a_removed_map_are_404() {
    let api = api().await;
    let r = api
        .post(&format!("{P}/Maps"), json!({"UniqueName": "rm"}))
        .await;
    let sid = r.ok(201)["sid"].as_str().unwrap().to_string();
    api.get(&format!("{P}/Maps/{sid}")).await.ok(200); // caches the sid
    assert_eq!(
        api.call(Method::DELETE, &format!("{P}/Maps/{sid}"), None)
            .await
            .status,
        204
    );
    api.get(&format!("{P}/Maps/{sid}")).await.err(404, 54200);
    let req = Request::builder()
        .uri(format!("{P}/Maps/{sid}/Events"))
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "events of a removed map"
    );
}

/// A raw GET: status, headers and body text.
async fn raw_get(app: &Router, uri: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let mut b = Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn the_client_and_the_inspector_are_served() {
    let node = Node::in_memory().await.unwrap();
    let app = router(node, ServerOptions::new(addr()));
    for (uri, ty, needle) in [
        (
            "/sdk/syncmesh.js",
            "text/javascript",
            "export class SyncClient",
        ),
        (
            "/sdk/syncmesh.d.ts",
            "application/typescript",
            "export declare class SyncMap",
        ),
        ("/ui/inspector.js", "text/javascript", "SyncClient"),
        ("/ui/inspector.css", "text/css", "{"),
        (
            "/",
            "text/html",
            "<meta name=\"syncmesh-token\" content=\"\">",
        ),
    ] {
        let (status, headers, body) = raw_get(&app, uri, &[]).await;
        assert_eq!(status, 200, "{uri}");
        let ct = headers[header::CONTENT_TYPE].to_str().unwrap();
        assert!(ct.starts_with(ty), "{uri}: {ct}");
        assert!(body.contains(needle), "{uri} lacks {needle:?}");
    }
}

#[tokio::test]
async fn the_inspector_is_behind_the_token_and_its_cookie_never_reveals_the_token() {
    let node = Node::in_memory().await.unwrap();
    let app = router(
        node,
        ServerOptions::new(addr()).with_token(Some("s3<c>\"t".into())),
    );
    // Code is public (it holds no data); the page is not.
    assert_eq!(raw_get(&app, "/sdk/syncmesh.js", &[]).await.0, 200);
    let (status, _, body) = raw_get(&app, "/", &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("name=\"access_token\""), "a login form");
    assert!(!body.contains("s3<c>"));
    let (status, _, body) = raw_get(&app, "/?access_token=wrong", &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("not the token of this node"));
    // The right token in the query: a cookie, and the token leaves the address bar.
    let (status, headers, _) = raw_get(&app, "/?access_token=s3%3Cc%3E%22t", &[]).await;
    assert_eq!(status, 303);
    // The page gets its key once, in the fragment (never sent to a server).
    let location = headers[header::LOCATION].to_str().unwrap().to_string();
    let key = location
        .strip_prefix("/#k=")
        .unwrap_or_else(|| panic!("{location}"))
        .to_string();
    assert!(key.starts_with("page."), "{key}");
    let cookie = headers[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let pair = cookie.split(';').next().unwrap().to_string();
    // Named after the node's port (browsers share a host's cookies across ports), and not the
    // token itself (other services on the host receive it).
    assert!(
        pair.starts_with(&format!("syncmesh_page_{}=", addr().port())),
        "{pair}"
    );
    assert!(!pair.contains("s3") && !pair.contains("%3C"), "{pair}");
    let other_port = pair.replacen("syncmesh_page_", "syncmesh_page_1", 1);
    assert_eq!(raw_get(&app, "/", &[("cookie", &other_port)]).await.0, 401);
    let flipped = if pair.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{flipped}", &pair[..pair.len() - 1]);
    assert_eq!(raw_get(&app, "/", &[("cookie", &tampered)]).await.0, 401);
    let (status, headers, body) = raw_get(&app, "/", &[("cookie", &pair)]).await;
    assert_eq!(status, 200);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    // The page holds a page key for its client, never the token (whoever holds only the
    // cookie, e.g. another service on this host, must not learn it).
    assert!(
        !body.contains("s3&lt;c&gt;") && !body.contains("s3<c>"),
        "{body}"
    );
    assert!(
        !body.contains("page."),
        "no page key for the cookie alone: {body}"
    );
    let bearer = "Bearer s3<c>\"t";
    let (status, headers, body) = raw_get(&app, "/", &[("authorization", bearer)]).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key(header::SET_COOKIE));
    assert!(!body.contains("s3&lt;c&gt;"));
    // The cookie alone never opens the API; nor does the key alone (a page elsewhere could
    // not read it, but a log could): together they do.
    let (status, _, _) = raw_get(&app, "/v1/Node", &[("cookie", &pair)]).await;
    assert_eq!(status, 401);
    let with_key = format!("Bearer {key}");
    let (status, _, _) = raw_get(&app, "/v1/Node", &[("authorization", &with_key)]).await;
    assert_eq!(status, 401);
    let (status, _, _) = raw_get(
        &app,
        "/v1/Node",
        &[("authorization", &with_key), ("cookie", &pair)],
    )
    .await;
    assert_eq!(status, 200);
    // Another session's key does not go with this cookie.
    let (_, headers, _) = raw_get(&app, "/?access_token=s3%3Cc%3E%22t", &[]).await;
    assert_ne!(headers[header::LOCATION].to_str().unwrap(), location);
    let other = headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(other, pair);
    let (status, _, _) = raw_get(
        &app,
        "/v1/Node",
        &[("authorization", &with_key), ("cookie", &other)],
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn cors_only_for_the_origins_given() {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(format!("{P}/Maps/m/Items/k"))
            .header("origin", origin)
            .header("access-control-request-method", "PATCH")
            .header(
                "access-control-request-headers",
                "authorization,content-type,if-match",
            )
            .body(Body::empty())
            .unwrap()
    };
    let allowed = "http://localhost:5173";
    let node = Node::in_memory().await.unwrap();
    let app = router(
        node,
        ServerOptions::new(addr())
            .with_token(Some("t".into()))
            .with_cors_origins(vec![allowed.into()]),
    );
    // A preflight carries no token and is answered anyway.
    let r = app.clone().oneshot(preflight(allowed)).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], allowed);
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("PATCH"), "{methods}");
    let r = app
        .clone()
        .oneshot(preflight("http://evil.example"))
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // A refusal carries the headers too, so the page can read why.
    let (status, headers, _) = raw_get(&app, "/v1/Node", &[("origin", allowed)]).await;
    assert_eq!(status, 401);
    assert_eq!(headers["access-control-allow-origin"], allowed);
    let (status, headers, _) = raw_get(
        &app,
        "/v1/Node",
        &[("origin", allowed), ("authorization", "Bearer t")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], allowed);
    // Without origins configured: no CORS at all.
    let plain = router(Node::in_memory().await.unwrap(), ServerOptions::new(addr()));
    let (_, headers, _) = raw_get(&plain, "/v1/Node", &[("origin", allowed)]).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn the_login_form_posts_the_token_so_it_stays_out_of_urls() {
    let node = Node::in_memory().await.unwrap();
    let app = router(
        node,
        ServerOptions::new(addr()).with_token(Some("s3cret".into())),
    );
    // A GET form would put the token in the address, the browser's history and any log of
    // URLs; the page that asks for it must not leak it through the Referer either.
    let (status, headers, body) = raw_get(&app, "/", &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("method=\"post\""), "{body}");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    let post = |form: &'static str| {
        app.clone().oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(form))
                .unwrap(),
        )
    };
    let resp = post("access_token=s3cret").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers()[header::LOCATION].to_str().unwrap();
    assert!(location.starts_with("/#k=page."), "{location}");
    let cookie = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    let pair = cookie.split(';').next().unwrap().to_string();
    assert_eq!(raw_get(&app, "/", &[("cookie", &pair)]).await.0, 200);
    let resp = post("access_token=wrong").await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    // Nothing else is written through `/`.
    let resp = post("").await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------- trust

/// A well-formed peer id of no node here.
const PEER: &str = "12D3KooWKE37TxS1GdywN2zLCpd5vL7nizkSyqD2F3JBrkLVueGe";

/// A node on the network (loopback, a free port, no mDNS), and its API.
async fn networked() -> (Api, Node) {
    let node = Node::builder()
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .open()
        .await
        .unwrap();
    let api = Api {
        app: router(node.clone(), ServerOptions::new(addr())),
        token: None,
    };
    (api, node)
}

fn peer_id_of(node: &Node) -> String {
    node.network()
        .expect("a networked node")
        .peer_id
        .to_string()
}

/// Polls `f` until it holds, failing after the deadline.
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn trust_routes_without_a_network() {
    let api = api().await;
    // Inviting and joining need a network; a malformed ticket is refused before that.
    api.post("/v1/Node/Invites", json!({}))
        .await
        .err(409, 20306);
    let r = api
        .post("/v1/Node/Join", json!({"Ticket": "smt1notaticket"}))
        .await;
    r.err(400, 20301);
    assert!(r.body["message"].as_str().unwrap().contains("ticket"));
    api.post("/v1/Node/Join", json!({"Ticket": "hello"}))
        .await
        .err(400, 20301);
    api.post("/v1/Node/Join", json!({})).await.err(400, 20001);
    api.post("/v1/Node/Join", json!({"Ticket": "  "}))
        .await
        .err(400, 20001);
    api.post("/v1/Node/Join", json!({"Tickets": "x"}))
        .await
        .err(400, 20001);
    // The peer list.
    let r = api.get("/v1/Node/Peers").await;
    let p = r.ok(200);
    check_schema(p, &schema("PeersResource"));
    assert_eq!(p["trusts_everyone"], false);
    assert_eq!(p["trusted_peers"], json!([]));
    // Trust by id: 201 the first time, 200 after; stored with the addresses given.
    api.post("/v1/Node/Peers/not-a-peer", json!({}))
        .await
        .err(400, 20304);
    api.call(Method::DELETE, "/v1/Node/Peers/not-a-peer", None)
        .await
        .err(400, 20304);
    api.call(Method::DELETE, &format!("/v1/Node/Peers/{PEER}"), None)
        .await
        .err(404, 20305);
    api.post(&format!("/v1/Node/Peers/{PEER}"), json!({"Addr": "tcp:1"}))
        .await
        .err(400, 20001);
    api.post(&format!("/v1/Node/Peers/{PEER}"), json!({"Addr": 7}))
        .await
        .err(400, 20001);
    let r = api
        .call(Method::POST, &format!("/v1/Node/Peers/{PEER}"), None)
        .await;
    let t = r.ok(201).clone();
    check_schema(&t, &schema("TrustedPeerResource"));
    assert_eq!(t["peer_id"], PEER);
    assert_eq!(t["source"], "manual");
    assert!(t["maps"].is_null(), "every map");
    assert_eq!(t["write"], true);
    assert_eq!(t["connected"], false);
    assert!(t["since"].is_string());
    let r = api
        .raw(
            Method::POST,
            &format!("/v1/Node/Peers/{PEER}"),
            "application/x-www-form-urlencoded",
            "Addr=%2Fip4%2F192.0.2.7%2Ftcp%2F7701&Addr=%2Fip4%2F192.0.2.8%2Ftcp%2F7701",
        )
        .await;
    let t = r.ok(200);
    assert_eq!(
        t["addrs"],
        json!(["/ip4/192.0.2.7/tcp/7701", "/ip4/192.0.2.8/tcp/7701"])
    );
    let n = api.get("/v1/Node").await;
    let n = n.ok(200);
    check_schema(n, &schema("NodeStatus"));
    assert_eq!(n["trusted_peers"][0]["peer_id"], PEER);
    let r = api
        .call(Method::DELETE, &format!("/v1/Node/Peers/{PEER}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    api.call(Method::DELETE, &format!("/v1/Node/Peers/{PEER}"), None)
        .await
        .err(404, 20305);
    assert_eq!(
        api.get("/v1/Node/Peers").await.body["trusted_peers"],
        json!([])
    );
}

#[tokio::test]
async fn invitations_and_their_parameters() {
    let (api, node) = networked().await;
    let me = peer_id_of(&node);
    let before = time_now_ms();
    let r = api.post("/v1/Node/Invites", json!({})).await;
    let inv = r.ok(201).clone();
    check_schema(&inv, &schema("InviteResource"));
    assert!(inv["ticket"].as_str().unwrap().starts_with("smt1"), "{inv}");
    assert!(inv["maps"].is_null(), "every map");
    assert_eq!(inv["write"], true);
    assert_eq!(inv["uses"], 1);
    // Expires in the default 10 minutes, in this API's date format.
    let expires = parse_date(inv["expires"].as_str().unwrap());
    assert!(
        (before + 599_000..=time_now_ms() + 601_000).contains(&expires),
        "{inv}"
    );
    // Scoped, as JSON and as a form with the parameter repeated.
    let r = api
        .post(
            "/v1/Node/Invites",
            json!({"Maps": ["users", "orders"], "Write": false, "Ttl": 60, "Uses": 3}),
        )
        .await;
    let inv = r.ok(201);
    let mut sids = vec![
        syncmesh::MapSid::for_name("users").to_string(),
        syncmesh::MapSid::for_name("orders").to_string(),
    ];
    sids.sort();
    assert_eq!(inv["maps"], json!(sids));
    assert_eq!(
        (inv["write"].clone(), inv["uses"].clone()),
        (json!(false), json!(3))
    );
    let r = api
        .raw(
            Method::POST,
            "/v1/Node/Invites",
            "application/x-www-form-urlencoded",
            "Maps=users&Maps=orders&Write=false&Ttl=3600&Uses=2",
        )
        .await;
    let inv = r.ok(201);
    assert_eq!(inv["maps"], json!(sids));
    assert_eq!(
        (inv["write"].clone(), inv["uses"].clone()),
        (json!(false), json!(2))
    );
    let r = api.post("/v1/Node/Invites", json!({"Maps": "users"})).await;
    assert_eq!(r.ok(201)["maps"].as_array().unwrap().len(), 1);
    // Bad parameters are 400s that say what is wrong.
    for bad in [
        json!({"Ttl": 0}),
        json!({"Ttl": -5}),
        json!({"Ttl": "soon"}),
        json!({"Ttl": 31_536_001}),
        json!({"Uses": 0}),
        json!({"Uses": 1.5}),
        json!({"Uses": 4_294_967_296_u64}),
        json!({"Write": "maybe"}),
        json!({"Write": 1}),
        json!({"Maps": [1]}),
        json!({"Maps": {"a": 1}}),
        json!({"Maps": [""]}),
        json!({"Nope": true}),
    ] {
        let r = api.post("/v1/Node/Invites", bad.clone()).await;
        r.err(400, 20001);
        assert!(!r.body["message"].as_str().unwrap().is_empty(), "{bad}");
    }
    // A node's own ticket is for someone else.
    let own = api.post("/v1/Node/Invites", json!({})).await.body["ticket"].clone();
    api.post("/v1/Node/Join", json!({"Ticket": own}))
        .await
        .err(400, 20307);
    assert_eq!(node.network().unwrap().peer_id.to_string(), me);
}

/// Milliseconds since the epoch, now.
fn time_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Milliseconds since the epoch of one of this API's dates (`2026-01-02T03:04:05.678Z`).
fn parse_date(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
    assert!(s.ends_with('Z') && s.len() == 24, "{s}");
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[tokio::test]
async fn writes_choose_their_durability_and_a_barrier_makes_them_durable() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let api = Api {
        app: router(node.clone(), ServerOptions::new(addr())),
        token: None,
    };
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "d"}))
        .await
        .ok(201);
    let with = |value: &str, method: Method, uri: String, body: Value| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Syncmesh-Durability", value)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let items = format!("{P}/Maps/d/Items");
    let r = api
        .send(with(
            "relaxed",
            Method::POST,
            items.clone(),
            json!({"Key": "a", "Data": {"n": 1}}),
        ))
        .await;
    r.ok(201);
    let r = api
        .send(with(
            "RELAXED",
            Method::POST,
            format!("{items}/a"),
            json!({"Data": {"n": 2}}),
        ))
        .await;
    r.ok(200);
    let r = api
        .send(with(
            "fsync",
            Method::PATCH,
            format!("{items}/b"),
            json!({"Data": {"n": 3}}),
        ))
        .await;
    r.ok(200);
    api.send(with(
        "sometimes",
        Method::POST,
        format!("{items}/c"),
        json!({"Data": {"n": 4}}),
    ))
    .await
    .err(400, 20001);
    assert_eq!(
        api.get(&format!("{items}/c")).await.status,
        404,
        "refused, not written"
    );
    api.get("/v1/Node/Sync").await.err(405, 20004);
    // Like every route that changes something: not from another site's page.
    let cross = [
        ("origin", "http://evil.example"),
        ("host", "127.0.0.1:7700"),
    ];
    let (status, _) = status_of(&api.app, form_post("/v1/Node/Sync", &cross, "")).await;
    assert_eq!(status, 403);
    let r = api.post("/v1/Node/Sync", json!({})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(api.get(&format!("{items}/a")).await.ok(200)["data"]["n"], 2);
    drop(api);
    node.close().await.unwrap();
    let node = Node::open(dir.path()).await.unwrap();
    let m = node.open_existing("d").await.unwrap();
    assert_eq!(m.get("a").await.unwrap().data["n"], 2);
    assert_eq!(m.get("b").await.unwrap().data["n"], 3);
    node.close().await.unwrap();
}

#[tokio::test]
async fn two_nodes_join_through_the_api_and_replicate() {
    let (a, node_a) = networked().await;
    let (b, node_b) = networked().await;
    let (id_a, id_b) = (peer_id_of(&node_a), peer_id_of(&node_b));
    let ticket = a.post("/v1/Node/Invites", json!({})).await.ok(201)["ticket"].clone();
    // B joins A: the answer is A, now trusted by B.
    let r = b.post("/v1/Node/Join", json!({"Ticket": ticket})).await;
    let joined = r.ok(201).clone();
    check_schema(&joined, &schema("TrustedPeerResource"));
    assert_eq!(joined["peer_id"], id_a.as_str());
    assert_eq!(joined["source"], "joined");
    assert!(joined["maps"].is_null());
    assert_eq!(joined["write"], true);
    assert!(!joined["addrs"].as_array().unwrap().is_empty(), "{joined}");
    // A trusts B (invited); both see each other connected.
    let r = a.get("/v1/Node/Peers").await;
    let peers = r.ok(200).clone();
    check_schema(&peers, &schema("PeersResource"));
    let on_a = &peers["trusted_peers"][0];
    assert_eq!(on_a["peer_id"], id_b.as_str());
    assert_eq!(on_a["source"], "invited");
    for (api, other) in [(&a, &id_b), (&b, &id_a)] {
        wait_until("the two nodes connected", || async {
            let n = api.get("/v1/Node").await;
            n.body["connected_peers"] == json!([other])
        })
        .await;
    }
    let n = a.get("/v1/Node").await;
    check_schema(n.ok(200), &schema("NodeStatus"));
    assert_eq!(n.body["trusted_peers"][0]["connected"], true);
    // A map written on A reaches B, and B's write reaches A.
    a.post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await
        .ok(201);
    a.post(
        &format!("{P}/Maps/users/Items"),
        json!({"Key": "david", "Data": {"country": "UK"}}),
    )
    .await
    .ok(201);
    let r = b
        .post(&format!("{P}/Maps"), json!({"UniqueName": "users"}))
        .await;
    assert!(matches!(r.status.as_u16(), 201 | 409), "{}", r.body);
    wait_until("A's item on B", || async {
        b.get(&format!("{P}/Maps/users/Items/david")).await.status == StatusCode::OK
    })
    .await;
    b.post(
        &format!("{P}/Maps/users/Items"),
        json!({"Key": "eve", "Data": {"country": "FR"}}),
    )
    .await
    .ok(201);
    wait_until("B's item on A", || async {
        a.get(&format!("{P}/Maps/users/Items/eve")).await.status == StatusCode::OK
    })
    .await;
    // The ticket had one use: a third node is refused, with the inviter's reason.
    let (c, _node_c) = networked().await;
    let r = c.post("/v1/Node/Join", json!({"Ticket": ticket})).await;
    r.err(403, 20302);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown invitation"),
        "{}",
        r.body
    );
    // Untrusting B on A: gone from A's list at once.
    let r = a
        .call(Method::DELETE, &format!("/v1/Node/Peers/{id_b}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let n = a.get("/v1/Node").await;
    assert_eq!(n.body["trusted_peers"], json!([]), "{}", n.body);
    assert!(!n.body["connected_peers"]
        .as_array()
        .unwrap()
        .contains(&json!(id_b)));
}

#[tokio::test]
async fn joining_an_inviter_that_is_gone_is_504() {
    let (a, node_a) = networked().await;
    let (b, _node_b) = networked().await;
    let ticket = a.post("/v1/Node/Invites", json!({})).await.ok(201)["ticket"].clone();
    drop(a);
    node_a.close().await.unwrap();
    let r = b.post("/v1/Node/Join", json!({"Ticket": ticket})).await;
    r.err(504, 20303);
}

// ---------------------------------------------------------------- permissions

#[tokio::test]
async fn map_permissions_in_the_sync_maps_shape() {
    let (api, node) = networked().await;
    let me = peer_id_of(&node);
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "team"}))
        .await
        .ok(201);
    let perms = format!("{P}/Maps/team/Permissions");
    // No entries: shared with every trusted peer.
    let r = api.get(&perms).await;
    let list = r.ok(200);
    check_schema(list, &schema("PermissionList"));
    assert_eq!(list["permissions"], json!([]));
    assert_eq!(list["meta"]["key"], "permissions");
    // The first entry (form-encoded, as the hosted API) also makes this node a manager.
    let r = api
        .form(
            &format!("{perms}/{PEER}"),
            "Read=true&Write=false&Manage=false",
        )
        .await;
    let p = r.ok(200);
    check_schema(p, &schema("PermissionResource"));
    assert_eq!(
        (
            p["identity"].as_str(),
            p["read"].as_bool(),
            p["write"].as_bool(),
            p["manage"].as_bool()
        ),
        (Some(PEER), Some(true), Some(false), Some(false))
    );
    let r = api.get(&format!("{perms}/{me}")).await;
    let mine = r.ok(200);
    assert_eq!(mine["manage"], true, "{mine}");
    let r = api.get(&perms).await;
    assert_eq!(r.ok(200)["permissions"].as_array().unwrap().len(), 2);
    // JSON works too; all three flags are required, and must be booleans.
    api.post(
        &format!("{perms}/{PEER}"),
        json!({"Read": true, "Write": true, "Manage": false}),
    )
    .await
    .ok(200);
    api.post(&format!("{perms}/{PEER}"), json!({"Read": true}))
        .await
        .err(400, 20001);
    api.form(
        &format!("{perms}/{PEER}"),
        "Read=yes&Write=true&Manage=false",
    )
    .await
    .err(400, 20001);
    api.post(
        &format!("{perms}/not%20an%20id"),
        json!({"Read": true, "Write": true, "Manage": true}),
    )
    .await
    .err(400, 20001);
    // Unknown entries and maps.
    api.get(&format!("{perms}/nobody")).await.err(404, 20404);
    api.call(Method::DELETE, &format!("{perms}/nobody"), None)
        .await
        .err(404, 20404);
    api.get(&format!("{P}/Maps/nope/Permissions"))
        .await
        .err(404, 54200);
    // Removing an entry; removing this node's own manager entry leaves the other, which now
    // lacks Manage, so this node may no longer change them (403).
    let r = api
        .call(Method::DELETE, &format!("{perms}/{me}"), None)
        .await;
    assert_eq!(r.status.as_u16(), 204);
    let r = api
        .post(
            &format!("{perms}/{PEER}"),
            json!({"Read": true, "Write": true, "Manage": true}),
        )
        .await;
    r.err(403, 20403);
    assert_eq!(
        node.map("team")
            .await
            .unwrap()
            .permissions()
            .await
            .unwrap()
            .len(),
        1
    );
    node.close().await.unwrap();
}

#[tokio::test]
async fn map_permissions_need_a_network() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "solo"}))
        .await
        .ok(201);
    let perms = format!("{P}/Maps/solo/Permissions");
    api.get(&perms).await.ok(200);
    api.post(
        &format!("{perms}/{PEER}"),
        json!({"Read": true, "Write": true, "Manage": false}),
    )
    .await
    .err(409, 20306);
}

async fn status_of(app: &Router, req: Request<Body>) -> (u16, Value) {
    let r = tokio::time::timeout(DEADLINE, app.clone().oneshot(req))
        .await
        .expect("an answer within the deadline")
        .unwrap();
    let status = r.status().as_u16();
    let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn form_post(uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test]
async fn a_page_of_another_site_cannot_change_a_node_or_follow_its_events() {
    let node = Node::in_memory().await.unwrap();
    let app = router(node.clone(), ServerOptions::new(addr()));
    let maps = format!("{P}/Maps");
    // A form on another site posts to the node: refused, nothing created.
    for headers in [
        vec![
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:7700"),
        ],
        vec![("sec-fetch-site", "cross-site"), ("host", "127.0.0.1:7700")],
        vec![
            ("sec-fetch-site", "same-site"),
            ("origin", "http://app.localhost:7700"),
        ],
        vec![("origin", "null")],
    ] {
        let (status, body) = status_of(&app, form_post(&maps, &headers, "UniqueName=x")).await;
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert_eq!(body["code"], 20403);
        assert_eq!(body["more_info"], "docs/http-api.md#errors");
    }
    assert!(node.maps().await.unwrap().is_empty(), "nothing was created");
    // An event WebSocket opened by another site's page: refused (no CORS rule guards it).
    let ws = Request::builder()
        .uri(format!("{P}/Maps/m/Events"))
        .header("origin", "http://evil.example")
        .header("host", "127.0.0.1:7700")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Body::empty())
        .unwrap();
    assert_eq!(status_of(&app, ws).await.0, 403);
    // The node's own pages, what a user types, and clients that are not browsers pass.
    for (i, headers) in [
        vec![
            ("origin", "http://127.0.0.1:7700"),
            ("host", "127.0.0.1:7700"),
        ],
        vec![
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:7700"),
        ],
        vec![("sec-fetch-site", "none")],
        vec![],
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("ok{i}");
        let (status, body) = status_of(
            &app,
            form_post(&maps, &headers, &format!("UniqueName={name}")),
        )
        .await;
        assert_eq!(status, 201, "{headers:?}: {body}");
    }
    // Reading is not refused (the browser keeps the answer from the page, per CORS).
    let (status, _, _) = raw_get(&app, &maps, &[("origin", "http://evil.example")]).await;
    assert_eq!(status, 200);
    // `--cors-origin *` on a node without a token does not let any site write.
    let star = router(
        node.clone(),
        ServerOptions::new(addr()).with_cors_origins(vec!["*".into()]),
    );
    let (status, _) = status_of(
        &star,
        form_post(
            &maps,
            &[
                ("origin", "http://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            "UniqueName=star",
        ),
    )
    .await;
    assert_eq!(status, 403);
    // An origin allowed with --cors-origin may write.
    let allowed = router(
        node.clone(),
        ServerOptions::new(addr()).with_cors_origins(vec!["http://app.example".into()]),
    );
    let (status, body) = status_of(
        &allowed,
        form_post(
            &maps,
            &[
                ("origin", "http://app.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            "UniqueName=from_app",
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_node_without_a_token_answers_only_to_loopback_host_names() {
    let node = Node::in_memory().await.unwrap();
    let app = router(
        node.clone(),
        ServerOptions::new(addr()).with_allowed_hosts(vec!["lab.example".into()]),
    );
    let get = |host: &str| {
        Request::builder()
            .uri(format!("{P}/Maps"))
            .header("host", host)
            .body(Body::empty())
            .unwrap()
    };
    // DNS rebinding: a page on a name the attacker controls, now resolving to 127.0.0.1.
    let (status, body) = status_of(&app, get("rebind.attacker.example:7700")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], 20403);
    assert_eq!(
        status_of(&app, get("localhost.attacker.example")).await.0,
        403
    );
    for ok in [
        "127.0.0.1:7700",
        "localhost:7700",
        "[::1]:7700",
        "lab.example:7700",
    ] {
        assert_eq!(status_of(&app, get(ok)).await.0, 200, "{ok}");
    }
    // With a token, the token is the guard.
    let guarded = router(
        node,
        ServerOptions::new(addr()).with_token(Some("t".into())),
    );
    let mut req = get("node.lan:7700");
    req.headers_mut()
        .insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
    assert_eq!(status_of(&guarded, req).await.0, 200);
}

#[tokio::test]
async fn a_body_that_does_not_come_in_time_or_is_announced_too_large_is_refused() {
    let limits = syncmesh_server::Limits {
        body_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let node = Node::in_memory().await.unwrap();
    let app = router(node.clone(), ServerOptions::new(addr()).with_limits(limits));
    // A body that never ends (a client that stops sending).
    let never = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{P}/Maps"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(never))
        .unwrap();
    let (status, body) = status_of(&app, req).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["code"], 20408);
    // Content-Length: 10^12 with no body: refused at once, nothing read.
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{P}/Maps"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "1000000000000")
        .body(Body::from_stream(futures_util::stream::pending::<
            Result<Vec<u8>, std::io::Error>,
        >()))
        .unwrap();
    let (status, body) = status_of(&app, req).await;
    assert_eq!(status, 413, "{body}");
    // An endless chunked body stops at the limit.
    let endless = futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(vec![b' '; 8192]));
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{P}/Maps"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(endless))
        .unwrap();
    assert_eq!(status_of(&app, req).await.0, 413);
    assert!(node.maps().await.unwrap().is_empty());
}

#[tokio::test]
async fn event_subscriptions_are_limited_per_map_and_per_node() {
    let limits = syncmesh_server::Limits {
        max_subscribers: 3,
        max_subscribers_per_map: 2,
        ..Default::default()
    };
    let node = Node::in_memory().await.unwrap();
    let app = router(node.clone(), ServerOptions::new(addr()).with_limits(limits));
    let api = Api {
        app: app.clone(),
        token: None,
    };
    for m in ["a", "b"] {
        api.post(&format!("{P}/Maps"), json!({"UniqueName": m}))
            .await
            .ok(201);
    }
    let sub = |m: &str| {
        Request::builder()
            .uri(format!("{P}/Maps/{m}/Events"))
            .header(header::ACCEPT, "text/event-stream")
            .body(Body::empty())
            .unwrap()
    };
    let open = |m: &'static str| {
        let app = app.clone();
        async move {
            let r = app.oneshot(sub(m)).await.unwrap();
            (r.status().as_u16(), r)
        }
    };
    let (s1, a1) = open("a").await;
    let (s2, _a2) = open("a").await;
    assert_eq!((s1, s2), (200, 200));
    let refused = app.clone().oneshot(sub("a")).await.unwrap();
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let (status, body) = status_of(&app, sub("a")).await;
    assert_eq!(status, 429, "the map's limit: {body}");
    assert_eq!(body["code"], 20429);
    let (s3, _b1) = open("b").await;
    assert_eq!(s3, 200);
    assert_eq!(status_of(&app, sub("b")).await.0, 429, "the node's limit");
    let status = api.get("/v1/Node").await;
    assert_eq!(status.ok(200)["subscribers"], 3);
    assert_eq!(status.body["limits"]["max_subscribers"], 3);
    // A subscriber that goes away gives its place back.
    drop(a1);
    let mut freed = false;
    for _ in 0..100 {
        if open("a").await.0 == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed);
}

#[tokio::test]
async fn weak_tags_invalid_form_text_and_foreign_page_tokens_are_refused() {
    let api = api().await;
    for m in ["a", "b"] {
        api.post(&format!("{P}/Maps"), json!({"UniqueName": m}))
            .await
            .ok(201);
        for k in ["k1", "k2", "k3"] {
            api.post(
                &format!("{P}/Maps/{m}/Items"),
                json!({"Key": k, "Data": {}}),
            )
            .await
            .ok(201);
        }
    }
    // If-Match compares strongly: the current tag marked weak does not match.
    let it = format!("{P}/Maps/a/Items/k1");
    let etag = api.get(&it).await.headers[header::ETAG]
        .to_str()
        .unwrap()
        .to_string();
    let r = api
        .with_header(
            Method::POST,
            &it,
            ("if-match", &format!("W/{etag}")),
            Some(json!({"Data": {"x": 1}})),
        )
        .await;
    r.err(412, 54205);
    let r = api
        .with_header(
            Method::POST,
            &it,
            ("if-match", &etag),
            Some(json!({"Data": {"x": 1}})),
        )
        .await;
    r.ok(200);
    // A form body whose text is not UTF-8 is refused like a JSON one (two different invalid
    // keys would otherwise both become U+FFFD and collide).
    let r = api
        .raw(
            Method::POST,
            &format!("{P}/Maps/a/Items"),
            "application/x-www-form-urlencoded",
            "Key=%FF&Data=%7B%7D",
        )
        .await;
    r.err(400, 20001);
    let r = api
        .raw(
            Method::POST,
            &format!("{P}/Maps/a/Items"),
            "application/json",
            "{\"Key\": \"\\ud800\", \"Data\": {}}",
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // A page token belongs to its listing.
    let first = api.get(&format!("{P}/Maps/a/Items?PageSize=1")).await;
    let next = first.ok(200)["meta"]["next_page_url"]
        .as_str()
        .unwrap()
        .to_string();
    let token = next
        .split("PageToken=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    api.get(&format!("{P}/Maps/a/Items?PageSize=1&PageToken={token}"))
        .await
        .ok(200);
    api.get(&format!("{P}/Maps/b/Items?PageSize=1&PageToken={token}"))
        .await
        .err(400, 54455);
    api.get(&format!("{P}/Maps?PageSize=1&PageToken={token}"))
        .await
        .err(400, 54455);
    let maps = api.get(&format!("{P}/Maps?PageSize=1")).await;
    let next = maps.ok(200)["meta"]["next_page_url"]
        .as_str()
        .unwrap()
        .to_string();
    let token = next
        .split("PageToken=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    api.get(&format!("{P}/Maps/a/Items?PageToken={token}"))
        .await
        .err(400, 54455);
}

#[tokio::test]
async fn a_page_number_without_its_token_is_refused() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "m"}))
        .await
        .ok(201);
    api.get(&format!("{P}/Maps/m/Items?Page=2"))
        .await
        .err(400, 20001);
    api.get(&format!("{P}/Maps?Page=1")).await.err(400, 20001);
    api.get(&format!("{P}/Maps/m/Items?Page=0")).await.ok(200);
}

#[tokio::test]
async fn the_conflicts_of_an_item_one_node_wrote() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "m"}))
        .await
        .ok(201);
    api.post(
        &format!("{P}/Maps/m/Items"),
        json!({"Key": "a/b", "Data": {"x": 1}}),
    )
    .await
    .ok(201);
    let r = api.get(&format!("{P}/Maps/m/Items/a%2Fb/Conflicts")).await;
    let body = r.ok(200).clone();
    check_schema(&body, &schema("ConflictsResource"));
    assert_eq!(body["key"], "a/b");
    assert_eq!(body["values"], json!([]));
    assert_eq!(body["fields"], json!({}));
    assert_eq!(body["writers"].as_array().unwrap().len(), 1);
    assert!(body["url"]
        .as_str()
        .unwrap()
        .ends_with("/Items/a%2Fb/Conflicts"));
    api.get(&format!("{P}/Maps/m/Items/nope/Conflicts"))
        .await
        .err(404, 54201);
}

#[tokio::test]
async fn a_listing_says_which_event_it_reflects_and_the_stream_resumes_there() {
    let api = api().await;
    api.post(&format!("{P}/Maps"), json!({"UniqueName": "lw"}))
        .await
        .ok(201);
    let items = format!("{P}/Maps/lw/Items");
    for k in ["a", "b", "c"] {
        api.post(&items, json!({"Key": k, "Data": {"k": k}}))
            .await
            .ok(201);
    }
    let list = api
        .get(&format!("{items}?PageSize=2"))
        .await
        .ok(200)
        .clone();
    check_schema(&list, &schema("ItemList"));
    let seen = list["meta"]["last_event_id"].as_u64().unwrap();
    assert_eq!(seen, 3, "{}", list);
    let map = api.get(&format!("{P}/Maps/lw")).await.ok(200).clone();
    assert_eq!(map["items_count"], 3);
    api.call(Method::DELETE, &format!("{items}/a"), None).await;
    api.post(&items, json!({"Key": "d", "Data": {}}))
        .await
        .ok(201);
    // After the listing's id: exactly the two changes it does not show.
    let frames = sse_events(&api, &format!("{P}/Maps/lw/Events?after={seen}"), &[], 2).await;
    let bodies: Vec<Value> = frames.iter().map(|f| sse_data(f)).collect();
    assert_eq!(bodies[0]["type"], "map_item_removed");
    assert_eq!(bodies[0]["item_key"], "a");
    assert_eq!(bodies[1]["item_key"], "d");
    let map = api.get(&format!("{P}/Maps/lw")).await.ok(200).clone();
    assert_eq!(map["items_count"], 3);
    // Map listings carry no event id (map events are per map).
    let maps = api.get(&format!("{P}/Maps")).await.ok(200).clone();
    assert!(maps["meta"].get("last_event_id").is_none());
}
