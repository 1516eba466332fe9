//! Port forwarding (`ssh -L`): a `direct-tcpip` channel connected to a
//! port on the container's own loopback interface.
//!
//! The socket is made inside the container's network namespace: a thread
//! of its own enters the namespace of the container's main process
//! (`setns` on `/proc/PID/ns/net`), connects, and ends, so no other task
//! ever runs in that namespace. The connected socket keeps the namespace
//! it was made in. This needs the supervisor to be root, as the `oci`
//! runtime does, and a runtime that reports the container's PID.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::CloneFlags;

/// How long a connection inside the container may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns the loopback address for a `direct-tcpip` destination host, or
/// `None` for a host outside the container: only the container's own
/// loopback interface is reachable.
pub(super) fn loopback_address(host: &str) -> Option<IpAddr> {
    match host {
        "localhost" | "127.0.0.1" | "0.0.0.0" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "::1" | "::" => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => None,
    }
}

/// Connects to `address` from inside the network namespace of the
/// process `pid`, on a thread that exists only for this.
pub(super) async fn connect_in_namespace(
    pid: u32,
    address: SocketAddr,
) -> io::Result<tokio::net::TcpStream> {
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-netns-connect".to_string())
        .spawn(move || {
            let connected = nix::sched::setns(&namespace, CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| TcpStream::connect_timeout(&address, CONNECT_TIMEOUT))
                .and_then(|stream| stream.set_nonblocking(true).map(|()| stream));
            // The receiver is gone only when the session ended meanwhile.
            let _ = sender.send(connected);
        })?;
    let stream = receiver
        .await
        .map_err(|_| io::Error::other("the connecting thread ended without a result"))??;
    tokio::net::TcpStream::from_std(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_forwarded() {
        assert_eq!(
            loopback_address("localhost"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            loopback_address("::"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(loopback_address("example.org"), None);
        assert_eq!(loopback_address("10.0.0.1"), None);
    }
}
