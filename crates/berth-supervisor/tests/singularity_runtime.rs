//! The Singularity runtime against a stand-in `singularity` command.
//!
//! Singularity cannot be installed on the test machines, so these tests
//! run `tests/stand-ins/singularity`, a stand-in that is not Singularity.
//! It accepts only the command lines of the real tool that the supervisor
//! uses, and fails on anything else as the real tool fails on an unknown
//! flag. It records each call and runs the command in an unpacked copy of
//! the image with `unshare` and `chroot`, so it needs root. The tests check
//! the argument list and the environment the supervisor gives the tool,
//! the SIF cache, and that the container sees only its own variables.
//! They run only with `BERTH_INTEGRATION=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_supervisor::archive::ImageArchive;
use berth_supervisor::runtime::singularity::SingularityRuntime;
use berth_supervisor::runtime::{BindMount, ContainerSpec, ImageSource, Runtime, StdStream};
use futures::StreamExt;

use common::{new_uuid, skip, spec, test_image_archive, test_image_archive_dir};

fn stand_in() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stand-ins/singularity")
}

async fn singularity(cache: &Path, work: &Path) -> SingularityRuntime {
    SingularityRuntime::new(Some(&stand_in()), cache, work)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

fn archive_source() -> ImageSource {
    ImageSource::Archive(
        ImageArchive::open(&test_image_archive(), &[test_image_archive_dir()]).unwrap(),
    )
}

/// Runs a container to its end; returns stdout, stderr and the exit status.
async fn run(runtime: &SingularityRuntime, spec: &ContainerSpec) -> (String, String, i64) {
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
    let code = runtime.wait(&id).await.unwrap();
    let (stdout, stderr) = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .expect("the output stream did not end after the container exited")
        .unwrap();
    runtime.remove(&id).await.unwrap();
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        code,
    )
}

/// Returns the stand-in's record of its last `exec` call.
fn last_exec(sif_dir: &Path) -> serde_json::Value {
    let log = std::fs::read_to_string(sif_dir.join("stand-in-exec.log")).unwrap();
    serde_json::from_str(log.lines().last().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sif_is_built_once_per_node() {
    if skip("sif_is_built_once_per_node") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let first = singularity(cache.path(), work.path()).await;
    let sif = first.ensure_image(&archive_source()).await.unwrap();
    let archive = ImageArchive::open(&test_image_archive(), &[test_image_archive_dir()]).unwrap();
    let hex = archive.image().id.trim_start_matches("sha256:").to_string();
    assert_eq!(
        sif,
        cache
            .path()
            .join("sif")
            .join(format!("{hex}.sif"))
            .display()
            .to_string()
    );

    let second = singularity(cache.path(), work.path()).await;
    assert_eq!(second.ensure_image(&archive_source()).await.unwrap(), sif);
    let builds = std::fs::read_to_string(cache.path().join("sif/stand-in-builds.log")).unwrap();
    assert_eq!(builds.lines().count(), 1, "{builds}");
    // The build read the archive through a path without ':', and the
    // scratch directory is gone.
    assert!(builds.contains(&archive.image().id), "{builds}");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_arguments_and_clean_environment() {
    if skip("exec_arguments_and_clean_environment") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = singularity(cache.path(), work.path()).await;
    let sif = runtime.ensure_image(&archive_source()).await.unwrap();
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.txt"), b"input\n").unwrap();
    let output = tempfile::tempdir().unwrap();

    let script = "cat /in/in.txt; echo x > /in/in.txt 2>/dev/null || echo in read-only; echo written > /out/result; pwd; env | sort; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '";
    let mut spec = spec(&new_uuid(), &["sh", "-c", script]);
    spec.image = sif.clone();
    spec.env = vec!["GREETING=hello there".into(), "EMPTY=".into()];
    spec.working_dir = Some("/out".into());
    spec.memory_bytes = Some(256 << 20);
    spec.nano_cpus = Some(1_500_000_000);
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
    let (stdout, stderr, code) = run(&runtime, &spec).await;
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        stdout,
        "input\nin read-only\n/out\nEMPTY=\nGREETING=hello there\nHOME=/root\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nPWD=/out\nSHLVL=1\nlo\n"
    );
    assert_eq!(
        std::fs::read(output.path().join("result")).unwrap(),
        b"written\n"
    );

    let call = last_exec(&cache.path().join("sif"));
    let argv: Vec<String> = serde_json::from_value(call["argv"].clone()).unwrap();
    let expected: Vec<String> = [
        "exec",
        "--containall",
        "--cleanenv",
        "--pwd",
        "/out",
        "--net",
        "--network=none",
        "--memory",
        "268435456",
        "--memory-swap",
        "268435456",
        "--cpus",
        "1.5",
        "--bind",
        &format!("{}:/in:ro", input.path().display()),
        "--bind",
        &format!("{}:/out", output.path().display()),
        &sif,
        "sh",
        "-c",
        script,
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    assert_eq!(argv, expected);

    // The tool itself gets PATH and its own settings only: nothing of the
    // supervisor's environment, such as DOCKER_HOST or BERTH_INTEGRATION.
    let env: BTreeSet<String> = call["env"].as_object().unwrap().keys().cloned().collect();
    let allowed: BTreeSet<String> = [
        "PATH",
        "SINGULARITY_NO_EVAL",
        "SINGULARITYENV_GREETING",
        "SINGULARITYENV_EMPTY",
    ]
    .iter()
    .map(|name| name.to_string())
    .collect();
    // Python adds LC_CTYPE when it coerces the C locale.
    let extra: Vec<&String> = env
        .difference(&allowed)
        .filter(|name| name.as_str() != "LC_CTYPE")
        .collect();
    assert!(extra.is_empty(), "unexpected variables: {extra:?}");
    assert_eq!(call["env"]["SINGULARITY_NO_EVAL"], "1");
    assert_eq!(call["env"]["SINGULARITYENV_GREETING"], "hello there");
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_status_and_missing_command() {
    if skip("exit_status_and_missing_command") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = singularity(cache.path(), work.path()).await;
    let sif = runtime.ensure_image(&archive_source()).await.unwrap();
    let mut spec = spec(&new_uuid(), &["sh", "-c", "echo out; echo err >&2; exit 5"]);
    spec.image = sif.clone();
    let (stdout, stderr, code) = run(&runtime, &spec).await;
    assert_eq!(
        (stdout.as_str(), stderr.as_str(), code),
        ("out\n", "err\n", 5)
    );

    spec.command = vec!["no-such-program".into()];
    let (_, stderr, code) = run(&runtime, &spec).await;
    assert_eq!(code, 255);
    assert!(stderr.contains("no-such-program"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stand_in_rejects_unknown_arguments() {
    if skip("stand_in_rejects_unknown_arguments") {
        return;
    }
    for args in [
        &["exec", "--bogus", "image.sif", "true"][..],
        &["exec", "--bind", "/a", "image.sif", "true"][..],
        &["build", "--sandbox", "dest", "docker-archive:///x.tar"][..],
        &["run", "image.sif"][..],
    ] {
        let output = Command::new(stand_in()).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(255), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.is_empty(), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_a_sleeping_container() {
    if skip("singularity stop_ends_a_sleeping_container") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = singularity(cache.path(), work.path()).await;
    let mut spec = spec(&new_uuid(), &["sleep", "600"]);
    spec.image = runtime.ensure_image(&archive_source()).await.unwrap();
    let id = runtime.create(&spec).await.unwrap();
    let _output = runtime.attach(&id).await.unwrap();
    runtime.start(&id).await.unwrap();
    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    let code = runtime.wait(&id).await.unwrap();
    assert!(code == 143 || code == 137, "exit status {code}");
    runtime.remove(&id).await.unwrap();
}
