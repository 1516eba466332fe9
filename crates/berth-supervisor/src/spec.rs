//! Turning a container record into a runtime [`ContainerSpec`].
//!
//! The container gets only what its record requests. Its environment is
//! the record's `environment` and nothing of the supervisor's own (no API
//! host, no token). The one addition is `ROCR_VISIBLE_DEVICES` for ROCm
//! GPUs passed as device files (see [`crate::gpu`]). Its network is `none` unless `runtime_constraints.API`
//! is true, and its memory and CPU limits come from
//! `runtime_constraints`.

use std::collections::BTreeMap;

use berth_core::Container;

use crate::runtime::{container_name, BindMount, ContainerSpec, Network, CONTAINER_UUID_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the container's command is empty: give the program to run")]
    EmptyCommand,
    #[error("invalid environment variable name {name:?}: a name must be non-empty and contain neither '=' nor NUL")]
    InvalidEnvName { name: String },
    #[error("environment variable {name} contains a NUL byte")]
    InvalidEnvValue { name: String },
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("invalid runtime_constraints.{field} {value}: {reason}")]
    InvalidConstraint {
        field: &'static str,
        value: i64,
        reason: &'static str,
    },
}

/// Builds the spec of a container from its record, the image reference
/// the runtime resolved and the prepared bind mounts.
pub fn container_spec(
    container: &Container,
    image: String,
    binds: Vec<BindMount>,
    network_mode: Option<&str>,
) -> Result<ContainerSpec, SpecError> {
    if container.command.is_empty() {
        return Err(SpecError::EmptyCommand);
    }
    let constraints = &container.runtime_constraints;
    let memory_bytes = positive("ram", constraints.ram)?;
    let nano_cpus = positive("vcpus", constraints.vcpus)?
        .map(|vcpus| {
            vcpus
                .checked_mul(1_000_000_000)
                .ok_or(SpecError::InvalidConstraint {
                    field: "vcpus",
                    value: vcpus,
                    reason: "too large",
                })
        })
        .transpose()?;
    let network = if constraints.api {
        Network::Enabled {
            mode: network_mode.map(str::to_string),
        }
    } else {
        Network::None
    };
    Ok(ContainerSpec {
        name: container_name(&container.uuid),
        labels: BTreeMap::from([(CONTAINER_UUID_LABEL.to_string(), container.uuid.clone())]),
        image,
        command: container.command.clone(),
        env: container_env(&container.environment)?,
        working_dir: working_dir(&container.cwd),
        memory_bytes,
        nano_cpus,
        network,
        binds,
        gpus: None,
    })
}

/// Returns the container's environment as `NAME=value` entries: exactly
/// the record's variables, in name order.
pub fn container_env(environment: &BTreeMap<String, String>) -> Result<Vec<String>, SpecError> {
    environment
        .iter()
        .map(|(name, value)| {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(SpecError::InvalidEnvName { name: name.clone() });
            }
            if value.contains('\0') {
                return Err(SpecError::InvalidEnvValue { name: name.clone() });
            }
            Ok(format!("{name}={value}"))
        })
        .collect()
}

/// `"."` and `""` mean the image's own working directory.
fn working_dir(cwd: &str) -> Option<String> {
    match cwd {
        "" | "." => None,
        cwd => Some(cwd.to_string()),
    }
}

/// Zero means "no limit"; a negative value is an error.
fn positive(field: &'static str, value: i64) -> Result<Option<i64>, SpecError> {
    match value {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        v => Err(SpecError::InvalidConstraint {
            field,
            value: v,
            reason: "must not be negative",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{ContainerState, RuntimeConstraints};

    fn record() -> Container {
        let now = chrono::Utc::now();
        Container {
            uuid: "zzzzz-dz642-0123456789abcde".into(),
            owner_uuid: "zzzzz-tpzed-0123456789abcde".into(),
            created_at: now,
            modified_at: now,
            modified_by_user_uuid: None,
            state: ContainerState::Locked,
            started_at: None,
            finished_at: None,
            log: None,
            environment: BTreeMap::from([
                ("GREETING".to_string(), "hello world".to_string()),
                ("EMPTY".to_string(), String::new()),
            ]),
            cwd: "/work".into(),
            command: vec!["sh".into(), "-c".into(), "echo $GREETING".into()],
            output_path: "/out".into(),
            output_glob: vec![],
            mounts: BTreeMap::new(),
            runtime_constraints: RuntimeConstraints {
                ram: 64 << 20,
                vcpus: 2,
                ..Default::default()
            },
            runtime_status: Default::default(),
            scheduling_parameters: Default::default(),
            output: None,
            container_image: "localhost/busybox:latest".into(),
            progress: None,
            priority: 1,
            exit_code: None,
            auth_uuid: None,
            locked_by_uuid: None,
            lock_count: 1,
            runtime_user_uuid: None,
            runtime_auth_scopes: vec![],
            gateway_address: None,
            gateway_host_key: None,
            gateway_host_key_fingerprint: None,
            interactive_session_started: false,
            output_storage_classes: vec![],
            output_properties: Default::default(),
            cost: 0.0,
            subrequests_cost: 0.0,
            service: false,
            published_ports: Default::default(),
            scheduler_job_id: None,
        }
    }

    #[test]
    fn spec_carries_the_record() {
        let spec = container_spec(&record(), "img".into(), vec![], Some("host")).unwrap();
        assert_eq!(spec.name, "berth-zzzzz-dz642-0123456789abcde");
        assert_eq!(
            spec.labels.get(CONTAINER_UUID_LABEL).map(String::as_str),
            Some("zzzzz-dz642-0123456789abcde")
        );
        assert_eq!(spec.image, "img");
        assert_eq!(spec.command, vec!["sh", "-c", "echo $GREETING"]);
        assert_eq!(spec.env, vec!["EMPTY=", "GREETING=hello world"]);
        assert_eq!(spec.working_dir.as_deref(), Some("/work"));
        assert_eq!(spec.memory_bytes, Some(64 << 20));
        assert_eq!(spec.nano_cpus, Some(2_000_000_000));
        assert_eq!(spec.network, Network::None);
    }

    #[test]
    fn environment_excludes_the_supervisors_own() {
        // The supervisor's environment normally contains PATH and HOME, and
        // the API settings. None of them may reach the container.
        assert!(std::env::var_os("PATH").is_some());
        let mut container = record();
        container.environment = BTreeMap::from([("ONLY".to_string(), "this".to_string())]);
        let spec = container_spec(&container, "img".into(), vec![], None).unwrap();
        assert_eq!(spec.env, vec!["ONLY=this"]);
        container.environment.clear();
        assert!(container_env(&container.environment).unwrap().is_empty());
    }

    #[test]
    fn api_constraint_enables_the_network() {
        let mut container = record();
        container.runtime_constraints.api = true;
        let spec = container_spec(&container, "img".into(), vec![], Some("host")).unwrap();
        assert_eq!(
            spec.network,
            Network::Enabled {
                mode: Some("host".into())
            }
        );
        let spec = container_spec(&container, "img".into(), vec![], None).unwrap();
        assert_eq!(spec.network, Network::Enabled { mode: None });
    }

    #[test]
    fn dot_cwd_keeps_the_image_default() {
        let mut container = record();
        container.cwd = ".".into();
        let spec = container_spec(&container, "img".into(), vec![], None).unwrap();
        assert_eq!(spec.working_dir, None);
    }

    #[test]
    fn zero_constraints_mean_no_limit() {
        let mut container = record();
        container.runtime_constraints.ram = 0;
        container.runtime_constraints.vcpus = 0;
        let spec = container_spec(&container, "img".into(), vec![], None).unwrap();
        assert_eq!(spec.memory_bytes, None);
        assert_eq!(spec.nano_cpus, None);
    }

    #[test]
    fn bad_records_are_rejected_with_the_field() {
        let mut container = record();
        container.command.clear();
        assert!(matches!(
            container_spec(&container, "img".into(), vec![], None),
            Err(SpecError::EmptyCommand)
        ));

        let mut container = record();
        container.runtime_constraints.ram = -1;
        let err = container_spec(&container, "img".into(), vec![], None).unwrap_err();
        assert!(
            err.to_string().contains("runtime_constraints.ram -1"),
            "{err}"
        );

        let mut container = record();
        container.environment.insert("A=B".into(), "x".into());
        let err = container_spec(&container, "img".into(), vec![], None).unwrap_err();
        assert!(err.to_string().contains("\"A=B\""), "{err}");
    }
}
