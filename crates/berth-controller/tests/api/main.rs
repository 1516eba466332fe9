//! Tests of the controller's HTTP API against a real SQLite store in a
//! temporary directory. Most drive the router with `oneshot`; `socket`
//! serves on port 0 and uses berth-client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod common;
mod containers;
mod discovery;
mod errors;
mod lists;
mod logs;
mod requests;
mod socket;
