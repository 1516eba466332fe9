//! What both SQL backends share for the container change feed: the query
//! of one page and the decoding of its rows.
//!
//! A page reads the counter and the changed rows in one snapshot, so the
//! counter's value covers every change the rows show. It reads one row
//! more than the limit, which shows whether more changes follow.

use std::sync::LazyLock;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::mapping::{decode_record, to_i64};
use super::{ChangePage, ChangedContainer, Result, StoreError, CONTAINER_COLUMNS};

/// Reads the counter: the change sequence number of the latest change.
pub(super) const LATEST_CHANGE_SEQ: &str =
    "SELECT value FROM container_change_counter WHERE id = 1";

static SELECT_CHANGED: LazyLock<String> = LazyLock::new(|| {
    let names: Vec<&str> = CONTAINER_COLUMNS.iter().map(|c| c.name).collect();
    format!(
        "SELECT {}, version, change_seq FROM containers",
        names.join(", ")
    )
});

/// Builds the page query, with `?` placeholders for the cursor, then the
/// parameters of `visibility` (a condition on the containers table), then
/// the row limit ([`row_limit`]).
pub(super) fn page_query(visibility: Option<&str>) -> String {
    let mut condition = "change_seq > ?".to_string();
    if let Some(visibility) = visibility {
        condition.push_str(" AND ");
        condition.push_str(visibility);
    }
    format!(
        "{} WHERE {condition} ORDER BY change_seq LIMIT ?",
        *SELECT_CHANGED
    )
}

/// Returns the row limit of a page of `limit` items: one more, so that the
/// page shows whether more follow.
pub(super) fn row_limit(limit: u64) -> i64 {
    to_i64(limit).saturating_add(1)
}

/// Decodes the rows of [`page_query`] into a page of at most `limit`
/// items.
pub(super) fn decode_page<R>(rows: &[R], limit: u64, latest_change_seq: i64) -> Result<ChangePage>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<f64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<bool>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    let items = rows
        .iter()
        .take(limit)
        .map(|row| {
            let change_seq: i64 = row
                .try_get("change_seq")
                .map_err(StoreError::query("read a container's change"))?;
            let container = decode_record("containers", CONTAINER_COLUMNS, row)?;
            Ok(ChangedContainer {
                change_seq,
                container,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ChangePage {
        items,
        more,
        latest_change_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_query_orders_by_change_seq() {
        let sql = page_query(Some("uuid = ?"));
        assert!(
            sql.contains(", version, change_seq FROM containers"),
            "{sql}"
        );
        assert!(
            sql.ends_with("WHERE change_seq > ? AND uuid = ? ORDER BY change_seq LIMIT ?"),
            "{sql}"
        );
        let sql = page_query(None);
        assert!(
            sql.ends_with("WHERE change_seq > ? ORDER BY change_seq LIMIT ?"),
            "{sql}"
        );
    }

    #[test]
    fn row_limit_asks_for_one_more() {
        assert_eq!(row_limit(1000), 1001);
        assert_eq!(row_limit(u64::MAX), i64::MAX);
    }
}
