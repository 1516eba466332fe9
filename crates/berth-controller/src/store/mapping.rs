//! What the SQL backends share: how a record maps to the values of its
//! columns and back, how secrets map to their two columns, and the ORDER
//! BY clause of a list.
//!
//! A record is serialised to a JSON object, and each column takes the
//! value of the field of its name. Reading builds the object back from the
//! columns and deserialises it. Structured fields are stored as JSON text.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{ColumnIndex, Decode, Row, Type};

use berth_core::Secret;

use super::{
    Column, ColumnKind, Filter, FilterOp, ListQuery, Operand, Result, Scalar, Secrets, StoreError,
    Versioned,
};

/// Encodes secrets as the values of the columns `secret_mounts` (JSON
/// text) and `runtime_token` (text), in that order, each NULL when there
/// is none.
pub(super) fn encode_secrets(
    table: &'static str,
    uuid: &str,
    secrets: &Secrets,
) -> Result<[Option<String>; 2]> {
    let secret_mounts = if secrets.secret_mounts.is_empty() {
        None
    } else {
        let text =
            serde_json::to_string(&secrets.secret_mounts).map_err(|_| StoreError::Encode {
                table,
                uuid: uuid.to_string(),
                reason: "the secret mounts do not serialise to JSON".into(),
            })?;
        Some(text)
    };
    let runtime_token = secrets
        .runtime_token
        .as_ref()
        .map(|token| token.expose().to_string());
    Ok([secret_mounts, runtime_token])
}

/// Decodes the columns `secret_mounts`, `runtime_token` and `version` of
/// a row of `table`.
pub(super) fn decode_secrets<R>(
    table: &'static str,
    uuid: &str,
    row: &R,
) -> Result<Versioned<Secrets>>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let read_error = StoreError::query("read secrets");
    let secret_mounts: Option<String> = row.try_get("secret_mounts").map_err(read_error)?;
    let runtime_token: Option<String> = row.try_get("runtime_token").map_err(read_error)?;
    let version: i64 = row.try_get("version").map_err(read_error)?;
    let secret_mounts = match secret_mounts {
        None => Default::default(),
        Some(text) => serde_json::from_str(&text).map_err(|err| StoreError::DecodeSecrets {
            table,
            uuid: uuid.to_string(),
            line: err.line(),
            column: err.column(),
        })?,
    };
    let secrets = Secrets {
        secret_mounts,
        runtime_token: runtime_token.map(Secret::new),
    };
    Ok(Versioned {
        record: secrets,
        version,
    })
}

/// A value bound to a statement parameter.
#[derive(Debug, Clone)]
pub(super) enum Bound {
    Text(Option<String>),
    Integer(Option<i64>),
    Real(Option<f64>),
    Bool(Option<bool>),
}

impl From<&Scalar> for Bound {
    fn from(scalar: &Scalar) -> Bound {
        match scalar {
            Scalar::Text(text) => Bound::Text(Some(text.clone())),
            Scalar::Integer(value) => Bound::Integer(Some(*value)),
            Scalar::Real(value) => Bound::Real(Some(*value)),
            Scalar::Bool(value) => Bound::Bool(Some(*value)),
        }
    }
}

/// Encodes the column values of a record, in the table's column order.
pub(super) fn encode_record<T: Serialize>(
    table: &'static str,
    columns: &[Column],
    uuid: &str,
    record: &T,
) -> Result<Vec<Bound>> {
    let encode_error = |reason: String| StoreError::Encode {
        table,
        uuid: uuid.to_string(),
        reason,
    };
    let value = serde_json::to_value(record).map_err(|err| encode_error(err.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(encode_error("the record is not a JSON object".into()));
    };
    columns
        .iter()
        .map(|column| {
            let value = fields.get(column.name).unwrap_or(&Value::Null);
            if column.kind != ColumnKind::Json && value.as_str().is_some_and(|t| t.contains('\0')) {
                return Err(StoreError::NulCharacter {
                    field: column.name.to_string(),
                });
            }
            encode_value(column, value).ok_or_else(|| {
                encode_error(format!(
                    "field {} has the unexpected value {value}",
                    column.name
                ))
            })
        })
        .collect()
}

fn encode_value(column: &Column, value: &Value) -> Option<Bound> {
    let bound = match (column.kind, value) {
        (ColumnKind::Json, value) => Bound::Text(Some(value.to_string())),
        (ColumnKind::Text | ColumnKind::Timestamp, Value::Null) => Bound::Text(None),
        (ColumnKind::Text | ColumnKind::Timestamp, Value::String(text)) => {
            Bound::Text(Some(text.clone()))
        }
        (ColumnKind::Integer, Value::Null) => Bound::Integer(None),
        (ColumnKind::Integer, Value::Number(number)) => Bound::Integer(Some(number.as_i64()?)),
        (ColumnKind::Real, Value::Null) => Bound::Real(None),
        (ColumnKind::Real, Value::Number(number)) => Bound::Real(Some(number.as_f64()?)),
        (ColumnKind::Bool, Value::Null) => Bound::Bool(None),
        (ColumnKind::Bool, Value::Bool(value)) => Bound::Bool(Some(*value)),
        _ => return None,
    };
    Some(bound)
}

pub(super) fn decode_record<T, R>(
    table: &'static str,
    columns: &[Column],
    row: &R,
) -> Result<Versioned<T>>
where
    T: DeserializeOwned,
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<f64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<bool>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let read_error = StoreError::query("read a row");
    let mut fields = Map::new();
    let mut json_errors = Vec::new();
    for column in columns {
        let name = column.name;
        let value = match column.kind {
            ColumnKind::Text | ColumnKind::Timestamp => row
                .try_get::<Option<String>, _>(name)
                .map_err(read_error)?
                .map(Value::String),
            ColumnKind::Integer => row
                .try_get::<Option<i64>, _>(name)
                .map_err(read_error)?
                .map(Value::from),
            ColumnKind::Real => row
                .try_get::<Option<f64>, _>(name)
                .map_err(read_error)?
                .map(Value::from),
            ColumnKind::Bool => row
                .try_get::<Option<bool>, _>(name)
                .map_err(read_error)?
                .map(Value::Bool),
            ColumnKind::Json => match row.try_get::<Option<String>, _>(name).map_err(read_error)? {
                Some(text) => match serde_json::from_str(&text) {
                    Ok(value) => Some(value),
                    Err(err) => {
                        json_errors.push(err);
                        None
                    }
                },
                None => None,
            },
        };
        fields.insert(name.to_string(), value.unwrap_or(Value::Null));
    }
    let version: i64 = row.try_get("version").map_err(read_error)?;
    let uuid = fields
        .get("uuid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let decode_error = |source| StoreError::Decode {
        table,
        uuid: uuid.clone(),
        source,
    };
    if let Some(err) = json_errors.pop() {
        return Err(decode_error(err));
    }
    let record = serde_json::from_value(Value::Object(fields)).map_err(decode_error)?;
    Ok(Versioned { record, version })
}

/// Rejects a text operand that contains U+0000, which no stored text
/// contains (see [`StoreError::NulCharacter`]).
pub(super) fn check_filter_text(filters: &[Filter]) -> Result<()> {
    for filter in filters {
        if filter.key.as_deref().is_some_and(|key| key.contains('\0')) {
            return Err(StoreError::NulCharacter {
                field: format!("the key of the filter on {}", filter.column.name),
            });
        }
        let scalars: &[Scalar] = match &filter.operand {
            Operand::One(scalar) => std::slice::from_ref(scalar),
            Operand::List(items) => items,
            Operand::Null => &[],
        };
        let has_nul = scalars
            .iter()
            .any(|scalar| matches!(scalar, Scalar::Text(text) if text.contains('\0')));
        if has_nul {
            return Err(StoreError::NulCharacter {
                field: format!("the filter on {}", filter.column.name),
            });
        }
    }
    Ok(())
}

/// Builds the ORDER BY clause of a list query: the requested keys, then
/// `uuid` for a total order.
pub(super) fn order_clause(query: &ListQuery) -> String {
    let mut keys: Vec<String> = query
        .order
        .iter()
        .map(|order| {
            format!(
                "{} {}",
                order.column.name,
                if order.descending { "DESC" } else { "ASC" }
            )
        })
        .collect();
    if !query.order.iter().any(|order| order.column.name == "uuid") {
        let descending = query.order.first().is_none_or(|order| order.descending);
        keys.push(format!("uuid {}", if descending { "DESC" } else { "ASC" }));
    }
    if query.order.is_empty() {
        keys.insert(0, "modified_at DESC".to_string());
    }
    format!(" ORDER BY {}", keys.join(", "))
}

/// Converts a byte count or offset to SQL's signed integer, saturating.
pub(super) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The SQL of each store for filters on a key of an object column. In
/// each template, `{col}` is the column and every `?` is the key, bound as
/// [`JsonSql::key_param`] makes it.
pub(super) struct JsonSql {
    /// True when the key is present (its value may be JSON null).
    pub exists: &'static str,
    /// The value at the key when it is a string, else NULL.
    pub text: &'static str,
    /// The value at the key when it is a number, else NULL.
    pub number: &'static str,
    /// The value at the key when it is a bool, else NULL.
    pub boolean: &'static str,
    /// The value at the key as text, NULL when the key is missing or its
    /// value is JSON null.
    pub any: &'static str,
    /// The case-sensitive match of a LIKE pattern (`%`, `_`, `\`
    /// escapes), with one `?` for the pattern as `like_param` makes it.
    pub like: &'static str,
    pub like_param: fn(&str) -> String,
    /// The match that ignores ASCII case, and its pattern.
    pub ilike: &'static str,
    pub ilike_param: fn(&str) -> String,
    /// Turns a key into the value bound to each `?` of a template.
    pub key_param: fn(&str) -> String,
    /// The literal of an always-false condition.
    pub false_literal: &'static str,
}

impl JsonSql {
    /// Expands a template for a column and key, binding the key for each
    /// placeholder.
    fn expand(&self, template: &str, column: &str, key: &str, params: &mut Vec<Bound>) -> String {
        let placeholders = template.matches('?').count();
        for _ in 0..placeholders {
            params.push(Bound::Text(Some((self.key_param)(key))));
        }
        template.replace("{col}", column)
    }

    /// The expression of the value at the key that a scalar operand can
    /// be compared with, and the operand as bound.
    fn typed(
        &self,
        column: &str,
        key: &str,
        scalar: &Scalar,
        params: &mut Vec<Bound>,
    ) -> (String, Bound) {
        match scalar {
            Scalar::Text(text) => (
                self.expand(self.text, column, key, params),
                Bound::Text(Some(text.clone())),
            ),
            // Numbers compare as floating point, whatever their JSON form.
            #[allow(clippy::cast_precision_loss)]
            Scalar::Integer(value) => (
                self.expand(self.number, column, key, params),
                Bound::Real(Some(*value as f64)),
            ),
            Scalar::Real(value) => (
                self.expand(self.number, column, key, params),
                Bound::Real(Some(*value)),
            ),
            Scalar::Bool(value) => (
                self.expand(self.boolean, column, key, params),
                Bound::Bool(Some(*value)),
            ),
        }
    }
}

/// Builds the condition of a filter on a key of an object column.
pub(super) fn key_condition(
    sql: &JsonSql,
    filter: &Filter,
    key: &str,
    params: &mut Vec<Bound>,
) -> String {
    let column = filter.column.name;
    match (filter.op, &filter.operand) {
        (FilterOp::Exists, Operand::One(Scalar::Bool(present))) => {
            let exists = sql.expand(sql.exists, column, key, params);
            if *present {
                exists
            } else {
                format!("NOT ({exists})")
            }
        }
        (FilterOp::Eq, Operand::Null) => {
            format!("{} IS NULL", sql.expand(sql.any, column, key, params))
        }
        (FilterOp::NotEq, Operand::Null) => {
            format!("{} IS NOT NULL", sql.expand(sql.any, column, key, params))
        }
        (FilterOp::In | FilterOp::NotIn, Operand::List(items)) => {
            let alternatives: Vec<String> = items
                .iter()
                .map(|item| {
                    let (expr, bound) = sql.typed(column, key, item, params);
                    params.push(bound);
                    format!("{expr} = ?")
                })
                .collect();
            let any = if alternatives.is_empty() {
                sql.false_literal.to_string()
            } else {
                format!(
                    "COALESCE({}, {})",
                    alternatives.join(" OR "),
                    sql.false_literal
                )
            };
            if filter.op == FilterOp::NotIn {
                format!("NOT ({any})")
            } else {
                any
            }
        }
        (op @ (FilterOp::Like | FilterOp::ILike), Operand::One(Scalar::Text(pattern))) => {
            let expr = sql.expand(sql.text, column, key, params);
            let (operator, param) = if op == FilterOp::Like {
                (sql.like, sql.like_param)
            } else {
                (sql.ilike, sql.ilike_param)
            };
            params.push(Bound::Text(Some(param(pattern))));
            format!("{expr} {operator}")
        }
        (op, Operand::One(scalar)) => {
            let symbol = match op {
                FilterOp::Eq => "=",
                FilterOp::Lt => "<",
                FilterOp::Le => "<=",
                FilterOp::Gt => ">",
                FilterOp::Ge => ">=",
                FilterOp::NotEq => {
                    let (expr, bound) = sql.typed(column, key, scalar, params);
                    params.push(bound);
                    return format!("COALESCE({expr} = ?, {0}) = {0}", sql.false_literal);
                }
                _ => return sql.false_literal.to_string(),
            };
            let (expr, bound) = sql.typed(column, key, scalar, params);
            params.push(bound);
            format!("{expr} {symbol} ?")
        }
        _ => sql.false_literal.to_string(),
    }
}
