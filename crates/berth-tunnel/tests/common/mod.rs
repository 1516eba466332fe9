//! A test controller that accepts tunnels, and a TCP relay that can be
//! switched to another backend or made to drop all traffic.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::secret::constant_time_eq;
use berth_core::{Secret, Uuid};
use berth_tunnel::{
    check_upgrade_request, switching_protocols_response, tunnel_path, DialConfig, IncomingStream,
    KeepaliveConfig, SessionConfig, TunnelClient, TunnelServer,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use url::Url;

pub const UUID: &str = "zzzzz-dz642-0123456789abcde";
pub const SECRET: &str = "the-gateway-secret";

/// A keepalive of 200 ms with a 600 ms timeout, for the test that
/// silences a tunnel. The other tests keep the defaults, so that a busy
/// machine cannot close their tunnels.
pub fn fast_keepalive() -> SessionConfig {
    SessionConfig {
        keepalive: KeepaliveConfig {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(600),
        },
        ..SessionConfig::default()
    }
}

pub fn dial_config(addr: SocketAddr, secret: &str) -> DialConfig {
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    DialConfig::new(url, UUID.parse::<Uuid>().unwrap(), Secret::new(secret))
}

/// Accepts tunnel upgrades for [`UUID`] with [`SECRET`] and passes each
/// tunnel's client to the test.
pub struct TestController {
    pub addr: SocketAddr,
    pub tunnels: mpsc::UnboundedReceiver<TunnelClient>,
}

impl TestController {
    pub async fn start() -> TestController {
        TestController::start_with(SessionConfig::default()).await
    }

    pub async fn start_with(session: SessionConfig) -> TestController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tunnels_tx, tunnels) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tunnels_tx = tunnels_tx.clone();
                let service = service_fn(move |request| {
                    let tunnels_tx = tunnels_tx.clone();
                    async move { Ok::<_, hyper::Error>(handle_upgrade(request, session, tunnels_tx)) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        TestController { addr, tunnels }
    }

    pub async fn next_tunnel(&mut self) -> TunnelClient {
        tokio::time::timeout(Duration::from_secs(10), self.tunnels.recv())
            .await
            .expect("no tunnel arrived within 10 s")
            .expect("the test controller stopped")
    }
}

fn handle_upgrade(
    request: Request<hyper::body::Incoming>,
    session: SessionConfig,
    tunnels: mpsc::UnboundedSender<TunnelClient>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != tunnel_path(UUID) {
        return error_response(StatusCode::NOT_FOUND, "not found");
    }
    let secret = match check_upgrade_request(&request) {
        Ok(secret) => secret,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    if !constant_time_eq(secret.as_bytes(), SECRET.as_bytes()) {
        return error_response(StatusCode::UNAUTHORIZED, "invalid gateway secret");
    }
    tokio::spawn(async move {
        let upgraded = hyper::upgrade::on(request).await.unwrap();
        let client = TunnelClient::handshake(TokioIo::new(upgraded), &session)
            .await
            .unwrap();
        let _ = tunnels.send(client);
    });
    switching_protocols_response()
}

pub fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "errors": [message] }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Accepts every stream and echoes its bytes until the controller
/// half-closes it, then half-closes too.
pub async fn echo(stream: IncomingStream) {
    let stream = stream.accept().unwrap();
    let (mut read, mut write) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// Accepts every stream of `server` and echoes it, in the background.
pub fn serve_echo(mut server: TunnelServer) {
    tokio::spawn(async move {
        while let Ok(Some(stream)) = server.accept().await {
            tokio::spawn(echo(stream));
        }
    });
}

/// Writes `data` and half-closes the stream.
pub async fn write_and_close(stream: &mut (impl AsyncWrite + Unpin), data: &[u8]) {
    stream.write_all(data).await.unwrap();
    stream.shutdown().await.unwrap();
}

/// Reads the stream to end-of-file.
pub async fn read_all(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.unwrap();
    received
}

/// A TCP relay: new connections go to the current backend. `freeze`
/// makes every connection drop what it receives while staying open,
/// like a network path that went silent.
#[derive(Clone)]
pub struct Relay {
    pub addr: SocketAddr,
    backend: Arc<Mutex<SocketAddr>>,
    frozen: watch::Sender<bool>,
}

impl Relay {
    pub async fn start(backend: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Mutex::new(backend));
        let (frozen, _) = watch::channel(false);
        let relay = Relay {
            addr,
            backend,
            frozen,
        };
        let accepting = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let target = *accepting.backend.lock().unwrap();
                let frozen = accepting.frozen.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pump(in_read, out_write, frozen.clone()),
                        pump(out_read, in_write, frozen)
                    );
                });
            }
        });
        relay
    }

    pub fn set_backend(&self, backend: SocketAddr) {
        *self.backend.lock().unwrap() = backend;
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                // A silent path does not pass the close on either.
                if *frozen.borrow() {
                    std::future::pending::<()>().await;
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if *frozen.borrow() {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Bytes that differ at every offset and between seeds, so that a lost,
/// repeated or misplaced chunk shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
