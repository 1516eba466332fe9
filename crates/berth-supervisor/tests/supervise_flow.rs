//! The whole run through `supervise_until`, against a small in-test API
//! server that serves the container routes the supervisor calls and
//! records every state update and log append in order.
//!
//! The server applies the container state machine, stores log streams
//! the way the controller does (bytes it already has are ignored, a gap is
//! 422) and revokes the container token once a final state is recorded.
//! Cases that never reach the runtime always run; the rest need a real
//! Docker API and run only with `BERTH_INTEGRATION=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use berth_client::JobCredentials;
use berth_core::ContainerState;
use berth_supervisor::{supervise_until, Config, StopHandle, EXIT_NOT_RECORDED, EXIT_RECORDED};
use serde_json::{json, Value};
use tokio::sync::watch;

use common::{containers_labelled, new_uuid, skip, Cleanup};

use berth_core::manifest::EMPTY_COLLECTION_PDH;

const TOKEN: &str = "v2/zzzzz-gj3su-000000000000001/secret";

/// One request the server accepted, in arrival order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Update(Value),
    Append {
        stream: String,
        offset: u64,
        length: usize,
    },
}

#[derive(Default)]
struct FakeApi {
    container: Value,
    events: Vec<Event>,
    logs: HashMap<String, Vec<u8>>,
    /// Final-state updates to reject with 503 before accepting one.
    final_update_failures: u32,
    token_revoked: bool,
    /// Blocks by MD5 hash.
    blocks: HashMap<String, Vec<u8>>,
    /// Collection manifests by UUID.
    collections: HashMap<String, String>,
}

type Shared = Arc<(Mutex<FakeApi>, watch::Sender<String>)>;

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "errors": [message] }))).into_response()
}

/// Returns the 401 response for a request without the valid token.
fn reject_token(api: &FakeApi, headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {TOKEN}");
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) || api.token_revoked {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "invalid or revoked token".into(),
        ));
    }
    None
}

async fn get_container(
    State(shared): State<Shared>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Response {
    let api = shared.0.lock().unwrap();
    if let Some(response) = reject_token(&api, &headers) {
        return response;
    }
    if api.container["uuid"] != uuid {
        return error(StatusCode::NOT_FOUND, format!("container {uuid} not found"));
    }
    Json(api.container.clone()).into_response()
}

async fn update_container(
    State(shared): State<Shared>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let (lock, state_sender) = &*shared;
    let mut api = lock.lock().unwrap();
    if let Some(response) = reject_token(&api, &headers) {
        return response;
    }
    if api.container["uuid"] != uuid {
        return error(StatusCode::NOT_FOUND, format!("container {uuid} not found"));
    }

    let attributes = body["container"].clone();
    let current: ContainerState = api.container["state"].as_str().unwrap().parse().unwrap();
    let requested: ContainerState = match attributes.get("state") {
        Some(state) => state.as_str().unwrap_or("").parse().unwrap_or(current),
        None => current,
    };
    if requested.is_final() && api.final_update_failures > 0 {
        api.final_update_failures -= 1;
        return error(StatusCode::SERVICE_UNAVAILABLE, "try again".into());
    }
    if let Err(err) = current.check_transition(requested) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, err.to_string());
    }

    api.events.push(Event::Update(attributes.clone()));
    for (key, value) in attributes.as_object().unwrap() {
        api.container[key] = value.clone();
    }
    if requested.is_final() {
        api.token_revoked = true;
    }
    state_sender.send_replace(requested.to_string());
    Json(api.container.clone()).into_response()
}

async fn append_log(
    State(shared): State<Shared>,
    Path((uuid, stream)): Path<(String, String)>,
    Query(query): Query<HashMap<String, u64>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut api = shared.0.lock().unwrap();
    if let Some(response) = reject_token(&api, &headers) {
        return response;
    }
    if api.container["uuid"] != uuid {
        return error(StatusCode::NOT_FOUND, format!("container {uuid} not found"));
    }
    if !["stdout", "stderr", "supervisor", "crunchstat"].contains(&stream.as_str()) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid log stream {stream}"),
        );
    }

    let offset = query.get("offset").copied().unwrap_or(0);
    api.events.push(Event::Append {
        stream: stream.clone(),
        offset,
        length: body.len(),
    });
    let stored = api.logs.entry(stream).or_default();
    let size = stored.len() as u64;
    if offset > size {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("offset {offset} is past the end of the log ({size} bytes)"),
        );
    }

    let already = (size - offset) as usize;
    if body.len() > already {
        stored.extend_from_slice(&body[already..]);
    }
    let new_size = stored.len().to_string();
    ([("x-berth-log-size", new_size)], StatusCode::OK).into_response()
}

/// `PUT /<md5>`: stores a block and returns its unsigned locator.
async fn put_block(
    State(shared): State<Shared>,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut api = shared.0.lock().unwrap();
    if let Some(response) = reject_token(&api, &headers) {
        return response;
    }
    if berth_core::manifest::hex_md5(&body) != hash {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "hash mismatch".into());
    }
    let locator = format!("{hash}+{}", body.len());
    api.blocks.insert(hash, body.to_vec());
    locator.into_response()
}

/// Returns a collection record for `manifest_text`.
fn collection_record(uuid: &str, manifest_text: &str) -> Response {
    let manifest = match berth_core::manifest::Manifest::parse(manifest_text) {
        Ok(manifest) => manifest,
        Err(err) => return error(StatusCode::UNPROCESSABLE_ENTITY, err.to_string()),
    };
    Json(json!({
        "uuid": uuid,
        "owner_uuid": "zzzzz-tpzed-000000000000001",
        "created_at": "2024-01-01T00:00:00.000000000Z",
        "modified_at": "2024-01-01T00:00:00.000000000Z",
        "modified_by_user_uuid": null,
        "name": null,
        "description": null,
        "portable_data_hash": manifest.portable_data_hash(),
        "manifest_text": manifest_text,
        "replication_desired": null,
        "file_count": manifest.files().len(),
        "file_size_total": 0,
    }))
    .into_response()
}

/// `POST collections` and `PUT collections/{uuid}`: stores the manifest.
async fn save_collection(
    State(shared): State<Shared>,
    uuid: Option<Path<String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut api = shared.0.lock().unwrap();
    if let Some(response) = reject_token(&api, &headers) {
        return response;
    }
    let uuid = match uuid {
        Some(Path(uuid)) => uuid,
        None => format!("zzzzz-4zz18-{:015}", api.collections.len() + 1),
    };
    let text = body["collection"]["manifest_text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    api.collections.insert(uuid.clone(), text.clone());
    collection_record(&uuid, &text)
}

/// A running fake API and the handles a test needs.
struct Server {
    shared: Shared,
    state: watch::Receiver<String>,
    credentials: JobCredentials,
}

impl Server {
    async fn start(container: Value) -> Server {
        let uuid = container["uuid"].as_str().unwrap().to_string();
        let initial_state = container["state"].as_str().unwrap().to_string();
        let (state_sender, state) = watch::channel(initial_state);
        let api = FakeApi {
            container,
            ..Default::default()
        };
        let shared: Shared = Arc::new((Mutex::new(api), state_sender));
        let app = Router::new()
            .route(
                "/arvados/v1/containers/{uuid}",
                get(get_container).put(update_container),
            )
            .route(
                "/arvados/v1/containers/{uuid}/log/{stream}",
                post(append_log),
            )
            .route("/arvados/v1/collections", post(save_collection))
            .route("/arvados/v1/collections/{uuid}", put(save_collection))
            .route("/{hash}", put(put_block))
            .with_state(shared.clone());
        // Binding before serving makes the server ready: connections wait
        // in the listen queue until axum accepts them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let credentials = JobCredentials {
            container_uuid: uuid.clone(),
            api_url: format!("http://{address}/").parse().unwrap(),
            insecure: false,
            api_token: TOKEN.to_string(),
            gateway_secret: "gateway-secret".to_string(),
        };
        Server {
            shared,
            state,
            credentials,
        }
    }

    fn events(&self) -> Vec<Event> {
        self.shared.0.lock().unwrap().events.clone()
    }

    /// Returns the container updates without their `log` field, which
    /// [`Server::log_collection_file`] checks.
    fn updates(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Update(mut attributes) => {
                    if let Some(object) = attributes.as_object_mut() {
                        object.remove("log");
                    }
                    Some(attributes)
                }
                Event::Append { .. } => None,
            })
            .collect()
    }

    /// Returns a file of the log collection that the final update named.
    fn log_collection_file(&self, name: &str) -> Vec<u8> {
        let api = self.shared.0.lock().unwrap();
        let last = api
            .events
            .iter()
            .rev()
            .find_map(|event| match event {
                Event::Update(attributes) => Some(attributes.clone()),
                Event::Append { .. } => None,
            })
            .expect("a final update");
        let pdh = last["log"].as_str().expect("the final update sets log");
        let manifest = api
            .collections
            .values()
            .map(|text| berth_core::manifest::Manifest::parse(text).unwrap())
            .find(|manifest| manifest.portable_data_hash() == pdh)
            .expect("the log collection was saved");
        let file = manifest
            .file(name)
            .expect("the file is in the log collection");
        let mut data = Vec::new();
        for segment in &file.segments {
            let block = &api.blocks[segment.locator.hash()];
            let start = segment.offset as usize;
            data.extend_from_slice(&block[start..start + segment.length as usize]);
        }
        data
    }

    fn log(&self, stream: &str) -> Vec<u8> {
        self.shared
            .0
            .lock()
            .unwrap()
            .logs
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }

    fn supervisor_log(&self) -> String {
        String::from_utf8(self.log("supervisor")).unwrap()
    }

    fn fail_final_updates(&self, count: u32) {
        self.shared.0.lock().unwrap().final_update_failures = count;
    }

    async fn wait_for_state(&mut self, state: &str, limit: Duration) {
        tokio::time::timeout(limit, self.state.wait_for(|current| current == state))
            .await
            .unwrap_or_else(|_| panic!("the container did not become {state} within {limit:?}"))
            .unwrap();
    }
}

fn container_record(uuid: &str, state: &str, image: &str, command: &[&str]) -> Value {
    json!({
        "uuid": uuid,
        "owner_uuid": "zzzzz-tpzed-000000000000001",
        "created_at": "2024-01-01T00:00:00.000000000Z",
        "modified_at": "2024-01-01T00:00:00.000000000Z",
        "modified_by_user_uuid": null,
        "state": state,
        "environment": {"GREETING": "hello"},
        "cwd": ".",
        "command": command,
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp"}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
        "runtime_status": {},
        "container_image": image,
        "priority": 1,
        "exit_code": null,
        "lock_count": 1,
    })
}

fn test_config() -> Config {
    Config {
        docker_host: Some(common::docker_host()),
        stop_timeout: Duration::from_secs(1),
        log_flush_interval: Duration::from_millis(50),
        api_retry_timeout: Duration::from_secs(10),
        final_update_timeout: Duration::from_secs(30),
        // Cargo's directory for test files, so that nothing is left in /tmp.
        journal_dir: Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("journal")),
        ..Config::default()
    }
}

fn index_of(events: &[Event], matches: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(matches)
        .unwrap_or_else(|| panic!("no such event in {events:#?}"))
}

#[tokio::test]
async fn container_not_locked_is_left_alone() {
    let uuid = new_uuid();
    let server = Server::start(container_record(&uuid, "Running", "img", &["true"])).await;
    let status = supervise_until(test_config(), server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_NOT_RECORDED);
    assert!(server.events().is_empty(), "{:#?}", server.events());
}

#[tokio::test]
async fn stop_before_start_cancels_without_running() {
    let uuid = new_uuid();
    let server = Server::start(container_record(&uuid, "Locked", "img", &["true"])).await;
    let stop = StopHandle::new();
    stop.stop("cancelled by signal SIGTERM");
    let status = supervise_until(test_config(), server.credentials.clone(), stop)
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    assert_eq!(
        server.updates(),
        vec![
            json!({"state": "Cancelled", "runtime_status": {"error": "cancelled by signal SIGTERM"}})
        ]
    );
    assert!(server
        .supervisor_log()
        .contains("stopping: cancelled by signal SIGTERM"));
}

#[tokio::test]
async fn unsupported_mount_cancels_naming_the_mount() {
    let uuid = new_uuid();
    let mut record = container_record(&uuid, "Locked", "img", &["true"]);
    record["mounts"] = json!({"/keep": {"kind": "keep"}});
    let server = Server::start(record).await;
    let status = supervise_until(test_config(), server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    let updates = server.updates();
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["state"], "Cancelled");
    let message = updates[0]["runtime_status"]["error"].as_str().unwrap();
    assert!(message.contains("/keep"), "{message}");
    assert!(message.contains("\"keep\""), "{message}");
}

#[tokio::test]
async fn unreachable_runtime_cancels_naming_the_socket() {
    let uuid = new_uuid();
    let server = Server::start(container_record(&uuid, "Locked", "img", &["true"])).await;
    let config = Config {
        docker_host: Some("unix:///nonexistent/berth-test.sock".into()),
        ..test_config()
    };
    let status = supervise_until(config, server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    let updates = server.updates();
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["state"], "Cancelled");
    let message = updates[0]["runtime_status"]["error"].as_str().unwrap();
    assert!(
        message.contains("unix:///nonexistent/berth-test.sock"),
        "{message}"
    );
}

/// Runs the supervisor on a record whose `container_image` is `image`,
/// with `allowed_dir` as the only archive directory and a runtime socket
/// that does not exist, so a run that got past the archive would fail on
/// the socket instead. Returns the `runtime_status.error` it recorded and
/// the supervisor log.
async fn cancelled_archive_run(image: &str, allowed_dir: &std::path::Path) -> (String, String) {
    let uuid = new_uuid();
    let server = Server::start(container_record(&uuid, "Locked", image, &["true"])).await;
    let config = Config {
        docker_host: Some("unix:///nonexistent/berth-test.sock".into()),
        image_archive_dirs: vec![allowed_dir.to_path_buf()],
        ..test_config()
    };
    let status = supervise_until(config, server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    let updates = server.updates();
    assert_eq!(updates.len(), 1, "{image}: {updates:#?}");
    assert_eq!(updates[0]["state"], "Cancelled", "{image}");
    let message = updates[0]["runtime_status"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    (message, server.supervisor_log())
}

/// Returns the lines of a file, at least 8 bytes long, that a message
/// must not contain; none when the test cannot read the file.
fn file_lines(path: &str) -> Vec<String> {
    std::fs::read(path)
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|line| line.len() >= 8)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

const SECRET_TEXT: &str = "berth-secret-marker:$6$salt$hash:20228:0:99999:7:::\n";

#[tokio::test]
async fn archive_outside_the_allowed_dirs_cancels() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("images");
    let private = root.path().join("private");
    std::fs::create_dir_all(allowed.join("subdir")).unwrap();
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("secret.tar"), SECRET_TEXT).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", allowed.join("shadow.tar")).unwrap();
    std::os::unix::fs::symlink(private.join("secret.tar"), allowed.join("secret.tar")).unwrap();

    let cases = [
        "/etc/shadow".to_string(),
        allowed.join("shadow.tar").display().to_string(),
        allowed.join("secret.tar").display().to_string(),
        format!("{}/../private/secret.tar", allowed.display()),
        allowed.join("subdir").display().to_string(),
        allowed.join("missing.tar").display().to_string(),
        "/nonexistent/berth/image.tar".to_string(),
    ];
    let mut forbidden = file_lines("/etc/shadow");
    forbidden.push("berth-secret-marker".to_string());
    let mut templates = Vec::new();
    for path in &cases {
        let (message, supervisor_log) = cancelled_archive_run(path, &allowed).await;
        assert!(message.contains(path.as_str()), "{message}");
        assert!(
            message.contains("supervisor.image_archive_dirs"),
            "{message}"
        );
        assert!(!message.contains("berth-test.sock"), "{message}");
        for line in &forbidden {
            assert!(
                !message.contains(line.as_str()),
                "{path}: the message quotes the file"
            );
            assert!(
                !supervisor_log.contains(line.as_str()),
                "{path}: the supervisor log quotes the file"
            );
        }
        templates.push(message.replacen(path.as_str(), "PATH", 1));
    }
    assert!(
        templates.iter().all(|t| *t == templates[0]),
        "the messages differ by path: {templates:#?}"
    );
}

#[tokio::test]
async fn invalid_archive_cancels_with_a_generic_message() {
    let allowed = tempfile::tempdir().unwrap();
    let path = allowed.path().join("notes.tar");
    std::fs::write(&path, SECRET_TEXT.repeat(40)).unwrap();
    let path = path.display().to_string();

    let (message, supervisor_log) = cancelled_archive_run(&path, allowed.path()).await;
    assert_eq!(
        message,
        format!("image archive {path} is not a valid `docker save` archive")
    );
    // The supervisor log gets the kind of problem, never the file.
    assert!(
        supervisor_log.contains("reading it as a tar file failed"),
        "{supervisor_log}"
    );
    assert!(
        !supervisor_log.contains("berth-secret-marker"),
        "{supervisor_log}"
    );
    assert!(!supervisor_log.contains("20228"), "{supervisor_log}");
}

#[tokio::test]
async fn lost_final_update_is_retried() {
    let uuid = new_uuid();
    let server = Server::start(container_record(&uuid, "Locked", "img", &["true"])).await;
    server.fail_final_updates(2);
    let stop = StopHandle::new();
    stop.stop("cancelled by signal SIGINT");
    let status = supervise_until(test_config(), server.credentials.clone(), stop)
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    assert_eq!(server.updates().len(), 1);
    assert_eq!(
        server.shared.0.lock().unwrap().container["state"],
        "Cancelled"
    );
}

#[tokio::test]
async fn exit_code_and_logs_arrive_in_order() {
    if skip("exit_code_and_logs_arrive_in_order") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let script = r#"printf "a\nb"; printf err >&2; printf '\377'; echo "$GREETING" >&2; exit 3"#;
    let server = Server::start(container_record(
        &uuid,
        "Locked",
        &common::test_image(),
        &["sh", "-c", script],
    ))
    .await;
    let status = supervise_until(test_config(), server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(
        status,
        EXIT_RECORDED,
        "supervisor log:\n{}",
        server.supervisor_log()
    );

    assert_eq!(server.log("stdout"), b"a\nb\xff");
    assert_eq!(server.log("stderr"), b"errhello\n");
    let events = server.events();
    let running = index_of(
        &events,
        |e| matches!(e, Event::Update(a) if a["state"] == "Running"),
    );
    let first_output = index_of(
        &events,
        |e| matches!(e, Event::Append { stream, .. } if stream != "supervisor"),
    );
    let last_output = events
        .iter()
        .rposition(|e| matches!(e, Event::Append { stream, .. } if stream != "supervisor"))
        .unwrap();
    let complete = index_of(
        &events,
        |e| matches!(e, Event::Update(a) if a["state"] == "Complete"),
    );
    assert!(running < first_output, "{events:#?}");
    assert!(last_output < complete, "{events:#?}");
    assert_eq!(complete, events.len() - 1, "{events:#?}");
    assert_eq!(
        server.updates().last().unwrap(),
        &json!({"state": "Complete", "exit_code": 3, "output": EMPTY_COLLECTION_PDH})
    );
    // The gateway's host key is published on its own, before Running.
    let host_key = index_of(
        &events,
        |e| matches!(e, Event::Update(a) if a.get("gateway_host_key").is_some()),
    );
    assert!(host_key < running, "{events:#?}");
    let Event::Update(published) = &events[host_key] else {
        unreachable!()
    };
    let line = published["gateway_host_key"].as_str().unwrap();
    assert!(line.starts_with("ssh-ed25519 "), "{line}");
    berth_core::ssh::PublicKey::parse(line).unwrap();
    assert_eq!(published.as_object().unwrap().len(), 1, "{published}");
    assert_eq!(
        server.log_collection_file("stdout.txt"),
        server.log("stdout")
    );
    assert_eq!(
        server.log_collection_file("stderr.txt"),
        server.log("stderr")
    );
    assert_eq!(
        server.log_collection_file("crunch-run.txt"),
        server.supervisor_log().as_bytes()
    );

    let supervisor_log = server.supervisor_log();
    println!("supervisor log:\n{supervisor_log}");
    assert!(supervisor_log.contains("state Running"), "{supervisor_log}");
    assert!(
        supervisor_log.contains("exited with status 3"),
        "{supervisor_log}"
    );
    assert!(
        supervisor_log.contains("removed the runtime container"),
        "{supervisor_log}"
    );
    assert!(!supervisor_log.contains("secret"), "{supervisor_log}");
    let runtime = common::runtime().await;
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn archive_image_runs_to_complete() {
    if skip("archive_image_runs_to_complete") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let archive = common::test_image_archive();
    let record = container_record(
        &uuid,
        "Locked",
        archive.to_str().unwrap(),
        &["echo", "from archive"],
    );
    let server = Server::start(record).await;
    let config = Config {
        image_archive_dirs: vec![common::test_image_archive_dir()],
        ..test_config()
    };
    let status = supervise_until(config, server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(
        status,
        EXIT_RECORDED,
        "supervisor log:\n{}",
        server.supervisor_log()
    );
    assert_eq!(server.log("stdout"), b"from archive\n");
    assert_eq!(
        server.updates().last().unwrap(),
        &json!({"state": "Complete", "exit_code": 0, "output": EMPTY_COLLECTION_PDH})
    );
}

#[tokio::test]
async fn stop_request_cancels_a_running_container() {
    if skip("stop_request_cancels_a_running_container") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let command = ["sh", "-c", "echo started; exec sleep 600"];
    let mut server = Server::start(container_record(
        &uuid,
        "Locked",
        &common::test_image(),
        &command,
    ))
    .await;
    let stop = StopHandle::new();
    let run = tokio::spawn(supervise_until(
        test_config(),
        server.credentials.clone(),
        stop.clone(),
    ));
    server
        .wait_for_state("Running", Duration::from_secs(30))
        .await;

    let stopped_at = Instant::now();
    stop.stop("cancelled by signal SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the supervisor did not finish after the stop request")
        .unwrap()
        .unwrap();
    let elapsed = stopped_at.elapsed();
    assert_eq!(
        status,
        EXIT_RECORDED,
        "supervisor log:\n{}",
        server.supervisor_log()
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "cancelling took {elapsed:?}"
    );

    assert_eq!(
        server.updates().last().unwrap(),
        &json!({"state": "Cancelled", "runtime_status": {"error": "cancelled by signal SIGTERM"}})
    );
    assert_eq!(server.log("stdout"), b"started\n");
    let supervisor_log = server.supervisor_log();
    assert!(
        supervisor_log.contains("stopping the container"),
        "{supervisor_log}"
    );
    assert!(
        supervisor_log.contains("removed the runtime container"),
        "{supervisor_log}"
    );
    let runtime = common::runtime().await;
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn missing_image_cancels_before_running() {
    if skip("missing_image_cancels_before_running") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let image = format!("localhost/berth-missing-{uuid}:latest");
    let server = Server::start(container_record(&uuid, "Locked", &image, &["true"])).await;
    let status = supervise_until(test_config(), server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    let updates = server.updates();
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["state"], "Cancelled");
    let message = updates[0]["runtime_status"]["error"].as_str().unwrap();
    assert!(message.contains(&image), "{message}");
    assert!(message.contains("podman load -i FILE"), "{message}");
    assert!(
        message.contains("supervisor.image_archive_dirs"),
        "{message}"
    );
    assert!(message.contains("supervisor.pull_images"), "{message}");
    assert!(!message.contains("Docker stream error"), "{message}");
    let runtime = common::runtime().await;
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn failing_command_cancels_and_leaves_nothing() {
    if skip("failing_command_cancels_and_leaves_nothing") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let server = Server::start(container_record(
        &uuid,
        "Locked",
        &common::test_image(),
        &["/no/such/program"],
    ))
    .await;
    let status = supervise_until(test_config(), server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(status, EXIT_RECORDED);
    let updates = server.updates();
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["state"], "Cancelled");
    let message = updates[0]["runtime_status"]["error"].as_str().unwrap();
    // Podman 4.3 reports the missing program when it prepares the
    // container for attaching, before the start.
    assert!(message.contains("/no/such/program"), "{message}");
    let runtime = common::runtime().await;
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn output_over_the_limit_cancels() {
    if skip("output_over_the_limit_cancels") {
        return;
    }
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    // `seq 1 1000` prints 3893 bytes.
    let server = Server::start(container_record(
        &uuid,
        "Locked",
        &common::test_image(),
        &["sh", "-c", "seq 1 1000 > /out/numbers"],
    ))
    .await;
    let config = Config {
        max_output_bytes: 100,
        ..test_config()
    };
    let status = supervise_until(config, server.credentials.clone(), StopHandle::new())
        .await
        .unwrap();
    assert_eq!(
        status,
        EXIT_RECORDED,
        "supervisor log:\n{}",
        server.supervisor_log()
    );

    let last = server.updates().last().unwrap().clone();
    assert_eq!(last["state"], "Cancelled", "{last}");
    assert!(last.get("output").is_none(), "{last}");
    let error = last["runtime_status"]["error"].as_str().unwrap();
    assert!(error.contains("3893 bytes"), "{error}");
    assert!(error.contains("max_output_bytes (100)"), "{error}");
    assert!(
        server.log_collection_file("crunch-run.txt") == server.supervisor_log().as_bytes(),
        "the log collection is saved after a failed output too"
    );
}
