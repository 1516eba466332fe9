//! The gateway's tunnel and shell routes on real sockets (port 0): a fake
//! supervisor made with berth-tunnel's dial side echoes every `/ssh`
//! stream, and users connect with berth-client's `connect_ssh`. Two
//! controllers share one database (a PostgreSQL schema when
//! `BERTH_TEST_DATABASE_URL` is set, else one SQLite file) to test
//! forwarding and the move of a tunnel at shutdown.

use std::time::{Duration, Instant};

use berth_client::{Client, Settings, Token};
use berth_controller::limits::Pool;
use berth_controller::{tls, Config};
use berth_tunnel::{dial, TunnelError};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use crate::common::gateway::{
    dial_config, fake_supervisor, metric, pattern, round_trip, wait_for_tunnel, wait_until,
    Controller, GRACE_SECONDS, WAIT_LIMIT,
};
use crate::common::TestDatabase;

/// Sends a shell upgrade by hand, with extra headers; returns the status
/// and the body.
async fn raw_shell(
    controller: &Controller,
    uuid: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/arvados/v1/connect/{uuid}/ssh", controller.url))
        .bearer_auth(token)
        .header("connection", "Upgrade")
        .header("upgrade", "ssh");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn tunnel_rejects_bad_secret_and_state() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    let (uuid, secret) = controller.running_container(&alice).await;

    let error = dial(&dial_config(&controller, &uuid, "not-the-secret", "sup-a"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(401), "{error}");
    let message = error.to_string();
    assert!(message.contains("invalid gateway secret"), "{message}");
    assert!(!message.contains(&secret), "{message}");
    assert!(
        metric(
            &controller.metrics().await,
            "berth_gateway_failures_total{reason=\"tunnel_auth\"}"
        ) >= 1
    );

    // A Queued container has no gateway secret yet.
    let queued = controller.queued_container(&alice).await;
    let error = dial(&dial_config(&controller, &queued, &secret, "sup-a"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(401), "{error}");

    // A Complete container takes no tunnel, even with its old secret:
    // the final state forgot the secret.
    controller
        .update_container(&uuid, json!({"state": "Complete", "exit_code": 0}))
        .await;
    let error = dial(&dial_config(&controller, &uuid, &secret, "sup-a"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(401), "{error}");
    assert_eq!(controller.state.gateway().tunnel_count(), 0);
    assert_eq!(
        controller.state.store().get_tunnel(&uuid).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn tunnel_from_other_supervisor_conflicts() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    // Locked is enough for a tunnel.
    let (uuid, secret) = controller.locked_container(&alice).await;

    let first = dial(&dial_config(&controller, &uuid, &secret, "sup-a"))
        .await
        .unwrap();
    wait_for_tunnel(&controller, &uuid).await;
    let lease = controller
        .state
        .store()
        .get_tunnel(&uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.controller_url, controller.internal_url());
    assert_eq!(lease.supervisor_id, "sup-a");

    let error = dial(&dial_config(&controller, &uuid, &secret, "sup-b"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(409), "{error}");
    assert!(
        error.to_string().contains("held by another supervisor"),
        "{error}"
    );

    // The same supervisor replaces its tunnel; the lease's epoch moves on.
    let second = dial(&dial_config(&controller, &uuid, &secret, "sup-a"))
        .await
        .unwrap();
    let gateway = controller.state.gateway().clone();
    wait_until("the new tunnel replaces the old one", || {
        let replaced = gateway.metrics().replaced() == 1;
        async move { replaced }
    })
    .await;
    let lease = controller
        .state
        .store()
        .get_tunnel(&uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.epoch, 2);
    assert_eq!(lease.supervisor_id, "sup-a");
    assert_eq!(gateway.tunnel_count(), 1);

    // The old tunnel was asked to move; its end leaves the new lease.
    let mut moves = first.move_signal();
    let grace = tokio::time::timeout(WAIT_LIMIT, moves.requested())
        .await
        .unwrap();
    assert!(grace.is_some());
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = controller
        .state
        .store()
        .get_tunnel(&uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.epoch, 2);
    drop(second);
}

#[tokio::test]
async fn shell_checks_permission() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    let bob = controller.user("bob", false).await;
    let admin = controller.user("root", true).await;
    let (uuid, secret) = controller.running_container(&alice).await;
    let supervisor = fake_supervisor(vec![dial_config(&controller, &uuid, &secret, "sup-a")]);
    wait_for_tunnel(&controller, &uuid).await;

    // Another user's container is not found.
    let error = controller
        .client(&bob)
        .connect_ssh(&uuid)
        .await
        .unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(404), "{error}");

    // The owner and an administrator get the echo.
    for token in [&alice, &admin] {
        let stream = controller.client(token).connect_ssh(&uuid).await.unwrap();
        let data = pattern(7, 100_000);
        assert_eq!(round_trip(stream, &data).await, data);
    }
    let (status, container) = controller.get(&format!("containers/{uuid}"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(container["interactive_session_started"], json!(true));
    let metrics = controller.metrics().await;
    assert_eq!(metric(&metrics, "berth_gateway_streams_opened_total"), 2);
    assert_eq!(metric(&metrics, "berth_gateway_tunnels"), 1);
    supervisor.abort();

    // A controller with shell access off rejects even the owner.
    let closed = Controller::start(database.url(), |config| config.shell_access = false).await;
    let error = closed.client(&alice).connect_ssh(&uuid).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(403), "{error}");
    assert!(
        error.to_string().contains("shell access is turned off"),
        "{error}"
    );
    let error = closed.client(&admin).connect_ssh(&uuid).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(403), "{error}");
}

#[tokio::test]
async fn shell_rejects_container_token() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    let uuid = controller.queued_container(&alice).await;
    let credentials = controller.lock(&uuid).await;
    let container_token = credentials["api_token"].as_str().unwrap().to_owned();
    let (status, body) = raw_shell(&controller, &uuid, &container_token, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("container token"), "{body}");

    // A Locked container is not running yet.
    let (status, body) = raw_shell(&controller, &uuid, &alice, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("Locked"), "{body}");

    controller
        .update_container(&uuid, json!({"state": "Running"}))
        .await;

    // A Running container without a tunnel: 503 with Retry-After.
    let response = reqwest::Client::new()
        .post(format!("{}/arvados/v1/connect/{uuid}/ssh", controller.url))
        .bearer_auth(&alice)
        .header("connection", "Upgrade")
        .header("upgrade", "ssh")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    let body = response.text().await.unwrap();
    assert!(body.contains("gateway tunnel is not connected"), "{body}");
}

#[tokio::test]
async fn shell_forwards_once_to_holder() {
    let database = TestDatabase::new().await;
    let a = Controller::start(database.url(), |_| {}).await;
    let b = Controller::start(database.url(), |_| {}).await;
    let alice = a.user("alice", false).await;
    let (uuid, secret) = a.running_container(&alice).await;
    let supervisor = fake_supervisor(vec![dial_config(&b, &uuid, &secret, "sup-a")]);
    wait_for_tunnel(&b, &uuid).await;
    assert!(a.state.gateway().tunnel(&uuid).is_none());

    // The client on A reaches the supervisor's echo through B.
    let stream = a.client(&alice).connect_ssh(&uuid).await.unwrap();
    let data = pattern(3, 4 << 20);
    let echoed = round_trip(stream, &data).await;
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo through two controllers differs");
    assert_eq!(
        metric(&a.metrics().await, "berth_gateway_forwards_total"),
        1
    );
    assert_eq!(
        metric(&a.metrics().await, "berth_gateway_spliced_sessions_total"),
        1,
        "the forward between two plain TCP sockets must use splice(2)"
    );
    assert_eq!(
        metric(&b.metrics().await, "berth_gateway_streams_opened_total"),
        1
    );

    // A forwarded request is never forwarded again.
    let (status, body) = raw_shell(&a, &uuid, &alice, &[("x-berth-no-forward", "1")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        metric(&a.metrics().await, "berth_gateway_forwards_total"),
        1
    );

    // B's heartbeat refreshes the lease.
    let store = a.state.store();
    let first = store
        .get_tunnel(&uuid)
        .await
        .unwrap()
        .unwrap()
        .heartbeat_at_ms;
    wait_until("B refreshes the lease", || async {
        store
            .get_tunnel(&uuid)
            .await
            .unwrap()
            .unwrap()
            .heartbeat_at_ms
            > first
    })
    .await;

    // The holder checks the caller again: another user is not found.
    let bob = a.user("bob", false).await;
    let error = a.client(&bob).connect_ssh(&uuid).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(404), "{error}");

    // The same shell on a plain socket of the client's own, as
    // `berth ssh-proxy` opens it; a rejection is the same API error.
    let connection = a
        .client(&alice)
        .connect_ssh_plain(&uuid)
        .await
        .unwrap()
        .expect("an http:// controller gives a plain socket");
    assert!(connection.unread.is_empty(), "{:?}", connection.unread);
    let echoed = round_trip(connection.socket, &data).await;
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo through the plain socket differs");
    assert_eq!(
        metric(&a.metrics().await, "berth_gateway_spliced_sessions_total"),
        2
    );
    let error = a.client(&bob).connect_ssh_plain(&uuid).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(404), "{error}");
    supervisor.abort();
}

#[tokio::test]
async fn shell_forward_over_tls_is_copied() {
    let database = TestDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (certificate, key) = crate::tls::write_pair(dir.path());
    let with_tls = |config: &mut Config| {
        config.tls_certificate = Some(certificate.clone());
        config.tls_key = Some(key.clone());
    };
    let trusting = |config: &mut Config| config.internal_ca_file = Some(certificate.clone());

    // The client reaches A over TLS, and A the holder B over plain TCP;
    // then the client reaches A over plain TCP, and A reaches B over TLS.
    for (case, a_tls) in [(1, true), (2, false)] {
        let (a, b) = if a_tls {
            let a = Controller::start(database.url(), with_tls).await;
            (a, Controller::start(database.url(), |_| {}).await)
        } else {
            let a = Controller::start(database.url(), trusting).await;
            (a, Controller::start(database.url(), with_tls).await)
        };
        let plain = if a_tls { &b } else { &a };
        let user = plain.user(&format!("tls-user-{case}"), false).await;
        let (uuid, secret) = plain.running_container(&user).await;
        let mut dial = dial_config(&b, &uuid, &secret, &format!("sup-tls-{case}"));
        dial.tls = Some(tls::forward_client_config(Some(&certificate)).unwrap());
        let supervisor = fake_supervisor(vec![dial]);
        wait_for_tunnel(&b, &uuid).await;

        let client = Client::new(Settings {
            base_url: Url::parse(&a.url).unwrap(),
            token: Token::new(&user),
            insecure: true,
        })
        .unwrap();
        let plain = client.connect_ssh_plain(&uuid).await.unwrap();
        assert_eq!(plain.is_some(), !a_tls, "case {case}: plain socket");
        drop(plain);
        let stream = client.connect_ssh(&uuid).await.unwrap();
        let data = pattern(case, 3 << 20);
        let echoed = round_trip(stream, &data).await;
        assert_eq!(echoed.len(), data.len(), "case {case}");
        assert!(echoed == data, "case {case}: the echo through TLS differs");
        let metrics = a.state.gateway().metrics();
        assert_eq!(metrics.failures("forward_rejected"), 0, "case {case}");
        assert_eq!(metrics.spliced_sessions(), 0, "case {case}");
        supervisor.abort();
    }
}

#[tokio::test]
async fn shutdown_moves_tunnel_to_other_controller() {
    let database = TestDatabase::new().await;
    let a = Controller::start(database.url(), |_| {}).await;
    let mut b = Controller::start(database.url(), |_| {}).await;
    let alice = a.user("alice", false).await;
    let (uuid, secret) = a.running_container(&alice).await;
    // B first, as a load balancer might pick; once B has shut down, its
    // port refuses and the supervisor reaches A.
    let supervisor = fake_supervisor(vec![
        dial_config(&b, &uuid, &secret, "sup-a"),
        dial_config(&a, &uuid, &secret, "sup-a"),
    ]);
    wait_for_tunnel(&b, &uuid).await;

    // A session on B, open across the shutdown.
    let session = b.client(&alice).connect_ssh(&uuid).await.unwrap();
    let (mut read, mut write) = tokio::io::split(session);
    write.write_all(b"before").await.unwrap();
    let mut buffer = [0_u8; 6];
    read.read_exact(&mut buffer).await.unwrap();
    assert_eq!(&buffer, b"before");

    let b_url = b.internal_url();
    let a_url = a.internal_url();
    let started = Instant::now();
    let b_server = b.shut_down();
    let store = a.state.store();
    wait_until("the lease names A", || async {
        store
            .get_tunnel(&uuid)
            .await
            .unwrap()
            .is_some_and(|lease| lease.controller_url == a_url)
    })
    .await;
    let moved_after = started.elapsed();
    assert!(
        moved_after < Duration::from_secs(5),
        "the tunnel moved after {moved_after:?}"
    );
    wait_for_tunnel(&a, &uuid).await;

    // The session on B still works within the grace period.
    write.write_all(b"during").await.unwrap();
    read.read_exact(&mut buffer).await.unwrap();
    assert_eq!(&buffer, b"during");

    // A new shell through A works.
    let stream = a.client(&alice).connect_ssh(&uuid).await.unwrap();
    let data = pattern(5, 64 * 1024);
    assert_eq!(round_trip(stream, &data).await, data);

    // The session on B ends when the grace period is over.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT_LIMIT, read.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the session on B outlived the grace period");
    assert!(rest.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(GRACE_SECONDS) - Duration::from_millis(500));
    tokio::time::timeout(WAIT_LIMIT, b_server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // B released nothing of A's: the lease is still A's.
    let lease = store.get_tunnel(&uuid).await.unwrap().unwrap();
    assert_eq!(lease.controller_url, a_url);
    assert_ne!(lease.controller_url, b_url);
    supervisor.abort();
}

#[tokio::test]
async fn tunnels_take_tunnel_slots() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |config| {
        config.limits.max_concurrent_requests = 1;
        config.limits.max_tunnels = 1;
    })
    .await;
    let alice = controller.user("alice", false).await;
    let (first, first_secret) = controller.running_container(&alice).await;
    let (second, second_secret) = controller.running_container(&alice).await;
    let supervisor = fake_supervisor(vec![dial_config(
        &controller,
        &first,
        &first_secret,
        "sup-a",
    )]);
    wait_for_tunnel(&controller, &first).await;

    let limits = controller.state.limits();
    assert_eq!(limits.in_use(Pool::Tunnel), 1);
    assert_eq!(limits.in_use(Pool::Api), 0);
    // Ordinary requests still run beside the tunnel.
    for _ in 0..5 {
        let (status, _) = controller.get(&format!("containers/{first}"), &alice).await;
        assert_eq!(status, StatusCode::OK);
    }

    // The tunnel pool is full: a second container's tunnel gets 503.
    let error = dial(&dial_config(&controller, &second, &second_secret, "sup-b"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
    let metrics = controller.metrics().await;
    assert_eq!(
        metric(&metrics, "berth_requests_in_use{pool=\"tunnel\"}"),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            "berth_requests_rejected_total{pool=\"tunnel\",reason=\"pool_full\"}"
        ),
        1
    );

    // A shell takes a shell slot for the session's life.
    let stream = controller.client(&alice).connect_ssh(&first).await.unwrap();
    let gateway = controller.state.gateway().clone();
    wait_until("the session is open", || {
        let open = gateway.session_count() == 1;
        async move { open }
    })
    .await;
    assert_eq!(limits.in_use(Pool::Shell), 1);
    let data = pattern(9, 1000);
    assert_eq!(round_trip(stream, &data).await, data);
    wait_until("the shell slot is free", || {
        let free = limits.in_use(Pool::Shell) == 0;
        async move { free }
    })
    .await;
    supervisor.abort();
}

#[tokio::test]
async fn shell_skips_stale_and_unreachable_holders() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    let (uuid, _) = controller.running_container(&alice).await;
    let store = controller.state.store();
    // Port 9 (discard) on loopback: nothing listens there in the tests.
    let gone = "http://127.0.0.1:9/";

    // A stale lease of another controller is not followed.
    let long_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    store
        .claim_tunnel(&uuid, gone, "sup-a", long_ago, long_ago - 1)
        .await
        .unwrap();
    let (status, body) = raw_shell(&controller, &uuid, &alice, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("gateway tunnel is not connected"), "{body}");

    // A live lease of a controller that is down: 503 naming it.
    let now = chrono::Utc::now().timestamp_millis();
    store
        .claim_tunnel(&uuid, gone, "sup-a", now, now - 60_000)
        .await
        .unwrap();
    let (status, body) = raw_shell(&controller, &uuid, &alice, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains(gone), "{body}");
    let metrics = controller.metrics().await;
    assert_eq!(metric(&metrics, "berth_gateway_forwards_total"), 0);
    assert_eq!(
        metric(
            &metrics,
            "berth_gateway_failures_total{reason=\"forward_unreachable\"}"
        ),
        1
    );
}

#[tokio::test]
async fn start_drops_own_leftover_leases() {
    let database = TestDatabase::new().await;
    let own = "http://127.0.0.1:1/";
    let first = Controller::start(database.url(), |_| {}).await;
    let now = chrono::Utc::now().timestamp_millis();
    let store = first.state.store();
    for (container, controller) in [
        ("zzzzz-dz642-000000000000001", own),
        ("zzzzz-dz642-000000000000002", "http://127.0.0.1:2/"),
    ] {
        store
            .claim_tunnel(container, controller, "sup-a", now, now - 60_000)
            .await
            .unwrap();
    }

    // A controller whose internal URL names the first lease's holder.
    let _second = Controller::start(database.url(), |config| {
        config.internal_url = Some(own.into());
    })
    .await;
    assert_eq!(
        store
            .get_tunnel("zzzzz-dz642-000000000000001")
            .await
            .unwrap(),
        None
    );
    assert!(store
        .get_tunnel("zzzzz-dz642-000000000000002")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn draining_controller_rejects_tunnels() {
    let database = TestDatabase::new().await;
    let controller = Controller::start(database.url(), |_| {}).await;
    let alice = controller.user("alice", false).await;
    let (uuid, secret) = controller.running_container(&alice).await;

    // The gateway drains while the listener still accepts, as behind a
    // load balancer that has not taken the controller out yet.
    let gateway = controller.state.gateway().clone();
    let drain = tokio::spawn(async move { gateway.drain(Duration::from_millis(100)).await });
    let gateway = controller.state.gateway().clone();
    wait_until("the gateway drains", || {
        let draining = gateway.is_draining();
        async move { draining }
    })
    .await;
    let error = dial(&dial_config(&controller, &uuid, &secret, "sup-a"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
    assert!(
        matches!(
            error,
            TunnelError::Rejected {
                retry_after: Some(_),
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("shutting down"), "{error}");
    assert_eq!(
        controller.state.store().get_tunnel(&uuid).await.unwrap(),
        None
    );
    drain.await.unwrap();
}
