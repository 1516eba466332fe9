//! The tunnel end to end on loopback: a real HTTP/1.1 upgrade through
//! hyper, then HTTP/2 with the roles reversed, against a test controller.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_tunnel::{
    copy_bidirectional_stream, dial, maintain, StreamKind, StreamRequest, TunnelClient,
    TunnelError, TunnelServer, TunnelState, TunnelStream,
};
use common::{
    dial_config, echo, fast_keepalive, pattern, read_all, serve_echo, write_and_close, Relay,
    TestController, SECRET,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);

/// Opens a stream from the accept side and accepts it on the dial side,
/// at once, because `open` waits for the supervisor's response.
async fn open_pair(
    client: &TunnelClient,
    server: &mut TunnelServer,
    kind: StreamKind,
) -> (TunnelStream, TunnelStream) {
    let (ours, theirs) = tokio::join!(client.open(StreamRequest::new(kind)), async {
        let incoming = server.accept().await.unwrap().unwrap();
        assert_eq!(incoming.kind(), kind);
        incoming.accept().unwrap()
    });
    (ours.unwrap(), theirs)
}

#[tokio::test]
async fn wrong_secret_is_rejected_with_401() {
    let controller = TestController::start().await;
    let error = dial(&dial_config(controller.addr, "not-the-secret"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(401), "{error}");
    let message = error.to_string();
    assert!(message.contains(&controller.addr.to_string()), "{message}");
    assert!(message.contains("invalid gateway secret"), "{message}");
    assert!(message.contains("check the gateway secret"), "{message}");
    assert!(!message.contains(SECRET), "{message}");
}

#[tokio::test]
async fn hundred_streams_progress_beside_stalled_bulk() {
    let mut controller = TestController::start().await;
    serve_echo(dial(&dial_config(controller.addr, SECRET)).await.unwrap());
    let client = controller.next_tunnel().await;

    // A 64 MiB stream whose echo the test does not read yet: its windows fill up
    // and its writer stalls.
    let bulk_data = pattern(1, 64 * 1024 * 1024);
    let bulk = client
        .open(StreamRequest::new(StreamKind::Tcp { port: 9000 }))
        .await
        .unwrap();
    let (mut bulk_read, mut bulk_write) = tokio::io::split(bulk);
    let sent = bulk_data.clone();
    let bulk_writer = tokio::spawn(async move {
        write_and_close(&mut bulk_write, &sent).await;
    });

    // 100 small streams at once must all complete meanwhile.
    let small = (0..100_u64).map(|i| {
        let client = &client;
        async move {
            let data = pattern(100 + i, 16 * 1024 + i as usize);
            let stream = client
                .open(
                    StreamRequest::new(StreamKind::Ssh).requested_by("zzzzz-tpzed-000000000000000"),
                )
                .await
                .unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let expected = data.clone();
            let writer = async move {
                write_and_close(&mut write, &data).await;
            };
            let mut echoed = Vec::new();
            let reader = read.read_to_end(&mut echoed);
            let ((), read_result) = tokio::join!(writer, reader);
            read_result.unwrap();
            assert_eq!(echoed, expected, "stream {i} echoed other bytes");
        }
    });
    tokio::time::timeout(LIMIT, futures::future::join_all(small))
        .await
        .expect("small streams starved");
    assert!(
        !bulk_writer.is_finished(),
        "the bulk writer finished although nobody read its echo"
    );

    let mut echoed = Vec::with_capacity(bulk_data.len());
    tokio::time::timeout(LIMIT, bulk_read.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.len(), bulk_data.len());
    assert!(echoed == bulk_data, "the bulk stream's echo differs");
    bulk_writer.await.unwrap();
}

#[tokio::test]
async fn half_close_keeps_other_direction() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;

    // The controller half-closes first; the supervisor responds after
    // reading end-of-file.
    let (ours, incoming) = tokio::join!(client.open(StreamRequest::new(StreamKind::Ssh)), async {
        let incoming = server.accept().await.unwrap().unwrap();
        assert_eq!(incoming.kind(), StreamKind::Ssh);
        incoming.accept().unwrap()
    });
    let (mut ours, mut theirs) = (ours.unwrap(), incoming);
    write_and_close(&mut ours, b"hello").await;
    let received = read_all(&mut theirs).await;
    assert_eq!(received, b"hello");
    write_and_close(&mut theirs, b"read 5 bytes").await;
    let answer = read_all(&mut ours).await;
    assert_eq!(answer, b"read 5 bytes");

    // The supervisor half-closes first; the controller goes on writing.
    let (mut ours, mut theirs) =
        open_pair(&client, &mut server, StreamKind::Tcp { port: 22 }).await;
    write_and_close(&mut theirs, b"banner").await;
    let banner = read_all(&mut ours).await;
    assert_eq!(banner, b"banner");
    write_and_close(&mut ours, b"still writing").await;
    let late = read_all(&mut theirs).await;
    assert_eq!(late, b"still writing");

    // Write, shut down and drop at once, as a command that exits does:
    // the peer still reads every byte, although its own direction is open.
    let (ours, mut theirs) = open_pair(&client, &mut server, StreamKind::Ssh).await;
    let data = pattern(9, 4 * 1024 * 1024);
    let sent = data.clone();
    tokio::spawn(async move {
        let mut ours = ours;
        write_and_close(&mut ours, &sent).await;
    });
    let received = read_all(&mut theirs).await;
    assert_eq!(received.len(), data.len());
    assert!(received == data, "bytes written before the drop differ");
}

/// A client's socket joined to a tunnel stream by
/// `copy_bidirectional_stream`, as the holder of a tunnel joins a shell.
struct JoinedStream {
    /// The client's end of the socket.
    socket: TcpStream,
    /// The supervisor's end of the stream.
    theirs: TunnelStream,
    copy: tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
}

async fn join_stream(client: &TunnelClient, server: &mut TunnelServer) -> JoinedStream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ours, theirs) = open_pair(client, server, StreamKind::Ssh).await;
    let (socket, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let mut joined = accepted.unwrap().0;
    let copy = tokio::spawn(async move {
        let mut ours = ours;
        copy_bidirectional_stream(&mut joined, &mut ours, 8 * 1024).await
    });
    JoinedStream {
        socket: socket.unwrap(),
        theirs,
        copy,
    }
}

#[tokio::test]
async fn stream_copy_to_socket_is_byte_exact() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;

    // Each side half-closes in turn: first the client, then the
    // supervisor, who replies after its end of file.
    for client_first in [true, false] {
        let JoinedStream {
            mut socket,
            mut theirs,
            copy,
        } = join_stream(&client, &mut server).await;
        let upload = pattern(21, 6 << 20);
        let download = pattern(22, 5 << 20);
        let (by_supervisor, by_client) = tokio::time::timeout(LIMIT, async {
            if client_first {
                write_and_close(&mut socket, &upload).await;
                let by_supervisor = read_all(&mut theirs).await;
                write_and_close(&mut theirs, &download).await;
                (by_supervisor, read_all(&mut socket).await)
            } else {
                write_and_close(&mut theirs, &download).await;
                let by_client = read_all(&mut socket).await;
                write_and_close(&mut socket, &upload).await;
                (read_all(&mut theirs).await, by_client)
            }
        })
        .await
        .expect("the copy did not finish");

        assert_eq!(
            by_supervisor.len(),
            upload.len(),
            "client first: {client_first}"
        );
        assert!(
            by_supervisor == upload,
            "the bytes to the supervisor differ"
        );
        assert_eq!(
            by_client.len(),
            download.len(),
            "client first: {client_first}"
        );
        assert!(by_client == download, "the bytes to the client differ");
        let counts = tokio::time::timeout(LIMIT, copy).await.unwrap().unwrap();
        assert_eq!(
            counts.unwrap(),
            (upload.len() as u64, download.len() as u64)
        );
    }
}

#[tokio::test]
async fn stream_copy_ends_when_socket_resets() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;
    let JoinedStream {
        socket,
        mut theirs,
        copy,
    } = join_stream(&client, &mut server).await;

    // The client leaves with bytes unread, which resets its connection.
    theirs.write_all(&pattern(23, 1 << 20)).await.unwrap();
    socket.readable().await.unwrap();
    drop(socket);

    let result = tokio::time::timeout(LIMIT, copy)
        .await
        .expect("the copy did not end after the client left")
        .expect("the copy panicked");
    assert!(result.is_err(), "a reset client must fail the copy");
    // The copy dropped the stream without END_STREAM, so the supervisor
    // receives a reset, not a clean end.
    let mut rest = Vec::new();
    let error = tokio::time::timeout(LIMIT, theirs.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn dropped_stream_resets_peer() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;

    let (ours, mut theirs) = open_pair(&client, &mut server, StreamKind::Ssh).await;
    drop(ours);
    let mut buffer = [0_u8; 16];
    let error = theirs.read(&mut buffer).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");

    let (mut ours, theirs) = open_pair(&client, &mut server, StreamKind::Ssh).await;
    drop(theirs);
    let error = ours.read(&mut buffer).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn rejected_stream_reports_status() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;
    let (users_tx, mut users) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(stream)) = server.accept().await {
            let _ = users_tx.send(stream.requested_by().map(str::to_owned));
            stream.reject(StatusCode::FORBIDDEN);
        }
    });

    let request = StreamRequest::new(StreamKind::Tcp { port: 5432 })
        .requested_by("zzzzz-tpzed-000000000000001");
    let error = client.open(request).await.unwrap_err();
    assert!(
        matches!(&error, TunnelError::OpenRejected { path, status: 403 } if path == "/tcp/5432"),
        "{error:?}"
    );
    assert_eq!(
        users.recv().await.unwrap().as_deref(),
        Some("zzzzz-tpzed-000000000000001")
    );

    let invalid = StreamRequest::new(StreamKind::Ssh).requested_by("line\nbreak");
    let error = client.open(invalid).await.unwrap_err();
    assert!(
        matches!(error, TunnelError::InvalidHeader { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn grace_period_ends_open_streams() {
    let mut controller = TestController::start().await;
    let mut server = dial(&dial_config(controller.addr, SECRET)).await.unwrap();
    let client = controller.next_tunnel().await;
    let (mut ours, _theirs) = open_pair(&client, &mut server, StreamKind::Ssh).await;

    server.graceful_shutdown(Duration::from_millis(200));
    let end = tokio::time::timeout(LIMIT, server.accept())
        .await
        .expect("tunnel outlived its grace period");
    assert!(matches!(end, Ok(None)), "{end:?}");

    let mut buffer = [0_u8; 8];
    let read = tokio::time::timeout(LIMIT, ours.read(&mut buffer))
        .await
        .expect("stream outlived the tunnel");
    assert!(read.is_err(), "{read:?}");
    let _end = tokio::time::timeout(LIMIT, client.closed())
        .await
        .expect("accept side did not notice the close");
    assert!(matches!(client.state(), TunnelState::Closed(_)));
}

/// The controller's end sends no PINGs and closes a tunnel only after
/// silence: the supervisor's PINGs keep an idle tunnel open for many
/// times the silence limit (here 0.8 s).
#[tokio::test]
async fn keepalive_holds_idle_tunnel_open() {
    let mut controller = TestController::start_with(fast_keepalive()).await;
    let mut config = dial_config(controller.addr, SECRET);
    config.session = fast_keepalive();
    serve_echo(dial(&config).await.unwrap());
    let client = controller.next_tunnel().await;

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(matches!(client.state(), TunnelState::Open));
    let mut stream = client
        .open(StreamRequest::new(StreamKind::Ssh))
        .await
        .unwrap();
    stream.write_all(b"still here").await.unwrap();
    let mut echoed = [0_u8; 10];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(&echoed, b"still here");
}

#[tokio::test]
async fn keepalive_detects_silent_peer() {
    let mut controller = TestController::start_with(fast_keepalive()).await;
    let relay = Relay::start(controller.addr).await;
    let mut config = dial_config(relay.addr, SECRET);
    config.session = fast_keepalive();
    let mut server = dial(&config).await.unwrap();
    let client = controller.next_tunnel().await;
    assert!(client.ping().await.is_ok());

    relay.freeze();
    let server_end = tokio::time::timeout(LIMIT, server.accept())
        .await
        .expect("dial side did not notice");
    assert!(
        matches!(server_end, Err(TunnelError::KeepaliveTimeout(_))),
        "{server_end:?}"
    );
    let client_end = tokio::time::timeout(LIMIT, client.closed())
        .await
        .expect("accept side did not notice");
    let error = client_end.unwrap_err();
    assert!(matches!(*error, TunnelError::PeerSilent(_)), "{error:?}");
    assert!(matches!(
        client.open(StreamRequest::new(StreamKind::Ssh)).await,
        Err(TunnelError::Closed)
    ));
}

#[tokio::test]
async fn move_lands_new_streams_on_new_tunnel() {
    let mut first = TestController::start().await;
    let mut second = TestController::start().await;
    let relay = Relay::start(first.addr).await;
    let mut config = dial_config(relay.addr, SECRET);
    config.move_grace_period = Duration::from_secs(20);
    let supervisor = tokio::spawn(maintain(config, echo));

    let old = first.next_tunnel().await;
    let mut open_on_old = old.open(StreamRequest::new(StreamKind::Ssh)).await.unwrap();
    open_on_old.write_all(b"before the move; ").await.unwrap();

    // The load balancer now sends new connections to the second
    // controller, and the first requests that its tunnel move.
    relay.set_backend(second.addr);
    old.move_away(Duration::from_secs(20)).await.unwrap();
    assert!(matches!(
        old.open(StreamRequest::new(StreamKind::Ssh)).await,
        Err(TunnelError::Closed)
    ));

    let new = second.next_tunnel().await;
    let mut on_new = new
        .open(StreamRequest::new(StreamKind::Tcp { port: 80 }))
        .await
        .unwrap();
    write_and_close(&mut on_new, b"new tunnel").await;
    let echoed = read_all(&mut on_new).await;
    assert_eq!(echoed, b"new tunnel");

    // The old stream goes on after the supervisor's GOAWAY, then the old
    // tunnel closes by itself.
    tokio::time::timeout(LIMIT, old.draining()).await.unwrap();
    write_and_close(&mut open_on_old, b"after the move").await;
    let echoed = read_all(&mut open_on_old).await;
    assert_eq!(echoed, b"before the move; after the move");
    drop(open_on_old);
    tokio::time::timeout(LIMIT, old.closed())
        .await
        .expect("old tunnel did not close")
        .unwrap();
    assert!(matches!(old.state(), TunnelState::Closed(None)));
    assert!(matches!(new.state(), TunnelState::Open));
    assert!(!supervisor.is_finished());
    supervisor.abort();
}
