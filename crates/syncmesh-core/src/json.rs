//! The encoding of JSON values in Automerge, both ways.
//!
//! Writing (what syncmesh puts in a document):
//!
//! | JSON | Automerge |
//! |---|---|
//! | `null` | scalar `Null` |
//! | `true` / `false` | scalar `Boolean` |
//! | integer that fits `i64` | scalar `Int` |
//! | integer above `i64::MAX` (fits `u64`) | scalar `Uint` |
//! | any other number | scalar `F64` |
//! | string | scalar `Str` |
//! | array | `List` object, elements encoded the same way |
//! | object | `Map` object, values encoded the same way |
//!
//! Reading accepts everything above plus what other Automerge implementations write: `Text`
//! objects read as strings (JavaScript Automerge writes strings that way), `Table` as an object,
//! `Counter` as its current integer, `Timestamp` as integer milliseconds, `Bytes` as a base64
//! string (standard alphabet, padded), non-finite floats and values of unknown future types as
//! `null`. So every JSON value round-trips exactly (numbers as `serde_json` parses them:
//! `1` and `1.0` stay distinct), and foreign documents still read as JSON.

use automerge::transaction::Transactable;
use automerge::{hydrate, ObjType, ReadDoc, ScalarValue, Value};
use base64::Engine as _;
use serde_json::Value as Json;

/// How one JSON value is written into a map slot.
pub(crate) enum Encoded<'a> {
    /// A single scalar operation.
    Scalar(ScalarValue),
    /// A new object (map or list) created with its whole content ([`put_object`]).
    Object(&'a Json),
}

/// How `v` is written.
pub(crate) fn encode(v: &Json) -> Encoded<'_> {
    match v {
        Json::Array(_) | Json::Object(_) => Encoded::Object(v),
        other => Encoded::Scalar(scalar(other)),
    }
}

/// Writes `v` (an object or array) as a new object at `prop` of `obj`, with its content.
pub(crate) fn put_object<T: Transactable + ?Sized>(
    tx: &mut T,
    obj: &automerge::ObjId,
    prop: &str,
    v: &Json,
) -> Result<(), automerge::AutomergeError> {
    let id = tx.put_object(obj, prop, obj_type(v))?;
    fill(tx, &id, v)
}

fn obj_type(v: &Json) -> ObjType {
    match v {
        Json::Array(_) => ObjType::List,
        _ => ObjType::Map,
    }
}

/// Writes the content of `v` into the new object `id`.
fn fill<T: Transactable + ?Sized>(
    tx: &mut T,
    id: &automerge::ObjId,
    v: &Json,
) -> Result<(), automerge::AutomergeError> {
    match v {
        Json::Object(map) => {
            for (k, x) in map {
                match x {
                    Json::Object(_) | Json::Array(_) => {
                        let child = tx.put_object(id, k.as_str(), obj_type(x))?;
                        fill(tx, &child, x)?;
                    }
                    other => tx.put(id, k.as_str(), scalar(other))?,
                }
            }
        }
        Json::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                match x {
                    Json::Object(_) | Json::Array(_) => {
                        let child = tx.insert_object(id, i, obj_type(x))?;
                        fill(tx, &child, x)?;
                    }
                    other => tx.insert(id, i, scalar(other))?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn scalar(v: &Json) -> ScalarValue {
    match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => ScalarValue::Null,
    }
}

/// Decodes a scalar into JSON.
pub(crate) fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
    }
}

/// Decodes a hydrated Automerge value into JSON.
pub(crate) fn from_hydrate(v: &hydrate::Value) -> Json {
    match v {
        hydrate::Value::Scalar(s) => scalar_to_json(s),
        hydrate::Value::Map(m) => Json::Object(
            m.iter()
                .map(|(k, mv)| (k.clone(), from_hydrate(&mv.value)))
                .collect(),
        ),
        hydrate::Value::List(l) => {
            Json::Array(l.iter().map(|lv| from_hydrate(&lv.value)).collect())
        }
        hydrate::Value::Text(t) => Json::String(String::from(t)),
    }
}

/// Reads the JSON value of a slot whose value (and object id, for objects) is given.
pub(crate) fn read<R: ReadDoc>(doc: &R, value: &Value<'_>, id: &automerge::ObjId) -> Json {
    match value {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(ObjType::Text) => doc.text(id).map(Json::String).unwrap_or(Json::Null),
        Value::Object(_) => doc
            .hydrate(id, None)
            .map(|h| from_hydrate(&h))
            .unwrap_or(Json::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{AutoCommit, ROOT};
    use serde_json::json;

    fn roundtrip(v: &Json) -> Json {
        let mut doc = AutoCommit::new();
        match encode(v) {
            Encoded::Scalar(s) => {
                doc.put(ROOT, "x", s).unwrap();
            }
            Encoded::Object(v) => {
                put_object(&mut doc, &ROOT, "x", v).unwrap();
            }
        }
        let (val, id) = doc.get(ROOT, "x").unwrap().unwrap();
        read(&doc, &val, &id)
    }

    #[test]
    fn every_json_shape_roundtrips() {
        let cases = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-1),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1.0),
            json!(-0.5),
            json!(1e300),
            json!(""),
            json!("héllo \u{0} 🎉"),
            json!([]),
            json!({}),
            json!([1, "a", null, [true, {"b": [1.5]}]]),
            json!({"a": {"b": {"c": [1, 2, {"d": null}]}}, "": "empty key"}),
        ];
        for c in cases {
            let back = roundtrip(&c);
            assert_eq!(back, c, "roundtrip of {c}");
            // number kinds survive: 1.0 stays a float, 1 an integer
            assert_eq!(back.to_string(), c.to_string());
        }
    }

    #[test]
    fn reads_what_javascript_automerge_writes() {
        let mut doc = AutoCommit::new();
        let t = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        doc.splice_text(&t, 0, 0, "typed text").unwrap();
        doc.put(ROOT, "counter", ScalarValue::counter(5)).unwrap();
        doc.put(ROOT, "ts", ScalarValue::Timestamp(1700000000000))
            .unwrap();
        doc.put(ROOT, "bytes", ScalarValue::Bytes(vec![1, 2, 3]))
            .unwrap();
        doc.put(ROOT, "nan", ScalarValue::F64(f64::NAN)).unwrap();
        let obj = doc.put_object(ROOT, "nested", ObjType::Map).unwrap();
        let inner = doc.put_object(&obj, "t", ObjType::Text).unwrap();
        doc.splice_text(&inner, 0, 0, "in").unwrap();
        let get = |doc: &AutoCommit, k: &str| {
            let (v, id) = doc.get(ROOT, k).unwrap().unwrap();
            read(doc, &v, &id)
        };
        assert_eq!(get(&doc, "text"), json!("typed text"));
        assert_eq!(get(&doc, "counter"), json!(5));
        assert_eq!(get(&doc, "ts"), json!(1700000000000i64));
        assert_eq!(get(&doc, "bytes"), json!("AQID"));
        assert_eq!(get(&doc, "nan"), json!(null));
        assert_eq!(get(&doc, "nested"), json!({"t": "in"}));
    }
}
