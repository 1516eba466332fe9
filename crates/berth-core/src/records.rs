//! The records of the Arvados v1 API that Berth serves, with their JSON
//! field names.
//!
//! Fields the API may leave unset are `Option` and serialise as `null`.
//! Records also carry `kind` and `etag` on the wire; the controller adds them
//! and clients ignore them, so they are not fields here. Deserialisation
//! ignores fields it does not know, so that newer servers stay readable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::state::{ContainerState, RequestState};
use crate::time::{serde_opt_ts, serde_ts, Timestamp};

/// The `runtime_status` key that explains to users why a Locked container's job
/// is pending, such as `slurm job 69 is pending: Priority (jobs of higher
/// priority are ahead of it)`. Only the dispatcher writes it; the
/// controller shows it as a request's `scheduling_status`.
pub const SCHEDULING_STATUS_KEY: &str = "schedulingStatus";

/// Resources a container needs. Sizes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConstraints {
    pub ram: i64,
    pub vcpus: i64,
    pub keep_cache_ram: i64,
    pub keep_cache_disk: i64,
    /// Whether the container gets network access and API credentials.
    #[serde(rename = "API")]
    pub api: bool,
    pub gpu: GpuConstraints,
    /// Deprecated form of `gpu` that older clients still send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConstraints {
    pub stack: String,
    pub device_count: i64,
    pub driver_version: String,
    pub hardware_target: Vec<String>,
    pub vram: i64,
}

/// Scheduling options the batch system applies to a container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulingParameters {
    /// Partitions (Slurm) or queues (LSF) the job may run in; empty means any.
    pub partitions: Vec<String>,
    pub preemptible: bool,
    /// Maximum run time in seconds; 0 means no limit.
    pub max_run_time: i64,
    /// Whether this container runs a workflow engine that submits others.
    pub supervisor: bool,
}

/// One entry of `mounts`: what appears at a path inside the container.
///
/// The fields are the union of every kind's keys, as in Arvados's Go SDK,
/// so clients that send zero values for keys of other kinds are accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mount {
    /// One of `tmp`, `collection`, `json`, `text`, `file`, `keep`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portable_data_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub writable: bool,
    /// Size of a `tmp` mount in bytes.
    #[serde(skip_serializing_if = "is_zero")]
    pub capacity: i64,
    /// Content of a `json` or `text` mount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exclude_from_output: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// A container request: what a user asked to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRequest {
    pub uuid: String,
    pub owner_uuid: String,
    #[serde(with = "serde_ts")]
    pub created_at: Timestamp,
    #[serde(with = "serde_ts")]
    pub modified_at: Timestamp,
    pub modified_by_user_uuid: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    pub state: RequestState,
    pub requesting_container_uuid: Option<String>,
    pub container_uuid: Option<String>,
    #[serde(default)]
    pub container_count: i64,
    pub container_count_max: Option<i64>,
    #[serde(default)]
    pub mounts: BTreeMap<String, Mount>,
    #[serde(default)]
    pub runtime_constraints: RuntimeConstraints,
    #[serde(default)]
    pub scheduling_parameters: SchedulingParameters,
    pub container_image: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    pub output_path: Option<String>,
    #[serde(default)]
    pub output_glob: Vec<String>,
    pub output_name: Option<String>,
    #[serde(default)]
    pub output_ttl: i64,
    #[serde(default)]
    pub priority: i64,
    #[serde(default, with = "serde_opt_ts")]
    pub expires_at: Option<Timestamp>,
    #[serde(default = "default_true")]
    pub use_existing: bool,
    pub filters: Option<String>,
    pub log_uuid: Option<String>,
    pub output_uuid: Option<String>,
    #[serde(default)]
    pub output_storage_classes: Vec<String>,
    #[serde(default)]
    pub output_properties: Map<String, Value>,
    #[serde(default)]
    pub cumulative_cost: f64,
    #[serde(default)]
    pub service: bool,
    #[serde(default)]
    pub published_ports: Map<String, Value>,
}

fn default_true() -> bool {
    true
}

/// A container: one run of an image and command, dispatched as one batch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Container {
    pub uuid: String,
    pub owner_uuid: String,
    #[serde(with = "serde_ts")]
    pub created_at: Timestamp,
    #[serde(with = "serde_ts")]
    pub modified_at: Timestamp,
    pub modified_by_user_uuid: Option<String>,
    pub state: ContainerState,
    #[serde(default, with = "serde_opt_ts")]
    pub started_at: Option<Timestamp>,
    #[serde(default, with = "serde_opt_ts")]
    pub finished_at: Option<Timestamp>,
    pub log: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    pub cwd: String,
    #[serde(default)]
    pub command: Vec<String>,
    pub output_path: String,
    #[serde(default)]
    pub output_glob: Vec<String>,
    #[serde(default)]
    pub mounts: BTreeMap<String, Mount>,
    #[serde(default)]
    pub runtime_constraints: RuntimeConstraints,
    #[serde(default)]
    pub runtime_status: Map<String, Value>,
    #[serde(default)]
    pub scheduling_parameters: SchedulingParameters,
    pub output: Option<String>,
    pub container_image: String,
    pub progress: Option<f64>,
    #[serde(default)]
    pub priority: i64,
    pub exit_code: Option<i32>,
    pub auth_uuid: Option<String>,
    pub locked_by_uuid: Option<String>,
    #[serde(default)]
    pub lock_count: i64,
    pub runtime_user_uuid: Option<String>,
    #[serde(default)]
    pub runtime_auth_scopes: Vec<String>,
    pub gateway_address: Option<String>,
    /// The OpenSSH public key of the container's gateway, one line
    /// (`ssh-ed25519 AAAA...`), set by its supervisor.
    #[serde(default)]
    pub gateway_host_key: Option<String>,
    /// The SHA-256 fingerprint of `gateway_host_key` in OpenSSH's form
    /// (`SHA256:...`), computed by the controller.
    #[serde(default)]
    pub gateway_host_key_fingerprint: Option<String>,
    #[serde(default)]
    pub interactive_session_started: bool,
    #[serde(default)]
    pub output_storage_classes: Vec<String>,
    #[serde(default)]
    pub output_properties: Map<String, Value>,
    #[serde(default)]
    pub cost: f64,
    #[serde(default)]
    pub subrequests_cost: f64,
    #[serde(default)]
    pub service: bool,
    #[serde(default)]
    pub published_ports: Map<String, Value>,
    /// The batch system's id of the job running this container, set by the
    /// dispatcher after submission. A Berth field; Arvados has no such field.
    #[serde(default)]
    pub scheduler_job_id: Option<String>,
}

/// Secrets minted when a container is locked. They are returned once, in
/// the `credentials` key of the lock response, and the controller keeps
/// only their hashes.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerCredentials {
    /// The container's own API token, `v2/<auth uuid>/<secret>/<container uuid>`.
    pub api_token: String,
    /// The secret the supervisor's gateway presents when it opens its tunnel.
    pub gateway_secret: String,
}

impl std::fmt::Debug for ContainerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCredentials")
            .field("api_token", &"<redacted>")
            .field("gateway_secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_constraints_use_arvados_names() {
        let parsed: RuntimeConstraints =
            serde_json::from_str(r#"{"ram": 1048576, "vcpus": 2, "API": true}"#).unwrap();
        assert_eq!(parsed.ram, 1 << 20);
        assert_eq!(parsed.vcpus, 2);
        assert!(parsed.api);
        let text = serde_json::to_string(&parsed).unwrap();
        assert!(text.contains("\"API\":true"), "{text}");
    }

    #[test]
    fn unknown_constraint_is_rejected() {
        let parsed = serde_json::from_str::<RuntimeConstraints>(r#"{"rams": 1}"#);
        assert!(parsed.is_err());
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let credentials = ContainerCredentials {
            api_token: "v2/secret".into(),
            gateway_secret: "also-secret".into(),
        };
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("secret\""), "{shown}");
        assert!(!shown.contains("v2/"), "{shown}");
    }
}

/// A collection: a named set of files whose content lives in blocks,
/// described by a manifest.
///
/// `manifest_text` is stored normalised and without permission signatures;
/// the controller signs its locators for each caller that reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Collection {
    pub uuid: String,
    pub owner_uuid: String,
    #[serde(with = "serde_ts")]
    pub created_at: Timestamp,
    #[serde(with = "serde_ts")]
    pub modified_at: Timestamp,
    pub modified_by_user_uuid: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// The MD5 of the manifest without hints, `+`, and that text's length.
    pub portable_data_hash: String,
    pub manifest_text: String,
    /// Copies of each block the owner wants; Berth keeps one and records
    /// the wish. `None` means the cluster's default.
    pub replication_desired: Option<i64>,
    #[serde(default)]
    pub storage_classes_desired: Vec<String>,
    /// Files in the manifest.
    pub file_count: i64,
    /// Sum of the files' sizes in bytes.
    pub file_size_total: i64,
}
