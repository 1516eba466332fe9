//! The final phase of a run: the journal entry, written before the first
//! attempt to record the final state, and its delivery.

use std::path::Path;

use berth_client::{Client, ClientError};
use berth_core::ContainerState;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::{final_attributes, Outcome, EXIT_NOT_RECORDED, EXIT_RECORDED};
use crate::config::Config;
use crate::journal::{
    copy_flat_files, deliver_until, log_attempt, Attempt, DeliverySettings, Entry, Journal,
    LockedEntry, Part, Staging, LOG_DIR,
};
use crate::log_collection::LogSaveError;
use crate::logs::SupervisorLog;
use crate::retry::{retry, Backoff};
use crate::stats::OutOfMemory;

/// Sets the entry's final state update and output from the outcome.
pub(super) fn set_outcome(
    entry: &mut Entry,
    outcome: &Outcome,
    warnings: &[String],
    out_of_memory: Option<&OutOfMemory>,
    output_pending: bool,
) {
    let mut attributes = final_attributes(outcome, None, warnings, out_of_memory);
    let saved_output = attributes
        .as_object_mut()
        .and_then(|attributes| attributes.remove("output"));
    entry.attributes = attributes;
    entry.output = match saved_output {
        Some(Value::String(pdh)) => Some(Part::Saved {
            portable_data_hash: pdh,
        }),
        _ => output_pending.then_some(Part::Pending),
    };
}

/// Commits the staged journal entry. Logs why and returns `None` when
/// there is no journal or the commit failed.
pub(super) fn commit_entry(staging: Option<Staging>, entry: &Entry) -> Option<LockedEntry> {
    match staging?.commit(entry) {
        Ok(locked) => {
            tracing::info!(path = %locked.path().display(), "wrote the journal entry");
            Some(locked)
        }
        Err(error) => {
            tracing::error!(error = %error, "failed to write the journal entry; the final state lives in memory only");
            None
        }
    }
}

/// Opens the journal that `journal_dir` names. Logs why and returns
/// `None` when it is off or cannot be used.
pub(super) fn open_journal(config: &Config) -> Option<Journal> {
    let dir = config.journal_dir.as_ref()?;
    match Journal::open(dir) {
        Ok(journal) => Some(journal),
        Err(error) => {
            tracing::error!(error = %error, "the final-state journal is off; a final state that cannot be delivered is lost when this process ends");
            None
        }
    }
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Delivers the entry that an earlier supervisor of this container left,
/// in place of running the container again.
pub(super) async fn deliver_own_entry(
    config: &Config,
    journal: &Journal,
    client: &Client,
    uuid: &str,
) -> i32 {
    tracing::warn!(
        "the journal in {} has an entry for this container: delivering it instead of running the container",
        journal.dir().display()
    );
    let locked = match journal.lock(uuid) {
        Ok(Some(locked)) => locked,
        Ok(None) => {
            tracing::error!("another process is delivering this container's journal entry");
            return EXIT_NOT_RECORDED;
        }
        Err(error) => {
            tracing::error!(error = %error, "failed to lock this container's journal entry");
            return EXIT_NOT_RECORDED;
        }
    };
    let attempt = deliver_until(
        &locked,
        client,
        DeliverySettings::from_config(config),
        config.final_update_timeout,
        Backoff::final_phase(config.final_retry_max_delay),
        &SupervisorLog::new(),
    )
    .await;
    log_attempt(&attempt);
    match attempt {
        Attempt::Recorded => EXIT_RECORDED,
        _ => EXIT_NOT_RECORDED,
    }
}

/// Returns whether a failed log save may succeed later, so its files are
/// worth keeping in the journal.
pub(super) fn log_save_is_transient(error: &LogSaveError) -> bool {
    match error {
        LogSaveError::Upload(error) | LogSaveError::Save(error) => error.is_transient(),
        _ => false,
    }
}

/// Copies the log collection's files into the journal entry. Returns the
/// pending part, or `None` after a log line when there is no journal or
/// the copy failed.
pub(super) fn keep_logs(locked: Option<&LockedEntry>, dir: &Path) -> Option<Part> {
    let locked = locked?;
    let copied = locked
        .part_dir(LOG_DIR)
        .and_then(|dest| copy_flat_files(dir, &dest));
    match copied {
        Ok(count) => {
            tracing::warn!(
                files = count,
                "kept the log files in the journal, to upload with the final state"
            );
            Some(Part::Pending)
        }
        Err(error) => {
            tracing::error!(error = %error, "failed to keep the log files in the journal");
            None
        }
    }
}

/// Delivers the committed journal entry: uploads what is pending and
/// records the final state, retrying for `final_update_timeout` with
/// full-jitter backoff. Without a journal entry, only the final state
/// update is retried that long. Returns the exit status of `berth
/// supervise`.
pub(super) async fn deliver_final_state(
    config: &Config,
    client: &Client,
    locked: Option<LockedEntry>,
    entry: Entry,
) -> i32 {
    let backoff = Backoff::final_phase(config.final_retry_max_delay);
    if let Some(locked) = locked {
        let state = entry.attributes["state"]
            .as_str()
            .unwrap_or("final")
            .to_string();
        let attempt = deliver_until(
            &locked,
            client,
            DeliverySettings::from_config(config),
            config.final_update_timeout,
            backoff,
            &SupervisorLog::new(),
        )
        .await;
        log_attempt(&attempt);
        return match attempt {
            Attempt::Recorded => {
                tracing::info!("recorded the final state {state}");
                EXIT_RECORDED
            }
            _ => EXIT_NOT_RECORDED,
        };
    }

    // Without a journal nothing pending can be uploaded later: a pending
    // output makes the run fail, and a pending log is left out.
    let attributes = if entry.output == Some(Part::Pending) {
        let reason = "failed to save the output: the controller could not be reached, and the journal that would keep the output failed";
        json!({"state": ContainerState::Cancelled.as_str(), "runtime_status": {"error": reason}})
    } else {
        entry.final_update()
    };
    let state = attributes["state"].as_str().unwrap_or("final").to_string();
    let recorded = retry(
        "recording the final state",
        config.final_update_timeout,
        backoff,
        ClientError::is_transient,
        || client.update_container(&entry.container_uuid, &attributes),
    )
    .await;
    match recorded {
        Ok(_) => {
            tracing::info!("recorded the final state {state}");
            EXIT_RECORDED
        }
        Err(error) => {
            tracing::error!(error = %error, "failed to record the final state {state}");
            EXIT_NOT_RECORDED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "zzzzz-dz642-000000000000001";
    const PDH: &str = "d41d8cd98f00b204e9800998ecf8427e+0";

    #[test]
    fn saved_output_moves_to_its_part() {
        let mut entry = Entry::new(UUID, None, Value::Null);
        set_outcome(
            &mut entry,
            &Outcome::Exited(3, Some(PDH.to_string())),
            &[],
            None,
            false,
        );
        assert_eq!(
            entry.attributes,
            json!({"state": "Complete", "exit_code": 3})
        );
        assert_eq!(
            entry.output,
            Some(Part::Saved {
                portable_data_hash: PDH.to_string()
            })
        );
        assert_eq!(entry.final_update()["output"], PDH);
    }

    #[test]
    fn kept_output_is_pending() {
        let mut entry = Entry::new(UUID, None, Value::Null);
        let warnings = vec!["the stdout log is incomplete".to_string()];
        set_outcome(&mut entry, &Outcome::Exited(0, None), &warnings, None, true);
        assert_eq!(entry.output, Some(Part::Pending));
        assert_eq!(
            entry.attributes["runtime_status"]["warning"],
            "the stdout log is incomplete"
        );
        assert!(entry.final_update().get("output").is_none());
    }

    #[test]
    fn cancelled_run_has_no_output() {
        let mut entry = Entry::new(UUID, None, Value::Null);
        set_outcome(
            &mut entry,
            &Outcome::Cancelled("cancelled by signal SIGTERM".into()),
            &[],
            None,
            false,
        );
        assert_eq!(entry.output, None);
        assert_eq!(entry.attributes["state"], "Cancelled");
    }
}
