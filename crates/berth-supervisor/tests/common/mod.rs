//! Helpers shared by the integration tests: the environment switch, the
//! runtime connection, container specs, and the cleanup of what a test
//! leaves in the runtime.
//!
//! The tests run against a real Docker Engine API (Podman's socket on the
//! development machine) only when `BERTH_INTEGRATION=1`; otherwise each
//! prints "skipped" and returns. `DOCKER_HOST` names the socket,
//! `BERTH_TEST_IMAGE` an image in the runtime's store (default
//! `localhost/busybox:latest`) and `BERTH_TEST_IMAGE_ARCHIVE` its
//! `docker save` archive (default `/tmp/busybox.tar`). The tests that load
//! that archive list its directory in `image_archive_dirs`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use berth_supervisor::runtime::{container_name, ContainerSpec, Network, CONTAINER_UUID_LABEL};
use berth_supervisor::DockerRuntime;
use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use bollard::image::RemoveImageOptions;
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

/// Returns the directory that contains the test archive, for
/// `image_archive_dirs`.
pub fn test_image_archive_dir() -> PathBuf {
    let archive = test_image_archive();
    archive
        .parent()
        .unwrap_or_else(|| {
            panic!(
                "the test archive {} has no parent directory",
                archive.display()
            )
        })
        .to_path_buf()
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
        gpus: None,
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

/// Removes, when dropped, the runtime containers that carry a test's UUID
/// label and the images the test named, so a failing test leaves nothing
/// behind either. Problems are printed, never raised, because the drop may
/// run while a failed test unwinds.
pub struct Cleanup {
    uuid: String,
    images: Vec<String>,
}

impl Cleanup {
    pub fn new(uuid: &str) -> Cleanup {
        Cleanup {
            uuid: uuid.to_string(),
            images: Vec::new(),
        }
    }

    /// Adds an image tag to remove after the containers.
    pub fn image(&mut self, tag: &str) {
        self.images.push(tag.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let uuid = self.uuid.clone();
        let images = std::mem::take(&mut self.images);
        // The test's own Tokio runtime may be shutting down or unwinding,
        // so the removal runs on a runtime of its own, on its own thread.
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| format!("failed to start a Tokio runtime: {err}"))?;
            runtime.block_on(remove_leftovers(&uuid, &images))
        });
        match removal.join() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => eprintln!("cleanup of {}: {message}", self.uuid),
            Err(_) => eprintln!("cleanup of {}: the cleanup thread panicked", self.uuid),
        }
    }
}

async fn remove_leftovers(uuid: &str, images: &[String]) -> Result<(), String> {
    let runtime = DockerRuntime::connect(&docker_host())
        .await
        .map_err(|err| err.to_string())?;
    let docker = runtime.docker();
    let label = format!("{CONTAINER_UUID_LABEL}={uuid}");
    let options = ListContainersOptions {
        all: true,
        filters: HashMap::from([("label".to_string(), vec![label])]),
        ..Default::default()
    };
    let containers = docker
        .list_containers(Some(options))
        .await
        .map_err(|err| format!("failed to list containers: {err}"))?;
    let mut failures = Vec::new();
    for id in containers.into_iter().filter_map(|c| c.id) {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        if let Err(err) = docker.remove_container(&id, Some(options)).await {
            failures.push(format!("failed to remove container {id}: {err}"));
        }
    }
    for image in images {
        let options = RemoveImageOptions {
            force: true,
            ..Default::default()
        };
        match docker.remove_image(image, Some(options), None).await {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(err) => failures.push(format!("failed to remove image {image}: {err}")),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
