//! Tests of the controller's HTTP API against a real store: a SQLite file
//! in a temporary directory, or a fresh schema in the PostgreSQL database
//! `BERTH_TEST_DATABASE_URL` names (see `common`). Most drive the router
//! with `oneshot`; `socket` serves on port 0 and uses berth-client, and
//! `connections` sends raw bytes to a server on port 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod blocks;
mod changes;
mod collections;
mod common;
mod compat;
mod connections;
mod containers;
mod discovery;
mod errors;
mod gateway;
mod leases;
mod lifecycle;
mod limits;
mod lists;
mod logs;
mod nul_characters;
mod permissions;
mod requests;
mod secrets;
mod socket;
mod tls;
mod tunnel_flood;
mod tunnel_leases;
mod two_controllers;
mod validation;
