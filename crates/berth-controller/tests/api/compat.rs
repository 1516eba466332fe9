//! The calls of Arvados clients beyond plain CRUD: the user fields the SDK
//! reads, `containers/current`, `is_a` and `exists` filters, `count=none`,
//! `order` as plain text, and parameters that are accepted and ignored.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::{runnable, str_of, TestApi, SYSTEM_TOKEN};

#[tokio::test]
async fn current_user_has_sdk_fields() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for token in [alice.as_str(), SYSTEM_TOKEN] {
        let reply = api.get("users/current?alt=json", token).await;
        reply.expect(StatusCode::OK);
        let me = reply.json();
        for field in [
            "uuid",
            "kind",
            "is_active",
            "is_admin",
            "owner_uuid",
            "username",
            "email",
            "full_name",
            "first_name",
            "last_name",
            "prefs",
        ] {
            assert!(me.get(field).is_some(), "users/current lacks {field}: {me}");
        }
        assert!(me["prefs"].is_object(), "{me}");
    }
}

#[tokio::test]
async fn containers_current_for_user_token_is_404() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api.get("containers/current", &alice).await;
    reply.expect(StatusCode::NOT_FOUND);
    assert_eq!(reply.errors(), "Token is not associated with a container.");
}

#[tokio::test]
async fn containers_current_for_container_token() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let container_token = api.lock(uuid).await;
    let reply = api.get("containers/current", &container_token).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["uuid"], uuid);
    assert_eq!(reply.json()["kind"], "arvados#container");
}

#[tokio::test]
async fn is_a_filters_by_kind() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.committed(&alice).await;

    let reply = api
        .get(
            r#"container_requests?filters=[["container_uuid","is_a","arvados#container"]]"#,
            &alice,
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items_available"], 1);

    let reply = api
        .get(
            r#"container_requests?filters=[["container_uuid","is_a","arvados#collection"]]"#,
            &alice,
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items_available"], 0);

    let reply = api
        .get(
            r#"container_requests?filters=[["uuid","is_a",["arvados#containerRequest"]]]"#,
            &alice,
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["items_available"], 1);
}

#[tokio::test]
async fn exists_filter_is_422_with_reason() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api
        .get(
            r#"container_requests?filters=[["properties","exists","a"]]"#,
            &alice,
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("exists"), "{}", reply.errors());
}

#[tokio::test]
async fn count_none_and_text_order_and_ignored_params() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for name in ["b", "a"] {
        let mut attributes = runnable();
        attributes["name"] = json!(name);
        api.create_request(&alice, attributes)
            .await
            .expect(StatusCode::OK);
    }
    let reply = api
        .get(
            "container_requests?count=none&order=name+asc,+uuid&alt=json&distinct=false\
             &include_trash=true&bypass_federation=true&cluster_id=zzzzz&unknown=1",
            &alice,
        )
        .await;
    reply.expect(StatusCode::OK);
    let body = reply.json();
    assert!(body.get("items_available").is_none(), "{body}");
    let names: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| str_of(item, "name"))
        .collect();
    assert_eq!(names, ["a", "b"]);
}
