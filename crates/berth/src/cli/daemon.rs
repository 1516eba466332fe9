//! `berth controller` and `berth dispatch`: the long-running services.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Sets up `tracing` for a service: human-readable lines on stderr, coloured
/// only when stderr is a terminal, or JSON lines when `BERTH_LOG_FORMAT=json`. `RUST_LOG` sets the level (default
/// `info`).
pub fn init_logging() {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = if std::env::var("BERTH_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second initialisation (as in tests) keeps the first subscriber.
    drop(result);
}

/// Returns a token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("received SIGTERM, shutting down"),
            _ = interrupt.recv() => tracing::info!("received SIGINT, shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

pub async fn controller(config_path: &Path) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = Config::load(config_path)?;
    let cluster = berth_controller::ClusterSettings {
        cluster_id: config.cluster_id.clone(),
        system_token: config.system_token()?,
    };
    let bound = berth_controller::bind(cluster, config.controller()?.clone()).await?;
    let shutdown = shutdown_on_signal()?;
    // The one line on stdout: tests and scripts read the bound address here.
    println!("berth controller listening on {}", bound.url());
    bound.run(async move { shutdown.cancelled().await }).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn dispatch(config_path: &Path) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = Config::load(config_path)?;
    let dispatch = config.dispatch()?.clone();
    let client = dispatch_client(&config)?;
    let supervisor = berth_dispatch::SupervisorCommand {
        program: std::env::current_exe().context("failed to find the berth executable")?,
        config_file: Some(
            std::fs::canonicalize(config_path)
                .with_context(|| format!("failed to resolve {}", config_path.display()))?,
        ),
    };
    let shutdown = shutdown_on_signal()?;
    berth_dispatch::run(
        config.cluster_id.clone(),
        client,
        dispatch,
        supervisor,
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Builds the dispatcher's API client: the controller named in the
/// dispatch section, with the system token.
pub fn dispatch_client(config: &Config) -> anyhow::Result<berth_client::Client> {
    let dispatch = config.dispatch()?;
    let settings = berth_client::Settings {
        base_url: berth_client::parse_api_host(&dispatch.api_url)?,
        token: berth_client::Token::new(config.system_token()?.expose()),
        insecure: dispatch.insecure,
    };
    Ok(berth_client::Client::new(settings)?)
}
