//! Authentication and who may see and change what.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::common::{str_of, TestApi, SYSTEM_TOKEN};

#[tokio::test]
async fn missing_token_is_401() {
    let api = TestApi::new().await;
    for path in ["container_requests", "containers", "users/current"] {
        let reply = api.call(Method::GET, path, None, None).await;
        reply.expect(StatusCode::UNAUTHORIZED);
        assert!(
            reply.errors().starts_with("Not logged in: "),
            "{}",
            reply.errors()
        );
    }
    let reply = api.create_request("", json!({})).await;
    reply.expect(StatusCode::UNAUTHORIZED);
    assert_eq!(api.request_count().await, 0);
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let token_uuid = token.split('/').nth(1).unwrap();
    let wrong_secret = format!("v2/{token_uuid}/wrongsecret");
    let unknown_uuid = "v2/zzzzz-gj3su-aaaaaaaaaaaaaaa/secret".to_string();
    let truncated_system = SYSTEM_TOKEN[..SYSTEM_TOKEN.len() - 1].to_string();
    for bad in [
        "nonsense",
        wrong_secret.as_str(),
        unknown_uuid.as_str(),
        truncated_system.as_str(),
        "v2/zzzzz-gj3su-aaaaaaaaaaaaaaa",
    ] {
        let reply = api.get("container_requests", bad).await;
        reply.expect(StatusCode::UNAUTHORIZED);
        assert!(
            reply.errors().starts_with("Not logged in: "),
            "{}",
            reply.errors()
        );
    }
    // A user token with a container part it was not minted for.
    let with_container = format!("{token}/zzzzz-dz642-aaaaaaaaaaaaaaa");
    api.get("users/current", &with_container)
        .await
        .expect(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unsupported_scheme_is_401_and_oauth2_is_accepted() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let basic = TestApi::request(Method::GET, "users/current", None)
        .header("authorization", format!("Basic {token}"))
        .body(Body::empty())
        .unwrap();
    api.send(basic).await.expect(StatusCode::UNAUTHORIZED);
    let oauth2 = TestApi::request(Method::GET, "users/current", None)
        .header("authorization", format!("OAuth2 {token}"))
        .body(Body::empty())
        .unwrap();
    let reply = api.send(oauth2).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["username"], "alice");
}

#[tokio::test]
async fn current_user_and_token_describe_caller() {
    let api = TestApi::new().await;
    let token = api.user("alice", false).await;
    let user = api.get("users/current", &token).await;
    user.expect(StatusCode::OK);
    let user = user.json();
    assert_eq!(user["kind"], "arvados#user");
    assert_eq!(user["username"], "alice");
    assert_eq!(user["is_admin"], false);
    assert!(str_of(&user, "uuid").starts_with("zzzzz-tpzed-"));
    assert!(user["etag"].is_string());

    let current = api.get("api_client_authorizations/current", &token).await;
    current.expect(StatusCode::OK);
    let current = current.json();
    assert_eq!(current["uuid"], token.split('/').nth(1).unwrap());
    assert_eq!(current["owner_uuid"], user["uuid"]);
    assert_eq!(current["scopes"], json!(["all"]));
    assert!(!current
        .to_string()
        .contains(token.split('/').nth(2).unwrap()));

    let system = api.get("users/current", SYSTEM_TOKEN).await;
    system.expect(StatusCode::OK);
    assert_eq!(system.json()["uuid"], "zzzzz-tpzed-000000000000000");
    assert_eq!(system.json()["is_admin"], true);
    let system_token = api
        .get("api_client_authorizations/current", SYSTEM_TOKEN)
        .await;
    assert_eq!(system_token.json()["uuid"], "zzzzz-gj3su-000000000000000");
}

#[tokio::test]
async fn other_users_request_is_404() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let (request, container) = api.committed(&alice).await;
    let uuid = str_of(&request, "uuid");

    let reply = api.get(&format!("container_requests/{uuid}"), &bob).await;
    reply.expect(StatusCode::NOT_FOUND);
    assert!(reply.errors().contains(uuid), "{}", reply.errors());
    api.get(&format!("container_requests/{uuid}/container_status"), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    api.call(
        Method::PUT,
        &format!("container_requests/{uuid}"),
        Some(&bob),
        Some(json!({"priority": 0})),
    )
    .await
    .expect(StatusCode::NOT_FOUND);
    api.get(&format!("containers/{}", str_of(&container, "uuid")), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);

    let list = api.get("container_requests", &bob).await;
    list.expect(StatusCode::OK);
    assert_eq!(list.json()["items_available"], 0);
    let containers = api.get("containers", &bob).await;
    assert_eq!(containers.json()["items_available"], 0);

    // The owner and an administrator see both.
    api.get(&format!("container_requests/{uuid}"), &alice)
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        api.get("containers", &alice).await.json()["items_available"],
        1
    );
    let admin = api.user("root2", true).await;
    api.get(&format!("container_requests/{uuid}"), &admin)
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn user_updating_container_is_403() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let reply = api
        .update_container(uuid, &alice, json!({"state": "Cancelled"}))
        .await;
    reply.expect(StatusCode::FORBIDDEN);
    assert!(
        reply.errors().contains("users cannot update containers"),
        "{}",
        reply.errors()
    );
    api.call(
        Method::POST,
        &format!("containers/{uuid}/lock"),
        Some(&alice),
        None,
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    let after = api.get(&format!("containers/{uuid}"), &alice).await.json();
    assert_eq!(after["state"], "Queued");
}

#[tokio::test]
async fn unlock_by_other_token_is_403() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let admin = api.user("operator", true).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    api.lock(uuid).await;
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/unlock"),
            Some(&admin),
            None,
        )
        .await;
    reply.expect(StatusCode::FORBIDDEN);
    assert!(
        reply.errors().contains("locked by another token"),
        "{}",
        reply.errors()
    );
    let after = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(after["state"], "Locked");
    assert_eq!(after["locked_by_uuid"], "zzzzz-gj3su-000000000000000");
}

#[tokio::test]
async fn container_token_reaching_another_container_is_404() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, first) = api.committed(&alice).await;
    let (_, second) = api.committed(&alice).await;
    let first_uuid = str_of(&first, "uuid");
    let second_uuid = str_of(&second, "uuid");
    let token = api.lock(first_uuid).await;

    api.get(&format!("containers/{first_uuid}"), &token)
        .await
        .expect(StatusCode::OK);
    api.get(&format!("containers/{second_uuid}"), &token)
        .await
        .expect(StatusCode::NOT_FOUND);
    api.update_container(second_uuid, &token, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::NOT_FOUND);
    api.append_log(second_uuid, "stdout", 0, &token, b"x")
        .await
        .expect(StatusCode::NOT_FOUND);
    api.read_log(second_uuid, "stdout", "offset=0", &token)
        .await
        .expect(StatusCode::NOT_FOUND);
    let list = api.get("containers", &token).await;
    list.expect(StatusCode::OK);
    let items = list.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["uuid"], first_uuid);

    // Requests are out of a container token's reach.
    api.get("container_requests", &token)
        .await
        .expect(StatusCode::FORBIDDEN);
    api.create_request(&token, json!({}))
        .await
        .expect(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn containers_current_needs_container_token() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    let current = api.get("containers/current", &token).await;
    current.expect(StatusCode::OK);
    assert_eq!(current.json()["uuid"], uuid);
    assert_eq!(current.json()["kind"], "arvados#container");
    for other in [alice.as_str(), SYSTEM_TOKEN] {
        let reply = api.get("containers/current", other).await;
        reply.expect(StatusCode::NOT_FOUND);
        assert!(reply.errors().contains("not associated with a container"));
    }
}

#[tokio::test]
async fn container_token_is_revoked_when_container_ends() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    api.update_container(uuid, &token, json!({"state": "Complete", "exit_code": 0}))
        .await
        .expect(StatusCode::OK);
    let reply = api.get("containers/current", &token).await;
    reply.expect(StatusCode::UNAUTHORIZED);
    let container = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert!(container["auth_uuid"].is_null());
    assert!(container["locked_by_uuid"].is_null());
}

#[tokio::test]
async fn container_token_cannot_set_admin_fields() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    let reply = api
        .update_container(uuid, &token, json!({"priority": 7}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("priority"), "{}", reply.errors());
    let reply = api
        .update_container(uuid, &token, json!({"scheduler_job_id": "12"}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("scheduler_job_id"),
        "{}",
        reply.errors()
    );
    api.call(
        Method::POST,
        &format!("containers/{uuid}/unlock"),
        Some(&token),
        None,
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    // The system token may set the job id; nobody sets the priority,
    // which the controller computes from the requests.
    let reply = api
        .update_container(uuid, SYSTEM_TOKEN, json!({"scheduler_job_id": "12"}))
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["scheduler_job_id"], "12");
    let reply = api
        .update_container(uuid, SYSTEM_TOKEN, json!({"priority": 7}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("change a request's priority"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn health_needs_no_token() {
    let api = TestApi::new().await;
    let reply = api.call(Method::GET, "/_health/ping", None, None).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), json!({"health": "OK"}));
}

#[tokio::test]
async fn unknown_path_is_404_json() {
    let api = TestApi::new().await;
    let reply = api.get("no_such_things", SYSTEM_TOKEN).await;
    reply.expect(StatusCode::NOT_FOUND);
    assert!(
        reply.errors().contains("Path not found"),
        "{}",
        reply.errors()
    );
    let reply = api
        .call(Method::DELETE, "containers", Some(SYSTEM_TOKEN), None)
        .await;
    reply.expect(StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.errors().contains("DELETE"), "{}", reply.errors());
}

#[tokio::test]
async fn state_debug_hides_system_token() {
    let api = TestApi::new().await;
    let shown = format!("{:?}", api.state);
    assert!(shown.contains("zzzzz"), "{shown}");
    assert!(!shown.contains(SYSTEM_TOKEN), "{shown}");
    let digest = berth_controller::auth::hash_secret(SYSTEM_TOKEN);
    assert!(!shown.contains(&digest[..16]), "{shown}");
    assert!(!shown.contains("system_token"), "{shown}");
}
