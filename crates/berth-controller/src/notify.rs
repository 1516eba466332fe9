//! In-process wake-ups for log readers that wait ("long-poll") on a
//! container.
//!
//! Each container someone waits on has a `tokio::sync::watch` channel whose
//! value is a counter. Appending to any of the container's logs, and any
//! change of the container's state, bumps the counter and so wakes every
//! waiter, which then reads the store again. A waiter subscribes *before*
//! it reads the store, so a change made between its read and its wait still
//! wakes it.
//!
//! Channels exist only while someone waits: a notification that finds no
//! receiver removes the channel.
//!
//! NOTE: the wake-ups reach waiters in this process only. With several
//! controllers on one database, a reader on another controller gets new
//! bytes only when its wait ends.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Notifier {
    channels: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Notifier {
    pub fn new() -> Notifier {
        Notifier::default()
    }

    /// Returns a receiver that is woken by every later
    /// [`Notifier::notify`] of the container.
    pub fn subscribe(&self, container_uuid: &str) -> watch::Receiver<u64> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match channels.get(container_uuid) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(0);
                channels.insert(container_uuid.to_string(), sender);
                receiver
            }
        }
    }

    /// Wakes every waiter of the container.
    pub fn notify(&self, container_uuid: &str) {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sender) = channels.get(container_uuid) {
            if sender.receiver_count() == 0 {
                channels.remove(container_uuid);
            } else {
                sender.send_modify(|counter| *counter = counter.wrapping_add(1));
            }
        }
    }

    /// Containers with a channel; for tests of the clean-up.
    pub fn channel_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notify_wakes_subscriber() {
        let notifier = Notifier::new();
        let mut receiver = notifier.subscribe("c");
        notifier.notify("c");
        tokio::time::timeout(std::time::Duration::from_secs(5), receiver.changed())
            .await
            .expect("not woken")
            .unwrap();
    }

    #[tokio::test]
    async fn channel_without_receivers_is_removed() {
        let notifier = Notifier::new();
        drop(notifier.subscribe("c"));
        assert_eq!(notifier.channel_count(), 1);
        notifier.notify("c");
        assert_eq!(notifier.channel_count(), 0);
        notifier.notify("other");
        assert_eq!(notifier.channel_count(), 0);
    }
}
