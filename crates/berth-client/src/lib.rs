//! The REST client of the Berth API (the Arvados v1 API shape).
//!
//! [`Client`] contains the API's base URL and one bearer token. The CLI builds
//! it from the environment ([`Settings::from_env`]); the dispatcher uses the
//! system token; the supervisor uses the container's own token.
//!
//! The client does not retry: callers know which failures are worth another
//! try, and [`ClientError::is_transient`] tells them which kind this is.
//!
//! Live logs: the supervisor appends each stream's bytes at a known offset
//! ([`Client::append_log`]), so a retried append is harmless; readers fetch
//! from an offset and may wait on the server for new bytes
//! ([`Client::read_log`]), so following a log needs no polling loop.
//!
//! Secrets: [`Client::container_secret_mounts`] reads a container's secret
//! mounts with the container's own token. Errors about them never show a
//! value.
//!
//! Change feed: [`Client::container_changes`] reads the containers changed
//! after a cursor, in commit order, and may wait on the server until one
//! changes. A caller takes a cursor first (no `after`), then lists, then
//! follows from the cursor, so that no change falls between the two.

// Tests may unwrap: a panic there is a test failure with its message.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod collections;
pub mod credentials;
mod shell;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use berth_core::records::ContainerCredentials;
use berth_core::{Container, ContainerRequest, Mount};
use bytes::Bytes;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

pub use credentials::{CredentialsError, JobCredentials};
pub use reqwest::{StatusCode, Upgraded};
pub use shell::{PlainShellConnection, SSH_UPGRADE};

/// Time allowed for an ordinary API call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Extra time a long-poll read is allowed beyond the wait it requests.
const LONG_POLL_MARGIN: Duration = Duration::from_secs(15);

/// Response header carrying a log stream's total size.
pub const LOG_SIZE_HEADER: &str = "x-berth-log-size";

/// Response header carrying the container's state when the response was made.
pub const CONTAINER_STATE_HEADER: &str = "x-berth-container-state";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid client settings: {0}")]
    Settings(String),
    #[error("{method} {url} failed: {source}")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url} returned {status}: {message}")]
    Api {
        method: Method,
        url: String,
        status: StatusCode,
        message: String,
        /// The server's `Retry-After`, read by [`berth_core::time::retry_after`].
        retry_after: Option<Duration>,
    },
    /// A log append whose bytes differ from those the stream already has
    /// at the same offsets (409 Conflict); the server wrote none of them.
    /// `size` is the stream's size in bytes, where an append may go instead.
    #[error("POST {url} returned 409 Conflict: {message}")]
    LogConflict {
        url: String,
        size: u64,
        message: String,
    },
    #[error("failed to decode the response of {method} {url}: {source}")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// A response that carries secrets did not decode. Only the position
    /// is given, because serde's message may quote the secret.
    #[error(
        "failed to decode the secrets returned by {method} {url}: invalid at line {line}, column {column}"
    )]
    DecodeSecret {
        method: Method,
        url: String,
        line: usize,
        column: usize,
    },
}

impl ClientError {
    /// Returns the HTTP status, when the server responded.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::LogConflict { .. } => Some(StatusCode::CONFLICT),
            _ => None,
        }
    }

    /// Returns how long the server requested the client to wait before another try
    /// (its `Retry-After` header, at most
    /// [`berth_core::time::MAX_RETRY_AFTER`]). Callers that retry wait at
    /// least this long.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True for failures another attempt may cure: no response, a timeout, or
    /// a status that means the server is busy or failing (408, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => {
                *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error()
            }
            ClientError::Settings(_)
            | ClientError::LogConflict { .. }
            | ClientError::Decode { .. }
            | ClientError::DecodeSecret { .. } => false,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A bearer token whose `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Connection settings: the API's URL, the token and TLS checking.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL of the controller, such as `https://ctl.example:8443/`.
    pub base_url: Url,
    pub token: Token,
    /// Accept a certificate that does not verify (self-signed test set-ups).
    pub insecure: bool,
}

impl Settings {
    /// Reads `BERTH_API_HOST`, `BERTH_API_TOKEN` and `BERTH_API_HOST_INSECURE`,
    /// each falling back to its `ARVADOS_` counterpart.
    pub fn from_env() -> Result<Settings> {
        let lookup = |name: &str| std::env::var(name).ok();
        Settings::from_lookup(lookup)
    }

    /// Builds settings from a variable lookup (the environment, in
    /// [`Settings::from_env`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let pick = |suffix: &str| {
            lookup(&format!("BERTH_{suffix}"))
                .filter(|v| !v.is_empty())
                .or_else(|| lookup(&format!("ARVADOS_{suffix}")).filter(|v| !v.is_empty()))
        };
        let host = pick("API_HOST").ok_or_else(|| {
            ClientError::Settings(
                "BERTH_API_HOST is not set: set it (or ARVADOS_API_HOST) to the controller's host:port or URL"
                    .into(),
            )
        })?;
        let token = pick("API_TOKEN").ok_or_else(|| {
            ClientError::Settings(
                "BERTH_API_TOKEN is not set: set it (or ARVADOS_API_TOKEN) to your API token"
                    .into(),
            )
        })?;
        let insecure = pick("API_HOST_INSECURE")
            .map(|v| {
                matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "t" | "true" | "y" | "yes"
                )
            })
            .unwrap_or(false);
        Ok(Settings {
            base_url: parse_api_host(&host)?,
            token: Token::new(token),
            insecure,
        })
    }
}

/// Parses an API host: a URL with scheme, or `host[:port]`, which means
/// HTTPS as in Arvados's `ARVADOS_API_HOST`.
pub fn parse_api_host(host: &str) -> Result<Url> {
    let text = if host.contains("://") {
        host.to_string()
    } else {
        format!("https://{host}")
    };
    let mut url = Url::parse(&text).map_err(|err| {
        ClientError::Settings(format!(
            "invalid API host {host:?}: {err}; expected host:port or a URL such as https://host:port"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ClientError::Settings(format!(
            "invalid API host {host:?}: the scheme must be http or https"
        )));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Parameters of a list call. Filters use the Arvados form
/// `[[attribute, operator, operand], ...]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub select: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<String>,
}

impl ListParams {
    pub fn with_filters(filters: Value) -> ListParams {
        ListParams {
            filters: Some(filters),
            ..Default::default()
        }
    }

    fn to_query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(filters) = &self.filters {
            query.push(("filters", filters.to_string()));
        }
        if let Some(order) = &self.order {
            query.push(("order", Value::from(order.clone()).to_string()));
        }
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(offset) = self.offset {
            query.push(("offset", offset.to_string()));
        }
        if let Some(select) = &self.select {
            query.push(("select", Value::from(select.clone()).to_string()));
        }
        if let Some(count) = &self.count {
            query.push(("count", count.clone()));
        }
        query
    }
}

/// One page of a list call.
#[derive(Debug, Clone, Deserialize)]
pub struct ListPage<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub items_available: Option<u64>,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub limit: u64,
}

/// The answer to a lock call: the container and its freshly minted secrets.
#[derive(Debug, Clone)]
pub struct Locked {
    pub container: Container,
    pub credentials: ContainerCredentials,
}

/// A dispatch lease as the controller returns it
/// (`POST dispatch_leases/{name}/acquire`, `renew` or `release`).
#[derive(Debug, Clone, Deserialize)]
pub struct DispatchLease {
    pub name: String,
    /// The holder id of the dispatcher that holds the lease, if any.
    pub holder: Option<String>,
    /// The number of times the lease changed holder.
    pub epoch: i64,
    /// True when the holder named in the call holds the lease.
    pub held: bool,
    /// Seconds until the lease expires, by the controller's clock.
    pub expires_in: f64,
}

/// A lease epoch that a lock call carries, so that the controller rejects
/// the lock once another dispatcher took the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFence {
    pub name: String,
    pub epoch: i64,
}

/// One page of the container change feed.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerChanges {
    /// The position after the last item: pass it as `after` next time.
    pub cursor: String,
    /// The containers changed after the cursor that was passed, each once,
    /// with its latest record, in commit order.
    pub items: Vec<Container>,
    /// True when the page was cut at its size limit: call again at once.
    #[serde(default)]
    pub more: bool,
}

/// Bytes read from a log stream.
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub data: Bytes,
    /// The stream's total size when the server answered.
    pub size: u64,
    /// The container's state when the server answered.
    pub container_state: Option<berth_core::ContainerState>,
}

/// A client of one controller, with one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: Url,
    token: Token,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client> {
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(settings.insecure)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| {
                ClientError::Settings(format!("failed to build the HTTP client: {err}"))
            })?;
        Ok(Client {
            http,
            base_url: settings.base_url,
            token: settings.token,
        })
    }

    pub fn from_env() -> Result<Client> {
        Client::new(Settings::from_env()?)
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// Returns a client of the same controller with another token.
    pub fn with_token(&self, token: Token) -> Client {
        Client {
            http: self.http.clone(),
            base_url: self.base_url.clone(),
            token,
        }
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base_url
            .join(path)
            .map_err(|err| ClientError::Settings(format!("invalid API path {path:?}: {err}")))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<reqwest::Response> {
        let url = self.url(path)?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(self.token.expose())
            .timeout(timeout)
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: method.clone(),
                url: url.to_string(),
                source,
            })?;
        check_status(method, url, response).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T> {
        self.call_with_timeout(method, path, query, body, REQUEST_TIMEOUT)
            .await
    }

    async fn call_with_timeout<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<T> {
        let response = self
            .send(method.clone(), path, query, body, timeout)
            .await?;
        let url = response.url().to_string();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method: method.clone(),
                url: url.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            url,
            source,
        })
    }

    pub async fn current_user(&self) -> Result<Value> {
        self.call(Method::GET, "arvados/v1/users/current", &[], None)
            .await
    }

    /// The record of the token this client uses: at least `uuid`,
    /// `owner_uuid` and `scopes`.
    pub async fn current_api_client_authorization(&self) -> Result<Value> {
        self.call(
            Method::GET,
            "arvados/v1/api_client_authorizations/current",
            &[],
            None,
        )
        .await
    }

    pub async fn create_container_request(&self, attributes: &Value) -> Result<ContainerRequest> {
        let body = serde_json::json!({ "container_request": attributes });
        self.call(
            Method::POST,
            "arvados/v1/container_requests",
            &[],
            Some(&body),
        )
        .await
    }

    pub async fn get_container_request(&self, uuid: &str) -> Result<ContainerRequest> {
        let path = format!("arvados/v1/container_requests/{uuid}");
        self.call(Method::GET, &path, &[], None).await
    }

    pub async fn update_container_request(
        &self,
        uuid: &str,
        attributes: &Value,
    ) -> Result<ContainerRequest> {
        let path = format!("arvados/v1/container_requests/{uuid}");
        let body = serde_json::json!({ "container_request": attributes });
        self.call(Method::PUT, &path, &[], Some(&body)).await
    }

    pub async fn list_container_requests(
        &self,
        params: &ListParams,
    ) -> Result<ListPage<ContainerRequest>> {
        self.call(
            Method::GET,
            "arvados/v1/container_requests",
            &params.to_query(),
            None,
        )
        .await
    }

    pub async fn get_container(&self, uuid: &str) -> Result<Container> {
        let path = format!("arvados/v1/containers/{uuid}");
        self.call(Method::GET, &path, &[], None).await
    }

    pub async fn list_containers(&self, params: &ListParams) -> Result<ListPage<Container>> {
        self.call(
            Method::GET,
            "arvados/v1/containers",
            &params.to_query(),
            None,
        )
        .await
    }

    pub async fn update_container(&self, uuid: &str, attributes: &Value) -> Result<Container> {
        let path = format!("arvados/v1/containers/{uuid}");
        let body = serde_json::json!({ "container": attributes });
        self.call(Method::PUT, &path, &[], Some(&body)).await
    }

    /// Locks a queued container. The answer carries the container's
    /// credentials, which the controller shows only this once.
    pub async fn lock_container(&self, uuid: &str) -> Result<Locked> {
        self.lock_container_fenced(uuid, None).await
    }

    /// Locks a queued container, as [`Client::lock_container`]. With a
    /// fence, the controller locks it only while that lease epoch is
    /// current, and returns 409 Conflict otherwise.
    pub async fn lock_container_fenced(
        &self,
        uuid: &str,
        fence: Option<&LeaseFence>,
    ) -> Result<Locked> {
        let path = format!("arvados/v1/containers/{uuid}/lock");
        let query: Vec<(&str, String)> = match fence {
            Some(fence) => vec![
                ("lease", fence.name.clone()),
                ("lease_epoch", fence.epoch.to_string()),
            ],
            None => Vec::new(),
        };
        let mut value: Value = self.call(Method::POST, &path, &query, None).await?;
        let decode = |source| ClientError::Decode {
            method: Method::POST,
            url: path.clone(),
            source,
        };
        let credentials = value
            .as_object_mut()
            .and_then(|object| object.remove("credentials"))
            .unwrap_or(Value::Null);
        let credentials = serde_json::from_value(credentials).map_err(decode)?;
        let container = serde_json::from_value(value).map_err(decode)?;
        Ok(Locked {
            container,
            credentials,
        })
    }

    /// Takes the dispatch lease `name` for `holder` for `ttl`, if it is
    /// free, expired or already the holder's. The result's `held` tells
    /// whether it was taken.
    pub async fn acquire_dispatch_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<DispatchLease> {
        let body = serde_json::json!({"holder": holder, "ttl": ttl.as_secs_f64()});
        self.lease_call(name, "acquire", &body).await
    }

    /// Extends the dispatch lease `name` by `ttl` from now, if `holder`
    /// still holds it at `epoch`. The result's `held` is false when the
    /// lease was lost.
    pub async fn renew_dispatch_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> Result<DispatchLease> {
        let body = serde_json::json!({"holder": holder, "epoch": epoch, "ttl": ttl.as_secs_f64()});
        self.lease_call(name, "renew", &body).await
    }

    /// Frees the dispatch lease `name` if `holder` holds it at `epoch`.
    pub async fn release_dispatch_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<DispatchLease> {
        let body = serde_json::json!({"holder": holder, "epoch": epoch});
        self.lease_call(name, "release", &body).await
    }

    async fn lease_call(&self, name: &str, verb: &str, body: &Value) -> Result<DispatchLease> {
        let path = format!("arvados/v1/dispatch_leases/{name}/{verb}");
        self.call(Method::POST, &path, &[], Some(body)).await
    }

    /// Reads a container's secret mounts (`GET containers/{uuid}/secret_mounts`):
    /// json and text mounts to add to `mounts`, keyed by target. Only the
    /// container's own token may call it, while the container is Locked or
    /// Running. The server returns 403 to other callers who may read the
    /// container. Keep the result out of logs.
    pub async fn container_secret_mounts(&self, uuid: &str) -> Result<BTreeMap<String, Mount>> {
        #[derive(Deserialize)]
        struct Body {
            secret_mounts: BTreeMap<String, Mount>,
        }
        let path = format!("arvados/v1/containers/{uuid}/secret_mounts");
        let response = self
            .send(Method::GET, &path, &[], None, REQUEST_TIMEOUT)
            .await?;
        let url = response.url().to_string();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::GET,
                url: url.clone(),
                source,
            })?;
        let body: Body =
            serde_json::from_slice(&bytes).map_err(|err| ClientError::DecodeSecret {
                method: Method::GET,
                url,
                line: err.line(),
                column: err.column(),
            })?;
        Ok(body.secret_mounts)
    }

    pub async fn unlock_container(&self, uuid: &str) -> Result<Container> {
        let path = format!("arvados/v1/containers/{uuid}/unlock");
        self.call(Method::POST, &path, &[], None).await
    }

    /// Reads the containers changed after the cursor `after`, each with its
    /// latest record, in commit order (`GET containers/changes`, a Berth
    /// extension of the API). Without `after`, the server returns at once
    /// with no items and the current cursor. With `after` and no change past
    /// it, the server keeps the request open until a change commits or `wait`
    /// ends. The wait goes to the server in whole seconds, rounded up, and
    /// the server caps it at 30 s; the request's timeout is longer than the
    /// wait. The server rejects a cursor it cannot use with 422: then take a
    /// new cursor without `after`, and list again.
    pub async fn container_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges> {
        let mut query = Vec::new();
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        let mut wait_seconds = wait.as_secs();
        if wait.subsec_nanos() > 0 {
            wait_seconds += 1;
        }
        query.push(("wait", wait_seconds.to_string()));
        let timeout = Duration::from_secs(wait_seconds) + LONG_POLL_MARGIN;
        self.call_with_timeout(
            Method::GET,
            "arvados/v1/containers/changes",
            &query,
            None,
            timeout,
        )
        .await
    }

    /// Appends `data` to a container's log stream at byte `offset`. The
    /// server ignores bytes it already has, so a retry after a lost answer
    /// writes nothing twice. Returns the stream's new size. Bytes that
    /// differ from the stored ones at the same offsets are
    /// [`ClientError::LogConflict`], with the stream's size.
    pub async fn append_log(
        &self,
        container_uuid: &str,
        stream: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<u64> {
        let path = format!("arvados/v1/containers/{container_uuid}/log/{stream}");
        let url = self.url(&path)?;
        let response = self
            .http
            .post(url.clone())
            .bearer_auth(self.token.expose())
            .timeout(REQUEST_TIMEOUT)
            .query(&[("offset", offset.to_string())])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::POST,
                url: url.to_string(),
                source,
            })?;
        // Only a 409 that gives the stream's size is a log conflict.
        let conflict_size = if response.status() == StatusCode::CONFLICT {
            header_log_size(&response)
        } else {
            None
        };
        match (
            check_status(Method::POST, url, response).await,
            conflict_size,
        ) {
            (Ok(response), _) => Ok(log_size(&response)),
            (Err(ClientError::Api { url, message, .. }), Some(size)) => {
                Err(ClientError::LogConflict { url, size, message })
            }
            (Err(err), _) => Err(err),
        }
    }

    /// Reads a container's log stream from byte `offset`. With a `wait`, the
    /// server keeps the request open until there are bytes past `offset`, the
    /// container changes state, or the wait ends.
    pub async fn read_log(
        &self,
        container_uuid: &str,
        stream: &str,
        offset: u64,
        wait: Option<Duration>,
    ) -> Result<LogChunk> {
        self.read_log_since(container_uuid, stream, offset, wait, None)
            .await
    }

    /// Like [`Client::read_log`], but the wait also ends at once when the
    /// container is no longer in `seen_state`, the state the caller last
    /// saw. A follower passes it so that a change between two of its reads
    /// is not missed.
    pub async fn read_log_since(
        &self,
        container_uuid: &str,
        stream: &str,
        offset: u64,
        wait: Option<Duration>,
        seen_state: Option<berth_core::ContainerState>,
    ) -> Result<LogChunk> {
        let path = format!("arvados/v1/containers/{container_uuid}/log/{stream}");
        let mut query = vec![("offset", offset.to_string())];
        if let Some(state) = seen_state {
            query.push(("state", state.to_string()));
        }
        let mut timeout = REQUEST_TIMEOUT;
        if let Some(wait) = wait {
            query.push(("wait", wait.as_secs_f64().to_string()));
            timeout = wait + LONG_POLL_MARGIN;
        }
        let response = self.send(Method::GET, &path, &query, None, timeout).await?;
        let size = log_size(&response);
        let container_state = response
            .headers()
            .get(CONTAINER_STATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let url = response.url().to_string();
        let data = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::GET,
                url,
                source,
            })?;
        Ok(LogChunk {
            data,
            size,
            container_state,
        })
    }
}

fn log_size(response: &reqwest::Response) -> u64 {
    header_log_size(response).unwrap_or(0)
}

fn header_log_size(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get(LOG_SIZE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Turns an error status into [`ClientError::Api`] with the server's
/// messages (`{"errors": [...]}`), or passes the response through.
async fn check_status(
    method: Method,
    url: Url,
    response: reqwest::Response,
) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .cloned();
    let body = response.bytes().await.unwrap_or_default();
    Err(api_error(method, url, status, retry_after.as_ref(), &body))
}

/// Builds the error of a response with status `status`: its message is
/// the `errors` of an Arvados error body, joined, or else the body's text.
fn api_error(
    method: Method,
    url: Url,
    status: StatusCode,
    retry_after: Option<&reqwest::header::HeaderValue>,
    body: &[u8],
) -> ClientError {
    let retry_after = retry_after
        .and_then(|value| value.to_str().ok())
        .and_then(berth_core::time::retry_after_now);
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errors").and_then(|e| e.as_array()).map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        e.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| e.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    ClientError::Api {
        method,
        url: url.to_string(),
        status,
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn berth_variables_win_over_arvados() {
        let settings = Settings::from_lookup(lookup(&[
            ("BERTH_API_HOST", "http://127.0.0.1:9000"),
            ("BERTH_API_TOKEN", "berth-token"),
            ("ARVADOS_API_HOST", "other:443"),
            ("ARVADOS_API_TOKEN", "arvados-token"),
        ]))
        .unwrap();
        assert_eq!(settings.base_url.as_str(), "http://127.0.0.1:9000/");
        assert_eq!(settings.token.expose(), "berth-token");
        assert!(!settings.insecure);
    }

    #[test]
    fn arvados_variables_are_the_fallback() {
        let settings = Settings::from_lookup(lookup(&[
            ("ARVADOS_API_HOST", "ctl.example:8443"),
            ("ARVADOS_API_TOKEN", "arvados-token"),
            ("ARVADOS_API_HOST_INSECURE", "yes"),
        ]))
        .unwrap();
        assert_eq!(settings.base_url.as_str(), "https://ctl.example:8443/");
        assert_eq!(settings.token.expose(), "arvados-token");
        assert!(settings.insecure);
    }

    #[test]
    fn missing_host_names_the_variable() {
        let err = Settings::from_lookup(lookup(&[("BERTH_API_TOKEN", "t")])).unwrap_err();
        assert!(err.to_string().contains("BERTH_API_HOST"), "{err}");
    }

    #[test]
    fn bad_scheme_is_rejected() {
        assert!(parse_api_host("ftp://host").is_err());
    }

    /// Serves one request on a loopback port with `status` and `body`, and
    /// returns the base URL and the request's head (request line and
    /// headers) once it has been read.
    async fn serve_once(
        status: &'static str,
        body: String,
    ) -> (Url, tokio::sync::oneshot::Receiver<String>) {
        serve_once_with(status, "", body).await
    }

    /// Like [`serve_once`], with `headers` (each line ending in CRLF)
    /// added to the response.
    async fn serve_once_with(
        status: &'static str,
        headers: &'static str,
        body: String,
    ) -> (Url, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            // A small body may arrive with the head; it is cut off.
            let end_of_head = |head: &[u8]| head.windows(4).position(|w| w == b"\r\n\r\n");
            while end_of_head(&head).is_none() {
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(n > 0, "the client closed the connection early");
                head.extend_from_slice(&buffer[..n]);
            }
            if let Some(end) = end_of_head(&head) {
                head.truncate(end + 4);
            }
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            let _ = sender.send(String::from_utf8(head).unwrap());
        });
        (Url::parse(&format!("http://{address}/")).unwrap(), receiver)
    }

    fn client(base_url: Url) -> Client {
        Client::new(Settings {
            base_url,
            token: Token::new("system-token"),
            insecure: false,
        })
        .unwrap()
    }

    fn container_json(uuid: &str) -> Value {
        serde_json::json!({
            "uuid": uuid,
            "owner_uuid": "zzzzz-tpzed-000000000000001",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "modified_by_user_uuid": null,
            "state": "Queued",
            "priority": 7,
            "log": null, "cwd": "/", "output_path": "/out", "output": null,
            "container_image": "busybox", "progress": null, "exit_code": null,
            "auth_uuid": null, "locked_by_uuid": null, "runtime_user_uuid": null,
            "gateway_address": null,
            "runtime_constraints": {"ram": 1048576, "vcpus": 1},
        })
    }

    #[tokio::test]
    async fn container_changes_sends_cursor_and_wait() {
        let body = serde_json::json!({
            "kind": "berth#containerChangeList",
            "cursor": "17",
            "items": [container_json("zzzzz-dz642-000000000000001")],
            "more": true,
        });
        let (url, head) = serve_once("200 OK", body.to_string()).await;
        let changes = client(url)
            .container_changes(Some("12"), Duration::from_secs(25))
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with("GET /arvados/v1/containers/changes?after=12&wait=25 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer system-token\r\n"),
            "{head}"
        );
        assert_eq!(changes.cursor, "17");
        assert!(changes.more);
        assert_eq!(changes.items.len(), 1);
        assert_eq!(changes.items[0].uuid, "zzzzz-dz642-000000000000001");
        assert_eq!(changes.items[0].priority, 7);
    }

    #[tokio::test]
    async fn put_block_names_the_md5() {
        let locator = "acbd18db4cc2f85cedef654fccc4a4d8+3+Aabc@65000000";
        let (url, head) = serve_once("200 OK", format!("{locator}\n")).await;
        let returned = client(url)
            .put_block(Bytes::from_static(b"foo"))
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with("PUT /acbd18db4cc2f85cedef654fccc4a4d8 HTTP/1.1\r\n"),
            "{head}"
        );
        assert_eq!(returned, locator);
    }

    #[tokio::test]
    async fn get_collection_escapes_the_pdh() {
        let body = serde_json::json!({
            "uuid": "zzzzz-4zz18-000000000000001",
            "owner_uuid": "zzzzz-tpzed-000000000000001",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "modified_by_user_uuid": null,
            "name": null,
            "description": null,
            "portable_data_hash": "d41d8cd98f00b204e9800998ecf8427e+0",
            "manifest_text": "",
            "replication_desired": null,
            "file_count": 0,
            "file_size_total": 0,
        });
        let (url, head) = serve_once("200 OK", body.to_string()).await;
        let collection = client(url)
            .get_collection("d41d8cd98f00b204e9800998ecf8427e+0")
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with(
                "GET /arvados/v1/collections/d41d8cd98f00b204e9800998ecf8427e%2B0 HTTP/1.1\r\n"
            ),
            "{head}"
        );
        assert_eq!(collection.uuid, "zzzzz-4zz18-000000000000001");
    }

    #[tokio::test]
    async fn container_changes_without_cursor_sends_no_after() {
        let body =
            r#"{"kind": "berth#containerChangeList", "cursor": "40", "items": [], "more": false}"#;
        let (url, head) = serve_once("200 OK", body.to_string()).await;
        let changes = client(url)
            .container_changes(None, Duration::ZERO)
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with("GET /arvados/v1/containers/changes?wait=0 HTTP/1.1\r\n"),
            "{head}"
        );
        assert_eq!(changes.cursor, "40");
        assert!(changes.items.is_empty());
        assert!(!changes.more);
    }

    #[tokio::test]
    async fn container_changes_rounds_the_wait_up() {
        let body = r#"{"cursor": "1", "items": [], "more": false}"#;
        let (url, head) = serve_once("200 OK", body.to_string()).await;
        client(url)
            .container_changes(Some("1"), Duration::from_millis(1500))
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(head.contains("&wait=2 HTTP/1.1"), "{head}");
    }

    #[tokio::test]
    async fn busy_answer_carries_retry_after() {
        let body = r#"{"errors": ["the API is busy"]}"#.to_string();
        let (url, _head) =
            serve_once_with("503 Service Unavailable", "retry-after: 4\r\n", body).await;
        let err = client(url)
            .get_container("zzzzz-dz642-000000000000001")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert!(err.is_transient());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(4)));

        let (url, _head) = serve_once("503 Service Unavailable", String::new()).await;
        let err = client(url)
            .get_container("zzzzz-dz642-000000000000001")
            .await
            .unwrap_err();
        assert_eq!(err.retry_after(), None);
    }

    #[tokio::test]
    async fn container_changes_rejected_cursor_is_422() {
        let body = r#"{"errors": ["invalid cursor \"zz\": not a cursor this server issued; take a new cursor by calling without after"]}"#;
        let (url, _head) = serve_once("422 Unprocessable Entity", body.to_string()).await;
        let err = client(url)
            .container_changes(Some("zz"), Duration::from_secs(25))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
        assert!(!err.is_transient());
        assert!(err.to_string().contains("invalid cursor"), "{err}");
    }

    #[tokio::test]
    async fn container_secret_mounts_reads_the_mounts() {
        let body =
            r#"{"secret_mounts": {"/etc/secret.txt": {"kind": "text", "content": "hunter2"}}}"#;
        let (url, head) = serve_once("200 OK", body.to_string()).await;
        let mounts = client(url)
            .container_secret_mounts("zzzzz-dz642-000000000000001")
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with(
                "GET /arvados/v1/containers/zzzzz-dz642-000000000000001/secret_mounts HTTP/1.1\r\n"
            ),
            "{head}"
        );
        let mount = &mounts["/etc/secret.txt"];
        assert_eq!(mount.kind, "text");
        assert_eq!(mount.content, Some(Value::from("hunter2")));
    }

    #[tokio::test]
    async fn container_secret_mounts_decode_error_hides_the_value() {
        let body =
            r#"{"secret_mounts": {"/etc/secret.txt": {"kind": "text", "capacity": "hunter2"}}}"#;
        let (url, _head) = serve_once("200 OK", body.to_string()).await;
        let err = client(url)
            .container_secret_mounts("zzzzz-dz642-000000000000001")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::DecodeSecret { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }

    #[tokio::test]
    async fn container_secret_mounts_forbidden_is_403() {
        let body = r#"{"errors": ["only the token of container zzzzz-dz642-000000000000001 may read its secret mounts"]}"#;
        let (url, _head) = serve_once("403 Forbidden", body.to_string()).await;
        let err = client(url)
            .container_secret_mounts("zzzzz-dz642-000000000000001")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
        assert!(!err.is_transient());
    }

    #[test]
    fn token_debug_is_redacted() {
        assert!(!format!("{:?}", Token::new("s3cret")).contains("s3cret"));
    }
}
