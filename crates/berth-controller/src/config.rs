//! The controller's configuration: the `controller` section of the YAML
//! file, and the cluster-wide settings it shares with other processes.
//!
//! Every key but `listen` and `database_url` has a default; the defaults
//! live in [`defaults`]. [`Config::validate`] checks values at start-up and
//! names the key of each bad one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_core::{ClusterId, Secret};
use serde::Deserialize;

use crate::limits::LimitsConfig;

/// Default values of the optional keys.
pub mod defaults {
    /// Locks of one container after which an unlock cancels it.
    pub const MAX_DISPATCH_ATTEMPTS: i64 = 10;
    /// Database connections in the pool.
    pub const MAX_DATABASE_CONNECTIONS: u32 = 8;
    /// Seconds one API request may take before it fails: with 408 when the
    /// client has not sent the whole body by then, otherwise with 503.
    /// Longer than the longest log wait (30 s), so a long poll ends by
    /// itself.
    pub const REQUEST_TIMEOUT_SECONDS: u64 = 60;
    /// Seconds in-flight requests get to finish after a shutdown signal.
    pub const SHUTDOWN_GRACE_PERIOD_SECONDS: u64 = 10;
    /// Seconds a connection may take to send a request's whole header, and
    /// may stay idle between requests, before it is closed.
    pub const HEADER_READ_TIMEOUT_SECONDS: u64 = 30;
    /// Largest log chunk one append may carry: 4 MiB.
    pub const MAX_LOG_CHUNK_BYTES: usize = 4 << 20;
    /// Largest JSON or form body of other requests: 16 MiB.
    pub const MAX_REQUEST_BODY_BYTES: usize = 16 << 20;
    /// Seconds between refreshes of this controller's tunnel leases. A
    /// lease not refreshed for three intervals is stale.
    pub const TUNNEL_HEARTBEAT_SECONDS: u64 = 5;
    /// Largest read from a shell's client on the holder of the tunnel,
    /// and the buffer of each direction of the buffered copy: 64 KiB. In
    /// `gateway_bench stream --ways forwarded` (under `perf stat`, on a
    /// 2-CPU VM), 1 GiB each way through two controllers took about 8 %
    /// less CPU time with 64 KiB than with 8 KiB, and 256 KiB saved 1 %
    /// more (docs/BENCHMARKS.md, "Gateway"). It stays below glibc's
    /// initial mmap threshold of 128 KiB, so each read's buffer comes
    /// from the heap.
    pub const SHELL_COPY_BUFFER_BYTES: usize = 64 << 10;

    /// Directory of the local block store.
    pub const BLOCK_DIRECTORY: &str = "/var/lib/berth/blocks";
    /// Largest block, in bytes: 64 MiB, Arvados Keep's block size, which
    /// clients split files into.
    pub const MAX_BLOCK_BYTES: usize = 64 << 20;
    /// Seconds a permission signature stays valid: two weeks, as in
    /// Arvados.
    pub const SIGNATURE_TTL_SECONDS: u64 = 14 * 24 * 3600;

    pub(super) fn block_directory() -> std::path::PathBuf {
        BLOCK_DIRECTORY.into()
    }
    pub(super) fn max_block_bytes() -> usize {
        MAX_BLOCK_BYTES
    }
    pub(super) fn signature_ttl_seconds() -> u64 {
        SIGNATURE_TTL_SECONDS
    }
    pub(super) fn max_dispatch_attempts() -> i64 {
        MAX_DISPATCH_ATTEMPTS
    }
    pub(super) fn max_database_connections() -> u32 {
        MAX_DATABASE_CONNECTIONS
    }
    pub(super) fn request_timeout_seconds() -> u64 {
        REQUEST_TIMEOUT_SECONDS
    }
    pub(super) fn shutdown_grace_period_seconds() -> u64 {
        SHUTDOWN_GRACE_PERIOD_SECONDS
    }
    pub(super) fn header_read_timeout_seconds() -> u64 {
        HEADER_READ_TIMEOUT_SECONDS
    }
    pub(super) fn max_log_chunk_bytes() -> usize {
        MAX_LOG_CHUNK_BYTES
    }
    pub(super) fn max_request_body_bytes() -> usize {
        MAX_REQUEST_BODY_BYTES
    }
    pub(super) fn tunnel_heartbeat_seconds() -> u64 {
        TUNNEL_HEARTBEAT_SECONDS
    }
    pub(super) fn shell_copy_buffer_bytes() -> usize {
        SHELL_COPY_BUFFER_BYTES
    }
    pub(super) fn shell_access() -> bool {
        true
    }
}

/// The `controller` section of the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Database URL: `sqlite://PATH` (for example
    /// `sqlite:///var/lib/berth/berth.db`), or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (also `postgresql://`)
    /// for a PostgreSQL database that several controllers may share. A
    /// SQLite file (mode 0600) and its directories (mode 0700) are created
    /// when missing, and an existing file that group or others can read is
    /// logged as a warning; a PostgreSQL database must exist, and its
    /// tables are created.
    pub database_url: String,
    /// PEM file with the certificate chain of the API, the server's own
    /// certificate first. With `tls_key` the API is served over HTTPS only;
    /// with neither, over plain HTTP. Default: unset.
    #[serde(default)]
    pub tls_certificate: Option<PathBuf>,
    /// PEM file with the private key of `tls_certificate` (PKCS#8, PKCS#1 or
    /// SEC1). A key file that group or others can read is logged as a
    /// warning. Default: unset.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Times a container may be locked; an unlock once `lock_count` has
    /// reached this number cancels the container instead of queueing it
    /// again; its requests then get a new container while their
    /// `container_count_max` allows. Default 10.
    #[serde(default = "defaults::max_dispatch_attempts")]
    pub max_dispatch_attempts: i64,
    /// Connections in the database pool. Default 8.
    #[serde(default = "defaults::max_database_connections")]
    pub max_database_connections: u32,
    /// Seconds one API request may take before it fails: 408 Request
    /// Timeout when the client has not sent the whole body by then,
    /// otherwise 503 Service Unavailable. Must exceed the 30 s log wait.
    /// Default 60.
    #[serde(default = "defaults::request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT;
    /// connections still open then are closed. Default 10.
    #[serde(default = "defaults::shutdown_grace_period_seconds")]
    pub shutdown_grace_period_seconds: u64,
    /// Seconds a client may take to send the header of a request (the
    /// request line and header fields). The time counts from the
    /// connection's start, or from the end of the previous response on a
    /// kept-alive connection. A connection that has not sent a whole header
    /// by then is closed without a response. The request body has
    /// `request_timeout_seconds`. Default 30.
    #[serde(default = "defaults::header_read_timeout_seconds")]
    pub header_read_timeout_seconds: u64,
    /// Largest log chunk, in bytes, one append may carry; a larger one is
    /// rejected with 413. Default 4 MiB.
    #[serde(default = "defaults::max_log_chunk_bytes")]
    pub max_log_chunk_bytes: usize,
    /// Largest body, in bytes, of any other request. Default 16 MiB.
    #[serde(default = "defaults::max_request_body_bytes")]
    pub max_request_body_bytes: usize,
    /// The URL clients reach the controller at, such as
    /// `https://berth.example.org:8443/`: the `rootUrl` of the discovery
    /// document. Needed behind a proxy; without it, the URL is built from
    /// each request's `Host` header and scheme. Default: none.
    #[serde(default)]
    pub external_url: Option<String>,
    /// The URL other controllers reach this one at, such as
    /// `http://10.0.0.5:8000/`. A controller records it in the lease of
    /// each gateway tunnel it holds, and a controller that gets a shell
    /// request for a tunnel it does not hold forwards the request there.
    /// Default: `http://` (or `https://` when the API is served over TLS)
    /// and the listener's bound address. A listener on `0.0.0.0` or `::`
    /// then gives a loopback address, which other hosts cannot reach, so
    /// set this key when controllers run on several hosts.
    #[serde(default)]
    pub internal_url: Option<String>,
    /// PEM file of certificate authorities (or self-signed certificates)
    /// trusted, besides the Mozilla roots, when this controller forwards a
    /// shell to another controller's `https://` internal URL. Set it when
    /// the controllers' certificates come from a site's own authority.
    /// Read once at start-up. Default: none.
    #[serde(default)]
    pub internal_ca_file: Option<PathBuf>,
    /// Whether users may open shells and port forwards into their running
    /// containers (`POST /arvados/v1/connect/{uuid}/ssh`). `false` rejects
    /// every shell with 403, administrators' too. Default true.
    #[serde(default = "defaults::shell_access")]
    pub shell_access: bool,
    /// Seconds between refreshes of the leases of the gateway tunnels this
    /// controller holds, at least 1. A lease whose holder has not
    /// refreshed it for three intervals is stale: another supervisor's
    /// tunnel may then take it, and shells are no longer forwarded to its
    /// holder. Use the same value on every controller of a cluster.
    /// Default 5.
    #[serde(default = "defaults::tunnel_heartbeat_seconds")]
    pub tunnel_heartbeat_seconds: u64,
    /// Bytes of a shell session's buffers, 1 KiB to 16 MiB. On the
    /// holder of the tunnel each read from the client takes up to this
    /// many bytes, and an open session keeps one such buffer: 64 KiB per
    /// session by default, 64 MiB for the default 1,000 sessions. A
    /// forwarding controller needs none when splice(2) joins the two
    /// sockets, and two with TLS on either side. Default 65536.
    #[serde(default = "defaults::shell_copy_buffer_bytes")]
    pub shell_copy_buffer_bytes: usize,
    /// The block store of collection data and the signing of its
    /// locators. Default: every key of [`BlockConfig`] at its default.
    #[serde(default)]
    pub blocks: BlockConfig,
    /// Request limits per pool: ordinary requests, waiting reads, tunnels
    /// and shells. Default: every key of [`LimitsConfig`] at its default.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// The `controller.blocks` section: the block store and the permission
/// signatures of its locators.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Directory of the local block store, created (mode 0700) at the first
    /// write. Every controller of a cluster must see the same blocks, so
    /// several controllers need a shared file system here. Default
    /// `/var/lib/berth/blocks`.
    #[serde(default = "defaults::block_directory")]
    pub directory: PathBuf,
    /// Largest block, in bytes, a write may carry; a larger one is rejected
    /// with 413. At most 64 MiB, which is also the default and the size
    /// clients split files into.
    #[serde(default = "defaults::max_block_bytes")]
    pub max_block_bytes: usize,
    /// File whose content (surrounding whitespace removed, at least 32
    /// bytes) is the HMAC key of permission signatures. Every controller
    /// of a cluster needs the same key. Default: unset, and the key is
    /// derived from the system token, which every controller shares.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// Seconds a permission signature stays valid after the controller
    /// makes it. Default 1209600 (two weeks).
    #[serde(default = "defaults::signature_ttl_seconds")]
    pub signature_ttl_seconds: u64,
}

impl Default for BlockConfig {
    fn default() -> BlockConfig {
        BlockConfig {
            directory: defaults::block_directory(),
            max_block_bytes: defaults::MAX_BLOCK_BYTES,
            signing_key_file: None,
            signature_ttl_seconds: defaults::SIGNATURE_TTL_SECONDS,
        }
    }
}

/// True for an `http://` or `https://` URL with a host and no query or
/// fragment.
fn is_base_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|parsed| {
        matches!(parsed.scheme(), "http" | "https")
            && parsed.has_host()
            && parsed.query().is_none()
            && parsed.fragment().is_none()
    })
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid controller configuration: {key} = {value}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl Config {
    /// Builds a configuration with the defaults for every optional key.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> Config {
        Config {
            listen,
            database_url: database_url.into(),
            tls_certificate: None,
            tls_key: None,
            max_dispatch_attempts: defaults::MAX_DISPATCH_ATTEMPTS,
            max_database_connections: defaults::MAX_DATABASE_CONNECTIONS,
            request_timeout_seconds: defaults::REQUEST_TIMEOUT_SECONDS,
            shutdown_grace_period_seconds: defaults::SHUTDOWN_GRACE_PERIOD_SECONDS,
            header_read_timeout_seconds: defaults::HEADER_READ_TIMEOUT_SECONDS,
            max_log_chunk_bytes: defaults::MAX_LOG_CHUNK_BYTES,
            max_request_body_bytes: defaults::MAX_REQUEST_BODY_BYTES,
            external_url: None,
            internal_url: None,
            internal_ca_file: None,
            shell_access: true,
            tunnel_heartbeat_seconds: defaults::TUNNEL_HEARTBEAT_SECONDS,
            shell_copy_buffer_bytes: defaults::SHELL_COPY_BUFFER_BYTES,
            blocks: BlockConfig::default(),
            limits: LimitsConfig::default(),
        }
    }

    /// Checks the values that parsing alone does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let error = |key, value: &dyn std::fmt::Display, reason| ConfigError {
            key,
            value: value.to_string(),
            reason,
        };
        if self.database_url.trim().is_empty() {
            return Err(error(
                "database_url",
                &"\"\"",
                "give sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE",
            ));
        }
        match (&self.tls_certificate, &self.tls_key) {
            (Some(_), None) => {
                return Err(error(
                    "tls_key",
                    &"(unset)",
                    "tls_certificate is set: give its key file too, or remove tls_certificate for plain HTTP",
                ));
            }
            (None, Some(_)) => {
                return Err(error(
                    "tls_certificate",
                    &"(unset)",
                    "tls_key is set: give the certificate file too, or remove tls_key for plain HTTP",
                ));
            }
            _ => {}
        }
        if self.max_dispatch_attempts < 1 {
            return Err(error(
                "max_dispatch_attempts",
                &self.max_dispatch_attempts,
                "must be 1 or more",
            ));
        }
        if self.max_database_connections < 1 {
            return Err(error(
                "max_database_connections",
                &self.max_database_connections,
                "must be 1 or more",
            ));
        }
        if self.request_timeout_seconds <= crate::api::logs::MAX_WAIT.as_secs() {
            return Err(error(
                "request_timeout_seconds",
                &self.request_timeout_seconds,
                "must be more than 30, the longest log wait",
            ));
        }
        if self.header_read_timeout_seconds < 1 {
            return Err(error(
                "header_read_timeout_seconds",
                &self.header_read_timeout_seconds,
                "must be 1 or more",
            ));
        }
        let limits = &self.limits;
        for (key, value) in [
            (
                "limits.max_concurrent_requests",
                limits.max_concurrent_requests as u64,
            ),
            ("limits.queue_timeout_seconds", limits.queue_timeout_seconds),
            (
                "limits.max_waiting_requests",
                limits.max_waiting_requests as u64,
            ),
        ] {
            if value < 1 {
                return Err(error(key, &value, "must be 1 or more"));
            }
        }
        if self.max_log_chunk_bytes < 1 {
            return Err(error(
                "max_log_chunk_bytes",
                &self.max_log_chunk_bytes,
                "must be 1 or more",
            ));
        }
        if self.max_request_body_bytes < 1024 {
            return Err(error(
                "max_request_body_bytes",
                &self.max_request_body_bytes,
                "must be at least 1024",
            ));
        }
        if !(1..=defaults::MAX_BLOCK_BYTES).contains(&self.blocks.max_block_bytes) {
            return Err(error(
                "blocks.max_block_bytes",
                &self.blocks.max_block_bytes,
                "must be between 1 and 67108864 (64 MiB)",
            ));
        }
        if self.blocks.signature_ttl_seconds < 60 {
            return Err(error(
                "blocks.signature_ttl_seconds",
                &self.blocks.signature_ttl_seconds,
                "must be at least 60",
            ));
        }
        if self.tunnel_heartbeat_seconds < 1 {
            return Err(error(
                "tunnel_heartbeat_seconds",
                &self.tunnel_heartbeat_seconds,
                "must be 1 or more",
            ));
        }
        if !(1 << 10..=16 << 20).contains(&self.shell_copy_buffer_bytes) {
            return Err(error(
                "shell_copy_buffer_bytes",
                &self.shell_copy_buffer_bytes,
                "must be 1024 to 16777216 bytes",
            ));
        }
        if let Some(url) = &self.internal_url {
            if !is_base_url(url) {
                return Err(error(
                    "internal_url",
                    url,
                    "must be an http:// or https:// URL with a host and no query, such as http://10.0.0.5:8000/",
                ));
            }
        }
        if let Some(url) = &self.external_url {
            if !is_base_url(url) {
                return Err(error(
                    "external_url",
                    url,
                    "must be an http:// or https:// URL with a host and no query, such as https://berth.example.org:8443/",
                ));
            }
        }
        Ok(())
    }

    /// Returns `internal_url`, or the URL derived from `listen` when it is
    /// unset, normalized as [`url::Url`] prints it.
    pub fn effective_internal_url(&self) -> String {
        let configured = self
            .internal_url
            .as_deref()
            .and_then(|url| url::Url::parse(url).ok());
        if let Some(url) = configured {
            return url.to_string();
        }
        let scheme = if self.tls_files().is_some() {
            "https"
        } else {
            "http"
        };
        let mut address = self.listen;
        if address.ip().is_unspecified() {
            let loopback: std::net::IpAddr = if address.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            address.set_ip(loopback);
        }
        format!("{scheme}://{address}/")
    }

    /// Returns the duration of `tunnel_heartbeat_seconds`.
    pub fn tunnel_heartbeat(&self) -> Duration {
        Duration::from_secs(self.tunnel_heartbeat_seconds)
    }

    /// The certificate and key files when the API is served over HTTPS.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        match (&self.tls_certificate, &self.tls_key) {
            (Some(certificate), Some(key)) => Some((certificate, key)),
            _ => None,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }

    pub fn shutdown_grace_period(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_period_seconds)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_seconds)
    }
}

/// Settings the controller shares with the rest of the cluster's
/// configuration.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster_id: ClusterId,
    /// The system token: the dispatcher's and administrators' credential.
    pub system_token: Secret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_keys_take_defaults() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:0",
            "database_url": "sqlite:///tmp/x.db",
        }))
        .unwrap();
        assert_eq!(
            config,
            Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db")
        );
        assert!(config.validate().is_ok());
    }

    #[test]
    fn tls_keys_are_optional_and_parsed() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:0",
            "database_url": "sqlite:///tmp/x.db",
            "tls_certificate": "/etc/berth/cert.pem",
            "tls_key": "/etc/berth/key.pem",
        }))
        .unwrap();
        assert!(config.validate().is_ok());
        assert_eq!(
            config.tls_files(),
            Some((
                Path::new("/etc/berth/cert.pem"),
                Path::new("/etc/berth/key.pem")
            ))
        );
        let plain = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db");
        assert_eq!(plain.tls_files(), None);
    }

    #[test]
    fn certificate_without_key_names_tls_key() {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db");
        config.tls_certificate = Some("/etc/berth/cert.pem".into());
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "tls_key");
        assert!(err.to_string().contains("tls_certificate is set"), "{err}");
    }

    #[test]
    fn key_without_certificate_names_tls_certificate() {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db");
        config.tls_key = Some("/etc/berth/key.pem".into());
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "tls_certificate");
        assert!(err.to_string().contains("tls_key is set"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let parsed = serde_json::from_value::<Config>(serde_json::json!({
            "listen": "127.0.0.1:0",
            "database_url": "sqlite:///tmp/x.db",
            "max_dispatch_attempt": 3,
        }));
        assert!(parsed
            .unwrap_err()
            .to_string()
            .contains("max_dispatch_attempt"));
    }

    #[test]
    fn invalid_value_names_key() {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db");
        config.max_dispatch_attempts = 0;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("max_dispatch_attempts"), "{err}");
        config.max_dispatch_attempts = 1;
        config.request_timeout_seconds = 30;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("request_timeout_seconds"), "{err}");
    }

    #[test]
    fn internal_url_is_checked_and_derived() {
        let mut config = Config::new("0.0.0.0:8000".parse().unwrap(), "sqlite:///tmp/x.db");
        assert_eq!(config.effective_internal_url(), "http://127.0.0.1:8000/");
        config.listen = "[::]:8000".parse().unwrap();
        assert_eq!(config.effective_internal_url(), "http://[::1]:8000/");
        config.listen = "10.0.0.5:8443".parse().unwrap();
        config.tls_certificate = Some("/etc/berth/cert.pem".into());
        config.tls_key = Some("/etc/berth/key.pem".into());
        assert_eq!(config.effective_internal_url(), "https://10.0.0.5:8443/");

        config.internal_url = Some("http://ctl-1.internal:8000".into());
        assert!(config.validate().is_ok());
        assert_eq!(
            config.effective_internal_url(),
            "http://ctl-1.internal:8000/"
        );

        for bad in ["ctl-1:8000", "ftp://ctl-1/", "http://ctl-1/?a=1"] {
            config.internal_url = Some(bad.into());
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, "internal_url", "{bad}");
        }
    }

    #[test]
    fn shell_copy_buffer_is_bounded() {
        for bytes in [0, 1023, (16 << 20) + 1] {
            let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite://x.db");
            config.shell_copy_buffer_bytes = bytes;
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, "shell_copy_buffer_bytes");
        }
    }

    #[test]
    fn tunnel_heartbeat_must_be_positive() {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "sqlite:///tmp/x.db");
        config.tunnel_heartbeat_seconds = 0;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "tunnel_heartbeat_seconds");
    }
}
