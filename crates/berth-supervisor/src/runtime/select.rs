//! Choosing and connecting the container runtime that
//! `supervisor.runtime` names, or detecting one with `auto`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::docker::DockerRuntime;
use super::oci::OciRuntime;
use super::singularity::SingularityRuntime;
use super::{find_program, Runtime, RuntimeError};
use crate::config::{Config, RuntimeKind};

/// How long `auto` waits for the Docker socket to reply to `/_ping`.
const DOCKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected runtime, and the Docker client when it is the Docker
/// runtime (for the server version in the supervisor log).
#[derive(Debug, Clone)]
pub struct ConnectedRuntime {
    pub runtime: Arc<dyn Runtime>,
    pub docker: Option<DockerRuntime>,
}

impl ConnectedRuntime {
    fn docker(docker: DockerRuntime, config: &Config) -> ConnectedRuntime {
        let runtime = docker
            .clone()
            .with_image_pulls(config.pull_images)
            .with_podman_command(config.podman_command.clone())
            .with_podman_runtime_exec(config.podman_runtime_exec);
        ConnectedRuntime {
            runtime: Arc::new(runtime),
            docker: Some(docker),
        }
    }
}

/// Connects the runtime `config.runtime` names. For `auto`, the first of
/// Docker (its socket replies to `/_ping`), the OCI runtime (the program
/// is found) and Singularity or Apptainer (the program is found).
pub async fn connect_runtime(config: &Config) -> Result<ConnectedRuntime, RuntimeError> {
    let work_dir = config.resolve_temp_dir();
    match config.runtime {
        RuntimeKind::Docker => {
            let docker = DockerRuntime::connect(&config.resolve_docker_host()).await?;
            Ok(ConnectedRuntime::docker(docker, config))
        }
        RuntimeKind::Oci => {
            let oci =
                OciRuntime::new(&config.oci_runtime, &config.image_cache_dir, &work_dir).await?;
            Ok(ConnectedRuntime {
                runtime: Arc::new(oci),
                docker: None,
            })
        }
        RuntimeKind::Singularity => {
            let singularity = SingularityRuntime::new(
                config.singularity.as_deref(),
                &config.image_cache_dir,
                &work_dir,
            )
            .await?;
            Ok(ConnectedRuntime {
                runtime: Arc::new(singularity),
                docker: None,
            })
        }
        RuntimeKind::Auto => detect(config, &work_dir).await,
    }
}

async fn detect(config: &Config, work_dir: &Path) -> Result<ConnectedRuntime, RuntimeError> {
    let endpoint = config.resolve_docker_host();
    let mut reasons = Vec::new();
    match tokio::time::timeout(DOCKER_PROBE_TIMEOUT, DockerRuntime::connect(&endpoint)).await {
        Ok(Ok(docker)) => return Ok(ConnectedRuntime::docker(docker, config)),
        Ok(Err(error)) => reasons.push(format!("Docker: {error}")),
        Err(_) => reasons.push(format!(
            "Docker: {endpoint} did not reply to /_ping within {} s",
            DOCKER_PROBE_TIMEOUT.as_secs()
        )),
    }

    let mut oci_programs = vec![config.oci_runtime.clone()];
    if config.oci_runtime == Path::new("crun") {
        oci_programs.push("runc".into());
    }
    if let Some(program) = oci_programs
        .iter()
        .find(|program| find_program(program).is_some())
    {
        match OciRuntime::new(program, &config.image_cache_dir, work_dir).await {
            Ok(oci) => {
                return Ok(ConnectedRuntime {
                    runtime: Arc::new(oci),
                    docker: None,
                })
            }
            Err(error) => reasons.push(format!("OCI runtime: {error}")),
        }
    } else {
        reasons.push(format!(
            "OCI runtime: {} not found on PATH",
            oci_programs
                .iter()
                .map(|program| program.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }

    match SingularityRuntime::new(
        config.singularity.as_deref(),
        &config.image_cache_dir,
        work_dir,
    )
    .await
    {
        Ok(singularity) => Ok(ConnectedRuntime {
            runtime: Arc::new(singularity),
            docker: None,
        }),
        Err(error) => {
            reasons.push(format!("Singularity: {error}"));
            Err(RuntimeError::NoneAvailable {
                reasons: reasons.join("; "),
            })
        }
    }
}
