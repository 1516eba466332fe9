//! The Docker Engine API runtime against a real server (Podman's
//! Docker-compatible socket on the development machine).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_supervisor::archive::ImageArchive;
use berth_supervisor::kernel_log::KernelLog;
use berth_supervisor::mounts::plan_mounts;
use berth_supervisor::runtime::docker::ExecRoute;
use berth_supervisor::runtime::exec::{ExecExit, ExecSpec, ExecUser, TerminalSize};
use berth_supervisor::runtime::{
    ContainerId, ContainerSpec, ImageSource, Runtime, RuntimeError, StdStream,
};
use berth_supervisor::DockerRuntime;
use bollard::image::RemoveImageOptions;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use common::{containers_labelled, new_uuid, runtime, skip, spec, Cleanup};

/// What a container wrote and how it exited.
struct Finished {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: i64,
}

/// Creates, attaches, starts and waits for a container, collects its
/// output, and removes it.
async fn run_to_completion(runtime: &DockerRuntime, spec: &ContainerSpec) -> Finished {
    let id = runtime.create(spec).await.unwrap();
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
    runtime.remove(&id).await.unwrap();
    Finished {
        stdout,
        stderr,
        exit_code,
    }
}

#[tokio::test]
async fn output_streams_and_exit_code_are_exact() {
    if skip("output_streams_and_exit_code_are_exact") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let script = r#"printf "a\nb"; printf err >&2; printf '\377\000x'; printf '\376' >&2; exit 3"#;
    let finished = run_to_completion(&runtime, &spec(&uuid, &["sh", "-c", script])).await;
    assert_eq!(finished.exit_code, 3);
    assert_eq!(finished.stdout, b"a\nb\xff\x00x");
    assert_eq!(finished.stderr, b"err\xfe");
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn large_output_arrives_whole_and_in_order() {
    if skip("large_output_arrives_whole_and_in_order") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    // 200000 numbered lines, about 1.3 MB, far more than one frame.
    let finished = run_to_completion(&runtime, &spec(&uuid, &["seq", "1", "200000"])).await;
    assert_eq!(finished.exit_code, 0);
    let expected: String = (1..=200000).map(|n| format!("{n}\n")).collect();
    assert_eq!(finished.stdout.len(), expected.len());
    assert!(
        finished.stdout == expected.as_bytes(),
        "stdout differs from seq's output"
    );
    assert!(finished.stderr.is_empty());
}

#[tokio::test]
async fn environment_workdir_and_mounts_reach_the_container() {
    if skip("environment_workdir_and_mounts_reach_the_container") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let mounts = BTreeMap::from([
        (
            "/etc/note.txt".to_string(),
            berth_core::Mount {
                kind: "text".into(),
                content: Some(serde_json::json!("noted\n")),
                ..Default::default()
            },
        ),
        (
            "/scratch".to_string(),
            berth_core::Mount {
                kind: "tmp".into(),
                ..Default::default()
            },
        ),
    ]);

    let base = tempfile::tempdir().unwrap();
    let prepared = plan_mounts(&mounts)
        .unwrap()
        .prepare(base.path(), &uuid)
        .unwrap();
    let mut spec = spec(
        &uuid,
        &[
            "sh",
            "-c",
            "cat /etc/note.txt; echo \"$GREETING\"; pwd; echo data > /scratch/out; echo ro > /etc/note.txt || echo read-only; env | sort",
        ],
    );
    spec.env = vec!["GREETING=hello there".into()];
    spec.working_dir = Some("/tmp".into());
    spec.binds = prepared.binds.clone();

    let finished = run_to_completion(&runtime, &spec).await;
    assert_eq!(
        finished.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let stdout = String::from_utf8(finished.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("noted"));
    assert_eq!(lines.next(), Some("hello there"));
    assert_eq!(lines.next(), Some("/tmp"));
    assert_eq!(lines.next(), Some("read-only"));

    let env: Vec<&str> = lines.collect();
    assert!(env.contains(&"GREETING=hello there"), "{env:?}");
    // Nothing of the test process's own environment may leak in.
    assert!(
        !env.iter().any(|line| line.starts_with("BERTH_")),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|line| line.starts_with("DOCKER_HOST=")),
        "{env:?}"
    );
    let scratch = prepared
        .binds
        .iter()
        .find(|b| b.container_path == "/scratch")
        .unwrap();
    assert_eq!(
        std::fs::read(scratch.host_path.join("out")).unwrap(),
        b"data\n"
    );
}

#[tokio::test]
async fn stop_ends_a_sleeping_container() {
    if skip("stop_ends_a_sleeping_container") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let id = runtime
        .create(&spec(&uuid, &["sleep", "600"]))
        .await
        .unwrap();
    let _output = runtime.attach(&id).await.unwrap();
    runtime.start(&id).await.unwrap();
    assert_eq!(containers_labelled(&runtime, &uuid).await.len(), 1);

    let started = Instant::now();
    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    let exit_code = tokio::time::timeout(Duration::from_secs(20), runtime.wait(&id))
        .await
        .expect("the stopped container did not exit")
        .unwrap();
    let elapsed = started.elapsed();
    // sleep runs as PID 1, which ignores SIGTERM, so SIGKILL ends it.
    assert_eq!(exit_code, 137);
    assert!(
        elapsed < Duration::from_secs(10),
        "stopping took {elapsed:?}"
    );

    runtime.remove(&id).await.unwrap();
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
    // Stopping and removing what is gone counts as success.
    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    runtime.remove(&id).await.unwrap();
}

#[tokio::test]
async fn pid_and_cgroup_of_a_running_container() {
    if skip("pid_and_cgroup_of_a_running_container") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let mut spec = spec(&uuid, &["sleep", "600"]);
    spec.memory_bytes = Some(64 << 20);
    let id = runtime.create(&spec).await.unwrap();
    assert_eq!(
        runtime.pid(&id).await.unwrap(),
        None,
        "created, not running"
    );
    let _output = runtime.attach(&id).await.unwrap();
    runtime.start(&id).await.unwrap();

    let pid = runtime
        .pid(&id)
        .await
        .unwrap()
        .expect("a running container has a PID");
    let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(
        command, b"sleep\x00600\x00",
        "the PID is the container's process"
    );
    let dirs = berth_supervisor::cgroup::CgroupDirs::locate_process(pid).unwrap();
    let memory = dirs.memory.clone().expect("the container's memory cgroup");
    assert!(
        memory.path.to_string_lossy().contains(&id.0),
        "the cgroup is the container's own: {memory:?}"
    );
    let sample = dirs.read();
    let read = sample.memory.expect("memory counters");
    assert_eq!(read.limit, Some(64 << 20));
    assert!(read.current > 0, "{read:?}");
    assert!(sample.cpu.is_some(), "{sample:?}");

    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    runtime.wait(&id).await.unwrap();
    assert_eq!(runtime.pid(&id).await.unwrap(), None, "exited");
    assert!(
        !runtime.oom_killed(&id).await.unwrap(),
        "a stopped container was not killed for memory"
    );
    runtime.remove(&id).await.unwrap();
}

/// Runs `argv` in the container `id` without a terminal, writes `input`
/// to its stdin, and returns its stdout, stderr and exit.
async fn exec_collect(
    runtime: &DockerRuntime,
    id: &ContainerId,
    argv: &[&str],
    env: &[&str],
    input: &[u8],
) -> (Vec<u8>, Vec<u8>, ExecExit) {
    use tokio::io::AsyncWriteExt;

    let spec = ExecSpec {
        argv: argv.iter().map(|arg| arg.to_string()).collect(),
        user: ExecUser {
            name: Some("nobody".to_string()),
            uid: 65534,
            gid: 65534,
        },
        env: env.iter().map(|entry| entry.to_string()).collect(),
        working_dir: Some("/tmp".to_string()),
        terminal: None,
    };
    let mut process = runtime.exec(id, &spec).await.unwrap();
    let writer = {
        let input = input.to_vec();
        let mut stdin = process.stdin;
        tokio::spawn(async move {
            stdin.write_all(&input).await.unwrap();
            stdin.shutdown().await.unwrap();
        })
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(chunk) = process.output.next().await {
        let chunk = chunk.unwrap();
        match chunk.stream {
            StdStream::Stdout => stdout.extend_from_slice(&chunk.data),
            StdStream::Stderr => stderr.extend_from_slice(&chunk.data),
        }
    }
    writer.await.unwrap();
    let exit = process.control.wait().await.unwrap();
    (stdout, stderr, exit)
}

/// On Podman, execs go around the exec API: through crun itself, or
/// without that route through `podman exec`. Each gives the same user,
/// working directory, environment, stdio and exit status as the API, and
/// a stdin of several MiB comes back byte for byte.
#[tokio::test]
async fn podman_exec_routes_match_the_api() {
    if skip("podman_exec_routes_match_the_api") {
        return;
    }
    let api = runtime().await;
    let version = api.server_version().await.unwrap();
    if !version.starts_with("Podman") {
        println!("podman_exec_routes_match_the_api: skipped ({version} is not Podman)");
        return;
    }
    let podman = || {
        api.clone()
            .with_podman_command(Some(PathBuf::from("podman")))
    };
    let direct = podman();
    let cli = podman().with_podman_runtime_exec(false);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    // The container makes `nobody` a member of a group of its own, which
    // each route must give the exec as a supplementary group.
    let command = [
        "sh",
        "-c",
        "echo staff:x:50:nobody >>/etc/group && exec sleep 600",
    ];
    let id = api.create(&spec(&uuid, &command)).await.unwrap();
    let _output = api.attach(&id).await.unwrap();
    api.start(&id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (stdout, _, _) =
            exec_collect(&api, &id, &["grep", "-c", "staff", "/etc/group"], &[], b"").await;
        if stdout == b"1\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group was not added within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(direct.exec_route(&id).await, ExecRoute::OciRuntime);
    assert_eq!(cli.exec_route(&id).await, ExecRoute::PodmanCommand);

    // Execs through crun are not Podman's exec sessions, with a terminal
    // or without: the count Podman keeps does not move.
    let sessions_before = podman_exec_sessions(&id);
    let (output, exit) =
        tty_exec_collect(&direct, &id, &["sh", "-c", "tty; stty size; exit 3"]).await;
    assert!(output.contains("/dev/pts/"), "{output}");
    assert!(output.contains("24 80"), "{output}");
    assert_eq!(exit, ExecExit::Status(3));
    let (stdout, _, exit) = exec_collect(&direct, &id, &["true"], &[], b"").await;
    assert!(stdout.is_empty());
    assert_eq!(exit, ExecExit::Status(0));
    assert_eq!(podman_exec_sessions(&id), sessions_before);
    assert_eq!(
        api.exec_route(&id).await,
        ExecRoute::EngineApi,
        "no command, no CLI"
    );

    let script =
        "id -u; id -G; pwd; printf '%s|%s\\n' \"$SPACED\" \"$EQ\"; echo to-stderr >&2; exit 7";
    let env = ["SPACED= two words ", "EQ=a=b"];
    let mut outcomes = Vec::new();
    for runtime in [&direct, &cli, &api] {
        outcomes.push(exec_collect(runtime, &id, &["sh", "-c", script], &env, b"").await);
    }
    assert_eq!(outcomes[0], outcomes[2], "crun and the API agree");
    assert_eq!(outcomes[1], outcomes[2], "podman exec and the API agree");
    let (stdout, stderr, exit) = &outcomes[0];
    assert_eq!(
        String::from_utf8_lossy(stdout),
        "65534\n65534 50\n/tmp\n two words |a=b\n"
    );
    assert_eq!(stderr.as_slice(), b"to-stderr\n");
    assert_eq!(*exit, ExecExit::Status(7));

    // 8 MiB of varied bytes through stdin and back out.
    let input: Vec<u8> = (0..8u32 << 20)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for runtime in [&direct, &cli] {
        let (stdout, stderr, exit) = exec_collect(runtime, &id, &["cat"], &[], &input).await;
        assert!(
            stdout == input,
            "cat returned {} bytes, not the same",
            stdout.len()
        );
        assert!(stderr.is_empty(), "{}", String::from_utf8_lossy(&stderr));
        assert_eq!(exit, ExecExit::Status(0));
    }

    // A value with a line break cannot go in podman's env file, so the
    // API runs it; crun takes it in its process file.
    for runtime in [&direct, &cli] {
        let (stdout, _, exit) = exec_collect(
            runtime,
            &id,
            &["sh", "-c", "echo \"$LINES\""],
            &["LINES=one\ntwo"],
            b"",
        )
        .await;
        assert_eq!(stdout, b"one\ntwo\n");
        assert_eq!(exit, ExecExit::Status(0));
    }
    // A program that is not there exits with 127, as in a shell.
    for runtime in [&direct, &cli] {
        let (_, stderr, exit) = exec_collect(runtime, &id, &["/no/such/program"], &[], b"").await;
        assert_eq!(
            exit,
            ExecExit::Status(127),
            "{}",
            String::from_utf8_lossy(&stderr)
        );
    }

    api.stop(&id, Duration::from_secs(1)).await.unwrap();
    api.wait(&id).await.unwrap();
    api.remove(&id).await.unwrap();
}

/// Returns how many exec sessions Podman keeps for the container `id`.
fn podman_exec_sessions(id: &ContainerId) -> String {
    let output = std::process::Command::new("podman")
        .args([
            "container",
            "inspect",
            "--format",
            "{{len .ExecIDs}}",
            &id.0,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Runs `argv` in the container `id` with a terminal of 80 by 24 and
/// returns its output and exit.
async fn tty_exec_collect(
    runtime: &DockerRuntime,
    id: &ContainerId,
    argv: &[&str],
) -> (String, ExecExit) {
    let spec = ExecSpec {
        argv: argv.iter().map(|arg| arg.to_string()).collect(),
        user: ExecUser {
            name: Some("root".to_string()),
            uid: 0,
            gid: 0,
        },
        env: vec!["TERM=xterm".to_string()],
        working_dir: None,
        terminal: Some(TerminalSize {
            columns: 80,
            rows: 24,
        }),
    };
    let mut process = runtime.exec(id, &spec).await.unwrap();
    let mut output = Vec::new();
    while let Some(chunk) = process.output.next().await {
        output.extend_from_slice(&chunk.unwrap().data);
    }
    let exit = process.control.wait().await.unwrap();
    (String::from_utf8_lossy(&output).into_owned(), exit)
}

/// A container the command line does not see (another engine, or another
/// storage) keeps its execs on the API.
#[tokio::test]
async fn podman_routes_skip_unknown_containers() {
    if skip("podman_routes_skip_unknown_containers") {
        return;
    }
    let cli = runtime()
        .await
        .with_podman_command(Some(PathBuf::from("podman")));
    let missing = ContainerId("0".repeat(64));
    assert_eq!(cli.exec_route(&missing).await, ExecRoute::EngineApi);
    let nowhere = runtime()
        .await
        .with_podman_command(Some(PathBuf::from("/no/such/podman")));
    assert_eq!(nowhere.exec_route(&missing).await, ExecRoute::EngineApi);
}

/// The kernel log keeps a kill that leaves nothing else behind: the
/// container is killed in its first milliseconds, and Podman removes its
/// cgroup as it exits. Reading `/dev/kmsg` needs root (CAP_SYSLOG).
#[tokio::test]
async fn kernel_log_kill_at_the_memory_limit() {
    if skip("kernel_log_kill_at_the_memory_limit") {
        return;
    }
    let mut kernel_log = match KernelLog::open() {
        Ok(kernel_log) => kernel_log,
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            println!("kernel_log_kill_at_the_memory_limit: skipped (/dev/kmsg needs CAP_SYSLOG)");
            return;
        }
        Err(error) => panic!("failed to open /dev/kmsg: {error}"),
    };
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    // tail keeps the last line, and /dev/zero has no newline.
    let mut spec = spec(&uuid, &["sh", "-c", "head -c 300m /dev/zero | tail"]);
    spec.memory_bytes = Some(64 << 20);
    let id = runtime.create(&spec).await.unwrap();
    let _output = runtime.attach(&id).await.unwrap();
    runtime.start(&id).await.unwrap();
    assert_eq!(runtime.wait(&id).await.unwrap(), 137);

    let report = kernel_log.read_oom_kills(&id.0).unwrap();
    assert!(report.kills >= 1, "{report:?}");
    assert_eq!(report.limit, Some(64 << 20), "{report:?}");
    let usage = report.usage.expect("the use at the kill");
    assert!(usage >= 60 << 20, "{report:?}");
    // A record is read once.
    let again = kernel_log.read_oom_kills(&id.0).unwrap();
    assert_eq!(again.kills, 0, "{again:?}");
    runtime.remove(&id).await.unwrap();
}

#[tokio::test]
async fn limits_and_network_are_visible_through_inspect() {
    if skip("limits_and_network_are_visible_through_inspect") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let mut spec = spec(&uuid, &["true"]);
    spec.memory_bytes = Some(64 << 20);
    spec.nano_cpus = Some(500_000_000);
    let id = runtime.create(&spec).await.unwrap();
    let inspected = runtime.docker().inspect_container(&id.0, None).await;
    runtime.remove(&id).await.unwrap();
    let inspected = inspected.unwrap();
    assert_eq!(
        inspected.name.as_deref().map(|n| n.trim_start_matches('/')),
        Some(spec.name.as_str())
    );
    let host = inspected.host_config.unwrap();
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.memory_swap, Some(64 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    let labels = inspected.config.unwrap().labels.unwrap();
    assert_eq!(labels.get("org.berth.container-uuid"), Some(&uuid));
}

#[tokio::test]
async fn leftover_container_with_the_same_name_is_replaced() {
    if skip("leftover_container_with_the_same_name_is_replaced") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let spec = spec(&uuid, &["true"]);
    let first = runtime.create(&spec).await.unwrap();
    let second = runtime.create(&spec).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(
        containers_labelled(&runtime, &uuid).await,
        vec![second.0.clone()]
    );
    runtime.remove(&second).await.unwrap();
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

#[tokio::test]
async fn image_by_name_must_be_in_the_store() {
    if skip("image_by_name_must_be_in_the_store") {
        return;
    }
    let runtime = runtime().await;
    let present = common::test_image();
    assert_eq!(
        runtime
            .ensure_image(&ImageSource::Name(present.clone()))
            .await
            .unwrap(),
        present
    );
    // Pulls are off by default, so the runtime never contacts the
    // registry this name gives.
    let missing = format!("localhost/berth-missing-{}:latest", new_uuid());
    let err = runtime
        .ensure_image(&ImageSource::Name(missing.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&missing), "{message}");
    assert!(message.contains("podman load -i FILE"), "{message}");
    assert!(message.contains("docker load -i FILE"), "{message}");
    assert!(
        message.contains("supervisor.image_archive_dirs"),
        "{message}"
    );
    assert!(message.contains("supervisor.pull_images"), "{message}");
}

#[tokio::test]
async fn failed_pull_carries_the_daemon_message() {
    if skip("failed_pull_carries_the_daemon_message") {
        return;
    }
    let runtime = runtime().await.with_image_pulls(true);
    // Nothing listens on loopback port 1, so the pull fails at once and
    // no traffic leaves the machine.
    let missing = format!("127.0.0.1:1/berth-missing-{}:latest", new_uuid());
    let err = runtime
        .ensure_image(&ImageSource::Name(missing.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::PullFailed { .. }), "{err}");
    let message = err.to_string();
    println!("{message}");
    assert!(message.contains(&missing), "{message}");
    assert!(!message.contains("Docker stream error"), "{message}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
}

#[tokio::test]
async fn present_archive_image_is_not_reloaded() {
    if skip("present_archive_image_is_not_reloaded") {
        return;
    }
    let runtime = runtime().await;
    let archive = ImageArchive::open(
        &common::test_image_archive(),
        &[common::test_image_archive_dir()],
    )
    .unwrap();
    let archive_image = archive.image().clone();
    // Make sure the store contains the archive's image, then record where
    // its tags point, because a second load would move them.
    runtime
        .ensure_image(&ImageSource::Archive(archive.clone()))
        .await
        .unwrap();
    let tags_before = tag_ids(&runtime, &archive_image.repo_tags).await;

    let reference = runtime
        .ensure_image(&ImageSource::Archive(archive))
        .await
        .unwrap();
    let inspected = runtime.docker().inspect_image(&reference).await.unwrap();
    assert_eq!(
        inspected.id.as_deref(),
        Some(archive_image.id.as_str()),
        "{reference} is another image"
    );
    assert_eq!(
        tag_ids(&runtime, &archive_image.repo_tags).await,
        tags_before
    );
}

/// Returns the image ID each tag points at, or None.
async fn tag_ids(runtime: &DockerRuntime, tags: &[String]) -> Vec<Option<String>> {
    let mut ids = Vec::new();
    for tag in tags {
        ids.push(
            runtime
                .docker()
                .inspect_image(tag)
                .await
                .ok()
                .and_then(|image| image.id),
        );
    }
    ids
}

#[tokio::test]
async fn archive_is_loaded_and_runs() {
    if skip("archive_is_loaded_and_runs") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let tag = format!("localhost/berth-test-{uuid}:latest");
    let mut cleanup = Cleanup::new(&uuid);
    cleanup.image(&tag);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.tar");
    let image_id = write_variant_archive(&common::test_image_archive(), &path, &tag, &uuid);
    let archive = ImageArchive::open(&path, &[dir.path().to_path_buf()]).unwrap();

    let reference = runtime
        .ensure_image(&ImageSource::Archive(archive.clone()))
        .await
        .unwrap();
    assert_eq!(reference, tag);
    let inspected = runtime.docker().inspect_image(&tag).await.unwrap();
    assert_eq!(inspected.id.as_deref(), Some(image_id.as_str()));
    // The second time the image is present, and the archive is not
    // uploaded again.
    let again = runtime
        .ensure_image(&ImageSource::Archive(archive))
        .await
        .unwrap();
    assert_eq!(again, tag);

    let mut spec = spec(&uuid, &["echo", "from the archive"]);
    spec.image = reference;
    let finished = run_to_completion(&runtime, &spec).await;
    let removed = runtime
        .docker()
        .remove_image(
            &tag,
            Some(RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
    assert_eq!(finished.stdout, b"from the archive\n");
    assert_eq!(finished.exit_code, 0);
    removed.unwrap();
}

#[tokio::test]
async fn archive_the_runtime_rejects_fails_with_its_path() {
    if skip("archive_the_runtime_rejects_fails_with_its_path") {
        return;
    }
    let runtime = runtime().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.tar");
    // The manifest names a config by digest, so the archive passes the
    // supervisor's own reading, but its config and layer are missing.
    let manifest = format!(
        r#"[{{"Config":"{}.json","RepoTags":null,"Layers":["missing/layer.tar"]}}]"#,
        "c".repeat(64)
    );
    let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "manifest.json", manifest.as_bytes())
        .unwrap();
    builder.into_inner().unwrap();

    let archive = ImageArchive::open(&path, &[dir.path().to_path_buf()]).unwrap();
    let err = runtime
        .ensure_image(&ImageSource::Archive(archive))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::LoadImage { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn missing_command_fails_at_start() {
    if skip("missing_command_fails_at_start") {
        return;
    }
    let runtime = runtime().await;
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let id = runtime
        .create(&spec(&uuid, &["/no/such/program"]))
        .await
        .unwrap();
    let started = runtime.start(&id).await;
    runtime.remove(&id).await.unwrap();
    let err = started.unwrap_err();
    assert!(err.to_string().contains("start container"), "{err}");
    assert!(containers_labelled(&runtime, &uuid).await.is_empty());
}

/// Copies a `docker save` archive under `tag`, with a changed config so
/// that the image has a new ID that no store contains yet. Returns the
/// new ID.
fn write_variant_archive(source: &Path, target: &Path, tag: &str, marker: &str) -> String {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(source).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.push((name, data));
    }
    let manifest_bytes = &entries
        .iter()
        .find(|(name, _)| name == "manifest.json")
        .unwrap()
        .1;
    let mut manifest: serde_json::Value = serde_json::from_slice(manifest_bytes).unwrap();
    let config_name = manifest[0]["Config"].as_str().unwrap().to_string();
    let config_bytes = &entries
        .iter()
        .find(|(name, _)| *name == config_name)
        .unwrap()
        .1;
    let mut config: serde_json::Value = serde_json::from_slice(config_bytes).unwrap();
    config["author"] = serde_json::json!(format!("berth test {marker}"));
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let digest = hex::encode(Sha256::digest(&config_bytes));
    let new_config_name = format!("{digest}.json");
    manifest[0]["Config"] = serde_json::json!(new_config_name);
    manifest[0]["RepoTags"] = serde_json::json!([tag]);

    let mut builder = tar::Builder::new(std::fs::File::create(target).unwrap());
    let mut append = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    for (name, data) in &entries {
        if name == "manifest.json" || *name == config_name || name == "repositories" {
            continue;
        }
        append(name, data);
    }
    append(&new_config_name, &config_bytes);
    append("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    builder.into_inner().unwrap();
    format!("sha256:{digest}")
}
