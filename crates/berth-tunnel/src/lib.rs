//! The reverse tunnel between a supervisor and a controller.
//!
//! Compute nodes can usually open connections to the service hosts but
//! not the other way round, so the supervisor dials out and keeps a
//! tunnel through which the controller reaches the container's gateway.
//! The supervisor is the *dial side*: it sends an HTTP/1.1 upgrade
//! request with the container's gateway secret ([`dial`]). The
//! controller is the *accept side*: it checks the request
//! ([`check_upgrade_request`]), answers `101` and runs
//! [`TunnelClient::handshake`] on the upgraded connection. From then on
//! the connection carries HTTP/2 with the roles reversed: the supervisor
//! is the HTTP/2 server ([`TunnelServer`]) and the controller opens one
//! stream per shell session or port forward ([`TunnelClient::open`]).
//! HTTP/2 gives each stream its own flow control, so a bulk transfer
//! does not starve a shell, and PING for the keepalive.
//!
//! Each stream is a [`TunnelStream`], a byte stream with tokio's
//! `AsyncRead` and `AsyncWrite`. Its kind ([`StreamKind`]) is the path of
//! the request that opened it.
//!
//! A controller that shuts down sends a move message on the control
//! stream ([`TunnelClient::move_away`]): HTTP/2 lets only the server
//! send GOAWAY, and the controller is the client. The supervisor's
//! [`maintain`] loop then dials a new tunnel, and once it is up sends
//! GOAWAY on the old one, whose open streams finish within a grace
//! period.
//!
//! Modules:
//! - `protocol`: the upgrade's headers, stream paths and control messages;
//! - `config`: windows, keepalive, backoff and dial settings;
//! - `dial`: the dial side's upgrade and handshake;
//! - `server`: the dial side's HTTP/2 server and its task;
//! - `client`: the accept side's HTTP/2 client and its task;
//! - `stream`: the byte-stream adapter over one HTTP/2 stream;
//! - `splice`: joining TCP sockets and pipes with splice(2), for the
//!   controllers' forwards and `berth ssh-proxy`;
//! - `keepalive`: the dial side's PING loop, and the accept side's watch
//!   for silence;
//! - `backoff` and `maintain`: the dial side's reconnect loop.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod backoff;
mod client;
mod config;
mod dial;
mod error;
mod keepalive;
mod maintain;
mod protocol;
mod server;
pub mod splice;
mod stream;

pub use backoff::{Backoff, FailureClass};
pub use client::{StreamRequest, TunnelClient, TunnelState};
pub use config::*;
pub use dial::dial;
pub use error::TunnelError;
pub use maintain::{maintain, maintain_with, Connector, Dialer};
pub use protocol::{
    check_upgrade_request, header_has_token, switching_protocols_response, tunnel_path,
    ControlMessage, StreamKind, UpgradeRequestError, REQUESTED_BY_HEADER, SECRET_HEADER,
    SUPERVISOR_ID_HEADER, UPGRADE_PROTOCOL,
};
pub use server::{serve, IncomingStream, MoveSignal, TunnelServer};
pub use stream::{copy_bidirectional_stream, TunnelStream};
