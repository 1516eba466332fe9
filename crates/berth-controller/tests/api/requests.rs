//! `container_requests`: create, read, list, update and their rules.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{runnable, str_of, Reply, TestApi, SYSTEM_TOKEN};

#[tokio::test]
async fn create_fills_arvados_defaults() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api.create_request(&alice, json!({"name": "draft"})).await;
    reply.expect(StatusCode::OK);
    let request = reply.json();
    assert_eq!(request["kind"], "arvados#containerRequest");
    assert!(request["etag"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(str_of(&request, "uuid").starts_with("zzzzz-xvhdp-"));
    assert_eq!(request["state"], "Uncommitted");
    assert_eq!(request["cwd"], ".");
    assert_eq!(request["use_existing"], true);
    assert_eq!(request["container_count_max"], 3);
    assert_eq!(request["container_count"], 0);
    assert_eq!(request["output_storage_classes"], json!(["default"]));
    assert_eq!(request["priority"], 0);
    assert!(request["container_uuid"].is_null());
    let user = api.get("users/current", &alice).await.json();
    assert_eq!(request["owner_uuid"], user["uuid"]);
    assert_eq!(request["modified_by_user_uuid"], user["uuid"]);
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn bare_body_is_accepted() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api
        .call(
            Method::POST,
            "container_requests",
            Some(&alice),
            Some(runnable()),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["state"], "Committed");
    assert_eq!(reply.json()["name"], "test");
}

#[tokio::test]
async fn get_returns_record_and_select_cuts_it() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, _) = api.committed(&alice).await;
    let uuid = str_of(&request, "uuid");
    let reply = api.get(&format!("container_requests/{uuid}"), &alice).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json(), request);

    let select = r#"select=["uuid","state"]"#;
    let reply = api
        .get(&format!("container_requests/{uuid}?{select}"), &alice)
        .await;
    reply.expect(StatusCode::OK);
    let mut keys: Vec<String> = reply.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["etag", "kind", "state", "uuid"]);
    let reply = api
        .get(
            &format!(r#"container_requests/{uuid}?select=["nope"]"#),
            &alice,
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("nope"));
}

#[tokio::test]
async fn unknown_request_is_404() {
    let api = TestApi::new().await;
    let reply = api
        .get(
            "container_requests/zzzzz-xvhdp-aaaaaaaaaaaaaaa",
            SYSTEM_TOKEN,
        )
        .await;
    reply.expect(StatusCode::NOT_FOUND);
    assert!(reply.errors().contains("zzzzz-xvhdp-aaaaaaaaaaaaaaa"));
}

/// Each invalid request is rejected with 422 naming the field, and nothing
/// is stored.
#[tokio::test]
async fn invalid_requests_name_field_and_store_nothing() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let with = |change: Value| {
        let mut attributes = runnable();
        for (key, value) in change.as_object().unwrap() {
            attributes[key] = value.clone();
        }
        attributes
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "negative ram",
            with(json!({"runtime_constraints": {"ram": -1, "vcpus": 1}})),
            "runtime_constraints.ram",
        ),
        (
            "no image",
            with(json!({"container_image": null})),
            "container_image",
        ),
        (
            "empty image",
            with(json!({"container_image": ""})),
            "container_image",
        ),
        ("empty command", with(json!({"command": []})), "command"),
        (
            "priority as text",
            with(json!({"priority": "high"})),
            "priority",
        ),
        (
            "ram as text",
            with(json!({"runtime_constraints": {"ram": "x", "vcpus": 1}})),
            "runtime_constraints.ram",
        ),
        (
            "command as text",
            with(json!({"command": "echo hi"})),
            "command",
        ),
        (
            "unknown attribute",
            with(json!({"colour": "blue"})),
            "colour",
        ),
        (
            "unknown constraint",
            with(json!({"runtime_constraints": {"rams": 1}})),
            "rams",
        ),
        ("unknown state", with(json!({"state": "Running"})), "state"),
        (
            "uuid set",
            with(json!({"uuid": "zzzzz-xvhdp-aaaaaaaaaaaaaaa"})),
            "uuid",
        ),
        (
            "container_uuid set",
            with(json!({"container_uuid": "zzzzz-dz642-aaaaaaaaaaaaaaa"})),
            "container_uuid",
        ),
        (
            "container_count set",
            with(json!({"container_count": 2})),
            "container_count",
        ),
        ("created Final", with(json!({"state": "Final"})), "Final"),
        (
            "priority too high",
            with(json!({"priority": 1001})),
            "priority",
        ),
        (
            "other owner",
            with(json!({"owner_uuid": "zzzzz-tpzed-aaaaaaaaaaaaaaa"})),
            "owner_uuid",
        ),
        (
            "output path not a mount",
            with(json!({"output_path": "/elsewhere"})),
            "output_path",
        ),
    ];
    for (case, attributes, field) in cases {
        let reply = api.create_request(&alice, attributes).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{case}: {:?}",
            reply.body
        );
        let errors = reply.errors();
        assert!(
            errors.contains(field),
            "{case}: {errors:?} does not name {field}"
        );
    }
    assert_eq!(api.request_count().await, 0);
    assert_eq!(api.container_count().await, 0);
    let listed = api.get("container_requests", &alice).await.json();
    assert_eq!(listed["items"], json!([]));
}

#[tokio::test]
async fn invalid_json_body_is_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let request = TestApi::request(Method::POST, "container_requests", Some(&alice))
        .header("content-type", "application/json")
        .body(Body::from("{\"container_request\": "))
        .unwrap();
    let reply = api.send(request).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("invalid JSON body"),
        "{}",
        reply.errors()
    );
    assert_eq!(api.request_count().await, 0);
}

#[tokio::test]
async fn commit_creates_queued_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    assert_eq!(request["state"], "Committed");
    assert_eq!(request["container_count"], 1);
    assert_eq!(container["uuid"], request["container_uuid"]);
    assert_eq!(container["state"], "Queued");
    assert!(container["priority"].as_i64().unwrap() > 0);
    assert_eq!(container["command"], json!(["echo", "hello"]));
    assert_eq!(container["container_image"], "localhost/busybox:latest");
    assert_eq!(container["runtime_constraints"]["ram"], 67108864);
    assert_eq!(container["owner_uuid"], "zzzzz-tpzed-000000000000000");
    assert_eq!(container["runtime_user_uuid"], request["owner_uuid"]);
    assert_eq!(container["lock_count"], 0);
}

#[tokio::test]
async fn uncommitted_request_commits_by_update() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let mut draft = runnable();
    draft["state"] = json!("Uncommitted");
    let created = api.create_request(&alice, draft).await.json();
    let uuid = str_of(&created, "uuid");
    assert_eq!(api.container_count().await, 0);
    let reply = api
        .call(
            Method::PATCH,
            &format!("container_requests/{uuid}"),
            Some(&alice),
            Some(json!({"container_request": {"state": "Committed"}})),
        )
        .await;
    reply.expect(StatusCode::OK);
    let committed = reply.json();
    assert_eq!(committed["state"], "Committed");
    assert!(committed["container_uuid"].is_string());
    assert_ne!(committed["etag"], created["etag"]);
    assert_eq!(api.container_count().await, 1);
}

#[tokio::test]
async fn incomplete_draft_commit_is_rejected() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let created = api
        .create_request(&alice, json!({"name": "draft"}))
        .await
        .json();
    let uuid = str_of(&created, "uuid");
    let reply = api
        .call(
            Method::PUT,
            &format!("container_requests/{uuid}"),
            Some(&alice),
            Some(json!({"state": "Committed"})),
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    for field in [
        "container_image",
        "command",
        "runtime_constraints.ram",
        "output_path",
    ] {
        assert!(errors.contains(field), "{errors:?} does not name {field}");
    }
    let after = api
        .get(&format!("container_requests/{uuid}"), &alice)
        .await
        .json();
    assert_eq!(after, created);
    assert_eq!(api.container_count().await, 0);
}

/// Every pair of request states through the API.
#[tokio::test]
async fn request_transitions_follow_state_machine() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let states = ["Uncommitted", "Committed", "Final"];
    let allowed = [("Uncommitted", "Committed"), ("Committed", "Final")];
    for from in states {
        for to in states {
            if from == to {
                continue;
            }
            let mut attributes = runnable();
            attributes["state"] = json!(if from == "Final" { "Committed" } else { from });
            let created = api.create_request(&alice, attributes).await.json();
            let uuid = str_of(&created, "uuid").to_string();
            let path = format!("container_requests/{uuid}");
            if from == "Final" {
                api.call(
                    Method::PUT,
                    &path,
                    Some(&alice),
                    Some(json!({"state": "Final"})),
                )
                .await
                .expect(StatusCode::OK);
            }
            let reply = api
                .call(Method::PUT, &path, Some(&alice), Some(json!({"state": to})))
                .await;
            if allowed.contains(&(from, to)) {
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "{from} -> {to}: {:?}",
                    reply.body
                );
                assert_eq!(reply.json()["state"], to, "{from} -> {to}");
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "{from} -> {to}: {:?}",
                    reply.body
                );
                let errors = reply.errors();
                assert!(
                    errors.contains(&format!("from {from} to {to}")),
                    "{from} -> {to}: {errors}"
                );
                let after = api.get(&path, &alice).await.json();
                assert_eq!(after["state"], from, "{from} -> {to} changed the state");
            }
        }
    }
}

#[tokio::test]
async fn committed_request_keeps_its_specification() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, _) = api.committed(&alice).await;
    let path = format!("container_requests/{}", str_of(&request, "uuid"));
    let reply = api
        .call(
            Method::PUT,
            &path,
            Some(&alice),
            Some(json!({"command": ["rm", "-rf", "/"]})),
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("cannot change command"),
        "{}",
        reply.errors()
    );
    // Name and priority may change.
    let reply = api
        .call(
            Method::PUT,
            &path,
            Some(&alice),
            Some(json!({"name": "renamed", "priority": 5})),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["name"], "renamed");
    // Sending back the whole record unchanged is no change.
    let record = reply.json();
    let again = api
        .call(Method::PUT, &path, Some(&alice), Some(record.clone()))
        .await;
    again.expect(StatusCode::OK);
    assert_eq!(again.json()["etag"], record["etag"]);
}

#[tokio::test]
async fn priority_change_recomputes_container_priority() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    let path = format!("container_requests/{}", str_of(&request, "uuid"));
    let container_path = format!("containers/{}", str_of(&container, "uuid"));
    let first = container["priority"].as_i64().unwrap();

    api.call(
        Method::PUT,
        &path,
        Some(&alice),
        Some(json!({"priority": 500})),
    )
    .await
    .expect(StatusCode::OK);
    let raised = api.get(&container_path, &alice).await.json();
    assert!(raised["priority"].as_i64().unwrap() > first);
    assert_ne!(raised["etag"], container["etag"]);

    // Priority 0 puts the container on hold: still Queued, priority 0.
    api.call(
        Method::PUT,
        &path,
        Some(&alice),
        Some(json!({"priority": 0})),
    )
    .await
    .expect(StatusCode::OK);
    let held = api.get(&container_path, &alice).await.json();
    assert_eq!(held["priority"], 0);
    assert_eq!(held["state"], "Queued");
    let lock = api
        .call(
            Method::POST,
            &format!("{container_path}/lock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    lock.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(lock.errors().contains("priority is 0"), "{}", lock.errors());
    let request = api.get(&path, &alice).await.json();
    assert_eq!(request["state"], "Committed");
}

#[tokio::test]
async fn cancel_by_final_drops_container_priority() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    let path = format!("container_requests/{}", str_of(&request, "uuid"));
    let reply = api
        .call(
            Method::PUT,
            &path,
            Some(&alice),
            Some(json!({"state": "Final"})),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["state"], "Final");
    let container = api
        .get(
            &format!("containers/{}", str_of(&container, "uuid")),
            &alice,
        )
        .await
        .json();
    assert_eq!(container["priority"], 0);
}

#[tokio::test]
async fn final_follows_container_end_with_exit_code() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    let request_uuid = str_of(&request, "uuid");
    let uuid = str_of(&container, "uuid");
    let status = api
        .get(
            &format!("container_requests/{request_uuid}/container_status"),
            &alice,
        )
        .await;
    status.expect(StatusCode::OK);
    assert_eq!(status.json()["container_state"], "Queued");
    assert_eq!(status.json()["uuid"], uuid);

    let token = api.lock(uuid).await;
    let running = api
        .update_container(uuid, &token, json!({"state": "Running"}))
        .await;
    running.expect(StatusCode::OK);
    assert!(running.json()["started_at"].is_string());
    let complete = api
        .update_container(uuid, &token, json!({"state": "Complete", "exit_code": 3}))
        .await;
    complete.expect(StatusCode::OK);
    let complete = complete.json();
    assert_eq!(complete["exit_code"], 3);
    assert!(complete["finished_at"].is_string());
    assert_eq!(complete["priority"], 0);

    let request = api
        .get(&format!("container_requests/{request_uuid}"), &alice)
        .await
        .json();
    assert_eq!(request["state"], "Final");
    let status = api
        .get(
            &format!("container_requests/{request_uuid}/container_status"),
            &alice,
        )
        .await
        .json();
    assert_eq!(status["uuid"], uuid);
    assert_eq!(status["state"], "Complete");
    assert_eq!(status["container_state"], "Complete");
    assert_eq!(status["exit_code"], 3);
    assert_eq!(status["scheduling_status"], "");
}

#[tokio::test]
async fn container_status_without_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let created = api.create_request(&alice, json!({})).await.json();
    let status = api
        .get(
            &format!(
                "container_requests/{}/container_status",
                str_of(&created, "uuid")
            ),
            &alice,
        )
        .await;
    status.expect(StatusCode::OK);
    assert!(status.json()["uuid"].is_null());
    assert!(status.json()["state"].is_null());
}

#[tokio::test]
async fn list_filters_orders_and_pages() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let mut uuids = Vec::new();
    for index in 0..5 {
        let mut attributes = runnable();
        attributes["name"] = json!(format!("job-{index}"));
        attributes["priority"] = json!(index + 1);
        if index % 2 == 0 {
            attributes["state"] = json!("Uncommitted");
        }
        let reply = api.create_request(&alice, attributes).await;
        reply.expect(StatusCode::OK);
        uuids.push(str_of(&reply.json(), "uuid").to_string());
    }

    let list = api
        .get(
            r#"container_requests?filters=[["state","=","Committed"]]"#,
            &alice,
        )
        .await;
    list.expect(StatusCode::OK);
    let list = list.json();
    assert_eq!(list["kind"], "arvados#containerRequestList");
    assert_eq!(list["items_available"], 2);
    for item in list["items"].as_array().unwrap() {
        assert_eq!(item["state"], "Committed");
        assert_eq!(item["kind"], "arvados#containerRequest");
    }

    let ordered = api
        .get(
            r#"container_requests?order=["priority asc"]&limit=2&offset=1"#,
            &alice,
        )
        .await
        .json();
    let names: Vec<&str> = ordered["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["job-1", "job-2"]);
    assert_eq!(ordered["limit"], 2);
    assert_eq!(ordered["offset"], 1);
    assert_eq!(ordered["items_available"], 5);

    let uncounted = api
        .get("container_requests?count=none", &alice)
        .await
        .json();
    assert!(uncounted.get("items_available").is_none());
    assert_eq!(uncounted["items"].as_array().unwrap().len(), 5);

    let selected = format!(
        r#"container_requests?filters=[["uuid","in",["{}","{}"]],["priority",">=",2]]"#,
        uuids[0], uuids[1]
    );
    let selected = api.get(&selected, &alice).await.json();
    assert_eq!(selected["items_available"], 1);
    assert_eq!(selected["items"][0]["uuid"], uuids[1].as_str());

    let like = api
        .get(
            r#"container_requests?filters=[["name","like","job-%"],["name","!=","job-0"]]"#,
            &alice,
        )
        .await
        .json();
    assert_eq!(like["items_available"], 4);

    // Keyset paging as the Python SDK does it.
    let first = api
        .get(
            r#"container_requests?order=["created_at asc","uuid asc"]&limit=1"#,
            &alice,
        )
        .await
        .json();
    let created_at = str_of(&first["items"][0], "created_at").to_string();
    let uuid = str_of(&first["items"][0], "uuid").to_string();
    let next = format!(
        r#"container_requests?order=["created_at asc","uuid asc"]&filters=[["created_at",">=","{created_at}"],["uuid","!=","{uuid}"]]"#
    );
    assert_eq!(api.get(&next, &alice).await.json()["items_available"], 4);

    for bad in [
        r#"container_requests?filters=[["mounts","=","x"]]"#,
        r#"container_requests?filters=[["bogus","=","x"]]"#,
        r#"container_requests?filters=[["priority","~","x"]]"#,
        r#"container_requests?filters=[["priority","=","high"]]"#,
        r#"container_requests?filters=not-json"#,
        r#"container_requests?order=["nope desc"]"#,
        "container_requests?limit=-1",
    ] {
        let reply = api.get(bad, &alice).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {:?}",
            reply.body
        );
    }
}

#[tokio::test]
async fn post_with_method_override_lists() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, _) = api.committed(&alice).await;
    api.create_request(&alice, json!({"name": "other"}))
        .await
        .expect(StatusCode::OK);
    let form = format!(
        "filters={}&alt=json",
        url_encode(&json!([["uuid", "=", request["uuid"]]]).to_string())
    );
    let post = TestApi::request(Method::POST, "container_requests", Some(&alice))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-http-method-override", "GET")
        .body(Body::from(form))
        .unwrap();
    let reply = api.send(post).await;
    reply.expect(StatusCode::OK);
    let list = reply.json();
    assert_eq!(list["kind"], "arvados#containerRequestList");
    assert_eq!(list["items_available"], 1);
    assert_eq!(list["items"][0]["uuid"], request["uuid"]);
    // Nothing was created by the POST.
    assert_eq!(api.request_count().await, 2);

    let post = TestApi::request(Method::POST, "containers", Some(SYSTEM_TOKEN))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-http-method-override", "GET")
        .body(Body::from("limit=1"))
        .unwrap();
    let reply = api.send(post).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["kind"], "arvados#containerList");
    api.call(
        Method::POST,
        "containers",
        Some(SYSTEM_TOKEN),
        Some(json!({})),
    )
    .await
    .expect(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn form_encoded_create_is_accepted() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let body = format!("container_request={}", url_encode(&runnable().to_string()));
    let post = TestApi::request(Method::POST, "container_requests", Some(&alice))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let reply = api.send(post).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["state"], "Committed");
}

/// Sends a form-encoded body.
async fn send_form(api: &TestApi, method: Method, path: &str, token: &str, body: &str) -> Reply {
    let request = TestApi::request(method, path, Some(token))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_string()))
        .unwrap();
    api.send(request).await
}

#[tokio::test]
async fn form_unknown_key_is_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for body in ["a=b", "name=x&a=b", "alt=json&a=b"] {
        let reply = send_form(&api, Method::POST, "container_requests", &alice, body).await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        let errors = reply.errors();
        assert!(
            errors.contains(r#"unknown attribute "a""#),
            "{body}: {errors}"
        );
    }
    // The same key in JSON gets the same answer.
    let reply = api
        .call(
            Method::POST,
            "container_requests",
            Some(&alice),
            Some(json!({"a": "b"})),
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains(r#"unknown attribute "a""#));
    assert_eq!(api.request_count().await, 0);

    // Inside the wrapper, an unknown attribute is named too.
    let body = format!("container_request={}", url_encode(r#"{"nope": 1}"#));
    let reply = send_form(&api, Method::POST, "container_requests", &alice, &body).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("nope"), "{}", reply.errors());
    assert_eq!(api.request_count().await, 0);
}

#[tokio::test]
async fn form_fields_are_checked_as_json() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let body = format!(
        "name=123&priority=2&command={}&alt=json",
        url_encode(r#"["echo", "hi"]"#)
    );
    let reply = send_form(&api, Method::POST, "container_requests", &alice, &body).await;
    reply.expect(StatusCode::OK);
    let request = reply.json();
    assert_eq!(request["name"], "123");
    assert_eq!(request["priority"], 2);
    assert_eq!(request["command"], json!(["echo", "hi"]));
    assert_eq!(request["state"], "Uncommitted");

    for (body, field) in [
        ("priority=high", "priority"),
        (
            "runtime_constraints=%7B%22ram%22%3A%22x%22%7D",
            "runtime_constraints.ram",
        ),
        ("owner_uuid=zzzzz-tpzed-aaaaaaaaaaaaaaa", "owner_uuid"),
        ("uuid=zzzzz-xvhdp-aaaaaaaaaaaaaaa", "uuid"),
    ] {
        let reply = send_form(&api, Method::POST, "container_requests", &alice, body).await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        let errors = reply.errors();
        assert!(errors.contains(field), "{body}: {errors}");
    }
    assert_eq!(api.request_count().await, 1);
}

#[tokio::test]
async fn form_update_uses_wrapper_or_fields() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api.create_request(&alice, json!({"name": "draft"})).await;
    reply.expect(StatusCode::OK);
    let path = format!("container_requests/{}", str_of(&reply.json(), "uuid"));

    let body = format!("container_request={}", url_encode(r#"{"name": "renamed"}"#));
    let reply = send_form(&api, Method::PUT, &path, &alice, &body).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["name"], "renamed");

    let reply = send_form(&api, Method::PATCH, &path, &alice, "description=more").await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["description"], "more");
    assert_eq!(reply.json()["name"], "renamed");

    let reply = send_form(&api, Method::PUT, &path, &alice, "a=b").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains(r#"unknown attribute "a""#));

    // A container update takes form fields through the same checks.
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let path = format!("containers/{uuid}");
    let reply = send_form(&api, Method::PUT, &path, SYSTEM_TOKEN, "a=b").await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains(r#"unknown attribute "a""#));
    api.lock(uuid).await;
    let reply = send_form(&api, Method::PUT, &path, SYSTEM_TOKEN, "scheduler_job_id=5").await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["scheduler_job_id"], "5");
}

#[tokio::test]
async fn bare_json_body_may_carry_select() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api
        .call(
            Method::POST,
            "container_requests",
            Some(&alice),
            Some(json!({"name": "x", "select": ["uuid", "name"], "ensure_unique_name": true})),
        )
        .await;
    reply.expect(StatusCode::OK);
    let mut keys: Vec<String> = reply.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["etag", "kind", "name", "uuid"]);
}

#[tokio::test]
async fn admin_creates_request_for_existing_user_only() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let admin = api.user("operator", true).await;
    let alice_uuid = api.get("users/current", &alice).await.json()["uuid"].clone();
    let reply = api
        .create_request(&admin, json!({"owner_uuid": alice_uuid}))
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["owner_uuid"], alice_uuid);
    assert_eq!(
        api.get("container_requests", &alice).await.json()["items_available"],
        1
    );
    let reply = api
        .create_request(&admin, json!({"owner_uuid": "zzzzz-tpzed-aaaaaaaaaaaaaaa"}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("owner_uuid"));
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test]
async fn scheduling_status_says_why_container_waits() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    let request_uuid = str_of(&request, "uuid");
    let container_uuid = str_of(&container, "uuid").to_string();
    let status_path = format!("container_requests/{request_uuid}/container_status");

    let status = api.get(&status_path, &alice).await.json();
    assert_eq!(status["scheduling_status"], "Waiting in queue.");

    api.lock(&container_uuid).await;
    let status = api.get(&status_path, &alice).await.json();
    assert_eq!(
        status["scheduling_status"],
        "Submitted to the batch system."
    );

    let reason = "slurm job 69 is pending: Resources";
    api.update_container(
        &container_uuid,
        SYSTEM_TOKEN,
        json!({"runtime_status": {"schedulingStatus": reason}}),
    )
    .await
    .expect(StatusCode::OK);
    let status = api.get(&status_path, &alice).await.json();
    assert_eq!(status["scheduling_status"], reason);
}
