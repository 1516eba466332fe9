//! The discovery document at `GET /discovery/v1/apis/arvados/v1/rest`:
//! the Google-style REST description from which Arvados clients (the
//! Python SDK's `arvados.api()`) build their methods.
//!
//! The document lists only what Berth serves: `container_requests`,
//! `containers`, `users.current` and `api_client_authorizations.current`.
//! It has no `configs` resource, so the Python SDK does not call
//! `GET config` while it starts. Every keyword a client may pass to a
//! method must be declared among the method's `parameters`, or the SDK
//! rejects the call before sending it, so the list methods declare every
//! list parameter Arvados declares, including those Berth ignores.
//!
//! `rootUrl` is the controller's `external_url` when one is configured,
//! otherwise it is built from the request's `Host` header and scheme.

use axum::extract::{Request, State};
use axum::http::header::HOST;
use axum::http::request::Parts;
use axum::Json;
use serde_json::{json, Map, Value};

use super::params::{CALL_PARAMETERS, MAX_LIMIT};
use super::AppState;
use crate::error::ApiError;
use crate::store::{Column, ColumnKind, COLLECTION_COLUMNS, CONTAINER_COLUMNS, REQUEST_COLUMNS};

/// The API revision Berth follows: the `revision` of the Arvados discovery
/// document whose behaviour it matches. Clients compare it, as a string,
/// with the dates of the features they use.
pub const REVISION: &str = "20250402";

/// `GET /discovery/v1/apis/arvados/v1/rest`. Needs no token.
pub async fn document(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let (parts, _) = request.into_parts();
    let root_url = root_url(&state, &parts)?;
    Ok(Json(build(
        &root_url,
        &state.cluster().cluster_id.to_string(),
        state.max_request_body_bytes(),
        state.signer().ttl_seconds(),
    )))
}

/// Returns the URL clients reach the controller at, with a trailing `/`:
/// `external_url` when it is set, otherwise one built from the request.
pub(crate) fn root_url(state: &AppState, parts: &Parts) -> Result<String, ApiError> {
    match state.external_url() {
        Some(url) => Ok(with_trailing_slash(url)),
        None => root_url_of_request(parts, state.serves_tls()),
    }
}

fn with_trailing_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}

/// Builds `<scheme>://<host>/` from the request. The scheme is `https`
/// when the controller serves TLS itself; behind a proxy that terminates
/// TLS, `external_url` must be set.
fn root_url_of_request(parts: &Parts, serves_tls: bool) -> Result<String, ApiError> {
    let scheme = if serves_tls { "https" } else { "http" };
    let host = parts
        .headers
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|authority| authority.to_string()));
    let missing = || {
        ApiError::invalid(
            "cannot build the discovery document's rootUrl: the request has no valid Host header; \
             send one, or set the controller's external_url",
        )
    };
    let host = host.ok_or_else(missing)?;
    // host[:port] or [v6]:port, nothing that could change the URL's shape.
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if !valid {
        return Err(missing());
    }
    Ok(format!("{scheme}://{host}/"))
}

/// Builds the whole document.
pub fn build(
    root_url: &str,
    cluster_id: &str,
    max_request_bytes: usize,
    blob_signature_ttl_seconds: u64,
) -> Value {
    json!({
        "kind": "discovery#restDescription",
        "discoveryVersion": "v1",
        "id": "arvados:v1",
        "name": "arvados",
        "version": "v1",
        "revision": REVISION,
        "title": "Berth API",
        "description": "Berth's container API, in the shape of the Arvados v1 API.",
        "protocol": "rest",
        "rootUrl": root_url,
        "servicePath": "arvados/v1/",
        "basePath": "/arvados/v1/",
        "baseUrl": format!("{root_url}arvados/v1/"),
        "batchPath": "batch",
        "uuidPrefix": cluster_id,
        "maxItemsPerResponse": MAX_LIMIT,
        "maxRequestSize": max_request_bytes,
        // The block store keeps one copy of each block, so clients must
        // not wait for a second.
        "defaultCollectionReplication": 1,
        "defaultTrashLifetime": 1_209_600,
        "blobSignatureTtl": blob_signature_ttl_seconds,
        "crunchLogUpdatePeriod": 1800,
        "crunchLogUpdateSize": 33_554_432,
        "dockerImageFormats": ["v2"],
        "remoteHosts": {},
        "remoteHostsViaDNS": false,
        "websocketUrl": "",
        "workbenchUrl": "",
        "keepWebServiceUrl": "",
        "parameters": {
            "alt": {
                "type": "string",
                "description": "Data format for the response; only json.",
                "default": "json",
                "enum": ["json"],
                "location": "query",
            },
        },
        "schemas": schemas(),
        "resources": {
            "container_requests": {"methods": request_methods()},
            "containers": {"methods": container_methods()},
            "collections": {"methods": collection_methods()},
            "keep_services": {"methods": {
                "accessible": method(
                    "arvados.keep_services.accessible", "keep_services/accessible", "GET",
                    "List the block services the caller may use: the controller itself, as a proxy.",
                    Map::new(), "KeepServiceList",
                ),
            }},
            "users": {"methods": {
                "current": method(
                    "arvados.users.current", "users/current", "GET",
                    "Return the user the token belongs to.", Map::new(), "User",
                ),
            }},
            "api_client_authorizations": {"methods": {
                "current": method(
                    "arvados.api_client_authorizations.current",
                    "api_client_authorizations/current", "GET",
                    "Return the token the request was made with, without its secret.",
                    Map::new(), "ApiClientAuthorization",
                ),
            }},
        },
    })
}

fn request_methods() -> Value {
    let create = with_request(
        method(
            "arvados.container_requests.create",
            "container_requests",
            "POST",
            "Create a new container request.",
            create_parameters(),
            "ContainerRequest",
        ),
        "container_request",
        "ContainerRequest",
    );
    let update = with_request(
        method(
            "arvados.container_requests.update",
            "container_requests/{uuid}",
            "PUT",
            "Update attributes of an existing container request.",
            uuid_parameters(&["select"]),
            "ContainerRequest",
        ),
        "container_request",
        "ContainerRequest",
    );
    json!({
        "create": create,
        "list": method(
            "arvados.container_requests.list", "container_requests", "GET",
            "Retrieve a container request list.", list_parameters(), "ContainerRequestList",
        ),
        "get": method(
            "arvados.container_requests.get", "container_requests/{uuid}", "GET",
            "Get a container request record by UUID.",
            uuid_parameters(&["select", "include_trash"]), "ContainerRequest",
        ),
        "update": update,
        "delete": method(
            "arvados.container_requests.delete", "container_requests/{uuid}", "DELETE",
            "Delete a container request; its container stops unless another request wants it.",
            uuid_parameters(&[]), "ContainerRequest",
        ),
        "container_status": method(
            "arvados.container_requests.container_status",
            "container_requests/{uuid}/container_status", "GET",
            "Return the state and scheduling status of the request's container.",
            uuid_parameters(&[]), "ContainerStatus",
        ),
    })
}

fn collection_methods() -> Value {
    let create = with_request(
        method(
            "arvados.collections.create",
            "collections",
            "POST",
            "Create a new collection; every locator of its manifest must be signed for the caller.",
            create_parameters(),
            "Collection",
        ),
        "collection",
        "Collection",
    );
    let update = with_request(
        method(
            "arvados.collections.update",
            "collections/{uuid}",
            "PUT",
            "Update attributes of an existing collection.",
            uuid_parameters(&["select"]),
            "Collection",
        ),
        "collection",
        "Collection",
    );
    json!({
        "create": create,
        "list": method(
            "arvados.collections.list", "collections", "GET",
            "Retrieve a collection list.", list_parameters(), "CollectionList",
        ),
        "get": method(
            "arvados.collections.get", "collections/{uuid}", "GET",
            "Get a collection record by UUID or portable data hash.",
            uuid_parameters(&["select", "include_trash"]), "Collection",
        ),
        "update": update,
        "delete": method(
            "arvados.collections.delete", "collections/{uuid}", "DELETE",
            "Delete a collection record; its blocks stay stored.",
            uuid_parameters(&[]), "Collection",
        ),
    })
}

fn container_methods() -> Value {
    let update = with_request(
        method(
            "arvados.containers.update",
            "containers/{uuid}",
            "PUT",
            "Update attributes of an existing container.",
            uuid_parameters(&["select"]),
            "Container",
        ),
        "container",
        "Container",
    );
    json!({
        "get": method(
            "arvados.containers.get", "containers/{uuid}", "GET",
            "Get a container record by UUID.", uuid_parameters(&["select"]), "Container",
        ),
        "list": method(
            "arvados.containers.list", "containers", "GET",
            "Retrieve a container list.", list_parameters(), "ContainerList",
        ),
        "update": update,
        "current": method(
            "arvados.containers.current", "containers/current", "GET",
            "Return the container a container token belongs to.", Map::new(), "Container",
        ),
        "changes": method(
            "arvados.containers.changes", "containers/changes", "GET",
            "Return the containers changed after a cursor, waiting for a change if asked (a Berth extension).",
            change_parameters(), "ContainerChangeList",
        ),
        "secret_mounts": method(
            "arvados.containers.secret_mounts", "containers/{uuid}/secret_mounts", "GET",
            "Return the secret mounts of a Locked or Running container to its own token.",
            uuid_parameters(&[]), "ContainerSecretMounts",
        ),
        "runtime_token": method(
            "arvados.containers.runtime_token", "containers/{uuid}/runtime_token", "GET",
            "Return the runtime token of a Locked or Running container with API access to its own token (a Berth extension).",
            uuid_parameters(&[]), "ContainerRuntimeToken",
        ),
        "lock": method(
            "arvados.containers.lock", "containers/{uuid}/lock", "POST",
            "Lock a queued container for a dispatcher.", uuid_parameters(&[]), "Container",
        ),
        "unlock": method(
            "arvados.containers.unlock", "containers/{uuid}/unlock", "POST",
            "Return a locked container to the queue.", uuid_parameters(&[]), "Container",
        ),
    })
}

fn method(
    id: &str,
    path: &str,
    http_method: &str,
    description: &str,
    parameters: Map<String, Value>,
    response: &str,
) -> Value {
    let order: Vec<&String> = parameters
        .iter()
        .filter(|(_, spec)| spec["required"] == true)
        .map(|(name, _)| name)
        .collect();
    json!({
        "id": id,
        "path": path,
        "httpMethod": http_method,
        "description": description,
        "parameters": parameters,
        "parameterOrder": order,
        "response": {"$ref": response},
        "scopes": ["https://api.arvados.org/auth/arvados"],
    })
}

fn with_request(mut method: Value, wrapper: &str, schema: &str) -> Value {
    method["request"] = json!({
        "required": true,
        "properties": {wrapper: {"$ref": schema}},
    });
    method
}

/// One query parameter. `type` is a discovery type: array and object
/// values are sent as JSON text.
fn query(kind: &str, description: &str) -> Value {
    json!({"type": kind, "required": false, "location": "query", "description": description})
}

/// The parameters of a method on one record: `uuid` in the path, plus
/// the named query parameters.
fn uuid_parameters(extra: &[&str]) -> Map<String, Value> {
    let mut parameters = Map::new();
    parameters.insert(
        "uuid".into(),
        json!({
            "type": "string",
            "required": true,
            "location": "path",
            "description": "The UUID of the record.",
        }),
    );
    for name in extra {
        parameters.insert((*name).into(), shared_parameter(name));
    }
    parameters
}

/// The parameters of a create call: those of [`CALL_PARAMETERS`] a client
/// may name.
fn create_parameters() -> Map<String, Value> {
    CALL_PARAMETERS
        .iter()
        .filter(|name| !name.starts_with('_') && **name != "alt")
        .map(|name| ((*name).to_string(), shared_parameter(name)))
        .collect()
}

fn list_parameters() -> Map<String, Value> {
    [
        "filters",
        "where",
        "order",
        "select",
        "distinct",
        "limit",
        "offset",
        "count",
        "cluster_id",
        "bypass_federation",
        "include_trash",
    ]
    .iter()
    .map(|name| ((*name).to_string(), shared_parameter(name)))
    .collect()
}

/// The parameters of the change feed.
fn change_parameters() -> Map<String, Value> {
    let mut parameters = Map::new();
    parameters.insert(
        "after".into(),
        query(
            "string",
            "The cursor of the last call; omit it to get the current cursor at once.",
        ),
    );
    parameters.insert(
        "wait".into(),
        query(
            "integer",
            "Seconds to hold the call while nothing changed, at most 30.",
        ),
    );
    parameters.insert("limit".into(), shared_parameter("limit"));
    parameters
}

/// The declaration of a parameter by name, the same in every method.
fn shared_parameter(name: &str) -> Value {
    match name {
        "filters" => query(
            "array",
            "Conditions [attribute, operator, operand] that every returned record meets.",
        ),
        "where" => query("object", "Attributes and the values they must equal."),
        "order" => query(
            "array",
            "Sort keys such as \"created_at desc\"; uuid is appended for a total order.",
        ),
        "select" => query("array", "The attributes to return for each record."),
        "distinct" => query("boolean", "Accepted and ignored: every item is distinct."),
        "limit" => {
            let mut spec = query("integer", "The maximum number of items to return.");
            spec["default"] = json!("100");
            spec["format"] = json!("int64");
            spec
        }
        "offset" => {
            let mut spec = query("integer", "The number of items to skip.");
            spec["default"] = json!("0");
            spec["format"] = json!("int64");
            spec
        }
        "count" => {
            let mut spec = query(
                "string",
                "exact (the default) returns items_available; none omits it.",
            );
            spec["default"] = json!("exact");
            spec
        }
        "cluster_id" => query("string", "Accepted and ignored: Berth serves one cluster."),
        "bypass_federation" => query("boolean", "Accepted and ignored: Berth has no federation."),
        "include_trash" => query(
            "boolean",
            "Accepted and ignored: these records are never trashed.",
        ),
        "ensure_unique_name" => query(
            "boolean",
            "Accepted and ignored: request names need not be unique.",
        ),
        _ => query("string", ""),
    }
}

fn schemas() -> Value {
    let list = |id: &str, item: &str| {
        json!({
            "id": id,
            "type": "object",
            "properties": {
                "kind": {"type": "string"},
                "etag": {"type": "string"},
                "items": {"type": "array", "items": {"$ref": item}},
                "items_available": {"type": "integer"},
                "offset": {"type": "integer"},
                "limit": {"type": "integer"},
            },
        })
    };
    let simple = |id: &str, names: &[(&str, &str)]| {
        let properties: Map<String, Value> = names
            .iter()
            .map(|(name, kind)| {
                // Clients that print a schema expect the items of every
                // array to be described.
                let spec = match *kind {
                    "array" => json!({"type": "array", "items": {"type": "string"}}),
                    _ => json!({"type": kind}),
                };
                ((*name).to_string(), spec)
            })
            .collect();
        json!({"id": id, "type": "object", "properties": properties})
    };
    json!({
        "ContainerRequest": record_schema("ContainerRequest", REQUEST_COLUMNS),
        "ContainerRequestList": list("ContainerRequestList", "ContainerRequest"),
        "Container": record_schema("Container", CONTAINER_COLUMNS),
        "ContainerList": list("ContainerList", "Container"),
        "ContainerChangeList": {
            "id": "ContainerChangeList",
            "type": "object",
            "properties": {
                "kind": {"type": "string"},
                "cursor": {"type": "string"},
                "items": {"type": "array", "items": {"$ref": "Container"}},
                "more": {"type": "boolean"},
            },
        },
        "Collection": record_schema("Collection", COLLECTION_COLUMNS),
        "CollectionList": list("CollectionList", "Collection"),
        "KeepServiceList": list("KeepServiceList", "KeepService"),
        "KeepService": simple("KeepService", &[
            ("uuid", "string"),
            ("service_host", "string"),
            ("service_port", "integer"),
            ("service_ssl_flag", "boolean"),
            ("service_type", "string"),
            ("read_only", "boolean"),
        ]),
        "ContainerSecretMounts": simple("ContainerSecretMounts", &[("secret_mounts", "object")]),
        "ContainerRuntimeToken": simple("ContainerRuntimeToken", &[("runtime_token", "string")]),
        "ContainerStatus": simple("ContainerStatus", &[
            ("uuid", "string"),
            ("state", "string"),
            ("container_state", "string"),
            ("exit_code", "integer"),
            ("scheduling_status", "string"),
        ]),
        "User": simple("User", &[
            ("uuid", "string"),
            ("owner_uuid", "string"),
            ("email", "string"),
            ("username", "string"),
            ("full_name", "string"),
            ("first_name", "string"),
            ("last_name", "string"),
            ("is_admin", "boolean"),
            ("is_active", "boolean"),
            ("prefs", "object"),
        ]),
        "ApiClientAuthorization": simple("ApiClientAuthorization", &[
            ("uuid", "string"),
            ("owner_uuid", "string"),
            ("scopes", "array"),
        ]),
    })
}

/// A record's schema, one property per column.
fn record_schema(id: &str, columns: &[Column]) -> Value {
    let mut properties = Map::new();
    properties.insert("kind".into(), json!({"type": "string"}));
    properties.insert("etag".into(), json!({"type": "string"}));
    for column in columns {
        let spec = match column.kind {
            ColumnKind::Text => json!({"type": "string"}),
            ColumnKind::Timestamp => json!({"type": "datetime"}),
            ColumnKind::Integer => json!({"type": "integer"}),
            ColumnKind::Real => json!({"type": "float"}),
            ColumnKind::Bool => json!({"type": "boolean"}),
            // Lists (command) and objects (mounts) alike.
            ColumnKind::Json => json!({"type": "object"}),
        };
        properties.insert(column.name.into(), spec);
    }
    json!({"id": id, "type": "object", "properties": properties})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        build("http://127.0.0.1:8000/", "zzzzz", 1 << 20, 1_209_600)
    }

    #[test]
    fn every_reference_names_a_schema() {
        let doc = document();
        let schemas = doc["schemas"].as_object().unwrap();
        let mut references = Vec::new();
        collect_references(&doc["resources"], &mut references);
        collect_references(&doc["schemas"], &mut references);
        assert!(references.len() > 10, "{references:?}");
        for reference in references {
            assert!(schemas.contains_key(&reference), "no schema {reference}");
        }
    }

    fn collect_references(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(name)) = map.get("$ref") {
                    out.push(name.clone());
                }
                map.values().for_each(|v| collect_references(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
            _ => {}
        }
    }

    #[test]
    fn methods_have_what_clients_require() {
        let doc = document();
        for (resource, spec) in doc["resources"].as_object().unwrap() {
            for (name, method) in spec["methods"].as_object().unwrap() {
                let id = format!("arvados.{resource}.{name}");
                assert_eq!(method["id"], id.as_str());
                assert!(method["path"].is_string(), "{id}: no path");
                assert!(method["httpMethod"].is_string(), "{id}: no httpMethod");
                assert!(method["parameters"].is_object(), "{id}: no parameters");
                assert!(method["response"].is_object(), "{id}: no response");
                let path = method["path"].as_str().unwrap();
                assert_eq!(
                    path.contains("{uuid}"),
                    method["parameters"]["uuid"]["location"] == "path",
                    "{id}: uuid parameter and path disagree"
                );
            }
        }
        for (resource, name) in [
            ("container_requests", "create"),
            ("container_requests", "update"),
            ("containers", "update"),
        ] {
            assert!(
                doc["resources"][resource]["methods"][name]["request"].is_object(),
                "{resource}.{name} takes no body"
            );
        }
    }

    #[test]
    fn list_methods_declare_every_list_parameter() {
        let doc = document();
        for resource in ["container_requests", "containers"] {
            let parameters = &doc["resources"][resource]["methods"]["list"]["parameters"];
            for name in [
                "filters",
                "where",
                "order",
                "select",
                "distinct",
                "limit",
                "offset",
                "count",
                "cluster_id",
                "bypass_federation",
                "include_trash",
            ] {
                assert!(parameters[name].is_object(), "{resource}.list lacks {name}");
            }
        }
    }

    #[test]
    fn record_schemas_list_no_secret() {
        let doc = document();
        for schema in ["ContainerRequest", "Container"] {
            let properties = doc["schemas"][schema]["properties"].as_object().unwrap();
            assert!(properties.contains_key("mounts"), "{schema}");
            for secret in ["secret_mounts", "runtime_token"] {
                assert!(!properties.contains_key(secret), "{schema} lists {secret}");
            }
        }
        let method = &doc["resources"]["containers"]["methods"]["secret_mounts"];
        assert_eq!(method["path"], "containers/{uuid}/secret_mounts");
        assert_eq!(method["httpMethod"], "GET");
    }

    #[test]
    fn document_has_no_configs_resource() {
        let doc = document();
        assert!(doc["resources"].get("configs").is_none());
        assert_eq!(doc["baseUrl"], "http://127.0.0.1:8000/arvados/v1/");
        assert_eq!(doc["uuidPrefix"], "zzzzz");
        assert_eq!(doc["revision"], REVISION);
    }
}
