//! Measures the container gateway on loopback. `scripts/bench/run-gateway.sh`
//! runs it. Two modes:
//!
//! - `stream`: one bulk stream from a client through controller 1, which
//!   forwards it to controller 2, and through controller 2's tunnel to a
//!   fake supervisor. It runs both ways, against a direct loopback TCP
//!   connection in the same run. There is one pair of controllers per
//!   `--copy-buffers` size, all in this process (`bind` and `run`) on one
//!   SQLite file. The client uses berth-client's `connect_ssh` on the real
//!   `connect/{uuid}/ssh` route. The fake supervisor is berth-tunnel's
//!   dial side, which sinks or sources the bytes. The `relays` ways
//!   are the floor of any design on this path on one host: the same
//!   loopback TCP connections, each joined to the next by splice(2) in a
//!   relay, with no HTTP/2 and no copy through user space.
//! - `tunnels`: the dial side of COUNT idle tunnels to a controller in
//!   another process (`berth controller`). It creates COUNT containers
//!   through the API, each a committed request locked with the system
//!   token for its gateway secret. It times sequential API reads without
//!   tunnels, then opens the tunnels. It reads the controller's resident
//!   memory (VmRSS of its pid) before and after, and times the same reads
//!   again with the tunnels open.
//!
//! Usage:
//! `gateway_bench stream [--size-mib N] [--rounds N] [--copy-buffers BYTES,...]
//!  [--ways holder,forwarded,relays]` (the direct connection always runs,
//!  as the baseline)
//! `gateway_bench tunnels --url URL --system-token-file FILE
//!  --user-token-file FILE --controller-pid PID [--count N] [--requests N]
//!  [--client-cpu N]`

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use berth_client::{Client, Settings, Token};
use berth_controller::{bind, create_user_in, ClusterSettings, Config};
use berth_core::{Secret, Uuid};
use berth_tunnel::{dial, DialConfig, IncomingStream, StreamKind, TunnelServer};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Size of each write of the bulk stream's sender and each read of its
/// receiver.
const CHUNK: usize = 256 * 1024;

/// The first byte of a bulk stream: the client sends the bytes and the
/// supervisor sinks them.
const UPLOAD: u8 = b'u';

/// The first byte of a bulk stream: the supervisor sends the bytes.
const DOWNLOAD: u8 = b'd';

/// The system token of the in-process controllers of `stream`.
const SYSTEM_TOKEN: &str = "system-token-for-the-gateway-benchmark";

/// Containers created, and tunnels opened, at once in `tunnels`.
const SETUP_CONCURRENCY: usize = 8;
const DIAL_CONCURRENCY: usize = 32;

/// Time between the starts of two timed API reads. 4000 reads span 20 s,
/// longer than one keepalive interval (15 s) and several lease
/// heartbeats (5 s), so both fall inside the timed window.
const REQUEST_SPACING: Duration = Duration::from_millis(5);

/// Limit on waiting for the controller to register every tunnel.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("stream") => stream_bench(&parse_stream_args(&args[1..])?).await,
        Some("tunnels") => tunnels_bench(parse_tunnels_args(&args[1..])?).await,
        _ => bail!("give a mode: `stream [--size-mib N] [--rounds N] [--copy-buffers BYTES,...] [--ways holder,forwarded,relays]` or `tunnels --url URL --system-token-file FILE --user-token-file FILE --controller-pid PID [--count N] [--requests N] [--client-cpu N]`"),
    }
}

/// Reads the value after `flag` as a whole number above 0.
fn positive(flag: &str, value: Option<&String>) -> anyhow::Result<usize> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .ok()
        .filter(|number| *number > 0)
        .with_context(|| format!("invalid {flag} {value:?}: give a whole number above 0"))
}

struct StreamArgs {
    size_mib: usize,
    rounds: usize,
    /// `shell_copy_buffer_bytes` of each pair of controllers.
    copy_buffers: Vec<usize>,
    /// Run the ways through the holder alone.
    holder: bool,
    /// Run the ways through controller 1 and the holder.
    forwarded: bool,
    /// Run the ways through one and two splice relays.
    relays: bool,
}

fn parse_stream_args(args: &[String]) -> anyhow::Result<StreamArgs> {
    let mut parsed = StreamArgs {
        size_mib: 1024,
        rounds: 3,
        copy_buffers: vec![8 << 10, 64 << 10],
        holder: true,
        forwarded: true,
        relays: true,
    };
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--size-mib" => parsed.size_mib = positive(word, words.next())?,
            "--rounds" => parsed.rounds = positive(word, words.next())?,
            "--copy-buffers" => {
                let list = words.next().context("--copy-buffers needs a list of byte counts")?;
                parsed.copy_buffers = list
                    .split(',')
                    .map(|bytes| {
                        bytes.trim().parse().with_context(|| {
                            format!("invalid --copy-buffers {list:?}: give byte counts separated by commas")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "--ways" => {
                let list = words
                    .next()
                    .context("--ways needs a list of holder, forwarded and relays")?;
                parsed.holder = false;
                parsed.forwarded = false;
                parsed.relays = false;
                for way in list.split(',') {
                    match way.trim() {
                        "holder" => parsed.holder = true,
                        "forwarded" => parsed.forwarded = true,
                        "relays" => parsed.relays = true,
                        other => bail!("invalid way {other:?} in --ways {list:?}: use holder, forwarded or relays, separated by commas"),
                    }
                }
            }
            other => bail!("unknown argument {other:?} of `stream`: use [--size-mib N] [--rounds N] [--copy-buffers BYTES,...] [--ways holder,forwarded,relays]"),
        }
    }
    Ok(parsed)
}

struct TunnelsArgs {
    url: url::Url,
    system_token: String,
    user_token: String,
    controller_pid: u32,
    count: usize,
    requests: usize,
    /// The CPU the timing client runs on, when given.
    client_cpu: Option<usize>,
}

fn parse_tunnels_args(args: &[String]) -> anyhow::Result<TunnelsArgs> {
    let mut url = None;
    let mut token_file: Option<PathBuf> = None;
    let mut user_token_file: Option<PathBuf> = None;
    let mut pid = None;
    let mut count = 10_000;
    let mut requests = 4000;
    let mut client_cpu = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let value = words.next();
        match word.as_str() {
            "--url" => {
                let value = value.context("--url needs the controller's base URL")?;
                url = Some(
                    url::Url::parse(value).with_context(|| format!("invalid --url {value:?}"))?,
                );
            }
            "--system-token-file" => {
                token_file = Some(value.context("--system-token-file needs a path")?.into());
            }
            "--user-token-file" => {
                user_token_file = Some(value.context("--user-token-file needs a path")?.into());
            }
            "--controller-pid" => pid = Some(positive(word, value)?),
            "--count" => count = positive(word, value)?,
            "--requests" => requests = positive(word, value)?,
            "--client-cpu" => {
                let value = value.context("--client-cpu needs a CPU number")?;
                client_cpu = Some(value.parse().with_context(|| {
                    format!("invalid --client-cpu {value:?}: give a CPU number such as 0")
                })?);
            }
            other => bail!("unknown argument {other:?} of `tunnels`"),
        }
    }
    let system_token = read_token(token_file.context("missing --system-token-file")?)?;
    let user_token = read_token(user_token_file.context("missing --user-token-file")?)?;
    Ok(TunnelsArgs {
        url: url.context("missing --url")?,
        system_token,
        user_token,
        controller_pid: u32::try_from(pid.context("missing --controller-pid")?)
            .context("--controller-pid is too large")?,
        count,
        requests,
        client_cpu,
    })
}

/// Reads a token from a file, without surrounding whitespace.
fn read_token(path: PathBuf) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let token = text.trim().to_owned();
    ensure!(
        !token.is_empty(),
        "{} is empty: write an API token in it",
        path.display()
    );
    Ok(token)
}

// ---------------------------------------------------------------- stream

fn cluster() -> anyhow::Result<ClusterSettings> {
    Ok(ClusterSettings {
        cluster_id: "zzzzz".parse().context("invalid cluster id")?,
        system_token: Secret::new(SYSTEM_TOKEN),
    })
}

/// A controller of this process, served until it is stopped.
struct Controller {
    url: url::Url,
    state: berth_controller::AppState,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Controller {
    async fn start(
        database_url: &str,
        blocks: PathBuf,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Controller> {
        let mut config = Config::new("127.0.0.1:0".parse()?, database_url);
        config.blocks.directory = blocks;
        adjust(&mut config);
        let bound = bind(cluster()?, config).await?;
        let url = format!("{}/", bound.url()).parse()?;
        let state = bound.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Ok(Controller {
            url,
            state,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Sends a JSON API call and returns the response's body. Fails on a
/// status other than 2xx.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: url::Url,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut request = http.request(method.clone(), url.clone()).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(
        status.is_success(),
        "{method} {url} returned {status}: {text}"
    );
    Ok(serde_json::from_str(&text)?)
}

/// Returns the body of a request for a container that never runs. The
/// benchmarks need only its record and its gateway secret.
fn container_request() -> Value {
    json!({"container_request": {
        "use_existing": false,
        "name": "gateway-bench",
        "state": "Committed",
        "container_image": "localhost/busybox:latest",
        "command": ["true"],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1048576}},
        "runtime_constraints": {"ram": 67108864, "vcpus": 1},
        "priority": 1,
    }})
}

/// Creates a committed request as the user of `user_token` and locks its
/// container with `system_token`; returns the container's uuid and
/// gateway secret.
async fn locked_container(
    http: &reqwest::Client,
    base: &url::Url,
    user_token: &str,
    system_token: &str,
) -> anyhow::Result<(String, String)> {
    let request = call(
        http,
        reqwest::Method::POST,
        base.join("arvados/v1/container_requests")?,
        user_token,
        Some(container_request()),
    )
    .await?;
    let uuid = request["container_uuid"]
        .as_str()
        .context("the new request has no container_uuid")?
        .to_owned();
    let locked = call(
        http,
        reqwest::Method::POST,
        base.join(&format!("arvados/v1/containers/{uuid}/lock"))?,
        system_token,
        None,
    )
    .await?;
    let secret = locked["credentials"]["gateway_secret"]
        .as_str()
        .context("the lock returned no gateway_secret")?
        .to_owned();
    Ok((uuid, secret))
}

fn dial_config(base: &url::Url, uuid: &str, secret: &str) -> anyhow::Result<DialConfig> {
    Ok(DialConfig::new(
        base.clone(),
        uuid.parse::<Uuid>()?,
        Secret::new(secret),
    ))
}

/// Serves one bulk stream as the supervisor's end. After UPLOAD it reads
/// to the end and writes back the byte count. After DOWNLOAD and a length
/// it writes that many bytes. Then it half-closes.
async fn serve_bulk<S>(mut stream: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let command = stream.read_u8().await?;
    match command {
        UPLOAD => {
            let received = read_to_end_counting(&mut stream).await?;
            stream.write_u64(received).await?;
        }
        DOWNLOAD => {
            let length = stream.read_u64().await?;
            write_zeros(&mut stream, length).await?;
        }
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown bulk command byte {other}"),
            ))
        }
    }
    stream.shutdown().await
}

async fn read_to_end_counting<R: AsyncRead + Unpin>(read: &mut R) -> std::io::Result<u64> {
    let mut buffer = vec![0_u8; CHUNK];
    let mut total = 0_u64;
    loop {
        let n = read.read(&mut buffer).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

async fn write_zeros<W: AsyncWrite + Unpin>(write: &mut W, length: u64) -> std::io::Result<()> {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut left = length;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        write.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Moves `bytes` through `stream` in `direction` as the client and returns
/// the time from the first byte sent until the last byte (or, for an
/// upload, the supervisor's count of them) arrived.
async fn bulk_client<S>(mut stream: S, direction: u8, bytes: u64) -> anyhow::Result<Duration>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    stream.write_u8(direction).await?;
    if direction == UPLOAD {
        write_zeros(&mut stream, bytes).await?;
        stream.shutdown().await?;
        let received = stream.read_u64().await?;
        ensure!(
            received == bytes,
            "the supervisor received {received} of {bytes} bytes"
        );
    } else {
        stream.write_u64(bytes).await?;
        stream.flush().await?;
        let received = read_to_end_counting(&mut stream).await?;
        ensure!(
            received == bytes,
            "the client received {received} of {bytes} bytes"
        );
        stream.shutdown().await?;
    }
    Ok(started.elapsed())
}

/// Accepts the tunnel's streams and serves each as a bulk stream.
async fn fake_supervisor(mut tunnel: TunnelServer) {
    while let Ok(Some(incoming)) = tunnel.accept().await {
        tokio::spawn(serve_incoming(incoming));
    }
}

async fn serve_incoming(incoming: IncomingStream) {
    if incoming.kind() != StreamKind::Ssh {
        incoming.reject(reqwest::StatusCode::NOT_FOUND);
        return;
    }
    if let Ok(stream) = incoming.accept() {
        if let Err(error) = serve_bulk(stream).await {
            println!("supervisor: bulk stream failed: {error}");
        }
    }
}

/// Starts a loopback TCP listener that serves every connection as a bulk
/// stream, the baseline, and returns its address.
async fn direct_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve_bulk(tcp));
        }
    });
    Ok(addr)
}

/// Starts a loopback TCP listener that joins each connection to a new
/// connection to `next` with splice(2), and returns its address.
async fn splice_relay(next: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let outbound = match TcpStream::connect(next).await {
                    Ok(outbound) => outbound,
                    Err(error) => {
                        println!("relay: failed to connect to {next}: {error}");
                        return;
                    }
                };
                let joined = match (inbound.set_nodelay(true), outbound.set_nodelay(true)) {
                    (Ok(()), Ok(())) => {
                        berth_tunnel::splice::splice_bidirectional(&inbound, &outbound, &[], &[])
                            .await
                            .map(|_| ())
                    }
                    (Err(error), _) | (_, Err(error)) => Err(error),
                };
                if let Err(error) = joined {
                    println!("relay: the stream to {next} failed: {error}");
                }
            });
        }
    });
    Ok(addr)
}

/// The entry of the bulk stream.
enum Entry {
    /// A loopback TCP listener: the direct server or a relay before it.
    Tcp(std::net::SocketAddr),
    /// A controller's client, and the container whose gateway the stream
    /// goes to.
    Controller(Client, String),
}

/// One way through which the bulk stream goes.
struct Way {
    label: String,
    entry: Entry,
}

/// A pair of controllers with one shell copy buffer size, and a container
/// whose tunnel the second one holds.
struct Pair {
    name: String,
    forwarder: Controller,
    holder: Controller,
    uuid: String,
    supervisor: JoinHandle<()>,
}

impl Pair {
    async fn start(
        name: &str,
        copy_buffer_bytes: usize,
        database_url: &str,
        scratch: &std::path::Path,
        user_token: Option<&str>,
    ) -> anyhow::Result<(Pair, String)> {
        let adjust = |config: &mut Config| config.shell_copy_buffer_bytes = copy_buffer_bytes;

        let forwarder = Controller::start(
            database_url,
            scratch.join(format!("blocks-{copy_buffer_bytes}-1")),
            adjust,
        )
        .await?;
        let holder = Controller::start(
            database_url,
            scratch.join(format!("blocks-{copy_buffer_bytes}-2")),
            adjust,
        )
        .await?;

        let user_token = match user_token {
            Some(token) => token.to_owned(),
            None => create_user_in(forwarder.state.store(), &cluster()?, "bench", false).await?,
        };
        let http = reqwest::Client::new();
        let (uuid, secret) =
            locked_container(&http, &forwarder.url, &user_token, SYSTEM_TOKEN).await?;
        call(
            &http,
            reqwest::Method::PUT,
            forwarder
                .url
                .join(&format!("arvados/v1/containers/{uuid}"))?,
            SYSTEM_TOKEN,
            Some(json!({"container": {"state": "Running"}})),
        )
        .await?;

        let tunnel = dial(&dial_config(&holder.url, &uuid, &secret)?).await?;
        let supervisor = tokio::spawn(fake_supervisor(tunnel));
        let started = Instant::now();
        while holder.state.gateway().tunnel_count() == 0 {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "controller {} did not register the tunnel within 30 s",
                holder.url
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pair = Pair {
            name: name.to_owned(),
            forwarder,
            holder,
            uuid,
            supervisor,
        };
        Ok((pair, user_token))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.supervisor.abort();
        self.forwarder.stop().await?;
        self.holder.stop().await
    }
}

fn user_client(controller: &Controller, token: &str) -> anyhow::Result<Client> {
    Ok(Client::new(Settings {
        base_url: controller.url.clone(),
        token: Token::new(token),
        insecure: false,
    })?)
}

async fn stream_bench(args: &StreamArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}", scratch.path().join("berth.db").display());
    let default_bytes = berth_controller::config::defaults::SHELL_COPY_BUFFER_BYTES;
    let mut pairs = Vec::new();
    let mut user_token: Option<String> = None;
    for &bytes in &args.copy_buffers {
        let mut name = format!("{} KiB copy buffers", bytes >> 10);
        if bytes == default_bytes {
            name.push_str(" (default)");
        }
        let (pair, token) = Pair::start(
            &name,
            bytes,
            &database_url,
            scratch.path(),
            user_token.as_deref(),
        )
        .await?;
        user_token = Some(token);
        pairs.push(pair);
    }
    let user_token = user_token.context("give at least one copy buffer size")?;
    let direct = direct_server().await?;

    let mut ways = vec![Way {
        label: "direct loopback TCP".into(),
        entry: Entry::Tcp(direct),
    }];
    if args.relays {
        let first_relay = splice_relay(direct).await?;
        let second_relay = splice_relay(first_relay).await?;
        ways.push(Way {
            label: "floor, no HTTP/2: client -> splice relay -> server".into(),
            entry: Entry::Tcp(first_relay),
        });
        ways.push(Way {
            label: "floor, no HTTP/2: client -> splice relay -> splice relay -> server".into(),
            entry: Entry::Tcp(second_relay),
        });
    }
    for pair in &pairs {
        if args.holder {
            ways.push(Way {
                label: format!("{}: client -> holder -> tunnel", pair.name),
                entry: Entry::Controller(
                    user_client(&pair.holder, &user_token)?,
                    pair.uuid.clone(),
                ),
            });
        }
        if args.forwarded {
            ways.push(Way {
                label: format!("{}: client -> controller 1 -> holder -> tunnel", pair.name),
                entry: Entry::Controller(
                    user_client(&pair.forwarder, &user_token)?,
                    pair.uuid.clone(),
                ),
            });
        }
    }

    let bytes = (args.size_mib as u64) * 1024 * 1024;
    println!(
        "bulk stream of {} MiB, {} rounds, the ways in turn within each round",
        args.size_mib, args.rounds
    );
    for direction in [UPLOAD, DOWNLOAD] {
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
        for _ in 0..args.rounds {
            for (way, samples) in ways.iter().zip(&mut times) {
                let elapsed = match &way.entry {
                    Entry::Controller(client, uuid) => {
                        bulk_client(client.connect_ssh(uuid).await?, direction, bytes).await?
                    }
                    Entry::Tcp(address) => {
                        let tcp = TcpStream::connect(address).await?;
                        tcp.set_nodelay(true)?;
                        bulk_client(tcp, direction, bytes).await?
                    }
                };
                samples.push(elapsed.as_secs_f64());
            }
        }
        let medians: Vec<f64> = times.iter_mut().map(|samples| median(samples)).collect();
        if direction == UPLOAD {
            println!("client to supervisor:");
        } else {
            println!("supervisor to client:");
        }
        for (way, middle) in ways.iter().zip(&medians) {
            println!(
                "  {:<96} median {:.3} s = {:>5.0} MiB/s, ratio to direct {:.2}",
                way.label,
                middle,
                args.size_mib as f64 / middle,
                medians[0] / middle
            );
        }
    }

    for pair in pairs {
        pair.stop().await?;
    }
    Ok(())
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

// --------------------------------------------------------------- tunnels

/// Returns the resident memory of process `pid` in KiB.
fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))
}

/// Reads `containers/{uuid}` `count` times, one after the other and
/// started REQUEST_SPACING apart. The calls run on a thread and runtime of
/// their own, on the CPU `cpu` when given, so this process's tunnels do
/// not delay the client. Returns the latencies in milliseconds, sorted.
fn time_reads(
    base: &url::Url,
    token: &str,
    uuid: &str,
    count: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Vec<f64>> {
    let url = base.join(&format!("arvados/v1/containers/{uuid}"))?;
    let token = token.to_owned();
    let thread = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        if let Some(cpu) = cpu {
            let mut set = rustix::thread::CpuSet::new();
            set.set(cpu);
            rustix::thread::sched_setaffinity(None, &set)
                .with_context(|| format!("failed to move the timing client to CPU {cpu}"))?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let http = reqwest::Client::new();
            // One call first, so that the connection is open.
            call(&http, reqwest::Method::GET, url.clone(), &token, None).await?;
            let mut latencies = Vec::with_capacity(count);
            let mut next = tokio::time::Instant::now();
            for _ in 0..count {
                tokio::time::sleep_until(next).await;
                next += REQUEST_SPACING;
                let started = Instant::now();
                call(&http, reqwest::Method::GET, url.clone(), &token, None).await?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            latencies.sort_by(f64::total_cmp);
            Ok(latencies)
        })
    });
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the timing thread panicked"))?
}

/// Returns the nearest-rank percentile `p` (0 to 100) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Returns the number of tunnels the controller's metrics show registered.
async fn registered_tunnels(
    http: &reqwest::Client,
    base: &url::Url,
    system_token: &str,
) -> anyhow::Result<usize> {
    let text = http
        .get(base.join("metrics")?)
        .bearer_auth(system_token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix("berth_gateway_tunnels "))
        .and_then(|value| value.trim().parse().ok())
        .context("the metrics have no berth_gateway_tunnels line")
}

async fn wait_registered(
    http: &reqwest::Client,
    base: &url::Url,
    system_token: &str,
    expected: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let registered = registered_tunnels(http, base, system_token).await?;
        if registered == expected {
            return Ok(());
        }
        ensure!(
            started.elapsed() < REGISTER_TIMEOUT,
            "the controller has {registered} tunnels registered, not {expected}, after {REGISTER_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dials a tunnel for each container, DIAL_CONCURRENCY at once.
async fn open_tunnels(
    base: &url::Url,
    containers: &[(String, String)],
) -> anyhow::Result<Vec<TunnelServer>> {
    let dials = futures::stream::iter(containers.iter().map(|(uuid, secret)| {
        let config = dial_config(base, uuid, secret);
        async move { Ok::<_, anyhow::Error>(dial(&config?).await?) }
    }))
    .buffer_unordered(DIAL_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    dials.into_iter().collect()
}

fn print_latencies(name: &str, latencies: &[f64]) {
    println!(
        "  {name:<28} {} reads: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(latencies, 50.0),
        percentile(latencies, 99.0),
        latencies.last().copied().unwrap_or(0.0)
    );
}

async fn tunnels_bench(args: TunnelsArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let system_token = Arc::new(args.system_token);
    let base = Arc::new(args.url);

    let user_token = args.user_token.clone();
    let started = Instant::now();
    let total = args.count;
    let containers = futures::stream::iter((0..total).map(|_| {
        let (http, base, system_token, user_token) = (
            http.clone(),
            base.clone(),
            system_token.clone(),
            user_token.clone(),
        );
        async move { locked_container(&http, &base, &user_token, &system_token).await }
    }))
    .buffer_unordered(SETUP_CONCURRENCY)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "created and locked {total} containers through the API in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (probe, _) = &containers[0];

    let without = time_reads(&base, &user_token, probe, args.requests, args.client_cpu)?;

    // One tunnel first, so that one-time allocations are not counted.
    let mut tunnels = open_tunnels(&base, &containers[..1]).await?;
    wait_registered(&http, &base, &system_token, 1).await?;
    let before_kib = resident_kib(args.controller_pid)?;
    let own_before_kib = resident_kib(std::process::id())?;

    let started = Instant::now();
    tunnels.extend(open_tunnels(&base, &containers[1..]).await?);
    wait_registered(&http, &base, &system_token, total).await?;
    println!(
        "opened {} more tunnels in {:.1} s",
        total - 1,
        started.elapsed().as_secs_f64()
    );
    let after_kib = resident_kib(args.controller_pid)?;
    let own_after_kib = resident_kib(std::process::id())?;

    let with = time_reads(&base, &user_token, probe, args.requests, args.client_cpu)?;
    let after_reads_kib = resident_kib(args.controller_pid)?;
    let still_open = registered_tunnels(&http, &base, &system_token).await?;

    // The same reads once more after the tunnels have closed, to show how
    // far the controller's state apart from the tunnels (its database,
    // its heap) moved the latency.
    drop(tunnels);
    wait_registered(&http, &base, &system_token, 0).await?;
    let closed = time_reads(&base, &user_token, probe, args.requests, args.client_cpu)?;

    let count = (total - 1) as f64;
    let per_tunnel = (after_kib.max(after_reads_kib) as f64 - before_kib as f64) / count;
    println!(
        "controller resident memory (VmRSS of pid {}):",
        args.controller_pid
    );
    println!(
        "  {before_kib} KiB with 1 tunnel, {after_kib} KiB with {total}, {after_reads_kib} KiB after the timed reads: {per_tunnel:.1} KiB per tunnel"
    );
    println!(
        "dial side (this process): {own_before_kib} KiB with 1 tunnel, {own_after_kib} KiB with {total}: {:.1} KiB per tunnel",
        (own_after_kib as f64 - own_before_kib as f64) / count
    );
    println!(
        "GET containers/UUID, one at a time, {} ms apart:",
        REQUEST_SPACING.as_millis()
    );
    print_latencies("without tunnels", &without);
    print_latencies(&format!("with {total} tunnels"), &with);
    print_latencies("after they closed", &closed);
    println!(
        "  p99 ratio (with {total} tunnels / without): {:.2}; p50 ratio {:.2}; tunnels still registered: {still_open}",
        percentile(&with, 99.0) / percentile(&without, 99.0),
        percentile(&with, 50.0) / percentile(&without, 50.0)
    );
    println!(
        "  p99 ratio against the reads after they closed: {:.2}; p50 ratio {:.2}",
        percentile(&with, 99.0) / percentile(&closed, 99.0),
        percentile(&with, 50.0) / percentile(&closed, 50.0)
    );
    Ok(())
}
