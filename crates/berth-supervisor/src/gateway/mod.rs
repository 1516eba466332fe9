//! The container's SSH gateway: an SSH server whose sessions run inside
//! the container through its runtime.
//!
//! Words used here: a *connection* is one SSH transport over one stream.
//! A *channel* is an SSH session channel on a connection. A *session* is
//! the process that a channel's `shell` or `exec` request starts in the
//! container.
//!
//! The supervisor makes one Ed25519 [`HostKey`] per container, in memory
//! only, and publishes its public key on the container record, so that
//! clients check it strictly. [`Gateway::serve_connection`] runs the
//! server over any byte stream: the controller opens streams through the
//! supervisor's tunnel.
//!
//! Authentication: the SSH layer accepts the `none` method and rejects
//! every other one. A stream reaches the gateway only through the tunnel,
//! which the controller opens after it has checked that the caller owns
//! the container's request or is an administrator, so that check is the
//! access control. Keys or passwords here would add nothing, because the
//! container has no user accounts of the caller's. The SSH user name is
//! the user the session runs as inside the container (`root` by
//! default), looked up in the container's `/etc/passwd`.
//!
//! Each connection task owns its channels' state; each session runs in a
//! task of its own (see [`session`]). Idle timeouts are the tunnel's.

mod forward;
mod session;
mod sftp;
pub mod user;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use berth_client::Client;
use rand::RngCore;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Sig};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::logs::SupervisorLog;
use crate::runtime::exec::TerminalSize;
use crate::runtime::{ContainerId, Runtime};

use session::{ChannelInput, SessionRequest};
use sftp::SftpRequest;
pub use sftp::SftpServerCommand;

/// The default of `supervisor.gateway_max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// The default of `supervisor.gateway_max_channels_per_connection`.
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 10;

/// The ciphers the gateway offers: russh's defaults and aes128-gcm, which
/// OpenSSH also offers, so that a client configured for either AES-GCM
/// cipher connects.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Messages from the client that may wait for a channel's session task
/// before the connection stops reading.
const CHANNEL_INPUT_BUFFER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("failed to make the gateway's host key: {0}")]
    HostKey(String),
    #[error("rejected an SSH connection: the container already has {0} (supervisor.gateway_max_connections)")]
    TooManyConnections(usize),
    #[error("the SSH connection failed: {0}")]
    Ssh(#[from] russh::Error),
}

/// The gateway's host key. Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct HostKey {
    private: PrivateKey,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public_line())
            .finish()
    }
}

impl HostKey {
    /// Makes a new Ed25519 key from the operating system's random source.
    pub fn generate() -> Result<HostKey, GatewayError> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|error| GatewayError::HostKey(error.to_string()))?;
        let keypair = Ed25519Keypair::from_seed(&seed);
        // The keypair zeroes its own copy when dropped.
        seed.fill(0);
        Ok(HostKey {
            private: PrivateKey::from(keypair),
        })
    }

    /// Returns the public key as one OpenSSH line, `ssh-ed25519 BASE64`,
    /// the form of the container record's `gateway_host_key`.
    pub fn public_line(&self) -> String {
        self.private
            .public_key()
            .to_openssh()
            .map(|line| line.trim().to_string())
            // ssh-key fails to encode only key types built without their
            // feature, and Ed25519 is always built in.
            .unwrap_or_default()
    }
}

/// Publishes the host key's public half as the container record's
/// `gateway_host_key`, with the container's own token. The controller
/// derives `gateway_host_key_fingerprint` from it.
pub async fn publish_host_key(
    client: &Client,
    uuid: &str,
    host_key: &HostKey,
) -> Result<(), berth_client::ClientError> {
    let attributes = json!({"gateway_host_key": host_key.public_line()});
    client.update_container(uuid, &attributes).await.map(drop)
}

/// The gateway's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Maximum SSH connections open at once.
    pub max_connections: usize,
    /// Maximum session channels open at once on one connection.
    pub max_channels_per_connection: usize,
}

impl GatewaySettings {
    /// Reads the `gateway_*` keys of the supervisor's configuration.
    pub fn from_config(config: &crate::config::Config) -> GatewaySettings {
        GatewaySettings {
            max_connections: config.gateway_max_connections,
            max_channels_per_connection: config.gateway_max_channels_per_connection,
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> GatewaySettings {
        GatewaySettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_channels_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
        }
    }
}

/// The running container that sessions exec into.
#[derive(Debug, Clone)]
pub struct GatewayTarget {
    pub runtime: Arc<dyn Runtime>,
    pub container: ContainerId,
    /// `NAME=value` entries: the container record's environment, which
    /// every session gets.
    pub env: Vec<String>,
    /// The container's working directory, or `None` for the image's.
    pub working_dir: Option<String>,
    /// The SFTP server of the `sftp` subsystem, or `None` to reject the
    /// subsystem.
    pub sftp_server: Option<SftpServerCommand>,
}

/// The client and container for the record's `interactive_session_started`,
/// which the gateway sets with the container's token at its first session.
#[derive(Debug, Clone)]
pub struct SessionFlag {
    pub client: Client,
    pub uuid: String,
}

/// The SSH gateway of one container.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<russh::server::Config>,
    target: GatewayTarget,
    settings: GatewaySettings,
    connections: Arc<Semaphore>,
    log: SupervisorLog,
    flag: Option<SessionFlag>,
    session_started: AtomicBool,
}

impl Gateway {
    pub fn new(
        host_key: HostKey,
        target: GatewayTarget,
        settings: GatewaySettings,
        log: SupervisorLog,
        flag: Option<SessionFlag>,
    ) -> Gateway {
        let config = russh::server::Config {
            server_id: russh::SshId::Standard(
                format!("SSH-2.0-berth_{}", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(&[MethodKind::None][..]),
            keys: vec![host_key.private],
            // The tunnel owns idle timeouts and keepalives.
            inactivity_timeout: None,
            keepalive_interval: None,
            nodelay: true,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(CIPHERS),
                ..Default::default()
            },
            ..Default::default()
        };
        Gateway {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                target,
                connections: Arc::new(Semaphore::new(settings.max_connections)),
                settings,
                log,
                flag,
                session_started: AtomicBool::new(false),
            }),
        }
    }

    /// Runs one SSH connection over `stream` until the client disconnects.
    /// Past `max_connections` the stream is closed before the SSH
    /// handshake.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.inner.connections.clone().try_acquire_owned() else {
            let error = GatewayError::TooManyConnections(self.inner.settings.max_connections);
            self.inner.log.warn(error.to_string());
            return Err(error);
        };
        let handler = Connection {
            inner: self.inner.clone(),
            channels: Arc::new(Semaphore::new(
                self.inner.settings.max_channels_per_connection,
            )),
            user: String::from("root"),
            open: HashMap::new(),
            _permit: permit,
        };
        let running = russh::server::run_stream(self.inner.config.clone(), stream, handler).await?;
        running.await?;
        Ok(())
    }

    /// Sets `interactive_session_started` once, in the background.
    fn note_session_started(&self) {
        if self.inner.session_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(flag) = self.inner.flag.clone() else {
            return;
        };
        let log = self.inner.log.clone();
        tokio::spawn(async move {
            let attributes = json!({"interactive_session_started": true});
            if let Err(error) = flag.client.update_container(&flag.uuid, &attributes).await {
                log.warn(format!(
                    "failed to set interactive_session_started on the container: {error}"
                ));
            }
        });
    }
}

/// Connects to `address` inside the container's network namespace.
/// Returns the message for the log when it cannot.
async fn connect_forward(
    target: &GatewayTarget,
    address: SocketAddr,
) -> Result<tokio::net::TcpStream, String> {
    let pid = match target.runtime.pid(&target.container).await {
        Ok(Some(pid)) => pid,
        Ok(None) => return Err("the runtime reports no process of the container".to_string()),
        Err(error) => return Err(error.to_string()),
    };
    forward::connect_in_namespace(pid, address)
        .await
        .map_err(|error| format!("failed to connect inside the container: {error}"))
}

/// One SSH connection's handler: its login user and its open channels.
struct Connection {
    inner: Arc<Inner>,
    channels: Arc<Semaphore>,
    user: String,
    open: HashMap<ChannelId, OpenChannel>,
    _permit: OwnedSemaphorePermit,
}

/// A session channel's state in the connection task.
struct OpenChannel {
    /// The terminal requested before the session started.
    terminal: Option<(String, TerminalSize)>,
    /// The running session's input, once it started.
    input: Option<mpsc::Sender<ChannelInput>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl OpenChannel {
    /// Makes the input of the channel's session, or returns `None` when
    /// the channel has a session already.
    fn open_input(&mut self) -> Option<mpsc::Receiver<ChannelInput>> {
        if self.input.is_some() {
            return None;
        }
        let (sender, receiver) = mpsc::channel(CHANNEL_INPUT_BUFFER);
        self.input = Some(sender);
        Some(receiver)
    }
}

impl Connection {
    fn gateway(&self) -> Gateway {
        Gateway {
            inner: self.inner.clone(),
        }
    }

    /// Sends `input` to the channel's session, if it runs.
    async fn forward(&mut self, channel: ChannelId, input: ChannelInput) {
        let Some(sender) = self.open.get(&channel).and_then(|open| open.input.clone()) else {
            return;
        };
        // A session that ended has dropped its receiver; nothing waits for
        // the input then.
        let _ = sender.send(input).await;
    }

    /// Starts the channel's SFTP server, which replies to the subsystem
    /// request once it is ready. Rejects the request when the channel has
    /// a session already.
    fn start_sftp(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(open) = self.open.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let Some(receiver) = open.open_input() else {
            return session.channel_failure(channel);
        };
        let request = SftpRequest {
            channel,
            user: self.user.clone(),
            permit: open.permit.take(),
        };
        let handle = session.handle();
        tokio::spawn(sftp::run_sftp(self.gateway(), handle, request, receiver));
        Ok(())
    }

    /// Starts the channel's session, or rejects the request when the
    /// channel has one already.
    fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(open) = self.open.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let Some(receiver) = open.open_input() else {
            return session.channel_failure(channel);
        };
        session.channel_success(channel)?;
        let request = SessionRequest {
            channel,
            user: self.user.clone(),
            command,
            terminal: open.terminal.clone(),
            permit: open.permit.take(),
        };
        let gateway = self.gateway();
        gateway.note_session_started();
        let handle = session.handle();
        tokio::spawn(session::run_session(gateway, handle, request, receiver));
        Ok(())
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        // The controller checked the caller before it opened the stream;
        // see the module documentation.
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(permit) = self.channels.clone().try_acquire_owned() else {
            self.inner.log.warn(format!(
                "rejected an SSH channel: the connection already has {} (supervisor.gateway_max_channels_per_connection)",
                self.inner.settings.max_channels_per_connection
            ));
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        // The handler's callbacks carry the channel's requests and data in
        // order, so the channel object itself is not read.
        self.open.insert(
            channel.id(),
            OpenChannel {
                terminal: None,
                input: None,
                permit: Some(permit),
            },
        );
        drop(channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let destination = format!("{host_to_connect}:{port_to_connect}");
        let address = forward::loopback_address(host_to_connect)
            .zip(u16::try_from(port_to_connect).ok().filter(|port| *port > 0));
        let Some((ip, port)) = address else {
            self.inner.log.warn(format!(
                "rejected forwarding to {destination}: only ports on the container's loopback interface (localhost) can be forwarded"
            ));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let Ok(permit) = self.channels.clone().try_acquire_owned() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        // The connection is made in a task, so the connection's other
        // channels go on meanwhile.
        let inner = self.inner.clone();
        let user = self.user.clone();
        tokio::spawn(async move {
            let socket = match connect_forward(&inner.target, SocketAddr::new(ip, port)).await {
                Ok(socket) => socket,
                Err(message) => {
                    inner
                        .log
                        .warn(format!("rejected forwarding to {destination}: {message}"));
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            inner.log.info(format!(
                "SSH forwarding for user {user:?} to {destination} in the container"
            ));
            let mut channel = channel.into_stream();
            let mut socket = socket;
            if let Err(error) = tokio::io::copy_bidirectional(&mut channel, &mut socket).await {
                inner
                    .log
                    .warn(format!("SSH forwarding to {destination} ended: {error}"));
            }
            drop(permit);
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.open.get_mut(&channel) {
            Some(open) if open.input.is_none() => {
                let size = TerminalSize::from_ssh(col_width, row_height);
                open.terminal = Some((term.to_string(), size));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The session's environment is the container's; a client's
        // variables are declined, as sshd does without AcceptEnv.
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, None, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Some(command), session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            return self.start_sftp(channel, session);
        }
        self.inner.log.warn(format!(
            "rejected the SSH subsystem {name:?}: only \"sftp\" is served"
        ));
        session.channel_failure(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = TerminalSize::from_ssh(col_width, row_height);
        if let Some(open) = self.open.get_mut(&channel) {
            if let Some((_, current)) = open.terminal.as_mut() {
                *current = size;
            }
        }
        self.forward(channel, ChannelInput::Resize(size)).await;
        session.channel_success(channel)
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // NOTE: neither exec API used here can signal an exec's process,
        // so a client's signal request is dropped.
        tracing::debug!(?channel, ?signal, "ignored a signal request");
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let data = bytes::Bytes::copy_from_slice(data);
        self.forward(channel, ChannelInput::Data(data)).await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.forward(channel, ChannelInput::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the sender ends the session's input, so its stdin closes.
        self.open.remove(&channel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_line_is_a_valid_ed25519_key() {
        let key = HostKey::generate().unwrap();
        let line = key.public_line();
        let parsed = berth_core::ssh::PublicKey::parse(&line).unwrap();
        assert!(line.starts_with("ssh-ed25519 "), "{line}");
        assert_eq!(parsed.to_line(), line);
    }

    #[test]
    fn host_keys_differ_per_gateway() {
        let first = HostKey::generate().unwrap().public_line();
        let second = HostKey::generate().unwrap().public_line();
        assert_ne!(first, second);
    }

    #[test]
    fn host_key_debug_shows_only_the_public_key() {
        let key = HostKey::generate().unwrap();
        let expected = format!("HostKey {{ public: {:?} }}", key.public_line());
        assert_eq!(format!("{key:?}"), expected);
    }
}
