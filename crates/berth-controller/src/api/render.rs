//! Records as the API sends them: the record's fields plus `kind` and
//! `etag`, optionally cut down to the attributes of `select`.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::store::Page;

/// Computes a record's etag: the hex of the first 16 bytes of the SHA-256
/// of its JSON form. Every write sets `modified_at`, so the etag changes
/// with every change of the record.
pub fn etag(fields: &Map<String, Value>) -> String {
    let text = Value::Object(fields.clone()).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

/// Renders one record as JSON.
pub fn record<T: Serialize>(
    kind: &str,
    record: &T,
    select: Option<&[String]>,
) -> Result<Value, ApiError> {
    let mut fields = match serde_json::to_value(record) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) | Err(_) => {
            return Err(ApiError::Internal(format!(
                "failed to serialise a {kind} record"
            )))
        }
    };
    let tag = etag(&fields);
    if let Some(select) = select {
        fields.retain(|key, _| select.iter().any(|name| name == key));
    }
    fields.insert("kind".into(), Value::from(kind));
    fields.insert("etag".into(), Value::from(tag));
    Ok(Value::Object(fields))
}

/// Renders one page of a list as JSON.
pub fn list<T: Serialize>(
    list_kind: &str,
    item_kind: &str,
    page: &Page<T>,
    offset: u64,
    limit: u64,
    select: Option<&[String]>,
) -> Result<Value, ApiError> {
    let items = page
        .items
        .iter()
        .map(|item| record(item_kind, &item.record, select))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(list_of(
        list_kind,
        items,
        page.items_available,
        offset,
        limit,
    ))
}

/// Builds a list's body around items already rendered.
pub fn list_of(
    list_kind: &str,
    items: Vec<Value>,
    items_available: Option<u64>,
    offset: u64,
    limit: u64,
) -> Value {
    let mut body = Map::new();
    body.insert("kind".into(), Value::from(list_kind));
    body.insert("etag".into(), Value::from(""));
    body.insert("self_link".into(), Value::from(""));
    body.insert("offset".into(), Value::from(offset));
    body.insert("limit".into(), Value::from(limit));
    body.insert("items".into(), Value::Array(items));
    if let Some(available) = items_available {
        body.insert("items_available".into(), Value::from(available));
    }
    Value::Object(body)
}
