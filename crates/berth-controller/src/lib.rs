//! The controller: Berth's REST API in the shape of Arvados v1, its store,
//! token authentication and live container logs.
//!
//! Who owns what:
//!
//! - [`store`] keeps every record behind the [`Store`](store::Store) trait
//!   (SQLite today) and applies each change in one transaction.
//! - [`lifecycle`] holds the rules of container requests and containers as
//!   pure functions: what a caller may set, which state changes are
//!   allowed, and what each change brings with it.
//! - [`auth`] turns a bearer token into a [`Caller`](auth::Caller).
//! - [`blocks`] keeps collection data as content-addressed blocks behind
//!   the [`BlockStore`](blocks::BlockStore) trait, and signs their
//!   locators.
//! - [`api`] is the HTTP layer: [`app`] builds the router from an
//!   [`AppState`].
//! - [`notify`] wakes log readers that wait for new bytes and change-feed
//!   readers that wait for a container change.
//! - [`gateway`] holds the supervisors' tunnels that dialled in, their
//!   leases, shell sessions and forwards to the controller that holds a
//!   tunnel.
//! - [`server`] binds the listener, serves until shutdown and drains.
//! - [`tls`] serves HTTPS when the configuration names a certificate and
//!   key, and makes self-signed pairs for one-host set-ups.
//!
//! `berth controller` calls [`bind`] and [`BoundController::run`];
//! `berth dev` does the same inside its own process; `berth admin
//! create-user` calls [`create_user`].

// Tests may unwrap: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod auth;
pub mod blocks;
pub mod config;
pub mod error;
pub mod gateway;
pub mod lifecycle;
pub mod limits;
pub mod notify;
pub mod retry;
pub mod reuse;
pub mod server;
pub mod store;
pub mod tls;

pub use api::{app, AppState};
pub use config::{ClusterSettings, Config};
pub use server::{bind, create_user, create_user_in, BoundController};
