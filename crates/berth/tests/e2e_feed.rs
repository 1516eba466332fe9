//! End to end: the dispatcher acts on the controller's change feed, not on
//! its periodic passes.
//!
//! Each test starts a cluster whose dispatcher polls the batch system only
//! every [`POLL_INTERVAL`] and lists the queue only every
//! [`RESYNC_INTERVAL`], and whose controller logs every request it
//! completes. A request committed after the dispatcher's first pass must
//! then get its container locked, run and finished, and a running
//! container must be cancelled, all before the first poll could have run.
//! The controller's log must also show no list call after the first pass,
//! because a dispatcher that lost the feed lists the queue at each poll.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use berth_client::Client;
use berth_core::{Container, ContainerState};
use common::{skip, slurm_jobs_named, wait_until, ClusterOptions, DispatchSettings, TestCluster};
use serde_json::json;

/// Time between two polls of the batch system: long enough that no poll
/// falls within a test, which ends well before it on a loaded machine.
const POLL_INTERVAL: Duration = Duration::from_secs(180);

/// Time between two listings of the queue.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1800);

/// The route of a container list call.
const LIST_ROUTE: &str = "/arvados/v1/containers";

/// Builds a committed request for `command` at priority 1, with small
/// resources.
fn request_body(command: &[&str]) -> serde_json::Value {
    common::request_body(command, 1)
}

/// A cluster with long intervals, and the time before its dispatcher
/// started: no poll can run before `started + POLL_INTERVAL`.
struct FeedCluster {
    cluster: TestCluster,
    started: Instant,
}

impl FeedCluster {
    fn start(backend: &str) -> FeedCluster {
        let options = ClusterOptions {
            dispatch: DispatchSettings {
                poll_interval: POLL_INTERVAL,
                resync_interval: RESYNC_INTERVAL,
                watch: true,
                ..DispatchSettings::default()
            },
            log_requests: true,
            ..ClusterOptions::default()
        };
        let started = Instant::now();
        let cluster = TestCluster::start_with(backend, &options);
        FeedCluster { cluster, started }
    }

    /// Waits until `uuid`'s container satisfies `done`, which must happen
    /// before the dispatcher's first poll was due.
    async fn before_first_poll(
        &self,
        client: &Client,
        uuid: &str,
        event: &str,
        done: impl Fn(&Container) -> bool,
    ) -> Container {
        let deadline = self.started + POLL_INTERVAL;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = format!("{event} before poll_interval ({POLL_INTERVAL:?}) elapsed");
        let container = wait_until(&self.cluster, remaining, &event, || async {
            let container = client.get_container(uuid).await.ok()?;
            done(&container).then_some(container)
        })
        .await;
        assert!(
            Instant::now() < deadline,
            "{event}: it took {:?} after the dispatcher started\n{}",
            self.started.elapsed(),
            self.cluster.logs()
        );
        container
    }

    fn lists(&self) -> usize {
        self.cluster.count_requests("GET", LIST_ROUTE)
    }
}

/// Runs the scenario on `backend`: a request committed after the first
/// pass runs to completion, and a running container is cancelled, before
/// the first poll and without a list call.
async fn feed_drives_the_dispatcher(backend: &str) {
    let feed = FeedCluster::start(backend);
    let token = feed.cluster.create_user("grace");
    let grace = common::client(&feed.cluster.api_url, &token);

    // Once this container is locked, the dispatcher's first pass has
    // listed the queue, so nothing committed afterwards is in that list.
    let sleeper = grace
        .create_container_request(&request_body(&["sleep", "600"]))
        .await
        .expect("create the sleeping request");
    let sleeper_uuid = sleeper.container_uuid.clone().expect("container uuid");
    feed.before_first_poll(
        &grace,
        &sleeper_uuid,
        "the first container to be locked",
        |c| c.state != ContainerState::Queued,
    )
    .await;
    let first_pass_lists = feed.lists();
    assert_eq!(
        first_pass_lists,
        2,
        "the first pass lists the dispatcher's containers and the queue\n{}",
        feed.cluster.logs()
    );

    let quick = grace
        .create_container_request(&request_body(&["sh", "-c", "echo from-the-feed"]))
        .await
        .expect("create the quick request");
    let quick_uuid = quick.container_uuid.clone().expect("container uuid");
    feed.before_first_poll(
        &grace,
        &quick_uuid,
        "the second container to be locked",
        |c| c.state != ContainerState::Queued,
    )
    .await;
    let finished = feed
        .before_first_poll(&grace, &quick_uuid, "the second container to finish", |c| {
            c.state.is_final()
        })
        .await;
    assert_eq!(
        finished.state,
        ContainerState::Complete,
        "{}",
        feed.cluster.logs()
    );
    assert_eq!(finished.exit_code, Some(0));
    let job_id = finished
        .scheduler_job_id
        .clone()
        .expect("the dispatcher recorded the job id");
    if backend == "slurm" {
        assert_eq!(
            slurm_jobs_named(&quick_uuid),
            [job_id],
            "one Slurm job, the recorded one"
        );
    }

    feed.before_first_poll(&grace, &sleeper_uuid, "the first container to run", |c| {
        c.state == ContainerState::Running
    })
    .await;
    grace
        .update_container_request(&sleeper.uuid, &json!({"priority": 0}))
        .await
        .expect("set priority 0");
    let cancelled = feed
        .before_first_poll(&grace, &sleeper_uuid, "the first container to stop", |c| {
            c.state.is_final()
        })
        .await;
    assert_eq!(
        cancelled.state,
        ContainerState::Cancelled,
        "{}",
        feed.cluster.logs()
    );

    assert_eq!(
        feed.lists(),
        first_pass_lists,
        "list calls after the first pass: the dispatcher did not follow the feed\n{}",
        feed.cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_dispatcher_follows_the_change_feed() {
    if skip() {
        return;
    }
    feed_drives_the_dispatcher("local").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slurm_dispatcher_follows_the_change_feed() {
    if skip() {
        return;
    }
    feed_drives_the_dispatcher("slurm").await;
}
