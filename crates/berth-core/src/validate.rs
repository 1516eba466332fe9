//! Checks of a container request's contents, made when it is created or
//! committed. Each failure names the field and says what is expected, so
//! the controller can answer 422 with a message the user can act on.

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
        if partition.is_empty() || partition.contains([',', ' ', '\n']) {
            errors.push(FieldError::new(
                "scheduling_parameters.partitions",
                format!("{partition:?} is not a partition name"),
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

    if request.state == RequestState::Committed {
        check_runnable(request, &mut errors);
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks what a committed request needs in order to run.
fn check_runnable(request: &ContainerRequest, errors: &mut Vec<FieldError>) {
    match request.container_image.as_deref() {
        None | Some("") => errors.push(FieldError::new(
            "container_image",
            "is missing: give an image name such as \"debian:12\"",
        )),
        Some(image) if image.trim() != image || image.contains(char::is_whitespace) => errors.push(
            FieldError::new("container_image", format!("{image:?} contains whitespace")),
        ),
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
        Some(path) if !request.mounts.contains_key(path) => errors.push(FieldError::new(
            "output_path",
            format!("{path:?} is not the target of any entry in mounts"),
        )),
        Some(_) => {}
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
    if !MOUNT_KINDS.contains(&mount.kind.as_str()) {
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
        "file"
            if mount
                .path
                .as_deref()
                .is_none_or(|p| !is_clean_absolute_path(p)) =>
        {
            errors.push(FieldError::new(
                format!("{field}.path"),
                "a file mount needs the absolute path of a file inside another mount",
            ))
        }
        _ => {}
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
}
