//! `containers`: the state machine through the API, lock and unlock.

use std::collections::HashSet;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{str_of, Reply, TestApi, SYSTEM_TOKEN};

const STATES: [&str; 5] = ["Queued", "Locked", "Running", "Complete", "Cancelled"];

const ALLOWED: [(&str, &str); 8] = [
    ("Queued", "Locked"),
    ("Queued", "Cancelled"),
    ("Locked", "Queued"),
    ("Locked", "Running"),
    ("Locked", "Cancelled"),
    ("Running", "Complete"),
    ("Running", "Cancelled"),
    ("Complete", "Cancelled"),
];

/// Creates a container and brings it to `state` through the API.
async fn container_in(api: &TestApi, owner: &str, state: &str) -> String {
    let (_, container) = api.committed(owner).await;
    let uuid = str_of(&container, "uuid").to_string();
    let steps: &[Value] = match state {
        "Queued" => &[],
        "Locked" => &[json!("lock")],
        "Running" => &[json!("lock"), json!({"state": "Running"})],
        "Complete" => &[
            json!("lock"),
            json!({"state": "Running"}),
            json!({"state": "Complete", "exit_code": 0}),
        ],
        "Cancelled" => &[json!({"state": "Cancelled"})],
        other => panic!("no such state {other}"),
    };
    for step in steps {
        if step == "lock" {
            api.lock(&uuid).await;
        } else {
            api.update_container(&uuid, SYSTEM_TOKEN, step.clone())
                .await
                .expect(StatusCode::OK);
        }
    }
    let stored = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(stored["state"], state);
    uuid
}

/// Asks for `to` the way a client would: lock and unlock through their
/// endpoints, everything else through an update.
async fn change_state(api: &TestApi, uuid: &str, from: &str, to: &str) -> Reply {
    let path = format!("containers/{uuid}");
    match (from, to) {
        (_, "Locked") => {
            api.call(
                Method::POST,
                &format!("{path}/lock"),
                Some(SYSTEM_TOKEN),
                None,
            )
            .await
        }
        ("Locked", "Queued") => {
            api.call(
                Method::POST,
                &format!("{path}/unlock"),
                Some(SYSTEM_TOKEN),
                None,
            )
            .await
        }
        (_, "Complete") => {
            api.update_container(uuid, SYSTEM_TOKEN, json!({"state": to, "exit_code": 0}))
                .await
        }
        _ => {
            api.update_container(uuid, SYSTEM_TOKEN, json!({"state": to}))
                .await
        }
    }
}

/// Every pair of container states through the API: the allowed changes
/// succeed; the others are 422 naming both states and change nothing.
#[tokio::test]
async fn container_transitions_follow_state_machine() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for from in STATES {
        for to in STATES {
            if from == to {
                continue;
            }
            let uuid = container_in(&api, &alice, from).await;
            let reply = change_state(&api, &uuid, from, to).await;
            let after = api
                .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
                .await
                .json();
            if ALLOWED.contains(&(from, to)) {
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "{from} -> {to}: {:?}",
                    reply.body
                );
                assert_eq!(after["state"], to, "{from} -> {to}");
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
                assert_eq!(after["state"], from, "{from} -> {to} changed the state");
            }
        }
    }
}

#[tokio::test]
async fn state_changes_set_timestamps_and_finalize_requests() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    // One attempt only: the cancel below ends the request.
    let (request, container) = api
        .committed_with(&alice, json!({"container_count_max": 1}))
        .await;
    let uuid = str_of(&container, "uuid");
    assert!(container["started_at"].is_null());
    api.lock(uuid).await;
    let running = api
        .update_container(uuid, SYSTEM_TOKEN, json!({"state": "Running"}))
        .await
        .json();
    assert!(running["started_at"].is_string());
    assert!(running["finished_at"].is_null());
    let cancelled = api
        .update_container(uuid, SYSTEM_TOKEN, json!({"state": "Cancelled"}))
        .await
        .json();
    assert!(cancelled["finished_at"].is_string());
    let request = api
        .get(
            &format!("container_requests/{}", str_of(&request, "uuid")),
            &alice,
        )
        .await
        .json();
    assert_eq!(request["state"], "Final");
}

#[tokio::test]
async fn complete_needs_exit_code() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let uuid = container_in(&api, &alice, "Running").await;
    let reply = api
        .update_container(&uuid, SYSTEM_TOKEN, json!({"state": "Complete"}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("exit_code"), "{}", reply.errors());
}

#[tokio::test]
async fn exit_code_before_running_is_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let reply = api
        .update_container(uuid, SYSTEM_TOKEN, json!({"exit_code": 0}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let errors = reply.errors();
    assert!(errors.contains("exit_code"), "{errors}");
    assert!(errors.contains("state Queued"), "{errors}");

    let token = api.lock(uuid).await;
    for attributes in [
        json!({"exit_code": 0}),
        json!({"state": "Running", "exit_code": 0}),
        json!({"state": "Cancelled", "exit_code": 1}),
    ] {
        let reply = api.update_container(uuid, &token, attributes.clone()).await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        let errors = reply.errors();
        assert!(errors.contains("exit_code"), "{attributes}: {errors}");
        assert!(errors.contains("state Locked"), "{attributes}: {errors}");
    }
    let stored = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(stored["state"], "Locked");
    assert!(stored["exit_code"].is_null());

    // An unchanged null is no change and passes.
    api.update_container(uuid, &token, json!({"exit_code": null}))
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn exit_code_is_set_while_running_or_at_the_end() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let reply = api
        .update_container(uuid, &token, json!({"exit_code": 2}))
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["exit_code"], 2);
    let reply = api
        .update_container(uuid, &token, json!({"state": "Complete", "exit_code": 3}))
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["state"], "Complete");
    assert_eq!(reply.json()["exit_code"], 3);

    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let reply = api
        .update_container(
            uuid,
            &token,
            json!({"state": "Cancelled", "exit_code": 143}),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["exit_code"], 143);
}

#[tokio::test]
async fn final_container_fields_are_frozen() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let uuid = container_in(&api, &alice, "Complete").await;
    let reply = api
        .update_container(&uuid, SYSTEM_TOKEN, json!({"exit_code": 9}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("exit_code"), "{}", reply.errors());
    let reply = api
        .update_container(&uuid, SYSTEM_TOKEN, json!({"command": ["other"]}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("command"), "{}", reply.errors());
}

#[tokio::test]
async fn wrong_type_in_container_update_names_field() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let uuid = container_in(&api, &alice, "Running").await;
    let before = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    for (attributes, field) in [
        (json!({"exit_code": "zero"}), "exit_code"),
        (json!({"progress": "half"}), "progress"),
        (
            json!({"runtime_status": {"error": 5}}),
            "runtime_status.error",
        ),
        (json!({"priority": -1}), "priority"),
        (json!({"bogus": 1}), "bogus"),
    ] {
        let reply = api.update_container(&uuid, SYSTEM_TOKEN, attributes).await;
        reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(reply.errors().contains(field), "{}", reply.errors());
    }
    let after = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(before, after);
}

#[tokio::test]
async fn lock_returns_credentials_once() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/lock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    reply.expect(StatusCode::OK);
    let locked = reply.json();
    assert_eq!(locked["state"], "Locked");
    assert_eq!(locked["lock_count"], 1);
    assert_eq!(locked["locked_by_uuid"], "zzzzz-gj3su-000000000000000");
    let auth_uuid = str_of(&locked, "auth_uuid");
    let token = str_of(&locked["credentials"], "api_token");
    assert_eq!(
        token,
        format!("v2/{auth_uuid}/{}/{uuid}", token.split('/').nth(2).unwrap())
    );
    assert!(!str_of(&locked["credentials"], "gateway_secret").is_empty());

    let again = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert!(again.get("credentials").is_none());
    let me = api
        .get("api_client_authorizations/current", token)
        .await
        .json();
    assert_eq!(me["uuid"], auth_uuid);
    assert_eq!(me["container_uuid"], uuid);
}

#[tokio::test]
async fn second_lock_is_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    api.lock(uuid).await;
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/lock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("from Locked to Locked"),
        "{}",
        reply.errors()
    );
    let after = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(after["lock_count"], 1);
}

#[tokio::test]
async fn concurrent_locks_succeed_exactly_once() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let attempts = 8;
    let mut tasks = Vec::new();
    for _ in 0..attempts {
        let router = api.app.clone();
        let uuid = uuid.clone();
        tasks.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let request = TestApi::request(
                Method::POST,
                &format!("containers/{uuid}/lock"),
                Some(SYSTEM_TOKEN),
            )
            .body(axum::body::Body::empty())
            .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let token = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|body| {
                    body["credentials"]["api_token"]
                        .as_str()
                        .map(str::to_string)
                });
            (status, token)
        }));
    }
    let mut successes = 0;
    let mut tokens = HashSet::new();
    for task in tasks {
        let (status, token) = task.await.unwrap();
        match status {
            StatusCode::OK => {
                successes += 1;
                tokens.insert(token.unwrap());
            }
            StatusCode::UNPROCESSABLE_ENTITY => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(successes, 1);
    assert_eq!(tokens.len(), 1);
    let after = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(after["lock_count"], 1);
    assert_eq!(after["state"], "Locked");
    // The one token minted is the one that works.
    let token = tokens.into_iter().next().unwrap();
    api.get("containers/current", &token)
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn unlock_requeues_and_revokes_token() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(
        uuid,
        SYSTEM_TOKEN,
        json!({"runtime_status": {"activity": "submitting"}, "scheduler_job_id": "42"}),
    )
    .await
    .expect(StatusCode::OK);
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/unlock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    reply.expect(StatusCode::OK);
    let unlocked = reply.json();
    assert_eq!(unlocked["state"], "Queued");
    assert!(unlocked["auth_uuid"].is_null());
    assert!(unlocked["locked_by_uuid"].is_null());
    assert!(unlocked["scheduler_job_id"].is_null());
    assert_eq!(unlocked["runtime_status"], json!({}));
    assert_eq!(unlocked["lock_count"], 1);
    api.get("containers/current", &token)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    // It can be locked again, with a new token.
    let second = api.lock(uuid).await;
    assert_ne!(second, token);
    let relocked = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(relocked["lock_count"], 2);
}

#[tokio::test]
async fn unlock_at_max_dispatch_attempts_cancels() {
    let api = TestApi::with_config(|config| config.max_dispatch_attempts = 2).await;
    let alice = api.user("alice", false).await;
    let (request, container) = api
        .committed_with(&alice, json!({"container_count_max": 1}))
        .await;
    let uuid = str_of(&container, "uuid");
    let unlock = format!("containers/{uuid}/unlock");
    api.lock(uuid).await;
    let first = api
        .call(Method::POST, &unlock, Some(SYSTEM_TOKEN), None)
        .await;
    assert_eq!(first.json()["state"], "Queued");
    api.lock(uuid).await;
    let second = api
        .call(Method::POST, &unlock, Some(SYSTEM_TOKEN), None)
        .await;
    second.expect(StatusCode::OK);
    let cancelled = second.json();
    assert_eq!(cancelled["state"], "Cancelled");
    let error = str_of(&cancelled["runtime_status"], "error");
    assert!(error.contains("2 dispatch attempts"), "{error}");
    assert!(cancelled["finished_at"].is_string());
    let request = api
        .get(
            &format!("container_requests/{}", str_of(&request, "uuid")),
            &alice,
        )
        .await
        .json();
    assert_eq!(request["state"], "Final");
}

#[tokio::test]
async fn unlock_of_running_container_is_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let uuid = container_in(&api, &alice, "Running").await;
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/unlock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("from Running to Queued"),
        "{}",
        reply.errors()
    );
}

#[tokio::test]
async fn container_token_runs_its_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    let reply = api
        .update_container(
            uuid,
            &token,
            json!({"state": "Running", "gateway_address": "127.0.0.1:2222", "runtime_status": {"activity": "running"}}),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["gateway_address"], "127.0.0.1:2222");
    // PATCH updates as PUT does, with a bare body.
    let reply = api
        .call(
            Method::PATCH,
            &format!("containers/{uuid}"),
            Some(&token),
            Some(json!({
                "progress": 0.5,
                "output": "d41d8cd98f00b204e9800998ecf8427e+0",
                "log": "d41d8cd98f00b204e9800998ecf8427e+0",
            })),
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["progress"], 0.5);
    assert_eq!(reply.json()["output"], "d41d8cd98f00b204e9800998ecf8427e+0");
    // The token may not take the container back to Locked or Queued.
    let reply = api
        .update_container(uuid, &token, json!({"state": "Locked"}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    let reply = api
        .update_container(uuid, &token, json!({"state": "Cancelled"}))
        .await;
    reply.expect(StatusCode::OK);
}

#[tokio::test]
async fn list_of_containers_filters_by_state() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    container_in(&api, &alice, "Queued").await;
    let locked = container_in(&api, &alice, "Locked").await;
    let list = api
        .get(
            r#"containers?filters=[["state","in",["Locked","Running"]]]"#,
            SYSTEM_TOKEN,
        )
        .await;
    list.expect(StatusCode::OK);
    let list = list.json();
    assert_eq!(list["kind"], "arvados#containerList");
    assert_eq!(list["items_available"], 1);
    assert_eq!(list["items"][0]["uuid"], locked.as_str());
    let queued = api
        .get(
            r#"containers?filters=[["state","=","Queued"],["priority",">",0]]&order=["priority desc"]"#,
            SYSTEM_TOKEN,
        )
        .await
        .json();
    assert_eq!(queued["items_available"], 1);
    let mine = api
        .get(
            r#"containers?filters=[["locked_by_uuid","=","zzzzz-gj3su-000000000000000"]]"#,
            SYSTEM_TOKEN,
        )
        .await
        .json();
    assert_eq!(mine["items_available"], 1);
    let unlocked = api
        .get(
            r#"containers?filters=[["locked_by_uuid","=",null]]"#,
            SYSTEM_TOKEN,
        )
        .await
        .json();
    assert_eq!(unlocked["items_available"], 1);
}
