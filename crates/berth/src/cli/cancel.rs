//! `berth cancel`: cancel container requests.
//!
//! Cancelling a request sets its priority to 0. The controller then drops
//! its container's priority, and the dispatcher stops a Locked or Running
//! container. A Running container ends Cancelled, which takes the request
//! to Final. A Queued container would only sit on hold, so the command sets
//! the request Final itself. It does the same for a Locked container whose
//! job never started, after waiting for the dispatcher to unlock it.
//! Given a container UUID, the command cancels the caller's committed
//! requests for that container.
//!
//! A request update that the controller answers with 409 Conflict (the
//! record changed during the update) is tried again a few times.

use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_client::ClientError;
use berth_core::{ContainerRequest, ContainerState, RequestState};
use clap::Args;
use serde_json::{json, Value};

use super::api::{Api, Target};
use super::watch::ContainerWatch;

/// The maximum number of attempts of a request update that gets 409
/// Conflict.
const CONFLICT_ATTEMPTS: u32 = 5;

/// The delay before the second attempt after a 409 Conflict; each further
/// attempt doubles it (0.1 s, 0.2 s, 0.4 s, 0.8 s).
const CONFLICT_FIRST_DELAY: Duration = Duration::from_millis(100);

/// How long `berth cancel` waits for the dispatcher to stop the job of a
/// Locked container and unlock it, so that it can set the request Final.
const LOCKED_STOP_WAIT: Duration = Duration::from_secs(60);

/// The interval between two looks at a Locked container while waiting,
/// when the controller has no change feed.
const LOCKED_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Container request UUIDs (…-xvhdp-…) or container UUIDs (…-dz642-…).
    #[arg(required = true, value_name = "UUID")]
    uuids: Vec<String>,
}

/// The result of cancelling one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The request was already Final: nothing to do.
    AlreadyFinal,
    /// The request was never committed, so nothing runs for it.
    NotCommitted,
    /// The container had not started (or there was none): the request is
    /// now Final.
    Finalized { container_uuid: Option<String> },
    /// Priority 0 is set, but the request could not be set Final; its
    /// Queued container stays on hold.
    OnHold {
        container_uuid: String,
        reason: String,
    },
    /// The container is Locked or Running; the dispatcher will stop it.
    Stopping {
        container_uuid: String,
        state: ContainerState,
    },
    /// The container had already ended; the request follows it to Final.
    ContainerEnded {
        container_uuid: String,
        state: ContainerState,
    },
}

impl fmt::Display for CancelOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelOutcome::AlreadyFinal => f.write_str("already final, nothing to cancel"),
            CancelOutcome::NotCommitted => {
                f.write_str("not committed, so nothing runs for it; nothing to cancel")
            }
            CancelOutcome::Finalized {
                container_uuid: None,
            } => f.write_str("cancelled; the request is final (it had no container)"),
            CancelOutcome::Finalized {
                container_uuid: Some(container),
            } => write!(
                f,
                "cancelled before container {container} started; the request is final"
            ),
            CancelOutcome::OnHold {
                container_uuid,
                reason,
            } => write!(
                f,
                "priority set to 0, so container {container_uuid} stays Queued on hold, \
                 but the request could not be set final: {reason}"
            ),
            CancelOutcome::Stopping {
                container_uuid,
                state,
            } => write!(
                f,
                "cancelled; container {container_uuid} is {state} and will be stopped"
            ),
            CancelOutcome::ContainerEnded {
                container_uuid,
                state,
            } => write!(
                f,
                "container {container_uuid} had already ended ({state}); nothing to cancel"
            ),
        }
    }
}

pub async fn execute(args: CancelArgs) -> anyhow::Result<ExitCode> {
    // Check every argument before cancelling anything.
    let targets = args
        .uuids
        .iter()
        .map(|uuid| Target::parse(uuid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api = Api::from_env()?;
    let mut failed = false;
    for target in &targets {
        match target {
            Target::Request(uuid) => {
                let label = uuid.to_string();
                if let Err(err) = cancel_and_settle(&api, uuid.as_str(), &label).await {
                    eprintln!("berth: {uuid}: {err:#}");
                    failed = true;
                }
            }
            Target::Container(uuid) => {
                if let Err(err) = cancel_container(&api, uuid.as_str()).await {
                    eprintln!("berth: {uuid}: {err:#}");
                    failed = true;
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Cancels the caller's committed requests for a container, printing one
/// line per request.
async fn cancel_container(api: &Api, container_uuid: &str) -> anyhow::Result<()> {
    let owner = api.current_user_uuid().await?;
    let params = berth_client::ListParams {
        filters: Some(json!([
            ["container_uuid", "=", container_uuid],
            ["owner_uuid", "=", owner],
            ["state", "=", "Committed"],
        ])),
        order: Some(vec!["created_at asc".into()]),
        ..Default::default()
    };
    let requests = api
        .client
        .list_container_requests(&params)
        .await
        .map_err(|err| api.explain(err))
        .context("failed to list your requests for the container")?;
    if requests.items.is_empty() {
        // Say why: the container ended, or it is not one of the caller's.
        let container = api
            .client
            .get_container(container_uuid)
            .await
            .map_err(|err| api.explain(err))
            .context("failed to get the container")?;
        if container.state.is_final() {
            println!(
                "{container_uuid}: already ended ({}), nothing to cancel",
                container.state
            );
            return Ok(());
        }
        anyhow::bail!(
            "none of your committed container requests uses this {} container; nothing to cancel",
            container.state
        );
    }
    let mut failures = 0;
    for request in &requests.items {
        let label = format!("{container_uuid}: request {}", request.uuid);
        if let Err(err) = cancel_and_settle(api, &request.uuid, &label).await {
            eprintln!("berth: {label}: {err:#}");
            failures += 1;
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "failed to cancel {failures} of {} requests",
            requests.items.len()
        );
    }
    Ok(())
}

/// Cancels one request and prints the outcome after `label`. When its
/// container is Locked, waits for the dispatcher to stop the job, and sets
/// the request Final if the container comes back to the queue.
async fn cancel_and_settle(api: &Api, request_uuid: &str, label: &str) -> anyhow::Result<()> {
    let outcome = cancel_request(api, request_uuid).await?;
    println!("{label}: {outcome}");
    let CancelOutcome::Stopping {
        container_uuid,
        state: ContainerState::Locked,
    } = outcome
    else {
        return Ok(());
    };
    match wait_while_locked(api, &container_uuid, LOCKED_STOP_WAIT).await? {
        ContainerState::Locked => println!(
            "{label}: container {container_uuid} is still Locked after {}s; \
             run `berth cancel {request_uuid}` again once the dispatcher has stopped its job \
             to set the request Final",
            LOCKED_STOP_WAIT.as_secs()
        ),
        ContainerState::Queued => {
            if finalize_if_on_hold(api, request_uuid).await? {
                println!(
                    "{label}: the job of container {container_uuid} was stopped before it \
                     started; the request is final"
                );
            }
        }
        // A Running container ends Cancelled, and a final one has already
        // taken the request to Final.
        ContainerState::Running | ContainerState::Complete | ContainerState::Cancelled => {}
    }
    Ok(())
}

/// Waits, for at most `limit`, until a container is no longer Locked, and
/// returns its state then.
async fn wait_while_locked(
    api: &Api,
    container_uuid: &str,
    limit: Duration,
) -> anyhow::Result<ContainerState> {
    let deadline = Instant::now() + limit;
    let mut watch = ContainerWatch::new(container_uuid).with_fallback_delay(LOCKED_POLL_INTERVAL);
    // The watch's first call takes a cursor before the first look, so a
    // change after that look wakes the wait below.
    watch.changed(api).await;
    loop {
        let container = api
            .client
            .get_container(container_uuid)
            .await
            .map_err(|err| api.explain(err))
            .with_context(|| format!("failed to get container {container_uuid}"))?;
        let now = Instant::now();
        if container.state != ContainerState::Locked || now >= deadline {
            return Ok(container.state);
        }
        // Either the container changed, or the wait ran out: look again.
        let _ = tokio::time::timeout(deadline - now, watch.changed(api)).await;
    }
}

/// Sets a cancelled request (Committed with priority 0) Final when its
/// container is Queued, because nothing will run the container for it
/// then. Returns whether the request is Final now.
pub async fn finalize_if_on_hold(api: &Api, request_uuid: &str) -> anyhow::Result<bool> {
    let request = api
        .client
        .get_container_request(request_uuid)
        .await
        .map_err(|err| api.explain(err))
        .with_context(|| format!("failed to get request {request_uuid}"))?;
    match request.state {
        RequestState::Final => return Ok(true),
        RequestState::Uncommitted => return Ok(false),
        RequestState::Committed if request.priority != 0 => return Ok(false),
        RequestState::Committed => {}
    }
    if let Some(container_uuid) = &request.container_uuid {
        let container = api
            .client
            .get_container(container_uuid)
            .await
            .map_err(|err| api.explain(err))
            .with_context(|| format!("failed to get container {container_uuid}"))?;
        if container.state != ContainerState::Queued {
            return Ok(false);
        }
    }
    finalize(api, request_uuid).await?;
    Ok(true)
}

/// Cancels one container request: priority 0, and Final as well when its
/// container has not started.
pub async fn cancel_request(api: &Api, request_uuid: &str) -> anyhow::Result<CancelOutcome> {
    let request = api
        .client
        .get_container_request(request_uuid)
        .await
        .map_err(|err| api.explain(err))
        .context("failed to get the container request")?;
    match request.state {
        RequestState::Final => return Ok(CancelOutcome::AlreadyFinal),
        RequestState::Uncommitted => return Ok(CancelOutcome::NotCommitted),
        RequestState::Committed => {}
    }

    if request.priority != 0 {
        update_request(api, request_uuid, &json!({ "priority": 0 }))
            .await
            .map_err(|err| api.explain(err))
            .context("failed to set the request's priority to 0")?;
    }

    // Read the container only after the priority change, so that a
    // dispatcher locking it at this moment gets priority 0 and unlocks it.
    let Some(container_uuid) = request.container_uuid else {
        finalize(api, request_uuid).await?;
        return Ok(CancelOutcome::Finalized {
            container_uuid: None,
        });
    };
    let container = api
        .client
        .get_container(&container_uuid)
        .await
        .map_err(|err| api.explain(err))
        .with_context(|| format!("failed to get container {container_uuid}"))?;
    match container.state {
        ContainerState::Queued => match finalize(api, request_uuid).await {
            Ok(()) => Ok(CancelOutcome::Finalized {
                container_uuid: Some(container_uuid),
            }),
            Err(err) => Ok(CancelOutcome::OnHold {
                container_uuid,
                reason: format!("{err:#}"),
            }),
        },
        ContainerState::Locked | ContainerState::Running => Ok(CancelOutcome::Stopping {
            container_uuid,
            state: container.state,
        }),
        ContainerState::Complete | ContainerState::Cancelled => Ok(CancelOutcome::ContainerEnded {
            container_uuid,
            state: container.state,
        }),
    }
}

/// Sets a committed request Final. A request that became Final meanwhile
/// (its container ended) counts as done.
async fn finalize(api: &Api, request_uuid: &str) -> anyhow::Result<()> {
    let result = update_request(api, request_uuid, &json!({ "state": "Final" })).await;
    let err = match result {
        Ok(_) => return Ok(()),
        Err(err) => err,
    };
    if err.status().is_some_and(|status| status.as_u16() == 422) {
        let now = api.client.get_container_request(request_uuid).await;
        if now.is_ok_and(|request| request.state == RequestState::Final) {
            return Ok(());
        }
    }
    Err(api.explain(err)).context("failed to set the request Final")
}

/// Updates a container request, sending the update again after a 409
/// Conflict, up to [`CONFLICT_ATTEMPTS`] attempts in all.
async fn update_request(
    api: &Api,
    request_uuid: &str,
    attributes: &Value,
) -> Result<ContainerRequest, ClientError> {
    let mut delays = conflict_delays();
    loop {
        let result = api
            .client
            .update_container_request(request_uuid, attributes)
            .await;
        match result {
            Err(err) if is_conflict(&err) => match delays.next() {
                Some(delay) => {
                    tracing::debug!(
                        request = request_uuid,
                        ?delay,
                        "update conflicted; trying again"
                    );
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err),
            },
            result => return result,
        }
    }
}

fn is_conflict(err: &ClientError) -> bool {
    err.status().is_some_and(|status| status.as_u16() == 409)
}

/// Returns the delays before each attempt after the first one.
fn conflict_delays() -> impl Iterator<Item = Duration> {
    (0..CONFLICT_ATTEMPTS - 1).map(|attempt| CONFLICT_FIRST_DELAY * 2u32.pow(attempt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: CancelArgs,
    }

    #[test]
    fn several_uuids_are_accepted() {
        let cli = Cli::try_parse_from([
            "cancel",
            "zzzzz-xvhdp-0123456789abcde",
            "zzzzz-dz642-0123456789abcde",
        ])
        .unwrap();
        assert_eq!(cli.args.uuids.len(), 2);
    }

    #[test]
    fn no_uuid_is_a_usage_error() {
        let err = Cli::try_parse_from(["cancel"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[tokio::test]
    async fn bad_uuid_is_rejected_before_any_call() {
        // No API settings are needed: the argument check comes first.
        let args = CancelArgs {
            uuids: vec!["zzzzz-xvhdp-0123456789abcde".into(), "bogus".into()],
        };
        let err = execute(args).await.unwrap_err().to_string();
        assert!(err.contains("\"bogus\""), "{err}");
    }

    /// Serves HTTP on a loopback port, responding to each request in turn
    /// with the next status and an error body. Returns the base URL and a
    /// count of the requests served.
    async fn serve_statuses(
        statuses: Vec<u16>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        tokio::spawn(async move {
            for status in statuses {
                let (mut socket, _) = listener.accept().await.unwrap();
                // Read the whole request: headers, then the body they announce.
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                let body_start = loop {
                    let read = socket.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "the client closed the connection early");
                    request.extend_from_slice(&buffer[..read]);
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let headers = String::from_utf8_lossy(&request[..body_start]).to_lowercase();
                let length: usize = headers
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().unwrap());
                while request.len() < body_start + length {
                    let read = socket.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "the client closed the connection early");
                    request.extend_from_slice(&buffer[..read]);
                }
                counter.fetch_add(1, Ordering::SeqCst);

                let body = format!(r#"{{"errors":["status {status}"]}}"#);
                let answer = format!(
                    "HTTP/1.1 {status} Status\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (format!("http://{address}"), served)
    }

    fn api_at(host: &str) -> Api {
        Api::from_lookup(|name| match name {
            "BERTH_API_HOST" => Some(host.to_string()),
            "BERTH_API_TOKEN" => Some("token".to_string()),
            _ => None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn update_tries_again_after_conflict() {
        let (host, served) = serve_statuses(vec![409, 409, 404]).await;
        let api = api_at(&host);
        let err = update_request(&api, "zzzzz-xvhdp-0123456789abcde", &json!({"priority": 0}))
            .await
            .unwrap_err();
        assert_eq!(err.status().map(|status| status.as_u16()), Some(404));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn update_gives_up_after_repeated_conflicts() {
        let attempts = usize::try_from(CONFLICT_ATTEMPTS).unwrap();
        let (host, served) = serve_statuses(vec![409; attempts + 1]).await;
        let api = api_at(&host);
        let err = update_request(&api, "zzzzz-xvhdp-0123456789abcde", &json!({"priority": 0}))
            .await
            .unwrap_err();
        assert_eq!(err.status().map(|status| status.as_u16()), Some(409));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), attempts);
    }

    #[test]
    fn conflict_delays_double_for_each_attempt() {
        let delays: Vec<Duration> = conflict_delays().collect();
        assert_eq!(delays.len() as u32, CONFLICT_ATTEMPTS - 1);
        assert_eq!(delays[0], CONFLICT_FIRST_DELAY);
        assert_eq!(delays[1], CONFLICT_FIRST_DELAY * 2);
        let total: Duration = delays.iter().sum();
        assert!(total < Duration::from_secs(2), "{total:?}");
    }

    #[test]
    fn outcome_messages_name_the_container() {
        let outcome = CancelOutcome::Stopping {
            container_uuid: "zzzzz-dz642-0123456789abcde".into(),
            state: ContainerState::Running,
        };
        let text = outcome.to_string();
        assert!(
            text.contains("zzzzz-dz642-0123456789abcde is Running"),
            "{text}"
        );
        let finalized = CancelOutcome::Finalized {
            container_uuid: Some("zzzzz-dz642-0123456789abcde".into()),
        };
        assert!(finalized
            .to_string()
            .contains("before container zzzzz-dz642-0123456789abcde started"));
    }
}
