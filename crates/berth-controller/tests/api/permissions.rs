//! Every permission rule for every kind of caller, as one table: the
//! owner of a request, another user, an administrator, the system token,
//! the container's own token, another container's token, a revoked
//! container token, a bad token and no token.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{str_of, TestApi, SYSTEM_TOKEN};

/// The callers, in the order of each row's expected statuses.
const CALLERS: [&str; 9] = [
    "owner",
    "other user",
    "admin",
    "system",
    "own container",
    "other container",
    "revoked container",
    "bad token",
    "no token",
];

/// One call and the status each caller gets.
struct Row {
    method: Method,
    path: String,
    body: Option<Value>,
    expected: [u16; 9],
}

fn row(method: Method, path: String, body: Option<Value>, expected: [u16; 9]) -> Row {
    Row {
        method,
        path,
        body,
        expected,
    }
}

#[tokio::test]
async fn each_caller_gets_what_its_token_allows() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let admin = api.user("root", true).await;

    let (request, container) = api.committed(&alice).await;
    let request = str_of(&request, "uuid").to_string();
    let container = str_of(&container, "uuid").to_string();
    let own = api.lock(&container).await;
    api.update_container(&container, &own, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);

    let (_, other) = api.committed(&bob).await;
    let other = api.lock(str_of(&other, "uuid")).await;

    let (_, ended) = api.committed(&bob).await;
    let ended_uuid = str_of(&ended, "uuid").to_string();
    let revoked = api.lock(&ended_uuid).await;
    api.update_container(&ended_uuid, SYSTEM_TOKEN, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);

    let bad = "v2/zzzzz-gj3su-0123456789abcde/not-the-secret";
    let tokens: [Option<&str>; 9] = [
        Some(&alice),
        Some(&bob),
        Some(&admin),
        Some(SYSTEM_TOKEN),
        Some(&own),
        Some(&other),
        Some(&revoked),
        Some(bad),
        None,
    ];

    let rows = [
        // Who may read and change the request.
        row(
            Method::GET,
            format!("container_requests/{request}"),
            None,
            [200, 404, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::GET,
            format!("container_requests/{request}/container_status"),
            None,
            [200, 404, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::PUT,
            format!("container_requests/{request}"),
            Some(json!({"container_request": {"name": "renamed"}})),
            [200, 404, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::GET,
            "container_requests".into(),
            None,
            [200, 200, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::POST,
            "container_requests".into(),
            Some(json!({"container_request": {"name": "draft"}})),
            [200, 200, 200, 200, 403, 403, 401, 401, 401],
        ),
        // Who may read and change the container.
        row(
            Method::GET,
            format!("containers/{container}"),
            None,
            [200, 404, 200, 200, 200, 404, 401, 401, 401],
        ),
        row(
            Method::PUT,
            format!("containers/{container}"),
            Some(json!({"container": {"runtime_status": {"activity": "testing"}}})),
            [403, 404, 200, 200, 200, 404, 401, 401, 401],
        ),
        row(
            Method::GET,
            "containers".into(),
            None,
            [200, 200, 200, 200, 200, 200, 401, 401, 401],
        ),
        row(
            Method::GET,
            "containers/current".into(),
            None,
            [404, 404, 404, 404, 200, 200, 401, 401, 401],
        ),
        // Only administrators lock; the container is Running, so they get
        // the state's 422 where others get no further than permission.
        row(
            Method::POST,
            format!("containers/{container}/lock"),
            None,
            [403, 404, 422, 422, 403, 404, 401, 401, 401],
        ),
        // Only the token that locked a container unlocks it.
        row(
            Method::POST,
            format!("containers/{container}/unlock"),
            None,
            [403, 404, 422, 422, 403, 404, 401, 401, 401],
        ),
        // Only administrators and the system token, which may lock, hold
        // dispatch leases.
        row(
            Method::POST,
            "dispatch_leases/slurm/acquire".into(),
            Some(json!({"holder": "host:1:abc", "ttl": 10})),
            [403, 403, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::POST,
            "dispatch_leases/slurm/renew".into(),
            Some(json!({"holder": "host:1:abc", "epoch": 1, "ttl": 10})),
            [403, 403, 200, 200, 403, 403, 401, 401, 401],
        ),
        row(
            Method::POST,
            "dispatch_leases/slurm/release".into(),
            Some(json!({"holder": "host:1:abc", "epoch": 1})),
            [403, 403, 200, 200, 403, 403, 401, 401, 401],
        ),
        // Logs: the container's token and administrators write, readers
        // of the container read.
        row(
            Method::POST,
            format!("containers/{container}/log/stdout?offset=0"),
            Some(json!("line\n")),
            [403, 404, 200, 200, 200, 404, 401, 401, 401],
        ),
        row(
            Method::GET,
            format!("containers/{container}/log/stdout?offset=0"),
            None,
            [200, 404, 200, 200, 200, 404, 401, 401, 401],
        ),
        row(
            Method::GET,
            "users/current".into(),
            None,
            [200, 200, 200, 200, 200, 200, 401, 401, 401],
        ),
        row(
            Method::GET,
            "api_client_authorizations/current".into(),
            None,
            [200, 200, 200, 200, 200, 200, 401, 401, 401],
        ),
    ];

    let mut failures = Vec::new();
    for row in &rows {
        for (index, token) in tokens.iter().enumerate() {
            let reply = match &row.body {
                Some(Value::String(text)) => {
                    let request = TestApi::request(row.method.clone(), &row.path, *token)
                        .header("content-type", "application/octet-stream")
                        .body(axum::body::Body::from(text.clone()))
                        .unwrap();
                    api.send(request).await
                }
                body => {
                    api.call(row.method.clone(), &row.path, *token, body.clone())
                        .await
                }
            };
            let expected = row.expected[index];
            if reply.status.as_u16() != expected {
                failures.push(format!(
                    "{} {} as {}: got {}, expected {expected}: {}",
                    row.method,
                    row.path,
                    CALLERS[index],
                    reply.status.as_u16(),
                    String::from_utf8_lossy(&reply.body)
                ));
            }
        }
    }

    // Deleting ends a request, so each caller tries its own fresh one.
    let delete_expected = [200, 404, 200, 200, 403, 403, 401, 401, 401];
    for (index, token) in tokens.iter().enumerate() {
        let mut draft = crate::common::runnable();
        draft["state"] = json!("Uncommitted");
        let created = api.create_request(&alice, draft).await;
        created.expect(StatusCode::OK);
        let path = format!("container_requests/{}", str_of(&created.json(), "uuid"));
        let reply = api.call(Method::DELETE, &path, *token, None).await;
        if reply.status.as_u16() != delete_expected[index] {
            failures.push(format!(
                "DELETE {path} as {}: got {}, expected {}",
                CALLERS[index],
                reply.status.as_u16(),
                delete_expected[index]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
