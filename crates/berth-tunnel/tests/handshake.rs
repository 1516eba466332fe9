//! The dial side's handshake: bytes right after the `101`, and TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use berth_tunnel::SessionConfig;
use berth_tunnel::{dial, StreamKind, StreamRequest, TunnelClient};
use common::{dial_config, read_all, serve_echo, write_and_close, SECRET};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Holds every write until the first flush, and sends it in one write
/// after `prefix`; passes writes through after that.
struct CoalesceFirstFlush {
    inner: TcpStream,
    pending: Option<Vec<u8>>,
    written: usize,
}

impl AsyncRead for CoalesceFirstFlush {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CoalesceFirstFlush {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.pending {
            Some(pending) => {
                pending.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(pending) = &this.pending {
            while this.written < pending.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &pending[this.written..]))?;
                this.written += n;
            }
            this.pending = None;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn bytes_after_101_reach_http2() {
    // A controller written by hand: it sends the 101 headers, the HTTP/2
    // preface and its SETTINGS frame in a single write, so the dial
    // side's first read returns all three.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let controller = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n") {
            let mut byte = [0_u8; 1];
            tcp.read_exact(&mut byte).await.unwrap();
            request.push(byte[0]);
        }
        let request = String::from_utf8(request).unwrap();
        assert!(
            request
                .to_ascii_lowercase()
                .contains(&format!("x-berth-gateway-secret: {SECRET}")),
            "{request}"
        );
        let head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: berth-tunnel\r\n\r\n".to_vec();
        let io = CoalesceFirstFlush {
            inner: tcp,
            pending: Some(head),
            written: 0,
        };
        TunnelClient::handshake(io, &SessionConfig::default())
            .await
            .unwrap()
    });

    serve_echo(dial(&dial_config(addr, SECRET)).await.unwrap());
    let client = controller.await.unwrap();
    let mut stream = client
        .open(StreamRequest::new(StreamKind::Ssh))
        .await
        .unwrap();
    write_and_close(&mut stream, b"through").await;
    let echoed = read_all(&mut stream).await;
    assert_eq!(echoed, b"through");
}

#[tokio::test]
async fn dial_over_tls() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certified.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    // The TLS terminator forwards to the plain test controller.
    let mut controller = common::TestController::start().await;
    let backend = controller.addr;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut plain = TcpStream::connect(backend).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = dial_config(([127, 0, 0, 1], port).into(), SECRET);
    config.controller_url = format!("https://localhost:{port}/").parse().unwrap();
    config.tls = Some(Arc::new(client_tls));

    serve_echo(dial(&config).await.unwrap());
    let client = controller.next_tunnel().await;
    let mut stream = client
        .open(StreamRequest::new(StreamKind::Ssh))
        .await
        .unwrap();
    write_and_close(&mut stream, b"over tls").await;
    let echoed = read_all(&mut stream).await;
    assert_eq!(echoed, b"over tls");
}
