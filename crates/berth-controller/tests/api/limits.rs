//! Request limits through the router: ordinary requests queue and then
//! fail with 503 and `Retry-After`, the dispatcher's lock calls go first,
//! and waiting reads, the health check and `/metrics` take no ordinary
//! slot.
//!
//! A request keeps its slot while its body arrives, so an upload whose
//! body never ends keeps a slot for as long as the test keeps its sender.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use berth_controller::limits::Pool;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::common::{send_to, Reply, TestApi, SYSTEM_TOKEN};

/// How long a test waits for a request to reach an expected point before
/// it fails: far above what it needs, so a slow machine does not fail it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A request whose body has not ended, which keeps its slot until dropped.
struct StalledUpload {
    body: mpsc::Sender<Result<Bytes, std::io::Error>>,
    reply: JoinHandle<Reply>,
}

fn stall(api: &TestApi, token: &str) -> StalledUpload {
    let (body, chunks) = mpsc::channel(1);
    let stream = futures::stream::unfold(chunks, |mut chunks| async move {
        chunks.recv().await.map(|chunk| (chunk, chunks))
    });
    let request = TestApi::request(
        Method::PUT,
        "/acbd18db4cc2f85cedef654fccc4a4d8",
        Some(token),
    )
    .body(Body::from_stream(stream))
    .unwrap();
    let app = api.app.clone();
    let reply = tokio::spawn(send_to(app, request));
    StalledUpload { body, reply }
}

/// Sends a GET in a task of its own.
fn spawn_get(api: &TestApi, path: &str, token: &str) -> JoinHandle<Reply> {
    let app = api.app.clone();
    let request = TestApi::request(Method::GET, path, Some(token))
        .body(Body::empty())
        .unwrap();
    tokio::spawn(send_to(app, request))
}

/// Waits until `check` holds, yielding between tries.
async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn metrics(api: &TestApi) -> String {
    let reply = api.get("/metrics", SYSTEM_TOKEN).await;
    reply.expect(StatusCode::OK);
    String::from_utf8(reply.body.to_vec()).unwrap()
}

#[tokio::test]
async fn full_api_pool_queues_then_rejects() {
    let api = TestApi::with_config(|config| {
        config.limits.max_concurrent_requests = 2;
        config.limits.max_queued_requests = 1;
        config.limits.queue_timeout_seconds = 1;
    })
    .await;
    let token = api.user("ada", false).await;
    let stalled = [stall(&api, &token), stall(&api, &token)];
    let limits = api.state.limits().clone();
    wait_for("two uploads hold the api slots", || {
        limits.in_use(Pool::Api) == 2
    })
    .await;

    let queued = spawn_get(&api, "users/current", &token);
    wait_for("a request waits in the queue", || {
        metrics_queued(&limits) == 1
    })
    .await;
    let overflow = api.get("users/current", &token).await;
    overflow.expect(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overflow.header("retry-after").as_deref(), Some("2"));
    assert!(
        overflow.errors().contains("request queue is full"),
        "{}",
        overflow.errors()
    );

    let timed_out = queued.await.unwrap();
    timed_out.expect(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(timed_out.header("retry-after").as_deref(), Some("2"));
    assert!(
        timed_out.errors().contains("waited too long"),
        "{}",
        timed_out.errors()
    );

    // The health check and the metrics take no slot.
    api.get("/_health/ping", &token)
        .await
        .expect(StatusCode::OK);
    let text = metrics(&api).await;
    assert!(
        text.contains("berth_requests_in_use{pool=\"api\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("berth_requests_rejected_total{pool=\"api\",reason=\"queue_full\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("berth_requests_rejected_total{pool=\"api\",reason=\"queue_timeout\"} 1\n"),
        "{text}"
    );

    for upload in stalled {
        drop(upload.body);
        let _ = upload.reply.await.unwrap();
    }
    assert_eq!(limits.in_use(Pool::Api), 0);
    api.get("users/current", &token)
        .await
        .expect(StatusCode::OK);
}

fn metrics_queued(limits: &berth_controller::limits::RequestLimits) -> usize {
    let mut text = String::new();
    limits.render_metrics(&mut text);
    text.lines()
        .filter(|line| line.starts_with("berth_requests_queued{"))
        .filter_map(|line| line.rsplit(' ').next())
        .filter_map(|count| count.parse::<usize>().ok())
        .sum()
}

#[tokio::test]
async fn lock_call_goes_before_queued_requests() {
    let api = TestApi::with_config(|config| {
        config.limits.max_concurrent_requests = 1;
        config.limits.max_queued_requests = 4;
        config.limits.queue_timeout_seconds = 60;
    })
    .await;
    let token = api.user("ada", false).await;
    let (_, container) = api.committed(&token).await;
    let container_uuid = container["uuid"].as_str().unwrap().to_string();
    let stalled = stall(&api, &token);
    let limits = api.state.limits().clone();
    wait_for("the upload holds the api slot", || {
        limits.in_use(Pool::Api) == 1
    })
    .await;

    let order = Arc::new(Mutex::new(Vec::new()));
    let track = |name: &'static str, reply: JoinHandle<Reply>| {
        let order = order.clone();
        tokio::spawn(async move {
            let reply = reply.await.unwrap();
            order.lock().unwrap().push(name);
            reply
        })
    };
    let ordinary = track("users/current", spawn_get(&api, "users/current", &token));
    wait_for("the ordinary request waits", || {
        metrics_queued(&limits) == 1
    })
    .await;
    let lock = {
        let app = api.app.clone();
        let request = TestApi::request(
            Method::POST,
            &format!("containers/{container_uuid}/lock"),
            Some(SYSTEM_TOKEN),
        )
        .body(Body::empty())
        .unwrap();
        track("lock", tokio::spawn(send_to(app, request)))
    };
    wait_for("both requests wait", || metrics_queued(&limits) == 2).await;

    drop(stalled.body);
    let _ = stalled.reply.await.unwrap();
    lock.await.unwrap().expect(StatusCode::OK);
    ordinary.await.unwrap().expect(StatusCode::OK);
    assert_eq!(*order.lock().unwrap(), vec!["lock", "users/current"]);
}

#[tokio::test]
async fn waiting_reads_take_no_api_slot() {
    let api = TestApi::with_config(|config| {
        config.limits.max_concurrent_requests = 1;
        config.limits.max_queued_requests = 0;
    })
    .await;
    let token = api.user("ada", false).await;
    let cursor = crate::changes::cursor(&api, &token).await;
    let stalled = stall(&api, &token);
    let limits = api.state.limits().clone();
    wait_for("the upload holds the api slot", || {
        limits.in_use(Pool::Api) == 1
    })
    .await;

    api.get("users/current", &token)
        .await
        .expect(StatusCode::SERVICE_UNAVAILABLE);
    let waited = api
        .get(&format!("containers/changes?after={cursor}&wait=1"), &token)
        .await;
    waited.expect(StatusCode::OK);
    assert_eq!(limits.in_use(Pool::Wait), 0);

    drop(stalled.body);
    let _ = stalled.reply.await.unwrap();
}

#[tokio::test]
async fn metrics_are_for_administrators() {
    let api = TestApi::new().await;
    let user = api.user("ada", false).await;
    let admin = api.user("root", true).await;

    let anonymous = api
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    anonymous.expect(StatusCode::UNAUTHORIZED);
    api.get("/metrics", &user)
        .await
        .expect(StatusCode::FORBIDDEN);
    let reply = api.get("/metrics", &admin).await;
    reply.expect(StatusCode::OK);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        text.contains("berth_requests_max_in_use{pool=\"api\"} 64\n"),
        "{text}"
    );
    assert!(
        text.contains("berth_requests_max_in_use{pool=\"tunnel\"} 10000\n"),
        "{text}"
    );
}

#[tokio::test]
async fn zero_limits_are_rejected_at_start_up() {
    for key in [
        "max_concurrent_requests",
        "queue_timeout_seconds",
        "max_waiting_requests",
    ] {
        let mut config = berth_controller::Config::new(
            "127.0.0.1:0".parse().unwrap(),
            "sqlite:///tmp/unused.db",
        );
        match key {
            "max_concurrent_requests" => config.limits.max_concurrent_requests = 0,
            "queue_timeout_seconds" => config.limits.queue_timeout_seconds = 0,
            _ => config.limits.max_waiting_requests = 0,
        }
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(&format!("limits.{key}")), "{error}");
    }
}
