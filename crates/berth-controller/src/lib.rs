//! The controller: Berth's REST API (Arvados v1 shape), its store, token
//! authentication and live container logs.

use std::net::SocketAddr;
use std::path::PathBuf;

use berth_core::{ClusterId, Secret};
use serde::Deserialize;

/// The `controller` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Database URL, such as `sqlite:///var/lib/berth/berth.db`.
    pub database_url: String,
}

/// Settings the controller shares with the rest of the cluster's
/// configuration.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster_id: ClusterId,
    /// The system token: the dispatcher's and administrators' credential.
    pub system_token: Secret,
}

/// A controller whose listener is bound and whose store is open.
#[derive(Debug)]
pub struct BoundController {
    _private: (),
}

/// Opens the store (running migrations) and binds the listener.
pub async fn bind(_cluster: ClusterSettings, _config: Config) -> anyhow::Result<BoundController> {
    anyhow::bail!("not built yet")
}

impl BoundController {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        unimplemented!()
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run(
        self,
        _shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        unimplemented!()
    }
}

/// Creates a user in the store and returns the user's new API token.
pub async fn create_user(
    _cluster: &ClusterSettings,
    _config: &Config,
    _name: &str,
    _admin: bool,
) -> anyhow::Result<String> {
    anyhow::bail!("not built yet")
}

#[allow(dead_code)]
fn _unused(_: PathBuf) {}
