//! [`TunnelStream`]: one HTTP/2 stream of a tunnel as a byte stream that
//! implements tokio's `AsyncRead` and `AsyncWrite`.
//!
//! Flow control follows the bytes the application consumes: received
//! capacity is released only when `poll_read` hands bytes out, so a slow
//! reader holds the peer to one stream window of buffered data. Writes
//! wait for send capacity before they queue data, so a writer never
//! buffers more than the window the peer granted. `poll_shutdown` sends
//! END_STREAM (half-close): the peer reads end-of-file and may still
//! write. Dropping a stream that is not closed both ways resets it with
//! CANCEL.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest write queued at once; a larger buffer is taken in parts.
const MAX_WRITE: usize = 1024 * 1024;

/// One stream of a tunnel, readable and writable.
#[derive(Debug)]
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet; their capacity is not released yet.
    unread: Bytes,
    /// END_STREAM was read from the peer.
    read_closed: bool,
    /// END_STREAM was sent to the peer.
    write_closed: bool,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelStream {
        TunnelStream { send, recv, unread: Bytes::new(), read_closed: false, write_closed: false }
    }

    /// The HTTP/2 stream id, for logs.
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
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
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.unread = data,
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
                None => this.read_closed = true,
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown of a tunnel stream")));
        }
        this.send.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(this.send.poll_capacity(cx)) {
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

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued data is written by the connection's task; there is no
        // buffer of this stream's own to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if !(self.read_closed && self.write_closed) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

/// Maps an HTTP/2 error to the `io::Error` a byte stream's user expects:
/// a reset stream is `ConnectionReset`, a closed tunnel `ConnectionAborted`.
pub(crate) fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error.into_io().unwrap_or_else(|| io::Error::other("tunnel I/O failed"));
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
