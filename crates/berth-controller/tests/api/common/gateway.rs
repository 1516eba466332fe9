//! A controller served on port 0 and fake supervisors for the gateway's
//! tests. A fake supervisor is made with berth-tunnel's dial side: it keeps
//! a tunnel up with `maintain_with` and echoes every `/ssh` stream.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_client::{Client, Settings, Token};
use berth_controller::{bind, create_user_in, AppState, Config};
use berth_core::{Secret, Uuid};
use berth_tunnel::{
    dial, maintain_with, Backoff, BackoffConfig, Connector, DialConfig, IncomingStream, StreamKind,
    TunnelError, TunnelServer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use url::Url;

use super::{cluster, runnable, SYSTEM_TOKEN};

/// Maximum wait for something that should happen within a second or two.
/// It is far above that, so a busy machine does not fail the test.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// The shutdown grace period of controllers in these tests.
pub const GRACE_SECONDS: u64 = 3;

/// A controller served on port 0.
pub struct Controller {
    pub url: String,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _blocks: tempfile::TempDir,
}

impl Controller {
    pub async fn start(database_url: &str, adjust: impl FnOnce(&mut Config)) -> Controller {
        let blocks = tempfile::tempdir().unwrap();
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), database_url);
        config.blocks.directory = blocks.path().join("blocks");
        config.shutdown_grace_period_seconds = GRACE_SECONDS;
        config.tunnel_heartbeat_seconds = 1;
        adjust(&mut config);
        let bound = bind(cluster(), config).await.unwrap();
        let url = bound.url();
        let state = bound.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Controller {
            url,
            state,
            stop: Some(stop),
            server: Some(server),
            _blocks: blocks,
        }
    }

    pub fn client(&self, token: &str) -> Client {
        Client::new(Settings {
            base_url: Url::parse(&self.url).unwrap(),
            token: Token::new(token),
            insecure: false,
        })
        .unwrap()
    }

    pub fn internal_url(&self) -> String {
        self.state.gateway().internal_url().to_owned()
    }

    /// Starts the shutdown; returns the server's task.
    pub fn shut_down(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let http = reqwest::Client::new();
        let mut request = http
            .request(method, format!("{}/arvados/v1/{path}", self.url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    pub async fn user(&self, name: &str, admin: bool) -> String {
        create_user_in(self.state.store(), &cluster(), name, admin)
            .await
            .unwrap()
    }

    /// Creates a committed request as `token`'s user; returns the request.
    pub async fn committed_request(&self, token: &str) -> Value {
        let (status, request) = self
            .call(
                reqwest::Method::POST,
                "container_requests",
                token,
                Some(json!({"container_request": runnable()})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{request}");
        request
    }

    /// Creates a committed request as `token`'s user; returns its
    /// container's uuid.
    pub async fn queued_container(&self, token: &str) -> String {
        let request = self.committed_request(token).await;
        request["container_uuid"].as_str().unwrap().to_owned()
    }

    /// Locks a container with the system token; returns its credentials.
    pub async fn lock(&self, uuid: &str) -> Value {
        let (status, locked) = self
            .call(
                reqwest::Method::POST,
                &format!("containers/{uuid}/lock"),
                SYSTEM_TOKEN,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{locked}");
        locked["credentials"].clone()
    }

    /// Sets a container's attributes with the system token.
    pub async fn update_container(&self, uuid: &str, attributes: Value) {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("containers/{uuid}"),
                SYSTEM_TOKEN,
                Some(json!({ "container": attributes })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Creates a committed request as `token`'s user and locks its
    /// container; returns the container's uuid and gateway secret.
    pub async fn locked_container(&self, token: &str) -> (String, String) {
        let uuid = self.queued_container(token).await;
        let credentials = self.lock(&uuid).await;
        let secret = credentials["gateway_secret"].as_str().unwrap().to_owned();
        (uuid, secret)
    }

    /// [`locked_container`](Self::locked_container), then Running.
    pub async fn running_container(&self, token: &str) -> (String, String) {
        let (uuid, secret) = self.locked_container(token).await;
        self.update_container(&uuid, json!({"state": "Running"}))
            .await;
        (uuid, secret)
    }

    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(SYSTEM_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub fn dial_config(
    controller: &Controller,
    uuid: &str,
    secret: &str,
    supervisor: &str,
) -> DialConfig {
    let mut config = DialConfig::new(
        Url::parse(&controller.url).unwrap(),
        uuid.parse::<Uuid>().unwrap(),
        Secret::new(secret),
    );
    config.supervisor_id = supervisor.to_owned();
    config
}

/// Dials each controller of a list in turn until one takes the tunnel,
/// as a supervisor behind a load balancer would reach another controller.
pub struct ListConnector {
    configs: Vec<DialConfig>,
    dials: Arc<AtomicUsize>,
}

impl Connector for ListConnector {
    fn connect(&self) -> impl Future<Output = Result<TunnelServer, TunnelError>> + Send {
        let configs = self.configs.clone();
        let dials = self.dials.clone();
        async move {
            dials.fetch_add(1, Ordering::Relaxed);
            let mut last = TunnelError::Closed;
            for config in &configs {
                match dial(config).await {
                    Ok(tunnel) => return Ok(tunnel),
                    Err(error) => last = error,
                }
            }
            Err(last)
        }
    }
}

/// Echoes the bytes of every `/ssh` stream back, and half-closes after
/// the controller's end of file.
pub async fn echo(stream: IncomingStream) {
    if stream.kind() != StreamKind::Ssh {
        stream.reject(axum::http::StatusCode::NOT_FOUND);
        return;
    }
    let Ok(stream) = stream.accept() else {
        return;
    };
    let (mut read, mut write) = tokio::io::split(stream);
    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
        let _ = write.shutdown().await;
    }
}

/// Starts a fake supervisor that keeps a tunnel to the first controller
/// of `configs` that takes it, and echoes its streams.
pub fn fake_supervisor(configs: Vec<DialConfig>) -> tokio::task::JoinHandle<TunnelError> {
    let backoff = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
        ..BackoffConfig::default()
    });
    let connector = ListConnector {
        configs,
        dials: Arc::new(AtomicUsize::new(0)),
    };
    tokio::spawn(maintain_with(
        connector,
        backoff,
        Duration::from_secs(GRACE_SECONDS),
        echo,
    ))
}

/// Polls `condition` until it holds, or fails the test after
/// [`WAIT_LIMIT`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_for_tunnel(controller: &Controller, uuid: &str) {
    let gateway = controller.state.gateway().clone();
    wait_until("the tunnel is registered", || {
        let found = gateway.tunnel(uuid).is_some();
        async move { found }
    })
    .await;
}

/// Bytes that differ at each offset, so a lost or repeated chunk shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

/// Writes `data` and half-closes while reading the echo to its end;
/// returns the echo.
pub async fn round_trip<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let sent = data.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
        write
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT_LIMIT, read.read_to_end(&mut echoed))
        .await
        .expect("timed out reading the echo")
        .unwrap();
    writer.await.unwrap();
    echoed
}

pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}
