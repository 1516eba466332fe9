//! `secret_mounts` and `runtime_token`: accepted on requests, never
//! returned, copied to the container, read by the container's own token
//! only, and cleared at the final states.

use axum::http::{Method, StatusCode};
use berth_controller::store::Secrets;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{runnable, str_of, Reply, TestApi, SYSTEM_TOKEN};

/// Text inside every secret of these tests: no response, error or log
/// line may contain it.
const MARKER: &str = "s3cret-marker-7f3a";

/// A token secret in the form of Berth's secrets (letters and digits),
/// which no store has.
const TOKEN_SECRET: &str = "s3cretmarker7f3a";

fn secret_mounts() -> Value {
    json!({
        "/etc/berth/secret.txt": {"kind": "text", "content": format!("password {MARKER}")},
        "/etc/berth/secret.json": {"kind": "json", "content": {"password": MARKER}},
    })
}

/// Attributes of a runnable committed request with `extra` on top.
fn attributes_with(extra: Value) -> Value {
    let mut attributes = runnable();
    for (key, value) in extra.as_object().unwrap() {
        attributes[key] = value.clone();
    }
    attributes
}

/// Asserts that a response shows no secret: neither a value nor the name
/// of a write-only attribute.
#[track_caller]
fn assert_hidden(reply: &Reply, tokens: &[&str]) {
    let body = String::from_utf8_lossy(&reply.body);
    assert!(!body.contains(MARKER), "secret mount content in {body}");
    assert!(!body.contains("secret_mounts"), "secret_mounts in {body}");
    assert!(!body.contains("runtime_token"), "runtime_token in {body}");
    for token in tokens {
        assert!(!body.contains(token), "a token in {body}");
    }
}

/// Asserts that an error names `field` and shows no secret.
#[track_caller]
fn assert_rejected(reply: &Reply, field: &str, secrets: &[&str]) {
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains(field), "{field} not named in {errors}");
    assert!(!errors.contains(MARKER), "secret in {errors}");
    for secret in secrets {
        assert!(!errors.contains(secret), "secret in {errors}");
    }
}

async fn user_uuid(api: &TestApi, token: &str) -> String {
    let reply = api.get("users/current", token).await;
    reply.expect(StatusCode::OK);
    str_of(&reply.json(), "uuid").to_string()
}

/// Returns the uuid part of a `v2/UUID/SECRET` token.
fn token_uuid(token: &str) -> &str {
    token.split('/').nth(1).unwrap()
}

/// Runs one statement on the test's database, for states the API cannot
/// make: a revoked or expired token, an inactive user, a token with
/// narrow scopes.
async fn execute(api: &TestApi, sql: &str) {
    use sqlx::Connection;
    let url = api.database_url();
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
}

async fn revoke(api: &TestApi, token: &str) {
    let sql = format!(
        "UPDATE api_client_authorizations SET revoked_at = '2024-01-01T00:00:00.000000000Z' WHERE uuid = '{}'",
        token_uuid(token)
    );
    execute(api, &sql).await;
}

async fn request_secrets(api: &TestApi, uuid: &str) -> Secrets {
    api.state
        .store()
        .get_request_secrets(uuid)
        .await
        .unwrap()
        .unwrap()
        .record
}

async fn container_secrets(api: &TestApi, uuid: &str) -> Secrets {
    api.state
        .store()
        .get_container_secrets(uuid)
        .await
        .unwrap()
        .unwrap()
        .record
}

async fn read_secret_mounts(api: &TestApi, container: &str, token: &str) -> Reply {
    api.get(&format!("containers/{container}/secret_mounts"), token)
        .await
}

async fn update_request(api: &TestApi, uuid: &str, token: &str, attributes: Value) -> Reply {
    api.call(
        Method::PUT,
        &format!("container_requests/{uuid}"),
        Some(token),
        Some(json!({"container_request": attributes})),
    )
    .await
}

#[tokio::test]
async fn secrets_are_never_returned() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let extra = json!({"secret_mounts": secret_mounts(), "runtime_token": alice});
    let created = api.create_request(&alice, attributes_with(extra)).await;
    created.expect(StatusCode::OK);
    assert_hidden(&created, &[&alice]);
    let request = str_of(&created.json(), "uuid").to_string();
    let container = str_of(&created.json(), "container_uuid").to_string();
    let hidden = [alice.as_str()];

    for path in [
        format!("container_requests/{request}"),
        format!("container_requests/{request}?select=[\"uuid\",\"mounts\"]"),
        format!("container_requests/{request}/container_status"),
        "container_requests".to_string(),
        "container_requests?select=[\"uuid\",\"mounts\",\"state\"]".to_string(),
        format!("containers/{container}"),
        format!("containers/{container}?select=[\"uuid\",\"mounts\"]"),
        "containers".to_string(),
        "containers?select=[\"uuid\",\"mounts\"]".to_string(),
        "containers/changes?after=0".to_string(),
    ] {
        for token in [alice.as_str(), SYSTEM_TOKEN] {
            let reply = api.get(&path, token).await;
            reply.expect(StatusCode::OK);
            assert_hidden(&reply, &hidden);
        }
    }
    for select in ["secret_mounts", "runtime_token"] {
        for resource in ["container_requests", "containers"] {
            let reply = api
                .get(&format!("{resource}?select=[\"{select}\"]"), SYSTEM_TOKEN)
                .await;
            reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
            assert!(!String::from_utf8_lossy(&reply.body).contains(MARKER));
        }
    }
    for filter in ["secret_mounts", "runtime_token"] {
        let reply = api
            .get(
                &format!("container_requests?filters=[[\"{filter}\",\"=\",\"x\"]]"),
                SYSTEM_TOKEN,
            )
            .await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    }

    // The Python SDK's long lists: a POST overridden to GET.
    let listed = api
        .send(
            TestApi::request(Method::POST, "container_requests", Some(&alice))
                .header("x-http-method-override", "GET")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(axum::body::Body::from("limit=10"))
                .unwrap(),
        )
        .await;
    listed.expect(StatusCode::OK);
    assert_hidden(&listed, &hidden);

    let updated = update_request(&api, &request, &alice, json!({"name": "renamed"})).await;
    updated.expect(StatusCode::OK);
    assert_hidden(&updated, &hidden);

    let locked = api
        .call(
            Method::POST,
            &format!("containers/{container}/lock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    locked.expect(StatusCode::OK);
    assert_hidden(&locked, &hidden);
    let container_token = locked.json()["credentials"]["api_token"]
        .as_str()
        .unwrap()
        .to_string();
    let current = api.get("containers/current", &container_token).await;
    current.expect(StatusCode::OK);
    assert_hidden(&current, &hidden);
    let running = api
        .update_container(&container, &container_token, json!({"state": "Running"}))
        .await;
    running.expect(StatusCode::OK);
    assert_hidden(&running, &hidden);

    let deleted = api
        .call(
            Method::DELETE,
            &format!("container_requests/{request}"),
            Some(&alice),
            None,
        )
        .await;
    deleted.expect(StatusCode::OK);
    assert_hidden(&deleted, &hidden);
}

#[tokio::test]
async fn discovery_lists_no_secret_attribute() {
    let api = TestApi::new().await;
    let reply = api
        .send(
            TestApi::request(Method::GET, "/discovery/v1/apis/arvados/v1/rest", None)
                .header("host", "127.0.0.1:9999")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    reply.expect(StatusCode::OK);
    let document = reply.json();
    for schema in ["ContainerRequest", "Container"] {
        let properties = document["schemas"][schema]["properties"]
            .as_object()
            .unwrap();
        assert!(!properties.contains_key("secret_mounts"), "{schema}");
        assert!(!properties.contains_key("runtime_token"), "{schema}");
    }
    let method = &document["resources"]["containers"]["methods"]["secret_mounts"];
    assert_eq!(method["path"], "containers/{uuid}/secret_mounts");
}

#[tokio::test]
async fn secret_mounts_reach_only_the_container_token() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let (request, container) = api
        .committed_with(&alice, json!({"secret_mounts": secret_mounts()}))
        .await;
    let request = str_of(&request, "uuid").to_string();
    let container = str_of(&container, "uuid").to_string();
    let (_, other) = api.committed(&bob).await;
    let other = str_of(&other, "uuid").to_string();

    // Queued: no container token exists yet, and no other caller may read
    // them.
    read_secret_mounts(&api, &container, SYSTEM_TOKEN)
        .await
        .expect(StatusCode::FORBIDDEN);

    let token = api.lock(&container).await;
    let other_token = api.lock(&other).await;
    let reply = read_secret_mounts(&api, &container, &token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"secret_mounts": secret_mounts()}));
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));

    for (caller, status) in [
        (alice.as_str(), StatusCode::FORBIDDEN),
        (SYSTEM_TOKEN, StatusCode::FORBIDDEN),
        (bob.as_str(), StatusCode::NOT_FOUND),
        (other_token.as_str(), StatusCode::NOT_FOUND),
    ] {
        let reply = read_secret_mounts(&api, &container, caller).await;
        reply.expect(status);
        assert!(!String::from_utf8_lossy(&reply.body).contains(MARKER));
    }
    // A container without secret mounts gets an empty object.
    let reply = read_secret_mounts(&api, &other, &other_token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"secret_mounts": {}}));

    api.update_container(&container, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    read_secret_mounts(&api, &container, &token)
        .await
        .expect(StatusCode::OK);

    api.update_container(
        &container,
        &token,
        json!({"state": "Complete", "exit_code": 0}),
    )
    .await
    .expect(StatusCode::OK);
    // The container token is revoked with the final state.
    read_secret_mounts(&api, &container, &token)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    read_secret_mounts(&api, &container, SYSTEM_TOKEN)
        .await
        .expect(StatusCode::FORBIDDEN);
    assert!(container_secrets(&api, &container).await.is_empty());
    let finished = api
        .get(&format!("container_requests/{request}"), &alice)
        .await
        .json();
    assert_eq!(finished["state"], "Final");
    assert!(request_secrets(&api, &request).await.is_empty());
}

#[tokio::test]
async fn request_set_final_loses_its_secrets() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api
        .committed_with(
            &alice,
            json!({"secret_mounts": secret_mounts(), "runtime_token": alice}),
        )
        .await;
    let request = str_of(&request, "uuid").to_string();
    let container = str_of(&container, "uuid").to_string();
    let stored = request_secrets(&api, &request).await;
    assert_eq!(stored.secret_mounts.len(), 2);
    assert!(stored
        .runtime_token
        .is_some_and(|token| token.matches(&alice)));
    let copied = container_secrets(&api, &container).await;
    assert_eq!(copied.secret_mounts.len(), 2);
    assert!(copied
        .runtime_token
        .is_some_and(|token| token.matches(&alice)));

    update_request(&api, &request, &alice, json!({"state": "Final"}))
        .await
        .expect(StatusCode::OK);
    assert!(request_secrets(&api, &request).await.is_empty());
    // The container is on hold, not final: it keeps its secrets until it
    // ends.
    assert_eq!(
        container_secrets(&api, &container)
            .await
            .secret_mounts
            .len(),
        2
    );
    api.update_container(&container, SYSTEM_TOKEN, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);
    assert!(container_secrets(&api, &container).await.is_empty());
}

#[tokio::test]
async fn secret_mount_rules_name_the_target() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let cases = [
        (
            json!({"/out": {"kind": "text", "content": MARKER}}),
            "secret_mounts./out",
        ),
        (
            json!({"/scratch": {"kind": "tmp", "capacity": 1000}}),
            "secret_mounts./scratch.kind",
        ),
        (
            json!({"/data": {"kind": "collection", "portable_data_hash": "d41d8cd98f00b204e9800998ecf8427e+0"}}),
            "secret_mounts./data.kind",
        ),
        (
            json!({"etc/secret": {"kind": "text", "content": MARKER}}),
            "secret_mounts.etc/secret",
        ),
        (
            json!({"/etc/../secret": {"kind": "text", "content": MARKER}}),
            "secret_mounts./etc/../secret",
        ),
        (
            json!({"stdin": {"kind": "text", "content": MARKER}}),
            "secret_mounts.stdin",
        ),
        (
            json!({"/etc/secret": {"kind": "text", "content": {"password": MARKER}}}),
            "secret_mounts./etc/secret.content",
        ),
        (
            json!({"/etc/secret": {"kind": "json"}}),
            "secret_mounts./etc/secret.content",
        ),
        (
            json!({"/etc/secret": {"kind": "text", "content": MARKER, "capacity": MARKER}}),
            "secret_mounts./etc/secret.capacity",
        ),
        (json!([MARKER]), "secret_mounts"),
    ];
    for (value, field) in cases {
        let reply = api
            .create_request(&alice, attributes_with(json!({"secret_mounts": value})))
            .await;
        assert_rejected(&reply, field, &[]);
    }
    assert_eq!(api.request_count().await, 0);
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn secret_mounts_change_only_while_uncommitted() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let draft = api
        .create_request(
            &alice,
            attributes_with(json!({"state": "Uncommitted", "secret_mounts": {
                "/etc/first": {"kind": "text", "content": MARKER},
            }})),
        )
        .await;
    draft.expect(StatusCode::OK);
    let request = str_of(&draft.json(), "uuid").to_string();
    assert!(request_secrets(&api, &request)
        .await
        .secret_mounts
        .contains_key("/etc/first"));

    update_request(
        &api,
        &request,
        &alice,
        json!({"secret_mounts": secret_mounts()}),
    )
    .await
    .expect(StatusCode::OK);
    // A secret mount may not take a target of mounts, even when mounts
    // is the attribute that changes.
    let collision = update_request(
        &api,
        &request,
        &alice,
        json!({"mounts": {
            "/out": {"kind": "tmp", "capacity": 1048576},
            "/etc/berth/secret.txt": {"kind": "tmp", "capacity": 1},
        }}),
    )
    .await;
    assert_rejected(&collision, "secret_mounts./etc/berth/secret.txt", &[]);

    let committed = update_request(&api, &request, &alice, json!({"state": "Committed"})).await;
    committed.expect(StatusCode::OK);
    let container = str_of(&committed.json(), "container_uuid").to_string();
    let copied = container_secrets(&api, &container).await;
    assert_eq!(
        serde_json::to_value(&copied.secret_mounts).unwrap(),
        secret_mounts()
    );

    let late = update_request(
        &api,
        &request,
        &alice,
        json!({"secret_mounts": {"/etc/late": {"kind": "text", "content": MARKER}}}),
    )
    .await;
    assert_rejected(&late, "cannot change secret_mounts", &[]);
    // Empty values, as clients that send every attribute send them, change
    // nothing.
    update_request(
        &api,
        &request,
        &alice,
        json!({"secret_mounts": {}, "runtime_token": "", "priority": 2}),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(request_secrets(&api, &request).await.secret_mounts.len(), 2);
}

#[tokio::test]
async fn runtime_token_is_checked_without_showing_it() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let carol = api.user("carol", false).await;
    let dave = api.user("dave", false).await;
    let erin = api.user("erin", false).await;
    revoke(&api, &carol).await;
    execute(
        &api,
        &format!(
            "UPDATE api_client_authorizations SET expires_at = '2024-01-01T00:00:00.000000000Z' WHERE uuid = '{}'",
            token_uuid(&dave)
        ),
    )
    .await;
    let erin_uuid = user_uuid(&api, &erin).await;
    let inactive = if api.database_url().starts_with("sqlite:") {
        "0"
    } else {
        "FALSE"
    };
    execute(
        &api,
        &format!("UPDATE users SET is_active = {inactive} WHERE uuid = '{erin_uuid}'"),
    )
    .await;
    let (_, container) = api.committed(&alice).await;
    let container_token = api.lock(str_of(&container, "uuid")).await;
    let wrong_secret = format!("v2/{}/{TOKEN_SECRET}", token_uuid(&alice));
    let unknown = format!("v2/zzzzz-gj3su-000000000000abc/{TOKEN_SECRET}");
    let punctuated = format!("v2/{}/{MARKER}", token_uuid(&alice));

    let cases: [(&str, &str, &str); 10] = [
        (MARKER, "is not a user token", MARKER),
        (&punctuated, "letters and digits", MARKER),
        ("v2/not-a-uuid/abc", "is not a user token", "not-a-uuid"),
        (&container_token, "is a container token", &container_token),
        (&unknown, "is not a token of this cluster", TOKEN_SECRET),
        (
            &wrong_secret,
            "is not a token of this cluster",
            TOKEN_SECRET,
        ),
        (&carol, "has been revoked", &carol),
        (&dave, "has expired", &dave),
        (&erin, "is not active", &erin),
        (&bob, "belongs to another user", &bob),
    ];
    for (token, message, secret) in cases {
        let reply = api
            .create_request(&alice, attributes_with(json!({"runtime_token": token})))
            .await;
        assert_rejected(&reply, "runtime_token", &[secret]);
        assert!(reply.errors().contains(message), "{}", reply.errors());
    }
    // Bad values of the wrong type, too.
    let reply = api
        .create_request(&alice, attributes_with(json!({"runtime_token": [MARKER]})))
        .await;
    assert_rejected(&reply, "runtime_token", &[]);
    // The only request is the one made for the container token.
    assert_eq!(api.request_count().await, 1);

    // A draft's token is checked when it is set ...
    let reply = api
        .create_request(
            &alice,
            attributes_with(json!({"state": "Uncommitted", "runtime_token": bob})),
        )
        .await;
    assert_rejected(&reply, "runtime_token", &[&bob]);
}

#[tokio::test]
async fn runtime_token_is_checked_again_at_commit() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let draft = api
        .create_request(
            &alice,
            attributes_with(json!({"state": "Uncommitted", "runtime_token": alice})),
        )
        .await;
    draft.expect(StatusCode::OK);
    let request = str_of(&draft.json(), "uuid").to_string();
    revoke(&api, &alice).await;
    let admin = api.user("admin", true).await;
    let reply = update_request(&api, &request, &admin, json!({"state": "Committed"})).await;
    assert_rejected(&reply, "has been revoked", &[&alice]);
    let stored = api
        .get(&format!("container_requests/{request}"), &admin)
        .await
        .json();
    assert_eq!(stored["state"], "Uncommitted");
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn container_runs_as_the_runtime_token_user() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let alice_uuid = user_uuid(&api, &alice).await;
    let bob_uuid = user_uuid(&api, &bob).await;

    // A token with narrow scopes, which the container then has.
    let scoped_uuid = "zzzzz-gj3su-scopedtoken0001";
    let scoped_secret = "scopedsecret0123456789";
    let scoped = format!("v2/{scoped_uuid}/{scoped_secret}");
    let digest = hex::encode(Sha256::digest(scoped_secret.as_bytes()));
    execute(
        &api,
        &format!(
            "INSERT INTO api_client_authorizations (uuid, owner_uuid, secret_sha256, scopes, created_at) \
             VALUES ('{scoped_uuid}', '{alice_uuid}', '{digest}', '[\"GET /arvados/v1/users/current\"]', '2024-01-01T00:00:00.000000000Z')"
        ),
    )
    .await;
    let (_, own) = api
        .committed_with(&alice, json!({"runtime_token": scoped}))
        .await;
    assert_eq!(own["runtime_user_uuid"], alice_uuid.as_str());
    assert_eq!(
        own["runtime_auth_scopes"],
        json!(["GET /arvados/v1/users/current"])
    );

    // An administrator may make a container run as another user.
    let (request, theirs) = api
        .committed_with(SYSTEM_TOKEN, json!({"runtime_token": bob}))
        .await;
    assert_eq!(theirs["runtime_user_uuid"], bob_uuid.as_str());
    assert_eq!(theirs["runtime_auth_scopes"], json!(["all"]));
    assert_ne!(request["owner_uuid"], bob_uuid.as_str());
    // The container's own token, minted at lock, acts as that user.
    let token = api.lock(str_of(&theirs, "uuid")).await;
    let current = api.get("api_client_authorizations/current", &token).await;
    current.expect(StatusCode::OK);
    assert_eq!(current.json()["owner_uuid"], bob_uuid.as_str());
}

#[tokio::test]
async fn reuse_tells_secret_mounts_apart() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let with = |secret: &str| {
        json!({
            "use_existing": true,
            "secret_mounts": {"/etc/secret": {"kind": "text", "content": secret}},
        })
    };
    let (_, first) = api.committed_with(&alice, with("one")).await;
    let (_, same) = api.committed_with(&alice, with("one")).await;
    let (_, other) = api.committed_with(&alice, with("two")).await;
    let (_, none) = api
        .committed_with(&alice, json!({"use_existing": true}))
        .await;
    let uuid = |container: &Value| str_of(container, "uuid").to_string();
    assert_eq!(uuid(&first), uuid(&same));
    assert_ne!(uuid(&first), uuid(&other));
    assert_ne!(uuid(&first), uuid(&none));
    assert_ne!(uuid(&other), uuid(&none));
}

#[tokio::test]
async fn retried_container_gets_the_same_secrets() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let alice_uuid = user_uuid(&api, &alice).await;
    let (request, first) = api
        .committed_with(
            &alice,
            json!({"secret_mounts": secret_mounts(), "runtime_token": alice}),
        )
        .await;
    let request = str_of(&request, "uuid").to_string();
    let first = str_of(&first, "uuid").to_string();
    api.lock(&first).await;
    api.update_container(&first, SYSTEM_TOKEN, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);

    let moved = api
        .get(&format!("container_requests/{request}"), &alice)
        .await
        .json();
    assert_eq!(moved["state"], "Committed");
    let second = str_of(&moved, "container_uuid").to_string();
    assert_ne!(second, first);
    assert!(container_secrets(&api, &first).await.is_empty());
    let copied = container_secrets(&api, &second).await;
    assert!(copied
        .runtime_token
        .is_some_and(|token| token.matches(&alice)));
    let retried = api
        .get(&format!("containers/{second}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(retried["runtime_user_uuid"], alice_uuid.as_str());

    let token = api.lock(&second).await;
    let reply = read_secret_mounts(&api, &second, &token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"secret_mounts": secret_mounts()}));
}

#[tokio::test]
async fn runtime_token_route_needs_api_access() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let with_api = json!({"ram": 67108864, "vcpus": 1, "API": true});
    let (_, api_container) = api
        .committed_with(
            &alice,
            json!({"runtime_token": alice, "runtime_constraints": with_api}),
        )
        .await;
    let (_, plain) = api
        .committed_with(&alice, json!({"runtime_token": alice}))
        .await;
    let (_, tokenless) = api
        .committed_with(&alice, json!({"runtime_constraints": with_api}))
        .await;
    let api_container = str_of(&api_container, "uuid").to_string();
    let plain = str_of(&plain, "uuid").to_string();
    let tokenless = str_of(&tokenless, "uuid").to_string();
    let path = |uuid: &str| format!("containers/{uuid}/runtime_token");

    let token = api.lock(&api_container).await;
    let reply = api.get(&path(&api_container), &token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"runtime_token": alice}));
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    for caller in [alice.as_str(), SYSTEM_TOKEN] {
        let reply = api.get(&path(&api_container), caller).await;
        reply.expect(StatusCode::FORBIDDEN);
        assert!(!String::from_utf8_lossy(&reply.body).contains(&alice));
    }

    let plain_token = api.lock(&plain).await;
    let reply = api.get(&path(&plain), &plain_token).await;
    reply.expect(StatusCode::FORBIDDEN);
    assert!(reply.errors().contains("API"), "{}", reply.errors());
    assert!(!String::from_utf8_lossy(&reply.body).contains(&alice));

    let tokenless_token = api.lock(&tokenless).await;
    let reply = api.get(&path(&tokenless), &tokenless_token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"runtime_token": null}));
}

/// Collects every log line written while it is the default subscriber.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // With a single subscriber, tracing may decide a callsite's interest
    // from another test's thread, which has none, and capture nothing. A
    // second one makes it ask each thread's own.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let _guard = tracing::subscriber::set_default(subscriber);

    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api
        .committed_with(
            &alice,
            json!({"secret_mounts": secret_mounts(), "runtime_token": alice}),
        )
        .await;
    let container = str_of(&container, "uuid").to_string();
    let token = api.lock(&container).await;
    read_secret_mounts(&api, &container, &token)
        .await
        .expect(StatusCode::OK);
    let bad = api
        .create_request(
            &alice,
            attributes_with(json!({
                "runtime_token": format!("v2/zzzzz-gj3su-000000000000abc/{TOKEN_SECRET}"),
                "secret_mounts": {"/out": {"kind": "text", "content": MARKER}},
            })),
        )
        .await;
    bad.expect(StatusCode::UNPROCESSABLE_ENTITY);
    api.update_container(&container, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    api.update_container(
        &container,
        &token,
        json!({"state": "Complete", "exit_code": 0}),
    )
    .await
    .expect(StatusCode::OK);

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("gave a container its secret mounts"),
        "the capture missed the controller's log: {log}"
    );
    assert!(!log.contains(MARKER), "{log}");
    assert!(!log.contains(TOKEN_SECRET), "{log}");
    assert!(!log.contains(&alice), "{log}");
    let alice_secret = alice.rsplit('/').next().unwrap();
    assert!(!log.contains(alice_secret), "{log}");
}
