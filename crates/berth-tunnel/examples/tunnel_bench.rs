//! Measures the tunnel on loopback, in one process:
//! - throughput of one bulk stream through the tunnel, against a direct
//!   loopback TCP connection, for several HTTP/2 window settings and
//!   maximum frame sizes;
//! - resident memory per idle tunnel, with both ends in this process.
//!
//! Usage: `cargo run --release -p berth-tunnel --example tunnel_bench --
//! [SIZE_MIB] [IDLE_TUNNELS] [RTT_MS]` (default 1024, 2000 and 0); 0
//! IDLE_TUNNELS skips the memory measurement. With
//! RTT_MS above 0, both the direct connection and the tunnel go through
//! an in-process relay that delays each direction by half of it, so the
//! window settings show their effect on a network with latency. Each
//! idle tunnel takes two sockets, so `ulimit -n` must be above twice
//! IDLE_TUNNELS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use berth_core::{Secret, Uuid};
use berth_tunnel::{
    check_upgrade_request, dial, switching_protocols_response, DialConfig, SessionConfig,
    StreamKind, StreamRequest, TunnelClient, WindowConfig,
};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const UUID: &str = "zzzzz-dz642-0benchmark00000";
const SECRET: &str = "bench-secret";
const CHUNK: usize = 256 * 1024;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: usize = args.get(1).map_or(1024, |value| {
        value.parse().expect("SIZE_MIB must be a whole number")
    });
    let idle: usize = args.get(2).map_or(2000, |value| {
        value.parse().expect("IDLE_TUNNELS must be a whole number")
    });
    let rtt_ms: u64 = args.get(3).map_or(0, |value| {
        value.parse().expect("RTT_MS must be a whole number")
    });
    let rtt = Duration::from_millis(rtt_ms);
    let bytes = size_mib * 1024 * 1024;

    let direct = direct_tcp(bytes, rtt).await;
    println!("round-trip time added: {rtt_ms} ms");
    println!(
        "direct loopback TCP: {size_mib} MiB in {:.3} s = {:.0} MiB/s",
        direct.as_secs_f64(),
        rate(size_mib, direct)
    );
    let settings = [
        ("256 KiB / 1 MiB (yamux-like)", 256 * 1024, 1024 * 1024),
        ("1 MiB / 4 MiB", 1024 * 1024, 4 * 1024 * 1024),
        ("4 MiB / 16 MiB", 4 * 1024 * 1024, 16 * 1024 * 1024),
        (
            "8 MiB / 32 MiB (default)",
            8 * 1024 * 1024,
            32 * 1024 * 1024,
        ),
    ];
    for (name, stream_window, connection_window) in settings {
        let windows = WindowConfig {
            stream_window,
            connection_window,
            ..WindowConfig::default()
        };
        let tunnel = through_tunnel(bytes, windows, rtt).await;
        print_tunnel(&format!("windows {name}"), size_mib, tunnel, direct);
    }
    // Both ends advertise the same maximum frame size, so it bounds the
    // DATA frames of both directions.
    for frame_kib in [16, 64, 1024] {
        let windows = WindowConfig {
            max_frame_size: frame_kib * 1024,
            ..WindowConfig::default()
        };
        let tunnel = through_tunnel(bytes, windows, rtt).await;
        let name = format!("default windows, frames up to {frame_kib} KiB");
        print_tunnel(&name, size_mib, tunnel, direct);
    }

    idle_memory(idle).await;
}

fn print_tunnel(name: &str, size_mib: usize, tunnel: Duration, direct: Duration) {
    println!(
        "tunnel, {name}: {:.3} s = {:.0} MiB/s, ratio to direct {:.2}",
        tunnel.as_secs_f64(),
        rate(size_mib, tunnel),
        direct.as_secs_f64() / tunnel.as_secs_f64()
    );
}

fn rate(size_mib: usize, elapsed: Duration) -> f64 {
    size_mib as f64 / elapsed.as_secs_f64()
}

/// Writes `bytes` from `write` and reads them from `read`; returns the
/// time until the last byte was read.
async fn transfer<R, W>(mut read: R, mut write: W, bytes: usize) -> Duration
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a_u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK);
            write.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        write.shutdown().await.unwrap();
    });
    let mut buffer = vec![0_u8; CHUNK];
    let mut received = 0;
    loop {
        let n = read.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        received += n;
    }
    let elapsed = started.elapsed();
    writer.await.unwrap();
    assert_eq!(received, bytes);
    elapsed
}

async fn direct_tcp(bytes: usize, rtt: Duration) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = delayed(listener.local_addr().unwrap(), rtt).await;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
    transfer(server, client, bytes).await
}

/// Starts a controller on loopback that accepts tunnels and passes their
/// clients on.
async fn start_controller(
    session: SessionConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<TunnelClient>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (clients_tx, clients) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let clients_tx = clients_tx.clone();
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let clients_tx = clients_tx.clone();
                async move {
                    assert_eq!(check_upgrade_request(&request), Ok(SECRET));
                    tokio::spawn(async move {
                        let upgraded = hyper::upgrade::on(request).await.unwrap();
                        let client = TunnelClient::handshake(TokioIo::new(upgraded), &session)
                            .await
                            .unwrap();
                        let _ = clients_tx.send(client);
                    });
                    Ok::<_, hyper::Error>(switching_protocols_response::<Empty<Bytes>>())
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    (addr, clients)
}

fn dial_config(addr: SocketAddr, session: SessionConfig) -> DialConfig {
    let url = format!("http://{addr}/").parse().unwrap();
    let mut config = DialConfig::new(url, UUID.parse::<Uuid>().unwrap(), Secret::new(SECRET));
    config.session = session;
    config
}

/// Times one bulk stream from the controller's end to the supervisor's.
async fn through_tunnel(bytes: usize, windows: WindowConfig, rtt: Duration) -> Duration {
    let session = SessionConfig {
        windows,
        ..SessionConfig::default()
    };
    let (addr, mut clients) = start_controller(session).await;
    let addr = delayed(addr, rtt).await;
    let mut server = dial(&dial_config(addr, session)).await.unwrap();
    let client = clients.recv().await.unwrap();
    let (opened, accepted) = tokio::join!(
        client.open(StreamRequest::new(StreamKind::Tcp { port: 9 })),
        async { server.accept().await.unwrap().unwrap().accept().unwrap() }
    );
    let sending = opened.unwrap();
    let (_, write) = tokio::io::split(sending);
    let (read, _keep_open) = tokio::io::split(accepted);
    transfer(read, write, bytes).await
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("no VmRSS line in /proc/self/status")
}

/// Opens `count` idle tunnels, both ends in this process, and prints the
/// growth of resident memory per tunnel.
async fn idle_memory(count: usize) {
    if count == 0 {
        return;
    }
    let session = SessionConfig::default();
    let (addr, mut clients) = start_controller(session).await;
    // One tunnel first, so that one-time allocations are not counted.
    let mut servers = vec![dial(&dial_config(addr, session)).await.unwrap()];
    let mut clients_open = vec![clients.recv().await.unwrap()];
    let before = resident_kib();
    for _ in 0..count {
        servers.push(dial(&dial_config(addr, session)).await.unwrap());
        clients_open.push(clients.recv().await.unwrap());
    }
    // Let every tunnel finish its handshake traffic.
    for client in &clients_open {
        client.ping().await.unwrap();
    }
    let after = resident_kib();
    println!(
        "idle tunnels: {count}, resident memory {before} KiB before, {after} KiB after: {:.1} KiB per tunnel (dial side and accept side together)",
        (after - before) as f64 / count as f64
    );
}

/// Returns an address that relays to `target`, delaying each direction
/// by half of `rtt`; `target` itself when `rtt` is zero. The relay has
/// no bandwidth limit: it buffers whatever is in flight.
async fn delayed(target: SocketAddr, rtt: Duration) -> SocketAddr {
    if rtt.is_zero() {
        return target;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (inbound, _) = listener.accept().await.unwrap();
            let outbound = TcpStream::connect(target).await.unwrap();
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(delay_line(in_read, out_write, rtt / 2));
            tokio::spawn(delay_line(out_read, in_write, rtt / 2));
        }
    });
    addr
}

async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buffer = vec![0_u8; CHUNK];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + delay;
                    if chunks_tx.send((due, buffer[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some((due, chunk)) = chunks.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
