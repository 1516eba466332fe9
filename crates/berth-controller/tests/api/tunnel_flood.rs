//! Many tunnels held open while a client floods the API: tunnels take
//! slots of their own pool, so ordinary requests up to the API pool's
//! maximum keep succeeding. The supervisors are fake (berth-tunnel's dial
//! side, echoing every `/ssh` stream) and share the test's process with
//! the controller, so each tunnel costs two file descriptors here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_controller::auth::Caller;
use berth_controller::lifecycle::lock_container;
use berth_controller::limits::{self, Pool};
use berth_controller::store::ContainerWrite;
use berth_core::{ContainerState, ObjectType, Uuid};
use futures::stream::{self, StreamExt};
use reqwest::StatusCode;

use crate::common::gateway::{
    dial_config, fake_supervisor, metric, pattern, round_trip, wait_until, Controller,
};
use crate::common::TestDatabase;

/// Tunnels held open during the flood.
const TUNNELS: usize = 1000;

/// Containers created at the same time while the test sets up.
const SETUP_CONCURRENCY: usize = 16;

/// How long the client floods the API.
const FLOOD_DURATION: Duration = Duration::from_secs(3);

/// Concurrent flooding clients: as many as the API pool admits at once.
const FLOOD_CONCURRENCY: usize = limits::defaults::MAX_CONCURRENT_REQUESTS;

#[tokio::test(flavor = "multi_thread")]
async fn api_flood_beside_many_tunnels() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |config| {
        config.limits.max_concurrent_requests = FLOOD_CONCURRENCY;
        config.limits.max_tunnels = TUNNELS;
    })
    .await;
    let alice = controller.user("alice", false).await;

    let containers = running_containers(&controller, &alice, TUNNELS).await;
    let supervisors: Vec<_> = containers
        .iter()
        .enumerate()
        .map(|(index, (uuid, secret))| {
            let supervisor = format!("sup-{index}");
            fake_supervisor(vec![dial_config(&controller, uuid, secret, &supervisor)])
        })
        .collect();
    let gateway = controller.state.gateway().clone();
    wait_until("every tunnel is registered", || {
        let all = gateway.tunnel_count() == TUNNELS;
        async move { all }
    })
    .await;

    let limits = controller.state.limits().clone();
    assert_eq!(limits.in_use(Pool::Tunnel), TUNNELS);
    assert_eq!(limits.in_use(Pool::Api), 0);
    let before = controller.metrics().await;
    assert_eq!(metric(&before, "berth_gateway_tunnels"), TUNNELS as u64);
    assert_eq!(
        metric(&before, "berth_requests_in_use{pool=\"tunnel\"}"),
        TUNNELS as u64
    );
    assert_eq!(metric(&before, "berth_requests_in_use{pool=\"api\"}"), 0);

    // The flood: each client sends its next request as soon as it has
    // read the last response, for FLOOD_DURATION.
    let http = reqwest::Client::new();
    let uuids: Arc<Vec<String>> = Arc::new(containers.iter().map(|(u, _)| u.clone()).collect());
    let succeeded = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + FLOOD_DURATION;
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..FLOOD_CONCURRENCY {
        let http = http.clone();
        let url = controller.url.clone();
        let token = alice.clone();
        let uuids = uuids.clone();
        let succeeded = succeeded.clone();
        clients.spawn(async move {
            let mut failures = Vec::new();
            let mut index = client;
            while Instant::now() < deadline {
                let uuid = &uuids[index % uuids.len()];
                index += FLOOD_CONCURRENCY;
                let response = http
                    .get(format!("{url}/arvados/v1/containers/{uuid}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let body = response.text().await.unwrap();
                if status == StatusCode::OK {
                    succeeded.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(format!("{status}: {body}"));
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = clients.join_next().await {
        failures.extend(result.unwrap());
    }
    let succeeded = succeeded.load(Ordering::Relaxed);
    eprintln!(
        "{succeeded} requests succeeded in {FLOOD_DURATION:?} from {FLOOD_CONCURRENCY} clients beside {TUNNELS} tunnels"
    );
    assert!(
        failures.is_empty(),
        "{} of {} flood requests failed, the first: {}",
        failures.len(),
        failures.len() + succeeded,
        failures[0]
    );
    assert!(succeeded >= FLOOD_CONCURRENCY, "only {succeeded} requests");

    // No request was rejected, and the tunnels still hold only tunnel
    // slots.
    let after = controller.metrics().await;
    assert!(
        !after.contains("berth_requests_rejected_total{pool=\"api\""),
        "{after}"
    );
    assert_eq!(
        metric(&after, "berth_requests_in_use{pool=\"tunnel\"}"),
        TUNNELS as u64
    );
    assert_eq!(limits.in_use(Pool::Api), 0);

    // Every tunnel is still the one first accepted: none was dialled again.
    assert_eq!(metric(&after, "berth_gateway_tunnels"), TUNNELS as u64);
    assert_eq!(
        metric(&after, "berth_gateway_tunnels_accepted_total"),
        TUNNELS as u64
    );
    assert!(supervisors.iter().all(|task| !task.is_finished()));
    let store = controller.state.store();
    let internal_url = controller.internal_url();
    for (uuid, _) in &containers {
        let lease = store.get_tunnel(uuid).await.unwrap().unwrap();
        assert_eq!(lease.controller_url, internal_url, "{uuid}");
        assert_eq!(lease.epoch, 1, "{uuid}");
    }

    // A shell stream through a few of the tunnels still works.
    for (seed, (uuid, _)) in containers.iter().step_by(TUNNELS / 4).enumerate() {
        let stream = controller.client(&alice).connect_ssh(uuid).await.unwrap();
        let data = pattern(seed as u64, 64 * 1024);
        assert_eq!(round_trip(stream, &data).await, data, "{uuid}");
    }

    for supervisor in supervisors {
        supervisor.abort();
    }
}

/// Creates `count` Running containers, each with a request of `token`'s
/// user, and returns their uuids and gateway secrets. One request goes
/// through the API; the others are copies of it, with new uuids, written
/// straight to the store, which is many times faster on a busy machine.
/// Each container is locked by the controller's own lock code, so its
/// gateway secret and the hash the store keeps are real.
async fn running_containers(
    controller: &Controller,
    token: &str,
    count: usize,
) -> Vec<(String, String)> {
    let created = controller.committed_request(token).await;
    let store = controller.state.store();
    let request_uuid = created["uuid"].as_str().unwrap();
    let request = store
        .get_request(request_uuid)
        .await
        .unwrap()
        .unwrap()
        .record;
    let secrets = store
        .get_request_secrets(request_uuid)
        .await
        .unwrap()
        .unwrap()
        .record;
    let container_uuid = request.container_uuid.clone().unwrap();
    let container = store
        .get_container(&container_uuid)
        .await
        .unwrap()
        .unwrap()
        .record;
    let cluster_id = controller.state.cluster().cluster_id.clone();
    let dispatcher = Caller {
        user_uuid: format!("{cluster_id}-tpzed-000000000000000"),
        token_uuid: format!("{cluster_id}-gj3su-000000000000000"),
        is_admin: true,
        container_uuid: None,
        scopes: vec!["all".to_owned()],
    };

    let copy = |_| {
        let mut request = request.clone();
        let mut container = container.clone();
        let secrets = secrets.clone();
        let cluster_id = cluster_id.clone();
        let dispatcher = dispatcher.clone();
        async move {
            request.uuid = Uuid::generate(&cluster_id, ObjectType::ContainerRequest).to_string();
            container.uuid = Uuid::generate(&cluster_id, ObjectType::Container).to_string();
            request.container_uuid = Some(container.uuid.clone());
            store
                .insert_request(&request, &secrets, Some(&container), None, None)
                .await
                .unwrap();
            let version = store
                .get_container(&container.uuid)
                .await
                .unwrap()
                .unwrap()
                .version;
            let lock =
                lock_container(&cluster_id, &dispatcher, &container, chrono::Utc::now()).unwrap();
            let mut running = lock.change.record;
            running.state = ContainerState::Running;
            store
                .update_container(&ContainerWrite {
                    record: running,
                    expected_version: version,
                    credentials: lock.change.credentials,
                    finalize_requests: false,
                    retry: None,
                    clear_secrets: false,
                    lease_fence: None,
                })
                .await
                .unwrap();
            (container.uuid, lock.credentials.gateway_secret)
        }
    };
    stream::iter(0..count)
        .map(copy)
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await
}
