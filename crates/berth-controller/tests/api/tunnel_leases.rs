//! Gateway tunnel leases in the store: claims by the same supervisor move
//! the lease, claims by another wait for a stale heartbeat, and a release
//! after a move leaves the new holder's lease alone.

use crate::common::TestApi;

const SECOND_MS: i64 = 1000;
const CONTAINER: &str = "zzzzz-dz642-000000000000001";
const C1: &str = "http://10.0.0.1:8000/";
const C2: &str = "http://10.0.0.2:8000/";

#[tokio::test]
async fn tunnel_lease_claims_move_and_release() {
    let api = TestApi::new().await;
    let store = api.state.store();
    let now = 1_000_000;
    let stale_limit = |at: i64| at - 30 * SECOND_MS;

    assert_eq!(store.get_tunnel(CONTAINER).await.unwrap(), None);
    let first = store
        .claim_tunnel(CONTAINER, C1, "supervisor-a", now, stale_limit(now))
        .await
        .unwrap();
    assert_eq!(first.controller_url, C1);
    assert_eq!(first.supervisor_id, "supervisor-a");
    assert_eq!(first.epoch, 1);
    assert!(first.is_live(stale_limit(now)));

    // Another supervisor cannot take a live lease.
    let refused = store
        .claim_tunnel(
            CONTAINER,
            C2,
            "supervisor-b",
            now + SECOND_MS,
            stale_limit(now),
        )
        .await
        .unwrap();
    assert_eq!(refused.controller_url, C1);
    assert_eq!(refused.supervisor_id, "supervisor-a");
    assert_eq!(refused.epoch, 1);

    // The same supervisor moves its tunnel to another controller.
    let moved = store
        .claim_tunnel(
            CONTAINER,
            C2,
            "supervisor-a",
            now + 2 * SECOND_MS,
            stale_limit(now),
        )
        .await
        .unwrap();
    assert_eq!(moved.controller_url, C2);
    assert_eq!(moved.epoch, 2);

    // The old holder's release, at its epoch, leaves the new lease.
    assert!(!store.release_tunnel(CONTAINER, 1).await.unwrap());
    let kept = store.get_tunnel(CONTAINER).await.unwrap().unwrap();
    assert_eq!(kept.controller_url, C2);

    // Heartbeats refresh only the controller's own leases.
    assert_eq!(
        store
            .heartbeat_tunnels(C1, now + 5 * SECOND_MS)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .heartbeat_tunnels(C2, now + 5 * SECOND_MS)
            .await
            .unwrap(),
        1
    );
    let refreshed = store.get_tunnel(CONTAINER).await.unwrap().unwrap();
    assert_eq!(refreshed.heartbeat_at_ms, now + 5 * SECOND_MS);

    // Once the heartbeat is stale, another supervisor takes the lease.
    let later = now + 60 * SECOND_MS;
    assert!(!refreshed.is_live(stale_limit(later)));
    let taken = store
        .claim_tunnel(CONTAINER, C1, "supervisor-b", later, stale_limit(later))
        .await
        .unwrap();
    assert_eq!(taken.supervisor_id, "supervisor-b");
    assert_eq!(taken.controller_url, C1);
    assert_eq!(taken.epoch, 3);

    assert!(store.release_tunnel(CONTAINER, 3).await.unwrap());
    assert_eq!(store.get_tunnel(CONTAINER).await.unwrap(), None);
}

#[tokio::test]
async fn controller_start_drops_its_old_leases() {
    let api = TestApi::new().await;
    let store = api.state.store();
    let now = 1_000_000;
    for (index, controller) in [C1, C1, C2].into_iter().enumerate() {
        let container = format!("zzzzz-dz642-00000000000000{index}");
        store
            .claim_tunnel(
                &container,
                controller,
                "supervisor",
                now,
                now - 30 * SECOND_MS,
            )
            .await
            .unwrap();
    }

    assert_eq!(store.release_controller_tunnels(C1).await.unwrap(), 2);
    assert_eq!(
        store
            .get_tunnel("zzzzz-dz642-000000000000000")
            .await
            .unwrap(),
        None
    );
    let other = store
        .get_tunnel("zzzzz-dz642-000000000000002")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.controller_url, C2);
}
