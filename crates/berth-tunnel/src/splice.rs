//! Joins plain TCP sockets and pipes with splice(2), so that the bytes
//! of a forwarded stream stay in the kernel.
//!
//! A *source* is read from and a *sink* is written to: each is a
//! [`TcpStream`] or a pipe's end (Tokio's [`pipe::Receiver`] or
//! [`pipe::Sender`], which put the descriptor in non-blocking mode). One
//! direction ([`splice_one_way`]) moves the bytes from its source into a
//! pipe of its own and from that pipe into its sink, with
//! `SPLICE_F_MOVE`, so the kernel passes page references instead of
//! copying. The pipe is drained before the next
//! read, so a splice that would block always waits on the one socket or
//! pipe it names. At the source's end of file the direction shuts down
//! the write half of a TCP sink (a half-close), as `tokio::io::copy`'s
//! callers do. A pipe sink ends when its owner drops it.
//!
//! When the kernel cannot splice between the two (splice(2) fails with
//! `EINVAL` or `ENOSYS`, or no pipe can be made), the direction moves the
//! rest with reads and writes through a buffer. splice(2) is Linux's, and
//! so is this module.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::unix::pipe;
use tokio::net::TcpStream;

/// Capacity asked for each direction's pipe: at most this many bytes are
/// in flight between a source and its sink. The pipe holds references to
/// the socket's pages, not copies, and only while bytes are in flight.
///
/// Linux counts each pipe's capacity against its user's
/// `/proc/sys/fs/pipe-user-pages-soft` (16,384 pages by default). Over
/// that limit, a user without `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN` gets
/// pipes of 2 pages and cannot enlarge them, so splice(2) still works but
/// with more calls per byte. At 256 KiB (64 pages) a direction, about 128
/// sessions fit under the default limit.
pub const PIPE_BYTES: usize = 256 * 1024;

/// Size of the buffer of the fallback path.
const FALLBACK_BUFFER_BYTES: usize = 64 * 1024;

/// The descriptor a direction reads from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Tcp(&'a TcpStream),
    Pipe(&'a pipe::Receiver),
}

/// The descriptor a direction writes to.
#[derive(Debug, Clone, Copy)]
pub enum Sink<'a> {
    Tcp(&'a TcpStream),
    Pipe(&'a pipe::Sender),
}

/// Copies bytes both ways between two TCP sockets until both directions
/// have ended. The end of one direction shuts down the write half of its
/// sink, and the other direction goes on. `a_unread` are bytes already
/// read from `a` (such as the rest of an HTTP read buffer) that go to `b`
/// first, and `b_unread` likewise. Returns the bytes moved from `a` to
/// `b` and from `b` to `a`, the unread bytes included. Fails on the first
/// error of either direction.
pub async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    a_unread: &[u8],
    b_unread: &[u8],
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        splice_one_way(Source::Tcp(a), Sink::Tcp(b), a_unread),
        splice_one_way(Source::Tcp(b), Sink::Tcp(a), b_unread),
    )
}

/// Writes `unread`, then moves bytes from `source` to `sink` until the
/// source's end of file, and then shuts down the write half of a TCP
/// sink. Returns the bytes written to the sink. Dropping the future stops
/// the copy; bytes still in the direction's pipe are lost with it.
pub async fn splice_one_way(source: Source<'_>, sink: Sink<'_>, unread: &[u8]) -> io::Result<u64> {
    sink.write_all(unread).await?;
    let mut total = unread.len() as u64;
    match sys::pipe() {
        Ok((pipe_read, pipe_write)) => {
            total += splice_through(source, sink, &pipe_read, &pipe_write).await?;
        }
        Err(error) => {
            tracing::debug!(error = %error, "no pipe for splice(2): copying through a buffer");
            total += copy_buffered(source, sink).await?;
        }
    }
    sink.shutdown()?;
    Ok(total)
}

/// Runs the splice loop of one direction, and falls back to
/// [`copy_buffered`] when the kernel cannot splice these descriptors.
async fn splice_through(
    source: Source<'_>,
    sink: Sink<'_>,
    pipe_read: &OwnedFd,
    pipe_write: &OwnedFd,
) -> io::Result<u64> {
    let mut total = 0_u64;
    loop {
        // The pipe is empty here, so the source alone can block the read.
        let read = match source.splice_into(pipe_write.as_fd()).await {
            Ok(0) => return Ok(total),
            Ok(read) => read,
            Err(error) if sys::is_unsupported(&error) => {
                tracing::debug!(error = %error, "splice(2) from the source failed: copying through a buffer");
                return Ok(total + copy_buffered(source, sink).await?);
            }
            Err(error) => return Err(error),
        };
        // The pipe holds `read` bytes, so the sink alone can block the
        // write.
        let mut in_pipe = read;
        while in_pipe > 0 {
            match sink.splice_from(pipe_read.as_fd(), in_pipe).await {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => in_pipe -= written,
                Err(error) if sys::is_unsupported(&error) => {
                    tracing::debug!(error = %error, "splice(2) to the sink failed: copying through a buffer");
                    drain_pipe(pipe_read, in_pipe, sink).await?;
                    return Ok(total + read as u64 + copy_buffered(source, sink).await?);
                }
                Err(error) => return Err(error),
            }
        }
        total += read as u64;
    }
}

/// Reads the `left` bytes in the direction's pipe and writes them to
/// `sink`.
async fn drain_pipe(pipe_read: &OwnedFd, mut left: usize, sink: Sink<'_>) -> io::Result<()> {
    let mut buffer = vec![0_u8; left.min(FALLBACK_BUFFER_BYTES)];
    while left > 0 {
        let want = left.min(buffer.len());
        // The bytes are in the pipe already, so the read does not block.
        let read = sys::read(pipe_read.as_fd(), &mut buffer[..want])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the direction's pipe ended before its bytes were read",
            ));
        }
        sink.write_all(&buffer[..read]).await?;
        left -= read;
    }
    Ok(())
}

/// Moves bytes from `source` to `sink` through a buffer until the
/// source's end of file; returns their count.
async fn copy_buffered(source: Source<'_>, sink: Sink<'_>) -> io::Result<u64> {
    let mut buffer = vec![0_u8; FALLBACK_BUFFER_BYTES];
    let mut total = 0_u64;
    loop {
        let read = source.read(&mut buffer).await?;
        if read == 0 {
            return Ok(total);
        }
        sink.write_all(&buffer[..read]).await?;
        total += read as u64;
    }
}

impl Source<'_> {
    /// Waits until the source is readable, then splices up to
    /// [`PIPE_BYTES`] into `pipe`; 0 is the end of file.
    async fn splice_into(self, pipe: BorrowedFd<'_>) -> io::Result<usize> {
        match self {
            Source::Tcp(tcp) => loop {
                tcp.readable().await?;
                match tcp.try_io(Interest::READABLE, || {
                    sys::splice(tcp.as_fd(), pipe, PIPE_BYTES)
                }) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
            Source::Pipe(receiver) => loop {
                receiver.readable().await?;
                match receiver.try_io(|| sys::splice(receiver.as_fd(), pipe, PIPE_BYTES)) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
        }
    }

    /// Reads into `buffer` once it is readable; 0 is the end of file.
    async fn read(self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Tcp(tcp) => loop {
                tcp.readable().await?;
                match tcp.try_read(buffer) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
            Source::Pipe(receiver) => loop {
                receiver.readable().await?;
                match receiver.try_read(buffer) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
        }
    }
}

impl Sink<'_> {
    /// Waits until the sink is writable, then splices up to `len` bytes
    /// from `pipe` into it.
    async fn splice_from(self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        match self {
            Sink::Tcp(tcp) => loop {
                tcp.writable().await?;
                match tcp.try_io(Interest::WRITABLE, || sys::splice(pipe, tcp.as_fd(), len)) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
            Sink::Pipe(sender) => loop {
                sender.writable().await?;
                match sender.try_io(|| sys::splice(pipe, sender.as_fd(), len)) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            },
        }
    }

    async fn write_all(self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let written = match self {
                Sink::Tcp(tcp) => {
                    tcp.writable().await?;
                    match tcp.try_write(bytes) {
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                        result => result?,
                    }
                }
                Sink::Pipe(sender) => {
                    sender.writable().await?;
                    match sender.try_write(bytes) {
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                        result => result?,
                    }
                }
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[written..];
        }
        Ok(())
    }

    /// Shuts down the write half of a TCP sink; a pipe sink ends when its
    /// owner drops it. A socket the peer already closed counts as shut
    /// down.
    fn shutdown(self) -> io::Result<()> {
        match self {
            Sink::Tcp(tcp) => sys::shutdown_write(tcp.as_fd()),
            Sink::Pipe(_) => Ok(()),
        }
    }
}

mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

    use nix::errno::Errno;
    use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};
    use nix::sys::socket::Shutdown;

    use super::PIPE_BYTES;

    /// Makes a non-blocking pipe and requests [`PIPE_BYTES`] of capacity.
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let size = i32::try_from(PIPE_BYTES).unwrap_or(i32::MAX);
        // Over the system's limit the pipe keeps its default capacity,
        // which only means more system calls per byte.
        let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size));
        Ok((read, write))
    }

    pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
    }

    /// True for the errors of splice(2) that mean it cannot join these
    /// two descriptors, as opposed to a failure of the stream.
    pub fn is_unsupported(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(code) if code == Errno::EINVAL as i32 || code == Errno::ENOSYS as i32
        )
    }

    pub fn read(fd: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(fd.as_raw_fd(), buffer)?)
    }

    pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
        match nix::sys::socket::shutdown(fd.as_raw_fd(), Shutdown::Write) {
            Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
