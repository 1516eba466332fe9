//! [`TunnelStream`]: one HTTP/2 stream of a tunnel as a byte stream that
//! implements tokio's `AsyncRead` and `AsyncWrite`.
//!
//! Flow control follows the bytes the application consumes: received
//! capacity is released only when `poll_read` hands bytes out, so a slow
//! reader holds the peer to one stream window of buffered data. Writes
//! wait for send capacity before they queue data, so a writer never
//! buffers more than the window the peer granted. `poll_shutdown` sends
//! END_STREAM (half-close): the peer reads end-of-file and may still
//! write. Dropping a stream before `poll_shutdown` resets it with CANCEL;
//! dropping it after `poll_shutdown` delivers what was written first.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest write queued at once; a larger buffer is taken in parts.
const MAX_WRITE: usize = 1024 * 1024;

/// Time a stream dropped after `poll_shutdown` keeps its HTTP/2 stream,
/// so that the data queued before END_STREAM goes out; see `Drop`.
const LINGER: Duration = Duration::from_secs(30);

/// One stream of a tunnel, readable and writable.
#[derive(Debug)]
pub struct TunnelStream {
    /// `None` only inside `drop`.
    halves: Option<Halves>,
    /// Received bytes not read yet; their capacity is not released yet.
    unread: Bytes,
    /// END_STREAM was read from the peer.
    read_closed: bool,
    /// END_STREAM was sent to the peer.
    write_closed: bool,
}

#[derive(Debug)]
struct Halves {
    send: SendStream<Bytes>,
    recv: RecvStream,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelStream {
        TunnelStream {
            halves: Some(Halves { send, recv }),
            unread: Bytes::new(),
            read_closed: false,
            write_closed: false,
        }
    }

    /// Returns the HTTP/2 stream id, for logs, or 0 once dropped.
    pub fn stream_id(&self) -> u32 {
        self.halves
            .as_ref()
            .map_or(0, |halves| halves.send.stream_id().as_u32())
    }

    fn halves(&mut self) -> io::Result<&mut Halves> {
        self.halves.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "tunnel stream already dropped")
        })
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread.split_to(n));
                // An error here means the stream is already reset; the
                // next read reports that.
                let _ = this.halves()?.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.halves()?.recv.poll_data(cx)) {
                Some(Ok(data)) => this.unread = data,
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
                None => this.read_closed = true,
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of a tunnel stream",
            )));
        }
        let send = &mut this.halves()?.send;
        let n = ready!(poll_send_capacity(send, cx, buf.len()))?;
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued data is written by the connection's task; there is no
        // buffer of this stream's own to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            end_stream(&mut this.halves()?.send)?;
            this.write_closed = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits for send capacity after requesting `requested` bytes of it (at
/// most [`MAX_WRITE`]). Returns how many bytes may be queued now, at
/// least 1.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    requested: usize,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(requested.min(MAX_WRITE));
    loop {
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity.min(requested)));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the tunnel stream was closed by its peer",
                )))
            }
        }
    }
}

/// Sends END_STREAM, the half-close of the stream's sending side.
fn end_stream(send: &mut SendStream<Bytes>) -> io::Result<()> {
    send.reserve_capacity(0);
    send.send_data(Bytes::new(), true).map_err(h2_to_io)
}

/// Copies bytes both ways between `peer` and `stream` until both
/// directions have ended, like `tokio::io::copy_bidirectional`: the end
/// of file of one side half-closes the other (END_STREAM towards the
/// tunnel, a write shutdown towards `peer`). Returns the bytes copied from
/// `peer` and from `stream`, and fails on the first error of either
/// direction.
///
/// Unlike a copy through `AsyncRead` and `AsyncWrite`, no byte is copied
/// in user space. A read from `peer` takes up to `read_bytes` into a
/// buffer that becomes the DATA frames' payload as it is. Each DATA
/// frame's payload is written to `peer` as it arrived, up to the tunnel's
/// maximum frame size at once, and its flow-control capacity is released
/// once it is written.
pub async fn copy_bidirectional_stream<P>(
    peer: &mut P,
    stream: &mut TunnelStream,
    read_bytes: usize,
) -> io::Result<(u64, u64)>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let TunnelStream {
        halves,
        unread,
        read_closed,
        write_closed,
    } = stream;
    let Halves { send, recv } = halves.as_mut().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotConnected, "tunnel stream already dropped")
    })?;
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);

    let upload = async {
        let mut total = 0_u64;
        if !*write_closed {
            let mut buffer = BytesMut::new();
            loop {
                buffer.reserve(read_bytes);
                if peer_read.read_buf(&mut buffer).await? == 0 {
                    break;
                }
                let mut data = buffer.split().freeze();
                total += data.len() as u64;
                while !data.is_empty() {
                    let n =
                        std::future::poll_fn(|cx| poll_send_capacity(send, cx, data.len())).await?;
                    send.send_data(data.split_to(n), false).map_err(h2_to_io)?;
                }
            }
            end_stream(send)?;
            *write_closed = true;
        }
        Ok::<_, io::Error>(total)
    };

    let download = async {
        let mut total = 0_u64;
        let mut data = std::mem::take(unread);
        loop {
            if !data.is_empty() {
                peer_write.write_all(&data).await?;
                total += data.len() as u64;
                // An error here means the stream is already reset; the
                // next poll reports that.
                let _ = recv.flow_control().release_capacity(data.len());
            }
            if *read_closed {
                break;
            }
            data = match recv.data().await {
                Some(Ok(data)) => data,
                Some(Err(error)) => return Err(h2_to_io(error)),
                None => {
                    *read_closed = true;
                    Bytes::new()
                }
            };
        }
        peer_write.shutdown().await?;
        Ok(total)
    };

    tokio::try_join!(upload, download)
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let Some(Halves { mut send, recv }) = self.halves.take() else {
            return;
        };
        if !self.write_closed {
            // The writer did not finish: abort the stream.
            send.send_reset(Reason::CANCEL);
            return;
        }
        if self.read_closed {
            return;
        }
        // END_STREAM is queued but the peer still sends. Dropping the
        // handles now would make `h2` reset the stream, and a reset
        // discards the data still queued. So the stream lingers until the
        // peer ends its side or resets it, or for LINGER at most. What the
        // peer sends meanwhile is read and discarded.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(send, recv));
        }
    }
}

async fn linger(send: SendStream<Bytes>, mut recv: RecvStream) {
    let drain = async {
        while let Some(Ok(data)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(data.len());
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    drop(send);
}

/// Maps an HTTP/2 error to the `io::Error` a byte stream's user expects:
/// a reset stream is `ConnectionReset`, a closed tunnel `ConnectionAborted`.
pub(crate) fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("tunnel I/O failed"));
    }
    let kind = if error.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if error.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, error)
}
