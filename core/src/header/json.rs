//! A minimal JSON tree that keeps object entries in order and keeps duplicate keys.
//!
//! `serde_json::Value` silently keeps the last of two equal keys, which would let a hostile
//! safetensors header say one thing to us and another to a different reader. Parsing into
//! this tree instead lets the validator see every key and reject duplicates at any depth.
//! serde_json's recursion limit (128) still applies, so deep nesting cannot blow the stack.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// A parsed JSON value; objects are ordered lists of entries, duplicates preserved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    /// A non-negative integer that fits in u64.
    UInt(u64),
    /// A negative integer.
    NegInt(i64),
    /// Any number with a fraction or exponent, or beyond the u64 range.
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// A short name for the kind of value, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::UInt(_) => "an unsigned integer",
            Json::NegInt(_) => "a negative integer",
            Json::Float(_) => "a non-integer number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }
}

/// Parses `bytes` as one JSON value; trailing whitespace (safetensors space padding) is allowed.
pub(crate) fn parse(bytes: &[u8]) -> Result<Json, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Json::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::UInt(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(u64::try_from(v).map_or(Json::NegInt(v), Json::UInt))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Json>()? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            entries.push((k, v));
        }
        Ok(Json::Obj(entries))
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_duplicates_in_order() {
        let v = parse(br#"{"a":1,"b":[true,null,-2,1.5],"a":"x"}  "#).unwrap();
        let Json::Obj(entries) = v else {
            panic!("not an object")
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0], ("a".into(), Json::UInt(1)));
        assert_eq!(
            entries[1].1,
            Json::Arr(vec![
                Json::Bool(true),
                Json::Null,
                Json::NegInt(-2),
                Json::Float(1.5)
            ])
        );
        assert_eq!(entries[2], ("a".into(), Json::Str("x".into())));
    }

    #[test]
    fn rejects_trailing_garbage_and_deep_nesting() {
        assert!(parse(b"{} x").is_err());
        assert!(parse(b"").is_err());
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn huge_integers_become_floats() {
        assert!(matches!(
            parse(b"18446744073709551616").unwrap(),
            Json::Float(_)
        ));
        assert_eq!(
            parse(b"18446744073709551615").unwrap(),
            Json::UInt(u64::MAX)
        );
    }
}
