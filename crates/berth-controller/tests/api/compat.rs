//! The calls of Arvados clients beyond plain CRUD: the user fields the SDK
//! reads, `containers/current`, `is_a`, `exists` and property-key filters, `count=none`,
//! `order` as plain text, and parameters that are accepted and ignored.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{runnable, str_of, Reply, TestApi, SYSTEM_TOKEN};

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

/// Counts alice's requests that match one filter, or returns the reply
/// when the filter is rejected.
async fn count_matching(api: &TestApi, token: &str, filter: Value) -> Result<u64, Reply> {
    let path = format!("container_requests?filters={}", json!([filter]));
    let reply = api.get(&path, token).await;
    if reply.status != StatusCode::OK {
        return Err(reply);
    }
    Ok(reply.json()["items_available"].as_u64().unwrap())
}

#[tokio::test]
async fn filters_on_property_keys() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for properties in [
        json!({"a": "x", "n": 5, "flag": true}),
        json!({"a": "y", "n": 10.5, "flag": false}),
        json!({"n": "5", "empty": null}),
    ] {
        let mut attributes = runnable();
        attributes["properties"] = properties;
        api.create_request(&alice, attributes)
            .await
            .expect(StatusCode::OK);
    }
    let cases = [
        (json!(["properties", "exists", "a"]), 2),
        (json!(["properties.a", "exists", true]), 2),
        (json!(["properties.a", "exists", false]), 1),
        (json!(["properties", "exists", "empty"]), 1),
        (json!(["container_requests.properties.a", "=", "x"]), 1),
        (json!(["properties.a", "!=", "x"]), 2),
        (json!(["properties.a", "in", ["x", "y"]]), 2),
        (json!(["properties.a", "not in", ["x"]]), 2),
        (json!(["properties.a", "=", null]), 1),
        (json!(["properties.empty", "=", null]), 3),
        (json!(["properties.a", "!=", null]), 2),
        (json!(["properties.a", "like", "x%"]), 1),
        (json!(["properties.a", "like", "X%"]), 0),
        (json!(["properties.a", "ilike", "X%"]), 1),
        // Values keep their JSON type: the number 5 is not the string "5".
        (json!(["properties.n", "=", 5]), 1),
        (json!(["properties.n", "=", "5"]), 1),
        (json!(["properties.n", ">", 6]), 1),
        (json!(["properties.n", "<=", 10.5]), 2),
        (json!(["properties.n", "in", [5, "5"]]), 2),
        (json!(["properties.flag", "=", true]), 1),
        (json!(["properties.flag", "=", false]), 1),
        (json!(["properties.flag", "!=", true]), 2),
        (json!(["runtime_constraints.vcpus", "=", 1]), 3),
        (json!(["mounts", "exists", "/out"]), 3),
        (json!(["environment", "exists", "PATH"]), 0),
    ];
    for (filter, expected) in cases {
        let count = count_matching(&api, &alice, filter.clone())
            .await
            .unwrap_or_else(|reply| panic!("{filter}: {}", reply.errors()));
        assert_eq!(count, expected, "{filter}");
    }
}

#[tokio::test]
async fn bad_key_filters_are_422_naming_the_value() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let cases = [
        (json!(["properties", "exists", 5]), "needs the key"),
        (json!(["properties.a", "exists", "yes"]), "true or false"),
        (json!(["name", "exists", true]), "object attributes"),
        (json!(["properties.a\"b", "=", "x"]), "a\\\"b"),
        (json!(["properties.", "=", "x"]), "non-empty"),
        (
            json!(["properties.a", "=", {"b": 1}]),
            "not a string, number or bool",
        ),
        (json!(["properties.a", "like", 5]), "string pattern"),
        (json!(["properties.a", "<", null]), "cannot take null"),
        (json!(["properties.a", "contains", "x"]), "unknown operator"),
        (json!(["command.x", "=", "y"]), "cannot be filtered"),
    ];
    for (filter, expected) in cases {
        let reply = count_matching(&api, &alice, filter.clone())
            .await
            .expect_err(&filter.to_string());
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            reply.errors().contains(expected),
            "{filter}: {}",
            reply.errors()
        );
    }
}

#[tokio::test]
async fn is_a_with_several_kinds_matches_any() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    api.committed(&alice).await;
    let mut draft = runnable();
    draft["state"] = json!("Uncommitted");
    api.create_request(&alice, draft)
        .await
        .expect(StatusCode::OK);
    let cases = [
        (
            json!([
                "container_uuid",
                "is_a",
                ["arvados#collection", "arvados#container"]
            ]),
            1,
        ),
        (
            json!(["owner_uuid", "is_a", ["arvados#group", "arvados#user"]]),
            2,
        ),
        (
            json!([
                "owner_uuid",
                "is_a",
                ["arvados#group", "arvados#collection"]
            ]),
            0,
        ),
        (
            json!([
                "uuid",
                "is_a",
                ["arvados#collection", "arvados#containerRequest"]
            ]),
            2,
        ),
        (json!(["uuid", "is_a", []]), 0),
    ];
    for (filter, expected) in cases {
        let count = count_matching(&api, &alice, filter.clone())
            .await
            .unwrap_or_else(|reply| panic!("{filter}: {}", reply.errors()));
        assert_eq!(count, expected, "{filter}");
    }
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
