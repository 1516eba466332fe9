//! `GET containers/changes`: the container change feed, a Berth extension
//! (Arvados has no such route).
//!
//! The store gives every insert and update of a container the next change
//! sequence number, in commit order. A *cursor* is the decimal sequence
//! number up to which a caller has seen the changes. The feed returns the
//! containers the caller may see (as `GET containers` does) whose latest
//! change is past the cursor, oldest first, each once with its current
//! record, and the cursor to pass as `after` next time.
//!
//! Parameters:
//! - `after`: the cursor. Without it (or empty), the response comes at
//!   once, with no items and the current cursor: a client takes a cursor, lists,
//!   then follows the feed from the cursor and misses no change.
//! - `wait`: seconds, a whole number. A call that finds no change is held
//!   until a change commits, the wait (at most [`MAX_WAIT`]) ends, or the
//!   server shuts down. The handler subscribes to the
//!   [`Notifier`](crate::notify::Notifier) before it reads the store, so a
//!   change that commits between the read and the wait still wakes it.
//! - `limit`: items per page, a whole number from 1 to [`MAX_LIMIT`],
//!   [`MAX_LIMIT`] by default. Any other value is rejected with 422, so a
//!   caller never gets a page size other than the one it requested. `more:
//!   true` means the page was cut at the limit, and the caller should call
//!   again at once.
//!
//! A cursor the server did not issue, or one ahead of the database's
//! latest change (the database was replaced), is rejected with 422, and
//! the client takes a new cursor and lists everything again.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::Json;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::containers::{self, visibility};
use super::params::Params;
use super::{render, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::ChangePage;

/// The `kind` of the response.
pub const LIST_KIND: &str = "berth#containerChangeList";

/// Maximum time a call may wait for a change: the same as a log read's,
/// which `request_timeout_seconds` must exceed.
pub const MAX_WAIT: Duration = super::logs::MAX_WAIT;

/// List parameters that the change feed does not take; a call that
/// sends one is rejected rather than served unfiltered.
const LIST_ONLY_PARAMETERS: &[&str] = &["filters", "where", "order", "select", "offset", "count"];

/// Maximum items per page, and the default.
pub const MAX_LIMIT: u64 = 1000;

/// Maximum characters of a rejected parameter quoted in an error message.
const MAX_QUOTED_CHARS: usize = 100;

/// `GET containers/changes?after=CURSOR&wait=SECONDS&limit=N`.
pub async fn changes(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = Params::from_query(query.as_deref());
    for name in LIST_ONLY_PARAMETERS {
        if params.text(name).is_some() {
            return Err(ApiError::invalid(format!(
                "the change feed takes no {name} parameter: it returns every container you may see that changed; filter the items yourself, or list with GET containers"
            )));
        }
    }
    let after = params.text("after").filter(|text| !text.is_empty());
    let after = after.as_deref().map(parse_cursor).transpose()?;
    let wait = params.u64("wait")?.map_or(Duration::ZERO, |seconds| {
        Duration::from_secs(seconds.min(MAX_WAIT.as_secs()))
    });
    let limit = parse_limit(params.text("limit").as_deref())?;

    let Some((after, after_text)) = after else {
        let latest = state
            .store()
            .latest_change_seq()
            .await
            .map_err(ApiError::store("read the latest container change"))?;
        return Ok(Json(response(latest.to_string(), Vec::new(), false)));
    };

    // Subscribe before reading, so a change between the read and the wait
    // still wakes this request.
    let mut changes = state.notifier().subscribe_changes();
    let mut shutdown = state.shutdown_receiver();
    let deadline = Instant::now() + wait;
    let visibility = visibility(&caller);
    loop {
        let page = state
            .store()
            .container_changes(after, &visibility, limit)
            .await
            .map_err(ApiError::store("read container changes"))?;
        if after > page.latest_change_seq {
            return Err(invalid_cursor(
                &after_text,
                &format!(
                    "it is ahead of the database's latest change, {}, so the database was replaced or restored",
                    page.latest_change_seq
                ),
            ));
        }
        if !page.items.is_empty() || wait.is_zero() || *shutdown.borrow() {
            return render_page(page);
        }
        tokio::select! {
            changed = changes.changed() => {
                // The notifier lives as long as the state, so this does not
                // happen. Return the page rather than spin.
                if changed.is_err() {
                    return render_page(page);
                }
            }
            _ = tokio::time::sleep_until(deadline) => return render_page(page),
            _ = shutdown.changed() => return render_page(page),
        }
    }
}

/// Parses a cursor: the decimal change sequence number the server issued.
/// Returns it with its text, for messages.
fn parse_cursor(text: &str) -> Result<(i64, String), ApiError> {
    let is_decimal = text.bytes().all(|byte| byte.is_ascii_digit());
    match text.parse::<i64>() {
        Ok(seq) if is_decimal => Ok((seq, text.to_string())),
        Ok(_) | Err(_) => Err(invalid_cursor(
            text,
            "it is not a cursor this server issued",
        )),
    }
}

fn invalid_cursor(text: &str, reason: &str) -> ApiError {
    ApiError::invalid(format!(
        "invalid cursor {}: {reason}; take a new cursor by calling without after",
        quote(text)
    ))
}

/// Quotes a parameter's text for a message, shortened when it is long.
fn quote(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{:?}...", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// Parses `limit`: a whole number from 1 to [`MAX_LIMIT`], the maximum when
/// absent.
fn parse_limit(text: Option<&str>) -> Result<u64, ApiError> {
    let Some(text) = text else {
        return Ok(MAX_LIMIT);
    };
    match text.trim().parse::<u64>() {
        Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
        Ok(_) | Err(_) => Err(ApiError::invalid(format!(
            "invalid limit parameter {}: expected a whole number from 1 to {MAX_LIMIT}",
            quote(text)
        ))),
    }
}

/// Renders a page. The cursor is the last item's sequence number when the
/// page was cut at the limit, and otherwise the latest change the page's
/// snapshot holds, so that changes the caller may not see are not read
/// again.
fn render_page(page: ChangePage) -> Result<Json<Value>, ApiError> {
    let cursor = match page.items.last() {
        Some(last) if page.more => last.change_seq,
        Some(_) | None => page.latest_change_seq,
    };
    let items = page
        .items
        .iter()
        .map(|item| render::record(containers::KIND, &item.container.record, None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(response(cursor.to_string(), items, page.more)))
}

fn response(cursor: String, items: Vec<Value>, more: bool) -> Value {
    json!({
        "kind": LIST_KIND,
        "cursor": cursor,
        "items": items,
        "more": more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(err: ApiError) -> String {
        err.to_string()
    }

    #[test]
    fn cursors_are_decimal_numbers() {
        assert_eq!(parse_cursor("0").unwrap().0, 0);
        assert_eq!(parse_cursor("42").unwrap().0, 42);
        for bad in ["-1", "+1", "1.5", " 1", "abc", "99999999999999999999"] {
            let err = message(parse_cursor(bad).unwrap_err());
            assert!(err.contains(&format!("invalid cursor {bad:?}")), "{err}");
            assert!(err.contains("calling without after"), "{err}");
        }
    }

    #[test]
    fn long_cursor_is_shortened_in_message() {
        let err = message(parse_cursor(&"x".repeat(5000)).unwrap_err());
        assert!(err.len() < 300, "{err}");
    }

    #[test]
    fn limits_outside_the_range_are_rejected() {
        assert_eq!(parse_limit(None).unwrap(), MAX_LIMIT);
        assert_eq!(parse_limit(Some("7")).unwrap(), 7);
        assert_eq!(parse_limit(Some("1000")).unwrap(), MAX_LIMIT);
        for bad in ["0", "-1", "1001", "100000", "1.5", "", "abc"] {
            let err = message(parse_limit(Some(bad)).unwrap_err());
            assert_eq!(
                err,
                format!("invalid limit parameter {bad:?}: expected a whole number from 1 to 1000")
            );
        }
    }
}
