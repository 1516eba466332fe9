//! Two controllers on one PostgreSQL schema: waiters on one hear of the
//! writes made through the other, through the store's listener. These
//! tests run when `BERTH_TEST_DATABASE_URL` names a PostgreSQL database,
//! and pass without checking anything on SQLite, which one controller
//! uses alone.

use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use berth_controller::{app, AppState, Config};
use serde_json::json;
use sqlx::Connection;

use crate::changes::{cursor, spawn_get, until, woken};
use crate::common::{cluster, str_of, TestApi, DATABASE_URL_VARIABLE, SYSTEM_TOKEN};

/// A second controller on the database of a [`TestApi`].
struct OtherController {
    state: AppState,
    app: Router,
    /// The PostgreSQL `application_name` of its connections, which
    /// distinguishes its listener's session from every other test's.
    application_name: String,
}

impl OtherController {
    /// Starts a controller on the test's database and waits until its
    /// listener LISTENs; returns `None` on SQLite.
    async fn start(api: &TestApi) -> Option<OtherController> {
        if !api.database_url().starts_with("postgres") {
            return None;
        }
        let application_name = format!("berth_test_{:016x}", rand::random::<u64>());
        let url = format!("{}&application_name={application_name}", api.database_url());
        let config = Config::new("127.0.0.1:0".parse().unwrap(), url.clone());
        let store = berth_controller::store::open(&url, 4).await.unwrap();
        let state = AppState::new(store, cluster(), &config).unwrap();
        let other = OtherController {
            app: app(state.clone()),
            state,
            application_name,
        };
        other.listener_pid().await;
        Some(other)
    }

    /// Waits until the listener's LISTEN has finished, and returns its
    /// session's process id.
    async fn listener_pid(&self) -> i32 {
        let base_url = std::env::var(DATABASE_URL_VARIABLE).unwrap();
        let mut conn = sqlx::PgConnection::connect(&base_url).await.unwrap();
        let pid = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let pid: Option<i32> = sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity \
                     WHERE application_name = $1 AND query LIKE 'LISTEN %' AND state = 'idle'",
                )
                .bind(&self.application_name)
                .fetch_optional(&mut conn)
                .await
                .unwrap();
                if let Some(pid) = pid {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the listener never started listening");
        conn.close().await.unwrap();
        pid
    }

    async fn stop(self) {
        self.state.stop_change_listener().await;
        self.state.store().close().await;
    }
}

#[tokio::test]
async fn change_feed_wakes_waiter_on_other_controller() {
    let api = TestApi::new().await;
    let Some(other) = OtherController::start(&api).await else {
        return;
    };
    let alice = api.user("alice", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let waiter = spawn_get(
        &other.app,
        &format!("containers/changes?after={start}&wait=30"),
        &alice,
    );
    until("the waiter subscribed", || {
        other.state.notifier().change_waiter_count() > 0
    })
    .await;

    let (_, created) = api.committed(&alice).await;
    let reply = woken(waiter).await;
    reply.expect(StatusCode::OK);
    let page = reply.json();
    assert_eq!(page["items"][0]["uuid"], created["uuid"]);
    other.stop().await;
}

#[tokio::test]
async fn log_reader_on_other_controller_wakes_on_append() {
    let api = TestApi::new().await;
    let Some(other) = OtherController::start(&api).await else {
        return;
    };
    let alice = api.user("alice", false).await;
    let (_, created) = api.committed(&alice).await;
    let uuid = str_of(&created, "uuid").to_string();
    let token = api.lock(&uuid).await;
    let reader = spawn_get(
        &other.app,
        &format!("containers/{uuid}/log/stdout?offset=0&wait=30"),
        &alice,
    );
    until("the reader subscribed", || {
        other.state.notifier().channel_count() > 0
    })
    .await;

    api.append_log(&uuid, "stdout", 0, &token, b"hello\n")
        .await
        .expect(StatusCode::OK);
    let reply = woken(reader).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.body.as_ref(), b"hello\n");
    other.stop().await;
}

#[tokio::test]
async fn log_reader_on_other_controller_wakes_on_state_change() {
    let api = TestApi::new().await;
    let Some(other) = OtherController::start(&api).await else {
        return;
    };
    let alice = api.user("alice", false).await;
    let (_, created) = api.committed(&alice).await;
    let uuid = str_of(&created, "uuid").to_string();
    api.lock(&uuid).await;
    // The reader names the state it saw, so a change that commits before
    // its first read still ends its wait.
    let reader = spawn_get(
        &other.app,
        &format!("containers/{uuid}/log/stdout?offset=0&wait=30&state=Locked"),
        &alice,
    );
    until("the reader subscribed", || {
        other.state.notifier().channel_count() > 0
    })
    .await;

    api.update_container(&uuid, SYSTEM_TOKEN, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let reply = woken(reader).await;
    reply.expect(StatusCode::OK);
    assert_eq!(
        reply.header("x-berth-container-state").as_deref(),
        Some("Running")
    );
    other.stop().await;
}

#[tokio::test]
async fn listener_reconnects_and_wakes_every_waiter() {
    let api = TestApi::new().await;
    let Some(other) = OtherController::start(&api).await else {
        return;
    };
    let pid = other.listener_pid().await;
    // No write names this container, so only the reconnection wakes it.
    let mut waiter = other
        .state
        .notifier()
        .subscribe("zzzzz-dz642-nobodywritesthis");
    waiter.borrow_and_update();

    let base_url = std::env::var(DATABASE_URL_VARIABLE).unwrap();
    let mut conn = sqlx::PgConnection::connect(&base_url).await.unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert!(terminated);

    tokio::time::timeout(Duration::from_secs(20), waiter.changed())
        .await
        .expect("the reconnection did not wake the waiter")
        .unwrap();
    let new_pid = other.listener_pid().await;
    assert_ne!(new_pid, pid);

    // The new connection carries notifications again.
    let alice = api.user("alice", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let feed_waiter = spawn_get(
        &other.app,
        &format!("containers/changes?after={start}&wait=30"),
        &alice,
    );
    until("the waiter subscribed", || {
        other.state.notifier().change_waiter_count() > 0
    })
    .await;
    let (_, created) = api.committed(&alice).await;
    let reply = woken(feed_waiter).await;
    assert_eq!(reply.json()["items"][0]["uuid"], created["uuid"]);
    other.stop().await;
}
