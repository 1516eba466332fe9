//! Checks of a container request's contents, made when it is created or
//! committed. Each failure names the field and says what is expected, so
//! the controller can answer 422 with a message the user can act on.

use std::collections::BTreeMap;
use std::fmt;

use crate::priority::MAX_REQUEST_PRIORITY;
use crate::records::{ContainerRequest, Mount};
use crate::state::RequestState;

/// Mount kinds a request may use.
pub const MOUNT_KINDS: [&str; 6] = ["tmp", "collection", "json", "text", "file", "keep"];

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Checks a request. Fields that only matter once the request runs (image,
/// command, resources) are checked only when `state` is `Committed`, as in
/// Arvados, so that a draft may be saved incomplete.
pub fn check_request(request: &ContainerRequest) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();

    if !(0..=MAX_REQUEST_PRIORITY).contains(&request.priority) {
        errors.push(FieldError::new(
            "priority",
            format!(
                "{} is out of range: expected 0 to {MAX_REQUEST_PRIORITY}",
                request.priority
            ),
        ));
    }
    if let Some(max) = request.container_count_max {
        if max < 0 {
            errors.push(FieldError::new(
                "container_count_max",
                format!("{max} is negative: expected 0 or more"),
            ));
        }
    }
    let rc = &request.runtime_constraints;
    for (field, value) in [
        ("runtime_constraints.ram", rc.ram),
        ("runtime_constraints.vcpus", rc.vcpus),
        ("runtime_constraints.keep_cache_ram", rc.keep_cache_ram),
        ("runtime_constraints.keep_cache_disk", rc.keep_cache_disk),
        ("runtime_constraints.gpu.device_count", rc.gpu.device_count),
        ("runtime_constraints.gpu.vram", rc.gpu.vram),
    ] {
        if value < 0 {
            errors.push(FieldError::new(
                field,
                format!("{value} is negative: expected 0 or more"),
            ));
        }
    }
    if request.scheduling_parameters.max_run_time < 0 {
        errors.push(FieldError::new(
            "scheduling_parameters.max_run_time",
            format!(
                "{} is negative: expected seconds, or 0 for no limit",
                request.scheduling_parameters.max_run_time
            ),
        ));
    }
    for partition in &request.scheduling_parameters.partitions {
        if partition.is_empty()
            || partition.contains(',')
            || partition.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            errors.push(FieldError::new(
                "scheduling_parameters.partitions",
                format!("{partition:?} is not a partition name: use letters, digits and punctuation without commas, spaces or control characters"),
            ));
        }
    }
    for (key, value) in &request.environment {
        if key.is_empty() || key.contains(['=', '\0']) {
            errors.push(FieldError::new(
                "environment",
                format!("variable name {key:?} is invalid: it must be non-empty and contain no '=' or NUL"),
            ));
        }
        if value.contains('\0') {
            errors.push(FieldError::new(
                "environment",
                format!("value of {key:?} contains a NUL byte"),
            ));
        }
    }
    for (target, mount) in &request.mounts {
        check_mount(target, mount, &mut errors);
    }
    if let Some(cwd) = &request.cwd {
        if cwd != "." && !is_clean_absolute_path(cwd) {
            errors.push(FieldError::new(
                "cwd",
                format!(
                    "{cwd:?} is not an absolute path without '.', '..', '//' or a trailing '/'"
                ),
            ));
        }
    }

    check_gpu(request, &mut errors);
    check_output_glob(&request.output_glob, &mut errors);
    check_ports(&request.published_ports, &mut errors);
    check_details(request, &mut errors);

    if request.state == RequestState::Committed {
        check_runnable(request, &mut errors);
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Mount kinds the supervisor creates. A committed request with another
/// kind is rejected, rather than failing each time it runs.
pub const RUNNABLE_MOUNT_KINDS: &[&str] = &["tmp", "collection", "json", "text", "file"];

/// Returns whether a `collection` or `file` mount names a collection.
fn names_collection(mount: &Mount) -> bool {
    let set = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.is_empty());
    set(&mount.portable_data_hash) || set(&mount.uuid)
}

/// Checks a collection mount against what the supervisor sets up: a
/// collection read-only anywhere, or a changeable copy at or below
/// `output_path`, where a mount without a collection is an empty output
/// directory.
fn check_runnable_collection(
    target: &str,
    mount: &Mount,
    request: &ContainerRequest,
    errors: &mut Vec<FieldError>,
) {
    let output = request.output_path.as_deref().unwrap_or_default();
    let in_output = !output.is_empty()
        && (target == output
            || output == "/"
            || target
                .strip_prefix(output)
                .is_some_and(|rest| rest.starts_with('/')));
    if !names_collection(mount) && target != output {
        errors.push(FieldError::new(
            format!("mounts.{target}"),
            "names no collection: give its portable_data_hash or uuid (only the mount at output_path may be a new, empty collection)",
        ));
    } else if mount.writable && !in_output {
        errors.push(FieldError::new(
            format!("mounts.{target}.writable"),
            "writable collection mounts outside output_path are not supported: remove `writable`, or mount the collection below output_path to get a changeable copy",
        ));
    }
}

/// Checks what a committed request needs in order to run.
fn check_runnable(request: &ContainerRequest, errors: &mut Vec<FieldError>) {
    for (target, mount) in &request.mounts {
        let kind = mount.kind.as_str();
        if MOUNT_KINDS.contains(&kind) && !RUNNABLE_MOUNT_KINDS.contains(&kind) {
            errors.push(FieldError::new(
                format!("mounts.{target}.kind"),
                format!(
                    "{kind:?} mounts are not supported yet: this cluster runs {} mounts",
                    RUNNABLE_MOUNT_KINDS.join(", ")
                ),
            ));
        } else if kind == "file" && !names_collection(mount) {
            errors.push(FieldError::new(
                format!("mounts.{target}.kind"),
                "file mounts of a path inside another mount are not supported yet: give the portable_data_hash or uuid of a collection and the path of a file in it",
            ));
        } else if kind == "collection" {
            check_runnable_collection(target, mount, request, errors);
        }
    }
    match request.container_image.as_deref() {
        None | Some("") => errors.push(FieldError::new(
            "container_image",
            "is missing: give an image name such as \"debian:12\"",
        )),
        Some(image) if image.contains(|c: char| c.is_whitespace() || c.is_control()) => errors
            .push(FieldError::new(
                "container_image",
                format!("{image:?} contains whitespace or control characters"),
            )),
        Some(_) => {}
    }
    if request.command.is_empty() {
        errors.push(FieldError::new(
            "command",
            "is empty: give the program to run and its arguments",
        ));
    } else if request.command[0].is_empty() {
        errors.push(FieldError::new(
            "command",
            "the program name (first element) is empty",
        ));
    }
    if request.command.iter().any(|arg| arg.contains('\0')) {
        errors.push(FieldError::new(
            "command",
            "an argument contains a NUL byte",
        ));
    }
    let rc = &request.runtime_constraints;
    if rc.ram <= 0 {
        errors.push(FieldError::new(
            "runtime_constraints.ram",
            format!("{} is not a positive number of bytes", rc.ram),
        ));
    }
    if rc.vcpus <= 0 {
        errors.push(FieldError::new(
            "runtime_constraints.vcpus",
            format!("{} is not a positive number of CPUs", rc.vcpus),
        ));
    }
    match request.output_path.as_deref() {
        None | Some("") => errors.push(FieldError::new(
            "output_path",
            "is missing: give the absolute path of a mount, for example \"/out\"",
        )),
        Some(path) => match request.mounts.get(path) {
            None => errors.push(FieldError::new(
                "output_path",
                format!("{path:?} is not the target of any entry in mounts"),
            )),
            Some(mount) if !(mount.kind == "tmp" || mount.kind == "collection" && mount.writable) => {
                errors.push(FieldError::new(
                    "output_path",
                    format!(
                        "{path:?} is a {} mount: the output directory must be a tmp mount or a writable collection mount",
                        mount.kind
                    ),
                ))
            }
            Some(_) => {}
        },
    }
    for stream in ["stdout", "stderr"] {
        let Some(path) = request.mounts.get(stream).and_then(|m| m.path.as_deref()) else {
            continue;
        };
        let inside = request.output_path.as_deref().is_some_and(|output| {
            output == "/"
                || path
                    .strip_prefix(output)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !inside {
            errors.push(FieldError::new(
                format!("mounts.{stream}.path"),
                format!(
                    "{path:?} is not inside output_path {:?}: the file of {stream} must be written in the output directory",
                    request.output_path.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
}

fn check_mount(target: &str, mount: &Mount, errors: &mut Vec<FieldError>) {
    let field = format!("mounts.{target}");
    if !matches!(target, "stdin" | "stdout" | "stderr") && !is_clean_absolute_path(target) {
        errors.push(FieldError::new(
            &field,
            format!(
                "target {target:?} must be stdin, stdout, stderr or an absolute path without '..'"
            ),
        ));
    }
    if mount.kind.is_empty() {
        errors.push(FieldError::new(
            format!("{field}.kind"),
            format!("is missing: give one of {}", MOUNT_KINDS.join(", ")),
        ));
    } else if !MOUNT_KINDS.contains(&mount.kind.as_str()) {
        errors.push(FieldError::new(
            format!("{field}.kind"),
            format!(
                "{:?} is not a mount kind: expected one of {}",
                mount.kind,
                MOUNT_KINDS.join(", ")
            ),
        ));
    }
    if mount.capacity < 0 {
        errors.push(FieldError::new(
            format!("{field}.capacity"),
            format!("{} is negative", mount.capacity),
        ));
    }
    check_mount_keys(&field, mount, errors);
    match (target, mount.kind.as_str()) {
        ("stdout" | "stderr", kind) if kind != "file" => errors.push(FieldError::new(
            format!("{field}.kind"),
            format!("{kind:?} cannot be the target {target}: it must be a file mount"),
        )),
        ("stdin", kind) if !matches!(kind, "collection" | "json" | "text") => {
            errors.push(FieldError::new(
                format!("{field}.kind"),
                format!("{kind:?} cannot be stdin: it must be a collection, json or text mount"),
            ))
        }
        _ => {}
    }
    match mount.kind.as_str() {
        "json" if mount.content.is_none() => errors.push(FieldError::new(
            format!("{field}.content"),
            "is missing: a json mount needs content",
        )),
        "text" if !matches!(mount.content, Some(serde_json::Value::String(_))) => {
            errors.push(FieldError::new(
                format!("{field}.content"),
                "must be a string for a text mount",
            ))
        }
        // A file mount names a file of a collection (portable_data_hash
        // or uuid, and the file's path in it), or a file inside another
        // mount by its absolute path.
        "file" if names_collection(mount) => {
            let path = mount.path.as_deref().unwrap_or_default();
            let path = path.trim_start_matches('/');
            if path.is_empty() || path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
                errors.push(FieldError::new(
                    format!("{field}.path"),
                    "a file mount of a collection needs the path of one file in the collection, such as \"dir/input.txt\"",
                ))
            }
        }
        "file"
            if mount
                .path
                .as_deref()
                .is_none_or(|p| !is_clean_absolute_path(p)) =>
        {
            errors.push(FieldError::new(
                format!("{field}.path"),
                "a file mount needs the absolute path of a file inside another mount, or a portable_data_hash and the path of a file in that collection",
            ))
        }
        _ => {}
    }
}

/// Keys of a mount that apply to each kind. Other keys must be absent or
/// hold their zero value, which Go clients send for every key.
fn allowed_mount_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "collection" => &[
            "portable_data_hash",
            "uuid",
            "path",
            "writable",
            "exclude_from_output",
        ],
        "tmp" => &["capacity", "device_type"],
        "json" | "text" => &["content", "exclude_from_output"],
        "file" => &["portable_data_hash", "uuid", "path", "exclude_from_output"],
        _ => &[],
    }
}

/// Device types a `tmp` mount may ask for.
pub const TMP_DEVICE_TYPES: [&str; 4] = ["ram", "ssd", "disk", "network"];

/// Checks the kind-specific keys of a mount.
fn check_mount_keys(field: &str, mount: &Mount, errors: &mut Vec<FieldError>) {
    let allowed = allowed_mount_keys(&mount.kind);
    let set: [(&str, bool); 8] = [
        (
            "portable_data_hash",
            mount
                .portable_data_hash
                .as_deref()
                .is_some_and(|v| !v.is_empty()),
        ),
        ("uuid", mount.uuid.as_deref().is_some_and(|v| !v.is_empty())),
        ("path", mount.path.as_deref().is_some_and(|v| !v.is_empty())),
        ("writable", mount.writable),
        ("capacity", mount.capacity != 0),
        (
            "content",
            mount.content.as_ref().is_some_and(|v| !v.is_null()),
        ),
        ("exclude_from_output", mount.exclude_from_output),
        (
            "device_type",
            mount.device_type.as_deref().is_some_and(|v| !v.is_empty()),
        ),
    ];
    for (key, present) in set {
        if present && !allowed.contains(&key) && MOUNT_KINDS.contains(&mount.kind.as_str()) {
            errors.push(FieldError::new(
                format!("{field}.{key}"),
                format!("is not a key of a {} mount: remove it", mount.kind),
            ));
        }
    }
    if mount.kind == "collection" || mount.kind == "file" {
        if let Some(hash) = mount
            .portable_data_hash
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            if !is_portable_data_hash(hash) {
                errors.push(FieldError::new(
                    format!("{field}.portable_data_hash"),
                    format!("{hash:?} is not a portable data hash: expected the MD5 of the manifest, '+' and its length, such as \"d41d8cd98f00b204e9800998ecf8427e+0\""),
                ));
            }
        }
        if let Some(uuid) = mount.uuid.as_deref().filter(|v| !v.is_empty()) {
            let is_collection = uuid
                .parse::<crate::Uuid>()
                .is_ok_and(|parsed| parsed.object_type() == Some(crate::ObjectType::Collection));
            if !is_collection {
                errors.push(FieldError::new(
                    format!("{field}.uuid"),
                    format!("{uuid:?} is not the uuid of a collection (zzzzz-4zz18-...)"),
                ));
            }
        }
        if let Some(path) = mount.path.as_deref() {
            if path.split('/').any(|part| part == "..") || path.contains('\0') {
                errors.push(FieldError::new(
                    format!("{field}.path"),
                    format!("{path:?} must be a path inside the collection, without '..'"),
                ));
            }
        }
    }
    if let Some(device) = mount.device_type.as_deref().filter(|v| !v.is_empty()) {
        if !TMP_DEVICE_TYPES.contains(&device) {
            errors.push(FieldError::new(
                format!("{field}.device_type"),
                format!(
                    "{device:?} is not a device type: expected one of {}",
                    TMP_DEVICE_TYPES.join(", ")
                ),
            ));
        }
    }
}

/// Mount kinds `secret_mounts` may use: files whose content the request
/// gives.
pub const SECRET_MOUNT_KINDS: [&str; 2] = ["json", "text"];

/// Checks a request's `secret_mounts` against its `mounts`. Targets are
/// clean absolute paths that are no key of `mounts`; kinds are `json` and
/// `text`, each with only its own keys. Messages name the target and the
/// key, never a value, because the content is secret.
pub fn check_secret_mounts(
    secret_mounts: &BTreeMap<String, Mount>,
    mounts: &BTreeMap<String, Mount>,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    for (target, mount) in secret_mounts {
        let field = format!("secret_mounts.{target}");
        if target == "/" || !is_clean_absolute_path(target) {
            errors.push(FieldError::new(
                &field,
                format!(
                    "target {target:?} must be an absolute path below / without '.', '..', '//' or a trailing '/'"
                ),
            ));
        }
        if mounts.contains_key(target) {
            errors.push(FieldError::new(
                &field,
                format!(
                    "target {target:?} is also a key of mounts: give each target in mounts or in secret_mounts, not in both"
                ),
            ));
        }
        if !SECRET_MOUNT_KINDS.contains(&mount.kind.as_str()) {
            // A known kind is safe to show; anything else might be a
            // secret typed in the wrong place.
            let problem = if MOUNT_KINDS.contains(&mount.kind.as_str()) {
                format!("{:?} is not a secret mount kind", mount.kind)
            } else {
                "is not a mount kind".to_string()
            };
            errors.push(FieldError::new(
                format!("{field}.kind"),
                format!("{problem}: secret mounts must be json or text mounts"),
            ));
            continue;
        }
        check_secret_mount_keys(&field, mount, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks the keys of a `json` or `text` secret mount without showing any
/// value.
fn check_secret_mount_keys(field: &str, mount: &Mount, errors: &mut Vec<FieldError>) {
    let other_keys = [
        (
            "portable_data_hash",
            mount
                .portable_data_hash
                .as_deref()
                .is_some_and(|v| !v.is_empty()),
        ),
        ("uuid", mount.uuid.as_deref().is_some_and(|v| !v.is_empty())),
        ("path", mount.path.as_deref().is_some_and(|v| !v.is_empty())),
        ("writable", mount.writable),
        ("capacity", mount.capacity != 0),
        (
            "device_type",
            mount.device_type.as_deref().is_some_and(|v| !v.is_empty()),
        ),
    ];
    for (key, present) in other_keys {
        if present {
            errors.push(FieldError::new(
                format!("{field}.{key}"),
                format!("is not a key of a {} mount: remove it", mount.kind),
            ));
        }
    }
    match (mount.kind.as_str(), &mount.content) {
        ("json", None | Some(serde_json::Value::Null)) => errors.push(FieldError::new(
            format!("{field}.content"),
            "is missing: a json mount needs content",
        )),
        ("text", Some(serde_json::Value::String(_))) | ("json", _) => {}
        _ => errors.push(FieldError::new(
            format!("{field}.content"),
            "must be a string for a text mount",
        )),
    }
}

/// True for a portable data hash: 32 lowercase hex digits, `+`, and a
/// decimal length.
pub fn is_portable_data_hash(text: &str) -> bool {
    let Some((hash, size)) = text.split_once('+') else {
        return false;
    };
    hash.len() == 32
        && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && !size.is_empty()
        && size.bytes().all(|b| b.is_ascii_digit())
}

/// GPU stacks a request may ask for.
pub const GPU_STACKS: [&str; 2] = ["cuda", "rocm"];

/// Checks `runtime_constraints.gpu`.
fn check_gpu(request: &ContainerRequest, errors: &mut Vec<FieldError>) {
    let gpu = &request.runtime_constraints.gpu;
    if !gpu.stack.is_empty() && !GPU_STACKS.contains(&gpu.stack.as_str()) {
        errors.push(FieldError::new(
            "runtime_constraints.gpu.stack",
            format!(
                "{:?} is not a GPU stack: expected \"cuda\" or \"rocm\"",
                gpu.stack
            ),
        ));
    }
    if gpu.device_count > 0 && gpu.stack.is_empty() {
        errors.push(FieldError::new(
            "runtime_constraints.gpu.stack",
            format!(
                "is empty, but device_count is {}: set the stack to \"cuda\" or \"rocm\"",
                gpu.device_count
            ),
        ));
    }
    if gpu.device_count == 0 && !gpu.stack.is_empty() {
        errors.push(FieldError::new(
            "runtime_constraints.gpu.device_count",
            format!(
                "is 0, but the stack is {:?}: ask for at least one device, or clear the stack",
                gpu.stack
            ),
        ));
    }
    let version = &gpu.driver_version;
    let is_version = version.split('.').count() >= 2
        && version
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    if !version.is_empty() && !is_version {
        errors.push(FieldError::new(
            "runtime_constraints.gpu.driver_version",
            format!("{version:?} is not a version: expected numbers such as \"12.4\""),
        ));
    }
    for target in &gpu.hardware_target {
        if target.is_empty() || target.contains(|c: char| c.is_whitespace() || c.is_control()) {
            errors.push(FieldError::new(
                "runtime_constraints.gpu.hardware_target",
                format!("{target:?} is not a hardware target such as \"8.6\" or \"gfx1100\""),
            ));
        }
    }
}

/// Maximum number of `output_glob` patterns.
pub const MAX_OUTPUT_GLOBS: usize = 1000;

/// Checks the patterns of `output_glob`: relative, inside the output
/// directory, with balanced brackets.
fn check_output_glob(patterns: &[String], errors: &mut Vec<FieldError>) {
    if patterns.len() > MAX_OUTPUT_GLOBS {
        errors.push(FieldError::new(
            "output_glob",
            format!(
                "has {} patterns, but the maximum is {MAX_OUTPUT_GLOBS}",
                patterns.len()
            ),
        ));
    }
    for pattern in patterns {
        let problem = if pattern.is_empty() {
            Some("is empty")
        } else if pattern.starts_with('/') {
            Some("is absolute: patterns are relative to output_path")
        } else if pattern.split('/').any(|part| part == "..") {
            Some("contains '..': patterns match inside output_path only")
        } else if pattern.contains('\0') {
            Some("contains a NUL byte")
        } else if !brackets_balance(pattern) {
            Some("has a '[' without its ']'")
        } else {
            None
        };
        if let Some(problem) = problem {
            errors.push(FieldError::new(
                "output_glob",
                format!("pattern {pattern:?} {problem}"),
            ));
        }
    }
}

/// True when every `[` of a glob pattern is closed by a `]` in the same
/// path segment.
fn brackets_balance(pattern: &str) -> bool {
    let mut open = false;
    for c in pattern.chars() {
        match c {
            '[' if !open => open = true,
            ']' if open => open = false,
            '/' if open => return false,
            _ => {}
        }
    }
    !open
}

/// Checks `published_ports`: port numbers mapped to an access level.
fn check_ports(ports: &serde_json::Map<String, serde_json::Value>, errors: &mut Vec<FieldError>) {
    for (port, spec) in ports {
        let field = format!("published_ports.{port}");
        if !port.parse::<u16>().is_ok_and(|number| number > 0) || port.starts_with('0') {
            errors.push(FieldError::new(
                &field,
                format!("{port:?} is not a port number from 1 to 65535"),
            ));
        }
        let Some(spec) = spec.as_object() else {
            errors.push(FieldError::new(
                &field,
                format!("{spec} is not an object with access, label and initial_path"),
            ));
            continue;
        };
        for (key, value) in spec {
            let valid = match key.as_str() {
                "access" => matches!(value.as_str(), Some("public" | "private")),
                "label" | "initial_path" => value.is_string(),
                _ => {
                    errors.push(FieldError::new(
                        format!("{field}.{key}"),
                        "is not a key of a published port: use access, label and initial_path",
                    ));
                    continue;
                }
            };
            if !valid {
                errors.push(FieldError::new(
                    format!("{field}.{key}"),
                    format!("{value} is invalid: access is \"public\" or \"private\", label and initial_path are strings"),
                ));
            }
        }
    }
}

/// Checks the remaining scalar fields of a request.
fn check_details(request: &ContainerRequest, errors: &mut Vec<FieldError>) {
    if request.output_ttl < 0 {
        errors.push(FieldError::new(
            "output_ttl",
            format!(
                "{} is negative: expected seconds, or 0 to keep the output",
                request.output_ttl
            ),
        ));
    }
    if request
        .filters
        .as_deref()
        .is_some_and(|filters| !filters.is_empty())
    {
        errors.push(FieldError::new(
            "filters",
            format!(
                "{:?} is set, but request filters are not implemented: leave it null",
                request.filters.as_deref().unwrap_or_default()
            ),
        ));
    }
    if request.service && request.use_existing {
        errors.push(FieldError::new(
            "use_existing",
            "is true for a service container, which must not be reused: set use_existing to false",
        ));
    }
    for class in &request.output_storage_classes {
        if class.is_empty() || class.contains(|c: char| c.is_whitespace() || c.is_control()) {
            errors.push(FieldError::new(
                "output_storage_classes",
                format!("{class:?} is not a storage class name"),
            ));
        }
    }
}

/// True for an absolute path in its one normal form: no `.` or `..`
/// component, no empty component (`//`), and no trailing `/` except for
/// `/` itself. Two spellings of one directory, such as `/out` and `/out/`,
/// would otherwise pass as two mounts.
pub fn is_clean_absolute_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    path.starts_with('/')
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RuntimeConstraints;

    fn committed_request() -> ContainerRequest {
        let now = chrono::Utc::now();
        let mut request: ContainerRequest = serde_json::from_value(serde_json::json!({
            "uuid": "zzzzz-xvhdp-0123456789abcde",
            "owner_uuid": "zzzzz-tpzed-0123456789abcde",
            "created_at": crate::time::format(&now),
            "modified_at": crate::time::format(&now),
            "modified_by_user_uuid": null,
            "name": null, "description": null,
            "state": "Committed",
            "requesting_container_uuid": null, "container_uuid": null,
            "container_count_max": null,
            "container_image": "localhost/busybox:latest",
            "cwd": null, "output_path": "/out", "output_name": null,
            "filters": null, "log_uuid": null, "output_uuid": null,
            "command": ["echo", "hi"],
            "mounts": {"/out": {"kind": "tmp", "capacity": 1000}},
            "priority": 1,
        }))
        .unwrap();
        request.runtime_constraints = RuntimeConstraints {
            ram: 1 << 20,
            vcpus: 1,
            ..Default::default()
        };
        request
    }

    fn fields(result: Result<(), Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn valid_request_passes() {
        assert_eq!(check_request(&committed_request()), Ok(()));
    }

    #[test]
    fn negative_ram_names_field() {
        let mut request = committed_request();
        request.runtime_constraints.ram = -5;
        assert!(fields(check_request(&request)).contains(&"runtime_constraints.ram".into()));
    }

    #[test]
    fn missing_image_names_field() {
        let mut request = committed_request();
        request.container_image = None;
        assert_eq!(fields(check_request(&request)), vec!["container_image"]);
    }

    #[test]
    fn empty_command_names_field() {
        let mut request = committed_request();
        request.command.clear();
        assert_eq!(fields(check_request(&request)), vec!["command"]);
    }

    #[test]
    fn uncommitted_request_may_be_incomplete() {
        let mut request = committed_request();
        request.state = RequestState::Uncommitted;
        request.command.clear();
        request.container_image = None;
        assert_eq!(check_request(&request), Ok(()));
    }

    #[test]
    fn output_path_must_be_a_mount() {
        let mut request = committed_request();
        request.output_path = Some("/elsewhere".into());
        assert_eq!(fields(check_request(&request)), vec!["output_path"]);
    }

    #[test]
    fn mount_target_with_dotdot_is_rejected() {
        let mut request = committed_request();
        request.mounts.insert(
            "/out/../etc".into(),
            Mount {
                kind: "tmp".into(),
                ..Default::default()
            },
        );
        assert_eq!(fields(check_request(&request)), vec!["mounts./out/../etc"]);
    }

    #[test]
    fn mount_target_with_trailing_slash_is_rejected() {
        let mut request = committed_request();
        request.mounts.insert(
            "/out/".into(),
            Mount {
                kind: "tmp".into(),
                ..Default::default()
            },
        );
        assert_eq!(fields(check_request(&request)), vec!["mounts./out/"]);
    }

    #[test]
    fn clean_absolute_paths() {
        for good in ["/", "/out", "/var/lib/x", "/a.b/..c"] {
            assert!(is_clean_absolute_path(good), "{good:?} rejected");
        }
        for bad in [
            "", "out", "/out/", "//out", "/a//b", "/a/./b", "/a/../b", "/..",
        ] {
            assert!(!is_clean_absolute_path(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_mount_kind_is_rejected() {
        let mut request = committed_request();
        request.mounts.insert(
            "/data".into(),
            Mount {
                kind: "nfs".into(),
                ..Default::default()
            },
        );
        assert_eq!(fields(check_request(&request)), vec!["mounts./data.kind"]);
    }

    #[test]
    fn priority_out_of_range_is_rejected() {
        let mut request = committed_request();
        request.priority = 1001;
        assert_eq!(fields(check_request(&request)), vec!["priority"]);
    }

    #[test]
    fn environment_name_with_equals_is_rejected() {
        let mut request = committed_request();
        request.environment.insert("A=B".into(), "x".into());
        assert_eq!(fields(check_request(&request)), vec!["environment"]);
    }

    #[test]
    fn portable_data_hash_format() {
        assert!(is_portable_data_hash("d41d8cd98f00b204e9800998ecf8427e+0"));
        assert!(is_portable_data_hash(
            "0cc175b9c0f1b6a831c399e269772661+12345"
        ));
        for bad in [
            "d41d8cd98f00b204e9800998ecf8427e",
            "d41d8cd98f00b204e9800998ecf8427e+",
            "D41D8CD98F00B204E9800998ECF8427E+0",
            "d41d8cd98f00b204e9800998ecf8427+0",
            "d41d8cd98f00b204e9800998ecf8427e+0x",
            "zzzzz-4zz18-0123456789abcde",
        ] {
            assert!(!is_portable_data_hash(bad), "{bad}");
        }
    }

    #[test]
    fn glob_brackets_close_within_a_segment() {
        assert!(brackets_balance("*.txt"));
        assert!(brackets_balance("[a-e]/**/[!x].dat"));
        assert!(!brackets_balance("[ab"));
        assert!(!brackets_balance("[a/b]"));
    }

    #[test]
    fn collection_mounts_must_be_runnable() {
        let mount = |value: serde_json::Value| -> Mount { serde_json::from_value(value).unwrap() };
        let pdh = "d41d8cd98f00b204e9800998ecf8427e+0";
        let mut request = committed_request();
        request.mounts.insert(
            "/in".into(),
            mount(serde_json::json!({"kind": "collection", "portable_data_hash": pdh})),
        );
        request.mounts.insert(
            "/out/ref".into(),
            mount(serde_json::json!({"kind": "collection", "portable_data_hash": pdh, "writable": true})),
        );
        assert_eq!(check_request(&request), Ok(()));

        request.mounts.insert(
            "/data".into(),
            mount(serde_json::json!({"kind": "collection", "portable_data_hash": pdh, "writable": true})),
        );
        request.mounts.insert(
            "/empty".into(),
            mount(serde_json::json!({"kind": "collection"})),
        );
        assert_eq!(
            fields(check_request(&request)),
            ["mounts./data.writable", "mounts./empty"]
        );
    }

    #[test]
    fn stdout_file_must_be_in_the_output_directory() {
        let mut request = committed_request();
        request.mounts.insert(
            "stdout".into(),
            serde_json::from_value(serde_json::json!({"kind": "file", "path": "/out/log.txt"}))
                .unwrap(),
        );
        // File mounts of a path inside another mount are not runnable yet,
        // which is the only complaint.
        assert_eq!(fields(check_request(&request)), ["mounts.stdout.kind"]);
        request.mounts.insert(
            "stdout".into(),
            serde_json::from_value(serde_json::json!({"kind": "file", "path": "/output.txt"}))
                .unwrap(),
        );
        assert_eq!(
            fields(check_request(&request)),
            ["mounts.stdout.kind", "mounts.stdout.path"]
        );
    }

    fn mounts_of(value: serde_json::Value) -> BTreeMap<String, Mount> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn secret_mounts_take_json_and_text_files() {
        let mounts = mounts_of(serde_json::json!({"/out": {"kind": "tmp"}}));
        let secret = mounts_of(serde_json::json!({
            "/etc/secret.json": {"kind": "json", "content": {"password": "hunter2"}},
            "/etc/secret.txt": {"kind": "text", "content": "hunter2"},
            "/out/secret.txt": {"kind": "text", "content": "", "exclude_from_output": true},
        }));
        assert_eq!(check_secret_mounts(&secret, &mounts), Ok(()));
    }

    #[test]
    fn secret_mount_errors_hide_values() {
        let mounts = mounts_of(serde_json::json!({"/out": {"kind": "tmp"}}));
        let secret = mounts_of(serde_json::json!({
            "/out": {"kind": "text", "content": "hunter2"},
            "relative": {"kind": "text", "content": "hunter2"},
            "/": {"kind": "text", "content": "hunter2"},
            "/a/../b": {"kind": "text", "content": "hunter2"},
            "/tmp": {"kind": "tmp"},
            "/typo": {"kind": "hunter2"},
            "/number": {"kind": "text", "content": 5},
            "/empty": {"kind": "json"},
            "/keyed": {"kind": "json", "content": 1, "path": "/hunter2"},
        }));
        let errors = check_secret_mounts(&secret, &mounts).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "secret_mounts./",
                "secret_mounts./a/../b",
                "secret_mounts./empty.content",
                "secret_mounts./keyed.path",
                "secret_mounts./number.content",
                "secret_mounts./out",
                "secret_mounts./tmp.kind",
                "secret_mounts./typo.kind",
                "secret_mounts.relative",
            ]
        );
        for error in &errors {
            assert!(!error.message.contains("hunter2"), "{error}");
        }
        assert!(
            errors[5].message.contains("also a key of mounts"),
            "{}",
            errors[5]
        );
        assert!(errors[6].message.contains("\"tmp\""), "{}", errors[6]);
    }
}
