//! Every validation rule of requests and containers: the status is 422,
//! the message names the field and the value, and nothing is stored.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{runnable, str_of, TestApi, SYSTEM_TOKEN};

/// Returns the attributes of a committed runnable request with `changes`
/// applied (null clears a field).
fn with(changes: Value) -> Value {
    let mut attributes = runnable();
    for (key, value) in changes.as_object().unwrap() {
        attributes[key] = value.clone();
    }
    attributes
}

/// Returns mounts with an output directory at `/out` plus `extra`.
fn mounts(extra: Value) -> Value {
    let mut mounts = json!({"/out": {"kind": "tmp", "capacity": 1000}});
    for (target, mount) in extra.as_object().unwrap() {
        mounts[target] = mount.clone();
    }
    mounts
}

/// One invalid request: its attributes, and texts its error must contain
/// (the field, then the value).
struct Case {
    attributes: Value,
    expected: &'static [&'static str],
    /// Whether an update of a draft request fails the same way.
    on_update: bool,
}

fn case(attributes: Value, expected: &'static [&'static str]) -> Case {
    Case {
        attributes,
        expected,
        on_update: true,
    }
}

fn create_only(attributes: Value, expected: &'static [&'static str]) -> Case {
    Case {
        attributes,
        expected,
        on_update: false,
    }
}

fn cases() -> Vec<Case> {
    let long_name = "n".repeat(256);
    vec![
        case(with(json!({"priority": -1})), &["priority", "-1"]),
        case(with(json!({"priority": 1001})), &["priority", "1001"]),
        case(
            with(json!({"container_count_max": -2})),
            &["container_count_max", "-2"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": -5, "vcpus": 1}})),
            &["runtime_constraints.ram", "-5"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 0, "vcpus": 1}})),
            &["runtime_constraints.ram", "0"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 0}})),
            &["runtime_constraints.vcpus", "0"],
        ),
        case(
            with(
                json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1, "keep_cache_ram": -1}}),
            ),
            &["runtime_constraints.keep_cache_ram", "-1"],
        ),
        case(
            with(
                json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1, "keep_cache_disk": -7}}),
            ),
            &["runtime_constraints.keep_cache_disk", "-7"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1, "rams": 1}})),
            &["runtime_constraints", "rams"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": "lots", "vcpus": 1}})),
            &["runtime_constraints.ram", "lots"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "opencl", "device_count": 1}}})),
            &["runtime_constraints.gpu.stack", "opencl"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"device_count": 2}}})),
            &["runtime_constraints.gpu.stack", "device_count is 2"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "cuda", "device_count": 0}}})),
            &["runtime_constraints.gpu.device_count", "cuda"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "cuda", "device_count": -1}}})),
            &["runtime_constraints.gpu.device_count", "-1"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "cuda", "device_count": 1, "driver_version": "twelve"}}})),
            &["runtime_constraints.gpu.driver_version", "twelve"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "rocm", "device_count": 1, "hardware_target": ["gfx 90"]}}})),
            &["runtime_constraints.gpu.hardware_target", "gfx 90"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "cuda", "device_count": 1, "vram": -3}}})),
            &["runtime_constraints.gpu.vram", "-3"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "cuda": {"device_count": 1, "cores": 5}}})),
            &["runtime_constraints.cuda", "cores"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "cuda": {"device_count": 1},
                "gpu": {"stack": "cuda", "device_count": 1}}})),
            &["runtime_constraints.cuda", "gpu"],
        ),
        case(
            with(json!({"scheduling_parameters": {"max_run_time": -60}})),
            &["scheduling_parameters.max_run_time", "-60"],
        ),
        case(
            with(json!({"scheduling_parameters": {"partitions": ["a b"]}})),
            &["scheduling_parameters.partitions", "a b"],
        ),
        case(
            with(json!({"scheduling_parameters": {"queue": "fast"}})),
            &["scheduling_parameters", "queue"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"relative": {"kind": "tmp"}}))})),
            &["mounts.relative", "relative"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/a/../b": {"kind": "tmp"}}))})),
            &["mounts./a/../b", "/a/../b"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/data": {"kind": "nfs"}}))})),
            &["mounts./data.kind", "nfs"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/data": {"kind": "tmp", "capacity": -1}}))})),
            &["mounts./data.capacity", "-1"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/in.json": {"kind": "json"}}))})),
            &["mounts./in.json.content", "json mount"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/in.txt": {"kind": "text", "content": 5}}))})),
            &["mounts./in.txt.content", "text mount"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/f": {"kind": "file", "path": "out/f"}}))})),
            &["mounts./f.path", "absolute path"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/data": {"kind": "tmp", "content": "x"}}))})),
            &["mounts./data.content", "tmp mount"],
        ),
        case(
            with(
                json!({"mounts": mounts(json!({"/data": {"kind": "collection",
                "portable_data_hash": "abc+1"}}))}),
            ),
            &["mounts./data.portable_data_hash", "abc+1"],
        ),
        case(
            with(
                json!({"mounts": mounts(json!({"/data": {"kind": "collection",
                "uuid": "zzzzz-xvhdp-0123456789abcde"}}))}),
            ),
            &["mounts./data.uuid", "zzzzz-xvhdp-0123456789abcde"],
        ),
        case(
            with(
                json!({"mounts": mounts(json!({"/data": {"kind": "collection",
                "uuid": "zzzzz-4zz18-0123456789abcde", "path": "a/../../b"}}))}),
            ),
            &["mounts./data.path", "a/../../b"],
        ),
        case(
            with(
                json!({"mounts": mounts(json!({"/scratch": {"kind": "tmp", "device_type": "floppy"}}))}),
            ),
            &["mounts./scratch.device_type", "floppy"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"stdout": {"kind": "tmp"}}))})),
            &["mounts.stdout.kind", "tmp"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"stdin": {"kind": "tmp"}}))})),
            &["mounts.stdin.kind", "tmp"],
        ),
        case(
            with(
                json!({"mounts": mounts(json!({"stderr": {"kind": "file", "path": "/tmp/err.txt"}}))}),
            ),
            &["mounts.stderr.path", "/tmp/err.txt"],
        ),
        case(
            with(json!({"output_path": null})),
            &["output_path", "missing"],
        ),
        case(
            with(json!({"output_path": "/elsewhere"})),
            &["output_path", "/elsewhere"],
        ),
        case(
            with(json!({"output_path": "/in.json",
                "mounts": mounts(json!({"/in.json": {"kind": "json", "content": {}}}))})),
            &["output_path", "/in.json"],
        ),
        case(
            with(json!({"output_glob": ["/abs/*"]})),
            &["output_glob", "/abs/*"],
        ),
        case(
            with(json!({"output_glob": ["../up"]})),
            &["output_glob", "../up"],
        ),
        case(with(json!({"output_glob": [""]})), &["output_glob", "\"\""]),
        case(
            with(json!({"output_glob": ["[ab"]})),
            &["output_glob", "[ab"],
        ),
        case(
            with(json!({"environment": {"A=B": "x"}})),
            &["environment", "A=B"],
        ),
        case(
            with(json!({"environment": {"": "x"}})),
            &["environment", "\"\""],
        ),
        case(
            with(json!({"environment": {"A": 5}})),
            &["environment.A", "5"],
        ),
        case(with(json!({"command": []})), &["command", "empty"]),
        case(
            with(json!({"command": [""]})),
            &["command", "first element"],
        ),
        case(with(json!({"command": "echo hi"})), &["command", "echo hi"]),
        case(
            with(json!({"container_image": null})),
            &["container_image", "missing"],
        ),
        case(
            with(json!({"container_image": "busy box"})),
            &["container_image", "busy box"],
        ),
        case(
            with(json!({"cwd": "relative/dir"})),
            &["cwd", "relative/dir"],
        ),
        case(with(json!({"output_ttl": -1})), &["output_ttl", "-1"]),
        case(with(json!({"filters": "[]"})), &["filters", "[]"]),
        case(
            with(json!({"service": true, "use_existing": true})),
            &["use_existing", "service"],
        ),
        case(
            with(json!({"published_ports": {"0": {"access": "public"}}})),
            &["published_ports.0", "\"0\""],
        ),
        case(
            with(json!({"published_ports": {"8080": {"access": "open"}}})),
            &["published_ports.8080.access", "open"],
        ),
        case(
            with(json!({"published_ports": {"8080": 5}})),
            &["published_ports.8080", "5"],
        ),
        case(
            with(json!({"output_storage_classes": ["hot cold"]})),
            &["output_storage_classes", "hot cold"],
        ),
        case(
            with(json!({"name": long_name})),
            &["name", "256 characters"],
        ),
        case(with(json!({"colour": "blue"})), &["colour"]),
        case(
            with(json!({"scheduling_parameters": {"partitions": ["de\u{0}bug"]}})),
            &["scheduling_parameters.partitions", "de\\0bug"],
        ),
        case(
            with(json!({"scheduling_parameters": {"partitions": ["de\tbug"]}})),
            &["scheduling_parameters.partitions", "de\\tbug"],
        ),
        case(
            with(json!({"output_storage_classes": ["hot\u{0}"]})),
            &["output_storage_classes", "hot\\0"],
        ),
        case(
            with(json!({"runtime_constraints": [67108864, 2]})),
            &["runtime_constraints", "not an object"],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1, "gpu": ["cuda", 1]}})),
            &["runtime_constraints.gpu", "not an object"],
        ),
        case(
            with(json!({"scheduling_parameters": [["debug"], false, 60]})),
            &["scheduling_parameters", "not an object"],
        ),
        case(
            with(json!({"mounts": {"/out": ["tmp"]}})),
            &["mounts./out", "not an object"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/data": {"capacity": 10}}))})),
            &["mounts./data.kind", "is missing"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/keep": {"kind": "keep"}}))})),
            &["mounts./keep.kind", "not supported yet"],
        ),
        case(
            with(json!({"mounts": mounts(json!({"/in.txt": {"kind": "file",
                "portable_data_hash": "d41d8cd98f00b204e9800998ecf8427e+0", "path": "a/../b"}}))})),
            &[
                "mounts./in.txt.path",
                "the path of one file in the collection",
            ],
        ),
        case(
            with(json!({"runtime_constraints": {"ram": 1000000, "vcpus": 1,
                "gpu": {"stack": "opencl", "device_count": 2}}})),
            &["runtime_constraints.gpu.stack", "opencl"],
        ),
        case(
            with(json!({"expires_at": "tomorrow"})),
            &["expires_at", "tomorrow", "RFC 3339"],
        ),
        case(
            with(json!({"priority": "5"})),
            &["priority", "expected an integer"],
        ),
        create_only(with(json!({"state": "Final"})), &["state", "Final"]),
        create_only(with(json!({"container_count": 5})), &["container_count"]),
        create_only(
            with(json!({"owner_uuid": "zzzzz-tpzed-bbbbbbbbbbbbbbb"})),
            &["owner_uuid", "zzzzz-tpzed-bbbbbbbbbbbbbbb"],
        ),
    ]
}

#[tokio::test]
async fn invalid_requests_are_422_and_store_nothing() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    for case in cases() {
        let reply = api.create_request(&alice, case.attributes.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            case.attributes,
        );
        let errors = reply.errors();
        for text in case.expected {
            assert!(
                errors.contains(text),
                "{}: {errors:?} does not contain {text:?}",
                case.attributes
            );
        }
    }
    assert_eq!(api.request_count().await, 0);
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn invalid_updates_are_422_and_change_nothing() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let mut draft = runnable();
    draft["state"] = json!("Uncommitted");
    let reply = api.create_request(&alice, draft).await;
    reply.expect(StatusCode::OK);
    let uuid = str_of(&reply.json(), "uuid").to_string();
    let path = format!("container_requests/{uuid}");
    let before = api.get(&path, &alice).await.json();
    for case in cases().into_iter().filter(|case| case.on_update) {
        let reply = api
            .call(
                Method::PUT,
                &path,
                Some(&alice),
                Some(json!({"container_request": case.attributes})),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            case.attributes,
        );
        for text in case.expected {
            assert!(
                reply.errors().contains(text),
                "{}: {:?} does not contain {text:?}",
                case.attributes,
                reply.errors()
            );
        }
    }
    assert_eq!(api.get(&path, &alice).await.json(), before);
    assert_eq!(api.container_count().await, 0);
}

#[tokio::test]
async fn legacy_forms_are_normalised() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let reply = api
        .create_request(
            &alice,
            with(json!({
                "container_count_max": 0,
                "runtime_constraints": {
                    "ram": [67108864, 134217728],
                    "vcpus": [2],
                    "cuda": {"device_count": 1, "driver_version": "11.0", "hardware_capability": "8.6"},
                },
            })),
        )
        .await;
    reply.expect(StatusCode::OK);
    let request = reply.json();
    assert_eq!(request["container_count_max"], 3);
    let constraints = &request["runtime_constraints"];
    assert_eq!(constraints["ram"], 67108864);
    assert_eq!(constraints["vcpus"], 2);
    assert!(constraints.get("cuda").is_none(), "{constraints}");
    let gpu = json!({"stack": "cuda", "device_count": 1, "driver_version": "11.0",
                     "hardware_target": ["8.6"], "vram": 0});
    assert_eq!(constraints["gpu"], gpu);

    // The committed request's container carries the GPUs to the dispatcher.
    let container_uuid = str_of(&request, "container_uuid");
    let container = api
        .get(&format!("containers/{container_uuid}"), &alice)
        .await;
    container.expect(StatusCode::OK);
    assert_eq!(container.json()["runtime_constraints"]["gpu"], gpu);
}

#[tokio::test]
async fn workflow_runner_is_a_supervisor() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api
        .committed_with(&alice, json!({"command": ["arvados-cwl-runner", "wf.cwl"]}))
        .await;
    assert_eq!(container["scheduling_parameters"]["supervisor"], true);
}

#[tokio::test]
async fn invalid_container_values_are_422() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid");
    let token = api.lock(uuid).await;
    api.update_container(uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let cases: [(&str, Value, &[&str]); 6] = [
        (&token, json!({"progress": 2.5}), &["progress", "2.5"]),
        (&token, json!({"output": "abc"}), &["output", "abc"]),
        (
            &token,
            json!({"log": "0cc175b9c0f1b6a831c399e269772661"}),
            &["log", "0cc175b9"],
        ),
        (
            &token,
            json!({"runtime_status": {"error": 5}}),
            &["runtime_status.error", "5"],
        ),
        (
            SYSTEM_TOKEN,
            json!({"progress": -0.5}),
            &["progress", "-0.5"],
        ),
        (
            SYSTEM_TOKEN,
            json!({"scheduler_job_id": ""}),
            &["scheduler_job_id", "empty"],
        ),
    ];
    let before = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    for (caller, attributes, expected) in cases {
        let reply = api.update_container(uuid, caller, attributes.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{attributes}"
        );
        for text in expected {
            assert!(
                reply.errors().contains(text),
                "{attributes}: {}",
                reply.errors()
            );
        }
    }
    let after = api
        .get(&format!("containers/{uuid}"), SYSTEM_TOKEN)
        .await
        .json();
    assert_eq!(after, before);
}

#[tokio::test]
async fn container_fields_change_only_in_their_states() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let update = |attributes: Value| {
        let api = &api;
        let uuid = uuid.clone();
        async move { api.update_container(&uuid, SYSTEM_TOKEN, attributes).await }
    };

    let reply = update(json!({"runtime_status": {"activity": "x"}})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("in state Queued"),
        "{}",
        reply.errors()
    );
    let reply = update(json!({"priority": 5})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("computes it"), "{}", reply.errors());

    api.lock(&uuid).await;
    let reply = update(json!({"output": "d41d8cd98f00b204e9800998ecf8427e+0"})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.errors().contains("output"), "{}", reply.errors());
    assert!(
        reply.errors().contains("in state Locked"),
        "{}",
        reply.errors()
    );
    update(json!({"state": "Running", "gateway_address": "127.0.0.1:1"}))
        .await
        .expect(StatusCode::OK);

    let running = json!({
        "cost": 1.25,
        "subrequests_cost": 0.5,
        "output_properties": {"k": "v"},
        "interactive_session_started": true,
    });
    let reply = update(running).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["cost"], 1.25);
    assert_eq!(reply.json()["interactive_session_started"], true);
    let reply = update(json!({"interactive_session_started": false})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("back to false"),
        "{}",
        reply.errors()
    );

    let reply =
        update(json!({"state": "Complete", "exit_code": 0, "gateway_address": "x:2"})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("from Running to Complete"),
        "{}",
        reply.errors()
    );
    update(json!({"state": "Complete", "exit_code": 0}))
        .await
        .expect(StatusCode::OK);
    let reply = update(json!({"progress": 0.5})).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("in state Complete"),
        "{}",
        reply.errors()
    );
}

/// A host key made with `ssh-keygen -t ed25519`, and the fingerprint
/// `ssh-keygen -lf` printed for it.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKf01Q1Af7I6Nsx4Es7W3tYPHCf0j12YKWsDt4C11+tA gateway";
const HOST_KEY_FINGERPRINT: &str = "SHA256:6nsgsSBSzQt6glxKj7U0Pvq02PmzQMvispZSECBQ5ng";

#[tokio::test]
async fn gateway_host_key_gets_its_fingerprint() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let token = api.lock(&uuid).await;

    let reply = api
        .update_container(&uuid, &token, json!({"gateway_host_key": "ssh-dss AAAA"}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("gateway_host_key"),
        "{}",
        reply.errors()
    );
    assert!(reply.errors().contains("ssh-dss"), "{}", reply.errors());

    let reply = api
        .update_container(
            &uuid,
            &token,
            json!({"gateway_host_key_fingerprint": "SHA256:forged"}),
        )
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("the controller sets it"),
        "{}",
        reply.errors()
    );

    let reply = api
        .update_container(&uuid, &token, json!({"gateway_host_key": HOST_KEY}))
        .await;
    reply.expect(StatusCode::OK);
    let owner_view = api.get(&format!("containers/{uuid}"), &alice).await.json();
    assert_eq!(
        owner_view["gateway_host_key"],
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKf01Q1Af7I6Nsx4Es7W3tYPHCf0j12YKWsDt4C11+tA"
    );
    assert_eq!(
        owner_view["gateway_host_key_fingerprint"],
        HOST_KEY_FINGERPRINT
    );
}

#[tokio::test]
async fn container_token_sets_interactive_session_started() {
    let api = TestApi::new().await;
    let alice = api.user("alice", false).await;
    let (_, container) = api.committed(&alice).await;
    let uuid = str_of(&container, "uuid").to_string();
    let token = api.lock(&uuid).await;
    let started = json!({"interactive_session_started": true});

    let reply = api.update_container(&uuid, &token, started.clone()).await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("interactive_session_started"),
        "{}",
        reply.errors()
    );

    api.update_container(&uuid, &token, json!({"state": "Running"}))
        .await
        .expect(StatusCode::OK);
    let reply = api.update_container(&uuid, &token, started).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.json()["interactive_session_started"], true);

    let reply = api
        .update_container(&uuid, &token, json!({"interactive_session_started": false}))
        .await;
    reply.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reply.errors().contains("back to false"),
        "{}",
        reply.errors()
    );
}
