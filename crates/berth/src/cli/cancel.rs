//! `berth cancel`: cancel container requests.
//!
//! Cancelling a request sets its priority to 0. The controller then drops
//! its container's priority, and the dispatcher stops a Locked or Running
//! container, which ends Cancelled and takes the request to Final. A
//! container that is still Queued would only sit on hold, so the request
//! is also set Final at once. Given a container UUID, the command cancels
//! the caller's committed requests for that container.

use std::fmt;
use std::process::ExitCode;

use anyhow::Context;
use berth_core::{ContainerState, RequestState};
use clap::Args;
use serde_json::json;

use super::api::{Api, Target};

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
            Target::Request(uuid) => match cancel_request(&api, uuid.as_str()).await {
                Ok(outcome) => println!("{uuid}: {outcome}"),
                Err(err) => {
                    eprintln!("berth: {uuid}: {err:#}");
                    failed = true;
                }
            },
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
        match cancel_request(api, &request.uuid).await {
            Ok(outcome) => println!("{container_uuid}: request {}: {outcome}", request.uuid),
            Err(err) => {
                eprintln!("berth: {container_uuid}: request {}: {err:#}", request.uuid);
                failures += 1;
            }
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
        api.client
            .update_container_request(request_uuid, &json!({ "priority": 0 }))
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
    let result = api
        .client
        .update_container_request(request_uuid, &json!({ "state": "Final" }))
        .await;
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
