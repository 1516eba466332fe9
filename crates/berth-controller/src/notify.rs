//! Wake-ups for requests that wait ("long-poll"): log readers, which wait
//! on one container, and change-feed readers, which wait for a change of
//! any container.
//!
//! Each waiter has a `tokio::sync::watch` receiver whose value is a
//! counter. A notification bumps the counter and so wakes every waiter of
//! the channel, which then reads the store again. A waiter subscribes
//! *before* it reads the store, so a change made between its read and its
//! wait still wakes it.
//!
//! Channels: one per container someone waits on, bumped when one of its
//! logs grows or its state changes, and one for the change feed, bumped
//! after every write that may have changed a container. A container's
//! channel exists only while someone waits: a notification that finds no
//! receiver removes it.
//!
//! Sources: the API notifies after its own writes. With a store that
//! several controllers share (PostgreSQL), a [`ChangeListener`] task turns
//! the database's notifications of every controller's writes into the
//! same calls, so a waiter on one controller hears of a write made through
//! another. Notifications sent while the listener is disconnected are
//! lost, so after each (re)connection it wakes every waiter once
//! ([`Notifier::notify_all`]), and each re-reads the store.
//!
//! NOTE: every change wakes every change-feed waiter, and each then runs
//! one store query, so wake-ups slow down with thousands of waiters (a
//! median of about 2 s was measured with 3,000). Waking only the waiters
//! that may see the changed container would fix it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct Notifier {
    channels: Mutex<HashMap<String, watch::Sender<u64>>>,
    changes: watch::Sender<u64>,
}

impl Default for Notifier {
    fn default() -> Notifier {
        Notifier {
            channels: Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }
}

impl Notifier {
    pub fn new() -> Notifier {
        Notifier::default()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns a receiver that is woken by every later
    /// [`Notifier::notify`] of the container.
    pub fn subscribe(&self, container_uuid: &str) -> watch::Receiver<u64> {
        let mut channels = self.lock_channels();
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
        let mut channels = self.lock_channels();
        if let Some(sender) = channels.get(container_uuid) {
            if sender.receiver_count() == 0 {
                channels.remove(container_uuid);
            } else {
                sender.send_modify(|counter| *counter = counter.wrapping_add(1));
            }
        }
    }

    /// Returns a receiver that is woken by every later
    /// [`Notifier::notify_changes`] and [`Notifier::notify_all`].
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes every change-feed waiter.
    pub fn notify_changes(&self) {
        self.changes
            .send_modify(|counter| *counter = counter.wrapping_add(1));
    }

    /// Wakes every waiter: change-feed waiters and the waiters of every
    /// container.
    pub fn notify_all(&self) {
        self.notify_changes();
        let mut channels = self.lock_channels();
        channels.retain(|_, sender| sender.receiver_count() > 0);
        for sender in channels.values() {
            sender.send_modify(|counter| *counter = counter.wrapping_add(1));
        }
    }

    /// Containers with a channel; for tests of the clean-up.
    pub fn channel_count(&self) -> usize {
        self.lock_channels().len()
    }

    /// Receivers of the change-feed channel; for tests that need a waiter
    /// to be waiting.
    pub fn change_waiter_count(&self) -> usize {
        self.changes.receiver_count()
    }
}

/// A background task that feeds a [`Notifier`] from outside this process,
/// such as the PostgreSQL store's listener.
///
/// The task gets a stop signal, which resolves when [`ChangeListener::stop`]
/// is called or the handle is dropped, and should end soon after it.
#[derive(Debug)]
pub struct ChangeListener {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ChangeListener {
    /// Spawns `run` on the current Tokio runtime with the stop signal, or
    /// returns `None` outside a runtime.
    pub fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Option<ChangeListener>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (stop, stop_signal) = oneshot::channel();
        let task = runtime.spawn(run(stop_signal));
        Some(ChangeListener {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Signals the task to stop and waits until it has ended.
    pub async fn stop(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::error!(error = %err, "the change listener task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn notify_wakes_subscriber() {
        let notifier = Notifier::new();
        let mut receiver = notifier.subscribe("c");
        notifier.notify("c");
        tokio::time::timeout(TIMEOUT, receiver.changed())
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

    #[tokio::test]
    async fn notify_changes_wakes_change_waiter_only() {
        let notifier = Notifier::new();
        let mut changes = notifier.subscribe_changes();
        let container = notifier.subscribe("c");
        notifier.notify_changes();
        tokio::time::timeout(TIMEOUT, changes.changed())
            .await
            .expect("not woken")
            .unwrap();
        assert!(!container.has_changed().unwrap());
    }

    #[tokio::test]
    async fn notify_all_wakes_every_waiter() {
        let notifier = Notifier::new();
        let changes = notifier.subscribe_changes();
        let first = notifier.subscribe("a");
        let second = notifier.subscribe("b");
        drop(notifier.subscribe("gone"));
        notifier.notify_all();
        assert!(changes.has_changed().unwrap());
        assert!(first.has_changed().unwrap());
        assert!(second.has_changed().unwrap());
        assert_eq!(notifier.channel_count(), 2);
    }

    #[tokio::test]
    async fn listener_stops_when_asked() {
        let listener = ChangeListener::spawn(|stop| async move {
            let _ = stop.await;
        })
        .unwrap();
        tokio::time::timeout(TIMEOUT, listener.stop())
            .await
            .expect("the task did not end");
    }

    #[test]
    fn listener_needs_a_runtime() {
        assert!(ChangeListener::spawn(|stop| async move {
            let _ = stop.await;
        })
        .is_none());
    }
}
