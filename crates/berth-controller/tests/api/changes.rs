//! `containers/changes`: the container change feed, its cursor, paging,
//! visibility and waiting, and the store's change pages behind it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use axum::Router;
use berth_controller::store::Visibility;
use serde_json::{json, Value};

use crate::common::{str_of, Reply, TestApi, TestDatabase, SYSTEM_TOKEN};

/// How long a test lets a waiter with `wait=30` take before it counts as
/// not woken: well before the wait ends.
const WAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Returns the feed's response, which must be 200.
async fn changes(api: &TestApi, token: &str, query: &str) -> Value {
    let reply = api.get(&format!("containers/changes?{query}"), token).await;
    reply.expect(StatusCode::OK);
    reply.json()
}

/// Takes a cursor: a call without `after`.
pub async fn cursor(api: &TestApi, token: &str) -> String {
    let page = changes(api, token, "").await;
    assert_eq!(page["items"], json!([]));
    str_of(&page, "cursor").to_string()
}

fn uuids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"))
        .iter()
        .map(|item| str_of(item, "uuid").to_string())
        .collect()
}

async fn container(api: &TestApi, uuid: &str) -> Value {
    let reply = api.get(&format!("containers/{uuid}"), SYSTEM_TOKEN).await;
    reply.expect(StatusCode::OK);
    reply.json()
}

/// Sends a GET to a router from a task of its own, so the test can act
/// while the call waits.
pub fn spawn_get(
    app: &Router,
    path: &str,
    token: &str,
) -> tokio::task::JoinHandle<(Reply, Duration)> {
    let app = app.clone();
    let request = TestApi::request(Method::GET, path, Some(token))
        .body(axum::body::Body::empty())
        .unwrap();
    tokio::spawn(async move {
        use tower::ServiceExt;
        let started = Instant::now();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let reply = Reply {
            status,
            headers,
            body,
        };
        (reply, started.elapsed())
    })
}

/// Waits until `condition` holds, checking after each yield.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// Waits for a spawned call and returns its reply, failing the test when
/// the call is still waiting after [`WAKE_TIMEOUT`].
pub async fn woken(call: tokio::task::JoinHandle<(Reply, Duration)>) -> Reply {
    let (reply, elapsed) = tokio::time::timeout(WAKE_TIMEOUT, call)
        .await
        .expect("the waiting call was not woken")
        .unwrap();
    assert!(elapsed < WAKE_TIMEOUT, "answered after {elapsed:?}");
    reply
}

#[tokio::test]
async fn changes_without_after_return_current_cursor() {
    let api = TestApi::new().await;
    let page = changes(&api, SYSTEM_TOKEN, "").await;
    assert_eq!(page["kind"], "berth#containerChangeList");
    assert_eq!(page["items"], json!([]));
    assert_eq!(page["more"], false);
    let first = str_of(&page, "cursor").to_string();
    assert_eq!(changes(&api, SYSTEM_TOKEN, "after=").await["cursor"], first);

    let alice = api.user("alice", false).await;
    api.committed(&alice).await;
    let page = changes(&api, SYSTEM_TOKEN, "").await;
    assert_eq!(page["items"], json!([]));
    let second: u64 = str_of(&page, "cursor").parse().unwrap();
    assert!(second > first.parse().unwrap(), "{first} then {second}");
}

#[tokio::test]
async fn container_shows_up_once_with_latest_record() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;

    let (_, created) = api.committed(&alice).await;
    let uuid = str_of(&created, "uuid").to_string();
    let page = changes(&api, SYSTEM_TOKEN, &format!("after={start}")).await;
    assert_eq!(page["items"], json!([created]));
    assert_eq!(page["more"], false);
    let after_create = str_of(&page, "cursor").to_string();

    api.lock(&uuid).await;
    let page = changes(&api, SYSTEM_TOKEN, &format!("after={after_create}")).await;
    assert_eq!(uuids(&page), [uuid.as_str()]);
    assert_eq!(page["items"][0]["state"], "Locked");
    let after_lock = str_of(&page, "cursor").to_string();

    for update in [
        json!({"state": "Running"}),
        json!({"state": "Complete", "exit_code": 0}),
    ] {
        api.update_container(&uuid, SYSTEM_TOKEN, update)
            .await
            .expect(StatusCode::OK);
    }
    let finished = container(&api, &uuid).await;
    let page = changes(&api, SYSTEM_TOKEN, &format!("after={after_lock}")).await;
    assert_eq!(page["items"], json!([finished.clone()]));
    assert_eq!(page["items"][0]["state"], "Complete");
    let after_finish = str_of(&page, "cursor").to_string();

    // From the first cursor, the container shows up once, at its latest.
    let page = changes(&api, SYSTEM_TOKEN, &format!("after={start}")).await;
    assert_eq!(page["items"], json!([finished]));

    let page = changes(&api, SYSTEM_TOKEN, &format!("after={after_finish}")).await;
    assert_eq!(page["items"], json!([]));
    assert_eq!(page["cursor"], after_finish.as_str());
}

#[tokio::test]
async fn priority_recompute_shows_up() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, created) = api.committed(&alice).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;

    let request_uuid = str_of(&request, "uuid");
    api.call(
        Method::PUT,
        &format!("container_requests/{request_uuid}"),
        Some(&alice),
        Some(json!({"container_request": {"priority": 500}})),
    )
    .await
    .expect(StatusCode::OK);

    let uuid = str_of(&created, "uuid");
    let current = container(&api, uuid).await;
    assert_ne!(current["priority"], created["priority"]);
    let page = changes(&api, &alice, &format!("after={start}")).await;
    assert_eq!(page["items"], json!([current]));
}

#[tokio::test]
async fn pages_follow_limit_and_more() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let mut created = Vec::new();
    for _ in 0..3 {
        let (_, container) = api.committed(&alice).await;
        created.push(str_of(&container, "uuid").to_string());
    }

    let first = changes(&api, SYSTEM_TOKEN, &format!("after={start}&limit=2")).await;
    assert_eq!(uuids(&first), created[..2]);
    assert_eq!(first["more"], true);
    let second = changes(
        &api,
        SYSTEM_TOKEN,
        &format!("after={}&limit=2", str_of(&first, "cursor")),
    )
    .await;
    assert_eq!(uuids(&second), created[2..]);
    assert_eq!(second["more"], false);
    let third = changes(
        &api,
        SYSTEM_TOKEN,
        &format!("after={}&limit=2", str_of(&second, "cursor")),
    )
    .await;
    assert_eq!(uuids(&third), Vec::<String>::new());
    assert_eq!(third["more"], false);

    let all = changes(&api, SYSTEM_TOKEN, &format!("after={start}&limit=1000")).await;
    assert_eq!(uuids(&all), created);
}

#[tokio::test]
async fn changes_show_only_what_caller_may_see() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let admin = api.user("admin", true).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let (_, alices) = api.committed(&alice).await;
    let alices = str_of(&alices, "uuid").to_string();
    let (_, bobs) = api.committed(&bob).await;
    let bobs = str_of(&bobs, "uuid").to_string();
    let container_token = api.lock(&alices).await;

    let after = format!("after={start}");
    let both = BTreeSet::from([alices.clone(), bobs.clone()]);
    for token in [SYSTEM_TOKEN, &admin] {
        let page = changes(&api, token, &after).await;
        assert_eq!(uuids(&page).into_iter().collect::<BTreeSet<_>>(), both);
    }
    let latest = cursor(&api, SYSTEM_TOKEN).await;
    for (token, visible) in [
        (&alice, &alices),
        (&bob, &bobs),
        (&container_token, &alices),
    ] {
        let page = changes(&api, token, &after).await;
        assert_eq!(uuids(&page), [visible.as_str()]);
        // The cursor passes the changes the caller may not see too.
        assert_eq!(page["cursor"], latest.as_str());
    }

    let carol = api.user("carol", false).await;
    let page = changes(&api, &carol, &after).await;
    assert_eq!(page["items"], json!([]));
    assert_eq!(page["cursor"], latest.as_str());
}

#[tokio::test]
async fn changes_need_a_token() {
    let api = TestApi::new().await;
    let reply = api
        .call(Method::GET, "containers/changes", None, None)
        .await;
    reply.expect(StatusCode::UNAUTHORIZED);
    let reply = api
        .call(
            Method::GET,
            "containers/changes",
            Some("v2/zzzzz-gj3su-000000000000000/nope"),
            None,
        )
        .await;
    reply.expect(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn waiter_returns_promptly_after_change() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let waiter = spawn_get(
        &api.app,
        &format!("containers/changes?after={start}&wait=30"),
        &alice,
    );
    until("the waiter subscribed", || {
        api.state.notifier().change_waiter_count() > 0
    })
    .await;

    let (_, created) = api.committed(&alice).await;
    let reply = woken(waiter).await;
    reply.expect(StatusCode::OK);
    let page = reply.json();
    assert_eq!(uuids(&page), [str_of(&created, "uuid").to_string()]);
}

#[tokio::test]
async fn waiter_ignores_invisible_changes() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let waiter = spawn_get(
        &api.app,
        &format!("containers/changes?after={start}&wait=2"),
        &alice,
    );
    until("the waiter subscribed", || {
        api.state.notifier().change_waiter_count() > 0
    })
    .await;
    api.committed(&bob).await;

    let (reply, elapsed) = waiter.await.unwrap();
    reply.expect(StatusCode::OK);
    let page = reply.json();
    assert_eq!(page["items"], json!([]));
    assert!(
        elapsed >= Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    // The cursor moved past bob's changes, so alice does not read them again.
    assert_eq!(page["cursor"], cursor(&api, SYSTEM_TOKEN).await.as_str());
}

#[tokio::test]
async fn waiter_returns_at_shutdown() {
    let api = TestApi::new().await;
    let start = cursor(&api, SYSTEM_TOKEN).await;
    let waiter = spawn_get(
        &api.app,
        &format!("containers/changes?after={start}&wait=30"),
        SYSTEM_TOKEN,
    );
    until("the waiter subscribed", || {
        api.state.notifier().change_waiter_count() > 0
    })
    .await;
    api.state.begin_shutdown();
    let reply = woken(waiter).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items"], json!([]));
    assert_eq!(reply.json()["cursor"], start.as_str());
}

#[tokio::test]
async fn bad_parameters_are_named_in_422() {
    let api = TestApi::new().await;
    let latest: u64 = cursor(&api, SYSTEM_TOKEN).await.parse().unwrap();
    let ahead = (latest + 1000).to_string();
    let cases = [
        ("after=abc", "invalid cursor \"abc\""),
        ("after=-1", "invalid cursor \"-1\""),
        ("after=1.5", "invalid cursor \"1.5\""),
        ("after=%2B1", "invalid cursor \"+1\""),
        (
            "after=99999999999999999999",
            "invalid cursor \"99999999999999999999\"",
        ),
        (
            &format!("after={ahead}"),
            &format!("invalid cursor \"{ahead}\""),
        ),
        (
            "limit=0",
            "invalid limit parameter \"0\": expected a whole number from 1 to 1000",
        ),
        (
            "limit=ten",
            "invalid limit parameter \"ten\": expected a whole number from 1 to 1000",
        ),
        (
            "limit=-3",
            "invalid limit parameter \"-3\": expected a whole number from 1 to 1000",
        ),
        (
            "limit=1001",
            "invalid limit parameter \"1001\": expected a whole number from 1 to 1000",
        ),
        (
            "limit=100000",
            "invalid limit parameter \"100000\": expected a whole number from 1 to 1000",
        ),
        ("wait=soon", "invalid wait parameter \"soon\""),
        ("wait=-1", "invalid wait parameter \"-1\""),
        ("wait=2.5", "invalid wait parameter \"2.5\""),
    ];
    for (query, expected) in cases {
        let reply = api
            .get(&format!("containers/changes?{query}"), SYSTEM_TOKEN)
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        let errors = reply.errors();
        assert!(errors.contains(expected), "{query}: {errors}");
        if query.starts_with("after=") {
            assert!(
                errors.contains("calling without after"),
                "{query}: {errors}"
            );
        }
    }
    let reply = api
        .get(&format!("containers/changes?after={ahead}"), SYSTEM_TOKEN)
        .await;
    assert!(reply.errors().contains("ahead of"), "{}", reply.errors());

    // A wait above the maximum is lowered, not rejected.
    changes(&api, SYSTEM_TOKEN, "wait=1000").await;
}

#[tokio::test]
async fn store_pages_are_in_change_order() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let store = api.state.store();
    let start = store.latest_change_seq().await.unwrap();
    let mut created = Vec::new();
    for _ in 0..4 {
        let (_, container) = api.committed(&alice).await;
        created.push(str_of(&container, "uuid").to_string());
    }
    let latest = store.latest_change_seq().await.unwrap();
    assert!(latest >= start + 4, "{start} then {latest}");

    let page = store
        .container_changes(start, &Visibility::All, 3)
        .await
        .unwrap();
    assert!(page.more);
    assert_eq!(page.latest_change_seq, latest);
    let seqs: Vec<i64> = page.items.iter().map(|item| item.change_seq).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    assert!(seqs[0] > start, "{seqs:?}");
    let page_uuids: Vec<&str> = page
        .items
        .iter()
        .map(|item| item.container.record.uuid.as_str())
        .collect();
    assert_eq!(page_uuids, created[..3]);

    let rest = store
        .container_changes(seqs[2], &Visibility::All, 3)
        .await
        .unwrap();
    assert!(!rest.more);
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].container.record.uuid, created[3]);
    assert_eq!(rest.items[0].change_seq, latest);

    let none = store
        .container_changes(latest, &Visibility::All, 3)
        .await
        .unwrap();
    assert!(none.items.is_empty());
    assert!(!none.more);

    let own = store
        .container_changes(start, &Visibility::Container(created[1].clone()), 3)
        .await
        .unwrap();
    assert_eq!(own.items.len(), 1);
    assert_eq!(own.items[0].container.record.uuid, created[1]);
    assert!(!own.more);
}

/// The columns a containers row needs in the first schema, with the
/// values of a Queued container.
const INSERT_OLD_CONTAINER: &str =
    "INSERT INTO containers (uuid, owner_uuid, created_at, modified_at, state, \
     environment, cwd, command, output_path, output_glob, mounts, runtime_constraints, \
     runtime_status, scheduling_parameters, container_image, priority, lock_count, \
     runtime_auth_scopes, interactive_session_started, output_storage_classes, \
     output_properties, cost, subrequests_cost, service, published_ports, version) \
     VALUES ('UUID', 'zzzzz-tpzed-000000000000000', 'TIME', 'TIME', 'Queued', '{}', '.', \
     '[\"true\"]', '/out', '[]', '{}', '{}', '{}', '{}', 'busybox', 0, 0, '[\"all\"]', FALSE, \
     '[]', '{}', 0, 0, FALSE, '{}', 1)";

/// Applies the first migration alone to the test's database and inserts
/// containers, which are last modified at the given times, in this order.
async fn database_before_change_feed(database: &TestDatabase, containers: &[(&str, &str)]) {
    use sqlx::migrate::Migrator;
    let dialect = if database.url().starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let first = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dialect)
        .join("0001_initial.sql");
    let migrations = tempfile::tempdir().unwrap();
    std::fs::copy(&first, migrations.path().join("0001_initial.sql")).unwrap();
    let migrator = Migrator::new(migrations.path()).await.unwrap();
    let statements: Vec<String> = containers
        .iter()
        .map(|(uuid, time)| {
            INSERT_OLD_CONTAINER
                .replace("UUID", uuid)
                .replace("TIME", time)
        })
        .collect();
    if dialect == "sqlite" {
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
        let path = database.url().trim_start_matches("sqlite://");
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        migrator.run(&pool).await.unwrap();
        for statement in &statements {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(database.url()).await.unwrap();
        migrator.run(&pool).await.unwrap();
        for statement in &statements {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
}

#[tokio::test]
async fn migration_numbers_existing_containers_by_last_change() {
    let database = TestDatabase::new().await;
    let containers = [
        (
            "zzzzz-dz642-000000000000002",
            "2024-01-02T00:00:00.000000000Z",
        ),
        (
            "zzzzz-dz642-000000000000001",
            "2024-01-01T00:00:00.000000000Z",
        ),
        (
            "zzzzz-dz642-000000000000003",
            "2024-01-03T00:00:00.000000000Z",
        ),
    ];
    database_before_change_feed(&database, &containers).await;

    let store = berth_controller::store::open(database.url(), 2)
        .await
        .unwrap();
    assert_eq!(store.latest_change_seq().await.unwrap(), 3);
    let page = store
        .container_changes(0, &Visibility::All, 10)
        .await
        .unwrap();
    let numbered: Vec<(i64, &str)> = page
        .items
        .iter()
        .map(|item| (item.change_seq, item.container.record.uuid.as_str()))
        .collect();
    assert_eq!(
        numbered,
        [
            (1, "zzzzz-dz642-000000000000001"),
            (2, "zzzzz-dz642-000000000000002"),
            (3, "zzzzz-dz642-000000000000003"),
        ]
    );
    store.close().await;
}

/// Two transactions that write the same two containers in opposite orders
/// take the change counter's lock before any row lock, so one waits for
/// the other instead of deadlocking. SQLite has one writer at a time, so
/// this runs on PostgreSQL only.
#[tokio::test]
async fn opposite_order_writers_do_not_deadlock() {
    let api = TestApi::new().await;
    if !api.database_url().starts_with("postgres") {
        return;
    }
    let alice = api.user("alice", false).await;
    let (_, first) = api.committed(&alice).await;
    let (_, second) = api.committed(&alice).await;
    let (x, y) = (
        str_of(&first, "uuid").to_string(),
        str_of(&second, "uuid").to_string(),
    );
    let pool = sqlx::PgPool::connect(api.database_url()).await.unwrap();
    let update = "UPDATE containers SET progress = 0.5 WHERE uuid = $1";

    let mut early = pool.begin().await.unwrap();
    sqlx::query(update)
        .bind(&x)
        .execute(&mut *early)
        .await
        .unwrap();

    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let late = {
        let pool = pool.clone();
        let (x, y) = (x.clone(), y.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            let _ = pid_tx.send(pid);
            for uuid in [&y, &x] {
                sqlx::query(update).bind(uuid).execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    };
    let late_pid = pid_rx.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
            )
            .bind(late_pid)
            .fetch_one(&pool)
            .await
            .unwrap();
            if waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second writer never waited for the first");

    sqlx::query(update)
        .bind(&y)
        .execute(&mut *early)
        .await
        .unwrap();
    early.commit().await.unwrap();
    late.await
        .unwrap()
        .expect("the second writer failed instead of waiting");

    let store = api.state.store();
    let page = store
        .container_changes(0, &Visibility::All, 10)
        .await
        .unwrap();
    let last_two: Vec<&str> = page.items[page.items.len() - 2..]
        .iter()
        .map(|item| item.container.record.uuid.as_str())
        .collect();
    assert_eq!(last_two, [y.as_str(), x.as_str()]);
    pool.close().await;
}

#[tokio::test]
async fn list_parameters_are_rejected() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for query in [
        r#"filters=[["state","=","Complete"]]"#,
        r#"select=["uuid"]"#,
        "order=uuid",
        r#"where={"state":"Queued"}"#,
    ] {
        let reply = api
            .get(&format!("containers/changes?after=0&{query}"), &alice)
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        let name = query.split('=').next().unwrap();
        assert!(
            reply
                .errors()
                .contains(&format!("takes no {name} parameter")),
            "{query}: {}",
            reply.errors()
        );
    }
}
