//! Errors that arise outside the handlers' own checks still come as
//! `{"errors": [...]}` with a fitting status: undecodable paths, unknown
//! routes and methods, and the request timeout. Every response carries the
//! call's `X-Request-Id`, and the message for an unknown filter operator
//! lists every operator that works.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::io::{Read, Seek};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{str_of, Reply, TestApi, SYSTEM_TOKEN};

/// Asserts the status and that the body is `{"errors": [...]}` with one
/// message at least; returns the joined messages.
#[track_caller]
fn assert_error(reply: &Reply, status: StatusCode) -> String {
    reply.expect(status);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    let errors = reply.errors();
    assert!(!errors.is_empty(), "empty errors");
    errors
}

/// Builds a body that sends `start` and then nothing more, never ending.
fn stalled_body(start: &'static str) -> Body {
    let first = futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(start.as_bytes()))]);
    Body::from_stream(first.chain(futures::stream::pending()))
}

#[tokio::test]
async fn invalid_utf8_in_path_is_404_json() {
    let api = TestApi::new().await;
    for (method, path) in [
        (Method::GET, "containers/%ff%fe"),
        (Method::PUT, "containers/%ff%fe"),
        (Method::POST, "containers/%ff%fe/lock"),
        (Method::GET, "container_requests/%ff%fe"),
        (Method::PATCH, "container_requests/%ff%fe"),
        (Method::GET, "container_requests/%ff%fe/container_status"),
        (Method::GET, "containers/%ff%fe/log/stdout"),
        (
            Method::POST,
            "containers/zzzzz-dz642-000000000000000/log/%ff",
        ),
    ] {
        let reply = api
            .call(method.clone(), path, Some(SYSTEM_TOKEN), None)
            .await;
        let errors = assert_error(&reply, StatusCode::NOT_FOUND);
        assert!(
            errors.contains("not valid UTF-8"),
            "{method} {path}: {errors}"
        );
    }
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let api = TestApi::new().await;
    for (method, path) in [
        (Method::PUT, "containers/current"),
        (Method::DELETE, "containers/zzzzz-dz642-000000000000000"),
        (Method::GET, "containers/zzzzz-dz642-000000000000000/lock"),
        (Method::PATCH, "/_health/ping"),
    ] {
        let reply = api
            .call(method.clone(), path, Some(SYSTEM_TOKEN), None)
            .await;
        let errors = assert_error(&reply, StatusCode::METHOD_NOT_ALLOWED);
        assert!(
            errors.contains(method.as_str()),
            "{method} {path}: {errors}"
        );
    }
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let api = TestApi::new().await;
    for path in ["/", "/arvados/v2/containers", "containers/a/b/c/d", "%ff"] {
        let reply = api.call(Method::GET, path, Some(SYSTEM_TOKEN), None).await;
        let errors = assert_error(&reply, StatusCode::NOT_FOUND);
        assert!(errors.contains("Path not found"), "{path}: {errors}");
    }
}

#[tokio::test]
async fn stalled_body_is_408_json() {
    let api = TestApi::with_config(|config| config.request_timeout_seconds = 1).await;
    let alice = api.user("alice", false).await;
    let started = Instant::now();
    let request = TestApi::request(Method::POST, "container_requests", Some(&alice))
        .header("content-type", "application/json")
        .body(stalled_body(r#"{"container_request": {"name": "#))
        .unwrap();
    let reply = api.send(request).await;
    let errors = assert_error(&reply, StatusCode::REQUEST_TIMEOUT);
    assert!(errors.contains("request body"), "{errors}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(api.request_count().await, 0);

    // A log chunk that stalls is the same.
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    let request = TestApi::request(
        Method::POST,
        &format!("containers/{uuid}/log/stdout?offset=0"),
        Some(&token),
    )
    .body(stalled_body("partial line"))
    .unwrap();
    let reply = api.send(request).await;
    assert_error(&reply, StatusCode::REQUEST_TIMEOUT);
    let log = api.read_log(uuid, "stdout", "offset=0", &token).await;
    log.expect(StatusCode::OK);
    assert!(log.body.is_empty());
}

#[tokio::test]
async fn slow_controller_is_503_json() {
    let api = TestApi::with_config(|config| config.request_timeout_seconds = 1).await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    api.lock(uuid).await;
    // A log read that waits longer than the request timeout.
    let reply = api
        .read_log(uuid, "stdout", "offset=0&wait=10", SYSTEM_TOKEN)
        .await;
    let errors = assert_error(&reply, StatusCode::SERVICE_UNAVAILABLE);
    assert!(errors.contains("timed out"), "{errors}");
}

/// The timeout on a real socket: a client that sends its headers and part
/// of the body, then pauses.
#[tokio::test]
async fn stalled_body_on_socket_is_408_json() {
    let api = TestApi::with_config(|config| config.request_timeout_seconds = 1).await;
    let alice = api.user("alice", false).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, api.app.clone()).into_future());

    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /arvados/v1/container_requests HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {alice}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"name\": "
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "no response within 10 s");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 408"),
        "unexpected response: {response}"
    );
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(body["errors"][0]
        .as_str()
        .is_some_and(|message| message.contains("request body")));
    assert_eq!(api.request_count().await, 0);
    server.abort();
}

/// Returns the `X-Request-Id` of a reply.
#[track_caller]
fn request_id(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .expect("no X-Request-Id header")
}

#[track_caller]
fn assert_generated_id(id: &str) {
    let suffix = id.strip_prefix("req-").unwrap_or_else(|| panic!("{id:?}"));
    assert_eq!(suffix.len(), 20, "{id:?}");
    assert!(
        suffix
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte.is_ascii_lowercase()),
        "{id:?}"
    );
}

#[tokio::test]
async fn client_request_id_is_echoed() {
    let api = TestApi::new().await;
    let sent = "req-0123456789abcdefghij";
    for (path, token, status) in [
        ("users/current", Some(SYSTEM_TOKEN), StatusCode::OK),
        ("users/current", None, StatusCode::UNAUTHORIZED),
        ("no/such/route", Some(SYSTEM_TOKEN), StatusCode::NOT_FOUND),
    ] {
        let request = TestApi::request(Method::GET, path, token)
            .header("x-request-id", sent)
            .body(Body::empty())
            .unwrap();
        let reply = api.send(request).await;
        reply.expect(status);
        assert_eq!(request_id(&reply), sent, "{path}");
    }
}

#[tokio::test]
async fn missing_or_unusable_request_id_is_generated() {
    let api = TestApi::new().await;
    let first = api.get("users/current", SYSTEM_TOKEN).await;
    let second = api.get("users/current", SYSTEM_TOKEN).await;
    assert_generated_id(&request_id(&first));
    assert_generated_id(&request_id(&second));
    assert_ne!(request_id(&first), request_id(&second));

    let too_long = "x".repeat(256);
    for unusable in ["", "two words", "quote\"d", too_long.as_str()] {
        let request = TestApi::request(Method::GET, "users/current", Some(SYSTEM_TOKEN))
            .header("x-request-id", unusable)
            .body(Body::empty())
            .unwrap();
        let reply = api.send(request).await;
        assert_generated_id(&request_id(&reply));
    }
}

#[tokio::test]
async fn request_id_is_in_the_request_span() {
    let mut log_file = tempfile::tempfile().unwrap();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(log_file.try_clone().unwrap())
        .finish();
    // While only one subscriber exists, tracing decides whether a callsite
    // is enabled with the subscriber of the thread that reaches it first,
    // which may be another test's thread without one. With two, it
    // consults both.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let _guard = tracing::subscriber::set_default(subscriber);

    let api = TestApi::new().await;
    let request = TestApi::request(Method::GET, "users/current", Some(SYSTEM_TOKEN))
        .header("x-request-id", "req-inthelog0000000000")
        .body(Body::empty())
        .unwrap();
    api.send(request).await.expect(StatusCode::OK);
    let generated = request_id(&api.get("users/current", SYSTEM_TOKEN).await);

    let mut log = String::new();
    log_file.rewind().unwrap();
    log_file.read_to_string(&mut log).unwrap();
    assert!(
        log.contains(r#"request_id="req-inthelog0000000000""#),
        "{log}"
    );
    assert!(log.contains(&format!("request_id={generated:?}")), "{log}");
}

/// Returns each operator that filters take, with a filter that uses it:
/// on a text attribute, on `uuid`, or on an object attribute's keys.
fn operator_cases() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("=", json!(["name", "=", "x"])),
        ("==", json!(["name", "==", "x"])),
        ("!=", json!(["name", "!=", "x"])),
        ("<>", json!(["name", "<>", "x"])),
        ("<", json!(["name", "<", "x"])),
        ("<=", json!(["name", "<=", "x"])),
        (">", json!(["name", ">", "x"])),
        (">=", json!(["name", ">=", "x"])),
        ("in", json!(["name", "in", ["x"]])),
        ("not in", json!(["name", "not in", ["x"]])),
        ("like", json!(["name", "like", "x%"])),
        ("ilike", json!(["name", "ilike", "x%"])),
        ("is_a", json!(["uuid", "is_a", "arvados#containerRequest"])),
        ("exists", json!(["properties", "exists", "key"])),
    ]
}

/// True when `message` lists `operator` as an item of a list.
fn lists_operator(message: &str, operator: &str) -> bool {
    message.contains(&format!(" {operator},"))
        || message.contains(&format!(" {operator} "))
        || message.ends_with(&format!(" {operator}"))
}

#[tokio::test]
async fn unknown_operator_message_lists_every_working_operator() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let filtered = |filter: serde_json::Value| {
        format!("container_requests?filters={}", serde_json::json!([filter]))
    };

    let reply = api
        .get(&filtered(serde_json::json!(["name", "~", "x"])), &alice)
        .await;
    let on_attribute = assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = api
        .get(
            &filtered(serde_json::json!(["properties.key", "~", "x"])),
            &alice,
        )
        .await;
    let on_key = assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY);

    for (operator, filter) in operator_cases() {
        api.get(&filtered(filter.clone()), &alice)
            .await
            .expect(StatusCode::OK);
        assert!(
            lists_operator(&on_attribute, operator),
            "{operator}: {on_attribute}"
        );
        if operator != "is_a" {
            let on_key_filter = serde_json::json!(["properties.key", operator, filter[2]]);
            let on_key_filter = match operator {
                "exists" => serde_json::json!(["properties.key", "exists", true]),
                _ => on_key_filter,
            };
            api.get(&filtered(on_key_filter), &alice)
                .await
                .expect(StatusCode::OK);
            assert!(lists_operator(&on_key, operator), "{operator}: {on_key}");
        }
    }
}
