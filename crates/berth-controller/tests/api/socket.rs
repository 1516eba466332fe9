//! The controller on a real socket (port 0), driven by berth-client as the
//! CLI, the dispatcher and the supervisor drive it.

use std::time::{Duration, Instant};

use berth_client::{Client, ListParams, Settings, Token};
use berth_controller::{bind, create_user, Config};
use berth_core::{ContainerState, RequestState};
use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::oneshot;

use crate::common::{cluster, runnable, TestDatabase, SYSTEM_TOKEN};

struct Running {
    base_url: url::Url,
    state: berth_controller::AppState,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    config: Config,
    _database: TestDatabase,
}

async fn start() -> Running {
    // With SQLite, the file's directory does not exist yet: the store
    // creates it.
    let database = TestDatabase::new().await;
    let config = Config::new("127.0.0.1:0".parse().unwrap(), database.url());
    let bound = bind(cluster(), config.clone()).await.unwrap();
    let address = bound.local_addr();
    let state = bound.state().clone();
    assert_ne!(address.port(), 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));
    Running {
        base_url: format!("http://{address}/").parse().unwrap(),
        state,
        stop,
        server,
        config,
        _database: database,
    }
}

fn client(base_url: &url::Url, token: &str) -> Client {
    Client::new(Settings {
        base_url: base_url.clone(),
        token: Token::new(token),
        insecure: false,
    })
    .unwrap()
}

#[tokio::test]
async fn client_runs_a_container_over_a_socket() {
    let running = start().await;
    let alice_token = create_user(&cluster(), &running.config, "alice", false)
        .await
        .unwrap();
    let alice = client(&running.base_url, &alice_token);
    let system = client(&running.base_url, SYSTEM_TOKEN);

    let me = alice.current_user().await.unwrap();
    assert_eq!(me["username"], "alice");

    let request = alice.create_container_request(&runnable()).await.unwrap();
    assert_eq!(request.state, RequestState::Committed);
    let container_uuid = request.container_uuid.clone().unwrap();

    let queued = system
        .list_containers(&ListParams::with_filters(json!([
            ["state", "=", "Queued"],
            ["priority", ">", 0]
        ])))
        .await
        .unwrap();
    assert_eq!(queued.items.len(), 1);
    assert_eq!(queued.items[0].uuid, container_uuid);

    let locked = system.lock_container(&container_uuid).await.unwrap();
    assert_eq!(locked.container.state, ContainerState::Locked);
    let again = system.lock_container(&container_uuid).await.unwrap_err();
    assert_eq!(again.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));

    let supervisor = client(&running.base_url, &locked.credentials.api_token);
    supervisor
        .update_container(&container_uuid, &json!({"state": "Running"}))
        .await
        .unwrap();
    let text = Bytes::from_static(b"hello \xff\n");
    let size = supervisor
        .append_log(&container_uuid, "stdout", 0, text.clone())
        .await
        .unwrap();
    assert_eq!(size, text.len() as u64);
    // A retried append is harmless.
    let size = supervisor
        .append_log(&container_uuid, "stdout", 0, text.clone())
        .await
        .unwrap();
    assert_eq!(size, text.len() as u64);

    let chunk = alice
        .read_log(&container_uuid, "stdout", 0, None)
        .await
        .unwrap();
    assert_eq!(chunk.data, text);
    assert_eq!(chunk.size, text.len() as u64);
    assert_eq!(chunk.container_state, Some(ContainerState::Running));

    let done = supervisor
        .update_container(
            &container_uuid,
            &json!({"state": "Complete", "exit_code": 3}),
        )
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(3));
    let request = alice.get_container_request(&request.uuid).await.unwrap();
    assert_eq!(request.state, RequestState::Final);
    let container = alice.get_container(&container_uuid).await.unwrap();
    assert_eq!(container.state, ContainerState::Complete);
    assert_eq!(container.exit_code, Some(3));

    // The revoked token no longer works.
    let err = supervisor.get_container(&container_uuid).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));

    let mine = alice
        .list_container_requests(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(mine.items.len(), 1);
    assert_eq!(mine.items_available, Some(1));

    running.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running.server)
        .await
        .expect("the controller did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn supervisor_client_reads_secret_mounts() {
    let running = start().await;
    let alice_token = create_user(&cluster(), &running.config, "alice", false)
        .await
        .unwrap();
    let alice = client(&running.base_url, &alice_token);
    let system = client(&running.base_url, SYSTEM_TOKEN);
    let mut attributes = runnable();
    attributes["secret_mounts"] = json!({
        "/etc/secret.json": {"kind": "json", "content": {"password": "hunter2"}},
    });
    let request = alice.create_container_request(&attributes).await.unwrap();
    let container_uuid = request.container_uuid.unwrap();
    let locked = system.lock_container(&container_uuid).await.unwrap();

    let supervisor = client(&running.base_url, &locked.credentials.api_token);
    let mounts = supervisor
        .container_secret_mounts(&container_uuid)
        .await
        .unwrap();
    assert_eq!(mounts.len(), 1);
    let mount = &mounts["/etc/secret.json"];
    assert_eq!(mount.kind, "json");
    assert_eq!(mount.content, Some(json!({"password": "hunter2"})));

    for other in [&alice, &system] {
        let err = other
            .container_secret_mounts(&container_uuid)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    running.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running.server)
        .await
        .expect("the controller did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_ends_a_long_poll() {
    let running = start().await;
    let alice_token = create_user(&cluster(), &running.config, "alice", false)
        .await
        .unwrap();
    let alice = client(&running.base_url, &alice_token);
    let system = client(&running.base_url, SYSTEM_TOKEN);
    let request = alice.create_container_request(&runnable()).await.unwrap();
    let container_uuid = request.container_uuid.unwrap();
    system.lock_container(&container_uuid).await.unwrap();

    // The health endpoint responds before the wait starts, so the server is
    // known to serve.
    let health = reqwest::get(running.base_url.join("_health/ping").unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let reader = {
        let alice = alice.clone();
        let uuid = container_uuid.clone();
        tokio::spawn(async move {
            alice
                .read_log(&uuid, "stdout", 0, Some(Duration::from_secs(30)))
                .await
        })
    };
    // Shut down only once the read waits on the server.
    tokio::time::timeout(Duration::from_secs(10), async {
        while running.state.notifier().channel_count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the read never started waiting");
    let started = Instant::now();
    running.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.server)
        .await
        .expect("the controller did not stop")
        .unwrap()
        .unwrap();
    // Well under the 10 s grace period: the wait ended at the signal.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let chunk = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the read did not end")
        .unwrap()
        .unwrap();
    assert!(chunk.data.is_empty());
    assert_eq!(chunk.container_state, Some(ContainerState::Locked));
}

#[tokio::test]
async fn create_user_rejects_duplicate_name() {
    let database = TestDatabase::new().await;
    let config = Config::new("127.0.0.1:0".parse().unwrap(), database.url());
    let token = create_user(&cluster(), &config, "alice", true)
        .await
        .unwrap();
    assert!(token.starts_with("v2/zzzzz-gj3su-"));
    assert_eq!(token.split('/').count(), 3);
    let err = create_user(&cluster(), &config, "alice", false)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    let err = create_user(&cluster(), &config, "bad name", false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid user name"), "{err}");
}

#[tokio::test]
async fn bind_reports_bad_database_url() {
    let config = Config::new("127.0.0.1:0".parse().unwrap(), "mysql://localhost/berth");
    let err = bind(cluster(), config).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("mysql://localhost/berth"),
        "{err:#}"
    );
}
