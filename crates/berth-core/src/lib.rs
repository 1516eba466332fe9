//! Berth's domain model, shared by every other crate and free of I/O.
//!
//! Vocabulary, as in the Arvados v1 API that Berth serves:
//!
//! - a *container request* ([`ContainerRequest`]) is what a user submits: an
//!   image, a command and the resources it needs. It moves through
//!   [`RequestState`].
//! - a *container* ([`Container`]) is the unit the dispatcher runs as one batch
//!   job. The controller creates it when a request is committed. It moves
//!   through [`ContainerState`].
//! - a *UUID* ([`Uuid`]) names every record: `<cluster id>-<type code>-<15
//!   characters>`, where the type code says what kind of record it is.
//! - a *collection* ([`Collection`]) is a set of files whose bytes live in
//!   content-addressed blocks. Its [`manifest`] lists the files as
//!   segments of blocks named by [`locator`]s (`<md5>+<size>`), and its
//!   *portable data hash* names its content.
//!
//! The controller owns all records; the dispatcher and the supervisor change
//! containers only through the API, and every change of state is checked
//! here by [`ContainerState::check_transition`] and
//! [`RequestState::check_transition`].

// Tests may unwrap: a panic there is a test failure with its message.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod locator;
pub mod manifest;
pub mod priority;
pub mod records;
pub mod secret;
pub mod ssh;
pub mod state;
pub mod time;
pub mod units;
pub mod uuid;
pub mod validate;

pub use records::{
    Collection, Container, ContainerRequest, Mount, RuntimeConstraints, SchedulingParameters,
};
pub use secret::Secret;
pub use state::{ContainerState, RequestState, TransitionError};
pub use uuid::{ClusterId, ObjectType, Uuid, UuidError};
