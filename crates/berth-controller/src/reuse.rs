//! Container reuse: a committed request with `use_existing` takes an
//! existing container that runs the same thing instead of a new one.
//!
//! Two containers run the same thing when they agree on everything that
//! shapes the result: image, command, working directory, environment,
//! output path and globs, mounts, secret mounts, runtime constraints, and
//! the user and scopes the container runs as. The store keeps, for each
//! container, the [`reuse_key`] of these fields (a SHA-256 of their
//! canonical JSON), so candidates are found with one indexed lookup. The
//! key takes the secret mounts as a digest of their own
//! ([`secret_mounts_digest`]), and only when there are some, so that
//! containers without secret mounts keep the keys they had before secret
//! mounts existed.
//!
//! The user is part of the key: a container is reused only by requests of
//! the user it runs as. Berth lets a user read a container only through
//! their own requests, so reusing another user's container would hand over
//! its logs and output.
//!
//! Among the candidates, [`choose`] prefers, as Arvados does:
//!
//! 1. a Complete container with exit code 0, oldest finish first: the
//!    request is satisfied at once and becomes Final;
//! 2. a Running one without `runtime_status.error` and with priority > 0,
//!    most progress first, then earliest start;
//! 3. a Locked one, then a Queued one, highest priority first, then oldest.
//!
//! A request that is not preemptible never takes a preemptible container.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use berth_core::{Container, ContainerRequest, ContainerState, Mount};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::Versioned;

/// The reuse key of a container with its secret mounts: lowercase hex
/// SHA-256 of the canonical JSON of the fields two containers must share
/// to be interchangeable.
pub fn reuse_key(container: &Container, secret_mounts: &BTreeMap<String, Mount>) -> String {
    let mut fields = json!([
        container.container_image,
        container.command,
        container.cwd,
        container.environment,
        container.output_path,
        container.output_glob,
        container.mounts,
        container.runtime_constraints,
        container.runtime_user_uuid,
        container.runtime_auth_scopes,
    ]);
    if !secret_mounts.is_empty() {
        if let Value::Array(items) = &mut fields {
            items.push(Value::String(secret_mounts_digest(secret_mounts)));
        }
    }
    canonical_sha256(&fields)
}

/// Computes the digest of secret mounts that enters the reuse key:
/// lowercase hex SHA-256 of their canonical JSON. Equal secret mounts give
/// equal digests whatever the order of their keys.
pub fn secret_mounts_digest(secret_mounts: &BTreeMap<String, Mount>) -> String {
    canonical_sha256(&json!(secret_mounts))
}

fn canonical_sha256(value: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(value, &mut canonical);
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// Writes JSON with object keys sorted at every depth, so that two equal
/// values give the same text whatever order their keys arrived in.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&fields[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// True when the container may still serve a new request at all.
fn is_candidate(container: &Container, request: &ContainerRequest) -> bool {
    if container.scheduling_parameters.preemptible && !request.scheduling_parameters.preemptible {
        return false;
    }
    match container.state {
        ContainerState::Complete => container.exit_code == Some(0),
        ContainerState::Running => {
            container.priority > 0 && !container.runtime_status.contains_key("error")
        }
        ContainerState::Locked | ContainerState::Queued => true,
        ContainerState::Cancelled => false,
    }
}

/// Rank of a state in the order of preference. Lower is better.
fn state_rank(state: ContainerState) -> u8 {
    match state {
        ContainerState::Complete => 0,
        ContainerState::Running => 1,
        ContainerState::Locked => 2,
        ContainerState::Queued => 3,
        ContainerState::Cancelled => 4,
    }
}

/// Orders two candidates of the same state, the preferred one first.
fn within_state(a: &Container, b: &Container) -> Ordering {
    match a.state {
        ContainerState::Complete => a.finished_at.cmp(&b.finished_at),
        ContainerState::Running => {
            let progress = |c: &Container| c.progress.unwrap_or(0.0);
            progress(b)
                .total_cmp(&progress(a))
                .then(a.started_at.cmp(&b.started_at))
        }
        _ => b.priority.cmp(&a.priority),
    }
    .then(a.created_at.cmp(&b.created_at))
    .then(a.uuid.cmp(&b.uuid))
}

/// Picks the container a request should take among containers with its
/// reuse key, or `None` when a new container is needed.
pub fn choose<'a>(
    request: &ContainerRequest,
    candidates: &'a [Versioned<Container>],
) -> Option<&'a Versioned<Container>> {
    candidates
        .iter()
        .filter(|candidate| is_candidate(&candidate.record, request))
        .min_by(|a, b| {
            state_rank(a.record.state)
                .cmp(&state_rank(b.record.state))
                .then_with(|| within_state(&a.record, &b.record))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::time::parse;

    fn container(uuid: &str, state: ContainerState) -> Container {
        serde_json::from_value(json!({
            "uuid": uuid,
            "owner_uuid": "zzzzz-tpzed-000000000000000",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "state": state,
            "cwd": "/",
            "output_path": "/out",
            "container_image": "busybox",
            "command": ["echo", "hi"],
            "environment": {"A": "1", "B": "2"},
            "mounts": {"/out": {"kind": "tmp", "capacity": 1000}},
            "runtime_constraints": {"ram": 1000, "vcpus": 1},
            "runtime_user_uuid": "zzzzz-tpzed-0123456789abcde",
            "runtime_auth_scopes": ["all"],
            "priority": 10,
        }))
        .unwrap()
    }

    fn none() -> BTreeMap<String, Mount> {
        BTreeMap::new()
    }

    fn secret(content: &str) -> BTreeMap<String, Mount> {
        serde_json::from_value(json!({"/etc/secret": {"kind": "text", "content": content}}))
            .unwrap()
    }

    fn versioned(record: Container) -> Versioned<Container> {
        Versioned { record, version: 1 }
    }

    fn request() -> ContainerRequest {
        serde_json::from_value(json!({
            "uuid": "zzzzz-xvhdp-0123456789abcde",
            "owner_uuid": "zzzzz-tpzed-0123456789abcde",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "state": "Committed",
        }))
        .unwrap()
    }

    #[test]
    fn key_ignores_state_and_json_key_order() {
        let a = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Queued);
        let mut b = container("zzzzz-dz642-bbbbbbbbbbbbbbb", ContainerState::Complete);
        b.priority = 0;
        b.exit_code = Some(0);
        assert_eq!(reuse_key(&a, &none()), reuse_key(&b, &none()));

        let mut with_json = a.clone();
        with_json.mounts.get_mut("/out").unwrap().content = Some(json!({"x": 1, "y": 2}));
        let mut reordered = a.clone();
        let mut content = serde_json::Map::new();
        content.insert("y".into(), json!(2));
        content.insert("x".into(), json!(1));
        reordered.mounts.get_mut("/out").unwrap().content = Some(Value::Object(content));
        assert_eq!(
            reuse_key(&with_json, &none()),
            reuse_key(&reordered, &none())
        );
    }

    /// A named change of one field.
    type Change = (&'static str, fn(&mut Container));

    #[test]
    fn key_differs_in_every_reuse_field() {
        let base = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Queued);
        let changes: [Change; 10] = [
            ("image", |c| c.container_image = "debian".into()),
            ("command", |c| c.command.push("x".into())),
            ("cwd", |c| c.cwd = "/tmp".into()),
            (
                "environment",
                (|c| {
                    c.environment.insert("C".into(), "3".into());
                }),
            ),
            ("output_path", |c| c.output_path = "/other".into()),
            ("output_glob", |c| c.output_glob.push("*.txt".into())),
            ("mounts", |c| {
                c.mounts.get_mut("/out").unwrap().capacity = 2000
            }),
            ("ram", |c| c.runtime_constraints.ram = 2000),
            (
                "user",
                (|c| c.runtime_user_uuid = Some("zzzzz-tpzed-bbbbbbbbbbbbbbb".into())),
            ),
            ("scopes", |c| c.runtime_auth_scopes = vec!["GET /".into()]),
        ];
        for (name, change) in changes {
            let mut other = base.clone();
            change(&mut other);
            assert_ne!(
                reuse_key(&base, &none()),
                reuse_key(&other, &none()),
                "{name}"
            );
        }
    }

    #[test]
    fn key_distinguishes_secret_mounts_by_digest() {
        let base = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Queued);
        let plain = reuse_key(&base, &none());
        let first = reuse_key(&base, &secret("one"));
        assert_ne!(plain, first);
        assert_ne!(first, reuse_key(&base, &secret("two")));
        assert_eq!(first, reuse_key(&base, &secret("one")));
        let digest = secret_mounts_digest(&secret("one"));
        assert_eq!(digest.len(), 64);
        assert!(!digest.contains("one"));
    }

    /// Keys stored before secret mounts existed stay valid for containers
    /// without them: this is the key the earlier computation gave.
    #[test]
    fn key_without_secret_mounts_is_unchanged() {
        let base = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Queued);
        assert_eq!(
            reuse_key(&base, &none()),
            "e03f4dd96a8bf3f0e3a90d84663cfc107a28a7751735a388f18982fc3f16c034"
        );
    }

    #[test]
    fn complete_with_exit_zero_wins_oldest_first() {
        let mut old = container("zzzzz-dz642-ccccccccccccccc", ContainerState::Complete);
        old.exit_code = Some(0);
        old.finished_at = Some(parse("2024-01-02T00:00:00Z").unwrap());
        let mut newer = old.clone();
        newer.uuid = "zzzzz-dz642-ddddddddddddddd".into();
        newer.finished_at = Some(parse("2024-01-03T00:00:00Z").unwrap());
        let mut failed = old.clone();
        failed.uuid = "zzzzz-dz642-eeeeeeeeeeeeeee".into();
        failed.exit_code = Some(1);
        let running = container("zzzzz-dz642-fffffffffffffff", ContainerState::Running);
        let candidates = [newer, failed, running, old].map(versioned);
        let chosen = choose(&request(), &candidates).unwrap();
        assert_eq!(chosen.record.uuid, "zzzzz-dz642-ccccccccccccccc");
    }

    #[test]
    fn running_candidate_rules() {
        let mut slow = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Running);
        slow.progress = Some(0.1);
        let mut fast = container("zzzzz-dz642-bbbbbbbbbbbbbbb", ContainerState::Running);
        fast.progress = Some(0.9);
        let mut failing = container("zzzzz-dz642-ccccccccccccccc", ContainerState::Running);
        failing.progress = Some(1.0);
        failing
            .runtime_status
            .insert("error".into(), json!("disk full"));
        let mut held = container("zzzzz-dz642-ddddddddddddddd", ContainerState::Running);
        held.progress = Some(1.0);
        held.priority = 0;
        let queued = container("zzzzz-dz642-eeeeeeeeeeeeeee", ContainerState::Queued);
        let candidates = [slow, failing, held, queued, fast].map(versioned);
        let chosen = choose(&request(), &candidates).unwrap();
        assert_eq!(chosen.record.uuid, "zzzzz-dz642-bbbbbbbbbbbbbbb");
    }

    #[test]
    fn locked_before_queued_then_priority() {
        let mut queued_high = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Queued);
        queued_high.priority = 1000;
        let locked_low = container("zzzzz-dz642-bbbbbbbbbbbbbbb", ContainerState::Locked);
        let candidates = [queued_high.clone(), locked_low].map(versioned);
        assert_eq!(
            choose(&request(), &candidates).unwrap().record.uuid,
            "zzzzz-dz642-bbbbbbbbbbbbbbb"
        );
        let mut queued_low = queued_high.clone();
        queued_low.uuid = "zzzzz-dz642-ccccccccccccccc".into();
        queued_low.priority = 1;
        let candidates = [queued_low, queued_high].map(versioned);
        assert_eq!(
            choose(&request(), &candidates).unwrap().record.uuid,
            "zzzzz-dz642-aaaaaaaaaaaaaaa"
        );
    }

    #[test]
    fn cancelled_and_preemptible_are_never_taken() {
        let cancelled = container("zzzzz-dz642-aaaaaaaaaaaaaaa", ContainerState::Cancelled);
        let mut preemptible = container("zzzzz-dz642-bbbbbbbbbbbbbbb", ContainerState::Queued);
        preemptible.scheduling_parameters.preemptible = true;
        let candidates = [cancelled, preemptible].map(versioned);
        assert!(choose(&request(), &candidates).is_none());
        let mut wants_preemptible = request();
        wants_preemptible.scheduling_parameters.preemptible = true;
        assert_eq!(
            choose(&wants_preemptible, &candidates).unwrap().record.uuid,
            "zzzzz-dz642-bbbbbbbbbbbbbbb"
        );
    }
}
