//! Request parameters and bodies, in every form Arvados clients send them.
//!
//! Parameters come from the query string, from a form-encoded body (a
//! `POST` with `X-Http-Method-Override: GET`, which the Python SDK sends
//! when a list URL would be too long), or from the keys of a JSON body.
//! Structured parameters (`filters`, `order`, `select`, `where`) are JSON
//! text in the query and form cases.
//!
//! Create and update bodies are `{"<resource>": {attributes}}` or the bare
//! attribute object. A form body carries the attributes as JSON text in
//! the `<resource>` field, or each attribute in a field of its own.
//!
//! List parameters have limits ([`MAX_FILTERS`], [`MAX_LIST_OPERANDS`],
//! [`MAX_TOTAL_OPERANDS`], [`MAX_PATTERN_BYTES`], [`MAX_ORDER_TERMS`],
//! [`MAX_SELECT_ATTRIBUTES`], and [`MAX_LIMIT`] items per page) that keep
//! every list query within SQLite's own limits. A call past one of them
//! is rejected with 422, and the message names the limit.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::HeaderMap;
use berth_core::{time, ObjectType};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::store::{
    find_column, Column, ColumnKind, Filter, FilterOp, ListQuery, Operand, Order, Scalar,
    Visibility,
};

/// Items per page when the caller gives no `limit`.
pub const DEFAULT_LIMIT: u64 = 100;

/// Maximum items per page; a larger `limit` is lowered to it.
pub const MAX_LIMIT: u64 = 1000;

/// Maximum conditions of one list call, `filters` and `where` together.
/// Every condition deepens SQLite's expression tree, whose depth SQLite
/// limits to 1000 by default.
pub const MAX_FILTERS: usize = 100;

/// Maximum operands of one `in` or `not in` list.
pub const MAX_LIST_OPERANDS: usize = 1000;

/// Maximum operands of all conditions of one list call together. Each
/// operand is one SQL parameter, and SQLite accepts at most 32766
/// parameters in one statement by default (since SQLite 3.32).
pub const MAX_TOTAL_OPERANDS: usize = 10_000;

/// Maximum length, in bytes, of a `like` or `ilike` pattern. SQLite
/// rejects patterns longer than 50000 bytes, and a `like` pattern grows up
/// to three times when it is turned into a GLOB pattern.
pub const MAX_PATTERN_BYTES: usize = 1000;

/// Maximum sort terms in `order`. SQLite accepts at most 2000 by default.
pub const MAX_ORDER_TERMS: usize = 10;

/// Maximum attribute names in `select`. Each name is compared with every
/// field of every record in the response, so the list stays short.
pub const MAX_SELECT_ATTRIBUTES: usize = 100;

/// Parameters a create or update call may carry beside its attributes:
/// `select` is used, and the others are accepted and ignored, as Arvados
/// clients send them.
pub const CALL_PARAMETERS: &[&str] = &[
    "select",
    "alt",
    "_method",
    "ensure_unique_name",
    "cluster_id",
    "bypass_federation",
];

/// Maximum characters of a caller's value quoted in an error message.
const MAX_QUOTED_CHARS: usize = 200;

/// The header that makes a `POST` count as another method.
pub const METHOD_OVERRIDE_HEADER: &str = "x-http-method-override";

#[derive(Debug, Clone)]
enum ParamValue {
    /// From the query string or a form: JSON text or a plain string.
    Text(String),
    /// From a JSON body.
    Json(Value),
}

/// Merged parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct Params {
    values: HashMap<String, ParamValue>,
}

impl Params {
    pub fn from_query(raw: Option<&str>) -> Params {
        let mut params = Params::default();
        if let Some(raw) = raw {
            params.merge_form(raw.as_bytes());
        }
        params
    }

    fn merge_form(&mut self, body: &[u8]) {
        for (key, value) in url::form_urlencoded::parse(body) {
            self.values
                .insert(key.into_owned(), ParamValue::Text(value.into_owned()));
        }
    }

    fn merge_json(&mut self, object: Map<String, Value>) {
        for (key, value) in object {
            self.values.insert(key, ParamValue::Json(value));
        }
    }

    /// Returns a parameter as JSON. Text is parsed, and text that is not
    /// JSON is an error naming the parameter.
    pub fn json(&self, name: &str) -> Result<Option<Value>, ApiError> {
        match self.values.get(name) {
            None => Ok(None),
            Some(ParamValue::Json(value)) => Ok(Some(value.clone())),
            Some(ParamValue::Text(text)) => serde_json::from_str(text).map(Some).map_err(|err| {
                ApiError::invalid(format!(
                    "invalid {name} parameter {}: it is not JSON: {err}",
                    quote_text(text)
                ))
            }),
        }
    }

    /// Returns a parameter as plain text (a JSON string is unquoted).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.values.get(name)? {
            ParamValue::Text(text) => Some(text.clone()),
            ParamValue::Json(Value::String(text)) => Some(text.clone()),
            ParamValue::Json(other) => Some(other.to_string()),
        }
    }

    /// Returns a parameter that must be a whole number of 0 or more.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        text.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "invalid {name} parameter {}: expected a whole number of 0 or more",
                quote_text(&text)
            ))
        })
    }

    /// Returns a parameter that must be a number of seconds, 0 or more.
    pub fn seconds(&self, name: &str) -> Result<Option<f64>, ApiError> {
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        match text.trim().parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 0.0 => Ok(Some(value)),
            _ => Err(ApiError::invalid(format!(
                "invalid {name} parameter {}: expected a number of seconds, 0 or more",
                quote_text(&text)
            ))),
        }
    }
}

/// Reads a body of at most `limit` bytes; a larger one is rejected with
/// 413.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "{what} is larger than the limit of {limit} bytes: send at most {limit} bytes per request"
        ))
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buffer = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|err| ApiError::invalid(format!("failed to read the request body: {err}")))?;
        if buffer.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

/// Returns true when a `POST` is to be treated as a `GET` (a list), by
/// header or by a `_method=GET` parameter.
pub fn overrides_to_get(headers: &HeaderMap, params: &Params) -> bool {
    let header = headers
        .get(METHOD_OVERRIDE_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("GET"));
    header
        || params
            .text("_method")
            .is_some_and(|m| m.eq_ignore_ascii_case("GET"))
}

/// Collects the parameters of a request whose body may carry more of them:
/// the query string, then a form body or the keys of a JSON object body.
pub fn params_with_body(
    headers: &HeaderMap,
    raw_query: Option<&str>,
    body: &[u8],
) -> Result<Params, ApiError> {
    let mut params = Params::from_query(raw_query);
    if is_form(headers) {
        params.merge_form(body);
    } else if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => params.merge_json(object),
            Ok(_) => return Err(ApiError::invalid("invalid body: expected a JSON object")),
            Err(err) => return Err(ApiError::invalid(format!("invalid JSON body: {err}"))),
        }
    }
    Ok(params)
}

/// Extracts the attributes of a create or update body.
///
/// A JSON body is `{"<wrapper>": {attributes}, ...parameters}` or the bare
/// attribute object. A form body carries the attributes as JSON text in
/// its `<wrapper>` field, or else each attribute as a field of its own.
/// Outside the wrapper, the names of [`CALL_PARAMETERS`] are parameters.
/// Every other key of a bare body is an attribute, so the record's checks
/// reject an unknown key in a form just as in JSON.
pub fn attributes(
    headers: &HeaderMap,
    params: &Params,
    body: &[u8],
    wrapper: &str,
    columns: &'static [Column],
) -> Result<Map<String, Value>, ApiError> {
    let wrapped = if is_form(headers) {
        match params.json(wrapper)? {
            Some(value) => Some(value),
            None => return form_attributes(body, columns),
        }
    } else if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut object)) => match object.remove(wrapper) {
                Some(value) => Some(value),
                None => {
                    object.retain(|key, _| !CALL_PARAMETERS.contains(&key.as_str()));
                    return Ok(object);
                }
            },
            Ok(_) => return Err(ApiError::invalid("invalid body: expected a JSON object")),
            Err(err) => return Err(ApiError::invalid(format!("invalid JSON body: {err}"))),
        }
    };
    match wrapped {
        None => Ok(Map::new()),
        Some(Value::Object(object)) => Ok(object),
        Some(Value::String(text)) => match serde_json::from_str(&text) {
            Ok(Value::Object(object)) => Ok(object),
            _ => Err(ApiError::invalid(format!(
                "invalid {wrapper}: expected a JSON object"
            ))),
        },
        Some(_) => Err(ApiError::invalid(format!(
            "invalid {wrapper}: expected a JSON object"
        ))),
    }
}

/// Reads the attributes of a form body without a wrapper field, one
/// attribute per field. Text and timestamp attributes take the field's
/// text as it is; other attributes (numbers, booleans, lists, objects)
/// take it as JSON.
fn form_attributes(
    body: &[u8],
    columns: &'static [Column],
) -> Result<Map<String, Value>, ApiError> {
    let mut attributes = Map::new();
    for (key, text) in url::form_urlencoded::parse(body) {
        if CALL_PARAMETERS.contains(&key.as_ref()) {
            continue;
        }
        let kind = find_column(columns, &key).map(|column| column.kind);
        let value = match kind {
            // An unknown attribute keeps its text, and the record's checks
            // name it.
            None | Some(ColumnKind::Text | ColumnKind::Timestamp) => {
                Value::String(text.into_owned())
            }
            Some(_) => serde_json::from_str(&text).map_err(|err| {
                ApiError::invalid(format!(
                    "invalid value for {key}: {} is not JSON: {err}",
                    quote_text(&text)
                ))
            })?,
        };
        attributes.insert(key.into_owned(), value);
    }
    Ok(attributes)
}

/// Finds the column a filter or order names, without a `table.` prefix.
fn column_named(columns: &'static [Column], table: &str, name: &str) -> Option<&'static Column> {
    let name = name
        .strip_prefix(table)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(name);
    find_column(columns, name).filter(|column| column.is_scalar())
}

fn scalar_names(columns: &[Column]) -> String {
    columns
        .iter()
        .filter(|column| column.is_scalar())
        .map(|column| column.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The comparison operators [`parse_op`] accepts, for messages.
const COMPARISON_OPERATORS: &str = "=, ==, !=, <>, <, <=, >, >=, in, not in, like, ilike";

fn parse_op(op: &str) -> Option<FilterOp> {
    let op = match op.trim().to_ascii_lowercase().as_str() {
        "=" | "==" => FilterOp::Eq,
        "!=" | "<>" => FilterOp::NotEq,
        "<" => FilterOp::Lt,
        "<=" => FilterOp::Le,
        ">" => FilterOp::Gt,
        ">=" => FilterOp::Ge,
        "in" => FilterOp::In,
        "not in" => FilterOp::NotIn,
        "like" => FilterOp::Like,
        "ilike" => FilterOp::ILike,
        _ => return None,
    };
    Some(op)
}

/// Converts an operand to the column's kind.
fn scalar(column: &Column, value: &Value) -> Result<Scalar, String> {
    let mismatch = |expected: &str| format!("operand {} is not {expected}", quote(value));
    match column.kind {
        ColumnKind::Text => match value {
            Value::String(text) => Ok(Scalar::Text(text.clone())),
            _ => Err(mismatch("a string")),
        },
        ColumnKind::Timestamp => match value {
            Value::String(text) => time::parse(text)
                .map(|t| Scalar::Text(time::format(&t)))
                .map_err(|_| mismatch("an RFC 3339 timestamp")),
            _ => Err(mismatch("an RFC 3339 timestamp")),
        },
        ColumnKind::Integer => match value {
            Value::Number(number) => number
                .as_i64()
                .map(Scalar::Integer)
                .ok_or_else(|| mismatch("an integer")),
            Value::String(text) => text
                .trim()
                .parse()
                .map(Scalar::Integer)
                .map_err(|_| mismatch("an integer")),
            _ => Err(mismatch("an integer")),
        },
        ColumnKind::Real => match value {
            Value::Number(number) => number
                .as_f64()
                .map(Scalar::Real)
                .ok_or_else(|| mismatch("a number")),
            _ => Err(mismatch("a number")),
        },
        ColumnKind::Bool => match value {
            Value::Bool(flag) => Ok(Scalar::Bool(*flag)),
            Value::String(text) if text == "true" || text == "false" => {
                Ok(Scalar::Bool(text == "true"))
            }
            _ => Err(mismatch("true or false")),
        },
        ColumnKind::Json => Err("the attribute cannot be filtered".into()),
    }
}

/// Parses one `[attribute, operator, operand]` filter. `None` is a filter
/// that every record meets (`is_a` on the table's own kind).
fn parse_filter(
    columns: &'static [Column],
    table: &str,
    filter: &Value,
) -> Result<Option<Filter>, String> {
    let Some([attribute, op, operand]) = filter.as_array().map(Vec::as_slice) else {
        return Err("expected [attribute, operator, operand]".into());
    };
    let attribute = attribute.as_str().ok_or("the attribute is not a string")?;
    let op_name = op.as_str().map(|op| op.trim().to_ascii_lowercase());
    if op_name.as_deref() == Some("is_a") {
        return parse_is_a(columns, table, attribute, operand);
    }
    if let Some(target) = object_key(columns, table, attribute, operand, op_name.as_deref())? {
        return parse_key_filter(target, op, operand).map(Some);
    }
    if op_name.as_deref() == Some("exists") {
        return Err(format!(
            "operator \"exists\" applies only to object attributes ({}), not to {}",
            OBJECT_ATTRIBUTES.join(", "),
            quote_text(attribute)
        ));
    }
    let column = column_named(columns, table, attribute).ok_or_else(|| {
        format!(
            "attribute {} cannot be filtered: use one of {}",
            quote_text(attribute),
            scalar_names(columns)
        )
    })?;
    let op_text = op.as_str().ok_or("the operator is not a string")?;
    let op = parse_op(op_text).ok_or_else(|| {
        format!(
            "unknown operator {}: use {COMPARISON_OPERATORS} or is_a, or exists on an object attribute ({})",
            quote_text(op_text),
            OBJECT_ATTRIBUTES.join(", ")
        )
    })?;
    let operand = match (op, operand) {
        (FilterOp::Eq | FilterOp::NotEq, Value::Null) => Operand::Null,
        (_, Value::Null) => return Err(format!("operator {op_text:?} cannot take null")),
        (FilterOp::In | FilterOp::NotIn, Value::Array(items)) => {
            if items.len() > MAX_LIST_OPERANDS {
                return Err(format!(
                    "operator {op_text:?} has {} operands, but the maximum is {MAX_LIST_OPERANDS}: split the list over several calls",
                    items.len()
                ));
            }
            Operand::List(
                items
                    .iter()
                    .map(|item| scalar(column, item))
                    .collect::<Result<_, _>>()?,
            )
        }
        (FilterOp::In | FilterOp::NotIn, _) => {
            return Err(format!("operator {op_text:?} needs a list operand"))
        }
        (FilterOp::Like | FilterOp::ILike, _) if column.kind != ColumnKind::Text => {
            return Err(format!("operator {op_text:?} needs a text attribute"))
        }
        (FilterOp::Like | FilterOp::ILike, Value::String(pattern))
            if pattern.len() > MAX_PATTERN_BYTES =>
        {
            return Err(format!(
                "the {op_text} pattern is {} bytes long, but the maximum is {MAX_PATTERN_BYTES} bytes",
                pattern.len()
            ))
        }
        (_, value) => Operand::One(scalar(column, value)?),
    };
    Ok(Some(Filter {
        column,
        key: None,
        op,
        operand,
    }))
}

/// Returns the type of the records of a table.
fn table_type(table: &str) -> Option<ObjectType> {
    match table {
        "container_requests" => Some(ObjectType::ContainerRequest),
        "containers" => Some(ObjectType::Container),
        _ => None,
    }
}

/// Parses `[attribute, "is_a", kind]`, where kind is one kind such as
/// `arvados#containerRequest` or a list of them: the attribute contains
/// the uuid of a record of one of those kinds. As in Arvados, an unknown kind
/// matches nothing, and on `uuid` the filter is true or false for the
/// whole table.
fn parse_is_a(
    columns: &'static [Column],
    table: &str,
    attribute: &str,
    operand: &Value,
) -> Result<Option<Filter>, String> {
    let not_kinds = "the is_a operand is not a kind or list of kinds";
    let kinds: Vec<&str> = match operand {
        Value::String(kind) => vec![kind.as_str()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().ok_or(not_kinds))
            .collect::<Result<_, _>>()?,
        _ => return Err(not_kinds.into()),
    };
    let column = column_named(columns, table, attribute)
        .filter(|column| column.kind == ColumnKind::Text)
        .ok_or_else(|| {
            format!(
                "attribute {} cannot be filtered with is_a: use a uuid attribute such as uuid or owner_uuid",
                quote_text(attribute)
            )
        })?;
    let types: Vec<ObjectType> = ObjectType::ALL
        .into_iter()
        .filter(|object_type| kinds.contains(&object_type.kind()))
        .collect();

    let uuid_column = find_column(columns, "uuid").ok_or("the table has no uuid attribute")?;
    // No record has a null uuid, so this filter matches nothing.
    let none = Filter {
        column: uuid_column,
        key: None,
        op: FilterOp::Eq,
        operand: Operand::Null,
    };
    if column.name == "uuid" {
        let own = table_type(table);
        return Ok(if types.iter().any(|t| Some(*t) == own) {
            None
        } else {
            Some(none)
        });
    }
    if types.is_empty() {
        return Ok(Some(none));
    }
    // Any cluster prefix, the type's code, any 15 characters.
    let patterns = types
        .iter()
        .map(|object_type| Scalar::Text(format!("_____-{}-_______________", object_type.code())))
        .collect();
    Ok(Some(Filter {
        column,
        key: None,
        op: FilterOp::Like,
        operand: Operand::List(patterns),
    }))
}

/// Attributes whose values are JSON objects, whose keys filters may test
/// as `ATTRIBUTE.KEY`.
const OBJECT_ATTRIBUTES: &[&str] = &[
    "properties",
    "output_properties",
    "runtime_status",
    "environment",
    "mounts",
    "runtime_constraints",
    "scheduling_parameters",
    "published_ports",
];

/// The key of an object column that a filter tests.
struct KeyTarget<'a> {
    column: &'static Column,
    key: &'a str,
    /// True for `ATTRIBUTE.KEY`, false for `[ATTRIBUTE, "exists", KEY]`.
    in_attribute: bool,
}

/// Finds the object column and key a filter tests: `ATTRIBUTE.KEY` with
/// any operator, or `[ATTRIBUTE, "exists", KEY]`. `None` for a filter on
/// a whole column.
fn object_key<'a>(
    columns: &'static [Column],
    table: &str,
    attribute: &'a str,
    operand: &'a Value,
    op: Option<&str>,
) -> Result<Option<KeyTarget<'a>>, String> {
    let name = attribute
        .strip_prefix(table)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(attribute);
    let (base, key) = match name.split_once('.') {
        Some((base, key)) => (base, Some(key)),
        None => (name, None),
    };
    let Some(column) = find_column(columns, base).filter(|c| OBJECT_ATTRIBUTES.contains(&c.name))
    else {
        return Ok(None);
    };
    let key = match (key, op, operand) {
        (Some(key), _, _) => key,
        (None, Some("exists"), Value::String(key)) => key.as_str(),
        (None, Some("exists"), _) => {
            return Err(format!(
                "operator \"exists\" on {} needs the key as a string operand, as in [{}, \"exists\", \"KEY\"]",
                quote_text(attribute),
                quote_text(base)
            ))
        }
        (None, _, _) => return Ok(None),
    };
    if key.is_empty() || key.contains(['"', '\\']) || key.chars().any(char::is_control) {
        return Err(format!(
            "key {} of {base} cannot be filtered: a key must be non-empty, with no '\"', '\\' or control characters",
            quote_text(key)
        ));
    }
    Ok(Some(KeyTarget {
        column,
        key,
        in_attribute: name.contains('.'),
    }))
}

/// Converts the operand of a filter on a key: strings, numbers and bools
/// keep their JSON type.
fn key_scalar(value: &Value) -> Result<Scalar, String> {
    match value {
        Value::String(text) => Ok(Scalar::Text(text.clone())),
        Value::Bool(flag) => Ok(Scalar::Bool(*flag)),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => Ok(Scalar::Integer(integer)),
            None => number
                .as_f64()
                .map(Scalar::Real)
                .ok_or_else(|| format!("operand {number} is not a number a filter can compare")),
        },
        other => Err(format!(
            "operand {} is not a string, number or bool",
            quote(other)
        )),
    }
}

/// Parses a filter on a key of an object column.
fn parse_key_filter(target: KeyTarget<'_>, op: &Value, operand: &Value) -> Result<Filter, String> {
    let KeyTarget {
        column,
        key,
        in_attribute,
    } = target;
    let op_text = op.as_str().ok_or("the operator is not a string")?;
    let op = match op_text.trim().to_ascii_lowercase().as_str() {
        "exists" => FilterOp::Exists,
        _ => parse_op(op_text).ok_or_else(|| {
            format!(
                "unknown operator {}: use {COMPARISON_OPERATORS} or exists",
                quote_text(op_text)
            )
        })?,
    };
    let operand = match (op, operand) {
        // `[ATTRIBUTE, "exists", KEY]` names the key in its operand.
        (FilterOp::Exists, Value::String(_)) if !in_attribute => Operand::One(Scalar::Bool(true)),
        (FilterOp::Exists, Value::Bool(present)) => Operand::One(Scalar::Bool(*present)),
        (FilterOp::Exists, other) => {
            return Err(format!(
                "operator \"exists\" takes true or false, not {}",
                quote(other)
            ))
        }
        (FilterOp::Eq | FilterOp::NotEq, Value::Null) => Operand::Null,
        (_, Value::Null) => return Err(format!("operator {op_text:?} cannot take null")),
        (FilterOp::In | FilterOp::NotIn, Value::Array(items)) => {
            if items.len() > MAX_LIST_OPERANDS {
                return Err(format!(
                    "operator {op_text:?} has {} operands, but the maximum is {MAX_LIST_OPERANDS}: split the list over several calls",
                    items.len()
                ));
            }
            Operand::List(items.iter().map(key_scalar).collect::<Result<_, _>>()?)
        }
        (FilterOp::In | FilterOp::NotIn, _) => {
            return Err(format!("operator {op_text:?} needs a list operand"))
        }
        (FilterOp::Like | FilterOp::ILike, Value::String(pattern)) => {
            if pattern.len() > MAX_PATTERN_BYTES {
                return Err(format!(
                    "the {op_text} pattern is {} bytes long, but the maximum is {MAX_PATTERN_BYTES} bytes",
                    pattern.len()
                ));
            }
            Operand::One(Scalar::Text(pattern.clone()))
        }
        (FilterOp::Like | FilterOp::ILike, _) => {
            return Err(format!("operator {op_text:?} needs a string pattern"))
        }
        (_, value) => Operand::One(key_scalar(value)?),
    };
    Ok(Filter {
        column,
        key: Some(key.to_string()),
        op,
        operand,
    })
}

/// Quotes a JSON value for an error message, shortened when it is long.
fn quote(value: &Value) -> String {
    shorten(value.to_string())
}

/// Quotes a text for an error message, shortened when it is long.
fn quote_text(text: &str) -> String {
    shorten(format!("{text:?}"))
}

fn shorten(text: String) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

/// Counts the SQL parameters a filter binds: a filter on a key binds the
/// key up to twice per operand besides the operand.
fn operand_count(filter: &Filter) -> usize {
    let operands = match &filter.operand {
        Operand::Null => 0,
        Operand::One(_) => 1,
        Operand::List(items) => items.len(),
    };
    if filter.key.is_some() {
        operands.max(1) * 3
    } else {
        operands
    }
}

/// Parses `filters` and `where` into one list of conditions, within the
/// limits above.
fn parse_filters(
    columns: &'static [Column],
    table: &str,
    params: &Params,
) -> Result<Vec<Filter>, ApiError> {
    let filters = match params.json("filters")? {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) if list.first().is_some_and(Value::is_string) => {
            vec![Value::Array(list)]
        }
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "invalid filters {}: expected a list of [attribute, operator, operand]",
                quote(&other)
            )))
        }
    };
    let conditions = match params.json("where")? {
        None => Map::new(),
        Some(Value::Object(conditions)) => conditions,
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid where: expected an object of attribute: value",
            ))
        }
    };
    let count = filters.len() + conditions.len();
    if count > MAX_FILTERS {
        return Err(ApiError::invalid(format!(
            "invalid filters: {count} conditions given (filters and where together), but the maximum is {MAX_FILTERS}"
        )));
    }

    let mut parsed = Vec::with_capacity(count);
    for filter in &filters {
        let filter = parse_filter(columns, table, filter).map_err(|reason| {
            ApiError::invalid(format!("invalid filter {}: {reason}", quote(filter)))
        })?;
        parsed.extend(filter);
    }
    for (attribute, value) in conditions {
        let op = if value.is_array() { "in" } else { "=" };
        let filter = Value::Array(vec![Value::String(attribute), Value::from(op), value]);
        let condition = parse_filter(columns, table, &filter).map_err(|reason| {
            ApiError::invalid(format!("invalid where {}: {reason}", quote(&filter)))
        })?;
        parsed.extend(condition);
    }

    let operands: usize = parsed.iter().map(operand_count).sum();
    if operands > MAX_TOTAL_OPERANDS {
        return Err(ApiError::invalid(format!(
            "invalid filters: they have {operands} operands together, but the maximum is {MAX_TOTAL_OPERANDS}: split the query over several calls"
        )));
    }
    Ok(parsed)
}

fn parse_order(
    columns: &'static [Column],
    table: &str,
    params: &Params,
) -> Result<Vec<Order>, ApiError> {
    let keys: Vec<String> = match params.json("order") {
        Ok(None) | Ok(Some(Value::Null)) => return Ok(Vec::new()),
        Ok(Some(Value::Array(items))) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(text),
                other => Err(ApiError::invalid(format!(
                    "invalid order {}: expected a string",
                    quote(&other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        Ok(Some(Value::String(text))) => text.split(',').map(str::to_string).collect(),
        Ok(Some(other)) => {
            return Err(ApiError::invalid(format!(
                "invalid order {}: expected a list such as [\"created_at desc\"]",
                quote(&other)
            )))
        }
        // Plain text such as `created_at desc, uuid`.
        Err(_) => params
            .text("order")
            .unwrap_or_default()
            .split(',')
            .map(str::to_string)
            .collect(),
    };
    let terms = keys.iter().filter(|key| !key.trim().is_empty()).count();
    if terms > MAX_ORDER_TERMS {
        return Err(ApiError::invalid(format!(
            "invalid order: {terms} sort terms given, but the maximum is {MAX_ORDER_TERMS}"
        )));
    }
    let mut order = Vec::new();
    for key in keys {
        let mut words = key.split_whitespace();
        let Some(name) = words.next() else { continue };
        let descending = match words.next().map(str::to_ascii_lowercase).as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "invalid order {}: expected \"<attribute> asc\" or \"<attribute> desc\"",
                    quote_text(&key)
                )))
            }
        };
        let column = column_named(columns, table, name).ok_or_else(|| {
            ApiError::invalid(format!(
                "invalid order {}: cannot sort by {}; use one of {}",
                quote_text(&key),
                quote_text(name),
                scalar_names(columns)
            ))
        })?;
        order.push(Order { column, descending });
    }
    Ok(order)
}

/// The list query of a list call's parameters.
pub fn list_query(
    columns: &'static [Column],
    table: &str,
    params: &Params,
    visibility: Visibility,
) -> Result<ListQuery, ApiError> {
    let count = match params.text("count").as_deref() {
        None | Some("exact") => true,
        Some("none") => false,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "invalid count parameter {other:?}: expected exact or none"
            )))
        }
    };
    Ok(ListQuery {
        visibility,
        filters: parse_filters(columns, table, params)?,
        order: parse_order(columns, table, params)?,
        limit: params.u64("limit")?.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
        offset: params.u64("offset")?.unwrap_or(0),
        count,
    })
}

/// Attributes a request accepts but no response returns.
const WRITE_ONLY_ATTRIBUTES: &[&str] = &["secret_mounts", "runtime_token"];

/// The `select` parameter: the attributes a response should keep.
/// The input of an update call: the attributes to change, and the
/// `select` of the response.
#[derive(Debug)]
pub struct UpdateInput {
    pub attributes: Map<String, Value>,
    pub select: Option<Vec<String>>,
}

/// Reads the body and query of an update call (`PUT` or `PATCH`) of a
/// record whose attributes may come wrapped in `wrapper`.
pub async fn update_input(
    headers: &HeaderMap,
    raw_query: Option<&str>,
    body: Body,
    max_body_bytes: usize,
    wrapper: &str,
    columns: &'static [Column],
) -> Result<UpdateInput, ApiError> {
    let body = read_body(headers, body, max_body_bytes, "the request body").await?;
    let params = params_with_body(headers, raw_query, &body)?;
    Ok(UpdateInput {
        attributes: attributes(headers, &params, &body, wrapper, columns)?,
        select: select(columns, &params)?,
    })
}

pub fn select(
    columns: &'static [Column],
    params: &Params,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = params.json("select")? else {
        return Ok(None);
    };
    let Value::Array(items) = value else {
        return Err(ApiError::invalid(
            "invalid select: expected a list of attribute names",
        ));
    };
    if items.len() > MAX_SELECT_ATTRIBUTES {
        return Err(ApiError::invalid(format!(
            "invalid select: {} attributes given, but the maximum is {MAX_SELECT_ATTRIBUTES}",
            items.len()
        )));
    }
    let mut names = Vec::new();
    for item in items {
        let name = item.as_str().ok_or_else(|| {
            ApiError::invalid(format!(
                "invalid select entry {}: expected an attribute name",
                quote(&item)
            ))
        })?;
        if WRITE_ONLY_ATTRIBUTES.contains(&name) {
            return Err(ApiError::invalid(format!(
                "invalid select: {name} is write-only and never returned"
            )));
        }
        if find_column(columns, name).is_none() && name != "kind" && name != "etag" {
            return Err(ApiError::invalid(format!(
                "invalid select: unknown attribute {}",
                quote_text(name)
            )));
        }
        names.push(name.to_string());
    }
    Ok(Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::REQUEST_COLUMNS;

    fn params(query: &str) -> Params {
        Params::from_query(Some(query))
    }

    #[test]
    fn filters_parse_from_query_json() {
        let p = params(r#"filters=[["state","=","Committed"],["priority",">",0]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.filters.len(), 2);
        assert_eq!(query.filters[0].column.name, "state");
        assert_eq!(query.filters[1].operand, Operand::One(Scalar::Integer(0)));
        assert_eq!(query.limit, DEFAULT_LIMIT);
        assert!(query.count);
    }

    #[test]
    fn single_filter_without_outer_list_is_accepted() {
        let p = params(r#"filters=["uuid","in",["a","b"]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.filters.len(), 1);
        assert_eq!(query.filters[0].op, FilterOp::In);
    }

    #[test]
    fn structured_attribute_cannot_be_filtered() {
        let p = params(r#"filters=[["mounts","=","x"]]"#);
        let err =
            list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap_err();
        assert!(
            err.to_string().contains("\"mounts\" cannot be filtered"),
            "{err}"
        );
    }

    #[test]
    fn order_accepts_json_list_and_plain_text() {
        let p = params(r#"order=["created_at desc","container_requests.uuid asc"]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.order.len(), 2);
        assert!(query.order[0].descending);
        assert_eq!(query.order[1].column.name, "uuid");
        let p = params("order=priority+desc,+name");
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.order.len(), 2);
        assert_eq!(query.order[1].column.name, "name");
    }

    #[test]
    fn limit_is_capped_and_count_checked() {
        let p = params("limit=5000&count=none");
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.limit, MAX_LIMIT);
        assert!(!query.count);
        assert!(list_query(
            REQUEST_COLUMNS,
            "container_requests",
            &params("limit=-1"),
            Visibility::All
        )
        .is_err());
        assert!(list_query(
            REQUEST_COLUMNS,
            "container_requests",
            &params("count=some"),
            Visibility::All
        )
        .is_err());
    }

    #[test]
    fn is_a_matches_the_type_code_of_a_uuid() {
        let p = params(r#"filters=[["owner_uuid","is_a","arvados#user"]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.filters.len(), 1);
        assert_eq!(query.filters[0].column.name, "owner_uuid");
        assert_eq!(query.filters[0].op, FilterOp::Like);
        assert_eq!(
            query.filters[0].operand,
            Operand::List(vec![Scalar::Text("_____-tpzed-_______________".into())])
        );
    }

    #[test]
    fn is_a_on_uuid_is_true_or_false_for_the_table() {
        let own = params(r#"filters=[["uuid","is_a",["arvados#containerRequest"]]]"#);
        let query =
            list_query(REQUEST_COLUMNS, "container_requests", &own, Visibility::All).unwrap();
        assert!(query.filters.is_empty());

        let other = params(r#"filters=[["uuid","is_a","arvados#collection"]]"#);
        let query = list_query(
            REQUEST_COLUMNS,
            "container_requests",
            &other,
            Visibility::All,
        )
        .unwrap();
        assert_eq!(query.filters.len(), 1);
        assert_eq!(query.filters[0].operand, Operand::Null);
        assert_eq!(query.filters[0].op, FilterOp::Eq);
    }

    #[test]
    fn is_a_with_unknown_kind_matches_nothing() {
        let p = params(r#"filters=[["container_uuid","is_a","arvados#nothing"]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.filters[0].column.name, "uuid");
        assert_eq!(query.filters[0].operand, Operand::Null);
    }

    #[test]
    fn is_a_with_several_kinds_matches_any() {
        let p = params(r#"filters=[["owner_uuid","is_a",["arvados#user","arvados#group"]]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(
            query.filters[0].operand,
            Operand::List(vec![
                Scalar::Text("_____-tpzed-_______________".into()),
                Scalar::Text("_____-j7d0g-_______________".into()),
            ])
        );
    }

    #[test]
    fn exists_tests_keys_of_object_attributes() {
        let p = params(r#"filters=[["properties","exists","a"]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(query.filters[0].column.name, "properties");
        assert_eq!(query.filters[0].key.as_deref(), Some("a"));
        assert_eq!(query.filters[0].op, FilterOp::Exists);
        assert_eq!(query.filters[0].operand, Operand::One(Scalar::Bool(true)));
        let p = params(r#"filters=[["state","exists",true]]"#);
        let err =
            list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap_err();
        assert!(
            err.to_string().contains("only to object attributes"),
            "{err}"
        );
    }

    #[test]
    fn timestamp_operand_is_normalised() {
        let p = params(r#"filters=[["created_at",">=","2024-01-01T00:00:00Z"]]"#);
        let query = list_query(REQUEST_COLUMNS, "container_requests", &p, Visibility::All).unwrap();
        assert_eq!(
            query.filters[0].operand,
            Operand::One(Scalar::Text("2024-01-01T00:00:00.000000000Z".into()))
        );
    }

    #[test]
    fn wrapped_and_bare_bodies_give_attributes() {
        let headers = HeaderMap::new();
        let none = Params::default();
        let wrapped = attributes(
            &headers,
            &none,
            br#"{"container_request": {"name": "a"}}"#,
            "container_request",
            REQUEST_COLUMNS,
        )
        .unwrap();
        assert_eq!(wrapped["name"], "a");
        let bare = attributes(
            &headers,
            &none,
            br#"{"name": "b", "select": ["uuid"]}"#,
            "container_request",
            REQUEST_COLUMNS,
        )
        .unwrap();
        assert_eq!(bare["name"], "b");
        assert!(!bare.contains_key("select"));
        let empty = attributes(&headers, &none, b"", "container_request", REQUEST_COLUMNS).unwrap();
        assert!(empty.is_empty());
        assert!(attributes(
            &headers,
            &none,
            b"[1]",
            "container_request",
            REQUEST_COLUMNS
        )
        .is_err());
    }

    #[test]
    fn bare_form_fields_are_attributes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let body = b"name=1&priority=3&command=%5B%22true%22%5D&a=b&alt=json";
        let params = params_with_body(&headers, None, body).unwrap();
        let form = attributes(
            &headers,
            &params,
            body,
            "container_request",
            REQUEST_COLUMNS,
        )
        .unwrap();
        assert_eq!(form["name"], "1");
        assert_eq!(form["priority"], 3);
        assert_eq!(form["command"], serde_json::json!(["true"]));
        assert_eq!(form["a"], "b");
        assert!(!form.contains_key("alt"));

        let body = b"priority=high";
        let params = params_with_body(&headers, None, body).unwrap();
        let err = attributes(
            &headers,
            &params,
            body,
            "container_request",
            REQUEST_COLUMNS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("priority"), "{err}");
    }
}
