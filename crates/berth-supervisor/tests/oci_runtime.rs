//! The OCI runtime against real crun, and the same archive on Podman.
//!
//! The tests need root (crun, overlay mounts and cgroups) and run only
//! with `BERTH_INTEGRATION=1`. Each test has its own image cache and work
//! directory, so the image is unpacked afresh per test unless the test
//! checks the reuse itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_supervisor::archive::ImageArchive;
use berth_supervisor::config::{Config, RuntimeKind};
use berth_supervisor::runtime::oci::OciRuntime;
use berth_supervisor::runtime::select::connect_runtime;
use berth_supervisor::runtime::{
    BindMount, ContainerId, ContainerSpec, ImageSource, Network, Runtime, RuntimeError, StdStream,
};
use futures::StreamExt;

use common::{new_uuid, skip, spec, test_image_archive, test_image_archive_dir};

/// What a container wrote and how it exited.
struct Finished {
    stdout: String,
    stderr: String,
    exit_code: i64,
}

/// A crun runtime with its own image cache and work directory.
struct Crun {
    runtime: OciRuntime,
    cache: tempfile::TempDir,
    work: tempfile::TempDir,
}

async fn crun() -> Crun {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = OciRuntime::new(Path::new("crun"), cache.path(), work.path())
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    Crun {
        runtime,
        cache,
        work,
    }
}

fn archive_source() -> ImageSource {
    ImageSource::Archive(
        ImageArchive::open(&test_image_archive(), &[test_image_archive_dir()]).unwrap(),
    )
}

/// Returns a spec for the test image's archive as `runtime` prepared it.
async fn archive_spec(runtime: &dyn Runtime, command: &[&str]) -> ContainerSpec {
    let image = runtime.ensure_image(&archive_source()).await.unwrap();
    let mut spec = spec(&new_uuid(), command);
    spec.image = image;
    spec
}

/// Creates, attaches, starts and waits for a container and collects its
/// output. Leaves the container for the caller to inspect and remove.
async fn run(runtime: &dyn Runtime, spec: &ContainerSpec) -> (ContainerId, Finished) {
    let id = runtime
        .create(spec)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    let mut output = runtime.attach(&id).await.unwrap();
    let collector = tokio::spawn(async move {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(chunk) = output.next().await {
            let chunk = chunk.unwrap();
            match chunk.stream {
                StdStream::Stdout => stdout.extend_from_slice(&chunk.data),
                StdStream::Stderr => stderr.extend_from_slice(&chunk.data),
            }
        }
        (stdout, stderr)
    });
    runtime.start(&id).await.unwrap();
    let exit_code = runtime.wait(&id).await.unwrap();
    let (stdout, stderr) = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .expect("the output stream did not end after the container exited")
        .unwrap();
    let finished = Finished {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        exit_code,
    };
    (id, finished)
}

async fn run_and_remove(runtime: &dyn Runtime, spec: &ContainerSpec) -> Finished {
    let (id, finished) = run(runtime, spec).await;
    runtime.remove(&id).await.unwrap();
    finished
}

#[tokio::test(flavor = "multi_thread")]
async fn same_archive_runs_on_podman_and_crun() {
    if skip("same_archive_runs_on_podman_and_crun") {
        return;
    }
    let script = "echo from $(cat /etc/hostname >/dev/null; echo busybox); ls /bin/busybox; exit 4";
    let podman = common::runtime().await;
    let podman_spec = archive_spec(&podman, &["sh", "-c", script]).await;
    let podman_finished = run_and_remove(&podman, &podman_spec).await;

    let crun = crun().await;
    let crun_spec = archive_spec(&crun.runtime, &["sh", "-c", script]).await;
    let crun_finished = run_and_remove(&crun.runtime, &crun_spec).await;

    assert_eq!(podman_finished.exit_code, 4);
    assert_eq!(crun_finished.exit_code, 4);
    assert_eq!(crun_finished.stdout, podman_finished.stdout);
    assert_eq!(crun_finished.stdout, "from busybox\n/bin/busybox\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_container_reuses_the_unpacked_image() {
    if skip("second_container_reuses_the_unpacked_image") {
        return;
    }
    let crun = crun().await;
    let first = archive_spec(
        &crun.runtime,
        &["sh", "-c", "echo one > /etc/written; cat /etc/written"],
    )
    .await;
    let hex = first.image.trim_start_matches("sha256:").to_string();
    let entry = crun.cache.path().join("rootfs").join(&hex);
    let inode = std::fs::metadata(&entry).unwrap().ino();
    let finished = run_and_remove(&crun.runtime, &first).await;
    assert_eq!(finished.stdout, "one\n");

    // A second runtime, as the next supervisor on the node would be.
    let again = OciRuntime::new(Path::new("crun"), crun.cache.path(), crun.work.path())
        .await
        .unwrap();
    let second = archive_spec(&again, &["sh", "-c", "cat /etc/written || echo absent"]).await;
    assert_eq!(second.image, first.image);
    assert_eq!(
        std::fs::metadata(&entry).unwrap().ino(),
        inode,
        "the image was unpacked again"
    );
    let finished = run_and_remove(&again, &second).await;
    assert_eq!(
        finished.stdout, "absent\n",
        "a container's write reached the cached image"
    );
    assert!(!entry.join("rootfs/etc/written").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_kills_with_137() {
    if skip("memory_limit_kills_with_137") {
        return;
    }
    let crun = crun().await;
    let script = r#"x=$(head -c 200000000 /dev/zero | tr "\0" a); echo survived"#;
    let mut spec = archive_spec(&crun.runtime, &["sh", "-c", script]).await;
    spec.memory_bytes = Some(32 << 20);
    let (id, finished) = run(&crun.runtime, &spec).await;
    assert_eq!(finished.exit_code, 137, "stderr: {}", finished.stderr);
    assert!(!finished.stdout.contains("survived"));
    assert!(crun.runtime.oom_killed(&id));
    let cgroup = crun.runtime.cgroup_path(&id).unwrap();
    assert!(
        cgroup.ends_with(format!("berth/{}", spec.name)),
        "{}",
        cgroup.display()
    );
    crun.runtime.remove(&id).await.unwrap();
    assert!(!crun.runtime.bundle_dir(&spec.name).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn container_under_its_limit_is_not_oom_killed() {
    if skip("container_under_its_limit_is_not_oom_killed") {
        return;
    }
    let crun = crun().await;
    let mut spec = archive_spec(
        &crun.runtime,
        &["sh", "-c", "cat /proc/self/cgroup >/dev/null; exit 0"],
    )
    .await;
    spec.memory_bytes = Some(64 << 20);
    spec.nano_cpus = Some(500_000_000);
    let (id, finished) = run(&crun.runtime, &spec).await;
    assert_eq!(finished.exit_code, 0);
    assert!(!crun.runtime.oom_killed(&id));
    assert!(crun.runtime.pid(&id).unwrap() > 1);
    crun.runtime.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn network_off_leaves_only_loopback() {
    if skip("network_off_leaves_only_loopback") {
        return;
    }
    let crun = crun().await;
    let mut spec = archive_spec(&crun.runtime, &["ls", "/sys/class/net"]).await;
    let finished = run_and_remove(&crun.runtime, &spec).await;
    assert_eq!(finished.stdout, "lo\n");

    spec.name = format!("{}-online", spec.name);
    spec.network = Network::Enabled { mode: None };
    let finished = run_and_remove(&crun.runtime, &spec).await;
    let host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(host.len() > 1, "the host has only {host:?}");
    for interface in &host {
        assert!(
            finished.stdout.contains(interface.as_str()),
            "{interface} missing from {}",
            finished.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn binds_workdir_and_env_apply() {
    if skip("binds_workdir_and_env_apply") {
        return;
    }
    let crun = crun().await;
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.txt"), b"input\n").unwrap();
    let output = tempfile::tempdir().unwrap();
    let script = "cat /in/in.txt; echo x > /in/in.txt 2>/dev/null || echo in read-only; echo written > /out/result; pwd; echo \"$GREETING\"; echo \"$HOME\"; echo \"$PATH\"";
    let mut spec = archive_spec(&crun.runtime, &["sh", "-c", script]).await;
    spec.binds = vec![
        BindMount {
            host_path: input.path().to_path_buf(),
            container_path: "/in".into(),
            read_only: true,
        },
        BindMount {
            host_path: output.path().to_path_buf(),
            container_path: "/out".into(),
            read_only: false,
        },
    ];
    spec.working_dir = Some("/out".into());
    spec.env = vec!["GREETING=hello there".into()];
    let finished = run_and_remove(&crun.runtime, &spec).await;
    assert_eq!(finished.exit_code, 0, "stderr: {}", finished.stderr);
    assert_eq!(
        finished.stdout,
        "input\nin read-only\n/out\nhello there\n/root\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(
        std::fs::read(input.path().join("in.txt")).unwrap(),
        b"input\n"
    );
    assert_eq!(
        std::fs::read(output.path().join("result")).unwrap(),
        b"written\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_is_only_the_spec_and_image() {
    if skip("environment_is_only_the_spec_and_image") {
        return;
    }
    let crun = crun().await;
    let mut spec = archive_spec(&crun.runtime, &["env"]).await;
    spec.env = vec!["ONLY=this".into()];
    let finished = run_and_remove(&crun.runtime, &spec).await;
    let mut names: Vec<&str> = finished
        .stdout
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    names.sort();
    assert_eq!(names, ["HOME", "ONLY", "PATH"], "{}", finished.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_command_is_a_clear_error() {
    if skip("missing_command_is_a_clear_error") {
        return;
    }
    let crun = crun().await;
    let spec = archive_spec(&crun.runtime, &["no-such-program", "arg"]).await;
    let error = crun.runtime.create(&spec).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, RuntimeError::Command { .. }), "{message}");
    assert!(message.contains("no-such-program"), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(!crun.runtime.bundle_dir(&spec.name).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_a_sleeping_container() {
    if skip("stop_ends_a_sleeping_container") {
        return;
    }
    let crun = crun().await;
    let spec = archive_spec(&crun.runtime, &["sleep", "600"]).await;
    let id = crun.runtime.create(&spec).await.unwrap();
    let _output = crun.runtime.attach(&id).await.unwrap();
    crun.runtime.start(&id).await.unwrap();
    let began = Instant::now();
    crun.runtime
        .stop(&id, Duration::from_secs(1))
        .await
        .unwrap();
    let code = crun.runtime.wait(&id).await.unwrap();
    assert!(code == 137 || code == 143, "exit status {code}");
    assert!(began.elapsed() < Duration::from_secs(30));
    crun.runtime.remove(&id).await.unwrap();
    // Stopping and removing again count as done.
    crun.runtime
        .stop(&id, Duration::from_secs(1))
        .await
        .unwrap();
    crun.runtime.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn created_container_is_removed_unstarted() {
    if skip("created_container_is_removed_unstarted") {
        return;
    }
    let crun = crun().await;
    let spec = archive_spec(&crun.runtime, &["true"]).await;
    let id = crun.runtime.create(&spec).await.unwrap();
    let bundle = crun.runtime.bundle_dir(&spec.name);
    let mode = std::fs::metadata(&bundle).unwrap().mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "the bundle's config.json contains the environment"
    );
    crun.runtime.remove(&id).await.unwrap();
    assert!(!crun.runtime.bundle_dir(&spec.name).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn image_by_name_needs_an_archive() {
    if skip("image_by_name_needs_an_archive") {
        return;
    }
    let crun = crun().await;
    let error = crun
        .runtime
        .ensure_image(&ImageSource::Name("localhost/busybox:latest".into()))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("localhost/busybox:latest"), "{message}");
    assert!(message.contains("docker save"), "{message}");
    assert!(message.contains("image_archive_dirs"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_prefers_docker_then_crun() {
    if skip("auto_prefers_docker_then_crun") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let mut config = Config {
        runtime: RuntimeKind::Auto,
        docker_host: Some(common::docker_host()),
        image_cache_dir: cache.path().to_path_buf(),
        ..Config::default()
    };
    let connected = connect_runtime(&config).await.unwrap();
    assert!(connected.docker.is_some());
    assert!(
        connected
            .runtime
            .description()
            .contains("Docker Engine API"),
        "{}",
        connected.runtime.description()
    );

    config.docker_host = Some("unix:///nonexistent/docker.sock".into());
    let connected = connect_runtime(&config).await.unwrap();
    assert!(connected.docker.is_none());
    let description = connected.runtime.description();
    assert!(description.contains("OCI runtime"), "{description}");
    assert!(description.contains("crun"), "{description}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_oci_program_names_the_key() {
    if skip("missing_oci_program_names_the_key") {
        return;
    }
    let config = Config {
        runtime: RuntimeKind::Oci,
        oci_runtime: "no-such-crun".into(),
        ..Config::default()
    };
    let error = connect_runtime(&config).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("no-such-crun"), "{message}");
    assert!(message.contains("supervisor.oci_runtime"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leftover_bundle_is_replaced() {
    if skip("leftover_bundle_is_replaced") {
        return;
    }
    let crun = crun().await;
    let spec = archive_spec(&crun.runtime, &["sh", "-c", "echo second"]).await;
    // An earlier supervisor created the container and ended without
    // removing it.
    let earlier = OciRuntime::new(Path::new("crun"), crun.cache.path(), crun.work.path())
        .await
        .unwrap();
    earlier.create(&spec).await.unwrap();
    drop(earlier);
    assert!(crun.runtime.bundle_dir(&spec.name).exists());

    let finished = run_and_remove(&crun.runtime, &spec).await;
    assert_eq!(finished.exit_code, 0, "stderr: {}", finished.stderr);
    assert_eq!(finished.stdout, "second\n");
    assert!(!crun.runtime.bundle_dir(&spec.name).exists());
}
