//! Helpers shared by the integration tests: the environment switch, the
//! runtime connection, and container specs.
//!
//! The tests run against a real Docker Engine API (Podman's socket on the
//! development machine) only when `BERTH_INTEGRATION=1`; otherwise each
//! prints "skipped" and returns. `DOCKER_HOST` names the socket,
//! `BERTH_TEST_IMAGE` an image in the runtime's store (default
//! `localhost/busybox:latest`) and `BERTH_TEST_IMAGE_ARCHIVE` its
//! `docker save` archive (default `/tmp/busybox.tar`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use berth_supervisor::runtime::{container_name, ContainerSpec, Network, CONTAINER_UUID_LABEL};
use berth_supervisor::DockerRuntime;
use bollard::container::ListContainersOptions;
use rand::Rng;

/// Returns true, after printing "skipped", when integration tests are off.
pub fn skip(test: &str) -> bool {
    if std::env::var("BERTH_INTEGRATION").as_deref() == Ok("1") {
        return false;
    }
    println!("{test}: skipped (set BERTH_INTEGRATION=1 to run it against a real Docker API)");
    true
}

pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///tmp/podman.sock".to_string())
}

pub fn test_image() -> String {
    std::env::var("BERTH_TEST_IMAGE").unwrap_or_else(|_| "localhost/busybox:latest".to_string())
}

pub fn test_image_archive() -> PathBuf {
    std::env::var_os("BERTH_TEST_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/busybox.tar"))
}

pub async fn runtime() -> DockerRuntime {
    DockerRuntime::connect(&docker_host())
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

/// Returns a fresh container UUID, so that concurrent tests never share a
/// runtime container name.
pub fn new_uuid() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..15)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("zzzzz-dz642-{suffix}")
}

pub fn spec(uuid: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: container_name(uuid),
        labels: BTreeMap::from([(CONTAINER_UUID_LABEL.to_string(), uuid.to_string())]),
        image: test_image(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        working_dir: None,
        memory_bytes: None,
        nano_cpus: None,
        network: Network::None,
        binds: Vec::new(),
    }
}

/// Lists the runtime's containers, running or not, that carry `uuid`'s
/// label.
pub async fn containers_labelled(runtime: &DockerRuntime, uuid: &str) -> Vec<String> {
    let label = format!("{CONTAINER_UUID_LABEL}={uuid}");
    let options = ListContainersOptions {
        all: true,
        filters: HashMap::from([("label".to_string(), vec![label])]),
        ..Default::default()
    };
    runtime
        .docker()
        .list_containers(Some(options))
        .await
        .unwrap_or_else(|err| panic!("failed to list containers: {err}"))
        .into_iter()
        .map(|c| c.id.unwrap_or_default())
        .collect()
}
