//! End to end: collection and file mounts, and images stored as
//! `docker save` archives in collections, with the controller, the local
//! dispatcher backend and `berth supervise` running containers in real
//! Podman. Inputs are uploaded with `berth put` in 1 KiB blocks, so small
//! files already span several blocks. Each cluster gets its own node cache
//! directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_client::Client;
use berth_core::{Container, ContainerState};
use common::{test_image, wait_until, ClusterOptions, TestCluster};
use rand::Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BLOCK_SIZE: &str = "1024";

/// Starts a local-backend cluster whose supervisors cache collections in
/// `cache_dir`.
fn start_cluster(cache_dir: &Path) -> TestCluster {
    let options = ClusterOptions {
        supervisor: vec![
            "block_size: 1024".to_string(),
            format!("cache_dir: {}", cache_dir.display()),
        ],
        ..ClusterOptions::default()
    };
    TestCluster::start_with("local", &options)
}

/// Uploads `paths` with `berth put` and returns the collection's UUID and
/// portable data hash.
fn put(cluster: &TestCluster, token: &str, paths: &[&Path]) -> (String, String) {
    let mut args = vec!["put", "--block-size", BLOCK_SIZE];
    args.extend(paths.iter().map(|path| path.to_str().unwrap()));
    let output = cluster.berth(token, &args);
    assert!(
        output.status.success(),
        "berth put failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    let fields: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "berth put printed {printed:?}");
    (fields[0].to_string(), fields[1].to_string())
}

/// Downloads a whole collection with `berth get` and returns its files by
/// path.
fn get_files(cluster: &TestCluster, token: &str, pdh: &str) -> BTreeMap<String, Vec<u8>> {
    let dest = tempfile::tempdir().unwrap();
    let root = dest.path().join("c");
    let output = cluster.berth(token, &["get", pdh, root.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "berth get {pdh} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut files = BTreeMap::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(&root).unwrap().to_str().unwrap();
                files.insert(relative.to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Creates a committed request and waits for its container's final state.
async fn run_to_end(cluster: &TestCluster, client: &Client, request: Value) -> Container {
    let request = client.create_container_request(&request).await.unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    wait_until(
        cluster,
        Duration::from_secs(120),
        "the container to end",
        || async {
            let container = client.get_container(&uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await
}

/// Reads a container's whole log stream through the API.
async fn live_log(client: &Client, uuid: &str, stream: &str) -> String {
    let mut data = Vec::new();
    loop {
        let chunk = client
            .read_log(uuid, stream, data.len() as u64, None)
            .await
            .unwrap();
        if chunk.data.is_empty() {
            return String::from_utf8_lossy(&data).into_owned();
        }
        data.extend_from_slice(&chunk.data);
    }
}

/// Returns the log file of a container's `berth supervise` process,
/// which the local backend writes into the credentials directory.
fn supervise_log(cluster: &TestCluster, uuid: &str) -> String {
    let path = cluster
        .dir
        .path()
        .join("credentials")
        .join(format!("{uuid}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

fn request(image: &str, command: &str, mounts: Value) -> Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": image,
        "command": ["sh", "-c", command],
        "output_path": "/out",
        "mounts": mounts,
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
        "use_existing": false,
    })
}

fn assert_complete(container: &Container, cluster: &TestCluster) {
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{:?}\n{}\n{}",
        container.runtime_status,
        supervise_log(cluster, &container.uuid),
        cluster.logs()
    );
    assert_eq!(
        container.exit_code,
        Some(0),
        "{:?}",
        container.runtime_status
    );
}

/// Returns the `runtime_status.error` of a container that must be
/// Cancelled.
fn cancelled_reason(container: &Container, cluster: &TestCluster) -> String {
    assert_eq!(
        container.state,
        ContainerState::Cancelled,
        "{:?}\n{}",
        container.runtime_status,
        cluster.logs()
    );
    container
        .runtime_status
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// 5000 bytes that are not a repeating pattern: five 1 KiB blocks.
fn several_blocks() -> Vec<u8> {
    let mut rng = rand::thread_rng();
    (0..5000).map(|_| rng.gen()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn collection_and_json_mounts_reach_output_byte_exact() {
    if common::skip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let cluster = start_cluster(cache.path());
    let token = cluster.create_user("mira");
    let mira = common::client(&cluster.api_url, &token);

    let input = tempfile::tempdir().unwrap();
    let big = several_blocks();
    std::fs::write(input.path().join("big.bin"), &big).unwrap();
    std::fs::write(input.path().join("a.txt"), b"alpha\n").unwrap();
    std::fs::create_dir(input.path().join("sub")).unwrap();
    std::fs::write(input.path().join("sub/c.txt"), b"gamma").unwrap();
    let (uuid, pdh) = put(
        &cluster,
        &token,
        &[
            &input.path().join("big.bin"),
            &input.path().join("a.txt"),
            &input.path().join("sub"),
        ],
    );

    let script = "cp /in/big.bin /out/big.bin \
        && cp /in-file.txt /out/a-copy.txt \
        && cp /by-uuid/a.txt /out/by-uuid.txt \
        && cp /etc/params.json /out/params.json \
        && cat /sub/c.txt > /out/c-from-subdir.txt \
        && if touch /in/new 2>/dev/null; then echo writable; else echo read-only; fi > /out/in-mode.txt \
        && echo changed >> /out/ref/c.txt";
    let mounts = json!({
        "/in": {"kind": "collection", "portable_data_hash": pdh},
        "/in-file.txt": {"kind": "file", "portable_data_hash": pdh, "path": "a.txt"},
        "/by-uuid": {"kind": "collection", "uuid": uuid},
        "/sub": {"kind": "collection", "portable_data_hash": pdh, "path": "sub"},
        "/etc/params.json": {"kind": "json", "content": {"n": 3, "name": "mira"}},
        "/out": {"kind": "tmp", "capacity": 1 << 20},
        "/out/ref": {"kind": "collection", "portable_data_hash": pdh, "path": "sub", "writable": true},
    });
    let container = run_to_end(&cluster, &mira, request(&test_image(), script, mounts)).await;
    assert_complete(&container, &cluster);

    let output = container.output.clone().expect("the output is set");
    let files = get_files(&cluster, &token, &output);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "a-copy.txt",
            "big.bin",
            "by-uuid.txt",
            "c-from-subdir.txt",
            "in-mode.txt",
            "params.json",
            "ref/c.txt"
        ]
    );
    assert!(files["big.bin"] == big, "big.bin differs from the input");
    assert_eq!(files["a-copy.txt"], b"alpha\n");
    assert_eq!(files["by-uuid.txt"], b"alpha\n");
    assert_eq!(files["c-from-subdir.txt"], b"gamma");
    assert_eq!(files["in-mode.txt"], b"read-only\n");
    assert_eq!(files["params.json"], br#"{"n":3,"name":"mira"}"#);
    assert_eq!(
        files["ref/c.txt"], b"gammachanged\n",
        "a collection mount below output_path is a changeable copy in the output"
    );

    // One collection served every mount: it was fetched once, into the
    // cache, and the cache copy is unchanged.
    let supervisor = live_log(&mira, &container.uuid, "supervisor").await;
    assert_eq!(
        supervisor.matches("into the node's cache").count(),
        1,
        "{supervisor}"
    );
    let cached = cache.path().join("collections").join(&pdh);
    assert!(std::fs::read(cached.join("big.bin")).unwrap() == big);
    assert_eq!(std::fs::read(cached.join("sub/c.txt")).unwrap(), b"gamma");
}

#[tokio::test(flavor = "multi_thread")]
async fn writable_collection_output_starts_as_copy() {
    if common::skip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let cluster = start_cluster(cache.path());
    let token = cluster.create_user("otto");
    let otto = common::client(&cluster.api_url, &token);

    let input = tempfile::tempdir().unwrap();
    std::fs::create_dir(input.path().join("start")).unwrap();
    std::fs::write(input.path().join("start/notes.txt"), b"one\n").unwrap();
    std::fs::write(input.path().join("start/keep.txt"), b"kept").unwrap();
    let (_, pdh) = put(&cluster, &token, &[&input.path().join("start")]);

    let mounts = json!({
        "/out": {"kind": "collection", "portable_data_hash": pdh, "path": "start", "writable": true},
    });
    let script = "echo two >> /out/notes.txt && echo new > /out/new.txt";
    let container = run_to_end(&cluster, &otto, request(&test_image(), script, mounts)).await;
    assert_complete(&container, &cluster);

    let files = get_files(&cluster, &token, container.output.as_ref().unwrap());
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["keep.txt", "new.txt", "notes.txt"]);
    assert_eq!(files["notes.txt"], b"one\ntwo\n");
    assert_eq!(files["keep.txt"], b"kept");
    assert_eq!(files["new.txt"], b"new\n");
    // The container changed its copy, never the node's cached entry.
    let cached = cache
        .path()
        .join("collections")
        .join(&pdh)
        .join("start/notes.txt");
    assert_eq!(std::fs::read(cached).unwrap(), b"one\n");
}

/// Writes a copy of the `docker save` archive at `source` whose image
/// has a new ID (a label added to its config) and the tag `tag`, so the
/// runtime's store does not hold it yet.
fn write_fresh_image_archive(source: &Path, tag: &str, target: &Path) {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(source).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_str().unwrap().to_string();
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.push((name, data));
    }
    let manifest_data = &entries
        .iter()
        .find(|(name, _)| name == "manifest.json")
        .expect("the archive has a manifest.json")
        .1;
    let mut manifest: Value = serde_json::from_slice(manifest_data).unwrap();
    let old_config = manifest[0]["Config"].as_str().unwrap().to_string();
    let config_data = &entries
        .iter()
        .find(|(name, _)| *name == old_config)
        .unwrap()
        .1;
    let mut config: Value = serde_json::from_slice(config_data).unwrap();
    config["config"]["Labels"] = json!({"org.berth.test": tag});
    let config_data = serde_json::to_vec(&config).unwrap();
    let new_config = format!("{}.json", hex::encode(Sha256::digest(&config_data)));
    manifest[0]["Config"] = json!(new_config);
    manifest[0]["RepoTags"] = json!([tag]);

    let mut builder = tar::Builder::new(std::fs::File::create(target).unwrap());
    let mut append = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    for (name, data) in &entries {
        if *name != old_config && name != "manifest.json" && name != "repositories" {
            append(name, data);
        }
    }
    append(&new_config, &config_data);
    append("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    builder.finish().unwrap();
}

/// Removes an image from Podman's store when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.0])
            .output();
    }
}

fn image_archive() -> PathBuf {
    PathBuf::from(
        std::env::var("BERTH_TEST_IMAGE_ARCHIVE")
            .unwrap_or_else(|_| "/var/lib/berth/test-image/busybox.tar".into()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn image_collection_is_fetched_and_loaded_once() {
    if common::skip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let cluster = start_cluster(cache.path());
    let token = cluster.create_user("ivo");
    let ivo = common::client(&cluster.api_url, &token);

    let tag = format!(
        "localhost/berth-image-collection:{}",
        rand::thread_rng().gen_range(0..u32::MAX)
    );
    let _remove = RemoveImage(tag.clone());
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("image.tar");
    write_fresh_image_archive(&image_archive(), &tag, &archive);
    let (image_uuid, image_pdh) = put(&cluster, &token, &[&archive]);

    let first = run_to_end(
        &cluster,
        &ivo,
        request(
            &image_pdh,
            "echo first > /out/which",
            json!({"/out": {"kind": "tmp"}}),
        ),
    )
    .await;
    assert_complete(&first, &cluster);
    let first_log = live_log(&ivo, &first.uuid, "supervisor").await;
    assert!(
        first_log.contains(&format!(
            "container_image: fetched collection {image_pdh} into the node's cache"
        )),
        "{first_log}"
    );
    let first_process = supervise_log(&cluster, &first.uuid);
    assert!(
        first_process.contains("loaded image archive"),
        "the first container loads the image: {first_process}"
    );

    // The second names the image by the collection's UUID.
    let second = run_to_end(
        &cluster,
        &ivo,
        request(
            &image_uuid,
            "echo second > /out/which",
            json!({"/out": {"kind": "tmp"}}),
        ),
    )
    .await;
    assert_complete(&second, &cluster);
    let second_log = live_log(&ivo, &second.uuid, "supervisor").await;
    assert!(
        second_log.contains(&format!(
            "container_image: collection {image_pdh} is in the node's cache already; not fetching it"
        )),
        "{second_log}"
    );
    assert!(
        !second_log.contains("into the node's cache"),
        "{second_log}"
    );
    let second_process = supervise_log(&cluster, &second.uuid);
    assert!(
        second_process.contains("image already loaded"),
        "{second_process}"
    );
    assert!(
        !second_process.contains("loaded image archive"),
        "the second container must not load the image again: {second_process}"
    );
    assert_eq!(
        get_files(&cluster, &token, second.output.as_ref().unwrap())["which"],
        b"second\n"
    );

    let cached: Vec<_> = std::fs::read_dir(cache.path().join("collections"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cached, vec![image_pdh.clone()]);
    assert!(
        std::fs::read(
            cache
                .path()
                .join("collections")
                .join(&image_pdh)
                .join("image.tar")
        )
        .unwrap()
            == std::fs::read(&archive).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_collections_cancel_with_clear_reason() {
    if common::skip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let cluster = start_cluster(cache.path());
    let token = cluster.create_user("bo");
    let bo = common::client(&cluster.api_url, &token);

    let missing = "0123456789abcdef0123456789abcdef+99";
    let container = run_to_end(
        &cluster,
        &bo,
        request(
            &test_image(),
            "true",
            json!({
                "/in": {"kind": "collection", "portable_data_hash": missing},
                "/out": {"kind": "tmp"},
            }),
        ),
    )
    .await;
    let reason = cancelled_reason(&container, &cluster);
    assert!(
        reason.contains(&format!("collection {missing} of mount /in was not found")),
        "{reason}"
    );

    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("notes.txt"), b"no image here").unwrap();
    let (_, no_tar) = put(&cluster, &token, &[&work.path().join("notes.txt")]);
    let container = run_to_end(
        &cluster,
        &bo,
        request(&no_tar, "true", json!({"/out": {"kind": "tmp"}})),
    )
    .await;
    let reason = cancelled_reason(&container, &cluster);
    assert!(
        reason.contains(&format!("image collection {no_tar} contains no .tar file")),
        "{reason}"
    );

    // Another user's collection is not readable with this container's
    // token, even by its portable data hash.
    let other = cluster.create_user("eve");
    std::fs::write(work.path().join("private.txt"), b"eve's data").unwrap();
    let (_, private) = put(&cluster, &other, &[&work.path().join("private.txt")]);
    let container = run_to_end(
        &cluster,
        &bo,
        request(
            &test_image(),
            "true",
            json!({
                "/in": {"kind": "collection", "portable_data_hash": private},
                "/out": {"kind": "tmp"},
            }),
        ),
    )
    .await;
    let reason = cancelled_reason(&container, &cluster);
    assert!(reason.contains("was not found"), "{reason}");

    // A writable collection mount outside output_path cannot run, so the
    // controller rejects it at commit.
    let rejected = bo
        .create_container_request(&request(
            &test_image(),
            "true",
            json!({
                "/data": {"kind": "collection", "portable_data_hash": no_tar, "writable": true},
                "/out": {"kind": "tmp"},
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(rejected.status().map(|status| status.as_u16()), Some(422));
    assert!(
        rejected.to_string().contains("mounts./data.writable"),
        "{rejected}"
    );
}
