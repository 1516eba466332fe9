//! The rules of the two records' lives, as pure functions. They decide what
//! a caller may set on create and update and which state changes are
//! allowed. They also apply what each change brings with it: a new container
//! on commit, timestamps, revoked tokens, finalised requests, and minted
//! credentials at lock.
//!
//! Each function takes the current record and the caller's attributes and
//! returns the new record plus what the store must do with it; the API
//! layer then hands that to the store in one write. Nothing here does I/O.
//!
//! Attributes arrive as a JSON object. They are merged into the current
//! record's JSON form and deserialised back into the record type, so a value
//! of the wrong type is rejected with the path of the field
//! (`runtime_constraints.ram`), and only fields whose value really changes
//! count as changes.
//!
//! A request's write-only attributes, `secret_mounts` and `runtime_token`,
//! are taken out of the attributes first and kept apart from the record
//! ([`Secrets`]). They may be set while the request is new or
//! Uncommitted, a commit gives the new container the same, and a request
//! that becomes Final loses them. No error message shows their values.
//! Checking a runtime token needs the store, so the API layer checks it
//! when [`RequestChange::check_runtime_token`] is set.

use std::collections::BTreeMap;

use berth_core::priority::request_contribution;
use berth_core::records::ContainerCredentials;
use berth_core::ssh::PublicKey;
use berth_core::state::{ContainerState, RequestState};
use berth_core::time::Timestamp;
use berth_core::validate::{check_request, check_secret_mounts, is_portable_data_hash};
use berth_core::{
    ClusterId, Container, ContainerRequest, Mount, ObjectType, SchedulingParameters, Secret, Uuid,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::{generate_secret, hash_secret, system_user_uuid, Caller};
use crate::error::ApiError;
use crate::store::{
    find_column, ApiToken, Column, CredentialChange, MintedCredentials, ReusedContainer, Secrets,
    Versioned, CONTAINER_COLUMNS, REQUEST_COLUMNS,
};

/// `container_count_max` of a request that does not set it.
pub const DEFAULT_CONTAINER_COUNT_MAX: i64 = 3;

/// `output_storage_classes` of a request that does not set it.
pub const DEFAULT_STORAGE_CLASS: &str = "default";

/// Keys every record carries on the wire but that are not fields; ignored
/// in input.
const WIRE_ONLY_KEYS: &[&str] = &["kind", "etag"];

/// Request fields only the controller sets.
const REQUEST_SERVER_FIELDS: &[&str] = &[
    "uuid",
    "created_at",
    "modified_at",
    "modified_by_user_uuid",
    "requesting_container_uuid",
    "container_uuid",
    "container_count",
    "log_uuid",
    "output_uuid",
    "cumulative_cost",
];

/// Request fields that may change in every state.
const REQUEST_ALWAYS_MUTABLE: &[&str] = &["name", "description", "properties", "state"];

/// Request fields that may also change while the request is Committed.
const REQUEST_COMMITTED_MUTABLE: &[&str] = &["priority", "container_count_max"];

/// Request fields that are short labels, at most [`MAX_LABEL_CHARS`]
/// characters long.
const REQUEST_LABEL_FIELDS: &[&str] = &["name", "output_name"];

/// Maximum characters of a label field.
pub const MAX_LABEL_CHARS: usize = 255;

/// Container fields the container's own token may change.
const CONTAINER_TOKEN_FIELDS: &[&str] = &[
    "state",
    "exit_code",
    "runtime_status",
    "progress",
    "output",
    "output_properties",
    "log",
    "gateway_address",
    "gateway_host_key",
    "cost",
    "subrequests_cost",
    // The supervisor's gateway sets it at the first shell session.
    "interactive_session_started",
];

/// Container fields administrators may change besides the token's.
const CONTAINER_ADMIN_FIELDS: &[&str] = &["scheduler_job_id"];

/// Fields a run reports while it runs and as it ends.
const RUN_FIELDS: &[&str] = &[
    "runtime_status",
    "log",
    "progress",
    "output",
    "output_properties",
    "exit_code",
    "cost",
    "subrequests_cost",
];

/// Fields that report a run's progress and result. While the container
/// is locked, only the token that locked it and the container's own token
/// may change them.
const RUN_REPORT_FIELDS: &[&str] = &[
    "progress",
    "output",
    "output_properties",
    "exit_code",
    "cost",
    "subrequests_cost",
    "log",
];

/// Returns the fields besides `state` that an update may change, by the state it
/// starts from and the state it ends in (the same state for an update that
/// changes no state).
fn state_fields(from: ContainerState, to: ContainerState) -> Vec<&'static str> {
    use ContainerState::{Cancelled, Complete, Locked, Queued, Running};
    match (from, to) {
        (Queued, Queued) => vec!["priority"],
        (Queued, Cancelled) => vec!["runtime_status", "log", "cost"],
        (Locked, Locked) => vec![
            "priority",
            "runtime_status",
            "log",
            "scheduler_job_id",
            "gateway_host_key",
        ],
        (Locked, Running) => vec![
            "runtime_status",
            "log",
            "progress",
            "gateway_address",
            "gateway_host_key",
            "scheduler_job_id",
        ],
        (Locked, Cancelled) => vec!["runtime_status", "log", "cost", "scheduler_job_id"],
        (Running, Running) => [
            RUN_FIELDS,
            &[
                "priority",
                "gateway_address",
                "gateway_host_key",
                "scheduler_job_id",
                "interactive_session_started",
            ],
        ]
        .concat(),
        (Running, Complete | Cancelled) => RUN_FIELDS.to_vec(),
        _ => Vec::new(),
    }
}

/// `runtime_status` keys whose values must be strings.
const RUNTIME_STATUS_TEXT_KEYS: &[&str] = &[
    "error",
    "errorDetail",
    "warning",
    "warningDetail",
    "activity",
    "preemptionNotice",
];

/// A record with what a write changed.
#[derive(Debug, Clone)]
struct Merged<T> {
    record: T,
    /// Attributes whose value differs from the current record's.
    changed: Vec<String>,
}

fn to_object<T: Serialize>(record: &T) -> Result<Map<String, Value>, ApiError> {
    match serde_json::to_value(record) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::Internal(
            "a record did not serialise to an object".into(),
        )),
        Err(err) => Err(ApiError::Internal(format!(
            "failed to serialise a record: {err}"
        ))),
    }
}

/// Rejects attributes that are no field of the record, and drops the
/// wire-only ones.
fn check_known(
    kind: &str,
    columns: &'static [Column],
    attributes: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    for key in WIRE_ONLY_KEYS {
        attributes.remove(*key);
    }
    let unknown: Vec<String> = attributes
        .keys()
        .filter(|key| find_column(columns, key).is_none())
        .map(|key| format!("unknown attribute {key:?} for a {kind}"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(unknown))
    }
}

/// Drops attributes the caller may not set when they are null or equal to
/// the current value; any other value is an error.
fn drop_unchanged(
    attributes: &mut Map<String, Value>,
    current: &Map<String, Value>,
    fields: &[&str],
    message: impl Fn(&str) -> String,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    for field in fields {
        if let Some(value) = attributes.get(*field) {
            if value.is_null() || Some(value) == current.get(*field) {
                attributes.remove(*field);
            } else {
                errors.push(message(field));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(errors))
    }
}

/// Merges attributes into a record. A null given for an object or array
/// field means empty, as Go clients send nil maps and slices as null.
fn merge<T: Serialize + DeserializeOwned>(
    current: &T,
    attributes: &Map<String, Value>,
) -> Result<Merged<T>, ApiError> {
    let current_fields = to_object(current)?;
    let mut merged = current_fields.clone();
    for (key, value) in attributes {
        let value = match (value, current_fields.get(key)) {
            (Value::Null, Some(Value::Object(_))) => Value::Object(Map::new()),
            (Value::Null, Some(Value::Array(_))) => Value::Array(Vec::new()),
            _ => value.clone(),
        };
        merged.insert(key.clone(), value);
    }
    let record: T = serde_path_to_error::deserialize(Value::Object(merged)).map_err(|err| {
        ApiError::invalid(format!(
            "invalid value for {}: {}",
            err.path(),
            plain_type_names(&err.inner().to_string())
        ))
    })?;
    let new_fields = to_object(&record)?;
    let changed = attributes
        .keys()
        .filter(|key| new_fields.get(*key) != current_fields.get(*key))
        .cloned()
        .collect();
    Ok(Merged { record, changed })
}

/// Replaces the Rust type names in a deserialisation message with the
/// JSON words clients use.
fn plain_type_names(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected u64", "expected an integer of 0 or more"),
        ("expected u32", "expected an integer of 0 or more"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected string or map", "expected a string"),
    ] {
        text = text.replace(rust, plain);
    }
    match text.find("expected struct ") {
        Some(start) => format!("{}expected an object", &text[..start]),
        None => text,
    }
}

/// Object-valued attributes of a request, whose values must be JSON
/// objects: a list would otherwise fill their fields by position.
const OBJECT_ATTRIBUTES: &[&str] = &["runtime_constraints", "scheduling_parameters", "mounts"];

/// Rejects a list, or any other non-object, where an object is expected:
/// `runtime_constraints`, its `gpu` and `cuda`, `scheduling_parameters`,
/// and `mounts` with each of its entries.
fn check_object_shapes(attributes: &Map<String, Value>) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let mut expect_object = |path: String, value: &Value| {
        if !matches!(value, Value::Object(_) | Value::Null) {
            errors.push(format!(
                "invalid value for {path}: {value} is not an object"
            ));
            false
        } else {
            true
        }
    };
    for name in OBJECT_ATTRIBUTES {
        let Some(value) = attributes.get(*name) else {
            continue;
        };
        if !expect_object((*name).to_string(), value) {
            continue;
        }
        let Some(fields) = value.as_object() else {
            continue;
        };
        match *name {
            "runtime_constraints" => {
                for key in ["gpu", "cuda"] {
                    if let Some(inner) = fields.get(key) {
                        expect_object(format!("runtime_constraints.{key}"), inner);
                    }
                }
            }
            "mounts" => {
                for (target, mount) in fields {
                    expect_object(format!("mounts.{target}"), mount);
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(errors))
    }
}

/// Rejects a label field among `fields` that is longer than
/// [`MAX_LABEL_CHARS`].
fn check_labels(request: &ContainerRequest, fields: &[&str]) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    for field in fields {
        let value = match *field {
            "name" => request.name.as_deref(),
            "output_name" => request.output_name.as_deref(),
            _ => None,
        };
        let length = value.map_or(0, |text| text.chars().count());
        if length > MAX_LABEL_CHARS {
            errors.push(format!(
                "{field}: is {length} characters long, but the maximum is {MAX_LABEL_CHARS}"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(errors))
    }
}

/// The write-only attributes of a call, taken out of its attributes
/// before they are merged into the record.
#[derive(Debug, Default)]
struct SecretAttributes {
    /// `secret_mounts`, when the call gives it; null gives none.
    secret_mounts: Option<BTreeMap<String, Mount>>,
    /// `runtime_token`, when the call gives it; null and "" give none.
    runtime_token: Option<Option<Secret>>,
}

/// Takes `secret_mounts` and `runtime_token` out of a call's attributes.
fn take_secret_attributes(
    attributes: &mut Map<String, Value>,
) -> Result<SecretAttributes, ApiError> {
    let secret_mounts = attributes
        .remove("secret_mounts")
        .map(parse_secret_mounts)
        .transpose()?;
    let runtime_token = match attributes.remove("runtime_token") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(token)) if token.is_empty() => Some(None),
        Some(Value::String(token)) => Some(Some(Secret::new(token))),
        Some(_) => {
            return Err(ApiError::invalid(
                "runtime_token: is not a string: give a user token v2/UUID/SECRET, or null",
            ))
        }
    };
    Ok(SecretAttributes {
        secret_mounts,
        runtime_token,
    })
}

/// Reads the value of `secret_mounts`. Errors give the path and what was
/// expected, never serde's whole message, which may quote the secret.
fn parse_secret_mounts(value: Value) -> Result<BTreeMap<String, Mount>, ApiError> {
    let value = match value {
        Value::Null => return Ok(BTreeMap::new()),
        // A form body carries the object as JSON text.
        Value::String(text) => serde_json::from_str(&text).map_err(|_| {
            ApiError::invalid("secret_mounts: is not a JSON object that maps targets to mounts")
        })?,
        other => other,
    };
    if !value.is_object() {
        return Err(ApiError::invalid(
            "secret_mounts: is not an object: give an object that maps targets to mounts",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let inner = err.inner().to_string();
        let reason = if inner.starts_with("unknown field") {
            inner
        } else {
            // The rest of serde's message may quote the secret, so only
            // the expected type is kept.
            match inner.rfind(", expected ") {
                Some(at) => format!("invalid value: {}", plain_type_names(&inner[at + 2..])),
                None => "invalid value".to_string(),
            }
        };
        ApiError::invalid(format!("secret_mounts.{}: {reason}", err.path()))
    })
}

/// Applies the secret attributes of an update to a request's secrets, and
/// returns them with the names of the attributes that change. Outside
/// Uncommitted, an empty value changes nothing, so clients that send every
/// attribute empty are accepted.
fn apply_secret_attributes(
    state: RequestState,
    current: &Secrets,
    given: SecretAttributes,
) -> (Secrets, Vec<String>) {
    let uncommitted = state == RequestState::Uncommitted;
    let mut secrets = current.clone();
    let mut changed = Vec::new();
    if let Some(secret_mounts) = given.secret_mounts {
        if uncommitted || !secret_mounts.is_empty() {
            secrets.secret_mounts = secret_mounts;
            changed.push("secret_mounts".to_string());
        }
    }
    if let Some(runtime_token) = given.runtime_token {
        let clears = runtime_token.is_none() && current.runtime_token.is_some();
        if runtime_token.is_some() || uncommitted && clears {
            secrets.runtime_token = runtime_token;
            changed.push("runtime_token".to_string());
        }
    }
    (secrets, changed)
}

/// Runtime constraints that older clients may send as a list, of which
/// the first element counts.
const LIST_CONSTRAINTS: &[&str] = &["ram", "vcpus", "keep_cache_ram", "keep_cache_disk"];

/// Rewrites the legacy forms of request attributes before they are
/// merged: a runtime constraint given as a list takes its first element.
fn collapse_legacy_forms(attributes: &mut Map<String, Value>) {
    let Some(Value::Object(constraints)) = attributes.get_mut("runtime_constraints") else {
        return;
    };
    for key in LIST_CONSTRAINTS {
        if let Some(Value::Array(items)) = constraints.get(*key) {
            if let Some(first) = items.first().cloned() {
                constraints.insert((*key).to_string(), first);
            }
        }
    }
}

/// Keys of the deprecated `runtime_constraints.cuda` object.
const CUDA_KEYS: &[&str] = &["device_count", "driver_version", "hardware_capability"];

/// Brings a merged request to its stored form: the deprecated `cuda`
/// constraint becomes `gpu`, and a `container_count_max` of 0 (what Go
/// clients send for "unset") becomes the default.
fn normalize_request(request: &mut ContainerRequest) -> Result<(), ApiError> {
    if request.container_count_max == Some(0) {
        request.container_count_max = Some(DEFAULT_CONTAINER_COUNT_MAX);
    }
    // Go clients send every key of a mount, with "" for the unused ones:
    // an empty text is no value, so equal mounts compare equal for reuse.
    for mount in request.mounts.values_mut() {
        for key in [
            &mut mount.portable_data_hash,
            &mut mount.uuid,
            &mut mount.path,
            &mut mount.device_type,
        ] {
            if key.as_deref() == Some("") {
                *key = None;
            }
        }
    }
    let Some(cuda) = request.runtime_constraints.cuda.take() else {
        return Ok(());
    };
    let invalid =
        |message: String| ApiError::invalid(format!("runtime_constraints.cuda: {message}"));
    let fields = match cuda {
        Value::Null => return Ok(()),
        Value::Object(fields) => fields,
        other => return Err(invalid(format!("{other} is not an object"))),
    };
    if let Some(key) = fields.keys().find(|key| !CUDA_KEYS.contains(&key.as_str())) {
        return Err(invalid(format!(
            "unknown key {key:?}: expected {}",
            CUDA_KEYS.join(", ")
        )));
    }
    let device_count = match fields.get("device_count") {
        None | Some(Value::Null) => 0,
        Some(value) => value
            .as_i64()
            .filter(|count| *count >= 0)
            .ok_or_else(|| invalid(format!("device_count {value} is not a count of devices")))?,
    };
    let text = |key: &str| match fields.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(invalid(format!("{key} {other} is not a string"))),
    };
    let driver_version = text("driver_version")?;
    let capability = text("hardware_capability")?;
    if device_count == 0 {
        return Ok(());
    }
    let gpu = &mut request.runtime_constraints.gpu;
    if gpu.device_count > 0 {
        return Err(invalid(
            "is set together with gpu: give the devices in gpu only".to_string(),
        ));
    }
    gpu.stack = "cuda".into();
    gpu.device_count = device_count;
    gpu.driver_version = driver_version;
    gpu.hardware_target = if capability.is_empty() {
        Vec::new()
    } else {
        vec![capability]
    };
    Ok(())
}

/// A request to store, with the container its commit created.
#[derive(Debug, Clone)]
pub struct RequestChange {
    pub record: ContainerRequest,
    pub new_container: Option<Container>,
    /// The existing container the request takes instead of
    /// `new_container` (see [`take_existing`]).
    pub reused_container: Option<ReusedContainer>,
    /// The reusable containers seen and not taken when the request, which
    /// allows reuse, gets a new container (see [`crate::store::RequestWrite`]).
    pub passed_over: Option<Vec<String>>,
    /// False when the attributes changed nothing: nothing to write.
    pub changed: bool,
    /// The request's secrets after the change; a new container gets the
    /// same.
    pub secrets: Secrets,
    /// True when the API layer must check `secrets.runtime_token` with the
    /// store and make the new container run as its user: the call sets
    /// the token or commits the request.
    pub check_runtime_token: bool,
}

/// Makes a committing request take an existing container (chosen by
/// [`crate::reuse::choose`]) instead of the new one built for it. A
/// request that takes a Complete container is satisfied at once and
/// becomes Final.
pub fn take_existing(change: &mut RequestChange, existing: &Versioned<Container>) {
    change.new_container = None;
    change.record.container_uuid = Some(existing.record.uuid.clone());
    change.reused_container = Some(ReusedContainer {
        uuid: existing.record.uuid.clone(),
        version: existing.version,
    });
    if existing.record.state == ContainerState::Complete {
        change.record.state = RequestState::Final;
        change.secrets = Secrets::default();
    }
}

/// Builds a new, empty request of `owner_uuid` with the defaults.
fn request_template(
    uuid: Uuid,
    owner_uuid: &str,
    caller: &Caller,
    now: Timestamp,
) -> ContainerRequest {
    ContainerRequest {
        uuid: uuid.to_string(),
        owner_uuid: owner_uuid.to_string(),
        created_at: now,
        modified_at: now,
        modified_by_user_uuid: Some(caller.user_uuid.clone()),
        name: None,
        description: None,
        properties: Map::new(),
        state: RequestState::Uncommitted,
        requesting_container_uuid: None,
        container_uuid: None,
        container_count: 0,
        container_count_max: Some(DEFAULT_CONTAINER_COUNT_MAX),
        mounts: Default::default(),
        runtime_constraints: Default::default(),
        scheduling_parameters: Default::default(),
        container_image: None,
        environment: Default::default(),
        cwd: Some(".".into()),
        command: Vec::new(),
        output_path: None,
        output_glob: Vec::new(),
        output_name: None,
        output_ttl: 0,
        priority: 0,
        expires_at: None,
        use_existing: true,
        filters: None,
        log_uuid: None,
        output_uuid: None,
        output_storage_classes: vec![DEFAULT_STORAGE_CLASS.into()],
        output_properties: Map::new(),
        cumulative_cost: 0.0,
        service: false,
        published_ports: Map::new(),
    }
}

/// Program name of the Arvados workflow runner: a container that runs it
/// is a workflow supervisor.
const WORKFLOW_RUNNER: &str = "arvados-cwl-runner";

/// Builds the container that runs a committed request. The API layer then
/// looks for an existing container to reuse instead ([`take_existing`]).
pub fn container_for(
    cluster: &ClusterId,
    request: &ContainerRequest,
    caller: &Caller,
    now: Timestamp,
) -> Container {
    Container {
        uuid: Uuid::generate(cluster, ObjectType::Container).to_string(),
        owner_uuid: system_user_uuid(cluster),
        created_at: now,
        modified_at: now,
        modified_by_user_uuid: Some(caller.user_uuid.clone()),
        state: ContainerState::Queued,
        started_at: None,
        finished_at: None,
        log: None,
        environment: request.environment.clone(),
        cwd: request.cwd.clone().unwrap_or_else(|| ".".into()),
        command: request.command.clone(),
        output_path: request.output_path.clone().unwrap_or_default(),
        output_glob: request.output_glob.clone(),
        mounts: request.mounts.clone(),
        runtime_constraints: request.runtime_constraints.clone(),
        runtime_status: Map::new(),
        scheduling_parameters: SchedulingParameters {
            supervisor: request.scheduling_parameters.supervisor
                || request.command.first().map(String::as_str) == Some(WORKFLOW_RUNNER),
            ..request.scheduling_parameters.clone()
        },
        output: None,
        container_image: request.container_image.clone().unwrap_or_default(),
        progress: None,
        priority: request_contribution(request.priority, &request.created_at),
        exit_code: None,
        auth_uuid: None,
        locked_by_uuid: None,
        lock_count: 0,
        runtime_user_uuid: Some(request.owner_uuid.clone()),
        runtime_auth_scopes: vec!["all".into()],
        gateway_address: None,
        gateway_host_key: None,
        gateway_host_key_fingerprint: None,
        interactive_session_started: false,
        output_storage_classes: request.output_storage_classes.clone(),
        output_properties: request.output_properties.clone(),
        cost: 0.0,
        subrequests_cost: 0.0,
        service: request.service,
        published_ports: request.published_ports.clone(),
        scheduler_job_id: None,
    }
}

/// Commits a request: creates its container and points the request at it.
fn commit(
    cluster: &ClusterId,
    request: &mut ContainerRequest,
    caller: &Caller,
    now: Timestamp,
) -> Container {
    let container = container_for(cluster, request, caller, now);
    request.container_uuid = Some(container.uuid.clone());
    request.container_count += 1;
    container
}

/// Builds a new request from a caller's attributes. The caller owns it;
/// an administrator may name another owner in `owner_uuid`, which the API
/// layer then checks exists.
pub fn create_request(
    cluster: &ClusterId,
    caller: &Caller,
    mut attributes: Map<String, Value>,
    now: Timestamp,
) -> Result<RequestChange, ApiError> {
    let secret_attributes = take_secret_attributes(&mut attributes)?;
    check_known("container request", REQUEST_COLUMNS, &mut attributes)?;
    let owner_uuid = match attributes.remove("owner_uuid") {
        None | Some(Value::Null) => caller.user_uuid.clone(),
        Some(Value::String(owner)) if owner == caller.user_uuid => owner,
        Some(Value::String(owner)) if caller.is_admin => owner,
        Some(Value::String(owner)) => {
            return Err(ApiError::invalid(format!(
                "owner_uuid {owner:?} is not yours: you may only create requests that you own"
            )))
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "invalid value for owner_uuid: expected a user uuid, found {other}"
            )))
        }
    };
    let uuid = Uuid::generate(cluster, ObjectType::ContainerRequest);
    let template = request_template(uuid, &owner_uuid, caller, now);
    drop_unchanged(
        &mut attributes,
        &to_object(&template)?,
        REQUEST_SERVER_FIELDS,
        |field| format!("{field} cannot be set: the controller sets it"),
    )?;
    check_object_shapes(&attributes)?;
    collapse_legacy_forms(&mut attributes);
    let mut request = merge(&template, &attributes)?.record;
    normalize_request(&mut request)?;
    if request.state == RequestState::Final {
        return Err(ApiError::invalid(
            "invalid state for a new container request: cannot create it in state Final; create it Uncommitted or Committed",
        ));
    }
    check_request(&request)?;
    check_labels(&request, REQUEST_LABEL_FIELDS)?;
    let secrets = Secrets {
        secret_mounts: secret_attributes.secret_mounts.unwrap_or_default(),
        runtime_token: secret_attributes.runtime_token.flatten(),
    };
    check_secret_mounts(&secrets.secret_mounts, &request.mounts)?;
    let new_container = (request.state == RequestState::Committed)
        .then(|| commit(cluster, &mut request, caller, now));
    Ok(RequestChange {
        record: request,
        new_container,
        reused_container: None,
        passed_over: None,
        changed: true,
        check_runtime_token: secrets.runtime_token.is_some(),
        secrets,
    })
}

/// Applies a caller's attributes to a stored request and its secrets.
pub fn update_request(
    cluster: &ClusterId,
    caller: &Caller,
    current: &ContainerRequest,
    current_secrets: &Secrets,
    mut attributes: Map<String, Value>,
    now: Timestamp,
) -> Result<RequestChange, ApiError> {
    let secret_attributes = take_secret_attributes(&mut attributes)?;
    check_known("container request", REQUEST_COLUMNS, &mut attributes)?;
    let current_fields = to_object(current)?;
    drop_unchanged(&mut attributes, &current_fields, &["owner_uuid"], |_| {
        "owner_uuid cannot be changed".to_string()
    })?;
    drop_unchanged(
        &mut attributes,
        &current_fields,
        REQUEST_SERVER_FIELDS,
        |field| format!("{field} cannot be changed: the controller sets it"),
    )?;
    check_object_shapes(&attributes)?;
    collapse_legacy_forms(&mut attributes);
    let Merged {
        record: mut request,
        mut changed,
    } = merge(current, &attributes)?;
    normalize_request(&mut request)?;
    if request.container_count_max == current.container_count_max {
        changed.retain(|field| field != "container_count_max");
    }
    let (mut secrets, secrets_changed) =
        apply_secret_attributes(current.state, current_secrets, secret_attributes);
    changed.extend(secrets_changed);
    if changed.is_empty() {
        return Ok(RequestChange {
            record: current.clone(),
            new_container: None,
            reused_container: None,
            passed_over: None,
            changed: false,
            secrets: current_secrets.clone(),
            check_runtime_token: false,
        });
    }

    current.state.check_transition(request.state)?;
    let mutable: Vec<&str> = match current.state {
        RequestState::Uncommitted => Vec::new(),
        RequestState::Committed => [REQUEST_ALWAYS_MUTABLE, REQUEST_COMMITTED_MUTABLE].concat(),
        RequestState::Final => REQUEST_ALWAYS_MUTABLE.to_vec(),
    };
    if current.state != RequestState::Uncommitted {
        let errors: Vec<String> = changed
            .iter()
            .filter(|field| !mutable.contains(&field.as_str()))
            .map(|field| {
                format!(
                    "cannot change {field} of a container request in state {}: only {} may change",
                    current.state,
                    mutable.join(", ")
                )
            })
            .collect();
        if !errors.is_empty() {
            return Err(ApiError::Unprocessable(errors));
        }
    }
    check_request(&request)?;
    check_secret_mounts(&secrets.secret_mounts, &request.mounts)?;
    // Only labels this update sets: a stored one stays valid.
    let labels: Vec<&str> = REQUEST_LABEL_FIELDS
        .iter()
        .copied()
        .filter(|field| changed.iter().any(|name| name == field))
        .collect();
    check_labels(&request, &labels)?;

    request.modified_at = now;
    request.modified_by_user_uuid = Some(caller.user_uuid.clone());
    let commits =
        current.state == RequestState::Uncommitted && request.state == RequestState::Committed;
    let new_container = commits.then(|| commit(cluster, &mut request, caller, now));
    if request.state == RequestState::Final {
        secrets = Secrets::default();
    }
    let sets_token = changed.iter().any(|field| field == "runtime_token");
    Ok(RequestChange {
        record: request,
        new_container,
        reused_container: None,
        passed_over: None,
        changed: true,
        check_runtime_token: secrets.runtime_token.is_some() && (commits || sets_token),
        secrets,
    })
}

/// A container to store, with its side effects.
#[derive(Debug, Clone)]
pub struct ContainerChange {
    pub record: Container,
    pub credentials: CredentialChange,
    /// The container reached a final state: finalise its requests.
    pub finalize_requests: bool,
    pub state_changed: bool,
    /// False when the attributes changed nothing: nothing to write.
    pub changed: bool,
}

impl ContainerChange {
    fn unchanged(current: &Container) -> ContainerChange {
        ContainerChange {
            record: current.clone(),
            credentials: CredentialChange::Keep,
            finalize_requests: false,
            state_changed: false,
            changed: false,
        }
    }
}

/// Marks a container final: finish time, no priority, no lock, token
/// revoked, requests finalised (the API layer first moves the requests that
/// retry a Cancelled container onto a new one, see [`crate::retry`]).
fn finish(container: &mut Container, now: Timestamp) -> (CredentialChange, bool) {
    container.finished_at = Some(now);
    container.priority = 0;
    container.locked_by_uuid = None;
    let token_uuid = container.auth_uuid.take();
    (CredentialChange::Revoke { token_uuid }, true)
}

fn check_container_values(container: &Container) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if container.priority < 0 {
        errors.push(format!(
            "priority: {} is negative: expected 0 or more",
            container.priority
        ));
    }
    for key in RUNTIME_STATUS_TEXT_KEYS {
        if let Some(value) = container.runtime_status.get(*key) {
            if !value.is_string() {
                errors.push(format!("runtime_status.{key}: {value} is not a string"));
            }
        }
    }
    if let Some(progress) = container.progress {
        if !(0.0..=1.0).contains(&progress) {
            errors.push(format!(
                "progress: {progress} is out of range: expected a number from 0 to 1"
            ));
        }
    }
    for (field, value) in [("log", &container.log), ("output", &container.output)] {
        if let Some(hash) = value.as_deref() {
            if !is_portable_data_hash(hash) {
                errors.push(format!(
                    "{field}: {hash:?} is not a portable data hash: expected the MD5 of a collection's manifest, '+' and its length"
                ));
            }
        }
    }
    for (field, value) in [
        ("cost", container.cost),
        ("subrequests_cost", container.subrequests_cost),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            errors.push(format!(
                "{field}: {value} is not a cost: expected 0 or more"
            ));
        }
    }
    if container.scheduler_job_id.as_deref() == Some("") {
        errors.push("scheduler_job_id: is empty: give the batch job id, or null".into());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(errors))
    }
}

/// Checks a new `gateway_host_key`, stores it in its canonical form
/// (without a comment), and sets its fingerprint.
fn set_host_key_fingerprint(container: &mut Container) -> Result<(), ApiError> {
    let Some(line) = container.gateway_host_key.as_deref() else {
        container.gateway_host_key_fingerprint = None;
        return Ok(());
    };
    let key = PublicKey::parse(line).map_err(|error| {
        ApiError::invalid(format!(
            "gateway_host_key {error}; give the gateway's public host key as one line \"ALGORITHM BASE64\""
        ))
    })?;
    container.gateway_host_key = Some(key.to_line());
    container.gateway_host_key_fingerprint = Some(key.fingerprint());
    Ok(())
}

/// Applies attributes from an administrator or the container's own token
/// (the API layer rejects every other caller) to a stored container.
pub fn update_container(
    caller: &Caller,
    current: &Container,
    mut attributes: Map<String, Value>,
    now: Timestamp,
) -> Result<ContainerChange, ApiError> {
    check_known("container", CONTAINER_COLUMNS, &mut attributes)?;
    let current_fields = to_object(current)?;
    let mut writable: Vec<&str> = CONTAINER_TOKEN_FIELDS.to_vec();
    if caller.is_admin {
        writable.extend_from_slice(CONTAINER_ADMIN_FIELDS);
    }
    let fixed: Vec<&str> = CONTAINER_COLUMNS
        .iter()
        .map(|column| column.name)
        .filter(|name| !writable.contains(name))
        .collect();
    drop_unchanged(&mut attributes, &current_fields, &fixed, |field| {
        if CONTAINER_ADMIN_FIELDS.contains(&field) {
            format!("{field} cannot be changed with a container token: only administrators may change it")
        } else if field == "priority" {
            "priority cannot be changed: the controller computes it from the priorities of the container's requests; change a request's priority instead".to_string()
        } else {
            format!("{field} cannot be changed: the controller sets it")
        }
    })?;
    let Merged {
        record: mut container,
        changed,
    } = merge(current, &attributes)?;
    if changed.is_empty() {
        return Ok(ContainerChange::unchanged(current));
    }

    let state_changed = container.state != current.state;
    if state_changed {
        current.state.check_transition(container.state)?;
    }
    // Only a process that ran has an exit code: it is reported while the
    // container is Running, at the latest with the change to its final
    // state.
    if current.state != ContainerState::Running && changed.iter().any(|f| f == "exit_code") {
        return Err(ApiError::invalid(format!(
            "cannot set exit_code of a container in state {}: set it while the container is Running, or together with the change from Running to Complete or Cancelled",
            current.state
        )));
    }

    let reported: Vec<&str> = changed
        .iter()
        .map(String::as_str)
        .filter(|field| RUN_REPORT_FIELDS.contains(field))
        .collect();
    let locked_by_caller = current.locked_by_uuid.as_deref() == Some(caller.token_uuid.as_str());
    if current.state.is_locked()
        && !caller.is_container_token()
        && !locked_by_caller
        && !reported.is_empty()
    {
        return Err(ApiError::Forbidden(format!(
            "cannot change {} of container {}: it is locked by another token, and only that token and the container's own token may report its run",
            reported.join(", "),
            current.uuid
        )));
    }
    let allowed = state_fields(current.state, container.state);
    let errors: Vec<String> = changed
        .iter()
        .filter(|field| *field != "state" && !allowed.contains(&field.as_str()))
        .map(|field| {
            let when = if state_changed {
                format!("from {} to {}", current.state, container.state)
            } else {
                format!("in state {}", current.state)
            };
            if allowed.is_empty() {
                format!("cannot change {field} of a container {when}")
            } else {
                format!(
                    "cannot change {field} of a container {when}: only {} may change",
                    allowed.join(", ")
                )
            }
        })
        .collect();
    if !errors.is_empty() {
        return Err(ApiError::Unprocessable(errors));
    }
    if changed.iter().any(|field| field == "gateway_host_key") {
        set_host_key_fingerprint(&mut container)?;
    }
    if current.interactive_session_started && !container.interactive_session_started {
        return Err(ApiError::invalid(
            "interactive_session_started cannot change from true back to false",
        ));
    }
    let mut credentials = CredentialChange::Keep;
    let mut finalize_requests = false;
    if state_changed {
        let (from, to) = (current.state, container.state);
        match (from, to) {
            (ContainerState::Queued, ContainerState::Locked) => {
                return Err(ApiError::invalid(format!(
                    "cannot change state from Queued to Locked with an update: lock the container with POST /arvados/v1/containers/{}/lock",
                    current.uuid
                )))
            }
            (ContainerState::Locked, ContainerState::Queued) => {
                return Err(ApiError::invalid(format!(
                    "cannot change state from Locked to Queued with an update: unlock the container with POST /arvados/v1/containers/{}/unlock",
                    current.uuid
                )))
            }
            _ => {}
        }
        let token_may = matches!(
            (from, to),
            (ContainerState::Locked, ContainerState::Running)
                | (ContainerState::Locked, ContainerState::Cancelled)
                | (ContainerState::Running, ContainerState::Complete)
                | (ContainerState::Running, ContainerState::Cancelled)
        );
        if caller.is_container_token() && !token_may {
            return Err(ApiError::invalid(format!(
                "a container token cannot change state from {from} to {to}"
            )));
        }
        if to == ContainerState::Running {
            container.started_at = Some(now);
        }
        if to == ContainerState::Complete && container.exit_code.is_none() {
            return Err(ApiError::invalid(
                "exit_code is missing: set it together with state Complete",
            ));
        }
        if to.is_final() && !from.is_final() {
            (credentials, finalize_requests) = finish(&mut container, now);
        }
    }
    check_container_values(&container)?;

    container.modified_at = now;
    container.modified_by_user_uuid = Some(caller.user_uuid.clone());
    Ok(ContainerChange {
        record: container,
        credentials,
        finalize_requests,
        state_changed,
        changed: true,
    })
}

/// A lock: the container to store and the secrets to show the caller once.
#[derive(Debug, Clone)]
pub struct LockChange {
    pub change: ContainerChange,
    pub credentials: ContainerCredentials,
}

/// Locks a Queued container with priority > 0 for the caller's token,
/// minting the container's token and gateway secret.
pub fn lock_container(
    cluster: &ClusterId,
    caller: &Caller,
    current: &Container,
    now: Timestamp,
) -> Result<LockChange, ApiError> {
    if current.state != ContainerState::Queued {
        return Err(ApiError::invalid(format!(
            "cannot lock container {}: cannot change state from {} to Locked; only a Queued container can be locked",
            current.uuid, current.state
        )));
    }
    if current.priority <= 0 {
        return Err(ApiError::invalid(format!(
            "cannot lock container {}: its priority is 0, so it stays Queued (on hold) until a request raises its priority",
            current.uuid
        )));
    }
    let token_uuid = Uuid::generate(cluster, ObjectType::ApiClientAuthorization).to_string();
    let token_secret = generate_secret();
    let gateway_secret = generate_secret();
    let owner_uuid = current
        .runtime_user_uuid
        .clone()
        .unwrap_or_else(|| system_user_uuid(cluster));
    let token = ApiToken {
        uuid: token_uuid.clone(),
        owner_uuid,
        secret_sha256: hash_secret(&token_secret),
        scopes: current.runtime_auth_scopes.clone(),
        container_uuid: Some(current.uuid.clone()),
        created_at: now,
        expires_at: None,
        revoked_at: None,
    };

    let mut container = current.clone();
    container.state = ContainerState::Locked;
    container.lock_count += 1;
    container.locked_by_uuid = Some(caller.token_uuid.clone());
    container.auth_uuid = Some(token_uuid.clone());
    container.modified_at = now;
    container.modified_by_user_uuid = Some(caller.user_uuid.clone());
    Ok(LockChange {
        change: ContainerChange {
            record: container,
            credentials: CredentialChange::Mint(MintedCredentials {
                token,
                gateway_secret_sha256: hash_secret(&gateway_secret),
            }),
            finalize_requests: false,
            state_changed: true,
            changed: true,
        },
        credentials: ContainerCredentials {
            api_token: format!("v2/{token_uuid}/{token_secret}/{}", current.uuid),
            gateway_secret,
        },
    })
}

/// Unlocks a Locked container for the token that locked it: back to
/// Queued, or Cancelled once it has been locked `max_dispatch_attempts`
/// times.
pub fn unlock_container(
    caller: &Caller,
    current: &Container,
    max_dispatch_attempts: i64,
    now: Timestamp,
) -> Result<ContainerChange, ApiError> {
    if current.state != ContainerState::Locked {
        return Err(ApiError::invalid(format!(
            "cannot unlock container {}: cannot change state from {} to Queued; only a Locked container can be unlocked",
            current.uuid, current.state
        )));
    }
    if current.locked_by_uuid.as_deref() != Some(caller.token_uuid.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "container {} was locked by another token: only the token that locked it may unlock it",
            current.uuid
        )));
    }
    let mut container = current.clone();
    container.modified_at = now;
    container.modified_by_user_uuid = Some(caller.user_uuid.clone());
    container.runtime_status = Map::new();
    container.scheduler_job_id = None;
    let (credentials, finalize_requests) = if current.lock_count >= max_dispatch_attempts {
        container.state = ContainerState::Cancelled;
        container.runtime_status.insert(
            "error".into(),
            Value::String(format!(
                "cancelled after {} dispatch attempts without running (max_dispatch_attempts is {max_dispatch_attempts})",
                current.lock_count
            )),
        );
        finish(&mut container, now)
    } else {
        container.state = ContainerState::Queued;
        container.locked_by_uuid = None;
        let token_uuid = container.auth_uuid.take();
        (CredentialChange::Revoke { token_uuid }, false)
    };
    Ok(ContainerChange {
        record: container,
        credentials,
        finalize_requests,
        state_changed: true,
        changed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster() -> ClusterId {
        "zzzzz".parse().unwrap()
    }

    fn user() -> Caller {
        Caller {
            user_uuid: "zzzzz-tpzed-0123456789abcde".into(),
            token_uuid: "zzzzz-gj3su-0123456789abcde".into(),
            is_admin: false,
            container_uuid: None,
            scopes: vec!["all".into()],
        }
    }

    fn attributes(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn runnable() -> Value {
        json!({
            "container_image": "busybox",
            "command": ["true"],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1000}},
            "runtime_constraints": {"ram": 1000000, "vcpus": 1},
            "priority": 1,
        })
    }

    fn committed() -> Value {
        let mut value = runnable();
        value["state"] = json!("Committed");
        value
    }

    #[test]
    fn new_request_gets_defaults() {
        let change = create_request(&cluster(), &user(), Map::new(), chrono::Utc::now()).unwrap();
        let request = change.record;
        assert_eq!(request.state, RequestState::Uncommitted);
        assert_eq!(request.cwd.as_deref(), Some("."));
        assert!(request.use_existing);
        assert_eq!(
            request.container_count_max,
            Some(DEFAULT_CONTAINER_COUNT_MAX)
        );
        assert_eq!(request.output_storage_classes, vec!["default".to_string()]);
        assert_eq!(request.owner_uuid, user().user_uuid);
        assert!(change.new_container.is_none());
    }

    #[test]
    fn committed_request_gets_queued_container() {
        let change = create_request(
            &cluster(),
            &user(),
            attributes(committed()),
            chrono::Utc::now(),
        )
        .unwrap();
        let container = change.new_container.unwrap();
        assert_eq!(
            change.record.container_uuid.as_deref(),
            Some(container.uuid.as_str())
        );
        assert_eq!(change.record.container_count, 1);
        assert_eq!(container.state, ContainerState::Queued);
        assert!(container.priority > 0);
        assert_eq!(
            container.runtime_user_uuid.as_deref(),
            Some(user().user_uuid.as_str())
        );
        assert_eq!(container.command, vec!["true".to_string()]);
    }

    #[test]
    fn wrong_type_names_nested_field() {
        let err = create_request(
            &cluster(),
            &user(),
            attributes(json!({"runtime_constraints": {"ram": "x"}})),
            chrono::Utc::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("runtime_constraints.ram"), "{err}");
    }

    #[test]
    fn unknown_nested_field_is_named() {
        let err = create_request(
            &cluster(),
            &user(),
            attributes(json!({"runtime_constraints": {"rams": 1}})),
            chrono::Utc::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("rams"), "{err}");
    }

    #[test]
    fn null_collection_means_empty() {
        let change = create_request(
            &cluster(),
            &user(),
            attributes(json!({"environment": null, "mounts": null, "command": null})),
            chrono::Utc::now(),
        )
        .unwrap();
        assert!(change.record.environment.is_empty());
    }

    #[test]
    fn unchanged_server_field_is_accepted() {
        let now = chrono::Utc::now();
        let current = create_request(&cluster(), &user(), Map::new(), now)
            .unwrap()
            .record;
        let change = update_request(
            &cluster(),
            &user(),
            &current,
            &Secrets::default(),
            attributes(json!({"uuid": current.uuid, "container_count": 0, "name": "x"})),
            now,
        )
        .unwrap();
        assert_eq!(change.record.name.as_deref(), Some("x"));
    }

    #[test]
    fn update_without_change_writes_nothing() {
        let now = chrono::Utc::now();
        let current = create_request(&cluster(), &user(), Map::new(), now)
            .unwrap()
            .record;
        let change = update_request(
            &cluster(),
            &user(),
            &current,
            &Secrets::default(),
            attributes(json!({"state": "Uncommitted", "kind": "arvados#containerRequest"})),
            now,
        )
        .unwrap();
        assert!(!change.changed);
    }

    #[test]
    fn long_label_is_rejected() {
        let now = chrono::Utc::now();
        let longest = "é".repeat(MAX_LABEL_CHARS);
        let change = create_request(
            &cluster(),
            &user(),
            attributes(json!({"name": longest, "output_name": longest})),
            now,
        )
        .unwrap();
        for field in ["name", "output_name"] {
            let too_long = "x".repeat(MAX_LABEL_CHARS + 1);
            let err = create_request(
                &cluster(),
                &user(),
                attributes(json!({ field: too_long })),
                now,
            )
            .unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert!(err.to_string().contains("maximum is 255"), "{err}");
            let err = update_request(
                &cluster(),
                &user(),
                &change.record,
                &Secrets::default(),
                attributes(json!({ field: too_long })),
                now,
            )
            .unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn container_token_cannot_set_priority() {
        let now = chrono::Utc::now();
        let request = create_request(&cluster(), &user(), attributes(committed()), now).unwrap();
        let container = request.new_container.unwrap();
        let token = Caller {
            container_uuid: Some(container.uuid.clone()),
            ..user()
        };
        let err = update_container(&token, &container, attributes(json!({"priority": 5})), now)
            .unwrap_err();
        assert!(err.to_string().contains("priority"), "{err}");
    }

    #[test]
    fn unlock_after_max_attempts_cancels() {
        let now = chrono::Utc::now();
        let request = create_request(&cluster(), &user(), attributes(committed()), now).unwrap();
        let mut container = request.new_container.unwrap();
        let admin = Caller {
            is_admin: true,
            ..user()
        };
        container.lock_count = 2;
        let locked = lock_container(&cluster(), &admin, &container, now).unwrap();
        assert_eq!(locked.change.record.lock_count, 3);
        let change = unlock_container(&admin, &locked.change.record, 3, now).unwrap();
        assert_eq!(change.record.state, ContainerState::Cancelled);
        assert!(change.finalize_requests);
        assert!(change.record.runtime_status["error"]
            .as_str()
            .unwrap()
            .contains("3 dispatch attempts"));
        let change = unlock_container(&admin, &locked.change.record, 4, now).unwrap();
        assert_eq!(change.record.state, ContainerState::Queued);
        assert!(change.record.auth_uuid.is_none());
    }

    fn with_secrets(mut value: Value) -> Value {
        value["secret_mounts"] = json!({"/etc/secret": {"kind": "text", "content": "hunter2"}});
        value["runtime_token"] = json!("v2/zzzzz-gj3su-0123456789abcde/hunter2");
        value
    }

    #[test]
    fn secrets_stay_out_of_the_record() {
        let change = create_request(
            &cluster(),
            &user(),
            attributes(with_secrets(committed())),
            chrono::Utc::now(),
        )
        .unwrap();
        let shown = serde_json::to_string(&change.record).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        let shown = serde_json::to_string(&change.new_container).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!format!("{change:?}").contains("hunter2"));
        assert_eq!(change.secrets.secret_mounts.len(), 1);
        assert!(change.secrets.runtime_token.is_some());
        assert!(change.check_runtime_token);
    }

    #[test]
    fn bad_secret_mounts_are_named_without_their_content() {
        for secret_mounts in [
            json!({"/etc/secret": {"kind": "text", "content": ["hunter2"]}}),
            json!({"/etc/secret": {"kind": "text", "content": "x", "capacity": "hunter2"}}),
            json!({"/etc/secret": {"kind": "text", "content": "x", "hunter2": 1}}),
            json!({"/etc/secret": "hunter2"}),
            json!("hunter2"),
            json!(["hunter2"]),
        ] {
            let mut value = runnable();
            value["secret_mounts"] = secret_mounts.clone();
            let err = create_request(&cluster(), &user(), attributes(value), chrono::Utc::now())
                .unwrap_err()
                .to_string();
            assert!(err.contains("secret_mounts"), "{secret_mounts}: {err}");
            // An unknown key is named, since keys are not secret.
            if !err.contains("unknown field") {
                assert!(!err.contains("hunter2"), "{secret_mounts}: {err}");
            }
        }
        let mut value = runnable();
        value["runtime_token"] = json!(["hunter2"]);
        let err = create_request(&cluster(), &user(), attributes(value), chrono::Utc::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime_token"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn secrets_change_only_while_uncommitted() {
        let now = chrono::Utc::now();
        let draft = create_request(&cluster(), &user(), attributes(runnable()), now).unwrap();
        let change = update_request(
            &cluster(),
            &user(),
            &draft.record,
            &draft.secrets,
            attributes(with_secrets(json!({}))),
            now,
        )
        .unwrap();
        assert!(change.changed);
        assert!(change.check_runtime_token);
        assert_eq!(change.secrets.secret_mounts.len(), 1);

        let commit = update_request(
            &cluster(),
            &user(),
            &change.record,
            &change.secrets,
            attributes(json!({"state": "Committed"})),
            now,
        )
        .unwrap();
        assert!(commit.new_container.is_some());
        assert!(commit.check_runtime_token);
        assert_eq!(commit.secrets.secret_mounts.len(), 1);

        let err = update_request(
            &cluster(),
            &user(),
            &commit.record,
            &commit.secrets,
            attributes(with_secrets(json!({}))),
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot change secret_mounts"), "{err}");
        assert!(err.contains("cannot change runtime_token"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        let empty = update_request(
            &cluster(),
            &user(),
            &commit.record,
            &commit.secrets,
            attributes(json!({"secret_mounts": {}, "runtime_token": null})),
            now,
        )
        .unwrap();
        assert!(!empty.changed);

        let priority = update_request(
            &cluster(),
            &user(),
            &commit.record,
            &commit.secrets,
            attributes(json!({"priority": 2})),
            now,
        )
        .unwrap();
        assert!(!priority.check_runtime_token);
        assert_eq!(priority.secrets.secret_mounts.len(), 1);

        let finished = update_request(
            &cluster(),
            &user(),
            &commit.record,
            &commit.secrets,
            attributes(json!({"state": "Final"})),
            now,
        )
        .unwrap();
        assert!(finished.secrets.is_empty());
    }

    #[test]
    fn secret_mount_on_a_mount_target_is_rejected() {
        let mut value = runnable();
        value["secret_mounts"] = json!({"/out": {"kind": "text", "content": "hunter2"}});
        let err = create_request(&cluster(), &user(), attributes(value), chrono::Utc::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret_mounts./out"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
