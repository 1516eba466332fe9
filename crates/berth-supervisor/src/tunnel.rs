//! The supervisor's end of the gateway tunnel.
//!
//! Compute nodes can open connections to the controller but not the other
//! way round, so once the gateway is ready the supervisor dials the
//! controller (`berth_tunnel::maintain`) and keeps the tunnel up, with
//! backoff and full jitter between attempts. Each `/ssh` stream the
//! controller opens is one SSH connection to the gateway. Port forwards
//! travel inside SSH, so `/tcp/{port}` streams are rejected.
//!
//! The dial uses the container's gateway secret from the credentials file
//! and the API's URL. With `insecure` set, as for the API client, the
//! controller's certificate is not verified; the TLS handshake's
//! signatures still are.

use std::sync::Arc;

use berth_core::{Secret, Uuid};
use berth_tunnel::{maintain, DialConfig, StreamKind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::task::JoinHandle;
use url::Url;

use crate::gateway::Gateway;
use crate::logs::SupervisorLog;

/// The settings the supervisor dials its tunnel with.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// The controller's API URL from the credentials file.
    pub api_url: Url,
    pub gateway_secret: Secret,
    /// Accept a certificate that does not verify, as the API client does.
    pub insecure: bool,
}

/// Starts keeping the tunnel of `container_uuid` up, handing each SSH
/// stream to `gateway`. The task runs until it is aborted, or until the
/// controller rejects the tunnel for good because the container is no
/// longer Locked or Running.
pub fn spawn_tunnel(
    settings: &TunnelSettings,
    container_uuid: &str,
    gateway: Gateway,
    log: SupervisorLog,
) -> Result<JoinHandle<()>, String> {
    let uuid: Uuid = container_uuid
        .parse()
        .map_err(|_| format!("invalid container UUID {container_uuid:?}"))?;
    let mut config = DialConfig::new(
        settings.api_url.clone(),
        uuid,
        settings.gateway_secret.clone(),
    );
    if settings.insecure && settings.api_url.scheme() == "https" {
        config.tls = Some(unverified_tls()?);
    }
    Ok(tokio::spawn(async move {
        let handler = move |incoming: berth_tunnel::IncomingStream| {
            let gateway = gateway.clone();
            async move {
                if incoming.kind() != StreamKind::Ssh {
                    incoming.reject(http::StatusCode::NOT_FOUND);
                    return;
                }
                match incoming.accept() {
                    Ok(stream) => {
                        if let Err(error) = gateway.serve_connection(stream).await {
                            tracing::warn!(error = %error, "an SSH connection through the tunnel failed");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "failed to accept a stream of the tunnel");
                    }
                }
            }
        };
        let stopped = maintain(config, handler).await;
        log.warn(format!("the gateway tunnel stopped: {stopped}"));
    }))
}

/// Builds a TLS client configuration that accepts any server certificate
/// but still checks the handshake's signatures.
fn unverified_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("failed to set up TLS for the gateway tunnel: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A certificate verifier for `insecure` settings (self-signed test and
/// development set-ups).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
