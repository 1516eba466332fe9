//! The controller's change feed, as the dispatch loop follows it.
//!
//! A [`ChangeFeed`] keeps a *cursor* (the feed's position, opaque to the
//! dispatcher) and at most one *read* in flight: a long-poll to which the
//! controller responds as soon as a container changes after the cursor, or
//! when its wait ends. The loop owns the feed and polls the read next to
//! its other timers, so a read costs no task of its own, and dropping the
//! feed (at shutdown) cancels the request.
//!
//! The feed counts its failures in a row; [`ChangeFeed::retry_delay`]
//! turns the count into the delay before the loop tries again. A read that
//! returns a page resets the count.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_client::{ClientError, ContainerChanges};

use crate::api::ControllerApi;

/// Time the controller may keep one read open while nothing changes:
/// below the controller's cap of 30 s, and below the idle timeouts of
/// proxies such as nginx (`proxy_read_timeout`, 60 s by default).
pub const CHANGE_FEED_WAIT: Duration = Duration::from_secs(25);

/// Delay before the second attempt after failures in a row; it doubles
/// with each further failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);

type Read = Pin<Box<dyn Future<Output = Result<ContainerChanges, ClientError>> + Send>>;

/// A cursor into the change feed and the read in flight from it.
pub struct ChangeFeed {
    api: Arc<dyn ControllerApi>,
    wait: Duration,
    cursor: Option<String>,
    read: Option<Read>,
    failures: u32,
    /// The `Retry-After` of the latest failure, if the controller sent one.
    retry_after: Option<Duration>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("cursor", &self.cursor)
            .field("reading", &self.read.is_some())
            .field("failures", &self.failures)
            .finish()
    }
}

impl ChangeFeed {
    /// Creates a feed without a cursor whose reads wait up to `wait`.
    pub fn new(api: Arc<dyn ControllerApi>, wait: Duration) -> ChangeFeed {
        ChangeFeed {
            api,
            wait,
            cursor: None,
            read: None,
            failures: 0,
            retry_after: None,
        }
    }

    /// True when the feed has a cursor to read from.
    pub fn has_cursor(&self) -> bool {
        self.cursor.is_some()
    }

    /// Returns the number of failures in a row since a read last returned
    /// a page.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Takes the controller's current cursor, dropping any read in flight.
    /// The caller lists the containers afterwards, so a change made
    /// between the two calls shows in the list or in the feed, or in both.
    pub async fn take_cursor(&mut self) -> Result<(), ClientError> {
        self.read = None;
        self.cursor = None;
        match self.api.container_changes(None, Duration::ZERO).await {
            Ok(page) => {
                self.cursor = Some(page.cursor);
                Ok(())
            }
            Err(err) => {
                self.failures += 1;
                self.retry_after = err.retry_after();
                Err(err)
            }
        }
    }

    /// Drops the read in flight. Its response may have been made before the
    /// loop's latest calls to the controller, and a record older than the
    /// loop's own lock would look like a lost lock. The cursor stays, so the next read
    /// returns the same changes with their latest records.
    pub fn pause(&mut self) {
        self.read = None;
    }

    /// Starts a read from the cursor, unless one is in flight or there is
    /// no cursor.
    pub fn resume(&mut self) {
        if self.read.is_some() {
            return;
        }
        let Some(cursor) = self.cursor.clone() else {
            return;
        };
        let api = Arc::clone(&self.api);
        let wait = self.wait;
        self.read = Some(Box::pin(async move {
            api.container_changes(Some(&cursor), wait).await
        }));
    }

    /// Waits for the read in flight to end, and moves the cursor past the
    /// page it returns. A failed read drops the cursor: the loop then
    /// resynchronises, which takes a new one. Without a read in flight this
    /// never returns.
    ///
    /// Cancel safe: the read lives in the feed, not in this future, so
    /// dropping this future loses nothing.
    pub async fn next_page(&mut self) -> Result<ContainerChanges, ClientError> {
        let Some(read) = self.read.as_mut() else {
            return std::future::pending().await;
        };
        let result = read.await;
        self.read = None;
        match &result {
            Ok(page) => {
                self.cursor = Some(page.cursor.clone());
                self.failures = 0;
                self.retry_after = None;
            }
            Err(err) => {
                self.cursor = None;
                self.failures += 1;
                self.retry_after = err.retry_after();
            }
        }
        result
    }

    /// Returns the delay before the next attempt: none after the first
    /// failure in a row, then [`RETRY_FIRST`], doubling up to `max`. A
    /// controller's `Retry-After` on the latest failure is waited in full,
    /// even past `max`, because it is the controller's own estimate of when it can serve again.
    pub fn retry_delay(&self, max: Duration) -> Duration {
        let hint = self.retry_after.unwrap_or_default();
        if self.failures <= 1 {
            return hint;
        }
        let factor = 1u32 << (self.failures - 2).min(16);
        RETRY_FIRST.saturating_mul(factor).min(max).max(hint)
    }
}

/// Waits for the next page of `feed`; never returns without a feed.
pub async fn next_page(feed: Option<&mut ChangeFeed>) -> Result<ContainerChanges, ClientError> {
    match feed {
        Some(feed) => feed.next_page().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeController;

    fn feed(controller: &FakeController) -> ChangeFeed {
        ChangeFeed::new(Arc::new(controller.clone()), Duration::from_secs(25))
    }

    #[test]
    fn retry_delay_grows_to_the_maximum() {
        let controller = FakeController::default();
        let mut feed = feed(&controller);
        let max = Duration::from_secs(30);
        let mut delays = Vec::new();
        for _ in 0..8 {
            feed.failures += 1;
            delays.push(feed.retry_delay(max).as_secs());
        }
        assert_eq!(delays, [0, 1, 2, 4, 8, 16, 30, 30]);
        feed.failures = 1000;
        assert_eq!(feed.retry_delay(max), max);
    }

    #[test]
    fn retry_delay_waits_the_controllers_retry_after() {
        let controller = FakeController::default();
        let mut feed = feed(&controller);
        let max = Duration::from_secs(30);
        feed.failures = 1;
        feed.retry_after = Some(Duration::from_secs(7));
        assert_eq!(feed.retry_delay(max), Duration::from_secs(7));
        feed.failures = 3;
        assert_eq!(feed.retry_delay(max), Duration::from_secs(7));
        feed.retry_after = Some(Duration::from_secs(60));
        assert_eq!(feed.retry_delay(max), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_read_drops_the_cursor() {
        let controller = FakeController::default();
        let mut feed = feed(&controller);
        feed.take_cursor().await.unwrap();
        assert!(feed.has_cursor());
        controller.fail_feed_reads(1);
        feed.resume();
        let err = feed.next_page().await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(503));
        assert!(!feed.has_cursor());
        assert_eq!(feed.failures(), 1);
        feed.take_cursor().await.unwrap();
        feed.resume();
        let page = feed.next_page().await.unwrap();
        assert!(page.items.is_empty(), "the wait ended without a change");
        assert_eq!(feed.failures(), 0);
    }
}
