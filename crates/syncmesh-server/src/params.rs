//! Reading requests: JSON or form-encoded bodies, queries, path segments and headers, each
//! failure a typed [`ApiError`] (never axum's plain-text rejections, never a 500).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use syncmesh::limits;
use syncmesh::{JsonObject, Revision, Ttl};

use crate::error::{codes, ApiError};

/// Largest request body. Item data is at most 16 KiB as JSON; in a form-encoded body it is
/// JSON text percent-encoded (up to 3 bytes per byte), plus a key of up to 320 characters.
pub const BODY_LIMIT: usize = 4 * limits::MAX_DATA_BYTES;

/// A request body of parameters, JSON or form-encoded, decoded into `T`.
#[derive(Debug)]
pub struct Params<T> {
    /// The parameters.
    pub value: T,
    /// Whether they came form-encoded (then `Data` is JSON text).
    pub form: bool,
}

impl<T, S> FromRequest<S> for Params<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?").to_ascii_lowercase());
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    54006,
                    format!(
                        "the request body is over {BODY_LIMIT} bytes; item data is at most {} bytes",
                        limits::MAX_DATA_BYTES
                    ),
                )
            } else {
                ApiError::invalid(format!("could not read the request body: {e}"))
            }
        })?;
        parse_body(ctype.as_deref(), &body)
    }
}

fn parse_body<T: DeserializeOwned + Default>(
    ctype: Option<&str>,
    body: &[u8],
) -> Result<Params<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Params {
            value: T::default(),
            form: false,
        });
    }
    let mime = ctype.map(|c| c.split(';').next().unwrap_or("").trim());
    let form = match mime {
        Some("application/json") => false,
        Some("application/x-www-form-urlencoded") => true,
        // No content type: JSON if it looks like a JSON object, else a form.
        None => body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{'),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                codes::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported content type {other:?}: send application/json or application/x-www-form-urlencoded"
                ),
            ))
        }
    };
    let value = if form {
        serde_json::from_value(form_object(body)?)
            .map_err(|e| ApiError::invalid(format!("invalid form-encoded body: {e}")))?
    } else {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::invalid(
                "the body must be a JSON object of parameters, e.g. {\"Key\": \"k\", \"Data\": {}}",
            ));
        }
        serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid body: {e}")))?
    };
    Ok(Params { value, form })
}

/// A form body as a JSON object of strings; a repeated parameter becomes an array of its
/// values, in order (`Maps=a&Maps=b`). Names and values must be UTF-8 once decoded, as a
/// JSON body must be (substituting U+FFFD would make different keys collide).
fn form_object(body: &[u8]) -> Result<Value, ApiError> {
    let decode = |part: &[u8]| -> Result<String, ApiError> {
        let spaced: Vec<u8> = part
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&spaced)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                ApiError::invalid("invalid form-encoded body: a name or value is not UTF-8")
            })
    };
    let mut obj = serde_json::Map::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let (k, v) = (decode(k)?, Value::String(decode(v)?));
        match obj.get_mut(k.as_str()) {
            None => {
                obj.insert(k, v);
            }
            Some(Value::Array(a)) => a.push(v),
            Some(first) => *first = Value::Array(vec![first.take(), v]),
        }
    }
    Ok(Value::Object(obj))
}

/// Reads a repeatable text parameter: one string, or an array of strings (JSON, or a
/// parameter repeated in a form).
pub fn strings(v: Option<Value>, name: &str) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid(format!("{name} must be text, or a list of texts"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|x| match x {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Reads a boolean parameter: a JSON boolean, or `true`/`false` as text.
pub fn boolean(v: Option<Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(ApiError::invalid(format!(
                "{name} must be true or false, not {s:?}"
            ))),
        },
        Some(other) => Err(ApiError::invalid(format!(
            "{name} must be true or false, not {other}"
        ))),
    }
}

/// Reads a whole-number parameter from `min` to `max`: a JSON number or its text.
pub fn integer(v: Option<Value>, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    let bad = |shown: String| {
        ApiError::invalid(format!(
            "{name} must be a whole number from {min} to {max}, not {shown}"
        ))
    };
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad(n.to_string()))?,
        Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| bad(format!("{s:?}")))?,
        Some(other) => return Err(bad(other.to_string())),
    };
    if !(min..=max).contains(&n) {
        return Err(bad(n.to_string()));
    }
    Ok(Some(n))
}

/// Reads a `Ttl` parameter: whole seconds as a JSON number or as text.
pub fn ttl(v: Option<Value>) -> Result<Option<Ttl>, ApiError> {
    let bad = |shown: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            54011,
            format!(
                "invalid TTL {shown}: must be whole seconds from 0 to {}",
                limits::MAX_TTL_SECS
            ),
        )
    };
    let secs = match v {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| bad(n.to_string()))?,
        Some(Value::String(s)) => s.trim().parse::<i64>().map_err(|_| bad(format!("{s:?}")))?,
        Some(other) => return Err(bad(other.to_string())),
    };
    Ok(Some(Ttl::from_secs(secs)?))
}

/// Reads a `Data` parameter: a JSON object, or in a form body its JSON text.
pub fn data(v: Option<Value>, form: bool) -> Result<Option<JsonObject>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(text)) if form => Ok(Some(limits::parse_data(&text)?)),
        Some(Value::Object(m)) => {
            limits::validate_data(&m)?;
            Ok(Some(m))
        }
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            54206,
            format!(
                "item data must be a JSON object, got {}",
                match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string (in a JSON body give the object itself)",
                    Value::Array(_) => "an array",
                    Value::Object(_) => "an object",
                }
            ),
        )),
    }
}

/// Reads a required `Data` parameter.
pub fn required_data(v: Option<Value>, form: bool) -> Result<JsonObject, ApiError> {
    data(v, form)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            54206,
            "the Data parameter is required: a JSON object",
        )
    })
}

/// Reads a page size given as text.
pub fn page_size(v: Option<&str>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => match s.trim().parse::<i64>() {
            Ok(n) => Ok(Some(limits::validate_page_size(n)? as i64)),
            Err(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                54455,
                format!(
                    "invalid page size {s:?}: must be a whole number from 1 to {}",
                    limits::MAX_PAGE_SIZE
                ),
            )),
        },
    }
}

/// Reads a `Page` number given as text.
pub fn page_number(v: Option<&str>) -> Result<u64, ApiError> {
    v.map(|s| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| ApiError::invalid(format!("invalid Page {s:?}: a whole number from 0")))
    })
    .transpose()
    .map(Option::unwrap_or_default)
}

/// `If-Match` resolved against the item's current revision. One entity tag is passed on
/// as is (the engine compares it atomically with the write). `*` (any current revision) and a
/// list of tags (RFC 9110) are resolved by reading the item: if its revision matches, the
/// write goes ahead under that revision, so a change in between still fails with 412.
pub async fn if_match_resolved(
    headers: &HeaderMap,
    map: &syncmesh::Map,
    key: &str,
) -> Result<Option<Revision>, ApiError> {
    let Some(raw) = if_match_text(headers)? else {
        return Ok(None);
    };
    let tags: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    match tags.as_slice() {
        [] => Err(ApiError::invalid("the If-Match header is empty")),
        [one] if *one != "*" => Ok(Some(Revision::from_client(*one))),
        _ => match map.get(key).await {
            Ok(item) => {
                let hit = tags
                    .iter()
                    .any(|t| *t == "*" || Revision::from_client(*t) == item.revision);
                Ok(Some(if hit {
                    item.revision
                } else {
                    Revision::from_client(raw.trim())
                }))
            }
            // A missing item matches no tag, not even `*`: the write reports it as usual.
            Err(syncmesh::Error::Map(syncmesh::MapError::ItemNotFound(_))) => {
                Ok(Some(Revision::from_client(raw.trim())))
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// The header a write names its durability with: `fsync` (acknowledged once on disk) or
/// `relaxed` (acknowledged once applied, on disk within 100 ms or at the next
/// `POST /v1/Node/Sync`); absent, the node's default.
pub const DURABILITY_HEADER: &str = "syncmesh-durability";

/// The durability a write asks for in [`DURABILITY_HEADER`].
pub fn durability(headers: &HeaderMap) -> Result<Option<syncmesh::Durability>, ApiError> {
    let Some(v) = headers.get(DURABILITY_HEADER) else {
        return Ok(None);
    };
    match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Ok("fsync") => Ok(Some(syncmesh::Durability::Fsync)),
        Ok("relaxed") => Ok(Some(syncmesh::Durability::Relaxed)),
        _ => Err(ApiError::invalid(
            "the Syncmesh-Durability header must be fsync or relaxed",
        )),
    }
}

fn if_match_text(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| ApiError::invalid("the If-Match header is not visible ASCII")),
    }
}

/// A query string decoded into `T` (unknown parameters are refused, so typos are noticed).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(q)
            .map(Query)
            .map_err(|e| ApiError::invalid(format!("invalid query: {e}")))
    }
}

/// Percent-decoded path parameters. `%2F` in a key decodes to `/` within its one segment.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| {
                ApiError::invalid(format!(
                    "invalid path: {} (percent-encode keys and names as UTF-8)",
                    e.body_text()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CreateItemParams;
    use serde_json::json;

    fn body(ctype: Option<&str>, b: &str) -> Result<Params<CreateItemParams>, ApiError> {
        parse_body(ctype, b.as_bytes())
    }

    #[test]
    fn json_and_form_bodies() {
        let p = body(
            Some("application/json"),
            r#"{"Key":"k","Data":{"a":1},"Ttl":5}"#,
        )
        .unwrap();
        assert!(!p.form);
        assert_eq!(p.value.key.as_deref(), Some("k"));
        let p = body(
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            "Key=a%2Fb&Data=%7B%22a%22%3A1%7D&Ttl=5",
        )
        .unwrap();
        assert!(p.form);
        assert_eq!(p.value.key.as_deref(), Some("a/b"));
        let d = data(p.value.data, true).unwrap().unwrap();
        assert_eq!(Value::Object(d), json!({"a": 1}));
        assert_eq!(ttl(p.value.ttl).unwrap().unwrap().secs(), 5);
        // sniffed without a content type
        assert!(!body(None, r#" {"Key":"k"}"#).unwrap().form);
        assert!(body(None, "Key=k").unwrap().form);
        assert!(body(Some("application/json"), "")
            .unwrap()
            .value
            .key
            .is_none());
    }

    #[test]
    fn repeated_form_parameters_are_lists() {
        #[derive(Debug, Default, serde::Deserialize)]
        struct P {
            #[serde(rename = "Maps")]
            maps: Option<Value>,
            #[serde(rename = "Write")]
            write: Option<Value>,
            #[serde(rename = "Uses")]
            uses: Option<Value>,
        }
        let p: Params<P> = parse_body(
            Some("application/x-www-form-urlencoded"),
            b"Maps=a&Maps=b%2Fc&Write=false&Uses=3",
        )
        .unwrap();
        assert_eq!(strings(p.value.maps, "Maps").unwrap(), ["a", "b/c"]);
        assert_eq!(boolean(p.value.write, "Write").unwrap(), Some(false));
        assert_eq!(integer(p.value.uses, "Uses", 1, 9).unwrap(), Some(3));
        let p: Params<P> =
            parse_body(Some("application/x-www-form-urlencoded"), b"Maps=a").unwrap();
        assert_eq!(strings(p.value.maps, "Maps").unwrap(), ["a"]);
        assert!(strings(Some(json!([1])), "Maps").is_err());
        assert!(boolean(Some(json!("yes")), "Write").is_err());
        assert!(integer(Some(json!(0)), "Uses", 1, 9).is_err());
        assert!(integer(Some(json!(-1)), "Uses", 1, 9).is_err());
        assert!(integer(Some(json!("1.5")), "Uses", 1, 9).is_err());
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        let code = |r: Result<Params<CreateItemParams>, ApiError>| r.unwrap_err().code;
        assert_eq!(code(body(Some("application/json"), "{bad")), 20001);
        assert_eq!(code(body(Some("application/json"), "[1]")), 20001);
        assert_eq!(code(body(Some("application/json"), r#"{"Nope":1}"#)), 20001);
        assert_eq!(code(body(Some("text/plain"), "x")), 20415);
        assert_eq!(data(Some(json!(null)), false).unwrap_err().code, 54206);
        assert_eq!(data(Some(json!("{}")), false).unwrap_err().code, 54206);
        assert_eq!(data(Some(json!("[1]")), true).unwrap_err().code, 54206);
        assert_eq!(data(Some(json!("{bad")), true).unwrap_err().code, 54206);
        let big = json!({"a": "x".repeat(limits::MAX_DATA_BYTES)});
        assert_eq!(data(Some(big), false).unwrap_err().code, 54006);
        for t in [
            json!(-1),
            json!(1.5),
            json!("x"),
            json!(true),
            json!(31_536_001),
        ] {
            assert_eq!(ttl(Some(t)).unwrap_err().code, 54011);
        }
        assert_eq!(page_size(Some("0")).unwrap_err().code, 54455);
        assert_eq!(page_size(Some("x")).unwrap_err().code, 54455);
        assert_eq!(page_size(Some("100")).unwrap(), Some(100));
    }
}
