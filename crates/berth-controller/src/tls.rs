//! HTTPS for the API: the certificate and key from the configuration, the
//! listener that wraps each accepted connection in TLS, and self-signed
//! pairs for a controller on one host.
//!
//! Words used here: the *certificate file* contains the PEM certificate chain
//! (`tls_certificate`, the server's own certificate first), the *key file*
//! its PEM private key (`tls_key`). [`load_server_config`] reads both once at
//! start-up, so a bad file stops the controller before it listens.
//!
//! [`TlsListener`] owns the TCP listener in a task of its own. That task
//! accepts connections and gives each one a task for its handshake, bounded
//! by [`HANDSHAKE_TIMEOUT`], so a client that stalls its handshake holds up
//! nobody else. Finished handshakes reach the HTTP server through a channel.
//! Dropping the listener (as the server does when a shutdown begins) stops
//! the accepting task, which closes the port.
//!
//! rustls uses the *ring* crypto provider, the one the HTTP client uses too.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Maximum time a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done and that the HTTP server has not
/// taken yet.
const ACCEPTED_QUEUE: usize = 64;

/// Pause after an accept error that is not about one connection (such as
/// too many open files), before the next accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read the TLS certificate file {path} (tls_certificate): {source}")]
    ReadCertificate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid TLS certificate file {path} (tls_certificate): {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("failed to read the TLS key file {path} (tls_key): {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid TLS key file {path} (tls_key): {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    #[error(
        "failed to use the TLS key {key} with the certificate {certificate}: {source}; \
         check that the key belongs to the certificate's first entry"
    )]
    KeyRejected {
        certificate: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("failed to read the CA file {path} (internal_ca_file): {source}")]
    ReadAuthority {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid CA file {path} (internal_ca_file): {reason}")]
    InvalidAuthority { path: PathBuf, reason: String },
    #[error("failed to set up TLS: {0}")]
    Setup(#[source] rustls::Error),
    #[error("failed to make a self-signed certificate: {0}")]
    Generate(#[source] rcgen::Error),
}

/// Reads the certificate chain and the private key and builds the rustls
/// configuration of the listener. Each error names the file at fault.
/// A key file that group or others can read is logged as a warning.
pub fn load_server_config(certificate: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(certificate)?;
    let private_key = read_private_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::KeyRejected {
            certificate: certificate.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::ReadCertificate {
        path: path.to_path_buf(),
        source,
    })?;
    parse_certificates(&text).map_err(|reason| TlsError::InvalidCertificate {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses the PEM certificates of a file; at least one must be there.
fn parse_certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{err}"))?;
    if certificates.is_empty() {
        return Err("no \"BEGIN CERTIFICATE\" section: give a PEM certificate file".into());
    }
    Ok(certificates)
}

/// Builds the TLS settings of a controller's connections to other
/// controllers (forwarded shells): the Mozilla root certificates that the
/// `webpki-roots` crate ships, and the certificates of `authority_file`
/// (`internal_ca_file`), so that controllers with certificates of a site's
/// own authority, or self-signed ones, can be reached.
pub fn forward_client_config(
    authority_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = authority_file {
        let invalid = |reason: String| TlsError::InvalidAuthority {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read(path).map_err(|source| TlsError::ReadAuthority {
            path: path.to_path_buf(),
            source,
        })?;
        for certificate in parse_certificates(&text).map_err(invalid)? {
            roots
                .add(certificate)
                .map_err(|err| invalid(format!("a certificate cannot be trusted: {err}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_error = |source| TlsError::ReadKey {
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_error)?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:04o}"),
            "the TLS key file is open to other users; `chmod 600` it"
        );
    }
    let text = std::fs::read(path).map_err(read_error)?;
    // Fixed messages only: a parser's message may quote bytes of the key.
    PrivateKeyDer::from_pem_slice(&text).map_err(|err| {
        use rustls::pki_types::pem::Error;
        let reason = match err {
            Error::NoItemsFound => "no private key section (PKCS#8, PKCS#1 or SEC1 in PEM) found",
            Error::MissingSectionEnd { .. } => "a section has no END line",
            Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
            Error::Base64Decode(_) => "a section is not valid base64",
            _ => "not a valid PEM private key",
        };
        TlsError::InvalidKey {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    })
}

/// A certificate and its private key, both PEM.
pub struct SelfSigned {
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("certificate_pem", &self.certificate_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Makes a self-signed certificate (ECDSA P-256) for the given names. A
/// name that parses as an IP address becomes an IP address entry, any
/// other a DNS name. Clients that do not verify certificates
/// (`ARVADOS_API_HOST_INSECURE=1`) accept it; others reject it.
pub fn self_signed(names: &[&str], common_name: &str) -> Result<SelfSigned, TlsError> {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).map_err(TlsError::Generate)?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = subject;
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let certificate = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok(SelfSigned {
        certificate_pem: certificate.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A listener whose connections are TLS streams, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` and handshaking with `config`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), sender));
        Ok(TlsListener {
            accepted,
            local_addr,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accepting task keeps the sender and ends only when
            // aborted, which happens when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Accepts TCP connections for good and hands each to its own handshake
/// task.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                tracing::error!(error = %err, "failed to accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Keystrokes through a shell or a tunnel go out at once.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the server has stopped accepting.
                    let _ = sender.send((tls, peer)).await;
                }
                Ok(Err(err)) => {
                    tracing::debug!(peer = %peer, error = %err, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Errors that concern one connection only, after which accepting goes on
/// at once.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn generated_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["127.0.0.1", "localhost"], "test").unwrap();
        assert!(pair
            .certificate_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{pair:?}").contains(&pair.key_pem));
        let certificate = write(dir.path(), "cert.pem", &pair.certificate_pem, 0o644);
        let key = write(dir.path(), "key.pem", &pair.key_pem, 0o600);
        let config = load_server_config(&certificate, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn missing_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["localhost"], "test").unwrap();
        let key = write(dir.path(), "key.pem", &pair.key_pem, 0o600);
        let missing = dir.path().join("missing.pem");
        let err = load_server_config(&missing, &key).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("tls_certificate"), "{err}");
    }

    #[test]
    fn certificate_file_without_certificate_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["localhost"], "test").unwrap();
        let key = write(dir.path(), "key.pem", &pair.key_pem, 0o600);
        // The key where the certificate should be.
        let wrong = write(dir.path(), "wrong.pem", &pair.key_pem, 0o600);
        let err = load_server_config(&wrong, &key).unwrap_err().to_string();
        assert!(err.contains("wrong.pem"), "{err}");
        assert!(err.contains("BEGIN CERTIFICATE"), "{err}");
    }

    #[test]
    fn key_file_without_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["localhost"], "test").unwrap();
        let certificate = write(dir.path(), "cert.pem", &pair.certificate_pem, 0o644);
        let not_a_key = write(dir.path(), "key.pem", "hello\n", 0o600);
        let err = load_server_config(&certificate, &not_a_key)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&not_a_key.display().to_string()), "{err}");
        assert!(err.contains("tls_key"), "{err}");
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let one = self_signed(&["localhost"], "one").unwrap();
        let other = self_signed(&["localhost"], "other").unwrap();
        let certificate = write(dir.path(), "cert.pem", &one.certificate_pem, 0o644);
        let key = write(dir.path(), "other-key.pem", &other.key_pem, 0o600);
        let err = load_server_config(&certificate, &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other-key.pem"), "{err}");
        assert!(err.contains("cert.pem"), "{err}");
    }

    #[test]
    fn key_file_open_to_others_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["localhost"], "test").unwrap();
        let certificate = write(dir.path(), "cert.pem", &pair.certificate_pem, 0o644);
        let key = write(dir.path(), "key.pem", &pair.key_pem, 0o644);
        assert!(load_server_config(&certificate, &key).is_ok());
    }

    /// Serves one TLS handshake with `pair` on a loopback port, and
    /// returns whether a client with `client` completes it.
    async fn handshake_succeeds(
        dir: &Path,
        pair: &SelfSigned,
        client: Arc<rustls::ClientConfig>,
    ) -> bool {
        let certificate = write(dir, "server-cert.pem", &pair.certificate_pem, 0o644);
        let key = write(dir, "server-key.pem", &pair.key_pem, 0o600);
        let server = load_server_config(&certificate, &key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            TlsAcceptor::from(server).accept(stream).await.is_ok()
        });
        let stream = TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connected = tokio_rustls::TlsConnector::from(client)
            .connect(name, stream)
            .await;
        let accepted = accept.await.unwrap();
        connected.is_ok() && accepted
    }

    #[tokio::test]
    async fn forward_trusts_internal_authority() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&["127.0.0.1"], "controller-2").unwrap();
        let authority = write(dir.path(), "ca.pem", &pair.certificate_pem, 0o644);

        let with_file = forward_client_config(Some(&authority)).unwrap();
        assert!(handshake_succeeds(dir.path(), &pair, with_file).await);

        let without = forward_client_config(None).unwrap();
        assert!(!handshake_succeeds(dir.path(), &pair, without).await);
    }

    #[test]
    fn bad_authority_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = forward_client_config(Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        assert!(err.contains("internal_ca_file"), "{err}");

        let empty = write(dir.path(), "empty.pem", "not a certificate\n", 0o644);
        let err = forward_client_config(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
        assert!(err.contains("BEGIN CERTIFICATE"), "{err}");
    }
}
