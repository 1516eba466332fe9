//! The test harness: a controller router on a fresh store, driven with
//! `tower::ServiceExt::oneshot`.
//!
//! The store is a SQLite file in a temporary directory, or, when
//! `BERTH_TEST_DATABASE_URL` names a PostgreSQL database, a schema of its
//! own in that database, created for the test and dropped after it, so
//! that tests run in parallel without seeing each other's rows.

// A path relative to this file, so that the tests that include this file
// with `#[path]` find it too.
#[path = "common/gateway.rs"]
pub mod gateway;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use berth_controller::{app, AppState, ClusterSettings, Config};
use berth_core::Secret;
use bytes::Bytes;
use serde_json::{json, Value};
use tower::ServiceExt;

pub const SYSTEM_TOKEN: &str = "system-token-for-tests-0123456789";

/// One response of the API.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "answer {} is not JSON ({err}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Returns the joined error messages of an error response.
    pub fn errors(&self) -> String {
        let body = self.json();
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors in {body}"));
        errors
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_string())
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn expect(&self, status: StatusCode) -> &Reply {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }
}

/// Sends a request to a router and reads the whole response.
pub async fn send_to(app: Router, request: Request<Body>) -> Reply {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

pub struct TestApi {
    pub state: AppState,
    pub app: Router,
    pub cluster: ClusterSettings,
    /// The block store's directory, removed when the test ends.
    pub blocks: tempfile::TempDir,
    /// Holds the database until the test ends; last, so that it goes
    /// after the store that uses it.
    _database: TestDatabase,
}

pub fn cluster() -> ClusterSettings {
    ClusterSettings {
        cluster_id: "zzzzz".parse().unwrap(),
        system_token: Secret::new(SYSTEM_TOKEN),
    }
}

impl TestApi {
    pub async fn new() -> TestApi {
        TestApi::with_config(|_| {}).await
    }

    pub async fn with_config(adjust: impl FnOnce(&mut Config)) -> TestApi {
        let database = TestDatabase::new().await;
        let blocks = tempfile::tempdir().unwrap();
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), database.url().to_string());
        config.blocks.directory = blocks.path().join("blocks");
        adjust(&mut config);
        let store = berth_controller::store::open(&config.database_url, 4)
            .await
            .unwrap();
        let cluster = cluster();
        let state = AppState::new(store, cluster.clone(), &config).unwrap();
        TestApi {
            app: app(state.clone()),
            blocks,
            _database: database,
            state,
            cluster,
        }
    }

    /// Returns the URL of the test's database, for a second controller on
    /// the same database.
    pub fn database_url(&self) -> &str {
        self._database.url()
    }

    /// Creates a user and returns the user's token.
    pub async fn user(&self, name: &str, admin: bool) -> String {
        berth_controller::create_user_in(self.state.store(), &self.cluster, name, admin)
            .await
            .unwrap()
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        send_to(self.app.clone(), request).await
    }

    pub fn request(
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> axum::http::request::Builder {
        let path = encode_query(path);
        let uri = if path.starts_with('/') {
            path
        } else {
            format!("/arvados/v1/{path}")
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder
    }

    /// Sends a call with an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let builder = TestApi::request(method, path, token);
        let request = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn create_request(&self, token: &str, attributes: Value) -> Reply {
        self.call(
            Method::POST,
            "container_requests",
            Some(token),
            Some(json!({"container_request": attributes})),
        )
        .await
    }

    /// Creates a committed request; returns the request and its container.
    pub async fn committed(&self, token: &str) -> (Value, Value) {
        self.committed_with(token, json!({})).await
    }

    /// Creates a committed request with `extra` attributes over
    /// [`runnable`]; returns the request and its container.
    pub async fn committed_with(&self, token: &str, extra: Value) -> (Value, Value) {
        let mut attributes = runnable();
        for (key, value) in extra.as_object().unwrap() {
            attributes[key] = value.clone();
        }
        let request = self.create_request(token, attributes).await;
        request.expect(StatusCode::OK);
        let request = request.json();
        let container_uuid = request["container_uuid"].as_str().unwrap().to_string();
        let container = self
            .get(&format!("containers/{container_uuid}"), SYSTEM_TOKEN)
            .await;
        container.expect(StatusCode::OK);
        (request, container.json())
    }

    pub async fn update_container(&self, uuid: &str, token: &str, attributes: Value) -> Reply {
        self.call(
            Method::PUT,
            &format!("containers/{uuid}"),
            Some(token),
            Some(json!({"container": attributes})),
        )
        .await
    }

    /// Locks a container with the system token; returns the container
    /// token.
    pub async fn lock(&self, uuid: &str) -> String {
        let reply = self
            .call(
                Method::POST,
                &format!("containers/{uuid}/lock"),
                Some(SYSTEM_TOKEN),
                None,
            )
            .await;
        reply.expect(StatusCode::OK);
        reply.json()["credentials"]["api_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn append_log(
        &self,
        uuid: &str,
        stream: &str,
        offset: u64,
        token: &str,
        data: &[u8],
    ) -> Reply {
        let request = TestApi::request(
            Method::POST,
            &format!("containers/{uuid}/log/{stream}?offset={offset}"),
            Some(token),
        )
        .header("content-type", "application/octet-stream")
        .body(Body::from(data.to_vec()))
        .unwrap();
        self.send(request).await
    }

    pub async fn read_log(&self, uuid: &str, stream: &str, query: &str, token: &str) -> Reply {
        self.get(&format!("containers/{uuid}/log/{stream}?{query}"), token)
            .await
    }

    /// Counts the container requests the system token can list.
    pub async fn request_count(&self) -> u64 {
        let reply = self.get("container_requests", SYSTEM_TOKEN).await;
        reply.expect(StatusCode::OK);
        reply.json()["items_available"].as_u64().unwrap()
    }

    pub async fn container_count(&self) -> u64 {
        let reply = self.get("containers", SYSTEM_TOKEN).await;
        reply.expect(StatusCode::OK);
        reply.json()["items_available"].as_u64().unwrap()
    }
}

/// Attributes of a committed request that can run. It always gets a
/// container of its own: reuse is off, so tests that create several see
/// several containers.
pub fn runnable() -> Value {
    json!({
        "use_existing": false,
        "name": "test",
        "state": "Committed",
        "container_image": "localhost/busybox:latest",
        "command": ["echo", "hello"],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1048576}},
        "runtime_constraints": {"ram": 67108864, "vcpus": 1},
        "priority": 1,
    })
}

/// Percent-encodes what a URI may not contain in the query of `path`, so
/// tests can write filters as plain JSON.
fn encode_query(path: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let mut encoded = String::new();
    for byte in query.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~=&%+,;:/?@!$'()*".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{base}?{encoded}")
}

pub fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value}"))
}

/// The variable naming a PostgreSQL database for the tests; unset, they
/// use SQLite.
pub const DATABASE_URL_VARIABLE: &str = "BERTH_TEST_DATABASE_URL";

/// A database for one test, removed when it is dropped.
pub enum TestDatabase {
    Sqlite {
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        url: String,
        /// The URL of the database that holds the schema.
        base_url: String,
        schema: String,
    },
}

impl TestDatabase {
    pub async fn new() -> TestDatabase {
        match std::env::var(DATABASE_URL_VARIABLE) {
            Ok(base_url) if !base_url.is_empty() => TestDatabase::postgres(base_url).await,
            _ => {
                let dir = tempfile::tempdir().unwrap();
                TestDatabase::Sqlite {
                    url: format!("sqlite://{}/db/berth.db", dir.path().display()),
                    _dir: dir,
                }
            }
        }
    }

    /// Creates a schema with a random name and returns a URL whose
    /// connections use it.
    async fn postgres(base_url: String) -> TestDatabase {
        use sqlx::Connection;
        let schema = format!("test_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&base_url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {DATABASE_URL_VARIABLE}: {err}"));
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let separator = if base_url.contains('?') { '&' } else { '?' };
        TestDatabase::Postgres {
            url: format!("{base_url}{separator}options[search_path]={schema}"),
            base_url,
            schema,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDatabase::Sqlite { url, .. } | TestDatabase::Postgres { url, .. } => url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let TestDatabase::Postgres {
            base_url, schema, ..
        } = self
        else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on a
        // future, so the schema is dropped from a thread of its own.
        let base_url = base_url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
        let dropped = std::thread::spawn(move || {
            use sqlx::Connection;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&base_url).await?;
                sqlx::query(&sql).execute(&mut conn).await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(err)) = dropped {
            eprintln!("failed to drop the test schema {schema}: {err}");
        }
    }
}
