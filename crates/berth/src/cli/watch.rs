//! Waiting for a container to change, through the controller's change
//! feed (`GET containers/changes`), instead of looking at it again and
//! again.
//!
//! A [`ContainerWatch`] keeps a cursor of the feed. Its first
//! [`changed`](ContainerWatch::changed) takes the cursor and returns at
//! once, so the caller looks at the container right away; each later call
//! keeps a long-poll open until the container changes, or the feed's wait ends
//! (then the caller looks once more, which covers changes the feed does not
//! carry, such as a request becoming Final).
//!
//! A controller without the feed (404), or a feed that fails, makes the
//! watch fall back to a fixed delay between looks, so the commands work
//! with any controller.

use std::time::Duration;

use berth_client::ClientError;

use super::api::Api;

/// Time one read of the feed requests the server to wait. When it ends
/// the caller looks again, which catches what the feed does not carry (a
/// request set Final while its container's priority was already 0) within
/// this time.
const FEED_WAIT: Duration = Duration::from_secs(10);

/// The delay between two looks when the feed cannot be used.
const FALLBACK_DELAY: Duration = Duration::from_secs(5);

/// Follows the change feed for one container.
#[derive(Debug)]
pub struct ContainerWatch {
    container_uuid: String,
    cursor: Option<String>,
    /// Set once the controller has shown that it has no feed.
    no_feed: bool,
    /// Set after the first call, which returns at once.
    started: bool,
    /// The delay between looks without the feed.
    fallback_delay: Duration,
}

impl ContainerWatch {
    pub fn new(container_uuid: &str) -> ContainerWatch {
        ContainerWatch {
            container_uuid: container_uuid.to_string(),
            cursor: None,
            no_feed: false,
            started: false,
            fallback_delay: FALLBACK_DELAY,
        }
    }

    /// Sets the delay between looks when the feed cannot be used.
    pub fn with_fallback_delay(mut self, delay: Duration) -> ContainerWatch {
        self.fallback_delay = delay;
        self
    }

    /// Returns when the caller should look at the container: at once the
    /// first time, then when the feed reports a change of the container or
    /// its wait ends. Dropping the future loses nothing: the cursor moves
    /// only with a completed read.
    pub async fn changed(&mut self, api: &Api) {
        if self.no_feed {
            tokio::time::sleep(self.fallback_delay).await;
            return;
        }
        let Some(mut cursor) = self.cursor.clone() else {
            // Without a cursor, after the first call, the last read failed.
            if self.started {
                tokio::time::sleep(self.fallback_delay).await;
            }
            self.started = true;
            match api.client.container_changes(None, Duration::ZERO).await {
                Ok(page) => self.cursor = Some(page.cursor),
                Err(err) => self.fall_back(&err),
            }
            return;
        };
        loop {
            match api.client.container_changes(Some(&cursor), FEED_WAIT).await {
                Ok(page) => {
                    cursor = page.cursor;
                    self.cursor = Some(cursor.clone());
                    let ours = page
                        .items
                        .iter()
                        .any(|container| container.uuid == self.container_uuid);
                    if ours || page.items.is_empty() {
                        return;
                    }
                    // Only other containers changed: read on from the new
                    // cursor.
                }
                Err(err) => {
                    self.fall_back(&err);
                    return;
                }
            }
        }
    }

    /// Handles a failed read. A controller without the feed is not called
    /// again. Any other failure drops the cursor, so the next call waits,
    /// then takes a new one.
    fn fall_back(&mut self, err: &ClientError) {
        if matches!(err.status().map(|status| status.as_u16()), Some(404 | 405)) {
            self.no_feed = true;
        }
        self.cursor = None;
    }
}
