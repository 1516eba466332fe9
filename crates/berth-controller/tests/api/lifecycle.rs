//! Reuse, retries, the priority formula, cancelling by priority 0 and
//! deleting requests, through the API.

use axum::http::{Method, StatusCode};
use berth_core::priority::request_contribution;
use serde_json::{json, Value};

use crate::common::{str_of, TestApi, SYSTEM_TOKEN};

/// Returns the attributes that let a committed request reuse a container.
fn reusable() -> Value {
    json!({"use_existing": true})
}

async fn get_request(api: &TestApi, uuid: &str, token: &str) -> Value {
    let reply = api.get(&format!("container_requests/{uuid}"), token).await;
    reply.expect(StatusCode::OK);
    reply.json()
}

async fn get_container(api: &TestApi, uuid: &str) -> Value {
    let reply = api.get(&format!("containers/{uuid}"), SYSTEM_TOKEN).await;
    reply.expect(StatusCode::OK);
    reply.json()
}

async fn update_request(api: &TestApi, uuid: &str, token: &str, attributes: Value) -> Value {
    let reply = api
        .call(
            Method::PUT,
            &format!("container_requests/{uuid}"),
            Some(token),
            Some(json!({"container_request": attributes})),
        )
        .await;
    reply.expect(StatusCode::OK);
    reply.json()
}

/// Moves a Queued container to Running with the system token.
async fn run(api: &TestApi, uuid: &str) {
    api.lock(uuid).await;
    api.update_container(uuid, SYSTEM_TOKEN, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
}

async fn finish(api: &TestApi, uuid: &str, state: &str, exit_code: Option<i32>) {
    let mut attributes = json!({"state": state});
    if let Some(code) = exit_code {
        attributes["exit_code"] = json!(code);
    }
    api.update_container(uuid, SYSTEM_TOKEN, attributes)
        .await
        .expect(StatusCode::OK);
}

/// Computes the priority a request alone gives its container, from its
/// `priority` and `created_at` as the API returned them.
fn contribution(request: &Value) -> i64 {
    let created = berth_core::time::parse(str_of(request, "created_at")).unwrap();
    request_contribution(request["priority"].as_i64().unwrap(), &created)
}

#[tokio::test]
async fn identical_request_takes_the_running_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (first, container) = api.committed_with(&alice, reusable()).await;
    let uuid = str_of(&container, "uuid");
    run(&api, uuid).await;

    let (second, _) = api.committed_with(&alice, reusable()).await;
    assert_eq!(second["container_uuid"], first["container_uuid"]);
    assert_eq!(second["container_count"], 1);
    assert_eq!(second["state"], "Committed");
    assert_eq!(api.container_count().await, 1);
}

#[tokio::test]
async fn identical_request_after_success_is_final_at_once() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed_with(&alice, reusable()).await;
    let uuid = str_of(&container, "uuid");
    run(&api, uuid).await;
    finish(&api, uuid, "Complete", Some(0)).await;

    let reply = api
        .create_request(&alice, {
            let mut attributes = crate::common::runnable();
            attributes["use_existing"] = json!(true);
            attributes
        })
        .await;
    reply.expect(StatusCode::OK);
    let second = reply.json();
    assert_eq!(second["container_uuid"], uuid);
    assert_eq!(second["state"], "Final");
    assert_eq!(second["container_count"], 1);
    assert_eq!(api.container_count().await, 1);
}

#[tokio::test]
async fn uncommitted_request_reuses_when_it_commits() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (first, _) = api.committed_with(&alice, reusable()).await;
    let mut draft = crate::common::runnable();
    draft["use_existing"] = json!(true);
    draft["state"] = json!("Uncommitted");
    let reply = api.create_request(&alice, draft).await;
    reply.expect(StatusCode::OK);
    let draft = reply.json();
    assert!(draft["container_uuid"].is_null());
    let committed = update_request(
        &api,
        str_of(&draft, "uuid"),
        &alice,
        json!({"state": "Committed"}),
    )
    .await;
    assert_eq!(committed["container_uuid"], first["container_uuid"]);
}

#[tokio::test]
async fn reuse_skips_unfit_containers() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;

    // Complete with exit 1, and Cancelled: neither is reused.
    let (_, failed) = api
        .committed_with(&alice, json!({"use_existing": true, "command": ["false"]}))
        .await;
    run(&api, str_of(&failed, "uuid")).await;
    finish(&api, str_of(&failed, "uuid"), "Complete", Some(1)).await;
    let (again, _) = api
        .committed_with(&alice, json!({"use_existing": true, "command": ["false"]}))
        .await;
    assert_ne!(again["container_uuid"], failed["uuid"]);

    let (_, cancelled) = api
        .committed_with(
            &alice,
            json!({"use_existing": true, "command": ["sleep", "1"], "container_count_max": 1}),
        )
        .await;
    finish(&api, str_of(&cancelled, "uuid"), "Cancelled", None).await;
    let (again, _) = api
        .committed_with(
            &alice,
            json!({"use_existing": true, "command": ["sleep", "1"]}),
        )
        .await;
    assert_ne!(again["container_uuid"], cancelled["uuid"]);

    // Same request by another user, or with reuse off, or with another
    // environment: a container of its own.
    let (mine, _) = api.committed_with(&alice, reusable()).await;
    let (theirs, _) = api.committed_with(&bob, reusable()).await;
    assert_ne!(mine["container_uuid"], theirs["container_uuid"]);
    let (fresh, _) = api.committed_with(&alice, json!({})).await;
    assert_ne!(mine["container_uuid"], fresh["container_uuid"]);
    let (other_env, _) = api
        .committed_with(
            &alice,
            json!({"use_existing": true, "environment": {"X": "1"}}),
        )
        .await;
    assert_ne!(mine["container_uuid"], other_env["container_uuid"]);
}

#[tokio::test]
async fn container_priority_follows_the_formula_over_its_requests() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (low, container) = api
        .committed_with(&alice, json!({"use_existing": true, "priority": 1}))
        .await;
    let uuid = str_of(&container, "uuid");
    assert_eq!(container["priority"], contribution(&low));

    let (high, _) = api
        .committed_with(&alice, json!({"use_existing": true, "priority": 500}))
        .await;
    assert_eq!(high["container_uuid"], uuid);
    let container = get_container(&api, uuid).await;
    assert_eq!(container["priority"], contribution(&high));
    assert!(contribution(&high) > contribution(&low));

    // Cancelling the higher request leaves the lower one's priority.
    update_request(&api, str_of(&high, "uuid"), &alice, json!({"priority": 0})).await;
    assert_eq!(
        get_container(&api, uuid).await["priority"],
        contribution(&low)
    );

    // With no request wanting it, the Queued container is on hold: it
    // stays Queued, with priority 0, and cannot be locked.
    update_request(&api, str_of(&low, "uuid"), &alice, json!({"priority": 0})).await;
    let on_hold = get_container(&api, uuid).await;
    assert_eq!(on_hold["priority"], 0);
    assert_eq!(on_hold["state"], "Queued");
    let status = api
        .get(
            &format!(
                "container_requests/{}/container_status",
                str_of(&low, "uuid")
            ),
            &alice,
        )
        .await
        .json();
    assert!(str_of(&status, "scheduling_status").starts_with("On hold"));
    let lock = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/lock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    lock.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(lock.errors().contains("priority is 0"), "{}", lock.errors());

    // Raising a request's priority takes it off hold.
    update_request(&api, str_of(&low, "uuid"), &alice, json!({"priority": 7})).await;
    let low = get_request(&api, str_of(&low, "uuid"), &alice).await;
    assert_eq!(
        get_container(&api, uuid).await["priority"],
        contribution(&low)
    );
}

#[tokio::test]
async fn cancelled_container_is_retried_until_count_max() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, first) = api
        .committed_with(&alice, json!({"container_count_max": 2}))
        .await;
    let request_uuid = str_of(&request, "uuid");
    let first_uuid = str_of(&first, "uuid");
    run(&api, first_uuid).await;
    api.update_container(
        first_uuid,
        SYSTEM_TOKEN,
        json!({"state": "Cancelled", "runtime_status": {"error": "node failure"}}),
    )
    .await
    .expect(StatusCode::OK);

    let retried = get_request(&api, request_uuid, &alice).await;
    assert_eq!(retried["state"], "Committed");
    assert_eq!(retried["container_count"], 2);
    let second_uuid = str_of(&retried, "container_uuid").to_string();
    assert_ne!(second_uuid, first_uuid);
    let second = get_container(&api, &second_uuid).await;
    assert_eq!(second["state"], "Queued");
    assert_eq!(second["priority"], contribution(&retried));
    assert_eq!(second["command"], first["command"]);
    assert_eq!(second["lock_count"], 0);
    assert_eq!(second["runtime_status"], json!({}));
    // The owner still reads the cancelled attempt.
    api.get(&format!("containers/{first_uuid}"), &alice)
        .await
        .expect(StatusCode::OK);

    // The second attempt is the last one allowed.
    run(&api, &second_uuid).await;
    finish(&api, &second_uuid, "Cancelled", None).await;
    let last = get_request(&api, request_uuid, &alice).await;
    assert_eq!(last["state"], "Final");
    assert_eq!(last["container_uuid"], second_uuid);
    assert_eq!(last["container_count"], 2);
    assert_eq!(api.container_count().await, 2);
}

#[tokio::test]
async fn requests_sharing_a_container_share_its_retry() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (a, container) = api.committed_with(&alice, reusable()).await;
    let (b, _) = api
        .committed_with(&alice, json!({"use_existing": true, "priority": 9}))
        .await;
    let (c, _) = api
        .committed_with(
            &alice,
            json!({"use_existing": true, "container_count_max": 1}),
        )
        .await;
    let uuid = str_of(&container, "uuid");
    assert_eq!(b["container_uuid"], uuid);
    assert_eq!(c["container_uuid"], uuid);
    finish(&api, uuid, "Cancelled", None).await;

    let a = get_request(&api, str_of(&a, "uuid"), &alice).await;
    let b = get_request(&api, str_of(&b, "uuid"), &alice).await;
    let c = get_request(&api, str_of(&c, "uuid"), &alice).await;
    assert_eq!(a["container_uuid"], b["container_uuid"]);
    assert_ne!(a["container_uuid"], uuid);
    assert_eq!(a["state"], "Committed");
    // c allowed one container only.
    assert_eq!(c["state"], "Final");
    assert_eq!(c["container_uuid"], uuid);
    let retry = get_container(&api, str_of(&a, "container_uuid")).await;
    assert_eq!(retry["priority"], contribution(&b));
}

#[tokio::test]
async fn retry_skips_user_cancel_and_complete() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;

    let (request, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    run(&api, uuid).await;
    update_request(
        &api,
        str_of(&request, "uuid"),
        &alice,
        json!({"priority": 0}),
    )
    .await;
    // The dispatcher reads priority 0 and cancels the running container.
    assert_eq!(get_container(&api, uuid).await["priority"], 0);
    finish(&api, uuid, "Cancelled", None).await;
    let request = get_request(&api, str_of(&request, "uuid"), &alice).await;
    assert_eq!(request["state"], "Final");
    assert_eq!(request["container_uuid"], uuid);

    let (request, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    run(&api, uuid).await;
    finish(&api, uuid, "Complete", Some(137)).await;
    let request = get_request(&api, str_of(&request, "uuid"), &alice).await;
    assert_eq!(request["state"], "Final");
    assert_eq!(api.container_count().await, 2);
}

#[tokio::test]
async fn dispatch_attempts_limit_retries() {
    let api = TestApi::with_config(|config| config.max_dispatch_attempts = 1).await;
    let alice = api.user("alice", false).await;
    let (request, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    api.lock(uuid).await;
    let reply = api
        .call(
            Method::POST,
            &format!("containers/{uuid}/unlock"),
            Some(SYSTEM_TOKEN),
            None,
        )
        .await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["state"], "Cancelled");
    let request = get_request(&api, str_of(&request, "uuid"), &alice).await;
    assert_eq!(request["state"], "Committed");
    assert_eq!(request["container_count"], 2);
    assert_ne!(request["container_uuid"], uuid);
}

#[tokio::test]
async fn delete_request_releases_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let bob = api.user("bob", false).await;
    let (request, container) = api.committed(&alice).await;
    let request_uuid = str_of(&request, "uuid");
    let uuid = str_of(&container, "uuid");
    let path = format!("container_requests/{request_uuid}");

    // Another user and a container token cannot delete it.
    api.call(Method::DELETE, &path, Some(&bob), None)
        .await
        .expect(StatusCode::NOT_FOUND);
    let token = api.lock(uuid).await;
    api.call(Method::DELETE, &path, Some(&token), None)
        .await
        .expect(StatusCode::FORBIDDEN);

    let reply = api.call(Method::DELETE, &path, Some(&alice), None).await;
    reply.expect(StatusCode::OK);
    let deleted = reply.json();
    assert_eq!(deleted["uuid"], request_uuid);
    assert_eq!(deleted["priority"], 0);
    assert_eq!(deleted["kind"], "arvados#containerRequest");
    api.get(&path, &alice).await.expect(StatusCode::NOT_FOUND);
    api.call(Method::DELETE, &path, Some(&alice), None)
        .await
        .expect(StatusCode::NOT_FOUND);
    assert_eq!(get_container(&api, uuid).await["priority"], 0);
    assert_eq!(api.request_count().await, 0);
}

#[tokio::test]
async fn identical_requests_committed_at_once_share_a_container() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for _ in 0..5 {
        let creates = (0..4).map(|_| {
            api.committed_with(
                &alice,
                json!({"use_existing": true, "command": ["echo", "at once"]}),
            )
        });
        let results = futures::future::join_all(creates).await;
        let containers: std::collections::BTreeSet<String> = results
            .iter()
            .map(|(request, _)| str_of(request, "container_uuid").to_string())
            .collect();
        assert_eq!(containers.len(), 1, "{containers:?}");
        // Finish it, so that the next round starts afresh with a new one.
        let uuid = containers.into_iter().next().unwrap();
        finish(&api, &uuid, "Cancelled", None).await;
    }
}

#[tokio::test]
async fn concurrent_request_changes_keep_the_priority_formula() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for round in 0..10 {
        let command = json!(["echo", round.to_string()]);
        let (a, container) = api
            .committed_with(&alice, json!({"use_existing": true, "command": command}))
            .await;
        let (b, _) = api
            .committed_with(
                &alice,
                json!({"use_existing": true, "command": command, "priority": 7}),
            )
            .await;
        let uuid = str_of(&container, "uuid");
        assert_eq!(b["container_uuid"], uuid);

        let path_a = format!("container_requests/{}", str_of(&a, "uuid"));
        let path_b = format!("container_requests/{}", str_of(&b, "uuid"));
        // Both cancel at once: nothing wants the container any more.
        let (first, second) = tokio::join!(
            api.call(
                Method::PUT,
                &path_a,
                Some(&alice),
                Some(json!({"priority": 0}))
            ),
            api.call(
                Method::PUT,
                &path_b,
                Some(&alice),
                Some(json!({"priority": 0}))
            ),
        );
        first.expect(StatusCode::OK);
        second.expect(StatusCode::OK);
        assert_eq!(
            get_container(&api, uuid).await["priority"],
            0,
            "round {round}"
        );

        // One raises its priority while the system cancels the container
        // and an identical request commits: no call fails with a 5xx, and
        // the survivors' container has the formula's priority.
        let (raise, cancel, third) = tokio::join!(
            api.call(
                Method::PUT,
                &path_a,
                Some(&alice),
                Some(json!({"priority": 3}))
            ),
            api.update_container(uuid, SYSTEM_TOKEN, json!({"state": "Cancelled"})),
            api.create_request(&alice, {
                let mut attributes = crate::common::runnable();
                attributes["use_existing"] = json!(true);
                attributes["command"] = command.clone();
                attributes
            }),
        );
        cancel.expect(StatusCode::OK);
        third.expect(StatusCode::OK);
        // The raise loses the race when the cancel made the request Final
        // first; then it is a 422 that names the state.
        if raise.status != StatusCode::OK {
            raise.expect(StatusCode::UNPROCESSABLE_ENTITY);
            assert!(raise.errors().contains("Final"), "{}", raise.errors());
        }
        let third = third.json();
        let third_container = get_container(&api, str_of(&third, "container_uuid")).await;
        if third_container["state"] != "Cancelled" {
            let mut expected = vec![contribution(&third)];
            let a = get_request(&api, str_of(&a, "uuid"), &alice).await;
            if a["container_uuid"] == third["container_uuid"] && a["state"] == "Committed" {
                expected.push(contribution(&a));
            }
            assert_eq!(
                third_container["priority"],
                expected.into_iter().max().unwrap(),
                "round {round}"
            );
        }
    }
}

#[tokio::test]
async fn go_style_empty_mount_keys_still_reuse() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (first, _) = api.committed_with(&alice, reusable()).await;
    let go_style = json!({
        "/out": {
            "kind": "tmp", "capacity": 1048576, "device_type": "", "path": "",
            "portable_data_hash": "", "uuid": "", "writable": false,
            "exclude_from_output": false, "content": null,
        },
    });
    let (second, _) = api
        .committed_with(&alice, json!({"use_existing": true, "mounts": go_style}))
        .await;
    assert_eq!(second["container_uuid"], first["container_uuid"]);
    assert_eq!(
        second["mounts"]["/out"],
        json!({"kind": "tmp", "capacity": 1048576})
    );
}

#[tokio::test]
async fn cumulative_cost_adds_every_attempt() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (request, first) = api.committed(&alice).await;
    let first_uuid = str_of(&first, "uuid").to_string();
    let token = api.lock(&first_uuid).await;
    api.update_container(&first_uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    api.update_container(&first_uuid, &token, json!({"cost": 1.5}))
        .await
        .expect(StatusCode::OK);
    api.update_container(&first_uuid, SYSTEM_TOKEN, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);

    let retried = get_request(&api, str_of(&request, "uuid"), &alice).await;
    assert_eq!(retried["cumulative_cost"], 1.5);
    let second_uuid = str_of(&retried, "container_uuid").to_string();
    let token = api.lock(&second_uuid).await;
    api.update_container(&second_uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    api.update_container(
        &second_uuid,
        &token,
        json!({"state": "Complete", "exit_code": 0, "cost": 2.0}),
    )
    .await
    .expect(StatusCode::OK);
    let done = get_request(&api, str_of(&request, "uuid"), &alice).await;
    assert_eq!(done["state"], "Final");
    assert_eq!(done["cumulative_cost"], 3.5);
}

#[tokio::test]
async fn only_the_locking_token_reports_a_run() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let admin = api.user("root", true).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let reply = api
        .update_container(uuid, &admin, json!({"progress": 0.5}))
        .await;
    reply.expect(StatusCode::FORBIDDEN);
    assert!(
        reply.errors().contains("locked by another token"),
        "{}",
        reply.errors()
    );
    // The locking token (the system token here) and the container's own
    // token may; another administrator may still cancel.
    api.update_container(uuid, SYSTEM_TOKEN, json!({"progress": 0.25}))
        .await
        .expect(StatusCode::OK);
    api.update_container(uuid, &token, json!({"progress": 0.5}))
        .await
        .expect(StatusCode::OK);
    api.update_container(uuid, &admin, json!({"state": "Cancelled"}))
        .await
        .expect(StatusCode::OK);
}
