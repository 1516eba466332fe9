//! Joining a client's upgraded connection to the upgraded forward to the
//! controller that holds the tunnel. When both are plain TCP sockets the
//! bytes move with splice(2) and never reach user space
//! ([`berth_tunnel::splice`]); when either is TLS, they are copied through
//! buffers.

use hyper::upgrade::{Parts, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{copy_both_ways, GatewayMetrics};

/// Copies bytes both ways between `client` and `forward` until both
/// directions have ended, with the half-close of [`copy_both_ways`], and
/// returns the bytes moved from the client and from the forward.
/// `buffer_bytes` sizes the buffers of the copy used when either
/// connection is not a plain TCP socket. A session that splice(2) carries
/// is counted in `metrics` when it starts.
pub(super) async fn join_upgraded(
    client: Upgraded,
    forward: Upgraded,
    buffer_bytes: usize,
    metrics: &GatewayMetrics,
) -> std::io::Result<(u64, u64)> {
    let client = match client.downcast::<TokioIo<TcpStream>>() {
        Ok(client) => client,
        Err(client) => {
            return copy_both_ways(
                &mut TokioIo::new(client),
                &mut TokioIo::new(forward),
                buffer_bytes,
            )
            .await;
        }
    };
    let forward = match forward.downcast::<TokioIo<TcpStream>>() {
        Ok(forward) => forward,
        Err(forward) => {
            return copy_with_unread(client, forward, buffer_bytes).await;
        }
    };
    metrics.count_spliced();
    // The HTTP read buffers may hold bytes that came after the upgrade's
    // header; they go first.
    berth_tunnel::splice::splice_bidirectional(
        client.io.inner(),
        forward.io.inner(),
        &client.read_buf,
        &forward.read_buf,
    )
    .await
}

/// Copies through buffers between a client on plain TCP, whose HTTP read
/// buffer may hold bytes for the forward, and a forward over TLS.
async fn copy_with_unread(
    client: Parts<TokioIo<TcpStream>>,
    forward: Upgraded,
    buffer_bytes: usize,
) -> std::io::Result<(u64, u64)> {
    let mut forward = TokioIo::new(forward);
    forward.write_all(&client.read_buf).await?;
    let mut tcp = client.io.into_inner();
    let (from_client, from_forward) = copy_both_ways(&mut tcp, &mut forward, buffer_bytes).await?;
    Ok((from_client + client.read_buf.len() as u64, from_forward))
}
