//! Several `berth controller` processes on one PostgreSQL database behind
//! a TCP load balancer, with a dispatcher that reaches them through it, as
//! a cluster with more than one controller runs.
//!
//! The database is a schema of its own in the PostgreSQL database that
//! `BERTH_TEST_DATABASE_URL` names, made for the cluster and dropped with
//! it, so that tests running at the same time do not see each other's
//! rows. Every controller reads the same configuration file: each listens
//! on a port of its own (`127.0.0.1:0`), so each derives its own internal
//! URL from the port it gets.
//!
//! The load balancer forwards each connection it accepts to the first of
//! its backends that accepts a TCP connection, in the order the test set.
//! A controller that has begun to shut down has closed its port, so the
//! load balancer then passes to the next backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_controller::store::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{
    berth_bin, create_user_with, log_file, log_tails, random_alnum, random_cluster_id,
    wait_for_address, write_config, write_private, ClusterLogs, ClusterOptions, DispatcherProcess,
};

/// The variable naming the PostgreSQL database the controllers share.
pub const DATABASE_URL_VARIABLE: &str = "BERTH_TEST_DATABASE_URL";

/// Returns the PostgreSQL URL for shared-database tests, or `None` (after
/// saying so) when it is unset and the test should pass without running.
pub fn postgres_url() -> Option<String> {
    match std::env::var(DATABASE_URL_VARIABLE) {
        Ok(url) if url.starts_with("postgres") => Some(url),
        _ => {
            eprintln!(
                "skipped: set {DATABASE_URL_VARIABLE} to a PostgreSQL URL \
                 (scripts/test.sh does) to run controllers that share a database"
            );
            None
        }
    }
}

/// A PostgreSQL schema with a random name, dropped when this is dropped.
pub struct PostgresSchema {
    base_url: String,
    name: String,
    /// The URL whose connections use the schema.
    pub url: String,
}

impl PostgresSchema {
    pub async fn create(base_url: &str) -> PostgresSchema {
        let name = format!("e2e_{}", random_alnum(16));
        run_sql(base_url, &format!("CREATE SCHEMA {name}"))
            .await
            .unwrap_or_else(|error| {
                panic!("failed to create a schema in {DATABASE_URL_VARIABLE}: {error}")
            });
        let separator = if base_url.contains('?') { '&' } else { '?' };
        PostgresSchema {
            url: format!("{base_url}{separator}options[search_path]={name}"),
            base_url: base_url.to_owned(),
            name,
        }
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        // The test's runtime cannot block on a future inside drop, so the
        // schema is dropped from a thread with a runtime of its own.
        let base_url = self.base_url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("failed to build a runtime")
                .block_on(run_sql(&base_url, &sql))
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("failed to drop the test schema {}: {error}", self.name);
        }
    }
}

async fn run_sql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sql).execute(&mut connection).await?;
    connection.close().await
}

/// A TCP load balancer on a loopback port, in a thread with a runtime of
/// its own, so that test code that blocks does not stall it.
pub struct LoadBalancer {
    pub address: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    /// Connections forwarded, by backend.
    forwarded: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoadBalancer {
    /// Starts a load balancer with no backends yet.
    pub fn start() -> LoadBalancer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("failed to bind the load balancer's port");
        listener
            .set_nonblocking(true)
            .expect("failed to make the load balancer's socket non-blocking");
        let address = listener
            .local_addr()
            .expect("failed to read the load balancer's address");
        let backends = Arc::new(Mutex::new(Vec::new()));
        let forwarded = Arc::new(Mutex::new(HashMap::new()));
        let (stop, stopped) = oneshot::channel();
        let thread = {
            let backends = backends.clone();
            let forwarded = forwarded.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("failed to build the load balancer's runtime")
                    .block_on(balance(listener, backends, forwarded, stopped));
            })
        };
        LoadBalancer {
            address,
            backends,
            forwarded,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    /// Sets the backends, in the order they are tried.
    pub fn set_backends(&self, backends: &[SocketAddr]) {
        *self.backends.lock().unwrap() = backends.to_vec();
    }

    /// Returns the number of connections forwarded to `backend`.
    pub fn forwarded_to(&self, backend: SocketAddr) -> usize {
        self.forwarded
            .lock()
            .unwrap()
            .get(&backend)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The runtime's end closes every forwarded connection.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn balance(
    listener: std::net::TcpListener,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    forwarded: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("failed to register the listener");
    loop {
        let mut client = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(error) => {
                    eprintln!("load balancer: failed to accept a connection: {error}");
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let candidates = backends.lock().unwrap().clone();
        let forwarded = forwarded.clone();
        tokio::spawn(async move {
            for backend in candidates {
                let Ok(mut server) = TcpStream::connect(backend).await else {
                    continue;
                };
                *forwarded.lock().unwrap().entry(backend).or_default() += 1;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                return;
            }
            // No backend accepted: dropping the client closes it.
        });
    }
}

/// A `berth controller` process, killed with SIGKILL when dropped unless
/// it has exited.
pub struct ControllerProcess {
    child: Child,
    /// The URL the controller printed: its API and its internal URL.
    pub url: String,
    pub address: SocketAddr,
    /// Its directory, holding `controller.log`.
    pub dir: PathBuf,
}

impl ControllerProcess {
    /// Starts a controller on `config`, logging to `dir/controller.log`,
    /// and waits until it listens.
    fn start(config: &Path, dir: PathBuf) -> ControllerProcess {
        std::fs::create_dir_all(&dir).expect("failed to make a controller's directory");
        let mut child = Command::new(berth_bin())
            .args(["controller", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(log_file(&dir, "controller.log"))
            .spawn()
            .expect("failed to start berth controller");
        let stdout = child.stdout.take().expect("controller stdout");
        let url = wait_for_address(stdout, &dir);
        let parsed = url::Url::parse(&url).expect("the controller printed an invalid URL");
        let address = parsed
            .socket_addrs(|| None)
            .expect("the controller's URL has no address")[0];
        ControllerProcess {
            child,
            url: parsed.to_string(),
            address,
            dir,
        }
    }

    /// Sends SIGTERM, which starts a graceful shutdown.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .expect("failed to send SIGTERM to a controller");
    }

    /// Waits up to `timeout` for the process to exit; returns its status,
    /// or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to reap a controller") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Controllers on one PostgreSQL schema behind a [`LoadBalancer`], and a
/// dispatcher whose API URL, written into every job's credentials, is the
/// load balancer's. Fields drop in order: the dispatcher, the
/// controllers, the load balancer, then the schema.
pub struct SharedDatabaseCluster {
    pub dispatcher: DispatcherProcess,
    pub controllers: Vec<ControllerProcess>,
    pub balancer: LoadBalancer,
    pub schema: PostgresSchema,
    pub config: PathBuf,
    pub system_token: String,
    pub dir: tempfile::TempDir,
}

impl SharedDatabaseCluster {
    /// Starts `count` controllers on a new schema of the database at
    /// `base_url`, a load balancer that tries them in the order given by
    /// `order` (indexes into the controllers), and a dispatcher with
    /// `backend`.
    pub async fn start(
        base_url: &str,
        count: usize,
        order: &[usize],
        backend: &str,
        options: &ClusterOptions,
    ) -> SharedDatabaseCluster {
        let schema = PostgresSchema::create(base_url).await;
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("failed to make a temporary directory");
        let system_token = random_alnum(40);
        let token_file = dir.path().join("system-token");
        write_private(&token_file, &system_token);
        let config = dir.path().join("config.yml");
        let balancer = LoadBalancer::start();
        let options = ClusterOptions {
            database_url: Some(schema.url.clone()),
            ..options.clone()
        };
        write_config(
            &config,
            &random_cluster_id(),
            &token_file,
            dir.path(),
            Some((&balancer.url(), backend)),
            &options,
        );

        let controllers: Vec<ControllerProcess> = (1..=count)
            .map(|number| {
                ControllerProcess::start(&config, dir.path().join(format!("controller-{number}")))
            })
            .collect();
        let backends: Vec<SocketAddr> = order.iter().map(|&i| controllers[i].address).collect();
        balancer.set_backends(&backends);

        let dispatcher = Command::new(berth_bin())
            .args(["dispatch", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), "dispatch.log"))
            .spawn()
            .expect("failed to start berth dispatch");
        SharedDatabaseCluster {
            dispatcher: DispatcherProcess {
                child: Some(dispatcher),
                log: dir.path().join("dispatch.log"),
            },
            controllers,
            balancer,
            schema,
            config,
            system_token,
            dir,
        }
    }

    /// Creates a user with `berth admin create-user` and returns its token.
    pub fn create_user(&self, name: &str) -> String {
        create_user_with(&self.config, name)
    }

    /// Opens the controllers' store, to read what they wrote.
    pub async fn store(&self) -> Arc<dyn Store> {
        berth_controller::store::open(&self.schema.url, 2)
            .await
            .expect("failed to open the controllers' database")
    }
}

impl Drop for SharedDatabaseCluster {
    /// Stops the dispatcher, then the supervisors its local backend
    /// started, which outlive it.
    fn drop(&mut self) {
        self.dispatcher.kill();
        stop_local_supervisors(&self.dir.path().join("credentials"), self.dir.path());
    }
}

/// Kills, with SIGKILL, the process group of each supervisor whose pid file
/// the local backend left in `pid_dir` and whose command line names
/// `cluster_dir` (so a reused pid is left alone).
fn stop_local_supervisors(pid_dir: &Path, cluster_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return;
    };
    let cluster_dir = cluster_dir.to_string_lossy().into_owned();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&command_line).contains(&cluster_dir) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl ClusterLogs for SharedDatabaseCluster {
    fn logs(&self) -> String {
        let mut files: Vec<(String, PathBuf)> = self
            .controllers
            .iter()
            .enumerate()
            .map(|(index, controller)| {
                (
                    format!("controller {}", index + 1),
                    controller.dir.join("controller.log"),
                )
            })
            .collect();
        files.push(("dispatcher".into(), self.dispatcher.log.clone()));
        log_tails(files)
    }
}
