//! Connections on a real socket (port 0), over plain HTTP and HTTPS: a
//! client that does not send a whole request header within
//! `header_read_timeout_seconds` is disconnected, and others are served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_controller::{bind, tls, Config};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use crate::common::{cluster, TestDatabase};

/// Header read timeout of the servers in these tests.
const HEADER_READ_TIMEOUT_SECONDS: u64 = 1;

/// How long a test waits for the server to close a connection before it
/// fails. Far above the header read timeout, so a slow machine does not
/// fail the test; the test checks that the close happens, not when.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// A request header without its final empty line.
const PARTIAL_HEADER: &[u8] = b"GET /_health/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: ";

struct Running {
    address: SocketAddr,
    /// The certificate's DER when the server serves HTTPS.
    certificate: Option<CertificateDer<'static>>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

async fn start(https: bool) -> Running {
    let database = TestDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), database.url());
    config.header_read_timeout_seconds = HEADER_READ_TIMEOUT_SECONDS;
    let mut certificate = None;
    if https {
        let pair = tls::self_signed(&["127.0.0.1"], "berth test").unwrap();
        let certificate_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&certificate_path, &pair.certificate_pem).unwrap();
        std::fs::write(&key_path, &pair.key_pem).unwrap();
        config.tls_certificate = Some(certificate_path);
        config.tls_key = Some(key_path);
        use rustls::pki_types::pem::PemObject;
        certificate =
            Some(CertificateDer::from_pem_slice(pair.certificate_pem.as_bytes()).unwrap());
    }
    let bound = bind(cluster(), config).await.unwrap();
    let address = bound.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));
    Running {
        address,
        certificate,
        stop,
        server,
        _dir: dir,
        _database: database,
    }
}

impl Running {
    /// Opens a connection: TCP, with a finished TLS handshake for HTTPS.
    async fn connect(&self) -> Box<dyn Connection> {
        let tcp = TcpStream::connect(self.address).await.unwrap();
        let Some(certificate) = &self.certificate else {
            return Box::new(tcp);
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Box::new(stream)
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(CLOSE_WAIT, self.server)
            .await
            .expect("the controller did not stop")
            .unwrap()
            .unwrap();
    }
}

trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Reads until the server closes the connection; returns what it sent.
/// A reset or a TLS stream cut without `close_notify` counts as closed.
async fn read_until_closed(connection: &mut Box<dyn Connection>) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLOSE_WAIT, connection.read_to_end(&mut received)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {CLOSE_WAIT:?}"
    );
    received
}

/// Sends a whole request on a new connection and returns the response.
async fn health_check(running: &Running) -> String {
    let mut connection = running.connect().await;
    connection
        .write_all(b"GET /_health/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut connection).await).into_owned()
}

async fn check_partial_header_is_closed(https: bool) {
    let running = start(https).await;
    let mut stalled = running.connect().await;
    stalled.write_all(PARTIAL_HEADER).await.unwrap();

    let received = read_until_closed(&mut stalled).await;
    assert!(
        received.is_empty(),
        "unexpected response: {}",
        String::from_utf8_lossy(&received)
    );
    // The server still serves other connections.
    let response = health_check(&running).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    running.stop().await;
}

#[tokio::test]
async fn partial_header_over_http_is_closed() {
    check_partial_header_is_closed(false).await;
}

#[tokio::test]
async fn partial_header_over_https_is_closed() {
    check_partial_header_is_closed(true).await;
}

#[tokio::test]
async fn silent_connection_is_closed() {
    let running = start(false).await;
    let mut silent = running.connect().await;
    let received = read_until_closed(&mut silent).await;
    assert!(received.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn idle_kept_alive_connection_is_closed() {
    let running = start(false).await;
    let mut connection = running.connect().await;
    connection
        .write_all(b"GET /_health/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    // The whole response comes before the close: the header timeout
    // starts only when the server waits for the next request.
    let received = read_until_closed(&mut connection).await;
    let response = String::from_utf8_lossy(&received);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"health":"OK"}"#), "{response}");
    running.stop().await;
}
