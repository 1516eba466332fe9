//! The API as a client meets it through a real controller process:
//! authentication, ownership, and rejection of invalid requests with
//! nothing stored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{skip, test_image, TestCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn valid_body() -> Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": test_image(),
        "command": ["true"],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    })
}

async fn post_request(
    cluster: &TestCluster,
    token: Option<&str>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/arvados/v1/container_requests", cluster.api_url))
        .json(&json!({ "container_request": body }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST container_requests");
    let status = response.status();
    let value = response.json().await.unwrap_or(Value::Null);
    (status, value)
}

fn error_text(value: &Value) -> String {
    value["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_name_the_field_and_store_nothing() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("frank");

    let mut negative_ram = valid_body();
    negative_ram["runtime_constraints"]["ram"] = json!(-1);
    let mut no_image = valid_body();
    no_image
        .as_object_mut()
        .expect("object")
        .remove("container_image");
    let mut empty_command = valid_body();
    empty_command["command"] = json!([]);
    let mut wrong_type = valid_body();
    wrong_type["priority"] = json!("high");
    let mut wrong_nested_type = valid_body();
    wrong_nested_type["runtime_constraints"]["vcpus"] = json!("two");

    let cases = [
        ("negative RAM", negative_ram, "runtime_constraints.ram"),
        ("no image", no_image, "container_image"),
        ("empty command", empty_command, "command"),
        ("wrong type", wrong_type, "priority"),
        ("wrong nested type", wrong_nested_type, "vcpus"),
    ];
    for (case, body, field) in cases {
        let (status, value) = post_request(&cluster, Some(&token), &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{case}: {value}");
        let message = error_text(&value);
        assert!(
            message.contains(field),
            "{case}: message {message:?} does not name {field}"
        );
    }

    let frank = common::client(&cluster.api_url, &token);
    let requests = frank
        .list_container_requests(&Default::default())
        .await
        .expect("list requests");
    assert!(requests.items.is_empty(), "rejected requests were stored");
    let containers = cluster
        .system_client()
        .list_containers(&Default::default())
        .await
        .expect("list containers");
    assert!(
        containers.items.is_empty(),
        "rejected requests made containers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_token_and_other_owner() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let alice = cluster.create_user("alice");
    let mallory = cluster.create_user("mallory");

    let (status, value) = post_request(&cluster, None, &valid_body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{value}");
    let (status, _) = post_request(&cluster, Some("v2/not-a-token"), &valid_body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let mut uncommitted = valid_body();
    uncommitted["state"] = json!("Uncommitted");
    let (status, created) = post_request(&cluster, Some(&alice), &uncommitted).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let uuid = created["uuid"].as_str().expect("uuid").to_string();

    let response = reqwest::Client::new()
        .get(format!(
            "{}/arvados/v1/container_requests/{uuid}",
            cluster.api_url
        ))
        .bearer_auth(&mallory)
        .send()
        .await
        .expect("GET request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = reqwest::Client::new()
        .put(format!(
            "{}/arvados/v1/container_requests/{uuid}",
            cluster.api_url
        ))
        .bearer_auth(&mallory)
        .json(&json!({"container_request": {"priority": 0}}))
        .send()
        .await
        .expect("PUT request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let listed = common::client(&cluster.api_url, &mallory)
        .list_container_requests(&Default::default())
        .await
        .expect("list requests");
    assert!(listed.items.is_empty(), "mallory sees alice's request");
    let listed = common::client(&cluster.api_url, &alice)
        .list_container_requests(&Default::default())
        .await
        .expect("list requests");
    assert_eq!(listed.items.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn forbidden_transition_names_both_states() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("gina");
    let mut uncommitted = valid_body();
    uncommitted["state"] = json!("Uncommitted");
    let (status, created) = post_request(&cluster, Some(&token), &uncommitted).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let uuid = created["uuid"].as_str().expect("uuid");

    let response = reqwest::Client::new()
        .put(format!(
            "{}/arvados/v1/container_requests/{uuid}",
            cluster.api_url
        ))
        .bearer_auth(&token)
        .json(&json!({"container_request": {"state": "Final"}}))
        .send()
        .await
        .expect("PUT request");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let message = error_text(&response.json().await.expect("JSON error"));
    assert!(message.contains("Uncommitted"), "{message}");
    assert!(message.contains("Final"), "{message}");
}
