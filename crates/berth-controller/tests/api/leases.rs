//! Dispatch leases: the store's compare-and-set on each dialect, the
//! routes, and lock calls fenced by a lease epoch. The store tests pass
//! explicit times, so expiry needs no sleep.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::common::{str_of, TestApi, SYSTEM_TOKEN};

const SECOND_MS: i64 = 1000;

#[tokio::test]
async fn lease_acquire_renew_release_cas() {
    let api = TestApi::new().await;
    let store = api.state.store();
    let now = 1_000_000;

    let first = store
        .acquire_lease("slurm", "a", now, now + 10 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(first.holder.as_deref(), Some("a"));
    assert_eq!(first.epoch, 1);
    assert!(first.is_held_by("a", now));

    // Another holder cannot take an unexpired lease.
    let refused = store
        .acquire_lease("slurm", "b", now + SECOND_MS, now + 11 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(refused.holder.as_deref(), Some("a"));
    assert_eq!(refused.epoch, 1);
    assert_eq!(refused.expires_at_ms, now + 10 * SECOND_MS);

    // The holder acquiring again extends its lease at the same epoch.
    let again = store
        .acquire_lease("slurm", "a", now + 2 * SECOND_MS, now + 12 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(again.epoch, 1);
    assert_eq!(again.expires_at_ms, now + 12 * SECOND_MS);

    // Once it expired, another holder takes it with a new epoch.
    let later = now + 13 * SECOND_MS;
    let taken = store
        .acquire_lease("slurm", "b", later, later + 10 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(taken.holder.as_deref(), Some("b"));
    assert_eq!(taken.epoch, 2);

    // The old holder can neither renew nor release it.
    let stale_renew = store
        .renew_lease("slurm", "a", 1, later + 20 * SECOND_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale_renew.holder.as_deref(), Some("b"));
    assert_eq!(stale_renew.expires_at_ms, later + 10 * SECOND_MS);
    let stale_release = store.release_lease("slurm", "a", 1).await.unwrap().unwrap();
    assert_eq!(stale_release.holder.as_deref(), Some("b"));

    // The holder renews at its epoch, and not at another.
    let renewed = store
        .renew_lease("slurm", "b", 2, later + 15 * SECOND_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.expires_at_ms, later + 15 * SECOND_MS);
    let wrong_epoch = store
        .renew_lease("slurm", "b", 1, later + 30 * SECOND_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(wrong_epoch.expires_at_ms, later + 15 * SECOND_MS);

    // A release frees it at once; the next holder gets a new epoch.
    let released = store.release_lease("slurm", "b", 2).await.unwrap().unwrap();
    assert_eq!(released.holder, None);
    let next = store
        .acquire_lease("slurm", "a", later + SECOND_MS, later + 11 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(next.holder.as_deref(), Some("a"));
    assert_eq!(next.epoch, 3);

    // Leases of other names are separate.
    let other = store
        .acquire_lease("lsf", "b", later, later + 10 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(other.holder.as_deref(), Some("b"));
    assert_eq!(other.epoch, 1);
    assert_eq!(
        store.renew_lease("none", "a", 1, later).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn expired_lease_renews_until_taken() {
    let api = TestApi::new().await;
    let store = api.state.store();
    let now = 5_000_000;
    store
        .acquire_lease("slurm", "a", now, now + SECOND_MS)
        .await
        .unwrap();
    // Expired, but nobody took it: the unchanged epoch lets "a" renew.
    let renewed = store
        .renew_lease("slurm", "a", 1, now + 20 * SECOND_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.holder.as_deref(), Some("a"));
    assert_eq!(renewed.epoch, 1);
    assert_eq!(renewed.expires_at_ms, now + 20 * SECOND_MS);
}

#[tokio::test]
async fn concurrent_acquires_elect_one_holder() {
    let api = TestApi::new().await;
    let store = api.state.store();
    let now = 9_000_000;
    let holders: Vec<String> = (0..8).map(|index| format!("holder-{index}")).collect();
    let attempts = holders
        .iter()
        .map(|holder| store.acquire_lease("slurm", holder, now, now + 10 * SECOND_MS));
    let leases = futures::future::join_all(attempts).await;
    let mut winners = Vec::new();
    for (holder, lease) in holders.iter().zip(leases) {
        let lease = lease.unwrap();
        assert_eq!(lease.epoch, 1, "{lease:?}");
        if lease.is_held_by(holder, now) {
            winners.push(holder.clone());
        }
    }
    assert_eq!(winners.len(), 1, "holders: {winners:?}");
}

#[tokio::test]
async fn lease_routes_report_holder_and_expiry() {
    let api = TestApi::new().await;
    let acquire = |holder: &str| {
        api.call(
            Method::POST,
            "dispatch_leases/slurm/acquire",
            Some(SYSTEM_TOKEN),
            Some(json!({"holder": holder, "ttl": 10})),
        )
    };
    let first = acquire("host-a:10:f00").await;
    first.expect(StatusCode::OK);
    let first = first.json();
    assert_eq!(first["kind"], "berth#dispatchLease");
    assert_eq!(first["held"], true);
    assert_eq!(first["holder"], "host-a:10:f00");
    assert_eq!(first["epoch"], 1);
    let expires_in = first["expires_in"].as_f64().unwrap();
    assert!(expires_in > 9.0, "{first}");
    assert!(expires_in <= 10.0, "{first}");
    assert!(first["expires_at"].is_string(), "{first}");

    let standby = acquire("host-b:20:bar").await;
    standby.expect(StatusCode::OK);
    assert_eq!(standby.json()["held"], false);
    assert_eq!(standby.json()["holder"], "host-a:10:f00");

    let renewed = api
        .call(
            Method::POST,
            "dispatch_leases/slurm/renew?holder=host-a:10:f00&epoch=1&ttl=5",
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    renewed.expect(StatusCode::OK);
    assert_eq!(renewed.json()["held"], true);

    let released = api
        .call(
            Method::POST,
            "dispatch_leases/slurm/release",
            Some(SYSTEM_TOKEN),
            Some(json!({"holder": "host-a:10:f00", "epoch": 1})),
        )
        .await;
    released.expect(StatusCode::OK);
    assert_eq!(released.json()["held"], false);
    assert_eq!(released.json()["holder"], serde_json::Value::Null);

    let taken = acquire("host-b:20:bar").await;
    assert_eq!(taken.json()["held"], true);
    assert_eq!(taken.json()["epoch"], 2);

    let missing = api
        .call(
            Method::POST,
            "dispatch_leases/never/renew",
            Some(SYSTEM_TOKEN),
            Some(json!({"holder": "x", "epoch": 1, "ttl": 10})),
        )
        .await;
    missing.expect(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_lease_parameters_are_422() {
    let api = TestApi::new().await;
    for (path, body, expected) in [
        (
            "dispatch_leases/slurm/acquire",
            json!({"ttl": 10}),
            "missing holder parameter",
        ),
        (
            "dispatch_leases/slurm/acquire",
            json!({"holder": "a b", "ttl": 10}),
            "invalid holder parameter",
        ),
        (
            "dispatch_leases/slurm/acquire",
            json!({"holder": "a"}),
            "missing ttl parameter",
        ),
        (
            "dispatch_leases/slurm/acquire",
            json!({"holder": "a", "ttl": 0.5}),
            "invalid ttl parameter 0.5",
        ),
        (
            "dispatch_leases/slurm/acquire",
            json!({"holder": "a", "ttl": 301}),
            "invalid ttl parameter 301",
        ),
        (
            "dispatch_leases/slurm/renew",
            json!({"holder": "a", "ttl": 10}),
            "missing epoch parameter",
        ),
        (
            "dispatch_leases/sl%20urm/acquire",
            json!({"holder": "a", "ttl": 10}),
            "invalid dispatch lease name",
        ),
    ] {
        let reply = api
            .call(Method::POST, path, Some(SYSTEM_TOKEN), Some(body.clone()))
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            reply.errors().contains(expected),
            "{body}: {}",
            reply.errors()
        );
    }
}

#[tokio::test]
async fn lock_with_stale_lease_epoch_is_409() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, first) = api.committed(&alice).await;
    let (_, second) = api.committed(&alice).await;
    let (_, third) = api.committed(&alice).await;
    let api = &api;
    let lock = |uuid: String, query: &'static str| async move {
        let path = format!("containers/{uuid}/lock{query}");
        api.call(Method::POST, &path, Some(SYSTEM_TOKEN), None)
            .await
    };

    let acquired = api
        .call(
            Method::POST,
            "dispatch_leases/slurm/acquire",
            Some(SYSTEM_TOKEN),
            Some(json!({"holder": "old", "ttl": 10})),
        )
        .await;
    assert_eq!(acquired.json()["epoch"], 1);
    lock(
        str_of(&first, "uuid").to_string(),
        "?lease=slurm&lease_epoch=1",
    )
    .await
    .expect(StatusCode::OK);

    // Another dispatcher takes the lease after it expired (a time far
    // ahead stands for the expiry); the old epoch no longer locks.
    let far = chrono::Utc::now().timestamp_millis() + 3600 * SECOND_MS;
    let taken = api
        .state
        .store()
        .acquire_lease("slurm", "new", far, far + 10 * SECOND_MS)
        .await
        .unwrap();
    assert_eq!(taken.epoch, 2);
    let second_uuid = str_of(&second, "uuid").to_string();
    let stale = lock(second_uuid.clone(), "?lease=slurm&lease_epoch=1").await;
    stale.expect(StatusCode::CONFLICT);
    assert!(
        stale.errors().contains("no longer held at epoch 1"),
        "{}",
        stale.errors()
    );
    let container = api
        .get(&format!("containers/{second_uuid}"), SYSTEM_TOKEN)
        .await;
    assert_eq!(container.json()["state"], "Queued");

    lock(second_uuid, "?lease=slurm&lease_epoch=2")
        .await
        .expect(StatusCode::OK);

    let unknown = lock(
        str_of(&third, "uuid").to_string(),
        "?lease=lsf&lease_epoch=1",
    )
    .await;
    unknown.expect(StatusCode::CONFLICT);
    let half = lock(str_of(&third, "uuid").to_string(), "?lease=slurm").await;
    half.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        half.errors().contains("give both or neither"),
        "{}",
        half.errors()
    );
}
