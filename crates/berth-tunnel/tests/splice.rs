//! `berth_tunnel::splice` on loopback TCP sockets and real pipes. Bytes
//! arrive exactly, and the end of one direction half-closes its sink
//! while the other goes on. A peer that closes early ends the join. A
//! sink the kernel cannot splice into falls back to the buffered copy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use berth_tunnel::splice::{splice_bidirectional, splice_one_way, Sink, Source};
use common::{pattern, read_all, write_and_close};
use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);

/// Returns both ends of one loopback TCP connection.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Returns the read and write ends of a new pipe.
fn os_pipe() -> (OwnedFd, OwnedFd) {
    let (read, write) = std::io::pipe().unwrap();
    (OwnedFd::from(read), OwnedFd::from(write))
}

/// Two TCP connections, `outer_a <-> inner_a` and `inner_b <-> outer_b`,
/// whose inner ends the test joins.
struct Joined {
    outer_a: TcpStream,
    outer_b: TcpStream,
    join: tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
}

async fn joined(a_unread: &'static [u8], b_unread: &'static [u8]) -> Joined {
    let (outer_a, inner_a) = tcp_pair().await;
    let (inner_b, outer_b) = tcp_pair().await;
    let join =
        tokio::spawn(
            async move { splice_bidirectional(&inner_a, &inner_b, a_unread, b_unread).await },
        );
    Joined {
        outer_a,
        outer_b,
        join,
    }
}

#[tokio::test]
async fn tcp_join_is_byte_exact_with_half_close() {
    let Joined {
        mut outer_a,
        mut outer_b,
        join,
    } = joined(b"", b"").await;
    let upload = pattern(1, 9 << 20);
    let download = pattern(2, 7 << 20);

    // A sends and half-closes; B reads to the end of file while A's
    // other half stays open, then replies on the direction still open.
    let (received_by_b, received_by_a) = tokio::time::timeout(LIMIT, async {
        let (mut a_read, mut a_write) = outer_a.split();
        let (mut b_read, mut b_write) = outer_b.split();
        tokio::join!(
            write_and_close(&mut a_write, &upload),
            async {
                let received = read_all(&mut b_read).await;
                write_and_close(&mut b_write, &download).await;
                received
            },
            read_all(&mut a_read),
        )
    })
    .await
    .map(|((), by_b, by_a)| (by_b, by_a))
    .expect("the transfer did not finish");

    assert_eq!(received_by_b.len(), upload.len());
    assert!(received_by_b == upload, "the bytes from A to B differ");
    assert_eq!(received_by_a.len(), download.len());
    assert!(received_by_a == download, "the bytes from B to A differ");
    let counts = tokio::time::timeout(LIMIT, join).await.unwrap().unwrap();
    assert_eq!(
        counts.unwrap(),
        (upload.len() as u64, download.len() as u64)
    );
}

#[tokio::test]
async fn tcp_join_sends_unread_bytes_first() {
    let Joined {
        mut outer_a,
        mut outer_b,
        join,
    } = joined(b"early from a|", b"early from b|").await;
    let (mut a_read, mut a_write) = outer_a.split();
    let (mut b_read, mut b_write) = outer_b.split();
    let (_, _, by_b, by_a) = tokio::time::timeout(LIMIT, async {
        tokio::join!(
            write_and_close(&mut a_write, b"rest from a"),
            write_and_close(&mut b_write, b"rest from b"),
            read_all(&mut b_read),
            read_all(&mut a_read),
        )
    })
    .await
    .unwrap();

    assert_eq!(by_b, b"early from a|rest from a");
    assert_eq!(by_a, b"early from b|rest from b");
    let counts = tokio::time::timeout(LIMIT, join).await.unwrap().unwrap();
    assert_eq!(counts.unwrap(), (24, 24));
}

#[tokio::test]
async fn peer_closing_early_ends_the_join() {
    let Joined {
        mut outer_a,
        outer_b,
        join,
    } = joined(b"", b"").await;
    let sender = tokio::spawn(async move {
        let chunk = pattern(3, 1 << 20);
        // Writes until the join closes A's connection.
        for _ in 0..256 {
            if outer_a.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    // B reads a little and drops its socket with data unread, which
    // resets the connection.
    let mut outer_b = outer_b;
    let mut first = vec![0_u8; 64 * 1024];
    outer_b.read_exact(&mut first).await.unwrap();
    drop(outer_b);

    let result = tokio::time::timeout(LIMIT, join)
        .await
        .expect("the join did not end after its peer closed")
        .expect("the join panicked");
    let error = result.expect_err("a reset peer must fail the join");
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{error}"
    );
    // The join's end dropped its sockets, so A's writer stops too.
    tokio::time::timeout(LIMIT, sender)
        .await
        .expect("the sender kept writing into the closed join")
        .unwrap();
}

#[tokio::test]
async fn pipes_join_a_tcp_socket_both_ways() {
    let (near, far) = tcp_pair().await;
    let (stdin_read, stdin_write) = os_pipe();
    let (stdout_read, stdout_write) = os_pipe();
    let upload = pattern(4, 5 << 20);
    let download = pattern(5, 3 << 20);

    // The test's own ends of the pipes are blocking, on threads.
    let feeder = {
        let upload = upload.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(stdin_write);
            std::io::Write::write_all(&mut file, &upload).unwrap();
        })
    };
    let collector = std::thread::spawn(move || {
        let mut file = std::fs::File::from(stdout_read);
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut received).unwrap();
        received
    });

    let stdin = pipe::Receiver::from_owned_fd(stdin_read).unwrap();
    let stdout = pipe::Sender::from_owned_fd(stdout_write).unwrap();
    let (mut far_read, mut far_write) = tokio::io::split(far);
    let (uploaded, downloaded, received_by_far, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(
            splice_one_way(Source::Pipe(&stdin), Sink::Tcp(&near), b""),
            async {
                let copied = splice_one_way(Source::Tcp(&near), Sink::Pipe(&stdout), b"").await;
                // The pipe's reader sees its end of file once this end
                // closes.
                drop(stdout);
                copied
            },
            read_all(&mut far_read),
            write_and_close(&mut far_write, &download),
        )
    })
    .await
    .expect("the transfer did not finish");

    feeder.join().unwrap();
    let received_by_pipe = collector.join().unwrap();
    assert_eq!(uploaded.unwrap(), upload.len() as u64);
    assert_eq!(downloaded.unwrap(), download.len() as u64);
    assert!(received_by_far == upload, "the bytes from the pipe differ");
    assert!(
        received_by_pipe == download,
        "the bytes into the pipe differ"
    );
}

#[tokio::test]
async fn unspliceable_sink_falls_back_to_buffered_copy() {
    let (source_near, mut source_far) = tcp_pair().await;
    let (sink_near, mut sink_far) = tcp_pair().await;
    // splice(2) rejects a sink in append mode with EINVAL, while write(2)
    // to a socket ignores the flag.
    let flags = OFlag::from_bits_truncate(fcntl(sink_near.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
    fcntl(
        sink_near.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_APPEND),
    )
    .unwrap();
    let (probe_read, probe_write) = os_pipe();
    nix::unistd::write(probe_write.as_fd(), b"x").unwrap();
    let probe = nix::fcntl::splice(
        probe_read.as_fd(),
        None,
        sink_near.as_fd(),
        None,
        1,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    );
    assert_eq!(probe, Err(nix::errno::Errno::EINVAL));

    let data = pattern(6, 6 << 20);
    let (copied, (), received) = tokio::time::timeout(LIMIT, async {
        tokio::join!(
            splice_one_way(Source::Tcp(&source_near), Sink::Tcp(&sink_near), b"head|"),
            write_and_close(&mut source_far, &data),
            read_all(&mut sink_far),
        )
    })
    .await
    .expect("the transfer did not finish");

    assert_eq!(copied.unwrap(), data.len() as u64 + 5);
    assert_eq!(&received[..5], b"head|");
    assert!(
        received[5..] == data[..],
        "the bytes of the fallback differ"
    );
}
