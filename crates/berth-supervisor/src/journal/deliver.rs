//! Delivering journal entries: uploading what is pending, then recording
//! the final state.
//!
//! One attempt ([`deliver_once`]) saves a pending output, then a pending
//! log, each as a new collection, writing its portable data hash into the
//! entry as soon as the collection exists, so a later attempt never
//! uploads it again. Then it records the final state. Each call to the
//! controller retries transient failures for `retry_timeout`; a failed
//! attempt is repeated by [`deliver_until`] with full-jitter backoff.
//!
//! Some responses mean that the final state will never be recorded. They
//! end the entry with a log line instead of an endless retry: 401, 403 or
//! 404 (the controller revokes the container's token once the container
//! is final or back in the queue, or the container is gone), or any other
//! rejection while the container is already final.

use std::path::Path;
use std::time::Duration;

use berth_client::{Client, ClientError, JobCredentials};
use tokio::time::Instant;
use tracing::Instrument;

use super::{owned_by_current_user, Journal, LockedEntry, Part, LOG_DIR, OUTPUT_DIR};
use crate::logs::SupervisorLog;
use crate::output::{save_directory, Globs, OutputError, OutputSettings};
use crate::retry::{retry, Backoff, Jitter, API_BACKOFF};

/// The backoff between retries of one call during delivery: the steps of
/// [`API_BACKOFF`] with full jitter, because after an outage many
/// supervisors deliver at once.
const DELIVERY_CALL_BACKOFF: Backoff = Backoff {
    jitter: Jitter::Full,
    ..API_BACKOFF
};

/// Configuration values that delivery uses.
#[derive(Debug, Clone, Copy)]
pub struct DeliverySettings {
    pub block_size: usize,
    /// How long each call to the controller retries transient failures.
    pub retry_timeout: Duration,
}

impl DeliverySettings {
    pub fn from_config(config: &crate::Config) -> DeliverySettings {
        DeliverySettings {
            block_size: config.block_size,
            retry_timeout: config.api_retry_timeout,
        }
    }
}

/// The result of an attempt at delivering an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The controller recorded the final state, and the entry is removed.
    Recorded,
    /// The entry was removed without recording the final state, for this
    /// reason.
    Ended(String),
    /// The controller could not be reached or failed; the entry is kept.
    Retry(String),
    /// The entry could not be delivered, and the container is not known to
    /// be final. The entry is kept for the next delivery or an
    /// administrator.
    Kept(String),
}

/// The effect of a failed call on the attempt.
enum Failure {
    Retry(String),
    Ended(String),
    Kept(String),
}

impl From<Failure> for Attempt {
    fn from(failure: Failure) -> Attempt {
        match failure {
            Failure::Retry(reason) => Attempt::Retry(reason),
            Failure::Ended(reason) => Attempt::Ended(reason),
            Failure::Kept(reason) => Attempt::Kept(reason),
        }
    }
}

/// Makes one attempt at delivering `locked` with `client`, which acts with
/// the container's token. Removes the entry when the attempt returns
/// [`Attempt::Recorded`] or [`Attempt::Ended`].
pub async fn deliver_once(
    locked: &LockedEntry,
    client: &Client,
    settings: DeliverySettings,
    log: &SupervisorLog,
) -> Attempt {
    let attempt = attempt_delivery(locked, client, settings, log).await;
    match &attempt {
        Attempt::Recorded | Attempt::Ended(_) => {
            if let Err(error) = locked.remove() {
                tracing::error!(path = %locked.path().display(), error = %error, "failed to remove a delivered journal entry");
            }
        }
        Attempt::Retry(_) | Attempt::Kept(_) => {}
    }
    attempt
}

async fn attempt_delivery(
    locked: &LockedEntry,
    client: &Client,
    settings: DeliverySettings,
    log: &SupervisorLog,
) -> Attempt {
    let mut entry = match locked.read() {
        Ok(entry) => entry,
        Err(error) => return Attempt::Kept(error.to_string()),
    };
    let uuid = entry.container_uuid.clone();
    let parts = [
        (OUTPUT_DIR, format!("output for {uuid}"), "output"),
        (LOG_DIR, format!("logs for {uuid}"), "log"),
    ];
    for (dir, name, what) in parts {
        let pending = match what {
            "output" => entry.output == Some(Part::Pending),
            _ => entry.log == Some(Part::Pending),
        };
        if !pending {
            continue;
        }
        let output_settings = OutputSettings {
            block_size: settings.block_size,
            max_bytes: 0,
            retry_timeout: settings.retry_timeout,
            backoff: DELIVERY_CALL_BACKOFF,
        };
        let saved = save_directory(
            client,
            log,
            &locked.path().join(dir),
            Globs::default(),
            output_settings,
            &name,
            what,
        )
        .await;
        let pdh = match saved {
            Ok(pdh) => pdh,
            Err(OutputError::Upload(error) | OutputError::Create(error)) => {
                let failure = classify(client, &uuid, &format!("saving the {what}"), error).await;
                return failure.into();
            }
            Err(error) => return Attempt::Kept(format!("failed to save the {what}: {error}")),
        };
        let part = Some(Part::Saved {
            portable_data_hash: pdh,
        });
        match what {
            "output" => entry.output = part,
            _ => entry.log = part,
        }
        if let Err(error) = locked.update(&entry).and_then(|()| locked.remove_part(dir)) {
            return Attempt::Kept(error.to_string());
        }
    }

    let attributes = entry.final_update();
    let recorded = retry(
        "recording the final state",
        settings.retry_timeout,
        DELIVERY_CALL_BACKOFF,
        ClientError::is_transient,
        || client.update_container(&uuid, &attributes),
    )
    .await;
    match recorded {
        Ok(_) => Attempt::Recorded,
        Err(error) => classify(client, &uuid, "recording the final state", error)
            .await
            .into(),
    }
}

/// Decides what a failed call means for the entry.
async fn classify(client: &Client, uuid: &str, step: &str, error: ClientError) -> Failure {
    if error.is_transient() {
        return Failure::Retry(format!("{step} failed: {error}"));
    }
    if let Some(ended) = token_no_longer_works(&error) {
        return Failure::Ended(format!("{step} failed: {error}; {ended}"));
    }
    // Any other rejection: the entry is over if the container is final.
    match client.get_container(uuid).await {
        Ok(container) if container.state.is_final() => Failure::Ended(format!(
            "{step} failed: {error}; the container is already {}",
            container.state
        )),
        Ok(container) => Failure::Kept(format!(
            "{step} failed: {error}; the container is {}",
            container.state
        )),
        Err(fetch) if fetch.is_transient() => Failure::Retry(format!(
            "{step} failed: {error}; then reading the container failed: {fetch}"
        )),
        Err(fetch) => match token_no_longer_works(&fetch) {
            Some(ended) => Failure::Ended(format!("{step} failed: {error}; {ended}")),
            None => Failure::Kept(format!(
                "{step} failed: {error}; then reading the container failed: {fetch}"
            )),
        },
    }
}

/// Explains a 401, 403 or 404, the statuses a controller returns when it
/// no longer lets this token act for the container.
fn token_no_longer_works(error: &ClientError) -> Option<&'static str> {
    match error.status()?.as_u16() {
        401 | 403 => Some("the controller rejected the container's token, which it revokes once the container is final or unlocked"),
        404 => Some("the controller has no such container for this token"),
        _ => None,
    }
}

/// Repeats [`deliver_once`] with `backoff` while it returns
/// [`Attempt::Retry`], until the next delay would end past `budget`.
pub async fn deliver_until(
    locked: &LockedEntry,
    client: &Client,
    settings: DeliverySettings,
    budget: Duration,
    backoff: Backoff,
    log: &SupervisorLog,
) -> Attempt {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let result = deliver_once(locked, client, settings, log).await;
        let Attempt::Retry(reason) = &result else {
            return result;
        };
        let delay = backoff.delay(attempt);
        if started.elapsed() + delay > budget {
            tracing::error!(attempts = attempt + 1, error = %reason, "delivering the final state failed; giving up after {:?}, and the journal entry stays in {}", started.elapsed(), locked.path().display());
            return result;
        }
        tracing::warn!(attempt = attempt + 1, retry_in = ?delay, error = %reason, "delivering the final state failed; retrying");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Counts of what [`deliver_pending`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingSummary {
    pub recorded: usize,
    pub ended: usize,
    /// Entries left in the journal: failed, busy, or not this user's.
    pub remaining: usize,
}

/// Delivers, once each, the entries of `journal` other than `skip`'s,
/// with the token of each entry's credentials file. An entry that another
/// process has locked is left to it. An entry whose credentials file is gone
/// is ended, because the dispatcher removes the file once the container
/// is final or unlocked.
pub async fn deliver_pending(
    journal: &Journal,
    settings: DeliverySettings,
    skip: Option<&str>,
) -> PendingSummary {
    let mut summary = PendingSummary::default();
    match journal.remove_stale_staging() {
        Ok(removed) => {
            for path in removed {
                tracing::info!(path = %path.display(), "removed a journal staging directory left by a supervisor that died before it wrote its entry");
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, "failed to look for stale journal staging directories")
        }
    }
    let uuids = match journal.list() {
        Ok(uuids) => uuids,
        Err(error) => {
            tracing::error!(error = %error, "failed to list the journal");
            return summary;
        }
    };
    for uuid in uuids {
        if Some(uuid.as_str()) == skip {
            continue;
        }
        let span = tracing::info_span!("journal", container = %uuid);
        let attempt = deliver_listed(journal, &uuid, settings)
            .instrument(span.clone())
            .await;
        span.in_scope(|| match attempt {
            Some(attempt) => {
                log_attempt(&attempt);
                match attempt {
                    Attempt::Recorded => summary.recorded += 1,
                    Attempt::Ended(_) => summary.ended += 1,
                    Attempt::Retry(_) | Attempt::Kept(_) => summary.remaining += 1,
                }
            }
            None => summary.remaining += 1,
        });
    }
    summary
}

/// Locks and delivers one listed entry. Returns `None`, after a log
/// line, when the entry is not this process's to deliver now.
async fn deliver_listed(
    journal: &Journal,
    uuid: &str,
    settings: DeliverySettings,
) -> Option<Attempt> {
    if !owned_by_current_user(&journal.dir().join(uuid)) {
        tracing::info!("the journal entry belongs to another user; leaving it");
        return None;
    }
    let locked = match journal.lock(uuid) {
        Ok(Some(locked)) => locked,
        Ok(None) => {
            tracing::info!(
                "another process holds the journal entry, or it was just delivered; leaving it"
            );
            return None;
        }
        Err(error) => {
            tracing::error!(error = %error, "failed to lock the journal entry");
            return None;
        }
    };
    Some(deliver_entry(&locked, uuid, settings).await)
}

/// Logs the result of delivering an entry.
pub fn log_attempt(attempt: &Attempt) {
    match attempt {
        Attempt::Recorded => {
            tracing::info!("delivered the journal entry: the final state is recorded")
        }
        Attempt::Ended(reason) => {
            tracing::warn!(reason = %reason, "ended the journal entry without recording its final state")
        }
        Attempt::Retry(reason) => {
            tracing::warn!(error = %reason, "failed to deliver the journal entry; it stays for the next delivery")
        }
        Attempt::Kept(reason) => {
            tracing::error!(error = %reason, "failed to deliver the journal entry; it stays in the journal until the cause is fixed")
        }
    }
}

/// Delivers another container's entry with its credentials file.
async fn deliver_entry(locked: &LockedEntry, uuid: &str, settings: DeliverySettings) -> Attempt {
    let entry = match locked.read() {
        Ok(entry) => entry,
        Err(error) => return Attempt::Kept(error.to_string()),
    };
    let Some(path) = entry.credentials_file.clone() else {
        return Attempt::Kept(
            "the entry names no credentials file, so only a supervisor of the same container can deliver it".into(),
        );
    };
    let credentials = match read_credentials(&path) {
        Ok(credentials) => credentials,
        Err(CredentialsProblem::Gone) => {
            let attempt = Attempt::Ended(format!(
                "the credentials file {} is gone; the dispatcher removes it once the container is final or unlocked",
                path.display()
            ));
            if let Err(error) = locked.remove() {
                tracing::error!(error = %error, "failed to remove the journal entry");
            }
            return attempt;
        }
        Err(CredentialsProblem::Other(message)) => return Attempt::Kept(message),
    };
    if credentials.container_uuid != uuid {
        return Attempt::Kept(format!(
            "credentials file {} belongs to container {}, not {uuid}",
            path.display(),
            credentials.container_uuid
        ));
    }
    let client = match Client::new(credentials.settings()) {
        Ok(client) => client,
        Err(error) => return Attempt::Kept(format!("failed to build the API client: {error}")),
    };
    deliver_once(locked, &client, settings, &SupervisorLog::new()).await
}

enum CredentialsProblem {
    Gone,
    Other(String),
}

fn read_credentials(path: &Path) -> Result<JobCredentials, CredentialsProblem> {
    match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(CredentialsProblem::Gone)
        }
        Err(error) => {
            return Err(CredentialsProblem::Other(format!(
                "failed to read credentials file {}: {error}",
                path.display()
            )))
        }
        Ok(_) => {}
    }
    JobCredentials::read(path).map_err(|error| CredentialsProblem::Other(error.to_string()))
}
