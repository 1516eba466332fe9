//! Live logs: append at an offset, read from an offset, wait for more.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::json;

use crate::common::{str_of, Reply, TestApi, SYSTEM_TOKEN};

/// Creates a locked container of a new user's request; returns (api,
/// owner token, container uuid, container token).
async fn locked_container() -> (TestApi, String, String, String) {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let token = api.lock(&uuid).await;
    (api, alice, uuid, token)
}

fn size_of(reply: &Reply) -> u64 {
    reply
        .header("x-berth-log-size")
        .expect("no X-Berth-Log-Size header")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn log_round_trip_is_byte_exact() {
    let (api, alice, uuid, token) = locked_container().await;
    let first: &[u8] = b"hello\n\xff\xfe\x00 not utf-8 \xc3\x28\n";
    let second: &[u8] = b"\x80\x81 more\r\n";
    let reply = api.append_log(&uuid, "stdout", 0, &token, first).await;
    reply.expect(StatusCode::OK);
    assert_eq!(size_of(&reply), first.len() as u64);
    let reply = api
        .append_log(&uuid, "stdout", first.len() as u64, &token, second)
        .await;
    reply.expect(StatusCode::OK);
    let total = [first, second].concat();
    assert_eq!(size_of(&reply), total.len() as u64);

    let read = api.read_log(&uuid, "stdout", "offset=0", &alice).await;
    read.expect(StatusCode::OK);
    assert_eq!(read.body.as_ref(), total.as_slice());
    assert_eq!(size_of(&read), total.len() as u64);
    assert_eq!(
        read.header("x-berth-container-state").as_deref(),
        Some("Locked")
    );
    assert_eq!(
        read.header("content-type").as_deref(),
        Some("application/octet-stream")
    );

    let tail = api.read_log(&uuid, "stdout", "offset=7", &token).await;
    tail.expect(StatusCode::OK);
    assert_eq!(tail.body.as_ref(), &total[7..]);

    // Streams are separate.
    let stderr = api
        .read_log(&uuid, "stderr", "offset=0", SYSTEM_TOKEN)
        .await;
    stderr.expect(StatusCode::OK);
    assert!(stderr.body.is_empty());
    assert_eq!(size_of(&stderr), 0);
}

#[tokio::test]
async fn repeated_append_is_ignored() {
    let (api, alice, uuid, token) = locked_container().await;
    api.append_log(&uuid, "stderr", 0, &token, b"abcdef")
        .await
        .expect(StatusCode::OK);
    // The same chunk again (a retry after a lost response) changes nothing.
    let again = api.append_log(&uuid, "stderr", 0, &token, b"abcdef").await;
    again.expect(StatusCode::OK);
    assert_eq!(size_of(&again), 6);
    // A chunk that overlaps the end adds only its new bytes.
    let overlap = api.append_log(&uuid, "stderr", 4, &token, b"efgh").await;
    overlap.expect(StatusCode::OK);
    assert_eq!(size_of(&overlap), 8);
    let read = api.read_log(&uuid, "stderr", "offset=0", &alice).await;
    assert_eq!(read.body.as_ref(), b"abcdefgh");
}

#[tokio::test]
async fn append_with_gap_is_422() {
    let (api, alice, uuid, token) = locked_container().await;
    api.append_log(&uuid, "stdout", 0, &token, b"abc")
        .await
        .expect(StatusCode::OK);
    let reply = api.append_log(&uuid, "stdout", 5, &token, b"xyz").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains("offset 5"), "{errors}");
    assert!(errors.contains("append from offset 3"), "{errors}");
    let read = api.read_log(&uuid, "stdout", "offset=0", &alice).await;
    assert_eq!(read.body.as_ref(), b"abc");
}

#[tokio::test]
async fn append_with_different_bytes_is_409() {
    let (api, alice, uuid, token) = locked_container().await;
    api.append_log(&uuid, "stdout", 0, &token, b"hello world")
        .await
        .expect(StatusCode::OK);

    let reply = api
        .append_log(&uuid, "stdout", 0, &token, b"HELLO WORLD!!")
        .await;
    reply.expect(StatusCode::CONFLICT);
    let errors = reply.errors();
    assert!(errors.contains(&uuid), "{errors}");
    assert!(errors.contains("stdout log"), "{errors}");
    assert!(errors.contains("at offset 0"), "{errors}");
    assert!(errors.contains("first at byte 0"), "{errors}");
    assert!(
        errors.contains("append new bytes from offset 11"),
        "{errors}"
    );
    assert_eq!(size_of(&reply), 11);

    let read = api.read_log(&uuid, "stdout", "offset=0", &alice).await;
    assert_eq!(read.body.as_ref(), b"hello world");
}

#[tokio::test]
async fn append_mismatch_inside_later_chunk_is_found() {
    let (api, alice, uuid, token) = locked_container().await;
    for (offset, chunk) in [(0, b"abc"), (3, b"def"), (6, b"ghi")] {
        api.append_log(&uuid, "stderr", offset, &token, chunk)
            .await
            .expect(StatusCode::OK);
    }

    // Offsets 2 to 7 are stored as "cdefgh"; the fourth sent byte differs.
    let reply = api
        .append_log(&uuid, "stderr", 2, &token, b"cdeXghij")
        .await;
    reply.expect(StatusCode::CONFLICT);
    let errors = reply.errors();
    assert!(errors.contains("at offset 2"), "{errors}");
    assert!(errors.contains("first at byte 5"), "{errors}");
    assert_eq!(size_of(&reply), 9);

    // The last stored byte differs.
    let reply = api.append_log(&uuid, "stderr", 7, &token, b"hXjk").await;
    reply.expect(StatusCode::CONFLICT);
    assert!(
        reply.errors().contains("first at byte 8"),
        "{}",
        reply.errors()
    );

    // Bytes that match every chunk they cover add only their tail.
    let reply = api
        .append_log(&uuid, "stderr", 1, &token, b"bcdefghiJK")
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(size_of(&reply), 11);
    let read = api.read_log(&uuid, "stderr", "offset=0", &alice).await;
    assert_eq!(read.body.as_ref(), b"abcdefghiJK");
}

/// berth-client, as the supervisor uses it, gets the conflict with the
/// stream's size.
#[tokio::test]
async fn client_gets_log_conflict_with_size() {
    let (api, _alice, uuid, token) = locked_container().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, api.app.clone()).into_future());
    let client = berth_client::Client::new(berth_client::Settings {
        base_url: format!("http://{address}/").parse().unwrap(),
        token: berth_client::Token::new(&token),
        insecure: false,
    })
    .unwrap();

    let stored = Bytes::from_static(b"hello world");
    let size = client
        .append_log(&uuid, "stdout", 0, stored.clone())
        .await
        .unwrap();
    assert_eq!(size, 11);
    let err = client
        .append_log(&uuid, "stdout", 0, Bytes::from_static(b"HELLO WORLD!!"))
        .await
        .unwrap_err();
    match &err {
        berth_client::ClientError::LogConflict { size, message, .. } => {
            assert_eq!(*size, 11);
            assert!(message.contains("first at byte 0"), "{message}");
        }
        other => panic!("expected a log conflict, got {other:?}"),
    }
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    assert!(!err.is_transient());
    server.abort();
}

#[tokio::test]
async fn append_needs_offset_and_known_stream() {
    let (api, _alice, uuid, token) = locked_container().await;
    let reply = api
        .call(
            axum::http::Method::POST,
            &format!("containers/{uuid}/log/stdout"),
            Some(&token),
            None,
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("offset"), "{}", reply.errors());
    let reply = api.append_log(&uuid, "syslog", 0, &token, b"x").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("syslog"), "{}", reply.errors());
}

#[tokio::test]
async fn crunchstat_stream_is_kept_apart() {
    let (api, alice, uuid, token) = locked_container().await;
    let line: &[u8] = b"2026-12-05T04:30:00.000000000Z sample cpu_seconds=0.1000\n";
    let reply = api.append_log(&uuid, "crunchstat", 0, &token, line).await;
    reply.expect(StatusCode::OK);
    assert_eq!(size_of(&reply), line.len() as u64);

    let read = api.read_log(&uuid, "crunchstat", "offset=0", &alice).await;
    read.expect(StatusCode::OK);
    assert_eq!(read.body.as_ref(), line);
    let supervisor = api.read_log(&uuid, "supervisor", "offset=0", &alice).await;
    supervisor.expect(StatusCode::OK);
    assert!(supervisor.body.is_empty());
}

#[tokio::test]
async fn oversized_chunk_is_413() {
    let api = TestApi::with_config(|config| config.max_log_chunk_bytes = 1024).await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    let reply = api
        .append_log(uuid, "stdout", 0, &token, &[b'x'; 1025])
        .await;
    reply.expect(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.errors().contains("1024 bytes"), "{}", reply.errors());
    let read = api.read_log(uuid, "stdout", "offset=0", &alice).await;
    assert_eq!(size_of(&read), 0);
    api.append_log(uuid, "stdout", 0, &token, &[b'x'; 1024])
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn default_chunk_limit_is_four_mib() {
    let (api, _alice, uuid, token) = locked_container().await;
    let reply = api
        .append_log(&uuid, "stdout", 0, &token, &vec![b'x'; (4 << 20) + 1])
        .await;
    reply.expect(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn log_permissions() {
    let (api, alice, uuid, token) = locked_container().await;
    let bob = api.user("bob", false).await;
    let reply = api.append_log(&uuid, "stdout", 0, &alice, b"x").await;
    reply.expect(StatusCode::FORBIDDEN);
    api.append_log(&uuid, "stdout", 0, &bob, b"x")
        .await
        .expect(StatusCode::NOT_FOUND);
    api.read_log(&uuid, "stdout", "offset=0", &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    api.append_log(&uuid, "supervisor", 0, SYSTEM_TOKEN, b"admin note\n")
        .await
        .expect(StatusCode::OK);
    api.read_log(&uuid, "supervisor", "offset=0", &token)
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn read_past_end_is_422() {
    let (api, alice, uuid, _token) = locked_container().await;
    let reply = api.read_log(&uuid, "stdout", "offset=10", &alice).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("offset 10"), "{}", reply.errors());
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=-1", &alice)
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("wait"), "{}", reply.errors());
}

#[tokio::test]
async fn large_log_is_read_in_pages() {
    let (api, alice, uuid, token) = locked_container().await;
    let chunk: Vec<u8> = (0..(3 << 19)).map(|i| (i % 251) as u8).collect();
    let mut offset = 0;
    for _ in 0..2 {
        api.append_log(&uuid, "stdout", offset, &token, &chunk)
            .await
            .expect(StatusCode::OK);
        offset += chunk.len() as u64;
    }
    let first = api.read_log(&uuid, "stdout", "offset=0", &alice).await;
    assert_eq!(first.body.len(), 1 << 20);
    assert_eq!(size_of(&first), offset);
    let second = api
        .read_log(&uuid, "stdout", &format!("offset={}", 1 << 20), &alice)
        .await;
    let mut all = first.body.to_vec();
    all.extend_from_slice(&second.body);
    let expected = [chunk.as_slice(), chunk.as_slice()].concat();
    assert_eq!(all.len(), expected.len().min(2 << 20));
    assert_eq!(all, expected[..all.len()]);
}

/// Waits until a reader of the container has subscribed to wake-ups, so
/// that what the test does next happens while the reader waits.
async fn reader_waiting(api: &TestApi) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while api.state.notifier().channel_count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the reader never started waiting");
}

#[tokio::test]
async fn long_poll_is_woken_by_append() {
    let (api, alice, uuid, token) = locked_container().await;
    api.append_log(&uuid, "stdout", 0, &token, b"first\n")
        .await
        .expect(StatusCode::OK);
    let started = Instant::now();
    let reader = {
        let router = api.app.clone();
        let path = format!("containers/{uuid}/log/stdout?offset=6&wait=30");
        let alice = alice.clone();
        tokio::spawn(async move {
            use tower::ServiceExt;
            let request = TestApi::request(axum::http::Method::GET, &path, Some(&alice))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, body)
        })
    };
    reader_waiting(&api).await;
    api.append_log(&uuid, "stdout", 6, &token, b"second\n")
        .await
        .expect(StatusCode::OK);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the reader was not woken")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), b"second\n");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn long_poll_is_woken_by_state_change() {
    let (api, alice, uuid, token) = locked_container().await;
    let reader = {
        let router = api.app.clone();
        // Naming the state seen makes the test independent of whether the
        // update lands before or after the reader subscribes.
        let path = format!("containers/{uuid}/log/stdout?offset=0&wait=30&state=Locked");
        tokio::spawn(async move {
            use tower::ServiceExt;
            let request = TestApi::request(axum::http::Method::GET, &path, Some(&alice))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let state = response
                .headers()
                .get("x-berth-container-state")
                .map(|v| v.to_str().unwrap().to_string());
            (response.status(), state)
        })
    };
    reader_waiting(&api).await;
    api.update_container(&uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let (status, state) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the reader was not woken")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state.as_deref(), Some("Running"));
}

#[tokio::test]
async fn wait_returns_at_once_when_state_already_differs() {
    let (api, alice, uuid, token) = locked_container().await;
    api.update_container(&uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let started = Instant::now();
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=30&state=Locked", &alice)
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(
        reply.header("x-berth-container-state").as_deref(),
        Some("Running")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn invalid_state_parameter_is_rejected() {
    let (api, alice, uuid, _token) = locked_container().await;
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=1&state=Sleeping", &alice)
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn wait_on_final_container_returns_at_once() {
    let (api, alice, uuid, token) = locked_container().await;
    api.update_container(&uuid, &token, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);
    let started = Instant::now();
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=30", &alice)
        .await;
    reply.expect(StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(
        reply.header("x-berth-container-state").as_deref(),
        Some("Cancelled")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn huge_wait_is_capped_not_rejected() {
    let (api, alice, uuid, token) = locked_container().await;
    api.append_log(&uuid, "stdout", 0, &token, b"x")
        .await
        .expect(StatusCode::OK);
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=1e300", &alice)
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.body.as_ref(), b"x");
}

#[tokio::test]
async fn short_wait_ends_without_bytes() {
    let (api, alice, uuid, _token) = locked_container().await;
    let reply = api
        .read_log(&uuid, "stdout", "offset=0&wait=0.2", &alice)
        .await;
    reply.expect(StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(size_of(&reply), 0);
}
